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


def decode_step(q, k, v, log_gate, state, buffer, *, deg, scale, chunk_size):
    """q [B,n,Hq,d], k [B,n,Hk,d], v [B,n,Hk,e], log_gate [B,n,Hk] or None (n new tokens).

    Returns ``(o [B,n,Hq,e], state, buffer)`` after appending the new tokens (and folding the
    buffer into the state when it holds ``chunk_size`` tokens or more).
    """
    B, n, Hq, d = q.shape
    Hk = k.shape[2]
    groups, dt = Hq // Hk, compute_dtype(q.dtype)
    if log_gate is None:
        gate_dtype = torch.float64 if dt == torch.float64 else torch.float32
        log_gate = torch.zeros(B, n, Hk, dtype=gate_dtype, device=q.device)
    if buffer is not None:
        k, v = torch.cat([buffer.k, k], 1), torch.cat([buffer.v, v], 1)
        log_gate = torch.cat([buffer.log_gate.to(log_gate.dtype), log_gate], 1)
    L = k.shape[1]                                                     # buffered + new tokens
    G = log_gate.to(dt).cumsum(1).transpose(1, 2)                      # [B, Hk, L]
    kk, vv = k.to(dt).transpose(1, 2), v.to(dt).transpose(1, 2)        # [B, Hk, L, x]
    v1 = torch.cat([vv, vv.new_ones(*vv.shape[:-1], 1)], -1)           # [B, Hk, L, e+1]
    qq = (q.to(dt) * scale).transpose(1, 2).unflatten(1, (Hk, groups))  # [B, Hk, g, n, d]
    Gq = G[..., L - n:]                                                 # [B, Hk, n]

    causal = torch.ones(n, L, dtype=torch.bool, device=q.device).tril(L - n)
    decay = (Gq.unsqueeze(-1) - G.unsqueeze(-2)).masked_fill(~causal, float("-inf"))
    scores = (qq @ kk.unsqueeze(2).transpose(-1, -2)) ** deg          # [B, Hk, g, n, L]
    num = (scores * torch.exp(decay).unsqueeze(2)) @ v1.unsqueeze(2)  # [B, Hk, g, n, e+1]
    Sz = torch.cat([state.S, state.z.unsqueeze(-1)], -1).to(dt)       # [B, Hk, D, e+1]
    phi_q = sympow_embed(qq, deg) * torch.exp(Gq).unsqueeze(2).unsqueeze(-1)
    num = num + phi_q @ Sz.unsqueeze(2)
    den = num[..., -1:]
    o = (num[..., :-1] / torch.where(den == 0, 1, den)).flatten(1, 2).transpose(1, 2)

    if L >= chunk_size:
        G_end = G[..., -1:]
        phi_k = sympow_embed(kk, deg) * torch.exp(G_end - G).unsqueeze(-1)
        Sz = torch.exp(G_end).unsqueeze(-1) * Sz + phi_k.transpose(-1, -2) @ v1
        state = RetentionState(Sz[..., :-1].to(state.S.dtype), Sz[..., -1].to(state.z.dtype))
        k, v, log_gate = k[:, :0], v[:, :0], log_gate[:, :0]
    return o.to(q.dtype).contiguous(), state, DecodeBuffer(k, v, log_gate)
