"""Decode time per token and cache memory against context length: power retention vs softmax.

Two models of the project's, identical but for the time mixing (``time_mixing="power"`` and
``"softmax"``, the latter causal SDPA with a KV cache that grows), random weights. For each
context length ``t`` and batch size ``b`` the cache is brought to ``t`` tokens per sequence and
``--steps`` decode steps are timed (their mean: power retention folds its buffer into the state
every ``chunk_size`` tokens, so a window of at least one chunk is needed).

How the cache reaches ``t`` tokens: up to ``--prefill-max`` tokens by a real prefill of random
tokens. Beyond it, power retention takes the state of a real ``--prefill-max``-token prefill and
continues at position ``t`` (its state has the same size and the same cost whatever ``t`` is);
the transformer gets ``t`` random keys and values per layer (what its attention reads). A
transformer case whose KV cache does not fit ``--memory-limit-gb`` is reported as skipped.
Before timing, each model checks that prefill + one decode step gives the logits of one full
forward.

On a GPU the steps replay CUDA graphs (``--no-cuda-graphs``: eager), so the host's kernel
launches do not set the time: power retention through ``GraphedDecoder`` (the cache advancing
for real, one graph per buffer phase), the transformer as one captured step over a static
cache of exactly ``t + 1`` slots, as a ``StaticCache`` would hold.

    python benchmarks/bench_serving.py                     # GPU preset on a GPU, small on a CPU
    python benchmarks/bench_serving.py --preset small --contexts 1024 16384 --batch-sizes 1
    python benchmarks/bench_serving.py --output bench_serving.json

``--serving-load N`` (default 64 on the GPU preset) also sends N requests at once through the
serving engine (continuous batching, no HTTP) and reports its throughput and time to first
token. Prints a table last; ``--output`` writes every number as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from pathlib import Path

import torch
from transformers.cache_utils import DynamicLayer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from power_retention.model import (  # noqa: E402
    GraphedDecoder,
    PowerRetentionCache,
    PowerRetentionConfig,
    PowerRetentionForCausalLM,
    graphable,
)

PRESETS = {
    # about 1.1B parameters: Llama-3.2-1B-like widths, head_dim 64 (state 540 KB per KV head)
    "gpu": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=32064,
                chunk_size=64, contexts=[1024, 16384, 65536, 262144, 1048576],
                batch_sizes=[1, 16], prefill_max=16384, steps=128, dtype="bfloat16",
                serving_load=64),
    # a few million parameters: minutes on a 2-core CPU
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, head_dim=64, vocab_size=258,
                  chunk_size=64, contexts=[1024, 16384], batch_sizes=[1],
                  prefill_max=16384, steps=128, dtype="float32", serving_load=0),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_model(args, time_mixing: str) -> PowerRetentionForCausalLM:
    torch.manual_seed(0)
    config = PowerRetentionConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size, num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads, head_dim=args.head_dim,
        chunk_size=args.chunk_size, time_mixing=time_mixing, deg=args.deg,
        max_position_embeddings=max(args.contexts, default=0) + args.steps + 64)
    with torch.device(args.device):
        model = PowerRetentionForCausalLM(config)
    return model.to(DTYPES[args.dtype]).eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_ids(batch: int, length: int, vocab: int, device, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator).to(device)


@torch.inference_mode()
def prefill(model, ids: torch.Tensor, piece: int) -> tuple[PowerRetentionCache, torch.Tensor]:
    """Run ``ids [b, t]`` through the model in pieces; the cache and the last logits ``[b, V]``."""
    cache = PowerRetentionCache(model.config)
    for start in range(0, ids.shape[1], piece):
        out = model(ids[:, start:start + piece], past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
    return cache, out.logits[:, -1]


@torch.inference_mode()
def check_decode(model, device, tokens: int = 300) -> float:
    """Largest |logit difference| of prefill(tokens - 1) + one decode step vs one forward."""
    ids = random_ids(1, tokens, model.config.vocab_size, device, seed=2)
    full = model(ids, use_cache=False).logits[0, -1].float()
    cache, _ = prefill(model, ids[:, :-1], tokens)
    step = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits[0, -1].float()
    return float((full - step).abs().max())


def kv_bytes(config, context: int, batch: int, dtype: torch.dtype) -> int:
    item = torch.empty((), dtype=dtype).element_size()
    return (2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
            * context * batch * item)


@torch.inference_mode()
def build_cache(model, context: int, batch: int, args) -> PowerRetentionCache:
    """A cache holding ``context`` tokens for each of ``batch`` sequences (see the module doc)."""
    config, device = model.config, args.device
    if context <= args.prefill_max:
        ids = random_ids(1, context, config.vocab_size, device)
        cache, _ = prefill(model, ids, args.prefill_piece)
        if batch > 1:
            cache.batch_repeat_interleave(batch)
        return cache
    if config.time_mixing == "power":
        cache = build_cache(model, args.prefill_max, batch, args)
        for layer in cache.layers:
            layer.seen_tokens = context        # positions continue from ``context``
        return cache
    cache = PowerRetentionCache(config)
    generator = torch.Generator(device=device).manual_seed(3)
    shape = (batch, config.num_key_value_heads, context, config.head_dim)
    for layer in cache.layers:
        keys = torch.randn(shape, generator=generator, device=device, dtype=model.dtype)
        values = torch.randn(shape, generator=generator, device=device, dtype=model.dtype)
        layer.update(keys, values)
    return cache


class FixedContextLayer(DynamicLayer):
    """A transformer layer's KV cache of exactly ``context + 1`` slots whose last slot every
    step overwrites: the work of one decode step at this context with a static KV cache
    (preallocated, written in place, as transformers' ``StaticCache``), so the step can be
    captured in a CUDA graph and replayed."""

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys[:, :, -1:].copy_(key_states)
        self.values[:, :, -1:].copy_(value_states)
        return self.keys, self.values


def stepper(model, cache, context: int, batch: int, args):
    """``step(i)``: decode step ``i`` (position ``context + i``), returning the logits; eager,
    or replaying CUDA graphs with ``args.cuda_graphs``: power retention through
    ``GraphedDecoder`` (one graph per buffer phase, the cache advancing for real), the
    transformer as one captured step over a fixed-context cache (:class:`FixedContextLayer`)."""
    device = args.device
    token = random_ids(batch, 1, model.config.vocab_size, device, seed=4)

    def eager(i: int):
        positions = torch.full((batch, 1), context + i, device=device, dtype=torch.long)
        return model(token, position_ids=positions, past_key_values=cache, use_cache=True,
                     logits_to_keep=1).logits

    if not args.cuda_graphs:
        return eager
    if graphable(model):
        decoder, cpu_token = GraphedDecoder(model, cache), token[:, 0].cpu()
        return lambda i: decoder.step(cpu_token, [context + i] * batch)
    for layer in cache.layers:                  # one more slot, then written in place
        layer.keys = torch.cat([layer.keys, layer.keys[:, :, -1:]], 2)
        layer.values = torch.cat([layer.values, layer.values[:, :, -1:]], 2)
        layer.__class__ = FixedContextLayer
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for i in range(3):
            eager(i)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = eager(0)

    def replay(i: int):
        graph.replay()
        return logits
    return replay


@torch.inference_mode()
def time_decode(model, cache, context: int, batch: int, args) -> dict:
    """Mean seconds per decode step over ``args.steps`` steps after the warm-up (with CUDA
    graphs, at least two buffer cycles: every phase is then captured)."""
    device = args.device
    step = stepper(model, cache, context, batch, args)
    warmup = args.warmup
    if args.cuda_graphs and graphable(model):
        warmup = max(warmup, 2 * model.config.decode_chunk_size + 1)
    for i in range(warmup):
        step(i)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(args.steps):
        logits = step(warmup + i)
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    result = {"ms_per_step": seconds * 1e3, "tokens_per_s": batch / seconds,
              "cache_bytes": cache.nbytes(), "finite": bool(torch.isfinite(logits).all()),
              "cuda_graphs": args.cuda_graphs}
    if device.type == "cuda":
        result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        # the transformer's captured step hit a device-side index assert under the profiler
        # (2026-11-29, torch 2.11), so only power retention's steps are profiled
        if args.profile and graphable(model):
            # one whole buffer cycle, so the step that folds the buffer counts once in it
            result["profile"] = profile_steps(step, warmup + args.steps,
                                              model.config.decode_chunk_size)
    return result


def profile_steps(step, first: int, steps: int) -> dict:
    """Kernels per decode step and their GPU time (torch.profiler's CUDA activity, which also
    records the kernels a CUDA graph replays): what a step spends beyond its kernels' own time
    is launch gaps."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            step(first + i)
        torch.cuda.synchronize()
    kernels = []
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
        if us > 0 and not event.key.startswith("cuda"):          # runtime calls, not GPU work
            kernels.append((us, event.count, event.key[:70]))
    kernels.sort(reverse=True)
    return {"kernels_per_step": sum(c for _, c, _ in kernels) / steps,
            "kernel_ms_per_step": sum(us for us, _, _ in kernels) / steps / 1e3,
            "kernels": [{"kernel": name, "per_step": c / steps, "ms_per_step": us / steps / 1e3}
                        for us, c, name in kernels]}


def serving_load(model, kind: str, args) -> dict:
    """``--serving-load`` requests at once through the engine: all arrive together, each with a
    prompt of ``--load-prompt-tokens`` random tokens and ``--load-new-tokens`` greedy tokens."""
    from power_retention.data.tokenizer import ByteTokenizer
    from power_retention.serving import Engine, EngineLimits, RetentionBackend, SamplingParams
    from power_retention.serving.tokens import TextTokenizer

    backend = RetentionBackend(model, kind, cuda_graphs=args.cuda_graphs)
    count = args.serving_load
    engine = Engine(backend, TextTokenizer(ByteTokenizer()), EngineLimits(
        memory_budget_bytes=1 << 50, max_batch_size=count, max_concurrent_requests=count))
    params = SamplingParams(max_new_tokens=args.load_new_tokens, greedy=True, ignore_eos=True)
    done, first = threading.Semaphore(0), {}
    tokens = [0] * count

    def on_event(i, event):
        first.setdefault(i, time.perf_counter())
        tokens[i] += event.token is not None
        if event.finish_reason is not None:
            done.release()

    ids = random_ids(count, args.load_prompt_tokens, min(256, model.config.vocab_size), "cpu")
    engine.start()
    start = time.perf_counter()
    for i in range(count):
        engine.submit(ids[i].tolist(), params, lambda event, i=i: on_event(i, event))
    for _ in range(count):
        done.acquire()
    seconds = time.perf_counter() - start
    engine.stop()
    row = {"model": kind, "serving_load": count, "prompt_tokens": args.load_prompt_tokens,
           "new_tokens": args.load_new_tokens, "seconds": seconds,
           "generated_tokens": sum(tokens), "tokens_per_s": sum(tokens) / seconds,
           "mean_time_to_first_token_s": sum(first.values()) / count - start,
           "decode_steps": engine.steps, "largest_batch": engine.largest_batch}
    print(f"  serving load: {count} requests x {args.load_new_tokens} tokens in {seconds:.2f} s,"
          f" {row['tokens_per_s']:.1f} tokens/s, mean time to first token "
          f"{row['mean_time_to_first_token_s']:.2f} s, largest batch {engine.largest_batch}",
          flush=True)
    return row


def memory_limit_bytes(args) -> int:
    if args.memory_limit_gb is not None:
        return int(args.memory_limit_gb * 2**30)
    if args.device.type == "cuda":
        return int(0.85 * torch.cuda.get_device_properties(args.device).total_memory)
    return 8 * 2**30


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=["auto", *PRESETS], default="auto",
                        help="sizes and cases; 'auto': 'gpu' on a GPU, 'small' on a CPU. "
                             "Options below override the preset")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "chunk_size", "prefill_max",
                 "steps"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    parser.add_argument("--deg", type=int, default=2)
    parser.add_argument("--dtype", choices=list(DTYPES), default=None)
    parser.add_argument("--contexts", type=int, nargs="*", default=None,
                        help="context lengths to time decoding at (none: only --serving-load)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--models", nargs="+", choices=["power", "softmax"],
                        default=["power", "softmax"])
    parser.add_argument("--prefill-piece", type=int, default=4096,
                        help="tokens per forward call when prefilling")
    parser.add_argument("--warmup", type=int, default=8, help="untimed decode steps first")
    parser.add_argument("--memory-limit-gb", type=float, default=None,
                        help="skip transformer cases whose KV cache needs more; default 85%% of "
                             "the GPU's memory, 8 GiB on a CPU")
    parser.add_argument("--serving-load", type=int, default=None,
                        help="also send this many concurrent requests through the serving "
                             "engine (continuous batching) and report its throughput; 0: off")
    parser.add_argument("--load-prompt-tokens", type=int, default=512)
    parser.add_argument("--load-new-tokens", type=int, default=128)
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="time eager decode steps (on a GPU the default replays CUDA "
                             "graphs: the host's launch overhead out of the loop)")
    parser.add_argument("--profile", action="store_true",
                        help="on a GPU: kernels per power retention decode step and their time "
                             "(torch.profiler)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch)")
    parser.add_argument("--output", default=None, help="write all results here as JSON")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.cuda_graphs = args.cuda_graphs and args.device.type == "cuda"
    preset = args.preset if args.preset != "auto" else (
        "gpu" if args.device.type == "cuda" else "small")
    for key, value in PRESETS[preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.preset = preset
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.type == "cuda":
        hardware = torch.cuda.get_device_name(args.device)
    else:
        hardware = f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    print(f"bench_serving: preset {args.preset} on {args.device} ({hardware}), "
          f"torch {torch.__version__}, {args.dtype}, "
          f"{'CUDA graphs' if args.cuda_graphs else 'eager'} decode", flush=True)
    limit = memory_limit_bytes(args)
    rows = []

    def save() -> None:                  # after every case, so a cut-short run keeps its rows
        if args.output:
            record = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                      "device": str(args.device), "hardware": hardware,
                      "torch": torch.__version__,
                      "settings": {k: (str(v) if isinstance(v, torch.device) else v)
                                   for k, v in vars(args).items()},
                      "results": rows}
            Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    for kind in args.models:
        model = build_model(args, kind)
        params = sum(p.numel() for p in model.parameters())
        error = check_decode(model, args.device)
        print(f"{kind}: {params / 1e6:.1f}M parameters; prefill + decode vs full forward: "
              f"max |logit diff| {error:.2e}", flush=True)
        if args.serving_load:
            rows.append(serving_load(model, kind, args))
            save()
        for context in args.contexts:
            for batch in args.batch_sizes:
                row = {"model": kind, "context": context, "batch": batch,
                       "parameters": params, "check_max_abs_logit_diff": error}
                need = kv_bytes(model.config, context + args.warmup + args.steps, batch,
                                model.dtype)
                # eager, a growing KV cache is copied on append (twice its size at once);
                # graphed, each layer's gets one more slot once (one layer's copy at a time)
                weights = params * model.dtype.itemsize
                copies = 1 + 1 / model.config.num_hidden_layers if args.cuda_graphs else 2
                if kind == "softmax" and copies * need + weights > limit:
                    row["skipped"] = f"KV cache of {need / 2**30:.1f} GiB does not fit"
                    print(f"  t={context:>8,} b={batch:>3}: skipped ({row['skipped']})",
                          flush=True)
                    rows.append(row)
                    save()
                    continue
                start = time.perf_counter()
                cache = build_cache(model, context, batch, args)
                row["fill_seconds"] = time.perf_counter() - start
                row.update(time_decode(model, cache, context, batch, args))
                peak = row.get("peak_allocated_bytes")
                print(f"  t={context:>8,} b={batch:>3}: {row['ms_per_step']:8.2f} ms/step "
                      f"{row['tokens_per_s']:9.1f} tokens/s, cache "
                      f"{row['cache_bytes'] / 2**20:10.1f} MiB"
                      + ("" if peak is None else f", peak allocated {peak / 2**30:.2f} GiB"),
                      flush=True)
                if "profile" in row:
                    p = row["profile"]
                    print(f"      {p['kernels_per_step']:.0f} kernels per step, "
                          f"{p['kernel_ms_per_step']:.2f} ms of kernel time; top: "
                          + "; ".join(f"{t['ms_per_step'] * 1e3:.0f} us {t['kernel'][:40]}"
                                      for t in p["kernels"][:5]), flush=True)
                rows.append(row)
                save()
                del cache
                if args.device.type == "cuda":
                    torch.cuda.empty_cache()
        del model
    print_table(rows)
    return rows


def print_table(rows: list[dict]) -> None:
    """One line per (context, batch): both models, the power model's time relative to its
    shortest context (flatness), and the transformer's time over the power model's (speed-up)."""
    rows = [r for r in rows if "context" in r]
    timed = {(r["model"], r["context"], r["batch"]): r for r in rows if "ms_per_step" in r}
    print("\n| context | batch | power ms/token-step | power cache MiB | vs shortest context "
          "| softmax ms/token-step | softmax cache MiB | softmax / power |")
    print("|---|---|---|---|---|---|---|---|")
    for context, batch in sorted({(r["context"], r["batch"]) for r in rows}):
        power, soft = timed.get(("power", context, batch)), timed.get(("softmax", context, batch))
        first = min((r for r in timed.values() if r["model"] == "power" and r["batch"] == batch),
                    key=lambda r: r["context"], default=None)
        cells = [f"{context:,}", str(batch)]
        if power:
            cells += [f"{power['ms_per_step']:.2f}", f"{power['cache_bytes'] / 2**20:.1f}",
                      f"{power['ms_per_step'] / first['ms_per_step']:.2f}x"]
        else:
            cells += ["-", "-", "-"]
        if soft:
            cells += [f"{soft['ms_per_step']:.2f}", f"{soft['cache_bytes'] / 2**20:.1f}",
                      f"{soft['ms_per_step'] / power['ms_per_step']:.2f}x" if power else "-"]
        else:
            cells += ["does not fit" if ("softmax", context, batch) not in timed and any(
                r["model"] == "softmax" for r in rows) else "-", "-", "-"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
