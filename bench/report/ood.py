"""The out-of-distribution section: bench/ood.py's detectors on full test splits."""
from __future__ import annotations

from bench.ood_select import recipe_key
from bench.report.common import ROOT, header, para, table
from pixelrnn.runtime.manifest import file_sha256

NAMES = {"nll": "raw NLL", "complexity": "input complexity (Serra et al. 2020)", "llr": "likelihood ratio (Ren et al. 2019)"}


def ood(d: dict) -> list[str]:
    lines = header("Out-of-distribution detection", "ood.json", {**d, "model": None},
                   "`python -m bench.ood --json bench/results/ood.json --roc docs/ood_roc.png`")
    lines.append(para(
        "Each pair: the images a model was trained on (in) against images of another data set (out), scored "
        "by the model alone (raw NLL), by its NLL in bits minus a lossless compression's bits (input "
        "complexity), and by its NLL minus a background model's (likelihood ratio; the background model is "
        "a smaller model of the same data, trained with each sub-pixel replaced by a random level, or flipped, "
        "with probability mu, which may be 0; its recipe is chosen on in-distribution data only, below). "
        "Out-of-distribution is the positive class; AUROC 0.5 is chance, below it the score ranks the wrong "
        "way. FPR at 95% TPR: the share of in-distribution images flagged when 95% of the others are. "
        "A class-conditional model is scored by its marginal over the classes."))
    for pair, r in d["results"].items():
        lines.append(para(f"**{r['in']['data']}** ({r['in']['images']:,} images, mean NLL {r['in']['mean_nll_nats']:.1f} "
                          f"nats) in, **{r['out']['data']}** ({r['out']['images']:,}, mean NLL "
                          f"{r['out']['mean_nll_nats']:.1f}) out; model `{r['model']}`, background `{r['background']}`:"))
        lines.append(table(["score", "AUROC", "AUPRC", "FPR at 95% TPR"],
                           [[NAMES[s], f"{m['auroc']:.3f}", f"{m['auprc']:.3f}", f"{m['fpr_at_95_tpr']:.3f}"]
                            for s, m in r["scores"].items()]))
    targets = [f"{pair}: likelihood-ratio AUROC {r['scores']['llr']['auroc']:.3f}" for pair, r in d["results"].items()]
    lines.append(para("Targets: likelihood ratio AUROC >= 0.99 for Fashion-MNIST vs MNIST, >= 0.95 on every pair. "
                      "Measured: " + "; ".join(targets) + ". Ren et al.'s reference code chooses its background's "
                      "noise rate and L2 weight on a foreign validation set (NotMNIST); here no foreign set chooses "
                      "anything."))
    lines.append("![ROC curves of the three scores](ood_roc.png)")
    return lines


def recipe_text(r: dict) -> str:
    parts = [f"h{r['hidden']} x {r['layers']}", f"kernel {r['kernel']}" if r.get("kernel") else None, f"mu {r['perturb']:g}" if r.get("perturb") is not None else None,
             f"L2 {r['weight_decay']:g}" if r.get("weight_decay") else None,
             f"{r['epochs']:.1f} epochs" if r.get("epochs") is not None else None]
    return ", ".join(p for p in parts if p)


def same_recipe(a: dict, b: dict) -> bool:
    """Trained the same way (size, noise rate, L2, length), whatever the data."""
    return recipe_key(a) == recipe_key(b)


def still_shipped(shipped: dict) -> bool:
    """Whether the file a results file calls shipped still holds what was measured (a file that is
    not in this checkout is taken as it was recorded). A relative path is the checkout's, wherever
    the report is run from."""
    path = ROOT / shipped["file"]
    return not path.is_file() or file_sha256(path) == shipped["sha256"]


def ood_select(d: dict, name: str = "ood_select.json", title: str | None = None) -> list[str]:
    turned = d["criterion"] == "turned"
    command = (f"`python -m bench.ood_select CANDIDATE.pt ... --json bench/results/{name}`" if turned else
               f"`python -m bench.ood_select CANDIDATE.pt ... --criterion held-out-classes --model {d['model']} "
               f"--images {d['images']['in']} --json bench/results/{name}`")
    title = title or ("Choosing the background model" if turned else "Choosing the background recipe on held-out classes")
    lines = header(title, name, {**d, "model": None}, command)
    out_images = d["images"]["out"]
    stand_in = (f"against the next {out_images:,}, half turned by 90 degrees and half upside down (out): the same "
                "pixels and strokes, no longer arranged as the data's objects" if turned else
                f"of the classes the model was trained on, against {out_images:,} of the {d['out']} (out), which "
                "neither the model nor the candidates saw; each candidate stands for a recipe to train on all the data")
    lines.append(para(
        f"No out-of-distribution set chooses the background model. Each candidate's likelihood ratio under "
        f"`{d['model']}` is measured on in-distribution data only: the first {d['images']['in']:,} images of "
        f"{d['data']} (in) {stand_in}. The highest AUROC is the criterion's choice; raw NLL and input complexity "
        "on the same images are given for reference. The ± is the AUROC's standard error (Hanley and McNeil "
        "1982): differences smaller than it are sampling noise."))
    audit = d.get("audit")
    shipped = d["shipped"]["sha256"]
    shipped_mark = " (shipped)" if still_shipped(d["shipped"]) else " (shipped when measured, since replaced)"
    rows = [[f"`{path}`" + (" (chosen)" if path == d["chosen"] else "") + (shipped_mark if m["sha256"] == shipped else ""),
             recipe_text(m["recipe"]), f"{m['valid_nll_nats']:.1f}", f"{m['auroc']:.3f} ± {m['auroc_se']:.3f}",
             f"{m['llr_std_in']:.1f}", f"{m['llr_rank_corr_empty']:+.2f}"] + ([f"{audit['llr_auroc'][path]:.3f}"] if audit else [])
            for path, m in d["candidates"].items()]
    rows += [[f"reference: {NAMES[s]}", "-", "-", f"{m['auroc']:.3f}", "-", "-"] + (["-"] if audit else [])
             for s, m in d["reference"].items()]
    lines.append(table(["background model", "trained", "its mean NLL on the in images (nats)",
                        "AUROC, in vs turned" if turned else "AUROC, in vs held-out classes",
                        "ratio's spread on the in images (std, nats)", "its rank correlation with empty pixels"]
                       + ([f"audit: AUROC, {audit['data']['in']} vs {audit['data']['out']}"] if audit else []), rows))
    lines.append(para("The spread and the correlation are diagnostics, not the criterion: how much of the population "
                      "statistics (here, how much of an image is empty) the ratio still follows on in-distribution "
                      "images, which a background model is meant to cancel."))
    if audit:
        agreement = audit["rank_agreement"]
        lines.append(para(
            f"The audit column was measured after the choice (`--audit`), on {audit['images']:,} held-out images a side, "
            "and did not feed it: it shows whether the in-distribution criterion ranks the candidates as a real "
            "out-of-distribution set does"
            + (f" (Spearman rank correlation over the candidates: {agreement:+.2f})." if agreement is not None else ".")))
        if agreement is not None and agreement < 0 and d["candidates"][d["chosen"]]["sha256"] != shipped:
            lines.append(para(
                "Here the criterion ranks the candidates backwards, so its choice does not ship. Turned images differ "
                "from the data in arrangement only; the criterion rewards background models that learn more of the "
                "data (larger, trained longer), which narrow the ratio's spread on the data and, the audit "
                "suggests, cancel more of what sets real foreign images apart too. "
                f"`{d['shipped']['file']}` as measured here (sha256 {d['shipped']['sha256'][:12]}) stayed the one whose "
                "noise rate, size and length were fixed before any choosing. Choosing without an outside set needs a "
                "criterion that simulates a foreign set the background model has not seen either, such as classes "
                "held out of both models' training (the held-out-classes choice, where measured, is below)."))
    if not turned:
        chosen, shipped_recipe = d["candidates"][d["chosen"]]["recipe"], d["shipped"].get("recipe") or {}
        lines.append(para(
            f"The chosen recipe is {recipe_text(chosen)}. "
            + shipped_text(d["shipped"], chosen)))
    return lines


def shipped_text(shipped: dict, chosen: dict) -> str:
    """Whether the background shipped when a choice was measured is the chosen recipe, and still ships."""
    recipe = shipped.get("recipe") or {}
    if not still_shipped(shipped):
        return (f"The background shipped when this was measured, `{shipped['file']}` ({recipe_text(recipe)}), "
                "has since been replaced.")
    if same_recipe(chosen, recipe):
        return (f"The shipped background `{shipped['file']}` is that recipe trained again on all of the training "
                "data; the pair's test sets, including the foreign one, measured it only after this choice.")
    return f"The shipped background `{shipped['file']}` ({recipe_text(recipe)}) is not that recipe."


def ood_select_classes(d: dict) -> list[str]:
    return ood_select(d, "ood_select_classes.json")


def ood_select_classes5_9(d: dict) -> list[str]:
    return ood_select(d, "ood_select_classes5-9.json", "Choosing the background recipe on held-out classes: a second split")


def ood_select_mean(d: dict) -> list[str]:
    files = " ".join(f"bench/results/{s['file'].split('/')[-1]}" for s in d["splits"])
    lines = header("Choosing the background recipe on held-out classes, over several splits", "ood_select_mean.json",
                   {**d, "model": None}, f"`python -m bench.ood_select_mean {files} --json bench/results/ood_select_mean.json`")
    splits = "; ".join(f"`{s['model']}` against {s['images']['out']:,} images of the {s['out']}" for s in d["splits"])
    lines.append(para(
        "One held-out split is one stand-in for foreign data, and which recipe it prefers depends on which classes "
        f"it held out. Each split trained the same recipes on its own classes and scored them under its own foreground "
        f"({splits}); a recipe's score is its mean AUROC over the splits, the highest is the choice. No "
        "out-of-distribution set enters."))
    rows = [[recipe_text(x["recipe"]) + (" (chosen)" if x["recipe"] == d["chosen"] else ""),
             *(f"{a:.3f}" for a in x["auroc"]), f"{x['mean_auroc']:.3f} ± {x['mean_auroc_se']:.3f}"]
            for x in d["recipes"]]
    lines.append(table(["recipe", *(f"AUROC, held out: {s['out']}" for s in d["splits"]), "mean"], rows))
    for i, s in enumerate(d["splits"]):
        if all(x["auroc"][i] < 0.5 for x in d["recipes"]):
            lines.append(para(
                f"Under `{s['model']}` every recipe ranks the {s['out']} as *more* familiar than the model's own "
                "(AUROC below 0.5), so that split can only reward the recipe that misranks them least."))
    lines.append(para(f"The chosen recipe is {recipe_text(d['chosen'])}. " + shipped_text(d["shipped"], d["chosen"])))
    return lines
