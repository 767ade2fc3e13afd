"""What the row engine loses by batching separate sequences instead of one big one, in process.

    python -m bench.engine_batching --json bench/results/engine_batching.json [--model-dir DIR]
                                    [--streams 16] [--repeats 9]

The serving engine (server/engine/, as the Triton sampler runs it, stepped on this thread by
bench.common.sample_engine) samples, interleaved --repeats times, medians:
  one_image      one sequence of one image;
  one_sequence   one sequence of --streams images (every row one cell call of --streams);
  sequences      --streams sequences of one image each, batched by the engine into the same calls;
  cell_one_image, cell_one_sequence
                 the (first stage's) cell alone, one call per image row on fixed inputs, for
                 one image and for --streams images: no row loop, no engine.
`bound` = streams x one_image / one_sequence: no batching of separate single-image sequences can
beat one sequence of them all, so this is the most --streams single-image streams can gain over
one (bench/serving.py's 16-stream target; it measures the same bound through Triton).
`scaling` = streams x one_image / sequences is what the engine gets, `share` = scaling / bound,
and `per_sequence_row_us` the engine's extra time per row of each separate sequence: its
states, random numbers and row bookkeeping, the part that batching does not share.
`cell_bound` = streams x cell_one_image / cell_one_sequence: how much more a call of --streams
images yields than a call of one, the cell's own batching, which bounds `bound` in turn. Every
batched image must equal the same seed sampled alone (`identical`; exit status 1 otherwise).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from bench.common import (finish, interleaved, labels_for, machine_info, model_record, reexec_with_malloc_env, result,
                          sample_engine, spread, timing_cells)
from pixelrnn.runtime.manifest import read_manifest
from pixelrnn.runtime.rowloop import RowSequence, SampleSpec
from pixelrnn.runtime.runner import OnnxRunner

# The sampler's version folder of the committed repository (the JSON's "model" names the model).
DEFAULT_MODEL_DIR = "model_repository/gated_pixelcnn_binarized_mnist_sample/1"


def run(args) -> tuple[dict, dict]:
    """-> (the results, the model's manifest)."""
    folder = Path(args.model_dir)
    manifest = read_manifest(folder)
    runner = OnnxRunner.from_manifest(manifest, folder)
    n, max_batch, shape = args.streams, int(manifest["max_batch"]), tuple(manifest["shape"])
    if not 1 <= n <= max_batch:
        raise SystemExit(f"--streams must be in [1, {max_batch}] (the model's max batch), got {n}")
    singles = [SampleSpec(batch=1, seed=args.seed + k, labels=labels_for(manifest, 1, k)) for k in range(n)]

    def cell_calls(spec: SampleSpec):
        """One image's worth of rows (H calls) of the first cell, on one row's fixed inputs."""
        seq = RowSequence.open(runner, spec)
        inputs, state = seq.inputs(), seq.state

        def rows():
            for _ in range(runner.stages[0].height):
                runner.run_row(0, state, **inputs)  # each output dropped at once, as the engine's are
        return rows

    paths = {
        "one_image": lambda: sample_engine(runner, max_batch, singles[:1], shape),
        "one_sequence": lambda: sample_engine(runner, max_batch, [SampleSpec(batch=n, seed=args.seed,
                                                                            labels=labels_for(manifest, n))], shape),
        "sequences": lambda: sample_engine(runner, max_batch, singles, shape),
        "cell_one_image": cell_calls(singles[0]),
        "cell_one_sequence": cell_calls(SampleSpec(batch=n, seed=args.seed, labels=labels_for(manifest, n))),
    }
    # Warm-up of every path, and the check: every batched image is the one its seed gives alone.
    batched = paths["sequences"]()
    alone = [sample_engine(runner, max_batch, [spec], shape)[0] for spec in singles]
    identical = all(np.array_equal(a, b) for a, b in zip(batched, alone))
    for k in ("one_sequence", "cell_one_image", "cell_one_sequence"):  # one_image was warmed up by `alone`
        paths[k]()
    t = {k: spread(v) for k, v in interleaved(paths, args.repeats, warmup=False).items()}
    one, whole, seqs = (t[k]["seconds"] for k in ("one_image", "one_sequence", "sequences"))
    c, h, w = shape
    bound, scaling = n * one / whole, n * one / seqs
    return {"paths": t, "bound": bound, "scaling": scaling, "share": scaling / bound,
            "cell_bound": n * t["cell_one_image"]["seconds"] / t["cell_one_sequence"]["seconds"],
            "per_sequence_row_us": 1e6 * (seqs - whole) / (n * h), "identical": identical,
            "model": {"dir": str(folder), "arch": manifest["arch"], "shape": [c, h, w]}}, manifest


def report(payload: dict) -> str:
    r, n = payload["results"], payload["config"]["streams"]
    lines = [f"{'path':<44}{'median s':>10}{'min-max s':>17}"]
    for k, label in (("one_image", "one sequence of one image"), ("one_sequence", f"one sequence of {n} images"),
                     ("sequences", f"{n} sequences of one image"), ("cell_one_image", "the cell alone, one image"),
                     ("cell_one_sequence", f"the cell alone, {n} images")):
        lines.append(f"  {label:<42}{timing_cells(r['paths'][k], 4)}")
    lines.append(f"bound {r['bound']:.2f}x one image, engine {r['scaling']:.2f}x ({100 * r['share']:.0f}% of the bound); "
                 f"{r['per_sequence_row_us']:.0f} us more per row of each separate sequence; "
                 f"identical images: {'yes' if r['identical'] else 'NO'}")
    lines.append(f"the cell alone: {n} images per call yield {r['cell_bound']:.2f}x one image per call (the cell's own batching)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.engine_batching", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path)
    p.add_argument("--model-dir", default=DEFAULT_MODEL_DIR, help="a sampler's version folder (manifest.json and cells)")
    p.add_argument("--streams", type=int, default=16, help="images: one sequence of them, or that many sequences")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    machine = machine_info()  # before the run: its load average
    measured, manifest = run(args)
    payload = result("engine_batching", model_record(manifest, folder=args.model_dir), machine,
                     config={"streams": args.streams, "repeats": args.repeats, "seed": args.seed}, results=measured)
    finish(payload, args.json, report(payload))
    return 0 if measured["identical"] else 1


if __name__ == "__main__":
    reexec_with_malloc_env("bench.engine_batching", sys.argv[1:])
    sys.exit(main())
