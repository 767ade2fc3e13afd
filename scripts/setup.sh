#!/usr/bin/env bash
# Idempotent set-up for a fresh 2-core CPU machine (registries only, no GPU):
#   .venv with the project, the real tritonserver binary under .triton/, Debian's
#   Fashion-MNIST under /usr/share/datasets/fashion-mnist/, Debian's libb64 for perf_analyzer,
#   and Debian's nginx (the gRPC load balancer of python -m pixelrnn.server.cluster).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
VENV=.venv
TRITON_DIR=.triton

"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required (the Triton backend stub is built for it), found " + sys.version'

# Python environment: reinstall only when pyproject.toml changed since the last set-up.
stamp=$VENV/.pyproject.sha256
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] creating $VENV and installing the project"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  # torch first and pinned: this picks the local CPU build instead of CUDA wheels.
  "$VENV/bin/pip" install -q torch==2.13.0 2>&1 | grep -v '^WARNING: Location' || true
  "$VENV/bin/pip" install -q -e '.[full,dev]' 2>&1 | grep -v '^WARNING: Location' || true
  "$VENV/bin/python" -c 'import torch, numpy, onnxruntime, tritonclient.grpc'
  echo "$want" > "$stamp"
else
  echo "[setup] $VENV is up to date"
fi

# Real Triton server: only the tritonserver binary bundled in the nvidia-pytriton wheel is used.
TS=$TRITON_DIR/pytriton/tritonserver
if [ ! -x "$TS/bin/tritonserver" ]; then
  echo "[setup] installing tritonserver (nvidia-pytriton 0.7.0 wheel) into $TRITON_DIR"
  rm -rf "$TRITON_DIR"
  "$VENV/bin/pip" install -q --no-deps --target "$TRITON_DIR" nvidia-pytriton==0.7.0 2>&1 | grep -v '^WARNING: Location' || true
fi
if [ ! -x "$TS/backends/python/triton_python_backend_stub" ]; then
  # The backend looks for the stub beside itself; the wheel keeps it per Python version.
  cp "$TS/python_backend_stubs/3.11/triton_python_backend_stub" "$TS/backends/python/"
fi
[ -x "$TS/bin/tritonserver" ] || { echo "[setup] tritonserver binary missing after install" >&2; exit 1; }

# Debian packages: Fashion-MNIST as IDX files (nothing is downloaded at run time), and libb64,
# which perf_analyzer (shipped in the tritonclient wheel; bench/perf_analyzer.py) links.
apt_missing=()
[ -d /usr/share/datasets/fashion-mnist ] || apt_missing+=(dataset-fashion-mnist)
dpkg-query -W -f='${Status}' libb64-0d 2>/dev/null | grep -q 'ok installed' || apt_missing+=(libb64-0d)
# nginx: the L7 gRPC proxy in front of tritonserver replicas (python -m pixelrnn.server.cluster); only the
# binary is used, run in the foreground with its own run directory, never as the system service.
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || apt_missing+=(nginx)
# chromium + its driver: the web page's tests drive a real headless browser (tests/test_web.py).
[ -x /usr/bin/chromium ] || apt_missing+=(chromium)
[ -x /usr/bin/chromedriver ] || apt_missing+=(chromium-driver)
if [ ${#apt_missing[@]} -gt 0 ]; then
  echo "[setup] installing Debian packages: ${apt_missing[*]}"
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${apt_missing[@]}" >/dev/null
fi

# perf_analyzer also needs libcudart.so.12: PyPI's nvidia-cuda-runtime-cu12 (the `full` extra);
# bench/perf_analyzer.py puts its lib/ folder on LD_LIBRARY_PATH, as this check does.
CUDART=$("$VENV/bin/python" -c 'import nvidia.cuda_runtime as m, os; print(os.path.join(list(m.__path__)[0], "lib"))')
pa=$(LD_LIBRARY_PATH="$CUDART${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$VENV/bin/perf_analyzer" --version 2>&1) \
  || { echo "[setup] perf_analyzer does not start: $pa" >&2; exit 1; }
echo "[setup] done"
