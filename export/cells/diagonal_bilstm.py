"""Row cell for the Diagonal BiLSTM (training/models/diagonal_bilstm.py).

What each direction reads, from the model's skew and its 2x1 state-to-state convolution: skewed
column k holds pixel (i, k-i) in row i, and the top-padded 2x1 convolution gives row i of column
k the previous column's rows i-1 and i, i.e. the pixels (i-1, j) (above) and (i, j-1) (left),
while the cell state c comes element-wise from the previous column's row i, the left
neighbour. So, unskewed, the left-to-right (LTR) LSTM is

    gates(i, j) = input_to_state(x)(i, j) + state_to_state([h(i-1, j), h(i, j-1)])
    c(i, j) = f * c(i, j-1) + ... ;   h(i, -1) = c(i, -1) = 0 and h(-1, j) = 0

(skewed positions left of the image see only zeros and stay exactly zero; those right of it only
feed each other). The right-to-left (RTL) LSTM is the same on the mirrored row: it reads
(i-1, j) and (i, j+1), with c from (i, j+1). The layer adds shift_down(RTL), the RTL state of
row i-1, to the LTR state at row i.

Hence, in raster order: per pixel, each layer's LTR update from the previous row's LTR h at
column j (state) and this row's LTR (h, c) at j-1 (committed earlier in the row), plus the RTL
h of the previous row at column j (state). Once row i is finished (`end_row`), each layer's
RTL pass for row i sweeps j from W-1 down to 0 over the layer's inputs of the whole row
(collected per pixel; layer l's input is layer l-1's output) and the RTL h of row i-1, and its
h becomes the state for row i+1. Neither direction needs the previous row's c: c only flows
along a row. Per pixel the work is O(layers * hidden^2), plus the same again per pixel at
end_row for the RTL sweep, whatever the row.

State layout (float32, zeros before row 0, matching the model's zero padding, its zero
"column -1" state and shift_down's zero row), with L = layers:
    rows          (B, C, 3, W)     the scaled input image, last 3 rows (the 7x7 mask-A
                                   convolution's taps above the current row)
    ltr_h_0..L-1  (B, hidden, W)   layer l's LTR hidden state of the last finished row
    rtl_h_0..L-1  (B, hidden, W)   layer l's RTL hidden state of the last finished row: both
                                   what the current row adds (the shift down) and the "above"
                                   input of the next RTL sweep
The `ltr_h_*` come before the `rtl_h_*`.

Why features committed after the last channel's pass are final: the first layer uses mask A,
the input-to-state and 1x1 convolutions mask B, the LSTM update is element-wise within a colour
group and the state-to-state taps read only other pixels, so nothing at pixel (i, j) reads the
channel predicted last (grey: the pixel itself; RGB: B).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pixelrnn.export.cells.base import RowCell, columns, drop_row_axis, from_columns, row_taps
from pixelrnn.export.cells.pixelcnn import above_contribution, pointwise
from pixelrnn.training.models.diagonal_bilstm import DiagonalBiLSTM, DiagonalLSTM
from pixelrnn.training.models.row_lstm import lstm_update


def above_gates(lstm: DiagonalLSTM, h_above: torch.Tensor, x_is: torch.Tensor) -> list[torch.Tensor]:
    """What a whole row's gates get from the row above, as W columns (B, 4h): the state-to-state
    tap on the pixel above (the model's 2x1 convolution's first tap, see the docstring) applied
    to h_above (B, h, W) at once, plus x_is, the input-to-state part known for the whole row
    ((B, 4h, W), or its bias (4h, 1) when it is computed per pixel)."""
    tap_above = lstm.state_to_state.weight[:, :, :1]  # (4h, h, 1)
    return columns(F.conv1d(h_above, tap_above) + x_is)


def diagonal_step(lstm: DiagonalLSTM, gates_above: torch.Tensor, x: torch.Tensor | None, h_side, c_side):
    """One pixel of one direction -> (h, c), each (B, h). gates_above (B, 4h) from above_gates;
    x (B, h): the layer input when the input-to-state part is not in gates_above yet (else None);
    (h_side, c_side): the state of the pixel beside (None at the row's first pixel: zeros).

    The input-to-state weights and the state-to-state tap on the pixel beside act on the
    concatenation [x, h_side] as one matrix product (one Gemm in the graph)."""
    parts, weights = [], []
    if x is not None:
        parts.append(x)
        weights.append(lstm.input_to_state.masked_weight()[:, :, 0, 0])  # (4h, h)
    if h_side is not None:
        parts.append(h_side)
        weights.append(lstm.state_to_state.weight[:, :, 1])  # (4h, h): the tap beside
    gates = gates_above
    if parts:
        gates = torch.addmm(gates_above, torch.cat(parts, dim=1), torch.cat(weights, dim=1).t())
    return lstm_update(gates, torch.zeros_like(gates_above[:, : lstm.hidden]) if c_side is None else c_side)


class _Row:
    """Per-row context: the previous row's states, and the row's committed columns."""

    def __init__(self, rows: torch.Tensor, above: torch.Tensor, ltr_gates, rtl_prev):
        self.rows = rows  # (B, C, 3, W)
        self.above = columns(above)  # (B, hidden) per column: the input convolution's taps on the rows above
        self.rtl_prev = rtl_prev  # per layer (B, h, W): the previous row's RTL states
        self.rtl_cols = [columns(r) for r in rtl_prev]  # the same, per column (the shift down)
        self.ltr_gates = ltr_gates  # per layer, per column (B, 4h): above_gates of the LTR direction
        n = len(ltr_gates)
        self.image: list[torch.Tensor] = []  # (B, C) scaled pixel per committed column
        self.inputs: list[list[torch.Tensor]] = [[] for _ in range(n)]  # per layer: (B, h) per column
        self.ltr: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(n)]  # per layer: (h, c)
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # per layer (input, h, c)
        self.condition: torch.Tensor | None = None


class DiagonalBiLSTMCell(RowCell):
    def __init__(self, model: DiagonalBiLSTM):
        super().__init__(model)
        self.layers = model.layers
        self.hidden = model.config.hidden
        self.above_rows = model.input_conv.kernel_size[0] // 2
        # diagonal_step relies on this padding: row i reads the previous column's rows (i-1, i).
        assert DiagonalLSTM.state_padding == (1, 0)

    def state_shapes(self, batch):
        n = len(self.layers)
        rows = [("rows", (batch, self.channels, self.above_rows, self.width))]
        ltr = [(f"ltr_h_{l}", (batch, self.hidden, self.width)) for l in range(n)]
        rtl = [(f"rtl_h_{l}", (batch, self.hidden, self.width)) for l in range(n)]
        return rows + ltr + rtl

    def begin_row(self, state, labels):
        n = len(self.layers)
        above = above_contribution(self.model.input_conv, state[0])
        ltr_gates = [above_gates(layer.left_to_right, h, layer.left_to_right.input_to_state.bias[:, None])
                     for layer, h in zip(self.layers, state[1 : 1 + n])]
        return _Row(state[0], above, ltr_gates, state[1 + n :])

    def pixel(self, ctx: _Row, j, x_pix):
        if ctx.condition is not None:
            raise ValueError("diagonal_bilstm takes no per-row condition")
        m: DiagonalBiLSTM = self.model
        ctx.pending = []
        x = row_taps(m.input_conv, ctx.above[j], ctx.image, self.scale(x_pix))  # (B, hidden)
        for l, layer in enumerate(self.layers):
            h_left, c_left = ctx.ltr[l][j - 1] if j > 0 else (None, None)
            h, c = diagonal_step(layer.left_to_right, ctx.ltr_gates[l][j], x, h_left, c_left)
            ctx.pending.append((x, h, c))
            x = x + pointwise(layer.residual, h + ctx.rtl_cols[l][j])
        return pointwise(m.head2, F.relu(pointwise(m.head1, F.relu(x))))  # (B, C*K)

    def commit(self, ctx: _Row, j, x_pix):
        ctx.image.append(self.scale(x_pix))  # the image itself, with every channel now known
        for l, (inp, h, c) in enumerate(ctx.pending):
            ctx.inputs[l].append(inp)
            ctx.ltr[l].append((h, c))

    def end_row(self, ctx: _Row):
        """The right-to-left pass over the finished row, for every layer: the next row's RTL state."""
        row = from_columns(ctx.image)[:, :, None]  # (B, C, 1, W)
        rows = torch.cat([ctx.rows[:, :, 1:], row], dim=2)
        ltr = [from_columns([h for h, _ in cols]) for cols in ctx.ltr]  # (B, h, W) each
        rtl = []
        for l, layer in enumerate(self.layers):
            lstm = layer.right_to_left
            inputs = from_columns(ctx.inputs[l])[:, :, None]  # (B, h, 1, W)
            x_is = drop_row_axis(lstm.input_to_state(inputs))  # (B, 4h, W)
            gates = above_gates(lstm, ctx.rtl_prev[l], x_is)
            h = c = None  # the "column W" state: zeros
            cols = [None] * self.width
            for j in reversed(range(self.width)):
                h, c = diagonal_step(lstm, gates[j], None, h, c)
                cols[j] = h
            rtl.append(from_columns(cols))
        return (rows, *ltr, *rtl)
