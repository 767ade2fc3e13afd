"""Causality harness: does any logit see its own pixel, a later channel, or a later pixel?

For an autoregressive image model the logits of sub-pixel (c, i, j) may depend only on pixels
strictly before (i, j) in raster order and, at (i, j) itself, on channels before c (R -> G -> B).
The harness measures the real dependency structure by the Jacobian: for every output sub-pixel
it back-propagates a random projection of its logits to the input image (float64, several random
images, so no dependency hides behind a dead ReLU or a lucky cancellation) and records which
input sub-pixels received a non-zero gradient. It works on any model that maps a float image
(B, C, H, W) to logits (B, C, K, H, W); conditioning inputs can be closed over by the caller.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch

CHANNEL_NAMES = {1: ["grey"], 3: ["R", "G", "B"]}


@dataclass
class CausalityReport:
    depends: torch.Tensor  # bool (C, H, W, C, H, W): out sub-pixel -> in sub-pixel
    allowed: torch.Tensor  # bool, same shape: what an autoregressive model may read

    @property
    def violations(self) -> torch.Tensor:
        return self.depends & ~self.allowed

    @property
    def ok(self) -> bool:
        return not bool(self.violations.any())

    def sees(self, out: tuple[int, int, int], inp: tuple[int, int, int]) -> bool:
        """Whether the logits of sub-pixel `out` (c, i, j) depend on input sub-pixel `inp`."""
        return bool(self.depends[out + inp])

    def describe(self, limit: int = 5) -> str:
        bad = self.violations.nonzero().tolist()
        if not bad:
            return "causal: no logit depends on its own or a later sub-pixel"
        names = CHANNEL_NAMES.get(self.depends.shape[0], [str(c) for c in range(self.depends.shape[0])])
        lines = [f"{len(bad)} causality violations, e.g.:"]
        for c, i, j, c2, i2, j2 in bad[:limit]:
            lines.append(f"  logits of pixel ({i},{j}) channel {names[c]} depend on pixel ({i2},{j2}) channel {names[c2]}")
        return "\n".join(lines)


def allowed_dependencies(channels: int, height: int, width: int) -> torch.Tensor:
    pos = torch.arange(height * width)
    earlier_pixel = pos[None, :] < pos[:, None]  # (out, in)
    same_pixel = pos[None, :] == pos[:, None]
    ch = torch.arange(channels)
    earlier_channel = ch[None, :] < ch[:, None]  # (out, in)
    allowed = earlier_pixel[None, :, None, :] | (same_pixel[None, :, None, :] & earlier_channel[:, None, :, None])
    # (C_out, P_out, C_in, P_in) -> (C, H, W, C, H, W)
    return allowed.reshape(channels, height, width, channels, height, width)


def measure_dependencies(
    model_fn: Callable[[torch.Tensor], torch.Tensor],
    channels: int,
    height: int,
    width: int,
    levels: int,
    n_images: int = 3,
    seed: int = 0,
    tol: float = 1e-12,
) -> CausalityReport:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, (n_images, channels, height, width), generator=gen).double()
    x.requires_grad_(True)
    logits = model_fn(x)
    if logits.dim() != 5 or logits.shape[:2] != (n_images, channels) or logits.shape[3:] != (height, width):
        raise ValueError(f"model returned logits of shape {tuple(logits.shape)}, expected (B, {channels}, K, {height}, {width})")
    proj = torch.randn(logits.shape[2], generator=gen, dtype=torch.float64)
    depends = torch.zeros(channels, height, width, channels, height, width, dtype=torch.bool)
    for c in range(channels):
        for i in range(height):
            for j in range(width):
                target = (logits[:, c, :, i, j] * proj).sum()
                (grad,) = torch.autograd.grad(target, x, retain_graph=True, allow_unused=True)
                if grad is not None:
                    depends[c, i, j] = grad.abs().sum(0) > tol
    return CausalityReport(depends, allowed_dependencies(channels, height, width))


def check_model(
    model: torch.nn.Module, channels: int, height: int, width: int, levels: int, labels: torch.Tensor | None = None, **kw
) -> CausalityReport:
    """Harness for a project model (forward(x_float, labels) -> logits), run on a float64 copy.

    `labels` (class-conditional models) must hold one label per probe image (n_images).
    """
    probe = copy.deepcopy(model).double().eval()
    if labels is None:
        return measure_dependencies(lambda x: probe(x), channels, height, width, levels, **kw)
    return measure_dependencies(lambda x: probe(x, labels), channels, height, width, levels, **kw)
