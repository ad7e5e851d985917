"""Plain-PyTorch forms of power retention that are obviously correct (DESIGN.md section 2).

These are the ground truth of every test: run them in float64. They are quadratic (attention
form) or sequential over tokens (recurrent form) and meant for checking, not for speed.
"""

from __future__ import annotations

import itertools
from functools import cache
from math import factorial, prod, sqrt

import torch

from .state import RetentionState


@cache
def _sympow_layout(d: int, deg: int) -> tuple[tuple[tuple[int, ...], ...], tuple[float, ...]]:
    """Index multisets ``a_1 <= ... <= a_deg`` and their coefficients ``sqrt(deg! / prod m!)``."""
    index = tuple(itertools.combinations_with_replacement(range(d), deg))
    coef = tuple(sqrt(factorial(deg) / prod(factorial(a.count(i)) for i in set(a))) for a in index)
    return index, coef


def sympow_layout(d: int, deg: int, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding's layout as tensors: indices ``[D, deg]`` (int64) and coefficients ``[D]``
    (made once per device and dtype: no host-to-device copy per call, which a CUDA graph being
    captured could not hold). Read-only."""
    return _sympow_layout_tensors(d, deg, torch.device(device or "cpu"), dtype)


@cache
def _sympow_layout_tensors(d: int, deg: int, device: torch.device, dtype: torch.dtype
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    index, coef = _sympow_layout(d, deg)
    return (torch.tensor(index, dtype=torch.long, device=device).reshape(len(index), deg),
            torch.tensor(coef, dtype=dtype, device=device))


def sympow_embed(x: torch.Tensor, deg: int) -> torch.Tensor:
    """Symmetric power embedding ``phi(x) [..., D]`` of ``x [..., d]``.

    ``phi(x).phi(y) = (x.y)**deg`` with ``D = sympow_dim(d, deg)`` coordinates."""
    index, coef = sympow_layout(x.shape[-1], deg, x.device, x.dtype)
    out = x[..., index[:, 0]]
    for r in range(1, deg):
        out = out * x[..., index[:, r]]
    return out * coef


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Repeat KV heads (dim 2) so that query head ``h`` reads KV head ``h // groups``."""
    return x.repeat_interleave(groups, dim=2) if groups > 1 else x


def attention_reference(q, k, v, log_gate=None, *, deg=2, scale=None, initial_state=None):
    """Attention form, quadratic in T: ``y_i = sum_j w_ij v_j / sum_j w_ij``.

    Shapes as ``power_retention`` (no ``cu_seqlens``). Returns ``(o, final_state)`` in the
    dtype of ``q``; the final state is ``sum_j exp(G_T - G_j) phi(k_j) v_j^T`` plus the decayed
    initial state, computed directly (not by recurrence).
    """
    B, T, Hq, d = q.shape
    Hk = k.shape[2]
    groups = Hq // Hk
    scale = d ** -0.5 if scale is None else scale
    # cumulative log-gates in float64 whatever the inputs' dtype: with strong gates they are
    # large and close, and their differences are the decays
    G = (torch.zeros(B, T, Hk, dtype=torch.float64, device=q.device) if log_gate is None
         else log_gate.double()).cumsum(1)                         # [B, T, Hk]
    Gq = _expand_kv(G.unsqueeze(-1), groups).squeeze(-1)           # [B, T, Hq]
    kq, vq = _expand_kv(k, groups), _expand_kv(v, groups)
    scores = torch.einsum("bihd,bjhd->bhij", scale * q, kq) ** deg
    decay = (Gq.transpose(1, 2).unsqueeze(-1)
             - Gq.transpose(1, 2).unsqueeze(-2)).to(q.dtype)       # G_i - G_j
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    w = scores * torch.exp(decay.masked_fill(~causal, float("-inf")))
    num = torch.einsum("bhij,bjhe->bihe", w, vq)
    den = w.sum(-1).transpose(1, 2)                                # [B, T, Hq]
    if initial_state is not None:
        phi_q = sympow_embed(scale * q, deg)                       # [B, T, Hq, D]
        S0 = _expand_kv(initial_state.S.to(q.dtype).transpose(1, 2), groups)   # [B, D, Hq, e]
        z0 = _expand_kv(initial_state.z.to(q.dtype).transpose(1, 2), groups)   # [B, D, Hq]
        start = torch.exp(Gq.to(q.dtype))
        num = num + start.unsqueeze(-1) * torch.einsum("bthD,bDhe->bthe", phi_q, S0)
        den = den + start * torch.einsum("bthD,bDh->bth", phi_q, z0)
    o = num / torch.where(den == 0, 1, den).unsqueeze(-1)

    to_end = torch.exp((G[:, -1:] - G).to(q.dtype))                 # [B, T, Hk]
    phi_k = sympow_embed(k, deg) * to_end.unsqueeze(-1)
    S = torch.einsum("bthD,bthe->bhDe", phi_k, v)
    z = phi_k.sum(1)
    if initial_state is not None:
        total = (torch.exp(G[:, -1].to(q.dtype)) if T
                 else torch.ones(B, Hk, dtype=q.dtype, device=q.device))
        S = S + total[..., None, None] * initial_state.S.to(q.dtype)
        z = z + total[..., None] * initial_state.z.to(q.dtype)
    return o, RetentionState(S, z)


def recurrent_reference(q, k, v, log_gate=None, *, deg=2, scale=None, initial_state=None):
    """Recurrent form, one token at a time: ``S_i = exp(g_i) S_{i-1} + phi(k_i) v_i^T``.

    Same arguments and results as :func:`attention_reference`.
    """
    B, T, Hq, d = q.shape
    Hk, e = k.shape[2], v.shape[-1]
    groups = Hq // Hk
    scale = d ** -0.5 if scale is None else scale
    if initial_state is None:
        initial_state = RetentionState.zeros(B, Hk, d, e, deg, device=q.device, dtype=q.dtype)
    S, z = initial_state.S.to(q.dtype), initial_state.z.to(q.dtype)
    phi_q = sympow_embed(scale * q, deg).unflatten(2, (Hk, groups))   # [B, T, Hk, g, D]
    phi_k = sympow_embed(k, deg)                                      # [B, T, Hk, D]
    outputs = []
    for i in range(T):
        if log_gate is not None:
            a = torch.exp(log_gate[:, i].to(q.dtype))                 # [B, Hk]
            S, z = a[..., None, None] * S, a[..., None] * z
        S = S + phi_k[:, i, :, :, None] * v[:, i, :, None, :]
        z = z + phi_k[:, i]
        num = torch.einsum("bhgD,bhDe->bhge", phi_q[:, i], S)
        den = torch.einsum("bhgD,bhD->bhg", phi_q[:, i], z)
        outputs.append((num / torch.where(den == 0, 1, den).unsqueeze(-1)).flatten(1, 2))
    o = torch.stack(outputs, 1) if T else q.new_zeros(B, 0, Hq, e)
    return o, RetentionState(S, z)
