"""What an ensemble checkpoint gains over its members, and over mixing whole images:

    python -m bench.ensembles [--json bench/results/ensembles.json] [CHECKPOINT ...]

For each ensemble (default: every checkpoints/*.pt whose arch is "ensemble"), on its data set's
full validation split: each member's NLL, the ensemble's (every sub-pixel's distribution the mean
of the members', training/models/ensemble.py) and that of a mixture of whole images of the same
members, p(x) = mean_k p_k(x), the other way to average models. One pass of each member gives all
three: the per-sub-pixel probabilities of the observed values.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from bench.common import PROJECT_ROOT as ROOT, finish, reexec_with_malloc_env, result, shown
from pixelrnn.runtime.datasets import load
from pixelrnn.runtime.manifest import file_sha256
from pixelrnn.training.checkpoint import load_checkpoint, load_model

BATCH = 250


@torch.no_grad()
def member_pixel_nll(model, images: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """-log p of each observed sub-pixel under every member: (members, N, C, H, W) float64."""
    out = []
    for member in model.members:
        member.eval()
        chunks = []
        for i in range(0, len(images), BATCH):
            x = torch.from_numpy(images[i:i + BATCH]).long()
            y = None if labels is None else torch.from_numpy(labels[i:i + BATCH]).long()
            chunks.append(member.pixel_nll(x, y).double().numpy())
        out.append(np.concatenate(chunks))
    return np.stack(out)


def measure(path: Path) -> dict:
    ckpt = load_checkpoint(path)
    model, _ = load_model(path, ckpt)
    split = load(ckpt["data"], "valid")
    labels = split.labels if model.config.num_classes else None
    nll = member_pixel_nll(model, split.images, labels)  # (K, N, C, H, W)
    k = len(nll)
    per_image = nll.reshape(k, len(split.images), -1).sum(-1)  # (K, N)
    # Per sub-pixel: -log mean_k p_k(x_i | x_<i); whole images: -log mean_k p_k(x), in log space.
    ensemble = -(np.logaddexp.reduce(-nll, axis=0) - np.log(k)).reshape(len(split.images), -1).sum(-1)
    mixture = -(np.logaddexp.reduce(-per_image, axis=0) - np.log(k))
    return {
        "file": shown(path), "sha256": file_sha256(path), "data": f"{ckpt['data']['name']}/valid", "images": len(split.images),
        "members": [{"file": m["file"], "arch": m["arch"], "valid_nll_nats": float(v.mean())}
                    for m, v in zip(ckpt["members"], per_image)],
        "ensemble_nll_nats": float(ensemble.mean()), "mixture_nll_nats": float(mixture.mean()),
        "best_member_nll_nats": float(per_image.mean(1).min()),
    }


def report(results: dict) -> str:
    lines = []
    for name, r in results.items():
        members = ", ".join(f"{m['arch']} {m['valid_nll_nats']:.2f}" for m in r["members"])
        lines.append(f"{name} ({r['data']}, {r['images']} images): members {members}; averaged per sub-pixel "
                     f"{r['ensemble_nll_nats']:.2f}, mixture of whole images {r['mixture_nll_nats']:.2f} nats")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ensembles", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="*", help="ensemble checkpoints (default: the ensembles in checkpoints/)")
    p.add_argument("--json", default="bench/results/ensembles.json")
    args = p.parse_args(argv)
    paths = [Path(c) for c in args.checkpoints] or [c for c in sorted((ROOT / "checkpoints").glob("*.pt"))
                                                     if load_checkpoint(c)["arch"] == "ensemble"]
    for path in paths:
        if load_checkpoint(path)["arch"] != "ensemble":
            print(f"error: {path} is not an ensemble (pixelrnn ensemble makes one)", file=sys.stderr)
            return 2
    results = {path.stem: measure(path) for path in paths}
    finish(result("ensembles", results=results), args.json, report(results))
    return 0


if __name__ == "__main__":
    reexec_with_malloc_env("bench.ensembles", sys.argv[1:])
    sys.exit(main())
