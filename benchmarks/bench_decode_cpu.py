"""Per-token decode time of a small power retention LM on the CPU, at several context lengths.

The context is prefilled in pieces through the chunked path (so a long prompt never needs
memory quadratic in its length), then ``--tokens`` single tokens are decoded one at a time and
timed. With power retention the time per token should not grow with the context: each token
reads a fixed-size state plus at most ``chunk_size`` buffered tokens. ``--time-mixing softmax``
runs the same backbone with a KV cache for comparison.

    PYTHONPATH=src python benchmarks/bench_decode_cpu.py
    PYTHONPATH=src python benchmarks/bench_decode_cpu.py --contexts 1024 16384 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

from power_retention.model import PowerRetentionConfig, PowerRetentionForCausalLM


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 16384],
                   help="context lengths (tokens already seen) at which to time decoding")
    p.add_argument("--tokens", type=int, default=64, help="decoded tokens timed per context")
    p.add_argument("--prefill-piece", type=int, default=1024,
                   help="tokens per prefill call while building the context")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--deg", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=64, help="decode fold size")
    p.add_argument("--time-mixing", default="power",
                   choices=["power", "softmax", "window", "linear"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = PowerRetentionConfig(
        vocab_size=1024, hidden_size=args.hidden_size, intermediate_size=4 * args.hidden_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, head_dim=args.head_dim,
        deg=args.deg, chunk_size=args.chunk_size, time_mixing=args.time_mixing,
        sliding_window=args.chunk_size)
    model = PowerRetentionForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"model: hidden {args.hidden_size}, {args.layers} layers, {args.heads} heads of "
          f"{args.head_dim}, deg {args.deg}, chunk {args.chunk_size}, {args.time_mixing}, "
          f"{params / 1e6:.2f}M parameters, {args.threads} thread(s), fp32, batch 1")
    print(f"{'context':>8} {'median ms/tok':>13} {'mean ms/tok':>11} {'cache MiB':>10}")
    for context in sorted(args.contexts):
        ids = torch.randint(0, config.vocab_size, (1, context + args.tokens))
        cache = None
        for start in range(0, context, args.prefill_piece):
            piece = ids[:, start:min(start + args.prefill_piece, context)]
            cache = model(piece, past_key_values=cache, use_cache=True).past_key_values
        for t in range(context, context + 4):                      # warm up the decode path
            model(ids[:, t:t + 1], past_key_values=cache)
        times = []
        for t in range(context + 4, context + args.tokens):
            begin = time.perf_counter()
            model(ids[:, t:t + 1], past_key_values=cache)
            times.append(time.perf_counter() - begin)
        times = torch.tensor(times) * 1e3
        print(f"{context:>8} {times.median():>13.2f} {times.mean():>11.2f} "
              f"{cache.nbytes() / 2**20:>10.2f}")


if __name__ == "__main__":
    main()
