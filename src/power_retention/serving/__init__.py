"""Generation and serving: the continuous-batching engine, the OpenAI-compatible HTTP app and
the ``generate`` / ``serve`` commands. See docs/serving.md."""

from .app import ServerLimits, create_app
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
