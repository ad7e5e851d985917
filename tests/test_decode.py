"""Streaming decode (state plus a buffer of recent tokens) equals the parallel op."""

from __future__ import annotations

import pytest
import torch

from power_retention import (
    DecodeBuffer,
    RetentionState,
    power_retention,
    power_retention_decode,
    power_retention_fold,
)

from _helpers import decode_with_slots, make_inputs, make_state, rel_err


def _stream(q, k, v, g, state, steps, chunk_size, deg=2):
    """Feed the sequence through the decoder ``steps`` tokens at a time."""
    buffer, outs = None, []
    T = q.shape[1]
    for start in range(0, T, steps):
        sl = slice(start, min(T, start + steps))
        o, state, buffer = power_retention_decode(
            q[:, sl], k[:, sl], v[:, sl], None if g is None else g[:, sl], state, buffer,
            deg=deg, chunk_size=chunk_size)
        assert buffer.k.shape[1] < chunk_size
        outs.append(o)
    return torch.cat(outs, 1), state, buffer


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("chunk_size", [1, 4, 16])
@pytest.mark.parametrize("gated", [False, True])
def test_decode_equals_parallel(steps, chunk_size, gated):
    q, k, v, g = make_inputs(T=37, Hq=4, Hk=2, d=4, e=3, gated=gated)
    init = make_state(2, 2, 4, 3)
    ref = power_retention(q, k, v, g, initial_state=init)
    o, _, _ = _stream(q, k, v, g, init, steps, chunk_size)
    assert rel_err(o, ref) < 1e-12


def test_decode_float32_with_strong_gates():
    """fp32 decoding whose gates close almost completely now and then (log-gates of -200 at
    every fifth token): the buffer's decays and its fold are differences of large log-gate
    sums, taken in float64 (in fp32: output 2.4e-5, folded state 1.5e-4)."""
    q, k, v, g = make_inputs(B=1, T=250, Hq=2, Hk=1, d=8, e=4, dtype=torch.float32, seed=3)
    g = g * torch.linspace(0.0, 30.0, g.numel()).view(g.shape)
    g[:, 2::5] = -200.0
    init = make_state(1, 1, 8, 4)
    o, state, buffer = _stream(q, k, v, g, RetentionState(init.S.float(), init.z.float()), 1,
                               128)
    ref, ref_state = power_retention(*(x.double() for x in (q, k, v, g)), initial_state=init,
                                     output_final_state=True)
    folded = power_retention_fold(state, buffer)
    assert rel_err(o, ref) < 1e-5
    assert rel_err(folded.S, ref_state.S) < 1e-5 and rel_err(folded.z, ref_state.z) < 1e-5


def test_prefill_then_decode():
    q, k, v, g = make_inputs(T=50, d=4, e=4)
    ref, ref_state = power_retention(q, k, v, g, output_final_state=True)
    _, state = power_retention(q[:, :30], k[:, :30], v[:, :30], g[:, :30], output_final_state=True)
    o, state, buffer = _stream(q[:, 30:], k[:, 30:], v[:, 30:], g[:, 30:], state, 1, 8)
    assert rel_err(o, ref[:, 30:]) < 1e-12
    # folding the remaining buffer reproduces the parallel final state
    folded = power_retention_fold(state, buffer)
    assert rel_err(folded.S, ref_state.S) < 1e-12 and rel_err(folded.z, ref_state.z) < 1e-12


@pytest.mark.parametrize("gated", [False, True])
def test_fold_equals_final_state_of_the_op(gated):
    """``power_retention_fold`` returns the state after the buffered tokens; with ``out`` it
    writes it there (``out=state``: in place), and an empty buffer leaves the state as it is."""
    q, k, v, g = make_inputs(T=11, Hq=4, Hk=2, d=4, e=3, gated=gated)
    init = make_state(2, 2, 4, 3)
    _, ref = power_retention(q, k, v, g, initial_state=init, output_final_state=True)
    gate = torch.zeros(2, 11, 2, dtype=torch.float64) if g is None else g
    buffer = DecodeBuffer(k, v, gate)
    folded = power_retention_fold(init, buffer)
    assert rel_err(folded.S, ref.S) < 1e-12 and rel_err(folded.z, ref.z) < 1e-12
    state = RetentionState(init.S.clone(), init.z.clone())
    assert power_retention_fold(state, buffer, out=state) is state
    assert rel_err(state.S, ref.S) < 1e-12 and rel_err(state.z, ref.z) < 1e-12
    empty = power_retention_fold(init, DecodeBuffer(*(x[:, :0] for x in buffer)))
    assert torch.equal(empty.S, init.S) and torch.equal(empty.z, init.z)


def test_decode_memory_is_constant():
    q, k, v, g = make_inputs(B=1, T=200, Hq=2, Hk=2, d=4, e=4, dtype=torch.float32)
    state = RetentionState.zeros(1, 2, 4, 4)
    sizes = set()
    buffer = None
    for i in range(200):
        _, state, buffer = power_retention_decode(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1],
                                                  g[:, i:i + 1], state, buffer, chunk_size=16)
        if i % 16 == 15:
            sizes.add(sum(x.numel() for x in (*state, *buffer)))
    assert len(sizes) == 1


def test_decode_half_precision_keeps_fp32_state():
    q, k, v, g = make_inputs(B=1, T=5, Hq=2, Hk=1, d=4, e=4, dtype=torch.bfloat16)
    state = RetentionState.zeros(1, 1, 4, 4)
    o, state, buffer = power_retention_decode(q, k, v, g, state, None, chunk_size=4)
    assert o.dtype == torch.bfloat16 and state.S.dtype == torch.float32
    assert buffer.k.dtype == torch.bfloat16 and buffer.log_gate.dtype == torch.float32
    assert isinstance(buffer, DecodeBuffer) and buffer.k.shape[1] == 0   # 5 >= 4: folded


@pytest.mark.parametrize("gated", [False, True])
def test_decode_into_preallocated_slots_equals_parallel(gated):
    q, k, v, g = make_inputs(T=23, Hq=4, Hk=2, d=4, e=3, gated=gated)
    init = make_state(2, 2, 4, 3)
    ref = power_retention(q, k, v, g, initial_state=init)
    o, _, slots, held = decode_with_slots(q, k, v, g, init, capacity=8)
    assert rel_err(o, ref) < 1e-12
    assert held == 23 - 2 * 8 and torch.equal(slots.k[:, :held], k[:, -held:])
