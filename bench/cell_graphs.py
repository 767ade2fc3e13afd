"""What a row cell's exported graph is made of, and which onnxruntime settings run it fastest.

    python -m bench.cell_graphs --json bench/results/cell_graphs.json

For each architecture (random init, default sizes, 28x28 binary): the exported cell's node
count and op histogram, the same after onnxruntime's graph optimisations (what actually runs),
nodes per pixel, and the time of one batch-16 image (28 cell calls) under session-option
variants, interleaved, medians of --repeats with min/max, as ratios to the settings
runtime/onnx_graphs.make_session uses. A row cell is thousands of tiny ops run once per row, so
per-op overhead, not arithmetic, is its cost: the node count per pixel is the figure to watch.
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from bench.common import reexec_with_malloc_env, result, spread, write_json
from pixelrnn.export import onnx_export as ox
from pixelrnn.export.cells import build_cell
from pixelrnn.runtime.onnx_graphs import OnnxCell, make_session
from pixelrnn.training.models import build_model

ARCHS = ("pixelcnn", "gated_pixelcnn", "row_lstm", "diagonal_bilstm")
SIZE, BATCH = 28, 16
# name -> changes to make_session's options (None: make_session itself, the reference)
VARIANTS = {
    "make_session": None,
    "optimize_extended": {"graph_optimization_level": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED},
    "optimize_basic": {"graph_optimization_level": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC},
    "two_intra_op_threads": {"intra_op_num_threads": 2},
    "no_memory_pattern": {"enable_mem_pattern": False},
    "cpu_memory_arena": {"enable_cpu_mem_arena": True},  # make_session turns it off (memory given back)
}


def session(path: Path, changes: dict | None, optimized_out: Path | None = None) -> ort.InferenceSession:
    if changes is None and optimized_out is None:
        return make_session(path)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_cpu_mem_arena = False
    so.log_severity_level = 3
    for key, value in (changes or {}).items():
        setattr(so, key, value)
    if optimized_out is not None:
        so.optimized_model_filepath = str(optimized_out)
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def histogram(path: Path) -> dict[str, int]:
    ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    return dict(ops.most_common())


def sample_image(cell: OnnxCell, rng: np.random.Generator) -> np.ndarray:
    state, rows = cell.initial_state(BATCH), []
    temperature, force = np.ones(BATCH), np.zeros(BATCH, bool)
    forced = np.zeros((BATCH, cell.channels, cell.width), np.int64)
    for _ in range(cell.height):
        row, _, _, state = cell.run_row(state, rng.random((cell.width, cell.channels, BATCH)), temperature, forced, force)
        rows.append(row)
    return np.stack(rows, axis=2)


def bench_arch(arch: str, workdir: Path, repeats: int, size: int = SIZE) -> dict:
    torch.manual_seed(0)
    model = build_model(arch, dict(in_channels=1, height=size, width=size, levels=2)).eval()
    path = workdir / f"{arch}.onnx"
    ox.export_cell(build_cell(model), path)
    optimized = workdir / f"{arch}.optimized.onnx"
    session(path, {}, optimized_out=optimized)
    exported, run = histogram(path), histogram(optimized)
    cells = {}
    for name, changes in VARIANTS.items():
        cell = OnnxCell(path)
        cell.session = session(path, changes)
        cells[name] = cell
    images = {name: sample_image(cell, np.random.default_rng(0)) for name, cell in cells.items()}  # warm-up
    times = {name: [] for name in cells}
    for _ in range(repeats):  # interleaved, so that load from other processes hits every variant alike
        for name, cell in cells.items():
            rng = np.random.default_rng(0)
            start = time.perf_counter()
            sample_image(cell, rng)
            times[name].append(time.perf_counter() - start)
    reference = float(np.median(times["make_session"]))
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "nodes_exported": sum(exported.values()), "nodes_run": sum(run.values()),
        "nodes_run_per_pixel": sum(run.values()) / size,
        "ops_run": run, "ops_exported": exported,
        "identical_images": all((img == images["make_session"]).all() for img in images.values()),
        "image_batch_seconds": {name: {**spread(ts), "vs_make_session": float(np.median(ts)) / reference}
                                for name, ts in times.items()},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cell_graphs", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path)
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--size", type=int, default=SIZE, help="image height and width")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    payload = result("cell_graphs", config={"size": args.size, "batch": BATCH, "repeats": args.repeats}, results={})
    with tempfile.TemporaryDirectory(prefix="bench-cell-graphs-") as tmp:
        for arch in args.archs.split(","):
            print(f"{arch} ...", file=sys.stderr, flush=True)
            r = payload["results"][arch] = bench_arch(arch, Path(tmp), args.repeats, args.size)
            ratios = ", ".join(f"{n} {v['vs_make_session']:.2f}" for n, v in r["image_batch_seconds"].items())
            print(f"{arch:16s} nodes {r['nodes_exported']} exported, {r['nodes_run']} run "
                  f"({r['nodes_run_per_pixel']:.0f}/pixel); time vs make_session: {ratios}")
    if args.json:
        write_json(args.json, payload)
    return 0 if all(r["identical_images"] for r in payload["results"].values()) else 1


if __name__ == "__main__":
    reexec_with_malloc_env("bench.cell_graphs", sys.argv[1:])
    sys.exit(main())
