#!/usr/bin/env bash
# One script for a lent GPU (device tool): build, CUDA tests, the rest of the suite, benchmarks.
#   bash benchmarks/gpu_run.sh                the default: info build cuda, done within 8 minutes (one device call)
#   bash benchmarks/gpu_run.sh STAGE ...      stages by name: info build cuda suite bench defaults ops
# Every stage runs under `timeout`, cut to what is left before the deadline: GPU_RUN_DEADLINE seconds after the
# start (default 480, so a 10-minute device call keeps two minutes for starting and copying back); later
# stages are skipped, and said so. Each test gets GPU_RUN_TEST_TIMEOUT seconds (default 120): pytest-timeout
# where installed, else benchmarks/pytest_deadline.py. Logs and JSON go to $OUT (the device tool's return
# folder) or ./gpu_out; the last lines are one status line per stage.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
deadline=${GPU_RUN_DEADLINE:-480}
per_test=${GPU_RUN_TEST_TIMEOUT:-120}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(info build cuda)
summary="$OUT/summary.txt"
: >"$summary"
# A hung test fails alone instead of eating the whole run.
if python3 -c "import pytest_timeout" 2>/dev/null; then
    tmo=(--timeout "$per_test")
else
    export PYTHONPATH="$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" FREEZERT_TEST_TIMEOUT=$per_test
    tmo=(-p pytest_deadline)
fi

step() {  # step NAME LIMIT CMD...: run under timeout, log to $OUT/NAME.log, record the exit status
    local name=$1 limit=$2; shift 2
    local left=$((deadline - SECONDS - 15))  # 10 s for timeout's kill grace, 5 s for the summary
    if [ "$left" -lt 20 ]; then
        echo "$name skipped: the ${deadline} s deadline is near (GPU_RUN_DEADLINE)" | tee -a "$summary"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    local why=""
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && why=" (stopped at its ${limit} s limit)"
    echo "$name rc=$rc $((SECONDS - t0))s$why" | tee -a "$summary"
    tail -n 25 "$OUT/$name.log"
    return 0
}

info() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, 'triton', triton.__version__)"
    nvcc --version | tail -n 2
    python3 -c "import pytest_timeout" 2>/dev/null && echo "pytest-timeout: installed" || echo "pytest-timeout: absent (pytest_deadline.py)"
    date -u
}

for s in "${stages[@]}"; do
    case $s in
    info)
        step info 30 bash -c "$(declare -f info); info"
        cp "$OUT/info.log" "$OUT/info.txt" ;;
    build)
        step build 240 python3 -m pip install --no-build-isolation --no-deps -e .
        step native 30 python3 -c "import freezert._native as n; print('native:', n.native_info())" ;;
    cuda)
        step cuda 420 env TRITON_INTERPRET=0 python3 -m pytest -m cuda tests -q -p no:cacheprovider \
            "${tmo[@]}" --durations=10 --junitxml "$OUT/cuda.xml" ;;
    suite)
        step suite 420 python3 -m pytest -m "not cuda" tests -q -p no:cacheprovider "${tmo[@]}" --durations=10 ;;
    bench)
        step bench_e2e 150 python3 -m freezert bench --quiet --json "$OUT/bench.json"
        step bench_amp 150 python3 -m freezert bench --quiet --amp --graphs --json "$OUT/bench_amp_graphs.json"
        step demo 120 python3 -m freezert demo --quiet --json "$OUT/demo.json" --plot "$OUT/demo.png"
        step cache_yolo 180 python3 -m freezert bench --cache --quiet --json "$OUT/cache_yolo.json"
        step cache_enc 180 python3 -m freezert bench --cache --quiet --model encoder --json "$OUT/cache_enc.json"
        step alternate 180 python3 benchmarks/alternate.py --rounds 100
        step bench_cache 300 python3 -m pytest benchmarks/bench_cache.py --benchmark-only -q -p no:cacheprovider \
            --benchmark-columns=median,iqr,rounds --benchmark-json "$OUT/bench_cache.json" ;;
    defaults)  # wrap()'s defaults (the lean path) and each option against naive freezing, step time and CUDA peak
        step defaults_yolo 150 python3 -m freezert bench --model yolov5s --input 16,3,640,640 --freeze 10 \
            --device cuda --quiet --json "$OUT/defaults_yolov5s.json"
        step defaults_resnet 150 python3 -m freezert bench --model torchvision.models:resnet50 \
            --input 32,3,224,224 --freeze 3 --device cuda --quiet --json "$OUT/defaults_resnet50.json" ;;
    ops)
        step ops 420 env TRITON_INTERPRET=0 python3 -m pytest benchmarks/bench_ops.py --benchmark-only -q \
            -p no:cacheprovider --benchmark-columns=median,iqr,rounds --benchmark-json "$OUT/ops.json" ;;
    *) echo "unknown stage $s: choose from info build cuda suite bench defaults ops" | tee -a "$summary" ;;
    esac
done
echo "stages: ${stages[*]}; deadline ${deadline} s; ended at ${SECONDS} s" | tee -a "$summary"
