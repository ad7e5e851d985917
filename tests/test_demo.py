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
