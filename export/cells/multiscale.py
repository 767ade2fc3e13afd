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

The uniform stream is the reference sampler's (training/sample.py): the small image's rows, then
the big image's rows, one row of uniforms per row, also for rows that are copied.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from export.cells.base import RowCell, log_prob_torch, sample_torch
from training import distributions
from training.models.multiscale import MultiScale


class ConditionedCell(RowCell):
    """The big model's row cell with the per-row `condition` and `fixed` inputs (module notes)."""

    def __init__(self, inner: RowCell):
        super().__init__(inner.model)
        self.inner = inner

    def state_shapes(self, batch):
        return self.inner.state_shapes(batch)

    def run_row(
        self,
        state: tuple[torch.Tensor, ...],
        uniforms: torch.Tensor,  # (W, C, B) float64
        temperature: torch.Tensor,  # (B,) float64; <= 0 means greedy
        forced: torch.Tensor,  # (B, C, W) int64: the known row where force is set, s at the fixed columns
        force: torch.Tensor,  # (B,) bool
        condition: torch.Tensor,  # (B, cond, W)
        fixed: torch.Tensor,  # (W,) bool
        labels: torch.Tensor | None = None,
    ):
        cell = self.inner
        ctx = cell.begin_row(state, labels)
        ctx.condition = condition
        row_values, row_logits = [], []
        logprob = torch.zeros(forced.shape[0], dtype=torch.float32, device=forced.device)
        for j in range(self.width):
            copy = force | fixed[j]  # (B,)
            known: list[torch.Tensor] = []
            pix_logits = []
            for c in range(self.channels):
                # Channels >= c are unknown; the masks guarantee channel c's logits ignore them.
                pad = [torch.zeros_like(forced[:, 0, j])] * (self.channels - c)
                logits = cell.pixel(ctx, j, torch.stack(known + pad, dim=1))  # (B, C, K)
                v = sample_torch(logits[:, c], uniforms[j, c], temperature, self.levels)
                v = torch.where(copy, forced[:, c, j], v)
                lp = log_prob_torch(logits[:, c].float(), v, self.levels)
                logprob = logprob + torch.where(fixed[j], torch.zeros_like(lp), lp)
                known.append(v)
                pix_logits.append(logits[:, c])
            x_pix = torch.stack(known, dim=1)  # (B, C)
            cell.commit(ctx, j, x_pix)
            row_values.append(x_pix)
            row_logits.append(torch.stack(pix_logits, dim=1))  # (B, C, K)
        row = torch.stack(row_values, dim=2)  # (B, C, W)
        logits = torch.stack(row_logits, dim=3)  # (B, C, K, W)
        return row, logprob, logits, cell.end_row(ctx)

    def forward(self, *args):
        """Flat signature: (*state, uniforms, temperature, forced, force, condition, fixed[, labels])."""
        n = len(self.state_shapes(1))
        state, rest = args[:n], args[n:]
        labels = rest[6] if len(rest) > 6 else None
        row, logprob, logits, new_state = self.run_row(state, *rest[:6], labels=labels)
        return (row, logprob, logits, *new_state)


class MultiScaleSampler(nn.Module):
    """The two parts of a MultiScale model as cells: `small` (a plain RowCell) and `big`."""

    def __init__(self, model: MultiScale):
        super().__init__()
        from export.cells import build_cell  # the package imports this module

        self.model = model.eval()
        self.small = build_cell(model.small_model)
        self.big = ConditionedCell(build_cell(model.big_model))
        cfg = model.config
        self.factor = cfg.factor
        self.channels, self.height, self.width, self.levels = cfg.in_channels, cfg.height, cfg.width, cfg.levels

    def fixed_columns(self, i: int, device=None) -> torch.Tensor:
        """(W,) bool: the columns of big row i that are pixels of the small image."""
        return self.model.grid_mask()[i].to(device)

    @torch.no_grad()
    def teacher_forced(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Known images x (B, C, H, W) -> the big part's logits (B, C, K, H, W) given x's small
        image (= model(x)) and log p(x) (B,) = log p_small(s) + the big part's off-grid terms."""
        from export.cells import teacher_forced_logits

        b, dev = x.shape[0], x.device
        small = self.model.subsample(x)
        _, total = teacher_forced_logits(self.small, small, labels)
        condition = self.model.condition(small)  # (B, cond, H, W)
        state = self.big.initial_state(b, dev)
        uniforms = torch.zeros(self.width, self.channels, b, dtype=torch.float64, device=dev)
        temperature = torch.ones(b, dtype=torch.float64, device=dev)
        force = torch.ones(b, dtype=torch.bool, device=dev)
        rows = []
        for i in range(self.height):
            _, logprob, logits, state = self.big.run_row(
                state, uniforms, temperature, x[:, :, i].long(), force, condition[:, :, i], self.fixed_columns(i, dev), labels
            )
            rows.append(logits)
            total = total + logprob
        return torch.stack(rows, dim=3), total

    @torch.no_grad()
    def sample(
        self,
        n: int,
        seed: int,
        temperature: float = 1.0,
        labels: torch.Tensor | None = None,
        known: np.ndarray | None = None,
        known_rows: int = 0,
        device: str | torch.device = "cpu",
        progress=None,
    ) -> np.ndarray:
        """Like export.cells.sample_cached; `progress` gets the small rows, then the big ones, counted on."""
        from export.cells import sample_cached

        f, c = self.factor, self.channels
        small_known = None if known is None or not known_rows else np.asarray(known)[:, :, ::f, ::f]
        small = sample_cached(self.small, n, seed, temperature, labels, small_known, math.ceil(known_rows / f), device, progress)
        rng = distributions.sampling_rng(seed)
        for _ in range(self.small.height):  # the small part's share of the stream
            distributions.draw_row_uniforms(rng, n, c, self.small.width)

        small_t = torch.from_numpy(small.astype(np.int64)).to(device)
        canvas = torch.zeros(n, c, self.height, self.width, dtype=torch.long, device=device)
        canvas[:, :, ::f, ::f] = small_t
        if known is not None and known_rows:
            canvas[:, :, :known_rows] = torch.from_numpy(np.asarray(known[:, :, :known_rows], dtype=np.int64)).to(device)
        condition = self.model.condition(small_t)  # (n, cond, H, W)
        state = self.big.initial_state(n, device)
        temp = torch.full((n,), float(temperature), dtype=torch.float64, device=device)
        for i in range(self.height):
            u = torch.from_numpy(distributions.draw_row_uniforms(rng, n, c, self.width)).to(device)
            force = torch.full((n,), i < known_rows, dtype=torch.bool, device=device)
            row, _, _, state = self.big.run_row(
                state, u, temp, canvas[:, :, i], force, condition[:, :, i], self.fixed_columns(i, device), labels
            )
            canvas[:, :, i] = row
            if progress is not None:
                progress(self.small.height + i)
        return canvas.cpu().numpy().astype(np.uint8)
