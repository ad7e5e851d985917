"""Fine-tuning a converted model with one of the recipes: ``power_retention.training.train``'s
loop (:func:`~power_retention.training.train.fit`: same batches, optimiser, schedule, validation,
checkpoints, exact ``--resume``, ``metrics.jsonl`` and torchrun data parallelism), started from
the converted folder's weights, with the recipe's loss (which may read a teacher).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from ..data import load_tokenizer
from ..training import distributed, presets
from ..training.train import TrainConfig, fit, load_streams, resume_settings
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


def _tokenizer_of(cfg: FinetuneConfig):
    if cfg.tokenizer is not None:
        return load_tokenizer(cfg.tokenizer)
    try:
        return load_tokenizer(cfg.model)
    except (ValueError, OSError):
        return load_tokenizer("bytes")


def finetune(cfg: FinetuneConfig, *, model=None, teacher=None,
             streams: tuple[np.ndarray, np.ndarray] | None = None, tokenizer=None) -> dict:
    """Fine-tune (or resume) from ``cfg.model``; returns ``fit``'s summary and the recipe.

    ``model``, ``teacher``, ``streams`` (train and validation tokens) and ``tokenizer`` may be
    given already loaded (the demo does), else they are read from ``cfg``.
    """
    ctx = distributed.setup(cfg.device)
    try:
        cfg, resume_from = resume_settings(cfg, ctx)
        recipe = cfg.make_recipe()
        tokenizer = tokenizer if tokenizer is not None else _tokenizer_of(cfg)
        if streams is None:
            streams = load_streams(cfg, tokenizer)
        train_stream, val_stream = streams
        if model is None:
            model = presets.load_model(cfg.model, dtype=torch.float32)
        if recipe.needs_teacher:
            if teacher is None:
                if not cfg.teacher:
                    raise ValueError(f"recipe {recipe.name!r} needs --teacher (the source model)")
                teacher = presets.load_model(cfg.teacher, dtype=torch.float32)
            teacher = teacher.to(ctx.device).eval().requires_grad_(False)

        def loss_fn(student, batch, step):
            return recipe.loss(student, batch, step, teacher)

        def trainable(student, step):
            # the first stage of attention-transfer trains the attention blocks only
            if recipe.stage(step) != "attention":
                return None
            return [p for block in attention_modules(student) for p in block.parameters()]

        summary = fit(cfg, model, tokenizer, train_stream, val_stream, ctx,
                      resume_from=resume_from, loss_fn=loss_fn, stage=recipe.stage,
                      trainable=trainable, label=recipe.name,
                      title=f"fine-tuning {cfg.model or type(model).__name__} with recipe "
                            f"{recipe.name!r}")
        return {**summary, "recipe": recipe.name}
    finally:
        distributed.teardown()


def config_from_args(args) -> FinetuneConfig:
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    return FinetuneConfig(**{k: v for k, v in vars(args).items() if k in names})
