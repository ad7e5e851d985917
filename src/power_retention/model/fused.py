"""One-launch versions of the model's small elementwise steps, for generation on a GPU.

A decode step of a 16-layer model is a few hundred kernels, most of them elementwise and each
taking a few microseconds whatever its size, so at batch 1 their count, not their arithmetic,
sets much of the step's time (docs/serving.md). Each function here does in one Triton launch
what the PyTorch path does in two to eight, with the same roundings (values rounded to the
activations' dtype where PyTorch rounds them):

- ``rms_norm``: ``weight * F.rms_norm(x)``, optionally of ``x + residual`` (also returned);
- ``silu_mul``: ``silu(gate) * up``, the gated MLP's middle;
- ``log_sigmoid``: ``logsigmoid(logits.float())``, the gates of a power layer;
- ``rope_qk``: the rotary embedding of q and k together.

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

    KERNELS = (_rms_norm_kernel, _silu_mul_kernel, _log_sigmoid_kernel, _rope_kernel)


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
