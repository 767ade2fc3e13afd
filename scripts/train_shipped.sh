#!/usr/bin/env bash
# Trains (or, with RESUME=1, continues) the short-run shipped checkpoints with the project's own
# command. The Row LSTM, the Diagonal BiLSTM and the binarized-MNIST Gated PixelCNN come from the long runs instead
# (runs/long/, README "Long training runs").
# Two queues of one thread each fit a 2-core machine. Step counts are sized so the cosine
# schedule ends within about MINUTES per run on this CPU; MINUTES also hard-stops a run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
M=${MINUTES:-14}
S=${STEPS_SCALE:-1}
R=${RESUME:+--resume}; R=${R:---overwrite}
common="--max-minutes $M --threads 1 --valid-every 500 --valid-images 2000 --checkpoint-every 250 --batch-size 64"
queue_a() {
  $PY -m training.train --arch pixelcnn --data binarized-mnist --hidden 48 --layers 8 --steps $((2200 * S)) --out runs/pixelcnn_binarized_mnist $common $R
}
queue_b() {
  $PY -m training.train --arch gated_pixelcnn --data fashion-mnist --conditional --hidden 36 --layers 5 --steps $((750 * S)) --out runs/gated_pixelcnn_fashion_mnist $common $R
}
queue_a > runs/queue_a.log 2>&1 &
queue_b > runs/queue_b.log 2>&1 &
wait
