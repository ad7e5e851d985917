"""The public op: argument checks, the ``torch.library`` custom op and its autograd."""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import check_decode_inputs, check_decode_into_inputs, check_fold_inputs, check_inputs
from .chunk import chunk_forward, chunk_forward_varlen, compute_dtype, default_chunk_size
from .decode import decode_attend, decode_step, fold, gate_zeros
from .state import DecodeBuffer, RetentionState, sympow_dim

try:                                        # the Triton kernels (CUDA: see supported)
    from . import triton as _triton_ops
except ImportError:                         # no Triton installed: the PyTorch path only
    _triton_ops = None


def _use_triton(q: Tensor, v: Tensor, deg: int) -> bool:
    """The Triton path runs for CUDA inputs it supports unless ``POWER_RETENTION_IMPL=torch``."""
    return _triton_ops is not None and _triton_ops.supported(q, v, deg)


def _run(q, k, v, log_gate, S0, z0, cu_seqlens, deg, scale, chunk_size):
    if chunk_size == 0:                     # 0: the op picks (the PyTorch path a fixed rule)
        chunk_size = default_chunk_size(q.shape[1])
    init = None if S0 is None else RetentionState(S0, z0)
    if cu_seqlens is None:
        return chunk_forward(q, k, v, log_gate, init, deg=deg, scale=scale, chunk_size=chunk_size)
    return chunk_forward_varlen(q, k, v, log_gate, init, cu_seqlens, deg=deg, scale=scale,
                                chunk_size=chunk_size)


@torch.library.custom_op("power_retention::forward", mutates_args=())
def _forward(q: Tensor, k: Tensor, v: Tensor, log_gate: Tensor | None, S0: Tensor | None,
             z0: Tensor | None, cu_seqlens: Tensor | None, deg: int, scale: float,
             chunk_size: int, final_state: bool
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(o, S, z, den, o_low)``: output, final state (no sequences in it without
    ``final_state``: a packed call need not hold a state per sequence), the denominators ``[B,
    T, Hq]`` and what rounding ``o`` to its dtype left out (``[B, T, Hq, _low_width]``, mostly
    0 columns), which the Triton backward reuses with ``o`` instead of recomputing the
    outputs."""
    if _use_triton(q, v, deg):
        return _triton_ops.forward(q, k, v, log_gate, S0, z0, cu_seqlens, scale,
                                   chunk_size or None, final_state, deg)
    o, final, den = _run(q, k, v, log_gate, S0, z0, cu_seqlens, deg, scale, chunk_size)
    kept = slice(None) if final_state else slice(0)
    # custom-op outputs may not alias inputs (an empty sequence returns its initial state)
    return o, final.S[kept].clone(), final.z[kept].clone(), den, o.new_empty(*o.shape[:3], 0)


def _low_width(q: Tensor, v: Tensor, deg: int) -> int:
    return _triton_ops.low_width(q.dtype, v.shape[-1]) if _use_triton(q, v, deg) else 0


@_forward.register_fake
def _(q, k, v, log_gate, S0, z0, cu_seqlens, deg, scale, chunk_size, final_state):
    B, T, Hq, d = q.shape
    Hk, e = k.shape[2], v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    N = N if final_state else 0
    D, dt = sympow_dim(d, deg), compute_dtype(q.dtype)
    return (q.new_empty(B, T, Hq, e), q.new_empty(N, Hk, D, e, dtype=dt),
            q.new_empty(N, Hk, D, dtype=dt), q.new_empty(B, T, Hq, dtype=dt),
            q.new_empty(B, T, Hq, _low_width(q, v, deg)))


@torch.library.custom_op("power_retention::backward", mutates_args=())
def _backward(grad_o: Tensor, grad_S: Tensor, grad_z: Tensor, q: Tensor, k: Tensor, v: Tensor,
              log_gate: Tensor | None, S0: Tensor | None, z0: Tensor | None,
              cu_seqlens: Tensor | None, o: Tensor, den: Tensor, o_low: Tensor, deg: int,
              scale: float, chunk_size: int) -> list[Tensor]:
    final_state = grad_S.shape[0] > 0          # the forward kept it (else its gradient is 0)
    if _use_triton(q, v, deg):
        grads = _triton_ops.backward(grad_o, grad_S if final_state else None,
                                     grad_z if final_state else None, q, k, v, log_gate, S0,
                                     z0, cu_seqlens, o, den, o_low, scale, chunk_size or None,
                                     deg)
        return [g.contiguous() for g in grads if g is not None]   # as the fake promises
    # Recompute the forward and differentiate it, rather than storing its intermediates.
    # torch.func.vjp works here, where the custom op runs below the autograd dispatch key.
    inputs = [x for x in (q, k, v, log_gate, S0, z0) if x is not None]

    def forward(*xs):
        it = iter(xs)
        q_, k_, v_ = next(it), next(it), next(it)
        g_ = next(it) if log_gate is not None else None
        S_ = next(it) if S0 is not None else None
        z_ = next(it) if z0 is not None else None
        o_, final, _ = _run(q_, k_, v_, g_, S_, z_, cu_seqlens, deg, scale, chunk_size)
        kept = slice(None) if final_state else slice(0)
        return o_, final.S[kept], final.z[kept]

    _, vjp = torch.func.vjp(forward, *inputs)
    grads = vjp((grad_o, grad_S, grad_z))
    # custom-op outputs may not alias inputs or each other (a gradient can pass straight through)
    taken = {x.untyped_storage().data_ptr() for x in (grad_o, grad_S, grad_z, *inputs)}
    out = []
    for g in grads:
        g = g.contiguous()      # the fake implementation promises contiguous gradients
        if g.untyped_storage().data_ptr() in taken:
            g = g.clone()
        taken.add(g.untyped_storage().data_ptr())
        out.append(g)
    return out


@_backward.register_fake
def _(grad_o, grad_S, grad_z, q, k, v, log_gate, S0, z0, cu_seqlens, o, den, o_low, deg, scale,
      chunk_size):
    return [x.new_empty(x.shape) for x in (q, k, v, log_gate, S0, z0) if x is not None]


def _setup_context(ctx, inputs, output):
    # o, den and o_low: the Triton backward reuses them (the PyTorch one recomputes everything)
    ctx.save_for_backward(*inputs[:7], output[0], output[3], output[4])
    ctx.params = inputs[7:10]                   # deg, scale, chunk_size


def _autograd_backward(ctx, grad_o, grad_S, grad_z, grad_den, grad_o_low):
    q, k, v, log_gate, S0, z0, cu_seqlens, o, den, o_low = ctx.saved_tensors
    grads = iter(_backward(grad_o.contiguous(), grad_S.contiguous(), grad_z.contiguous(), q, k, v,
                           log_gate, S0, z0, cu_seqlens, o, den, o_low, *ctx.params))
    dq, dk, dv = next(grads), next(grads), next(grads)
    dg = next(grads) if log_gate is not None else None
    dS = next(grads) if S0 is not None else None
    dz = next(grads) if z0 is not None else None
    return dq, dk, dv, dg, dS, dz, None, None, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def power_retention(q: Tensor, k: Tensor, v: Tensor, log_gate: Tensor | None = None, *,
                    deg: int = 2, scale: float | None = None, chunk_size: int | None = None,
                    initial_state: RetentionState | None = None, output_final_state: bool = False,
                    cu_seqlens: Tensor | None = None
                    ) -> Tensor | tuple[Tensor, RetentionState]:
    """Power retention: attention with weights ``(scale * q.k)**deg * exp(G_i - G_j)``.

    ``y_i = sum_{j<=i} w_ij v_j / sum_{j<=i} w_ij`` (0 where the denominator is 0), computed in
    chunks with a fixed-size recurrent state between them (see DESIGN.md).

    Args:
        q: ``[B, T, Hq, d]`` float16, bfloat16, float32 or float64.
        k: ``[B, T, Hk, d]``, dtype of ``q``; ``Hq`` must be a multiple of ``Hk`` (GQA: query
            head ``h`` reads KV head ``h // (Hq // Hk)``).
        v: ``[B, T, Hk, e]``, dtype of ``q``; ``e`` may differ from ``d``.
        log_gate: ``[B, T, Hk]`` float32 log-space gates ``<= 0`` (e.g. ``logsigmoid``), or
            None for no decay.
        deg: even degree ``>= 2``.
        scale: multiplies ``q`` before the power; default ``d ** -0.5``.
        chunk_size: tokens per chunk; changes speed only, never the result. None picks one
            (on CUDA the Triton kernels time their candidates once per shape and cache the
            choice under ``~/.cache/power_retention``); leave it None.
        initial_state: :class:`RetentionState` with ``S [N, Hk, D, e]``, ``z [N, Hk, D]``
            float32 (float64 for float64 inputs), ``N = B`` or the number of packed sequences,
            ``D = sympow_dim(d, deg)``; decayed by the gates like any earlier token.
        output_final_state: also return the state after each sequence's last token.
        cu_seqlens: ``[N + 1]`` int32/int64 offsets of packed sequences in a ``B == 1`` batch,
            as flash-attn's varlen API; each sequence is processed independently.

    Returns:
        ``o [B, T, Hq, e]`` in the dtype of ``q``; with ``output_final_state``, ``(o, state)``.

    Implementation: CUDA tensors of float16/bfloat16/float32 with ``deg == 2`` and ``d`` of 16,
    32, 64 or 128, or ``deg == 4`` and ``d`` of 16 or 32, and ``e <= 128``, run the Triton
    kernels of ``ops/triton``; everything else (and any input when the environment variable
    ``POWER_RETENTION_IMPL=torch`` is set) runs the chunked PyTorch path.
    """
    deg, scale = check_inputs(q, k, v, log_gate, deg, scale, chunk_size, initial_state,
                              cu_seqlens)
    S0, z0 = (None, None) if initial_state is None else initial_state
    o, S, z, _, _ = _forward(q, k, v, log_gate, S0, z0, cu_seqlens, deg, scale, chunk_size or 0,
                             bool(output_final_state))
    return (o, RetentionState(S, z)) if output_final_state else o


def power_retention_decode(q: Tensor, k: Tensor, v: Tensor, log_gate: Tensor | None,
                           state: RetentionState, buffer: DecodeBuffer | None = None, *,
                           deg: int = 2, scale: float | None = None, chunk_size: int = 64
                           ) -> tuple[Tensor, RetentionState, DecodeBuffer]:
    """Process ``n`` new tokens per sequence against ``state`` and the recent-token ``buffer``.

    Shapes as :func:`power_retention` with ``T = n`` (usually 1) and ``state`` of ``N = B``.
    Returns ``(o [B, n, Hq, e], state, buffer)``; once the buffer holds ``chunk_size`` tokens
    it is folded into the state, so the memory per sequence stays constant. The outputs equal
    those of :func:`power_retention` over the whole stream.
    """
    deg, scale = check_decode_inputs(q, k, v, log_gate, state, buffer, deg, scale, chunk_size)
    held = 0 if buffer is None else buffer.k.shape[1]
    # single-token steps take the Triton kernels: the decode kernel, and the scan when the
    # step fills the buffer (once every chunk_size tokens) and folds it into the state
    if q.shape[1] == 1 and _use_triton(q, v, deg):
        gate = (log_gate if log_gate is not None else gate_zeros(k)).float()
        if buffer is None:
            new = DecodeBuffer(k.contiguous(), v.contiguous(), gate.contiguous())
        else:
            new = DecodeBuffer(torch.cat([buffer.k, k], 1), torch.cat([buffer.v, v], 1),
                               torch.cat([buffer.log_gate.float(), gate], 1))
        # the kernel writes the new token into slot `held` of `new`, where it already is
        o = _triton_ops.decode_into(q, k, v, gate, state.S, state.z, *new, held, scale, deg)
        if held + 1 >= chunk_size:
            state = _fold(state, new, deg, None)
            new = DecodeBuffer(*(x[:, :0] for x in new))
        return o, state, new
    return decode_step(q, k, v, log_gate, state, buffer, deg=deg, scale=scale,
                       chunk_size=chunk_size)


def power_retention_decode_into(q: Tensor, k: Tensor, v: Tensor, log_gate: Tensor | None,
                                state: RetentionState, buffer: DecodeBuffer, held: int, *,
                                deg: int = 2, scale: float | None = None) -> Tensor:
    """Decode into a preallocated buffer, for caches that keep room for a chunk of tokens.

    ``buffer`` holds contiguous tensors of a fixed ``capacity`` (``k [B, capacity, Hk, d]``,
    ``v [B, capacity, Hk, e]``, ``log_gate [B, capacity, Hk]`` float32) whose first ``held``
    slots are in use. The ``n`` new tokens are written into slots ``held .. held + n - 1`` and
    ``o [B, n, Hq, e]`` is returned: their outputs against ``state`` and all ``held + n``
    buffered tokens. Nothing is folded and nothing is allocated but ``o``, so a CUDA graph can
    capture the step; fold the buffer into the state with :func:`power_retention_fold` when it
    is full. On a GPU a single-token step is two kernel launches.

    For bfloat16 inputs ``state.S`` may be a bfloat16 copy of the float32 state (the fold
    keeps the float32 one): a step reads half the bytes, and the state enters the outputs
    rounded as the chunked forward's output kernel reads its chunk states.
    """
    deg, scale = check_decode_into_inputs(q, k, v, log_gate, state, buffer, held, deg, scale)
    gate = (log_gate if log_gate is not None else gate_zeros(k)).to(buffer.log_gate.dtype)
    if q.shape[1] == 1 and _use_triton(q, v, deg):
        return _triton_ops.decode_into(q, k, v, gate, state.S, state.z, *buffer, held, scale,
                                       deg)
    end = held + q.shape[1]
    for slots, new in zip(buffer, (k, v, gate)):
        slots[:, held:end].copy_(new)
    return decode_attend(q, buffer.k[:, :end], buffer.v[:, :end], buffer.log_gate[:, :end],
                         state, deg=deg, scale=scale)


def power_retention_fold(state: RetentionState, buffer: DecodeBuffer, *, deg: int = 2,
                         out: RetentionState | None = None) -> RetentionState:
    """Fold the tokens of ``buffer`` into ``state``: the state after them, as
    :func:`power_retention` with ``initial_state=state, output_final_state=True`` returns it.

    ``buffer`` holds ``k [B, L, Hk, d]``, ``v [B, L, Hk, e]``, ``log_gate [B, L, Hk]`` (a full
    decoding buffer, or the slots in use of a preallocated one); ``state`` is ``[B, ...]``.
    With ``out`` (``state`` itself, say) the result is written there, allocating nothing but
    the scan's bookkeeping, so a CUDA graph can capture the step that folds. On a GPU this is
    one launch of the forward scan.
    """
    deg = check_fold_inputs(state, buffer, deg, out)
    return _fold(state, buffer, deg, out)


def _fold(state: RetentionState, buffer: DecodeBuffer, deg: int,
          out: RetentionState | None) -> RetentionState:
    k, v, log_gate = buffer
    if _use_triton(k, v, deg):
        S, z = state.S.contiguous(), state.z.contiguous()
        target = out
        if out is None or not (out.S.is_contiguous() and out.z.is_contiguous()):
            target = RetentionState(torch.empty_like(S), torch.empty_like(z))
        _triton_ops.fold(k.contiguous(), v.contiguous(), log_gate.float().contiguous(), S, z,
                         *target, deg)
    else:
        target = fold(state, k, v, log_gate, deg=deg)
    if out is not None and target.S is not out.S:
        out.S.copy_(target.S)
        out.z.copy_(target.z)
        return out
    return target
