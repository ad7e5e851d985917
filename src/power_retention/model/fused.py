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
- ``gate_up_silu``: the gated MLP's two products and ``silu(gate) * up`` in one launch.

The last two stream the weights once for up to ``MAX_ROWS`` rows of activations (the batch of a
decode step), which is what a step's products cost; larger inputs (prefill) keep cuBLAS.

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
                  BM: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
                  PREC: tl.constexpr):
        """``x [M, K] @ w1[rows1]^T`` and (with ``TWO``) ``x @ w2[rows2]^T``: fp32 ``[BM, PB]``
        each, the weights' rows streamed once along ``K``."""
        rm = tl.arange(0, BM)
        rk = tl.arange(0, BK)
        xrow = x + rm.to(tl.int64)[:, None] * K
        r1 = w1 + rows1.to(tl.int64)[:, None] * K
        r2 = w2 + rows2.to(tl.int64)[:, None] * K
        acc1 = tl.zeros([BM, rows1.shape[0]], tl.float32)
        acc2 = tl.zeros([BM, rows2.shape[0]], tl.float32)
        for k0 in tl.range(0, K, BK, num_stages=STAGES):
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
    def _bias_round(acc, bias, rows, m, HAS_BIAS: tl.constexpr, ty: tl.constexpr):
        """``acc (+ bias)`` rounded to ``ty`` (as ``F.linear`` rounds its output), as fp32."""
        if HAS_BIAS:
            acc += tl.load(bias + rows, mask=m, other=0.0).to(tl.float32)[None, :]
        return acc.to(ty).to(tl.float32)

    @triton.jit
    def _head_block(x, w, bias, cos, sin, out, blk, M, K: tl.constexpr, H,
                    HAS_BIAS: tl.constexpr,
                    ROPE: tl.constexpr, HALF: tl.constexpr, PB: tl.constexpr, BM: tl.constexpr,
                    BK: tl.constexpr, STAGES: tl.constexpr, PREC: tl.constexpr):
        """Columns ``c .. c + PB`` and ``HALF + c ..`` of one head of ``x @ w^T`` (the pairs
        RoPE rotates together), rotated when ``ROPE``, into ``out [M, H, 2 HALF]``."""
        head = blk // (HALF // PB)
        c = (blk % (HALF // PB)) * PB + tl.arange(0, PB)
        rows = head * 2 * HALF + c
        every = c < HALF
        a1, a2 = _products(x, w, w, rows, rows + HALF, every, every, M, K, True, BM, BK,
                           STAGES, PREC)
        ty = out.dtype.element_ty
        a1 = _bias_round(a1, bias, rows, every, HAS_BIAS, ty)
        a2 = _bias_round(a2, bias, rows + HALF, every, HAS_BIAS, ty)
        rm = tl.arange(0, BM)
        mm = (rm < M)[:, None]
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
    def _qkv_kernel(x, wq, wk, wv, wg, bq, bk, bv, bg, cos, sin, q, k, v, g, M, Hq, Hk,
                    K: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, HALF: tl.constexpr,
                    PB: tl.constexpr, GP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                    STAGES: tl.constexpr, PREC: tl.constexpr):
        """Programs ``[0, Hq n)`` make q, then k, then v (``n = HALF / PB`` per head), and
        with ``HAS_GATE`` a last one the log-gates ``g [M, Hk]`` (fp32) of the gate logits
        ``x @ wg^T + bg``, rounded to x's dtype first."""
        pid = tl.program_id(0)
        n = HALF // PB
        if pid < Hq * n:
            _head_block(x, wq, bq, cos, sin, q, pid, M, K, Hq, HAS_BIAS, True, HALF, PB, BM,
                        BK, STAGES, PREC)
        elif pid < (Hq + Hk) * n:
            _head_block(x, wk, bk, cos, sin, k, pid - Hq * n, M, K, Hk, HAS_BIAS, True, HALF,
                        PB, BM, BK, STAGES, PREC)
        elif pid < (Hq + 2 * Hk) * n:
            _head_block(x, wv, bv, cos, sin, v, pid - (Hq + Hk) * n, M, K, Hk, HAS_BIAS, False,
                        HALF, PB, BM, BK, STAGES, PREC)
        elif HAS_GATE:
            rows = tl.arange(0, GP)
            mg = rows < Hk
            a, _ = _products(x, wg, wg, rows, rows, mg, mg, M, K, False, BM, BK, STAGES, PREC)
            a = _bias_round(a, bg, rows, mg, True, x.dtype.element_ty)
            rm = tl.arange(0, BM)
            tl.store(g + rm.to(tl.int64)[:, None] * Hk + rows[None, :],
                     tl.minimum(a, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(a))),
                     mask=(rm < M)[:, None] & mg[None, :])

    @triton.jit
    def _gate_up_kernel(x, wg, wu, bg, bu, out, M, N, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                        PB: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                        STAGES: tl.constexpr, PREC: tl.constexpr):
        """Columns ``PB pid ..`` of ``silu(x @ wg^T + bg) * (x @ wu^T + bu)``, rounded where
        the PyTorch path rounds (each product, silu, the product of the two)."""
        rows = tl.program_id(0) * PB + tl.arange(0, PB)
        mn = rows < N
        a, b = _products(x, wg, wu, rows, rows, mn, mn, M, K, True, BM, BK, STAGES, PREC)
        ty = out.dtype.element_ty
        gate = _bias_round(a, bg, rows, mn, HAS_BIAS, ty)
        up = _bias_round(b, bu, rows, mn, HAS_BIAS, ty)
        s = (gate * tl.sigmoid(gate)).to(ty).to(tl.float32)
        rm = tl.arange(0, BM)
        tl.store(out + rm.to(tl.int64)[:, None] * N + rows[None, :], (s * up).to(ty),
                 mask=(rm < M)[:, None] & mn[None, :])

    KERNELS = (_rms_norm_kernel, _silu_mul_kernel, _log_sigmoid_kernel, _rope_kernel,
               _qkv_kernel, _gate_up_kernel)


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
# Tiles: PAIR_BLOCK columns (and their RoPE partners) per program of project_qkv, as many rows
# of both weights per program of gate_up_silu; K_BLOCK of the hidden size per step, STAGES
# steps in flight, 4 warps. From a sweep on the H200 (docs/benchmarks.md, run 27): hidden
# 2048, 32 + 8 + 8 heads of 64 and an MLP of 8192, 1 / 16 / 64 rows: q, k, v and gates 7.2 /
# 7.4 / 7.8 us (cuBLAS and the separate RoPE and gate kernels 22.8 / 23.3 / 23.7 us), the MLP's
# gate and up 18.4 / 18.8 / 20.0 us (23.2 / 24.0 / 27.1 us). At 64 rows 16 columns per program
# beat 32 for the projections.
PAIR_BLOCK, K_BLOCK, STAGES = 32, 128, 3


def _precision(x: Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"      # fp32 as F.linear: no TF32


def _rows(x: Tensor) -> int:
    return x.numel() // max(x.shape[-1], 1)


def linears_fusable(x: Tensor, *linears) -> bool:
    """Whether ``project_qkv`` / ``gate_up_silu`` take ``x [..., K]`` through these
    ``nn.Linear``s: 1 to ``MAX_ROWS`` rows, weights of x's dtype (no autocast) and contiguous,
    biases on all or none of them."""
    weights = [lin.weight for lin in linears]
    return (0 < _rows(x) <= MAX_ROWS and fusable(x, *weights)
            and all(w.dtype == x.dtype and w.is_contiguous() and w.shape[1] == x.shape[-1]
                    for w in weights)
            and len({lin.bias is None for lin in linears}) == 1)


def project_qkv(x: Tensor, q_proj, k_proj, v_proj, g_proj, cos: Tensor, sin: Tensor,
                num_heads: int, num_kv_heads: int):
    """``q, k, v`` (``[B, T, H, d]``, RoPE applied to q and k) of ``x [B, T, hidden]`` and,
    with a ``g_proj``, the log-gates ``logsigmoid(g_proj(x)) [B, T, Hk]`` (float32), in one
    launch; ``cos, sin [B, T, d]``. For ``linears_fusable`` inputs and ``qkv_supported``
    shapes."""
    B, T, K = x.shape
    d = q_proj.weight.shape[0] // num_heads
    x = x.contiguous()
    q = x.new_empty(B, T, num_heads, d)
    k, v = (x.new_empty(B, T, num_kv_heads, d) for _ in range(2))
    g = None if g_proj is None else torch.empty(B, T, num_kv_heads, dtype=torch.float32,
                                                device=x.device)
    rows = B * T
    pb = PAIR_BLOCK if (d // 2) % PAIR_BLOCK == 0 and rows <= 16 else 16
    blocks = (num_heads + 2 * num_kv_heads) * (d // (2 * pb))
    bias = q_proj.bias is not None
    _qkv_kernel[(blocks + (g is not None),)](
        x, q_proj.weight, k_proj.weight, v_proj.weight,
        None if g is None else g_proj.weight, q_proj.bias, k_proj.bias, v_proj.bias,
        None if g is None else g_proj.bias, cos.contiguous(), sin.contiguous(), q, k, v, g,
        rows, num_heads, num_kv_heads, K=K, HAS_BIAS=bias, HAS_GATE=g is not None,
        HALF=d // 2, PB=pb, GP=max(16, _pow2(num_kv_heads)), BM=max(16, _pow2(rows)),
        BK=K_BLOCK, STAGES=STAGES, PREC=_precision(x))
    return q, k, v, g


def qkv_supported(q_proj, num_heads: int, cos: Tensor, x: Tensor) -> bool:
    """Whether ``project_qkv`` takes these shapes: a head size that is a multiple of 32 up to
    256, ``cos [B, T, d]``."""
    d = q_proj.weight.shape[0] // num_heads
    return d % 32 == 0 and d <= 256 and tuple(cos.shape) == (*x.shape[:2], d)


def gate_up_silu(x: Tensor, gate_proj, up_proj) -> Tensor:
    """``silu(gate_proj(x)) * up_proj(x)`` in one launch, for ``linears_fusable`` inputs."""
    K, N = x.shape[-1], gate_proj.weight.shape[0]
    x = x.contiguous()
    out = x.new_empty(*x.shape[:-1], N)
    M = _rows(x)
    _gate_up_kernel[(triton.cdiv(N, PAIR_BLOCK),)](
        x, gate_proj.weight, up_proj.weight, gate_proj.bias, up_proj.bias, out, M, N, K=K,
        HAS_BIAS=gate_proj.bias is not None, PB=PAIR_BLOCK, BM=max(16, _pow2(M)), BK=K_BLOCK,
        STAGES=STAGES, PREC=_precision(x))
    return out
