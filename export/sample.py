"""Sample from a trained checkpoint: the cached row cells (export/cells, fast) where the
architecture has them, else the reference sampler (training/sample.py, one full pass per
sub-pixel). Both draw the same image from the same seed.

    python -m pixelrnn.export.sample --checkpoint runs/pixelcnn/best.pt --n 16 --out samples.png
    python -m pixelrnn.export.sample --checkpoint ... --complete --known-rows 14 --n 4 --k 3 --out completions.png
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from tqdm import tqdm

from pixelrnn.runtime.images import completion_grid, save_grid
from pixelrnn.training.sample import known_canvas, labels_tensor, sample_reference


def sample_images(model, n: int, seed: int, temperature: float = 1.0, labels=None, known=None,
                  known_rows: int = 0, sampler: str = "auto", device: str = "cpu", progress: bool = False) -> np.ndarray:
    """Sample with the cached row cells (export/cells) when the architecture has them, else (or
    with sampler="reference") with the reference sampler. Both draw the same image per seed."""
    if sampler not in ("auto", "cached", "reference"):
        raise ValueError(f"sampler must be auto, cached or reference, got {sampler!r}")
    model.to(device)
    if sampler != "reference":
        from pixelrnn.export.cells import build_cell, sample_cached  # torch cells: built only when used

        try:
            cell = build_cell(model)
        except ValueError:
            if sampler == "cached":
                raise
        else:
            labels = labels_tensor(model, n, labels)
            known_canvas(model, n, known, known_rows)  # validates the known rows
            rows = getattr(cell, "height", model.config.height) + getattr(getattr(cell, "small", None), "height", 0)
            with tqdm(total=rows, desc="rows", unit="row", disable=not progress) as bar:
                return sample_cached(cell, n, seed, temperature, labels, known, known_rows, device, lambda i: bar.update(1))
    return sample_reference(model, n, seed, temperature, labels, known, known_rows, progress)


# ---------------------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    from pixelrnn.runtime.data_flags import add_data_arguments

    p = argparse.ArgumentParser(prog="python -m pixelrnn.export.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--n", type=int, default=16, help="samples (with --complete: examples)")
    p.add_argument("--out", default="samples.png", help="PNG grid to write")
    p.add_argument("--npy", help="also save the sampled levels (n, C, H, W) as .npy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--label", type=int, help="class for every sample (conditional models; default cycles)")
    p.add_argument("--nrow", type=int, help="images per grid row")
    p.add_argument("--scale", type=int, default=3, help="enlarge the PNG grid by this factor")
    p.add_argument("--complete", action="store_true", help="complete images of --split from --known-rows rows")
    add_data_arguments(p)
    p.add_argument("--split", default="valid", choices=("train", "valid", "test"),
                   help="the split --complete takes its images from (binarized MNIST's test split is held out)")
    p.add_argument("--known-rows", type=int, help="rows given to the model (default: half the image)")
    p.add_argument("--k", type=int, default=3, help="completions per example")
    p.add_argument("--sampler", choices=("auto", "cached", "reference"), default="auto",
                   help="cached row cells (fast) or one full pass per sub-pixel (reference); auto = cached where available")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    from pixelrnn.training.checkpoint import load_model

    model, ckpt = load_model(args.checkpoint)
    cfg = model.config
    started = time.monotonic()
    if args.complete:
        from pixelrnn.runtime.data_flags import data_spec_from_args
        from pixelrnn.runtime.datasets import load
        from pixelrnn.training.train import check_data_fits

        data = load(data_spec_from_args(args, base=ckpt["data"]), args.split)
        data_labels = check_data_fits(model, data)
        known_rows = cfg.height // 2 if args.known_rows is None else args.known_rows
        originals = data.images[:args.n]
        known = np.repeat(originals, args.k, axis=0)  # each example k times, consecutively
        labels = None if data_labels is None else np.repeat(data_labels[:args.n].numpy(), args.k)
        samples = sample_images(model, len(known), args.seed, args.temperature, labels, known, known_rows,
                                args.sampler, args.device, progress=True)
        save_grid(completion_grid(originals, samples, cfg.levels, known_rows, args.k), 256, args.out, nrow=args.k + 2, scale=args.scale)
    else:
        labels = None
        if cfg.num_classes:
            labels = np.full(args.n, args.label) if args.label is not None else np.arange(args.n) % cfg.num_classes
        elif args.label is not None:
            raise ValueError("--label: this model is not class-conditional")
        samples = sample_images(model, args.n, args.seed, args.temperature, labels, sampler=args.sampler,
                                device=args.device, progress=True)
        save_grid(samples, cfg.levels, args.out, nrow=args.nrow, scale=args.scale)
    if args.npy:
        np.save(args.npy, samples)
    return {"out": str(args.out), "images": int(len(samples)), "shape": list(samples.shape[1:]),
            "seconds": round(time.monotonic() - started, 3)}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
