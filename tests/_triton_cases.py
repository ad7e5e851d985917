"""Checks of the Triton kernels against the float64 reference, run by ``test_triton.py`` in a
subprocess under ``TRITON_INTERPRET=1`` (the variable must be set before Triton is imported, so
these cannot share a process with the rest of the suite).

    TRITON_INTERPRET=1 PYTHONPATH=src python tests/_triton_cases.py CASE [CASE ...]

prints one JSON line ``{case: {tensor: relative error}}``. With ``--serve`` it reads case names
from stdin, one per line, and answers each with a line ``RESULT {case: {...}}``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))

from power_retention import DecodeBuffer, RetentionState, power_retention, sympow_embed  # noqa: E402
from power_retention.ops.naive import attention_reference  # noqa: E402
from power_retention.ops.triton.kernels import _dot32  # noqa: E402

from _helpers import decode_with_slots, make_inputs, make_state, rel_err  # noqa: E402


def _host():
    assert os.environ.get("TRITON_INTERPRET") == "1", "run under TRITON_INTERPRET=1"
    from power_retention.ops.triton import host
    host.POISON = True                                    # unwritten outputs read as NaN
    return host


def _reference(q, k, v, g, state, cu_seqlens, deg=2):
    """fp64 attention form per sequence (packed sequences one by one)."""
    up = [None if x is None else x.double() for x in (q, k, v, g)]
    if cu_seqlens is None:
        init = None if state is None else RetentionState(state[0].double(), state[1].double())
        o, final = attention_reference(*up, deg=deg, initial_state=init)
        return o, final.S, final.z
    outs, Ss, zs = [], [], []
    bounds = cu_seqlens.tolist()
    for n, (s, t) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = [None if x is None else x[:, s:t] for x in up]
        init = None if state is None else RetentionState(state[0][n:n + 1].double(),
                                                         state[1][n:n + 1].double())
        o, final = attention_reference(*part, deg=deg, initial_state=init)
        if init is None and t == s:
            final = RetentionState(torch.zeros_like(final.S), torch.zeros_like(final.z))
        outs.append(o)
        Ss.append(final.S)
        zs.append(final.z)
    return torch.cat(outs, 1), torch.cat(Ss), torch.cat(zs)


def check_op(B, T, Hq, Hk, d, e, dtype, *, gated=True, with_state=True, cu=None, chunk=16,
             final=True, seed=0, deg=2, inputs=None) -> dict[str, float]:
    """Forward and backward of the host functions against the reference; gradients of every
    input, the initial state included, under random output, final-state gradients (without
    ``final``: the final state not kept, its gradient zero). ``inputs`` ``(q, k, v, g, S0,
    z0)`` replaces the random ones."""
    host = _host()
    q, k, v, g = make_inputs(B, T, Hq, Hk, d, e, dtype=dtype, gated=gated, seed=seed)
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    N = B if cu is None else len(cu) - 1
    state = None
    if with_state:
        st = make_state(N, Hk, d, e, deg, seed=seed + 1)
        state = (st.S.float(), st.z.float())
    if inputs is not None:
        q, k, v, g, *given = inputs
        state = tuple(given) if with_state else None
    leaves = [x for x in (q, k, v, g) if x is not None]
    leaves += [] if state is None else list(state)
    ref_leaves = [x.double().requires_grad_() for x in leaves]
    it = iter(ref_leaves)
    rq, rk, rv = next(it), next(it), next(it)
    rg = next(it) if gated else None
    rstate = (next(it), next(it)) if with_state else None
    ro, rS, rz = _reference(rq, rk, rv, rg, rstate, cu_seqlens, deg)

    gen = torch.Generator().manual_seed(seed + 7)
    do = torch.randn(ro.shape, generator=gen, dtype=torch.float64)
    dS = torch.randn(rS.shape, generator=gen, dtype=torch.float64)
    dz = torch.randn(rz.shape, generator=gen, dtype=torch.float64)
    if final:
        torch.autograd.backward([ro, rS, rz], [do, dS, dz])
    else:
        ro.backward(do)

    S0, z0 = (None, None) if state is None else state
    scale = d ** -0.5
    o, S, z, den, o_low = host.forward(q, k, v, g, S0, z0, cu_seqlens, scale, chunk, final,
                                       deg)
    grads = host.backward(do.to(dtype), dS.float() if final else None,
                          dz.float() if final else None, q, k, v, g, S0, z0, cu_seqlens, o,
                          den, o_low, scale, chunk, deg)
    if final:
        errors = {"o": rel_err(o, ro), "S": rel_err(S, rS), "z": rel_err(z, rz)}
    else:
        errors = {"o": rel_err(o, ro), "final_state_kept": float(S.shape[0] + z.shape[0])}
        S, z = rS, rz                          # nothing of theirs to check below
    names = ["dq", "dk", "dv"] + (["dlog_gate"] if gated else []) + \
        (["dS0", "dz0"] if with_state else [])
    present = [x for x in grads if x is not None]
    for name, got, ref in zip(names, present, ref_leaves):
        errors[name] = rel_err(got, ref.grad)
    if o_low.shape[-1]:        # what rounding the fp32 output to o's dtype left out (0: it is)
        half_ulp = o.float().abs() * torch.finfo(o.dtype).eps / 2
        residual = bool((o_low.float().abs() <= half_ulp).all() and o_low.abs().max() > 0)
        errors["o_low_not_residual"] = float(not residual)
    for name, x in [("o", o), ("S", S), ("z", z)] + list(zip(names, present)):
        if not bool(torch.isfinite(x).all()):
            errors[name] = float("nan")
    return errors


def case_fp32_gqa_state():
    return check_op(2, 37, 4, 2, 16, 8, torch.float32)


def case_fp16_gqa_state():
    return check_op(2, 37, 4, 2, 16, 8, torch.float16)


def case_bf16_gqa_state():
    """bf16 products (the fast path), under the interpreter as rounded fp32 operands."""
    return check_op(2, 37, 4, 2, 16, 8, torch.bfloat16)


def case_bf16_no_state():
    """bf16 products without states: the first tokens' ``-(dy . o)`` must cancel their ``dy .
    v`` (``prepare_bwd_kernel``; dq 7.8e-2 when dy_z took dy unrounded)."""
    return check_op(2, 37, 4, 2, 16, 8, torch.bfloat16, with_state=False, final=False)


def case_bf16_d128():
    """bf16 inputs at d = 128 run with tf32 products and fp32 chunk states, as fp16 ones do
    (``host._bf16_products``; ``bf16_products`` 1.0 if they did not)."""
    errors = check_op(1, 21, 2, 1, 128, 16, torch.bfloat16, chunk=16)
    errors["bf16_products"] = float(_host()._bf16_products(torch.bfloat16, 128, 16))
    return errors


def case_fp32_ungated_d32_e24():
    return check_op(1, 50, 2, 2, 32, 24, torch.float32, gated=False, with_state=False, chunk=64)


def case_fp16_d32():
    return check_op(1, 41, 2, 1, 32, 16, torch.float16, chunk=32)


def case_fp32_d64_state():
    """d = 64: eight index blocks, so the backward's state columns gather rows from many tiles."""
    return check_op(1, 21, 2, 1, 64, 16, torch.float32, chunk=16)


def case_fp32_wide_values():
    """e > 64 in fp32: index blocks of 8, padded to 16 columns for the matrix units."""
    return check_op(1, 23, 2, 1, 16, 72, torch.float32, chunk=16)


def case_fp16_wide_values():
    """e > 64 in fp16: the forward keeps what rounding the output left out (``o_low``) for
    the gradient of the denominators."""
    return check_op(1, 23, 2, 1, 16, 72, torch.float16, chunk=16)


def case_fp32_packed_empty_segment():
    return check_op(1, 60, 2, 1, 16, 8, torch.float32, cu=[0, 20, 20, 53, 60])


def case_fp32_packed_no_state():
    return check_op(1, 45, 2, 2, 16, 16, torch.float32, with_state=False, cu=[0, 0, 17, 45])


def case_fp32_packed_no_final_state():
    """Packed sequences with initial states whose final states are not kept (the training
    case: no state per sequence is held, its gradient is zero)."""
    return check_op(1, 60, 2, 1, 16, 8, torch.float32, cu=[0, 20, 20, 53, 60], final=False)


def case_fp32_forward_in_head_halves():
    """The forward launched per group of KV heads (``host._head_parts``, which on a GPU puts
    two halves on two streams; here forced, uneven, in order): every head's states and outputs
    written once (unwritten buffers read as NaN)."""
    host = _host()
    original = host._head_parts
    host._head_parts = lambda x, Hk, programs: [(0, 2, None), (2, Hk - 2, None)]
    try:
        return check_op(1, 45, 6, 3, 16, 8, torch.float32, cu=[0, 17, 45])
    finally:
        host._head_parts = original


def case_attention_fp32_gqa():
    """The attention form (``host.ATTENTION``: no states in or out), forced: queries and keys
    in blocks of 16, odd length, GQA."""
    return check_op(2, 37, 4, 2, 16, 8, torch.float32, with_state=False, final=False, chunk=0)


def case_attention_fp16_packed_empty_segment():
    return check_op(1, 60, 2, 1, 16, 8, torch.float16, with_state=False, final=False,
                    cu=[0, 20, 20, 53, 60], chunk=0)


def case_attention_bf16_gqa():
    return check_op(2, 37, 4, 2, 16, 8, torch.bfloat16, with_state=False, final=False, chunk=0)


def case_attention_fp16_wide_values():
    """e > 64 in fp16: the attention form keeps ``o_low`` as the chunked one does."""
    return check_op(1, 23, 2, 1, 16, 72, torch.float16, with_state=False, final=False, chunk=0)


def case_attention_fp32_ungated_d32_e24():
    return check_op(1, 50, 2, 2, 32, 24, torch.float32, gated=False, with_state=False,
                    final=False, chunk=0)


def _strong_gates(B, T, Hq, Hk, d, e):
    """Gates of every strength, some closing completely: log-gates scaled up to 30x, -200 at
    every fifth position from the third. Inside a chunk or block the cumulative gates reach
    thousands."""
    q, k, v, g = make_inputs(B, T, Hq, Hk, d, e, dtype=torch.float32, seed=3)
    g = g * torch.linspace(0.0, 30.0, g.numel()).view(g.shape)
    g[:, 2::5] = -200.0
    return q, k, v, g


def case_attention_fp32_strong_gates():
    """Decays within a block far below fp32's range, where a product of per-position factors
    taken against the wrong reference would overflow, and fp32 differences of the cumulative
    gates would lose their digits (dq 1.3e-5 so)."""
    return check_op(2, 45, 2, 1, 16, 8, torch.float32, with_state=False, final=False, chunk=0,
                    inputs=_strong_gates(2, 45, 2, 1, 16, 8))


def case_fp32_strong_gates_state():
    """The chunked form, chunks of 32, states in and out. With the in-chunk cumulative gates
    summed in fp32: S 1.2e-4, dv 8.8e-5, dk 6.8e-5."""
    N, T = 1, 90
    st = make_state(N, 1, 16, 8, seed=4)
    return check_op(N, T, 2, 1, 16, 8, torch.float32, chunk=32,
                    inputs=(*_strong_gates(N, T, 2, 1, 16, 8), st.S.float(), st.z.float()))


def case_attention_deg4_fp32():
    return check_op(1, 37, 2, 1, 16, 8, torch.float32, deg=4, with_state=False, final=False,
                    chunk=0)


def case_attention_deg4_fp16():
    """Degree 4 in fp16 at d = 32: one tf32 pass per product, as at degree 2 (the chunked
    form's three guard its state products, which the attention form does not have)."""
    return check_op(1, 50, 2, 1, 32, 16, torch.float16, deg=4, with_state=False, final=False,
                    chunk=0)


def case_attention_deg4_bf16():
    """Degree 4 in bf16 at d = 32: bf16 products (the chunked form takes tf32 ones there)."""
    return check_op(1, 50, 2, 1, 32, 16, torch.bfloat16, deg=4, with_state=False, final=False,
                    chunk=0)


def case_deg4_fp32_gqa_state():
    """Degree 4 (the exact layout in tiles of 64 rows, four factors per feature): d = 16 (3,876
    features, 61 tiles, the last one padded), GQA, odd length, states in and out."""
    return check_op(2, 37, 4, 2, 16, 8, torch.float32, deg=4)


def case_deg4_fp16_packed():
    """Degree 4, float16 at d = 32 (52,360 features), packed sequences with an empty one and no
    final state kept."""
    return check_op(1, 40, 2, 1, 32, 8, torch.float16, cu=[0, 17, 17, 40], final=False,
                    deg=4, chunk=32)


def case_deg4_fp16_near_orthogonal():
    """Degree 4, fp16, d = 16: the first four queries nearly orthogonal to the keys of the
    initial state and of their own tokens, so their weights are tiny against the magnitudes of
    the features that sum to them (about 1e4 times smaller): the state products cancel that
    much. With one tf32 pass in the forward dz0 and dq miss (1.7e-2, 2.6e-2 under this
    emulation), with one in the backward only dq (1.9e-2); three passes: within 6e-4."""
    B, T, Hq, Hk, d, e, n0, lead = 1, 24, 2, 1, 16, 8, 5, 4
    gen = torch.Generator().manual_seed(3)
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)
    K0, V0 = randn(n0, d), randn(n0, e)                       # the state's tokens
    phi = sympow_embed(K0, 4) * torch.rand(n0, 1, generator=gen, dtype=torch.float64)
    S0, z0 = (phi.T @ V0)[None, None].float(), phi.sum(0)[None, None].float()
    U, _ = torch.linalg.qr(K0.T)                              # [d, n0]: their keys' span
    q, k, v = randn(B, T, Hq, d), randn(B, T, Hk, d), randn(B, T, Hk, e)
    k[:, :lead] = 2 * (U @ randn(n0, lead * Hk)).T.reshape(B, lead, Hk, d)
    off = q[:, :lead] - (q[:, :lead] @ U) @ U.T               # orthogonal to the span, plus
    q[:, :lead] = off + 0.3 * (U @ randn(n0, lead * Hq)).T.reshape(B, lead, Hq, d)  # a little
    g = F.logsigmoid(randn(B, T, Hk) + 3).float()
    return check_op(B, T, Hq, Hk, d, e, torch.float16, deg=4,
                    inputs=(q.half(), k.half(), v.half(), g, S0, z0))


@triton.jit
def _product(x, y, out, PREC: tl.constexpr, EXACT: tl.constexpr):
    """``out = x @ y`` (64 x 64 each) through ``kernels._dot32``."""
    r = tl.arange(0, 64)
    a = tl.load(x + r[:, None] * 64 + r[None, :])
    b = tl.load(y + r[:, None] * 64 + r[None, :])
    tl.store(out + r[:, None] * 64 + r[None, :], _dot32(a, b, PREC, EXACT))


def case_tf32_passes():
    """``kernels._dot32``'s passes against float64 products of 64 x 64 x 64: three tf32 passes
    near fp32; two where one operand holds 16-bit values (``EXACT`` "x" or "y"), one where both
    do ("xy"), as close, since those operands have no remainder after rounding to tf32; and
    one pass of fp32 operands (``"tf32"``) far from it, or the emulation of tf32 would be off.
    The ``*_drops_a_remainder`` entries are 0 when an ``EXACT`` claimed of an fp32 operand
    loses its remainder (errors near tf32's), so the flags change what is multiplied."""
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(64, 64, generator=gen)                 # fp32 values, beyond tf32
    short = torch.randn(64, 64, generator=gen).half().float()  # 16-bit values, within tf32

    def err(x, y, prec, exact):
        out = torch.empty(64, 64)
        _product[(1,)](x, y, out, PREC=prec, EXACT=exact)
        return rel_err(out, x.double() @ y.double())
    one_pass = err(wide, wide, "tf32", "")
    return {"three_passes": err(wide, wide, "tf32x3", ""),
            "x_exact": err(short, wide, "tf32x3", "x"),
            "y_exact": err(wide, short, "tf32x3", "y"),
            "both_exact": err(short, short, "tf32x3", "xy"),
            "one_pass_is_tf32": float(not 1e-4 < one_pass < 1e-2),
            "x_exact_drops_a_remainder": float(err(wide, short, "tf32x3", "x") < 1e-4),
            "both_exact_drops_a_remainder": float(err(wide, wide, "tf32x3", "xy") < 1e-4)}


def _in_pieces(tokens: int, *args, **kwargs) -> dict[str, float]:
    """``check_op`` with calls cut into pieces of ``tokens`` (``host.PIECE_TOKENS``: what a call
    too large for the GPU's memory gets), counting the kernel passes."""
    host = _host()
    passes = {"forward": 0, "backward": 0}
    originals = host._run_forward, host._run_backward

    def counted(name, fn):
        def run(*a):
            passes[name] += 1
            return fn(*a)
        return run
    host._run_forward = counted("forward", originals[0])
    host._run_backward = counted("backward", originals[1])
    host.PIECE_TOKENS = tokens
    try:
        errors = check_op(*args, **kwargs)
    finally:
        host.PIECE_TOKENS = None
        host._run_forward, host._run_backward = originals
    errors["one_pass"] = float(min(passes.values()) < 3)
    return errors


def case_fp32_pieces_packed_state():
    """Packed sequences (one empty) with initial states in pieces of 16 tokens: sequences cut
    across pieces carry their state, and the gradient of it back."""
    return _in_pieces(16, 1, 60, 2, 1, 16, 8, torch.float32, cu=[0, 20, 20, 53, 60])


def case_fp16_pieces_batch_no_state():
    """A batch of two odd-length sequences, no initial or final states, in pieces of 16
    tokens: the gradients carried back across the cuts are the only ones of states."""
    return _in_pieces(16, 2, 37, 4, 2, 16, 8, torch.float16, with_state=False, final=False)


def case_public_api_autograd():
    """``power_retention`` dispatches to the kernels (counted) and matches the reference through
    autograd, initial and final state included."""
    host = _host()
    calls = {"forward": 0, "backward": 0}
    from power_retention.ops import triton as triton_ops
    for name in calls:
        original = getattr(triton_ops, name)

        def counted(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)
        setattr(triton_ops, name, counted)
    assert host.supported(torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1, 8), 2)
    q, k, v, g = make_inputs(1, 29, 2, 1, 16, 8, dtype=torch.float32, requires_grad=True)
    st = make_state(1, 1, 16, 8, seed=3)
    S0 = st.S.float().requires_grad_()
    z0 = st.z.float().requires_grad_()
    o, final = power_retention(q, k, v, g, initial_state=RetentionState(S0, z0),
                               output_final_state=True)
    (o.square().sum() + final.S.sum() + final.z.square().sum()).backward()
    leaves = [q, k, v, g, S0, z0]
    ref = [x.detach().double().requires_grad_() for x in leaves]
    ro, rfinal = attention_reference(*ref[:4], initial_state=RetentionState(ref[4], ref[5]))
    (ro.square().sum() + rfinal.S.sum() + rfinal.z.square().sum()).backward()
    errors = {"o": rel_err(o, ro), "S": rel_err(final.S, rfinal.S)}
    for name, x, r in zip(["dq", "dk", "dv", "dlog_gate", "dS0", "dz0"], leaves, ref):
        errors[name] = rel_err(x.grad, r.grad)
    # without output_final_state (the forward keeps no final state, its gradient is zero)
    for x in leaves + ref:
        x.grad = None
    power_retention(q, k, v, g, initial_state=RetentionState(S0, z0)).square().sum().backward()
    attention_reference(*ref[:4], initial_state=RetentionState(ref[4], ref[5]))[0].square(
        ).sum().backward()
    for name, x, r in zip(["dq", "dk", "dv", "dlog_gate", "dS0", "dz0"], leaves, ref):
        errors[name + "_no_final"] = rel_err(x.grad, r.grad)
    errors["triton_calls_missing"] = float(calls["forward"] != 2 or calls["backward"] != 2)
    return errors


def case_decode():
    """Token-by-token decoding through ``power_retention_decode`` (the decode kernel, and the
    scan folding the buffer every ``chunk_size`` tokens) equals the whole-sequence reference."""
    _host()
    from power_retention import power_retention_decode
    q, k, v, g = make_inputs(2, 21, 4, 2, 16, 8, dtype=torch.float32, seed=5)
    state = RetentionState.zeros(2, 2, 16, 8)
    buffer = None
    outs = []
    for i in range(q.shape[1]):
        o, state, buffer = power_retention_decode(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1],
                                                  g[:, i:i + 1], state, buffer, chunk_size=8)
        outs.append(o)
    ro, _ = attention_reference(q.double(), k.double(), v.double(), g.double())
    return {"o": rel_err(torch.cat(outs, 1), ro), "buffer_len": float(buffer.k.shape[1] != 5)}


def case_decode_strong_gates():
    """``case_decode`` with the strong gates of ``_strong_gates``: the buffer's decays are
    differences of large log-gate sums, taken in float64."""
    _host()
    from power_retention import power_retention_decode
    q, k, v, g = _strong_gates(1, 30, 2, 1, 16, 8)
    state, buffer, outs = RetentionState.zeros(1, 1, 16, 8), None, []
    for i in range(q.shape[1]):
        o, state, buffer = power_retention_decode(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1],
                                                  g[:, i:i + 1], state, buffer, chunk_size=16)
        outs.append(o)
    ro, _ = attention_reference(q.double(), k.double(), v.double(), g.double())
    return {"o": rel_err(torch.cat(outs, 1), ro)}


def case_decode_ungated_with_buffer():
    _host()
    from power_retention import power_retention_decode
    q, k, v, _ = make_inputs(1, 6, 2, 1, 32, 8, dtype=torch.float32, seed=6)
    st = make_state(1, 1, 32, 8, seed=7)
    state = RetentionState(st.S.float(), st.z.float())
    buffer = DecodeBuffer(k[:, :5], v[:, :5], torch.zeros(1, 5, 1))
    o, _, buffer = power_retention_decode(q[:, 5:], k[:, 5:], v[:, 5:], None, state, buffer,
                                          chunk_size=64)
    ro, _ = attention_reference(q.double(), k.double(), v.double(),
                                initial_state=RetentionState(st.S, st.z))
    return {"o": rel_err(o, ro[:, 5:])}


def _decode_into(B, T, Hq, Hk, d, e, dtype, capacity, seed, read_copy=False,
                 deg=2) -> dict[str, float]:
    """Token-by-token decoding into preallocated slots against the float64 reference."""
    _host()
    q, k, v, g = make_inputs(B, T, Hq, Hk, d, e, dtype=dtype, seed=seed)
    st = make_state(B, Hk, d, e, deg, seed=seed + 1)
    state = RetentionState(st.S.float(), st.z.float())
    o, _, slots, held = decode_with_slots(q, k, v, g, state, capacity=capacity,
                                          read_copy=read_copy, deg=deg)
    ro, _ = attention_reference(q.double(), k.double(), v.double(), g.double(), deg=deg,
                                initial_state=RetentionState(st.S, st.z))
    return {"o": rel_err(o, ro), "slots_differ": float(not torch.equal(slots.k[:, :held],
                                                                       k[:, -held:]))}


def case_decode_into_gqa():
    """Decoding into preallocated slots (the model's cache): the kernel writes each token into
    its slot and reads the buffer there; folds every ``capacity`` tokens."""
    return _decode_into(3, 19, 6, 2, 32, 12, torch.float16, capacity=8, seed=8)


def case_decode_into_bf16_copy():
    """bf16 inputs reading a bf16 copy of the state (a bf16 model's cache): the state product
    takes bf16 operands."""
    return _decode_into(2, 13, 4, 2, 16, 8, torch.bfloat16, capacity=4, seed=12, read_copy=True)


def case_deg4_decode_into_fold():
    """Degree 4 decoding into slots (the decode kernel's rows from the index table, split over
    programs) and folding the full buffer in place (the scan), GQA, bfloat16 (decoding from
    the float32 state in three tf32 passes)."""
    return _decode_into(2, 11, 4, 2, 16, 8, torch.bfloat16, capacity=4, seed=13, deg=4)


def case_decode_into_wide_values():
    """e > 64: blocks of 32 state rows, four programs per sequence x KV head, each streaming
    every fourth of the 17 blocks (the last block and the last program's fifth masked)."""
    return _decode_into(1, 11, 2, 1, 32, 72, torch.float32, capacity=4, seed=10)


def _fold(B, L, Hk, d, e, dtype, gated, in_place, seed) -> dict[str, float]:
    """``power_retention_fold`` on the scan kernel against the float64 final state."""
    _host()
    from power_retention import power_retention_fold
    _, k, v, g = make_inputs(B, L, Hk, Hk, d, e, dtype=dtype, gated=gated, seed=seed)
    g = torch.zeros(B, L, Hk) if g is None else g
    st = make_state(B, Hk, d, e, seed=seed + 1)
    state = RetentionState(st.S.float(), st.z.float())
    kept = RetentionState(state.S.clone(), state.z.clone())
    _, ref = attention_reference(k.double(), k.double(), v.double(), g.double(), initial_state=st)
    folded = power_retention_fold(state, DecodeBuffer(k, v, g), out=state if in_place else None)
    errors = {"S": rel_err(folded.S, ref.S), "z": rel_err(folded.z, ref.z)}
    if in_place:
        errors["not_in_place"] = float(folded.S.data_ptr() != state.S.data_ptr())
    else:
        errors["input_changed"] = float(not torch.equal(state.S, kept.S))
    return errors


def case_fold_in_place_wide_values():
    """In place (``out=state``, as the model's cache under CUDA graphs): two blocks of value
    columns (e = 72) and two chunks of 64 (70 tokens)."""
    return _fold(2, 70, 2, 16, 72, torch.float32, True, in_place=True, seed=11)


def case_fold_fp16_ungated():
    """Into new tensors, float16, zero log gates, one masked chunk of 32 (21 tokens)."""
    return _fold(1, 21, 2, 32, 8, torch.float16, False, in_place=False, seed=12)


def case_fused_generation_ops():
    """``model.fused`` (one launch each, taken when no gradient is recorded) against the
    PyTorch path of the same step, float32 and float16: the norm with and without the residual
    add, silu * up, the log-gates, RoPE of q and k (GQA 6/2 heads); with autograd the model's
    functions take the PyTorch path."""
    _host()
    import torch.nn.functional as F

    from power_retention.model import fused
    from power_retention.model.rope import apply_rope, apply_rope_qk
    gen = torch.Generator().manual_seed(11)
    errors = {}
    for dtype, tag in [(torch.float32, ""), (torch.float16, "_fp16")]:
        def randn(*shape, dtype=dtype):
            return torch.randn(*shape, generator=gen).to(dtype)
        x, res, w = randn(2, 3, 40), randn(2, 3, 40), randn(40)
        normed, total = fused.rms_norm(x, w, 1e-6, res)
        ref_total = (x.double() + res.double()).to(dtype).double()
        errors["norm_total" + tag] = rel_err(total, ref_total)
        errors["norm" + tag] = rel_err(normed, w.double() * F.rms_norm(ref_total, (40,), eps=1e-6))
        errors["norm_alone" + tag] = rel_err(fused.rms_norm(x, w, 1e-6),
                                             w.double() * F.rms_norm(x.double(), (40,), eps=1e-6))
        gate, up = randn(3, 1100), randn(3, 1100)          # two blocks, the second cut short
        errors["silu_mul" + tag] = rel_err(fused.silu_mul(gate, up),
                                           F.silu(gate.double()) * up.double())
        logits = randn(2, 7, 3) * 10
        log_gate = fused.log_sigmoid(logits)
        errors["log_sigmoid" + tag] = rel_err(log_gate, F.logsigmoid(logits.double()))
        errors["log_sigmoid_is_fp32" + tag] = float(log_gate.dtype != torch.float32)
        q, k = randn(2, 5, 6, 32), randn(2, 5, 2, 32)
        angles = torch.randn(2, 5, 16, generator=gen).repeat(1, 1, 2)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        with torch.no_grad():
            rq, rk = apply_rope_qk(q, k, cos, sin)
        eq, ek = (apply_rope(t.double(), cos.double(), sin.double()) for t in (q, k))
        errors["rope_q" + tag], errors["rope_k" + tag] = rel_err(rq, eq), rel_err(rk, ek)
        errors["rope_dtype_kept" + tag] = float(rq.dtype != dtype or rk.dtype != dtype)
    q.requires_grad_()
    rq, _ = apply_rope_qk(q, k, cos, sin)
    errors["autograd_takes_pytorch"] = float(rq.grad_fn is None or fused.fusable(q))
    return errors


def case_fused_projections():
    """``fused.project_qkv``, ``fused.gate_up_silu`` and ``fused.linear`` (a decode step's
    products in one launch each) against PyTorch's linears, RoPE, log-sigmoid, silu * up and
    residual add in float64: float32 and float16, with and without biases, one row and several
    (GQA 4/2, head size 64: one block of 32 column pairs per head, or two of 16 past 16 rows),
    each tile's K (1,600: 13 blocks) in one program or split over three."""
    _host()
    import torch.nn.functional as F
    from torch import nn

    from power_retention.model import fused
    from power_retention.model.rope import apply_rope
    gen = torch.Generator().manual_seed(12)
    K, Hq, Hk, d, N = 1600, 4, 2, 64, 40

    def linear(n_in, n_out, bias, dtype):
        lin = nn.Linear(n_in, n_out, bias=bias)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n_out, n_in, generator=gen) / n_in ** 0.5)
            if bias:
                lin.bias.copy_(torch.randn(n_out, generator=gen))
        return lin.to(dtype)

    def ref(lin, x):
        return F.linear(x.double(), lin.weight.double(),
                        None if lin.bias is None else lin.bias.double())
    errors = {}
    for dtype, bias, (B, T), splits in [(torch.float32, True, (3, 1), 1),
                                        (torch.float32, False, (3, 7), 3),
                                        (torch.float16, True, (1, 1), 3)]:
        tag = f"_{str(dtype)[6:]}_bias{int(bias)}_{B}x{T}_split{splits}"
        q_proj, k_proj, v_proj = (linear(K, n, bias, dtype) for n in (Hq * d, Hk * d, Hk * d))
        g_proj = linear(K, Hk, True, dtype)
        gate_proj, up_proj = linear(K, N, bias, dtype), linear(K, N, bias, dtype)
        down_proj = linear(N, K, bias, dtype)
        x = torch.randn(B, T, K, generator=gen).to(dtype)
        angles = torch.randn(B, T, d // 2, generator=gen).repeat(1, 1, 2)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        with torch.no_grad():
            takes = fused.linears_fusable(x, q_proj, k_proj, v_proj) and fused.qkv_supported(
                q_proj, Hq, cos, x)
            q, k, v, g = fused.project_qkv(x, q_proj, k_proj, v_proj, g_proj, cos, sin, Hq, Hk,
                                           splits=splits)
            mlp = fused.gate_up_silu(x, gate_proj, up_proj, splits=splits)
            back = fused.linear(x, q_proj, splits=splits)
            added = fused.linear(mlp, down_proj, residual=x, splits=1)
        errors["taken" + tag] = float(not takes)
        c64, s64 = cos.double(), sin.double()
        errors["q" + tag] = rel_err(q, apply_rope(ref(q_proj, x).view(B, T, Hq, d), c64, s64))
        errors["k" + tag] = rel_err(k, apply_rope(ref(k_proj, x).view(B, T, Hk, d), c64, s64))
        errors["v" + tag] = rel_err(v, ref(v_proj, x).view(B, T, Hk, d))
        errors["log_gate" + tag] = rel_err(g, F.logsigmoid(ref(g_proj, x)))
        errors["gate_up_silu" + tag] = rel_err(mlp, F.silu(ref(gate_proj, x)) * ref(up_proj, x))
        errors["linear" + tag] = rel_err(back, ref(q_proj, x))
        errors["linear_residual" + tag] = rel_err(added, x.double() + ref(down_proj, mlp))
        errors["dtypes" + tag] = float(q.dtype != dtype or v.dtype != dtype
                                       or g.dtype != torch.float32 or mlp.dtype != dtype
                                       or added.dtype != dtype)
    with torch.no_grad():       # the split-K counters are all back at 0 after the launches
        errors["counters_reset"] = float(fused._SCRATCH[x.device][1].abs().sum())
        too_many = torch.zeros(fused.MAX_ROWS + 1, 1, K, dtype=torch.float32)
        errors["prefill_keeps_cublas"] = float(fused.linears_fusable(too_many, q_proj.float()))
    return errors


def case_model_generation_fused():
    """A small power retention model generating in float32 (prefill, then decode steps through
    the cache) with the one-launch kernels (interpreted here; head size 32 and q/k/v biases, so
    the projections take theirs too) against the same steps with
    ``POWER_RETENTION_IMPL=torch``: logits of every step."""
    _host()
    from power_retention.model import PowerRetentionConfig, PowerRetentionForCausalLM
    torch.manual_seed(0)
    config = PowerRetentionConfig(vocab_size=61, hidden_size=64, intermediate_size=48,
                                  num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=1, attention_bias=True, pad_token_id=0,
                                  bos_token_id=None, eos_token_id=None)
    model = PowerRetentionForCausalLM(config).eval()
    prompt = torch.randint(0, 61, (2, 9))

    def logits_of_steps():
        with torch.no_grad():
            out = model(prompt, use_cache=True)
            steps, cache = [out.logits[:, -1]], out.past_key_values
            for _ in range(3):
                token = steps[-1].argmax(-1, keepdim=True)
                out = model(token, past_key_values=cache, use_cache=True)
                steps.append(out.logits[:, -1])
                cache = out.past_key_values
        return torch.stack(steps)
    fast = logits_of_steps()
    os.environ["POWER_RETENTION_IMPL"] = "torch"
    try:
        reference = logits_of_steps()
    finally:
        del os.environ["POWER_RETENTION_IMPL"]
    return {"logits": rel_err(fast, reference.double())}


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:          # a case per line of stdin, a result line for each
        for line in sys.stdin:
            name = line.strip()
            print("RESULT " + json.dumps({name: globals()["case_" + name]()}), flush=True)
    else:
        print(json.dumps({name: globals()["case_" + name]() for name in sys.argv[1:]}))
