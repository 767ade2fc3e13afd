"""Validation NLL against hours of training, one line per run, from the runs' records.

A run directory's record is its last.pt, or once that is deleted (a finished run keeps no
resumable state) its history.json, which training.train writes beside every last.pt.

    python -m pixelrnn.training.curves --out curves.png --json runs.json              # every run in runs/long/
    python -m pixelrnn.training.curves --out curves.png runs/long/row_lstm_binarized_mnist other/last.pt

Hours come from the checkpoint's `timeline` ({"step", "hours", "device"} per validation, written
by training.train), matched to the `history` validation entries by step, so a run resumed on
another machine (CPU, then CUDA) is one line whose segments show the device that trained them.
A checkpoint without a timeline gets hours estimated as step x (hours per step), from its
cumulative `hours` or else from the run directory's metrics.json `minutes`; one with neither is
left out of the figure with a one-line warning (it still gets its row in --json).

Binary data is drawn in nats per image (the papers' unit), the rest in bits per dimension: one
panel per unit present. Binarized-MNIST panels get the PixelRNN paper's test NLLs as reference
lines (--no-paper to leave them out). --json writes the per-run table of docs/measurements.md,
"Long training runs" (bench/results/long_runs.json).
"""
from __future__ import annotations

import argparse
import glob
import itertools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pixelrnn.training.checkpoint import CheckpointError, build_checkpoint_model, load_checkpoint

DEFAULT_GLOB = "runs/long/*/"
RECORD = "history.json"
# van den Oord et al. 2016 (Pixel Recurrent Neural Networks), binarized-MNIST table: test NLL in
# nats (the Diagonal BiLSTM figure is their 7-layer model). Only comparable with models of that
# data set, hence not drawn for others.
PAPER_NATS = {"PixelCNN": 81.30, "Row LSTM": 80.54, "Diagonal BiLSTM": 79.20}
PAPER_DATA = "binarized-mnist"
DEVICE_STYLE = {"cpu": dict(linestyle="-", marker="o"), "cuda": dict(linestyle="--", marker="^"),
                "estimated": dict(linestyle=":", marker="x")}


@dataclass
class Run:
    path: Path
    name: str
    ckpt: dict
    params: int
    points: list = field(default_factory=list)  # (hours, device, nats, bits/dim, step), by step
    hours_source: str = "timeline"  # timeline | estimated | none
    hours_per_step: float | None = None  # the estimate, for runs without a timeline
    untimed: int = 0  # validation entries the timeline does not cover
    ema_points: list = field(default_factory=list)  # (hours, nats, bits/dim) of the averaged weights (--ema)

    @property
    def binary(self) -> bool:
        return self.ckpt["config"].get("levels") == 2

    @property
    def perturb(self) -> float:
        """The noise a background model was trained on (training.train --perturb); 0 for a model."""
        return self.ckpt.get("perturb") or (self.ckpt.get("train_args") or {}).get("perturb") or 0.0

    @property
    def label(self) -> str:
        cfg, data = self.ckpt["config"], self.ckpt["data"] or {}
        n = self.params
        count = f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)
        size = f"h{cfg.get('hidden')}x{cfg.get('layers')}, {count} params"
        bits = "" if self.binary else f" {data.get('bits')}-bit"
        # A background model (trained on perturbed images) is not a candidate model: say so.
        background = f", perturbed {self.perturb:g}" if self.perturb else ""
        parent = init_from(self.ckpt)
        cycle = f", {parent_relation(self.ckpt)} {Path(parent).parent.name}" if parent else ""
        epochs = self.ckpt.get("epoch")
        length = f", {epochs:.3g} epochs" if epochs else ""  # tells apart runs of one size
        return f"{self.ckpt['arch']} ({size}), {data.get('name', '?')}{bits}{length}{background}{cycle}"


def init_from(record: dict) -> str | None:
    """The checkpoint a run started from (training.train --init-from), if any."""
    return record.get("init_from") or (record.get("train_args") or {}).get("init_from")


def parent_record(record: dict) -> dict | None:
    """The record of the run a run started from (--init-from), or None: none, or its record is gone."""
    parent = init_from(record)
    if not parent:
        return None
    try:
        found, _ = load_record(find_record(str(Path(parent).parent)))
    except CheckpointError:
        return None
    return found


def parent_relation(record: dict) -> str:
    """How a run grew from the run it started from: a new cycle of the same model, or deepened."""
    found = parent_record(record)
    if found is None or found["config"].get("layers") == record["config"].get("layers"):
        return "a new cycle from"
    return f"deepened from the {found['config'].get('layers')}-layer"


def parent_hours(record: dict) -> float:
    """Hours already spent on the weights a run started from: its curve continues that run's
    (0 when its record is gone)."""
    found = parent_record(record)
    return 0.0 if found is None else float(found.get("hours") or 0.0) + parent_hours(found)


# ---------------------------------------------------------------------------- reading

def find_record(arg: str) -> Path:
    """A run directory's last.pt, else its history.json; a file argument as it is."""
    path = Path(arg)
    if not path.is_dir():
        return path
    return path / "last.pt" if (path / "last.pt").exists() or not (path / RECORD).exists() else path / RECORD


def load_record(path: Path) -> tuple[dict, int]:
    """(the run's record, its parameter count) from history.json or a checkpoint."""
    if path.suffix != ".json":
        ckpt = load_checkpoint(path)
        return ckpt, sum(p.numel() for p in build_checkpoint_model(path, ckpt).parameters())
    try:
        record = json.loads(path.read_text())
        return record, int(record["params"])
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the run record ({e.strerror or e})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a run record ({type(e).__name__}: {e})") from None


def valid_entries(history: list[dict]) -> list[dict]:
    return [h for h in history if "valid_nll_nats" in h]


def estimated_hours_per_step(path: Path, ckpt: dict) -> float | None:
    """Hours per step for a checkpoint without a timeline: its cumulative hours, else metrics.json minutes.

    metrics.json holds the minutes of the last invocation only, so for a resumed run this is a
    rough figure: it is labelled as an estimate in the plot and the table.
    """
    step = ckpt.get("step") or 0
    if step <= 0:
        return None
    if ckpt.get("hours"):
        return float(ckpt["hours"]) / step
    metrics = path.parent / "metrics.json"
    try:
        saved = json.loads(metrics.read_text())
        minutes, done = float(saved["minutes"]), int(saved["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return minutes / 60 / done if minutes > 0 and done > 0 else None


def read_run(path: Path) -> Run:
    """Load one run record and pair its validation entries with hours; CheckpointError if unreadable."""
    ckpt, params = load_record(path)
    name = path.parent.name if path.name in ("last.pt", "best.pt", RECORD) else path.stem
    run = Run(path, name, ckpt, params)
    entries = valid_entries(ckpt["history"])
    timeline = {t["step"]: t for t in ckpt.get("timeline") or []}
    if timeline or ("timeline" in ckpt and not entries):  # the latter: a new run not validated yet
        # Entries without a timeline entry (validations from before timelines existed, in a run
        # resumed since) are left out, not guessed: main() warns about them.
        start = parent_hours(ckpt)
        run.points = [(start + timeline[h["step"]]["hours"], timeline[h["step"]]["device"], h["valid_nll_nats"],
                       h["valid_bits_per_dim"], h["step"]) for h in entries if h["step"] in timeline]
        run.ema_points = [(start + timeline[h["step"]]["hours"], h["ema_valid_nll_nats"], h["ema_valid_bits_per_dim"])
                          for h in entries if h["step"] in timeline and "ema_valid_nll_nats" in h]
        run.untimed = len(entries) - len(run.points)
    else:
        run.hours_per_step = estimated_hours_per_step(path, ckpt)
        if run.hours_per_step is None:
            run.hours_source = "none"
        else:
            run.hours_source = "estimated"
            run.points = [(h["step"] * run.hours_per_step, "estimated", h["valid_nll_nats"], h["valid_bits_per_dim"],
                           h["step"]) for h in entries]
    return run


def table_row(run: Run) -> dict:
    ckpt, cfg = run.ckpt, run.ckpt["config"]
    entries = valid_entries(ckpt["history"])
    best = min(entries, key=lambda h: h["valid_nll_nats"]) if entries else None
    averaged = [h for h in entries if "ema_valid_nll_nats" in h]
    best_ema = min(averaged, key=lambda h: h["ema_valid_nll_nats"]) if averaged else None
    timeline = ckpt.get("timeline") or []
    hours = ckpt.get("hours")
    if hours is None and run.hours_per_step is not None:
        hours = ckpt["step"] * run.hours_per_step
    by_device: dict[str, float] = {}
    previous = 0.0
    for t in timeline:  # each validation's hours minus the last: the device that trained that stretch
        by_device[t["device"]] = by_device.get(t["device"], 0.0) + t["hours"] - previous
        previous = t["hours"]
    return {
        "name": run.name,
        "path": str(run.path),
        "arch": ckpt["arch"],
        "hidden": cfg.get("hidden"),
        "layers": cfg.get("layers"),
        "params": run.params,
        "data": (ckpt["data"] or {}).get("name"),
        "data_spec": ckpt["data"],
        "levels": cfg.get("levels"),
        "unit": "nats" if run.binary else "bits/dim",
        "steps": ckpt["step"],
        "epochs": ckpt["epoch"],
        "hours": hours,
        "hours_source": run.hours_source,
        "hours_by_device": by_device,  # up to the last validation (the timeline's last entry)
        "devices": sorted(by_device),
        "best_valid_nll_nats": best["valid_nll_nats"] if best else None,
        "best_valid_bits_per_dim": best["valid_bits_per_dim"] if best else None,
        "best_step": best["step"] if best else None,
        "last_valid_nll_nats": entries[-1]["valid_nll_nats"] if entries else None,
        # --ema runs: the averaged weights' best (best.pt holds whichever of the two is better)
        "best_ema_valid_nll_nats": best_ema["ema_valid_nll_nats"] if best_ema else None,
        "best_ema_valid_bits_per_dim": best_ema["ema_valid_bits_per_dim"] if best_ema else None,
        "init_from": init_from(ckpt),
        "valid_images": ckpt["metrics"].get("valid_images"),
    }


# ---------------------------------------------------------------------------- drawing

def focus(ax, drawn: list[Run], binary: bool, lows: list[float]) -> None:
    """Show where the runs go: each run's first two validations (untrained weights, far higher) may
    leave the top of the panel; the rest and the reference lines stay in it."""
    value = (lambda p: p[2]) if binary else (lambda p: p[3])
    ys = [value(p) for r in drawn for p in r.points]
    if not ys:
        return
    bottom = min(ys + lows)
    top = max(value(r.points[min(2, len(r.points) - 1)]) for r in drawn if r.points)
    if top <= bottom:
        top = max(ys)
    margin = 0.05 * max(top - bottom, 1e-3 * abs(top) or 1e-3)
    ax.set_ylim(bottom - margin, top + margin)


def plot(runs: list[Run], out: Path, paper: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    # Columns by unit (binary: nats per image; else bits/dim), rows: models, then background models
    # (trained on perturbed images: tens of nats worse, they would flatten the models' curves).
    columns = [binary for binary in (True, False) if any(r.binary == binary for r in runs)]
    rows = [background for background in (False, True) if any(bool(r.perturb) == background for r in runs)]
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(7.5 * len(columns), 6.2 * len(rows)), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (i, background), (j, binary) in itertools.product(enumerate(rows), enumerate(columns)):
        ax = axes[i][j]
        drawn = [r for r in runs if r.binary == binary and bool(r.perturb) == background]
        if not drawn:
            ax.set_axis_off()
            continue
        for k, run in enumerate(drawn):
            colour = colours[k % len(colours)]
            values = [(h, dev, nats if binary else bpd) for h, dev, nats, bpd, _ in run.points]
            # Segment i -> i+1 was trained on the device recorded at its end (point i+1).
            for (h0, _, y0), (h1, dev, y1) in zip(values, values[1:]):
                ax.plot([h0, h1], [y0, y1], color=colour, linestyle=DEVICE_STYLE[dev]["linestyle"])
            for dev in {v[1] for v in values}:
                pts = [(h, y) for h, d, y in values if d == dev]
                ax.plot(*zip(*pts), color=colour, linestyle="none", marker=DEVICE_STYLE[dev]["marker"], markersize=4)
            if run.ema_points:
                ax.plot([h for h, _, _ in run.ema_points], [n if binary else b for _, n, b in run.ema_points],
                        color=colour, linestyle="--", linewidth=0.9, alpha=0.8)
            ax.plot([], [], color=colour, label=run.label + (" [hours estimated]" if run.hours_source == "estimated" else "")
                    + (" (dashed: averaged weights)" if run.ema_points else ""))
        lows = []
        if paper and binary and not background and any((r.ckpt["data"] or {}).get("name") == PAPER_DATA for r in drawn):
            for k, (model, nats) in enumerate(PAPER_NATS.items()):
                # Named in the legend: the three lie within 2.1 nats, too close for labels on the lines.
                ax.axhline(nats, color="grey", linewidth=0.8, linestyle=(0, (1 + 3 * k, 2)),
                           label=f"paper {model}: {nats:.2f} (test)")
                lows.append(nats)
        focus(ax, drawn, binary, lows)
        ax.set_xlim(left=0)
        ax.set_xlabel("hours of training")
        ax.set_ylabel("valid NLL (nats per image)" if binary else "valid NLL (bits/dim)")
        ax.set_title(("binary data" if binary else "multi-level data") + (", background models" if background else ""),
                     fontsize=10)
        ax.grid(alpha=0.3)
        devices = sorted({p[1] for r in drawn for p in r.points})
        handles = ax.get_legend_handles_labels()[0] + [
            Line2D([], [], color="black", label=dev, **DEVICE_STYLE[dev]) for dev in devices]
        ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------- command line

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pixelrnn.training.curves", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="*", help=f"run directories or checkpoint files (default: {DEFAULT_GLOB})")
    p.add_argument("--out", help="PNG to write")
    p.add_argument("--json", help="write the per-run table here")
    p.add_argument("--no-paper", action="store_true", help="leave out the paper's reference lines")
    args = p.parse_args(argv)
    if not args.out and not args.json:
        p.error("give --out PNG, --json PATH, or both")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    paths = [find_record(a) for a in args.inputs or sorted(glob.glob(DEFAULT_GLOB))]
    if not args.inputs:  # a run that has just started has written no record yet: not an error
        for path in [p for p in paths if not p.exists()]:
            print(f"warning: {path.parent}: no run record yet; left out", file=sys.stderr)
        paths = [p for p in paths if p.exists()]
    if not paths:
        print(f"error: no checkpoints given and none match {DEFAULT_GLOB}", file=sys.stderr)
        return 2
    runs = []
    for path in paths:
        try:
            runs.append(read_run(path))
        except CheckpointError as e:  # names the file: missing, truncated, corrupt, foreign
            print(f"error: {e}", file=sys.stderr)
            return 2
        except (KeyError, TypeError) as e:  # a checkpoint whose history entries lack fields
            print(f"error: {path}: history or timeline malformed ({type(e).__name__}: {e})", file=sys.stderr)
            return 2
    for run in runs:
        if run.hours_source == "none":
            print(f"warning: {run.path}: no timeline, hours or metrics.json minutes; left out of the figure", file=sys.stderr)
        elif not run.points:
            print(f"warning: {run.path}: no validation entries yet; left out of the figure", file=sys.stderr)
        elif run.untimed:
            print(f"warning: {run.path}: {run.untimed} validation entries have no timeline entry; left out", file=sys.stderr)
    drawable = [r for r in runs if r.points]
    try:
        if args.json:  # written even when there is nothing to draw: the table still holds
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps([table_row(r) for r in runs], indent=2) + "\n")
        if args.out and not drawable:
            print(f"error: none of the {len(runs)} checkpoint(s) has validation points with hours to draw yet", file=sys.stderr)
            return 2
        if args.out:
            plot(drawable, Path(args.out), paper=not args.no_paper)
    except OSError as e:  # an unwritable output path: its message names it
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
