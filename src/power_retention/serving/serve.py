"""The ``serve`` command: an OpenAI-compatible HTTP server with continuous batching.

    power-retention serve --model FOLDER --port 8000
    # then, from Python:  OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
"""

from __future__ import annotations

import sys
from pathlib import Path

from .app import ServerLimits, create_app
from .backends import RetentionBackend
from .engine import Engine, EngineLimits
from .loading import ModelLoadError, add_model_arguments, check_vocabulary, load_backend


def add_arguments(parser) -> None:
    add_model_arguments(parser, cuda_graphs=False)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0 exposes the server to the network)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--served-model-name", default=None,
                        help="the model id clients ask for; default: the folder's name")
    defaults, engine_defaults = ServerLimits(), EngineLimits()
    parser.add_argument("--memory-budget-gb", type=float,
                        default=engine_defaults.memory_budget_bytes / 2**30,
                        help="cache memory that running requests may reserve together (GiB)")
    parser.add_argument("--max-batch-size", type=int, default=engine_defaults.max_batch_size,
                        help="most requests decoded together")
    parser.add_argument("--max-concurrent-requests", type=int,
                        default=engine_defaults.max_concurrent_requests,
                        help="running plus waiting requests; beyond: HTTP 429")
    parser.add_argument("--prefill-chunk-tokens", type=int,
                        default=engine_defaults.prefill_chunk_tokens,
                        help="most prompt tokens prefilled between two decode steps")
    parser.add_argument("--max-prompt-tokens", type=int, default=defaults.max_prompt_tokens,
                        help="longest prompt accepted; beyond: HTTP 400")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                        help="largest max_tokens a request may ask for; beyond: HTTP 400")
    parser.add_argument("--default-max-tokens", type=int, default=defaults.default_max_tokens,
                        help="max_tokens of a request that gives none")
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes,
                        help="largest request body; beyond: HTTP 413")


def run(args) -> int:
    import uvicorn

    try:
        name = args.served_model_name or (Path(args.model).name if args.model else None)
        backend, tokenizer = load_backend(args.model, args.device, args.dtype, name,
                                           args.cuda_graphs)
        check_vocabulary(backend, tokenizer)
    except ModelLoadError as error:
        print(f"power-retention serve: error: {error}", file=sys.stderr)
        return 2
    engine = Engine(backend, tokenizer, EngineLimits(
        memory_budget_bytes=int(args.memory_budget_gb * 2**30),
        max_batch_size=args.max_batch_size,
        max_concurrent_requests=args.max_concurrent_requests,
        prefill_chunk_tokens=args.prefill_chunk_tokens))
    limits = ServerLimits(max_prompt_tokens=args.max_prompt_tokens,
                          max_new_tokens=args.max_new_tokens,
                          max_body_bytes=args.max_body_bytes,
                          default_max_tokens=args.default_max_tokens)
    if isinstance(backend, RetentionBackend):
        cache = f"fixed cache of {backend.sequence_bytes():,} bytes per request"
    else:
        cache = "KV cache growing with each request's context"
    print(f"serving {name!r} ({type(backend).__name__} on {backend.device}, {cache}) at "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(create_app(engine, name, limits), host=args.host, port=args.port,
                log_level="info")
    return 0
