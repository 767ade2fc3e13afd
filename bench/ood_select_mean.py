"""Choosing a background recipe by its held-out-classes score averaged over several splits.

    python -m bench.ood_select_mean bench/results/ood_select_classes.json bench/results/ood_select_classes5-9.json --json bench/results/ood_select_mean.json

One held-out-classes split (bench.ood_select --criterion held-out-classes) is one stand-in for foreign
data, and which recipe it prefers depends on which classes it held out: a foreground that never saw
footwear meets footwear, one that never saw tops meets tops. Each split trains the same recipes on
its own classes and scores them under its own foreground; here the recipes are matched across the
splits (size, kernel, noise rate, L2 penalty, epochs) and ranked by their mean AUROC. Only recipes
measured in every split are ranked. The standard error of the mean combines the splits' own
(independent images, models and candidates). No out-of-distribution set enters: the inputs are
in-distribution results only, and a file with an --audit in it is refused.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bench.common import finish, result
from bench.ood_select import recipe, recipe_key
from pixelrnn.runtime.manifest import file_sha256


def split_summary(name: str, r: dict) -> dict:
    return {"file": name, "model": r["model"], "out": r["out"], "images": r["images"], "chosen": r["chosen"]}


def mean_over_splits(splits: dict[str, dict]) -> dict:
    """{results file: bench.ood_select result} -> the recipes every split measured, by mean AUROC."""
    for name, r in splits.items():
        if not isinstance(r, dict) or r.get("benchmark") != "ood_select":
            raise ValueError(f"{name} is not a bench.ood_select result")
        if r.get("criterion") != "held-out-classes":
            raise ValueError(f"{name}: criterion {r.get('criterion')!r}, not held-out-classes")
        if "audit" in r:
            raise ValueError(f"{name} holds an audit on out-of-distribution data; choose from in-distribution results only")
    models = [r["model"] for r in splits.values()]
    if len(set(models)) < len(models):
        raise ValueError(f"two results files measure the same split (model {models[0]}): average different splits")
    per_split = []
    for r in splits.values():
        by_key = {}
        for path, m in r["candidates"].items():
            by_key[recipe_key(m["recipe"])] = {"candidate": path, "auroc": m["auroc"], "auroc_se": m["auroc_se"],
                                               "recipe": m["recipe"]}
        per_split.append(by_key)
    common = [k for k in per_split[0] if all(k in s for s in per_split[1:])]
    if not common:
        raise ValueError("no recipe was measured in every split")
    recipes = []
    for k in common:
        aurocs = [s[k]["auroc"] for s in per_split]
        ses = [s[k]["auroc_se"] for s in per_split]
        recipes.append({"recipe": per_split[0][k]["recipe"], "auroc": aurocs, "candidates": [s[k]["candidate"] for s in per_split],
                        "mean_auroc": float(np.mean(aurocs)), "mean_auroc_se": float(np.sqrt(np.sum(np.square(ses)))) / len(ses)})
    recipes.sort(key=lambda x: -x["mean_auroc"])
    dropped = sum(len(s) for s in per_split) - len(common) * len(per_split)
    first = next(iter(splits.values()))
    return {"data": first["data"], "criterion": "held-out-classes, mean over splits",
            "splits": [split_summary(name, r) for name, r in splits.items()],
            "recipes": recipes, "chosen": recipes[0]["recipe"], "unmatched_candidates": dropped,
            "shipped": first["shipped"]}


def shipped_now(recorded: dict) -> dict:
    """The background shipped at the path the splits recorded, as it is now: a recipe chosen here
    ships once trained again on all the data, after the splits were measured."""
    path = Path(recorded["file"])
    if not path.is_file():
        return recorded
    return {"file": recorded["file"], "sha256": file_sha256(path), "recipe": recipe(str(path))}


def report(r: dict) -> str:
    names = [Path(s["file"]).name for s in r["splits"]]
    lines = [f"{r['data']}: held-out-classes AUROC per recipe, mean over {len(names)} splits ({', '.join(names)}):"]
    for x in r["recipes"]:
        marks = "  <- chosen" if x["recipe"] == r["chosen"] else ""
        each = " ".join(f"{a:.3f}" for a in x["auroc"])
        lines.append(f"  {x['mean_auroc']:.3f} +- {x['mean_auroc_se']:.3f}  ({each})  {x['recipe']}{marks}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ood_select_mean", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="bench.ood_select --criterion held-out-classes JSON files, one per split")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if len(args.results) < 2:
        p.error("give at least two results files (one per split) to average")
    splits = {}
    for name in args.results:
        try:
            splits[name] = json.loads(Path(name).read_text())
        except FileNotFoundError:
            print(f"error: results file {name} not found", file=sys.stderr)
            return 2
        except json.JSONDecodeError as e:
            print(f"error: {name} is not JSON ({e})", file=sys.stderr)
            return 2
    try:
        r = mean_over_splits(splits)
        r["shipped"] = shipped_now(r["shipped"])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finish(result("ood_select_mean", **r), args.json, report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
