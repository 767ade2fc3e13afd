"""Incremental row cells for every architecture, and the cached samplers built on them."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from export.cells.base import RowCell
from export.cells.diagonal_bilstm import DiagonalBiLSTMCell
from export.cells.gated_pixelcnn import GatedPixelCNNCell
from export.cells.multiscale import MultiScaleSampler
from export.cells.pixelcnn import PixelCNNCell
from export.cells.row_lstm import RowLSTMCell
from training import distributions
from training.models.diagonal_bilstm import DiagonalBiLSTM
from training.models.gated_pixelcnn import GatedPixelCNN
from training.models.multiscale import MultiScale
from training.models.pixelcnn import PixelCNN
from training.models.row_lstm import RowLSTM

CELLS: dict[type, type[RowCell]] = {
    PixelCNN: PixelCNNCell,
    GatedPixelCNN: GatedPixelCNNCell,
    RowLSTM: RowLSTMCell,
    DiagonalBiLSTM: DiagonalBiLSTMCell,
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


def start_canvas(shape: tuple[int, ...], known: np.ndarray | None, known_rows: int, device) -> tuple[torch.Tensor, int]:
    """A zero int64 canvas of `shape` with rows < known_rows copied from `known`, and the number
    of rows actually known (0 when no known images are given)."""
    canvas = torch.zeros(shape, dtype=torch.long, device=device)
    if known is None or not known_rows:
        return canvas, 0
    canvas[:, :, :known_rows] = torch.from_numpy(np.asarray(known[:, :, :known_rows], dtype=np.int64)).to(device)
    return canvas, known_rows


@torch.no_grad()
def run_rows(
    cell: RowCell,
    rng: np.random.Generator,
    canvas: torch.Tensor,
    known_rows: int,
    temperature: float,
    labels: torch.Tensor | None = None,
    row_inputs: Callable[[int], dict] = no_row_inputs,
    progress=None,
) -> torch.Tensor:
    """Fill canvas (B, C, H, W) int64 row by row: rows < known_rows (and fixed pixels) are kept,
    the others sampled with one row of uniforms from `rng` per row, copied rows included."""
    n, dev = canvas.shape[0], canvas.device
    state = cell.initial_state(n, dev)
    temp = torch.full((n,), float(temperature), dtype=torch.float64, device=dev)
    for i in range(cell.height):
        u = torch.from_numpy(distributions.draw_row_uniforms(rng, n, cell.channels, cell.width)).to(dev)
        force = torch.full((n,), i < known_rows, dtype=torch.bool, device=dev)
        row, _, _, state = cell.run_row(state, u, temp, canvas[:, :, i], force, labels, **row_inputs(i))
        canvas[:, :, i] = row
        if progress is not None:
            progress(i)
    return canvas


@torch.no_grad()
def sample_cached(
    cell: RowCell,
    n: int,
    seed: int,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    known: np.ndarray | None = None,
    known_rows: int = 0,
    device: str | torch.device = "cpu",
    progress=None,
) -> np.ndarray:
    """Sample n images row by row with the cell; the same seed gives the reference sampler's image."""
    if isinstance(cell, MultiScaleSampler):
        return cell.sample(n, seed, temperature, labels, known, known_rows, device, progress)
    canvas, known_rows = start_canvas((n, cell.channels, cell.height, cell.width), known, known_rows, device)
    run_rows(cell, distributions.sampling_rng(seed), canvas, known_rows, temperature, labels, progress=progress)
    return canvas.cpu().numpy().astype(np.uint8)
