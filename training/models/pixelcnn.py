"""PixelCNN (van den Oord et al. 2016, "Pixel Recurrent Neural Networks", section 3.4).

7x7 mask-A convolution, residual blocks of 3x3 mask-B convolutions, then ReLU + 1x1 mask-B
convolution twice into the output head. Left out from the paper: nothing structural; the paper
used 15 layers and h = 128 on 32x32 images, the defaults here are sized for a 2-core CPU.

The receptive field has the well-known blind spot above-right of each pixel (see the Gated
PixelCNN for the fix).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelrnn.training.masks import MaskedConv2d
from pixelrnn.training.models.base import ImageModel, ModelConfig


@dataclass
class PixelCNNConfig(ModelConfig):
    hidden: int = 48  # features per layer (a multiple of 3 for RGB)
    layers: int = 8  # residual 3x3 mask-B blocks
    input_kernel: int = 7  # mask-A first layer
    kernel: int = 3  # mask-B residual layers


def masked_conv_upper(conv: MaskedConv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x), computed without the kernel rows below the centre, which the causal mask zeroes.

    A speed-up, same weights and result (to float rounding): a 3x3 mask-B kernel runs as 2x3,
    two thirds of the arithmetic, and the 7x7 input kernel as 4x7. The convolutions are most of
    a training step and run near the CPU's peak, so fewer multiplications is what makes it faster.
    Padded top and bottom as before, output row r reads input rows r - kh//2 .. r, so the rows
    past H (which would read the bottom padding) are dropped.
    """
    top = conv.kernel_size[0] // 2
    weight = conv.masked_weight()[:, :, : top + 1]
    return F.conv2d(x, weight, conv.bias, padding=conv.padding)[:, :, : x.shape[2]]


class PixelCNN(ImageModel):
    def __init__(self, config: PixelCNNConfig):
        super().__init__(config)
        if config.num_classes:
            raise ValueError("pixelcnn is unconditional; use gated_pixelcnn for class labels")
        c, h, g = config.in_channels, config.hidden, config.in_channels
        self.input_conv = MaskedConv2d(c, h, config.input_kernel, "A", colour_groups=g)
        self.blocks = nn.ModuleList(MaskedConv2d(h, h, config.kernel, "B", colour_groups=g) for _ in range(config.layers))
        self.head1 = MaskedConv2d(h, h, 1, "B", colour_groups=g)
        self.head2 = MaskedConv2d(h, c * self.k, 1, "B", colour_groups=g)
        self.condition_channels = h  # added to the first layer's features

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, condition: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, labels)
        h = masked_conv_upper(self.input_conv, self.preprocess(x))  # (B, h, H, W): self.input_conv(...)
        if condition is not None:
            h = h + condition
        for block in self.blocks:
            h = h + masked_conv_upper(block, F.relu(h))  # block(F.relu(h)), faster
        out = self.head2(F.relu(self.head1(F.relu(h))))  # (B, C*K, H, W)
        return self.to_logits(out)
