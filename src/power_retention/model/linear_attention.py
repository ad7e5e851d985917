"""Gated linear attention (degree 1), chunked, in plain PyTorch: the ``"linear"`` time mixing.

    w_ij = phi(q_i) . phi(k_j) * exp(G_i - G_j),   y_i = sum_j w_ij v_j / sum_j w_ij

with ``phi(x) = elu(x) + 1 > 0`` and the same gates as power retention. We keep the
normaliser: with positive features every weight is >= 0 and ``y_i`` is a convex combination of
values, bounded by them whatever the context length. Without it the output is a plain sum whose
size grows like the number of remembered tokens (up to ``1 / (1 - gate)``, about 1100 for gates
initialised at ``sigmoid(7)``), which makes training unstable and breaks the drop-in relation to
softmax attention. The state is ``S [N, Hk, d, e]`` and ``z [N, Hk, d]`` in float32 (float64 for
float64 inputs), exactly like power retention's with ``D = d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from power_retention.ops import RetentionState


def feature_map(x: Tensor) -> Tensor:
    """Positive features ``elu(x) + 1`` (so every attention weight is >= 0)."""
    return F.elu(x) + 1


def linear_attention(q: Tensor, k: Tensor, v: Tensor, log_gate: Tensor,
                     initial_state: RetentionState | None = None, chunk_size: int = 64
                     ) -> tuple[Tensor, RetentionState]:
    """Chunked gated linear attention over already-featured, non-negative ``q`` and ``k``.

    Args:
        q: ``[B, T, Hq, d]`` features ``>= 0``; k: ``[B, T, Hk, d]`` features ``>= 0`` (zero
            them at padded positions); v: ``[B, T, Hk, e]``; ``Hq % Hk == 0``.
        log_gate: ``[B, T, Hk]`` float, ``<= 0``.
        initial_state: :class:`RetentionState` with ``S [B, Hk, d, e]``, ``z [B, Hk, d]``.
        chunk_size: tokens per chunk (speed only).

    Returns:
        ``o [B, T, Hq, e]`` in the dtype of ``q`` and the final state.
    """
    B, T, Hq, d = q.shape
    Hk, e = k.shape[2], v.shape[-1]
    groups = Hq // Hk
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    c = max(1, min(chunk_size, T))
    N = max(1, -(-T // c))
    pad = N * c - T

    def chunks(x):  # [B, T, H, x] -> [B, H, N, c, x]; padded keys are zero and add nothing
        x = F.pad(x.to(dt), (0, 0) * (x.dim() - 2) + (0, pad))
        return x.unflatten(1, (N, c)).movedim(3, 1)

    qc = chunks(q).unflatten(1, (Hk, groups))                          # [B, Hk, g, N, c, d]
    kc = chunks(k)                                                     # [B, Hk, N, c, d]
    vc = chunks(torch.cat([v, v.new_ones(B, T, Hk, 1)], -1))          # [B, Hk, N, c, e+1]
    G = chunks(log_gate).cumsum(-1)                      # [B, Hk, N, c] from the chunk start
    G_end = G[..., -1]

    # each chunk's contribution to the state, decayed to the chunk's end
    contrib = kc.transpose(-1, -2) @ (vc * torch.exp(G_end.unsqueeze(-1) - G).unsqueeze(-1))
    if initial_state is None:
        state = torch.zeros(B, Hk, d, e + 1, dtype=dt, device=q.device)
    else:
        state = torch.cat([initial_state.S, initial_state.z.unsqueeze(-1)], -1).to(dt)
    incoming = []
    for n in range(N):
        incoming.append(state)
        state = torch.exp(G_end[:, :, n])[..., None, None] * state + contrib[:, :, n]
    incoming = torch.stack(incoming, 2)                                # [B, Hk, N, d, e+1]

    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    decay = (G.unsqueeze(-1) - G.unsqueeze(-2)).masked_fill(~causal, float("-inf"))
    scores = qc @ kc.unsqueeze(2).transpose(-1, -2)                    # [B, Hk, g, N, c, c]
    num = (scores * torch.exp(decay).unsqueeze(2)) @ vc.unsqueeze(2)   # [B, Hk, g, N, c, e+1]
    num = num + (qc * torch.exp(G).unsqueeze(2).unsqueeze(-1)) @ incoming.unsqueeze(2)
    den = num[..., -1:]
    o = num[..., :-1] / torch.where(den == 0, 1, den)                  # [B, Hk, g, N, c, e]
    o = o.flatten(3, 4).flatten(1, 2)[:, :, :T].transpose(1, 2)    # [B, T, Hq, e]
    return o.to(q.dtype), RetentionState(state[..., :-1].contiguous(),
                                         state[..., -1].contiguous())
