"""Sweep of a decode step's product kernels (``model/fused.py``) at a model's sizes, weights
beyond L2.

    PYTHONPATH=src python benchmarks/sweep_products.py --rows 32 --out sweep_products.json

The 1.1B serving model's products (hidden 2048, 32 query / 8 KV heads of 64, MLP 8192, vocab
32064, bf16) for ``--rows`` rows of activations (the decode batch): q, k, v and the log-gates
(``project_qkv``), the MLP's gate and up with ``silu(gate) * up`` (``gate_up_silu``), its down
product with the residual add and the LM head (``linear``). Each kernel gets 16 layers' own
weights (1 to 2 GB, so they pass through L2 once per replay as in the model), is replayed from a
CUDA graph of its 16 launches, and is timed over the settings of the module's constants (weight
rows per program, K block, stages, warps, row blocks; coordinate descent from the current ones)
against cuBLAS (``F.linear`` and the PyTorch path's separate steps) and the time to read the
weights once at the copy bandwidth measured on this GPU (``--passes 0``: the current settings
only); each setting's output is checked against the default's. GPU only.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
import triton
from bench_op import copy_bandwidth
from torch import nn

from power_retention.model import fused

HIDDEN, HEADS, KV_HEADS, D_HEAD, INNER, VOCAB, LAYERS = 2048, 32, 8, 64, 8192, 32064, 16
KNOBS = ("PAIR_BLOCK", "K_BLOCK", "STAGES", "WARPS", "ROW_BLOCKS")


def linear(n_out: int, n_in: int, bias: bool = False) -> nn.Linear:
    layer = nn.Linear(n_in, n_out, bias=bias, device="cuda", dtype=torch.bfloat16)
    nn.init.normal_(layer.weight, std=n_in ** -0.5)
    return layer


def cases(rows: int) -> dict:
    """Per kernel: (fused call, PyTorch call, weights) for each of the 16 layers."""
    x = torch.randn(rows, 1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(rows, 1, INNER, device="cuda", dtype=torch.bfloat16)
    cos = torch.rand(rows, 1, D_HEAD, device="cuda", dtype=torch.bfloat16)
    sin = torch.rand(rows, 1, D_HEAD, device="cuda", dtype=torch.bfloat16)
    out = {"qkv": [], "gate_up": [], "down": [], "lm_head": []}
    for _ in range(LAYERS):
        q, k, v = linear(HEADS * D_HEAD, HIDDEN), linear(KV_HEADS * D_HEAD, HIDDEN), linear(
            KV_HEADS * D_HEAD, HIDDEN)
        g = linear(KV_HEADS, HIDDEN, bias=True)
        out["qkv"].append((
            lambda q=q, k=k, v=v, g=g: fused.project_qkv(x, q, k, v, g, cos, sin, HEADS,
                                                          KV_HEADS),
            lambda q=q, k=k, v=v, g=g: (q(x), k(x), v(x), F.logsigmoid(g(x).float())),
            [q.weight, k.weight, v.weight, g.weight]))
        gate, up = linear(INNER, HIDDEN), linear(INNER, HIDDEN)
        out["gate_up"].append((
            lambda gate=gate, up=up: fused.gate_up_silu(x, gate, up),
            lambda gate=gate, up=up: F.silu(gate(x)) * up(x), [gate.weight, up.weight]))
        down = linear(HIDDEN, INNER)
        out["down"].append((lambda down=down: fused.linear(h, down, x),
                            lambda down=down: x + down(h), [down.weight]))
    for _ in range(LAYERS // 4):                    # 4 heads of 131 MB: beyond L2 as well
        head = linear(VOCAB, HIDDEN)
        out["lm_head"].append((lambda head=head: fused.linear(x, head),
                               lambda head=head: head(x), [head.weight]))
    return out


def timed(fns) -> float:
    """Median us per call of ``fns`` replayed from one CUDA graph."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    return triton.testing.do_bench(graph.replay, warmup=10, rep=100,
                                   return_mode="median") * 1e3 / len(fns)


def rel_err(got, want) -> float:
    got, want = (got,) if torch.is_tensor(got) else got, (want,) if torch.is_tensor(want) else want
    return max(float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))
               for a, b in zip(got, want) if b is not None)


VALUES = {"PAIR_BLOCK": (16, 32, 64), "K_BLOCK": (64, 128, 256), "STAGES": (2, 3, 4, 5),
          "WARPS": (4, 8), "ROW_BLOCKS": ((16, 32, 64), (16, 64), (64,))}


def descend(name: str, layers: list, rows: int, passes: int, bandwidth: float) -> list[dict]:
    """Coordinate descent from the module's settings for one kernel: each knob in turn over
    its values, the others at the best so far, ``passes`` times over the knobs."""
    default = {knob: getattr(fused, knob) for knob in KNOBS}
    read_us = sum(w.numel() * w.element_size() for w in layers[0][2]) / bandwidth * 1e6
    cublas_us = timed([torch_fn for _, torch_fn, _ in layers])
    want = [fn() for fn, *_ in layers]
    print(f"{name} at {rows} rows: weights read once at the copy bandwidth {read_us:.1f} us, "
          f"cuBLAS path {cublas_us:.1f} us per layer", flush=True)
    results, seen = [], {}

    def measure(setting: dict) -> float:
        key = tuple(setting[k] for k in KNOBS)
        if key in seen:
            return seen[key]
        seen[key] = float("inf")
        if name == "qkv" and (D_HEAD // 2) % setting["PAIR_BLOCK"]:
            return seen[key]
        for knob, value in setting.items():
            setattr(fused, knob, value)
        try:
            err = max(rel_err(fn(), w) for (fn, *_), w in zip(layers, want))
            seen[key] = timed([fn for fn, *_ in layers])
        except Exception as exc:              # a setting that does not compile (resources)
            print(f"  {setting}: failed ({type(exc).__name__})", flush=True)
            return seen[key]
        finally:
            for knob, value in default.items():
                setattr(fused, knob, value)
        results.append({"kernel": name, "rows": rows, **setting, "us_per_layer": seen[key],
                        "read_us": read_us, "cublas_us": cublas_us, "rel_err_vs_default": err})
        print(f"  {setting}: {seen[key]:6.1f} us (err {err:.1e})", flush=True)
        return seen[key]

    best = dict(default)
    measure(best)
    for _ in range(passes):
        for knob in KNOBS:
            best[knob] = min(VALUES[knob], key=lambda v, knob=knob: measure({**best, knob: v}))
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[32])
    parser.add_argument("--kernels", nargs="+", default=["gate_up", "down", "qkv", "lm_head"],
                        choices=["gate_up", "down", "qkv", "lm_head"])
    parser.add_argument("--passes", type=int, default=2, help="passes over the knobs")
    parser.add_argument("--out", default="sweep_products.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows = [r for n in args.rows for name, layers in cases(n).items() if name in args.kernels
            for r in descend(name, layers, n, args.passes, bandwidth)]
    defaults = {name: getattr(fused, name) for name in KNOBS}
    for n, name in itertools.product(args.rows, args.kernels):
        mine = [r for r in rows if r["rows"] == n and r["kernel"] == name]
        if not mine:
            continue
        best = min(mine, key=lambda r: r["us_per_layer"])
        now = [r for r in mine if all(r[k] == defaults[k] for k in KNOBS)]
        print(f"{name} at {n} rows: default {now[0]['us_per_layer'] if now else float('nan'):.1f}"
              f" us, best {best['us_per_layer']:.1f} us "
              f"{ {k: best[k] for k in KNOBS} }, cuBLAS {best['cublas_us']:.1f}, "
              f"read {best['read_us']:.1f}")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
