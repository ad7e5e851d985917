"""State types carried between calls of the op and between decoding steps."""

from __future__ import annotations

from math import comb
from typing import NamedTuple

import torch


def sympow_dim(d: int, deg: int) -> int:
    """Size ``D = C(d + deg - 1, deg)`` of the symmetric power embedding of a ``d``-vector."""
    if d < 1 or deg < 1:
        raise ValueError(f"sympow_dim expects d >= 1 and deg >= 1, got d={d}, deg={deg}")
    return comb(d + deg - 1, deg)


def state_bytes(d: int, e: int | None = None, deg: int = 2, num_kv_heads: int = 1,
                num_layers: int = 1) -> int:
    """Bytes of fp32 recurrent state (``S`` plus ``z``) for one sequence.

    ``D * (e + 1) * 4`` per KV head and layer, with ``D = sympow_dim(d, deg)``; the
    defaults give the figure per head.
    """
    e = d if e is None else e
    return sympow_dim(d, deg) * (e + 1) * 4 * num_kv_heads * num_layers


class RetentionState(NamedTuple):
    """Recurrent state of power retention, one entry per sequence and KV head.

    ``S [N, Hk, D, e]`` holds ``sum_j decay_j * phi(k_j) v_j^T`` and ``z [N, Hk, D]`` the same
    sum without the values (the normaliser); ``D = sympow_dim(d, deg)`` with the coordinates
    ordered as ``itertools.combinations_with_replacement(range(d), deg)``. Both are float32
    (float64 when the inputs are float64), whatever the dtype of ``q, k, v``.
    """

    S: torch.Tensor
    z: torch.Tensor

    @classmethod
    def zeros(cls, n: int, num_kv_heads: int, d: int, e: int, deg: int = 2, *,
              device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> RetentionState:
        D = sympow_dim(d, deg)
        return cls(torch.zeros(n, num_kv_heads, D, e, device=device, dtype=dtype),
                   torch.zeros(n, num_kv_heads, D, device=device, dtype=dtype))


class DecodeBuffer(NamedTuple):
    """Recent tokens not yet folded into the state (at most one chunk of them).

    ``k [N, L, Hk, d]`` and ``v [N, L, Hk, e]`` in the input dtype, ``log_gate [N, L, Hk]``
    float32 (float64 for float64 inputs). ``L`` is the same for every sequence of a batch.
    """

    k: torch.Tensor
    v: torch.Tensor
    log_gate: torch.Tensor
