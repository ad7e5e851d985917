"""The public op (chunked algorithm) against the float64 reference: forward, backward, state,
packed sequences, every chunk size, several dtypes, long sequences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from power_retention import RetentionState, attention_reference, power_retention

from _helpers import make_inputs, make_state, rel_err

# tolerance on ||out - ref|| / ||ref|| per input dtype
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("T", [1, 5, 16, 37, 100])
@pytest.mark.parametrize("chunk_size", [1, 4, 16, 64, None])
def test_forward_any_length_any_chunk(T, chunk_size):
    q, k, v, g = make_inputs(T=T)
    ref, ref_state = attention_reference(q, k, v, g)
    o, state = power_retention(q, k, v, g, chunk_size=chunk_size, output_final_state=True)
    assert o.shape == ref.shape and o.dtype == torch.float64
    assert rel_err(o, ref) < TOL[torch.float64]
    assert rel_err(state.S, ref_state.S) < 1e-12 and rel_err(state.z, ref_state.z) < 1e-12


@pytest.mark.parametrize("deg", [2, 4])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("Hq,Hk", [(1, 1), (4, 4), (6, 2), (4, 1)])
def test_forward_gqa_gating_degree(deg, gated, Hq, Hk):
    q, k, v, g = make_inputs(T=29, Hq=Hq, Hk=Hk, d=4, e=5, gated=gated)
    init = make_state(2, Hk, 4, 5, deg)
    ref, ref_state = attention_reference(q, k, v, g, deg=deg, initial_state=init)
    o, state = power_retention(q, k, v, g, deg=deg, chunk_size=8, initial_state=init,
                               output_final_state=True)
    assert rel_err(o, ref) < 1e-12 and rel_err(state.S, ref_state.S) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_dtypes(dtype):
    q, k, v, g = make_inputs(T=70, d=16, e=16, dtype=dtype)
    ref, _ = attention_reference(*(x.double() for x in (q, k, v, g)))
    o, state = power_retention(q, k, v, g, chunk_size=16, output_final_state=True)
    assert o.dtype == dtype and state.S.dtype == torch.float32 and state.z.dtype == torch.float32
    assert rel_err(o, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_does_not_overflow(dtype):
    # (q.k)**4 of these inputs is ~1e9, far beyond float16's 65504
    q, k, v, g = make_inputs(T=40, d=8, e=8, dtype=dtype)
    q, k = (q.float() * 8).to(dtype), (k.float() * 8).to(dtype)
    ref, _ = attention_reference(*(x.double() for x in (q, k, v, g)), deg=4)
    o = power_retention(q, k, v, g, deg=4, chunk_size=16)
    assert torch.isfinite(o).all()
    assert rel_err(o, ref) < TOL[dtype]


def _grads(fn, tensors):
    out, state = fn(*tensors)
    gen = torch.Generator().manual_seed(7)
    loss = sum((x * torch.randn(x.shape, generator=gen, dtype=x.dtype)).sum()
               for x in (out, state.S, state.z))
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_backward_matches_reference(gated, with_state):
    q, k, v, g = make_inputs(T=45, Hq=4, Hk=2, d=5, e=3, gated=gated, requires_grad=True)
    init = make_state(2, 2, 5, 3) if with_state else None
    tensors = [q, k, v, g] + ([init.S.requires_grad_(), init.z.requires_grad_()] if init else [])

    def op(q, k, v, g, S=None, z=None):
        st = None if S is None else RetentionState(S, z)
        return power_retention(q, k, v, g, chunk_size=16, initial_state=st,
                               output_final_state=True)

    def ref(q, k, v, g, S=None, z=None):
        return attention_reference(q, k, v, g, initial_state=None if S is None
                                   else RetentionState(S, z))

    for a, b in zip(_grads(op, tensors), _grads(ref, tensors)):
        assert rel_err(a, b) < 1e-10


def test_float32_with_strong_gates_matches_reference():
    """fp32 inputs whose gates close almost completely now and then (log-gates of -200 at
    every fifth token): the cumulative gates inside a chunk reach thousands, and the decays
    are their differences. Summed in fp32 the output was 1.6e-5 off at chunk 64; the op sums
    them in float64. Forward, final state and every gradient within fp32's tolerance."""
    q, k, v, g = make_inputs(B=1, T=200, Hq=2, Hk=1, d=8, e=4, dtype=torch.float32, seed=3)
    g[:, 2::5] = -200.0
    init = make_state(1, 1, 8, 4)
    tensors = [x.requires_grad_() for x in (q, k, v, g, init.S.float(), init.z.float())]

    def op(q, k, v, g, S, z):
        return power_retention(q, k, v, g, chunk_size=64, initial_state=RetentionState(S, z),
                               output_final_state=True)

    def ref(q, k, v, g, S, z):          # float64, its outputs returned in fp32 for _grads
        o, st = attention_reference(*(x.double() for x in (q, k, v, g)),
                                    initial_state=RetentionState(S.double(), z.double()))
        return o.float(), RetentionState(st.S.float(), st.z.float())

    (o, st), (ro, rst) = op(*tensors), ref(*tensors)
    for a, b in [(o, ro), (st.S, rst.S), (st.z, rst.z)]:
        assert rel_err(a, b) < TOL[torch.float32]
    for a, b in zip(_grads(op, tensors), _grads(ref, tensors)):
        assert rel_err(a, b) < TOL[torch.float32]


def test_gradcheck_float64():
    q, k, v, g = make_inputs(B=1, T=7, Hq=2, Hk=1, d=3, e=2, requires_grad=True)
    init = make_state(1, 1, 3, 2)
    S, z = init.S.requires_grad_(), init.z.requires_grad_()

    def fn(q, k, v, g, S, z):
        o, st = power_retention(q, k, v, g, chunk_size=3, initial_state=RetentionState(S, z),
                                output_final_state=True)
        return o, st.S, st.z

    assert torch.autograd.gradcheck(fn, (q, k, v, g, S, z), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("split", [1, 13, 32, 47])
def test_segments_equal_whole_forward_and_backward(split):
    q, k, v, g = make_inputs(T=48, requires_grad=True)

    def whole(q, k, v, g):
        return power_retention(q, k, v, g, chunk_size=16, output_final_state=True)

    def segmented(q, k, v, g):
        o1, s1 = power_retention(q[:, :split], k[:, :split], v[:, :split], g[:, :split],
                                 chunk_size=16, output_final_state=True)
        o2, s2 = power_retention(q[:, split:], k[:, split:], v[:, split:], g[:, split:],
                                 chunk_size=16, initial_state=s1, output_final_state=True)
        return torch.cat([o1, o2], 1), s2

    o_w, s_w = whole(q, k, v, g)
    o_s, s_s = segmented(q, k, v, g)
    assert rel_err(o_s, o_w) < 1e-12 and rel_err(s_s.S, s_w.S) < 1e-12
    for a, b in zip(_grads(segmented, [q, k, v, g]), _grads(whole, [q, k, v, g])):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("lengths", [[5, 0, 17, 1], [40], [0, 0, 3]])
@pytest.mark.parametrize("with_state", [False, True])
def test_packed_sequences_equal_separate_runs(lengths, with_state):
    T, N = sum(lengths), len(lengths)
    q, k, v, g = make_inputs(B=1, T=T, requires_grad=True)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    init = make_state(N, 2, 8, 6) if with_state else None
    o, state = power_retention(q, k, v, g, chunk_size=8, initial_state=init,
                               output_final_state=True, cu_seqlens=cu)
    assert state.S.shape == (N, 2, 36, 6)
    loss = (o ** 2).sum() + state.S.sum()
    grads = torch.autograd.grad(loss, [q, k, v, g])
    ref_grads = [torch.zeros_like(x) for x in (q, k, v, g)]
    for n, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        part = [x[:, start:end] for x in (q, k, v, g)]
        st = None if init is None else RetentionState(init.S[n:n + 1], init.z[n:n + 1])
        o_n, s_n = attention_reference(*part, initial_state=st)
        if end > start:
            assert rel_err(o[:, start:end], o_n) < 1e-12
        if with_state or end > start:
            assert rel_err(state.S[n:n + 1], s_n.S) < 1e-12
        part_grads = torch.autograd.grad((o_n ** 2).sum() + s_n.S.sum(), part, allow_unused=True)
        for full, pg in zip(ref_grads, part_grads):
            if pg is not None:
                full[:, start:end] += pg
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) < 1e-10 or b.norm() == a.norm() == 0


def test_default_chunk_size_gives_same_numbers():
    q, k, v, g = make_inputs(T=300, d=4, e=4)
    outs = [power_retention(q, k, v, g, chunk_size=c) for c in (None, 7, 64, 512)]
    for o in outs[1:]:
        assert rel_err(o, outs[0]) < 1e-12


def _reference_at(q, k, v, G, positions, deg=2):
    """fp64 attention form for a few query positions of one long [T, d] sequence."""
    out = []
    s = q.shape[-1] ** -0.5
    for i in positions:
        w = (s * k[: i + 1] @ q[i]) ** deg * torch.exp(G[i] - G[: i + 1])
        out.append((w[:, None] * v[: i + 1]).sum(0) / w.sum())
    return torch.stack(out)


@pytest.mark.parametrize("shift", [7.0, 0.0])    # gates near 1 (logsigmoid(+7)) and 0.5
def test_one_million_tokens_slow_and_fast_decay(shift):
    T = 1 << 20
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, T, 1, 4, generator=gen) for _ in range(3))
    g = F.logsigmoid(torch.full((1, T, 1), shift) + 0.1 * torch.randn(1, T, 1, generator=gen))
    o, state = power_retention(q, k, v, g, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(state.S).all()
    G = g[0, :, 0].double().cumsum(0)
    positions = [0, 1, 4095, 65_537, T // 2 + 3, T - 1]
    window = 1 << 16   # at gate 0.5, tokens further back weigh below exp(-45000): nothing
    for i in positions:
        lo = max(0, i + 1 - window) if shift == 0.0 else 0
        ref = _reference_at(q[0, lo:, 0].double(), k[0, lo:, 0].double(), v[0, lo:, 0].double(),
                            G[lo:], [i - lo])
        assert rel_err(o[0, i, 0], ref[0]) < 1e-5


@pytest.mark.parametrize("with_extras", [False, True])
@pytest.mark.parametrize("final_state", [False, True])
def test_custom_op_registration(with_extras, final_state):
    """Schema, fake implementation and autograd of the custom op agree with its real kernel,
    with and without the final state (``N = 0`` sequences in it when not asked for)."""
    q, k, v, g = make_inputs(B=1, T=9, Hq=2, Hk=1, d=3, e=2, requires_grad=True)
    init = make_state(2, 1, 3, 2)
    extras = ((g, init.S.requires_grad_(), init.z.requires_grad_(), torch.tensor([0, 4, 9]))
              if with_extras else (None, None, None, None))
    result = torch.library.opcheck(torch.ops.power_retention.forward.default,
                                   (q, k, v, *extras, 2, 0.5, 4, final_state))
    assert set(result.values()) == {"SUCCESS"}
    S = torch.ops.power_retention.forward(q, k, v, *extras, 2, 0.5, 4, final_state)[1]
    assert S.shape == ((2 if with_extras else 1) if final_state else 0, 1, 6, 2)
