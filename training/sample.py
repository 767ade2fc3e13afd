"""Reference sampler: one full forward pass per sub-pixel. Slow, but obviously right.

Sub-pixels are generated in raster order, R -> G -> B inside a pixel; the value of sub-pixel
(c, i, j) is drawn from the model's logits[:, c, :, i, j] given everything generated so far. The
model is always called on raw integer levels (its `preprocess` does the scaling, exactly as in
training). Randomness is the project-wide stream (runtime/randomness.py): one
`draw_row_uniforms` per image row, also for rows that are copied instead of drawn, so a
completion from k known rows consumes the stream exactly like a full sample would; the fast
samplers built later must match this function draw for draw.

Multi-scale models (arch "multiscale") sample the small image first with their `small_model`,
then the big image from `big_model(x, labels, condition=condition(small))`, copying the small
image's values at the grid positions; their uniform stream is: the small image's rows, then the
big image's rows.

The sampling command line (`python -m pixelrnn.export.sample`) lives with the cached row cells in
export/, which this module, upstream of them, does not import.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from pixelrnn.runtime.randomness import draw_row_uniforms, sample_from_logits, sampling_rng


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


def labels_tensor(model, n: int, labels) -> torch.Tensor | None:
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


def known_canvas(model, n: int, known, known_rows: int) -> torch.Tensor:
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
    x = known_canvas(model, n, known, known_rows)
    with _inference(model):
        return autoregress(lambda inp: model(inp, labels), x, model.config.levels, rng, temperature, known_rows, progress=progress)


def _sample_multiscale(model, n, rng, temperature, labels, known, known_rows, progress) -> torch.Tensor:
    """Small image first, then the big one conditioned on it (see training/models/multiscale.py)."""
    f = model.config.factor
    small_known = model.subsample(torch.as_tensor(np.asarray(known))) if known_rows else None
    small_rows = math.ceil(known_rows / f)  # small row r is big row r*f
    small = _sample_single(model.small_model, n, rng, temperature, labels, small_known, small_rows, progress)
    x = known_canvas(model, n, known, known_rows)
    x[:, :, ::f, ::f] = small
    with _inference(model):
        condition = model.condition(small)
        forward = lambda inp: model.big_model(inp, labels, condition=condition)  # noqa: E731
        return autoregress(forward, x, model.config.levels, rng, temperature, known_rows, fixed=model.grid_mask(), progress=progress)


# Architectures whose sampling is not "one model, raster order"; everything else is _sample_single.
SAMPLERS = {"multiscale": _sample_multiscale}


def arch_of(model) -> str | None:
    from pixelrnn.training.models import ARCHITECTURES

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
    labels = labels_tensor(model, n, labels)
    sampler = SAMPLERS.get(arch_of(model), _sample_single)
    x = sampler(model, n, rng, temperature, labels, known, known_rows, progress)
    return x.cpu().numpy().astype(np.uint8)
