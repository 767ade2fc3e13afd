"""Cached sampling for the multi-scale model (training/models/multiscale.py) from two row cells.

The small model's own cell generates the subsampled image s (H/f x W/f). Then the big model's
cell generates the full image row by row with two inputs more per row than a plain RowCell:
    condition  (B, cond, W)  row i of model.condition(s), handed to the base cell's
                             `ctx.condition` hook (a first-layer bias for the row)
    fixed      (W,) bool     the columns of this row on the subsampling grid (every f-th column
                             of every f-th row): their values are copied from `forced`, which
                             holds s there, whatever `force` says, and they are left out of the
                             row's log-probability (they belong to p_small, see MultiScale.nll)
Each part keeps its base architecture's state layout (export/cells/pixelcnn.py,
export/cells/gated_pixelcnn.py) and a flat `forward`, so each part exports on its own; the
condition map is one small convolution of s, computed once per image between the parts.

Sampling runs both parts through the row loop (runtime/rowloop.py, via export.cells.TorchRunner),
whose uniform stream is the reference sampler's: the small image's rows, then the big image's
rows, one row of uniforms per row, also for rows that are copied.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pixelrnn.export.cells.base import RowCell
from pixelrnn.training.models.multiscale import MultiScale


class ConditionedCell(RowCell):
    """The big model's row cell, exported with the per-row `condition` and `fixed` inputs."""

    def __init__(self, inner: RowCell):
        super().__init__(inner.model)
        self.inner = inner

    def state_shapes(self, batch):
        return self.inner.state_shapes(batch)

    def begin_row(self, state, labels):
        return self.inner.begin_row(state, labels)

    def pixel(self, ctx, j, x_pix):
        return self.inner.pixel(ctx, j, x_pix)

    def commit(self, ctx, j, x_pix):
        self.inner.commit(ctx, j, x_pix)

    def end_row(self, ctx):
        return self.inner.end_row(ctx)

    def forward(self, *args):
        """Flat signature: (*state, uniforms, temperature, forced, force, condition, fixed[, labels])."""
        n = len(self.state_shapes(1))
        state, rest = args[:n], args[n:]
        labels = rest[6] if len(rest) > 6 else None
        row, logprob, logits, new_state = self.run_row(state, *rest[:4], labels=labels, condition=rest[4], fixed=rest[5])
        return (row, logprob, logits, *new_state)


class MultiScaleSampler(nn.Module):
    """The two parts of a MultiScale model as cells: `small` (a plain RowCell) and `big`."""

    def __init__(self, model: MultiScale):
        super().__init__()
        from pixelrnn.export.cells import build_cell  # the package imports this module

        self.model = model.eval()
        self.small = build_cell(model.small_model)
        self.big = ConditionedCell(build_cell(model.big_model))
        cfg = model.config
        self.factor = cfg.factor
        self.channels, self.height, self.width, self.levels = cfg.in_channels, cfg.height, cfg.width, cfg.levels

    def fixed_columns(self, i: int, device=None) -> torch.Tensor:
        """(W,) bool: the columns of big row i that are pixels of the small image."""
        return self.model.grid_mask()[i].to(device)

    def row_inputs(self, condition: torch.Tensor):
        """Per-row extra inputs of the big part: row i of the condition map and the grid columns."""
        return lambda i: dict(condition=condition[:, :, i], fixed=self.fixed_columns(i, condition.device))

    @torch.no_grad()
    def teacher_forced(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Known images x (B, C, H, W) -> the big part's logits (B, C, K, H, W) given x's small
        image (= model(x)) and log p(x) (B,) = log p_small(s) + the big part's off-grid terms."""
        from pixelrnn.export.cells import teacher_forced_logits

        small = self.model.subsample(x)
        _, small_logprob = teacher_forced_logits(self.small, small, labels)
        logits, big_logprob = teacher_forced_logits(self.big, x, labels, self.row_inputs(self.model.condition(small)))
        return logits, small_logprob + big_logprob
