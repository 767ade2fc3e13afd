"""Incremental row cells for every architecture, and the cached sampler that runs them through
the row loop (runtime/rowloop.py)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from pixelrnn.export.cells.base import RowCell
from pixelrnn.export.cells.diagonal_bilstm import DiagonalBiLSTMCell
from pixelrnn.export.cells.ensemble import EnsembleCell
from pixelrnn.export.cells.gated_pixelcnn import GatedPixelCNNCell
from pixelrnn.export.cells.multiscale import MultiScaleSampler
from pixelrnn.export.cells.pixelcnn import PixelCNNCell
from pixelrnn.export.cells.row_lstm import RowLSTMCell
from pixelrnn.runtime import rowloop
from pixelrnn.runtime.rowloop import SampleSpec, Stage
from pixelrnn.training.models.diagonal_bilstm import DiagonalBiLSTM
from pixelrnn.training.models.ensemble import Ensemble
from pixelrnn.training.models.gated_pixelcnn import GatedPixelCNN
from pixelrnn.training.models.multiscale import MultiScale
from pixelrnn.training.models.pixelcnn import PixelCNN
from pixelrnn.training.models.row_lstm import RowLSTM

CELLS: dict[type, type[RowCell]] = {
    PixelCNN: PixelCNNCell,
    GatedPixelCNN: GatedPixelCNNCell,
    RowLSTM: RowLSTMCell,
    DiagonalBiLSTM: DiagonalBiLSTMCell,
    Ensemble: EnsembleCell,
    MultiScale: MultiScaleSampler,  # two cells, not a RowCell: dispatched below
}


def build_cell(model) -> RowCell:
    for model_type, cell_type in CELLS.items():
        if type(model) is model_type:
            return cell_type(model)
    raise ValueError(f"no row cell for {type(model).__name__}")


def no_row_inputs(i: int) -> dict:
    return {}


@torch.no_grad()
def teacher_forced_logits(
    cell: RowCell, x: torch.Tensor, labels: torch.Tensor | None = None, row_inputs: Callable[[int], dict] = no_row_inputs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the cell over known images x (B, C, H, W): logits (B, C, K, H, W) and log p(x) (B,)."""
    if isinstance(cell, MultiScaleSampler):
        return cell.teacher_forced(x, labels)
    b = x.shape[0]
    state = cell.initial_state(b, x.device)
    uniforms = torch.zeros(cell.width, cell.channels, b, dtype=torch.float64, device=x.device)
    temperature = torch.ones(b, dtype=torch.float64, device=x.device)
    force = torch.ones(b, dtype=torch.bool, device=x.device)
    rows, total = [], torch.zeros(b, device=x.device)
    for i in range(cell.height):
        _, logprob, logits, state = cell.run_row(state, uniforms, temperature, x[:, :, i].long(), force, labels, **row_inputs(i))
        rows.append(logits)
        total = total + logprob
    return torch.stack(rows, dim=3), total


class TorchRunner:
    """The row loop's runner (runtime/rowloop.py) on torch cells: one RowCell, or the two
    cells and the condition map of a MultiScaleSampler. State stays torch tensors on `device`."""

    def __init__(self, cell: RowCell | MultiScaleSampler, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        if isinstance(cell, MultiScaleSampler):
            self.cells, self.factor, self._condition = [cell.small, cell.big], cell.factor, cell.model.condition
            self.stages = [Stage("small_cell", cell.small.channels, cell.small.height, cell.small.width),
                           Stage("big_cell", cell.channels, cell.height, cell.width, conditioned=True)]
        else:
            self.cells, self.factor, self._condition = [cell], 1, None
            self.stages = [Stage("cell", cell.channels, cell.height, cell.width)]
        self.levels, self.num_classes = cell.levels, cell.model.config.num_classes

    def initial_state(self, stage: int, batch: int) -> tuple[torch.Tensor, ...]:
        return self.cells[stage].initial_state(batch, self.device)

    def _tensor(self, a) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    @torch.no_grad()
    def run_row(self, stage, state, uniforms, temperature, forced, force, labels=None, condition=None, fixed=None):
        extra = {} if condition is None else dict(condition=self._tensor(condition), fixed=self._tensor(fixed))
        labels = None if labels is None else self._tensor(labels)
        row, logprob, _, state = self.cells[stage].run_row(state, self._tensor(uniforms), self._tensor(temperature),
                                                           self._tensor(forced), self._tensor(force), labels, **extra)
        return row.cpu().numpy(), logprob.cpu().numpy(), state

    @torch.no_grad()
    def condition(self, small: np.ndarray) -> np.ndarray:
        return self._condition(self._tensor(small)).cpu().numpy()


def sample_cached(
    cell: RowCell | MultiScaleSampler,
    n: int,
    seed: int,
    temperature: float = 1.0,
    labels: torch.Tensor | np.ndarray | None = None,
    known: np.ndarray | None = None,
    known_rows: int = 0,
    device: str | torch.device = "cpu",
    progress=None,
) -> np.ndarray:
    """Sample n images with the torch cells through the row loop (runtime/rowloop.py): the same
    seed gives the reference sampler's image. `known` (n, C, >= known_rows, W): rows kept as given;
    `progress(i)` after each row (multi-scale: the small rows, then the big ones, counted on)."""
    if labels is not None:
        labels = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels, np.int64).reshape(-1)
    kept = np.asarray(known)[:, :, :known_rows] if known is not None and known_rows else None
    spec = SampleSpec(batch=n, temperature=float(temperature), seed=seed, labels=labels, known=kept)
    return rowloop.sample(TorchRunner(cell, device), spec, progress)
