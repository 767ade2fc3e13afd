#!/usr/bin/env bash
# `make web`: serve REPOSITORY on tritonserver (loopback) and the live web page in front of it,
# until Ctrl-C stops both. Ports: GRPC_PORT HTTP_PORT METRICS_PORT (Triton), WEB_PORT (the page).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
REPOSITORY=${REPOSITORY:-model_repository}
GRPC_PORT=${GRPC_PORT:-8001} HTTP_PORT=${HTTP_PORT:-8000} METRICS_PORT=${METRICS_PORT:-8002} WEB_PORT=${WEB_PORT:-8080}
LOG=${WEB_LOG_DIR:-runs/web}
mkdir -p "$LOG"

# Python is started with SIGINT ignored: its main() handles Ctrl-C quietly from its first lines
# (web/__main__.py); a Ctrl-C in the interpreter's own start-up would end in a traceback.
gateway() { (trap '' INT; exec $PY -m pixelrnn.web "$@"); }

# The page's port first: a busy one fails now, not after the models have loaded.
gateway --port "$WEB_PORT" --check-port
source scripts/serve_background.sh
start_server "$REPOSITORY" "$GRPC_PORT" "$HTTP_PORT" "$METRICS_PORT" "$LOG"
# In the foreground: Ctrl-C stops the gateway, then the trap stops tritonserver. Its exit code 130
# says "interrupted": that is how this ends, not a failure.
gateway --triton "127.0.0.1:$GRPC_PORT" --port "$WEB_PORT" || [ $? -eq 130 ]
