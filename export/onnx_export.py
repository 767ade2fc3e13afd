"""ONNX export of the row cells, the full-image scorer and the multi-scale condition graph,
and their parity checks against torch.

Exporter: torch's TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`). It is
deprecated in torch 2.9+ but still present in 2.13, needs no extra package (the dynamo exporter
needs onnxscript, which the project does not pin), and traces the cells' Python loops over
columns and channels into a static, unrolled graph, which is what a row cell is. Branches on
tensor shapes inside the cells (e.g. "keep more than one cached row?") are on static
dimensions, so the tracer's warnings about them are silenced; the parity checks at several
batch sizes on one exported file are what prove the batch axis really is dynamic.

Every graph has one dynamic axis, "batch": axis 0 of every batch-carrying tensor, except
UNIFORMS (W, C, B), whose batch axis is the last. The sampling arithmetic stays in float64
(Cast, Exp, CumSum, Div, Less on doubles), which onnxruntime's CPU provider supports; see
export/cells/base.py for why it must be float64.

The onnxruntime runners of these graphs live in runtime/onnx_graphs.py (torch-free).

Graphs per architecture (`artifacts(model)`):
    single-scale:  cell, scorer
    multiscale:    small_cell, big_cell (with CONDITION and FIXED inputs), condition, scorer
Tensor names come from export/tensor_names.py. Each file carries metadata (kind, arch, image
size, levels) so a runner needs nothing but the file.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn as nn

from pixelrnn.runtime import tensor_names as tn
from pixelrnn.runtime.onnx_graphs import OnnxGraph
from pixelrnn.export.cells import build_cell
from pixelrnn.export.cells.base import RowCell
from pixelrnn.export.cells.multiscale import ConditionedCell, MultiScaleSampler
from pixelrnn.training.models import ARCHITECTURES
from pixelrnn.training.models.base import ImageModel
from pixelrnn.training.models.multiscale import MultiScale

OPSET = 17  # supported by onnxruntime 1.22, TensorRT 8.6+ and Triton 2.51's backends
FORMAT = "pixelrnn-onnx/1"
BATCH = -1  # marks the batch axis in TensorSpec.shape
TOLERANCE = 1e-4


class ParityError(AssertionError):
    """An exported graph disagrees with the torch module it was exported from."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int, ...]  # BATCH (-1) on the batch axis

    @property
    def batch_axis(self) -> int | None:
        return self.shape.index(BATCH) if BATCH in self.shape else None

    def to_json(self) -> dict:
        return {**asdict(self), "shape": list(self.shape), "batch_axis": self.batch_axis}


def arch_name(model: ImageModel) -> str:
    for name, (_, cls) in ARCHITECTURES.items():
        if type(model) is cls:
            return name
    raise ValueError(f"{type(model).__name__} is not a registered architecture")


# ---------------------------------------------------------------------------- cells

def cell_io(cell: RowCell) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of a cell's flat forward, in order."""
    c, w, k = cell.channels, cell.width, cell.model.k
    state = [(name, (BATCH, *shape[1:])) for name, shape in cell.state_shapes(1)]
    inputs = [TensorSpec(tn.state_in(n), "float32", s) for n, s in state] + [
        TensorSpec(tn.UNIFORMS, "float64", (w, c, BATCH)),
        TensorSpec(tn.TEMPERATURE, "float64", (BATCH,)),
        TensorSpec(tn.FORCED, "int64", (BATCH, c, w)),
        TensorSpec(tn.FORCE, "bool", (BATCH,)),
    ]
    if isinstance(cell, ConditionedCell):
        inputs += [TensorSpec(tn.CONDITION, "float32", (BATCH, cell.model.condition_channels, w)), TensorSpec(tn.FIXED, "bool", (w,))]
    if cell.model.config.num_classes:
        inputs.append(TensorSpec(tn.LABELS, "int64", (BATCH,)))
    outputs = [
        TensorSpec(tn.ROW, "int64", (BATCH, c, w)),
        TensorSpec(tn.LOGPROB, "float32", (BATCH,)),
        TensorSpec(tn.LOGITS, "float32", (BATCH, c, k, w)),
    ] + [TensorSpec(tn.state_out(n), "float32", s) for n, s in state]
    return inputs, outputs


def example_cell_inputs(cell: RowCell, batch: int, seed: int = 0, force: bool | None = None) -> list[torch.Tensor]:
    """Random inputs in flat-forward order: random state, temperatures 1, 0 (greedy) and 0.7,
    and, unless `force` is given, force set on every other image, so both paths run."""
    g = torch.Generator().manual_seed(seed)
    values = []
    for spec in cell_io(cell)[0]:
        shape = tuple(batch if d == BATCH else d for d in spec.shape)
        if spec.name == tn.UNIFORMS:
            values.append(torch.rand(shape, generator=g, dtype=torch.float64))
        elif spec.name == tn.TEMPERATURE:
            values.append(torch.tensor([1.0, 0.0, 0.7], dtype=torch.float64).repeat(batch)[:batch])
        elif spec.name == tn.FORCED:
            values.append(torch.randint(0, cell.levels, shape, generator=g))
        elif spec.name == tn.FORCE:
            values.append(torch.full(shape, force) if force is not None else torch.arange(batch) % 2 == 1)
        elif spec.name == tn.FIXED:
            values.append(torch.arange(shape[0]) % 2 == 0)  # a grid row of factor 2
        elif spec.name == tn.LABELS:
            values.append(torch.arange(batch) % cell.model.config.num_classes)
        else:  # state, condition
            values.append(torch.randn(shape, generator=g))
    return values


def _metadata(kind: str, model: ImageModel, height: int, width: int) -> dict[str, str]:
    cfg = model.config
    return {
        "format": FORMAT, "kind": kind, "arch": arch_name(model), "channels": str(cfg.in_channels),
        "height": str(height), "width": str(width), "levels": str(cfg.levels), "num_classes": str(cfg.num_classes),
    }


def _export(module: nn.Module, args: list[torch.Tensor], path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], metadata: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic = {s.name: {s.batch_axis: "batch"} for s in inputs + outputs if s.batch_axis is not None}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape branches on static dims
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter, see the module notes
        warnings.filterwarnings("ignore", message="Constant folding")  # strided slices stay unfolded: harmless
        torch.onnx.export(
            module.eval(), tuple(args), str(path), dynamo=False, opset_version=OPSET, do_constant_folding=True,
            input_names=[s.name for s in inputs], output_names=[s.name for s in outputs], dynamic_axes=dynamic,
        )
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    got = ([i.name for i in proto.graph.input], [o.name for o in proto.graph.output])
    want = ([s.name for s in inputs], [s.name for s in outputs])
    if got != want:  # e.g. an input the graph never reads, which the exporter drops
        raise ValueError(f"{path}: exported inputs/outputs {got} differ from the declared {want}")
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, str(path))


def export_cell(cell: RowCell, path: str | Path, batch: int = 2) -> dict:
    """Export a row cell's flat forward; returns its description for the manifest."""
    cell.eval()
    inputs, outputs = cell_io(cell)
    _export(cell, example_cell_inputs(cell, batch), Path(path), inputs, outputs, _metadata("cell", cell.model, cell.height, cell.width))
    return {
        "kind": "cell", "file": Path(path).name, "height": cell.height, "width": cell.width,
        "channels": cell.channels, "levels": cell.levels, "k": cell.model.k,
        "state": [{"name": n, "input": tn.state_in(n), "output": tn.state_out(n), "shape": [BATCH, *s[1:]], "dtype": "float32"}
                  for n, s in cell.state_shapes(1)],
        "inputs": [s.to_json() for s in inputs], "outputs": [s.to_json() for s in outputs],
    }


# ---------------------------------------------------------------------------- scorer, condition

class ScorerGraph(nn.Module):
    """uint8 images (N, C, H, W) [+ labels (N,)] -> NLL in nats (N,), bits per dim (N,) and the
    per-sub-pixel NLL (N, C, H, W) the image NLL is the sum of.

    Calls model.pixel_nll, not the logits, because the multi-scale model's likelihood is not the
    plain sum over its logits. Values >= levels are the caller's to reject (the server does).
    """

    def __init__(self, model: ImageModel):
        super().__init__()
        self.model = model.eval()
        self.scale = 1.0 / (model.dims * math.log(2.0))

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        pixel = self.model.pixel_nll(images.long(), labels).float()  # (N, C, H, W)
        nll = pixel.flatten(1).sum(1)
        return nll, nll * self.scale, pixel


def scorer_io(model: ImageModel) -> tuple[list[TensorSpec], list[TensorSpec]]:
    cfg = model.config
    inputs = [TensorSpec(tn.IMAGES, "uint8", (BATCH, cfg.in_channels, cfg.height, cfg.width))]
    if cfg.num_classes:
        inputs.append(TensorSpec(tn.LABELS, "int64", (BATCH,)))
    return inputs, [TensorSpec(tn.NLL_NATS, "float32", (BATCH,)), TensorSpec(tn.BITS_PER_DIM, "float32", (BATCH,)),
                    TensorSpec(tn.PIXEL_NLL, "float32", (BATCH, cfg.in_channels, cfg.height, cfg.width))]


def example_images(model: ImageModel, batch: int, seed: int = 0) -> list[torch.Tensor]:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, cfg.levels, (batch, cfg.in_channels, cfg.height, cfg.width), generator=g).to(torch.uint8)
    return [images] + ([torch.arange(batch) % cfg.num_classes] if cfg.num_classes else [])


def export_scorer(model: ImageModel, path: str | Path, batch: int = 2) -> dict:
    inputs, outputs = scorer_io(model)
    cfg = model.config
    _export(ScorerGraph(model), example_images(model, batch), Path(path), inputs, outputs, _metadata("scorer", model, cfg.height, cfg.width))
    return {"kind": "scorer", "file": Path(path).name, "inputs": [s.to_json() for s in inputs], "outputs": [s.to_json() for s in outputs]}


class ConditionGraph(nn.Module):
    """Multi-scale: the small image (B, C, H/f, W/f) int64 -> the condition map (B, cond, H, W)."""

    def __init__(self, model: MultiScale):
        super().__init__()
        self.model = model.eval()

    def forward(self, small: torch.Tensor) -> torch.Tensor:
        return self.model.condition(small)


def condition_io(model: MultiScale) -> tuple[list[TensorSpec], list[TensorSpec]]:
    cfg, f = model.config, model.config.factor
    return (
        [TensorSpec(tn.SMALL_IMAGES, "int64", (BATCH, cfg.in_channels, cfg.height // f, cfg.width // f))],
        [TensorSpec(tn.CONDITION_MAP, "float32", (BATCH, model.big_model.condition_channels, cfg.height, cfg.width))],
    )


def example_small_images(model: MultiScale, batch: int, seed: int = 0) -> list[torch.Tensor]:
    return [model.subsample(example_images(model, batch, seed)[0].long())]


def export_condition(model: MultiScale, path: str | Path, batch: int = 2) -> dict:
    inputs, outputs = condition_io(model)
    cfg = model.config
    _export(ConditionGraph(model), example_small_images(model, batch), Path(path), inputs, outputs, _metadata("condition", model, cfg.height, cfg.width))
    return {"kind": "condition", "file": Path(path).name, "factor": cfg.factor,
            "inputs": [s.to_json() for s in inputs], "outputs": [s.to_json() for s in outputs]}


# ---------------------------------------------------------------------------- parity

def compare(name: str, got: np.ndarray, want, tol: float = TOLERANCE, rtol: float = 0.0) -> float:
    """Max abs difference of one output (allowed: tol + rtol * |want|); integer and bool outputs
    must be identical."""
    want = want.detach().cpu().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
    if got.shape != want.shape:
        raise ParityError(f"{name}: shape {got.shape} from onnxruntime, {want.shape} from torch")
    if want.dtype.kind in "biu":
        if not np.array_equal(got, want):
            raise ParityError(f"{name}: {int((got != want).sum())} of {got.size} values differ from torch")
        return 0.0
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    if not np.all(err <= tol + rtol * np.abs(want)):  # also catches NaN
        raise ParityError(f"{name}: max abs difference {err.max():.3g} exceeds {tol:g} + {rtol:g} * |value|")
    return float(err.max()) if err.size else 0.0


def _check(graph: OnnxGraph, module: nn.Module, args: list[torch.Tensor], tol: float, rtol: float = 0.0) -> float:
    with torch.no_grad():
        want = module(*args)
    want = want if isinstance(want, tuple) else (want,)
    got = graph.run({n: a.numpy() for n, a in zip(graph.input_names, args)})
    return max(compare(n, g, w, tol, rtol) for n, g, w in zip(graph.output_names, got, want))


def verify_cell(cell: RowCell, path: str | Path, batches=(1, 3), tol: float = TOLERANCE) -> float:
    """Run the exported cell and the torch cell on the same random inputs at each batch size,
    teacher-forced and mixed; raises ParityError, returns the max abs difference."""
    graph = OnnxGraph(path)
    return max(_check(graph, cell, example_cell_inputs(cell, b, seed=b, force=f), tol) for b in batches for f in (True, None))


def verify_scorer(model: ImageModel, path: str | Path, batches=(1, 3), tol: float = TOLERANCE, rtol: float = 1e-6) -> float:
    """Like verify_cell; the NLL is a float32 sum over every sub-pixel, so large images also get
    a relative allowance (a 28x28 256-level NLL of ~2000 nats carries float32 rounding of ~1e-4)."""
    graph = OnnxGraph(path)
    return max(_check(graph, ScorerGraph(model), example_images(model, b, seed=b), tol, rtol) for b in batches)


def verify_condition(model: MultiScale, path: str | Path, batches=(1, 3), tol: float = TOLERANCE) -> float:
    graph = OnnxGraph(path)
    return max(_check(graph, ConditionGraph(model), example_small_images(model, b, seed=b), tol) for b in batches)


# ---------------------------------------------------------------------------- per architecture

@dataclass
class Artifact:
    name: str  # key in the manifest: cell | small_cell | big_cell | condition | scorer
    export: Callable[[Path], dict]  # path -> description
    verify: Callable[[Path], float]  # path -> max abs difference from torch (raises ParityError)

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


def _cell_artifact(name: str, cell: RowCell) -> Artifact:
    return Artifact(name, lambda p: export_cell(cell, p), lambda p: verify_cell(cell, p))


def artifacts(model: ImageModel) -> list[Artifact]:
    """What to export for this model; raises ValueError for an architecture without a cell."""
    cell = build_cell(model)
    if isinstance(cell, MultiScaleSampler):
        out = [
            _cell_artifact("small_cell", cell.small),
            _cell_artifact("big_cell", cell.big),
            Artifact("condition", lambda p: export_condition(model, p), lambda p: verify_condition(model, p)),
        ]
    else:
        out = [_cell_artifact("cell", cell)]
    return out + [Artifact("scorer", lambda p: export_scorer(model, p), lambda p: verify_scorer(model, p))]
