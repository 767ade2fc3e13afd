"""onnxruntime runners of the exported graphs (export/onnx_export.py writes them): a row cell
with RowCell.run_row's semantics on numpy arrays, the scorer and the multi-scale condition graph.
numpy + onnxruntime only. Each file carries metadata (kind, image size, levels, classes), so a
runner needs nothing but the file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from pixelrnn.runtime import tensor_names as tn


def make_session(path: str | Path, threads: int = 1) -> ort.InferenceSession:
    """A CPU session tuned for small graphs run once per row: the unrolled cell is thousands of
    tiny ops, where thread hand-offs cost more than they save, so by default one thread, no
    inter-op parallelism, and no spinning (idle threads would burn cores shared with others);
    no memory arena (below)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # No CPU memory arena: the arena keeps every buffer it ever grew to, so a sampler that held a
    # flood of sequences would keep that memory for good; without it the allocator gives it back
    # once the engine trims after going idle (server/engine/admission.py). Its cost in sampling time:
    # bench/results/cell_graphs.json, variant cpu_memory_arena.
    so.enable_cpu_mem_arena = False
    so.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


class OnnxGraph:
    def __init__(self, path: str | Path, threads: int = 1):
        self.path = Path(path)
        self.session = make_session(path, threads)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.channels, self.height, self.width = (int(self.metadata[k]) for k in ("channels", "height", "width"))
        self.levels, self.num_classes = int(self.metadata["levels"]), int(self.metadata["num_classes"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, feed)


class OnnxCell(OnnxGraph):
    """An exported cell with RowCell.run_row's semantics, on numpy arrays."""

    def __init__(self, path: str | Path, threads: int = 1):
        super().__init__(path, threads)
        self._state_inputs = [i for i in self.session.get_inputs() if i.name.startswith(tn.STATE_IN_PREFIX)]
        self.state_names = [tn.state_name(i.name) for i in self._state_inputs]
        self.conditioned = tn.CONDITION in self.input_names

    def initial_state(self, batch: int) -> tuple[np.ndarray, ...]:
        return tuple(np.zeros([d if isinstance(d, int) else batch for d in i.shape], np.float32) for i in self._state_inputs)

    def run_row(self, state, uniforms, temperature, forced, force, labels=None, condition=None, fixed=None):
        """-> (row (B, C, W) int64, logprob (B,) float32, logits (B, C, K, W), new state tuple)."""
        feed = {tn.state_in(n): np.asarray(s, np.float32) for n, s in zip(self.state_names, state)}
        feed.update({
            tn.UNIFORMS: np.asarray(uniforms, np.float64), tn.TEMPERATURE: np.asarray(temperature, np.float64),
            tn.FORCED: np.asarray(forced, np.int64), tn.FORCE: np.asarray(force, bool),
        })
        if self.conditioned:
            if condition is None or fixed is None:
                raise ValueError("this cell needs condition and fixed (the multi-scale big cell)")
            feed[tn.CONDITION], feed[tn.FIXED] = np.asarray(condition, np.float32), np.asarray(fixed, bool)
        if self.num_classes:
            if labels is None:
                raise ValueError("this cell is class-conditional: labels are required")
            feed[tn.LABELS] = np.asarray(labels, np.int64)
        row, logprob, logits, *new_state = self.run(feed)
        return row, logprob, logits, tuple(new_state)


class OnnxScorer(OnnxGraph):
    def score(self, images: np.ndarray, labels: np.ndarray | None = None, per_pixel: bool = False) -> tuple[np.ndarray, ...]:
        """uint8 images (N, C, H, W) -> (nll nats (N,), bits per dim (N,)), and with per_pixel
        the NLL of each sub-pixel (N, C, H, W) as a third (only then copied out of the session)."""
        feed = {tn.IMAGES: np.asarray(images, np.uint8)}
        if self.num_classes:
            if labels is None:
                raise ValueError("this scorer is class-conditional: labels are required")
            feed[tn.LABELS] = np.asarray(labels, np.int64)
        wanted = [tn.NLL_NATS, tn.BITS_PER_DIM] + ([tn.PIXEL_NLL] if per_pixel else [])
        return tuple(self.session.run(wanted, feed))


class OnnxCondition(OnnxGraph):
    def __call__(self, small: np.ndarray) -> np.ndarray:
        return self.run({tn.SMALL_IMAGES: np.asarray(small, np.int64)})[0]
