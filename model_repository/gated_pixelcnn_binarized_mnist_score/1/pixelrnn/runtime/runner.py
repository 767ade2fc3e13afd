"""The row loop's runner on the exported ONNX graphs (onnxruntime, CPU), read from an export
folder's manifest.json (export/build_engine.py): one cell per stage, plus the multi-scale
condition graph; and the folder's scorer. Every graph is checked against the sha256 the
manifest records before it is opened (runtime/manifest.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pixelrnn.runtime.manifest import artifact_path
from pixelrnn.runtime.onnx_graphs import OnnxCell, OnnxCondition, OnnxScorer
from pixelrnn.runtime.rowloop import Stage


class OnnxRunner:
    """The row loop's runner on exported cells: one cell per stage (the multi-scale big cell is
    the one with CONDITION and FIXED inputs), plus the condition graph for multi-scale models."""

    def __init__(self, cells: list[OnnxCell], condition: OnnxCondition | None = None, factor: int = 1):
        self.cells, self._condition, self.factor = cells, condition, factor
        self.stages = [Stage(c.path.stem, c.channels, c.height, c.width, conditioned=c.conditioned) for c in cells]
        self.levels, self.num_classes = cells[-1].levels, cells[-1].num_classes

    @classmethod
    def from_manifest(cls, manifest: dict, folder: str | Path, threads: int = 1) -> "OnnxRunner":
        """The graphs of an export folder, each checked against the manifest's sha256 first."""
        cells = [OnnxCell(artifact_path(manifest, folder, name), threads) for name in manifest["stages"]]
        multiscale = manifest.get("multiscale")
        if not multiscale:
            return cls(cells)
        return cls(cells, OnnxCondition(artifact_path(manifest, folder, "condition"), threads), int(multiscale["factor"]))

    def initial_state(self, stage: int, batch: int) -> tuple[np.ndarray, ...]:
        return self.cells[stage].initial_state(batch)

    def run_row(self, stage, state, uniforms, temperature, forced, force, labels=None, condition=None, fixed=None):
        row, logprob, _, new_state = self.cells[stage].run_row(state, uniforms, temperature, forced, force, labels, condition, fixed)
        return row, logprob, new_state

    def condition(self, small: np.ndarray) -> np.ndarray:
        return self._condition(small)


def scorer(manifest: dict, folder: str | Path, threads: int = 1) -> OnnxScorer:
    return OnnxScorer(artifact_path(manifest, folder, "scorer"), threads)
