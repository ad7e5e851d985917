"""The ``icl`` command: in-context learning curves (DESIGN.md section 5).

For each model, windows of ``--context`` tokens are cut from the validation documents (each
starting at a document start or a multiple of the context inside one, never crossing
documents), and the loss of predicting token ``i + 1`` from tokens ``0..i`` is averaged over
windows: position ``i + 1`` is the number of tokens of context. Positions are grouped into
log-spaced bins; the lowest bin mean is the best-context loss. Writes ``icl.csv`` (one row per
model and bin) and ``icl.png`` (the curves overlaid, position on a log axis).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import document_windows, load_corpus, load_tokenizer
from ..data.tokenizer import TOKENIZER_FILE


@torch.no_grad()
def position_losses(model, windows: np.ndarray, batch_size: int = 4,
                    device: torch.device | str = "cpu", dtype: torch.dtype | None = None
                    ) -> np.ndarray:
    """Mean next-token loss ``[T - 1]`` (nats) at each context position over ``windows [n, T]``;
    entry ``i`` is the loss of token ``i + 1`` given ``i + 1`` tokens of context."""
    model.eval()
    total = torch.zeros(windows.shape[1] - 1, dtype=torch.float64)
    for start in range(0, len(windows), batch_size):
        batch = torch.from_numpy(windows[start:start + batch_size].astype(np.int64)).to(device)
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            logits = model(input_ids=batch).logits[:, :-1]
        loss = F.cross_entropy(logits.float().transpose(1, 2), batch[:, 1:], reduction="none")
        total += loss.double().sum(0).cpu()
    return (total / len(windows)).numpy()


def log_bins(length: int, bins: int) -> list[tuple[int, int]]:
    """Log-spaced bins ``[lo, hi)`` of context positions ``1..length`` (at least one each)."""
    edges = np.unique(np.round(np.geomspace(1, length + 1, bins + 1)).astype(int))
    return [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:])]


def binned(losses: np.ndarray, bins: int) -> list[dict]:
    """Bin the per-position losses (``losses[i]`` at context ``i + 1``)."""
    rows = []
    for lo, hi in log_bins(len(losses), bins):
        rows.append({"context_lo": lo, "context_hi": hi - 1,
                     "context_mid": float(np.sqrt(lo * (hi - 1))),
                     "loss": float(losses[lo - 1:hi - 1].mean()), "positions": hi - lo})
    return rows


def best_context(rows: list[dict]) -> dict:
    """The bin with the lowest mean loss."""
    return min(rows, key=lambda r: r["loss"])


def _tokenizer_for(folder: Path, fallback: str):
    if (folder / TOKENIZER_FILE).exists() or (folder / "tokenizer_config.json").exists():
        return load_tokenizer(folder)
    return load_tokenizer(fallback)


def plot(curves: dict[str, list[dict]], path: str | Path, title: str,
         mark: tuple[int, str] | None = None) -> None:
    """The curves on a log position axis, each one's best bin starred; ``mark``: a dashed
    vertical line at a context position, with its legend label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in curves.items():
        x = [r["context_mid"] for r in rows]
        line, = ax.plot(x, [r["loss"] for r in rows], marker=".", label=name)
        best = best_context(rows)
        ax.scatter([best["context_mid"]], [best["loss"]], color=line.get_color(), marker="*",
                   s=90, zorder=3)
    if mark is not None:
        ax.axvline(mark[0], color="k", ls="--", lw=1, label=mark[1])
    ax.set_xscale("log")
    ax.set_xlabel("context position (tokens seen)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate_models(models: list[str], labels: list[str] | None = None, *, context: int = 256,
                    windows: int = 16, batch_size: int = 4, bins: int = 16,
                    corpus: list[str] | None = None, validation_fraction: float | None = None,
                    tokenizer: str = "bytes", device: str = "auto",
                    out: str | Path = "icl") -> dict[str, list[dict]]:
    """Curves for several models; writes ``out/icl.csv`` and ``out/icl.png``; returns the rows
    per label. A run folder stands for its latest checkpoint; its corpus and validation split
    are taken from its training arguments unless given."""
    from transformers.utils import logging as hf_logging

    from ..training import checkpoint, presets

    hf_logging.disable_progress_bar()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device.startswith("cuda") else None
    labels = labels or [Path(m).name for m in models]
    if len(labels) != len(models):
        raise ValueError(f"{len(labels)} labels for {len(models)} models")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    curves = {}
    for label, model_path in zip(labels, models):
        folder = checkpoint.resolve_model_folder(model_path)
        trained = (checkpoint.load_train_args(folder)
                   if (folder / checkpoint.TRAIN_ARGS).exists() else {})
        source = corpus or trained.get("corpus", ["stdlib"])
        fraction = validation_fraction if validation_fraction is not None else trained.get(
            "validation_fraction", 0.05)
        tok = _tokenizer_for(folder, tokenizer)
        docs = load_corpus(source[0] if len(source) == 1 else source, fraction).validation
        data = document_windows(docs, tok, context, windows)
        model = presets.load_model(folder).to(device)
        losses = position_losses(model, data, batch_size, device, dtype)
        curves[label] = binned(losses, bins)
        best = best_context(curves[label])
        print(f"{label}: {len(data)} windows of {context}, mean loss {losses.mean():.4f}, "
              f"best-context loss {best['loss']:.4f} at {best['context_lo']}-"
              f"{best['context_hi']} tokens, last bin {curves[label][-1]['loss']:.4f}")
        del model
    with (out / "icl.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "context_lo", "context_hi", "context_mid", "loss",
                         "positions", "best"])
        for label, rows in curves.items():
            best = best_context(rows)
            for r in rows:
                writer.writerow([label, r["context_lo"], r["context_hi"],
                                 f"{r['context_mid']:.1f}", f"{r['loss']:.6f}", r["positions"],
                                 int(r is best)])
    plot(curves, out / "icl.png", f"In-context learning, {context:,}-token windows")
    print(f"wrote {out / 'icl.csv'} and {out / 'icl.png'}")
    return curves


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("models", nargs="+", help="run folders (their latest checkpoint) or transformers model "
                                "folders")
    a("--labels", nargs="+", default=None, help="curve names; None: the folder names")
    a("--context", type=int, default=256, help="window length in tokens")
    a("--windows", type=int, default=64, help="validation windows averaged")
    a("--batch-size", type=int, default=8, help="windows per forward pass")
    a("--bins", type=int, default=16, help="log-spaced bins of context position")
    a("--corpus", nargs="+", default=None,
      help="validation corpus; None: the run's training corpus, else 'stdlib'")
    a("--validation-fraction", type=float, default=None,
      help="held-out share of files; None: the run's, else 0.05")
    a("--tokenizer", default="bytes",
      help="tokenizer for model folders that carry none: 'bytes' or a tokenizer folder")
    a("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    a("--out", default="icl", help="folder for icl.csv and icl.png")


def run(args: argparse.Namespace) -> int:
    evaluate_models(args.models, args.labels, context=args.context, windows=args.windows,
                    batch_size=args.batch_size, bins=args.bins, corpus=args.corpus,
                    validation_fraction=args.validation_fraction, tokenizer=args.tokenizer,
                    device=args.device, out=args.out)
    return 0
