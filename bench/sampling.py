"""Sampling benchmark: the naive reference sampler against the cached row cells in torch and in
onnxruntime, and all of them against one scoring pass.

    python -m bench.sampling --json bench/results/sampling.json --naive-rows 4 --threads 1

For each architecture, one model (random init, or --checkpoint), one batch and one seed:
    naive  training.sample.sample_reference: one full forward pass per sub-pixel
    torch  export.cells.sample_cached: the row cells (per-pixel work only)
    onnx   the same cells exported to a temp dir (untimed) and run row by row in onnxruntime
    score  one model.nll pass over the sampled batch in torch, the floor a sampler is held to:
           a sampler cannot beat one pass over the image by much, so sampling/score >= ~1
All three samplers use the project's uniform stream, so they must draw the same images; the
bench compares them (`identical`) and exits with status 1 when they differ.

Naive sampling of a 28x28 batch takes ~30 s per architecture on a 2-core CPU. --naive-rows N
times only the first N rows (of each stage, for multi-scale) and extrapolates by the number of
sub-pixels: each one costs exactly one full forward pass wherever it is, so the cost is linear
(`naive_extrapolated_from_rows` in the JSON); then only the naive sampler's finished pixels are
compared. Every path (naive included) runs --repeats times after one warm-up run, the paths
interleaved so that load from other processes hits them alike; each reports the median (its
`seconds`, which every speedup and target uses) with min, max and all runs, and the load
average is recorded before and after. The targets (>= 100x over naive for PixelCNN-type
models, >= 30x for the LSTMs; sampling at most 3x a scoring pass for the PixelCNN and 5x for
every other architecture, the scoring pass being the physical floor of about 1) are recorded in
"targets" as met / not met, not enforced.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import finish, load_average, machine_line, reexec_with_malloc_env, result, spread, timed
from pixelrnn.export import onnx_export as ox
from pixelrnn.export.cells import CELLS, build_cell, sample_cached
from pixelrnn.runtime import rowloop
from pixelrnn.runtime.onnx_graphs import OnnxCell, OnnxCondition
from pixelrnn.runtime.randomness import draw_row_uniforms, sampling_rng
from pixelrnn.runtime.rowloop import SampleSpec
from pixelrnn.runtime.runner import OnnxRunner
from pixelrnn.training.models import ARCHITECTURES, build_model, config_class
from pixelrnn.training.models.multiscale import MultiScale
from pixelrnn.training.sample import autoregress, sample_reference

LSTM_ARCHS = {"row_lstm", "diagonal_bilstm"}
SPEEDUP_TARGET = {"pixelcnn_type": 100.0, "lstm": 30.0}  # over naive, best cached path
# Sampling time / one scoring pass of the same batch, at most (issue 13's cost floor).
VS_SCORING_TARGET = {"pixelcnn": 3.0}
VS_SCORING_DEFAULT = 5.0
WARMUP_PASSES = 2  # full forward passes before the naive timing


def default_archs() -> list[str]:
    return [name for name, (_, cls) in ARCHITECTURES.items() if cls in CELLS]


def family(model) -> str:
    base = model.config.base_arch if isinstance(model, MultiScale) else ox.arch_name(model)
    return "lstm" if base in LSTM_ARCHS else "pixelcnn_type"


def build(arch: str, args) -> torch.nn.Module:
    fields = dict(in_channels=1, height=args.size, width=args.size, levels=args.levels)
    known = {f.name for f in dataclasses.fields(config_class(arch))}
    fields.update({k: getattr(args, k) for k in ("hidden", "layers") if getattr(args, k) is not None and k in known})
    torch.manual_seed(args.seed)
    return build_model(arch, fields).eval()


def labels_for(model, n: int) -> np.ndarray | None:
    k = model.config.num_classes
    return np.arange(n) % k if k else None


def as_torch(labels, device="cpu"):
    return None if labels is None else torch.from_numpy(labels).to(device)


# ---------------------------------------------------------------------------- naive

def _naive_rows(forward, canvas: torch.Tensor, levels: int, rng, rows: int, fixed: torch.Tensor | None = None):
    """The reference sampler's loop over the first `rows` rows of canvas (n, C, H, W), in place,
    then the untimed draws of the other rows' uniforms so that the stream stays aligned.
    -> (seconds, fraction of the stage's forward passes that were timed)."""
    n, c, h, w = canvas.shape
    part = canvas[:, :, :rows]  # a view: autoregress writes into canvas
    seconds, _ = timed(lambda: autoregress(lambda _: forward(canvas), part, levels, rng, 1.0,
                                           fixed=None if fixed is None else fixed[:rows]))
    for _ in range(h - rows):
        draw_row_uniforms(rng, n, c, w)
    free = torch.ones(h, w, dtype=torch.bool) if fixed is None else ~fixed
    return seconds, float(free[:rows].sum() / free.sum())


@torch.no_grad()
def naive_sample(model, n: int, seed: int, labels: np.ndarray | None, rows: int | None) -> dict:
    """Reference sampling of the whole batch, or of its first `rows` rows with the time
    extrapolated. -> image (n, C, H, W) uint8, measured and (extrapolated) seconds, and `exact`,
    a bool (H, W) mask of the pixels the naive sampler finished."""
    cfg = model.config
    h, w = cfg.height, cfg.width
    if rows is None or rows >= h:
        seconds, image = timed(lambda: sample_reference(model, n, seed, labels=labels))
        return dict(image=image, measured=seconds, seconds=seconds, exact=np.ones((h, w), bool))
    dev = next(model.parameters()).device
    rng, lt, exact = sampling_rng(seed), as_torch(labels, dev), np.zeros((h, w), bool)
    canvas = torch.zeros(n, cfg.in_channels, h, w, dtype=torch.long, device=dev)
    if isinstance(model, MultiScale):  # small image, then big: each stage timed and scaled on its own
        f = cfg.factor
        small = torch.zeros(n, cfg.in_channels, h // f, w // f, dtype=torch.long, device=dev)
        rs = min(rows, h // f)
        t_small, frac_small = _naive_rows(lambda x: model.small_model(x, lt), small, cfg.levels, rng, rs)
        canvas[:, :, ::f, ::f] = small
        t_cond, condition = timed(lambda: model.condition(small))
        t_big, frac_big = _naive_rows(lambda x: model.big_model(x, lt, condition=condition), canvas, cfg.levels, rng,
                                      rows, fixed=model.grid_mask())
        measured, seconds = t_small + t_cond + t_big, t_small / frac_small + t_cond + t_big / frac_big
        exact[:rs * f:f, ::f] = True
        if rs == h // f:  # the big rows are final only once the whole small image is
            exact[:rows] = True
    else:
        measured, frac = _naive_rows(lambda x: model(x, lt), canvas, cfg.levels, rng, rows)
        seconds = measured / frac
        exact[:rows] = True
    return dict(image=canvas.cpu().numpy().astype(np.uint8), measured=measured, seconds=seconds, exact=exact)


# ---------------------------------------------------------------------------- onnx

class OnnxSampler:
    """The model's cells exported to `directory`, sampled with onnxruntime through the row loop."""

    def __init__(self, model, directory: Path, threads: int):
        paths = {}
        for art in ox.artifacts(model):
            if art.name != "scorer":
                art.export(directory / art.file)
                paths[art.name] = directory / art.file
        if isinstance(model, MultiScale):
            cells = [OnnxCell(paths["small_cell"], threads), OnnxCell(paths["big_cell"], threads)]
            self.runner = OnnxRunner(cells, OnnxCondition(paths["condition"], threads), model.config.factor)
        else:
            self.runner = OnnxRunner([OnnxCell(paths["cell"], threads)])

    def sample(self, n: int, seed: int, labels: np.ndarray | None) -> np.ndarray:
        return rowloop.sample(self.runner, SampleSpec(batch=n, seed=seed, labels=labels))


# ---------------------------------------------------------------------------- one architecture

def bench_model(model, args, workdir: Path) -> dict:
    cfg, n = model.config, args.batch
    labels = labels_for(model, n)
    pixels = n * cfg.height * cfg.width
    export_seconds, onnx = timed(lambda: OnnxSampler(model, workdir, args.threads))  # exported from the CPU model
    model = model.to(args.device)  # the torch paths run there; the cell is built from the moved model
    lt = as_torch(labels, args.device)
    cell = build_cell(model)

    def torch_path():
        return sample_cached(cell, n, args.seed, labels=lt, device=args.device)

    def onnx_path():
        return onnx.sample(n, args.seed, labels)

    # Warm-up runs (untimed); being deterministic, they are also the images compared below.
    torch_image, onnx_image = torch_path(), onnx_path()
    x = torch.from_numpy(torch_image).long().to(args.device)

    @torch.no_grad()
    def score():
        return model.nll(x, lt)

    score()
    with torch.no_grad():
        for _ in range(WARMUP_PASSES):
            model(x, lt)
    # Every path the same number of times, interleaved, so that load from other processes hits
    # them alike; the naive path's time per repeat is extrapolated from its rows (see the notes).
    runs = {"naive": [], "naive_measured": [], "torch": [], "onnx": [], "score": []}
    for _ in range(args.repeats):
        naive = naive_sample(model, n, args.seed, labels, args.naive_rows)
        runs["naive"].append(naive["seconds"])
        runs["naive_measured"].append(naive["measured"])
        for name, fn in (("torch", torch_path), ("onnx", onnx_path), ("score", score)):
            runs[name].append(timed(fn)[0])
    partial = args.naive_rows if args.naive_rows is not None and args.naive_rows < cfg.height else None

    scoring = spread(runs["score"])
    scoring["images_per_s"] = n / scoring["seconds"]
    naive_stats = spread(runs["naive"])
    result = {
        "model": {"arch": ox.arch_name(model), "config": dataclasses.asdict(cfg),
                  "parameters": sum(p.numel() for p in model.parameters()), "family": family(model)},
        "pixels": pixels,
        "naive": {
            **naive_stats,  # extrapolated to the whole batch when run on some rows
            "measured_seconds": statistics.median(runs["naive_measured"]),
            "pixels_per_s": pixels / naive_stats["seconds"],
            "full": partial is None,
            "naive_extrapolated_from_rows": partial,
        },
        "scoring": scoring,
    }
    for name, path_runs in (("torch", runs["torch"]), ("onnx", runs["onnx"])):
        stats = spread(path_runs)
        result[f"cached_{name}"] = {
            **stats,
            "pixels_per_s": pixels / stats["seconds"],
            "speedup_over_naive": naive_stats["seconds"] / stats["seconds"],  # ratios of medians
            "vs_scoring": stats["seconds"] / scoring["seconds"],
        }
    result["cached_onnx"]["export_seconds"] = export_seconds

    exact = naive["exact"]  # (H, W): compare where the naive sampler ran
    same_cached = bool(np.array_equal(torch_image, onnx_image))
    same_naive = bool(np.array_equal(naive["image"][:, :, exact], torch_image[:, :, exact]))
    result.update({
        "identical": same_cached and same_naive,
        "identical_torch_onnx": same_cached,
        "identical_naive_torch": same_naive,
        "naive_compared_pixels_per_image": int(exact.sum()),
    })
    return result


def targets(arch: str, model_family: str, r: dict) -> dict:
    best = "onnx" if r["cached_onnx"]["seconds"] <= r["cached_torch"]["seconds"] else "torch"
    speedup, vs_scoring = r[f"cached_{best}"]["speedup_over_naive"], r[f"cached_{best}"]["vs_scoring"]
    want = SPEEDUP_TARGET[model_family]
    at_most = VS_SCORING_TARGET.get(arch, VS_SCORING_DEFAULT)
    return {
        "family": model_family, "best_path": best,
        "speedup_over_naive": speedup, "speedup_target": want, "speedup_met": speedup >= want,
        "vs_scoring": vs_scoring, "vs_scoring_target": at_most, "vs_scoring_met": vs_scoring <= at_most,
    }


# ---------------------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.sampling", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--archs", default=",".join(default_archs()), help="comma-separated architectures")
    p.add_argument("--checkpoint", help="benchmark this trained model (its arch, size and levels) instead")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=28, help="image height and width")
    p.add_argument("--levels", type=int, default=2)
    p.add_argument("--hidden", type=int, help="override the architecture default (random init only)")
    p.add_argument("--layers", type=int, help="override the architecture default (random init only)")
    p.add_argument("--threads", type=int, default=min(2, torch.get_num_threads()), help="torch and onnxruntime intra-op threads")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of every path (the median counts)")
    p.add_argument("--naive-rows", type=int, help="time only this many rows of the naive sampler and extrapolate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the torch paths (naive, torch cells, scoring) run; the onnxruntime cells stay on the CPU")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here")
    for name in ("batch", "size", "threads", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.naive_rows is not None and args.naive_rows < 1:
        p.error("--naive-rows must be at least 1")
    args.archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = [a for a in args.archs if a not in default_archs()]
    if unknown:
        p.error(f"no row cells for {', '.join(unknown)}; known: {', '.join(default_archs())}")
    return args


def models(args):
    if args.checkpoint:
        from pixelrnn.training.checkpoint import load_model

        model, _ = load_model(args.checkpoint)
        yield ox.arch_name(model), model
        return
    for arch in args.archs:
        yield arch, build(arch, args)


def fmt_row(arch: str, r: dict) -> str:
    naive = r["naive"]
    mark = "*" if naive["naive_extrapolated_from_rows"] else " "
    t, o = r["cached_torch"], r["cached_onnx"]
    return (f"{arch:<16}{naive['seconds']:>8.2f}{mark}{naive['pixels_per_s']:>9.0f}"
            f"{t['seconds']:>9.3f}{t['pixels_per_s']:>9.0f}{t['speedup_over_naive']:>7.0f}x"
            f"{o['seconds']:>9.3f}{o['pixels_per_s']:>9.0f}{o['speedup_over_naive']:>7.0f}x"
            f"{r['scoring']['seconds'] * 1e3:>9.1f}{t['vs_scoring']:>7.1f}{o['vs_scoring']:>7.1f}"
            f"  {'yes' if r['identical'] else 'NO'}")


def report(payload: dict) -> str:
    head = (f"{'arch':<16}{'naive s':>9}{'px/s':>9}{'torch s':>9}{'px/s':>9}{'x':>8}"
            f"{'onnx s':>9}{'px/s':>9}{'x':>8}{'score ms':>9}{'t/sc':>7}{'o/sc':>7}  same")
    lines = [head, "-" * len(head)] + [fmt_row(a, r) for a, r in payload["results"].items()]
    cfg = payload["config"]
    if cfg["naive_rows"]:
        lines.append(f"* naive time extrapolated from the first {cfg['naive_rows']} rows (of each stage)")
    lines.append("x: speedup over naive; t/sc, o/sc: sampling time / one scoring pass; same: identical images")
    for arch, t in payload["targets"]["per_arch"].items():
        lines.append(f"{arch}: {t['best_path']} {t['speedup_over_naive']:.0f}x over naive "
                     f"(target {t['speedup_target']:.0f}x: {'met' if t['speedup_met'] else 'not met'}), "
                     f"{t['vs_scoring']:.1f}x a scoring pass (target <= {t['vs_scoring_target']:.0f}x: "
                     f"{'met' if t['vs_scoring_met'] else 'not met'})")
    lines.append(machine_line(payload["machine"], threads=cfg["threads"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        config = {"batch": args.batch, "size": args.size, "levels": args.levels, "archs": args.archs,
                  "checkpoint": args.checkpoint, "hidden": args.hidden, "layers": args.layers, "threads": args.threads,
                  "repeats": args.repeats, "naive_rows": args.naive_rows, "seed": args.seed, "device": args.device}
        # A trained model is named at the top; random-init models each in their result's "model".
        payload = result("sampling", {"checkpoint": args.checkpoint} if args.checkpoint else None, config=config, results={})
        per_arch = {}
        with tempfile.TemporaryDirectory(prefix="bench-sampling-") as tmp:
            for arch, model in models(args):
                print(f"{arch} ...", file=sys.stderr, flush=True)
                workdir = Path(tmp) / arch
                workdir.mkdir()
                measured = bench_model(model, args, workdir)
                payload["results"][arch] = measured
                per_arch[arch] = targets(arch, measured["model"]["family"], measured)
        payload["load_average_after"] = load_average()
        payload["config"]["archs"] = list(payload["results"])  # the checkpoint's, with --checkpoint
        if args.checkpoint:
            payload["model"].update(next(iter(payload["results"].values()))["model"])
        payload["identical"] = all(r["identical"] for r in payload["results"].values())
        payload["targets"] = {
            "speedup_over_naive": SPEEDUP_TARGET, "vs_scoring_at_most": {**VS_SCORING_TARGET, "default": VS_SCORING_DEFAULT}, "per_arch": per_arch,
            "all_met": all(t["speedup_met"] and t["vs_scoring_met"] for t in per_arch.values()),
        }
    finally:
        torch.set_num_threads(threads_before)
    finish(payload, args.json, report(payload))
    if not payload["identical"]:
        print("error: the samplers drew different images from the same seed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    reexec_with_malloc_env("bench.sampling", sys.argv[1:])
    sys.exit(main())
