"""Triton kernels of chunked power retention, degrees 2 and 4 (DESIGN.md section 2, chunked form).

Feature layout. ``phi(x)`` for ``deg = 2`` has one coordinate per pair ``i <= j`` of the ``d``
indices. The kernels cut the indices into ``NB`` blocks of ``BD`` and walk the pairs of blocks
``a <= b`` as tiles of ``F = BD * BD`` features: feature ``f`` of tile ``(a, b)`` is
``x[a BD + f // BD] x[b BD + f % BD]`` times ``sqrt(2)`` (off the diagonal) or ``1`` (diagonal),
and in a diagonal tile the pairs ``i > j`` get coefficient 0. The chunk states between kernels use
this padded tile layout (``NT = NB (NB + 1) / 2`` tiles of ``F`` rows); states that users see
(initial and final) use the exact layout of ``sympow_embed`` and are gathered and scattered here.

A tile is formed on the tensor cores, never in memory and with no register shuffles: ``x[:, a
block] @ E1`` repeats each column ``BD`` times and ``x[:, b block] @ E2`` tiles the block ``BD``
times (``E1, E2`` are 0/1 matrices, so both products are exact in any precision), and their
elementwise product, in the accumulator layout of the matrix units, feeds the next product
directly (as the probabilities do in flash attention).

The backward's products through the state do not form feature tiles at all. Read as the
symmetric ``d x d x e`` array ``F`` (``phi(x).S = sum_ab x_a x_b F_ab``), a state's column ``F_b``
is ``d`` rows gathered from the tiles (times ``1 / sqrt(2)`` off the diagonal), and the gradient
of ``q`` through it is ``2 sum_b q_b (dY F_b^T)``: ``d`` plain products of width ``d`` and no
feature gradient to add back into its indices (the keys' alike).

Degree 4 (``DEG = 4``, head sizes up to 32) walks the exact layout of ``sympow_embed`` itself, in
tiles of ``F`` consecutive rows (``NT`` of them, the last one padded with coefficient 0), so its
chunk states need no gathering: ``index [NT F, 4]`` holds each row's indices ``i <= j <= k <= l``
and ``coefs [NT F]`` its coefficient. A tile is the elementwise product of four factors ``x @
E_m`` (``E_m [d, F]`` the 0/1 matrix putting column ``index[f, m]`` at feature ``f``), and a
gradient returns through the same matrices: ``dx = sum_m (dphi * prod_{m' != m} x @ E_m') @
E_m^T``. Its products take fp32 operands whatever the input dtype (the host keeps ``BF16`` off),
and for 16-bit inputs three tf32 passes (``PREC = "tf32x3"``, near fp32; ``host._precision``):
``phi(q) . S`` sums 52,360 products of both signs to ``(q . k)^4``-sized values, as much as
``(sum_i |q_i k_i| / |q . k|)^4`` (hundreds, often far more) times smaller than the products'
magnitudes, so one tf32 rounding of the features or the state is magnified as much (the initial
normaliser's gradient 3.2e-2 in fp16 with one pass on the H100, run 46).

Every sequence is a range ``[bos, eos)`` of a packed ``[T_total, H, x]`` tensor, cut into chunks of
``C`` tokens (the last one shorter and masked). Gates enter as log-gates; inside a chunk their
inclusive cumulative sum ``gc`` starts from 0 at the chunk's start, so every factor is
``exp`` of a difference ``<= 0``.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

SQRT2 = tl.constexpr(1.4142135623730951)
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
NONE_EXACT = tl.constexpr("")   # _dot32: no operand is a tf32 number already


@triton.jit
def _tile_ab(tile, NB: tl.constexpr):
    """Index blocks ``(a, b)`` of tile number ``tile`` (tiles ordered ``(0,0), (0,1), ..``)."""
    a = tile * 0
    for s in tl.static_range(1, NB):
        a += tl.where(tile >= s * NB - (s * (s - 1)) // 2, 1, 0)
    return a, tile - (a * NB - (a * (a - 1)) // 2) + a


@triton.jit
def _pair_coef(a, b, BD: tl.constexpr):
    """Coefficients ``[F]`` of tile ``(a, b)``: sqrt(2) for i < j, 1 for i == j, 0 for i > j."""
    f = tl.arange(0, BD * BD)
    i, j = f // BD, f % BD
    on_diag = tl.where(i < j, SQRT2, tl.where(i == j, 1.0, 0.0))
    return tl.where(a < b, SQRT2, on_diag)


@triton.jit
def _spread(KP: tl.constexpr, BD: tl.constexpr, SECOND: tl.constexpr):
    """``E [KP, F]``, 0/1: ``x [., KP] @ E`` puts ``x[:, f // BD]`` (or ``x[:, f % BD]`` for
    ``SECOND``) at feature ``f``. Rows ``>= BD`` (padding up to the matrix units' 16) are 0."""
    r = tl.arange(0, KP)[:, None]
    f = tl.arange(0, BD * BD)[None, :]
    idx = f % BD if SECOND else f // BD
    return tl.where(idx == r, 1.0, 0.0)


@triton.jit
def _public_rows(a, b, d, BD: tl.constexpr):
    """Row of each tile feature in the exact layout and whether it exists (``i <= j``)."""
    f = tl.arange(0, BD * BD)
    fi = a * BD + f // BD
    fj = b * BD + f % BD
    row = fi * d - (fi * (fi - 1)) // 2 + fj - fi
    return row.to(tl.int64), fi <= fj


@triton.jit
def _pair_rows(a, b, NB: tl.constexpr, BD: tl.constexpr):
    """Where entry ``(a, b)`` of the symmetric state lives (``a``, ``b`` broadcast together):
    the tile-layout row of the pair ``(min(a, b), max(a, b))`` (int64) and the factor that
    turns the row into ``F_ab`` (1 on the diagonal, ``1 / sqrt(2)`` off it, undoing
    ``phi``'s coefficient)."""
    i = tl.minimum(a, b)
    j = tl.maximum(a, b)
    blk_i = i // BD
    blk_j = j // BD
    tile = blk_i * NB - (blk_i * (blk_i - 1)) // 2 + blk_j - blk_i
    row = tile * (BD * BD) + (i % BD) * BD + j % BD
    return row.to(tl.int64), tl.where(a == b, 1.0, 1.0 / SQRT2)


@triton.jit
def _column_rows(b, NB: tl.constexpr, BD: tl.constexpr):
    """Column ``b`` of the symmetric state: ``_pair_rows`` of ``a = 0 .. d - 1`` and ``b``."""
    return _pair_rows(tl.arange(0, NB * BD), b, NB, BD)


@triton.jit
def _normaliser_matrix(zstates, base, NB: tl.constexpr, BD: tl.constexpr):
    """The normaliser's state as the symmetric ``[d, d]`` matrix ``Z_ab`` (fp32), so that its
    part of a gradient through the state, ``sum_b x_b Z_b``, is one product ``x @ Z``."""
    r = tl.arange(0, NB * BD)
    row, unphi = _pair_rows(r[:, None], r[None, :], NB, BD)
    return tl.load(zstates + base + row) * unphi


@triton.jit
def _column(x, t, mt, head, H, d, b):
    """``x[t, b]`` as fp32 ``[C]``."""
    return tl.load(x + (t * H + head) * d + b, mask=mt, other=0.0).to(tl.float32)


@triton.jit
def _load_block(x, t, mt, head, H, d, blk, KP: tl.constexpr, BD: tl.constexpr):
    """Columns ``blk BD ..`` of ``x [T, H, d]`` at rows ``t``: ``[C, KP]``, zero past ``BD``
    columns and outside the sequence."""
    r = tl.arange(0, KP)
    return tl.load(x + (t[:, None] * H + head) * d + (blk * BD + r)[None, :],
                   mask=mt[:, None] & (r < BD)[None, :], other=0.0)


@triton.jit
def _load_block_t(x, t, mt, head, H, d, blk, KP: tl.constexpr, BD: tl.constexpr):
    """``_load_block`` transposed: ``[KP, C]``."""
    r = tl.arange(0, KP)
    return tl.load(x + (t[None, :] * H + head) * d + (blk * BD + r)[:, None],
                   mask=mt[None, :] & (r < BD)[:, None], other=0.0)


@triton.jit
def _tile_factors(x, t, mt, head, H, d, a, b, ea, eb, KP: tl.constexpr, BD: tl.constexpr,
                  BF16: tl.constexpr, PREC: tl.constexpr):
    """The two factors ``[C, F]`` of tile ``(a, b)`` of ``phi(x)`` at rows ``t``: their
    elementwise product (times the pair coefficients) is the tile."""
    xa = _dot(_load_block(x, t, mt, head, H, d, a, KP, BD), ea, BF16, PREC)
    xb = _dot(_load_block(x, t, mt, head, H, d, b, KP, BD), eb, BF16, PREC)
    return xa, xb


@triton.jit
def _chunk_gates(g, t, mt, i_h, Hk, USE_GATE: tl.constexpr, C: tl.constexpr):
    """The inclusive cumulative log-gate from the chunk start, summed in float64: ``gc [C]``
    in fp32, what that rounding left out ``gc_lo [C]``, the chunk's total ``g_last`` and
    ``to_end = exp(g_last - gc) [C]``. With strong gates inside a chunk ``gc`` reaches
    thousands, where fp32 keeps a few digits of the differences that the decays are made of
    (``_chunk_decay``): a log-gate of -200 at every fifth token gave dk 3.0e-5 at chunk 64 in
    fp32 (interpreter, docs/benchmarks.md)."""
    gam = tl.zeros([C], tl.float64)
    if USE_GATE:
        gam = tl.load(g + t * Hk + i_h, mask=mt, other=0.0).to(tl.float64)
    wide = tl.cumsum(gam, axis=0)
    last = tl.sum(gam, axis=0)
    gc = wide.to(tl.float32)
    return gc, (wide - gc.to(tl.float64)).to(tl.float32), last.to(tl.float32), \
        tl.exp((last - wide).to(tl.float32))


@triton.jit
def _chunk_decay(gc, gc_lo, C: tl.constexpr):
    """``exp(gc_i - gc_j)`` for ``j <= i``, else 0 (``[C, C]``): the high parts' difference
    is exact where the two are close, the low parts' adds what their rounding left out."""
    causal = tl.arange(0, C)[:, None] >= tl.arange(0, C)[None, :]
    gap = (gc[:, None] - gc[None, :]) + (gc_lo[:, None] - gc_lo[None, :])
    return tl.where(causal, tl.exp(tl.minimum(gap, 0.0)), 0.0)


@triton.jit
def _straddle_intra(m, C: tl.constexpr):
    """``[C]``: for each position ``t``, the sum of ``m_ij`` over the pairs ``j < t <= i``.

    The gate gradient. A log-gate ``log g_t`` multiplies every weight ``w_ij`` with
    ``j < t <= i`` by ``g_t`` (and the state terms alike), so ``dL/dlog g_t`` is the sum of
    ``dw_ij w_ij`` over the pairs that straddle ``t``. The kernels add it by where the pair's
    ends lie: both in the chunk (here, ``m = dw * w`` of one query head), the query in the
    chunk and the key before it (``dq_kernel``), the key in the chunk and the query after it,
    or both outside (``dkv_kernel``). Every term is a sum of such products in fp32; the
    equivalent ``sum_{m >= t} (q_m.dq_m - k_m.dk_m) / 2`` cancels large terms and loses the
    precision of bf16 operands.
    """
    before = tl.cumsum(m, axis=1) - m                                   # sum over j < t
    i = tl.arange(0, C)[:, None]
    t = tl.arange(0, C)[None, :]
    return tl.sum(tl.where(i >= t, before, 0.0), axis=0)


@triton.jit
def _dot(x, y, BF16: tl.constexpr, PREC: tl.constexpr, EXACT: tl.constexpr = NONE_EXACT):
    """fp32-accumulated product; bf16 operands for bf16 inputs, fp32 (``_dot32``) otherwise.
    Triton's interpreter gets products of bf16 operands wrong (relative errors near 1), so
    there the operands are rounded to bf16 in fp32 registers instead: the same products."""
    if BF16:
        if INTERPRET:
            return tl.dot(_round_bf16(x.to(tl.float32)), _round_bf16(y.to(tl.float32)),
                          input_precision="ieee")
        return tl.dot(x.to(tl.bfloat16), y.to(tl.bfloat16))
    return _dot32(x, y, PREC, EXACT)


@triton.jit
def _dot32(x, y, PREC: tl.constexpr, EXACT: tl.constexpr = NONE_EXACT):
    """Product of fp32 operands at ``input_precision`` ``PREC``. "tf32x3" splits each operand,
    ``x = big + small`` (big rounded to nearest tf32, small truncated), and adds three tf32
    products, all but ``small . small``. ``EXACT`` names the operands that are tf32 numbers
    already ("x", "y" or "xy": 16-bit inputs, 0/1 matrices), whose small part is zero, so
    their products with it are left out: two passes, or one. The interpreter multiplies
    exactly whatever ``PREC`` says, so there the operands are rounded as the GPU rounds them
    ("tf32" truncates: the matrix units read the top 19 bits)."""
    x = x.to(tl.float32)
    y = y.to(tl.float32)
    if PREC == "tf32x3":
        if EXACT == "xy":
            return _tf32_dot(x, y, None)
        if EXACT == "x":
            yb = _tf32(y, True)
            return _tf32_dot(x, yb, _tf32_dot(x, y - yb, None))
        if EXACT == "y":
            xb = _tf32(x, True)
            return _tf32_dot(xb, y, _tf32_dot(x - xb, y, None))
        if INTERPRET:
            xb, yb = _tf32(x, True), _tf32(y, True)
            acc = _tf32_dot(x - xb, yb, _tf32_dot(xb, y - yb, None))
            return _tf32_dot(xb, yb, acc)
    if PREC == "tf32":
        return _tf32_dot(x, y, None)
    return tl.dot(x, y, input_precision=PREC)


@triton.jit
def _tf32_dot(x, y, acc):
    """``acc`` (or zeros, for None) plus one tf32 product of fp32 operands; the interpreter
    truncates them as the GPU does."""
    if INTERPRET:
        return tl.dot(_tf32(x, False), _tf32(y, False), acc, input_precision="ieee")
    return tl.dot(x, y, acc, input_precision="tf32")


@triton.jit
def _operand(x, BF16: tl.constexpr, PREC: tl.constexpr):
    """fp32 ``x`` as a one-pass tf32 product reads it (truncated), kept in fp32; any other
    ``x`` as is. Sums taken beside such a product then see the values it multiplies: a
    denominator summing the weights of the numerator's product makes the output an exact
    average of the values (``o_0 = v_0`` for a first token), and the gradient's ``-(dy . o)``
    cancels ``dy . v`` where the two are equal, as in the reference. Under the interpreter's
    emulation (``_dot32``), fp16 in pieces of 16 tokens without states: dq 9.1e-3 -> 6.1e-4,
    dk 1.0e-2 -> 6.2e-4. Rounding to bf16 alike for the bf16 products moved bf16's errors both
    ways (dq 8.3e-3 -> 6.2e-3, dz0 8.4e-3 -> 1.0e-2), so those keep their sums."""
    if BF16:
        return x
    if PREC == "tf32":
        return _tf32(x, False)
    return x


@triton.jit
def _tf32(x, NEAREST: tl.constexpr):
    """fp32 ``x`` as tf32 (10 mantissa bits), kept in fp32: rounded to nearest (ties away from
    zero) or truncated."""
    bits = x.to(tl.uint32, bitcast=True)
    if NEAREST:
        bits += 0x1000
    return (bits & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _round_bf16(x):
    """fp32 ``x`` rounded to the nearest bf16 (ties to even), kept in fp32."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _pow(s, DEG: tl.constexpr):
    """``s ** DEG`` as products."""
    out = s
    for _ in tl.static_range(DEG - 1):
        out = out * s
    return out


@triton.jit
def _table_spread(index, tile, m, DK: tl.constexpr, F: tl.constexpr, TRANS: tl.constexpr):
    """Degree 4: ``E_m [DK, F]`` (``[F, DK]`` with ``TRANS``), 0/1, of tile ``tile``: ``x @
    E_m`` puts ``x[:, index[f, m]]`` at feature ``f``."""
    idx = tl.load(index + (tile * F + tl.arange(0, F)) * 4 + m)
    r = tl.arange(0, DK)
    if TRANS:
        spread = tl.where(idx[:, None] == r[None, :], 1.0, 0.0)
    else:
        spread = tl.where(r[:, None] == idx[None, :], 1.0, 0.0)
    return spread


@triton.jit
def _table_factors(xx, index, tile, DK: tl.constexpr, F: tl.constexpr, PREC: tl.constexpr):
    """Degree 4: the four factors ``[C, F]`` of tile ``tile`` of ``phi(x)``, ``xx [C, DK]``;
    their product times the rows' coefficients is the tile."""
    f0 = _dot32(xx, _table_spread(index, tile, 0, DK, F, False), PREC, "xy")
    f1 = _dot32(xx, _table_spread(index, tile, 1, DK, F, False), PREC, "xy")
    f2 = _dot32(xx, _table_spread(index, tile, 2, DK, F, False), PREC, "xy")
    f3 = _dot32(xx, _table_spread(index, tile, 3, DK, F, False), PREC, "xy")
    return f0, f1, f2, f3


@triton.jit
def _spread_back(x, index, tile, m, DK: tl.constexpr, F: tl.constexpr, PREC: tl.constexpr):
    """Degree 4: ``x [C, F] @ E_m^T [F, DK]``, each feature's ``x`` summed into the index it
    took from the inputs (``_table_spread``)."""
    return _dot32(x, _table_spread(index, tile, m, DK, F, True), PREC, "y")


@triton.jit
def _table_grad(gphi, f0, f1, f2, f3, index, tile, DK: tl.constexpr, F: tl.constexpr,
                PREC: tl.constexpr):
    """Degree 4: ``[C, DK]``, the gradient of ``x`` through tile ``tile`` given the gradient
    ``gphi [C, F]`` of its features' products ``f0 f1 f2 f3`` (coefficients applied)."""
    g23 = gphi * f2 * f3
    g = _spread_back(g23 * f1, index, tile, 0, DK, F, PREC)
    g += _spread_back(g23 * f0, index, tile, 1, DK, F, PREC)
    g01 = gphi * f0 * f1
    g += _spread_back(g01 * f3, index, tile, 2, DK, F, PREC)
    g += _spread_back(g01 * f2, index, tile, 3, DK, F, PREC)
    return g


@triton.jit
def _chunk_contrib(x, y, y1, g, t, mt, i_h, Hx, Hk, d, e, a, b, ea_t, eb_t, index, tile, coef,
                   re, me, GROUPS: tl.constexpr, C: tl.constexpr, BD: tl.constexpr,
                   KP: tl.constexpr, DK: tl.constexpr, BE: tl.constexpr, DEG: tl.constexpr,
                   REVERSE: tl.constexpr, USE_GATE: tl.constexpr, HAS_Y1: tl.constexpr,
                   BF16: tl.constexpr, PREC: tl.constexpr):
    """What chunk ``t`` adds to one tile of the carried state, and the decay across it.
    Forward (``x, y = k, v``): ``phi(K)^T (to_end * [V, 1])``. Reverse (``x, y, y1 = q, dy,
    dy_z``): the sum over the ``GROUPS`` query heads of ``phi(Q)^T (from_start * [dY, dy_z])``,
    the gradient of the state at the chunk's end carried to its start (``coef`` holds
    ``s^2``). Returns ``dS [F, BE]``, ``dz [F]`` and the chunk's decay."""
    F: tl.constexpr = BD * BD
    gc, _, g_last, to_end = _chunk_gates(g, t, mt, i_h, Hk, USE_GATE, C)
    w = tl.exp(gc) if REVERSE else to_end
    dS = tl.zeros([F, BE], tl.float32)
    dz = tl.zeros([F], tl.float32)
    # the forward's normaliser, phi^T 1, on the matrix units: phi^T [1, 0, .., 0] ([C, 16])
    first = (tl.arange(0, C)[:, None] * 0 + tl.arange(0, 16)[None, :] == 0).to(tl.float32)
    for r in range(GROUPS):
        i_x = i_h * GROUPS + r
        if DEG == 2:
            xa = _load_block_t(x, t, mt, i_x, Hx, d, a, KP, BD)            # [KP, C]
            xb = _load_block_t(x, t, mt, i_x, Hx, d, b, KP, BD)
            phi_t = _dot(ea_t, xa, BF16, PREC) * _dot(eb_t, xb, BF16, PREC) * w[None, :]
        else:
            xt = _load_block_t(x, t, mt, i_x, Hx, d, 0, DK, DK)            # [DK, C], all of x
            phi_t = _dot32(_table_spread(index, tile, 0, DK, F, True), xt, PREC, "xy") * w[None, :]
            for m in tl.static_range(1, 4):
                phi_t *= _dot32(_table_spread(index, tile, m, DK, F, True), xt, PREC, "xy")
        yy = tl.load(y + (t[:, None] * Hx + i_x) * e + re[None, :],
                     mask=mt[:, None] & me[None, :], other=0.0)
        if REVERSE:                                                       # [F, C] @ [C, BE]
            dS += _dot(phi_t, yy, BF16, PREC)
        else:                                                             # yy: the values
            dS += _dot(phi_t, yy, BF16, PREC, "y")
        if HAS_Y1:
            dz += tl.sum(phi_t * tl.load(y1 + t * Hx + i_x, mask=mt, other=0.0)[None, :], axis=1)
        else:
            dz += tl.sum(_dot(phi_t, first, BF16, PREC, "y"), axis=1)
    # the pair coefficients scale feature rows, so they apply to the sums
    return dS * coef[:, None], dz * coef, tl.exp(g_last)


@triton.jit
def _scan_step(x, y, y1, g, states, zstates, S, z, n, chunk0, bos, eos, i_h, Hx, Hk, d, e, tile,
               a, b, ea_t, eb_t, index, coef, re, me, rf, GROUPS: tl.constexpr, C: tl.constexpr,
               BD: tl.constexpr, KP: tl.constexpr, DK: tl.constexpr, NT: tl.constexpr,
               BE: tl.constexpr, DEG: tl.constexpr, REVERSE: tl.constexpr,
               USE_GATE: tl.constexpr, HAS_Y1: tl.constexpr, STORE_STATES: tl.constexpr,
               BF16: tl.constexpr, PREC: tl.constexpr):
    """One step of a sequential scan: store the carried tile into chunk ``n``'s slot (unless
    only the final state is wanted), then carry it across the chunk."""
    F: tl.constexpr = BD * BD
    if STORE_STATES:
        slot = ((chunk0 + n) * Hk + i_h) * NT + tile
        tl.store(states + slot * F * e + rf[:, None] * e + re[None, :],
                 S.to(states.dtype.element_ty), mask=me[None, :])
        tl.store(zstates + slot * F + rf, z)
    t = bos + n * C + tl.arange(0, C)
    dS, dz, decay = _chunk_contrib(x, y, y1, g, t, t < eos, i_h, Hx, Hk, d, e, a, b, ea_t, eb_t,
                                   index, tile, coef, re, me, GROUPS, C, BD, KP, DK, BE, DEG,
                                   REVERSE, USE_GATE, HAS_Y1, BF16, PREC)
    return S * decay + dS, z * decay + dz


@triton.jit
def scan_kernel(x, y, y1, g, S_in, z_in, states, zstates, S_out, z_out, cu_seqlens,
                chunk_offsets, index, coefs, coef_scale, Hx, Hk, h0, HS, d, e, D, SEQS,
                GROUPS: tl.constexpr, C: tl.constexpr, BD: tl.constexpr, KP: tl.constexpr,
                NB: tl.constexpr, NT: tl.constexpr, BE: tl.constexpr, DEG: tl.constexpr,
                REVERSE: tl.constexpr,
                USE_GATE: tl.constexpr, HAS_INIT: tl.constexpr, HAS_Y1: tl.constexpr,
                STORE_STATES: tl.constexpr, STORE_FINAL: tl.constexpr, BF16: tl.constexpr,
                PREC: tl.constexpr, LOOP_FOR: tl.constexpr):
    """Sequential scan across the chunks of one (tile, e-block, sequence x KV head ``h0 ..
    h0 + HS - 1``; a launch may take a part of the heads), forward
    (the state entering every chunk into ``states [chunks, Hk, NT, F, e]`` / ``zstates``, the
    final state into ``S_out [N, Hk, D, e]`` / ``z_out``, exact layout, from ``S_in`` or zero)
    or reverse (the gradient of the state at every chunk's end, from that of the final state
    ``S_in`` to that of the initial one, ``S_out``). Without ``STORE_FINAL`` that last one is not
    written (nobody asked for it). Without ``STORE_STATES`` only the final state is written,
    and ``S_out`` may be ``S_in``: each program reads its own tile of it before it writes that
    tile (the normaliser is written by the programs of the first value block alone; what the
    others compute of it is discarded). ``SEQS`` is only a key of the autotuner (host.py)."""
    tile, pid_e, pid_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = pid_nh // HS, h0 + pid_nh % HS
    F: tl.constexpr = BD * BD
    DK: tl.constexpr = NB * BD
    rf = tl.arange(0, F)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    chunk0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    n_chunks = tl.cdiv(eos - bos, C)

    if DEG == 2:
        a, b = _tile_ab(tile, NB)
        coef = _pair_coef(a, b, BD) * coef_scale
        ea_t = tl.trans(_spread(KP, BD, False))
        eb_t = tl.trans(_spread(KP, BD, True))
        row, exists = _public_rows(a, b, d, BD)
    else:            # tiles of the exact layout; their spreads are made from `index` per step
        a, b, ea_t, eb_t = 0, 0, 0, 0
        coef = tl.load(coefs + tile * F + rf) * coef_scale
        row = (tile * F + rf).to(tl.int64)
        exists = row < D
    re = pid_e * BE + tl.arange(0, BE)
    me = re < e
    pub = (i_n * Hk + i_h).to(tl.int64)

    S = tl.zeros([F, BE], tl.float32)        # this tile of the state, rows in tile layout
    z = tl.zeros([F], tl.float32)
    if HAS_INIT:
        S = tl.load(S_in + pub * D * e + row[:, None] * e + re[None, :],
                    mask=exists[:, None] & me[None, :], other=0.0)
        z = tl.load(z_in + pub * D + row, mask=exists, other=0.0)
    if LOOP_FOR:                  # compiled: a for loop, which Triton software-pipelines
        for i in range(n_chunks):
            n = n_chunks - 1 - i if REVERSE else i
            S, z = _scan_step(x, y, y1, g, states, zstates, S, z, n, chunk0, bos, eos, i_h, Hx,
                              Hk, d, e, tile, a, b, ea_t, eb_t, index, coef, re, me, rf, GROUPS,
                              C, BD, KP, DK, NT, BE, DEG, REVERSE, USE_GATE, HAS_Y1,
                              STORE_STATES, BF16, PREC)
    else:                         # the interpreter cannot range() over a loaded bound
        i = n_chunks * 0
        while i < n_chunks:
            n = n_chunks - 1 - i if REVERSE else i
            S, z = _scan_step(x, y, y1, g, states, zstates, S, z, n, chunk0, bos, eos, i_h, Hx,
                              Hk, d, e, tile, a, b, ea_t, eb_t, index, coef, re, me, rf, GROUPS,
                              C, BD, KP, DK, NT, BE, DEG, REVERSE, USE_GATE, HAS_Y1,
                              STORE_STATES, BF16, PREC)
            i += 1
    if STORE_FINAL:
        tl.store(S_out + pub * D * e + row[:, None] * e + re[None, :], S,
                 mask=exists[:, None] & me[None, :])
        tl.store(z_out + pub * D + row, z, mask=exists & (pid_e == 0))


@triton.jit
def _store_outputs(o, o_low, den_out, num, den, t, mt, i_hq, Hq, e, re, me, LOW: tl.constexpr):
    """``o = num / den`` (0 where ``den == 0``) at rows ``t`` in ``o``'s dtype, with ``LOW``
    what that rounding left out, and the denominators."""
    out = num / tl.where(den == 0, 1.0, den)[:, None]
    high = out.to(o.dtype.element_ty)
    at = (t[:, None] * Hq + i_hq) * e + re[None, :]
    tl.store(o + at, high, mask=mt[:, None] & me[None, :])
    if LOW:
        tl.store(o_low + at, (out - high.to(tl.float32)).to(o_low.dtype.element_ty),
                 mask=mt[:, None] & me[None, :])
    tl.store(den_out + t * Hq + i_hq, den, mask=mt)


@triton.jit
def output_fwd_kernel(q, k, v, g, states, zstates, o, o_low, den_out, cu_seqlens,
                      chunk_indices, index, coefs, scale, Hq, Hk, hq0, d, e,
                      C: tl.constexpr, BD: tl.constexpr, KP: tl.constexpr, NB: tl.constexpr,
                      NT: tl.constexpr, EP: tl.constexpr, DEG: tl.constexpr,
                      USE_GATE: tl.constexpr, LOW: tl.constexpr, BF16: tl.constexpr,
                      PREC: tl.constexpr):
    """Outputs of one (chunk, query head ``hq0 + ..``): attention inside the chunk plus the
    incoming state, numerator and denominator added before the division. Also writes the
    denominator and, with ``LOW``, what rounding the output to its dtype left out (``o_low``,
    same dtype)."""
    i_c, i_hq = tl.program_id(0), hq0 + tl.program_id(1)
    i_h = i_hq // (Hq // Hk)
    i_n = tl.load(chunk_indices + 2 * i_c).to(tl.int64)
    j = tl.load(chunk_indices + 2 * i_c + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    F: tl.constexpr = BD * BD
    DK: tl.constexpr = NB * BD

    t = bos + j * C + tl.arange(0, C)
    mt = t < eos
    rd = tl.arange(0, DK)
    re = tl.arange(0, EP)
    me = re < e
    qq = tl.load(q + (t[:, None] * Hq + i_hq) * d + rd[None, :], mask=mt[:, None], other=0.0)
    kk = tl.load(k + (t[:, None] * Hk + i_h) * d + rd[None, :], mask=mt[:, None], other=0.0)
    vv = tl.load(v + (t[:, None] * Hk + i_h) * e + re[None, :],
                 mask=mt[:, None] & me[None, :], other=0.0)
    gc, gc_lo, _, _ = _chunk_gates(g, t, mt, i_h, Hk, USE_GATE, C)

    # attention inside the chunk: w_ij = (s q_i.k_j)^DEG exp(gc_i - gc_j), j <= i
    s = _dot(qq, tl.trans(kk), BF16, PREC, "xy") * scale                    # [C, C]
    w = _pow(s, DEG) * _chunk_decay(gc, gc_lo, C)
    w = _operand(w, BF16, PREC)           # the denominator sums the weights the product reads
    num = _dot(w, vv, BF16, PREC, "y")                                    # [C, EP]
    den = tl.sum(w, axis=1)

    # the incoming state, queried tile by tile: phi(s q) [C, F] @ S [F, EP]
    num_s = tl.zeros([C, EP], tl.float32)
    den_s = tl.zeros([C], tl.float32)
    base = (i_c * Hk + i_h) * NT
    rf = tl.arange(0, F)
    ea = _spread(KP, BD, False)
    eb = _spread(KP, BD, True)
    for tile in range(NT):
        if DEG == 2:
            a, b = _tile_ab(tile, NB)
            qa, qb = _tile_factors(q, t, mt, i_hq, Hq, d, a, b, ea, eb, KP, BD, BF16, PREC)
            phi = qa * qb * (_pair_coef(a, b, BD) * (scale * scale))[None, :]  # [C, F]
        else:
            f0, f1, f2, f3 = _table_factors(qq, index, tile, DK, F, PREC)
            phi = f0 * f1 * f2 * f3 * (tl.load(coefs + tile * F + rf) * _pow(scale, DEG))[None, :]
        slot = (base + tile).to(tl.int64)
        St = tl.load(states + slot * F * e + rf[:, None] * e + re[None, :],
                     mask=me[None, :], other=0.0)
        zt = tl.load(zstates + slot * F + rf)
        phi = _operand(phi, BF16, PREC)
        num_s += _dot(phi, St, BF16, PREC)
        den_s += tl.sum(phi * zt[None, :], axis=1)
    from_start = tl.exp(gc)
    num += from_start[:, None] * num_s
    den += from_start * den_s
    _store_outputs(o, o_low, den_out, num, den, t, mt, i_hq, Hq, e, re, me, LOW)


@triton.jit
def prepare_bwd_kernel(o, o_low, do, den, dy, dyz, T, Hq, e,
                       BT: tl.constexpr, EP: tl.constexpr, LOW: tl.constexpr,
                       BF16: tl.constexpr, PREC: tl.constexpr):
    """Gradient of the division: ``dy_v = do / den`` (``dy``, as the products read it: bf16
    for the bf16 products, tf32 for tf32 ones, kept in fp32) and ``dy_z = -(dy_v . o)`` of
    those same values for the denominator column (0 where ``den == 0``), with ``LOW`` from
    ``o + o_low``."""
    i_t, i_hq = tl.program_id(0), tl.program_id(1)
    t = i_t.to(tl.int64) * BT + tl.arange(0, BT)
    mt = t < T
    re = tl.arange(0, EP)
    m = mt[:, None] & (re < e)[None, :]
    at = (t[:, None] * Hq + i_hq) * e + re[None, :]
    oo = tl.load(o + at, mask=m, other=0.0).to(tl.float32)
    if LOW:
        oo += tl.load(o_low + at, mask=m, other=0.0).to(tl.float32)
    gg = tl.load(do + at, mask=m, other=0.0)
    dd = tl.load(den + t * Hq + i_hq, mask=mt, other=1.0)
    zero = dd == 0
    inv = 1.0 / tl.where(zero, 1.0, dd)
    dyv = _operand(gg.to(tl.float32) * inv[:, None], BF16, PREC)
    if BF16:
        # the bf16 products read dy rounded: so does dy_z, whose -(dy . o) then cancels their
        # dy . v where the two are equal (o_0 = v_0 for a first token). Under the interpreter,
        # bf16 without states (2 x 37 tokens, GQA): dq 7.8e-2 -> 7.2e-3, dk 8.6e-2 -> 7.4e-3;
        # with states (bf16_gqa_state) dq 8.3e-3 -> 6.0e-3, dz0 8.4e-3 -> 6.5e-3
        dyv = _round_bf16(dyv)
    tl.store(dy + at, dyv.to(dy.dtype.element_ty), mask=m)
    tl.store(dyz + t * Hq + i_hq, tl.where(zero, 0.0, -tl.sum(oo * dyv, axis=1)), mask=mt)


@triton.jit
def dq_kernel(q, k, v, g, states, zstates, dy, dyz, dq, dg_q, cu_seqlens,
              chunk_indices, index, coefs, scale, Hq, Hk, d, e,
              C: tl.constexpr, BD: tl.constexpr, KP: tl.constexpr, NB: tl.constexpr,
              NT: tl.constexpr, EP: tl.constexpr, DEG: tl.constexpr, USE_GATE: tl.constexpr,
              BF16: tl.constexpr, PREC: tl.constexpr):
    """Gradient of ``q`` for one (chunk, query head), and this head's part of the gate
    gradient that involves the chunk's queries (see ``_straddle_intra``)."""
    i_c, i_hq = tl.program_id(0), tl.program_id(1)
    i_h = i_hq // (Hq // Hk)
    i_n = tl.load(chunk_indices + 2 * i_c).to(tl.int64)
    j = tl.load(chunk_indices + 2 * i_c + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    F: tl.constexpr = BD * BD
    DK: tl.constexpr = NB * BD

    t = bos + j * C + tl.arange(0, C)
    mt = t < eos
    rd = tl.arange(0, DK)
    re = tl.arange(0, EP)
    me = re < e
    qq = tl.load(q + (t[:, None] * Hq + i_hq) * d + rd[None, :], mask=mt[:, None], other=0.0)
    kk = tl.load(k + (t[:, None] * Hk + i_h) * d + rd[None, :], mask=mt[:, None], other=0.0)
    vv = tl.load(v + (t[:, None] * Hk + i_h) * e + re[None, :],
                 mask=mt[:, None] & me[None, :], other=0.0)
    dyv = tl.load(dy + (t[:, None] * Hq + i_hq) * e + re[None, :],
                  mask=mt[:, None] & me[None, :], other=0.0)
    dy1 = tl.load(dyz + t * Hq + i_hq, mask=mt, other=0.0)
    gc, gc_lo, _, _ = _chunk_gates(g, t, mt, i_h, Hk, USE_GATE, C)

    # through the incoming state. With F the symmetric d x d x e state (phi(x).S = sum_ab
    # x_a x_b F_ab), dq_i = 2 s^2 exp(gc_i) sum_b q_ib (F_b dy_v,i + Z_b dy_z,i): one product
    # [C, e] @ [e, d] per column b, whose rows are gathered from the tiles, and for the
    # normaliser's part one product q @ Z after the loop; no feature gradient to add back
    # into its indices
    grad = tl.zeros([C, DK], tl.float32)
    base = (i_c * Hk + i_h).to(tl.int64) * NT * F
    if DEG == 2:
        for b in range(DK):
            row, unphi = _column_rows(b, NB, BD)
            Fb = tl.load(states + (base + row)[:, None] * e + re[None, :], mask=me[None, :],
                         other=0.0)
            grad += (_dot(dyv, tl.trans(Fb), BF16, PREC) * unphi[None, :]
                     * _column(q, t, mt, i_hq, Hq, d, b)[:, None])
        Z = _normaliser_matrix(zstates, base, NB, BD)
        grad += dy1[:, None] * _dot32(qq, Z, PREC)
        grad = (2.0 * scale * scale * tl.exp(gc))[:, None] * grad
    else:          # the features' gradient, tile by tile, back through the four factors
        rf = tl.arange(0, F)
        for tile in range(NT):
            rows = base + tile * F + rf
            St = tl.load(states + rows[:, None] * e + re[None, :], mask=me[None, :], other=0.0)
            gphi = (_dot(dyv, tl.trans(St), False, PREC)
                    + dy1[:, None] * tl.load(zstates + rows)[None, :])
            f0, f1, f2, f3 = _table_factors(qq, index, tile, DK, F, PREC)
            grad += _table_grad(gphi * tl.load(coefs + tile * F + rf)[None, :], f0, f1, f2, f3,
                                index, tile, DK, F, PREC)
        grad = (_pow(scale, DEG) * tl.exp(gc))[:, None] * grad
    # pairs (earlier chunk or initial state, query i >= t of this chunk): by homogeneity of
    # degree DEG, q_i . dq_i (state part) is DEG times their sum for query i
    from_state = tl.sum(qq.to(tl.float32) * grad, axis=1) * (1.0 / DEG)
    gate_part = tl.sum(from_state, axis=0) - tl.cumsum(from_state, axis=0) + from_state

    # inside the chunk: dw_ij = dy_i . [v_j, 1]; w_ij = s_ij^2 decay_ij
    s = _dot(qq, tl.trans(kk), BF16, PREC, "xy") * scale
    decay = _chunk_decay(gc, gc_lo, C)
    dw = _dot(dyv, tl.trans(vv), BF16, PREC, "y") + dy1[:, None]
    ds = dw * decay * DEG * _pow(s, DEG - 1)                           # [C, C]
    grad += _dot(ds, kk, BF16, PREC, "y") * scale                         # [C, DK]
    gate_part += _straddle_intra(dw * _pow(s, DEG - 1) * s * decay, C)
    tl.store(dq + (t[:, None] * Hq + i_hq) * d + rd[None, :], grad.to(dq.dtype.element_ty),
             mask=mt[:, None])
    tl.store(dg_q + t * Hq + i_hq, gate_part, mask=mt)


@triton.jit
def dkv_kernel(q, k, v, g, states, zstates, dstates, dzstates, dy, dyz, dk, dv, dg_k,
               cu_seqlens, chunk_indices, index, coefs, scale, Hq, Hk, d, e,
               GROUPS: tl.constexpr, C: tl.constexpr, BD: tl.constexpr, KP: tl.constexpr,
               NB: tl.constexpr, NT: tl.constexpr, EP: tl.constexpr, DEG: tl.constexpr,
               USE_GATE: tl.constexpr, BF16: tl.constexpr, PREC: tl.constexpr):
    """Gradients of ``k`` and ``v`` for one (chunk, KV head), summed over its query heads, and
    the part of the gate gradient that involves the chunk's keys or no token of the chunk."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n = tl.load(chunk_indices + 2 * i_c).to(tl.int64)
    j = tl.load(chunk_indices + 2 * i_c + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    F: tl.constexpr = BD * BD
    DK: tl.constexpr = NB * BD

    t = bos + j * C + tl.arange(0, C)
    mt = t < eos
    rd = tl.arange(0, DK)
    re = tl.arange(0, EP)
    me = re < e
    kk = tl.load(k + (t[:, None] * Hk + i_h) * d + rd[None, :], mask=mt[:, None], other=0.0)
    vv = tl.load(v + (t[:, None] * Hk + i_h) * e + re[None, :],
                 mask=mt[:, None] & me[None, :], other=0.0)
    gc, gc_lo, g_last, to_end = _chunk_gates(g, t, mt, i_h, Hk, USE_GATE, C)

    # through the state at the chunk's end, S_end += sum_j to_end_j phi(k_j) [v_j, 1]^T:
    # dv_j = to_end_j phi(k_j) . dS, tile by tile
    grad_v = tl.zeros([C, EP], tl.float32)
    across = tl.zeros([F], tl.float32)                 # <state in, its gradient at the end>
    base = (i_c * Hk + i_h).to(tl.int64) * NT * F
    rf = tl.arange(0, F)
    if DEG == 2:
        ea = _spread(KP, BD, False)
        eb = _spread(KP, BD, True)
        for tile in range(NT):
            a, b = _tile_ab(tile, NB)
            xa, xb = _tile_factors(k, t, mt, i_h, Hk, d, a, b, ea, eb, KP, BD, BF16, PREC)
            rows = base + tile * F + rf
            dSt = tl.load(dstates + rows[:, None] * e + re[None, :], mask=me[None, :], other=0.0)
            St = tl.load(states + rows[:, None] * e + re[None, :], mask=me[None, :], other=0.0)
            across += tl.sum(St.to(tl.float32) * dSt.to(tl.float32), axis=1)
            across += tl.load(zstates + rows) * tl.load(dzstates + rows)
            grad_v += _dot(xa * xb * _pair_coef(a, b, BD)[None, :], dSt, BF16, PREC)
        grad_v = to_end[:, None] * grad_v
        # and dk_j = 2 to_end_j sum_b k_jb (dF_b v_j + dZ_b), F the symmetric d x d x e state as
        # in dq_kernel: one product [C, e] @ [e, d] per column b
        # (the normaliser's part dZ_b in one product k @ dZ after the loop)
        grad_k = tl.zeros([C, DK], tl.float32)
        for b in range(DK):
            row, unphi = _column_rows(b, NB, BD)
            dFb = tl.load(dstates + (base + row)[:, None] * e + re[None, :], mask=me[None, :],
                          other=0.0)
            grad_k += (_dot(vv, tl.trans(dFb), BF16, PREC) * unphi[None, :]
                       * _column(k, t, mt, i_h, Hk, d, b)[:, None])
        dZ = _normaliser_matrix(dzstates, base, NB, BD)
        grad_k += _dot32(kk, dZ, PREC)
        grad_k = (2.0 * to_end)[:, None] * grad_k
    else:          # one loop: the tile's factors serve dv and, through dphi, dk
        grad_k = tl.zeros([C, DK], tl.float32)
        for tile in range(NT):
            rows = base + tile * F + rf
            dSt = tl.load(dstates + rows[:, None] * e + re[None, :], mask=me[None, :], other=0.0)
            St = tl.load(states + rows[:, None] * e + re[None, :], mask=me[None, :], other=0.0)
            dzt = tl.load(dzstates + rows)
            across += tl.sum(St * dSt, axis=1) + tl.load(zstates + rows) * dzt
            f0, f1, f2, f3 = _table_factors(kk, index, tile, DK, F, PREC)
            cf = tl.load(coefs + tile * F + rf)[None, :]
            grad_v += _dot(f0 * f1 * f2 * f3 * cf, dSt, False, PREC)
            dphi = (_dot(vv, tl.trans(dSt), False, PREC) + dzt[None, :]) * cf
            grad_k += _table_grad(dphi, f0, f1, f2, f3, index, tile, DK, F, PREC)
        grad_v = to_end[:, None] * grad_v
        grad_k = to_end[:, None] * grad_k
    # pairs (key j < t of this chunk, later chunk or final state): k_j . dk_j (state part) is
    # DEG times their sum for key j; pairs (before the chunk, after it) pass the whole chunk
    to_state = tl.sum(kk.to(tl.float32) * grad_k, axis=1) * (1.0 / DEG)
    gate_part = tl.cumsum(to_state, axis=0) - to_state + tl.exp(g_last) * tl.sum(across, axis=0)

    # inside the chunk, summed over the query heads of this KV head
    decay = _chunk_decay(gc, gc_lo, C)
    for r in range(GROUPS):
        i_hq = i_h * GROUPS + r
        qq = tl.load(q + (t[:, None] * Hq + i_hq) * d + rd[None, :], mask=mt[:, None],
                     other=0.0)
        dyv = tl.load(dy + (t[:, None] * Hq + i_hq) * e + re[None, :],
                      mask=mt[:, None] & me[None, :], other=0.0)
        dy1 = tl.load(dyz + t * Hq + i_hq, mask=mt, other=0.0)
        s = _dot(qq, tl.trans(kk), BF16, PREC, "xy") * scale                 # [C(i), C(j)]
        w = _pow(s, DEG) * decay
        grad_v += _dot(tl.trans(w), dyv, BF16, PREC)
        dw = _dot(dyv, tl.trans(vv), BF16, PREC, "y") + dy1[:, None]
        ds = dw * decay * DEG * _pow(s, DEG - 1)
        grad_k += _dot(tl.trans(ds), qq, BF16, PREC, "y") * scale
    tl.store(dk + (t[:, None] * Hk + i_h) * d + rd[None, :], grad_k.to(dk.dtype.element_ty),
             mask=mt[:, None])
    tl.store(dv + (t[:, None] * Hk + i_h) * e + re[None, :], grad_v.to(dv.dtype.element_ty),
             mask=mt[:, None] & me[None, :])
    tl.store(dg_k + t * Hk + i_h, gate_part, mask=mt)


@triton.jit
def _pair_of_row(r, d):
    """The pair ``(i, j)``, ``i <= j``, of row ``r`` of the exact layout, where row ``i d - i (i
    - 1) / 2 + j - i`` holds ``x_i x_j``: the smaller root of that quadratic in ``i``, its
    rounding corrected by one either way."""
    n = 2 * d + 1
    i = ((n - tl.sqrt((n * n - 8 * r).to(tl.float32))) * 0.5).to(tl.int32)
    i = tl.where(i * n - i * i > 2 * r, i - 1, i)                    # start of row i > r
    i = tl.where((i + 1) * n - (i + 1) * (i + 1) <= 2 * r, i + 1, i)   # start of i + 1 <= r
    return i, r - (i * n - i * i) // 2 + i


@triton.jit
def decode_kernel(q, k, v, g, bk, bv, bg, S, z, out, index, coefs, scale, held, Hk, d, e, D,
                  cap, G: tl.constexpr, GP: tl.constexpr, LP: tl.constexpr, DK: tl.constexpr,
                  R: tl.constexpr, NBLK: tl.constexpr, EP: tl.constexpr, SPLIT: tl.constexpr,
                  DEG: tl.constexpr, STAGES: tl.constexpr, PRECISION: tl.constexpr):
    """One new token per sequence for the ``G`` query heads of one KV head, as the rows of
    matrix products: program ``(b * Hk + h, split)`` streams the blocks of ``R`` contiguous
    state rows ``split, split + SPLIT, ..`` (``NBLK`` of them; each read once for all ``G``
    heads, the next ones loading while this one multiplies), forming ``phi(q)`` for those rows
    from the pairs they hold (degree 4: from ``index`` and ``coefs``). With ``SPLIT == 1`` it
    writes ``o [B, Hq, e]`` (out's dtype), else partial numerators and denominators ``out [B, Hq,
    SPLIT, EP + 1]`` for ``decode_finish_kernel``. Split 0 also attends to the ``held`` buffered
    tokens (``bk [B, cap, Hk, d]``, ``bv``, ``bg``) and the new one (``k [B, Hk, d]``, ``v``, ``g
    [B, Hk]``), and writes the new token into slot ``held``. ``S`` is float32, or bfloat16 (a copy
    of the state rounded as the chunked forward's output kernel reads it: half the bytes, and the
    product then runs in bfloat16); ``z`` is float32."""
    i_bh, split = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // Hk).to(tl.int64), i_bh % Hk
    re = tl.arange(0, EP)
    me = re < e
    rl = tl.arange(0, LP)
    rd = tl.arange(0, DK)
    rj = tl.arange(0, GP)
    mj = rj < G
    g_new = tl.load(g + i_bh)
    # the log decay since the state's fold, and to each buffered token, in float64 (as the
    # chunked kernels' ``_chunk_gates``: strong gates make these sums large and close)
    g_old = tl.load(bg + (i_b * cap + rl) * Hk + i_h, mask=rl < held, other=0.0).to(tl.float64)
    g_total = tl.sum(g_old, axis=0) + g_new
    qrows = q + ((i_b * Hk + i_h) * G + rj) * d                          # [GP] row starts
    pub = i_b * Hk + i_h

    # the buffer, split 0 only (elsewhere every load is masked off and the products add
    # zeros): rows < held from the slots, row held the new token, which is also written there
    first = split == 0
    kn = tl.load(k + i_bh * d + rd, mask=first, other=0.0)
    vn = tl.load(v + i_bh * e + re, mask=me & first, other=0.0)
    slot = (i_b * cap + held) * Hk + i_h
    tl.store(bk + slot * d + rd, kn.to(bk.dtype.element_ty), mask=first)
    tl.store(bv + slot * e + re, vn.to(bv.dtype.element_ty), mask=me & first)
    tl.store(bg + slot + rl, g_new + tl.zeros([LP], tl.float32), mask=(rl == 0) & first)
    old = (rl < held) & first
    is_new = (rl == held) & first
    kk = tl.load(bk + ((i_b * cap + rl[:, None]) * Hk + i_h) * d + rd[None, :],
                 mask=old[:, None], other=0.0)
    kk = tl.where(is_new[:, None], kn[None, :].to(kk.dtype), kk)         # [LP, DK]
    vv = tl.load(bv + ((i_b * cap + rl[:, None]) * Hk + i_h) * e + re[None, :],
                 mask=old[:, None] & me[None, :], other=0.0)
    vv = tl.where(is_new[:, None], vn[None, :].to(vv.dtype), vv)         # [LP, EP]
    decay = tl.where(old, tl.exp((g_total - tl.cumsum(g_old, axis=0)).to(tl.float32)),
                     tl.where(is_new, 1.0, 0.0))
    qq = tl.load(qrows[:, None] + rd[None, :], mask=mj[:, None], other=0.0).to(tl.float32)
    s = _dot32(qq, tl.trans(kk), PRECISION, "xy") * scale                    # [GP, LP]
    w = _operand(_pow(s, DEG) * decay[None, :], False, PRECISION)       # as the product reads
    num = _dot32(w, vv, PRECISION, "y")                                     # [GP, EP]
    den = tl.sum(w, axis=1)                                              # [GP]

    # the state: phi(q) [GP, R] of R rows against S [R, e] and z [R]
    from_start = _pow(scale, DEG) * tl.exp(g_total.to(tl.float32))
    S_pub = S + pub * D * e
    den_rows = tl.zeros([GP, R], tl.float32)    # phi * z, summed over rows after the loop
    for n in tl.range(0, NBLK, num_stages=STAGES):
        r = (split + n * SPLIT) * R + tl.arange(0, R)
        mr = r < D
        St = tl.load(S_pub + r[:, None] * e + re[None, :], mask=mr[:, None] & me[None, :],
                     other=0.0)
        zt = tl.load(z + pub * D + r, mask=mr, other=0.0)
        mq = mj[:, None] & mr[None, :]
        if DEG == 2:
            i, j = _pair_of_row(tl.minimum(r, D - 1), d)
            qi = tl.load(qrows[:, None] + i[None, :], mask=mq, other=0.0).to(tl.float32)
            qj = tl.load(qrows[:, None] + j[None, :], mask=mq, other=0.0).to(tl.float32)
            phi = qi * qj * (tl.where(i < j, SQRT2, 1.0) * from_start)[None, :]
        else:          # the rows' indices and coefficients from the tables
            phi = tl.load(qrows[:, None] + tl.load(index + r * 4, mask=mr, other=0)[None, :],
                          mask=mq, other=0.0).to(tl.float32)
            for m in tl.static_range(1, 4):
                at = tl.load(index + r * 4 + m, mask=mr, other=0)
                phi *= tl.load(qrows[:, None] + at[None, :], mask=mq, other=0.0).to(tl.float32)
            phi *= (tl.load(coefs + r, mask=mr, other=0.0) * from_start)[None, :]
        if St.dtype == tl.bfloat16:
            num += _dot(phi, St, True, PRECISION)
        else:
            phi = _operand(phi, False, PRECISION)
            num += _dot32(phi, St, PRECISION)
        den_rows += phi * zt[None, :]
    den += tl.sum(den_rows, axis=1)

    heads = (i_b * Hk + i_h) * G + rj                                    # [GP] query heads
    if SPLIT == 1:
        den = tl.where(den == 0, 1.0, den)
        tl.store(out + heads[:, None] * e + re[None, :],
                 (num / den[:, None]).to(out.dtype.element_ty), mask=mj[:, None] & me[None, :])
    else:
        part = out + (heads * SPLIT + split) * (EP + 1)
        tl.store(part[:, None] + re[None, :], num, mask=mj[:, None])
        tl.store(part + EP, den, mask=mj)


@triton.jit
def decode_finish_kernel(part, o, e, NT: tl.constexpr, NTP: tl.constexpr, EP: tl.constexpr):
    """``o [B * Hq, e]`` (its dtype) from the partial sums ``part [B * Hq, NT, EP + 1]`` of
    ``decode_kernel``'s ``NT`` splits."""
    i = tl.program_id(0).to(tl.int64)
    rt = tl.arange(0, NTP)
    re = tl.arange(0, EP)
    mt = rt < NT
    base = part + (i * NT + rt) * (EP + 1)
    num = tl.sum(tl.load(base[:, None] + re[None, :], mask=mt[:, None], other=0.0), axis=0)
    den = tl.sum(tl.load(base + EP, mask=mt, other=0.0), axis=0)
    den = tl.where(den == 0, 1.0, den)
    tl.store(o + i * e + re, (num / den).to(o.dtype.element_ty), mask=re < e)



# ---- the attention form: short sequences without states in or out ----
#
# w_ij = (s q_i.k_j)^DEG exp(G_i - G_j), j <= i, o_i = sum_j w_ij v_j / sum_j w_ij, in blocks of
# queries against blocks of keys as flash attention does (no running maximum: every weight is
# >= 0 and bounded by the scores). Its cost grows with the length, the chunked form's does not:
# ``host.pick_chunk_size`` takes it where it is faster. ``G`` is the inclusive cumulative
# log-gate of each sequence in float64, so that the differences of two far-apart positions keep
# their digits; each block subtracts it from a reference position of its own in float64 and
# takes the rest in fp32. The reference lies between the keys and the queries of every pair
# apart from the block's own (diagonal) ones, so there the decay splits into two factors of at
# most 1, ``exp(G_i - G_ref) exp(G_ref - G_j)``: one exponential per position, not per pair.
# The block's own pairs take ``G_i - G_j`` in float64: with strong gates inside the block both
# terms can be large, and in fp32 their difference would lose its digits.


@triton.jit
def _block_gates(G, t, mt, i_h, Hk, t_ref, USE_GATE: tl.constexpr, B: tl.constexpr,
                 WIDE: tl.constexpr = False):
    """``G_t - G_ref`` (``[B]``, float64 with ``WIDE``, else fp32) for positions ``t`` against
    the block's reference position ``t_ref``, the difference taken in float64; zeros without
    gates and where ``mt`` is false (so that no factor of a missing position overflows)."""
    gates = tl.zeros([B], tl.float64)
    if USE_GATE:
        ref = tl.load(G + t_ref * Hk + i_h)
        gates = tl.where(mt, tl.load(G + t * Hk + i_h, mask=mt, other=0.0) - ref, 0.0)
    if not WIDE:
        gates = gates.to(tl.float32)
    return gates


@triton.jit
def _decay(gq, gk, tq, tk, NEAR: tl.constexpr, USE_GATE: tl.constexpr):
    """``exp(G_i - G_j)`` of queries ``tq`` and keys ``tk`` (``gq``, ``gk`` against a common
    reference), ``[BM, BN]``. ``NEAR``: the block's own pairs (``gq``, ``gk`` in float64), zero
    where the key comes after the query. Otherwise every key comes before every query and the
    reference lies between them: the product of one factor per query and one per key, each at
    most 1. Positions past the sequence's end need no mask: their rows load as zeros, and
    their decay is at most 1."""
    if NEAR:
        gap = tl.minimum((gq[:, None] - gk[None, :]).to(tl.float32), 0.0)
        decay = tl.where(tq[:, None] >= tk[None, :], tl.exp(gap), 0.0)
    elif USE_GATE:
        decay = tl.exp(gq)[:, None] * tl.exp(-gk)[None, :]
    else:
        decay = tl.full((gq.shape[0], gk.shape[0]), 1.0, tl.float32)
    return decay


@triton.jit
def _attention_block(block_indices, cu_seqlens, i_b, B: tl.constexpr):
    """Block ``i_b`` of ``B`` positions (``block_indices``: its sequence and place in it):
    ``(start of the sequence, its end, first position, positions [B], which exist)``."""
    i_n = tl.load(block_indices + 2 * i_b).to(tl.int64)
    j = tl.load(block_indices + 2 * i_b + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    t0 = bos + j * B
    t = t0 + tl.arange(0, B)
    return bos, eos, t0, t, t < eos


@triton.jit
def _rows(x, t, mt, head, H, width, cols, mcols):
    """Rows ``t`` of head ``head`` of ``x [T, H, width]``, columns ``cols``: zero where masked."""
    return tl.load(x + (t[:, None] * H + head) * width + cols[None, :],
                   mask=mt[:, None] & mcols[None, :], other=0.0)


@triton.jit
def _attention_fwd_step(qq, gq, tq, start, k, v, G, t_ref, i_h, Hk, d, e, eos, rd, re, me, scale,
                        num, den, BN: tl.constexpr, DEG: tl.constexpr, USE_GATE: tl.constexpr,
                        BF16: tl.constexpr, PREC: tl.constexpr, NEAR: tl.constexpr):
    """The queries ``tq`` against the keys ``start ..``: numerators and denominators added."""
    tk = start + tl.arange(0, BN)
    mk = tk < eos
    kk = _rows(k, tk, mk, i_h, Hk, d, rd, rd < d)
    vv = _rows(v, tk, mk, i_h, Hk, e, re, me)
    gk = _block_gates(G, tk, mk, i_h, Hk, t_ref, USE_GATE, BN, NEAR)
    s = _dot(qq, tl.trans(kk), BF16, PREC, "xy") * scale                         # [BM, BN]
    w = _pow(s, DEG) * _decay(gq, gk, tq, tk, NEAR, USE_GATE)
    w = _operand(w, BF16, PREC)             # the denominator sums the weights the product reads
    return num + _dot(w, vv, BF16, PREC, "y"), den + tl.sum(w, axis=1)


@triton.jit
def _attention_fwd_keys(qq, gq, tq, lo, hi, k, v, G, t_ref, i_h, Hk, d, e, eos, rd, re, me,
                        scale, num, den, BN: tl.constexpr, DEG: tl.constexpr,
                        USE_GATE: tl.constexpr, BF16: tl.constexpr, PREC: tl.constexpr,
                        NEAR: tl.constexpr):
    """``_attention_fwd_step`` over the keys ``lo .. hi``: those of the blocks before the
    queries', or (``NEAR``) of their own."""
    if INTERPRET:                 # the interpreter cannot range() over a loaded bound
        start = lo
        while start < hi:
            num, den = _attention_fwd_step(qq, gq, tq, start, k, v, G, t_ref, i_h, Hk, d, e,
                                           eos, rd, re, me, scale, num, den, BN, DEG, USE_GATE,
                                           BF16, PREC, NEAR)
            start += BN
    else:                         # compiled: a for loop, which Triton software-pipelines
        for start in range(lo, hi, BN):
            num, den = _attention_fwd_step(qq, gq, tq, start, k, v, G, t_ref, i_h, Hk, d, e,
                                           eos, rd, re, me, scale, num, den, BN, DEG, USE_GATE,
                                           BF16, PREC, NEAR)
    return num, den


@triton.jit
def attention_fwd_kernel(q, k, v, G, o, o_low, den_out, cu_seqlens, block_indices, scale,
                         Hq, Hk, d, e, BM: tl.constexpr, BN: tl.constexpr, DK: tl.constexpr,
                         EP: tl.constexpr, DEG: tl.constexpr, USE_GATE: tl.constexpr,
                         LOW: tl.constexpr, BF16: tl.constexpr, PREC: tl.constexpr):
    """Outputs of one (block of ``BM`` queries, query head), its keys ``BN`` at a time: those
    of the blocks before it, then its own; also the denominators and, with ``LOW``, what
    rounding the output left out (as ``output_fwd_kernel``)."""
    i_b, i_hq = tl.program_id(0), tl.program_id(1)
    i_h = i_hq // (Hq // Hk)
    bos, eos, t0, tq, mq = _attention_block(block_indices, cu_seqlens, i_b, BM)
    rd = tl.arange(0, DK)
    re = tl.arange(0, EP)
    me = re < e
    qq = _rows(q, tq, mq, i_hq, Hq, d, rd, rd < d)
    gq = _block_gates(G, tq, mq, i_h, Hk, t0, USE_GATE, BM, True)
    num = tl.zeros([BM, EP], tl.float32)
    den = tl.zeros([BM], tl.float32)
    num, den = _attention_fwd_keys(qq, gq.to(tl.float32), tq, bos, t0, k, v, G, t0, i_h, Hk, d,
                                   e, eos, rd, re, me, scale, num, den, BN, DEG, USE_GATE, BF16,
                                   PREC, False)
    num, den = _attention_fwd_keys(qq, gq, tq, t0, tl.minimum(eos, t0 + BM), k, v, G, t0, i_h,
                                   Hk, d, e, eos, rd, re, me, scale, num, den, BN, DEG,
                                   USE_GATE, BF16, PREC, True)
    _store_outputs(o, o_low, den_out, num, den, tq, mq, i_hq, Hq, e, re, me, LOW)


@triton.jit
def _attention_dq_step(qq, dyv, dy1, gq, tq, start, k, v, G, t_ref, i_h, Hk, d, e, eos, rd, re,
                       me, scale, grad, rows, BN: tl.constexpr, DEG: tl.constexpr,
                       USE_GATE: tl.constexpr, BF16: tl.constexpr, PREC: tl.constexpr,
                       NEAR: tl.constexpr):
    """The queries ``tq`` against the keys ``start ..``: ``dq / (DEG scale)`` and the gate's
    row sums added."""
    tk = start + tl.arange(0, BN)
    mk = tk < eos
    kk = _rows(k, tk, mk, i_h, Hk, d, rd, rd < d)
    vv = _rows(v, tk, mk, i_h, Hk, e, re, me)
    gk = _block_gates(G, tk, mk, i_h, Hk, t_ref, USE_GATE, BN, NEAR)
    s = _dot(qq, tl.trans(kk), BF16, PREC, "xy") * scale
    dw = _dot(dyv, tl.trans(vv), BF16, PREC, "y") + dy1[:, None]
    a = dw * _decay(gq, gk, tq, tk, NEAR, USE_GATE) * _pow(s, DEG - 1)
    grad += _dot(a, kk, BF16, PREC, "y")
    if USE_GATE:
        rows += tl.sum(a * s, axis=1)
    return grad, rows


@triton.jit
def _attention_dq_keys(qq, dyv, dy1, gq, tq, lo, hi, k, v, G, t_ref, i_h, Hk, d, e, eos, rd, re,
                       me, scale, grad, rows, BN: tl.constexpr, DEG: tl.constexpr,
                       USE_GATE: tl.constexpr, BF16: tl.constexpr, PREC: tl.constexpr,
                       NEAR: tl.constexpr):
    """``_attention_dq_step`` over the keys ``lo .. hi``: those of the blocks before the
    queries', or (``NEAR``) of their own."""
    if INTERPRET:
        start = lo
        while start < hi:
            grad, rows = _attention_dq_step(qq, dyv, dy1, gq, tq, start, k, v, G, t_ref, i_h, Hk,
                                            d, e, eos, rd, re, me, scale, grad, rows, BN, DEG,
                                            USE_GATE, BF16, PREC, NEAR)
            start += BN
    else:
        for start in range(lo, hi, BN):
            grad, rows = _attention_dq_step(qq, dyv, dy1, gq, tq, start, k, v, G, t_ref, i_h, Hk,
                                            d, e, eos, rd, re, me, scale, grad, rows, BN, DEG,
                                            USE_GATE, BF16, PREC, NEAR)
    return grad, rows


@triton.jit
def attention_dq_kernel(q, k, v, G, dy, dyz, dq, dg_q, cu_seqlens, block_indices, scale, Hq,
                        Hk, d, e, BM: tl.constexpr, BN: tl.constexpr, DK: tl.constexpr,
                        EP: tl.constexpr, DEG: tl.constexpr, USE_GATE: tl.constexpr,
                        BF16: tl.constexpr, PREC: tl.constexpr):
    """Gradient of ``q`` for one (block of queries, query head), with ``dy, dyz`` from
    ``prepare_bwd_kernel`` (``dL/dw_ij = dy_i . v_j + dyz_i``), and each query's part of the
    gate gradient, ``sum_j dw_ij w_ij`` (``dL/dG_i`` through its weights as the query)."""
    i_b, i_hq = tl.program_id(0), tl.program_id(1)
    i_h = i_hq // (Hq // Hk)
    bos, eos, t0, tq, mq = _attention_block(block_indices, cu_seqlens, i_b, BM)
    rd = tl.arange(0, DK)
    re = tl.arange(0, EP)
    me = re < e
    qq = _rows(q, tq, mq, i_hq, Hq, d, rd, rd < d)
    dyv = _rows(dy, tq, mq, i_hq, Hq, e, re, me)
    dy1 = tl.load(dyz + tq * Hq + i_hq, mask=mq, other=0.0)
    gq = _block_gates(G, tq, mq, i_h, Hk, t0, USE_GATE, BM, True)
    grad = tl.zeros([BM, DK], tl.float32)
    rows = tl.zeros([BM], tl.float32)
    grad, rows = _attention_dq_keys(qq, dyv, dy1, gq.to(tl.float32), tq, bos, t0, k, v, G, t0,
                                    i_h, Hk, d, e, eos, rd, re, me, scale, grad, rows, BN, DEG,
                                    USE_GATE, BF16, PREC, False)
    grad, rows = _attention_dq_keys(qq, dyv, dy1, gq, tq, t0, tl.minimum(eos, t0 + BM), k, v, G,
                                    t0, i_h, Hk, d, e, eos, rd, re, me, scale, grad, rows, BN,
                                    DEG, USE_GATE, BF16, PREC, True)
    tl.store(dq + (tq[:, None] * Hq + i_hq) * d + rd[None, :],
             (grad * (DEG * scale)).to(dq.dtype.element_ty), mask=mq[:, None])
    if USE_GATE:
        tl.store(dg_q + tq * Hq + i_hq, rows, mask=mq)


@triton.jit
def _attention_dkv_step(kk, vv, gk, tk, start, q, dy, dyz, G, t_ref, i_hq, i_h, Hq, Hk, d, e,
                        eos, rd, re, me, scale, grad_k, grad_v, cols, BM: tl.constexpr,
                        DEG: tl.constexpr, USE_GATE: tl.constexpr, BF16: tl.constexpr,
                        PREC: tl.constexpr, NEAR: tl.constexpr):
    """The keys ``tk`` against the queries ``start ..`` of query head ``i_hq``: ``dk / (DEG
    scale)``, ``dv`` and the gate's column sums added."""
    tq = start + tl.arange(0, BM)
    mq = tq < eos
    qq = _rows(q, tq, mq, i_hq, Hq, d, rd, rd < d)
    dyv = _rows(dy, tq, mq, i_hq, Hq, e, re, me)
    dy1 = tl.load(dyz + tq * Hq + i_hq, mask=mq, other=0.0)
    gq = _block_gates(G, tq, mq, i_h, Hk, t_ref, USE_GATE, BM, NEAR)
    s = _dot(qq, tl.trans(kk), BF16, PREC, "xy") * scale                         # [BM, BN]
    decay = _decay(gq, gk, tq, tk, NEAR, USE_GATE)
    grad_v += _dot(tl.trans(_pow(s, DEG) * decay), dyv, BF16, PREC)
    dw = _dot(dyv, tl.trans(vv), BF16, PREC, "y") + dy1[:, None]
    a = dw * decay * _pow(s, DEG - 1)
    grad_k += _dot(tl.trans(a), qq, BF16, PREC, "y")
    if USE_GATE:
        cols += tl.sum(a * s, axis=0)
    return grad_k, grad_v, cols


@triton.jit
def _attention_dkv_queries(kk, vv, gk, tk, lo, hi, q, dy, dyz, G, t_ref, i_hq, i_h, Hq, Hk, d,
                           e, eos, rd, re, me, scale, grad_k, grad_v, cols, BM: tl.constexpr,
                           DEG: tl.constexpr, USE_GATE: tl.constexpr, BF16: tl.constexpr,
                           PREC: tl.constexpr, NEAR: tl.constexpr):
    """``_attention_dkv_step`` over the queries ``lo .. hi``: those of the keys' own block
    (``NEAR``), or of the blocks after it."""
    if INTERPRET:
        start = lo
        while start < hi:
            grad_k, grad_v, cols = _attention_dkv_step(
                kk, vv, gk, tk, start, q, dy, dyz, G, t_ref, i_hq, i_h, Hq, Hk, d, e, eos, rd,
                re, me, scale, grad_k, grad_v, cols, BM, DEG, USE_GATE, BF16, PREC, NEAR)
            start += BM
    else:
        for start in range(lo, hi, BM):
            grad_k, grad_v, cols = _attention_dkv_step(
                kk, vv, gk, tk, start, q, dy, dyz, G, t_ref, i_hq, i_h, Hq, Hk, d, e, eos, rd,
                re, me, scale, grad_k, grad_v, cols, BM, DEG, USE_GATE, BF16, PREC, NEAR)
    return grad_k, grad_v, cols


@triton.jit
def attention_dkv_kernel(q, k, v, G, dy, dyz, dk, dv, dg_k, cu_seqlens, block_indices, scale,
                         Hq, Hk, d, e, GROUPS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                         DK: tl.constexpr, EP: tl.constexpr, DEG: tl.constexpr,
                         USE_GATE: tl.constexpr, BF16: tl.constexpr, PREC: tl.constexpr):
    """Gradients of ``k`` and ``v`` for one (block of ``BN`` keys, KV head), summed over its
    query heads, the queries ``BM`` at a time: those of its own block, then the later ones;
    and each key's part of the gate gradient, ``sum_i dw_ij w_ij`` (``-dL/dG_j`` through its
    weights as the key). The gates' reference: the block's first key for its own queries, its
    last for the later ones."""
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    bos, eos, t0, tk, mk = _attention_block(block_indices, cu_seqlens, i_b, BN)
    rd = tl.arange(0, DK)
    re = tl.arange(0, EP)
    me = re < e
    kk = _rows(k, tk, mk, i_h, Hk, d, rd, rd < d)
    vv = _rows(v, tk, mk, i_h, Hk, e, re, me)
    mid = tl.minimum(eos, t0 + BN)
    gk_near = _block_gates(G, tk, mk, i_h, Hk, t0, USE_GATE, BN, True)
    gk_far = _block_gates(G, tk, mk, i_h, Hk, mid - 1, USE_GATE, BN)
    grad_k = tl.zeros([BN, DK], tl.float32)
    grad_v = tl.zeros([BN, EP], tl.float32)
    cols = tl.zeros([BN], tl.float32)
    for r in range(GROUPS):
        i_hq = i_h * GROUPS + r
        grad_k, grad_v, cols = _attention_dkv_queries(
            kk, vv, gk_near, tk, t0, mid, q, dy, dyz, G, t0, i_hq, i_h, Hq, Hk, d, e, eos, rd,
            re, me, scale, grad_k, grad_v, cols, BM, DEG, USE_GATE, BF16, PREC, True)
        grad_k, grad_v, cols = _attention_dkv_queries(
            kk, vv, gk_far, tk, mid, eos, q, dy, dyz, G, mid - 1, i_hq, i_h, Hq, Hk, d, e, eos,
            rd, re, me, scale, grad_k, grad_v, cols, BM, DEG, USE_GATE, BF16, PREC, False)
    tl.store(dk + (tk[:, None] * Hk + i_h) * d + rd[None, :],
             (grad_k * (DEG * scale)).to(dk.dtype.element_ty), mask=mk[:, None])
    tl.store(dv + (tk[:, None] * Hk + i_h) * e + re[None, :], grad_v.to(dv.dtype.element_ty),
             mask=mk[:, None] & me[None, :])
    if USE_GATE:
        tl.store(dg_k + tk * Hk + i_h, cols, mask=mk)
