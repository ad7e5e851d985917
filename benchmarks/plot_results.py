"""Figures (PNG) of the JSON that ``bench_op.py`` and ``bench_serving.py`` write.

    python benchmarks/plot_results.py bench_op.json bench_serving.json --out-dir docs/figures

``bench_op.json`` gives ``bench_op.png``: time per 65,536 tokens against the sequence length,
forward and forward + backward, the Triton kernels beside cuDNN and flash attention (a flat line
is a cost linear in the length), with issue 3's targets at 64k. ``bench_serving`` files (several
are merged: a context sweep and a batch sweep, say) give ``bench_serving.png``: time per decode
step against the context for each model and batch, against the batch at the context with
the most (the transformer over power retention written beside), and the cache's size.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TOKENS = 65_536
TARGETS_MS = {"fwd": 2.5, "fwd+bwd": 8.0}          # issue 3, at t = 65,536
STYLE = {"power": "tab:blue", "softmax": "tab:red"}


def tokens(n: int) -> str:
    return f"{n // 2**20}M" if n >= 2**20 and n % 2**20 == 0 else (
        f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n))


def token_axis(ax, values) -> None:
    ax.set_xscale("log")
    ax.set_xticks(sorted(values))
    ax.set_xticklabels([tokens(v) for v in sorted(values)])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def finish(fig, title: str, path: Path) -> None:
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_op(record: dict, path: Path) -> None:
    """One panel per mode: ms per 65,536 tokens against t, a line per implementation."""
    meta, rows = record["meta"], record["rows"]
    modes = [m for m in TARGETS_MS if any(r["mode"] == m for r in rows)]
    if not modes:
        raise ValueError("no forward or forward + backward rows to plot")
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for impl in sorted({r["impl"] for r in rows}):
            pts = sorted((r["t"], r["ms"] * TOKENS / (r["batch"] * r["t"]))
                         for r in rows if r["impl"] == impl and r["mode"] == mode)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.plot([TOKENS], [TARGETS_MS[mode]], marker="*", markersize=14, linestyle="none",
                color="black", label=f"target at 64k ({TARGETS_MS[mode]} ms)")
        ax.set(yscale="log", xlabel="sequence length t (batch = 65,536 / t; batch 1 beyond)",
               ylabel="ms per 65,536 tokens", title=mode)
        token_axis(ax, {r["t"] for r in rows})
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    finish(fig, f"{meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, "
                f"{meta['date'][:10]}: {meta['dtype']}, {meta['heads']} heads, d = {meta['d']}, "
                f"p = {meta['deg']}", path)


def plot_serving(records: list[dict], path: Path) -> None:
    """Decode time per step against the context and against the batch, and cache size."""
    rows = [r for rec in records for r in rec["results"] if "ms_per_step" in r]
    if not rows:
        raise ValueError("no timed decode cases to plot")
    fig, (by_context, by_batch, cache) = plt.subplots(1, 3, figsize=(17, 4.5))
    batches = sorted({r["batch"] for r in rows})
    for model in sorted({r["model"] for r in rows}):
        for batch in batches:
            pts = sorted((r["context"], r["ms_per_step"], r["cache_bytes"] / 2**20)
                         for r in rows if r["model"] == model and r["batch"] == batch)
            if len(pts) > 1:
                style = dict(color=STYLE.get(model), marker="o",
                             alpha=0.35 + 0.65 * (batch / batches[-1]))
                by_context.plot([p[0] for p in pts], [p[1] for p in pts],
                                label=f"{model}, batch {batch}", **style)
                cache.plot([p[0] for p in pts], [p[2] for p in pts],
                           label=f"{model}, batch {batch}", **style)
    batches_at = {c: len({r["batch"] for r in rows if r["context"] == c})
                  for c in {r["context"] for r in rows}}
    if max(batches_at.values()) > 1:             # the context with most batches, the longest
        context = max(batches_at, key=lambda c: (batches_at[c], c))
        at = {(r["model"], r["batch"]): r["ms_per_step"] for r in rows if r["context"] == context}
        for model in sorted({m for m, _ in at}):
            pts = sorted((b, ms) for (m, b), ms in at.items() if m == model)
            by_batch.plot(*zip(*pts), marker="o", color=STYLE.get(model), label=model)
        by_batch.set_xticks(sorted({b for _, b in at}))
        for (model, batch), ms in at.items():
            if model == "softmax" and ("power", batch) in at:
                by_batch.annotate(f"{ms / at[('power', batch)]:.1f}x", (batch, ms),
                                  textcoords="offset points", xytext=(0, 6), ha="center",
                                  fontsize=8)
        by_batch.set(xlabel="batch (sequences decoding together)", ylabel="ms per decode step",
                     title=f"context {context:,} (transformer / power retention)")
        by_batch.legend(fontsize=8)
    by_context.set(yscale="log", xlabel="context (tokens)", ylabel="ms per decode step",
                   title="decode step against context")
    cache.set(yscale="log", xlabel="context (tokens)", ylabel="cache per batch (MiB)",
              title="cache memory")
    for ax in (by_context, cache):
        token_axis(ax, {r["context"] for r in rows})
    by_context.set_ylim(bottom=10 ** math.floor(math.log10(min(r["ms_per_step"] for r in rows))))
    by_context.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    by_context.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    for ax in (by_context, by_batch, cache):
        ax.grid(True, which="both", alpha=0.3)
    by_context.legend(fontsize=7)
    first, params = records[0], rows[0]["parameters"]
    size = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
    finish(fig, f"{first.get('hardware', first['device'])}, torch {first['torch']}, "
                f"{first['date'][:10]}: {size}-parameter models, {first['settings']['dtype']}",
           path)


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path,
                        help="JSON written by bench_op.py (--out) or bench_serving.py (--output)")
    parser.add_argument("--out-dir", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    records = [(f, json.loads(f.read_text())) for f in args.files]
    op = [r for _, r in records if "meta" in r and "rows" in r]
    serving = [r for _, r in records if "results" in r]
    unknown = [str(f) for f, r in records if r not in op and r not in serving]
    if unknown:
        parser.error(f"not a bench_op.py or bench_serving.py result: {', '.join(unknown)}")
    if len(op) > 1:
        parser.error("give one bench_op.py result at a time")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if op:
        written.append(args.out_dir / "bench_op.png")
        plot_op(op[0], written[-1])
    if serving:
        written.append(args.out_dir / "bench_serving.png")
        plot_serving(serving, written[-1])
    for path in written:
        print(f"written: {path}")
    return written


if __name__ == "__main__":
    main()
