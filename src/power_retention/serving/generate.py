"""The ``generate`` command: stream a continuation of a prompt, then report the statistics.

    power-retention generate --model FOLDER "def fibonacci(n):" --max-new-tokens 200
    power-retention generate --model FOLDER --prompt-file prompt.txt --greedy

The text goes to stdout as it is generated; the statistics (time to first token, decode
tokens/s, cache bytes) go to stderr.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .backends import Backend
from .engine import Event, Sequence
from .loading import ModelLoadError, add_model_arguments, check_vocabulary, load_backend
from .sampling import SamplingParams, sample_token
from .tokens import TextTokenizer


@dataclass
class GenerationStats:
    """Timings of one generation (seconds) and the size of its cache (bytes)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token: float = 0.0       # prefill plus the first sample
    decode_seconds: float = 0.0            # every token after the first
    cache_bytes: int = 0
    finish_reason: str | None = None
    step_seconds: list[float] = field(default_factory=list)

    @property
    def decode_tokens_per_second(self) -> float:
        steps = self.generated_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0

    def summary(self) -> str:
        return (f"prompt {self.prompt_tokens:,} tokens | generated {self.generated_tokens:,} "
                f"tokens ({self.finish_reason}) | time to first token "
                f"{self.time_to_first_token * 1e3:.1f} ms | decode "
                f"{self.decode_tokens_per_second:.1f} tokens/s | cache {self.cache_bytes:,} bytes")


def generate_stream(backend: Backend, tokenizer: TextTokenizer, prompt_ids: list[int],
                    params: SamplingParams, stats: GenerationStats | None = None
                    ) -> Iterator[Event]:
    """Generate for one prompt, yielding an :class:`Event` per token (the same text and stop
    rules as the server). ``stats``, when given, is filled in as it goes."""
    stats = GenerationStats() if stats is None else stats
    stats.prompt_tokens = len(prompt_ids)
    sequence = Sequence(tokenizer, params, backend.eos_token_ids)
    generator = params.make_generator()
    start = time.perf_counter()
    logits, cache = backend.prefill(prompt_ids)
    batch = backend.join(None, cache)             # a batch of one
    token, logprob = sample_token(logits, params, generator)
    stats.time_to_first_token = time.perf_counter() - start
    event = sequence.accept(token, logprob)
    stats.generated_tokens = 1
    stats.cache_bytes = backend.cache_bytes(batch)
    yield event
    while event.finish_reason is None:
        start = time.perf_counter()
        logits = backend.step(batch, [token], [len(prompt_ids) + stats.generated_tokens - 1])
        token, logprob = sample_token(logits[0], params, generator)
        elapsed = time.perf_counter() - start
        stats.decode_seconds += elapsed
        stats.step_seconds.append(elapsed)
        stats.generated_tokens += 1
        event = sequence.accept(token, logprob)
        yield event
    stats.cache_bytes = backend.cache_bytes(batch)
    stats.finish_reason = event.finish_reason


def add_arguments(parser) -> None:
    parser.add_argument("prompt", nargs="?", default=None, help="the prompt text")
    parser.add_argument("--prompt-file", default=None,
                        help="read the prompt from this file ('-': standard input)")
    add_model_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
    parser.add_argument("--greedy", action="store_true", help="always the most likely token")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible)")
    parser.add_argument("--stop", action="append", default=[],
                        help="stop when this text is generated (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="keep generating past the end-of-text token")
    parser.add_argument("--chat", action="store_true",
                        help="send the prompt as a user message through the chat template")


def _read_prompt(args) -> str:
    if (args.prompt is None) == (args.prompt_file is None):
        raise ValueError("give the prompt either as text or with --prompt-file (exactly one)")
    if args.prompt_file is None:
        return args.prompt
    if args.prompt_file == "-":
        return sys.stdin.read()
    path = Path(args.prompt_file)
    if not path.is_file():
        raise ValueError(f"--prompt-file {str(path)!r} does not exist")
    return path.read_text(encoding="utf-8")


def run(args) -> int:
    try:
        prompt = _read_prompt(args)
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, greedy=args.greedy,
                                seed=args.seed, stop=tuple(args.stop),
                                ignore_eos=args.ignore_eos)
        backend, tokenizer = load_backend(args.model, args.device, args.dtype,
                                           cuda_graphs=args.cuda_graphs)
        check_vocabulary(backend, tokenizer)
    except (ValueError, ModelLoadError) as error:
        print(f"power-retention generate: error: {error}", file=sys.stderr)
        return 2
    if args.chat:
        prompt_ids, template_stop = tokenizer.chat_prompt([{"role": "user", "content": prompt}])
        params = replace(params, stop=params.stop + template_stop)
    else:
        prompt_ids = tokenizer.encode_prompt(prompt)
    stats = GenerationStats()
    if not args.chat:
        sys.stdout.write(prompt)
    with torch.inference_mode():
        for event in generate_stream(backend, tokenizer, prompt_ids, params, stats):
            sys.stdout.write(event.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    print(f"[{type(backend).__name__} on {backend.device}] {stats.summary()}", file=sys.stderr)
    return 0
