"""Reference sampler: one full forward pass per sub-pixel. Slow, but obviously right.

Sub-pixels are generated in raster order, R -> G -> B inside a pixel; the value of sub-pixel
(c, i, j) is drawn from the model's logits[:, c, :, i, j] given everything generated so far. The
model is always called on raw integer levels (its `preprocess` does the scaling, exactly as in
training). Randomness is the project-wide stream (training.distributions): one
`draw_row_uniforms` per image row, also for rows that are copied instead of drawn, so a
completion from k known rows consumes the stream exactly like a full sample would; the fast
samplers built later must match this function draw for draw.

Multi-scale models (arch "multiscale") sample the small image first with their `small_model`,
then the big image from `big_model(x, labels, condition=condition(small))`, copying the small
image's values at the grid positions; their uniform stream is: the small image's rows, then the
big image's rows.

    python -m training.sample --checkpoint runs/pixelcnn/best.pt --n 16 --out samples.png
    python -m training.sample --checkpoint ... --complete --split test --known-rows 14 --n 4 --k 3 --out completions.png
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from training.distributions import draw_row_uniforms, sample_from_logits, sampling_rng
from training.images import completion_grid, save_grid



@contextlib.contextmanager
def _inference(model):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _labels(model, n: int, labels) -> torch.Tensor | None:
    if labels is None:
        if model.config.num_classes:
            raise ValueError("this model is class-conditional: pass labels")
        return None
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
    if labels.numel() == 1:
        labels = labels.expand(n)
    if labels.shape != (n,):
        raise ValueError(f"expected {n} labels, got {labels.numel()}")
    if model.config.num_classes and (labels.min() < 0 or labels.max() >= model.config.num_classes):
        raise ValueError(f"labels must be in [0, {model.config.num_classes})")
    return labels.to(_device(model))


def _start(model, n: int, known, known_rows: int) -> torch.Tensor:
    """The canvas (n, C, H, W) int64, with rows < known_rows copied from `known`."""
    cfg = model.config
    x = torch.zeros((n, cfg.in_channels, cfg.height, cfg.width), dtype=torch.long, device=_device(model))
    if not 0 <= known_rows <= cfg.height:
        raise ValueError(f"known_rows must be in [0, {cfg.height}], got {known_rows}")
    if known_rows:
        if known is None:
            raise ValueError("known_rows > 0 needs the known images")
        known = torch.as_tensor(np.asarray(known)).long()
        if tuple(known.shape) != tuple(x.shape):
            raise ValueError(f"known images have shape {tuple(known.shape)}, expected {tuple(x.shape)}")
        if known.min() < 0 or known.max() >= cfg.levels:
            raise ValueError(f"known images must hold levels in [0, {cfg.levels})")
        x[:, :, :known_rows] = known[:, :, :known_rows].to(x.device)
    return x


def autoregress(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, levels: int, rng: np.random.Generator,
                temperature: float, known_rows: int = 0, fixed: torch.Tensor | None = None,
                progress: bool = False, desc: str = "sampling") -> torch.Tensor:
    """Fill canvas x (n, C, H, W) in place from row `known_rows` on, one forward pass per sub-pixel.

    `forward(x)` gives logits (n, C, K, H, W). Pixels where `fixed` (bool (H, W)) is True keep the
    value already in x (the multi-scale grid). Uniforms are drawn for every row.
    """
    n, channels, height, width = x.shape
    for i in tqdm(range(height), desc=desc, unit="row", disable=not progress, leave=False):
        u = draw_row_uniforms(rng, n, channels, width)  # (W, C, n)
        if i < known_rows:
            continue
        for j in range(width):
            if fixed is not None and fixed[i, j]:
                continue
            for c in range(channels):
                logits = forward(x)[:, c, :, i, j]  # (n, K)
                value = sample_from_logits(logits.double().cpu().numpy(), u[j, c], levels, temperature)
                x[:, c, i, j] = torch.from_numpy(value).to(x.device)
    return x


def _sample_single(model, n, rng, temperature, labels, known, known_rows, progress) -> torch.Tensor:
    x = _start(model, n, known, known_rows)
    with _inference(model):
        return autoregress(lambda inp: model(inp, labels), x, model.config.levels, rng, temperature, known_rows, progress=progress)


def _sample_multiscale(model, n, rng, temperature, labels, known, known_rows, progress) -> torch.Tensor:
    """Small image first, then the big one conditioned on it (see training/models/multiscale.py)."""
    f = model.config.factor
    small_known = model.subsample(torch.as_tensor(np.asarray(known))) if known_rows else None
    small_rows = math.ceil(known_rows / f)  # small row r is big row r*f
    small = _sample_single(model.small_model, n, rng, temperature, labels, small_known, small_rows, progress)
    x = _start(model, n, known, known_rows)
    x[:, :, ::f, ::f] = small
    with _inference(model):
        condition = model.condition(small)
        forward = lambda inp: model.big_model(inp, labels, condition=condition)  # noqa: E731
        return autoregress(forward, x, model.config.levels, rng, temperature, known_rows, fixed=model.grid_mask(), progress=progress)


# Architectures whose sampling is not "one model, raster order"; everything else is _sample_single.
SAMPLERS = {"multiscale": _sample_multiscale}


def arch_of(model) -> str | None:
    from training.models import ARCHITECTURES

    return next((name for name, (_, cls) in ARCHITECTURES.items() if type(model) is cls), None)


def sample_reference(model, n: int, seed: int, temperature: float = 1.0, labels=None, known=None,
                     known_rows: int = 0, progress: bool = False) -> np.ndarray:
    """n images uint8 (n, C, H, W) of levels, drawn with the uniform stream of `seed`.

    `labels`: one per image (or one for all) for class-conditional models. `known` (n, C, H, W)
    with `known_rows` > 0: image completion, rows < known_rows are copied, the rest sampled.
    temperature 0 is greedy (argmax) decoding.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    rng = sampling_rng(seed)
    labels = _labels(model, n, labels)
    sampler = SAMPLERS.get(arch_of(model), _sample_single)
    x = sampler(model, n, rng, temperature, labels, known, known_rows, progress)
    return x.cpu().numpy().astype(np.uint8)


def sample_images(model, n: int, seed: int, temperature: float = 1.0, labels=None, known=None,
                  known_rows: int = 0, sampler: str = "auto", device: str = "cpu", progress: bool = False) -> np.ndarray:
    """Sample with the cached row cells (export/cells) when the architecture has them, else (or
    with sampler="reference") with the reference sampler. Both draw the same image per seed."""
    if sampler not in ("auto", "cached", "reference"):
        raise ValueError(f"sampler must be auto, cached or reference, got {sampler!r}")
    model.to(device)
    if sampler != "reference":
        from export.cells import build_cell, sample_cached

        try:
            cell = build_cell(model)
        except ValueError:
            if sampler == "cached":
                raise
        else:
            labels = _labels(model, n, labels)
            _start(model, n, known, known_rows)  # validates the known rows
            rows = getattr(cell, "height", model.config.height) + getattr(getattr(cell, "small", None), "height", 0)
            with tqdm(total=rows, desc="rows", unit="row", disable=not progress) as bar:
                return sample_cached(cell, n, seed, temperature, labels, known, known_rows, device, lambda i: bar.update(1))
    return sample_reference(model, n, seed, temperature, labels, known, known_rows, progress)


# ---------------------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    from training.data_flags import add_data_arguments

    p = argparse.ArgumentParser(prog="python -m training.sample", description=__doc__.split("\n\n")[0])
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
    p.add_argument("--split", default="test", choices=("train", "valid", "test"))
    p.add_argument("--known-rows", type=int, help="rows given to the model (default: half the image)")
    p.add_argument("--k", type=int, default=3, help="completions per example")
    p.add_argument("--sampler", choices=("auto", "cached", "reference"), default="auto",
                   help="cached row cells (fast) or one full pass per sub-pixel (reference); auto = cached where available")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    from training.checkpoint import load_model

    model, ckpt = load_model(args.checkpoint)
    cfg = model.config
    started = time.monotonic()
    if args.complete:
        from training.data import load
        from training.data_flags import data_spec_from_args
        from training.train import check_data_fits

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
