"""Chunked power retention on PyTorch operations (DESIGN.md section 2, chunked form).

Attention inside chunks of ``c`` tokens, a recurrence between chunks. Differentiable by
autograd; runs on any device. Computes in float32 (float64 for float64 inputs) whatever the
input dtype, so half-precision inputs cannot overflow ``(q.k)**deg``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .naive import sympow_embed
from .state import RetentionState, sympow_dim


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_chunk_size(T: int) -> int:
    """Chunk size for the PyTorch path: 256 was fastest on a 2-core CPU (fwd and fwd+bwd,
    T = 4096, d = 32, p = 2); shorter inputs get the smallest power of two >= T (at least 16)."""
    c = 256
    while c > 16 and c // 2 >= T:
        c //= 2
    return c


def chunk_forward(q, k, v, log_gate, initial_state, *, deg, scale, chunk_size):
    """Power retention over a batch of equal-length sequences.

    q [B,T,Hq,d], k [B,T,Hk,d], v [B,T,Hk,e], log_gate [B,T,Hk] or None, initial_state a
    RetentionState of [B,...] or None. Returns ``o [B,T,Hq,e]`` (input dtype), the final
    RetentionState and the denominators ``den [B,T,Hq]`` (compute dtype).
    """
    B, T, Hq, d = q.shape
    Hk, e = k.shape[2], v.shape[-1]
    groups, c = Hq // Hk, chunk_size
    N = max(1, -(-T // c))
    pad = N * c - T
    D = sympow_dim(d, deg)
    dt = compute_dtype(q.dtype)

    # [B, T, H, x] -> [B, H, N, c, x]; padded keys are zero, so they add nothing to the state.
    def chunks(x, dtype=dt):
        x = F.pad(x.to(dtype), (0, 0) * (x.dim() - 2) + (0, pad))
        return x.unflatten(1, (N, c)).movedim(3, 1)

    qc = chunks(q.to(dt) * scale).unflatten(1, (Hk, groups))        # [B, Hk, g, N, c, d]
    kc = chunks(k)                                                     # [B, Hk, N, c, d]
    vc = chunks(torch.cat([v, v.new_ones(B, T, Hk, 1)], -1))          # [B, Hk, N, c, e+1]
    # the cumulative log-gate from each chunk's start, summed and differenced in float64:
    # with strong gates inside a chunk the sums reach thousands, and their fp32 differences
    # keep a few digits (log-gates of -200 every fifth token: 1.6e-5 at chunk 64 in fp32)
    if log_gate is None:
        G = torch.zeros(B, Hk, N, c, dtype=torch.float64, device=q.device)
    else:
        G = chunks(log_gate, torch.float64).cumsum(-1)     # [B, Hk, N, c], from the chunk start
    G_end = G[..., -1]                                                 # [B, Hk, N]

    # (1) each chunk's contribution to the state; the decay to the chunk's end scales the
    # (e+1)-wide values rather than the D-wide features
    to_end = torch.exp((G_end.unsqueeze(-1) - G).to(dt)).unsqueeze(-1)  # [B, Hk, N, c, 1]
    contrib = sympow_embed(kc, deg).transpose(-1, -2) @ (vc * to_end)  # [B, Hk, N, D, e+1]

    # (2) scan across chunks: the state entering chunk n
    if initial_state is None:
        state = torch.zeros(B, Hk, D, e + 1, dtype=dt, device=q.device)
    else:
        state = torch.cat([initial_state.S, initial_state.z.unsqueeze(-1)], -1).to(dt)
    decay_chunk = torch.exp(G_end.to(dt))[..., None, None]            # [B, Hk, N, 1, 1]
    incoming = []
    for n in range(N):
        incoming.append(state)
        state = decay_chunk[:, :, n] * state + contrib[:, :, n]
    incoming = torch.stack(incoming, 2)                                # [B, Hk, N, D, e+1]

    # (3) outputs: attention inside the chunk plus the incoming state, added before dividing
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    decay = (G.unsqueeze(-1) - G.unsqueeze(-2)).to(dt).masked_fill(~causal, float("-inf"))
    scores = (qc @ kc.unsqueeze(2).transpose(-1, -2)) ** deg           # [B, Hk, g, N, c, c]
    num = (scores * torch.exp(decay).unsqueeze(2)) @ vc.unsqueeze(2)   # [B, Hk, g, N, c, e+1]
    from_start = torch.exp(G.to(dt)).unsqueeze(2).unsqueeze(-1)        # [B, Hk, 1, N, c, 1]
    num = num + from_start * (sympow_embed(qc, deg) @ incoming.unsqueeze(2))
    den = num[..., -1:]
    o = num[..., :-1] / torch.where(den == 0, 1, den)

    def positions(x):                       # [B, Hk, g, N, c, x] -> [B, T, Hq, x]
        return x.flatten(1, 2).movedim(1, 3).flatten(1, 2)[:, :T]

    final = RetentionState(state[..., :-1], state[..., -1])
    return positions(o).to(q.dtype).contiguous(), final, positions(den)[..., 0].contiguous()


def chunk_forward_varlen(q, k, v, log_gate, initial_state, cu_seqlens, *, deg, scale,
                         chunk_size):
    """``chunk_forward`` over packed sequences (B == 1) delimited by ``cu_seqlens [N+1]``,
    each sequence independent, with its own initial and final state."""
    bounds = cu_seqlens.tolist()
    outputs, finals, dens = [], [], []
    for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        init = None if initial_state is None else RetentionState(
            initial_state.S[n:n + 1], initial_state.z[n:n + 1])
        gate = None if log_gate is None else log_gate[:, start:end]
        o, final, den = chunk_forward(q[:, start:end], k[:, start:end], v[:, start:end], gate,
                                      init, deg=deg, scale=scale, chunk_size=chunk_size)
        outputs.append(o)
        finals.append(final)
        dens.append(den)
    dt = compute_dtype(q.dtype)
    if not finals:
        return (q.new_zeros(*q.shape[:3], v.shape[-1]),
                RetentionState.zeros(0, k.shape[2], q.shape[-1], v.shape[-1], deg,
                                     device=q.device, dtype=dt),
                q.new_zeros(*q.shape[:3], dtype=dt))
    return (torch.cat(outputs, 1),
            RetentionState(torch.cat([f.S for f in finals]), torch.cat([f.z for f in finals])),
            torch.cat(dens, 1))
