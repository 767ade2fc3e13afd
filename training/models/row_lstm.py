"""Row LSTM (van den Oord et al. 2016, "Pixel Recurrent Neural Networks", section 3.1).

A 7x7 mask-A convolution, then `layers` Row LSTM layers with residual connections, then ReLU +
1x1 mask-B convolution twice into the output head. A Row LSTM layer runs an LSTM down the image
one row at a time, all pixels of a row in parallel:

    gates(row i) = K_is (*) x[row i]  +  K_ss (*) h[row i-1]      (4*hidden channels: o, f, i, g)
    c = sigmoid(f) * c_prev + sigmoid(i) * tanh(g) ;  h = sigmoid(o) * tanh(c)

K_is is a width-3 masked 1-D convolution along the current row (mask B: left neighbour and the
pixel itself, colour-grouped); K_ss an unmasked width-3 convolution along the previous row's
hidden state, which lies entirely in the past. The receptive field is the triangle above the
pixel (it misses part of the context, which the Diagonal BiLSTM fixes).

Left out from the paper: the residual's 1x1 convolution maps hidden -> hidden here (the paper
doubles the input width to 2h); sizes are scaled down for a 2-core CPU (paper: 12 layers, h=128).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from pixelrnn.training.masks import MaskedConv1dRow, MaskedConv2d, channel_groups
from pixelrnn.training.models.base import ModelConfig
from pixelrnn.training.models.pixelrnn import PixelRNN


@dataclass
class RowLSTMConfig(ModelConfig):
    hidden: int = 32  # LSTM state size per pixel (a multiple of 3 for RGB)
    layers: int = 2  # Row LSTM layers, each with a residual connection


def gate_groups(hidden: int, colour_groups: int) -> torch.Tensor:
    """Colour group of each of the 4*hidden gate channels (blocks o, f, i, g).

    Every gate block repeats the hidden grouping, so channel k of each gate lies in the colour
    group of hidden channel k and the element-wise LSTM update never mixes colour groups.
    """
    return torch.cat([channel_groups(hidden, colour_groups)] * 4)


def lstm_update(gates: torch.Tensor, c_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LSTM cell update from pre-activations (B, 4h, ...) in o, f, i, g order -> (h, c) (B, h, ...)."""
    # Split at a constant, not chunk(4), which exports to ONNX as shape arithmetic run at every
    # pixel of every layer in a row cell (see gated_pixelcnn.gate).
    o, f, i, g = gates.split(int(gates.shape[1]) // 4, dim=1)
    # The candidate g goes through tanh (not sigmoid) so the cell can store negative values.
    c = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


class RowLSTMLayer(nn.Module):
    """One Row LSTM layer with its residual connection: (B, h, H, W) -> (B, h, H, W)."""

    def __init__(self, hidden: int, colour_groups: int):
        super().__init__()
        self.hidden = hidden
        self.input_to_state = MaskedConv1dRow(
            hidden, 4 * hidden, 3, "B", colour_groups=colour_groups, out_groups=gate_groups(hidden, colour_groups)
        )
        # Reads only the row above, which is entirely in the past: no mask needed.
        self.state_to_state = nn.Conv1d(hidden, 4 * hidden, 3, padding=1, bias=False)
        self.residual = MaskedConv2d(hidden, hidden, 1, "B", colour_groups=colour_groups)

    def step(
        self, x_is_row: torch.Tensor, h_prev: torch.Tensor, c_prev: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One row: input-to-state of the row (B, 4h, W), state of the row above (B, h, W) each."""
        return lstm_update(x_is_row + self.state_to_state(h_prev), c_prev)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, _, width = x.shape
        # The input-to-state part of every row at once; only the state recursion is sequential.
        x_is = self.input_to_state(x)  # (B, 4h, H, W)
        h = c = x.new_zeros(b, self.hidden, width)  # the "row -1" state
        rows = []
        # unbind, not x_is[:, :, i]: the gradient of an indexed row is a full-size zero map per
        # row, which made backward several times slower; unbind's gradient is one stack.
        for x_row in x_is.unbind(2):
            h, c = self.step(x_row, h, c)
            rows.append(h)
        out = torch.stack(rows, dim=2)  # (B, h, H, W)
        return x + self.residual(out)


class RowLSTM(PixelRNN):
    def make_layer(self, hidden: int, colour_groups: int) -> nn.Module:
        return RowLSTMLayer(hidden, colour_groups)
