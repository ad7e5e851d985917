"""The causal LM: cached decoding equals one full forward, padding, save/load, constant cache,
compile, configuration checks, gradient checkpointing. Tiny random models, float64 on the CPU
unless a test says otherwise."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from power_retention import sympow_dim
from power_retention.model import (
    PowerRetentionCache,
    PowerRetentionConfig,
    PowerRetentionForCausalLM,
    rope_frequencies,
)

HYBRID = ["power", "softmax", "window", "linear"]
KINDS = ["power", "softmax", "window", "linear", HYBRID]
KIND_IDS = ["power", "softmax", "window", "linear", "hybrid"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: threads only add synchronisation (tens of times slower on a busy host)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> PowerRetentionConfig:
    fields = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, time_mixing="power",
                  sliding_window=6, chunk_size=4, pad_token_id=0, bos_token_id=None,
                  eos_token_id=None)
    fields.update(overrides)
    return PowerRetentionConfig(**fields)


def tiny_model(seed: int = 0, dtype=torch.float64, **overrides) -> PowerRetentionForCausalLM:
    """A random model whose gates decay noticeably (the default init keeps them near 1)."""
    torch.manual_seed(seed)
    model = PowerRetentionForCausalLM(tiny_config(**overrides)).to(dtype).eval()
    with torch.no_grad():
        for block in model.model.layers:
            gate = getattr(block.self_attn, "g_proj", None)
            if gate is not None:
                gate.weight.normal_(0, 0.3)
                gate.bias.uniform_(0, 2)
    return model


def random_ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 61, (B, T), generator=torch.Generator().manual_seed(seed))


# -- cached decoding equals the full forward ------------------------------------------------------


@pytest.mark.parametrize("time_mixing", KINDS, ids=KIND_IDS)
def test_decoding_matches_full_forward(time_mixing):
    model = tiny_model(time_mixing=time_mixing)
    ids = random_ids(2, 31)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits

        # prefill 9 tokens (chunked path), then one token at a time (decode path; the
        # buffer of 4 is folded into the state every 4 tokens)
        out = model(ids[:, :9], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(9, 31):
            out = model(ids[:, t:t + 1], past_key_values=cache)
            steps.append(out.logits)
        stepwise = torch.cat(steps, 1)

        # prefill in pieces: chunk boundaries inside and across pieces, some single tokens
        # in between so that later pieces start from a non-empty buffer
        cache, pieces, start = None, [], 0
        for size in (5, 1, 1, 9, 3, 1, 11):
            out = model(ids[:, start:start + size], past_key_values=cache, use_cache=True)
            cache, start = out.past_key_values, start + size
            pieces.append(out.logits)
        piecewise = torch.cat(pieces, 1)
    assert start == 31
    assert cache.get_seq_length() == 31
    torch.testing.assert_close(stepwise, full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(piecewise, full, rtol=1e-10, atol=1e-10)


def test_default_chunk_size_decoding_matches():
    # chunk_size None: the op picks the prefill chunks, decoding folds every 64 tokens
    model = tiny_model(time_mixing="power", chunk_size=None)
    ids = random_ids(1, 80)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :3])
        steps, cache = [out.logits], out.past_key_values
        for t in range(3, 80):
            out = model(ids[:, t:t + 1], past_key_values=cache)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)


def test_bfloat16_decoding_reads_a_rounded_copy_of_the_state():
    """A bfloat16 model's decode steps read ``S`` rounded to bfloat16 (half the bytes per step
    on a GPU) while folds go into the float32 state: after every step, folds included, the copy
    is that state rounded, the cache counts its bytes, and the logits stay within bfloat16
    rounding of the float64 model's. Float64 models keep no copy, nor do degree-4 ones."""
    kinds = ["power", "linear", "power", "power"]
    model = tiny_model(time_mixing=kinds, dtype=torch.bfloat16)
    exact = copy.deepcopy(model).double()               # the same weights
    ids = random_ids(2, 23)
    with torch.no_grad():
        full = exact(ids, use_cache=False).logits
        out = model(ids[:, :5])
        steps, cache = [out.logits], out.past_key_values
        for t in range(5, 23):                 # the buffer of 4 folds every 4 steps
            out = model(ids[:, t:t + 1], past_key_values=cache)
            steps.append(out.logits)
            for kind, layer in zip(kinds, cache.layers):
                if kind == "power":
                    assert torch.equal(layer.read_S, layer.state.S.to(torch.bfloat16))
                    assert layer.state.S.dtype == torch.float32
                else:
                    assert layer.read_S is None
        exact_cache = exact(ids[:, :5]).past_key_values
        exact(ids[:, 5:6], past_key_values=exact_cache)
    assert all(layer.read_S is None for layer in exact_cache.layers)
    D, Hk, d = sympow_dim(8, 2), 2, 8
    copies = 3 * 2 * Hk * D * d * 2                     # 3 power layers, 2 sequences, bf16
    state = 2 * model.state_bytes()
    buffers = 3 * 2 * 4 * Hk * (2 * d * 2 + 4)          # 4 slots of k, v (bf16), log gate (fp32)
    assert cache.nbytes() == state + copies + buffers
    # degree 4 reads the float32 state: its query sums features that cancel, which the copy's
    # rounding would reach
    quartic = tiny_model(dtype=torch.bfloat16, deg=4)
    with torch.no_grad():
        cache = quartic(ids[:, :5]).past_key_values
        quartic(ids[:, 5:6], past_key_values=cache)
    assert all(layer.read_S is None for layer in cache.layers)
    stepwise = torch.cat(steps, 1).double()
    assert float((stepwise - full).norm() / full.norm()) < 2e-2


# -- left padding -------------------------------------------------------------------------------


@pytest.mark.parametrize("time_mixing", KINDS, ids=KIND_IDS)
def test_left_padded_batch_equals_each_sequence_alone(time_mixing):
    model = tiny_model(time_mixing=time_mixing)
    lengths = (13, 5, 9)
    T = max(lengths)
    seqs = [random_ids(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    batch = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        batch[i, T - s.shape[1]:], mask[i, T - s.shape[1]:] = s[0], 1

    with torch.no_grad():
        logits = model(batch, attention_mask=mask, use_cache=False).logits
        generated = model.generate(batch, attention_mask=mask, max_new_tokens=12,
                                   do_sample=False)
        for i, s in enumerate(seqs):
            alone = model(s, use_cache=False).logits
            torch.testing.assert_close(logits[i, T - s.shape[1]:], alone[0],
                                       rtol=1e-10, atol=1e-10)
            tokens = model.generate(s, max_new_tokens=12, do_sample=False)
            assert torch.equal(generated[i, T - s.shape[1]:], tokens[0])


def test_left_padded_generation_logits_equal_alone():
    # the decode-step logits too, not only the argmax, for the hybrid model
    model = tiny_model(time_mixing=HYBRID)
    a, b = random_ids(1, 10, seed=3), random_ids(1, 4, seed=4)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 6, dtype=torch.long), b], 1)])
    mask = (batch != 0).long()
    kwargs = dict(max_new_tokens=9, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    with torch.no_grad():
        both = model.generate(batch, attention_mask=mask, **kwargs)
        alone = [model.generate(s, **kwargs) for s in (a, b)]
    for i in range(2):
        torch.testing.assert_close(torch.stack(both.logits)[:, i],
                                   torch.stack(alone[i].logits)[:, 0], rtol=1e-10, atol=1e-10)


def test_sampling_generates():
    model = tiny_model(time_mixing=HYBRID)
    batch = random_ids(3, 7)
    torch.manual_seed(0)
    out = model.generate(batch, attention_mask=torch.ones_like(batch), do_sample=True,
                         top_k=10, temperature=0.8, max_new_tokens=20)
    assert out.shape == (3, 27)
    assert torch.equal(out[:, :7], batch)


# -- save and load ------------------------------------------------------------------------------


FAMILIES = {
    # Llama / Mistral: RMSNorm, gated MLP, no biases, untied
    "llama": dict(),
    # Qwen2: biases on q/k/v only; tied embeddings (small Qwen2 models)
    "qwen2": dict(attention_bias=True, tie_word_embeddings=True, rope_theta=1e6),
    # Qwen3: head_dim set apart from hidden/heads, q/k norm, yarn scaling
    "qwen3": dict(head_dim=16, qk_norm=True,
                  rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                "original_max_position_embeddings": 16}),
    # StarCoder2: LayerNorm, plain MLP with biases, biases everywhere, gelu
    "starcoder2": dict(norm_type="layernorm", mlp_type="plain", mlp_bias=True,
                       attention_bias=True, attention_out_bias=True,
                       hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_save_and_reload(tmp_path, family):
    model = tiny_model(time_mixing=HYBRID, dtype=torch.float32, **FAMILIES[family])
    ids = random_ids(2, 11)
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, PowerRetentionConfig)
    assert config.layer_time_mixing == HYBRID
    for loaded in (PowerRetentionForCausalLM.from_pretrained(tmp_path),
                   AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert isinstance(loaded, PowerRetentionForCausalLM)
        with torch.no_grad():
            assert torch.equal(loaded.eval()(ids).logits, before)
    if FAMILIES[family].get("tie_word_embeddings"):
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


# -- constant cache memory ----------------------------------------------------------------------


def test_cache_memory_constant_in_generated_tokens():
    model = tiny_model(time_mixing=["power", "linear", "window", "power"],
                       dtype=torch.float32)
    prompt = random_ids(2, 5)
    sizes = {}
    for n in (10, 1000):
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             return_dict_in_generate=True)
        assert out.sequences.shape[1] == 5 + n
        cache = out.past_key_values
        assert isinstance(cache, PowerRetentionCache)
        assert cache.get_seq_length() == 5 + n - 1     # the last token is never fed back
        sizes[n] = cache.nbytes()
    assert sizes[10] == sizes[1000] > 0


def test_softmax_cache_grows_and_state_size():
    model = tiny_model(time_mixing=["softmax", "power", "power", "linear"])
    small = model(random_ids(1, 8)).past_key_values.nbytes()
    large = model(random_ids(1, 40)).past_key_values.nbytes()
    assert large - small == 32 * 2 * 2 * 8 * 8          # 32 more tokens: k and v, Hk=2, d=8
    d, Hk = 8, 2
    power = sympow_dim(d, 2) * (d + 1) * 4 * Hk
    linear = d * (d + 1) * 4 * Hk
    assert model.state_bytes() == 2 * power + linear


# -- torch.compile ------------------------------------------------------------------------------


def test_compiled_forward_fullgraph_matches_eager():
    """The training/prefill forward compiles as one graph (the op is a torch.library custom
    op). Compiling ``generate`` too is the slow test below."""
    torch._dynamo.reset()
    model = tiny_model(time_mixing=HYBRID, dtype=torch.float32)
    ids = random_ids(2, 19)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, use_cache=False).logits,
                                   model(ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("POWER_RETENTION_SLOW_TESTS"),
                    reason="about 6 minutes on 2 cores (the cache's Python ints change every "
                           "step, so each step recompiles); set POWER_RETENTION_SLOW_TESTS=1")
def test_generate_with_compiled_forward_matches_eager():
    torch._dynamo.reset()
    model = tiny_model(time_mixing=["power", "softmax"], dtype=torch.float32,
                       num_hidden_layers=2)
    prompt = random_ids(2, 9)
    eager = model.generate(prompt, max_new_tokens=10, do_sample=False)
    model.forward = torch.compile(model.forward, dynamic=True)
    compiled = model.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(compiled, eager)


# -- configuration checks -----------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_size=30, num_attention_heads=4), "must divide hidden_size"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "multiple of num_key_value_heads"),
    (dict(deg=3), "deg must be an even integer"),
    (dict(deg=0), "deg must be an even integer"),
    (dict(time_mixing="mamba"), "unknown time_mixing"),
    (dict(time_mixing=["power", "softmax"]), "one entry per layer"),
    (dict(time_mixing="window", sliding_window=None), "needs sliding_window"),
    (dict(head_dim=7), "head_dim must be even"),
    (dict(mlp_type="moe"), "mlp_type must be one of"),
    (dict(norm_type="batchnorm"), "norm_type must be one of"),
    (dict(hidden_act="nope"), "hidden_act must be one of"),
    (dict(chunk_size=0), "chunk_size must be a positive integer"),
    (dict(rope_scaling={"rope_type": "weird", "factor": 2.0}), "rope_scaling type"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "needs"),
])
def test_bad_config_fails_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


# -- training -----------------------------------------------------------------------------------


@pytest.mark.parametrize("time_mixing", ["power", "linear", "softmax", "window"])
def test_trains_under_bf16_autocast(time_mixing):
    """The GPU training recipe (bf16 autocast) on the CPU: RoPE's fp32 angles must not leave
    q, k in fp32 beside bf16 v (the op requires one dtype)."""
    model = tiny_model(dtype=torch.float32, time_mixing=time_mixing).train()
    ids = random_ids(2, 11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss.detach())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_gradient_checkpointing_same_gradients():
    ids = random_ids(2, 13)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(time_mixing=HYBRID).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-10, atol=1e-12,
                                   msg=name)
    assert grads[0]["model.layers.0.self_attn.g_proj.weight"].abs().sum() > 0


def test_loss_and_inputs_embeds():
    model = tiny_model(time_mixing=HYBRID)
    ids = random_ids(2, 10)
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels, use_cache=False)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 61), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    embeds = model.get_input_embeddings()(ids)
    torch.testing.assert_close(model(inputs_embeds=embeds, use_cache=False).logits, out.logits)


def test_gates_start_near_one():
    model = PowerRetentionForCausalLM(tiny_config(gate_bias_init=7.0))
    gate = model.model.layers[0].self_attn.g_proj
    x = torch.randn(3, 32)
    torch.testing.assert_close(F.logsigmoid(gate(x)), torch.full((3, 2), F.logsigmoid(
        torch.tensor(7.0)).item()))


# -- RoPE scaling -------------------------------------------------------------------------------


def test_rope_scaling_frequencies():
    base = tiny_config(rope_theta=500.0)
    default, _ = rope_frequencies(base, 0, "cpu")
    torch.testing.assert_close(default, 1 / 500.0 ** (torch.arange(0, 8, 2) / 8))
    linear, _ = rope_frequencies(
        tiny_config(rope_theta=500.0, rope_scaling={"rope_type": "linear", "factor": 4.0}),
        0, "cpu")
    torch.testing.assert_close(linear, default / 4)
    dynamic = tiny_config(rope_theta=500.0, max_position_embeddings=32,
                          rope_scaling={"type": "dynamic", "factor": 2.0})
    torch.testing.assert_close(rope_frequencies(dynamic, 32, "cpu")[0], default)
    assert (rope_frequencies(dynamic, 64, "cpu")[0][1:] < default[1:]).all()
    llama3 = tiny_config(rope_theta=500.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})
    scaled, _ = rope_frequencies(llama3, 0, "cpu")
    wavelength = 2 * math.pi / default
    torch.testing.assert_close(scaled[wavelength < 16], default[wavelength < 16])
    torch.testing.assert_close(scaled[wavelength > 64], default[wavelength > 64] / 8)
    _, factor = rope_frequencies(tiny_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
                                 0, "cpu")
    assert factor == pytest.approx(0.1 * math.log(4.0) + 1)
