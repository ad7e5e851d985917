"""Input validation shared by every entry point: each bad input is named before any compute."""

from __future__ import annotations

import torch

from .state import DecodeBuffer, RetentionState, sympow_dim

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tensor(name: str, x, dims: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(x.shape)}")
    return x


def _shape(name: str, x: torch.Tensor, expected: tuple[int, ...], layout: str) -> None:
    if tuple(x.shape) != expected:
        raise ValueError(f"{name} must have shape {layout} = {expected}, got {tuple(x.shape)}")


def _same_device(name: str, x: torch.Tensor, q: torch.Tensor) -> None:
    if x.device != q.device:
        raise ValueError(f"{name} must be on the device of q ({q.device}), got {x.device}")


def _values_checkable() -> bool:
    # Value checks read tensors back to the host; a compiled graph or a CUDA graph being
    # captured cannot, so they skip them.
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def check_deg(deg) -> int:
    if isinstance(deg, bool) or not isinstance(deg, int):
        raise TypeError(f"deg must be an even int >= 2, got {type(deg).__name__} {deg!r}")
    if deg < 2 or deg % 2:
        raise ValueError(f"deg must be an even int >= 2 (weights (q.k)**deg stay >= 0), got {deg}")
    return deg


def check_scale(scale, d: int) -> float:
    if scale is None:
        return d ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not (0 < scale < float("inf")):
        raise ValueError(f"scale must be a finite positive number, got {scale}")
    return float(scale)


def check_state(name: str, state, n: int, hk: int, D: int, e: int, q: torch.Tensor,
                read_copy: bool = False) -> None:
    """``state`` must be a RetentionState of ``n`` sequences in float32 (float64 for float64
    inputs); with ``read_copy``, ``S`` may also be a bfloat16 copy for bfloat16 inputs."""
    if not isinstance(state, RetentionState):
        raise TypeError(f"{name} must be a RetentionState(S, z), got {type(state).__name__}")
    want = torch.float64 if q.dtype == torch.float64 else torch.float32
    for part, x, shape, layout in (("S", state.S, (n, hk, D, e), "[N, Hk, D, e]"),
                                   ("z", state.z, (n, hk, D), "[N, Hk, D]")):
        _tensor(f"{name}.{part}", x, len(shape))
        _shape(f"{name}.{part}", x, shape, layout)
        allowed = [want]
        if read_copy and part == "S" and q.dtype == torch.bfloat16:
            allowed.append(torch.bfloat16)
        if x.dtype not in allowed:
            raise TypeError(f"{name}.{part} must be {' or '.join(map(str, allowed))} for "
                            f"{q.dtype} inputs, got {x.dtype}")
        _same_device(f"{name}.{part}", x, q)


def check_log_gate(log_gate, shape: tuple[int, ...], q: torch.Tensor) -> None:
    _tensor("log_gate", log_gate, 3)
    _shape("log_gate", log_gate, shape, "[B, T, Hk]")
    if log_gate.dtype not in (torch.float32, torch.float64):
        raise TypeError("log_gate must be float32 (log-space gates lose their cumulative sum in "
                        f"half precision), got {log_gate.dtype}")
    _same_device("log_gate", log_gate, q)
    # one read-back (it waits for the GPU's queue), the reason worked out only on failure
    if _values_checkable() and log_gate.numel() and not bool(
            (torch.isfinite(log_gate) & (log_gate <= 0)).all()):
        if not bool(torch.isfinite(log_gate).all()):
            raise ValueError("log_gate must be finite, got NaN or Inf values")
        raise ValueError(f"log_gate must be <= 0 (log of a gate in (0, 1]), got a maximum of "
                         f"{log_gate.max().item():.4g}")


def check_cu_seqlens(cu_seqlens, B: int, T: int) -> None:
    _tensor("cu_seqlens", cu_seqlens, 1)
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if B != 1:
        raise ValueError(f"cu_seqlens needs packed input with batch size B == 1, got B={B}")
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must hold the offsets [0, ..., T], got an empty tensor")
    if _values_checkable():
        first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
        if first != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {first}")
        if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError(f"cu_seqlens must be non-decreasing, got {cu_seqlens.tolist()}")
        if last != T:
            raise ValueError(f"cu_seqlens must end at the sequence length T={T}, got {last}")


def check_inputs(q, k, v, log_gate, deg, scale, chunk_size, initial_state, cu_seqlens):
    """Validate the arguments of ``power_retention``; returns ``(deg, scale)`` normalised."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _tensor(name, x, 4)
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}")
        _same_device(name, x, q)
    B, T, Hq, d = q.shape
    Hk = k.shape[2]
    _shape("k", k, (B, T, Hk, d), "[B, T, Hk, d] (B, T, d as q)")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must have shape [B, T, Hk, e] = {tuple(k.shape[:3])} + (e,), got "
                         f"{tuple(v.shape)}")
    if Hk == 0 or Hq % Hk:
        raise ValueError(f"the heads of q (Hq={Hq}) must be a multiple of those of k and v "
                         f"(Hk={Hk})")
    if d == 0 or v.shape[-1] == 0:
        raise ValueError(f"head sizes must be >= 1, got d={d}, e={v.shape[-1]}")
    deg = check_deg(deg)
    scale = check_scale(scale, d)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if log_gate is not None:
        check_log_gate(log_gate, (B, T, Hk), q)
    n = B
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, T)
        n = cu_seqlens.numel() - 1
    if initial_state is not None:
        check_state("initial_state", initial_state, n, Hk, sympow_dim(d, deg), v.shape[-1], q)
    return deg, scale


def check_decode_inputs(q, k, v, log_gate, state, buffer, deg, scale, chunk_size):
    """Validate the arguments of ``power_retention_decode``; returns ``(deg, scale)``."""
    deg, scale = check_inputs(q, k, v, log_gate, deg, scale, chunk_size, None, None)
    if chunk_size is None:
        raise ValueError("chunk_size must be given when decoding (the buffer folds at that size)")
    B, _, Hk, d = k.shape
    check_state("state", state, B, Hk, sympow_dim(d, deg), v.shape[-1], q)
    if buffer is not None:
        _check_buffer(buffer, q, k, v, "L")
    return deg, scale


def check_decode_into_inputs(q, k, v, log_gate, state, buffer, held, deg, scale):
    """Validate the arguments of ``power_retention_decode_into``; returns ``(deg, scale)``."""
    deg, scale = check_inputs(q, k, v, log_gate, deg, scale, None, None, None)
    B, n, Hk, d = k.shape
    check_state("state", state, B, Hk, sympow_dim(d, deg), v.shape[-1], q, read_copy=True)
    capacity = _check_buffer(buffer, q, k, v, "capacity")
    for name, x, like in (("k", buffer.k, k), ("v", buffer.v, v)):
        if x.dtype != like.dtype:
            raise TypeError(f"buffer.{name} must have the dtype of {name} ({like.dtype}), got "
                            f"{x.dtype}")
    for name, x in zip(("k", "v", "log_gate"), buffer):
        if not x.is_contiguous():
            raise ValueError(f"buffer.{name} must be contiguous (a preallocated buffer of "
                             f"capacity {capacity}, not a slice of one)")
    if isinstance(held, bool) or not isinstance(held, int):
        raise TypeError(f"held must be an int (tokens already in the buffer), got "
                        f"{type(held).__name__}")
    if not 0 <= held <= capacity - n:
        raise ValueError(f"held + new tokens must fit the buffer: held = {held}, {n} new, "
                         f"capacity {capacity} (fold the buffer with power_retention_fold "
                         f"when it is full)")
    return deg, scale


def check_fold_inputs(state, buffer, deg, out) -> int:
    """Validate the arguments of ``power_retention_fold``; returns ``deg``."""
    if not isinstance(buffer, DecodeBuffer):
        raise TypeError(f"buffer must be a DecodeBuffer(k, v, log_gate), got "
                        f"{type(buffer).__name__}")
    k, v = buffer.k, buffer.v
    for name, x in (("k", k), ("v", v)):
        _tensor(f"buffer.{name}", x, 4)
    deg, _ = check_inputs(k, k, v, None, deg, None, None, None, None)
    B, _, Hk, d = k.shape
    _check_buffer(buffer, k, k, v, "L")
    for name in ("state", "out"):
        x = state if name == "state" else out
        if x is not None:
            check_state(name, x, B, Hk, sympow_dim(d, deg), v.shape[-1], k)
    return deg


def _check_buffer(buffer, q, k, v, length: str) -> int:
    """Check ``buffer`` holds ``[B, L, Hk, d]``, ``[B, L, Hk, e]``, ``[B, L, Hk]`` float tensors
    (``L`` named ``length`` in messages); returns ``L``."""
    if not isinstance(buffer, DecodeBuffer):
        raise TypeError(f"buffer must be a DecodeBuffer(k, v, log_gate), got "
                        f"{type(buffer).__name__}")
    B, _, Hk, d = k.shape
    e = v.shape[-1]
    L = buffer.k.shape[1] if isinstance(buffer.k, torch.Tensor) and buffer.k.dim() == 4 else -1
    for name, x, shape, layout in (("k", buffer.k, (B, L, Hk, d), f"[B, {length}, Hk, d]"),
                                   ("v", buffer.v, (B, L, Hk, e), f"[B, {length}, Hk, e]"),
                                   ("log_gate", buffer.log_gate, (B, L, Hk),
                                    f"[B, {length}, Hk]")):
        _tensor(f"buffer.{name}", x, len(shape))
        _shape(f"buffer.{name}", x, shape, layout)
        _same_device(f"buffer.{name}", x, q)
    if not buffer.log_gate.is_floating_point():
        raise TypeError(f"buffer.log_gate must be float32 (float64 for float64 inputs), got "
                        f"{buffer.log_gate.dtype}")
    return L
