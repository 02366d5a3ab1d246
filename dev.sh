#!/usr/bin/env bash
# Set-up, demo run and tests in one place. Every command installs what it needs first.
#   ./dev.sh demo    the main job on the built-in default (see README)
#   ./dev.sh test    the whole test suite
#   ./dev.sh setup   only create/refresh the virtual environment (.venv)
#   ./dev.sh bench   pytest bench/ (add --full for the paper's sizes on a GPU)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
ROOT=$PWD

# Tool caches live in the ignored build area, never in $HOME.
export TRITON_CACHE_DIR="$ROOT/build/cache/triton"
export TORCH_EXTENSIONS_DIR="$ROOT/build/cache/torch_extensions"
export TORCHINDUCTOR_CACHE_DIR="$ROOT/build/cache/inductor"
export MPLCONFIGDIR="$ROOT/build/cache/matplotlib"
export WANDB_CACHE_DIR="$ROOT/build/cache/wandb" WANDB_CONFIG_DIR="$ROOT/build/cache/wandb"
export PYTHONUNBUFFERED=1

setup() {
    local py=${PYTHON:-python3}
    if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        echo "dev.sh: needs Python >= 3.10 (set PYTHON=/path/to/python3.x)" >&2
        exit 1
    fi
    if [ ! -x .venv/bin/python ]; then
        if "$py" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
            # A CUDA build of torch is already installed: let the venv see it instead of
            # replacing it with a CPU build.
            echo "dev.sh: using the installed CUDA torch (venv with --system-site-packages)"
            "$py" -m venv --system-site-packages .venv
        else
            "$py" -m venv .venv
        fi
    fi
    # shellcheck disable=SC1091
    . .venv/bin/activate
    mkdir -p build
    local stamp
    stamp="build/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)"
    if [ ! -f "$stamp" ]; then
        echo "dev.sh: installing dependencies into .venv (first run only) ..."
        python -m pip install -q --upgrade pip
        if ! python -c 'import torch' 2>/dev/null; then
            python -m pip install -q "torch==2.13.0" || python -m pip install -q torch
        fi
        # DeepSpeed builds against the installed torch, so it must not get an isolated build env.
        python -m pip install -q --no-build-isolation "deepspeed>=0.15"
        python -m pip install -q -e ".[test]"
        # DeepSpeed JIT-builds its CPU shared-memory all-reduce on first use (about a minute):
        # build it here, once, instead of inside the first training run.
        if ! python -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
            python -c 'from deepspeed.comm.torch import build_shm_op; build_shm_op()' >/dev/null 2>&1 || true
        fi
        rm -f build/.installed-*
        touch "$stamp"
    fi
}

run_tests() {
    set +e
    python -m pytest tests -q --durations=15 "$@"
    local rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then
        echo "dev.sh: pytest collected no tests: that is a failure" >&2
        exit 1
    fi
    exit "$rc"
}

# The main job: a short real training run of a small SiT with Dispersive Loss on the built-in
# digits dataset, under the deepspeed launcher (every GPU when there are GPUs, else 2 CPU
# processes), then the toy harness's scoring of its EMA samples: class accuracy and FD.
# Settings chosen for 2 CPU cores (README, "The main job"): 4x4 patches (16 tokens), 800 steps
# of 128 images at lr 2e-3; the release's term (lambda 0.25, tau 1, last block) in its
# scale-invariant form, which keeps acting (the plain one reaches its floor within ~200 steps on
# this toy, issue 17).
# Extra arguments are passed to engine/train.py.
demo() {
    local launcher=(deepspeed) run start=$SECONDS
    if ! python -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
        launcher=(deepspeed --num_gpus 2)
    fi
    run="runs/demo-$(date +%Y%m%d-%H%M%S)"
    "${launcher[@]}" engine/train.py --model sit_s --depth 6 --hidden-size 128 --num-heads 4 --patch-size 4 \
        --data digits --no-flip --global-batch 128 --max-steps 800 --lr 2e-3 --warmup-steps 50 --ema-decay 0.99 \
        --disp-preset release --disp-scale-invariant --zero-stage 2 --log-every 50 --ckpt-every 400 \
        --keep-last-k 2 --sample-count 40 --sample-steps 16 --loader torch --num-workers 0 \
        --results-dir "$run" "$@"
    python -m engine.toy score "$run"
    echo "[demo] done in $((SECONDS - start)) s; everything is in $run"
}

cmd=${1:-help}
shift || true
case "$cmd" in
    setup) setup ;;
    demo) setup; demo "$@" ;;
    test) setup; run_tests "$@" ;;
    bench) setup; python -m pytest bench "$@" ;;
    *) sed -n '2,7p' "$0"; exit 1 ;;
esac
