"""The engine's runner on the exported ONNX graphs (onnxruntime, CPU), read from an export
folder's manifest.json (export/build_engine.py): one cell per stage, plus the multi-scale
condition graph."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from export.onnx_export import OnnxCell, OnnxCondition, OnnxScorer
from server.engine import Stage

MANIFEST = "manifest.json"
FORMAT = "pixelrnn-export/1"


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def stages(manifest: dict) -> list[Stage]:
    c, h, w = manifest["shape"]
    if manifest.get("multiscale"):
        _, sh, sw = manifest["multiscale"]["small_shape"]
        return [Stage("small_cell", c, sh, sw), Stage("big_cell", c, h, w, conditioned=True)]
    return [Stage("cell", c, h, w)]


class OnnxRunner:
    def __init__(self, manifest: dict, folder: str | Path, threads: int = 1):
        folder = Path(folder)
        self.stages = stages(manifest)
        self.levels, self.num_classes = int(manifest["levels"]), int(manifest["num_classes"])
        self.factor = manifest["multiscale"]["factor"] if manifest.get("multiscale") else 1
        self.cells = [OnnxCell(folder / manifest["artifacts"][st.name]["file"], threads) for st in self.stages]
        self._condition = OnnxCondition(folder / manifest["artifacts"]["condition"]["file"], threads) if self.factor > 1 else None

    def initial_state(self, stage: int, batch: int) -> tuple[np.ndarray, ...]:
        return self.cells[stage].initial_state(batch)

    def run_row(self, stage, state, uniforms, temperature, forced, force, labels=None, condition=None, fixed=None):
        row, logprob, _, new_state = self.cells[stage].run_row(state, uniforms, temperature, forced, force, labels, condition, fixed)
        return row, logprob, new_state

    def condition(self, small: np.ndarray) -> np.ndarray:
        return self._condition(small)


def scorer(manifest: dict, folder: str | Path, threads: int = 1) -> OnnxScorer:
    return OnnxScorer(Path(folder) / manifest["artifacts"]["scorer"]["file"], threads)
