"""The op's kernels under Nsight Compute: what limits a forward + backward (issue 3).

    PYTHONPATH=src python benchmarks/ncu_op.py --out ncu_op       # on the GPU machine

Runs itself under ``ncu --clock-control none`` (the clocks left as they are, as the device's
METHOD.md asks) with profiling off until the workload is warm: per ``--shapes`` entry (``t x
batch``, bench_op's inputs: bf16, 16 heads, d = 64, gated) the op is compiled and autotuned
first, then exactly one forward + backward is profiled (``torch.cuda.profiler.start/stop``).
Writes ``OUT.ncu-rep`` (open it in Nsight Compute) and ``OUT.csv`` (every collected metric per
kernel launch) and prints per kernel: time, SM / memory / DRAM / L2 throughput and tensor-pipe use
(% of peak), achieved against theoretical occupancy, registers, waves per multiprocessor, issue
slots busy, and the stall reasons that cost most (warps stalled per issued instruction).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "SchedulerStats")
EXTRA = ("regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio",
         "regex:sm__pipe_tensor_op_.*cycles_active\\.avg\\.pct_of_peak_sustained_active")
COLUMNS = {                                   # printed name: raw metric
    "us": "gpu__time_duration.sum",
    "SM %": "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "mem %": "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed",
    "DRAM %": "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
    "L2 %": "lts__throughput.avg.pct_of_peak_sustained_elapsed",
    "occ %": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "occ max %": "sm__maximum_warps_per_active_cycle_pct",
    "regs": "launch__registers_per_thread",
    "waves": "launch__waves_per_multiprocessor",
    "issue %": "smsp__issue_active.avg.pct_of_peak_sustained_active",
}
STALL = "smsp__average_warps_issue_stalled_"


def find_ncu() -> str:
    found = shutil.which("ncu") or next(
        (str(p) for p in sorted(Path("/opt/nvidia").glob("nsight-compute/*/ncu"))), None)
    if found is None:
        sys.exit("ncu_op: Nsight Compute (ncu) is not on PATH nor under /opt/nvidia")
    return found


def workload(shapes: list[tuple[int, int]]) -> None:
    """The profiled process: per shape, warm up (compile, autotune), then one forward +
    backward between ``cudaProfilerStart`` and ``cudaProfilerStop``."""
    import torch
    from bench_op import make

    from power_retention import power_retention
    for t, batch in shapes:
        q, k, v, g = make(batch, t, requires_grad=True)
        do = torch.randn_like(q)
        for _ in range(2):
            torch.autograd.grad(power_retention(q, k, v, g), (q, k, v, g), do)
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        torch.autograd.grad(power_retention(q, k, v, g), (q, k, v, g), do)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        print(f"profiled t={t} batch={batch}", flush=True)


def number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def summarise(table: Path) -> list[dict]:
    """Per kernel launch of ncu's raw CSV page (a header row, a units row, then one row per
    launch): the ``COLUMNS`` and the four largest stall reasons."""
    with open(table, newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 3:
        raise ValueError(f"{table}: no kernel was profiled")
    header, units = rows[0], rows[1]
    index = {name: i for i, name in enumerate(header)}
    out = []
    for row in rows[2:]:
        entry = {"kernel": row[index["Kernel Name"]][:40]}
        for name, metric in COLUMNS.items():
            value = number(row[index[metric]]) if metric in index else None
            if name == "us" and value is not None:
                value *= {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0,
                          "msecond": 1e3, "ms": 1e3}[units[index[metric]]]
            entry[name] = value
        stalls = {h[len(STALL):].split("_per_issue")[0]: number(row[i])
                  for h, i in index.items() if h.startswith(STALL)}
        entry["stalls"] = sorted(((v, k) for k, v in stalls.items() if v), reverse=True)[:4]
        tensor = [number(row[i]) for h, i in index.items() if h.startswith("sm__pipe_tensor_op_")]
        entry["tensor %"] = max((x for x in tensor if x is not None), default=None)
        out.append(entry)
    return out


def print_summary(entries: list[dict]) -> None:
    names = [*COLUMNS, "tensor %"]
    print(f"{'kernel':40} " + " ".join(f"{n:>9}" for n in names) + "  top stalls (per issue)")
    for e in entries:
        cells = " ".join(f"{e[n]:9.1f}" if e[n] is not None else f"{'-':>9}" for n in names)
        stalls = ", ".join(f"{k} {v:.1f}" for v, k in e["stalls"])
        print(f"{e['kernel']:40} {cells}  {stalls}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["65536x1", "16384x4"],
                        help="t x batch per profiled forward + backward")
    parser.add_argument("--out", default="ncu_op", help="writes OUT.ncu-rep and OUT.csv")
    parser.add_argument("--workload", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shapes = []
    for s in args.shapes:
        t, _, batch = s.partition("x")
        if not (t.isdigit() and batch.isdigit()):
            parser.error(f"--shapes: expected T x BATCH like 65536x1, got {s!r}")
        shapes.append((int(t), int(batch)))
    if args.workload:
        workload(shapes)
        return
    ncu, report = find_ncu(), Path(args.out + ".ncu-rep")
    cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off", "--force-overwrite",
           "--export", str(report), *[a for s in SECTIONS for a in ("--section", s)],
           "--metrics", ",".join(EXTRA),
           sys.executable, __file__, "--workload", "--shapes", *args.shapes]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    subprocess.run(cmd, env=env, check=True)
    table = Path(args.out + ".csv")
    with open(table, "w") as f:
        subprocess.run([ncu, "--import", str(report), "--csv", "--page", "raw"], stdout=f,
                       check=True)
    print_summary(summarise(table))
    print(f"\nwritten: {report}, {table}")


if __name__ == "__main__":
    main()
