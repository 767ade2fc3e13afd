"""Row cell for the Row LSTM (training/models/row_lstm.py).

A Row LSTM layer's gates at (i, j) are its input-to-state taps on the current row (width 3,
mask B: columns j-1 and j) plus its state-to-state taps on the previous row's hidden state
(columns j-1, j, j+1), and its cell state comes from (i-1, j). Everything from the previous
row is fixed while row i is generated, so the cell runs each layer's state-to-state convolution
once per row (`begin_row`) and per pixel only the current-row taps and the LSTM update at that
column: O(layers * hidden^2) per pixel whatever its row.

State layout (float32, zeros before row 0, matching the model's zero padding and its zero
"row -1" LSTM state), with L = layers:
    rows        (B, C, 3, W)        the scaled input image, last 3 rows (the 7x7 mask-A
                                    convolution's taps above the current row)
    h_0..h_L-1  (B, hidden, W)      layer l's LSTM hidden state of the last finished row
    c_0..c_L-1  (B, hidden, W)      layer l's LSTM cell state of the last finished row
The `h_*` come before the `c_*`. The layers' inputs on the current row (the only other thing a
later pixel reads) live in the per-row context, not in the state.

Why features committed after the last channel's pass are final: the first layer uses mask A,
the input-to-state and 1x1 convolutions mask B, and the LSTM update is element-wise within a
colour group, so nothing at pixel (i, j) reads the channel predicted last (grey: the pixel
itself; RGB: B), and every other channel was already known when that pass ran.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pixelrnn.export.cells.base import RowCell, columns, from_columns, row_taps
from pixelrnn.export.cells.pixelcnn import above_contribution, pointwise
from pixelrnn.training.models.row_lstm import RowLSTM, lstm_update


class _Row:
    """Per-row context: what the rows above contribute, and the row's committed columns."""

    def __init__(self, rows: torch.Tensor, above: torch.Tensor, s2s: list[torch.Tensor], c_prev: tuple[torch.Tensor, ...]):
        self.rows = rows  # (B, C, 3, W)
        # Per-row maps (B, F, W) as their W columns (B, F) (base.columns):
        self.above = columns(above)  # the input convolution's taps on the rows above
        self.s2s = [columns(s) for s in s2s]  # per layer: state-to-state of the previous row + input-to-state bias
        self.c_prev = [columns(c) for c in c_prev]  # per layer: the previous row's cell state
        self.image: list[torch.Tensor] = []  # (B, C) scaled pixel per committed column
        self.inputs: list[list[torch.Tensor]] = [[] for _ in s2s]  # per layer: (B, h) per column
        self.h: list[list[torch.Tensor]] = [[] for _ in s2s]  # per layer: new (B, h) per column
        self.c: list[list[torch.Tensor]] = [[] for _ in s2s]
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # per layer (input, h, c)
        self.condition: torch.Tensor | None = None


class RowLSTMCell(RowCell):
    def __init__(self, model: RowLSTM):
        super().__init__(model)
        self.layers = model.layers
        self.hidden = model.config.hidden
        self.above_rows = model.input_conv.kernel_size[0] // 2

    def state_shapes(self, batch):
        rows = [("rows", (batch, self.channels, self.above_rows, self.width))]
        hs = [(f"h_{l}", (batch, self.hidden, self.width)) for l in range(len(self.layers))]
        cs = [(f"c_{l}", (batch, self.hidden, self.width)) for l in range(len(self.layers))]
        return rows + hs + cs

    def begin_row(self, state, labels):
        n = len(self.layers)
        rows, h_prev, c_prev = state[0], state[1 : 1 + n], state[1 + n :]
        above = above_contribution(self.model.input_conv, rows)
        # The previous row's part of every gate, for the whole row at once (the model's own conv).
        s2s = [layer.state_to_state(h) + layer.input_to_state.bias[:, None] for layer, h in zip(self.layers, h_prev)]
        return _Row(rows, above, s2s, c_prev)

    def pixel(self, ctx: _Row, j, x_pix):
        if ctx.condition is not None:
            raise ValueError("row_lstm takes no per-row condition")
        m: RowLSTM = self.model
        ctx.pending = []
        h = row_taps(m.input_conv, ctx.above[j], ctx.image, self.scale(x_pix))  # (B, hidden)
        for l, layer in enumerate(self.layers):
            gates = row_taps(layer.input_to_state, ctx.s2s[l][j], ctx.inputs[l], h)  # (B, 4h): mask B reads j-1 and j
            h_new, c_new = lstm_update(gates, ctx.c_prev[l][j])
            ctx.pending.append((h, h_new, c_new))
            h = h + pointwise(layer.residual, h_new)
        return pointwise(m.head2, F.relu(pointwise(m.head1, F.relu(h))))  # (B, C*K)

    def commit(self, ctx: _Row, j, x_pix):
        ctx.image.append(self.scale(x_pix))  # the image itself, with every channel now known
        for l, (inp, h, c) in enumerate(ctx.pending):
            ctx.inputs[l].append(inp)
            ctx.h[l].append(h)
            ctx.c[l].append(c)

    def end_row(self, ctx: _Row):
        row = from_columns(ctx.image)[:, :, None]  # (B, C, 1, W)
        rows = torch.cat([ctx.rows[:, :, 1:], row], dim=2)
        hs = [from_columns(cols) for cols in ctx.h]  # (B, h, W) each
        cs = [from_columns(cols) for cols in ctx.c]
        return (rows, *hs, *cs)
