"""Metamorphosis: the weight mapping reproduces each family's logits, conversion saves a
loadable folder, unsupported sources fail clearly, and fine-tuning lowers the loss."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tr
from transformers import AutoModelForCausalLM

from power_retention.data import ByteTokenizer, encode_documents, load_corpus
from power_retention.data.corpus import stdlib_root
from power_retention.metamorphosis import (
    SUPPORTED_ARCHITECTURES,
    Recipe,
    UnsupportedArchitectureError,
    attention_match_loss,
    distill_loss,
    load_mapped,
    metamorphose,
    rope_for_context,
)
from power_retention.metamorphosis.finetune import FinetuneConfig, finetune
from power_retention.model import PowerRetentionConfig
from power_retention.training import checkpoint

from _helpers import rel_err

SRC = str(Path(__file__).resolve().parents[1] / "src")
VOCAB = 320
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

# every family with the features that distinguish it switched on
FAMILIES = {
    "llama": (tr.LlamaConfig, tr.LlamaForCausalLM,
              dict(attention_bias=True, mlp_bias=True, hidden_act="gelu",
                   rope_parameters=dict(rope_type="llama3", rope_theta=500.0, factor=8.0,
                                        low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=16))),
    "mistral": (tr.MistralConfig, tr.MistralForCausalLM, dict(sliding_window=9, head_dim=16)),
    "qwen2": (tr.Qwen2Config, tr.Qwen2ForCausalLM,
              dict(tie_word_embeddings=True, rms_norm_eps=1e-5,
                   rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0,
                                        original_max_position_embeddings=16))),
    "qwen3": (tr.Qwen3Config, tr.Qwen3ForCausalLM, dict(head_dim=16, attention_bias=True)),
    "starcoder2": (tr.Starcoder2Config, tr.Starcoder2ForCausalLM,
                   dict(bos_token_id=0, eos_token_id=0, num_key_value_heads=1)),
}


def make_source(family: str, seed: int = 0, **overrides):
    """A tiny random model of ``family`` built by transformers; norms and biases perturbed so
    that a gain or bias dropped by the mapping would show, attention weights enlarged so that
    attention is far from uniform (and RoPE and the time mixing matter)."""
    config_class, model_class, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_class(config_class(**{**COMMON, **extra, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
            elif "self_attn" in name:
                p.mul_(10.0)
    return model


def save_source(model, folder, with_tokenizer: bool = False):
    model.save_pretrained(folder)
    if with_tokenizer:
        ByteTokenizer().save(folder)
    return folder


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mapping_reproduces_source_logits(family, tmp_path):
    source = make_source(family)
    folder = save_source(source, tmp_path / family)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = source(input_ids=ids).logits
        mapped = load_mapped(folder, "softmax")          # through config.json + safetensors
        got = mapped(input_ids=ids, use_cache=False).logits
        power = load_mapped(folder, "power")(input_ids=ids, use_cache=False).logits
    assert rel_err(got, expected) < 1e-5
    # the proof has teeth: the same weights with power retention compute something else
    assert rel_err(power, expected) > 1e-3


def test_mistral_window_is_kept(tmp_path):
    # 40 tokens with a window of 9: only the window time mixing reproduces Mistral
    mapped = load_mapped(make_source("mistral"), "softmax")
    assert mapped.config.layer_time_mixing == ["window", "window"]
    assert mapped.config.sliding_window == 9


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn", "llama3"])
def test_rope_change_matches_transformers(kind):
    # a source converted with a stretched RoPE computes what transformers computes for the
    # same weights configured with that RoPE (60 positions, trained context 16)
    source = make_source("llama", rope_parameters=dict(rope_type="default", rope_theta=1e4))
    options = rope_for_context(kind, 4.0, trained_context=16)
    stretched = make_source("llama", max_position_embeddings=options["max_position_embeddings"],
                            rope_parameters=dict(rope_theta=1e4, **options["rope_scaling"]))
    stretched.load_state_dict(source.state_dict())
    mapped = load_mapped(source, "softmax", **options)
    ids = torch.randint(0, VOCAB, (1, 60), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(mapped(input_ids=ids, use_cache=False).logits,
                       stretched(input_ids=ids).logits) < 1e-5
        assert rel_err(mapped(input_ids=ids, use_cache=False).logits,
                       source(input_ids=ids).logits) > 1e-3


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    gpt2 = tr.GPT2LMHeadModel(tr.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedArchitectureError) as error:
        metamorphose(tmp_path / "gpt2", tmp_path / "out")
    message = str(error.value)
    assert "GPT2LMHeadModel" in message
    assert all(name in message for name in SUPPORTED_ARCHITECTURES)
    assert not (tmp_path / "out").exists()
    # a model type transformers itself does not know gets the same answer
    (tmp_path / "custom").mkdir()
    (tmp_path / "custom" / "config.json").write_text(json.dumps(
        {"model_type": "my_model", "architectures": ["MyModelForCausalLM"]}))
    with pytest.raises(UnsupportedArchitectureError, match="MyModelForCausalLM.*Starcoder2"):
        metamorphose(tmp_path / "custom")


def test_only_safetensors_weights_are_read(tmp_path):
    source = make_source("llama")
    folder = tmp_path / "bin"
    folder.mkdir()
    source.config.save_pretrained(folder)
    torch.save(source.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        metamorphose(folder)


def test_converted_folder_reloads_with_automodel(tmp_path):
    folder = save_source(make_source("qwen3"), tmp_path / "source", with_tokenizer=True)
    model = metamorphose(folder, tmp_path / "converted", gate_bias_init=6.0)
    files = {p.name for p in (tmp_path / "converted").iterdir()}
    assert {"config.json", "model.safetensors", "power_retention_tokenizer.json"} <= files
    config = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert config["model_type"] == "power_retention" and config["time_mixing"] == "power"
    for layer in model.model.layers:   # gates start at sigmoid(6) whatever the input
        assert torch.all(layer.self_attn.g_proj.weight == 0)
        assert torch.all(layer.self_attn.g_proj.bias == 6.0)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "converted")
    ids = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, use_cache=False).logits,
                           model(input_ids=ids, use_cache=False).logits)
    # and it generates with its constant-size cache
    out = reloaded.generate(ids[:1, :5], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)


def test_recipe_losses_vanish_when_student_equals_teacher():
    source = make_source("llama")
    same = load_mapped(source, "softmax")
    power = load_mapped(source, "power")
    batch = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, figures = distill_loss(same, source, batch, weight=0.5, temperature=2.0)
        assert abs(figures["kl"]) < 1e-6
        assert attention_match_loss(same, source, batch).item() < 1e-10
        assert attention_match_loss(power, source, batch).item() > 1e-3
    with pytest.raises(ValueError, match="recipe"):
        Recipe("nope")


@pytest.fixture(scope="module")
def streams():
    corpus = load_corpus(stdlib_root() / "email", 0.2)
    tokenizer = ByteTokenizer()
    return (encode_documents(corpus.train, tokenizer),
            encode_documents(corpus.validation, tokenizer))


def _finetune_cfg(out, recipe: str, steps: int, **extra) -> FinetuneConfig:
    settings = dict(out=str(out), recipe=recipe, steps=steps, seq_len=32, batch_size=4,
                    lr=3e-3, warmup_steps=1, eval_batches=2, eval_every=steps, save_every=steps,
                    log_every=1, progress=False, device="cpu")
    return FinetuneConfig(**{**settings, **extra})


@pytest.mark.parametrize("recipe", ["next-token", "distill", "attention-transfer"])
def test_convert_and_finetune_lowers_the_loss(recipe, streams, tmp_path):
    source = make_source("llama", seed=5)
    model = metamorphose(source)
    cfg = _finetune_cfg(tmp_path / recipe, recipe, steps=8,
                        attention_steps=3 if recipe == "attention-transfer" else 0)
    from power_retention.training.train import evaluate

    before = evaluate(model, streams[1], cfg, _single_process())
    teacher_before = {k: v.clone() for k, v in source.state_dict().items()}
    summary = finetune(cfg, model=model, teacher=source, streams=streams,
                       tokenizer=ByteTokenizer())
    assert summary["val_loss"] < before - 0.05
    for name, value in source.state_dict().items():     # the teacher has not moved
        assert torch.equal(value, teacher_before[name]), name
    records = [json.loads(line) for line in (tmp_path / recipe / "metrics.jsonl").open()]
    stages = [r["stage"] for r in records if "stage" in r]
    if recipe == "attention-transfer":
        assert stages[:3] == ["attention"] * 3 and stages[3:] == ["next-token"] * 5
    assert checkpoint.latest(tmp_path / recipe).name == "checkpoint-0000008"


def test_finetune_resumes_exactly(streams, tmp_path):
    source = make_source("llama", seed=6)
    converted = tmp_path / "converted"
    metamorphose(save_source(source, tmp_path / "source", with_tokenizer=True), converted)
    run = tmp_path / "run"
    cfg = _finetune_cfg(run, "distill", steps=4, save_every=2, model=str(converted),
                        teacher=str(tmp_path / "source"))
    finetune(cfg, streams=streams)
    uninterrupted = AutoModelForCausalLM.from_pretrained(checkpoint.latest(run))
    # as if killed after the checkpoint of step 2: resume from it
    shutil.rmtree(run / "checkpoint-0000004")
    (run / "latest").write_text("checkpoint-0000002\n")
    finetune(FinetuneConfig(**{**cfg.to_dict(), "resume": True}), streams=streams)
    resumed = AutoModelForCausalLM.from_pretrained(checkpoint.latest(run))
    assert checkpoint.latest(run).name == "checkpoint-0000004"
    for (name, p), q in zip(uninterrupted.named_parameters(), resumed.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), name
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").open()]
    assert steps == sorted(steps)      # records after step 2 were replaced, not duplicated


def test_metamorphose_command(tmp_path, capsys):
    from power_retention.cli import main

    folder = save_source(make_source("starcoder2"), tmp_path / "source", with_tokenizer=True)
    assert main(["metamorphose", str(folder), "--out", str(tmp_path / "run"),
                 "--rope-scaling", "yarn", "--rope-factor", "4", "--corpus",
                 str(stdlib_root() / "email"), "--validation-fraction", "0.2",
                 "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--eval-batches", "1",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "power retention (p=2)" in out and "validation loss" in out
    config = PowerRetentionConfig.from_pretrained(tmp_path / "run" / "converted")
    assert config.rope_type == "yarn" and config.rope_scaling["factor"] == 4.0
    assert config.max_position_embeddings == 256
    assert (checkpoint.latest(tmp_path / "run") / "model.safetensors").exists()


def test_two_gloo_processes_match_one_with_twice_the_batch(tmp_path):
    # attention-transfer is the recipe that DDP finds hardest (blocks fed other inputs)
    folder = save_source(make_source("qwen2"), tmp_path / "source", with_tokenizer=True)
    common = ["--steps", "4", "--recipe", "attention-transfer", "--attention-steps", "2",
              "--corpus", str(stdlib_root() / "email"), "--validation-fraction", "0.2",
              "--seq-len", "32", "--eval-every", "4", "--eval-batches", "1", "--log-every", "1",
              "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "power_retention.cli", "metamorphose", str(folder), "--out",
         str(tmp_path / "two"), "--batch-size", "2", *common], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = launcher.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        raise
    assert launcher.returncode == 0, stderr[-3000:]
    from power_retention.cli import main

    assert main(["metamorphose", str(folder), "--out", str(tmp_path / "one"), "--batch-size",
                 "4", *common]) == 0
    keep = ("step", "stage", "loss", "attention_mse", "val_loss", "grad_norm")
    two, one = ([{k: v for k, v in json.loads(line).items() if k in keep}
                 for line in (tmp_path / run / "metrics.jsonl").open()] for run in ("two", "one"))
    assert len(two) == len(one) == 5
    for a, b in zip(two, one):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == (b[key] if isinstance(b[key], str) else pytest.approx(b[key],
                                                                                   rel=1e-4))


def _single_process():
    from power_retention.training import distributed

    return distributed.setup("cpu")
