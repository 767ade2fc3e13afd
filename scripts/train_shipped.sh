#!/usr/bin/env bash
# Trains (or, with RESUME=1, continues) the short PixelCNN run with the project's own command: 14
# minutes, the earlier shipped PixelCNN (until commit f94ca3a). Every shipped checkpoint now comes from a long run
# (runs/long/, docs/measurements.md "Long training runs"); this stays as the quick way to a usable PixelCNN.
# One thread. The step count is sized so the cosine schedule ends within about MINUTES on this
# CPU; MINUTES also hard-stops the run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
M=${MINUTES:-14}
S=${STEPS_SCALE:-1}
R=${RESUME:+--resume}; R=${R:---overwrite}
common="--max-minutes $M --threads 1 --valid-every 500 --valid-images 2000 --checkpoint-every 250 --batch-size 64"
train_pixelcnn() {
  $PY -m pixelrnn.training.train --arch pixelcnn --data binarized-mnist --hidden 48 --layers 8 --steps $((2200 * S)) --out runs/pixelcnn_binarized_mnist $common $R
}
train_pixelcnn > runs/pixelcnn_binarized_mnist.log 2>&1
