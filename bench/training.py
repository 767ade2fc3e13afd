"""Training throughput: images/s of one training step, before and after the speed changes.

    python -m bench.training --json bench/results/training.json [--quick] [--configs a,b] [--no-compile]

One step is what training.train runs per batch (`train_step`: forward, NLL, backward, gradient
clip, Adam), batch 64 of 28x28 grey images, random data of the model's levels (binary, or 256
levels with class labels for the Fashion-MNIST Gated PixelCNN). Per configuration, variants:

    before                       the code before the speed changes (`legacy_code` puts it back:
                                 the old forwards, verbatim), eager, 1 thread, as
                                 `training.train --threads 1` ran it
    after                        today's code, eager, 1 thread
    after_compile                + `training.train --compile`
    after_channels_last[_compile]  + `--channels-last` (and `--compile`)

Every variant has its own model (same initial weights) and optimizer, and takes `--warmup`
untimed steps first (the first one, timed apart, is where --compile compiles). Then the variants
are timed in turns, A B C A B C ..., each turn a window of at least `--seconds` and one step, so
load from other processes falls on all of them alike; every variant gets the same number of
windows. Reported: median, min and max images/s, per-turn ratios to `before`, and speedups from
the medians; the best `after*` variant is the configuration's "fastest". The machine's cores and
load average are recorded beside the figures: on a shared CPU, absolute images/s measure the
neighbours too; ratios less so.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.common import machine_info, reexec_with_malloc_env, write_json
from pixelrnn.training.models import build_model
from pixelrnn.training.models.diagonal_bilstm import DiagonalBiLSTMLayer, DiagonalLSTM, shift_down, skew, unskew
from pixelrnn.training.models.pixelcnn import PixelCNN
from pixelrnn.training.models.row_lstm import RowLSTMLayer
from pixelrnn.training.train import NLLObjective, batch_indices, train_step

BATCH = 64
TARGETS = {"pixelcnn": 1.5, "gated_pixelcnn": 1.5, "diagonal_bilstm": 2.0}  # images/s ratio, fastest after / before
VARIANTS = {  # name: (legacy code, torch.compile, channels last)
    "before": (True, False, False),
    "after": (False, False, False),
    "after_compile": (False, True, False),
    "after_channels_last": (False, False, True),
    "after_channels_last_compile": (False, True, True),
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


# PixelCNN: the cropped masked kernels (eager) and --compile. Gated PixelCNN: no code change,
# --channels-last and --compile (channels-last alone made the PixelCNN 0.8x). LSTMs: code changes
# only; compiling their unrolled recurrences does not pay (measured once, today's code, load ~5:
# Diagonal BiLSTM h24 L1 first step 545 s for 1.21x, Row LSTM h32 L1 148 s for 0.91x).
PIXELCNN_VARIANTS = ("before", "after", "after_compile")
GATED_VARIANTS = ("before", "after_channels_last", "after_channels_last_compile")
LSTM_VARIANTS = ("before", "after")
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
    Config("pixelcnn_quick", "pixelcnn", dict(hidden=6, layers=1), ("before", "after"), shipped=False, size=8),
    Config("row_lstm_quick", "row_lstm", dict(hidden=6, layers=1), LSTM_VARIANTS, shipped=False, size=8),
    Config("diagonal_bilstm_quick", "diagonal_bilstm", dict(hidden=6, layers=1), LSTM_VARIANTS, shipped=False, size=8),
    Config("gated_pixelcnn_quick", "gated_pixelcnn", dict(hidden=6, layers=1, levels=256, num_classes=10),
           ("before", "after_channels_last"), shipped=False, size=8),
]


# ---------------------------------------------------------------------------- the code before

def legacy_pixelcnn_forward(self, x, labels=None, condition=None):
    self.check_input(x, labels)
    h = self.input_conv(self.preprocess(x))  # (B, h, H, W)
    if condition is not None:
        h = h + condition
    for block in self.blocks:
        h = h + block(F.relu(h))
    out = self.head2(F.relu(self.head1(F.relu(h))))  # (B, C*K, H, W)
    return self.to_logits(out)


def legacy_row_lstm_forward(self, x):
    b, _, height, width = x.shape
    x_is = self.input_to_state(x)  # (B, 4h, H, W)
    h = c = x.new_zeros(b, self.hidden, width)  # the "row -1" state
    rows = []
    for i in range(height):
        h, c = self.step(x_is[:, :, i], h, c)
        rows.append(h)
    out = torch.stack(rows, dim=2)  # (B, h, H, W)
    return x + self.residual(out)


def legacy_diagonal_lstm_forward(self, x):
    """The straightforward formulation: the whole skewed map, one `step` per skewed column."""
    b, _, height, width = x.shape
    x_is = skew(self.input_to_state(x))  # (B, 4h, H, H+W-1)
    h = c = x.new_zeros(b, self.hidden, height)  # the "column -1" state
    cols = []
    for k in range(x_is.shape[3]):
        h, c = self.step(x_is[..., k], h, c)
        cols.append(h)
    return unskew(torch.stack(cols, dim=3), width)  # (B, h, H, W)


def legacy_diagonal_layer_forward(self, x):
    ltr = self.left_to_right(x)
    rtl = self.right_to_left(x.flip(3)).flip(3)  # (B, h, H, W), has seen row i to the right
    return x + self.residual(ltr + shift_down(rtl))


LEGACY = {
    (PixelCNN, "forward"): legacy_pixelcnn_forward,
    (RowLSTMLayer, "forward"): legacy_row_lstm_forward,
    (DiagonalLSTM, "forward"): legacy_diagonal_lstm_forward,
    (DiagonalBiLSTMLayer, "forward"): legacy_diagonal_layer_forward,
}


@contextlib.contextmanager
def legacy_code():
    """Run the models as they were before the speed changes (same modules and weights)."""
    saved = {key: key[0].__dict__[key[1]] for key in LEGACY}
    try:
        for (cls, name), fn in LEGACY.items():
            setattr(cls, name, fn)
        yield
    finally:
        for (cls, name), fn in saved.items():
            setattr(cls, name, fn)


# ---------------------------------------------------------------------------- one variant

def make_batch(cfg: Config, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.levels, (BATCH, 1, cfg.size, cfg.size), generator=g)
    classes = cfg.fields.get("num_classes", 0)
    return x, (torch.randint(0, classes, (BATCH,), generator=g) if classes else None)


class Runner:
    """One variant: its own model and optimizer, set up as training.train sets them up."""

    def __init__(self, cfg: Config, variant: str, batch: tuple, seed: int = 0):
        self.legacy, self.compiled, self.channels_last = VARIANTS[variant]
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

    def context(self):
        return legacy_code() if self.legacy else contextlib.nullcontext()

    def step(self) -> float:
        return train_step(self.objective, self.optimizer, self.x, self.labels, self.model.dims, 1.0)

    def window(self, seconds: float) -> tuple[float, int]:
        """Images/s over at least `seconds` and one step."""
        with self.context():
            steps, start = 0, time.perf_counter()
            while True:
                self.step()
                steps += 1
                elapsed = time.perf_counter() - start
                if elapsed >= seconds:
                    return BATCH * steps / elapsed, steps


def stats(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def bench_config(cfg: Config, args) -> dict:
    load_before = [round(v, 2) for v in os.getloadavg()]
    batch = make_batch(cfg)
    runners, first = {}, {}
    for v in cfg.variants:
        if VARIANTS[v][1] and args.no_compile:
            continue
        runners[v] = Runner(cfg, v, batch)
        with runners[v].context():
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
    base = statistics.median(rates["before"])
    for v, r in variants.items():
        if v != "before":
            r["speedup"] = round(statistics.median(rates[v]) / base, 3)  # from the medians
            r["paired_ratio"] = stats([a / b for a, b in zip(rates[v], rates["before"])])  # per turn
    after = [v for v in variants if v != "before"]
    fastest = max(after, key=lambda v: variants[v]["speedup"])
    n_params = sum(p.numel() for p in runners["before"].model.parameters())
    return {"arch": cfg.arch, "fields": cfg.fields, "shipped_size": cfg.shipped, "image": [1, cfg.size, cfg.size],
            "batch": BATCH, "parameters": n_params, "variants": variants, "fastest": fastest,
            "speedup": variants[fastest]["speedup"], "load_average_1_5_15": load_before}


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
    out = {}
    for arch, target in TARGETS.items():
        per_config = {name: {"speedup": r["speedup"], "fastest": r["fastest"], "met": r["speedup"] >= target}
                      for name, r in results.items() if r["arch"] == arch}
        if per_config:
            worst = min(c["speedup"] for c in per_config.values())
            met = all(c["met"] for c in per_config.values())
            out[arch] = {"target": target, "worst_speedup": worst, "status": "met" if met else "not met",
                         "summary": f"{'met' if met else 'not met'}: {worst:.2f}x at worst (target {target}x)",
                         "per_config": per_config}
    return out


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
    m = payload["machine"]
    lines = [f"training images/s, batch {BATCH}, {m['cpu_count']} cores, load average {m['load_average_1_5_15']} "
             f"(after: {payload['load_average_after']})",
             f"{'config':32} {'variant':29} {'median':>8} {'min':>8} {'max':>8} {'speedup':>8} {'first step':>10}"]
    for name, r in payload["results"].items():
        for v, s in r["variants"].items():
            ips = s["images_per_s"]
            speedup = f"{s['speedup']:.2f}x" if "speedup" in s else ""
            lines.append(f"{name:32} {v:29} {ips['median']:8.1f} {ips['min']:8.1f} {ips['max']:8.1f} {speedup:>8} "
                         f"{s['first_step_seconds']:9.1f}s")
    for arch, t in payload["targets"].items():
        lines.append(f"target {arch}: {t['summary']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what `training.train --threads 1` sets (and no inter-op setting)
    started = time.perf_counter()
    try:
        # Compile into a fresh cache (unless one is set), so that first_step_seconds is what a new
        # run pays; a run that compiles the same model again on this machine pays less.
        with tempfile.TemporaryDirectory(prefix="bench-training-inductor-") as cache, fresh_env("TORCHINDUCTOR_CACHE_DIR", cache) as fresh:
            payload = {
                "benchmark": "training",
                "config": {"batch": BATCH, "threads": 1, "repeats": args.repeats, "seconds": args.seconds,
                           "warmup": args.warmup, "quick": args.quick, "compile": not args.no_compile,
                           "configs": [c.name for c in args.table],
                           "inductor_cache": "fresh" if fresh else os.environ["TORCHINDUCTOR_CACHE_DIR"]},
                "machine": machine_info(),
                "results": {},
            }
            for cfg in args.table:
                print(f"{cfg.name} ...", file=sys.stderr, flush=True)
                payload["results"][cfg.name] = bench_config(cfg, args)
            payload["data_loading"] = data_loading(n_images=2_000 if args.quick else 50_000)
    finally:
        torch.set_num_threads(threads)
    payload["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    payload["seconds_total"] = round(time.perf_counter() - started, 1)
    payload["targets"] = targets(payload["results"])
    print(report(payload))
    if args.json:
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    reexec_with_malloc_env("bench.training", sys.argv[1:])
    sys.exit(main())
