"""Gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders").

Two stacks per layer remove the PixelCNN blind spot:
- the vertical stack, a (k//2+1) x k convolution padded on top, whose features at row i cover
  rows <= i (every column in reach); it is shifted down one row before it reaches the
  horizontal stack, so what the current pixel receives from it covers rows strictly above;
- the horizontal stack, a masked 1 x k convolution along the current row (pixels left of the
  current one, and at the current pixel the earlier colour groups: mask A in the first layer,
  mask B after), plus the shifted vertical features through a 1x1 convolution, plus a residual
  connection (from the second layer on).
Both use the gated unit tanh(a) * sigmoid(b). Class-conditional models add a learned per-layer
embedding of the label to the gate pre-activations of both stacks.

Left out from the paper: the skip connections of the horizontal stack and the conditioning on a
general latent vector (only class labels). The first layer uses the same kernel as the others
rather than a larger one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelrnn.training.masks import MaskedConv2d, channel_groups
from pixelrnn.training.models.base import ImageModel, ModelConfig


@dataclass
class GatedPixelCNNConfig(ModelConfig):
    hidden: int = 36  # features per stack (a multiple of 3 for RGB)
    layers: int = 6  # gated layers (each one vertical + one horizontal step)
    kernel: int = 5  # odd; vertical kernel (k//2+1) x k, horizontal kernel 1 x k (masked to k//2+1 taps)
    dropout: float = 0.0  # on each layer's gated horizontal features, in training only (a regulariser)

    def validate(self) -> None:
        super().validate()
        if self.hidden < 1 or self.hidden % self.in_channels:
            raise ValueError(f"hidden must be a positive multiple of in_channels={self.in_channels}, got {self.hidden}")
        if self.layers < 1:
            raise ValueError(f"layers must be at least 1, got {self.layers}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd, got {self.kernel}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def gate(pre: torch.Tensor) -> torch.Tensor:
    """(B, 2h, H, W) pre-activations [a | b] -> (B, h, H, W) tanh(a) * sigmoid(b)."""
    # Split at a constant: chunk(2) exports to ONNX as shape arithmetic (Shape, Gather, Add, Div,
    # Mul) before its Split, run at every pixel of every layer in a row cell.
    a, b = pre.split(int(pre.shape[1]) // 2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


def shift_down(v: torch.Tensor) -> torch.Tensor:
    """Move every row one down (zeros on top): row i then holds what row i-1 held."""
    return F.pad(v, (0, 0, 1, 0))[:, :, :-1]


class GatedLayer(nn.Module):
    """One layer of both stacks. A row-by-row cell can call `vertical` on a window of the last
    k//2+1 rows of its vertical input and `horizontal` on the current row, with the same weights."""

    def __init__(self, in_channels: int, hidden: int, kernel: int, mask_type: str, groups: int, num_classes: int, residual: bool,
                 dropout: float = 0.0):
        super().__init__()
        self.pad = kernel // 2
        # tanh channel k and sigmoid channel k must share a colour group so the product stays causal.
        gate_groups = channel_groups(hidden, groups).repeat(2)
        # The vertical stack needs no mask: it only ever reaches the current pixel shifted one row down.
        self.v_conv = nn.Conv2d(in_channels, 2 * hidden, (self.pad + 1, kernel))
        self.h_conv = MaskedConv2d(
            in_channels, 2 * hidden, (1, kernel), mask_type,
            in_groups=channel_groups(in_channels, groups), out_groups=gate_groups,
        )
        # Carries rows strictly above the current pixel (any colour is earlier), so it is unmasked.
        self.v_to_h = nn.Conv2d(2 * hidden, 2 * hidden, 1)
        self.h_out = MaskedConv2d(hidden, hidden, 1, "B", colour_groups=groups)
        self.embed = nn.Embedding(num_classes, 2 * hidden) if num_classes else None
        self.residual = residual
        # Elementwise, so it keeps the masks' causality; identity in eval mode, so the row cells and
        # the exported graphs (built from an eval model) never see it.
        self.drop = nn.Dropout(dropout)

    def vertical(self, v: torch.Tensor) -> torch.Tensor:
        """Vertical pre-activations (B, 2h, H, W): row i from input rows i-k//2 .. i."""
        return self.v_conv(F.pad(v, (self.pad, self.pad, self.pad, 0)))

    def horizontal(self, h: torch.Tensor, v_above: torch.Tensor, bias: torch.Tensor | float) -> torch.Tensor:
        """Next horizontal features from this row's input `h` and the shifted vertical pre-activations."""
        out = self.h_out(self.drop(gate(self.h_conv(h) + self.v_to_h(v_above) + bias)))
        return out + h if self.residual else out

    def forward(self, v: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """`bias`: label embedding and/or condition, broadcastable to (B, 2h, H, W)."""
        v_pre = self.vertical(v)
        h_next = self.horizontal(h, shift_down(v_pre), bias)
        return gate(v_pre + bias), h_next


class GatedPixelCNN(ImageModel):
    def __init__(self, config: GatedPixelCNNConfig):
        super().__init__(config)
        c, hid, g = config.in_channels, config.hidden, config.in_channels
        self.layers = nn.ModuleList(
            GatedLayer(c if i == 0 else hid, hid, config.kernel, "A" if i == 0 else "B", g, config.num_classes, residual=i > 0,
                       dropout=config.dropout)
            for i in range(config.layers)
        )
        self.head1 = MaskedConv2d(hid, hid, 1, "B", colour_groups=g)
        self.head2 = MaskedConv2d(hid, c * self.k, 1, "B", colour_groups=g)
        # A `condition` (B, 2h, H, W) is added to the first layer's gate pre-activations of both stacks.
        self.condition_channels = 2 * hid

    def check_labels(self, labels: torch.Tensor | None, batch: int) -> None:
        n = self.config.num_classes
        if not n:
            return
        if labels.shape != (batch,) or labels.is_floating_point():
            raise ValueError(f"labels must be an integer tensor of shape ({batch},), got {labels.dtype} {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n):
            raise ValueError(f"labels must lie in [0, {n}), got values in [{int(labels.min())}, {int(labels.max())}]")

    def layer_bias(self, i: int, labels: torch.Tensor | None, condition: torch.Tensor | None) -> torch.Tensor | float:
        """What layer i adds to its gate pre-activations: label embedding (+ condition in layer 0)."""
        layer = self.layers[i]
        bias = 0.0
        if layer.embed is not None:
            bias = layer.embed(labels)[:, :, None, None]  # (B, 2h, 1, 1): same for every pixel
        if i == 0 and condition is not None:
            bias = bias + condition
        return bias

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, condition: torch.Tensor | None = None) -> torch.Tensor:
        """Unconditional models ignore `labels`. `condition`: see `condition_channels`."""
        self.check_input(x, labels)
        self.check_labels(labels, x.shape[0])
        if condition is not None and tuple(condition.shape) != (x.shape[0], self.condition_channels, *x.shape[2:]):
            raise ValueError(f"condition must have shape (B, {self.condition_channels}, H, W), got {tuple(condition.shape)}")
        v = h = self.preprocess(x)  # (B, C, H, W)
        for i, layer in enumerate(self.layers):
            v, h = layer(v, h, self.layer_bias(i, labels, condition))  # (B, hidden, H, W) each
        out = self.head2(F.relu(self.head1(F.relu(h))))  # (B, C*K, H, W)
        return self.to_logits(out)
