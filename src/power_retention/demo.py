"""The main job on the embedded default: the op's forms agree, and what its state costs.

Runs the attention, recurrent and chunked forms of power retention on random data in float64
(with gating, GQA and an initial state), prints their largest relative disagreement, then the
state size per head for common head sizes and degrees.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .ops import (
    RetentionState,
    attention_reference,
    power_retention,
    recurrent_reference,
    state_bytes,
    sympow_dim,
)


def add_arguments(parser) -> None:
    parser.add_argument("--seq-len", type=int, default=300, help="tokens per sequence")
    parser.add_argument("--seed", type=int, default=0, help="random seed")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def run(args) -> int:
    torch.manual_seed(args.seed)
    B, T, Hq, Hk, d, e = 2, args.seq_len, 4, 2, 8, 6
    f64 = torch.float64
    q, k = torch.randn(B, T, Hq, d, dtype=f64), torch.randn(B, T, Hk, d, dtype=f64)
    v = torch.randn(B, T, Hk, e, dtype=f64)
    log_gate = F.logsigmoid(torch.randn(B, T, Hk, dtype=f64) + 3)
    print(f"Three forms of power retention, float64, B={B} T={T} Hq={Hq} Hk={Hk} d={d} e={e}, "
          "gated, with an initial state:")
    print(f"{'deg':>4} {'form':<24} {'rel. error vs attention form':>30} {'time':>9}")
    for deg in (2, 4):
        D = sympow_dim(d, deg)
        init = RetentionState(torch.randn(B, Hk, D, e, dtype=f64), torch.rand(B, Hk, D, dtype=f64))
        start = time.perf_counter()
        ref, ref_state = attention_reference(q, k, v, log_gate, deg=deg, initial_state=init)
        print(f"{deg:>4} {'attention (quadratic)':<24} {'-':>30} "
              f"{time.perf_counter() - start:>8.3f}s")
        start = time.perf_counter()
        rec, _ = recurrent_reference(q, k, v, log_gate, deg=deg, initial_state=init)
        print(f"{deg:>4} {'recurrent (token loop)':<24} {_relative(rec, ref):>30.2e} "
              f"{time.perf_counter() - start:>8.3f}s")
        for chunk_size in (16, 64, 256):
            start = time.perf_counter()
            out, state = power_retention(q, k, v, log_gate, deg=deg, chunk_size=chunk_size,
                                         initial_state=init, output_final_state=True)
            err = max(_relative(out, ref), _relative(state.S, ref_state.S))
            print(f"{deg:>4} {f'chunked, c={chunk_size}':<24} {err:>30.2e} "
                  f"{time.perf_counter() - start:>8.3f}s")
    print("\nState per KV head (fp32 S and z), independent of context length:")
    print(f"{'d':>5} {'deg':>4} {'D':>10} {'bytes/head':>14}")
    for d_ in (32, 64, 128):
        for deg in (2, 4):
            print(f"{d_:>5} {deg:>4} {sympow_dim(d_, deg):>10,} {state_bytes(d_, deg=deg):>14,}")
    return 0
