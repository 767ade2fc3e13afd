"""Row cells: one image row per call, with the model's state carried explicitly between calls.

A row cell is built from a trained model's own modules (no second definition of the network)
and computes, for row i of a batch of images:

    (state after rows < i, uniforms, temperature, forced row, force flags)
        -> (row values, row log-probability, row logits, state after rows <= i)

Inside the row it walks the pixels left to right and, in each pixel, the channels R -> G -> B;
every sub-pixel is sampled from its logits by inverse CDF with the caller's uniforms (the same
float64 formula as training.distributions.sample_from_logits, so every path draws the same
image from the same seed), or taken from `forced` where `force` is set (image completion,
resuming a stream, teacher-forced scoring and parity tests).

Work per pixel does not grow with the row index: each architecture keeps only what later
pixels still read (rows of layer inputs, LSTM states), precomputes once per row what depends
only on earlier rows, and per pixel applies just the taps on the current row.

Subclasses implement the architecture-specific pieces:
    state_shapes(batch)         -> list of (name, shape) of the zero initial state
    begin_row(state)            -> a per-row context (precomputed contributions of rows above)
    pixel(ctx, j, x_pix)        -> logits (B, C*K) at column j given the pixel's known channels
                                   (channel c's K logits at [c*K, (c+1)*K))
    commit(ctx, j, x_pix)       -> record the finished pixel for the pixels after it
    end_row(ctx)                -> the new state tensors
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pixelrnn.training.distributions import log_prob
from pixelrnn.training.models.base import ImageModel


def sample_torch(logits: torch.Tensor, u: torch.Tensor, greedy: torch.Tensor, t: torch.Tensor, levels: int) -> torch.Tensor:
    """Torch twin of randomness.sample_from_logits for one sub-pixel, in columns:
    logits (B, K), u (B, 1) float64, greedy (B, 1) bool, t (B, 1) float64 the temperature
    (1 where greedy) -> (B, 1) int64."""
    logits = logits.double()
    if levels == 2:  # one logit per sub-pixel (distributions.logits_per_channel): logits is (B, 1)
        # Cast before the where: onnxruntime has no Where on booleans.
        return torch.where(greedy, (logits > 0).long(), (u < torch.sigmoid(logits / t)).long())
    z = logits / t
    z = z - z.max(dim=1, keepdim=True).values
    cdf = torch.cumsum(torch.exp(z), dim=1)
    idx = (cdf < u * cdf[:, -1:]).long().sum(dim=1, keepdim=True).clamp(max=levels - 1)
    return torch.where(greedy, logits.argmax(dim=1, keepdim=True), idx)


class RowCell(nn.Module):
    def __init__(self, model: ImageModel):
        super().__init__()
        self.model = model.eval()
        cfg = model.config
        self.channels, self.width, self.height, self.levels = cfg.in_channels, cfg.width, cfg.height, cfg.levels

    # -- architecture-specific -------------------------------------------------------------
    def state_shapes(self, batch: int) -> list[tuple[str, tuple[int, ...]]]:
        raise NotImplementedError

    def begin_row(self, state: tuple[torch.Tensor, ...], labels: torch.Tensor | None):
        raise NotImplementedError

    def pixel(self, ctx, j: int, x_pix: torch.Tensor) -> torch.Tensor:  # (B, C*K)
        raise NotImplementedError

    def commit(self, ctx, j: int, x_pix: torch.Tensor) -> None:
        raise NotImplementedError

    def end_row(self, ctx) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------
    @property
    def state_names(self) -> list[str]:
        return [name for name, _ in self.state_shapes(1)]

    def initial_state(self, batch: int, device=None) -> tuple[torch.Tensor, ...]:
        return tuple(torch.zeros(shape, device=device) for _, shape in self.state_shapes(batch))

    def scale(self, values: torch.Tensor) -> torch.Tensor:
        """Integer values -> the network's input scale (the model's own preprocess)."""
        return self.model.preprocess(values)

    def run_row(
        self,
        state: tuple[torch.Tensor, ...],
        uniforms: torch.Tensor,  # (W, C, B) float64
        temperature: torch.Tensor,  # (B,) float64; <= 0 means greedy
        forced: torch.Tensor,  # (B, C, W) int64, used where force is set (and at fixed columns)
        force: torch.Tensor,  # (B,) bool
        labels: torch.Tensor | None = None,  # (B,) int64 for class-conditional models
        condition: torch.Tensor | None = None,  # (B, cond, W) first-layer bias for this row
        fixed: torch.Tensor | None = None,  # (W,) bool: columns copied from `forced` and left
        # out of the row's log-probability (the multi-scale grid pixels, see MultiScale.nll)
    ):
        ctx = self.begin_row(state, labels)
        if condition is not None:
            ctx.condition = condition
        C, W, K = self.channels, self.width, self.model.k
        # What the sub-pixels read, split once per row into (B, 1) columns in (j, c) order and
        # the temperature prepared once: indexing per sub-pixel would be ops per sub-pixel in
        # the exported graph, which is all Gathers and Unsqueezes for a small model.
        u = columns(uniforms.reshape(W * C, -1).t()[:, None])  # (W, C, B) -> W*C of (B, 1)
        given = columns(forced.transpose(1, 2).reshape(-1, 1, W * C))  # (B, C, W) -> W*C of (B, 1)
        greedy = (temperature <= 0)[:, None]  # (B, 1)
        t = torch.where(greedy, torch.ones_like(temperature[:, None]), temperature[:, None])
        keep = force[:, None]  # (B, 1)
        skip = None if fixed is None else fixed.reshape(W, 1).split(1)  # W of (1, 1)
        unknown = torch.zeros_like(forced[:, :, 0])  # (B, C): channels not drawn yet read as 0
        row_values, row_logits = [], []
        for j in range(W):
            copy = keep if skip is None else keep | skip[j]  # (B, 1)
            known: list[torch.Tensor] = []
            pix_logits = []
            for c in range(C):
                # Channels >= c are unknown; the masks guarantee channel c's logits ignore them.
                x_pix = torch.cat(known + [unknown[:, : C - c]], dim=1) if known else unknown  # (B, C)
                logits = self.pixel(ctx, j, x_pix)  # (B, C*K)
                logits = logits if C == 1 else logits[:, c * K : (c + 1) * K]  # (B, K): channel c's
                v = torch.where(copy, given[j * C + c], sample_torch(logits, u[j * C + c], greedy, t, self.levels))
                known.append(v)
                pix_logits.append(logits)
            x_pix = torch.cat(known, dim=1) if C > 1 else known[0]  # (B, C)
            self.commit(ctx, j, x_pix)
            row_values.append(x_pix)
            row_logits.append(torch.cat(pix_logits, dim=1) if C > 1 else pix_logits[0])  # (B, C*K)
        row = from_columns(row_values)  # (B, C, W)
        logits = from_columns(row_logits).reshape(-1, C, K, W)  # (B, C, K, W)
        # The row's log-probability from its logits at once, not per sub-pixel: a dozen ops per
        # sub-pixel in the graph otherwise, for arithmetic that needs no sampled value but its own.
        lp = log_prob(logits[:, :, :, None], row[:, :, None], self.levels)  # (B, C, 1, W): the row as a 1-row image
        if fixed is not None:  # (W,): the copied grid columns are not the row's to score
            lp = torch.where(fixed, torch.zeros_like(lp), lp)
        return row, lp.sum(dim=(1, 2, 3)), logits, self.end_row(ctx)

    def forward(self, *args):
        """ONNX-friendly flat signature: (*state, uniforms, temperature, forced, force[, labels])."""
        n = len(self.state_shapes(1))
        state, rest = args[:n], args[n:]
        labels = rest[4] if len(rest) > 4 else None
        row, logprob, logits, new_state = self.run_row(state, *rest[:4], labels=labels)
        return (row, logprob, logits, *new_state)


def columns(maps: torch.Tensor) -> list[torch.Tensor]:
    """A per-row map (B, F, W) as its W columns (B, F).

    Cells read such maps (the rows above's contribution, the previous row's states) one column
    per pixel. Indexing `maps[:, :, j]` exports as one Gather per column and layer, the most
    expensive op of the unrolled graphs; a transpose, a reshape and one Split give all W
    columns at once."""
    _, f, w = (int(n) for n in maps.shape)  # constants of the graph: see drop_row_axis
    return list(maps.transpose(1, 2).reshape(-1, w * f).split(f, dim=1))


def drop_row_axis(maps: torch.Tensor) -> torch.Tensor:
    """(B, F, 1, W) -> (B, F, W), a convolution's one output row as a per-row map.

    Not `squeeze(2)`: with a dynamic batch axis that exports as an If on the runtime shape, a
    subgraph call that copies the whole map every row (10% of a batch-16 PixelCNN row). Only the
    batch axis is dynamic, so the other sizes are read as Python ints (the tracer then records
    them as constants, not as Shape/Gather ops run every call) and the Reshape is one node."""
    _, f, _, w = (int(n) for n in maps.shape)
    return maps.reshape(-1, f, w)


class BiasedRow:
    """Per-row context of the PixelCNN-type cells: what each spatial layer gets from outside the
    current row, one map (B, F, W) per layer read one column per pixel, and the row's condition
    (multi-scale: a first-layer bias, which run_row sets after begin_row)."""

    def __init__(self, bias_maps: list[torch.Tensor]):
        self.bias_maps = bias_maps
        self.condition: torch.Tensor | None = None  # (B, F_0, W)
        self._columns: list[list[torch.Tensor]] | None = None

    def bias(self, l: int, j: int) -> torch.Tensor:
        """(B, F): layer l's bias at column j. Split into columns on first use, as the condition
        comes after begin_row; it is added to the first layer's map once for the row, not per pixel."""
        if self._columns is None:
            first = self.bias_maps[0] if self.condition is None else self.bias_maps[0] + self.condition
            self._columns = [columns(m) for m in [first, *self.bias_maps[1:]]]
        return self._columns[l][j]


def from_columns(cols: list[torch.Tensor]) -> torch.Tensor:
    """The inverse of `columns`: W columns (B, F) -> (B, F, W). `torch.stack(cols, dim=2)`
    exports as an Unsqueeze per column; one Concat, a reshape and a transpose do the same."""
    f = int(cols[0].shape[1])  # a constant of the graph: see drop_row_axis
    return torch.cat(cols, dim=1).reshape(-1, len(cols), f).transpose(1, 2)


def row_taps(conv: nn.Conv2d, bias: torch.Tensor, left: list[torch.Tensor], inp: torch.Tensor) -> torch.Tensor:
    """A (masked) convolution's taps on the current row up to and including the pixel, plus
    `bias` (B, out), what the rows above (and the model's bias) contribute at this column.

    left: the row's committed columns (B, Cin) before the pixel, inp: the pixel's (B, Cin).
    The taps on the window [j-p .. j] are one matrix product of the concatenated columns with
    the flattened kernel row (one Concat and one Gemm per layer and pixel in the graph); columns
    left of the image are the convolution's zero padding, so their kernel rows are dropped."""
    r, p = conv.kernel_size[0] // 2, conv.kernel_size[1] // 2
    weight = conv.masked_weight() if hasattr(conv, "masked_weight") else conv.weight
    taken = (left + [inp])[-(p + 1):]
    w = weight[:, :, r, p + 1 - len(taken) : p + 1]  # (out, Cin, n): the taps on the taken columns
    w = w.permute(2, 1, 0).reshape(-1, w.shape[0])  # (n * Cin, out), column-major like the concat
    x = torch.cat(taken, dim=1) if len(taken) > 1 else taken[0]  # (B, n * Cin)
    return torch.addmm(bias, x, w)
