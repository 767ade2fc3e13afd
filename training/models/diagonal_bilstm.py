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

How it is computed (`diagonal_lstm`, for training speed): that same recursion, over the pixels
inside the image only, in skewed-column order (`diagonal_order`), both directions in the same
operations, with no skewed map materialised. `skew` / `unskew` (and `DiagonalLSTM.step`) state
the straightforward formulation, which tests/test_training_speed.py checks it against.

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

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelrnn.training.masks import MaskedConv2d
from pixelrnn.training.models.base import ModelConfig
from pixelrnn.training.models.pixelrnn import PixelRNN
from pixelrnn.training.models.row_lstm import gate_groups, lstm_update


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


@functools.lru_cache(maxsize=None)
def diagonal_order(height: int, width: int) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """The image's pixels in skewed-column order, leaving out the positions outside the image.

    Returns (order, sizes, first_rows): `order` (H*W,) lists raster indices i*W + j by skewed
    column k = i + j, rows ascending inside a column; column k holds sizes[k] pixels, rows
    first_rows[k] .. first_rows[k] + sizes[k] - 1.
    """
    order, sizes, first_rows = [], [], []
    for k in range(height + width - 1):
        rows = range(max(0, k - width + 1), min(height - 1, k) + 1)
        order += [i * width + k - i for i in rows]
        sizes.append(len(rows))
        first_rows.append(rows[0])
    return torch.tensor(order), tuple(sizes), tuple(first_rows)


@functools.lru_cache(maxsize=None)
def direction_orders(height: int, width: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """(order, inverse) per direction, as raster indices of the unmirrored image: left to right,
    then right to left (the same order on the width-mirrored image)."""
    order = diagonal_order(height, width)[0]
    mirrored = torch.arange(height * width).view(height, width).flip(1).flatten()[order]
    return tuple((o, torch.argsort(o)) for o in (order, mirrored))


def diagonal_lstm(x_is: torch.Tensor, weights: torch.Tensor, padding: tuple[int, int], height: int, width: int) -> torch.Tensor:
    """The recursion of D independent diagonal LSTMs, run together, skewed column by column.

    x_is (D, B, H*W, 4h): each LSTM's input-to-state in `diagonal_order`, channels last;
    weights (D, 4h, h, 2): their state-to-state kernels; padding: (top, bottom) of a skewed
    column before that 2-tap convolution. Returns the hidden states (D, B, H*W, h), same order.

    This is `DiagonalLSTM.step` over the skewed map, computed only where the image is: the
    skewed positions left of the image stay exactly zero (zero input, zero state) and those
    right of it feed nothing inside it, so rows of a column outside the image read as zeros.
    That halves the work for a square image. On a CPU this loop is bound by the number of
    operations per step, so the layout keeps them few: the directions share every operation,
    a step's input is a slice of one tensor (`split`: its gradient is one concatenation, where
    indexing a column per step would make autograd write a full-size zero gradient per step),
    and the 2-tap state-to-state convolution is one batched matrix product over both taps.
    """
    d, b, _, four_h = x_is.shape
    hidden = four_h // 4
    _, sizes, first_rows = diagonal_order(height, width)
    top, bottom = padding
    # Tap t reads row i + t - top of the previous column: both taps stacked, (D, 2h, 4h).
    w = torch.cat([weights[..., 0], weights[..., 1]], dim=2).transpose(1, 2)
    h = c = x_is.new_zeros(d, b, 1, hidden)  # "column -1": one row (row 0), all zero
    prev_first = 0
    outs = []
    for col, n, first in zip(x_is.split(sizes, dim=2), sizes, first_rows):
        # The previous column padded so that every row read below exists (zeros outside the
        # image; one more row at the bottom, which this column may reach): index e of the padded
        # column is row prev_first - top + e.
        h_pad, c_pad = F.pad(h, (0, 0, top, bottom + 1)), F.pad(c, (0, 0, top, bottom + 1))
        start = first - prev_first  # tap t of row `first` is at index start + t
        taps = torch.cat([h_pad[:, :, start : start + n], h_pad[:, :, start + 1 : start + 1 + n]], dim=3)
        gates = col + torch.bmm(taps.view(d, b * n, 2 * hidden), w).view(d, b, n, four_h)  # o, f, i, g
        o, f, i = torch.sigmoid(gates[..., : 3 * hidden]).chunk(3, dim=3)
        c_left = c_pad[:, :, start + top : start + top + n]  # the same row of the previous column
        c = torch.addcmul(f * c_left, i, torch.tanh(gates[..., 3 * hidden :]))
        h = o * torch.tanh(c)
        outs.append(h)
        prev_first = first
    return torch.cat(outs, dim=2)


def run_diagonal_lstms(x: torch.Tensor, lstms: list, directions: list[int]) -> list[torch.Tensor]:
    """Run `lstms` (DiagonalLSTM) over x (B, h, H, W) together, lstm d in direction directions[d]
    (0: left to right, 1: right to left, i.e. on the mirrored image, mirrored back). Returns
    each one's hidden states (B, h, H, W)."""
    b, hidden, height, width = x.shape
    orders = [direction_orders(height, width)[k] for k in directions]
    pixels = x.flatten(2).transpose(1, 2)  # (B, H*W, h): channels last
    x_d = torch.stack([pixels[:, order.to(x.device)] for order, _ in orders])  # (D, B, H*W, h)
    # The 1x1 input-to-state convolutions, as one batched matrix product in this layout.
    w_is = torch.stack([lstm.input_to_state.masked_weight().flatten(1).t() for lstm in lstms])  # (D, h, 4h)
    bias = torch.stack([lstm.input_to_state.bias for lstm in lstms])[:, None]  # (D, 1, 4h)
    x_is = torch.baddbmm(bias, x_d.flatten(1, 2), w_is).view(len(lstms), b, height * width, 4 * hidden)
    weights = torch.stack([lstm.state_to_state.weight for lstm in lstms])
    hs = diagonal_lstm(x_is, weights, lstms[0].state_padding, height, width)  # (D, B, H*W, h)
    return [h[:, inverse.to(x.device)].transpose(1, 2).reshape(b, hidden, height, width) for h, (_, inverse) in zip(hs, orders)]


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
        return run_diagonal_lstms(x, [self], [0])[0]


class DiagonalBiLSTMLayer(nn.Module):
    """Both directions plus the residual connection: (B, h, H, W) -> (B, h, H, W)."""

    def __init__(self, hidden: int, colour_groups: int):
        super().__init__()
        self.left_to_right = DiagonalLSTM(hidden, colour_groups)
        self.right_to_left = DiagonalLSTM(hidden, colour_groups)
        self.residual = MaskedConv2d(hidden, hidden, 1, "B", colour_groups=colour_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # left_to_right(x) and right_to_left(x.flip(3)).flip(3), computed in one loop.
        ltr, rtl = run_diagonal_lstms(x, [self.left_to_right, self.right_to_left], [0, 1])
        return x + self.residual(ltr + shift_down(rtl))  # rtl has seen row i to the right


class DiagonalBiLSTM(PixelRNN):
    def make_layer(self, hidden: int, colour_groups: int) -> nn.Module:
        return DiagonalBiLSTMLayer(hidden, colour_groups)
