"""Build an ensemble checkpoint from trained ones:
`python -m pixelrnn.training.ensemble A.pt B.pt [...] --out checkpoints/NAME.pt`.

The ensemble (training/models/ensemble.py) averages its members' conditionals at every
sub-pixel, with equal weights: nothing is fitted, so it needs no data but the members'. They must
model the same data (same data spec, image size, levels and classes); the file records which
checkpoints went in (name, sha256, step) and their training hours, and evaluates, samples and
exports like any checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from pixelrnn.runtime.manifest import file_sha256
from pixelrnn.training.checkpoint import load_checkpoint, load_model, save_checkpoint
from pixelrnn.training.curves import parent_hours
from pixelrnn.training.models import build_model
from pixelrnn.training.models.base import IMAGE_FIELDS


def build(paths: list[str | Path]) -> dict:
    """The ensemble checkpoint payload of the members at `paths` (ValueError naming the misfit)."""
    if len(paths) < 2:
        raise ValueError(f"an ensemble needs at least 2 checkpoints, got {len(paths)}")
    members, records = [], []
    for path in paths:
        ckpt = load_checkpoint(path)
        model, _ = load_model(path, ckpt)
        members.append((path, ckpt, model))
    first_path, first, first_model = members[0]
    for path, ckpt, model in members[1:]:
        if ckpt["data"] != first["data"]:
            raise ValueError(f"{path} was trained on {ckpt['data']}, {first_path} on {first['data']}: "
                             "the members of an ensemble model the same data")
    image = {name: getattr(first_model.config, name) for name in (*IMAGE_FIELDS, "num_classes")}
    config = dict(image, members=[{"arch": c["arch"], "config": dataclasses.asdict(m.config)} for _, c, m in members])
    ensemble = build_model("ensemble", config)  # checks every member's image spec against the first's
    for member, (_, _, model) in zip(ensemble.members, members):
        member.load_state_dict(model.state_dict())
    for path, ckpt, _ in members:
        records.append({"file": Path(path).name, "sha256": file_sha256(path), "arch": ckpt["arch"], "step": ckpt.get("step"),
                        "hours": float(ckpt.get("hours") or 0.0) + parent_hours(ckpt)})
    return {
        "arch": "ensemble", "config": config, "data": first["data"], "model": ensemble.state_dict(),
        "hours": sum(r["hours"] for r in records), "members": records,
        "train_args": {"ensemble_of": [str(p) for p in paths]},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pixelrnn.training.ensemble", description=__doc__.split("\n\n")[0])
    p.add_argument("members", nargs="+", help="trained checkpoints of the same data")
    p.add_argument("--out", required=True, help="the ensemble checkpoint to write")
    args = p.parse_args(argv)
    try:
        payload = build(args.members)
        save_checkpoint(args.out, payload)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = ", ".join(f"{m['arch']} ({m['file']})" for m in payload["members"])
    print(f"{args.out}: ensemble of {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
