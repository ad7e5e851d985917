"""Generation helpers and the ``generate`` command: tokens equal transformers' own ``generate``,
streaming text (UTF-8 split over byte tokens, stop strings), sampling, tokenizers, statistics."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from power_retention.cli import main
from power_retention.data.tokenizer import ByteTokenizer
from power_retention.model import PowerRetentionConfig, PowerRetentionForCausalLM
from power_retention.serving import (
    GenerationStats,
    IncrementalDecoder,
    RetentionBackend,
    SamplingParams,
    SequentialBackend,
    TextTokenizer,
    generate_stream,
    load_text_tokenizer,
    make_backend,
    sample_token,
)
from power_retention.serving.engine import Event, Sequence

BYTES = TextTokenizer(ByteTokenizer())


def power_model(seed=0) -> PowerRetentionForCausalLM:
    torch.manual_seed(seed)
    config = PowerRetentionConfig(vocab_size=258, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, chunk_size=8, eos_token_id=256)
    model = PowerRetentionForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def llama_model(seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         eos_token_id=256, bos_token_id=256)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("make_model", [power_model, llama_model])
def test_greedy_tokens_equal_transformers_generate(make_model):
    model = make_model()
    backend = make_backend(model)
    assert isinstance(backend, RetentionBackend if make_model is power_model
                      else SequentialBackend)
    prompt = BYTES.encode_prompt("power retention keeps a fixed-size state")
    params = SamplingParams(max_new_tokens=30, greedy=True, ignore_eos=True)
    ours = [e.token for e in generate_stream(backend, BYTES, prompt, params)]
    with torch.no_grad():
        theirs = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=30,
                                min_new_tokens=30, pad_token_id=257)
    assert ours == theirs[0, len(prompt):].tolist()


def test_cache_memory_is_constant_and_stats_are_filled():
    backend = RetentionBackend(power_model())
    prompt = BYTES.encode_prompt("x" * 50)
    sizes = []
    for n in (10, 150):
        stats = GenerationStats()
        params = SamplingParams(max_new_tokens=n, temperature=0.7, seed=1, ignore_eos=True)
        events = list(generate_stream(backend, BYTES, prompt, params, stats))
        assert len(events) == stats.generated_tokens == n and stats.finish_reason == "length"
        assert stats.time_to_first_token > 0 and stats.decode_tokens_per_second > 0
        sizes.append(stats.cache_bytes)
    assert sizes[0] == sizes[1] == backend.sequence_bytes()


def test_incremental_decoder_handles_characters_split_over_bytes():
    text = "naïve → 東京 ok"
    decoder = IncrementalDecoder(BYTES)
    pieces = [decoder.push(b) for b in text.encode()]
    assert "".join(pieces) + decoder.flush() == text
    assert "\ufffd" not in "".join(pieces)


def test_stop_strings_end_generation_and_are_not_emitted():
    params = SamplingParams(max_new_tokens=100, stop=("STOP",))
    sequence = Sequence(BYTES, params, frozenset())
    emitted, event = [], None
    for b in b"abc STxSTOP more":
        event = sequence.accept(b, 0.0)
        emitted.append(event.text)
        if event.finish_reason:
            break
    assert "".join(emitted) == "abc STx" and event.finish_reason == "stop"
    # end of text: finish "stop", the token's text is not emitted
    sequence = Sequence(BYTES, SamplingParams(max_new_tokens=5), frozenset())
    assert sequence.accept(ord("a"), 0.0).text == "a"
    assert sequence.accept(256, 0.0) == Event("", 256, 0.0, "stop")


def test_sampling_options():
    logits = torch.randn(258, generator=torch.Generator().manual_seed(0))
    best = int(logits.argmax())
    assert sample_token(logits, SamplingParams(greedy=True), None)[0] == best
    top1 = SamplingParams(top_k=1, seed=3)
    assert sample_token(logits, top1, top1.make_generator())[0] == best
    tiny_p = SamplingParams(top_p=1e-6, seed=3)
    assert sample_token(logits, tiny_p, tiny_p.make_generator())[0] == best
    seeded = SamplingParams(temperature=1.5, top_p=0.9, top_k=100, seed=7)
    draws = [[sample_token(logits, seeded, g)[0] for _ in range(20)]
             for g in (seeded.make_generator(), seeded.make_generator())]
    assert draws[0] == draws[1] and len(set(draws[0])) > 1
    token, logprob = sample_token(logits, SamplingParams(greedy=True), None)
    assert logprob == pytest.approx(float(torch.log_softmax(logits, -1)[token]))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_tokenizer_folder_with_chat_template(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<eos>", "<unk>", "hello", "world", "user", "assistant", ":", "\n"]
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="<eos>",
                                        unk_token="<unk>")
    tokenizer.chat_template = ("{% for m in messages %}{{ m.role }} : {{ m.content }} "
                               "{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}")
    tokenizer.save_pretrained(tmp_path)
    loaded = load_text_tokenizer(tmp_path)
    assert not loaded.is_bytes and loaded.chat_template
    ids, stop = loaded.chat_prompt([{"role": "user", "content": "hello world"}])
    assert ids == [4, 6, 2, 3, 5, 6] and stop == ()
    # a folder without tokenizer files falls back to bytes, with the documented chat format
    fallback = load_text_tokenizer(tmp_path / "missing")
    ids, stop = fallback.chat_prompt([{"role": "user", "content": "hi"}])
    assert fallback.decode(ids) == "<|endoftext|><|user|>\nhi\n<|assistant|>\n"
    assert stop == ("\n<|user|>", "\n<|system|>")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-power")
    model = power_model()
    model.save_pretrained(folder)
    ByteTokenizer().save(folder)
    return folder


def test_cli_generate_streams_and_reports(model_folder, capsys):
    args = ["generate", "--model", str(model_folder), "Hello", "--greedy",
            "--max-new-tokens", "20", "--ignore-eos"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    backend = RetentionBackend(PowerRetentionForCausalLM.from_pretrained(model_folder))
    params = SamplingParams(max_new_tokens=20, greedy=True, ignore_eos=True)
    expected = "".join(e.text for e in generate_stream(backend, BYTES, BYTES.encode_prompt(
        "Hello"), params))
    assert out == "Hello" + expected + "\n"
    for word in ("time to first token", "tokens/s", "cache", "generated 20 tokens"):
        assert word in err


def test_cli_generate_prompt_file_and_errors(model_folder, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("From a file", encoding="utf-8")
    assert main(["generate", "--model", str(model_folder), "--prompt-file", str(prompt),
                 "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("From a file")
    assert main(["generate", "hi"]) == 2
    assert "no model given" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path), "hi"]) == 2
    assert "not a model folder" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_folder)]) == 2
    assert "give the prompt" in capsys.readouterr().err


def test_cli_generate_from_a_training_run_folder(model_folder, tmp_path, capsys):
    """A run folder (checkpoints plus a ``latest`` pointer) means its latest checkpoint."""
    import shutil

    shutil.copytree(model_folder, tmp_path / "checkpoint-0000010")
    (tmp_path / "latest").write_text("checkpoint-0000010\n")
    assert main(["generate", "--model", str(tmp_path), "Hi", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("Hi")


def test_cli_generate_any_transformers_model(tmp_path, capsys):
    llama_model().save_pretrained(tmp_path)
    (tmp_path / "note.json").write_text(json.dumps({"no": "tokenizer"}))
    assert main(["generate", "--model", str(tmp_path), "abc", "--max-new-tokens", "8",
                 "--greedy"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("abc") and "SequentialBackend" in err
