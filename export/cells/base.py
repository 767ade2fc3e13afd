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
    pixel(ctx, j, x_pix)        -> logits (B, C, K) at column j given the pixel's known channels
    commit(ctx, j, x_pix)       -> record the finished pixel for the pixels after it
    end_row(ctx)                -> the new state tensors
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.distributions import bernoulli_log_prob
from training.models.base import ImageModel


def sample_torch(logits: torch.Tensor, u: torch.Tensor, temperature: torch.Tensor, levels: int) -> torch.Tensor:
    """Torch twin of distributions.sample_from_logits: logits (B, K), u (B,), temperature (B,) -> (B,) int64."""
    logits = logits.double()
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    if levels == 2:
        l = logits[:, 0]
        sampled = (u < torch.sigmoid(l / t[:, 0])).long()
        return torch.where(greedy, (l > 0).long(), sampled)
    z = logits / t
    z = z - z.max(dim=1, keepdim=True).values
    cdf = torch.cumsum(torch.exp(z), dim=1)
    idx = (cdf < (u * cdf[:, -1])[:, None]).long().sum(dim=1).clamp(max=levels - 1)
    return torch.where(greedy, logits.argmax(dim=1), idx)


def log_prob_torch(logits: torch.Tensor, v: torch.Tensor, levels: int) -> torch.Tensor:
    """log p(v) for one sub-pixel: logits (B, K), v (B,) -> (B,)."""
    if levels == 2:
        return bernoulli_log_prob(logits[:, 0], v)
    return torch.gather(F.log_softmax(logits, dim=1), 1, v[:, None]).squeeze(1)


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

    def pixel(self, ctx, j: int, x_pix: torch.Tensor) -> torch.Tensor:
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
        batch = forced.shape[0]
        row_values, row_logits = [], []
        logprob = torch.zeros(batch, dtype=torch.float32, device=forced.device)
        for j in range(self.width):
            copy = force if fixed is None else force | fixed[j]  # (B,)
            known: list[torch.Tensor] = []
            pix_logits = []
            for c in range(self.channels):
                # Channels >= c are unknown; the masks guarantee channel c's logits ignore them.
                pad = [torch.zeros_like(forced[:, 0, j])] * (self.channels - c)
                x_pix = torch.stack(known + pad, dim=1)  # (B, C)
                logits = self.pixel(ctx, j, x_pix)  # (B, C, K)
                v = sample_torch(logits[:, c], uniforms[j, c], temperature, self.levels)
                v = torch.where(copy, forced[:, c, j], v)
                lp = log_prob_torch(logits[:, c].float(), v, self.levels)
                logprob = logprob + (lp if fixed is None else torch.where(fixed[j], torch.zeros_like(lp), lp))
                known.append(v)
                pix_logits.append(logits[:, c])
            x_pix = torch.stack(known, dim=1)  # (B, C)
            self.commit(ctx, j, x_pix)
            row_values.append(x_pix)
            row_logits.append(torch.stack(pix_logits, dim=1))  # (B, C, K)
        row = torch.stack(row_values, dim=2)  # (B, C, W)
        logits = torch.stack(row_logits, dim=3)  # (B, C, K, W)
        return row, logprob, logits, self.end_row(ctx)

    def forward(self, *args):
        """ONNX-friendly flat signature: (*state, uniforms, temperature, forced, force[, labels])."""
        n = len(self.state_shapes(1))
        state, rest = args[:n], args[n:]
        labels = rest[4] if len(rest) > 4 else None
        row, logprob, logits, new_state = self.run_row(state, *rest[:4], labels=labels)
        return (row, logprob, logits, *new_state)


def left_window(cols: list[torch.Tensor], j: int, width: int) -> torch.Tensor:
    """The last `width` committed columns ending at j (inclusive), zero-padded on the left.

    cols[k] is (B, Cin) for columns 0..j; returns (B, Cin, width).
    """
    start = j - width + 1
    taken = [cols[k] if k >= 0 else torch.zeros_like(cols[j]) for k in range(start, j + 1)]
    return torch.stack(taken, dim=2)
