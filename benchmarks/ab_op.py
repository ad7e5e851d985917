"""A/B of the op's kernels on one GPU: this checkout's package against another version.

The other version (a branch, an older commit) is a copy of its ``src`` folder; both are timed in
the same call, as ``bench_op.py`` times them.

    # here: the other version's package into an ignored folder that travels with `carry`
    echo /.ab/ >> .git/info/exclude; rm -rf .ab; mkdir .ab
    git archive experiment/async-scan src | tar -x -C .ab
    # on the GPU machine (run with carry [".ab"]):
    python3 benchmarks/ab_op.py --other .ab/src --out $OUT/ab.json

Each version runs ``bench_op.py`` (ours only: no SDPA, decode, long or odd lengths) in its own
process with its own chunk-size cache, the two alternating ``--repeats`` times so that a drift
of the GPU's clocks falls on both. Prints per case the median of each version's times and their
ratio, and the per-kernel times of one forward + backward at 64k; writes every run to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_bench(src: Path, cache: Path, out: Path, seq_lens: str) -> dict:
    """One ``bench_op.py`` run against the package under ``src``; its JSON record."""
    env = dict(os.environ, PYTHONPATH=str(src), POWER_RETENTION_CACHE=str(cache))
    cmd = [sys.executable, str(HERE / "bench_op.py"), "--out", str(out), "--seq-lens", seq_lens,
           "--long=", "--odd=", "--decode-batches=", "--no-baselines"]
    subprocess.run(cmd, env=env, check=True)
    return json.loads(out.read_text())


def compare(runs: dict[str, list[dict]]) -> tuple[list[dict], list[dict]]:
    """Median ms per case (t, batch, mode) and per kernel for each version of ``runs``
    (``{"this": [record, ..], "other": [..]}``), with ``other / this``."""
    def medians(records, rows_of, key):
        found: dict = {}
        for record in records:
            for row in rows_of(record):
                found.setdefault(key(row), []).append(row["ms"])
        return {k: statistics.median(v) for k, v in found.items()}

    def cases(record):
        return record["rows"]

    def kernels(record):
        return record.get("breakdown_t65536", [])
    tables = []
    for rows_of, key in ((cases, lambda r: (r["t"], r["batch"], r["mode"])),
                         (kernels, lambda r: r["kernel"])):
        this, other = (medians(runs[v], rows_of, key) for v in ("this", "other"))
        tables.append([{"case": k, "this": this[k], "other": other[k],
                        "ratio": other[k] / this[k]} for k in this if k in other])
    return tables[0], tables[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", required=True, type=Path,
                        help="the other version's package folder (holding power_retention/)")
    parser.add_argument("--seq-lens", default="16384,65536",
                        help="t of the cases, 65,536 tokens per call (bench_op.py's rule)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each version")
    parser.add_argument("--out", default="ab.json")
    args = parser.parse_args(argv)
    if not (args.other / "power_retention" / "__init__.py").is_file():
        parser.error(f"--other: expected a folder holding power_retention/, got {args.other}")
    versions = {"this": HERE.parent / "src", "other": args.other.resolve()}
    runs: dict[str, list[dict]] = {v: [] for v in versions}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name, src in versions.items():
                print(f"run {i + 1} of {args.repeats}: {name} ({src})", flush=True)
                runs[name].append(run_bench(src, Path(tmp) / name, Path(tmp) / "run.json",
                                            args.seq_lens))
    cases, kernels = compare(runs)
    Path(args.out).write_text(json.dumps({"versions": {k: str(v) for k, v in versions.items()},
                                          "runs": runs, "cases": cases, "kernels": kernels},
                                         indent=1))
    print(f"\nmedian ms of {args.repeats} runs each; this = {versions['this']}, "
          f"other = {versions['other']}")
    for row in cases:
        t, batch, mode = row["case"]
        print(f"t {t:>8} batch {batch:>3} {mode:>8}: this {row['this']:8.3f}  other "
              f"{row['other']:8.3f}  other/this {row['ratio']:.3f}")
    print("per kernel, one forward + backward at 64k:")
    for row in kernels:
        print(f"{row['case'][:40]:40} this {row['this']:7.3f}  other {row['other']:7.3f}  "
              f"other/this {row['ratio']:.3f}")


if __name__ == "__main__":
    main()
