"""Generation and serving: the continuous-batching engine, the OpenAI-compatible HTTP app and
the ``generate`` / ``serve`` commands. See docs/serving.md.

The HTTP app (``create_app``, ``ServerLimits``) is imported on first use, so the engine and
``generate`` work where FastAPI is not installed."""

from .backends import Backend, RetentionBackend, SequentialBackend, make_backend
from .engine import Engine, EngineFull, EngineLimits, Event, RequestTooLarge
from .generate import GenerationStats, generate_stream
from .loading import ModelLoadError, load_backend, load_model
from .sampling import SamplingParams, sample_token
from .tokens import IncrementalDecoder, TextTokenizer, load_text_tokenizer

__all__ = ["Backend", "Engine", "EngineFull", "EngineLimits", "Event", "GenerationStats",
           "IncrementalDecoder", "ModelLoadError", "RequestTooLarge", "RetentionBackend",
           "SamplingParams", "SequentialBackend", "ServerLimits", "TextTokenizer", "create_app",
           "generate_stream", "load_backend", "load_model", "load_text_tokenizer",
           "make_backend", "sample_token"]


def __getattr__(name: str):
    if name in ("ServerLimits", "create_app"):
        from . import app
        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
