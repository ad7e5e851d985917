"""The ``train`` command: a causal LM on the embedded corpus, one process or many (torchrun).

One loop, top to bottom: build the model (a preset, or any transformers config), AdamW with
linear warmup and cosine decay, gradient accumulation and clipping, bf16 autocast on the GPU,
evaluation on held-out files, JSONL metrics, atomic checkpoints and exact ``--resume``.
:func:`fit` is that loop for a ready model; ``train`` builds the model (or loads ``--init-from``)
and metamorphosis fine-tuning passes a converted model and its recipe's loss.

Batches are a pure function of ``(seed, batch index)`` (:func:`power_retention.data.sample_batch`)
and each data-parallel rank takes its own rows of one global batch, so a checkpoint's step is
the whole data position, and ``N`` processes with ``--batch-size b`` see the same data as one
process with ``--batch-size N*b``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from ..data import encode_documents, load_corpus, load_tokenizer, sample_batch
from . import checkpoint, distributed, presets


@dataclass
class TrainConfig:
    """Every setting of a run; saved with each checkpoint as ``train_args.json``."""

    out: str = "runs/power"
    preset: str = "power"
    size: str = "tiny"
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    init_from: str | None = None
    corpus: list[str] = field(default_factory=lambda: ["stdlib"])
    tokenizer: str = "bytes"
    validation_fraction: float = 0.05
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 60
    flop_budget: float | None = None
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 30
    eval_batches: int = 4
    save_every: int = 30
    keep: int = 2
    resume: bool = False
    device: str = "auto"
    precision: str = "auto"
    strategy: str = "ddp"
    gradient_checkpointing: bool = False
    threads: int = 1
    progress: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Settings that may differ when a run is resumed; all others come from the checkpoint.
_RUNTIME_FIELDS = ("out", "resume", "device", "threads", "progress")


def lr_lambda(warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """Linear warmup from 0 to 1, then cosine decay to ``min_lr_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms' gains or biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def tokens_per_step(cfg: TrainConfig, world_size: int) -> int:
    return cfg.batch_size * cfg.seq_len * cfg.grad_accum * world_size


def _autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast on the GPU under ``precision="auto"``, none (fp32) on the CPU."""
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp32":
        return nullcontext()
    raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {cfg.precision!r}")


def _log(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Drop records after ``step`` (written by a run killed after its last checkpoint), and a
    last line torn by the kill."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["step"] <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


@torch.no_grad()
def evaluate(model, stream, cfg: TrainConfig, ctx: distributed.Context) -> float:
    """Mean loss over ``eval_batches`` fixed batches of the validation stream."""
    model.eval()
    rows = slice(ctx.rank * cfg.batch_size, (ctx.rank + 1) * cfg.batch_size)
    total = 0.0
    for i in range(cfg.eval_batches):
        batch = sample_batch(stream, i, cfg.batch_size * ctx.world_size, cfg.seq_len,
                             seed=cfg.seed + 1, rows=rows).to(ctx.device)
        with _autocast(cfg, ctx.device):
            total += float(model(input_ids=batch, labels=batch).loss)
    model.train()
    return distributed.mean_over_ranks(total / cfg.eval_batches, ctx)


C = TypeVar("C", bound=TrainConfig)


def resume_settings(cfg: C, ctx: distributed.Context) -> tuple[C, Path | None]:
    """With ``cfg.resume``: the run folder's latest checkpoint and the settings saved with it
    (the command line's kept for the runtime fields only); else ``(cfg, None)``."""
    out = Path(cfg.out)
    resume_from = checkpoint.latest(out) if cfg.resume else None
    if resume_from is not None:
        saved = checkpoint.load_train_args(resume_from)
        changed = {k: v for k, v in cfg.to_dict().items()
                   if k not in _RUNTIME_FIELDS and saved.get(k) != v}
        if changed and ctx.is_main:
            print(f"resuming {resume_from} with its saved settings (the command line's "
                  f"differ in {sorted(changed)}: ignored)")
        saved.update({k: getattr(cfg, k) for k in _RUNTIME_FIELDS})
        cfg = type(cfg)(**saved)
    elif cfg.resume and ctx.is_main:
        print(f"--resume: no checkpoint in {out}, starting from scratch")
    return cfg, resume_from


def load_streams(cfg: TrainConfig, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """The train and validation token streams of ``cfg.corpus``."""
    corpus = load_corpus(cfg.corpus[0] if len(cfg.corpus) == 1 else cfg.corpus,
                         cfg.validation_fraction)
    streams = (encode_documents(corpus.train, tokenizer),
               encode_documents(corpus.validation, tokenizer))
    for name, stream in zip(("train", "validation"), streams):
        if len(stream) < cfg.seq_len:
            raise ValueError(f"the {name} split has {len(stream)} tokens, fewer than "
                             f"seq_len={cfg.seq_len}; change --validation-fraction or --corpus")
    return streams


# (model, batch [B, T] int64, 0-based step) -> (loss to minimise, figures to log)
LossFn = Callable[[torch.nn.Module, torch.Tensor, int], tuple[torch.Tensor, dict]]


def next_token_loss(model: torch.nn.Module, batch: torch.Tensor, step: int
                    ) -> tuple[torch.Tensor, dict]:
    """The default objective: mean next-token cross-entropy, logged as ``loss``."""
    loss = model(input_ids=batch, labels=batch).loss
    return loss, {"loss": loss.detach()}   # kept on the device: no sync per step


def fit(cfg: TrainConfig, model: torch.nn.Module, tokenizer, train_stream: np.ndarray,
        val_stream: np.ndarray, ctx: distributed.Context, *, resume_from: Path | None = None,
        loss_fn: LossFn = next_token_loss, stage: Callable[[int], str] | None = None,
        trainable: Callable[[torch.nn.Module, int], list | None] | None = None,
        title: str | None = None, label: str | None = None) -> dict:
    """The training loop: ``cfg.steps`` optimizer steps of ``model`` (already initialised or
    loaded, not yet on the device) on ``train_stream``, continuing from ``resume_from``'s
    checkpoint when given; returns a summary (last figures, validation loss, tokens/s).

    Hooks: ``loss_fn`` (default next-token cross-entropy); ``stage(step)``, a name logged with
    each record; ``trainable(model, step)``, the parameters that step updates (None: all).
    ``title`` starts the line printed first (default: the model's class); ``label`` names the
    progress bar. Leaves the model in eval mode.
    """
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    model = model.to(ctx.device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    model = distributed.wrap(model, ctx, cfg.strategy)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
    start_step = 0
    if resume_from is not None:
        start_step = checkpoint.load(resume_from, model, optimizer, scheduler, ctx)["step"]

    metrics = out / "metrics.jsonl"
    step_tokens = tokens_per_step(cfg, ctx.world_size)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if resume_from is None and metrics.exists():
            metrics.unlink()
        _truncate_log(metrics, start_step)
        print(f"{title or type(distributed.unwrap(model)).__name__} ({n_params:,} parameters), "
              f"{len(train_stream):,} train / {len(val_stream):,} validation tokens, "
              f"{cfg.steps} steps of {step_tokens:,} tokens, "
              f"{ctx.world_size} process(es) on {ctx.device.type}")

    def save(step: int) -> None:
        checkpoint.save(out, step, model, optimizer, scheduler, tokenizer, cfg.to_dict(),
                        ctx, extra={"tokens": step * step_tokens}, keep=cfg.keep)

    rows = slice(ctx.rank * cfg.batch_size, (ctx.rank + 1) * cfg.batch_size)
    global_batch = cfg.batch_size * ctx.world_size
    bar = tqdm(total=cfg.steps, initial=start_step, unit="step", dynamic_ncols=True,
               desc=label, disable=not (cfg.progress and ctx.is_main))
    summary: dict = {"steps": cfg.steps, "parameters": n_params}
    run_start = window_start = time.perf_counter()
    window_steps = 0
    for step in range(start_step, cfg.steps):
        figures: dict = {}    # each figure's mean over the micro-steps
        for micro in range(cfg.grad_accum):
            last = micro == cfg.grad_accum - 1
            batch = sample_batch(train_stream, step * cfg.grad_accum + micro, global_batch,
                                 cfg.seq_len, cfg.seed, rows=rows).to(ctx.device)
            with distributed.no_gradient_sync(model, last), _autocast(cfg, ctx.device):
                loss, micro_figures = loss_fn(model, batch, step)
            (loss / cfg.grad_accum).backward()
            for k, v in micro_figures.items():
                figures[k] = figures.get(k, 0.0) + v / cfg.grad_accum
        updated = trainable(model, step) if trainable is not None else None
        if updated is not None:
            # AdamW skips parameters without a gradient (weight decay included): they stay put
            kept = {id(p) for p in updated}
            for p in model.parameters():
                if id(p) not in kept:
                    p.grad = None
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.grad is not None], cfg.grad_clip)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        window_steps += 1
        bar.update(1)
        if done % cfg.log_every == 0 or done == cfg.steps:
            means = {k: distributed.mean_over_ranks(float(v), ctx) for k, v in figures.items()}
            now = time.perf_counter()
            tok_s = window_steps * step_tokens / (now - window_start)
            window_start, window_steps = now, 0
            record = {"step": done, **({"stage": stage(step)} if stage else {}), **means,
                      "lr": lr, "grad_norm": float(grad_norm), "tokens": done * step_tokens,
                      "tokens_per_s": tok_s, "elapsed_s": now - run_start}
            bar.set_postfix({**{k: f"{v:.3f}" for k, v in means.items()},
                             "tok_s": f"{tok_s:,.0f}"})
            summary.update(means)
            if ctx.is_main:
                _log(metrics, record)
        if done % cfg.eval_every == 0 or done == cfg.steps:
            val_loss = evaluate(model, val_stream, cfg, ctx)
            summary["val_loss"] = val_loss
            if ctx.is_main:
                _log(metrics, {"step": done, "val_loss": val_loss})
                bar.write(f"step {done}: validation loss {val_loss:.4f}")
        if done % cfg.save_every == 0 or done == cfg.steps:
            save(done)
    bar.close()
    elapsed = time.perf_counter() - run_start
    trained = cfg.steps - start_step
    summary.update(tokens=cfg.steps * step_tokens, elapsed_s=elapsed,
                   tokens_per_s=trained * step_tokens / elapsed if trained else 0.0,
                   checkpoint=str(checkpoint.latest(out)))
    if ctx.is_main:
        print(json.dumps(summary))
    distributed.unwrap(model).eval()
    return summary


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training from a fresh initialisation or ``cfg.init_from``'s weights;
    returns :func:`fit`'s summary."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()   # one bar: ours
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    ctx = distributed.setup(cfg.device)
    try:
        cfg, resume_from = resume_settings(cfg, ctx)
        tokenizer = load_tokenizer(cfg.tokenizer)
        train_stream, val_stream = load_streams(cfg, tokenizer)
        if resume_from is not None:
            model_config = presets.read_config(resume_from)
        elif cfg.init_from is not None:
            model_config = presets.read_config(cfg.init_from)
        else:
            model_config = presets.model_config(
                cfg.preset, cfg.size, tokenizer.vocab_size, eos_token_id=tokenizer.eos_token_id,
                config=cfg.config, overrides=cfg.overrides)
        if cfg.flop_budget is not None:
            from ..evaluation.wsfr import train_flops_per_token

            per_step = train_flops_per_token(model_config, cfg.seq_len) * tokens_per_step(
                cfg, ctx.world_size)
            cfg.steps = max(1, math.ceil(cfg.flop_budget / per_step))

        torch.manual_seed(cfg.seed)
        if cfg.init_from is not None and resume_from is None:
            model = presets.load_model(cfg.init_from, dtype=torch.float32)
        else:
            model = presets.build_model(model_config)
        return fit(cfg, model, tokenizer, train_stream, val_stream, ctx, resume_from=resume_from)
    finally:
        distributed.teardown()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    a = parser.add_argument
    a("--out", default=d.out, help="run folder: metrics.jsonl, checkpoints, 'latest'")
    a("--preset", default=d.preset, choices=list(presets.TIME_MIXING),
      help="time mixing; the backbone is the same for all")
    a("--size", default=d.size, choices=list(presets.SIZES), help="backbone size")
    a("--config", default=d.config,
      help="a transformers config (folder or config.json) to train instead of a preset")
    a("--init-from", default=d.init_from, metavar="FOLDER",
      help="start from this model folder's weights and config (a checkpoint or any "
           "transformers causal LM) instead of a fresh initialisation")
    a("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
      help="override a model config field (VALUE parsed as JSON when it can be), repeatable")
    a("--corpus", nargs="+", default=d.corpus,
      help="'stdlib' (Python's standard library source), a folder, or text files")
    a("--tokenizer", default=d.tokenizer, help="'bytes' or a local transformers tokenizer folder")
    a("--validation-fraction", type=float, default=d.validation_fraction,
      help="share of files held out (split by a hash of the path)")
    a("--seq-len", type=int, default=d.seq_len, help="training context length")
    a("--batch-size", type=int, default=d.batch_size, help="sequences per process per micro-step")
    a("--grad-accum", type=int, default=d.grad_accum, help="micro-steps per optimizer step")
    a("--steps", type=int, default=d.steps, help="optimizer steps")
    a("--flop-budget", type=float, default=d.flop_budget,
      help="set --steps from a training FLOP budget (3x forward FLOPs of the wsfr model)")
    a("--lr", type=float, default=d.lr, help="peak learning rate")
    a("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final lr / peak lr")
    a("--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup steps")
    a("--weight-decay", type=float, default=d.weight_decay, help="AdamW decay on matrices")
    a("--beta1", type=float, default=d.beta1)
    a("--beta2", type=float, default=d.beta2)
    a("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm")
    a("--seed", type=int, default=d.seed, help="model init and data order")
    a("--log-every", type=int, default=d.log_every, help="steps between metric records")
    a("--eval-every", type=int, default=d.eval_every, help="steps between validation losses")
    a("--eval-batches", type=int, default=d.eval_batches, help="batches per validation")
    a("--save-every", type=int, default=d.save_every, help="steps between checkpoints")
    a("--keep", type=int, default=d.keep, help="checkpoints kept")
    a("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    a("--device", default=d.device, help="'auto', 'cpu' or 'cuda'")
    a("--precision", default=d.precision, choices=["auto", "bf16", "fp32"],
      help="auto: bf16 autocast on GPU, fp32 on CPU")
    a("--strategy", default=d.strategy, choices=["ddp", "fsdp"],
      help="data parallelism under torchrun (DDP, or FSDP2 fully_shard)")
    a("--gradient-checkpointing", action="store_true", help="recompute blocks in backward")
    a("--threads", type=int, default=d.threads,
      help="CPU threads per process (0: PyTorch's default); one is fastest for small models")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    train(TrainConfig(**{k: v for k, v in vars(args).items() if k in names}))
    return 0
