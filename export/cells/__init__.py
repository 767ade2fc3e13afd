"""Incremental row cells for every architecture, and the cached samplers built on them."""
from __future__ import annotations

import numpy as np
import torch

from export.cells.base import RowCell
from export.cells.gated_pixelcnn import GatedPixelCNNCell
from export.cells.multiscale import MultiScaleSampler
from export.cells.pixelcnn import PixelCNNCell
from training import distributions
from training.models.gated_pixelcnn import GatedPixelCNN
from training.models.multiscale import MultiScale
from training.models.pixelcnn import PixelCNN

CELLS: dict[type, type[RowCell]] = {
    PixelCNN: PixelCNNCell,
    GatedPixelCNN: GatedPixelCNNCell,
    MultiScale: MultiScaleSampler,  # two cells, not a RowCell: dispatched below
}


def build_cell(model) -> RowCell:
    for model_type, cell_type in CELLS.items():
        if type(model) is model_type:
            return cell_type(model)
    raise ValueError(f"no row cell for {type(model).__name__}")


@torch.no_grad()
def teacher_forced_logits(cell: RowCell, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
        _, logprob, logits, state = cell.run_row(state, uniforms, temperature, x[:, :, i].long(), force, labels)
        rows.append(logits)
        total = total + logprob
    return torch.stack(rows, dim=3), total


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
    rng = distributions.sampling_rng(seed)
    state = cell.initial_state(n, device)
    temp = torch.full((n,), float(temperature), dtype=torch.float64, device=device)
    forced = torch.zeros(n, cell.channels, cell.width, dtype=torch.long, device=device)
    out = np.zeros((n, cell.channels, cell.height, cell.width), dtype=np.uint8)
    for i in range(cell.height):
        u = torch.from_numpy(distributions.draw_row_uniforms(rng, n, cell.channels, cell.width)).to(device)
        is_known = known is not None and i < known_rows
        if is_known:
            forced = torch.from_numpy(np.asarray(known[:, :, i], dtype=np.int64)).to(device)
        force = torch.full((n,), is_known, dtype=torch.bool, device=device)
        row, _, _, state = cell.run_row(state, u, temp, forced, force, labels)
        out[:, :, i] = row.cpu().numpy().astype(np.uint8)
        if progress is not None:
            progress(i)
    return out
