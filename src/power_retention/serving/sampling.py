"""Sampling parameters and the choice of the next token from a row of logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    ``temperature == 0`` or ``greedy`` picks the most likely token. Otherwise the logits are
    divided by ``temperature``, cut to the ``top_k`` most likely tokens (0: all) and to the
    smallest set whose probability reaches ``top_p``, and sampled with a generator seeded by
    ``seed`` (None: a random seed), so a seeded request is reproducible whatever else runs.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    def make_generator(self) -> torch.Generator | None:
        """A CPU generator for this request (None when greedy)."""
        if self.is_greedy:
            return None
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


def sample_token(logits: Tensor, params: SamplingParams,
                 generator: torch.Generator | None) -> tuple[int, float]:
    """Pick the next token from ``logits [V]``; returns ``(token, log-probability)``.

    The log-probability is that of the unmodified distribution (``log_softmax(logits)``), as the
    OpenAI API reports it.
    """
    logits = logits.float().cpu()
    logprobs = torch.log_softmax(logits, -1)
    if params.is_greedy:
        token = int(logits.argmax())
        return token, float(logprobs[token])
    scaled = logits / params.temperature
    if 0 < params.top_k < scaled.numel():
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(scaled, descending=True)
        cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = (cumulative - torch.softmax(sorted_logits, -1)) >= params.top_p
        scaled = scaled.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scaled, -1)
    token = int(torch.multinomial(probs, 1, generator=generator))
    return token, float(logprobs[token])
