"""The engine's runner on the exported ONNX graphs (onnxruntime, CPU), read from an export
folder's manifest.json (export/build_engine.py): one cell per stage, plus the multi-scale
condition graph.

Every graph is checked against the sha256 the manifest records before it is opened: a
flipped byte in an ONNX file's weights still loads in onnxruntime and would serve wrong
numbers, so a damaged or swapped file must stop the model from loading instead (one line
naming the file: Triton shows it as the model's load error).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from export.manifest import FORMAT, MANIFEST, file_sha256
from export.onnx_export import OnnxCell, OnnxCondition, OnnxScorer
from server.engine import Stage



class ModelFilesError(ValueError):
    """An export folder's manifest or graph file is missing, unreadable or not what was exported."""


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ModelFilesError(f"{path}: missing (the export manifest: re-export with export/build_engine.py)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelFilesError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelFilesError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ModelFilesError(f"{path}: format {found!r}, expected {FORMAT!r}")
    return manifest


def artifact_path(manifest: dict, folder: str | Path, name: str) -> Path:
    """The file of graph `name`, after checking it exists and has the sha256 the manifest records."""
    folder = Path(folder)
    entry = (manifest.get("artifacts") or {}).get(name)
    if not isinstance(entry, dict) or not entry.get("file"):
        raise ModelFilesError(f"{folder / MANIFEST}: lists no {name!r} graph")
    path = folder / entry["file"]
    if not path.is_file():
        raise ModelFilesError(f"{path}: missing (the {name} graph listed in {MANIFEST})")
    want = entry.get("sha256")
    if not want:
        raise ModelFilesError(f"{folder / MANIFEST}: records no sha256 for {entry['file']}: re-export with export/build_engine.py")
    found = file_sha256(path)
    if found != want:
        raise ModelFilesError(f"{path}: corrupted or replaced: sha256 {found[:16]}... differs from the "
                              f"{want[:16]}... recorded in {MANIFEST} (re-export with export/build_engine.py)")
    return path


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
        self.cells = [OnnxCell(artifact_path(manifest, folder, st.name), threads) for st in self.stages]
        self._condition = OnnxCondition(artifact_path(manifest, folder, "condition"), threads) if self.factor > 1 else None

    def initial_state(self, stage: int, batch: int) -> tuple[np.ndarray, ...]:
        return self.cells[stage].initial_state(batch)

    def run_row(self, stage, state, uniforms, temperature, forced, force, labels=None, condition=None, fixed=None):
        row, logprob, _, new_state = self.cells[stage].run_row(state, uniforms, temperature, forced, force, labels, condition, fixed)
        return row, logprob, new_state

    def condition(self, small: np.ndarray) -> np.ndarray:
        return self._condition(small)


def scorer(manifest: dict, folder: str | Path, threads: int = 1) -> OnnxScorer:
    return OnnxScorer(artifact_path(manifest, folder, "scorer"), threads)
