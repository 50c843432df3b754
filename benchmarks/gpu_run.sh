#!/usr/bin/env bash
# One script for a lent GPU (device tool): build, CUDA tests, the rest of the suite, benchmarks.
#   bash benchmarks/gpu_run.sh [stage ...]     stages: info build cuda suite bench ops (default: all)
# Logs and JSON go to $OUT (the device tool's return folder) or ./gpu_out.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(info build cuda suite bench ops)
summary="$OUT/summary.txt"
tmo=()  # a hung test fails alone instead of eating the whole run (pytest-timeout, where installed)
python3 -c "import pytest_timeout" 2>/dev/null && tmo=(--timeout 180)

step() {  # step NAME TIMEOUT CMD...: run, log to $OUT/NAME.log, record the exit status
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$summary"
    tail -n 25 "$OUT/$name.log"
    return 0
}

for s in "${stages[@]}"; do
    case $s in
    info)
        { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
          python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, 'triton', triton.__version__)"
          nvcc --version | tail -n 2; date -u; } 2>&1 | tee "$OUT/info.txt" ;;
    build)
        step build 300 python3 -m pip install --no-build-isolation --no-deps -e .
        python3 -c "import freezert._native as n; print('native:', n.native_info())" 2>&1 | tee -a "$summary" ;;
    cuda)
        step cuda 420 env TRITON_INTERPRET=0 python3 -m pytest -m cuda tests -q -p no:cacheprovider \
            "${tmo[@]}" --junitxml "$OUT/cuda.xml" ;;
    suite)
        step suite 300 python3 -m pytest -m "not cuda" tests -q -p no:cacheprovider "${tmo[@]}" ;;
    bench)
        step bench_e2e 240 python3 -m freezert bench --quiet --json "$OUT/bench.json"
        step bench_amp 240 python3 -m freezert bench --quiet --amp --graphs --json "$OUT/bench_amp_graphs.json"
        step cache_yolo 300 python3 -m freezert bench --cache --quiet --json "$OUT/cache_yolo.json"
        step cache_enc 300 python3 -m freezert bench --cache --quiet --model encoder --json "$OUT/cache_enc.json"
        step alternate 300 python3 benchmarks/alternate.py --rounds 100
        step bench_cache 420 python3 -m pytest benchmarks/bench_cache.py --benchmark-only -q -p no:cacheprovider \
            --benchmark-columns=median,iqr,rounds --benchmark-json "$OUT/bench_cache.json" ;;
    ops)
        step ops 420 env TRITON_INTERPRET=0 python3 -m pytest benchmarks/bench_ops.py --benchmark-only -q \
            -p no:cacheprovider --benchmark-columns=median,iqr,rounds --benchmark-json "$OUT/ops.json" ;;
    *) echo "unknown stage $s" ;;
    esac
done
cat "$summary"
