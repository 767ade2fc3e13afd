"""Train any registered architecture on a named data set.

    python -m pixelrnn.training.train --arch pixelcnn --data binarized-mnist --out runs/pixelcnn --epochs 10
    torchrun --standalone --nproc_per_node=2 -m pixelrnn.training.train ...   # DDP (gloo on CPU)

Writes, from rank 0 only and always atomically: DIR/last.pt (every --checkpoint-every steps
and when the run ends or stops), DIR/history.json with it (the run's record without weights:
what its curve needs once last.pt is deleted), DIR/best.pt (the best validation NLL so far),
DIR/loss_curve.png and DIR/metrics.json. `--resume` continues from DIR/last.pt with model,
optimizer, step, history and RNG state, and with the run's own schedule flags (steps or epochs,
batch size, lr, seed, ...) unless given again; the data order is a pure function of (seed,
step), so a resumed run, even one killed mid-epoch, sees the same batches, and reaches the same
weights, as an uninterrupted one.

The loss is the model's own `nll` (multi-scale overrides it) divided by C*H*W, i.e. nats per
sub-pixel, so the learning rate does not depend on the image size.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
from tqdm import tqdm

from pixelrnn.runtime.data_flags import add_data_arguments, data_spec_from_args, parse_key_values
from pixelrnn.runtime.datasets import DataSpec, ImageSet, load
from pixelrnn.training import distributions
from pixelrnn.training.averaging import WeightAverage
from pixelrnn.training.checkpoint import (CheckpointError, build_checkpoint_model, load_checkpoint, load_weights,
                                 remove_stale_temp_files, save_checkpoint)
from pixelrnn.training.distributed import Dist, all_sum, distribute, setup_distributed
from pixelrnn.training.models import ARCHITECTURES, build_model, config_class

# An ensemble is built from trained checkpoints (python -m pixelrnn.training.ensemble), not trained.
TRAINABLE = sorted(a for a in ARCHITECTURES if a != "ensemble")
from pixelrnn.training.models.base import IMAGE_FIELDS
from pixelrnn.training.models.pixelrnn import PixelRNN, deepen
from pixelrnn.training.run_outputs import nll_units, plot_loss_curve, write_json

# Flags that shape the run's trajectory: --resume takes them from the checkpoint unless given again,
# so `--out DIR --resume` alone continues the run it was, not one with default flags.
RESUMED_FLAGS = ("steps", "epochs", "batch_size", "lr", "grad_clip", "seed", "valid_every", "valid_images",
                 "checkpoint_every", "log_every", "compile", "channels_last", "perturb", "weight_decay", "ema")


# ---------------------------------------------------------------------------- arguments

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pixelrnn.training.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=TRAINABLE, help="architecture (optional with --resume)")
    add_data_arguments(p)
    p.add_argument("--out", required=True, help="run directory (checkpoints, curve, metrics)")
    p.add_argument("--epochs", type=float, help="passes over the training set (default 1)")
    p.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step, split across processes")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, cosine-decayed to 0")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (0 disables)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="L2 penalty on the weights (Adam's weight_decay)")
    p.add_argument("--perturb", type=float, default=0.0, metavar="MU",
                   help="train on perturbed images: each sub-pixel replaced by a uniformly random level (binary "
                        "images: flipped) with probability MU; the background model of a likelihood-ratio "
                        "out-of-distribution detector (Ren et al. 2019)")
    p.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="also keep an exponential moving average of the weights (e.g. 0.999), validate it beside the "
                        "raw weights and keep whichever is better in best.pt (default 0: off)")
    p.add_argument("--init-from", metavar="CKPT",
                   help="start a new run (fresh optimizer and schedule) from CKPT's weights, architecture and data: "
                        "a second learning-rate cycle after a finished run; with --layers N, a Row LSTM or Diagonal BiLSTM "
                        "deepened to N layers that starts out computing the same function")
    p.add_argument("--hidden", type=int, help="features per layer (arch field 'hidden')")
    p.add_argument("--layers", type=int, help="depth (arch field 'layers')")
    p.add_argument("--conditional", action="store_true", help="condition on the data's class labels")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help="other config field; repeatable")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/last.pt, with its run's --steps/--epochs, --batch-size, --lr, --seed, ... unless given")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if OUT/last.pt exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--valid-every", type=int, default=500, help="validate every N steps (and at the end)")
    p.add_argument("--valid-images", type=int, default=2000, help="validation subset size (0 = all)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="write OUT/last.pt every N steps")
    p.add_argument("--log-every", type=int, default=50, help="record the mean train loss every N steps")
    p.add_argument("--max-minutes", type=float, help="stop cleanly (with a checkpoint) after M minutes")
    p.add_argument("--stop-at", type=int, help="stop cleanly after step N, as if the job ended there")
    p.add_argument("--threads", type=int, help="torch threads per process (default: cores / processes)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    # Speed options (bench/training.py measures them). They change float rounding, not the model:
    # a resume is bit-exact when it runs with the same ones, which it does unless told otherwise.
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the training step's forward and backward: faster PixelCNN-type steps "
                        "after a first step that compiles (tens of seconds); impractical for the LSTMs")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="channels-last (NHWC) memory format: faster for the Gated PixelCNN, slower for the PixelCNN")
    args = p.parse_args(argv)
    if args.arch is None and not (args.resume or args.init_from):
        p.error("--arch is required (unless --resume or --init-from)")
    if args.data is None and not (args.resume or args.init_from):
        p.error("--data is required (unless --resume or --init-from)")
    for name in ("batch_size", "valid_every", "checkpoint_every", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0.0 <= args.perturb < 1.0:
        p.error(f"--perturb must be in [0, 1), got {args.perturb}")
    if args.weight_decay < 0:
        p.error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.ema and not 0.0 < args.ema < 1.0:
        p.error(f"--ema must be in (0, 1) (or 0 for off), got {args.ema}")
    if args.init_from and args.resume:
        p.error("--init-from starts a new run; --resume continues one: pass one of them")
    # argparse fills in a default only for attributes the namespace lacks: what keeps the marker was not given.
    unset = object()
    given = p.parse_args(argv, namespace=argparse.Namespace(**{k: unset for k in RESUMED_FLAGS}))
    args.explicit = {k for k in RESUMED_FLAGS if getattr(given, k) is not unset}
    return args


# ---------------------------------------------------------------------------- setup

def model_fields(arch: str, args: argparse.Namespace, data: ImageSet) -> dict:
    """Config fields for a fresh model: image spec from the data, the rest from the flags."""
    known = {f.name for f in dataclasses.fields(config_class(arch))}
    c, h, w = data.shape
    fields = dict(in_channels=c, height=h, width=w, levels=data.levels)
    for flag in ("hidden", "layers"):
        value = getattr(args, flag)
        if value is not None:
            if flag not in known:
                raise ValueError(f"--{flag}: architecture {arch} has no {flag!r} field")
            fields[flag] = value
    if args.conditional:
        if data.labels is None or not data.num_classes:
            raise ValueError(f"--conditional: data set {data.description} has no class labels")
        fields["num_classes"] = data.num_classes
    extra = parse_key_values(args.model_arg, "--model-arg")
    for key in IMAGE_FIELDS:
        if key in extra and extra[key] != fields[key]:
            raise ValueError(f"--model-arg {key}={extra[key]} contradicts the data ({key} = {fields[key]})")
    fields.update(extra)
    return fields


def check_data_fits(model, data: ImageSet) -> torch.Tensor | None:
    """Raise if `data` cannot feed `model`; return its labels as a tensor when the model needs them."""
    cfg = model.config
    if data.shape != (cfg.in_channels, cfg.height, cfg.width) or data.levels != cfg.levels:
        raise ValueError(f"{data.description}: images {data.shape} with {data.levels} levels do not fit the model "
                         f"({cfg.in_channels}, {cfg.height}, {cfg.width}) with {cfg.levels} levels")
    if not cfg.num_classes:
        return None
    if data.labels is None:
        raise ValueError(f"{data.description}: the model is class-conditional but the data has no labels")
    labels = torch.as_tensor(data.labels, dtype=torch.long)
    if len(labels) and int(labels.max()) >= cfg.num_classes:
        raise ValueError(f"{data.description}: label {int(labels.max())} is out of range for {cfg.num_classes} classes")
    return labels


# ---------------------------------------------------------------------------- data order and schedule

def steps_per_epoch(n_images: int, batch_size: int) -> int:
    return max(1, n_images // batch_size)  # the incomplete last batch is dropped


def batch_indices(step: int, n_images: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's image indices for global `step`: a pure function, so resuming needs no sampler state.

    Every rank draws the same per-epoch permutation, takes the same global batch, and keeps every
    world-th image of it.
    """
    per_epoch = steps_per_epoch(n_images, batch_size)
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    batch = order[k * batch_size:(k + 1) * batch_size]
    return batch[rank::world]


def perturb_batch(x: torch.Tensor, mu: float, levels: int, step: int, seed: int, rank: int = 0) -> torch.Tensor:
    """`x` (B, C, H, W, integer levels) with each sub-pixel replaced with probability `mu`: by a
    uniformly random level, or for binary images by its flip (a uniform draw would leave half
    the chosen bits unchanged). Drawn from (seed, step, rank) alone, so a resumed run perturbs
    each batch exactly as an uninterrupted one."""
    if mu <= 0:
        return x
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 64 + rank + 7_919)
    chosen = torch.rand(x.shape, generator=g) < mu
    noise = 1 - x.cpu() if levels == 2 else torch.randint(0, levels, x.shape, generator=g)
    return torch.where(chosen.to(x.device), noise.to(x.device, x.dtype), x)


def cosine_lr(step: int, total: int, base: float) -> float:
    return base * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(1, total)))


# ---------------------------------------------------------------------------- loss and evaluation

class NLLObjective(torch.nn.Module):
    """Wraps a model so DDP's forward hook sees the whole `nll` computation."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.model.nll(x, labels)  # (B,) nats per image


@torch.no_grad()
def mean_nll(model, images: torch.Tensor, labels: torch.Tensor | None, batch_size: int, dist: Dist) -> float:
    """Mean NLL in nats per image over `images`, each rank scoring every world-th image."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    mine = torch.arange(dist.rank, len(images), dist.world)
    for start in range(0, len(mine), batch_size):
        idx = mine[start:start + batch_size]
        y = labels[idx].to(dist.device) if labels is not None else None
        total += float(model.nll(images[idx].to(dist.device).long(), y).double().sum())
        count += len(idx)
    model.train(was_training)
    total, count = all_sum([total, float(count)], dist)
    return total / max(count, 1)


def train_step(objective, optimizer, x: torch.Tensor, labels: torch.Tensor | None, dims: int, grad_clip: float) -> float:
    """One optimizer step; returns the batch's mean NLL in nats per image."""
    nll = objective(x, labels)  # (B,)
    loss = nll.mean() / dims
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(objective.parameters(), grad_clip)
    optimizer.step()
    return float(nll.detach().mean())


# ---------------------------------------------------------------------------- the run

@dataclass
class RunState:
    step: int = 0
    history: list = dataclasses.field(default_factory=list)
    metrics: dict = dataclasses.field(default_factory=dict)  # latest validation and best so far
    train_sum: float = 0.0  # nats summed over the steps since the last history entry
    train_steps: int = 0
    # Wall-clock of the run, kept apart from `history` (which a resumed run reproduces bit for bit):
    # hours spent training across every resume, and one {"step", "hours", "device"} per validation.
    hours: float = 0.0
    timeline: list = dataclasses.field(default_factory=list)


def flush_train_loss(state: RunState, dist: Dist, dims: int) -> None:
    """Append the mean train NLL since the last entry (averaged over ranks) to the history."""
    total, steps = all_sum([state.train_sum, float(state.train_steps)], dist)
    if steps:
        nats = total / steps
        state.history.append({"step": state.step, "train_nll_nats": nats,
                              "train_bits_per_dim": float(distributions.nats_to_bits_per_dim(nats, dims))})
        state.metrics.update(train_nll_nats=nats, train_bits_per_dim=state.history[-1]["train_bits_per_dim"])
    state.train_sum, state.train_steps = 0.0, 0


def validate(model, valid: tuple, state: RunState, args, dist: Dist, average: WeightAverage | None = None) -> str | None:
    """Score the validation subset with the raw weights (and the averaged ones, if any), record it,
    and return which weights ("raw" or "ema") set a new best, or None."""
    bits = lambda nats: float(distributions.nats_to_bits_per_dim(nats, model.dims))  # noqa: E731
    nats = mean_nll(model, valid[0], valid[1], args.batch_size, dist)
    entry = {"step": state.step, "valid_nll_nats": nats, "valid_bits_per_dim": bits(nats)}
    scores = {"raw": nats}
    if average is not None:
        scores["ema"] = mean_nll(average.module, valid[0], valid[1], args.batch_size, dist)
        entry.update(ema_valid_nll_nats=scores["ema"], ema_valid_bits_per_dim=bits(scores["ema"]))
        state.metrics.update(ema_nll_nats=scores["ema"], ema_bits_per_dim=bits(scores["ema"]))
    state.history.append(entry)
    state.timeline.append({"step": state.step, "hours": state.hours, "device": str(dist.device.type)})
    state.metrics.update(split="valid", nll_nats=nats, bits_per_dim=bits(nats), valid_images=len(valid[0]), step=state.step)
    which = min(scores, key=scores.get)
    if scores[which] >= state.metrics.get("best_nll_nats", math.inf):
        return None
    state.metrics.update(best_nll_nats=scores[which], best_bits_per_dim=bits(scores[which]), best_step=state.step,
                         best_weights=which)
    return which


def run_record(model, state: RunState, arch: str, spec: DataSpec, per_epoch: int, perturb: float = 0.0,
               init_from: str | None = None) -> dict:
    """What a run's curve and table need (training.curves), without weights: DIR/history.json,
    small enough to keep in the repository once the run's resumable state is gone."""
    return {"arch": arch, "config": dataclasses.asdict(model.config), "data": spec.to_dict(), "step": state.step,
            "epoch": state.step / per_epoch, "metrics": dict(state.metrics), "history": list(state.history),
            "hours": state.hours, "timeline": list(state.timeline), "params": sum(p.numel() for p in model.parameters()),
            "perturb": perturb, "init_from": init_from}


def save_run(path: Path, model, optimizer, state: RunState, arch: str, spec: DataSpec, args, per_epoch: int,
             average: WeightAverage | None = None, weights: str = "raw") -> None:
    """Write a checkpoint holding the raw weights, or the averaged ones with weights="ema" (best.pt
    when they validated best); last.pt also carries the average so that --resume continues it."""
    resumable = path.name == "last.pt"
    if resumable:  # written first: a crash between the two leaves the record behind, never ahead
        write_json(path.parent / "history.json", run_record(model, state, arch, spec, per_epoch, getattr(args, "perturb", 0.0),
                                                             getattr(args, "init_from", None)))
    source = average.module if weights == "ema" else model
    extra = {"ema": average.state_dict()} if resumable and average is not None else {}
    save_checkpoint(path, {
        **extra,
        "arch": arch,
        "config": dataclasses.asdict(model.config),
        "data": spec.to_dict(),
        "model": {k: v.detach().cpu() for k, v in source.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "step": state.step,
        "epoch": state.step / per_epoch,
        "metrics": dict(state.metrics),
        "history": list(state.history),
        "train_args": {k: v for k, v in vars(args).items() if k != "explicit"},
        "rng": {"torch": torch.get_rng_state()},
        "hours": state.hours,
        "timeline": list(state.timeline),
    })


def total_steps(args, per_epoch: int) -> int:
    if args.steps is not None:
        return args.steps
    return max(1, round((args.epochs if args.epochs is not None else 1) * per_epoch))


def open_run(args, last: Path) -> dict | None:
    """The checkpoint to resume from, or None for a fresh run (never silently clobbering one)."""
    if not args.resume:
        if last.exists() and not args.overwrite:
            raise ValueError(f"{last} exists: pass --resume to continue that run or --overwrite to start afresh")
        return None
    if not last.exists():
        raise ValueError(f"--resume: {last} does not exist")
    ckpt = load_checkpoint(last)
    if args.arch is not None and args.arch != ckpt["arch"]:
        raise ValueError(f"--resume: {last} holds a {ckpt['arch']} model, not {args.arch}")
    return ckpt


def resume_flags(args, ckpt: dict) -> None:
    """Take the run's schedule flags from the checkpoint where the command line leaves them out.

    A namespace not made by parse_args (no `explicit`) counts as giving every flag.
    """
    explicit = getattr(args, "explicit", None)
    if explicit is None:
        return
    saved = ckpt.get("train_args") or {}
    for key in RESUMED_FLAGS:
        if key in explicit or key not in saved:
            continue
        if key in ("steps", "epochs") and explicit & {"steps", "epochs"}:
            continue  # a new length given either way replaces the old one
        setattr(args, key, saved[key])


def restore(ckpt: dict | None, model, optimizer, path: Path | None = None) -> RunState:
    if ckpt is None:
        return RunState()
    load_weights(path, model, ckpt["model"])
    if not ckpt.get("optimizer"):
        raise CheckpointError(f"{path}: holds no optimizer state, so training cannot continue from it "
                              "(it was not written by training.train)")
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: optimizer state does not fit the model: {why}") from None
    if "rng" in ckpt:
        torch.set_rng_state(ckpt["rng"]["torch"])
    return RunState(step=ckpt["step"], history=list(ckpt["history"]), metrics=dict(ckpt["metrics"]),
                    hours=float(ckpt.get("hours", 0.0)), timeline=list(ckpt.get("timeline", [])))


def train(args: argparse.Namespace) -> dict:
    """Run (or continue) training as described by `args`; returns the final metrics."""
    dist = setup_distributed(args.device)
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // dist.local_world))
    out = Path(args.out)
    last = out / "last.pt"
    ckpt = open_run(args, last)
    if ckpt:
        resume_flags(args, ckpt)
    init = open_init(args) if not ckpt else None

    # Data and model: a resumed run (or one started from another's weights) takes its
    # architecture, config and data spec from the file.
    base = ckpt or (init[1] if init else None)
    spec = data_spec_from_args(args, base=base["data"] if base else None)
    train_set, valid_set = load(spec, "train"), load(spec, "valid")
    arch = base["arch"] if base else args.arch
    torch.manual_seed(args.seed)
    if ckpt:
        model = build_checkpoint_model(last, ckpt)
    elif init:
        model = init_model(args, *init)
    else:
        model = build_model(arch, model_fields(arch, args, train_set))
    model = model.to(dist.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)  # in place: the optimizer below gets these parameters
    images, labels = torch.as_tensor(train_set.images), check_data_fits(model, train_set)
    n_valid = args.valid_images or len(valid_set)
    valid_labels = check_data_fits(model, valid_set)
    valid = (torch.as_tensor(valid_set.images[:n_valid]), valid_labels[:n_valid] if valid_labels is not None else None)
    if args.batch_size < dist.world or len(images) < dist.world:
        raise ValueError(f"--batch-size {args.batch_size} and the {len(images)} training images must cover {dist.world} processes")

    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=getattr(args, "weight_decay", 0.0))
    objective = distribute(NLLObjective(model), images, labels, dist)
    if args.compile:
        objective = torch.compile(objective)  # compiles at the first step; validation stays eager
    state = restore(ckpt, model, optimizer, last)
    average = WeightAverage(model, args.ema) if getattr(args, "ema", 0.0) else None
    if average is not None and ckpt and "ema" in ckpt:
        average.load_state_dict(ckpt["ema"])  # else the average starts at the resumed weights
    per_epoch = steps_per_epoch(len(images), args.batch_size)
    total = total_steps(args, per_epoch)
    dims, levels = model.dims, model.config.levels
    save = lambda path, weights="raw": save_run(path, model, optimizer, state, arch, spec, args, per_epoch,  # noqa: E731
                                                average, weights)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        stale = remove_stale_temp_files(last) + remove_stale_temp_files(out / "best.pt")
        if stale:
            print(f"removed {len(stale)} partial checkpoint file(s) left by an interrupted save: "
                  f"{', '.join(p.name for p in stale)}", file=sys.stderr)
        if ckpt:
            print(f"resuming {last} at step {state.step}", file=sys.stderr)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{arch}: {n_params:,} parameters; {train_set.description}: {len(images)} images, "
              f"{per_epoch} steps/epoch, {total} steps, {dist.world} process(es) on {dist.device}", file=sys.stderr)
    bar = tqdm(total=total, initial=min(state.step, total), desc=arch, disable=not dist.is_main, dynamic_ncols=True)
    log = lambda msg: dist.is_main and bar.write(msg)  # noqa: E731
    started = time.monotonic()
    validated_at = state.metrics.get("step")

    model.train()
    try:  # closed before main() prints an error, so the error stays the last line
        while state.step < total:
            idx = batch_indices(state.step, len(images), args.batch_size, args.seed, dist.rank, dist.world)
            x = perturb_batch(images[idx].to(dist.device).long(), getattr(args, "perturb", 0.0), levels, state.step, args.seed, dist.rank)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = labels[idx].to(dist.device) if labels is not None else None
            lr = cosine_lr(state.step, total, args.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            tick = time.monotonic()
            nats = train_step(objective, optimizer, x, y, dims, args.grad_clip)
            if average is not None:
                average.update(model)
            state.hours += (time.monotonic() - tick) / 3600
            state.step += 1
            state.train_sum, state.train_steps = state.train_sum + nats, state.train_steps + 1
            unit, value = nll_units(levels, nats, dims)
            bar.update(1)
            bar.set_postfix_str(f"{unit} {value:.4f} lr {lr:.2e}", refresh=False)

            stopping = should_stop(args, state.step, started, dist)
            if state.step % args.log_every == 0:
                flush_train_loss(state, dist, dims)
            if state.step % args.valid_every == 0 or state.step == total or stopping:
                best = validate(model, valid, state, args, dist, average)
                validated_at = state.step
                log(validation_line(state, levels, dims, best))
                if best and dist.is_main:
                    save(out / "best.pt", best)
            if state.step % args.checkpoint_every == 0 or state.step == total or stopping:
                flush_train_loss(state, dist, dims)  # a checkpoint carries every step's loss
                if dist.is_main:
                    save(last)
            if stopping:
                log(f"stopping cleanly at step {state.step} of {total}; continue with --resume")
                break
    finally:
        bar.close()

    if validated_at != state.step:  # e.g. --resume with fewer --steps than the file already has
        validate(model, valid, state, args, dist, average)
        if dist.is_main:
            save(last)
    metrics = {"arch": arch, "data": spec.to_dict(), "step": state.step, "total_steps": total,
               "epoch": state.step / per_epoch, "finished": state.step >= total,
               "minutes": (time.monotonic() - started) / 60, **state.metrics}
    if dist.is_main:
        plot_loss_curve(state.history, out / "loss_curve.png", levels, dims)
        write_json(out / "metrics.json", metrics)
    return metrics


def validation_line(state: RunState, levels: int, dims: int, best: str | None) -> str:
    unit, value = nll_units(levels, state.metrics["nll_nats"], dims)
    line = f"step {state.step}: valid {unit} {value:.4f}"
    if "ema_nll_nats" in state.metrics:
        line += f", averaged {nll_units(levels, state.metrics['ema_nll_nats'], dims)[1]:.4f}"
    return line + (f" (best: {best})" if best else "")


def open_init(args) -> tuple[str, dict] | None:
    """(path, checkpoint) that --init-from names, or None; its architecture is the run's."""
    path = getattr(args, "init_from", None)
    if not path:
        return None
    init = load_checkpoint(path)
    if args.arch is not None and args.arch != init["arch"]:
        raise ValueError(f"--init-from: {path} holds a {init['arch']} model, not {args.arch}")
    return path, init


def init_model(args, path: str, init: dict):
    """The model --init-from starts from: the checkpoint's, with --model-arg fields that keep its
    weights' shapes (e.g. dropout) and --layers deeper than it (a Row LSTM / Diagonal BiLSTM
    deepened so that it computes the same function; see models.pixelrnn.deepen)."""
    if args.hidden is not None and args.hidden != init["config"].get("hidden"):
        raise ValueError(f"--init-from: --hidden {args.hidden} differs from {path}'s {init['config'].get('hidden')}; "
                         "a new run starts from a checkpoint's weights only at its width")
    extra = parse_key_values(args.model_arg, "--model-arg")
    model = build_checkpoint_model(path, {**init, "config": {**init["config"], **extra}})
    load_weights(path, model, init["model"])
    if args.layers is not None and args.layers != model.config.layers:
        if not isinstance(model, PixelRNN):
            raise ValueError(f"--init-from: --layers {args.layers}: only a Row LSTM or Diagonal BiLSTM can be deepened "
                             f"({path} holds a {init['arch']})")
        model = deepen(model, args.layers)
    return model


def should_stop(args, step: int, started: float, dist: Dist) -> bool:
    """--stop-at / --max-minutes; rank 0's clock decides so that all ranks stop at the same step."""
    if args.stop_at is not None and step >= args.stop_at:
        return True
    if args.max_minutes is None:
        return False
    flag = [1.0 if time.monotonic() - started >= args.max_minutes * 60 else 0.0]
    if dist.world > 1:
        t = torch.tensor(flag, device=dist.device)
        torch_dist.broadcast(t, 0)
        flag = t.tolist()
    return flag[0] > 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        metrics = train(args)
    # DataError, CheckpointError and bad flags; OSError: e.g. an unwritable --out or a full disk
    # (its message names the path). A message, not a traceback.
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: metrics.get(k) for k in ("step", "nll_nats", "bits_per_dim", "best_nll_nats")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
