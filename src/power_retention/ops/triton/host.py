"""Host functions that chain the Triton kernels: forward, backward (recomputing the chunk
states), and one decoding step. Inputs are flattened to packed ``[T_total, H, x]`` views (no
copy for contiguous inputs); a batch of ``B`` equal-length sequences is packed as ``B`` ranges.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import json
import logging
import os
from pathlib import Path
from typing import NamedTuple

import torch
import triton

from ..naive import _sympow_layout
from . import kernels

log = logging.getLogger(__name__)   # the chunk-size timings, at level INFO
BD, KP = 8, 16     # index blocks of 8 (tiles of 64 features), their slices padded to 16 columns
CHUNK_CANDIDATES = (64, 128)
SMALL_PROBLEM = 1 << 15      # fewer tokens per call than this take the smallest chunk untimed
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
POISON = False               # tests set it: every buffer starts as NaN, so unwritten ones show


def _empty(*shape, dtype, device) -> torch.Tensor:
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def supported(q: torch.Tensor, v: torch.Tensor, deg: int) -> bool:
    """Whether the Triton path handles these inputs (else the PyTorch path runs)."""
    if os.environ.get("POWER_RETENTION_IMPL", "").lower() == "torch":
        return False
    if not (q.is_cuda or INTERPRET):
        return False
    d, e = q.shape[-1], v.shape[-1]
    # d = 128 passed its GPU test in every dtype (H100, docs/benchmarks.md run 45): fp16 and
    # bf16 there take tf32 products and fp32 chunk states (``_bf16_products``). Degree 4 runs
    # at d <= 32 (52,360 features at d = 32, 766,480 at d = 64)
    head_sizes = {2: (16, 32, 64, 128), 4: (16, 32)}.get(deg, ())
    return q.dtype in (torch.float16, torch.bfloat16, torch.float32) and d in head_sizes \
        and 1 <= e <= 128


def low_width(dtype: torch.dtype, e: int) -> int:
    """Columns of ``o_low``, what rounding the output to a 16-bit dtype leaves out, which the
    forward keeps for the backward when ``e > 64``: the gradient of the denominators, ``-(do .
    o) / den``, sums ``e`` products with the output, and with 128 bf16-rounded outputs it
    missed its tolerance (the initial normaliser's gradient 3.1e-2 on the H200, runs 4 and 6
    of docs/benchmarks.md). 0 otherwise: ``o`` alone is exact in fp32, and precise enough in
    16 bits at ``e <= 64`` (5.4e-3 in bf16)."""
    return e if dtype in (torch.float16, torch.bfloat16) and e > 64 else 0


class _Launcher:
    """A kernel behind ``triton.autotune`` over warps and pipeline stages, the best
    configuration measured per shape bucket. Launches with fp32 state tiles (fp16 and fp32
    inputs, bf16 ones at d > 64: ``_bf16_products``) also try 8 warps without pipelining,
    their one fixed configuration until 2026-12-07 (with one stage no load of a loop is
    prefetched: ``benchmarks/kernel_resources.py``), so the tuner can only keep or beat it.
    The interpreter takes one configuration. (Capping 8 warps at 128 registers, so two
    programs share a multiprocessor, was tried on the H200 and changed no kernel's time:
    docs/benchmarks.md, run 7.)"""

    def __init__(self, fn, key, stages=(2,)):
        self.fn = fn
        configs = [triton.Config({}, num_warps=w, num_stages=st) for w in (4, 8) for st in stages]
        unpipelined = [triton.Config({}, num_warps=8, num_stages=1)]
        self.tuned = {bf16: None if INTERPRET else triton.autotune(
            configs + ([] if bf16 else unpipelined), key=key)(fn) for bf16 in (True, False)}

    def __getitem__(self, grid):
        def launch(*args, BF16, **kwargs):
            if INTERPRET:
                return self.fn[grid](*args, BF16=BF16, **kwargs)
            return self.tuned[BF16][grid](*args, BF16=BF16, **kwargs)
        return launch


_SCAN_KEYS = ["C", "BD", "NB", "e", "SEQS", "GROUPS", "REVERSE", "USE_GATE", "BF16"]
_CHUNK_KEYS = ["C", "BD", "NB", "EP", "USE_GATE", "BF16"]
# the scans also try a third stage: a deeper prefetch of the next chunks' keys and values for
# their chain of dependent steps. Each program carries 64 value columns: narrower blocks (16,
# 32: more programs for a batch-1 scan, each phi tile formed more often) were tuned against it
# up to run 20 and lost at every shape of runs 21-22
scan = _Launcher(kernels.scan_kernel, _SCAN_KEYS, stages=(2, 3))
output_fwd = _Launcher(kernels.output_fwd_kernel, _CHUNK_KEYS)
dq_bwd = _Launcher(kernels.dq_kernel, _CHUNK_KEYS)
dkv_bwd = _Launcher(kernels.dkv_kernel, _CHUNK_KEYS)


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


class _Features(NamedTuple):
    """How the kernels walk ``phi`` for a head size and degree: ``NT`` tiles of ``F = BD * BD``
    rows, ``D`` features in the exact layout of ``sympow_embed``. Degree 2 walks pairs of index
    blocks; degree 4 the exact layout itself, from the tables ``index [NT F, 4]`` (int32: each
    row's indices) and ``coefs [NT F]`` (float32; 0 on the rows that pad the last tile)."""
    deg: int
    NT: int
    D: int
    index: torch.Tensor | None
    coefs: torch.Tensor | None


@functools.cache
def _features(d: int, deg: int, device: torch.device) -> _Features:
    """Made once per device (a CUDA graph being captured could not copy the tables over)."""
    if deg == 2:
        NB = d // BD
        return _Features(2, NB * (NB + 1) // 2, d * (d + 1) // 2, None, None)
    rows, coef = _sympow_layout(d, deg)
    F = BD * BD
    NT = -(-len(rows) // F)
    index = torch.zeros(NT * F, deg, dtype=torch.int32)
    coefs = torch.zeros(NT * F, dtype=torch.float32)
    index[:len(rows)] = torch.tensor(rows, dtype=torch.int32)
    coefs[:len(rows)] = torch.tensor(coef, dtype=torch.float32)
    return _Features(deg, NT, len(rows), index.to(device), coefs.to(device))


def _bf16_products(dtype: torch.dtype, d: int, e: int, deg: int = 2) -> bool:
    """Whether the kernels take bf16 operands and keep the chunk states in bf16 (the fast
    path): bf16 inputs with ``d, e <= 64`` at degree 2. Wider bf16 inputs, and degree 4 (whose
    features are products of four rounded factors, 52,360 of them at d = 32), run as fp16 ones do
    (tf32 products, fp32 states, chunks up to 64): with bf16 products at d = e = 128 the initial
    normaliser's gradient missed its tolerance (dz0 3.0e-2 on the H100, docs/benchmarks.md run 44),
    the rounding of the feature tiles and chunk states carried into every output and through ``-(do
    . o) / den`` into dz0; fp16 inputs, the same kernels with tf32 products, passed there
    (2.4e-3)."""
    return dtype == torch.bfloat16 and d <= 64 and deg == 2


def _precision(dtype: torch.dtype, deg: int) -> str:
    """``input_precision`` of the kernels' fp32 products: exact fp32 for fp32 inputs; tf32,
    whose operands are as precise as fp16's, for 16-bit ones at degree 2; three tf32 passes
    (near fp32) at degree 4, whose state products cancel far more than one tf32 rounding allows
    (``kernels`` module docstring). With one pass fp16's dz0 missed by 3x on the H100 (runs
    46-47); with one in the backward only, dq missed by 2x under the interpreter's emulation
    (``deg4_fp16_near_orthogonal``)."""
    if dtype == torch.float32:
        return "ieee"
    return "tf32x3" if deg == 4 else "tf32"


def _flags(dtype: torch.dtype, d: int, e: int, deg: int) -> dict:
    return {"BF16": _bf16_products(dtype, d, e, deg), "PREC": _precision(dtype, deg), "DEG": deg}


def _state_dtype(dtype: torch.dtype, d: int, e: int, deg: int) -> torch.dtype:
    """The chunk states between kernels: bf16 where the products read them as bf16 anyway;
    else fp32 (fp16 states would overflow over long ungated contexts)."""
    return torch.bfloat16 if _bf16_products(dtype, d, e, deg) else torch.float32


class _Layout:
    """Sequence and chunk bookkeeping of one call: ``cu [N+1]``, ``chunk_offsets [N+1]`` (first
    chunk of each sequence) and ``chunk_indices [chunks, 2]`` (sequence, chunk within it).

    A batch of equal-length sequences is laid out from its shape alone; packed sequences need
    their chunk count read back from the GPU. That read waits for the GPU to finish its queue,
    so the host's launches stop overlapping the kernels before them: the common case avoids it.
    """

    def __init__(self, B: int, T: int, cu_seqlens: torch.Tensor | None, C: int,
                 device: torch.device):
        def arange(n):
            return torch.arange(n, dtype=torch.int64, device=device)
        if cu_seqlens is None:
            per = -(-T // C)                              # chunks per sequence
            self.N, self.n_chunks = B, B * per
            self.cu = arange(B + 1) * T
            self.chunk_offsets = arange(B + 1) * per
            chunk = arange(self.n_chunks)
            seq, within = chunk // max(per, 1), chunk % max(per, 1)
        else:
            cu = cu_seqlens.to(device=device, dtype=torch.int64)
            per_seq = (cu[1:] - cu[:-1] + C - 1) // C
            offsets = torch.zeros_like(cu)
            offsets[1:] = per_seq.cumsum(0)
            self.N, self.n_chunks = cu.numel() - 1, int(offsets[-1])
            self.cu, self.chunk_offsets = cu, offsets
            seq = torch.repeat_interleave(arange(self.N), per_seq, output_size=self.n_chunks)
            within = arange(self.n_chunks) - offsets[seq]
        self.chunk_indices = torch.stack([seq, within], 1).to(torch.int32).contiguous()


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).contiguous()


def _scan(x, y, y1, g, S_in, z_in, lay: _Layout, C: int, *, deg: int, reverse: bool,
          coef_scale: float = 1.0, groups: int = 1, st_dtype: torch.dtype,
          store_states: bool = True, store_final: bool = True, parts=None):
    """One scan across the chunks: forward (``x, y = k, v``; the chunk states and the final
    state) or reverse (``x, y, y1 = q, dy, dy_z``; the gradients of the state at every chunk's
    end and of the initial state). Returns ``states [chunks, Hk, NT, F, e]``, ``zstates`` (None
    without ``store_states``) and ``S_out [N, Hk, D, e]``, ``z_out`` (``N = 0`` without
    ``store_final``: a packed call of many sequences need not hold a state for each).
    ``parts`` (``_head_parts``) launches it as one kernel per group of KV heads, each on its
    stream; None: one launch of all heads on the current stream."""
    Hx, d, e = x.shape[1], x.shape[2], y.shape[2]
    Hk = Hx // groups
    feat = _features(d, deg, x.device)
    NT, D, F = feat.NT, feat.D, BD * BD
    S_out = _empty(lay.N if store_final else 0, Hk, D, e, dtype=torch.float32, device=x.device)
    z_out = _empty(lay.N if store_final else 0, Hk, D, dtype=torch.float32, device=x.device)
    states = zstates = None
    if store_states:
        states = _empty(lay.n_chunks, Hk, NT, F, e, dtype=st_dtype, device=x.device)
        zstates = _empty(lay.n_chunks, Hk, NT, F, dtype=torch.float32, device=x.device)
    if not lay.N:
        return states, zstates, S_out, z_out
    meta = dict(GROUPS=groups, C=C, BD=BD, KP=KP, NB=d // BD, NT=NT, REVERSE=reverse,
                USE_GATE=g is not None, HAS_INIT=S_in is not None, HAS_Y1=y1 is not None,
                STORE_STATES=store_states, STORE_FINAL=store_final, **_flags(x.dtype, d, e, deg))
    # one program per (tile, block of value columns, sequence x KV head); the tuning bucket
    # SEQS (sequences x KV heads, a power of two <= 256) separates batch-1 scans from batches
    BE = min(64, _pow2(e))
    for h0, hs, stream in parts or [(0, Hk, None)]:
        seqs = min(256, triton.next_power_of_2(lay.N * hs))
        with _on(stream):
            scan[(NT, triton.cdiv(e, BE), lay.N * hs)](
                x, y, y1, g, S_in, z_in, S_out if states is None else states,
                z_out if zstates is None else zstates, S_out, z_out, lay.cu, lay.chunk_offsets,
                feat.index, feat.coefs, coef_scale, Hx, Hk, h0, hs, d, e, D, seqs, BE=BE,
                LOOP_FOR=not INTERPRET, **meta)
    return states, zstates, S_out, z_out


def _states(q, k, v, g, S0, z0, lay: _Layout, C: int, deg: int, final_state: bool = True,
            parts=None):
    """The forward scan: chunk states ``[chunks, Hk, NT, F, e]`` (``_state_dtype``) and the
    final state."""
    st_dtype = _state_dtype(q.dtype, q.shape[-1], v.shape[-1], deg)
    return _scan(k, v, None, g, S0, z0, lay, C, deg=deg, reverse=False, st_dtype=st_dtype,
                 store_final=final_state, parts=parts)


def _outputs(q, k, v, g, states, zstates, lay: _Layout, scale: float, C: int, deg: int,
             parts=None):
    Ttot, Hq, d = q.shape
    Hk, e = k.shape[1], v.shape[2]
    groups = Hq // Hk
    o = _empty(Ttot, Hq, e, dtype=q.dtype, device=q.device)
    o_low = _empty(Ttot, Hq, low_width(q.dtype, e), dtype=q.dtype, device=q.device)
    den = _empty(Ttot, Hq, dtype=torch.float32, device=q.device)
    feat = _features(d, deg, q.device)
    if lay.n_chunks:
        for h0, hs, stream in parts or [(0, Hk, None)]:
            with _on(stream):
                output_fwd[(lay.n_chunks, hs * groups)](
                    q, k, v, g, states, zstates, o, o_low, den, lay.cu, lay.chunk_indices,
                    feat.index, feat.coefs, scale, Hq, Hk, h0 * groups, d, e, C=C, BD=BD,
                    KP=KP, NB=d // BD, NT=feat.NT, EP=_pow2(e), USE_GATE=g is not None,
                    LOW=o_low.shape[-1] > 0, **_flags(q.dtype, d, e, deg))
    return o, o_low, den


def _head_parts(x: torch.Tensor, Hk: int, programs: int):
    """How the forward launches its kernels: as ``(first KV head, heads, stream)``, two halves
    of the heads on two streams when a scan of all of them has few programs (``programs``, at
    most eight per multiprocessor: a batch-1 scan's 576 programs at 16 heads, d = 64, are 2.18
    waves of two per multiprocessor), so that the output kernel of the first half fills the
    multiprocessors that the second half's scan leaves idle in its last round; else all heads
    on the current stream (None)."""
    side = _side_stream(x.device)
    if side is None or Hk < 2 or programs > 8 * torch.cuda.get_device_properties(
            x.device).multi_processor_count:
        return None
    first = Hk - Hk // 2
    return [(0, first, None), (first, Hk - first, side)]


def _run_forward(q, k, v, g, S0, z0, cu_seqlens, scale, C, final_state=True, deg=2):
    B, T, _, d = q.shape
    Hk = k.shape[2]
    lay = _Layout(B, T, cu_seqlens, C, q.device)
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    gf = None if g is None else _flat(g)
    parts = _head_parts(q, Hk, _features(d, deg, q.device).NT * lay.N * Hk)
    streams = [stream for _, _, stream in parts or [] if stream is not None]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream(q.device))
    states, zstates, S_T, z_T = _states(qf, kf, vf, gf, S0, z0, lay, C, deg, final_state,
                                        parts)
    o, o_low, den = _outputs(qf, kf, vf, gf, states, zstates, lay, scale, C, deg, parts)
    for stream in streams:
        torch.cuda.current_stream(q.device).wait_stream(stream)
    return (o.view(B, T, *o.shape[1:]), S_T, z_T, den.view(B, T, -1),
            o_low.view(B, T, *o_low.shape[1:]))


def _largest_chunk(q: torch.Tensor, e: int, deg: int) -> int:
    """fp32 state tiles (``_state_dtype``) make kernels that pass the H200's shared memory
    (227 KiB) at 128-token chunks: the chunk is a speed setting, so it is capped here."""
    return max(CHUNK_CANDIDATES) if _bf16_products(q.dtype, q.shape[-1], e, deg) else 64


def _chunk(chunk_size, q, k, v, *args, deg: int, for_backward: bool = False,
           stateless: bool = False) -> int:
    """An explicit chunk size (a power of two from 16, capped by ``_largest_chunk``, or
    ``ATTENTION``) or a tuned one (forward and backward are tuned apart: the backward
    recomputes its own chunk states, and its kernels hold more per chunk). ``stateless``: no
    initial state and no final state kept, the calls the attention form can take."""
    if chunk_size == ATTENTION:
        if not stateless:
            raise ValueError("the attention form (chunk size 0) takes no initial state and "
                             "keeps no final state")
        return ATTENTION
    if chunk_size in (16, 32, 64, 128, 256):
        return min(chunk_size, _largest_chunk(q, v.shape[-1], deg))
    return pick_chunk_size(q, k, v, *args, for_backward=for_backward, deg=deg,
                           stateless=stateless)


def forward(q, k, v, log_gate, S0, z0, cu_seqlens, scale: float, chunk_size: int | None = None,
            final_state: bool = True, deg: int = 2):
    """``(o [B,T,Hq,e], S [N,Hk,D,e], z [N,Hk,D], den [B,T,Hq], o_low [B,T,Hq,low])``;
    arguments as ``power_retention``'s, the initial state split into ``S0, z0`` (or None).
    ``chunk_size`` None picks a tuned one, which may be ``ATTENTION`` (the attention form, for
    calls without an initial state or a final state kept). ``den`` (fp32 denominators) and ``o_low``
    (``low_width`` columns) let ``backward`` skip the outputs.
    Without ``final_state`` the final state is not kept (``N = 0``). A call whose chunk states
    would not fit the GPU runs in pieces (``_passes``)."""
    C = _chunk(chunk_size, q, k, v, log_gate, S0, z0, cu_seqlens, scale, deg=deg,
               stateless=S0 is None and not final_state)
    if C == ATTENTION:
        return _attention_forward(q, k, v, log_gate, cu_seqlens, scale, deg)
    passes = _passes(q, k, v, cu_seqlens, C, 1, deg)
    if passes is None:
        return _run_forward(q, k, v, log_gate, S0, z0, cu_seqlens, scale, C, final_state, deg)
    return _forward_in_pieces(q, k, v, log_gate, S0, z0, passes, scale, C, final_state, deg)


def backward(do, dS_T, dz_T, q, k, v, log_gate, S0, z0, cu_seqlens, o, den, o_low,
             scale: float, chunk_size: int | None = None, deg: int = 2):
    """Gradients ``dq, dk, dv, dlog_gate, dS0, dz0`` (None for absent inputs), given
    ``forward``'s ``o``, ``den`` and ``o_low`` and the final state's gradient ``dS_T, dz_T``
    (None: zero); the chunk states are recomputed rather than stored. A call whose chunk
    states (two sets: the scan and the reverse scan) would not fit the GPU runs in pieces
    (``_passes``)."""
    C = _chunk(chunk_size, q, k, v, log_gate, S0, z0, cu_seqlens, scale, deg=deg,
               for_backward=True, stateless=S0 is None and dS_T is None)
    if C == ATTENTION:
        return _attention_backward(do, q, k, v, log_gate, cu_seqlens, o, den, o_low, scale, deg)
    passes = _passes(q, k, v, cu_seqlens, C, 2, deg)
    if passes is None:
        return _run_backward(do, dS_T, dz_T, q, k, v, log_gate, S0, z0, cu_seqlens, o, den,
                             o_low, scale, C, deg)
    return _backward_in_pieces(do, dS_T, dz_T, q, k, v, log_gate, S0, z0, passes, o, den,
                               o_low, scale, C, deg)


_side_streams: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream | None:
    """A second stream of ``device`` for work that may overlap the current stream's (None for
    CPU tensors, which the interpreter runs in order, and while a CUDA graph is captured, which
    then records one stream's order)."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(device=index)
    return _side_streams[index]


def _on(stream: torch.cuda.Stream | None):
    return contextlib.nullcontext() if stream is None else torch.cuda.stream(stream)


def _run_backward(do, dS_T, dz_T, q, k, v, log_gate, S0, z0, cu_seqlens, o, den, o_low,
                  scale: float, C: int, deg: int = 2):
    B, T, Hq, d = q.shape
    Hk, e = k.shape[2], v.shape[3]
    feat = _features(d, deg, q.device)
    NB, EP = d // BD, _pow2(e)
    lay = _Layout(B, T, cu_seqlens, C, q.device)
    qf, kf, vf, dof = _flat(q), _flat(k), _flat(v), _flat(do)
    gf = None if log_gate is None else _flat(log_gate)
    flags = dict(USE_GATE=gf is not None, KP=KP, NT=feat.NT, **_flags(q.dtype, d, e, deg))
    Ttot = B * T

    # Two streams. The side one recomputes the chunk states and then runs dq_kernel, which
    # needs them and do / den; this one prepares do / den, runs the reverse scan (which needs
    # only q and do), waits, and runs dkv_kernel, which needs both scans. The two scans fill
    # each other's last round of programs (a batch-1 scan's 576 programs are 2.18 waves of two
    # per multiprocessor: three rounds each, five together) and dq_kernel the reverse scan's.
    side = _side_stream(q.device)
    main = None if side is None else torch.cuda.current_stream(q.device)
    if side is not None:
        side.wait_stream(main)
    with _on(side):
        states, zstates, _, _ = _states(qf, kf, vf, gf, S0, z0, lay, C, deg)
    o, o_low, den = _flat(o), _flat(o_low), den.reshape(Ttot, Hq)
    # do / den in the dtype the products read it in (that of the chunk states)
    dy = _empty(Ttot, Hq, e, dtype=states.dtype, device=q.device)
    dyz = _empty(Ttot, Hq, dtype=torch.float32, device=q.device)
    if Ttot:
        BT = 64
        kernels.prepare_bwd_kernel[(triton.cdiv(Ttot, BT), Hq)](
            o, o_low, dof, den, dy, dyz, Ttot, Hq, e, BT=BT, EP=EP, LOW=o_low.shape[-1] > 0,
            BF16=flags["BF16"], PREC=flags["PREC"])
    dq = _empty(*qf.shape, dtype=q.dtype, device=q.device)
    dg_q = _empty(Ttot, Hq, dtype=torch.float32, device=q.device)
    if side is not None:
        side.wait_stream(main)                       # dy and dy_z
    with _on(side):
        if lay.n_chunks:
            dq_bwd[(lay.n_chunks, Hq)](qf, kf, vf, gf, states, zstates, dy, dyz, dq, dg_q,
                                       lay.cu, lay.chunk_indices, feat.index, feat.coefs, scale,
                                       Hq, Hk, d, e, C=C, BD=BD, NB=NB, EP=EP, **flags)

    if dS_T is not None:
        dS_T, dz_T = dS_T.contiguous().float(), dz_T.contiguous().float()
    dstates, dzstates, dS0, dz0 = _scan(qf, dy, dyz, gf, dS_T, dz_T, lay, C, deg=deg,
                                        reverse=True, coef_scale=scale ** deg, groups=Hq // Hk,
                                        st_dtype=states.dtype, store_final=S0 is not None)

    if side is not None:
        main.wait_stream(side)
        for x in (states, zstates):
            x.record_stream(main)   # made on the side stream, read and freed on this one
    dk = _empty(*kf.shape, dtype=q.dtype, device=q.device)
    dv = _empty(*vf.shape, dtype=q.dtype, device=q.device)
    dg_k = _empty(Ttot, Hk, dtype=torch.float32, device=q.device)
    if lay.n_chunks:
        dkv_bwd[(lay.n_chunks, Hk)](qf, kf, vf, gf, states, zstates, dstates, dzstates, dy,
                                    dyz, dk, dv, dg_k, lay.cu, lay.chunk_indices, feat.index,
                                    feat.coefs, scale, Hq, Hk, d, e, Hq // Hk, C=C, BD=BD,
                                    NB=NB, EP=EP, **flags)

    dg = None
    if log_gate is not None:     # the two kernels' parts of it (kernels._straddle_intra)
        dg = dg_q.view(Ttot, Hk, Hq // Hk).sum(-1) + dg_k
        dg = dg.view(B, T, Hk).to(log_gate.dtype)
    shape = lambda x, ref: x.view(ref.shape)  # noqa: E731
    return (shape(dq, q), shape(dk, k), shape(dv, v), dg,
            None if S0 is None else dS0, None if z0 is None else dz0)


# ---- the attention form: no chunk states, the whole of each sequence at once ----

ATTENTION = 0                # the "chunk size" that selects it (one chunk as long as the sequence)
# The automatic choice takes it only where POWER_RETENTION_ATTENTION_FORM=1: its kernels have
# passed under the interpreter, not yet on a GPU (docs/benchmarks.md, after run 49). Until
# then only a chunk size of ATTENTION passed to ``forward`` / ``backward`` selects it.


def _attention_crossover(d: int, e: int, deg: int) -> int:
    """The length up to which the attention form takes fewer FLOPs per token and head, ``t (d +
    e)`` for causal attention, than the state's ``4 D e``: 4,160 at degree 2, d = e = 64; 16,512
    at d = e = 128; 104,720 at degree 4, d = e = 32. Small calls of sequences up to it take the
    attention form untimed; it is timed for sequences up to four times it, never beyond (its
    cost grows as t^2)."""
    return 4 * _features(d, deg, torch.device("cpu")).D * e // (d + e)


def _attention_blocks(dtype: torch.dtype, d: int, e: int) -> tuple[int, int]:
    """``(block, step)``: programs take blocks of queries (keys for dkv) and step through the
    other side. Compiled for sm_90 (``benchmarks/kernel_resources.py``, 8 warps): 64 and 32 for
    16-bit inputs at ``d, e <= 64`` (forward, dq, dk/dv: 166, 166, 196 registers, no spills;
    steps of 64 spilled up to 288 bytes per thread, blocks of 128 up to 1.6 KB); 32 and 16 for
    fp32 inputs and wider heads, whose fp32 operands spilled 0.6-6.5 KB at 64 and 32 (fp32 at
    d = 128 still spills 504 bytes in dkv). The interpreter's tests take 32 and 16, so short
    sequences still span several blocks and steps."""
    if not INTERPRET and dtype != torch.float32 and max(d, e) <= 64:
        return 64, 32
    return 32, 16


attention_fwd = _Launcher(kernels.attention_fwd_kernel, ["BM", "DK", "EP", "DEG", "USE_GATE",
                                                         "BF16"])
attention_dq = _Launcher(kernels.attention_dq_kernel, ["BM", "DK", "EP", "DEG", "USE_GATE",
                                                       "BF16"])
attention_dkv = _Launcher(kernels.attention_dkv_kernel, ["BM", "DK", "EP", "DEG", "USE_GATE",
                                                         "BF16", "GROUPS"])


def _cumulative_gates(log_gate: torch.Tensor, cu_seqlens) -> torch.Tensor:
    """``[B T, Hk]`` float64: each sequence's inclusive cumulative log-gate."""
    G = log_gate.double().cumsum(1)
    if cu_seqlens is not None:                    # B = 1: restart at every sequence's start
        cu = cu_seqlens.long()
        flat = G[0]
        before = torch.cat([flat.new_zeros(1, flat.shape[1]), flat])[cu[:-1]]
        G = flat - before.repeat_interleave(cu[1:] - cu[:-1], dim=0, output_size=flat.shape[0])
    return _flat(G.reshape(log_gate.shape))


def _suffix_sums(x: torch.Tensor, B: int, T: int, cu_seqlens) -> torch.Tensor:
    """``x [B T, H]`` summed over each position and the later ones of its sequence."""
    if cu_seqlens is None:
        return x.view(B, T, x.shape[1]).flip(1).cumsum(1).flip(1).reshape(x.shape)
    cu = cu_seqlens.long()
    total = torch.cat([x.flip(0).cumsum(0).flip(0), x.new_zeros(1, x.shape[1])])
    return total[:-1] - total[cu[1:]].repeat_interleave(cu[1:] - cu[:-1], dim=0,
                                                        output_size=x.shape[0])


def _attention_flags(dtype: torch.dtype, d: int, e: int, deg: int) -> dict:
    """``_flags`` but for the attention form, which has no chunk states: what keeps bf16
    inputs at degree 4 or at d > 64 off bf16 products (``_bf16_products``) and degree 4's
    16-bit inputs at three tf32 passes (``_precision``) is the rounding and cancellation of the
    state products. Its weights are powers of one fp32 score, so bf16 inputs take bf16
    products and fp16 ones one tf32 pass at every degree and head size (interpreter cases
    ``attention_deg4_fp16``: dq 3.7e-4 with three passes, 6.3e-4 with one;
    ``attention_deg4_bf16``)."""
    return {"BF16": dtype == torch.bfloat16, "PREC": _precision(dtype, 2), "DEG": deg}


def _heavy_first(lay: _Layout, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks in order of falling work, for query blocks (forward, dq: the keys before
    them) and for key blocks (dk/dv: the queries after them). The GPU starts programs in
    launch order, so the last wave holds light blocks and no SM idles behind a heavy one."""
    seq, within = lay.chunk_indices.long().unbind(1)
    after = lay.cu[seq + 1] - lay.cu[seq] - within * block
    return (lay.chunk_indices[within.argsort(descending=True, stable=True)],
            lay.chunk_indices[after.argsort(descending=True, stable=True)])


def _attention_args(q, k, v, log_gate, cu_seqlens, deg):
    B, T, Hq, d = q.shape
    e = v.shape[3]
    block, step = _attention_blocks(q.dtype, d, e)
    lay = _Layout(B, T, cu_seqlens, block, q.device)
    G = None if log_gate is None else _cumulative_gates(log_gate, cu_seqlens)
    meta = dict(DK=d, EP=_pow2(e), USE_GATE=G is not None, **_attention_flags(q.dtype, d, e, deg))
    return lay, _flat(q), _flat(k), _flat(v), G, block, step, meta


def _attention_forward(q, k, v, log_gate, cu_seqlens, scale: float, deg: int):
    """``forward``'s outputs by the attention form (no final state: ``N = 0``)."""
    B, T, Hq, _ = q.shape
    Hk, e = k.shape[2], v.shape[3]
    lay, qf, kf, vf, G, block, step, meta = _attention_args(q, k, v, log_gate, cu_seqlens, deg)
    o = _empty(B * T, Hq, e, dtype=q.dtype, device=q.device)
    o_low = _empty(B * T, Hq, low_width(q.dtype, e), dtype=q.dtype, device=q.device)
    den = _empty(B * T, Hq, dtype=torch.float32, device=q.device)
    if lay.n_chunks:
        attention_fwd[(lay.n_chunks, Hq)](qf, kf, vf, G, o, o_low, den, lay.cu,
                                          _heavy_first(lay, block)[0], scale, Hq, Hk, q.shape[3], e,
                                          BM=block, BN=step, LOW=o_low.shape[-1] > 0, **meta)
    D = _features(q.shape[3], deg, q.device).D
    return (o.view(B, T, Hq, e), q.new_empty(0, Hk, D, e, dtype=torch.float32),
            q.new_empty(0, Hk, D, dtype=torch.float32), den.view(B, T, Hq),
            o_low.view(B, T, Hq, o_low.shape[-1]))


def _attention_backward(do, q, k, v, log_gate, cu_seqlens, o, den, o_low, scale: float,
                        deg: int):
    """``backward``'s gradients by the attention form (no states in or out). The gate's:
    ``dL/dG_t`` is the sum of ``dw w`` over the weights of query ``t`` less that over the
    weights of key ``t`` (``attention_dq_kernel``, ``attention_dkv_kernel``), and ``dL/dlog
    g_t`` the sum of ``dL/dG`` over ``t`` and the later positions, taken in float64."""
    B, T, Hq, d = q.shape
    Hk, e = k.shape[2], v.shape[3]
    lay, qf, kf, vf, G, block, step, meta = _attention_args(q, k, v, log_gate, cu_seqlens, deg)
    Ttot = B * T
    dy = _empty(Ttot, Hq, e, dtype=torch.bfloat16 if meta["BF16"] else torch.float32,
                device=q.device)
    dyz = _empty(Ttot, Hq, dtype=torch.float32, device=q.device)
    dq, dk, dv = (_empty(*x.shape, dtype=q.dtype, device=q.device) for x in (qf, kf, vf))
    dg_q = _empty(Ttot if G is not None else 0, Hq, dtype=torch.float32, device=q.device)
    dg_k = _empty(Ttot if G is not None else 0, Hk, dtype=torch.float32, device=q.device)
    if Ttot:
        BT = 64
        kernels.prepare_bwd_kernel[(triton.cdiv(Ttot, BT), Hq)](
            _flat(o), _flat(o_low), _flat(do), den.reshape(Ttot, Hq), dy, dyz, Ttot, Hq, e,
            BT=BT, EP=meta["EP"], LOW=o_low.shape[-1] > 0, BF16=meta["BF16"],
            PREC=meta["PREC"])
    if lay.n_chunks:
        queries, keys = _heavy_first(lay, block)
        args = (scale, Hq, Hk, d, e)
        attention_dq[(lay.n_chunks, Hq)](qf, kf, vf, G, dy, dyz, dq, dg_q, lay.cu, queries,
                                         *args, BM=block, BN=step, **meta)
        attention_dkv[(lay.n_chunks, Hk)](qf, kf, vf, G, dy, dyz, dk, dv, dg_k, lay.cu, keys,
                                          *args, GROUPS=Hq // Hk, BM=step, BN=block, **meta)
    dg = None
    if G is not None:
        dG = dg_q.view(Ttot, Hk, Hq // Hk).double().sum(-1) - dg_k.double()
        dg = _suffix_sums(dG, B, T, cu_seqlens).view(B, T, Hk).to(log_gate.dtype)
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape), dg, None, None


# ---- calls too large for the GPU's memory: pieces of the token range, the state carried ----

PIECE_TOKENS: int | None = None   # tests set it: pieces of this many tokens, whatever the size


class _Pass(NamedTuple):
    """One kernel pass of a call run in pieces: tokens ``[a, b)`` of the packed call, holding
    sequences ``first ..`` as segments between ``bounds`` (absolute). A pass that ``resumes``
    holds one segment, the rest of a sequence cut at the pass before, and starts from the state
    carried across the cut; the last segment of a pass that ``continues`` goes on in the next
    pass. Every other segment is a whole sequence, so the user's initial state (or none)
    applies to it: that keeps ``HAS_INIT`` the same for all segments of a pass."""
    a: int
    b: int
    first: int
    bounds: list[int]
    resumes: bool
    continues: bool


def _passes(q, k, v, cu_seqlens, C: int, buffers: int, deg: int = 2) -> list[_Pass] | None:
    """The passes of a call whose ``buffers`` sets of chunk states (and the per-token buffers
    of one pass) would not fit the memory the GPU has free, or None to run it in one pass.
    Pieces hold equal numbers of tokens, as many as fit in 80% of that memory (``PIECE_TOKENS``
    overrides the rule, on any device); cuts inside a sequence fall on its chunk boundaries, so
    every chunk is the one a single pass would run."""
    B, T, Hq, d = q.shape
    Hk, e = k.shape[2], v.shape[3]
    total = B * T
    if PIECE_TOKENS is not None:
        pieces = -(-total // PIECE_TOKENS)
    else:
        if not q.is_cuda or not total or torch.cuda.is_current_stream_capturing():
            return None
        feat, size = _features(d, deg, q.device), q.element_size()
        st_bytes = _state_dtype(q.dtype, d, e, deg).itemsize
        per_chunk = buffers * Hk * feat.NT * BD * BD * (e * st_bytes + 4)
        # o, o_low and den (forward); dy, dy_z, dq, dk, dv and the gates' parts (backward)
        per_token = (Hq * ((e + low_width(q.dtype, e)) * size + 4) if buffers == 1 else
                     Hq * (e * st_bytes + 8 + d * size) + Hk * ((d + e) * size + 4))
        sequences = B if cu_seqlens is None else cu_seqlens.numel() - 1
        # and a float32 state per sequence: the final one (forward); the final one's gradient,
        # the initial one's and the carried one (backward)
        per_sequence = (1 + 2 * (buffers - 1)) * Hk * feat.D * (e + 1) * 4
        need = ((total / C + sequences) * per_chunk + total * per_token
                + sequences * per_sequence)
        if need <= 0.25 * torch.cuda.get_device_properties(q.device).total_memory:
            return None                               # the common case: no query at all
        free = torch.cuda.mem_get_info(q.device)[0] + (
            torch.cuda.memory_reserved(q.device) - torch.cuda.memory_allocated(q.device))
        if need <= 0.8 * free:
            return None
        # the full-size outputs are held beside each pass's own buffers
        tokens = int((0.8 * free - sequences * per_sequence) / (per_chunk / C + 2 * per_token))
        pieces = -(-total // max(C, tokens))
    P = -(-total // (pieces * C)) * C                 # equal pieces of whole chunks
    bounds = (list(range(0, total + 1, T)) if cu_seqlens is None
              else [int(x) for x in cu_seqlens.tolist()])
    cuts = [0]
    while cuts[-1] + P < total:
        end = cuts[-1] + P
        bos = bounds[bisect.bisect_right(bounds, end) - 1]    # the sequence holding `end`
        # a chunk boundary of it; past the last cut, which either lies on one of its chunk
        # boundaries (then this is P further) or before the sequence
        cuts.append(bos + (end - bos) // C * C)
    cuts.append(total)
    # each sequence's segments, piece by piece (an empty sequence where it sits)
    segments = [[] for _ in cuts[1:]]
    for n, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
        i = min(bisect.bisect_right(cuts, bos) - 1, len(segments) - 1)
        while True:
            end = min(eos, cuts[i + 1])
            segments[i].append((n, max(bos, cuts[i]), end))
            if end == eos:
                break
            i += 1
    passes = []
    for segs in segments:
        n, start, end = segs[0]
        if start > bounds[n]:                         # the rest of a sequence cut before
            passes.append(_Pass(start, end, n, [start, end], True, end < bounds[n + 1]))
            segs = segs[1:]
        if segs:
            first, last = segs[0][0], segs[-1][0]
            passes.append(_Pass(segs[0][1], segs[-1][2], first,
                                [s for _, s, _ in segs] + [segs[-1][2]], False,
                                segs[-1][2] < bounds[last + 1]))
    return passes


def _pass_state(p: _Pass, S0, z0, carried):
    """The initial state of pass ``p``: the carried one, the user's rows, or None."""
    if p.resumes:
        return carried
    if S0 is None:
        return None, None
    last = p.first + len(p.bounds) - 1
    return S0[p.first:last], z0[p.first:last]


def _pass_inputs(p: _Pass, *xs):
    """Views of the packed inputs over pass ``p`` (batch 1) and its ``cu_seqlens``."""
    cu = torch.tensor([x - p.a for x in p.bounds], dtype=torch.int64, device=xs[0].device)
    return [None if x is None else x[p.a:p.b].unsqueeze(0) for x in xs] + [cu]


def _forward_in_pieces(q, k, v, g, S0, z0, passes: list[_Pass], scale: float, C: int,
                       final_state: bool, deg: int):
    B, T, Hq, _ = q.shape
    Hk, D, e = k.shape[2], _features(q.shape[3], deg, q.device).D, v.shape[3]
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    gf = None if g is None else _flat(g)
    N = passes[-1].first + len(passes[-1].bounds) - 1
    o = _empty(B * T, Hq, e, dtype=q.dtype, device=q.device)
    o_low = _empty(B * T, Hq, low_width(q.dtype, e), dtype=q.dtype, device=q.device)
    den = _empty(B * T, Hq, dtype=torch.float32, device=q.device)
    # the passes keep their final states (the cut ones are carried); the user gets them if asked
    S_T = _empty(N if final_state else 0, Hk, D, e, dtype=torch.float32, device=q.device)
    z_T = _empty(N if final_state else 0, Hk, D, dtype=torch.float32, device=q.device)
    carried = None
    for p in passes:
        S0p, z0p = _pass_state(p, S0, z0, carried)
        *xs, cu = _pass_inputs(p, qf, kf, vf, gf)
        op, Sp, zp, denp, lowp = _run_forward(*xs, S0p, z0p, cu, scale, C, True, deg)
        o[p.a:p.b], den[p.a:p.b], o_low[p.a:p.b] = op[0], denp[0], lowp[0]
        ended = len(p.bounds) - 1 - p.continues          # segments that end their sequence
        if final_state:
            S_T[p.first:p.first + ended], z_T[p.first:p.first + ended] = Sp[:ended], zp[:ended]
        carried = (Sp[-1:], zp[-1:]) if p.continues else None
    return (o.view(B, T, Hq, e), S_T, z_T, den.view(B, T, Hq),
            o_low.view(B, T, Hq, o_low.shape[-1]))


def _backward_in_pieces(do, dS_T, dz_T, q, k, v, g, S0, z0, passes: list[_Pass], o, den,
                        o_low, scale: float, C: int, deg: int):
    """The passes in reverse, each carrying the gradient of the state at its start to the pass
    before; the state entering each resuming pass comes first, from forward scans of the
    segments that continue (without chunk states: about a sixth of the work of a backward)."""
    B, T, Hq, _ = q.shape
    st_dtype = _state_dtype(q.dtype, q.shape[-1], v.shape[-1], deg)
    qf, kf, vf, dof = _flat(q), _flat(k), _flat(v), _flat(do)
    of, lowf = _flat(o), _flat(o_low)
    gf = None if g is None else _flat(g)
    denf = den.reshape(B * T, Hq)
    entering, carried = [], None
    for p in passes:
        entering.append(carried)
        carried = None
        if p.continues:
            S0p, z0p = _pass_state(p, S0, z0, entering[-1])
            start = p.bounds[-2]
            if S0p is not None:
                S0p, z0p = S0p[-1:], z0p[-1:]
            lay = _Layout(1, p.b - start, None, C, q.device)
            xs = [None if x is None else x[start:p.b] for x in (kf, vf, gf)]
            _, _, S, z = _scan(xs[0], xs[1], None, xs[2], S0p, z0p, lay, C, deg=deg,
                               reverse=False, st_dtype=st_dtype, store_states=False)
            carried = (S, z)
    grads = [_empty(*x.shape, dtype=x.dtype, device=x.device) for x in (qf, kf, vf)]
    grads.append(None if g is None else torch.empty_like(gf))
    grads += [None, None] if S0 is None else [torch.empty_like(S0), torch.empty_like(z0)]
    carried = None
    for p, entry in zip(reversed(passes), reversed(entering)):
        S0p, z0p = _pass_state(p, S0, z0, entry)
        last = p.first + len(p.bounds) - 1
        if dS_T is not None:
            dSp, dzp = dS_T[p.first:last], dz_T[p.first:last]
        elif p.continues:                          # no gradient but the one carried back
            dSp = carried[0].new_zeros(last - p.first, *carried[0].shape[1:])
            dzp = carried[1].new_zeros(last - p.first, *carried[1].shape[1:])
        else:
            dSp = dzp = None
        if p.continues:
            dSp, dzp = torch.cat([dSp[:-1], carried[0]]), torch.cat([dzp[:-1], carried[1]])
        *views, cu = _pass_inputs(p, dof, qf, kf, vf, gf, of, denf, lowf)
        part = _run_backward(views[0], dSp, dzp, *views[1:5], S0p, z0p, cu, *views[5:], scale,
                             C, deg)
        for full, x in zip(grads[:4], part[:4]):
            if full is not None:
                full[p.a:p.b] = x[0]
        if p.resumes:
            carried = part[4:]
        elif S0 is not None:
            grads[4][p.first:last], grads[5][p.first:last] = part[4], part[5]
    shape = lambda x, ref: None if x is None else x.view(ref.shape)  # noqa: E731
    return (shape(grads[0], q), shape(grads[1], k), shape(grads[2], v), shape(grads[3], g),
            grads[4], grads[5])


def decode_into(q, k, v, log_gate, S, z, buffer_k, buffer_v, buffer_log_gate, held: int,
                scale: float, deg: int = 2) -> torch.Tensor:
    """Output ``o [B, 1, Hq, e]`` of one new token per sequence (``q [B, 1, Hq, d]``, ``k``,
    ``v``, ``log_gate [B, 1, Hk]``) against the state ``S, z`` and the ``held`` tokens of a
    preallocated buffer (``buffer_k [B, capacity, Hk, d]``, ``buffer_v``, ``buffer_log_gate``,
    contiguous); the new token is written into slot ``held``."""
    B, _, Hq, d = q.shape
    cap, Hk, e = buffer_k.shape[1], k.shape[2], v.shape[3]
    # Programs stream blocks of contiguous state rows, about four programs per multiprocessor:
    # blocks of 64 rows while each can have its own program (few sequences), else of 32. A
    # sweep on the H200 (docs/benchmarks.md, run 28; 8 KV heads x 4 queries, d = e = 64,
    # graphed) took batch 1 / 16 / 32 / 64 from 8.2 / 42.8 / 75.1 / 140.3 us with tiles of
    # pairs (the kernel before) to 7.3 / 26.1 / 43.0 / 72.6 us, against 1.0 / 15.9 / 31.7 / 63.4
    # us to read the states once. The interpreter counts one multiprocessor, so its small tests
    # take the split ways.
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
    feat, EP = _features(d, deg, q.device), _pow2(e)
    D = feat.D
    R = 64 if B * Hk * triton.cdiv(D, 64) <= 4 * sms and EP <= 64 else 32
    blocks = triton.cdiv(D, R)
    split = max(1, min(blocks, round(4 * sms / (B * Hk))))
    o = q.new_empty(B, 1, Hq, e)
    out = o if split == 1 else _empty(B, Hq, split, EP + 1, dtype=torch.float32,
                                      device=q.device)
    kernels.decode_kernel[(B * Hk, split)](
        q.contiguous(), k.contiguous(), v.contiguous(), log_gate.contiguous(), buffer_k,
        buffer_v, buffer_log_gate, S.contiguous(), z.contiguous(), out, feat.index, feat.coefs,
        scale, held, Hk, d, e, D, cap, G=Hq // Hk, GP=_pow2(Hq // Hk), LP=_pow2(cap), DK=d, R=R,
        NBLK=triton.cdiv(blocks, split), EP=EP, SPLIT=split, DEG=deg, STAGES=3,
        PRECISION="tf32" if S.dtype == torch.bfloat16 else _precision(q.dtype, deg), num_warps=4)
    if split > 1:
        kernels.decode_finish_kernel[(B * Hq,)](out, o, e, NT=split, NTP=_pow2(split), EP=EP)
    return o


def fold(k, v, log_gate, S, z, S_out, z_out, deg: int = 2) -> None:
    """Fold a decoding buffer into the state: ``S_out, z_out`` (``[B, Hk, D, e]``,
    ``[B, Hk, D]``, float32; they may be ``S, z`` themselves) become the state after the
    tokens ``k [B, L, Hk, d]``, ``v [B, L, Hk, e]``, ``log_gate [B, L, Hk]`` (contiguous) from
    ``S, z``. One forward scan of ``B`` sequences of ``L`` tokens that keeps only the final
    state, in one fixed configuration: it runs inside captured decode steps (so no autotuning,
    whose repeated launches would fold the buffer more than once in place) and is small."""
    B, L, Hk, d = k.shape
    e = v.shape[3]
    if not B * L:
        if S_out.data_ptr() != S.data_ptr():
            S_out.copy_(S)
            z_out.copy_(z)
        return
    C = min(_pow2(L), 64)
    lay = _Layout(B, L, None, C, k.device)
    feat, BE = _features(d, deg, k.device), min(64, _pow2(e))
    extra = {} if INTERPRET else {"num_warps": 4, "num_stages": 2}
    kernels.scan_kernel[(feat.NT, triton.cdiv(e, BE), B * Hk)](
        _flat(k), _flat(v), None, _flat(log_gate), S, z, S_out, z_out, S_out, z_out, lay.cu,
        lay.chunk_offsets, feat.index, feat.coefs, 1.0, Hk, Hk, 0, Hk, d, e, feat.D, 1,
        GROUPS=1, C=C, BD=BD, KP=KP, NB=d // BD, NT=feat.NT, BE=BE, REVERSE=False,
        USE_GATE=True, HAS_INIT=True, HAS_Y1=False, STORE_STATES=False, STORE_FINAL=True,
        LOOP_FOR=not INTERPRET, **_flags(k.dtype, d, e, deg), **extra)


# ---- chunk-size choice: timed once per shape bucket and GPU, cached in a JSON file ----

def _cache_path() -> Path:
    root = os.environ.get("POWER_RETENTION_CACHE", str(Path.home() / ".cache" / "power_retention"))
    return Path(root) / "chunk_size.json"


_chunk_cache: dict[str, int] | None = None


def _bucket(q, k, v, log_gate, cu_seqlens, deg: int) -> str:
    B, T, Hq, d = q.shape
    tokens = B * T if cu_seqlens is None else T
    per_seq = T if cu_seqlens is None else max(1, T // max(1, cu_seqlens.numel() - 1))
    gpu = torch.cuda.get_device_name(q.device) if q.is_cuda else "cpu"
    power = "" if deg == 2 else f"p{deg}|"
    return (f"{gpu}|{q.dtype}|{power}d{d}|e{v.shape[-1]}|hq{Hq}|hk{k.shape[2]}"
            f"|g{log_gate is not None}"
            f"|tok2^{max(tokens, 1).bit_length()}|seq2^{per_seq.bit_length()}")


def _longest(q: torch.Tensor, cu_seqlens) -> int:
    """The longest sequence of a call (packed ones read back from the GPU)."""
    if cu_seqlens is None:
        return q.shape[1]
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0


def pick_chunk_size(q, k, v, log_gate, S0, z0, cu_seqlens, scale,
                    for_backward: bool = False, deg: int = 2, stateless: bool = False) -> int:
    """Chunk size for this shape: the fastest forward (or backward) of ``CHUNK_CANDIDATES``,
    and of the attention form (``ATTENTION``) for ``stateless`` calls of sequences up to four
    times ``_attention_crossover`` where ``POWER_RETENTION_ATTENTION_FORM=1``, on this GPU,
    measured on the first call of each shape bucket and remembered on disk."""
    global _chunk_cache
    if not q.is_cuda:
        return 16                                  # interpreter: small and many chunks
    longest, crossover = 0, 0
    if stateless and os.environ.get("POWER_RETENTION_ATTENTION_FORM") == "1":
        longest = _longest(q, cu_seqlens)
        crossover = _attention_crossover(q.shape[-1], v.shape[-1], deg)
    attention = longest <= 4 * crossover and crossover > 0
    if q.shape[0] * q.shape[1] < SMALL_PROBLEM:    # launch-bound: not worth a timing sweep
        if longest <= crossover and crossover > 0:
            return ATTENTION                       # one kernel (three backward), fewer FLOPs
        return CHUNK_CANDIDATES[0]
    if _chunk_cache is None:
        try:
            _chunk_cache = json.loads(_cache_path().read_text())
        except (OSError, ValueError):
            _chunk_cache = {}
    key = (_bucket(q, k, v, log_gate, cu_seqlens, deg) + ("|backward" if for_backward else "")
           + ("|stateless" if attention else ""))
    if key not in _chunk_cache:
        # the chunk states of forward and backward take 2 * chunks * Hk * NT * F * e elements:
        # candidates whose buffers would pass a quarter of the GPU are not tried
        B, T, _, d = q.shape
        Hk, e = k.shape[2], v.shape[-1]
        largest = _largest_chunk(q, e, deg)
        per_chunk = Hk * _features(d, deg, q.device).NT * BD * BD * (e * 2 + 4)
        budget = torch.cuda.get_device_properties(q.device).total_memory / 4
        fits = [C for C in CHUNK_CANDIDATES if 2 * per_chunk * (B * T / C + B) <= budget
                and C <= largest]
        # none fits: the largest (the call then runs in pieces); one: nothing to time
        candidates = list(fits or [min(max(CHUNK_CANDIDATES), largest)])
        candidates += [ATTENTION] if attention else []
        times = {candidates[0]: 0.0}
        if len(candidates) > 1:
            times = {}
            if for_backward:
                with torch.no_grad():
                    o, S, z, den, o_low = _run_forward(q, k, v, log_gate, S0, z0, cu_seqlens,
                                                       scale, candidates[0], True, deg)
                do, dS, dz = torch.ones_like(o), torch.zeros_like(S), torch.zeros_like(z)
                if attention:                      # the call keeps no final state
                    dS = dz = None
        for C in candidates if len(candidates) > 1 else ():
            def run(C=C):
                if for_backward:
                    return backward(do, dS, dz, q, k, v, log_gate, S0, z0, cu_seqlens, o, den,
                                    o_low, scale, C, deg)
                if C == ATTENTION:
                    return _attention_forward(q, k, v, log_gate, cu_seqlens, scale, deg)
                return _run_forward(q, k, v, log_gate, S0, z0, cu_seqlens, scale, C,
                                    not attention, deg)
            times[C] = triton.testing.do_bench(run, warmup=5, rep=20, return_mode="median")
        _chunk_cache[key] = min(times, key=times.get)
        if len(times) > 1:
            log.info("%s: %s", key, ", ".join(
                f"{'attention form' if C == ATTENTION else f'chunk {C}'} {ms:.3f} ms"
                for C, ms in times.items()))
        try:
            path = _cache_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(_chunk_cache, indent=1, sort_keys=True))
        except OSError:
            pass
    return _chunk_cache[key]
