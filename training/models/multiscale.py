"""Multi-Scale PixelRNN (van den Oord et al. 2016, "Pixel Recurrent Neural Networks", section 3.5).

Two networks of any registered single-scale architecture (`base_arch`):
- `small_model`, an unconditional model of the subsampled image s = x[:, :, ::f, ::f]
  (H/f x W/f, f = `factor`);
- `big_model`, a model of the full image conditioned on s: s is preprocessed, nearest-upsampled
  to H x W and passed through an unmasked 3x3 convolution whose output is added to the big
  model's first-layer features (`condition`). That is causal because s is generated first.

Likelihood: s is a deterministic part of x (the pixels on the grid rows and columns that are
multiples of f), so log p(x) = log p_small(s) + sum over the pixels off the grid of
log p_big(x_i | x_<i, s). `forward(x)` returns the big model's logits for the whole image (the
shape every tool expects), but those logits at grid positions are not part of the likelihood:
`nll` computes the correct total, and training must use `model.nll`, not the generic
`nll_nats(model(x), x)`. Note also that `forward(x)` reads the grid pixels of x through s, so it
is not a raster-order causal function of x on its own; only the two parts are.

Sampling runs small then big: sample s with `small_model` (any single-scale sampler), compute
`condition(s)` once, then sample the full image pixel by pixel from
`big_model(x, labels, condition=...)` and overwrite its values at the grid positions with s
(equivalently, copy s's value instead of drawing one there).

Left out from the paper: the paper conditions every layer of the big network on the upsampled
output of a whole conditioning network; here one 3x3 convolution of the upsampled small image
feeds the first layer only. The big model then reads the condition only where its own causal
receptive field reaches, so what an off-grid pixel learns of the grid pixels after it comes
from the 3x3 window: the small-image pixels adjacent to it (below and right included).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from pixelrnn.training import distributions
from pixelrnn.training.models.base import IMAGE_FIELDS, ImageModel, ModelConfig

SHARED_FIELDS = IMAGE_FIELDS + ("num_classes",)  # the multi-scale model's own, given to both parts


@dataclass
class MultiScaleConfig(ModelConfig):
    base_arch: str = "pixelcnn"  # registry name of both parts
    factor: int = 2  # subsampling factor (height and width must be multiples of it)
    hidden: int | None = None  # shared by both parts unless set in small_config / big_config
    layers: int | None = None  # likewise
    small_config: dict = field(default_factory=dict)  # further base_arch fields for the small model
    big_config: dict = field(default_factory=dict)  # further base_arch fields for the big model

    def validate(self) -> None:
        super().validate()
        if self.base_arch == "multiscale":
            raise ValueError("base_arch must be a single-scale architecture")
        if self.factor < 2:
            raise ValueError(f"factor must be at least 2, got {self.factor}")
        if self.height % self.factor or self.width % self.factor:
            raise ValueError(f"image size {self.height}x{self.width} is not a multiple of factor {self.factor}")
        for name, part in (("small_config", self.small_config), ("big_config", self.big_config)):
            fixed = sorted(set(part) & set(SHARED_FIELDS))
            if fixed:
                raise ValueError(f"{name} may not set {', '.join(fixed)}: they follow from the multiscale config")

    def part_fields(self, small: bool) -> dict:
        """Config fields of the small (H/f x W/f) or the big (H x W) model."""
        f = self.factor if small else 1
        fields = dict(
            in_channels=self.in_channels, height=self.height // f, width=self.width // f,
            levels=self.levels, num_classes=self.num_classes,
        )
        fields.update({k: v for k, v in (("hidden", self.hidden), ("layers", self.layers)) if v is not None})
        fields.update(self.small_config if small else self.big_config)
        return fields


class MultiScale(ImageModel):
    def __init__(self, config: MultiScaleConfig):
        super().__init__(config)
        from pixelrnn.training.models import build_model  # the registry imports this module

        self.small_model = build_model(config.base_arch, config.part_fields(small=True))
        self.big_model = build_model(config.base_arch, config.part_fields(small=False))
        if not self.big_model.condition_channels:
            raise ValueError(f"{config.base_arch} does not accept a condition; it cannot be the multiscale base")
        # Unmasked: the small image is known before any pixel of the big one is generated.
        self.condition_conv = nn.Conv2d(config.in_channels, self.big_model.condition_channels, 3, padding=1)

    def subsample(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> the small image (B, C, H/f, W/f)."""
        f = self.config.factor
        return x[:, :, ::f, ::f]

    def grid_mask(self) -> torch.Tensor:
        """Bool (H, W): True at the pixels that belong to the small image."""
        c, f = self.config, self.config.factor
        mask = torch.zeros(c.height, c.width, dtype=torch.bool)
        mask[::f, ::f] = True
        return mask

    def condition(self, small: torch.Tensor) -> torch.Tensor:
        """Small image (B, C, H/f, W/f) integer values -> big-model condition (B, cond, H, W)."""
        f = self.config.factor
        up = self.preprocess(small).repeat_interleave(f, dim=2).repeat_interleave(f, dim=3)  # (B, C, H, W)
        return self.condition_conv(up)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The big model's logits (B, C, K, H, W) given x's own small image; see the module notes."""
        self.check_input(x, labels)
        return self.big_model(x, labels, condition=self.condition(self.subsample(x)))

    def nll(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """-log p_small(s) - sum over off-grid pixels of log p_big(x_i | x_<i, s), nats (B,)."""
        small_nll = self.small_model.nll(self.subsample(x), labels)
        log_p = distributions.log_prob(self(x, labels), x, self.config.levels)  # (B, C, H, W)
        off_grid = (~self.grid_mask()).to(log_p.device)
        return small_nll - (log_p * off_grid).flatten(1).sum(1)

    def pixel_nll(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Per sub-pixel NLL (B, C, H, W): the small model's at the grid pixels (the small image
        is those pixels), the big model's elsewhere; sums to `nll`."""
        f = self.config.factor
        big = -distributions.log_prob(self(x, labels), x, self.config.levels)  # (B, C, H, W)
        small = self.small_model.pixel_nll(self.subsample(x), labels)  # (B, C, H/f, W/f)
        small = small.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3)  # grid pixel (i*f, j*f) = small (i, j)
        grid = self.grid_mask().to(big.device)
        out = torch.where(grid, small, big)
        return out
