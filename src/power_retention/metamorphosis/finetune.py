"""Fine-tuning a converted model with one of the recipes, on the training module's machinery.

The loop is ``power_retention.training.train``'s, step for step: the same batches
(``sample_batch``), optimiser and schedule (``make_optimizer``, ``lr_lambda``), autocast,
validation (``evaluate``), checkpoints (``checkpoint.save``: ``checkpoint-N`` folders, ``latest``,
exact ``--resume``), ``metrics.jsonl`` and torchrun data parallelism (DDP or FSDP2). Two things
differ, which ``train`` has no hook for: the model starts from the converted folder's weights
instead of a fresh initialisation, and the loss is the recipe's (which may read a teacher).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import encode_documents, load_corpus, load_tokenizer, sample_batch
from ..training import checkpoint, distributed
from ..training.train import (
    TrainConfig,
    _autocast,
    _log,
    _truncate_log,
    evaluate,
    lr_lambda,
    make_optimizer,
    tokens_per_step,
)
from .recipes import Recipe, attention_modules


@dataclass
class FinetuneConfig(TrainConfig):
    """A ``TrainConfig`` (its ``preset``, ``size``, ``config``, ``overrides`` and
    ``flop_budget`` are not used) plus where to start and the recipe."""

    model: str = ""                       # the converted model folder to start from
    teacher: str | None = None            # the source model folder (distill, attention-transfer)
    recipe: str = "next-token"
    distill_weight: float = 0.5
    temperature: float = 1.0
    attention_steps: int = 0
    out: str = "runs/metamorphosis"
    tokenizer: str | None = None          # None: the model folder's own tokenizer, else bytes
    lr: float = 1e-3
    warmup_steps: int = 10
    steps: int = 100

    def make_recipe(self) -> Recipe:
        return Recipe(self.recipe, self.distill_weight, self.temperature, self.attention_steps)


_RUNTIME_FIELDS = ("out", "resume", "device", "progress")


def _load_model(folder: str | Path):
    from transformers import AutoModelForCausalLM

    from .. import model  # noqa: F401  (registers power_retention with the Auto classes)

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


def _tokenizer_of(cfg: FinetuneConfig):
    if cfg.tokenizer is not None:
        return load_tokenizer(cfg.tokenizer)
    try:
        return load_tokenizer(cfg.model)
    except (ValueError, OSError):
        return load_tokenizer("bytes")


def finetune(cfg: FinetuneConfig, *, model=None, teacher=None,
             streams: tuple[np.ndarray, np.ndarray] | None = None, tokenizer=None) -> dict:
    """Fine-tune (or resume) from ``cfg.model``; returns a summary like ``train``'s.

    ``model``, ``teacher``, ``streams`` (train and validation tokens) and ``tokenizer`` may be
    given already loaded (the demo does), else they are read from ``cfg``.
    """
    from tqdm.auto import tqdm

    ctx = distributed.setup(cfg.device)
    try:
        out = Path(cfg.out)
        resume_from = checkpoint.latest(out) if cfg.resume else None
        if resume_from is not None:
            saved = checkpoint.load_train_args(resume_from)
            saved.update({k: getattr(cfg, k) for k in _RUNTIME_FIELDS})
            cfg = FinetuneConfig(**saved)
        recipe = cfg.make_recipe()
        tokenizer = tokenizer if tokenizer is not None else _tokenizer_of(cfg)
        if streams is None:
            corpus = load_corpus(cfg.corpus[0] if len(cfg.corpus) == 1 else cfg.corpus,
                                 cfg.validation_fraction)
            streams = (encode_documents(corpus.train, tokenizer),
                       encode_documents(corpus.validation, tokenizer))
        train_stream, val_stream = streams
        if model is None:
            model = _load_model(cfg.model)
        if recipe.needs_teacher:
            if teacher is None:
                if not cfg.teacher:
                    raise ValueError(f"recipe {recipe.name!r} needs --teacher (the source model)")
                teacher = _load_model(cfg.teacher)
            teacher = teacher.to(ctx.device).eval().requires_grad_(False)
        model = model.to(ctx.device)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        n_params = sum(p.numel() for p in model.parameters())
        model = distributed.wrap(model, ctx, cfg.strategy)
        # after wrapping: FSDP2 replaces the parameters by sharded ones
        attention_params = {id(p) for block in attention_modules(model)
                            for p in block.parameters()}
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
            print(f"fine-tuning {cfg.model or type(model).__name__} ({n_params:,} parameters) "
                  f"with recipe {recipe.name!r}: {cfg.steps} steps of {step_tokens:,} tokens")

        def save(step: int) -> None:
            checkpoint.save(out, step, model, optimizer, scheduler, tokenizer, cfg.to_dict(),
                            ctx, extra={"tokens": step * step_tokens}, keep=cfg.keep)

        rows = slice(ctx.rank * cfg.batch_size, (ctx.rank + 1) * cfg.batch_size)
        global_batch = cfg.batch_size * ctx.world_size
        bar = tqdm(total=cfg.steps, initial=start_step, unit="step", dynamic_ncols=True,
                   desc=recipe.name, disable=not (cfg.progress and ctx.is_main))
        summary: dict = {"steps": cfg.steps, "parameters": n_params, "recipe": recipe.name}
        run_start = window_start = time.perf_counter()
        window_steps = 0
        figures: dict[str, float] = {}
        for step in range(start_step, cfg.steps):
            stage = recipe.stage(step)
            for micro in range(cfg.grad_accum):
                last = micro == cfg.grad_accum - 1
                batch = sample_batch(train_stream, step * cfg.grad_accum + micro, global_batch,
                                     cfg.seq_len, cfg.seed, rows=rows).to(ctx.device)
                with distributed.no_gradient_sync(model, last), _autocast(cfg, ctx.device):
                    loss, micro_figures = recipe.loss(model, batch, step, teacher)
                (loss / cfg.grad_accum).backward()
                figures = {k: (figures.get(k, 0.0) if micro else 0.0) + v / cfg.grad_accum
                           for k, v in micro_figures.items()}
            if stage == "attention":
                # the first stage trains the attention blocks only: nothing else moves (AdamW
                # skips parameters without a gradient, weight decay included)
                for p in model.parameters():
                    if id(p) not in attention_params:
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
                means = {k: distributed.mean_over_ranks(v, ctx) for k, v in figures.items()}
                now = time.perf_counter()
                tok_s = window_steps * step_tokens / (now - window_start)
                window_start, window_steps = now, 0
                record = {"step": done, "stage": stage, **means, "lr": lr,
                          "grad_norm": float(grad_norm), "tokens": done * step_tokens,
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
    finally:
        distributed.teardown()


def config_from_args(args) -> FinetuneConfig:
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    return FinetuneConfig(**{k: v for k, v in vars(args).items() if k in names})
