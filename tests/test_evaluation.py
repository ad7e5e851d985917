"""In-context learning curves and the weight-state FLOP ratio."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, MistralConfig

from power_retention.cli import main
from power_retention.data import ByteTokenizer, load_corpus, stdlib_files
from power_retention.evaluation import icl, wsfr
from power_retention.training import build_model, preset_config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("icl_corpus")
    for path in stdlib_files()[:40]:
        (root / path.name).write_bytes(path.read_bytes())
    assert load_corpus(root, 0.3).validation
    return str(root)


def test_log_bins_cover_every_position_once():
    for length, bins in [(255, 16), (63, 8), (10, 40), (1, 4)]:
        edges = icl.log_bins(length, bins)
        assert edges[0][0] == 1 and edges[-1][1] == length + 1
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(edges, edges[1:]))
        assert len(edges) <= bins


def test_position_losses_of_a_uniform_model_are_log_vocab():
    class Uniform(torch.nn.Module):
        def forward(self, input_ids):
            logits = torch.zeros(*input_ids.shape, 50)
            return type("Out", (), {"logits": logits})

    windows = np.random.default_rng(0).integers(0, 50, size=(5, 33))
    losses = icl.position_losses(Uniform(), windows, batch_size=2)
    assert losses.shape == (32,)
    np.testing.assert_allclose(losses, math.log(50), rtol=1e-6)   # float32 logits
    rows = icl.binned(losses, 6)
    assert sum(r["positions"] for r in rows) == 32
    assert icl.best_context(rows)["loss"] == pytest.approx(math.log(50))


def test_icl_command_writes_csv_and_png(corpus, tmp_path, capsys):
    torch.manual_seed(0)
    ours = tmp_path / "power"
    build_model(preset_config("power", "tiny")).save_pretrained(ours)
    ByteTokenizer().save(ours)
    # any transformers causal LM folder (no tokenizer inside: bytes are assumed)
    llama = tmp_path / "llama"
    build_model(LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=1, num_attention_heads=2,
                            max_position_embeddings=128)).save_pretrained(llama)
    out = tmp_path / "icl"
    assert main(["icl", str(ours), str(llama), "--labels", "power", "llama", "--context", "64",
                 "--windows", "6", "--bins", "8", "--corpus", corpus,
                 "--validation-fraction", "0.3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "best-context loss" in printed and "power: 6 windows of 64" in printed
    rows = list(csv.DictReader((out / "icl.csv").open()))
    for label in ("power", "llama"):
        mine = [r for r in rows if r["model"] == label]
        assert 2 <= len(mine) <= 8
        assert int(mine[0]["context_lo"]) == 1 and int(mine[-1]["context_hi"]) == 63
        assert sum(int(r["positions"]) for r in mine) == 63
        assert sum(int(r["best"]) for r in mine) == 1
        # untrained models: losses near ln(vocab)
        assert all(abs(float(r["loss"]) - math.log(320 if label == "power" else 260)) < 0.5
                   for r in mine)
    assert (out / "icl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wsfr_tiny_power_preset_by_hand():
    shape = wsfr.shape_of(preset_config("power", "tiny"))   # h=64 f=176 V=320 L=2 H=4 d=16 c=64
    # LM head 2*64*320 = 40,960; per layer: q,k,v,o 2*64*(4*16*4) = 32,768, gate 2*64*4 = 512,
    # gated MLP 2*3*64*176 = 67,584 -> 100,864; total 40,960 + 2 * 100,864
    assert wsfr.weight_flops(shape) == 242_688
    # t = 256, c = 64: in-chunk keys average 32.5, 2*(16+16) FLOPs each, 4 heads: 8,320; the
    # state: D = C(17, 2) = 136, (4 + 4) heads * 2 * 136 * 17 = 36,992; per layer 45,312
    assert wsfr.state_flops(shape, 256) == 2 * 45_312
    assert wsfr.wsfr(shape, 256) == pytest.approx(242_688 / 90_624)
    # t <= c: one chunk, plain attention, no state: (t+1)/2 keys average
    assert wsfr.state_flops(shape, 64) == 2 * 4 * 64 * 32.5
    # linear attention, D = d = 16: 8,320 + 8 * 2 * 16 * 17
    linear = wsfr.shape_of(preset_config("linear", "tiny"))
    assert wsfr.state_flops(linear, 256) == 2 * (8_320 + 4_352)


def test_wsfr_llama_and_mistral_configs_by_hand():
    llama = wsfr.shape_of(LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2))
    # per layer: q,o 2*128*4*32*2 = 65,536, k,v 2*128*2*32*2 = 32,768, MLP 2*3*128*256 =
    # 196,608 -> 294,912; 3 layers + LM head 2*128*1000 = 256,000
    assert wsfr.weight_flops(llama) == 3 * 294_912 + 256_000 == 1_140_736
    # softmax at t = 1000: 4 query heads * 2*(32+32) * (1001/2) = 256,256 per layer
    assert wsfr.state_flops(llama, 1000) == 3 * 256_256
    assert wsfr.wsfr(llama, 1000) == pytest.approx(1_140_736 / 768_768)
    mistral = wsfr.shape_of(MistralConfig(vocab_size=1000, hidden_size=128,
                                          intermediate_size=256, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          sliding_window=100))
    # window 100 at t = 1000: mean keys (100*101/2 + 900*100) / 1000 = 95.05
    assert mistral.mixing == ("window",) * 3
    assert wsfr.state_flops(mistral, 1000) == pytest.approx(3 * 4 * 128 * 95.05)


def test_wsfr_suggestion_and_command(capsys):
    base = wsfr.shape_of(preset_config("power", "base"))
    best = wsfr.suggest(base, 1 << 20, top=50)
    distances = [abs(math.log(r["ratio"])) for r in best]
    assert distances == sorted(distances) and distances[0] < 0.05
    assert best[0]["heads"] * best[0]["head_dim"] == 768
    assert main(["wsfr", "--size", "tiny", "--context", "256", "4096"]) == 0
    out = capsys.readouterr().out
    assert "weight_MFLOPs" in out and "nearest balance at context 4,096" in out
    assert out.count("softmax") == 2 and out.count("power4") == 2
