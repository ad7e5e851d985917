#!/usr/bin/env bash
# One device call: the GPU tests (Triton kernels, CUDA-graph decoding), then the kernel benchmark
# (BENCHMARKS.md protocol) and the decode/serving benchmark; every result lands under $OUT. Run
# from the repository root on the GPU machine:
#     OUT=/some/dir bash scripts/gpu.sh [pytest -k expression]
# TEST_TIMEOUT (220 s per group of tests: the quick group takes ~190 s on a fresh machine, most
# of it compiling; the 1M-token group ~55 s; degree 4 ~200 s), BENCH_TIMEOUT (250 s) and SERVING_TIMEOUT (200 s;
# 0 skips either benchmark) bound each part (one call allows 600 s); BENCH_ARGS and SERVING_ARGS
# pass options to the two benchmarks (e.g. BENCH_ARGS="--seq-lens=65536 --long= --odd=",
# SERVING_ARGS=--profile). Figures of the results, anywhere matplotlib is installed:
#     python benchmarks/plot_results.py $OUT/bench_op.json $OUT/bench_serving.json
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src
OUT=${OUT:-/tmp/power_retention_gpu}
mkdir -p "$OUT"
{ date -u; nvidia-smi; python3 -c 'import torch, triton; print(torch.__version__, triton.__version__)'; } \
    > "$OUT/environment.txt" 2>&1
# the quick tests first, then the two 1M-token tests, degree 4 last: a limit cuts the slow
# ones, not the rest
if [ -n "${1:-}" ]; then selections=("$1")
else selections=("not one_million and not deg4" "one_million" "deg4"); fi
for selection in "${selections[@]}"; do
    timeout ${TEST_TIMEOUT:-220} python3 -m pytest -v -s -m gpu tests/test_graphs.py \
        tests/test_triton.py -k "$selection" 2>&1 \
        | tee -a "$OUT/gpu_tests.txt" | grep -E "PASS|FAIL|Error|passed|failed|: \{|1M tokens" | tail -30
    echo "gpu tests (-k '$selection') exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_tests.txt"
done
if [ "${BENCH_TIMEOUT:-250}" != 0 ]; then
    timeout ${BENCH_TIMEOUT:-250} python3 benchmarks/bench_op.py --out "$OUT/bench_op.json" \
        ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_op.txt" | tail -40
fi
if [ "${SERVING_TIMEOUT:-200}" != 0 ]; then
    timeout ${SERVING_TIMEOUT:-200} python3 benchmarks/bench_serving.py \
        --output "$OUT/bench_serving.json" ${SERVING_ARGS:-} 2>&1 | tee "$OUT/bench_serving.txt" \
        | tail -25
fi
cp -r ~/.cache/power_retention "$OUT/cache" 2>/dev/null || true
