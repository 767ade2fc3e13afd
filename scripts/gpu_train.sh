#!/usr/bin/env bash
# Continue every runs/long/*/last.pt run on a lent CUDA machine (the workplace `device` tool), run
# the gpu tests and the CUDA sampling benchmark, and leave the results under $OUT, which the tool
# brings back. The logic lives in training/gpu_session.py, whose CPU path the tests exercise.
#
#   here, once:   scripts/gpu_train.sh --prepare      # binarized MNIST -> runs/device_data (git-ignored)
#   device call:  command "bash scripts/gpu_train.sh", carry ["runs/device_data"], timeout_s 600
#   then here:    results in the call's files_at: runs/NAME/last.pt, runs/NAME/metrics.json,
#                 bench/sampling_cuda.json, gpu_session.json (before/after full-valid NLL per run)
#
# GPU_BUDGET_MINUTES (8): training minutes summed over the runs; GPU_MODE concurrent|sequential;
# GPU_CALL_LIMIT_S (600): the tool's per-call limit; GPU_SKIP=tests,bench; BENCH_ARGS and
# GPU_TRAIN_ARGS: extra flags for bench.sampling and training.train (e.g. "--epochs 30").
# Flags (--budget-minutes, --mode, RUN_DIR ...) pass through; --help lists them.
set -uo pipefail
cd "$(dirname "$0")/.."
# There, python3 is the image's CUDA PyTorch (the .venv is git-ignored and does not travel);
# here, the project's .venv.
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONUNBUFFERED=1
# A last bound beneath the helper's own timeouts: end 10 s before the tool's limit, so that what
# is under $OUT (rewritten after every phase) still comes back if something hangs.
limit=${GPU_CALL_LIMIT_S:-600}
exec timeout -k 5 "$(( ${limit%.*} - 10 ))" "$PY" -m pixelrnn.training.gpu_session "$@"
