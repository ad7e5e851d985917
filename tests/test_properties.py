"""Property tests over random shapes: odd T, T below one chunk, T = 1, e != d, GQA ratios."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from power_retention import attention_reference, power_retention, power_retention_decode

from _helpers import make_inputs, make_state, rel_err


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(1, 40), Hk=st.integers(1, 3), groups=st.integers(1, 3),
       d=st.integers(1, 6), e=st.integers(1, 5), deg=st.sampled_from([2, 4]),
       chunk_size=st.integers(1, 48), gated=st.booleans(), with_state=st.booleans(),
       seed=st.integers(0, 2**16))
def test_op_equals_reference(B, T, Hk, groups, d, e, deg, chunk_size, gated, with_state, seed):
    q, k, v, g = make_inputs(B, T, Hk * groups, Hk, d, e, gated=gated, seed=seed)
    init = make_state(B, Hk, d, e, deg, seed=seed) if with_state else None
    ref, ref_state = attention_reference(q, k, v, g, deg=deg, initial_state=init)
    o, state = power_retention(q, k, v, g, deg=deg, chunk_size=chunk_size, initial_state=init,
                               output_final_state=True)
    assert o.shape == (B, T, Hk * groups, e)
    assert state.S.shape == ref_state.S.shape and state.z.shape == ref_state.z.shape
    assert rel_err(o, ref) < 1e-10
    assert rel_err(state.S, ref_state.S) < 1e-10


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 30), groups=st.integers(1, 3), chunk_size=st.integers(1, 12),
       steps=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_decode_equals_op(T, groups, chunk_size, steps, seed):
    q, k, v, g = make_inputs(1, T, 2 * groups, 2, 3, 2, seed=seed)
    init = make_state(1, 2, 3, 2, seed=seed)
    ref = power_retention(q, k, v, g, initial_state=init)
    state, buffer, outs = init, None, []
    for start in range(0, T, steps):
        sl = slice(start, start + steps)
        o, state, buffer = power_retention_decode(q[:, sl], k[:, sl], v[:, sl], g[:, sl], state,
                                                  buffer, chunk_size=chunk_size)
        outs.append(o)
    assert rel_err(torch.cat(outs, 1), ref) < 1e-10


@settings(max_examples=20, deadline=None)
@given(T=st.integers(2, 40), seed=st.integers(0, 2**16), deg=st.sampled_from([2, 4]))
def test_outputs_are_convex_combinations_of_values(T, seed, deg):
    q, k, v, g = make_inputs(1, T, 2, 1, 4, 3, seed=seed)
    o = power_retention(q, k, v, g, deg=deg)
    # every output lies inside the per-coordinate range of the values seen so far
    lo = v[:, :, :1].cummin(1).values
    hi = v[:, :, :1].cummax(1).values
    assert ((o >= lo - 1e-9) & (o <= hi + 1e-9)).all()
