"""The fine-tuning recipes after the swap, as loss functions of a batch.

- ``next-token``: plain next-token cross-entropy (the published recipe).
- ``distill``: ``(1 - w) * cross-entropy + w * T^2 * KL(teacher || student)`` on the source
  model's logits at temperature ``T``.
- ``attention-transfer``: a first stage where every power retention layer is fed the teacher's
  input to that layer and trained to reproduce the teacher's attention output (squared error
  over the teacher output's squared norm, per sequence, averaged over sequences and layers);
  then next-token cross-entropy end to end.

Every loss takes ``batch [B, T]`` int64 tokens and predicts ``batch[:, 1:]`` from the tokens
before, as ``model(input_ids=batch, labels=batch).loss`` does.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RECIPES = ("next-token", "distill", "attention-transfer")

# the attention block of decoder layer i, in transformers' families and in ours
_ATTENTION = re.compile(r"(^|\.)layers\.(\d+)\.self_attn$")


@dataclass(frozen=True)
class Recipe:
    """A recipe and its knobs (see the module docstring)."""

    name: str = "next-token"
    distill_weight: float = 0.5
    temperature: float = 1.0
    attention_steps: int = 0          # first-stage steps of ``attention-transfer``

    def __post_init__(self):
        if self.name not in RECIPES:
            raise ValueError(f"recipe: expected one of {', '.join(RECIPES)}, got {self.name!r}")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight: expected in [0, 1], got {self.distill_weight}")
        if self.temperature <= 0:
            raise ValueError(f"temperature: expected > 0, got {self.temperature}")
        if self.attention_steps < 0:
            raise ValueError(f"attention_steps: expected >= 0, got {self.attention_steps}")

    @property
    def needs_teacher(self) -> bool:
        return self.name in ("distill", "attention-transfer")

    def stage(self, step: int) -> str:
        """The loss used at a 0-based step: ``attention``, ``distill`` or ``next-token``."""
        if self.name == "attention-transfer":
            return "attention" if step < self.attention_steps else "next-token"
        return self.name

    def loss(self, student: nn.Module, batch: Tensor, step: int,
             teacher: nn.Module | None = None) -> tuple[Tensor, dict[str, float]]:
        """The loss to minimise at ``step`` and the figures worth logging."""
        stage = self.stage(step)
        if stage != "next-token" and teacher is None:
            raise ValueError(f"recipe {self.name!r} needs a teacher model")
        if stage == "attention":
            loss = attention_match_loss(student, teacher, batch)
            return loss, {"attention_mse": loss.item()}
        if stage == "distill":
            return distill_loss(student, teacher, batch, self.distill_weight, self.temperature)
        loss = next_token_loss(student, batch)
        return loss, {"loss": loss.item()}


def next_token_loss(model: nn.Module, batch: Tensor) -> Tensor:
    """Mean next-token cross-entropy in nats of ``model`` on ``batch [B, T]``."""
    return model(input_ids=batch, labels=batch, use_cache=False).loss


def distill_loss(student: nn.Module, teacher: nn.Module, batch: Tensor, weight: float,
                 temperature: float) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy mixed with the KL divergence from the teacher's to the student's logits."""
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch, use_cache=False).logits.float()
    logits = student(input_ids=batch, use_cache=False).logits.float()
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
    log_p_student = F.log_softmax(logits / temperature, -1).flatten(0, 1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, -1).flatten(0, 1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    loss = (1 - weight) * ce + weight * temperature ** 2 * kl
    return loss, {"loss": ce.item(), "kl": kl.item()}


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention block of every decoder layer, in layer order."""
    found = {int(m.group(2)): module for name, module in model.named_modules()
             if (m := _ATTENTION.search(name))}
    if not found or sorted(found) != list(range(len(found))):
        raise ValueError(f"{type(model).__name__}: found no `layers.<i>.self_attn` blocks")
    return [found[i] for i in range(len(found))]


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def _record_attention(modules: list[nn.Module], inputs: list, outputs: list):
    """Record each block's ``hidden_states`` input and output while the context is open."""
    def pre_hook(module, args, kwargs):
        inputs.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    def hook(module, args, kwargs, output):
        outputs.append(_first(output))

    handles = [h for m in modules for h in (
        m.register_forward_pre_hook(pre_hook, with_kwargs=True),
        m.register_forward_hook(hook, with_kwargs=True))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _replace_attention_inputs(modules: list[nn.Module], replacements: list[Tensor],
                              outputs: list):
    """Feed block i ``replacements[i]`` instead of its own input; record its outputs.

    The block's own input stays in the graph with weight zero, so the norm in front of it is
    still "used" (DDP insists that every parameter takes part in each backward)."""
    def make_pre_hook(replacement):
        def pre_hook(module, args, kwargs):
            if "hidden_states" in kwargs:
                own = kwargs["hidden_states"]
                return args, {**kwargs, "hidden_states": replacement + 0.0 * own}
            return (replacement + 0.0 * args[0], *args[1:]), kwargs
        return pre_hook

    def hook(module, args, kwargs, output):
        outputs.append(_first(output))

    handles = [h for m, r in zip(modules, replacements) for h in (
        m.register_forward_pre_hook(make_pre_hook(r), with_kwargs=True),
        m.register_forward_hook(hook, with_kwargs=True))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def attention_match_loss(student: nn.Module, teacher: nn.Module, batch: Tensor) -> Tensor:
    """Mean over layers and sequences of ``|student_attn(x_l) - teacher_attn(x_l)|^2 /
    |teacher_attn(x_l)|^2`` (squared norms over one sequence's positions and channels), with
    ``x_l`` the teacher's (normalised) input to layer ``l``'s attention.

    Each student block sees the teacher's input, so only attention parameters receive nonzero
    gradients. The student's logits enter with weight zero so that every parameter still takes
    part in backward, as DDP and FSDP require.
    """
    teacher_in, teacher_out, student_out = [], [], []
    teacher_blocks, student_blocks = attention_modules(teacher), attention_modules(student)
    if len(teacher_blocks) != len(student_blocks):
        raise ValueError(f"teacher has {len(teacher_blocks)} attention blocks, student "
                         f"{len(student_blocks)}")
    with torch.no_grad(), _record_attention(teacher_blocks, teacher_in, teacher_out):
        teacher(input_ids=batch, use_cache=False)
    with _replace_attention_inputs(student_blocks, [x.detach() for x in teacher_in],
                                   student_out):
        logits = student(input_ids=batch, use_cache=False).logits
    # per sequence, so that the mean over data-parallel ranks is the mean over the whole batch
    terms = [(s.float() - t.float()).pow(2).flatten(1).sum(1)
             / t.float().pow(2).flatten(1).sum(1).clamp_min(1e-12)
             for s, t in zip(student_out, teacher_out)]                    # [B] per layer
    return torch.stack(terms).mean() + 0.0 * logits.float().mean()
