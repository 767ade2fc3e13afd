"""The shipped checkpoints' validation NLL: docs/measurements.md "Shipped checkpoints" and the
README's table of shipped models quote it.

    python -m bench.checkpoints [--json bench/results/checkpoints.json] [CHECKPOINT ...]

Every checkpoints/*.pt (or the files given) is scored on its data set's FULL validation split
with training.evaluate (the binarized-MNIST test split is held out); each entry also records
the checkpoint's architecture, size, step, epochs and training hours, and the file's sha256, so
a figure can always be traced to the exact weights it was measured on.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.common import PROJECT_ROOT as ROOT, result, shown, write_json
from pixelrnn.runtime.manifest import file_sha256
from pixelrnn.training import evaluate
from pixelrnn.training.checkpoint import load_checkpoint
from pixelrnn.training.curves import init_from, parent_hours, parent_relation


def describe(path: Path) -> dict:
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    parent = init_from(ckpt)
    args = argparse.Namespace(checkpoint=str(path), data=None, data_dir=None, bits=None, data_arg=[], split="valid",
                              limit=None, batch_size=256, threads=None)
    score = evaluate.run(args)
    return {
        "file": shown(path),
        "sha256": file_sha256(path), "arch": ckpt["arch"],
        "size": size(cfg),
        "step": ckpt.get("step"), "epoch": ckpt.get("epoch"), "hours": ckpt.get("hours"),
        # A new cycle (train --init-from) continues other weights: the run it started from and the
        # hours behind those weights, so the table does not show the last cycle as all of it.
        "init_from": parent, "parent_hours": parent_hours(ckpt) if parent else None,
        "parent_relation": parent_relation(ckpt) if parent else None,
        "valid_nll_nats": score["nll_nats"], "valid_bits_per_dim": score["bits_per_dim"],
        "valid_images": score["n_images"], "data": score["data"],
        **({"members": [dict(m, size=size(c["config"])) for m, c in zip(ckpt["members"], cfg["members"])]}
           if ckpt["arch"] == "ensemble" else {}),
    }


def size(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("hidden", "layers", "kernel", "num_classes", "levels") if k in cfg}


def kept_entries(json_path: Path, paths: list[Path]) -> dict:
    """The recorded entries still true of the files: every entry whose file still has its sha256,
    except those of `paths` that changed (they are scored again) and of files that are gone."""
    if not json_path.exists():
        return {}
    kept = {}
    for stem, entry in json.loads(json_path.read_text())["results"].items():
        file = ROOT / entry["file"]
        if file.exists() and file_sha256(file) == entry["sha256"]:
            kept[stem] = entry
    return kept


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.checkpoints", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="*", help="default: checkpoints/*.pt")
    p.add_argument("--json", default="bench/results/checkpoints.json")
    p.add_argument("--update", action="store_true",
                   help="keep --json's entries for the other files (and for unchanged ones: same sha256), "
                        "scoring only new or changed checkpoints")
    args = p.parse_args(argv)
    paths = [Path(c) for c in args.checkpoints] or sorted((ROOT / "checkpoints").glob("*.pt"))
    results = kept_entries(Path(args.json), paths) if args.update else {}
    for path in paths:
        if path.stem in results:
            print(f"{path.name}: unchanged, kept", file=sys.stderr)
            continue
        print(f"{path.name} ...", file=sys.stderr, flush=True)
        results[path.stem] = describe(path)
        r = results[path.stem]
        print(f"  {r['valid_nll_nats']:.2f} nats, {r['valid_bits_per_dim']:.4f} bits/dim on {r['valid_images']} images", file=sys.stderr)
    results = dict(sorted(results.items()))  # one order whichever entries were kept
    write_json(args.json, result("checkpoints", split="valid", results=results))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
