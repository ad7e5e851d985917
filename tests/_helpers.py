"""Shared helpers of the test suite: random inputs and the relative-error measure."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from power_retention import RetentionState, sympow_embed


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def make_inputs(B=2, T=37, Hq=4, Hk=2, d=8, e=6, *, dtype=torch.float64, gated=True,
                gate_shift=3.0, seed=0, requires_grad=False):
    """Random ``q, k, v, log_gate`` (log_gate None when not gated); gates float32 unless float64."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, d, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(B, T, Hk, d, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(B, T, Hk, e, generator=gen, dtype=torch.float64).to(dtype)
    log_gate = None
    if gated:
        gate_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        log_gate = F.logsigmoid(torch.randn(B, T, Hk, generator=gen, dtype=torch.float64)
                                + gate_shift).to(gate_dtype)
    tensors = [q, k, v, log_gate]
    if requires_grad:
        tensors = [None if x is None else x.requires_grad_() for x in tensors]
    return tensors


def make_state(N, Hk, d, e, deg=2, *, dtype=torch.float64, seed=1, tokens=5) -> RetentionState:
    """A state as a real earlier segment leaves it: ``sum_j w_j phi(k_j) [v_j, 1]`` over a few
    random tokens with weights ``w_j`` in (0, 1), so that denominators ``phi(q).z`` are >= 0."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(N, Hk, tokens, d, generator=gen, dtype=torch.float64)
    v = torch.randn(N, Hk, tokens, e, generator=gen, dtype=torch.float64)
    w = torch.rand(N, Hk, tokens, 1, generator=gen, dtype=torch.float64)
    phi = sympow_embed(k, deg) * w
    return RetentionState((phi.transpose(-1, -2) @ v).to(dtype), phi.sum(-2).to(dtype))


def decode_with_slots(q, k, v, g, state, capacity, read_copy=False, deg=2):
    """Decode token by token as the model's cache does: each token written into a preallocated
    buffer of ``capacity`` slots by ``power_retention_decode_into``, the buffer folded into the
    state in place by ``power_retention_fold`` when it is full; with ``read_copy`` the steps
    read ``S`` rounded to bfloat16, rounded again after every fold. Returns ``(o, state,
    slots, held)``."""
    from power_retention import DecodeBuffer, power_retention_decode_into, power_retention_fold
    B, T, Hk, d = k.shape
    state = RetentionState(state.S.clone(), state.z.clone())     # the caller's is left as is
    gate_dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
    slots = DecodeBuffer(k.new_zeros(B, capacity, Hk, d), v.new_zeros(B, capacity, Hk, v.shape[3]),
                         torch.zeros(B, capacity, Hk, dtype=gate_dtype, device=k.device))
    outs, held = [], 0
    read = state._replace(S=state.S.bfloat16()) if read_copy else state
    for i in range(T):
        step = [None if x is None else x[:, i:i + 1] for x in (q, k, v, g)]
        outs.append(power_retention_decode_into(*step, read, slots, held, deg=deg))
        held += 1
        if held == capacity:
            power_retention_fold(state, slots, deg=deg, out=state)
            read.S.copy_(state.S)
            held = 0
    return torch.cat(outs, 1), state, slots, held
