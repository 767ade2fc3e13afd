"""Row cell for PixelCNN (cached generation as in Ramachandran et al. 2017, "Fast Generation
for Convolutional Autoregressive Models", done row-wise).

State layout (all float32, zeros before row 0, matching the model's zero padding):
    rows_0          (B, C, R0, W)   the scaled input image, last R0 = input_kernel // 2 rows
    rows_1..rows_L  (B, h, 1, W)    ReLU(h) entering residual block l, last row (3x3 kernel)

Per row, each masked convolution's taps on the rows above are applied once to the whole row
(`above`, a (B, out, W) map, split into columns); per pixel only the taps left of and at the
current pixel run (base.row_taps: one matrix product over the k//2 + 1 window), so a pixel
costs O(layers * h^2 * k) whatever its row.

Why features committed after the last channel's pass are final: the first layer uses mask A,
so no feature at pixel (i, j) reads the channel being predicted last (grey: the pixel itself;
RGB: B), and every other channel was already known when that pass ran.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pixelrnn.export.cells.base import BiasedRow, RowCell, drop_row_axis, from_columns, row_taps
from pixelrnn.training.masks import MaskedConv2d
from pixelrnn.training.models.pixelcnn import PixelCNN


class _Row(BiasedRow):
    """Per-row context: contributions of the rows above (the layers' bias maps), and the row's
    committed columns."""

    def __init__(self, above: list[torch.Tensor], rows: tuple[torch.Tensor, ...]):
        super().__init__(above)  # per spatial layer (B, out, W)
        self.rows = rows
        self.cols: list[list[torch.Tensor]] = [[] for _ in above]  # per layer: (B, Cin) per column
        self.pending: list[torch.Tensor] = []


def above_contribution(conv: MaskedConv2d, rows: torch.Tensor) -> torch.Tensor:
    """Taps of `conv` on the rows above, for a whole row: rows (B, Cin, r, W) -> (B, out, W)."""
    r, p = conv.kernel_size[0] // 2, conv.kernel_size[1] // 2
    w = conv.masked_weight()[:, :, :r, :]
    return drop_row_axis(F.conv2d(F.pad(rows, (p, p, 0, 0)), w, conv.bias))


def pointwise(conv: MaskedConv2d, x: torch.Tensor) -> torch.Tensor:
    """A masked 1x1 convolution at one pixel: (B, Cin) -> (B, out)."""
    return F.linear(x, conv.masked_weight()[:, :, 0, 0], conv.bias)


class PixelCNNCell(RowCell):
    def __init__(self, model: PixelCNN):
        super().__init__(model)
        self.spatial = [model.input_conv, *model.blocks]

    def state_shapes(self, batch):
        return [
            (f"rows_{l}", (batch, conv.in_channels, conv.kernel_size[0] // 2, self.width))
            for l, conv in enumerate(self.spatial)
        ]

    def begin_row(self, state, labels):
        return _Row([above_contribution(conv, rows) for conv, rows in zip(self.spatial, state)], state)

    def _layer(self, ctx: _Row, l: int, j: int, inp: torch.Tensor) -> torch.Tensor:
        ctx.pending.append(inp)
        return row_taps(self.spatial[l], ctx.bias(l, j), ctx.cols[l], inp)

    def pixel(self, ctx, j, x_pix):
        m: PixelCNN = self.model
        ctx.pending = []
        h = self._layer(ctx, 0, j, self.scale(x_pix))  # (B, h)
        for l in range(1, len(self.spatial)):
            h = h + self._layer(ctx, l, j, F.relu(h))
        return pointwise(m.head2, F.relu(pointwise(m.head1, F.relu(h))))  # (B, C*K)

    def commit(self, ctx, j, x_pix):
        ctx.cols[0].append(self.scale(x_pix))  # the image itself, with every channel now known
        for l in range(1, len(self.spatial)):
            ctx.cols[l].append(ctx.pending[l])

    def end_row(self, ctx):
        new = []
        for rows, cols in zip(ctx.rows, ctx.cols):
            row = from_columns(cols)[:, :, None]  # (B, Cin, 1, W)
            new.append(torch.cat([rows[:, :, 1:], row], dim=2) if rows.shape[2] > 1 else row)
        return tuple(new)
