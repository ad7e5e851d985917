"""Every invalid call raises a ValueError/TypeError naming the argument, before any compute."""

from __future__ import annotations

import pytest
import torch

from power_retention import (
    DecodeBuffer,
    RetentionState,
    power_retention,
    power_retention_decode,
    power_retention_decode_into,
    power_retention_fold,
)

from _helpers import make_inputs, make_state


@pytest.fixture
def inputs():
    return make_inputs(B=1, T=10, Hq=4, Hk=2, d=4, e=3, dtype=torch.float32)


def _call(q, k, v, g, **kw):
    return power_retention(q, k, v, g, **kw)


def _poke(g, value):
    g = g.clone()
    g[0, 3, 1] = value
    return g


CASES = {
    "q not a tensor": (lambda q, k, v, g: _call(q.tolist(), k, v, g), TypeError,
                       "q must be a torch.Tensor, got list"),
    "q 3-D": (lambda q, k, v, g: _call(q[0], k, v, g), ValueError,
              r"q must have 4 dimensions, got shape \(10, 4, 4\)"),
    "integer q": (lambda q, k, v, g: _call(q.long(), k.long(), v.long(), g), TypeError,
                  "q must be float16, bfloat16, float32 or float64, got torch.int64"),
    "k dtype": (lambda q, k, v, g: _call(q, k.double(), v, g), TypeError,
                r"k must have the dtype of q \(torch.float32\), got torch.float64"),
    "v dtype": (lambda q, k, v, g: _call(q, k, v.half(), g), TypeError,
                "v must have the dtype of q"),
    "k device": (lambda q, k, v, g: _call(q, k.to("meta"), v, g), ValueError,
                 r"k must be on the device of q \(cpu\), got meta"),
    "k length": (lambda q, k, v, g: _call(q, k[:, :9], v, g), ValueError,
                 r"k must have shape \[B, T, Hk, d\] .* = \(1, 10, 2, 4\), got \(1, 9, 2, 4\)"),
    "k head size": (lambda q, k, v, g: _call(q, k[..., :3], v, g), ValueError,
                    r"k must have shape .* got \(1, 10, 2, 3\)"),
    "v heads": (lambda q, k, v, g: _call(q, k, v[:, :, :1], g), ValueError,
                r"v must have shape \[B, T, Hk, e\] = \(1, 10, 2\) \+ \(e,\), got \(1, 10, 1, 3\)"),
    "Hq not a multiple of Hk": (lambda q, k, v, g: _call(q[:, :, :3], k, v, g), ValueError,
                                r"heads of q \(Hq=3\) must be a multiple .* \(Hk=2\)"),
    "odd deg": (lambda q, k, v, g: _call(q, k, v, g, deg=3), ValueError,
                "deg must be an even int >= 2 .* got 3"),
    "zero deg": (lambda q, k, v, g: _call(q, k, v, g, deg=0), ValueError,
                 "deg must be an even int >= 2 .* got 0"),
    "negative deg": (lambda q, k, v, g: _call(q, k, v, g, deg=-2), ValueError,
                     "deg must be an even int >= 2 .* got -2"),
    "float deg": (lambda q, k, v, g: _call(q, k, v, g, deg=2.0), TypeError,
                  "deg must be an even int >= 2, got float 2.0"),
    "negative scale": (lambda q, k, v, g: _call(q, k, v, g, scale=-1.0), ValueError,
                       "scale must be a finite positive number, got -1.0"),
    "chunk size": (lambda q, k, v, g: _call(q, k, v, g, chunk_size=0), ValueError,
                   "chunk_size must be a positive int or None, got 0"),
    "gate shape": (lambda q, k, v, g: _call(q, k, v, g[:, :, :1]), ValueError,
                   r"log_gate must have shape \[B, T, Hk\] = \(1, 10, 2\), got \(1, 10, 1\)"),
    "gate dtype": (lambda q, k, v, g: _call(q, k, v, g.bfloat16()), TypeError,
                   "log_gate must be float32 .* got torch.bfloat16"),
    "positive gate": (lambda q, k, v, g: _call(q, k, v, g.abs() + 0.5), ValueError,
                      r"log_gate must be <= 0 \(log of a gate in \(0, 1\]\), got a maximum"),
    "NaN gate": (lambda q, k, v, g: _call(q, k, v, _poke(g, float("nan"))), ValueError,
                 "log_gate must be finite, got NaN or Inf"),
    "-Inf gate": (lambda q, k, v, g: _call(q, k, v, _poke(g, -float("inf"))), ValueError,
                  "log_gate must be finite, got NaN or Inf"),
    "cu_seqlens dtype": (lambda q, k, v, g: _call(q, k, v, g, cu_seqlens=torch.tensor([0., 10.])),
                         TypeError, "cu_seqlens must be int32 or int64, got torch.float32"),
    "cu_seqlens start": (lambda q, k, v, g: _call(q, k, v, g, cu_seqlens=torch.tensor([1, 10])),
                         ValueError, "cu_seqlens must start at 0, got 1"),
    "cu_seqlens order": (lambda q, k, v, g: _call(q, k, v, g,
                                                  cu_seqlens=torch.tensor([0, 6, 4, 10])),
                         ValueError, r"cu_seqlens must be non-decreasing, got \[0, 6, 4, 10\]"),
    "cu_seqlens end": (lambda q, k, v, g: _call(q, k, v, g, cu_seqlens=torch.tensor([0, 4, 9])),
                       ValueError, "cu_seqlens must end at the sequence length T=10, got 9"),
    "cu_seqlens batch": (lambda q, k, v, g: _call(*(torch.cat([x, x]) for x in (q, k, v, g)),
                                                  cu_seqlens=torch.tensor([0, 10])),
                         ValueError, "cu_seqlens needs packed input with batch size B == 1, got"),
    "state type": (lambda q, k, v, g: _call(q, k, v, g, initial_state=(1, 2)), TypeError,
                   r"initial_state must be a RetentionState\(S, z\), got tuple"),
    "state shape": (lambda q, k, v, g: _call(q, k, v, g, initial_state=make_state(
        1, 2, 4, 4, dtype=torch.float32)), ValueError,
        r"initial_state.S must have shape \[N, Hk, D, e\] = \(1, 2, 10, 3\), got \(1, 2, 10, 4\)"),
    "state count with cu_seqlens": (lambda q, k, v, g: _call(
        q, k, v, g, cu_seqlens=torch.tensor([0, 4, 10]),
        initial_state=make_state(1, 2, 4, 3, dtype=torch.float32)), ValueError,
        r"initial_state.S must have shape \[N, Hk, D, e\] = \(2, 2, 10, 3\), got \(1, 2, 10, 3\)"),
    "state dtype": (lambda q, k, v, g: _call(q, k, v, g, initial_state=make_state(
        1, 2, 4, 3, dtype=torch.bfloat16)), TypeError,
        "initial_state.S must be torch.float32 for torch.float32 inputs, got torch.bfloat16"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_named(case, inputs):
    fn, error, message = CASES[case]
    with pytest.raises(error, match=message):
        fn(*inputs)


def test_checks_run_before_compute(inputs, monkeypatch):
    import power_retention.ops.api as api

    def fail(*args, **kwargs):
        raise AssertionError("compute ran")

    monkeypatch.setattr(api, "_forward", fail)
    q, k, v, g = inputs
    with pytest.raises(ValueError, match="log_gate must be <= 0"):
        power_retention(q, k, v, g.abs() + 1)


def test_decode_errors(inputs):
    q, k, v, g = (x[:, :1] for x in inputs)
    state = RetentionState.zeros(1, 2, 4, 3)
    with pytest.raises(ValueError, match=r"state.S must have shape \[N, Hk, D, e\] = \(1, 2, 10"):
        power_retention_decode(q, k, v, g, RetentionState.zeros(2, 2, 4, 3), chunk_size=4)
    with pytest.raises(TypeError, match="buffer must be a DecodeBuffer"):
        power_retention_decode(q, k, v, g, state, buffer=[k, v, g], chunk_size=4)
    bad = DecodeBuffer(k.expand(1, 2, 2, 4), v, g)
    with pytest.raises(ValueError, match=r"buffer.v must have shape \[B, L, Hk, e\] = \(1, 2, 2"):
        power_retention_decode(q, k, v, g, state, buffer=bad, chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size must be given when decoding"):
        power_retention_decode(q, k, v, g, state, chunk_size=None)


def test_decode_into_errors(inputs):
    q, k, v, g = (x[:, :1] for x in inputs)
    state = RetentionState.zeros(1, 2, 4, 3)
    slots = DecodeBuffer(k.new_zeros(1, 4, 2, 4), v.new_zeros(1, 4, 2, 3), g.new_zeros(1, 4, 2))
    with pytest.raises(ValueError, match=r"held \+ new tokens must fit the buffer: held = 4"):
        power_retention_decode_into(q, k, v, g, state, slots, 4)
    with pytest.raises(TypeError, match="held must be an int"):
        power_retention_decode_into(q, k, v, g, state, slots, 1.0)
    sliced = DecodeBuffer(*(x[:, ::2] for x in slots))
    with pytest.raises(ValueError, match="buffer.k must be contiguous"):
        power_retention_decode_into(q, k, v, g, state, sliced, 0)
    with pytest.raises(TypeError, match=r"buffer.v must have the dtype of v \(torch.float32\)"):
        power_retention_decode_into(q, k, v, g, state, slots._replace(v=slots.v.half()), 0)
    with pytest.raises(ValueError, match=r"buffer.log_gate must have shape \[B, capacity, Hk\]"):
        power_retention_decode_into(q, k, v, g, state, slots._replace(log_gate=g), 0)
    rounded = state._replace(S=state.S.bfloat16())        # a read copy: bfloat16 inputs only
    with pytest.raises(TypeError, match=r"state.S must be torch.float32 for torch.float32 in"):
        power_retention_decode_into(q, k, v, g, rounded, slots, 0)
    half = [x.bfloat16() for x in (q, k, v)] + [g]
    bf16_slots = slots._replace(k=slots.k.bfloat16(), v=slots.v.bfloat16())
    assert power_retention_decode_into(*half, rounded, bf16_slots, 0).dtype == torch.bfloat16
    with pytest.raises(TypeError, match=r"state.S must be torch.float32 or torch.bfloat16 for "
                                        r"torch.bfloat16 inputs, got torch.float16"):
        power_retention_decode_into(*half, state._replace(S=state.S.half()), bf16_slots, 0)


def test_fold_errors(inputs):
    _, k, v, g = inputs
    state = RetentionState.zeros(1, 2, 4, 3)
    buffer = DecodeBuffer(k, v, g)
    with pytest.raises(TypeError, match="buffer must be a DecodeBuffer"):
        power_retention_fold(state, (k, v, g))
    with pytest.raises(ValueError, match=r"state.S must have shape \[N, Hk, D, e\] = \(1, 2, 10"):
        power_retention_fold(RetentionState.zeros(2, 2, 4, 3), buffer)
    with pytest.raises(TypeError, match=r"out.S must be torch.float32 for torch.float32 inputs"):
        power_retention_fold(state, buffer, out=RetentionState(*(x.double() for x in state)))
    with pytest.raises(ValueError, match=r"buffer.log_gate must have shape \[B, L, Hk\]"):
        power_retention_fold(state, buffer._replace(log_gate=g[:, :3]))
    with pytest.raises(ValueError, match="deg must be"):
        power_retention_fold(state, buffer, deg=0)
