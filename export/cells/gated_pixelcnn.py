"""Row cell for the Gated PixelCNN (training/models/gated_pixelcnn.py).

The vertical stack at row i reads only rows <= i, and the horizontal stack receives it shifted
one row down, so while row i is being generated everything the vertical stack contributes is
already fixed. The cell therefore runs the vertical stack once per row, for the row just
finished (in `end_row`, every layer in turn: layer l's vertical input row is layer l-1's gated
vertical output row), and keeps its pre-activations for the next row. Per pixel only the
horizontal stack runs: its 1 x (k//2+1) taps on the current row, plus the vertical link at that
column, through the gate, h_out and the residual.

State layout (float32, zeros before row 0, matching the model's zero padding), for each
layer l = 0 .. L-1 with p = kernel // 2:
    v_rows_l   (B, Cin_l, p, W)   layer l's vertical input, the last p finished rows (the rows
                                   its (p+1) x k convolution still reads besides the next one);
                                   Cin_0 = C (the scaled image), Cin_l = hidden after
    v_pre_l    (B, 2*hidden, W)   layer l's vertical pre-activations of the last finished row,
                                   i.e. shift_down(v_pre) for the next row (zeros for row 0)
The `v_rows_*` come first, then the `v_pre_*`.

Per-row bias: class labels (B,) go through each layer's own embedding into both stacks' gates,
and `ctx.condition` (B, 2*hidden, W), when set after `begin_row`, is added to layer 0's gates of
both stacks for this row (the multi-scale big model's condition, see export/cells/multiscale.py).

Why features committed after the last channel's pass are final: the first horizontal layer
uses mask A, so no feature at pixel (i, j) reads the channel predicted last (grey: the pixel
itself; RGB: B), the other channels were known when that pass ran, and the vertical stack never
reads the current row.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pixelrnn.export.cells.base import BiasedRow, RowCell, drop_row_axis, from_columns, row_taps
from pixelrnn.export.cells.pixelcnn import pointwise
from pixelrnn.training.models.gated_pixelcnn import GatedPixelCNN, gate


class _Row(BiasedRow):
    """Per-row context: what the horizontal stack adds at every column (the layers' bias maps),
    and the committed columns."""

    def __init__(self, state: tuple[torch.Tensor, ...], h_bias: list[torch.Tensor], embeds: list[torch.Tensor | None]):
        super().__init__(h_bias)  # per layer (B, 2h, W): vertical link + h_conv bias + label embedding
        n = len(h_bias)
        self.v_rows, self.v_pre = state[:n], state[n:]
        self.embeds = embeds  # per layer (B, 2h) or None
        self.cols: list[list[torch.Tensor]] = [[] for _ in range(n)]  # per layer: (B, Cin) per column
        self.pending: list[torch.Tensor] = []


class GatedPixelCNNCell(RowCell):
    def __init__(self, model: GatedPixelCNN):
        super().__init__(model)
        self.layers = model.layers
        self.pad = model.config.kernel // 2

    def state_shapes(self, batch):
        rows = [(f"v_rows_{l}", (batch, layer.v_conv.in_channels, self.pad, self.width)) for l, layer in enumerate(self.layers)]
        pre = [(f"v_pre_{l}", (batch, layer.v_conv.out_channels, self.width)) for l, layer in enumerate(self.layers)]
        return rows + pre

    def begin_row(self, state, labels):
        n = len(self.layers)
        embeds = [layer.embed(labels) if layer.embed is not None else None for layer in self.layers]
        h_bias = []
        for layer, v_pre, emb in zip(self.layers, state[n:], embeds):
            b = drop_row_axis(layer.v_to_h(v_pre[:, :, None])) + layer.h_conv.bias[:, None]  # (B, 2h, W)
            h_bias.append(b if emb is None else b + emb[:, :, None])
        return _Row(state, h_bias, embeds)

    def pixel(self, ctx: _Row, j, x_pix):
        m: GatedPixelCNN = self.model
        ctx.pending = []
        h = self.scale(x_pix)  # (B, C)
        for l, layer in enumerate(self.layers):
            ctx.pending.append(h)
            pre = row_taps(layer.h_conv, ctx.bias(l, j), ctx.cols[l], h)  # (B, 2h)
            out = pointwise(layer.h_out, gate(pre))  # (B, h)
            h = out + h if layer.residual else out
        return pointwise(m.head2, F.relu(pointwise(m.head1, F.relu(h))))  # (B, C*K)

    def commit(self, ctx: _Row, j, x_pix):
        ctx.cols[0].append(self.scale(x_pix))  # the image itself, with every channel now known
        for l in range(1, len(self.layers)):
            ctx.cols[l].append(ctx.pending[l])

    def end_row(self, ctx: _Row):
        """Run the vertical stack on the finished row: new cached rows and pre-activations."""
        v = from_columns(ctx.cols[0])  # (B, C, W): layer 0's vertical input is the image
        new_rows, new_pre = [], []
        for l, layer in enumerate(self.layers):
            rows = torch.cat([ctx.v_rows[l], v[:, :, None]], dim=2)  # (B, Cin, p+1, W)
            v_pre = drop_row_axis(layer.v_conv(F.pad(rows, (self.pad, self.pad, 0, 0))))  # (B, 2h, W)
            new_rows.append(rows[:, :, 1:])
            new_pre.append(v_pre)
            if l + 1 < len(self.layers):  # the last layer's gated vertical output is never read
                if ctx.embeds[l] is not None:
                    v_pre = v_pre + ctx.embeds[l][:, :, None]
                if l == 0 and ctx.condition is not None:
                    v_pre = v_pre + ctx.condition
                v = gate(v_pre)  # (B, h, W)
        return (*new_rows, *new_pre)
