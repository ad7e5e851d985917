"""Sweep of ``decode_kernel``'s launch settings at a model's decoding shape, states beyond L2.

    PYTHONPATH=src python benchmarks/sweep_decode.py --batches 32 64 --out sweep_decode.json
    PYTHONPATH=src python benchmarks/sweep_decode.py --state bfloat16    # a bf16 model's copy

One decode step of a 16-layer model's power layers (8 KV heads x 4 queries, d = e = 64, bf16,
``--buffered`` tokens in a 64-slot buffer): each layer its own state (float32, or the bfloat16
copy a bf16 model's cache reads), so the 16 states (2.2 GB at batch 32 in float32) pass
through L2 once per step as in the model. Every setting (rows per block
``R``, programs per multiprocessor, pipeline stages, warps) is replayed from a CUDA graph of
the 16 layers' launches and checked against ``host.decode_into``; the reference time is one
read of the states by ``torch.sum``. GPU only.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton

from power_retention.ops.triton import host, kernels

LAYERS, HK, G, D_HEAD, CAPACITY = 16, 8, 4, 64, 64


def launcher(q, k, v, g, slots, S, z, held, R, per_sm, stages, warps):
    """``decode_kernel`` (and ``decode_finish_kernel``) as ``host.decode_into`` launches it,
    with the block rows, programs per multiprocessor, stages and warps given."""
    B, d, e = q.shape[0], D_HEAD, D_HEAD
    D = d * (d + 1) // 2
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    blocks = triton.cdiv(D, R)
    split = max(1, min(blocks, round(per_sm * sms / (B * HK))))
    o = q.new_empty(B, 1, HK * G, e)
    part = torch.empty(B, HK * G, split, 64 + 1, device=q.device)
    out = o if split == 1 else part

    def run():
        kernels.decode_kernel[(B * HK, split)](
            q, k, v, g, *slots, S, z, out, None, None, d ** -0.5, held, HK, d, e, D, CAPACITY,
            G=G, GP=G, LP=CAPACITY, DK=d, R=R, NBLK=triton.cdiv(blocks, split), EP=64,
            SPLIT=split, DEG=2, STAGES=stages, PRECISION="tf32", num_warps=warps)
        if split > 1:
            kernels.decode_finish_kernel[(B * HK * G,)](part, o, e, NT=split,
                                                        NTP=max(16, triton.next_power_of_2(split)),
                                                        EP=64)
        return o
    return run


def sweep(batch: int, buffered: int, state_dtype: torch.dtype) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    D = D_HEAD * (D_HEAD + 1) // 2

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", generator=gen).to(dtype)
    layers = []
    for _ in range(LAYERS):
        q, k, v = randn(batch, 1, HK * G, D_HEAD), randn(batch, 1, HK, D_HEAD), randn(
            batch, 1, HK, D_HEAD)
        g = -torch.rand(batch, 1, HK, device="cuda", generator=gen) * 0.1
        slots = [randn(batch, CAPACITY, HK, D_HEAD), randn(batch, CAPACITY, HK, D_HEAD),
                 -torch.rand(batch, CAPACITY, HK, device="cuda", generator=gen) * 0.1]
        S = (randn(batch, HK, D, D_HEAD, dtype=torch.float32) * 0.01).to(state_dtype)
        z = torch.rand(batch, HK, D, device="cuda", generator=gen)
        layers.append((q, k, v, g, slots, S, z))
    expected = [host.decode_into(q, k, v, g, S, z, *slots, buffered, D_HEAD ** -0.5)
                for q, k, v, g, slots, S, z in layers]

    def timed(fns) -> float:
        for fn in fns:
            fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for fn in fns:
                fn()
        return triton.testing.do_bench(graph.replay, warmup=10, rep=100,
                                       return_mode="median") * 1e3 / LAYERS

    read_us = timed([lambda S=S: S.sum() for *_, S, _ in layers])
    rows = []
    for R, per_sm, stages, warps in itertools.product((32, 64), (2, 4, 8), (3, 4), (4, 8)):
        runs = [launcher(q, k, v, g, slots, S, z, buffered, R, per_sm, stages, warps)
                for q, k, v, g, slots, S, z in layers]
        err = max(float((run().float() - want.float()).norm() / want.float().norm())
                  for run, want in zip(runs, expected))
        us = timed(runs)
        rows.append({"batch": batch, "state": str(state_dtype), "R": R, "per_sm": per_sm,
                     "stages": stages, "warps": warps, "us_per_layer": us, "read_us": read_us,
                     "rel_err": err})
        print(f"batch {batch:3d} R {R:3d} per SM {per_sm} stages {stages} warps {warps}: "
              f"{us:7.1f} us per layer (one read {read_us:.1f} us), rel. err {err:.1e}",
              flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--buffered", type=int, default=30, help="tokens in the buffer")
    parser.add_argument("--state", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of the states the steps read")
    parser.add_argument("--out", default="sweep_decode.json")
    args = parser.parse_args(argv)
    state_dtype = getattr(torch, args.state)
    rows = [row for batch in args.batches for row in sweep(batch, args.buffered, state_dtype)]
    for batch in args.batches:
        best = min((r for r in rows if r["batch"] == batch), key=lambda r: r["us_per_layer"])
        print(f"best at batch {batch}: {best}")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
