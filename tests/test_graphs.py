"""CUDA-graph decoding (``model.graphs``): in-place cache updates on the CPU; on a GPU, graphed
decode steps against eager ones through several folds of the buffer, and ``generate`` through
the backend with and without graphs."""

from __future__ import annotations

import threading

import pytest
import torch

from power_retention.data.tokenizer import ByteTokenizer
from power_retention.model import (
    GraphedDecoder,
    PowerRetentionCache,
    PowerRetentionConfig,
    PowerRetentionForCausalLM,
    graphable,
)
from power_retention.serving import (
    Engine,
    RetentionBackend,
    SamplingParams,
    TextTokenizer,
    generate_stream,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def model_of(kinds, device="cpu", dtype=torch.float32, chunk=8) -> PowerRetentionForCausalLM:
    torch.manual_seed(0)
    config = PowerRetentionConfig(vocab_size=258, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=len(kinds), num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, chunk_size=chunk,
                                  time_mixing=list(kinds), eos_token_id=256)
    model = PowerRetentionForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.to(device=device, dtype=dtype)


@torch.inference_mode()
def decode_logits(model, steps: int, in_place: bool = False, graphs: bool = False,
                  rows: int = 3) -> tuple[torch.Tensor, list[int]]:
    """Prefill 11 tokens per row, then ``steps`` greedy-free steps of fixed tokens; the logits of
    every step ``[steps, rows, V]`` and the data pointers of the first layer's state."""
    device = next(model.parameters()).device
    ids = torch.randint(0, 256, (rows, 11 + steps), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    cache = PowerRetentionCache(model.config)
    model(ids[:, :11], past_key_values=cache, use_cache=True)
    decoder = GraphedDecoder(model, cache) if graphs else None
    for layer in cache.layers:
        layer.in_place = in_place or graphs
    pointers, out = [], []
    for i in range(steps):
        tokens, positions = ids[:, 11 + i], torch.full((rows,), 11 + i)
        if decoder is not None:
            logits = decoder.step(tokens.cpu(), positions)
        else:
            logits = model(tokens[:, None], position_ids=positions[:, None].to(device),
                           past_key_values=cache, use_cache=True).logits[:, -1].float()
        out.append(logits)
        pointers.append(cache.layers[0].state.S.data_ptr())
    return torch.stack(out), pointers


@pytest.mark.parametrize("kinds", [["power", "power"], ["linear", "power"]])
def test_in_place_updates_keep_the_state_tensors_and_the_numbers(kinds):
    model = model_of(kinds)
    ordinary, moved = decode_logits(model, 20)            # 20 steps: two folds of 8 tokens
    in_place, kept = decode_logits(model, 20, in_place=True)
    assert torch.equal(ordinary, in_place)
    assert len(set(kept)) == 1 and len(set(moved)) > 1


def test_graphed_decoder_refuses_what_it_cannot_capture():
    with pytest.raises(ValueError, match="CUDA device whose layers are all 'power' or 'linear'"):
        GraphedDecoder(model_of(["power"]), PowerRetentionCache(model_of(["power"]).config))
    assert not graphable(model_of(["power", "softmax"]))
    backend = RetentionBackend(model_of(["power"]))
    assert not backend.cuda_graphs                         # a CPU model decodes eagerly


@pytest.mark.gpu
@needs_cuda
def test_graphed_decoder_matches_eager_steps():
    with pytest.raises(ValueError, match="layers are all 'power' or 'linear'"):
        GraphedDecoder(model_of(["softmax"], "cuda"), None)
    model = model_of(["power", "linear", "power"], "cuda")
    eager, _ = decode_logits(model, 29)          # phases 0..7 visited 3 times, 4 folds
    graphed, pointers = decode_logits(model, 29, graphs=True)
    assert len(set(pointers)) == 1
    error = (graphed - eager).norm() / eager.norm()
    print(f"graphed vs eager decode, 29 steps: relative error {error:.2e}")
    assert error < 1e-5


@pytest.mark.gpu
@needs_cuda
def test_generate_with_and_without_graphs_gives_the_same_tokens():
    model = model_of(["power", "power"], "cuda", chunk=16)
    tokenizer = TextTokenizer(ByteTokenizer())
    prompt = tokenizer.encode_prompt("def graphs(): return 'replayed'")
    params = SamplingParams(max_new_tokens=60, greedy=True, ignore_eos=True)
    runs = []
    for graphs in (False, True):
        backend = RetentionBackend(model, cuda_graphs=graphs)
        assert backend.cuda_graphs == graphs
        runs.append([e.token for e in generate_stream(backend, tokenizer, prompt, params)])
    assert runs[0] == runs[1]


@pytest.mark.gpu
@needs_cuda
def test_engine_keeps_its_graphs_while_requests_come_and_go():
    """Persistent slots: requests of different lengths through the engine with CUDA graphs
    (rows join, leave, double and halve under one set of graphs per size) get the greedy
    tokens each gets alone, decoded eagerly."""
    model = model_of(["power", "linear"], "cuda", chunk=8)
    tokenizer = TextTokenizer(ByteTokenizer())
    backend = RetentionBackend(model)
    assert backend.cuda_graphs and backend.persistent
    requests = [(tokenizer.encode_prompt("x" * (3 + 5 * i)),
                 SamplingParams(max_new_tokens=12 + 9 * i, greedy=True, ignore_eos=True))
                for i in range(6)]
    outputs = [[] for _ in requests]
    done = [threading.Event() for _ in requests]
    engine = Engine(backend, tokenizer).start()
    try:
        for i, (prompt, params) in enumerate(requests):
            def on_event(event, i=i):
                outputs[i].append(event.token)
                if event.finish_reason is not None:
                    done[i].set()
            engine.submit(prompt, params, on_event)
        assert all(d.wait(120) for d in done)
    finally:
        engine.stop()
    eager = RetentionBackend(model, cuda_graphs=False)
    for (prompt, params), tokens in zip(requests, outputs):
        assert tokens == [e.token for e in generate_stream(eager, tokenizer, prompt, params)]
