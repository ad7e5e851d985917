"""Host functions that chain the Triton kernels: forward, backward (recomputing the chunk
states), and one decoding step. Inputs are flattened to packed ``[T_total, H, x]`` views (no
copy for contiguous inputs); a batch of ``B`` equal-length sequences is packed as ``B`` ranges.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import triton

from . import kernels

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
    # Head sizes above 64 are enabled only where the GPU test passed (fp32 d = 128): in bf16
    # at d = e = 128 the gradient of the initial normaliser misses its tolerance (3.1e-2), since
    # -(do . o) / den sums 128 bf16-rounded outputs (docs/benchmarks.md, run 4).
    largest = 128 if q.dtype == torch.float32 else 64
    return (deg == 2 and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and d in (16, 32, 64, 128) and d <= largest and 1 <= e <= 128)


class _Launcher:
    """A kernel behind ``triton.autotune`` for bf16 inputs (the fast path the benchmarks time)
    over warps and, for the scans across chunks, the width ``BE`` of the value columns each
    program carries: narrower blocks give a batch-1 scan more programs to hide its per-chunk
    latency, wider ones form each ``phi`` tile fewer times. fp16/fp32 inputs, whose fp32 state
    tiles need more shared memory, and the interpreter take the fixed configuration the call
    passes, which also bounds compile time. ``grid`` may be a function of the meta-parameters.
    (Capping 8 warps at 128 registers, so two programs share a multiprocessor, was tried on the
    H200 and changed no kernel's time: docs/benchmarks.md, run 7.)"""

    def __init__(self, fn, key, e_blocks=()):
        self.fn = fn
        self.tuned_names = ("BE",) if e_blocks else ()
        # the scans (e_blocks given) also try a third stage: a deeper prefetch of the next
        # chunks' keys and values for their chain of dependent steps
        configs = [triton.Config({"BE": be} if be else {}, num_warps=w, num_stages=st)
                   for be in (e_blocks or (None,)) for w in (4, 8)
                   for st in ((2, 3) if e_blocks else (2,))]
        self.tuned = None if INTERPRET else triton.autotune(configs, key=key)(fn)

    def __getitem__(self, grid):
        def launch(*args, BF16, **kwargs):
            if self.tuned is not None and BF16:
                tuned = {k: v for k, v in kwargs.items() if k not in self.tuned_names}
                return self.tuned[grid](*args, BF16=BF16, **tuned)
            extra = {} if INTERPRET else {"num_warps": 8, "num_stages": 1}
            return self.fn[grid](*args, BF16=BF16, **kwargs, **extra)
        return launch


# "SEQS" (sequences x KV heads, bucketed) separates batch-1 scans from wide batches
_STATE_KEYS = ["C", "BD", "NB", "e", "SEQS", "USE_GATE", "BF16"]
_CHUNK_KEYS = ["C", "BD", "NB", "EP", "USE_GATE", "BF16"]
state_fwd = _Launcher(kernels.state_fwd_kernel, _STATE_KEYS, e_blocks=(16, 32, 64))
output_fwd = _Launcher(kernels.output_fwd_kernel, _CHUNK_KEYS)
state_bwd = _Launcher(kernels.state_bwd_kernel, _STATE_KEYS, e_blocks=(16, 32, 64))
dq_bwd = _Launcher(kernels.dq_kernel, _CHUNK_KEYS)
dkv_bwd = _Launcher(kernels.dkv_kernel, _CHUNK_KEYS)


def _scan_grid(NB: int, e: int, lay: _Layout, Hk: int):
    """A scan's grid (tiles, value blocks, sequences x KV heads) as a function of ``BE``, and
    its tuning bucket ``SEQS``: sequences x KV heads rounded up to a power of two <= 256."""
    def grid(meta):
        return NB * (NB + 1) // 2, triton.cdiv(e, meta["BE"]), lay.N * Hk
    return grid, min(256, triton.next_power_of_2(lay.N * Hk))


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def _flags(dtype: torch.dtype) -> dict:
    bf16 = dtype == torch.bfloat16
    # fp32 inputs get exact fp32 products; fp16 ones tf32 (operands as precise as fp16)
    prec = "ieee" if (dtype == torch.float32 or INTERPRET) else "tf32"
    return {"BF16": bf16, "PREC": prec}


class _Layout:
    """Sequence and chunk bookkeeping of one call: ``cu [N+1]``, ``chunk_offsets [N+1]`` (first
    chunk of each sequence) and ``chunk_indices [chunks, 2]`` (sequence, chunk within it)."""

    def __init__(self, B: int, T: int, cu_seqlens: torch.Tensor | None, C: int,
                 device: torch.device):
        if cu_seqlens is None:
            cu = torch.arange(B + 1, dtype=torch.int64, device=device) * T
        else:
            cu = cu_seqlens.to(device=device, dtype=torch.int64)
        lengths = cu[1:] - cu[:-1]
        per_seq = (lengths + C - 1) // C
        offsets = torch.zeros_like(cu)
        offsets[1:] = per_seq.cumsum(0)
        self.n_chunks = int(offsets[-1])
        self.N = cu.numel() - 1
        seq = torch.repeat_interleave(torch.arange(self.N, device=device), per_seq,
                                      output_size=self.n_chunks)
        within = torch.arange(self.n_chunks, device=device) - offsets[seq]
        self.cu = cu
        self.lengths = lengths
        self.chunk_offsets = offsets
        self.chunk_indices = torch.stack([seq, within], 1).to(torch.int32).contiguous()


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).contiguous()


def _states(q, k, v, g, S0, z0, lay: _Layout, C: int):
    """Run the forward scan: chunk states ``[chunks, Hk, NT, F, e]`` and the final state."""
    Hk, d, e = k.shape[1], k.shape[2], v.shape[2]
    NB, D = d // BD, d * (d + 1) // 2
    NT, F = NB * (NB + 1) // 2, BD * BD
    BE = min(64, _pow2(e))
    # bf16 inputs keep the chunk states in bf16 (the products read them as bf16 anyway);
    # fp16 ones keep fp32, since fp16 states would overflow over long ungated contexts
    st_dtype = torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32
    states = _empty(lay.n_chunks, Hk, NT, F, e, dtype=st_dtype, device=q.device)
    zstates = _empty(lay.n_chunks, Hk, NT, F, dtype=torch.float32, device=q.device)
    S_T = _empty(lay.N, Hk, D, e, dtype=torch.float32, device=q.device)
    z_T = _empty(lay.N, Hk, D, dtype=torch.float32, device=q.device)
    if lay.N:
        grid, seqs = _scan_grid(NB, e, lay, Hk)
        state_fwd[grid](k, v, g, S0, z0, states, zstates, S_T, z_T, lay.cu, lay.chunk_offsets,
                        Hk, d, e, D, seqs, C=C, BD=BD, KP=KP, NB=NB, BE=BE,
                        USE_GATE=g is not None, HAS_INIT=S0 is not None, LOOP_FOR=not INTERPRET,
                        **_flags(q.dtype))
    return states, zstates, S_T, z_T


def _outputs(q, k, v, g, states, zstates, lay: _Layout, scale: float, C: int):
    Ttot, Hq, d = q.shape
    Hk, e = k.shape[1], v.shape[2]
    o = _empty(Ttot, Hq, e, dtype=q.dtype, device=q.device)
    den = _empty(Ttot, Hq, dtype=torch.float32, device=q.device)
    if lay.n_chunks:
        output_fwd[(lay.n_chunks, Hq)](q, k, v, g, states, zstates, o, den, lay.cu,
                                       lay.chunk_indices, scale, Hq, Hk, d, e, C=C, BD=BD,
                                       KP=KP, NB=d // BD, EP=_pow2(e),
                                       USE_GATE=g is not None, **_flags(q.dtype))
    return o, den


def _run_forward(q, k, v, g, S0, z0, cu_seqlens, scale, C):
    B, T = q.shape[:2]
    lay = _Layout(B, T, cu_seqlens, C, q.device)
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    gf = None if g is None else _flat(g)
    states, zstates, S_T, z_T = _states(qf, kf, vf, gf, S0, z0, lay, C)
    o, den = _outputs(qf, kf, vf, gf, states, zstates, lay, scale, C)
    return o.view(B, T, *o.shape[1:]), S_T, z_T, den.view(B, T, -1)


def _largest_chunk(dtype: torch.dtype) -> int:
    """fp16/fp32 inputs keep fp32 state tiles, whose kernels pass the H200's shared memory
    (227 KiB) at 128-token chunks: the chunk is a speed setting, so it is capped here."""
    return max(CHUNK_CANDIDATES) if dtype == torch.bfloat16 else 64


def _chunk(chunk_size, q, *args, for_backward: bool = False) -> int:
    """An explicit chunk size (a power of two from 16, capped by ``_largest_chunk``) or a
    tuned one (forward and backward are tuned apart: the backward recomputes its own chunk
    states, and its kernels hold more per chunk)."""
    if chunk_size in (16, 32, 64, 128, 256):
        return min(chunk_size, _largest_chunk(q.dtype))
    return pick_chunk_size(q, *args, for_backward=for_backward)


def forward(q, k, v, log_gate, S0, z0, cu_seqlens, scale: float, chunk_size: int | None = None):
    """``(o [B,T,Hq,e], S [N,Hk,D,e], z [N,Hk,D], den [B,T,Hq])``; arguments as
    ``power_retention``'s, the initial state split into ``S0, z0`` (or None). ``chunk_size``
    None picks a tuned one. ``den`` (fp32 denominators) lets ``backward`` skip the outputs."""
    C = _chunk(chunk_size, q, k, v, log_gate, S0, z0, cu_seqlens, scale)
    return _run_forward(q, k, v, log_gate, S0, z0, cu_seqlens, scale, C)


def backward(do, dS_T, dz_T, q, k, v, log_gate, S0, z0, cu_seqlens, o, den, scale: float,
             chunk_size: int | None = None):
    """Gradients ``dq, dk, dv, dlog_gate, dS0, dz0`` (None for absent inputs), given
    ``forward``'s ``o`` and ``den``; the chunk states are recomputed rather than stored."""
    C = _chunk(chunk_size, q, k, v, log_gate, S0, z0, cu_seqlens, scale, for_backward=True)
    B, T, Hq, d = q.shape
    Hk, e = k.shape[2], v.shape[3]
    NB, D = d // BD, d * (d + 1) // 2
    BE, EP = min(64, _pow2(e)), _pow2(e)
    lay = _Layout(B, T, cu_seqlens, C, q.device)
    qf, kf, vf, dof = _flat(q), _flat(k), _flat(v), _flat(do)
    gf = None if log_gate is None else _flat(log_gate)
    flags = dict(USE_GATE=gf is not None, KP=KP, **_flags(q.dtype))
    Ttot = B * T

    states, zstates, _, _ = _states(qf, kf, vf, gf, S0, z0, lay, C)
    o, den = _flat(o), den.reshape(Ttot, Hq)
    # do / den in the dtype the products read it in (bf16 for bf16 inputs)
    dy = _empty(Ttot, Hq, e, dtype=torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32,
                device=q.device)
    dyz = _empty(Ttot, Hq, dtype=torch.float32, device=q.device)
    if Ttot:
        BT = 64
        kernels.prepare_bwd_kernel[(triton.cdiv(Ttot, BT), Hq)](
            o, dof, den, dy, dyz, Ttot, Hq, e, BT=BT, EP=EP)

    dstates = _empty(*states.shape, dtype=states.dtype, device=q.device)
    dzstates = _empty(*zstates.shape, dtype=torch.float32, device=q.device)
    dS0 = _empty(lay.N, Hk, D, e, dtype=torch.float32, device=q.device)
    dz0 = _empty(lay.N, Hk, D, dtype=torch.float32, device=q.device)
    dS_T, dz_T = dS_T.contiguous().float(), dz_T.contiguous().float()
    if lay.N:
        grid, seqs = _scan_grid(NB, e, lay, Hk)
        state_bwd[grid](qf, gf, dy, dyz, dS_T, dz_T, dstates, dzstates, dS0, dz0,
                        lay.cu, lay.chunk_offsets, scale, Hq, Hk, d, e, D, seqs, Hq // Hk, C=C,
                        BD=BD, NB=NB, BE=BE, LOOP_FOR=not INTERPRET, **flags)

    dq = _empty(*qf.shape, dtype=q.dtype, device=q.device)
    dk = _empty(*kf.shape, dtype=q.dtype, device=q.device)
    dv = _empty(*vf.shape, dtype=q.dtype, device=q.device)
    dg_q = _empty(Ttot, Hq, dtype=torch.float32, device=q.device)
    dg_k = _empty(Ttot, Hk, dtype=torch.float32, device=q.device)
    if lay.n_chunks:
        dq_bwd[(lay.n_chunks, Hq)](qf, kf, vf, gf, states, zstates, dy, dyz, dq, dg_q,
                                   lay.cu, lay.chunk_indices, scale, Hq, Hk, d, e, C=C, BD=BD,
                                   NB=NB, EP=EP, **flags)
        dkv_bwd[(lay.n_chunks, Hk)](qf, kf, vf, gf, states, zstates, dstates, dzstates, dy,
                                    dyz, dk, dv, dg_k, lay.cu, lay.chunk_indices, scale,
                                    Hq, Hk, d, e, Hq // Hk, C=C, BD=BD, NB=NB, EP=EP, **flags)

    dg = None
    if log_gate is not None:     # the two kernels' parts of it (kernels._straddle_intra)
        dg = dg_q.view(Ttot, Hk, Hq // Hk).sum(-1) + dg_k
        dg = dg.view(B, T, Hk).to(log_gate.dtype)
    shape = lambda x, ref: x.view(ref.shape)  # noqa: E731
    return (shape(dq, q), shape(dk, k), shape(dv, v), dg,
            None if S0 is None else dS0, None if z0 is None else dz0)


def decode_into(q, k, v, log_gate, S, z, buffer_k, buffer_v, buffer_log_gate, held: int,
                scale: float) -> torch.Tensor:
    """Output ``o [B, 1, Hq, e]`` of one new token per sequence (``q [B, 1, Hq, d]``, ``k``,
    ``v``, ``log_gate [B, 1, Hk]``) against the state ``S, z`` and the ``held`` tokens of a
    preallocated buffer (``buffer_k [B, capacity, Hk, d]``, ``buffer_v``, ``buffer_log_gate``,
    contiguous); the new token is written into slot ``held``."""
    B, _, Hq, d = q.shape
    cap, Hk, e = buffer_k.shape[1], k.shape[2], v.shape[3]
    # decoding reads the exact layout, so its tiles are free: 16 x 16 ones (8 x 8 for e > 64,
    # whose fp32 state tiles would crowd the registers)
    bd = 16 if e <= 64 else 8
    NB, D, EP = d // bd, d * (d + 1) // 2, _pow2(e)
    NT = NB * (NB + 1) // 2
    # One program per state tile while that makes at most 16 programs per multiprocessor, a
    # second launch adding their partial sums; beyond, one program per sequence and KV head
    # streams its tiles and writes o itself. On the H200 (docs/serving.md) tiles won at 16 x 8
    # KV heads (52 against 58 us per layer) and streaming at 64 x 16 (329 against 371 us).
    # The interpreter counts one multiprocessor, so its small tests take both ways.
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
    split = NT if B * Hk * NT <= 16 * sms else 1
    o = q.new_empty(B, 1, Hq, e)
    out = o if split == 1 else _empty(B, Hq, split, EP + 1, dtype=torch.float32,
                                      device=q.device)
    kernels.decode_kernel[(B * Hk, split)](
        q.contiguous(), k.contiguous(), v.contiguous(), log_gate.contiguous(), buffer_k,
        buffer_v, buffer_log_gate, S.contiguous(), z.contiguous(), out, scale, held, Hk, d, e,
        D, cap, G=Hq // Hk, GP=_pow2(Hq // Hk), LP=_pow2(cap), BD=bd, NB=NB, EP=EP, SPLIT=split,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=8)  # fp32: 4 spill
    if split > 1:
        kernels.decode_finish_kernel[(B * Hq,)](out, o, e, NT=split, NTP=_pow2(split), EP=EP)
    return o


# ---- chunk-size choice: timed once per shape bucket and GPU, cached in a JSON file ----

def _cache_path() -> Path:
    root = os.environ.get("POWER_RETENTION_CACHE", str(Path.home() / ".cache" / "power_retention"))
    return Path(root) / "chunk_size.json"


_chunk_cache: dict[str, int] | None = None


def _bucket(q, k, v, log_gate, cu_seqlens) -> str:
    B, T, Hq, d = q.shape
    tokens = B * T if cu_seqlens is None else T
    per_seq = T if cu_seqlens is None else max(1, T // max(1, cu_seqlens.numel() - 1))
    gpu = torch.cuda.get_device_name(q.device) if q.is_cuda else "cpu"
    return (f"{gpu}|{q.dtype}|d{d}|e{v.shape[-1]}|hq{Hq}|hk{k.shape[2]}|g{log_gate is not None}"
            f"|tok2^{max(tokens, 1).bit_length()}|seq2^{per_seq.bit_length()}")


def pick_chunk_size(q, k, v, log_gate, S0, z0, cu_seqlens, scale,
                    for_backward: bool = False) -> int:
    """Chunk size for this shape: the fastest forward (or backward) of ``CHUNK_CANDIDATES`` on
    this GPU, measured on the first call of each shape bucket and remembered on disk."""
    global _chunk_cache
    if not q.is_cuda:
        return 16                                  # interpreter: small and many chunks
    if q.shape[0] * q.shape[1] < SMALL_PROBLEM:
        return CHUNK_CANDIDATES[0]                 # launch-bound: not worth a timing sweep
    if _chunk_cache is None:
        try:
            _chunk_cache = json.loads(_cache_path().read_text())
        except (OSError, ValueError):
            _chunk_cache = {}
    key = _bucket(q, k, v, log_gate, cu_seqlens) + ("|backward" if for_backward else "")
    if key not in _chunk_cache:
        # the chunk states of forward and backward take 2 * chunks * Hk * NT * F * e elements:
        # candidates whose buffers would pass a quarter of the GPU are not tried
        B, T, _, d = q.shape
        Hk, e = k.shape[2], v.shape[-1]
        per_chunk = Hk * (d // BD) * (d // BD + 1) // 2 * BD * BD * (e * 2 + 4)
        budget = torch.cuda.get_device_properties(q.device).total_memory / 4
        fits = [C for C in CHUNK_CANDIDATES if 2 * per_chunk * (B * T / C + B) <= budget
                and C <= _largest_chunk(q.dtype)]
        times = {min(max(CHUNK_CANDIDATES), _largest_chunk(q.dtype)): 0.0} if not fits else {}
        if for_backward and fits:
            with torch.no_grad():
                o, S, z, den = _run_forward(q, k, v, log_gate, S0, z0, cu_seqlens, scale, fits[0])
            do, dS, dz = torch.ones_like(o), torch.zeros_like(S), torch.zeros_like(z)
        for C in fits:
            def run(C=C):
                if for_backward:
                    return backward(do, dS, dz, q, k, v, log_gate, S0, z0, cu_seqlens, o, den,
                                    scale, C)
                return _run_forward(q, k, v, log_gate, S0, z0, cu_seqlens, scale, C)
            times[C] = triton.testing.do_bench(run, warmup=5, rep=20, return_mode="median")
        _chunk_cache[key] = min(times, key=times.get)
        try:
            path = _cache_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(_chunk_cache, indent=1, sort_keys=True))
        except OSError:
            pass
    return _chunk_cache[key]
