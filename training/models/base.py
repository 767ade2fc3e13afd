"""What every image model shares: its image spec, input scaling, and the likelihood API.

A model maps integer images x (B, C, H, W) with values in [0, levels) to logits
(B, C, K, H, W) (see training.distributions). The scaling of pixel values to network inputs
lives here, in `preprocess`, and nowhere else: training, evaluation and every sampler call the
model (or cells built from its layers) on raw integer values, so they cannot disagree on scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from pixelrnn.training import distributions

# The image spec of every ModelConfig: set by the data, and not recoverable from a model's weights.
IMAGE_FIELDS = ("in_channels", "height", "width", "levels")


@dataclass
class ModelConfig:
    in_channels: int = 1  # 1 (grey) or 3 (RGB, generated R -> G -> B)
    height: int = 28
    width: int = 28
    levels: int = 2  # 2: Bernoulli (sigmoid) head; otherwise a `levels`-way softmax per channel
    num_classes: int = 0  # > 0: class-conditional (labels in [0, num_classes))

    def validate(self) -> None:
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.levels < 2 or self.levels > 256:
            raise ValueError(f"levels must be in [2, 256], got {self.levels}")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"image size must be positive, got {self.height}x{self.width}")


class ImageModel(nn.Module):
    config: ModelConfig
    # > 0: forward(x, labels, condition=...) accepts a feature map (B, condition_channels, H, W)
    # computed from an input known before x (the multi-scale model's small image) and adds it to
    # its first layer's features; it must not be computed from x itself.
    condition_channels: int = 0

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config

    @property
    def k(self) -> int:
        return distributions.logits_per_channel(self.config.levels)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Integer pixel values -> network inputs in [-1, 1]. Differentiable for float x."""
        if not x.is_floating_point():
            x = x.to(torch.get_default_dtype())
        return x / (self.config.levels - 1) * 2 - 1

    def to_logits(self, out: torch.Tensor) -> torch.Tensor:
        """Final feature map (B, C*K, H, W) in R, G, B group order -> logits (B, C, K, H, W)."""
        b, _, h, w = out.shape
        return out.view(b, self.config.in_channels, self.k, h, w)

    def check_input(self, x: torch.Tensor, labels: torch.Tensor | None) -> None:
        c = self.config
        if x.dim() != 4 or tuple(x.shape[1:]) != (c.in_channels, c.height, c.width):
            raise ValueError(f"expected images of shape (B, {c.in_channels}, {c.height}, {c.width}), got {tuple(x.shape)}")
        if c.num_classes and labels is None:
            raise ValueError("this model is class-conditional: labels are required")

    def nll(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Per-image negative log-likelihood in nats, (B,)."""
        return distributions.nll_nats(self(x, labels), x, self.config.levels)

    def pixel_nll(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """-log p of each sub-pixel given those before it, nats (B, C, H, W): where in the image
        the model was surprised. Sums over (C, H, W) to `nll`."""
        return -distributions.log_prob(self(x, labels), x, self.config.levels)

    @property
    def dims(self) -> int:
        return self.config.in_channels * self.config.height * self.config.width
