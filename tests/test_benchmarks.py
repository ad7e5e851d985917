"""The benchmark scripts that run without a GPU: every script's ``--help``, the serving benchmark
at a tiny size on the CPU and the figures drawn from what the benchmarks write."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
BENCHMARKS = HERE.parent / "benchmarks"
PNG = b"\x89PNG\r\n\x1a\n"


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src"))
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *args], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name", sorted(p.name for p in BENCHMARKS.glob("*.py")))
def test_every_benchmark_answers_help(name):
    """Also the GPU-only ones: what breaks before their first device call shows here."""
    result = script(name, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr[-2000:]


def test_serving_benchmark_writes_every_case_and_its_figure(tmp_path):
    out = tmp_path / "serving.json"
    tiny = ["--hidden-size", "64", "--intermediate-size", "128", "--num-hidden-layers", "2",
            "--num-attention-heads", "2", "--num-key-value-heads", "1", "--head-dim", "32",
            "--vocab-size", "64", "--steps", "2", "--warmup", "1"]
    result = script("bench_serving.py", *tiny, "--contexts", "64", "2048", "--batch-sizes", "1",
                    "2", "--memory-limit-gb", "0.0004", "--output", str(out))
    assert result.returncode == 0, result.stderr[-4000:]
    record = json.loads(out.read_text())
    cases = {(r["model"], r["context"], r["batch"]): r for r in record["results"]}
    assert set(cases) == {(m, c, b) for m in ("power", "softmax") for c in (64, 2048)
                          for b in (1, 2)}
    for (model, context, batch), row in cases.items():
        if model == "softmax" and context * batch > 64:        # 0.4 MiB: only 64 x 1 fits
            assert "does not fit" in row["skipped"]
        else:
            assert row["finite"] and math.isfinite(row["ms_per_step"]) and row["ms_per_step"] > 0
    power = [r["cache_bytes"] for r in record["results"] if r["model"] == "power"
             and r["batch"] == 1]
    assert len(set(power)) == 1                                 # the same at every context

    figures = script("plot_results.py", str(out), "--out-dir", str(tmp_path))
    assert figures.returncode == 0, figures.stderr[-4000:]
    assert (tmp_path / "bench_serving.png").read_bytes().startswith(PNG)


def test_op_figure_and_unknown_files(tmp_path):
    rows = [{"impl": impl, "t": t, "batch": 65_536 // t, "mode": mode, "ms": ms}
            for t in (1024, 65_536) for mode in ("fwd", "fwd+bwd")
            for impl, ms in (("power retention (triton)", 6.0), ("cuDNN SDPA", t / 4096))]
    meta = {"gpu": "a GPU", "torch": "2", "triton": "3", "date": "2026-12-07T00:00:00",
            "dtype": "bfloat16", "heads": 16, "d": 64, "deg": 2}
    op = tmp_path / "op.json"
    op.write_text(json.dumps({"meta": meta, "rows": rows, "decode": []}))
    result = script("plot_results.py", str(op), "--out-dir", str(tmp_path / "figures"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "figures" / "bench_op.png").read_bytes().startswith(PNG)

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"loss": 1.0}))
    result = script("plot_results.py", str(other))
    assert result.returncode == 2
    assert "not a bench_op.py or bench_serving.py result" in result.stderr


def test_ncu_summary_reads_the_raw_page(tmp_path):
    """``ncu_op.py``'s summary of Nsight Compute's raw CSV page (names, units, one row per
    launch): times in microseconds whatever the unit, the largest stall reasons first."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import ncu_op
    finally:
        sys.path.remove(str(BENCHMARKS))
    stall = ncu_op.STALL + "{}_per_issue_active.ratio"
    header = ["ID", "Kernel Name", ncu_op.COLUMNS["us"], ncu_op.COLUMNS["occ %"],
              stall.format("long_scoreboard"), stall.format("barrier"), stall.format("math"),
              "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active"]
    units = ["", "", "nsecond", "%", "", "", "", "%"]
    table = tmp_path / "raw.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([
            header, units, ["0", "scan_kernel", "3,300,000", "12.5", "4.2", "0.5", "", "30.1"],
            ["1", "dq_kernel", "4,900,000", "n/a", "1.0", "2.0", "0.1", ""]])
    (scan, dq), raw = ncu_op.summarise(table), table.read_text()
    table.write_text(raw.replace("nsecond", "ms").replace("3,300,000", "3.3"))  # ncu 2025.3
    assert math.isclose(ncu_op.summarise(table)[0]["us"], 3300.0)
    assert scan["kernel"] == "scan_kernel" and scan["us"] == 3300.0 and scan["occ %"] == 12.5
    assert scan["stalls"] == [(4.2, "long_scoreboard"), (0.5, "barrier")]
    assert scan["tensor %"] == 30.1 and scan["DRAM %"] is None
    assert dq["occ %"] is None and dq["stalls"][0] == (2.0, "barrier") and dq["tensor %"] is None
    result = script("ncu_op.py", "--shapes", "65536")
    assert result.returncode == 2 and "expected T x BATCH" in result.stderr


def test_kernel_breakdown_counts_the_scans_apart():
    """``bench_op.py``'s per-kernel table: device kernels only, summed per name, the three scans
    of a forward + backward named by their order of launch."""
    import torch
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from bench_op import kernel_rows
    finally:
        sys.path.remove(str(BENCHMARKS))
    from types import SimpleNamespace

    def event(name, start, us, device="CUDA"):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start),
                               device_time_total=us,
                               device_type=getattr(torch.autograd.DeviceType, device))
    order = ["scan_kernel", "output_fwd_kernel", "scan_kernel", "dq_kernel", "scan_kernel",
             "dq_kernel"]
    events = [event(name, start, 1000.0 * (start + 1)) for start, name in enumerate(order)]
    events.append(event("aten::mm", 2, 9e9, device="CPU"))        # a host event: not counted
    rows = kernel_rows(events[::-1])                               # any order in, launch order
    assert {r["kernel"]: (r["calls"], r["ms"]) for r in rows} == {
        "scan_kernel (forward)": (1, 1.0), "output_fwd_kernel": (1, 2.0),
        "scan_kernel (backward: recompute)": (1, 3.0), "dq_kernel": (2, 10.0),
        "scan_kernel (backward: reverse)": (1, 5.0)}
    assert rows[0]["kernel"] == "dq_kernel"
    two = kernel_rows(events[:2])                     # not three scans: no phases to name
    assert [r["kernel"] for r in two] == ["output_fwd_kernel", "scan_kernel"]
    halves = [event("scan_kernel", -1, 500.0)] + events     # a forward in two launches
    assert {r["kernel"]: (r["calls"], r["ms"]) for r in kernel_rows(halves)}[
        "scan_kernel (forward)"] == (2, 1.5)


def test_ab_comparison_takes_medians_per_case_and_kernel(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from ab_op import compare, version_name
    finally:
        sys.path.remove(str(BENCHMARKS))

    def record(fwd, scan):
        return {"rows": [{"t": 65536, "batch": 1, "mode": "fwd", "ms": fwd}],
                "breakdown_t65536": [{"kernel": "scan_kernel", "calls": 3, "ms": scan}]}
    runs = {"this": [record(6.0, 9.0), record(6.4, 9.4), record(6.2, 9.2)],
            "a": [record(5.0, 7.0), record(5.1, 7.2)], "b": [record(7.0, 9.2)]}
    cases, kernels = compare(runs)
    assert cases == [{"case": (65536, 1, "fwd"), "ms": {"this": 6.2, "a": 5.05, "b": 7.0},
                      "ratio": {"a": 5.05 / 6.2, "b": 7.0 / 6.2}}]
    assert kernels[0]["case"] == "scan_kernel" and kernels[0]["ms"]["a"] == 7.1
    assert math.isclose(kernels[0]["ratio"]["a"], 7.1 / 9.2) and kernels[0]["ratio"]["b"] == 1.0
    assert version_name(Path("/x/.ab/three-scans/src")) == "three-scans"
    result = script("ab_op.py", "--other", str(tmp_path))
    assert result.returncode == 2 and "expected a folder holding power_retention/" in result.stderr
    for name in ("one", "two"):
        (tmp_path / name / "v" / "power_retention").mkdir(parents=True)
        (tmp_path / name / "v" / "power_retention" / "__init__.py").touch()
    result = script("ab_op.py", "--other", str(tmp_path / "one" / "v"), "--other",
                    str(tmp_path / "two" / "v"))
    assert result.returncode == 2 and "two versions named 'v'" in result.stderr


def test_ab_goes_on_when_a_version_fails(tmp_path, monkeypatch, capsys):
    """Run 49 lost this checkout's timing when the other version's kernel crashed."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import ab_op
    finally:
        sys.path.remove(str(BENCHMARKS))
    broken = tmp_path / "broken" / "src"
    (broken / "power_retention").mkdir(parents=True)
    (broken / "power_retention" / "__init__.py").touch()

    def run_bench(src, *args):
        if src == broken:
            raise subprocess.CalledProcessError(1, ["bench_op.py"])
        return {"rows": [{"t": 65536, "batch": 1, "mode": "fwd", "ms": 5.0}]}
    monkeypatch.setattr(ab_op, "run_bench", run_bench)
    out = tmp_path / "ab.json"
    ab_op.main(["--other", str(broken), "--repeats", "2", "--out", str(out)])
    written = json.loads(out.read_text())
    assert len(written["runs"]["this"]) == 2 and written["runs"]["broken"] == []
    assert written["failed"] == {"broken": "run 1: bench_op.py exit status 1"}
    assert written["cases"][0]["ms"] == {"this": 5.0}
    printed = capsys.readouterr().out
    assert "broken failed" in printed and "broken: failed, run 1" in printed
