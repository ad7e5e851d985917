"""The main job on the embedded default: metamorphosis of a softmax transformer, end to end.

1. Train a small Llama (transformers' own ``LlamaForCausalLM``, softmax attention) on the
   embedded corpus with the ``train`` loop, or reuse its checkpoint when the same run exists.
2. Metamorphose it: same weights, power retention instead of softmax attention, new gates near 1.
3. Fine-tune the converted model with each chosen recipe, and train a power retention model of
   the same shape from scratch on as many tokens as one fine-tuning run.
4. Measure validation losses, in-context learning curves out to several times the source's
   training context, and decode time per token and cache memory against context length.
5. Write a report folder: ``report.md``, ``loss.png``, ``icl.png``, ``decode.png``,
   ``icl.csv`` and ``results.json``; the runs themselves go to ``OUT/runs``.

``--preset cpu`` (default) fits in 10 minutes on a 2-core CPU; ``tiny`` is the CI check;
``gpu`` is the larger experiment (see docs/metamorphosis.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .data import ByteTokenizer, document_windows, encode_documents, load_corpus
from .data.corpus import stdlib_root
from .evaluation.icl import best_context, binned, position_losses
from .evaluation.icl import plot as plot_icl
from .metamorphosis import RECIPES, metamorphose
from .metamorphosis.finetune import FinetuneConfig, finetune
from .training import checkpoint, distributed
from .training.presets import padded_vocab
from .training.train import TrainConfig, evaluate, train


@dataclass(frozen=True)
class Preset:
    """Sizes and budgets of one demo run."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    context: int                      # the source's training context
    batch_size: int
    source_steps: int
    finetune_steps: int
    attention_steps: int              # first stage of attention-transfer (within the steps)
    source_lr: float
    finetune_lr: float
    chunk_size: int
    eval_batches: int
    icl_factor: int                   # ICL windows of icl_factor * context tokens
    icl_windows: int
    decode_contexts: tuple[int, ...]
    decode_tokens: int
    recipes: tuple[str, ...]
    corpus: str = "stdlib"            # "stdlib", or a package folder of it for a quick check
    validation_fraction: float = 0.05
    device: str = "cpu"


PRESETS: dict[str, Preset] = {
    # CI: seconds, a package of the stdlib as corpus
    "tiny": Preset(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=64, context=32, batch_size=4,
                   source_steps=12, finetune_steps=3, attention_steps=1, source_lr=3e-3,
                   finetune_lr=1e-3, chunk_size=16, eval_batches=1, icl_factor=4,
                   icl_windows=2, decode_contexts=(16, 64), decode_tokens=2,
                   recipes=RECIPES, corpus="email", validation_fraction=0.2),
    # the default: within 10 minutes on a 2-core CPU
    "cpu": Preset(hidden_size=128, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, intermediate_size=352, context=256, batch_size=8,
                  source_steps=300, finetune_steps=36, attention_steps=6, source_lr=3e-3,
                  finetune_lr=1e-3, chunk_size=32, eval_batches=4, icl_factor=4,
                  icl_windows=24, decode_contexts=(64, 256, 1024, 4096), decode_tokens=8,
                  recipes=RECIPES),
    # one GPU: the figures of the issue (docs/metamorphosis.md)
    "gpu": Preset(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, intermediate_size=1408, context=1024, batch_size=32,
                  source_steps=3000, finetune_steps=150, attention_steps=50, source_lr=1e-3,
                  finetune_lr=3e-4, chunk_size=128, eval_batches=16, icl_factor=8,
                  icl_windows=32, decode_contexts=(1024, 4096, 16384, 65536),
                  decode_tokens=32, recipes=RECIPES, device="cuda"),
}

PREFILL_PIECE = 2048                  # tokens per forward call when filling a cache
REPORT_FILES = ("report.md", "loss.png", "icl.png", "decode.png", "icl.csv", "results.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--preset", choices=sorted(PRESETS), default="cpu",
      help="sizes and budgets: tiny (CI), cpu (10 minutes on 2 cores), gpu")
    a("--out", default="runs/demo", help="report folder (the runs go to OUT/runs)")
    a("--recipes", nargs="+", choices=RECIPES, default=None,
      help="fine-tuning recipes to run and compare (default: the preset's)")
    a("--source-steps", type=int, default=None, help="override the source's training steps")
    a("--finetune-steps", type=int, default=None, help="override the fine-tuning steps")
    a("--device", default=None, help="'cpu' or 'cuda' (default: the preset's)")
    a("--no-progress", dest="progress", action="store_false", help="no progress bars")


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def cache_bytes(cache) -> int:
    """Bytes a generation cache holds: our ``nbytes()``, or the keys and values of a
    transformers ``DynamicCache``."""
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    return sum(t.numel() * t.element_size() for layer in cache.layers
               if getattr(layer, "is_initialized", False) for t in (layer.keys, layer.values))


@torch.no_grad()
def decode_profile(model, stream: np.ndarray, contexts: tuple[int, ...], new_tokens: int,
                   device: torch.device) -> list[dict]:
    """For each context length: prefill that many validation tokens (in pieces of
    ``PREFILL_PIECE``: a softmax model's attention over a whole long prompt at once would need
    memory quadratic in it), then time ``new_tokens`` greedy steps one token at a time; the
    median time per token and the cache's bytes after."""
    model.eval()
    rows = []
    for length in contexts:
        prompt = torch.from_numpy(stream[:length].astype(np.int64))[None].to(device)
        cache = None
        for start in range(0, length, PREFILL_PIECE):
            out = model(input_ids=prompt[:, start:start + PREFILL_PIECE], past_key_values=cache,
                        use_cache=True)
            cache = out.past_key_values
        times = []
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            cache = out.past_key_values
        rows.append({"context": length, "ms_per_token": 1e3 * statistics.median(times),
                     "cache_bytes": cache_bytes(cache)})
    return rows


def _load(folder: Path, device: torch.device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device)


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Figures and report
# ---------------------------------------------------------------------------------------------


def _plot_losses(results: dict, curves: dict[str, list[dict]], step_tokens: int,
                 path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, lines) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(results["validation"])
    values = [results["validation"][n]["loss"] for n in names]
    bars.barh(names, values, color=["tab:gray"] + ["tab:blue"] * (len(names) - 1))
    bars.axvline(results["validation"]["source (softmax)"]["loss"], color="k", ls="--", lw=1)
    for y, v in enumerate(values):
        bars.text(v, y, f" {v:.3f}", va="center")
    bars.invert_yaxis()
    bars.set_xlim(0.9 * min(values), 1.08 * max(values))
    bars.set_xlabel("validation loss (nats/token)")
    bars.set_title("Validation loss at the source's context")
    for name, records in curves.items():
        points = [(r["step"] * step_tokens, r["val_loss"]) for r in records if "val_loss" in r]
        train_points = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
        if train_points:
            lines.plot(*zip(*train_points), label=f"{name} (train)", alpha=0.6)
        if points:
            lines.plot(*zip(*points), marker="o", ls="", label=f"{name} (validation)")
    lines.axhline(results["validation"]["source (softmax)"]["loss"], color="k", ls="--", lw=1,
                  label="source, validation")
    lines.set_xlabel("fine-tuning / training tokens")
    lines.set_ylabel("loss (nats/token)")
    lines.set_title("Converted models recover; from scratch starts over")
    lines.legend(fontsize=7)
    lines.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_decode(decode: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in decode.items():
        x = [r["context"] for r in rows]
        speed.plot(x, [r["ms_per_token"] for r in rows], marker="o", label=name)
        memory.plot(x, [r["cache_bytes"] / 2**20 for r in rows], marker="o", label=name)
    for ax, label in ((speed, "ms per generated token"), (memory, "cache (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    speed.set_title("Decode time per token")
    memory.set_title("Generation cache memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _icl_summary(rows: list[dict], context: int) -> dict:
    inside = [r for r in rows if r["context_hi"] <= context]
    beyond = [r for r in rows if r["context_lo"] > context]
    best = best_context(rows)
    return {"best_loss": best["loss"], "best_at": [best["context_lo"], best["context_hi"]],
            "within_context": inside[-1]["loss"] if inside else float("nan"),
            "last_bin": rows[-1]["loss"], "last_bin_at": [rows[-1]["context_lo"],
                                                          rows[-1]["context_hi"]],
            "falls_beyond_context": bool(beyond) and all(
                b["loss"] <= a["loss"] + 1e-3 for a, b in zip(beyond, beyond[1:]))}


def _write_report(out: Path, preset_name: str, preset: Preset, results: dict) -> None:
    v, tokens = results["validation"], results["tokens"]
    source_loss = v["source (softmax)"]["loss"]
    lines = [
        "# Metamorphosis demo: a softmax transformer becomes power retention",
        "",
        f"Preset `{preset_name}` on {results['device']}, finished in "
        f"{results['wall_seconds']:.0f} s. Source: transformers `LlamaForCausalLM`, "
        f"{results['parameters']['source']:,} parameters, trained on "
        f"{tokens['source']:,} byte tokens of Python's standard library at context "
        f"{preset.context}. Converted: the same weights with power retention (p=2, chunk "
        f"{preset.chunk_size}) and {results['parameters']['gates']:,} new gate parameters; "
        f"fine-tuned on {tokens['finetune']:,} tokens per recipe "
        f"({100 * tokens['finetune'] / tokens['source']:.1f}% of the source's).",
        "",
        "## Validation loss",
        "",
        "| model | training tokens | validation loss | vs source |",
        "|---|---:|---:|---:|",
    ]
    for name, entry in v.items():
        lines.append(f"| {name} | {entry['tokens']:,} | {entry['loss']:.4f} | "
                     f"{100 * (entry['loss'] / source_loss - 1):+.1f}% |")
    recipes = results["recipes"]
    best = min(recipes, key=lambda r: recipes[r]["val_loss"])
    scratch = v["power from scratch"]["loss"]
    lines += [
        "",
        f"Best recipe here: **{best}** ({recipes[best]['val_loss']:.4f}); at equal tokens the "
        f"from-scratch power model reaches {scratch:.4f}, "
        f"{scratch - recipes[best]['val_loss']:+.4f} nats/token from the converted one.",
        "",
        "| recipe | steps | tokens | seconds | validation loss |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, entry in recipes.items():
        lines.append(f"| {name} | {entry['steps']} | {entry['tokens']:,} | "
                     f"{entry['seconds']:.1f} | {entry['val_loss']:.4f} |")
    lines += ["", "![validation loss and training curves](loss.png)", "",
              "## In-context learning",
              "",
              f"Loss at each context position, averaged over {results['icl_windows']} "
              f"validation windows of {preset.icl_factor * preset.context:,} tokens "
              f"({preset.icl_factor}x the source's training context), log-spaced bins; the "
              "data are in [icl.csv](icl.csv).",
              "",
              f"| model | loss at context <= {preset.context} | best-context loss (at) | "
              "last bin (at) | keeps falling beyond the source's context |",
              "|---|---:|---:|---:|---|"]
    for name, s in results["icl"].items():
        lines.append(f"| {name} | {s['within_context']:.4f} | {s['best_loss']:.4f} "
                     f"({s['best_at'][0]}-{s['best_at'][1]}) | {s['last_bin']:.4f} "
                     f"({s['last_bin_at'][0]}-{s['last_bin_at'][1]}) | "
                     f"{'yes' if s['falls_beyond_context'] else 'no'} |")
    lines += ["", "![in-context learning curves](icl.png)", "",
              "## Decoding",
              "",
              f"Greedy decoding after a prompt of each length (median of "
              f"{preset.decode_tokens} tokens, batch 1).",
              "",
              "| context | " + " | ".join(f"{n} ms/token | {n} cache MiB"
                                        for n in results["decode"]) + " |",
              "|---:|" + "---:|---:|" * len(results["decode"])]
    contexts = [r["context"] for r in next(iter(results["decode"].values()))]
    for i, length in enumerate(contexts):
        cells = [f"{rows[i]['ms_per_token']:.2f} | {rows[i]['cache_bytes'] / 2**20:.3f}"
                 for rows in results["decode"].values()]
        lines.append(f"| {length:,} | " + " | ".join(cells) + " |")
    lines += ["", "![decode time and cache memory](decode.png)", "",
              "## Time", "",
              "| phase | seconds |", "|---|---:|"]
    lines += [f"| {phase} | {seconds:.1f} |" for phase, seconds in results["timings"].items()]
    lines += ["", "All numbers are in [results.json](results.json); the runs (checkpoints, "
              "metrics.jsonl) are in `runs/`.", ""]
    (out / "report.md").write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


def _source_config(preset: Preset, vocab_size: int, eos: int) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "vocab_size": vocab_size, "hidden_size": preset.hidden_size,
            "intermediate_size": preset.intermediate_size,
            "num_hidden_layers": preset.num_hidden_layers,
            "num_attention_heads": preset.num_attention_heads,
            "num_key_value_heads": preset.num_key_value_heads,
            "max_position_embeddings": preset.context, "rope_theta": 10000.0,
            "bos_token_id": eos, "eos_token_id": eos, "tie_word_embeddings": False}


def _same_run(run_dir: Path, cfg: TrainConfig) -> bool:
    """A finished run of the same settings exists (only then is its checkpoint reused)."""
    found = checkpoint.latest(run_dir)
    if found is None or not (found / checkpoint.TRAIN_ARGS).exists():
        return False
    saved = checkpoint.load_train_args(found)
    wanted = cfg.to_dict()
    keys = [k for k in wanted if k not in ("out", "resume", "device", "progress")]
    return all(saved.get(k) == wanted[k] for k in keys) and found.name.endswith(
        f"{cfg.steps:07d}")


def _fresh(folder: Path) -> None:
    """An empty run folder (a run of other settings may have left checkpoints there)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


def run(args) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    preset = PRESETS[args.preset]
    preset = replace(preset, **{k: v for k, v in (
        ("recipes", tuple(args.recipes) if args.recipes else None),
        ("source_steps", args.source_steps), ("finetune_steps", args.finetune_steps),
        ("device", args.device)) if v is not None})
    device = torch.device(preset.device)
    out = Path(args.out)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = now - since
        print(f"[demo] {name}: {now - since:.1f} s")
        return now

    t = time.perf_counter()
    tokenizer = ByteTokenizer()
    corpus_spec = "stdlib" if preset.corpus == "stdlib" else str(stdlib_root() / preset.corpus)
    corpus = load_corpus(corpus_spec, preset.validation_fraction)
    streams = (encode_documents(corpus.train, tokenizer),
               encode_documents(corpus.validation, tokenizer))
    vocab = padded_vocab(tokenizer.vocab_size)
    common = dict(corpus=[corpus_spec], validation_fraction=preset.validation_fraction,
                  seq_len=preset.context, batch_size=preset.batch_size,
                  eval_batches=preset.eval_batches, device=preset.device,
                  progress=args.progress, keep=1)
    t = lap("corpus", t)

    # 1. the source: a softmax Llama trained by the train loop (reused when already there)
    source_run = runs / "source"
    source_config = json.dumps(_source_config(preset, vocab, tokenizer.eos_token_id),
                               indent=2) + "\n"
    source_cfg = TrainConfig(out=str(source_run), config=str(source_run / "config.json"),
                             steps=preset.source_steps, lr=preset.source_lr,
                             warmup_steps=max(1, preset.source_steps // 20),
                             eval_every=preset.source_steps, save_every=preset.source_steps,
                             **common)
    written = source_run / "config.json"
    reused = (written.is_file() and written.read_text() == source_config
              and _same_run(source_run, source_cfg))
    if not reused:
        _fresh(source_run)
        (source_run / "config.json").write_text(source_config)
        train(source_cfg)
    source_folder = checkpoint.latest(source_run)
    t = lap("source training" + (" (reused checkpoint)" if reused else ""), t)

    # 2. metamorphosis
    converted_folder = runs / "converted"
    converted = metamorphose(source_folder, converted_folder, chunk_size=preset.chunk_size)
    gate_params = sum(p.numel() for n, p in converted.named_parameters() if ".g_proj." in n)
    t = lap("conversion", t)

    # 3. validation losses before fine-tuning (the train loop's own evaluation)
    ctx = distributed.setup(preset.device)
    source = _load(source_folder, device)
    tokens_source = preset.source_steps * preset.batch_size * preset.context
    tokens_finetune = preset.finetune_steps * preset.batch_size * preset.context
    validation = {
        "source (softmax)": {"loss": evaluate(source, streams[1], source_cfg, ctx),
                             "tokens": tokens_source},
        "converted, before fine-tuning": {"loss": evaluate(converted.to(device), streams[1],
                                                           source_cfg, ctx),
                                          "tokens": tokens_source},
    }
    t = lap("validation before fine-tuning", t)

    # 4. fine-tuning with each recipe, and power retention from scratch on as many tokens
    recipes, curves = {}, {}
    for recipe in preset.recipes:
        run_dir = runs / f"finetune-{recipe}"
        cfg = FinetuneConfig(out=str(run_dir), model=str(converted_folder),
                             teacher=str(source_folder), recipe=recipe,
                             attention_steps=preset.attention_steps if
                             recipe == "attention-transfer" else 0,
                             steps=preset.finetune_steps, lr=preset.finetune_lr,
                             warmup_steps=max(1, preset.finetune_steps // 10),
                             eval_every=preset.finetune_steps,
                             save_every=preset.finetune_steps,
                             log_every=max(1, preset.finetune_steps // 8), **common)
        _fresh(run_dir)
        start = time.perf_counter()
        summary = finetune(cfg, model=_load(converted_folder, device), teacher=source,
                           streams=streams, tokenizer=tokenizer)
        recipes[recipe] = {"steps": preset.finetune_steps, "tokens": tokens_finetune,
                           "seconds": time.perf_counter() - start,
                           "val_loss": summary["val_loss"], "checkpoint": summary["checkpoint"]}
        validation[f"converted + {recipe}"] = {"loss": summary["val_loss"],
                                               "tokens": tokens_source + tokens_finetune}
        curves[f"converted + {recipe}"] = _metrics(run_dir)
        t = lap(f"fine-tuning ({recipe})", t)
    scratch_run = runs / "scratch"
    scratch_cfg = TrainConfig(out=str(scratch_run), config=str(converted_folder),
                              steps=preset.finetune_steps, lr=preset.source_lr,
                              warmup_steps=max(1, preset.finetune_steps // 10),
                              eval_every=preset.finetune_steps,
                              save_every=preset.finetune_steps,
                              log_every=max(1, preset.finetune_steps // 8), **common)
    _fresh(scratch_run)
    scratch_summary = train(scratch_cfg)
    validation["power from scratch"] = {"loss": scratch_summary["val_loss"],
                                        "tokens": tokens_finetune}
    curves["power from scratch"] = _metrics(scratch_run)
    t = lap("power from scratch", t)

    # 5. in-context learning out to icl_factor x the source's context
    best_recipe = min(recipes, key=lambda r: recipes[r]["val_loss"])
    tuned = _load(Path(recipes[best_recipe]["checkpoint"]), device)
    windows = document_windows(corpus.validation, tokenizer,
                               preset.icl_factor * preset.context + 1, preset.icl_windows)
    icl_models = {"source (softmax)": source, "converted, before fine-tuning": converted,
                  f"converted + {best_recipe}": tuned}
    icl_rows = {name: binned(position_losses(model, windows, device=device), 16)
                for name, model in icl_models.items()}
    plot_icl(icl_rows, out / "icl.png",
             f"In-context learning over {windows.shape[1] - 1:,} tokens "
             f"({preset.icl_factor}x the source's training context)",
             mark=(preset.context, "source's training context"))
    with (out / "icl.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "context_lo", "context_hi", "context_mid", "loss"])
        for name, rows in icl_rows.items():
            for r in rows:
                writer.writerow([name, r["context_lo"], r["context_hi"],
                                 f"{r['context_mid']:.1f}", f"{r['loss']:.6f}"])
    t = lap("in-context learning curves", t)

    # 6. decoding: time per token and cache memory against context length
    decode = {"source (softmax)": decode_profile(source, streams[1], preset.decode_contexts,
                                                 preset.decode_tokens, device),
              f"converted + {best_recipe}": decode_profile(
                  tuned, streams[1], preset.decode_contexts, preset.decode_tokens, device)}
    t = lap("decode profile", t)

    results = {
        "preset": args.preset, "settings": asdict(preset), "device": str(device),
        "tokens": {"source": tokens_source, "finetune": tokens_finetune},
        "parameters": {"source": sum(p.numel() for p in source.parameters()),
                       "converted": sum(p.numel() for p in converted.parameters()),
                       "gates": gate_params},
        "validation": validation, "recipes": recipes, "best_recipe": best_recipe,
        "icl_windows": int(windows.shape[0]),
        "icl": {name: _icl_summary(rows, preset.context) for name, rows in icl_rows.items()},
        "decode": decode, "timings": timings,
    }
    _plot_losses(results, curves, preset.batch_size * preset.context, out / "loss.png")
    _plot_decode(decode, out / "decode.png")
    results["wall_seconds"] = time.perf_counter() - began
    timings["figures and report"] = time.perf_counter() - t
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _write_report(out, args.preset, preset, results)
    print(f"[demo] wrote {out / 'report.md'} in {results['wall_seconds']:.0f} s")
    print((out / "report.md").read_text())
    return 0
