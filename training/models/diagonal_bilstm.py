"""Diagonal BiLSTM (van den Oord et al. 2016, "Pixel Recurrent Neural Networks", section 3.2).

A 7x7 mask-A convolution, then `layers` Diagonal BiLSTM layers with residual connections, then
ReLU + 1x1 mask-B convolution twice into the output head. Unlike the Row LSTM, every pixel sees
its whole context (all rows above and the pixels to its left).

The skew trick. A diagonal LSTM updates pixel (i, j) from the states of its left neighbour
(i, j-1) and the pixel above (i-1, j). Shifting row i of the map right by i ("skewing",
(B, C, H, W) -> (B, C, H, H+W-1)) puts pixel (i, j) in skewed column k = i+j, so both
predecessors lie in skewed column k-1, at rows i (left) and i-1 (above):

    image          skewed (k = i + j)
    a b c          a b c . .
    d e f    ->    . d e f .
    g h i          . . g h i

The recursion then runs column by column, left to right, over whole skewed columns at once:
input-to-state is a 1x1 mask-B convolution (computed for the whole map before skewing) and
state-to-state a 2x1 convolution along the previous column reading rows (i-1, i): the column is
padded at the TOP (a "same" padding would read row i+1, the future). Unskewing restores (B, h,
H, W). Positions outside the image in the skewed map only ever feed other such positions.

Two directions: the right-to-left one is the same LSTM (its own weights) on the width-mirrored
map, mirrored back. It has seen the pixels to the right on the current row, so its output is
shifted down one row (row 0 gets zeros) before it is added to the left-to-right output: pixel
(i, j) then receives rows < i from it and, from the left-to-right pass, row i up to j. One gap
remains, as in the paper's design: the last pixel of the previous row, (i-1, W-1), reaches
(i, j) only through the 7x7 input convolution (j >= W-4), because mask A keeps it out of every
hidden map at its own position and nothing lies to its right to carry it into row i-1.

Left out from the paper: the residual's 1x1 convolution maps hidden -> hidden (the paper doubles
the input width to 2h); sizes are scaled down for a 2-core CPU (paper: 7 layers, h=16 to 128).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.masks import MaskedConv2d
from training.models.base import ModelConfig
from training.models.pixelrnn import PixelRNN
from training.models.row_lstm import gate_groups, lstm_update


@dataclass
class DiagonalBiLSTMConfig(ModelConfig):
    hidden: int = 24  # LSTM state size per pixel and direction (a multiple of 3 for RGB)
    layers: int = 1  # Diagonal BiLSTM layers, each with a residual connection


def skew(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, H+W-1): row i shifted right by i, zeros elsewhere.

    Each row is padded with H zeros and the flat buffer is re-read with rows one element
    shorter, so row i starts i elements earlier: its content lands i columns to the right.
    """
    b, c, h, w = x.shape
    flat = F.pad(x, (0, h)).flatten(2)  # (B, C, H*(W+H))
    return flat[:, :, : h * (w + h - 1)].reshape(b, c, h, w + h - 1)


def unskew(x: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of `skew`: (B, C, H, H+W-1) -> (B, C, H, W)."""
    b, c, h, sw = x.shape
    # Rows one element longer: row i now starts at skewed column i.
    flat = F.pad(x.flatten(2), (0, h))  # (B, C, H*(H+W))
    return flat.reshape(b, c, h, sw + 1)[..., :width]


def shift_down(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) moved down one row, zeros in row 0."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


class DiagonalLSTM(nn.Module):
    """One direction (left to right): (B, h, H, W) -> hidden states (B, h, H, W)."""

    # (top, bottom) padding of a skewed column before the 2x1 state-to-state convolution: output
    # row i reads the previous column at rows (i-1, i) = the pixels above and to the left.
    state_padding = (1, 0)

    def __init__(self, hidden: int, colour_groups: int):
        super().__init__()
        self.hidden = hidden
        self.input_to_state = MaskedConv2d(
            hidden, 4 * hidden, 1, "B", colour_groups=colour_groups, out_groups=gate_groups(hidden, colour_groups)
        )
        # Reads only earlier pixels (above and left): no mask needed.
        self.state_to_state = nn.Conv1d(hidden, 4 * hidden, 2, bias=False)

    def step(
        self, x_is_col: torch.Tensor, h_prev: torch.Tensor, c_prev: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One skewed column: input-to-state (B, 4h, H), previous column's state (B, h, H) each."""
        s = self.state_to_state(F.pad(h_prev, self.state_padding))  # (B, 4h, H)
        return lstm_update(x_is_col + s, c_prev)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, height, width = x.shape
        x_is = skew(self.input_to_state(x))  # (B, 4h, H, H+W-1)
        h = c = x.new_zeros(b, self.hidden, height)  # the "column -1" state
        cols = []
        for k in range(x_is.shape[3]):
            h, c = self.step(x_is[..., k], h, c)
            cols.append(h)
        return unskew(torch.stack(cols, dim=3), width)  # (B, h, H, W)


class DiagonalBiLSTMLayer(nn.Module):
    """Both directions plus the residual connection: (B, h, H, W) -> (B, h, H, W)."""

    def __init__(self, hidden: int, colour_groups: int):
        super().__init__()
        self.left_to_right = DiagonalLSTM(hidden, colour_groups)
        self.right_to_left = DiagonalLSTM(hidden, colour_groups)
        self.residual = MaskedConv2d(hidden, hidden, 1, "B", colour_groups=colour_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ltr = self.left_to_right(x)
        rtl = self.right_to_left(x.flip(3)).flip(3)  # (B, h, H, W), has seen row i to the right
        return x + self.residual(ltr + shift_down(rtl))


class DiagonalBiLSTM(PixelRNN):
    def make_layer(self, hidden: int, colour_groups: int) -> nn.Module:
        return DiagonalBiLSTMLayer(hidden, colour_groups)
