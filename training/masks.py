"""Masked convolutions: the causal building block of PixelCNN and PixelRNN.

Pixels are generated in raster order (row by row, left to right) and, inside a pixel, channel
by channel R -> G -> B. A masked kernel may read every tap strictly above the centre row, the
taps left of the centre on the centre row, and at the centre tap only the colour groups that
come earlier (mask A) or earlier-or-equal (mask B). For a 5x5 kernel and one colour group:

    mask A            mask B
    1 1 1 1 1         1 1 1 1 1
    1 1 1 1 1         1 1 1 1 1
    1 1 0 0 0         1 1 1 0 0
    0 0 0 0 0         0 0 0 0 0
    0 0 0 0 0         0 0 0 0 0

With colour, every feature map is split into contiguous R, G, B groups (the paper's grouping):
at the centre tap, output group g reads input group g' only if g' < g (A) or g' <= g (B). The
first layer uses mask A on the raw image (one channel per group); every later layer mask B.

A kernel of height 1 gives the masked 1-D convolution along a row used by the Row LSTM.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def channel_groups(n_channels: int, n_groups: int) -> torch.Tensor:
    """Colour group (0=R, 1=G, 2=B) of each of `n_channels` features, in contiguous blocks."""
    if n_channels % n_groups:
        raise ValueError(f"{n_channels} channels cannot be split into {n_groups} colour groups")
    return torch.arange(n_groups).repeat_interleave(n_channels // n_groups)


def causal_mask(
    mask_type: str,
    kernel_size: tuple[int, int],
    in_groups: torch.Tensor,
    out_groups: torch.Tensor,
) -> torch.Tensor:
    """Mask of shape (out, in, kh, kw) for a kernel centred on the current pixel.

    `in_groups` / `out_groups` give the colour group of every input / output channel.
    """
    if mask_type not in ("A", "B"):
        raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
    kh, kw = kernel_size
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"masked kernels need odd sizes to have a centre, got {kernel_size}")
    cy, cx = kh // 2, kw // 2
    mask = torch.zeros(len(out_groups), len(in_groups), kh, kw)
    mask[:, :, :cy, :] = 1  # rows above
    mask[:, :, cy, :cx] = 1  # left on the current row
    out_g = out_groups[:, None]
    in_g = in_groups[None, :]
    centre = (in_g < out_g) if mask_type == "A" else (in_g <= out_g)
    mask[:, :, cy, cx] = centre.float()
    return mask


class MaskedConv2d(nn.Conv2d):
    """Same-size convolution whose kernel is multiplied by a fixed causal mask.

    The mask multiplies the weight inside forward (conv2d(x, w * mask)), so the masked taps get
    zero gradient and can never leak, whatever an optimizer or a weight load does to them.
    `out_groups` overrides the default contiguous grouping of the output channels (the LSTM
    gates tile R, G, B once per gate).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        mask_type: str,
        colour_groups: int = 1,
        bias: bool = True,
        out_groups: torch.Tensor | None = None,
        in_groups: torch.Tensor | None = None,
    ):
        ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        super().__init__(in_channels, out_channels, ks, padding=(ks[0] // 2, ks[1] // 2), bias=bias)
        self.mask_type = mask_type
        if in_groups is None:
            in_groups = channel_groups(in_channels, colour_groups)
        if out_groups is None:
            out_groups = channel_groups(out_channels, colour_groups)
        self.register_buffer("mask", causal_mask(mask_type, ks, in_groups, out_groups), persistent=False)

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.masked_weight(), self.bias, padding=self.padding)


class MaskedConv1dRow(MaskedConv2d):
    """Masked 1-D convolution along each row (a 1 x k kernel): the Row LSTM's input-to-state."""

    def __init__(self, in_channels: int, out_channels: int, width: int, mask_type: str, **kw):
        super().__init__(in_channels, out_channels, (1, width), mask_type, **kw)
