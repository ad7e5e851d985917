"""The HTTP server: the OpenAI API shape over the continuous-batching engine.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``"stream": true``
for server-sent events), ``GET /v1/models``, ``GET /health``. Errors are OpenAI-style JSON,
``{"error": {"message", "type", "param", "code"}}``, with these statuses: 400 malformed JSON or
an invalid field, a prompt over ``max_prompt_tokens``, ``max_tokens`` over ``max_new_tokens``,
a cache larger than the whole memory budget; 404 an unknown model or route; 413 a body over
``max_body_bytes``; 429 more than ``max_concurrent_requests`` running or waiting.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, EngineFull, Event, RequestTooLarge
from .sampling import SamplingParams

# How often a non-streaming request checks whether its client is still there.
DISCONNECT_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class ServerLimits:
    """Per-request limits (the engine holds the limits on concurrency and memory)."""

    max_prompt_tokens: int = 32768
    max_new_tokens: int = 4096
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 256      # when a request gives none (completions and chat)


class ApiError(Exception):
    """An error answered as OpenAI-style JSON."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# -- request bodies ----------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")   # clients send fields we do not use (user, ...)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)                    # extension (as vLLM)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False                               # extension (as vLLM)


class CompletionBody(_Body):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=0)  # chosen-token logprobs only
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False


def _validation_error(error: ValidationError) -> ApiError:
    first = error.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    return ApiError(400, f"invalid request: {param}: {first['msg']}", param=param,
                    code="invalid_value")


def _message_text(message: ChatMessage) -> str:
    """A message's text; content parts of type "text" are joined, others refused."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"only text content parts are supported, got {part.get('type')!r}",
                           param="messages")
        texts.append(part["text"])
    return "".join(texts)


# -- the app -----------------------------------------------------------------------------------


def create_app(engine: Engine, model_name: str, limits: ServerLimits | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` under ``model_name``; starts and stops the engine."""
    limits = limits or ServerLimits()
    tokenizer = engine.tokenizer
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="power-retention", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return ApiError(error.status_code, str(error.detail), code=code).response()

    async def read_json(request: Request, schema: type[BaseModel]) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise ApiError(413, f"request body of {int(declared):,} bytes exceeds the limit of "
                           f"{limits.max_body_bytes:,} bytes", code="body_too_large")
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limits.max_body_bytes:
                raise ApiError(413, f"request body exceeds the limit of "
                               f"{limits.max_body_bytes:,} bytes", code="body_too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ApiError(400, f"the body is not valid JSON: {error}",
                           code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        try:
            return schema.model_validate(data)
        except ValidationError as error:
            raise _validation_error(error) from None

    def check_common(body: _Body, prompt_ids: list[int], max_tokens: int | None,
                     extra_stop: tuple[str, ...] = ()) -> SamplingParams:
        if body.model is not None and body.model != model_name:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server serves "
                           f"{model_name!r}", param="model", code="model_not_found")
        if body.n != 1:
            raise ApiError(400, "only n = 1 is supported", param="n")
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if len(prompt_ids) > limits.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(prompt_ids):,} tokens, more than the "
                           f"limit of {limits.max_prompt_tokens:,}",
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(limits.default_max_tokens, limits.max_new_tokens)
        if max_tokens > limits.max_new_tokens:
            raise ApiError(400, f"max_tokens is {max_tokens:,}, more than the limit of "
                           f"{limits.max_new_tokens:,}", param="max_tokens")
        stop = () if body.stop is None else (body.stop,) if isinstance(body.stop, str) \
            else tuple(body.stop)
        if any(not s for s in stop):
            raise ApiError(400, "stop strings must not be empty", param="stop")
        if any(t < 0 or t >= engine.backend.vocab_size for t in prompt_ids):
            raise ApiError(400, f"token ids must be in [0, {engine.backend.vocab_size})",
                           param="prompt")
        return SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature,
                              top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                              stop=stop + extra_stop, ignore_eos=body.ignore_eos)

    def submit(prompt_ids: list[int], params: SamplingParams):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def deliver(event: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        try:
            handle = engine.submit(prompt_ids, params, deliver)
        except EngineFull as error:
            raise ApiError(429, str(error), type="rate_limit_error",
                           code="too_many_requests") from None
        except RequestTooLarge as error:
            raise ApiError(400, str(error), param="max_tokens", code="memory_budget") from None
        return handle, queue

    async def collect(request: Request, handle, queue) -> list[Event]:
        """All events of a non-streaming request; cancels it if the client goes away."""
        events: list[Event] = []
        clock = asyncio.get_running_loop().time
        checked = clock()
        try:
            while not events or events[-1].finish_reason is None:
                try:
                    events.append(await asyncio.wait_for(queue.get(), DISCONNECT_POLL_SECONDS))
                except asyncio.TimeoutError:
                    pass
                if clock() - checked >= DISCONNECT_POLL_SECONDS:
                    checked = clock()
                    if await request.is_disconnected():
                        # nobody reads the answer; the status is for the access log
                        raise ApiError(499, "the client closed the request",
                                       code="client_closed")
        finally:
            if not events or events[-1].finish_reason is None:
                engine.cancel(handle)
        if events and events[-1].finish_reason == "error":
            raise ApiError(500, f"generation failed: {events[-1].error}", type="server_error")
        return events

    async def event_stream(handle, queue, chunk, final_chunks):
        """Server-sent events: one per piece of text, the finish, then ``[DONE]``.

        If the client disconnects, the server cancels this generator at its ``await``; the
        ``finally`` then frees the request's slot in the engine.
        """
        finished = False
        count = 0
        try:
            while not finished:
                event = await queue.get()
                finished = event.finish_reason is not None
                if event.finish_reason == "error":
                    yield _sse(ApiError(500, f"generation failed: {event.error}",
                                        type="server_error").body())
                    break
                count += event.token is not None
                if event.text or event.finish_reason:
                    yield _sse(chunk(event))
            else:
                for extra in final_chunks(count):
                    yield _sse(extra)
                yield "data: [DONE]\n\n"
        finally:
            if not finished:
                engine.cancel(handle)

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def wants_usage(body: _Body) -> bool:
        return bool(body.stream_options and body.stream_options.get("include_usage"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **engine.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": created, "owned_by": "power-retention"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body: CompletionBody = await read_json(request, CompletionBody)
        if body.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        prompt_ids = tokenizer.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        params = check_common(body, prompt_ids, body.max_tokens)
        handle, queue = submit(prompt_ids, params)
        ident, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(event: Event) -> dict:
            return {"id": ident, "object": "text_completion", "created": now,
                    "model": model_name,
                    "choices": [{"index": 0, "text": event.text, "logprobs": None,
                                 "finish_reason": event.finish_reason}]}

        if body.stream:
            def final_chunks(count):
                if wants_usage(body):
                    yield {**chunk(Event("")), "choices": [],
                           "usage": usage(len(prompt_ids), count)}
            return _sse_response(event_stream(handle, queue, chunk, final_chunks))

        events = await collect(request, handle, queue)
        tokens = [e for e in events if e.token is not None]
        logprobs = None
        if body.logprobs is not None:
            logprobs = {"tokens": [tokenizer.decode([e.token]) for e in tokens],
                        "token_logprobs": [e.logprob for e in tokens], "top_logprobs": None,
                        "text_offset": None}
        return {"id": ident, "object": "text_completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "text": "".join(e.text for e in events),
                             "logprobs": logprobs, "finish_reason": events[-1].finish_reason}],
                "usage": usage(len(prompt_ids), len(tokens))}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body: ChatBody = await read_json(request, ChatBody)
        if body.logprobs:
            raise ApiError(400, "logprobs are supported by /v1/completions only",
                           param="logprobs")
        messages = [{"role": m.role, "content": _message_text(m)} for m in body.messages]
        prompt_ids, template_stop = tokenizer.chat_prompt(messages)
        params = check_common(body, prompt_ids, body.max_completion_tokens or body.max_tokens,
                              template_stop)
        handle, queue = submit(prompt_ids, params)
        ident, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(event: Event) -> dict:
            delta = {"content": event.text} if event.text else {}
            return {"id": ident, "object": "chat.completion.chunk", "created": now,
                    "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                 "finish_reason": event.finish_reason}]}

        if body.stream:
            async def with_role():
                # the first chunk names the speaker, as OpenAI's does
                first = chunk(Event(""))
                first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                yield _sse(first)
                async for piece in event_stream(handle, queue, chunk, final_chunks):
                    yield piece

            def final_chunks(count):
                if wants_usage(body):
                    yield {**chunk(Event("")), "choices": [],
                           "usage": usage(len(prompt_ids), count)}
            return _sse_response(with_role())

        events = await collect(request, handle, queue)
        completion_tokens = sum(e.token is not None for e in events)
        return {"id": ident, "object": "chat.completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "logprobs": None,
                             "message": {"role": "assistant",
                                         "content": "".join(e.text for e in events)},
                             "finish_reason": events[-1].finish_reason}],
                "usage": usage(len(prompt_ids), completion_tokens)}

    return app


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _sse_response(stream) -> StreamingResponse:
    return StreamingResponse(stream, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
