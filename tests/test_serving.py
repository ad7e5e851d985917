"""The OpenAI-compatible server on loopback with a tiny random model: the real ``openai`` client
(streaming and not), raw HTTP for the errors, continuous batching that gives every request the
tokens it gets alone, limits, and disconnects that free their slot.

All traffic stays on 127.0.0.1 (a free port picked by the OS); every wait is bounded in time.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import uvicorn
from openai import OpenAI

from power_retention.data.tokenizer import ByteTokenizer
from power_retention.model import PowerRetentionConfig, PowerRetentionForCausalLM
from power_retention.serving import (
    Engine,
    EngineLimits,
    RetentionBackend,
    SamplingParams,
    SequentialBackend,
    ServerLimits,
    TextTokenizer,
    create_app,
    generate_stream,
    make_backend,
)

MODEL = "tiny-power"
WAIT_SECONDS = 60          # the longest any test waits for the server (a loaded CPU)


def tiny_model(dtype=torch.float64, seed=0, kinds=("power", "linear")
               ) -> PowerRetentionForCausalLM:
    """Two layers (by default power retention, then gated linear), chunk size 8 so buffers fold
    often, window 6; weights perturbed so outputs depend strongly on the context (the default
    init is near uniform)."""
    torch.manual_seed(seed)
    config = PowerRetentionConfig(vocab_size=258, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, chunk_size=8, sliding_window=6,
                                  time_mixing=list(kinds), eos_token_id=256)
    model = PowerRetentionForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


class Server:
    """uvicorn on 127.0.0.1 in a thread, on a socket bound to a free port."""

    def __init__(self, app) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + WAIT_SECONDS
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(WAIT_SECONDS)
        self.socket.close()


def start_server(limits: EngineLimits, server_limits: ServerLimits | None = None):
    backend = RetentionBackend(tiny_model(), MODEL)
    engine = Engine(backend, TextTokenizer(ByteTokenizer()), limits)
    return engine, Server(create_app(engine, MODEL, server_limits or ServerLimits(
        max_prompt_tokens=200, max_new_tokens=400, max_body_bytes=4096, default_max_tokens=8)))


@pytest.fixture(scope="module")
def server():
    engine, server = start_server(EngineLimits(max_batch_size=32, max_concurrent_requests=40))
    with server:
        server.engine = engine
        yield server


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                  timeout=WAIT_SECONDS)


def wait_for(server, condition) -> dict:
    """Poll /health until ``condition(health)`` holds (bounded); the last health."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        health = httpx.get(server.url + "/health", timeout=5).json()
        if condition(health):
            return health
        assert time.monotonic() < deadline, f"condition not reached: {health}"
        time.sleep(0.05)


def wait_idle(server) -> dict:
    """Poll /health until nothing runs or waits (bounded)."""
    return wait_for(server, lambda health: health["running"] == health["waiting"] == 0)


# -- the openai client -------------------------------------------------------------------------


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(server.url + "/health", timeout=5).json()
    assert health["status"] == "ok" and health["model"] == MODEL


def test_completion_streaming_equals_non_streaming(client):
    kwargs = dict(model=MODEL, prompt="def main():", max_tokens=30, temperature=0,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == 1 + len("def main():")      # <|endoftext|> + bytes
    assert whole.usage.completion_tokens == 30
    pieces, finish = [], None
    for chunk in client.completions.create(stream=True, **kwargs):
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == whole.choices[0].text and finish == "length"


def test_chat_streaming_and_non_streaming(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20,
                                           temperature=0)
    message = whole.choices[0].message
    assert message.role == "assistant" and whole.object == "chat.completion"
    assert whole.choices[0].finish_reason in ("length", "stop")
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(model=MODEL, prompt="abc", max_tokens=20, temperature=1.0, top_p=0.9,
                  seed=123, extra_body={"ignore_eos": True, "top_k": 50})
    first = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == first


def test_concurrent_requests_get_the_tokens_they_get_alone(server, client):
    """18 greedy requests at once (prompt lengths 1..35 bytes, max_tokens 8..25, so they join
    with different buffer lengths and leave at different steps) give the same tokens as each
    run alone; the float64 model makes this exact, and the chosen tokens' logprobs agree to
    1e-9 (batched arithmetic may round differently)."""
    prompts = [("x" * i + "hello")[: 1 + 2 * i] for i in range(18)]

    def complete(i):
        out = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=8 + i,
                                        temperature=0, logprobs=0,
                                        extra_body={"ignore_eos": True})
        return out.choices[0].text, out.choices[0].logprobs.token_logprobs

    alone = [complete(i) for i in range(len(prompts))]
    steps_before = server.engine.steps
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(complete, range(len(prompts))))
    for (text_a, logprobs_a), (text_b, logprobs_b) in zip(alone, together):
        assert text_a == text_b
        assert len(logprobs_a) == len(logprobs_b)
        assert max(abs(a - b) for a, b in zip(logprobs_a, logprobs_b)) < 1e-9
    assert server.engine.largest_batch >= 8          # they really ran together
    # batched: far fewer decode steps than the sum of the requests' tokens
    assert server.engine.steps - steps_before < sum(8 + i for i in range(18)) / 2
    wait_idle(server)


def test_stream_disconnect_frees_the_slot(server):
    body = {"model": MODEL, "prompt": "long", "max_tokens": 400, "stream": True,
            "temperature": 0, "ignore_eos": True}
    cancelled = server.engine.cancelled
    with httpx.Client(timeout=WAIT_SECONDS) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as response:
            assert response.status_code == 200
            events = (line for line in response.iter_lines() if line)
            for _ in range(3):
                assert next(events).startswith("data: ")
            assert httpx.get(server.url + "/health", timeout=5).json()["running"] == 1
        # leaving the block closes the connection mid-stream
    health = wait_idle(server)
    assert health["reserved_bytes"] == 0 and health["cancelled"] == cancelled + 1


def test_non_streaming_disconnect_frees_the_slot(server, monkeypatch):
    body = {"model": MODEL, "prompt": "long", "max_tokens": 400, "temperature": 0,
            "ignore_eos": True}
    cancelled = server.engine.cancelled
    # a non-streaming request learns of the disconnect at its next poll (0.5 s): steps of at
    # least 5 ms keep the 400 tokens running past it however fast the machine is
    backend, step = server.engine.backend, server.engine.backend.step
    monkeypatch.setattr(backend, "step", lambda *args: (time.sleep(0.005), step(*args))[1])
    payload = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            f"application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_SECONDS) as conn:
        conn.sendall(head + payload)
        wait_for(server, lambda health: health["running"] == 1)
    # the connection is closed while the request runs
    assert wait_idle(server)["cancelled"] == cancelled + 1


# -- errors, over raw HTTP ---------------------------------------------------------------------


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_malformed_json(server, path):
    response = httpx.post(server.url + path, content=b"{not json",
                          headers={"content-type": "application/json"}, timeout=5)
    assert _error(response, 400)["code"] == "invalid_json"
    response = httpx.post(server.url + path, json=[1, 2], timeout=5)
    assert _error(response, 400)["code"] == "invalid_json"


@pytest.mark.parametrize("body, status, expected", [
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model_not_found"),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 401}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x" * 200}, 400, "context_length_exceeded"),
    ({"model": MODEL, "prompt": "hi", "n": 2}, 400, "n"),
    ({"model": MODEL, "prompt": [5, 999]}, 400, "prompt"),
])
def test_completion_errors(server, body, status, expected):
    error = _error(httpx.post(server.url + "/v1/completions", json=body, timeout=5), status)
    assert expected in (error["code"], error["param"]) or expected in error["message"]


def test_chat_errors(server):
    url = server.url + "/v1/chat/completions"
    _error(httpx.post(url, json={"model": MODEL, "messages": []}, timeout=5), 400)
    bad_role = {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}
    _error(httpx.post(url, json=bad_role, timeout=5), 400)
    unknown = {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}
    assert _error(httpx.post(url, json=unknown, timeout=5), 404)["code"] == "model_not_found"


def test_body_too_large_and_unknown_route(server):
    big = {"model": MODEL, "prompt": "x" * 5000}
    response = httpx.post(server.url + "/v1/completions", json=big, timeout=5)
    assert _error(response, 413)["code"] == "body_too_large"

    def chunked():                       # no content-length: the limit applies while reading
        for _ in range(10):
            yield b" " * 1000

    response = httpx.post(server.url + "/v1/completions", content=chunked(), timeout=5)
    assert _error(response, 413)["code"] == "body_too_large"
    assert _error(httpx.get(server.url + "/v1/nothing", timeout=5), 404)["code"] == "not_found"


def test_memory_budget_and_concurrency_limits(monkeypatch):
    """A budget of two requests' caches runs two, queues the third, refuses a fourth (429);
    a budget below one request refuses every request (400)."""
    per_request = RetentionBackend(tiny_model(), MODEL).sequence_bytes()
    engine, server = start_server(EngineLimits(memory_budget_bytes=2 * per_request,
                                               max_batch_size=8, max_concurrent_requests=3))
    # steps of at least 5 ms keep the first two requests' 400 tokens running for 2 s, so the
    # health polls see two running and one waiting however fast the machine is. (Once, in a
    # fresh-clone CI run, the polls never saw the third request: the server had run 401 steps,
    # nothing waited or was cancelled. The statuses are now checked first, so a refused third
    # request would show its status.)
    step = engine.backend.step
    monkeypatch.setattr(engine.backend, "step", lambda *args: (time.sleep(0.005), step(*args))[1])
    body = {"model": MODEL, "prompt": "a", "max_tokens": 400, "stream": True,
            "temperature": 0, "ignore_eos": True}
    with server, httpx.Client(timeout=WAIT_SECONDS) as http:
        streams = [http.stream("POST", server.url + "/v1/completions", json=body)
                   for _ in range(3)]
        responses = [s.__enter__() for s in streams]
        try:
            assert [r.status_code for r in responses] == [200] * 3
            health = wait_for(server, lambda h: h["running"] == 2 and h["waiting"] == 1)
            assert health["reserved_bytes"] == 2 * per_request
            refused = http.post(server.url + "/v1/completions", json={**body, "stream": False})
            assert _error(refused, 429)["type"] == "rate_limit_error"
        finally:
            for s in streams:
                s.__exit__(None, None, None)
        wait_idle(server)

    engine, server = start_server(EngineLimits(memory_budget_bytes=per_request - 1))
    with server:
        response = httpx.post(server.url + "/v1/completions",
                              json={"model": MODEL, "prompt": "a"}, timeout=5)
        assert "memory budget" in _error(response, 400)["message"]


def test_engine_prefills_long_prompts_in_pieces():
    """With 5 prompt tokens per loop, prompts are prefilled in pieces between decode steps of
    the others (the first request finishes before the longest prompt is prefilled), and each
    request still gets the greedy tokens of a whole-prompt prefill."""
    tokenizer = TextTokenizer(ByteTokenizer())
    backend = RetentionBackend(tiny_model(kinds=["power", "softmax"]), MODEL)
    params = SamplingParams(max_new_tokens=12, greedy=True, ignore_eos=True)
    prompts = [tokenizer.encode_prompt("longer than five tokens " * k) for k in (1, 2, 3)]
    outputs, order = [[] for _ in prompts], []
    done = [threading.Event() for _ in prompts]
    engine = Engine(backend, tokenizer, EngineLimits(prefill_chunk_tokens=5)).start()
    try:
        for i, prompt in enumerate(prompts):
            def on_event(event, i=i):
                outputs[i].append(event)
                order.append((i, event.finish_reason))
                if event.finish_reason is not None:
                    done[i].set()
            engine.submit(prompt, params, on_event)
        assert all(d.wait(WAIT_SECONDS) for d in done)
    finally:
        engine.stop()
    for prompt, events in zip(prompts, outputs):
        expected = [e.token for e in generate_stream(backend, tokenizer, prompt, params)]
        assert [e.token for e in events] == expected
    assert order.index((0, "length")) < order.index((2, None))


def test_engine_serves_any_transformers_model_one_sequence_at_a_time():
    """Another causal LM (a tiny Llama) goes through SequentialBackend: requests still join and
    leave between steps and get the tokens they get alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, eos_token_id=256)).eval()
    backend = make_backend(llama, "llama")
    assert isinstance(backend, SequentialBackend)
    tokenizer = TextTokenizer(ByteTokenizer())
    params = SamplingParams(max_new_tokens=10, greedy=True, ignore_eos=True)
    prompts = [tokenizer.encode_prompt(text) for text in ("a", "bb bb", "ccc ccc ccc")]
    outputs = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]
    engine = Engine(backend, tokenizer).start()
    try:
        for i, prompt in enumerate(prompts):
            def on_event(event, i=i):
                outputs[i].append(event.token)
                if event.finish_reason is not None:
                    done[i].set()
            engine.submit(prompt, params, on_event)
        assert all(d.wait(WAIT_SECONDS) for d in done)
    finally:
        engine.stop()
    for prompt, tokens in zip(prompts, outputs):
        assert tokens == [e.token for e in generate_stream(backend, tokenizer, prompt, params)]


# -- the batched backend itself ------------------------------------------------------------------


@pytest.mark.parametrize("kinds, slots", [(["power", "linear"], False),
                                          (["power", "linear"], True),
                                          (["power", "softmax"], False),
                                          (["window", "power"], False)])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_batch_rows_match_each_sequence_alone(kinds, slots, dtype, tolerance):
    """Sequences join a running batch every 3 steps (so power buffers, KV caches and window
    caches of other lengths get left-padded) and one leaves: every row's logits equal those of
    its sequence alone, to ``tolerance`` (float32 rounds differently in a batch). With
    persistent slots the rows grow 1 -> 2 -> 4 and, once only one sequence runs, shrink to 2."""
    backend = RetentionBackend(tiny_model(dtype, kinds=kinds), MODEL, persistent_slots=slots)
    prompts = [list(range(1, 1 + n)) for n in (3, 10, 17, 8)]
    steps = 18

    def alone(prompt):
        logits, cache = backend.prefill(prompt)
        batch = backend.join(None, cache)
        tokens, rows = [int(logits.argmax())], []
        for _ in range(steps):
            row = backend.step(batch, [tokens[-1]], [len(prompt) + len(tokens) - 1])[0]
            rows.append(row)
            tokens.append(int(row.argmax()))
        return tokens, rows

    expected = [alone(p) for p in prompts]
    batch, running = None, []

    def step():
        rows = backend.step(batch, [t[-1] for _, t, _ in running],
                            [len(p) + len(t) - 1 for p, t, _ in running])
        for row, (_, tokens, seen) in zip(rows, running):
            seen.append(row)
            tokens.append(int(row.argmax()))

    for prompt in prompts:                            # one joins every 3 steps
        logits, cache = backend.prefill(prompt)
        batch = backend.join(batch, cache)
        running.append((prompt, [int(logits.argmax())], []))
        for _ in range(3):
            step()
    finished = {1: running.pop(1)}                   # the second leaves, the others go on
    batch = backend.keep(batch, [0, 2, 3])
    for _ in range(3):
        step()
    assert batch.rows == 3
    if slots:
        assert batch.capacity == 4
        finished[2], finished[3] = running.pop(1), running.pop(1)
        batch = backend.keep(batch, [0])
        assert batch.capacity == 2 and batch.rows == 1
        for _ in range(3):
            step()
    finished.update(zip((0, 2, 3), running))
    for index, (_, tokens, seen) in finished.items():
        tokens_alone, rows_alone = expected[index]
        assert tokens == tokens_alone[:len(tokens)]
        assert max(float((a - b).abs().max()) for a, b in zip(seen, rows_alone)) < tolerance


@pytest.mark.parametrize("slots", [False, True])
def test_bfloat16_state_copies_follow_joins_and_leaves(slots):
    """A bfloat16 model's power layers decode from a bfloat16 copy of the state; the backend
    writes states row by row (joins, leaves, resizes), and after every step each copy is its
    state rounded."""
    backend = RetentionBackend(tiny_model(torch.bfloat16), MODEL, persistent_slots=slots)
    batch, running = None, []

    def step():
        rows = backend.step(batch, [t[-1] for t in running],
                            [len(p) + len(t) - 1 for p, t in zip(prompts, running)])
        for row, tokens in zip(rows, running):
            tokens.append(int(row.argmax()))
        power = [layer for layer in batch.cache.layers if layer.buffer_capacity]
        assert power and all(torch.equal(layer.read_S, layer.state.S.to(torch.bfloat16))
                             for layer in power)

    prompts = [list(range(1, 1 + n)) for n in (3, 10, 17, 8)]
    for prompt in prompts:
        logits, cache = backend.prefill(prompt)
        batch = backend.join(batch, cache)
        running.append([int(logits.argmax())])
        for _ in range(3):
            step()
    batch = backend.keep(batch, [0, 2, 3])
    del prompts[1], running[1]
    for _ in range(9):                      # the buffers of 8 fold on the way
        step()
    if slots:
        batch = backend.keep(batch, [0])
        del prompts[1:], running[1:]
        assert batch.capacity == 2
        step()


def test_serve_without_a_model_says_what_to_pass(capsys):
    from power_retention.cli import main

    assert main(["serve", "--port", "1"]) == 2
    assert "no model given: pass --model FOLDER" in capsys.readouterr().err


def test_persistent_slots_need_a_recurrent_model():
    with pytest.raises(ValueError, match="persistent slots need a model of power and linear"):
        RetentionBackend(tiny_model(kinds=["power", "softmax"]), MODEL, persistent_slots=True)
