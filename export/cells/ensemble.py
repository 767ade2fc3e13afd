"""Row cell of an ensemble (training/models/ensemble.py): its members' row cells side by side.

The state is the members' states one after another (names prefixed m0_, m1_, ...); in each
sub-pixel every member gives its logits from the same known pixels and the cell returns the
logits of their averaged conditional (training.distributions.average_conditionals, the function
the model's forward uses), from which the row loop samples as for any model; every finished
pixel is committed to every member.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pixelrnn.export.cells.base import RowCell
from pixelrnn.training.distributions import average_conditionals
from pixelrnn.training.models.ensemble import Ensemble


class _Members:
    """Per-row context: one context per member cell."""

    def __init__(self, contexts: list):
        self.contexts = contexts
        self.condition: torch.Tensor | None = None


class EnsembleCell(RowCell):
    def __init__(self, model: Ensemble):
        super().__init__(model)
        from pixelrnn.export.cells import build_cell  # that module imports this one

        self.cells = nn.ModuleList(build_cell(member) for member in model.members)
        self.sizes = [len(cell.state_shapes(1)) for cell in self.cells]

    def state_shapes(self, batch):
        return [(f"m{k}_{name}", shape) for k, cell in enumerate(self.cells) for name, shape in cell.state_shapes(batch)]

    def split(self, state) -> list[tuple[torch.Tensor, ...]]:
        parts, start = [], 0
        for size in self.sizes:
            parts.append(tuple(state[start : start + size]))
            start += size
        return parts

    def begin_row(self, state, labels):
        return _Members([cell.begin_row(part, labels) for cell, part in zip(self.cells, self.split(state))])

    def pixel(self, ctx: _Members, j, x_pix):
        if ctx.condition is not None:
            raise ValueError("an ensemble takes no per-row condition")
        C, K = self.channels, self.model.k
        logits = [cell.pixel(c, j, x_pix).reshape(-1, C, K) for cell, c in zip(self.cells, ctx.contexts)]
        return average_conditionals(logits, self.levels, dim=2).reshape(-1, C * K)  # (B, C*K)

    def commit(self, ctx: _Members, j, x_pix):
        for cell, c in zip(self.cells, ctx.contexts):
            cell.commit(c, j, x_pix)

    def end_row(self, ctx: _Members):
        return tuple(t for cell, c in zip(self.cells, ctx.contexts) for t in cell.end_row(c))
