"""Power retention's Triton kernels against cuDNN and flash attention (BENCHMARKS.md protocol).

    PYTHONPATH=src python benchmarks/bench_op.py --out results.json

Standard cases: bf16, 16 heads, d = 64, p = 2 (``--dtype``, ``--head-dim``, ``--deg`` change
them), 65,536 tokens per call (batch = 65,536 / t; ``--tokens``), gated (``logsigmoid(randn +
4)``), modes fwd and fwd+bwd; t = 256k and 1M at batch 1 for our kernels only; decode time per
token per layer at batch 1 and 64. Each timed result is checked against the float64 reference
on a slice first. Median of ``triton.testing.do_bench``. The chunk-size timings of each new
shape bucket are printed as they are taken; with ``POWER_RETENTION_ATTENTION_FORM=1`` calls of
short sequences may take the attention form (chunk ``attn``, FLOPs counted as causal
attention's).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import logging
import math

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from power_retention import DecodeBuffer, power_retention, power_retention_decode_into, sympow_dim
from power_retention.ops.naive import attention_reference
from power_retention.ops.triton import host

HEADS, D_HEAD, TOKENS, DEG = 16, 64, 65_536, 2
DTYPE = torch.bfloat16


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy on this GPU (read and write counted):
    what a kernel that streams memory can reach."""
    src = torch.empty(2 ** 29, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=5, rep=50, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def retention_flops(tokens: int, chunk: int, mode: str) -> float:
    """BENCHMARKS.md: per token and head ``4 D e`` (state update and query, exact D) plus
    ``2 c d`` (causal attention inside a chunk); forward + backward counted as 3x forward."""
    D = sympow_dim(D_HEAD, DEG)
    fwd = tokens * HEADS * (4 * D * D_HEAD + 2 * chunk * D_HEAD)
    return fwd * (3 if mode == "fwd+bwd" else 1)


def sdpa_flops(batch: int, t: int, mode: str) -> float:
    """Causal attention: ``2 B H t^2 d`` forward (half of ``4 B H t^2 d``), 3.5x with backward."""
    fwd = 2 * batch * HEADS * t * t * D_HEAD
    return fwd * (3.5 if mode == "fwd+bwd" else 1)


def make(batch: int, t: int, requires_grad: bool, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (batch, t, HEADS, D_HEAD)
    q, k, v = (torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen)
               for _ in range(3))
    g = F.logsigmoid(torch.randn(batch, t, HEADS, device="cuda", generator=gen) + 4)
    return [x.requires_grad_(requires_grad) for x in (q, k, v, g)]


def check_slice(o, q, k, v, g) -> float:
    """Relative error of the first sequence's first (up to) 2,048 outputs vs float64."""
    n = min(q.shape[1], 2048 if DEG == 2 else 512)      # degree 4: float64 features of n tokens
    ref, _ = attention_reference(*(x[:1, :n].detach().double() for x in (q, k, v, g)), deg=DEG)
    return float((o[:1, :n].detach().double() - ref).norm() / ref.norm())


def time_retention(batch: int, t: int, mode: str) -> dict:
    q, k, v, g = make(batch, t, requires_grad=mode == "fwd+bwd")
    o = power_retention(q, k, v, g, deg=DEG)       # compiles, autotunes, picks the chunk
    err = check_slice(o, q, k, v, g)
    # a call without states may take the attention form (chunk 0, host.ATTENTION)
    chunk = host.pick_chunk_size(q, k, v, g, None, None, None, D_HEAD ** -0.5, deg=DEG,
                                 stateless=True, for_backward=mode == "fwd+bwd")
    if mode == "fwd":
        ms = bench(lambda: power_retention(q, k, v, g, deg=DEG))
    else:
        do = torch.randn_like(o)
        ms = bench(lambda: torch.autograd.grad(power_retention(q, k, v, g, deg=DEG), (q, k, v, g),
                                               do))
    peak = None
    if t >= 1 << 20:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        if mode == "fwd":
            power_retention(q, k, v, g, deg=DEG)
        else:
            torch.autograd.grad(power_retention(q, k, v, g, deg=DEG), (q, k, v, g), do)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
    attention = chunk == host.ATTENTION           # then its FLOPs are causal attention's
    flops = sdpa_flops(batch, t, mode) if attention else retention_flops(batch * t, chunk, mode)
    return {"impl": "power retention (triton)", "t": t, "batch": batch, "mode": mode, "ms": ms,
            "tflops": flops / ms / 1e9, "chunk": chunk, "rel_err_slice": err,
            "peak_gib": peak, "us_per_ktoken": 1e3 * ms / (batch * t / 1024)}


def time_sdpa(batch: int, t: int, mode: str, backend) -> dict:
    q, k, v, _ = make(batch, t, requires_grad=mode == "fwd+bwd")
    q, k, v = (x.detach().transpose(1, 2).contiguous().requires_grad_(mode == "fwd+bwd")
               for x in (q, k, v))

    def fwd():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if mode == "fwd":
        ms = bench(fwd)
    else:
        do = torch.randn_like(fwd())
        ms = bench(lambda: torch.autograd.grad(fwd(), (q, k, v), do))
    name = "cuDNN SDPA" if backend == SDPBackend.CUDNN_ATTENTION else "flash SDPA"
    return {"impl": name, "t": t, "batch": batch, "mode": mode, "ms": ms,
            "tflops": sdpa_flops(batch, t, mode) / ms / 1e9}


def time_decode(batch: int, buffered: int, read_copy: bool, bandwidth: float, prefix: int = 256,
                capacity: int = 64) -> dict:
    """One new token per sequence against a real state (from a ``prefix``-token call of the
    op) and ``buffered`` recent tokens in a preallocated ``capacity``-slot buffer, as a model's
    cache decodes (``power_retention_decode_into``; with ``read_copy`` reading ``S`` rounded to
    bf16, as a bf16 model's cache has it); the first sequence checked against the reference over
    its whole stream.
    Timed eagerly (host launches included) and replayed from a CUDA graph (the kernels alone,
    as a graphed model step runs them), against reading the state once at ``bandwidth``."""
    q, k, v, g = make(batch, prefix + buffered + 1, requires_grad=False, seed=2)
    _, state = power_retention(q[:, :prefix], k[:, :prefix], v[:, :prefix], g[:, :prefix], deg=DEG,
                               output_final_state=True)
    slots = DecodeBuffer(k.new_zeros(batch, capacity, HEADS, D_HEAD),
                         v.new_zeros(batch, capacity, HEADS, D_HEAD),
                         g.new_zeros(batch, capacity, HEADS))
    for slot, x in zip(slots, (k, v, g)):
        slot[:, :buffered] = x[:, prefix:prefix + buffered]
    new = [x[:, prefix + buffered:].contiguous() for x in (q, k, v, g)]
    read = state._replace(S=state.S.bfloat16()) if read_copy else state

    def step():
        return power_retention_decode_into(*new, read, slots, buffered, deg=DEG)
    o = step()
    # the first sequence's reference (float64 features of a whole batch at d = 128 take 20 GiB)
    ref, _ = attention_reference(*(x[:1].double() for x in (q, k, v, g)), deg=DEG)
    err = float((o[:1].double() - ref[:, -1:]).norm() / ref[:, -1:].norm())
    eager_ms = bench(step)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graphed_ms = bench(graph.replay)
    D = sympow_dim(D_HEAD, DEG)
    state_bytes = batch * HEADS * D * (D_HEAD * read.S.element_size() + 4)
    return {"impl": "decode (triton)", "batch": batch, "buffered": buffered,
            "state": "bf16 copy" if read_copy else "fp32",
            "us": eager_ms * 1e3, "graphed_us": graphed_ms * 1e3,
            "state_read_us": state_bytes / bandwidth * 1e6, "rel_err": err}


BACKWARD_SCANS = ("backward: recompute", "backward: reverse")


def kernel_rows(events) -> list[dict]:
    """Time per kernel of the profiler's ``events`` (device kernels, any order): the 12 largest,
    each with its launches and ms. The ``scan_kernel`` launches of one forward + backward count
    apart by their order of launch, since they differ: those before the first
    ``output_fwd_kernel`` are the forward's (one, or one per group of heads), the two after it
    the backward's recomputation of the chunk states and its reverse scan."""
    launches = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
                      key=lambda e: e.time_range.start)
    names = [e.name for e in launches]
    scans = [i for i, name in enumerate(names) if name == "scan_kernel"]
    first_out = names.index("output_fwd_kernel") if "output_fwd_kernel" in names else -1
    later = [i for i in scans if i > first_out]
    phases = {}
    if first_out >= 0 and len(later) == len(BACKWARD_SCANS) and len(later) < len(scans):
        phases = {i: "forward" for i in scans if i < first_out} | dict(zip(later, BACKWARD_SCANS))
    rows: dict[str, dict] = {}
    for i, event in enumerate(launches):
        name = f"{event.name} ({phases[i]})" if i in phases else event.name[:60]
        row = rows.setdefault(name, {"kernel": name, "calls": 0, "ms": 0.0})
        row["calls"] += 1
        row["ms"] += event.device_time_total / 1e3
    return sorted(rows.values(), key=lambda r: -r["ms"])[:12]


def kernel_breakdown(t: int = TOKENS) -> list[dict]:
    """Time per kernel of one forward + backward at batch 1 (torch.profiler, CUDA activity)."""
    q, k, v, g = make(1, t, requires_grad=True)
    do = torch.randn_like(q)
    torch.autograd.grad(power_retention(q, k, v, g, deg=DEG), (q, k, v, g), do)
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        torch.autograd.grad(power_retention(q, k, v, g, deg=DEG), (q, k, v, g), do)
        torch.cuda.synchronize()
    return kernel_rows(prof.events())


def main() -> None:
    global D_HEAD, DTYPE, DEG, TOKENS
    logging.basicConfig(format="%(message)s")
    logging.getLogger("power_retention").setLevel(logging.INFO)   # the chunk-size timings
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_op.json")
    parser.add_argument("--seq-lens", default="1024,4096,8192,16384,65536")
    parser.add_argument("--long", default="262144,1048576", help="batch-1 lengths, ours only")
    parser.add_argument("--odd", default="3000,65537",
                        help="odd lengths, ours only, per token against the nearest length")
    parser.add_argument("--decode-batches", default="1,64")
    parser.add_argument("--tokens", type=int, default=TOKENS,
                        help="tokens per call (batch = tokens / t; BENCHMARKS.md: 65,536). "
                             "Under 32k a call is too small for the chunk-size timing sweep")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                        help="skip the per-kernel profile of one forward + backward at 64k")
    parser.add_argument("--head-dim", type=int, default=D_HEAD, choices=(16, 32, 64, 128),
                        help="d = e of every case (BENCHMARKS.md's standard cases: 64)")
    parser.add_argument("--deg", type=int, default=DEG, choices=(2, 4),
                        help="degree p (4: head sizes 16 and 32)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                        help="of q, k, v (BENCHMARKS.md's standard cases: bfloat16); float32 "
                             "runs without the SDPA baselines, which take 16-bit inputs")
    args = parser.parse_args()
    D_HEAD, DTYPE, DEG, TOKENS = args.head_dim, getattr(torch, args.dtype), args.deg, args.tokens
    if DEG == 4 and D_HEAD > 32:
        parser.error("--deg 4 takes --head-dim 16 or 32")
    baselines = not args.no_baselines and DTYPE != torch.float32
    torch.manual_seed(0)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "heads": HEADS, "d": D_HEAD, "e": D_HEAD, "deg": DEG,
            "dtype": args.dtype, "tokens_per_call": TOKENS, "gates": "logsigmoid(randn + 4)"}
    rows, decode = [], []

    def save(**extra):                     # after every case, so a cut-short run keeps its rows
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows, "decode": decode, **extra}, f, indent=1)
    for t in [int(x) for x in args.seq_lens.split(",") if x]:
        batch = max(1, TOKENS // t)
        for mode in ("fwd", "fwd+bwd"):
            rows.append(time_retention(batch, t, mode))
            print(rows[-1], flush=True)
            if baselines:
                for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
                    rows.append(time_sdpa(batch, t, mode, backend))
                    print(rows[-1], flush=True)
            save()
    for t in [int(x) for x in args.long.split(",") if x]:
        for mode in ("fwd", "fwd+bwd"):
            rows.append(time_retention(1, t, mode))
            print(rows[-1], flush=True)
            save()
    odd = []
    for t in [int(x) for x in args.odd.split(",") if x]:
        for mode in ("fwd", "fwd+bwd"):
            odd.append(time_retention(max(1, TOKENS // t), t, mode))
            print(odd[-1], flush=True)
            save(odd=odd)
    decode_batches = [int(x) for x in args.decode_batches.split(",") if x]
    if decode_batches:
        meta["copy_bytes_per_s"] = copy_bandwidth()
    for batch in decode_batches:
        # a bf16 copy of the state is what bf16 models' caches read
        copies = (False, True) if DTYPE == torch.bfloat16 else (False,)
        for buffered, read_copy in itertools.product((0, 62), copies):
            decode.append(time_decode(batch, buffered, read_copy, meta["copy_bytes_per_s"]))
            print(decode[-1], flush=True)
            save()
    breakdown = kernel_breakdown() if args.breakdown else []
    save(odd=odd, breakdown_t65536=breakdown)

    print(f"\n{meta['gpu']}  torch {meta['torch']}  triton {meta['triton']}  {meta['date']}")
    print(f"{args.dtype}, {HEADS} heads, d = e = {D_HEAD}, p = {DEG}, gated; median ms "
          "(TFLOP/s)")
    header = f"{'t':>9} {'batch':>5} {'mode':>8} | {'ours':>16} {'chunk':>5} {'err':>8} |" \
             f" {'cuDNN':>16} {'flash':>16}"
    print(header)
    print("-" * len(header))
    cells = {}
    for r in rows:
        cells.setdefault((r["t"], r["batch"], r["mode"]), {})[r["impl"]] = r
    for (t, batch, mode), c in cells.items():
        def fmt(r):
            return f"{r['ms']:8.3f} ({r['tflops']:5.1f})" if r else f"{'-':>16}"
        ours = c.get("power retention (triton)")
        err = f"{ours['rel_err_slice']:.1e}" if ours else "-"
        peak = f"  peak {ours['peak_gib']:.1f} GiB" if ours and ours["peak_gib"] else ""
        chunk = "" if not ours else "attn" if ours["chunk"] == host.ATTENTION else ours["chunk"]
        print(f"{t:>9} {batch:>5} {mode:>8} | {fmt(ours)} {chunk:>5} "
              f"{err:>8} | {fmt(c.get('cuDNN SDPA'))} {fmt(c.get('flash SDPA'))}{peak}")
    print("\nodd lengths: time per 1k tokens against the nearest round length")
    ours = [r for r in rows if r["impl"] == "power retention (triton)"]
    for r in odd:
        near = min((x for x in ours if x["mode"] == r["mode"]),
                   key=lambda x: abs(math.log(x["t"] / r["t"])))
        ratio = r["us_per_ktoken"] / near["us_per_ktoken"]
        print(f"t {r['t']:>7} batch {r['batch']:>3} {r['mode']:>8}: {r['us_per_ktoken']:8.1f} us"
              f" vs t {near['t']:>7} batch {near['batch']:>3}: {near['us_per_ktoken']:8.1f} us"
              f"  ({ratio:.2f}x)")
    if decode:
        print(f"\ndecode, one token per sequence per layer ({HEADS} heads, d = {D_HEAD}); "
              f"copy bandwidth {meta['copy_bytes_per_s'] / 1e12:.2f} TB/s")
    for r in decode:
        print(f"batch {r['batch']:>3} buffered {r['buffered']:>3} {r['state']:>9} state: graphed "
              f"{r['graphed_us']:7.1f}"
              f" us, eager {r['us']:7.1f} us (state read once at the copy bandwidth: "
              f"{r['state_read_us']:6.1f} us; err {r['rel_err']:.1e})")
    if breakdown:
        print("\nper kernel, one forward + backward at t = 65,536, batch 1 (torch.profiler)")
    for r in breakdown:
        print(f"{r['ms']:9.3f} ms  {r['calls']:3d} calls  {r['kernel']}")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
