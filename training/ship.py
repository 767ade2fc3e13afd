"""Ship a run's checkpoint: `python -m pixelrnn.training.ship RUN/best.pt checkpoints/NAME.pt`.

A shipped checkpoint is the weights and the record of how they were made (architecture, config,
data, step, metrics, history, hours, training arguments), without what only a resumed run needs
(optimizer moments, the weight average, random-number states): a third of the size, and nothing
in it changes when a run resumes. It loads, evaluates, samples and exports like any checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pixelrnn.training.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint

RESUME_ONLY = ("optimizer", "ema", "rng")


def ship(source: str | Path, target: str | Path) -> dict:
    """Write source's weights-only copy to target (atomically) and return what was written."""
    ckpt = load_checkpoint(source)
    load_model(source, ckpt)  # weights that do not fit their config must not be shipped
    slim = {k: v for k, v in ckpt.items() if k not in RESUME_ONLY}
    save_checkpoint(target, slim)
    return slim


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pixelrnn.training.ship", description=__doc__.split("\n")[0])
    p.add_argument("source", help="a run's checkpoint (best.pt, last.pt)")
    p.add_argument("target", help="where the weights-only checkpoint goes, e.g. checkpoints/NAME.pt")
    args = p.parse_args(argv)
    if Path(args.source).resolve() == Path(args.target).resolve():
        p.error("source and target are the same file")
    try:
        shipped = ship(args.source, args.target)
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = Path(args.target).stat().st_size
    print(f"{args.target}: {shipped['arch']} at step {shipped.get('step')}, {size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
