"""Choosing a likelihood-ratio background model with in-distribution data only.

    python -m bench.ood_select BACKGROUND.pt ... [--pair fashion] [--images 1000] --json bench/results/ood_select.json

No out-of-distribution set may choose the background model (its noise rate, regularisation or
training length), or the detector would be tuned to the very sets it is then measured on. The
stand-in outliers are made from the in-distribution validation split itself: images whose
semantics are broken while their low-level statistics (pixel histogram, strokes, textures) are
kept, half turned by 90 degrees and half turned upside down. That is what a likelihood ratio
claims to see and raw likelihood cannot: the same pixels, arranged as nothing the data holds.
Each candidate is scored by its likelihood ratio's AUROC between the first N validation images
(in) and the next N, transformed (out); the highest wins. With --criterion held-out-classes the
stand-in outliers are instead classes that neither the model (--model, trained on some classes
only: `--data-arg classes=[...]`) nor the candidates saw: each candidate then stands for a recipe
(noise rate, size, length) to train again on all of the data. Raw NLL and input complexity are
reported on the same images for reference, and for each candidate how much its ratio on the
in-distribution images still spreads and follows their share of empty pixels (the population
statistics a background model is there to cancel). Per-image NLLs are cached as in bench.ood.

With --audit, once the choice is made, every candidate is also measured on the pair's held-out test
sets (bench.ood's out-of-distribution set included): whether the in-distribution criterion ranks
the candidates as the held-out sets would. The audit is reported beside the choice, never feeds it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from bench.common import finish, reexec_with_malloc_env, result
from bench.ood import PAIRS, cached_images_nll, metrics, run_pair
from pixelrnn.runtime.manifest import file_sha256


def semantic_shift(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> the same images, even ones turned by 90 degrees, odd ones upside down."""
    out = np.array(images, copy=True)
    out[0::2] = np.rot90(images[0::2], k=1, axes=(2, 3))
    out[1::2] = images[1::2, :, ::-1, :]
    return out


CRITERIA = ("turned", "held-out-classes")


def selection_sets(data: str, n: int, criterion: str = "turned", classes: list[int] | None = None):
    """(in, out, levels, keys, what): the in-distribution validation images a criterion compares.
    turned: images [0, n) as they are against [n, 2n) turned. held-out-classes: the first n images
    of the classes the model was trained on against the first n of the others."""
    from pixelrnn.runtime.datasets import load

    valid = load(data, "valid")
    if criterion == "turned":
        if 2 * n > len(valid.images):
            raise ValueError(f"--images {n}: {data}/valid has {len(valid.images)} images, fewer than 2 x {n}")
        return (valid.images[:n], semantic_shift(valid.images[n:2 * n]), valid.levels,
                (f"{data}-valid-first{n}", f"{data}-valid-next{n}-shifted"), "turned")
    if not classes:
        raise ValueError("held-out-classes: the model must be trained on some classes only (its data spec's classes)")
    known = np.isin(valid.labels, classes)
    inside, outside = valid.images[known][:n], valid.images[~known][:n]
    if min(len(inside), len(outside)) < n:
        raise ValueError(f"--images {n}: {data}/valid has {len(inside)} images of classes {classes} and "
                         f"{len(outside)} of the others, fewer than {n}")
    name = "-".join(map(str, classes))
    return (inside, outside, valid.levels, (f"{data}-valid-classes{name}-first{n}", f"{data}-valid-not{name}-first{n}"),
            f"classes other than {', '.join(map(str, classes))}")


def auroc_standard_error(auroc: float, n_in: int, n_out: int) -> float:
    """The AUROC's standard error (Hanley and McNeil 1982): how far apart two candidates' AUROCs on
    these few images must be before the difference is more than sampling noise."""
    q1, q2 = auroc / (2 - auroc), 2 * auroc ** 2 / (1 + auroc)
    var = (auroc * (1 - auroc) + (n_out - 1) * (q1 - auroc ** 2) + (n_in - 1) * (q2 - auroc ** 2)) / (n_in * n_out)
    return float(np.sqrt(max(var, 0.0)))


def diagnostics(llr: np.ndarray, images: np.ndarray) -> dict:
    """How far the ratio on in-distribution images still follows their population statistics,
    which it exists to cancel: its spread and its rank correlation with the share of empty
    (level 0) sub-pixels. Reported beside the AUROC, not used to choose."""
    from scipy.stats import spearmanr

    empty = (np.asarray(images) == 0).reshape(len(images), -1).mean(axis=1)
    return {"llr_std_in": float(np.std(llr)), "llr_rank_corr_empty": float(spearmanr(llr, empty)[0])}


def recipe(path: str) -> dict:
    """How a candidate was trained, from its checkpoint: size, kernel, noise rate, L2 penalty, epochs."""
    from pixelrnn.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    args = ckpt.get("train_args") or {}
    return {"arch": ckpt["arch"], "hidden": ckpt["config"].get("hidden"), "layers": ckpt["config"].get("layers"),
            "kernel": ckpt["config"].get("kernel"), "perturb": args.get("perturb"), "weight_decay": args.get("weight_decay"), "epochs": ckpt.get("epoch")}


RECIPE_FIELDS = ("arch", "hidden", "layers", "kernel", "perturb", "weight_decay")


def recipe_key(r: dict) -> tuple:
    """What makes two candidates the same recipe whatever data they were trained on (epochs to a
    tenth: an epoch of a smaller split is a different number of steps)."""
    return tuple(r.get(k) for k in RECIPE_FIELDS) + (round(r.get("epochs") or 0, 1),)


def run(pair: dict, candidates: list[str], n: int, cache: Path | None, criterion: str = "turned") -> dict:
    from pixelrnn.runtime import ood
    from pixelrnn.training.checkpoint import load_checkpoint
    from pixelrnn.training.ood import trained_classes

    data = pair["in"][0]
    classes = trained_classes(load_checkpoint(pair["model"]))
    inside, outside, levels, keys, out_what = selection_sets(data, n, criterion, classes)
    model = [cached_images_nll(pair["model"], key, images, cache) for key, images in zip(keys, (inside, outside))]
    reference = [ood.scores(nll, images, levels) for nll, images in zip(model, (inside, outside))]
    scored = {}
    for path in candidates:
        background = [cached_images_nll(path, key, images, cache) for key, images in zip(keys, (inside, outside))]
        llr_in, llr_out = model[0] - background[0], model[1] - background[1]
        m = metrics(llr_in, llr_out)
        scored[path] = {**m, "auroc_se": auroc_standard_error(m["auroc"], len(llr_in), len(llr_out)),
                        **diagnostics(llr_in, inside),
                        "valid_nll_nats": float(background[0].mean()), "sha256": file_sha256(Path(path)),
                        "recipe": recipe(path)}
    chosen = max(scored, key=lambda c: scored[c]["auroc"])
    return {"model": pair["model"], "data": f"{data}/valid", "criterion": criterion, "out": out_what,
            "images": {"in": n, "out": n},
            "reference": {s: metrics(reference[0][s], reference[1][s]) for s in ("nll", "complexity")},
            "candidates": scored, "chosen": chosen,
            "shipped": {"file": pair["background"], "sha256": file_sha256(Path(pair["background"])),
                        "recipe": recipe(pair["background"])}}


def audit(pair: dict, candidates: list[str], limit: int, cache: Path | None) -> dict:
    """Each candidate's likelihood-ratio AUROC on the pair's test sets, and how well the in-distribution
    criterion's ranking follows it (Spearman over the candidates). Run after the choice is made."""
    held_out = {path: run_pair({**pair, "background": path}, limit, cache) for path in candidates}
    first = next(iter(held_out.values()))
    return {"data": {"in": first["in"]["data"], "out": first["out"]["data"]}, "images": first["in"]["images"],
            "llr_auroc": {path: r["scores"]["llr"]["auroc"] for path, r in held_out.items()}}


def audit_agreement(r: dict) -> float | None:
    """Spearman rank correlation between the criterion and the held-out AUROC over the candidates."""
    from scipy.stats import spearmanr

    paths = list(r["candidates"])
    criterion = [r["candidates"][p]["auroc"] for p in paths]
    held_out = [r["audit"]["llr_auroc"][p] for p in paths]
    if len(paths) < 3 or len(set(criterion)) < 2 or len(set(held_out)) < 2:
        return None  # no ranking to compare
    return float(spearmanr(criterion, held_out)[0])


def report(r: dict) -> str:
    lines = [f"{r['data']}: {r['images']['in']} images vs {r['images']['out']} {r['out']}; likelihood-ratio AUROC per background:"]
    for path, m in r["candidates"].items():
        marks = ("  <- chosen" if path == r["chosen"] else "") + ("  (shipped)" if m["sha256"] == r["shipped"]["sha256"] else "")
        lines.append(f"  {m['auroc']:.3f} +- {m['auroc_se']:.3f}  (in: spread {m['llr_std_in']:.1f} nats, rank correlation with empty pixels "
                     f"{m['llr_rank_corr_empty']:+.2f})  {path}{marks}")
    lines += [f"  reference {s}: AUROC {m['auroc']:.3f}" for s, m in r["reference"].items()]
    if "audit" in r:
        a = r["audit"]
        lines.append(f"audit, after the choice: likelihood-ratio AUROC on {a['data']['in']} vs {a['data']['out']}:")
        lines += [f"  {auroc:.3f}  {path}" for path, auroc in a["llr_auroc"].items()]
        if a["rank_agreement"] is not None:
            lines.append(f"  rank correlation with the criterion: {a['rank_agreement']:+.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ood_select", description=__doc__.split("\n\n")[0])
    p.add_argument("candidates", nargs="+", help="background model checkpoints to choose from")
    p.add_argument("--pair", default="fashion", choices=sorted(PAIRS), help="whose model and data (bench.ood's pairs)")
    p.add_argument("--images", type=int, default=1000, help="validation images on each side")
    p.add_argument("--criterion", default="turned", choices=CRITERIA,
                   help="what stands in for foreign images: the data turned, or classes the --model never saw")
    p.add_argument("--model", help="another model for the pair (held-out-classes: one trained on some classes only)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--cache", default="build/ood_cache", help="folder of cached per-image NLLs ('' : none)")
    p.add_argument("--audit", action="store_true",
                   help="after choosing, measure every candidate on the pair's held-out test sets too (reported, never used)")
    p.add_argument("--audit-images", type=int, default=0, help="test images per side for --audit (0: the full splits)")
    args = p.parse_args(argv)
    if args.images < 2:
        p.error(f"--images must be at least 2, got {args.images}")
    missing = [c for c in args.candidates if not Path(c).is_file()]
    if missing:
        print(f"error: candidate checkpoint {missing[0]} not found", file=sys.stderr)
        return 2
    cache = Path(args.cache) if args.cache else None
    pair = dict(PAIRS[args.pair], **({"model": args.model} if args.model else {}))
    if not Path(pair["model"]).is_file():
        print(f"error: model checkpoint {pair['model']} not found", file=sys.stderr)
        return 2
    if args.audit and args.criterion != "turned":
        print("error: --audit measures backgrounds of the pair's own model; the held-out-classes candidates are "
              "trained on part of the data (train the chosen recipe on all of it, then audit that)", file=sys.stderr)
        return 2
    try:
        r = run(pair, args.candidates, args.images, cache, args.criterion)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.audit:  # only now, with the choice fixed
        r["audit"] = audit(pair, args.candidates, args.audit_images, cache)
        r["audit"]["rank_agreement"] = audit_agreement(r)
    finish(result("ood_select", pair=args.pair, **r), args.json, report(r))
    return 0


if __name__ == "__main__":
    reexec_with_malloc_env("bench.ood_select", sys.argv[1:])
    sys.exit(main())
