"""Out-of-distribution detection with the shipped models: raw NLL, input complexity and the
likelihood ratio against a background model (runtime/ood.py), on full test splits.

    python -m bench.ood --json bench/results/ood.json --roc docs/ood_roc.png [--limit N] [--pairs fashion,binary]

Pairs (in-distribution vs out-of-distribution):
  fashion  Fashion-MNIST test (10k) vs MNIST test (10k, ../shared/data/mnist): the
           class-conditional Gated PixelCNN, scored by its marginal over the 10 classes
  binary   binarized MNIST valid (10k; its test split is held out) vs binarized Fashion-MNIST
           test (10k): the binarized-MNIST Gated PixelCNN

For each score: AUROC and AUPRC (out-of-distribution as the positive class) and the
false-positive rate at 95% true-positive rate. Per-image NLLs are cached by checkpoint checksum
and data (--cache), so a rerun that changes only the report costs nothing; the class-conditional
model's marginal takes ten passes per image.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

from bench.common import finish, reexec_with_malloc_env, result

PAIRS = {
    "fashion": {"model": "checkpoints/gated_pixelcnn_fashion_mnist.pt",
                "background": "checkpoints/gated_pixelcnn_fashion_mnist_background.pt",
                "in": ("fashion-mnist", "test"), "out": ("mnist", "test")},
    "binary": {"model": "checkpoints/gated_pixelcnn_binarized_mnist.pt",
               "background": "checkpoints/pixelcnn_binarized_mnist_background.pt",
               "in": ("binarized-mnist", "valid"), "out": ("fashion-mnist-binary", "test")},
}
TPR = 0.95


def metrics(in_scores: np.ndarray, out_scores: np.ndarray) -> dict:
    """Out-of-distribution is the positive class; a higher score means more out-of-distribution."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    y = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    s = np.r_[in_scores, out_scores]
    fpr, tpr, _ = roc_curve(y, s)
    return {"auroc": float(roc_auc_score(y, s)), "auprc": float(average_precision_score(y, s)),
            "fpr_at_95_tpr": float(fpr[np.searchsorted(tpr, TPR, side="left")])}


def roc_points(in_scores: np.ndarray, out_scores: np.ndarray, points: int = 101) -> list[list[float]]:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))], np.r_[in_scores, out_scores])
    grid = np.linspace(0, 1, points)
    return [[float(f), float(np.interp(f, fpr, tpr))] for f in grid]


def cached_nll(checkpoint: str, data: tuple[str, str], limit: int, cache: Path | None) -> np.ndarray:
    """Per-image NLL of the first `limit` images (0: all) of data split under the checkpoint."""
    from pixelrnn.runtime.datasets import load

    images = load(data[0], data[1]).images
    return cached_images_nll(checkpoint, f"{data[0]}-{data[1]}-{limit}", images[:limit] if limit else images, cache)


def cached_images_nll(checkpoint: str, key: str, images: np.ndarray, cache: Path | None) -> np.ndarray:
    """Per-image NLL of `images` under the checkpoint, cached as CHECKPOINT-SHA-KEY.npy: `key`
    names the images (data set, split, how many, any transformation)."""
    import torch

    from pixelrnn.training.checkpoint import load_model
    from pixelrnn.training.ood import image_nll, trained_classes

    digest = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()[:16]
    path = cache / f"{Path(checkpoint).stem}-{digest}-{key}.npy" if cache else None
    if path and path.exists():
        return np.load(path)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, ckpt = load_model(checkpoint)
    nll = image_nll(model, images, desc=f"{Path(checkpoint).stem} on {key}", classes=trained_classes(ckpt))
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, nll)
    return nll


def run_pair(pair: dict, limit: int, cache: Path | None) -> dict:
    from pixelrnn.runtime import ood
    from pixelrnn.runtime.datasets import load

    scores, counts = {}, {}
    for side in ("in", "out"):
        data = pair[side]
        loaded = load(data[0], data[1])
        images = loaded.images[:limit] if limit else loaded.images
        nll = cached_nll(pair["model"], data, limit, cache)
        background = cached_nll(pair["background"], data, limit, cache)
        scores[side] = ood.scores(nll, images, loaded.levels, background)
        counts[side] = {"data": f"{data[0]}/{data[1]}", "images": len(images), "mean_nll_nats": float(scores[side]["nll"].mean())}
    return {
        "model": pair["model"], "background": pair["background"], "in": counts["in"], "out": counts["out"],
        "scores": {s: metrics(scores["in"][s], scores["out"][s]) for s in ood.SCORES},
        "roc": {s: roc_points(scores["in"][s], scores["out"][s]) for s in ood.SCORES},
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"nll": "raw NLL", "complexity": "input complexity", "llr": "likelihood ratio"}
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4.6), squeeze=False)
    for ax, (pair, r) in zip(axes[0], results.items()):
        for score, points in r["roc"].items():
            f, t = zip(*points)
            ax.plot(f, t, label=f"{names[score]} (AUROC {r['scores'][score]['auroc']:.3f})")
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(f"{r['in']['data']} (in) vs {r['out']['data']} (out)", fontsize=9)
        ax.set_xlabel("false-positive rate (in-distribution flagged)")
        ax.set_ylabel("true-positive rate (out-of-distribution flagged)")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(results: dict) -> str:
    lines = []
    for pair, r in results.items():
        lines.append(f"{pair}: {r['in']['data']} ({r['in']['images']}) vs {r['out']['data']} ({r['out']['images']})")
        for score, m in r["scores"].items():
            lines.append(f"  {score:<11} AUROC {m['auroc']:.3f}  AUPRC {m['auprc']:.3f}  FPR@95%TPR {m['fpr_at_95_tpr']:.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ood", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--roc", help="draw the ROC curves into this PNG")
    p.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated, of {', '.join(PAIRS)}")
    p.add_argument("--limit", type=int, default=0, help="images per split (0: the full split)")
    p.add_argument("--cache", default="build/ood_cache", help="folder of cached per-image NLLs ('' : none)")
    p.add_argument("--model", action="append", default=[], metavar="PAIR=CHECKPOINT", help="another model for a pair")
    p.add_argument("--background", action="append", default=[], metavar="PAIR=CHECKPOINT", help="another background model")
    args = p.parse_args(argv)
    pairs = [s for s in args.pairs.split(",") if s]
    unknown = [s for s in pairs if s not in PAIRS]
    if unknown or not pairs:
        p.error(f"--pairs: unknown {unknown}; known: {', '.join(PAIRS)}")
    chosen = {name: dict(PAIRS[name]) for name in pairs}
    for flag, key in ((args.model, "model"), (args.background, "background")):
        for item in flag:
            name, _, path = item.partition("=")
            if name not in chosen or not path:
                p.error(f"--{key} {item!r}: give PAIR=CHECKPOINT with PAIR one of {', '.join(chosen)}")
            chosen[name][key] = path
    for name, pair in chosen.items():
        for key in ("model", "background"):
            if not Path(pair[key]).is_file():
                print(f"error: {name}: {key} checkpoint {pair[key]} not found", file=sys.stderr)
                return 2
    results = {name: run_pair(pair, args.limit, Path(args.cache) if args.cache else None) for name, pair in chosen.items()}
    if args.roc:
        plot(results, Path(args.roc))
    payload = result("ood", model={name: {"model": r["model"], "background": r["background"]} for name, r in results.items()},
                     limit=args.limit, tpr=TPR, results=results)
    finish(payload, args.json, report(results))
    return 0


if __name__ == "__main__":
    reexec_with_malloc_env("bench.ood", sys.argv[1:])
    sys.exit(main())
