#!/usr/bin/env bash
# The main job, end to end on a shipped checkpoint: check it, export it, serve it on a real
# Triton server, stream samples, complete and score images through the gRPC client, stop.
# DEMO_SHORT=1: the same steps with fewer images (the suite's tests/test_demo.py runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${DEMO_OUT:-runs/demo}
CKPT=${DEMO_CHECKPOINT:-checkpoints/gated_pixelcnn_binarized_mnist.pt}  # the long-run Gated PixelCNN: digits
mkdir -p "$OUT"
if [ -n "${DEMO_SHORT:-}" ]; then EVAL_N=100 SAMPLE_N=4 COMPLETE_N=2 COMPLETE_K=2
else EVAL_N=1000 SAMPLE_N=16 COMPLETE_N=4 COMPLETE_K=3; fi

if [ ! -f "$CKPT" ]; then
  echo "== no shipped checkpoint at $CKPT: training a small PixelCNN for 2 minutes instead"
  $PY -m pixelrnn.training.train --arch pixelcnn --data binarized-mnist --out "$OUT/train" \
      --hidden 32 --layers 4 --max-minutes 2 --valid-every 200 --valid-images 500 --overwrite
  CKPT=$OUT/train/best.pt
fi

echo "== 1. validation NLL of $CKPT on $EVAL_N binarized-MNIST validation images (in process)"
$PY -m pixelrnn.training.evaluate --checkpoint "$CKPT" --split valid --limit $EVAL_N

echo "== 2. export: ONNX row cell + scorer (checked against torch) and a Triton repository -> $OUT/repository"
$PY export/build_engine.py --checkpoint "$CKPT" --out "$OUT/export" --repository "$OUT/repository" --name demo

echo "== 3. starting tritonserver on free loopback ports"
read -r GRPC HTTP METRICS < <($PY -c 'import socket
socks = [socket.socket() for _ in range(3)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')
source scripts/serve_background.sh
start_server "$OUT/repository" "$GRPC" "$HTTP" "$METRICS" "$OUT"
URL=127.0.0.1:$GRPC

echo "== 4. streaming $SAMPLE_N samples row by row over gRPC -> $OUT/samples.png"
$PY -m pixelrnn.client sample --url "$URL" --model demo --n $SAMPLE_N --seed 0 --out "$OUT/samples.png" --npy "$OUT/samples.npy"

echo "== 5. completing $COMPLETE_N validation images from their top half -> $OUT/completions.png"
$PY -m pixelrnn.client complete --url "$URL" --model demo --data binarized-mnist --split valid --n $COMPLETE_N --k $COMPLETE_K --seed 0 \
    --out "$OUT/completions.png"

echo "== 6. scoring the streamed samples and 1 validation image through the scorer"
$PY -c 'import numpy as np; from pixelrnn.runtime.datasets import load; np.save("'"$OUT"'/valid1.npy", load("binarized-mnist", "valid").images[:1])'
$PY -m pixelrnn.client score --url "$URL" --model demo "$OUT/valid1.npy" "$OUT/samples.npy" | tail -4

echo "== 7. stopping the server"
kill -INT $SERVER; wait $SERVER || true; trap - EXIT
tail -1 "$OUT/server.out"
echo "== demo done: see $OUT/"
# The live page is interactive, so the demo only says how to open it (DEMO_NO_WEB=1: not even that).
[ -n "${DEMO_NO_WEB:-}" ] || echo "== watch it live in a browser: make web REPOSITORY=$OUT/repository, then open http://localhost:8080/"
