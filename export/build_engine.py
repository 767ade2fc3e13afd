"""Export a trained checkpoint for serving.

    python export/build_engine.py --checkpoint PATH [--out DIR] [--repository DIR] [--name NAME]
                                  [--tensorrt auto|on|off] [--fp16] [--max-batch N]
                                  [--background PATH [--ood-fpr F] [--calibration-images N]]

Writes into DIR (default build/export/NAME): one ONNX file per graph of the architecture
(export/onnx_export.py: the row cell(s), the multi-scale condition graph, the scorer), each
checked against the torch model right after export, and manifest.json, which describes
everything the server and the client need (architecture, config, image shape, levels, the
cells' state names and shapes, the tensor names, the files). Then, optionally:

  TensorRT  engines for the graphs TensorRT can build (not the cells: float64 sampling, see
            export/tensorrt_engine.py). `auto` builds them when TensorRT and a CUDA GPU are
            present and otherwise says why it skipped; `on` fails (exit 2) without them.
  --repository DIR  a self-contained Triton model repository (server/repository.py).
  --background PATH  with --repository: also the out-of-distribution detector NAME_ood over
            this background model (trained with training.train --perturb) and the model
            (export/detector.py, runtime/ood.py), its threshold calibrated on the model's
            validation images at false-positive rate --ood-fpr.

Exit codes: 0 done, 1 an export failed its parity check, 2 bad checkpoint or arguments, or
--tensorrt on without TensorRT.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: `python export/build_engine.py`
    sys.path.insert(0, str(REPO))

import onnxruntime  # noqa: E402
import torch  # noqa: E402

from pixelrnn.runtime import tensor_names  # noqa: E402
from pixelrnn.runtime.manifest import FORMAT, MANIFEST, file_sha256  # noqa: E402
from pixelrnn.export.onnx_export import OPSET, TOLERANCE, Artifact, ParityError, artifacts  # noqa: E402
from pixelrnn.server.repository import write_repository  # noqa: E402
from pixelrnn.server.engine.admission import DEFAULT_MEMORY_MB  # noqa: E402
from pixelrnn.export.tensorrt_engine import MAX_BATCH, EngineError, float64_tensors, tensorrt_available  # noqa: E402
from pixelrnn.training.checkpoint import CheckpointError, load_model  # noqa: E402



def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file written by training.train")
    p.add_argument("--out", help="output folder (default build/export/NAME)")
    p.add_argument("--repository", help="also write a Triton model repository here")
    p.add_argument("--name", help="model name (default: the architecture)")
    p.add_argument("--tensorrt", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--fp16", action="store_true", help="let TensorRT use FP16 kernels")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH, help="largest batch of the TensorRT profile and the server")
    p.add_argument("--sampler-memory-mb", type=float, default=DEFAULT_MEMORY_MB,
                   help="with --repository: the sampler's memory for live sequences, which sets its live-images budget "
                        f"(server/engine/admission.py; default {DEFAULT_MEMORY_MB})")
    p.add_argument("--background", help="with --repository: a background model's checkpoint; adds the "
                   "out-of-distribution detector NAME_ood (likelihood ratio against it)")
    p.add_argument("--background-name", help="its model name (default NAME_background)")
    p.add_argument("--ood-fpr", type=float, default=0.05, help="the detector's false-positive rate on in-distribution "
                   "validation images, which sets its threshold (default 0.05)")
    p.add_argument("--calibration-images", type=int, default=2000,
                   help="validation images the threshold is calibrated on (0: the whole split; default 2000)")
    p.add_argument("--data-dir", help="where the model's data set lives, for the calibration (default: its usual place)")
    args = p.parse_args(argv)
    if args.max_batch < 1:
        p.error("--max-batch must be at least 1")
    if args.background and not args.repository:
        p.error("--background needs --repository (the detector is a model of the repository)")
    if not 0 < args.ood_fpr < 1:
        p.error(f"--ood-fpr must be in (0, 1), got {args.ood_fpr}")
    if args.calibration_images < 0:
        p.error(f"--calibration-images must be >= 0, got {args.calibration_images}")
    return args


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def base_manifest(name: str, model, ckpt: dict, checkpoint: Path, max_batch: int) -> dict:
    cfg = model.config
    shape = [cfg.in_channels, cfg.height, cfg.width]
    multiscale = None
    if ckpt["arch"] == "multiscale":
        f = cfg.factor
        multiscale = {"factor": f, "small_shape": [cfg.in_channels, cfg.height // f, cfg.width // f], "base_arch": cfg.base_arch}
    return {
        "format": FORMAT, "name": name, "arch": ckpt["arch"], "config": dict(ckpt["config"]),
        "shape": shape, "levels": cfg.levels, "k": model.k, "num_classes": cfg.num_classes,
        "multiscale": multiscale, "max_batch": max_batch,
        # Sampling runs these cells in order, one uniform row (W, C, B) per row of each; the
        # big cell also gets row i of the condition graph's output and the grid columns.
        "stages": ["small_cell", "big_cell"] if multiscale else ["cell"],
        # The file's name and checksum, not its path: a repository must not depend on the machine that built it.
        "checkpoint": {"file": checkpoint.name, "sha256": file_sha256(checkpoint), "step": ckpt.get("step"),
                       "metrics": ckpt.get("metrics", {})},
        "export": {"exporter": "torch.onnx TorchScript (dynamo=False)", "opset": OPSET, "torch": torch.__version__,
                   "onnxruntime": onnxruntime.__version__},
        "tensor_names": tensor_names.all_names(),
        "artifacts": {}, "files": [],
    }


def export_all(plan: list[Artifact], out: Path, manifest: dict) -> None:
    for art in plan:
        path = out / art.file
        t0 = time.perf_counter()
        desc = art.export(path)
        t1 = time.perf_counter()
        try:
            err = art.verify(path)
        except ParityError as e:
            raise ParityError(f"{art.name} ({path}) failed its parity check against torch: {e}") from None
        t2 = time.perf_counter()
        size = path.stat().st_size
        # Neither timings nor the measured difference (it varies in the last bits with the CPU): the same
        # checkpoint must give the same manifest on every machine (the checked-in repository is tested for it).
        desc.update(bytes=size, sha256=file_sha256(path), parity="passed", parity_tolerance=TOLERANCE)
        manifest["artifacts"][art.name] = desc
        manifest["files"].append(art.file)
        print(f"  {art.name:<11} {art.file:<17} {size / 1024:8.1f} KiB  export {t1 - t0:5.1f} s  "
              f"parity {err:.1e} ({t2 - t1:.1f} s)", flush=True)


def tensorrt_step(args, out: Path, manifest: dict) -> int:
    """Build engines where possible; returns an exit code (0 also when skipped under auto)."""
    if args.tensorrt == "off":
        manifest["tensorrt"] = {"built": False, "reason": "--tensorrt off"}
        return 0
    ok, why = tensorrt_available()
    if not ok:
        manifest["tensorrt"] = {"built": False, "reason": why}
        if args.tensorrt == "on":
            return fail(f"--tensorrt on, but TensorRT cannot run here: {why}")
        print(f"TensorRT skipped: {why}")
        return 0
    from pixelrnn.export.tensorrt_engine import build_engine, check_engine

    engines, skipped = {}, {}
    for name, desc in manifest["artifacts"].items():
        onnx_path = out / desc["file"]
        doubles = float64_tensors(onnx_path)
        if doubles:
            skipped[name] = f"float64 tensors ({len(doubles)}), which TensorRT does not support: stays on onnxruntime"
            print(f"  {name:<11} TensorRT skipped: {skipped[name]}")
            continue
        t0 = time.perf_counter()
        try:
            plan = build_engine(onnx_path, out / f"{name}.plan", max_batch=args.max_batch, fp16=args.fp16)
            err = check_engine(plan, onnx_path, tol=5e-2 if args.fp16 else 1e-3)
        except (EngineError, ParityError) as e:
            return fail(f"TensorRT engine for {name}: {e}", code=1)
        engines[name] = {"file": plan.name, "sha256": file_sha256(plan), "fp16": args.fp16, "max_abs_diff_vs_onnxruntime": err}
        manifest["files"].append(plan.name)
        print(f"  {name:<11} {plan.name:<17} {plan.stat().st_size / 1024:8.1f} KiB  TensorRT {time.perf_counter() - t0:5.1f} s  parity {err:.1e}")
    manifest["tensorrt"] = {"built": True, "detail": why, "engines": engines, "skipped": skipped}
    return 0


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    checkpoint = Path(args.checkpoint)
    try:
        model, ckpt = load_model(checkpoint)
    except CheckpointError as e:
        return fail(str(e).splitlines()[0])
    if args.tensorrt == "on":  # fail before minutes of export, not after
        ok, why = tensorrt_available()
        if not ok:
            return fail(f"--tensorrt on, but TensorRT cannot run here: {why}")
    try:
        plan = artifacts(model)
    except ValueError as e:  # an architecture without a row cell
        return fail(f"{checkpoint}: cannot export {ckpt['arch']}: {e}")
    name = args.name or ckpt["arch"]
    out = Path(args.out) if args.out else REPO / "build" / "export" / name
    out.mkdir(parents=True, exist_ok=True)
    manifest = base_manifest(name, model, ckpt, checkpoint, args.max_batch)

    print(f"exporting {checkpoint} ({ckpt['arch']}, step {ckpt.get('step')}) to {out}", flush=True)
    try:
        export_all(plan, out, manifest)
    except ParityError as e:
        return fail(str(e), code=1)
    code = tensorrt_step(args, out, manifest)
    write_json(out / MANIFEST, manifest)
    print(f"manifest: {out / MANIFEST}")
    if code:
        return code
    if args.repository:
        try:
            write_repository(manifest, out, Path(args.repository), sampler_memory_mb=args.sampler_memory_mb)
            print(f"Triton model repository written to {args.repository}")
        except (OSError, ValueError) as e:  # e.g. a --name Triton cannot use, an unwritable folder
            return fail(f"Triton repository {args.repository}: {e}")
    if args.background:
        return export_background(args, manifest, model, ckpt, out.parent)
    return 0


def export_background(args, manifest: dict, model, ckpt: dict, build: Path) -> int:
    """The background model's scorer and the detector NAME_ood (export/detector.py)."""
    from pixelrnn.export.detector import add_detector
    from pixelrnn.runtime.datasets import DataError
    from pixelrnn.server.detector import check_pair

    checkpoint = Path(args.background)
    try:
        background, bg_ckpt = load_model(checkpoint)
    except CheckpointError as e:
        return fail(f"--background: {str(e).splitlines()[0]}")
    name = args.background_name or f"{manifest['name']}_background"
    bg_manifest = base_manifest(name, background, bg_ckpt, checkpoint, args.max_batch)
    try:
        check_pair(manifest, bg_manifest)
    except ValueError as e:
        return fail(f"--background {checkpoint}: {e}")
    out = build / name
    out.mkdir(parents=True, exist_ok=True)
    print(f"exporting the background model {checkpoint} ({bg_ckpt['arch']}, step {bg_ckpt.get('step')}) to {out}", flush=True)
    try:
        export_all([a for a in artifacts(background) if a.name == "scorer"], out, bg_manifest)
    except ParityError as e:
        return fail(str(e), code=1)
    bg_manifest["tensorrt"] = {"built": False, "reason": "background scorer: onnxruntime only"}
    write_json(out / MANIFEST, bg_manifest)
    try:
        threshold = add_detector(manifest, model, ckpt, bg_manifest, checkpoint, out, Path(args.repository),
                                 args.ood_fpr, args.calibration_images, args.data_dir)
    except (DataError, OSError, ValueError) as e:
        return fail(f"out-of-distribution detector: {e}")
    print(f"detector {manifest['name']}_ood written: {threshold.score} above {threshold.value:.3f} is out of distribution "
          f"({threshold.false_positive_rate:g} of {threshold.calibration_images} validation images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
