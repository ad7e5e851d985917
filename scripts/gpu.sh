#!/usr/bin/env bash
# One device call: the GPU tests of the Triton kernels, then the benchmark (BENCHMARKS.md
# protocol); every result lands under $OUT. Run from the repository root on the GPU machine:
#     OUT=/some/dir bash scripts/gpu.sh [pytest -k expression]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src
OUT=${OUT:-/tmp/power_retention_gpu}
mkdir -p "$OUT"
{ date -u; nvidia-smi; python3 -c 'import torch, triton; print(torch.__version__, triton.__version__)'; } \
    > "$OUT/environment.txt" 2>&1
timeout ${TEST_TIMEOUT:-320} python3 -m pytest -v -s -m gpu tests/test_triton.py ${1:+-k "$1"} 2>&1 \
    | tee "$OUT/gpu_tests.txt" | grep -E "PASS|FAIL|Error|passed|failed|: \{|1M tokens" | tail -30
echo "gpu tests exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_tests.txt"
timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/bench_op.py --out "$OUT/bench_op.json" ${BENCH_ARGS:-} 2>&1 \
    | tee "$OUT/bench_op.txt" | tail -40
cp -r ~/.cache/power_retention "$OUT/cache" 2>/dev/null || true
