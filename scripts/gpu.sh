#!/usr/bin/env bash
# One device call: the GPU tests (Triton kernels, CUDA-graph decoding), then the kernel benchmark
# (BENCHMARKS.md protocol) and the decode/serving benchmark; every result lands under $OUT. Run
# from the repository root on the GPU machine:
#     OUT=/some/dir bash scripts/gpu.sh [pytest -k expression]
# The tests are mostly compiling (each kernel for every autotuned configuration): one after the
# other, 7 of the 19 besides the 1M-token ones took 420 s on a fresh H100 (docs/benchmarks.md,
# run 48), so where pytest-xdist is installed TEST_WORKERS (6) processes share them. The tests
# marked `alone` run after them, one at a time: degree 4's float64 reference takes 57 GiB and
# the 1M-token tests 38 and 61, and side by side they ran out of memory (run 49).
# TEST_TIMEOUT (300 s) bounds each of the two parts, BENCH_TIMEOUT (250 s) and SERVING_TIMEOUT
# (200 s; 0 skips either benchmark) the benchmarks (one call allows 600 s); BENCH_ARGS and
# SERVING_ARGS pass options to the two benchmarks (e.g. BENCH_ARGS="--seq-lens=65536 --long=
# --odd=", SERVING_ARGS=--profile).
# Figures of the results, anywhere matplotlib is installed:
#     python benchmarks/plot_results.py $OUT/bench_op.json $OUT/bench_serving.json
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src
OUT=${OUT:-/tmp/power_retention_gpu}
mkdir -p "$OUT"
{ date -u; nvidia-smi; python3 -c 'import torch, triton; print(torch.__version__, triton.__version__)'; } \
    > "$OUT/environment.txt" 2>&1
# the tests' chunk-size timings go to a cache of their own: under several workers they are noisy
run_tests() {   # $1: a -m expression; the rest: pytest options
    local marks=$1; shift
    POWER_RETENTION_CACHE="$OUT/test_cache" timeout ${TEST_TIMEOUT:-300} python3 -m pytest -v \
        -m "$marks" tests/test_graphs.py tests/test_triton.py -k "$selection" --durations=12 "$@" \
        2>&1 | tee -a "$OUT/gpu_tests.txt" \
        | grep -E "PASS|FAIL|Error|passed|failed|: \{|1M tokens|^[0-9.]+s (call|setup)" | tail -40
    local status=${PIPESTATUS[0]}
    [ "$status" = 5 ] && status="5 (no test selected)"
    echo "gpu tests (-m '$marks' -k '$selection') exit status: $status" | tee -a "$OUT/gpu_tests.txt"
}
selection=${1:-}
parallel=(-s)
if python3 -c "import xdist" 2>/dev/null; then parallel=(-n "${TEST_WORKERS:-6}" --dist worksteal -rP); fi
run_tests "gpu and not alone" "${parallel[@]}"
run_tests "gpu and alone" -s
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
