"""Score a checkpoint on a data split: one JSON line with the NLL in nats and bits per dimension.

    python -m pixelrnn.training.evaluate --checkpoint runs/pixelcnn/best.pt --split test
    {"nll_nats": 81.2, "bits_per_dim": 0.149, "n_images": 10000, "checkpoint": "...", "data": {...}, "split": "test"}

The data defaults to the checkpoint's own spec; --data / --data-dir / --bits / --data-arg
override it. The NLL is the model's own `nll` (exact for the multi-scale model too), averaged
over the images.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from pixelrnn.runtime.data_flags import add_data_arguments, data_spec_from_args
from pixelrnn.runtime.datasets import load
from pixelrnn.training import distributions
from pixelrnn.training.checkpoint import load_model
from pixelrnn.training.train import check_data_fits


@torch.no_grad()
def evaluate_images(model, images, labels=None, batch_size: int = 256) -> float:
    """Mean NLL in nats per image of uint8 `images` (N, C, H, W) under `model` (CPU)."""
    model.eval()
    images = torch.as_tensor(images)
    total = 0.0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].long()
        y = labels[start:start + batch_size] if labels is not None else None
        total += float(model.nll(x, y).double().sum())
    return total / max(len(images), 1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pixelrnn.training.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    add_data_arguments(p)
    p.add_argument("--split", default="test", choices=("train", "valid", "test"))
    p.add_argument("--limit", type=int, help="score only the first N images")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, ckpt = load_model(args.checkpoint)
    spec = data_spec_from_args(args, base=ckpt["data"])
    data = load(spec, args.split)
    labels = check_data_fits(model, data)
    n = len(data) if args.limit is None else min(args.limit, len(data))
    nats = evaluate_images(model, data.images[:n], labels[:n] if labels is not None else None, args.batch_size)
    return {
        "nll_nats": nats,
        "bits_per_dim": float(distributions.nats_to_bits_per_dim(nats, model.dims)),
        "n_images": n,
        "checkpoint": str(args.checkpoint),
        "data": spec.to_dict(),
        "split": args.split,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except ValueError as e:  # CheckpointError, DataError, a model that does not fit the data
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
