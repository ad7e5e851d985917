"""Throughput of the op's PyTorch path on the CPU (tokens/s, forward and forward+backward).

    PYTHONPATH=src python benchmarks/bench_op_cpu.py --seq-len 4096 --heads 4 --head-dim 32
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from power_retention import power_retention


def _median_seconds(fn, repeats: int) -> float:
    fn()                                   # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=4, help="query and KV heads")
    parser.add_argument("--head-dim", type=int, default=32, help="d = e")
    parser.add_argument("--deg", type=int, default=2)
    parser.add_argument("--chunk-sizes", type=int, nargs="*", default=[0, 64, 128, 256, 512],
                        help="chunk sizes to time; 0 is the op's own choice")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    B, T, H, d = args.batch, args.seq_len, args.heads, args.head_dim
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, d, generator=gen) for _ in range(3))
    log_gate = F.logsigmoid(torch.randn(B, T, H, generator=gen) + 4)
    grad = torch.randn(B, T, H, d, generator=gen)
    rows = []
    for chunk_size in (c or None for c in args.chunk_sizes):
        def forward(c=chunk_size):
            with torch.no_grad():
                power_retention(q, k, v, log_gate, deg=args.deg, chunk_size=c)

        def forward_backward(c=chunk_size):
            xs = [x.detach().requires_grad_() for x in (q, k, v, log_gate)]
            power_retention(*xs, deg=args.deg, chunk_size=c).backward(grad)

        fwd = _median_seconds(forward, args.repeats)
        both = _median_seconds(forward_backward, args.repeats)
        rows.append({"chunk_size": chunk_size or "default", "fwd_tokens_per_s": B * T / fwd,
                     "fwd_bwd_tokens_per_s": B * T / both, "fwd_ms": fwd * 1e3,
                     "fwd_bwd_ms": both * 1e3})
    setup = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
             "cpu": platform.processor() or platform.machine(), "threads": args.threads,
             "B": B, "T": T, "Hq": H, "Hk": H, "d": d, "e": d, "deg": args.deg,
             "dtype": "float32", "gated": True}
    print(json.dumps({"setup": setup, "results": rows}))
    print(f"\n{'chunk':>8} {'fwd tok/s':>12} {'fwd+bwd tok/s':>15} {'fwd ms':>9} "
          f"{'fwd+bwd ms':>11}")
    for r in rows:
        print(f"{r['chunk_size']!s:>8} {r['fwd_tokens_per_s']:>12,.0f} "
              f"{r['fwd_bwd_tokens_per_s']:>15,.0f} {r['fwd_ms']:>9.1f} {r['fwd_bwd_ms']:>11.1f}")


if __name__ == "__main__":
    main()
