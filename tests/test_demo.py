"""The demo, end to end at its tiny size: every file its report names exists, the numbers hold
together, and a second run reuses the source's checkpoint."""

from __future__ import annotations

import json
import math
import re

import pytest

from power_retention.cli import main
from power_retention.demo import PRESETS, REPORT_FILES


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--preset", "tiny", "--out", str(out), "--no-progress"]) == 0
    return out


def test_demo_writes_every_file_its_report_names(report):
    text = (report / "report.md").read_text()
    named = set(re.findall(r"\]\(([^)\s]+)\)", text))
    assert set(REPORT_FILES) - {"report.md"} <= named
    for name in named:
        path = report / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_demo_results_hold_together(report):
    results = json.loads((report / "results.json").read_text())
    preset = PRESETS["tiny"]
    names = {"source (softmax)", "converted, before fine-tuning", "power from scratch"} | {
        f"converted + {recipe}" for recipe in preset.recipes}
    assert set(results["validation"]) == names
    assert all(math.isfinite(v["loss"]) for v in results["validation"].values())
    assert results["tokens"]["finetune"] == preset.finetune_steps * preset.batch_size * \
        preset.context
    # the converted model's cache stays the same size; the source's grows with the context
    source, converted = results["decode"].values()
    assert len({row["cache_bytes"] for row in converted}) == 1
    assert source[-1]["cache_bytes"] > source[0]["cache_bytes"]
    # the ICL curves reach icl_factor times the source's context
    rows = (report / "icl.csv").read_text().splitlines()[1:]
    assert max(int(r.split(",")[2]) for r in rows) == preset.icl_factor * preset.context


def test_demo_reuses_the_source_checkpoint(report, capsys):
    capsys.readouterr()
    assert main(["demo", "--preset", "tiny", "--out", str(report), "--recipes", "next-token",
                 "--finetune-steps", "1", "--no-progress"]) == 0
    assert "source training (reused checkpoint)" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["llama", "power"])
def test_decode_profile_prefills_long_contexts_in_pieces(kind, monkeypatch):
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from power_retention import demo
    from power_retention.model import PowerRetentionConfig, PowerRetentionForCausalLM

    torch.manual_seed(0)
    sizes = dict(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)
    model = (LlamaForCausalLM(LlamaConfig(**sizes)) if kind == "llama"
             else PowerRetentionForCausalLM(PowerRetentionConfig(chunk_size=8, **sizes)))
    stream = np.random.default_rng(0).integers(0, 256, 200)
    whole = demo.decode_profile(model, stream, (50, 150), 2, torch.device("cpu"))
    monkeypatch.setattr(demo, "PREFILL_PIECE", 16)            # 150 tokens in 10 pieces
    pieces = demo.decode_profile(model, stream, (50, 150), 2, torch.device("cpu"))
    assert [r["cache_bytes"] for r in pieces] == [r["cache_bytes"] for r in whole]
    first, second = (r["cache_bytes"] for r in pieces)
    if kind == "llama":           # every token's keys and values: 50 + 2 and 150 + 2 tokens
        assert first * 152 == second * 52
    else:                         # a fixed-size state
        assert first == second
