#!/usr/bin/env bash
# On a GPU machine: continue every runs/long/*/last.pt run on CUDA (training.train --resume),
# score each before and after on its full validation split, run the GPU tests (pytest -m gpu)
# and the CUDA sampling bench, and leave what comes back under $OUT. The logic lives in
# bench/gpu_session.py (its header says what runs and what comes back); its CPU path is tested.
#
#   here, once:           bash scripts/gpu_train.sh --prepare   # binarized MNIST -> runs/device_data (git-ignored)
#   on the GPU machine:   bash scripts/gpu_train.sh             # with runs/device_data carried along, within 600 s
#   what comes back, under $OUT: gpu_session.json (the summary: before/after full-valid NLL per run,
#                         tests, bench), bench/sampling_cuda.json, runs/NAME/last.pt and metrics.json
#
# GPU_BUDGET_MINUTES (8): training minutes summed over the runs; GPU_MODE concurrent|sequential;
# GPU_CALL_LIMIT_S (600): the GPU machine's time limit on one call; GPU_SKIP=tests,bench; BENCH_ARGS
# and GPU_TRAIN_ARGS: extra flags for bench.sampling and training.train (e.g. "--epochs 30").
# Flags (--budget-minutes, --mode, RUN_DIR ...) pass through; --help lists them.
set -uo pipefail
cd "$(dirname "$0")/.."
# On the GPU machine, python3 is its own CUDA PyTorch (the .venv is git-ignored and does not
# travel; bench/gpu_session.py imports pixelrnn from the checkout there); here, the .venv.
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONUNBUFFERED=1
# A last bound beneath the session's own timeouts: end 10 s before the call's limit, so that
# what is under $OUT (rewritten after every phase) still comes back if something hangs.
limit=${GPU_CALL_LIMIT_S:-600}
exec timeout -k 5 "$(( ${limit%.*} - 10 ))" "$PY" -m bench.gpu_session "$@"
