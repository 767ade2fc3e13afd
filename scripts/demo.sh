#!/usr/bin/env bash
# The main job, end to end on a shipped checkpoint. Each step says what it did.
# (Export, the Triton server and streamed sampling join this script as those issues land.)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${DEMO_OUT:-runs/demo}
CKPT=${DEMO_CHECKPOINT:-checkpoints/pixelcnn_binarized_mnist.pt}
mkdir -p "$OUT"

if [ ! -f "$CKPT" ]; then
  echo "== no shipped checkpoint at $CKPT: training a small PixelCNN for 2 minutes instead"
  $PY -m training.train --arch pixelcnn --data binarized-mnist --out "$OUT/train" \
      --hidden 32 --layers 4 --max-minutes 2 --valid-every 200 --valid-images 500 --overwrite
  CKPT=$OUT/train/best.pt
fi

echo "== 1. validation NLL of $CKPT on 1000 binarized-MNIST validation images"
$PY -m training.evaluate --checkpoint "$CKPT" --split valid --limit 1000

echo "== 2. sampling 16 images with the cached row cells -> $OUT/samples.png"
$PY -m training.sample --checkpoint "$CKPT" --n 16 --seed 0 --out "$OUT/samples.png"

echo "== 3. completing 4 validation images from their top half -> $OUT/completions.png"
$PY -m training.sample --checkpoint "$CKPT" --complete --split valid --n 4 --k 3 --seed 0 \
    --out "$OUT/completions.png"

echo "== 4. exporting the row cell and the scorer to ONNX (checked against torch) -> $OUT/export"
$PY export/build_engine.py --checkpoint "$CKPT" --out "$OUT/export"

echo "== demo done: see $OUT/"
