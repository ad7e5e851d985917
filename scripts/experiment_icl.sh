#!/usr/bin/env bash
# GPU experiment: softmax, window, linear and power (p=2) attention trained at equal FLOPs on the
# stdlib corpus at a long context, then their in-context learning curves in one PNG.
#
#   bash scripts/experiment_icl.sh                  # all presets, then the curves
#   PRESETS="softmax window" bash scripts/experiment_icl.sh   # some presets (others resume/skip)
#
# Settings (environment): PRESETS (default "softmax window linear power"; "power4" may be added),
# SIZE (small), CONTEXT (8192 tokens), BUDGET (training FLOPs per preset, 3e15), BATCH (sequences
# per GPU per step, 4), ACCUM (1), LR (1e-3), NPROC (GPUs; default: all visible), PY (python3),
# RUNS (checkpoints, default runs/experiment_icl). Each run resumes from its latest checkpoint,
# so a call cut short (a 10-minute limit) continues where it stopped; a finished run is only
# re-evaluated. Light results (curves, CSV, metrics, table) are copied to $OUT when it is set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
PRESETS=${PRESETS:-"softmax window linear power"}
SIZE=${SIZE:-small}
CONTEXT=${CONTEXT:-8192}
BUDGET=${BUDGET:-3e15}
BATCH=${BATCH:-4}
ACCUM=${ACCUM:-1}
LR=${LR:-1e-3}
RUNS=${RUNS:-runs/experiment_icl}
if [ -z "${NPROC:-}" ]; then
    NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
    [ "$NPROC" -ge 1 ] || NPROC=1
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$RUNS"

"$PY" -m power_retention.cli wsfr --size "$SIZE" --presets $PRESETS \
    --context 1024 "$CONTEXT" 65536 --suggest-context "$CONTEXT" | tee "$RUNS/wsfr.txt"

runs=()
for preset in $PRESETS; do
    echo "== $preset: $SIZE backbone, context $CONTEXT, $BUDGET training FLOPs, $NPROC GPU(s)"
    "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
        -m power_retention.cli train --preset "$preset" --size "$SIZE" --seq-len "$CONTEXT" \
        --batch-size "$BATCH" --grad-accum "$ACCUM" --flop-budget "$BUDGET" --lr "$LR" \
        --warmup-steps 50 --log-every 10 --eval-every 100 --eval-batches 8 --save-every 100 \
        --out "$RUNS/$preset" --resume --no-progress
    runs+=("$RUNS/$preset")
done

"$PY" -m power_retention.cli icl "${runs[@]}" --labels $PRESETS --context "$CONTEXT" \
    --windows 64 --batch-size 4 --bins 24 --out "$RUNS/icl" | tee "$RUNS/icl.txt"

# one table: steps, tokens, final train and validation loss, best-context loss of each preset
"$PY" - "$RUNS" $PRESETS <<'EOF' | tee "$RUNS/results.md"
import csv, json, sys
from pathlib import Path

runs, presets = Path(sys.argv[1]), sys.argv[2:]
curves = list(csv.DictReader((runs / "icl" / "icl.csv").open()))
print("| preset | steps | tokens | train loss | validation loss | best-context loss (at) "
      "| loss at last bin |")
print("|---|---:|---:|---:|---:|---:|---:|")
for name in presets:
    log = [json.loads(line) for line in (runs / name / "metrics.jsonl").open()]
    train = [r for r in log if "loss" in r][-1]
    val = [r for r in log if "val_loss" in r][-1]
    rows = [r for r in curves if r["model"] == name]
    best = next(r for r in rows if r["best"] == "1")
    print(f"| {name} | {train['step']} | {train['tokens']:,} | {train['loss']:.4f} "
          f"| {val['val_loss']:.4f} | {float(best['loss']):.4f} ({best['context_lo']}-"
          f"{best['context_hi']}) | {float(rows[-1]['loss']):.4f} |")
EOF

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp "$RUNS/icl/icl.png" "$RUNS/icl/icl.csv" "$RUNS/results.md" "$RUNS/wsfr.txt" "$OUT/"
    for preset in $PRESETS; do
        cp "$RUNS/$preset/metrics.jsonl" "$OUT/metrics_$preset.jsonl"
    done
fi
