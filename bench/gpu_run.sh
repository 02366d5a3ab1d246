#!/usr/bin/env bash
# One GPU session's checks and measurements, in order of importance. Each stage has its own
# time limit and log; a stage that fails or runs out of time does not stop the ones after it.
#
#   bash bench/gpu_run.sh [OUT_DIR]          # default build/gpu_run; about 5 minutes on an H200
#   STAGES="kernel_tests launch_overhead" bash bench/gpu_run.sh      # only these stages
#
# Stages: the kernels against the float64 reference on the GPU (paper sizes included); the
# benchmark suite (dispersive term, all 28 XL blocks, SiT-XL/2 training step); the release
# under torch.compile (its first compiles are the slow part, and the profiler reuses them);
# the profiler's per-kernel roofline table; a sweep of the kernels' tile table. Uses the
# python3 on PATH ($PYTHON to override) with its torch and triton; no DeepSpeed or DALI.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=$(mkdir -p "${1:-build/gpu_run}" && cd "${1:-build/gpu_run}" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/build/cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/build/cache/inductor

stage() {  # stage NAME SECONDS COMMAND...: log in OUT/NAME.log, its tail on stdout
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    case " ${STAGES:-all} " in *" all "*|*" $name "*) ;; *) return 0 ;; esac
    echo "=== $name (limit ${limit}s, $(date +%T))"
    timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start))s$([ $rc -eq 124 ] && echo ' (TIMED OUT)')"
    tail -n "${TAIL:-6}" "$OUT/$name.log"
    echo "$name $rc $((SECONDS - start))" >>"$OUT/stages.txt"
}

stage env 20 bash -c "nvidia-smi; $PY -c 'import torch, triton, sys; print(sys.version); print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'"
# 6 processes if pytest-xdist is there (a bare GPU machine may lack it; then one, slower).
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 6")
stage kernel_tests 100 $PY -m pytest tests/kernels/test_fused.py -q -p no:cacheprovider $XDIST -rfE
stage launch_overhead 40 $PY -m bench.launch_overhead
stage bench_dispersive 130 $PY -m pytest bench/test_dispersive_bench.py -q -p no:cacheprovider \
    -k "${DISPERSIVE_K:-not torch_compile and not gram_speedup_bar}" \
    --benchmark-json "$OUT/bench_dispersive.json"
TAIL=10 stage bench_train_step 80 $PY -m pytest bench/test_train_step_bench.py -q -s -p no:cacheprovider \
    --benchmark-json "$OUT/bench_train_step.json"
stage bench_compile 90 $PY -m pytest bench/test_dispersive_bench.py -k torch_compile -q -p no:cacheprovider \
    --benchmark-json "$OUT/bench_compile.json"
stage profile 75 $PY -m bench.profile --out "$OUT/profile" --steps 5
TAIL=3 stage tile_sweep 60 $PY -m bench.tile_sweep --out "$OUT/tile_sweep.json" --budget-s 45
echo "=== stages (name, exit, seconds):"
cat "$OUT/stages.txt"
