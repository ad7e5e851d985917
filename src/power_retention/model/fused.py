"""One-launch versions of the model's small elementwise steps, for generation on a GPU.

A decode step of a 16-layer model is a few hundred kernels, most of them elementwise and each
taking a few microseconds whatever its size, so at batch 1 their count, not their arithmetic,
sets much of the step's time (docs/serving.md). Each function here does in one Triton launch
what the PyTorch path does in two to eight, with the same roundings (values rounded to the
activations' dtype where PyTorch rounds them):

- ``rms_norm``: ``weight * F.rms_norm(x)``, optionally of ``x + residual`` (also returned);
- ``silu_mul``: ``silu(gate) * up``, the gated MLP's middle;
- ``log_sigmoid``: ``logsigmoid(logits.float())``, the gates of a power layer;
- ``rope_qk``: the rotary embedding of q and k together;
- ``project_qkv``: a decode step's q, k, v (and the gates' logits) from its few rows of hidden
  states, with RoPE and the log-sigmoid applied on the way out: one launch for four products and
  two elementwise steps;
- ``gate_up_silu``: the gated MLP's two products and ``silu(gate) * up`` in one launch;
- ``linear``: a product with the residual add after it (the MLP's last).

The last three stream the weights once for up to ``MAX_ROWS`` rows of activations (the batch of
a decode step), which is what a step's products cost; larger inputs (prefill) keep cuBLAS.

``fusable`` decides: CUDA tensors (or Triton's interpreter, for the tests), no autograd graph
being recorded (training keeps PyTorch's differentiable path), not inside ``torch.compile``
(which fuses by itself), and ``POWER_RETENTION_IMPL`` not set to ``torch``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:                          # no Triton: every caller takes the PyTorch path
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def fusable(*tensors: Tensor) -> bool:
    """Whether the one-launch kernels take these tensors (see the module's docstring)."""
    if triton is None or torch.compiler.is_compiling():
        return False
    if os.environ.get("POWER_RETENTION_IMPL", "").lower() == "torch":
        return False
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return False
    return all((x.is_cuda or INTERPRET) and x.dtype in DTYPES for x in tensors)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(n)


# ---- RMSNorm (with the residual add before it) -------------------------------------------------

if triton is not None:
    @triton.jit
    def _rms_norm_kernel(x, res, w, out, total, H, eps, HAS_RES: tl.constexpr,
                         BH: tl.constexpr):
        """One row: ``s = x (+ res)`` rounded to x's dtype (stored to ``total``), ``y =
        s / rms(s)`` in fp32 rounded to x's dtype, ``out = w * y`` rounded to out's dtype."""
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BH)
        m = c < H
        s = tl.load(x + row * H + c, mask=m, other=0.0)
        if HAS_RES:
            s = (s.to(tl.float32) + tl.load(res + row * H + c, mask=m, other=0.0).to(tl.float32)
                 ).to(x.dtype.element_ty)
            tl.store(total + row * H + c, s, mask=m)
        s = s.to(tl.float32)
        y = (s * tl.rsqrt(tl.sum(s * s, axis=0) / H + eps)).to(x.dtype.element_ty)
        ww = tl.load(w + c, mask=m, other=0.0).to(tl.float32)
        tl.store(out + row * H + c, (ww * y.to(tl.float32)).to(out.dtype.element_ty), mask=m)

    @triton.jit
    def _silu_mul_kernel(gate, up, out, N, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < N
        a = tl.load(gate + i, mask=m, other=0.0).to(tl.float32)
        s = (a * tl.sigmoid(a)).to(out.dtype.element_ty).to(tl.float32)
        b = tl.load(up + i, mask=m, other=0.0).to(tl.float32)
        tl.store(out + i, (s * b).to(out.dtype.element_ty), mask=m)

    @triton.jit
    def _log_sigmoid_kernel(x, out, N, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < N
        a = tl.load(x + i, mask=m, other=0.0).to(tl.float32)
        tl.store(out + i, tl.minimum(a, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(a))), mask=m)

    @triton.jit
    def _rope_kernel(q, k, cos, sin, q_out, k_out, Hq, Hk, HALF: tl.constexpr,
                     HQP: tl.constexpr, HKP: tl.constexpr):
        """Rotary embedding of one token's query and key heads (``rotate_half`` layout:
        ``[x1, x2] -> [x1 c1 - x2 s1, x2 c2 + x1 s2]``), fp32 arithmetic, one rounding. Rows
        ``[tokens, H, 2 * HALF]``; ``cos, sin [tokens, 2 * HALF]``."""
        t = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, HALF)
        c1 = tl.load(cos + t * 2 * HALF + c).to(tl.float32)
        c2 = tl.load(cos + t * 2 * HALF + HALF + c).to(tl.float32)
        s1 = tl.load(sin + t * 2 * HALF + c).to(tl.float32)
        s2 = tl.load(sin + t * 2 * HALF + HALF + c).to(tl.float32)
        _rope_rows(q, q_out, t, Hq, c, c1, c2, s1, s2, HALF, HQP)
        _rope_rows(k, k_out, t, Hk, c, c1, c2, s1, s2, HALF, HKP)

    @triton.jit
    def _rope_rows(x, out, t, H, c, c1, c2, s1, s2, HALF: tl.constexpr, HP: tl.constexpr):
        h = tl.arange(0, HP)
        mh = (h < H)[:, None]
        first = (t * H + h)[:, None] * 2 * HALF + c[None, :]
        x1 = tl.load(x + first, mask=mh, other=0.0).to(tl.float32)
        x2 = tl.load(x + first + HALF, mask=mh, other=0.0).to(tl.float32)
        ty = out.dtype.element_ty
        tl.store(out + first, (x1 * c1[None, :] - x2 * s1[None, :]).to(ty), mask=mh)
        tl.store(out + first + HALF, (x2 * c2[None, :] + x1 * s2[None, :]).to(ty), mask=mh)

    @triton.jit
    def _products(x, w1, w2, rows1, rows2, m1, m2, M, K: tl.constexpr, TWO: tl.constexpr,
                  BM: tl.constexpr, BK: tl.constexpr, KS: tl.constexpr, STAGES: tl.constexpr,
                  PREC: tl.constexpr):
        """``x [M, K] @ w1[rows1]^T`` and (with ``TWO``) ``x @ w2[rows2]^T`` over this
        program's ``KS`` columns of ``K`` (split ``program_id(1)``): fp32 ``[BM, PB]`` each,
        the weights' rows streamed once."""
        rm = tl.arange(0, BM)
        rk = tl.program_id(1) * KS + tl.arange(0, BK)
        xrow = x + rm.to(tl.int64)[:, None] * K
        r1 = w1 + rows1.to(tl.int64)[:, None] * K
        r2 = w2 + rows2.to(tl.int64)[:, None] * K
        acc1 = tl.zeros([BM, rows1.shape[0]], tl.float32)
        acc2 = tl.zeros([BM, rows2.shape[0]], tl.float32)
        for k0 in tl.range(0, KS, BK, num_stages=STAGES):
            kk = k0 + rk
            mk = (kk < K)[None, :]
            xs = tl.load(xrow + kk[None, :], mask=(rm < M)[:, None] & mk, other=0.0)
            a = tl.load(r1 + kk[None, :], mask=m1[:, None] & mk, other=0.0)
            acc1 = tl.dot(xs, tl.trans(a), acc1, input_precision=PREC)
            if TWO:
                b = tl.load(r2 + kk[None, :], mask=m2[:, None] & mk, other=0.0)
                acc2 = tl.dot(xs, tl.trans(b), acc2, input_precision=PREC)
        return acc1, acc2

    @triton.jit
    def _add_splits(acc1, acc2, scratch, counters, tile, TWO: tl.constexpr,
                    SPLITK: tl.constexpr, WS: tl.constexpr):
        """Split-K: the ``SPLITK`` programs of ``tile`` each leave their partial sums in
        ``scratch`` (``WS`` floats per tile); the last to arrive (a counter per tile) adds them
        in split order, so the sum does not depend on the order of arrival, and sets the
        counter back to 0. Returns the sums and whether this program is that last one (the one
        to store them)."""
        if SPLITK == 1:
            last = tile >= 0
        else:
            BM: tl.constexpr = acc1.shape[0]
            PB: tl.constexpr = acc1.shape[1]
            part = (scratch + tile.to(tl.int64) * WS
                    + tl.arange(0, BM)[:, None] * PB + tl.arange(0, PB)[None, :])
            mine = part + tl.program_id(1) * (2 * BM * PB)
            tl.store(mine, acc1)
            if TWO:
                tl.store(mine + BM * PB, acc2)
            tl.debug_barrier()               # every thread's partial stored before the count
            last = tl.atomic_add(counters + tile, 1, sem="acq_rel") == SPLITK - 1
            acc1 = tl.zeros_like(acc1)
            acc2 = tl.zeros_like(acc2)
            if last:                         # around L1: other multiprocessors wrote these
                for split in range(SPLITK):
                    acc1 += tl.load(part + split * (2 * BM * PB), cache_modifier=".cg")
                    if TWO:
                        acc2 += tl.load(part + split * (2 * BM * PB) + BM * PB,
                                        cache_modifier=".cg")
                tl.atomic_xchg(counters + tile, 0)
        return acc1, acc2, last

    @triton.jit
    def _bias_round(acc, bias, rows, m, HAS_BIAS: tl.constexpr, ty: tl.constexpr):
        """``acc (+ bias)`` rounded to ``ty`` (as ``F.linear`` rounds its output), as fp32."""
        if HAS_BIAS:
            acc += tl.load(bias + rows, mask=m, other=0.0).to(tl.float32)[None, :]
        return acc.to(ty).to(tl.float32)

    @triton.jit
    def _head_block(x, w, bias, cos, sin, out, scratch, counters, tile, blk, M, H,
                    K: tl.constexpr, HAS_BIAS: tl.constexpr, ROPE: tl.constexpr,
                    HALF: tl.constexpr, PB: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                    KS: tl.constexpr, SPLITK: tl.constexpr, WS: tl.constexpr,
                    STAGES: tl.constexpr, PREC: tl.constexpr):
        """Columns ``c .. c + PB`` and ``HALF + c ..`` of one head of ``x @ w^T`` (the pairs
        RoPE rotates together), rotated when ``ROPE``, into ``out [M, H, 2 HALF]``."""
        head = blk // (HALF // PB)
        c = (blk % (HALF // PB)) * PB + tl.arange(0, PB)
        rows = head * 2 * HALF + c
        every = c < HALF
        a1, a2 = _products(x, w, w, rows, rows + HALF, every, every, M, K, True, BM, BK, KS,
                           STAGES, PREC)
        a1, a2, last = _add_splits(a1, a2, scratch, counters, tile, True, SPLITK, WS)
        ty = out.dtype.element_ty
        a1 = _bias_round(a1, bias, rows, every, HAS_BIAS, ty)
        a2 = _bias_round(a2, bias, rows + HALF, every, HAS_BIAS, ty)
        rm = tl.arange(0, BM)
        mm = (rm < M)[:, None] & last
        if ROPE:
            angle = rm.to(tl.int64)[:, None] * 2 * HALF + c[None, :]
            c1 = tl.load(cos + angle, mask=mm, other=0.0).to(tl.float32)
            c2 = tl.load(cos + angle + HALF, mask=mm, other=0.0).to(tl.float32)
            s1 = tl.load(sin + angle, mask=mm, other=0.0).to(tl.float32)
            s2 = tl.load(sin + angle + HALF, mask=mm, other=0.0).to(tl.float32)
            a1, a2 = a1 * c1 - a2 * s1, a2 * c2 + a1 * s2
        first = out + (rm.to(tl.int64)[:, None] * H + head) * 2 * HALF + c[None, :]
        tl.store(first, a1.to(ty), mask=mm)
        tl.store(first + HALF, a2.to(ty), mask=mm)

    @triton.jit
    def _qkv_kernel(x, wq, wk, wv, wg, bq, bk, bv, bg, cos, sin, q, k, v, g, scratch, counters,
                    M, Hq, Hk, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_GATE: tl.constexpr, HALF: tl.constexpr, PB: tl.constexpr,
                    GP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, KS: tl.constexpr,
                    SPLITK: tl.constexpr, WS: tl.constexpr, STAGES: tl.constexpr,
                    PREC: tl.constexpr):
        """Programs ``(tile, split)``: tiles ``[0, Hq n)`` make q, then k, then v (``n = HALF /
        PB`` per head), and with ``HAS_GATE`` a last one the log-gates ``g [M, Hk]`` (fp32) of
        the gate logits ``x @ wg^T + bg``, rounded to x's dtype first; each tile's ``SPLITK``
        programs share ``K`` (``_add_splits``)."""
        pid = tl.program_id(0)
        n = HALF // PB
        if pid < Hq * n:
            _head_block(x, wq, bq, cos, sin, q, scratch, counters, pid, pid, M, Hq, K,
                        HAS_BIAS, True, HALF, PB, BM, BK, KS, SPLITK, WS, STAGES, PREC)
        elif pid < (Hq + Hk) * n:
            _head_block(x, wk, bk, cos, sin, k, scratch, counters, pid, pid - Hq * n, M, Hk, K,
                        HAS_BIAS, True, HALF, PB, BM, BK, KS, SPLITK, WS, STAGES, PREC)
        elif pid < (Hq + 2 * Hk) * n:
            _head_block(x, wv, bv, cos, sin, v, scratch, counters, pid, pid - (Hq + Hk) * n, M,
                        Hk, K, HAS_BIAS, False, HALF, PB, BM, BK, KS, SPLITK, WS, STAGES, PREC)
        elif HAS_GATE:
            rows = tl.arange(0, GP)
            mg = rows < Hk
            a, _ = _products(x, wg, wg, rows, rows, mg, mg, M, K, False, BM, BK, KS, STAGES,
                             PREC)
            a, _, last = _add_splits(a, a, scratch, counters, pid, False, SPLITK, WS)
            a = _bias_round(a, bg, rows, mg, True, x.dtype.element_ty)
            rm = tl.arange(0, BM)
            tl.store(g + rm.to(tl.int64)[:, None] * Hk + rows[None, :],
                     tl.minimum(a, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(a))),
                     mask=(rm < M)[:, None] & mg[None, :] & last)

    @triton.jit
    def _row_tile(x, w1, w2, scratch, counters, M, N, K: tl.constexpr, TWO: tl.constexpr,
                  PB: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, KS: tl.constexpr,
                  SPLITK: tl.constexpr, WS: tl.constexpr, STAGES: tl.constexpr,
                  PREC: tl.constexpr):
        """Tile ``program_id(0)``: weight rows ``PB tile ..`` of ``N`` against ``x``, K split
        and added (``_products``, ``_add_splits``). Returns the sums, the rows, and the mask of
        the ``[BM, PB]`` outputs this program stores (none unless it added the splits)."""
        tile = tl.program_id(0)
        rows = tile * PB + tl.arange(0, PB)
        mn = rows < N
        a, b = _products(x, w1, w2, rows, rows, mn, mn, M, K, TWO, BM, BK, KS, STAGES, PREC)
        a, b, last = _add_splits(a, b, scratch, counters, tile, TWO, SPLITK, WS)
        return a, b, rows, (tl.arange(0, BM) < M)[:, None] & mn[None, :] & last

    @triton.jit
    def _gate_up_kernel(x, wg, wu, bg, bu, out, scratch, counters, M, N, K: tl.constexpr,
                        HAS_BIAS: tl.constexpr, PB: tl.constexpr, BM: tl.constexpr,
                        BK: tl.constexpr, KS: tl.constexpr, SPLITK: tl.constexpr,
                        WS: tl.constexpr, STAGES: tl.constexpr, PREC: tl.constexpr):
        """Columns ``PB tile ..`` of ``silu(x @ wg^T + bg) * (x @ wu^T + bu)``, rounded where
        the PyTorch path rounds (each product, silu, the product of the two)."""
        a, b, rows, mask = _row_tile(x, wg, wu, scratch, counters, M, N, K, True, PB, BM, BK,
                                     KS, SPLITK, WS, STAGES, PREC)
        ty = out.dtype.element_ty
        gate = _bias_round(a, bg, rows, rows < N, HAS_BIAS, ty)
        up = _bias_round(b, bu, rows, rows < N, HAS_BIAS, ty)
        s = (gate * tl.sigmoid(gate)).to(ty).to(tl.float32)
        rm = tl.arange(0, BM).to(tl.int64)
        tl.store(out + rm[:, None] * N + rows[None, :], (s * up).to(ty), mask=mask)

    @triton.jit
    def _linear_kernel(x, w, bias, res, out, scratch, counters, M, N, K: tl.constexpr,
                       HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, PB: tl.constexpr,
                       BM: tl.constexpr, BK: tl.constexpr, KS: tl.constexpr,
                       SPLITK: tl.constexpr, WS: tl.constexpr, STAGES: tl.constexpr,
                       PREC: tl.constexpr):
        """Columns ``PB tile ..`` of ``x @ w^T + bias`` rounded to out's dtype, and with
        ``HAS_RES`` that plus ``res`` rounded again (a residual add after the product)."""
        a, _, rows, mask = _row_tile(x, w, w, scratch, counters, M, N, K, False, PB, BM, BK,
                                     KS, SPLITK, WS, STAGES, PREC)
        ty = out.dtype.element_ty
        a = _bias_round(a, bias, rows, rows < N, HAS_BIAS, ty)
        where = tl.arange(0, BM).to(tl.int64)[:, None] * N + rows[None, :]
        if HAS_RES:
            a += tl.load(res + where, mask=mask, other=0.0).to(tl.float32)
        tl.store(out + where, a.to(ty), mask=mask)

    KERNELS = (_rms_norm_kernel, _silu_mul_kernel, _log_sigmoid_kernel, _rope_kernel,
               _qkv_kernel, _gate_up_kernel, _linear_kernel)


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None):
    """``weight * F.rms_norm(x)`` over the last dimension; with ``residual``, of ``x +
    residual``, returning ``(normed, x + residual)``. The output's dtype is that of ``weight *
    x`` (PyTorch's promotion)."""
    H = x.shape[-1]
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    total = torch.empty_like(x) if residual is not None else None
    rows = x.numel() // max(H, 1)
    if rows:
        _rms_norm_kernel[(rows,)](x, None if residual is None else residual.contiguous(), weight,
                                  out, total, H, eps, HAS_RES=residual is not None, BH=_pow2(H),
                                  num_warps=4 if H <= 4096 else 8)
    return out if residual is None else (out, total)


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` (same shape and dtype)."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    if gate.numel():
        BLOCK = 1024
        _silu_mul_kernel[(triton.cdiv(gate.numel(), BLOCK),)](gate, up, out, gate.numel(),
                                                              BLOCK=BLOCK)
    return out


def log_sigmoid(logits: Tensor) -> Tensor:
    """``logsigmoid(logits.float())``, float32."""
    logits = logits.contiguous()
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    if logits.numel():
        BLOCK = 1024
        _log_sigmoid_kernel[(triton.cdiv(logits.numel(), BLOCK),)](logits, out, logits.numel(),
                                                                   BLOCK=BLOCK)
    return out


def rope_supported(q: Tensor, k: Tensor, cos: Tensor) -> bool:
    """Whether ``rope_qk`` takes these shapes: a power-of-two head size from 16 to 256, q and
    k of one dtype over the same tokens, ``cos [B, T, d]``."""
    d = q.shape[-1]
    return (q.dtype == k.dtype and d in (16, 32, 64, 128, 256) and k.shape[:2] == q.shape[:2]
            and k.shape[-1] == d and tuple(cos.shape) == (*q.shape[:2], d))


def rope_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary embedding of ``q [B, T, Hq, d]`` and ``k [B, T, Hk, d]`` by ``cos, sin [B, T,
    d]`` in one launch: new tensors in the inputs' dtype."""
    B, T, Hq, d = q.shape
    Hk = k.shape[2]
    q, k = q.contiguous(), k.contiguous()
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if B * T:
        _rope_kernel[(B * T,)](q, k, cos.contiguous(), sin.contiguous(), q_out, k_out, Hq, Hk,
                               HALF=d // 2, HQP=_pow2(Hq), HKP=_pow2(Hk))
    return q_out, k_out


# ---- a decode step's products: its few rows against each weight, streamed once ----------------

MAX_ROWS = 64
# Tiles: PAIR_BLOCK columns (and their RoPE partners) per program of project_qkv, as many rows of
# the weights per program of gate_up_silu and linear; K_BLOCK of the inner size per step, STAGES
# steps in flight, WARPS warps; a program holds the step's rows of activations rounded up to the
# next of ROW_BLOCKS (the matrix units' 16 at least). Streaming weights at the memory's speed takes
# more programs than a decode step's few tiles make (q, k, v and gates of the 1.1B model: 49 tiles
# on 132 multiprocessors), so those tiles share their K among up to MAX_SPLITS programs (split-K).
# Measured on the H200 with the weights of eight layers in turn (beyond L2), graphed, 1 / 16 / 64
# rows (docs/benchmarks.md, run 30): q, k, v and log-gates with RoPE 7.9 / 8.3 / 10.3 us against
# 26.4 / 27.8 / 27.2 us for cuBLAS and the separate kernels; the MLP's gate, up and silu * up 18.5 /
# 18.9 / 20.1 us against 23.5 / 25.0 / 26.5 us (not split: its 256 tiles are enough, and splitting
# them was slower); the down product with the residual add 13.8 / 14.1 / 15.5 us against 16.0 / 16.6
# / 16.4 us. The attention's output product stays with cuBLAS, which was as fast (6.4 us against 6.5
# at one row, faster at 32 and 64 rows). On the H100 at 32 rows no other setting gained more than 5%
# (benchmarks/sweep_products.py, run 38).
PAIR_BLOCK, K_BLOCK, STAGES, MAX_SPLITS, WARPS = 32, 128, 3, 8, 4
ROW_BLOCKS = (16, 32, 64)

_SCRATCH: dict[torch.device, tuple[Tensor, Tensor]] = {}
_OUTGROWN: list[tuple[Tensor, Tensor]] = []


def _precision(x: Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"      # fp32 as F.linear: no TF32


def _rows(x: Tensor) -> int:
    return x.numel() // max(x.shape[-1], 1)


def _scratch(device: torch.device, floats: int, tiles: int):
    """The device's split-K scratch: fp32 partial sums (at least ``floats``) and int32 counters
    (at least ``tiles``, 0 between launches: the last program of a tile resets its own). None
    when it would have to grow during CUDA-graph capture (the caller then does not split; graph
    steps are warmed up eagerly first, which sizes it). An outgrown scratch is kept alive:
    graphs captured with it still write there when replayed. The launches of a device share
    it, so they must not run concurrently on two streams."""
    have = _SCRATCH.get(device)
    if have is not None and have[0].numel() >= floats and have[1].numel() >= tiles:
        return have
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    if have is not None:
        _OUTGROWN.append(have)
        floats, tiles = max(floats, have[0].numel()), max(tiles, have[1].numel())
    _SCRATCH[device] = (torch.empty(floats, dtype=torch.float32, device=device),
                        torch.zeros(tiles, dtype=torch.int32, device=device))
    return _SCRATCH[device]


def _launch(kernel, x: Tensor, tiles: int, K: int, width: int, splits: int | None, *args,
            **constexprs) -> None:
    """``kernel[(tiles, splits)]`` with the split-K arguments: ``splits`` programs per tile
    (None: about two programs per multiprocessor when there are fewer tiles than
    multiprocessors, else no split), each at least four ``K_BLOCK`` steps (a
    loop of two or three is unrolled and takes every register), at most ``MAX_SPLITS``; a
    tile's partial sums are at most ``[2, rows, width]``."""
    if splits is None:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count \
            if x.is_cuda else 1
        splits = round(2 * sms / tiles) if tiles < sms else 1
    splits = max(1, min(splits, MAX_SPLITS, triton.cdiv(K, 4 * K_BLOCK)))
    BM = next(bm for bm in ROW_BLOCKS if bm >= _rows(x))
    per_tile = splits * 2 * BM * width
    scratch = counters = None
    if splits > 1:
        scratch = _scratch(x.device, tiles * per_tile, tiles)
        if scratch is None:
            splits = 1
        else:
            scratch, counters = scratch
    steps = triton.cdiv(triton.cdiv(K, K_BLOCK), splits)          # K_BLOCKs per program
    kernel[(tiles, splits)](
        *args, scratch=scratch, counters=counters, K=K, BM=BM, BK=K_BLOCK, KS=steps * K_BLOCK,
        SPLITK=splits, WS=per_tile, STAGES=min(STAGES, steps), PREC=_precision(x),
        num_warps=WARPS, **constexprs)


def linears_fusable(x: Tensor, *linears) -> bool:
    """Whether ``project_qkv``, ``gate_up_silu`` and ``linear`` take ``x [..., K]`` through
    these ``nn.Linear``s: 1 to ``MAX_ROWS`` rows, weights of x's dtype (no autocast) and
    contiguous, biases on all or none of them."""
    weights = [lin.weight for lin in linears]
    return (0 < _rows(x) <= MAX_ROWS and fusable(x, *weights)
            and all(w.dtype == x.dtype and w.is_contiguous() and w.shape[1] == x.shape[-1]
                    for w in weights)
            and len({lin.bias is None for lin in linears}) == 1)


def project_qkv(x: Tensor, q_proj, k_proj, v_proj, g_proj, cos: Tensor, sin: Tensor,
                num_heads: int, num_kv_heads: int, splits: int | None = None):
    """``q, k, v`` (``[B, T, H, d]``, RoPE applied to q and k) of ``x [B, T, hidden]`` and,
    with a ``g_proj``, the log-gates ``logsigmoid(g_proj(x)) [B, T, Hk]`` (float32), in one
    launch; ``cos, sin [B, T, d]``. For ``linears_fusable`` inputs and ``qkv_supported``
    shapes; ``splits`` programs share each tile's K (None: the launch's choice)."""
    B, T, K = x.shape
    d = q_proj.weight.shape[0] // num_heads
    x = x.contiguous()
    q = x.new_empty(B, T, num_heads, d)
    k, v = (x.new_empty(B, T, num_kv_heads, d) for _ in range(2))
    g = None if g_proj is None else torch.empty(B, T, num_kv_heads, dtype=torch.float32,
                                                device=x.device)
    pb = PAIR_BLOCK if (d // 2) % PAIR_BLOCK == 0 and B * T <= 16 else 16
    GP = max(16, _pow2(num_kv_heads))
    tiles = (num_heads + 2 * num_kv_heads) * (d // (2 * pb)) + (g is not None)
    _launch(_qkv_kernel, x, tiles, K, max(pb, GP), splits,
            x, q_proj.weight, k_proj.weight, v_proj.weight,
            None if g is None else g_proj.weight, q_proj.bias, k_proj.bias, v_proj.bias,
            None if g is None else g_proj.bias, cos.contiguous(), sin.contiguous(), q, k, v, g,
            M=B * T, Hq=num_heads, Hk=num_kv_heads, HAS_BIAS=q_proj.bias is not None,
            HAS_GATE=g is not None, HALF=d // 2, PB=pb, GP=GP)
    return q, k, v, g


def qkv_supported(q_proj, num_heads: int, cos: Tensor, x: Tensor) -> bool:
    """Whether ``project_qkv`` takes these shapes: a head size that is a multiple of 32 up to
    256, ``cos [B, T, d]``."""
    d = q_proj.weight.shape[0] // num_heads
    return d % 32 == 0 and d <= 256 and tuple(cos.shape) == (*x.shape[:2], d)


def gate_up_silu(x: Tensor, gate_proj, up_proj, splits: int | None = None) -> Tensor:
    """``silu(gate_proj(x)) * up_proj(x)`` in one launch, for ``linears_fusable`` inputs."""
    K, N = x.shape[-1], gate_proj.weight.shape[0]
    x = x.contiguous()
    out = x.new_empty(*x.shape[:-1], N)
    _launch(_gate_up_kernel, x, triton.cdiv(N, PAIR_BLOCK), K, PAIR_BLOCK, splits,
            x, gate_proj.weight, up_proj.weight, gate_proj.bias, up_proj.bias, out,
            M=_rows(x), N=N, HAS_BIAS=gate_proj.bias is not None, PB=PAIR_BLOCK)
    return out


def linear(x: Tensor, lin, residual: Tensor | None = None, splits: int | None = None
           ) -> Tensor:
    """``lin(x)``, or with ``residual`` ``residual + lin(x)`` (the product rounded to x's
    dtype first, as the PyTorch path rounds), in one launch, for ``linears_fusable`` inputs."""
    K, N = x.shape[-1], lin.weight.shape[0]
    x = x.contiguous()
    out = x.new_empty(*x.shape[:-1], N)
    _launch(_linear_kernel, x, triton.cdiv(N, PAIR_BLOCK), K, PAIR_BLOCK, splits,
            x, lin.weight, lin.bias, None if residual is None else residual.contiguous(), out,
            M=_rows(x), N=N, HAS_BIAS=lin.bias is not None, HAS_RES=residual is not None,
            PB=PAIR_BLOCK)
    return out
