"""Streaming decode: new tokens against the fixed-size state plus a buffer of recent tokens.

DESIGN.md, decoding: the state holds everything folded so far; the buffer holds at most one
chunk of recent ``(k, v, log_gate)`` that new queries read in attention form. When the buffer
reaches ``chunk_size`` tokens it is folded into the state, so memory stays constant.
"""

from __future__ import annotations

import torch

from .chunk import compute_dtype
from .naive import sympow_embed
from .state import DecodeBuffer, RetentionState


def decode_attend(q, k, v, log_gate, state, *, deg, scale):
    """Outputs ``o [B, n, Hq, e]`` of the ``n`` newest tokens: ``q [B, n, Hq, d]`` against the
    state and the ``L >= n`` unfolded tokens ``k [B, L, Hk, d]``, ``v [B, L, Hk, e]``,
    ``log_gate [B, L, Hk]``, the new ones last."""
    B, n, Hq, d = q.shape
    L, Hk = k.shape[1], k.shape[2]
    groups, dt = Hq // Hk, compute_dtype(q.dtype)
    # log-gate sums in float64, as chunk_forward's: large and close with strong gates
    G = log_gate.double().cumsum(1).transpose(1, 2)                    # [B, Hk, L]
    kk, v1 = k.to(dt).transpose(1, 2), _with_ones(v.to(dt).transpose(1, 2))
    qq = (q.to(dt) * scale).transpose(1, 2).unflatten(1, (Hk, groups))  # [B, Hk, g, n, d]
    Gq = G[..., L - n:]                                                 # [B, Hk, n]
    causal = torch.ones(n, L, dtype=torch.bool, device=q.device).tril(L - n)
    decay = (Gq.unsqueeze(-1) - G.unsqueeze(-2)).to(dt).masked_fill(~causal, float("-inf"))
    scores = (qq @ kk.unsqueeze(2).transpose(-1, -2)) ** deg          # [B, Hk, g, n, L]
    num = (scores * torch.exp(decay).unsqueeze(2)) @ v1.unsqueeze(2)  # [B, Hk, g, n, e+1]
    phi_q = sympow_embed(qq, deg) * torch.exp(Gq.to(dt)).unsqueeze(2).unsqueeze(-1)
    num = num + phi_q @ _state_with_z(state, dt).unsqueeze(2)
    den = num[..., -1:]
    o = (num[..., :-1] / torch.where(den == 0, 1, den)).flatten(1, 2).transpose(1, 2)
    return o.to(q.dtype).contiguous()


def decode_step(q, k, v, log_gate, state, buffer, *, deg, scale, chunk_size):
    """q [B,n,Hq,d], k [B,n,Hk,d], v [B,n,Hk,e], log_gate [B,n,Hk] or None (n new tokens).

    Returns ``(o [B,n,Hq,e], state, buffer)`` after appending the new tokens (and folding the
    buffer into the state when it holds ``chunk_size`` tokens or more).
    """
    if log_gate is None:
        log_gate = gate_zeros(k)
    if buffer is not None:
        k, v = torch.cat([buffer.k, k], 1), torch.cat([buffer.v, v], 1)
        log_gate = torch.cat([buffer.log_gate.to(log_gate.dtype), log_gate], 1)
    o = decode_attend(q, k, v, log_gate, state, deg=deg, scale=scale)
    if k.shape[1] >= chunk_size:                        # fold the buffer into the state
        state = fold(state, k, v, log_gate, deg=deg)
        k, v, log_gate = k[:, :0], v[:, :0], log_gate[:, :0]
    return o, state, DecodeBuffer(k, v, log_gate)


def fold(state, k, v, log_gate, *, deg):
    """The state after the tokens ``k [B, L, Hk, d]``, ``v [B, L, Hk, e]``, ``log_gate
    [B, L, Hk]`` (of a decoding buffer), starting from ``state``."""
    if k.shape[1] == 0:
        return state
    dt = compute_dtype(k.dtype)
    G = log_gate.double().cumsum(1).transpose(1, 2)                # [B, Hk, L], float64
    G_end = G[..., -1:]
    to_end = torch.exp((G_end - G).to(dt))
    phi_k = sympow_embed(k.to(dt).transpose(1, 2), deg) * to_end.unsqueeze(-1)
    Sz = (torch.exp(G_end.to(dt)).unsqueeze(-1) * _state_with_z(state, dt)
          + phi_k.transpose(-1, -2) @ _with_ones(v.to(dt).transpose(1, 2)))
    return RetentionState(Sz[..., :-1].to(state.S.dtype), Sz[..., -1].to(state.z.dtype))


def gate_zeros(k):
    """Log gates of 0 (no decay) for the tokens of ``k [B, n, Hk, d]``, in the buffer's dtype."""
    dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
    return torch.zeros(k.shape[:3], dtype=dtype, device=k.device)


def _with_ones(v):
    """``[..., e] -> [..., e + 1]``: the last column of ones accumulates the denominator."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], -1)


def _state_with_z(state, dt):
    """``[S | z]`` as one ``[B, Hk, D, e + 1]`` array of dtype ``dt``."""
    return torch.cat([state.S, state.z.unsqueeze(-1)], -1).to(dt)
