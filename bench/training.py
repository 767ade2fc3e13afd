"""Training throughput: images/s of one training step of today's models, with the speed options.

    python -m bench.training --json bench/results/training.json [--quick] [--configs a,b] [--no-compile]

One step is what training.train runs per batch (`train_step`: forward, NLL, backward, gradient
clip, Adam), batch 64 of 28x28 grey images, random data of the model's levels (binary, or 256
levels with class labels for the Fashion-MNIST Gated PixelCNN), 1 thread as
`training.train --threads 1` runs it. Per configuration, variants of the same code:

    eager                    the plain step
    compile                  + `training.train --compile` (torch.compile)
    channels_last[_compile]  + `--channels-last` (and `--compile`)

Every variant has its own model (same initial weights) and optimizer, and takes `--warmup`
untimed steps first (the first one, timed apart, is where --compile compiles). Then the variants
are timed in turns, A B C A B C ..., each turn a window of at least `--seconds` and one step, so
load from other processes falls on all of them alike; every variant gets the same number of
windows. Reported: median, min and max images/s, each option's ratio to eager (per turn and from
the medians), and the fastest variant.

The model code before the speed changes is not kept: its figures are recorded, under
"reference_before" of bench/results/training.json (the commit of that code, when and where they
were measured), and copied into every result written. A configuration with a reference figure
also reports its fastest variant against it (`vs_reference_before`), and the speed targets (the
fastest variant over the code before, at least 1.5x for the PixelCNN family, 2x for the Diagonal
BiLSTM) are judged on those ratios. They compare two runs, on a shared machine whose load
differs between them (both load averages are recorded): a guide, not a measurement in one run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import PROJECT_ROOT, finish, load_average, machine_line, reexec_with_malloc_env, result
from pixelrnn.training.models import build_model
from pixelrnn.training.train import NLLObjective, batch_indices, train_step

BATCH = 64
TARGETS = {"pixelcnn": 1.5, "gated_pixelcnn": 1.5, "diagonal_bilstm": 2.0}  # images/s, fastest variant / the code before
REFERENCE = PROJECT_ROOT / "bench" / "results" / "training.json"  # its "reference_before"
VARIANTS = {  # name: (torch.compile, channels last)
    "eager": (False, False),
    "compile": (True, False),
    "channels_last": (False, True),
    "channels_last_compile": (True, True),
}


@dataclass
class Config:
    name: str
    arch: str
    fields: dict
    variants: tuple[str, ...]
    shipped: bool
    size: int = 28

    @property
    def levels(self) -> int:
        return self.fields.get("levels", 2)


# PixelCNN: --compile. Gated PixelCNN: --channels-last and --compile (channels-last alone made the
# PixelCNN 0.8x). LSTMs: eager only; compiling their unrolled recurrences does not pay (measured
# once, load ~5: Diagonal BiLSTM h24 L1 first step 545 s for 1.21x, Row LSTM h32 L1 148 s for 0.91x).
PIXELCNN_VARIANTS = ("eager", "compile")
GATED_VARIANTS = ("eager", "channels_last", "channels_last_compile")
LSTM_VARIANTS = ("eager",)
CONFIGS = [
    Config("pixelcnn_h48_l8", "pixelcnn", dict(hidden=48, layers=8), PIXELCNN_VARIANTS, shipped=True),
    Config("row_lstm_h32_l1", "row_lstm", dict(hidden=32, layers=1), LSTM_VARIANTS, shipped=True),
    Config("diagonal_bilstm_h24_l1", "diagonal_bilstm", dict(hidden=24, layers=1), LSTM_VARIANTS, shipped=True),
    Config("gated_pixelcnn_h36_l5_fashion", "gated_pixelcnn",
           dict(hidden=36, layers=5, kernel=5, levels=256, num_classes=10), GATED_VARIANTS, shipped=True),
    Config("gated_pixelcnn_h32_l8", "gated_pixelcnn", dict(hidden=32, layers=8), GATED_VARIANTS, shipped=False),
    Config("row_lstm_h48_l2", "row_lstm", dict(hidden=48, layers=2), LSTM_VARIANTS, shipped=False),
    Config("pixelcnn_h64_l12", "pixelcnn", dict(hidden=64, layers=12), PIXELCNN_VARIANTS, shipped=False),
    Config("diagonal_bilstm_h16_l7", "diagonal_bilstm", dict(hidden=16, layers=7), LSTM_VARIANTS, shipped=False),
]
# --quick: tiny models on 8x8 images, no compiling; for tests of the harness, not for figures.
QUICK_CONFIGS = [
    Config("pixelcnn_quick", "pixelcnn", dict(hidden=6, layers=1), ("eager",), shipped=False, size=8),
    Config("row_lstm_quick", "row_lstm", dict(hidden=6, layers=1), LSTM_VARIANTS, shipped=False, size=8),
    Config("diagonal_bilstm_quick", "diagonal_bilstm", dict(hidden=6, layers=1), LSTM_VARIANTS, shipped=False, size=8),
    Config("gated_pixelcnn_quick", "gated_pixelcnn", dict(hidden=6, layers=1, levels=256, num_classes=10),
           ("eager", "channels_last"), shipped=False, size=8),
]


# ---------------------------------------------------------------------------- one variant

def make_batch(cfg: Config, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.levels, (BATCH, 1, cfg.size, cfg.size), generator=g)
    classes = cfg.fields.get("num_classes", 0)
    return x, (torch.randint(0, classes, (BATCH,), generator=g) if classes else None)


class Runner:
    """One variant: its own model and optimizer, set up as training.train sets them up."""

    def __init__(self, cfg: Config, variant: str, batch: tuple, seed: int = 0):
        self.compiled, self.channels_last = VARIANTS[variant]
        torch.manual_seed(seed)
        self.model = build_model(cfg.arch, dict(height=cfg.size, width=cfg.size, **cfg.fields))
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.objective = NLLObjective(self.model)
        if self.compiled:
            self.objective = torch.compile(self.objective)
        x, self.labels = batch
        self.x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def step(self) -> float:
        return train_step(self.objective, self.optimizer, self.x, self.labels, self.model.dims, 1.0)

    def window(self, seconds: float) -> tuple[float, int]:
        """Images/s over at least `seconds` and one step."""
        steps, start = 0, time.perf_counter()
        while True:
            self.step()
            steps += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return BATCH * steps / elapsed, steps


def stats(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def bench_config(cfg: Config, args, reference: dict | None) -> dict:
    load_before = load_average()
    batch = make_batch(cfg)
    runners, first = {}, {}
    for v in cfg.variants:
        if VARIANTS[v][0] and args.no_compile:
            continue
        runners[v] = Runner(cfg, v, batch)
        t = time.perf_counter()
        runners[v].step()
        first[v] = time.perf_counter() - t
        for _ in range(args.warmup - 1):
            runners[v].step()
    rates = {v: [] for v in runners}
    steps = {v: 0 for v in runners}
    for _ in range(args.repeats):
        for v, runner in runners.items():  # interleaved: A B C A B C ...
            rate, n = runner.window(args.seconds)
            rates[v].append(rate)
            steps[v] += n
    variants = {v: {"images_per_s": stats(rates[v]), "runs": [round(r, 3) for r in rates[v]], "timed_steps": steps[v],
                    "first_step_seconds": round(first[v], 3)} for v in runners}
    eager = statistics.median(rates["eager"])
    for v, r in variants.items():
        if v != "eager":
            r["vs_eager"] = round(statistics.median(rates[v]) / eager, 3)  # from the medians
            r["paired_ratio_vs_eager"] = stats([a / b for a, b in zip(rates[v], rates["eager"])])  # per turn
    fastest = max(variants, key=lambda v: variants[v]["images_per_s"]["median"])
    out = {"arch": cfg.arch, "fields": cfg.fields, "shipped_size": cfg.shipped, "image": [1, cfg.size, cfg.size],
           "batch": BATCH, "parameters": sum(p.numel() for p in runners["eager"].model.parameters()), "variants": variants,
           "fastest": fastest, "load_average_1_5_15": load_before}
    if reference:  # the code before the speed changes, recorded in another run (module notes)
        before = reference["images_per_s"]["median"]
        out["vs_reference_before"] = round(variants[fastest]["images_per_s"]["median"] / before, 3)
    return out


def data_loading(n_images: int = 50_000, size: int = 28, calls: int = 50) -> dict:
    """What training.train does per step to get its batch (indices, gather, to long), in ms."""
    images = torch.randint(0, 2, (n_images, 1, size, size), dtype=torch.uint8)
    times = []
    for step in range(calls):
        t = time.perf_counter()
        images[batch_indices(step, n_images, BATCH, seed=0)].long()
        times.append((time.perf_counter() - t) * 1000)
    return {"ms_per_batch": stats(times), "images": n_images}


def targets(results: dict) -> dict:
    """Per target architecture: the fastest variants against the recorded code before (where the
    configuration has a reference figure), the worst of them judged."""
    out = {}
    for arch, target in TARGETS.items():
        per_config = {name: {"vs_reference_before": r["vs_reference_before"], "fastest": r["fastest"],
                             "met": r["vs_reference_before"] >= target}
                      for name, r in results.items() if r["arch"] == arch and "vs_reference_before" in r}
        if not per_config:
            out[arch] = {"target": target, "status": "no reference", "summary": f"no reference figure (target {target}x)"}
            continue
        worst = min(c["vs_reference_before"] for c in per_config.values())
        status = "met" if all(c["met"] for c in per_config.values()) else "not met"
        out[arch] = {"target": target, "worst_speedup": worst, "status": status, "per_config": per_config,
                     "summary": f"{status}: {worst:.2f}x at worst against the recorded code before (target {target}x)"}
    return out


def read_reference(path: Path) -> dict | None:
    """The "reference_before" of a training result (None where there is none)."""
    try:
        return json.loads(path.read_text()).get("reference_before")
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------- CLI

@contextlib.contextmanager
def fresh_env(name: str, value: str):
    """Set environment variable `name` to `value` for the block, unless it is set already (then
    yield False)."""
    if name in os.environ:
        yield False
        return
    os.environ[name] = value
    try:
        yield True
    finally:
        os.environ.pop(name, None)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.training", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--quick", action="store_true", help="tiny models, short windows, no compiling (for tests)")
    p.add_argument("--configs", help="comma-separated configuration names (default: all)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variants")
    p.add_argument("--repeats", type=int, help="timed windows per variant (default 3)")
    p.add_argument("--seconds", type=float, help="least seconds per window (default 1.5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before timing (at least 1)")
    p.add_argument("--reference", type=Path, default=REFERENCE,
                   help="the training result whose reference_before is carried over (default: the committed one)")
    args = p.parse_args(argv)
    table = QUICK_CONFIGS if args.quick else CONFIGS
    names = [c.name for c in table]
    chosen = args.configs.split(",") if args.configs else names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        p.error(f"unknown config(s) {', '.join(unknown)}; known: {', '.join(names)}")
    args.table = [c for c in table if c.name in chosen]
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.seconds = args.seconds if args.seconds is not None else (0.02 if args.quick else 1.5)
    if args.repeats < 1 or args.warmup < 1 or args.seconds < 0:
        p.error("--repeats and --warmup must be at least 1, --seconds at least 0")
    return args


def report(payload: dict) -> str:
    lines = [f"training images/s, batch {BATCH}: " + machine_line(payload["machine"], load_after=payload["load_average_after"]),
             f"{'config':32} {'variant':22} {'median':>8} {'min':>8} {'max':>8} {'x eager':>8} {'first step':>10}"]
    for name, r in payload["results"].items():
        for v, s in r["variants"].items():
            ips, x = s["images_per_s"], f"{s['vs_eager']:.2f}x" if "vs_eager" in s else ""
            lines.append(f"{name:32} {v:22} {ips['median']:8.1f} {ips['min']:8.1f} {ips['max']:8.1f} {x:>8} "
                         f"{s['first_step_seconds']:9.1f}s")
        if "vs_reference_before" in r:
            lines.append(f"{'':32} fastest ({r['fastest']}) {r['vs_reference_before']:.2f}x the recorded code before")
    lines += [f"target {arch}: {t['summary']}" for arch, t in payload["targets"].items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    reference = read_reference(args.reference)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what `training.train --threads 1` sets (and no inter-op setting)
    started = time.perf_counter()
    try:
        # Compile into a fresh cache (unless one is set), so that first_step_seconds is what a new
        # run pays; a run that compiles the same model again on this machine pays less.
        with tempfile.TemporaryDirectory(prefix="bench-training-inductor-") as cache, fresh_env("TORCHINDUCTOR_CACHE_DIR", cache) as fresh:
            config = {"batch": BATCH, "threads": 1, "repeats": args.repeats, "seconds": args.seconds, "warmup": args.warmup,
                      "quick": args.quick, "compile": not args.no_compile, "configs": [c.name for c in args.table],
                      "inductor_cache": "fresh" if fresh else os.environ["TORCHINDUCTOR_CACHE_DIR"]}
            payload = result("training", config=config, results={})
            for cfg in args.table:
                print(f"{cfg.name} ...", file=sys.stderr, flush=True)
                ref = (reference or {}).get("results", {}).get(cfg.name)
                payload["results"][cfg.name] = bench_config(cfg, args, ref)
            payload["data_loading"] = data_loading(n_images=2_000 if args.quick else 50_000)
    finally:
        torch.set_num_threads(threads)
    payload["load_average_after"] = load_average()
    payload["seconds_total"] = round(time.perf_counter() - started, 1)
    payload["targets"] = targets(payload["results"])
    payload["reference_before"] = reference
    finish(payload, args.json, report(payload))
    return 0


if __name__ == "__main__":
    reexec_with_malloc_env("bench.training", sys.argv[1:])
    sys.exit(main())
