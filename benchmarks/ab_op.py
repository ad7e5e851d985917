"""A/B of the op's kernels on one GPU: this checkout's package against other versions.

Each other version (a branch, an older commit) is a copy of its ``src`` folder, named after the
folder holding it; all are timed in the same call, as ``bench_op.py`` times them.

    # here: each other version's package into an ignored folder that travels with `carry`
    echo /.ab/ >> .git/info/exclude; rm -rf .ab
    for b in three-scans overlap-scans; do mkdir -p .ab/$b
        git archive experiment/$b src tests pyproject.toml | tar -x -C .ab/$b; done
    # on the GPU machine (run with carry [".ab"]):
    python3 benchmarks/ab_op.py --other .ab/three-scans/src --other .ab/overlap-scans/src \
        --out $OUT/ab.json

Each version runs ``bench_op.py`` (ours only: no SDPA, decode, long or odd lengths) in its own
process with its own chunk-size cache, the versions taking turns ``--repeats`` times so that a
drift of the GPU's clocks falls on all. Prints per case the median of each version's times and
its ratio to this checkout's, and the per-kernel times of one forward + backward at 64k; writes
every run to ``--out`` as soon as it ends. A version whose run fails (run 49: an illegal memory
access in one branch's kernel) is reported and left out of the later turns; the others go on.
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


def run_bench(src: Path, cache: Path, out: Path, seq_lens: str, dtype: str = "bfloat16",
              head_dim: int = 64, deg: int = 2) -> dict:
    """One ``bench_op.py`` run against the package under ``src``; its JSON record."""
    env = dict(os.environ, PYTHONPATH=str(src), POWER_RETENTION_CACHE=str(cache))
    cmd = [sys.executable, str(HERE / "bench_op.py"), "--out", str(out), "--seq-lens", seq_lens,
           "--long=", "--odd=", "--decode-batches=", "--no-baselines", "--dtype", dtype,
           "--head-dim", str(head_dim), "--deg", str(deg)]
    subprocess.run(cmd, env=env, check=True)
    return json.loads(out.read_text())


def compare(runs: dict[str, list[dict]]) -> tuple[list[dict], list[dict]]:
    """Median ms per case (t, batch, mode) and per kernel for each version of ``runs``
    (``{"this": [record, ..], "other": [..], ..}``), with each version's ratio to ``this``."""
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
        ms = {name: medians(records, rows_of, key) for name, records in runs.items()}
        tables.append([{"case": k, "ms": {name: ms[name][k] for name in runs},
                        "ratio": {name: ms[name][k] / ms["this"][k] for name in runs
                                  if name != "this"}}
                       for k in ms["this"] if all(k in m for m in ms.values())])
    return tables[0], tables[1]


def version_name(src: Path) -> str:
    """``.ab/three-scans/src`` -> ``three-scans``: the folder a copied ``src`` lies in."""
    return src.parent.name if src.name == "src" else src.name


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", required=True, type=Path, action="append",
                        help="another version's package folder (holding power_retention/); "
                             "repeat for several")
    parser.add_argument("--seq-lens", default="16384,65536",
                        help="t of the cases, 65,536 tokens per call (bench_op.py's rule)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each version")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--head-dim", type=int, default=64, choices=(16, 32, 64, 128))
    parser.add_argument("--deg", type=int, default=2, choices=(2, 4),
                        help="degree p (4: head sizes 16 and 32)")
    parser.add_argument("--out", default="ab.json")
    args = parser.parse_args(argv)
    versions = {"this": HERE.parent / "src"}
    for src in args.other:
        if not (src / "power_retention" / "__init__.py").is_file():
            parser.error(f"--other: expected a folder holding power_retention/, got {src}")
        name = version_name(src.resolve())
        if name in versions:
            parser.error(f"--other: two versions named {name!r}; put them in folders of "
                         "different names")
        versions[name] = src.resolve()
    runs: dict[str, list[dict]] = {v: [] for v in versions}
    failed: dict[str, str] = {}

    def save(cases=(), kernels=()):
        Path(args.out).write_text(json.dumps(
            {"versions": {k: str(v) for k, v in versions.items()}, "runs": runs,
             "failed": failed, "cases": cases, "kernels": kernels}, indent=1))
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name, src in versions.items():
                if name in failed:
                    continue
                print(f"run {i + 1} of {args.repeats}: {name} ({src})", flush=True)
                try:
                    runs[name].append(run_bench(src, Path(tmp) / name, Path(tmp) / "run.json",
                                                args.seq_lens, args.dtype, args.head_dim,
                                                args.deg))
                except subprocess.CalledProcessError as err:
                    failed[name] = f"run {i + 1}: bench_op.py exit status {err.returncode}"
                    print(f"{name} failed ({failed[name]}); the other versions go on",
                          flush=True)
                save()
    if "this" in failed:
        sys.exit(f"this checkout's run failed ({failed['this']}): nothing to compare against")
    timed = {name: records for name, records in runs.items() if name not in failed}
    cases, kernels = compare(timed)
    save(cases, kernels)
    names = list(timed)
    print(f"\nmedian ms of {args.repeats} runs each; ratio = version / this; "
          + ", ".join(f"{n} = {versions[n]}" for n in names))
    print(f"{'':40}" + "".join(f"{n[:14]:>15}" for n in names)
          + "".join(f"{'/ ' + n[:12]:>15}" for n in names[1:]))
    for title, rows in (("case", cases), ("per kernel, one forward + backward at 64k", kernels)):
        print(title)
        for row in rows:
            case = row["case"]
            label = (f"t {case[0]} batch {case[1]} {case[2]}" if isinstance(case, (list, tuple))
                     else case)
            print(f"{label[:40]:40}" + "".join(f"{row['ms'][n]:15.3f}" for n in names)
                  + "".join(f"{row['ratio'][n]:15.3f}" for n in names[1:]))
    for name, why in failed.items():
        print(f"{name}: failed, {why}")


if __name__ == "__main__":
    main()
