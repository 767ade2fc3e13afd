"""Sections on the models: the shipped checkpoints, the long training runs, training speed."""
from __future__ import annotations

from pathlib import Path

from bench.report.common import ARCH, PAPER_DATA, PAPER_NATS, bullets, header, load, met, para, size_text, table, when


# -- shipped checkpoints -----------------------------------------------------------------------

def nll_text(r: dict) -> str:
    """A checkpoint's validation NLL as the README's and this file's tables give it."""
    if r["size"].get("levels", 2) == 2:
        return f"{r['valid_nll_nats']:.2f} nats ({r['valid_bits_per_dim']:.4f} bits/dim)"
    return f"{r['valid_nll_nats']:.1f} nats ({r['valid_bits_per_dim']:.3f} bits/dim)"


def is_background(r: dict) -> bool:
    """A background model of the out-of-distribution detector: trained on perturbed images, so no
    paper's model and no quality target."""
    return Path(r["file"]).stem.endswith("_background")


def paper_text(r: dict) -> str:
    if is_background(r) or r["data"]["name"] != PAPER_DATA:
        return "-"
    return PAPER_NATS.get(r["arch"], "-")


def model_words(r: dict) -> str:
    if r.get("members"):  # an ensemble: what it averages
        parts = [f"{ARCH.get(m['arch'], m['arch'])} {size_text(m['size'])}" for m in r["members"]]
        return "ensemble of " + " and ".join(parts) + ", averaged per sub-pixel"
    words = ARCH.get(r["arch"], r["arch"])
    if r["size"].get("num_classes"):
        words = "class-conditional " + words
    return f"{words}, {size_text(r['size'])}"


def checkpoints(d: dict) -> list[str]:
    res = d["results"]
    rows = [[f"`{Path(r['file']).name}`", model_words(r), r["data"]["name"],
             training_text(r), nll_text(r), paper_text(r)]
            for r in res.values()]
    binary = {n: r for n, r in res.items() if r["data"]["name"] == PAPER_DATA and not is_background(r)}
    best = min(binary.values(), key=lambda r: r["valid_nll_nats"]) if binary else None
    targets = []
    if best:
        single = min((r for r in binary.values() if not r.get("members")), key=lambda r: r["valid_nll_nats"], default=None)
        alone = (f"; the best single model {single['valid_nll_nats']:.2f}, {ARCH[single['arch']]}"
                 if single and single is not best else "")
        targets.append(f"best binarized-MNIST model <= 80.8 nats: {met(best['valid_nll_nats'] <= 80.8)} "
                       f"({best['valid_nll_nats']:.2f}, {ARCH[best['arch']]}{alone}; the paper's PixelCNN 81.30, "
                       "Row LSTM 80.54)")
    for arch, limit in (("row_lstm", 83.0), ("diagonal_bilstm", 82.0)):
        for r in binary.values():
            if r["arch"] == arch:
                targets.append(f"{ARCH[arch]} <= {limit} nats: {met(r['valid_nll_nats'] <= limit)} ({r['valid_nll_nats']:.2f})")
    for r in res.values():
        if r["data"]["name"] == "fashion-mnist" and not is_background(r):
            targets.append(f"Fashion-MNIST <= 3.10 bits/dim: {met(r['valid_bits_per_dim'] <= 3.10)} "
                           f"({r['valid_bits_per_dim']:.3f})")
    images = sorted({r["valid_images"] for r in res.values()})
    return header("Shipped checkpoints", "checkpoints.json", d, "`python -m bench.checkpoints`") + [
        para(f"Validation NLL of every `checkpoints/*.pt` on its data set's full validation split "
             f"({' / '.join(f'{n:,}' for n in images)} images; the binarized-MNIST test split is held out), "
             "the same figure as `pixelrnn evaluate --checkpoint checkpoints/NAME.pt --split valid`. The "
             "file also records each checkpoint's sha256, so every figure traces to exact weights. All were "
             "trained on the project's CPU (batch 64, Adam, cosine schedule); each is the best checkpoint of "
             "its long run (Long training runs, below), and an ensemble averages trained ones at every "
             "sub-pixel (`pixelrnn ensemble`), with equal weights, fitted to nothing. The paper's column is the PixelRNN paper's "
             "binarized-MNIST test NLL (van den Oord et al. 2016), for models trained for days on GPUs with "
             "far larger networks."),
        table(["checkpoint", "model", "data", "trained", "valid NLL", "paper (nats)"], rows),
        para("Targets (full validation split):"), bullets(targets),
    ]


def ensembles(d: dict) -> list[str]:
    rows = []
    for r in d["results"].values():
        for m in r["members"]:
            rows.append([f"`{m['file']}`", ARCH.get(m["arch"], m["arch"]), f"{m['valid_nll_nats']:.2f}"])
        rows.append([f"`{Path(r['file']).name}`", "mixture of whole images, p(x) = mean of the members' p(x)",
                     f"{r['mixture_nll_nats']:.2f}"])
        rows.append([f"`{Path(r['file']).name}`", "ensemble: each sub-pixel's distribution the mean of the members'",
                     f"**{r['ensemble_nll_nats']:.2f}**"])
    images = sorted({r["images"] for r in d["results"].values()})
    return header("Ensembles", "ensembles.json", d, "`python -m bench.ensembles`") + [
        para(f"Two ways to average trained models, on the full validation split ({' / '.join(f'{n:,}' for n in images)} "
             "images), in nats per image, from one pass of each member: a mixture of whole images, and the "
             "ensemble that `pixelrnn ensemble` builds, which averages the members' conditional distributions "
             "at every sub-pixel (equal weights, fitted to nothing). The ensemble is what ships."),
        table(["checkpoint", "model", "valid NLL (nats)"], rows),
    ]


# -- training ------------------------------------------------------------------------------------

def long_runs(runs) -> list[str]:
    d = runs if isinstance(runs, dict) else {"runs": runs}
    runs = d["runs"]

    def nll(r):
        if r.get("best_valid_nll_nats") is None:
            return "none yet"
        value = (f"{r['best_valid_bits_per_dim']:.3f} bits/dim" if r["unit"] == "bits/dim"
                 else f"{r['best_valid_nll_nats']:.2f} nats")
        text = f"{value} (step {r['best_step']:,})"
        if r.get("best_ema_valid_nll_nats") is not None:  # an --ema run: its averaged weights too
            text += (f"; averaged {r['best_ema_valid_bits_per_dim']:.3f} bits/dim" if r["unit"] == "bits/dim"
                     else f"; averaged {r['best_ema_valid_nll_nats']:.2f} nats")
        return text

    rows = [[f"`{r['name']}`", f"{ARCH.get(r['arch'], r['arch'])} h{r['hidden']} x {r['layers']} ({r['params']:,} params)",
             r["data"] + (f", {r['levels']} levels" if r["levels"] > 2 else ""),
             f"{r['steps']:,} steps ({r['epochs']:.2f} epochs)", f"{r['hours']:.2f} h, {'/'.join(r['devices'])}",
             f"{r['steps'] / (r['hours'] * 3600):.2f}" if r["hours"] else "-", nll(r)] for r in runs]
    subset = sorted({r["valid_images"] for r in runs if r.get("valid_images")})
    return header("Long training runs", "long_runs.json", d,
                  "`python -m pixelrnn.training.curves --out bench/results/training_curves.png "
                  "--json bench/results/long_runs.json`") + [
        para("The models that are to replace the shipped ones train in the background (`nice`, one thread "
             "each) from `runs/long/NAME/last.pt` (model, optimizer, RNG state, history, hours), resumed bit "
             "for bit with `pixelrnn train --out runs/long/NAME --resume --threads 1`; a finished run keeps "
             "its `history.json` instead. Cosine schedules of 12 epochs (30 for the `_30ep` run), Adam 1e-3, "
             "batch 64; the Gated PixelCNNs train with `--compile --channels-last` (Training speed, below). "
             f"Validation here is on a {' / '.join(f'{n:,}' for n in subset)}-image subset of the validation "
             "split, so it differs from the full-split figures of the shipped checkpoints; a shipped "
             "checkpoint is replaced only by one with a better full-split NLL. `scripts/gpu_train.sh` "
             "continues the runs on a CUDA machine (see its header); the device column says where each ran. "
             "A run started with `--init-from` is a new learning-rate cycle from a finished run's weights (its "
             "curve continues the parent's hours); with `--ema` the exponential moving average of its weights "
             "is validated too (dashed in the figure)."),
        "![validation NLL against hours of training](../bench/results/training_curves.png)",
        table(["run", "model", "data", "trained", "time, device", "steps/s", "best valid NLL (subset)"], rows),
    ]


# The variant names python -m bench.training writes, and those of the training.json committed in
# e87e51b (measured 2026-11-30 at commit a3608bb), whose run timed the code before as variant
# "before" beside "after*".
VARIANT = {"eager": "eager", "compile": "compile", "channels_last": "channels-last",
           "channels_last_compile": "channels-last + compile",
           "after": "eager", "after_compile": "compile", "after_channels_last": "channels-last",
           "after_channels_last_compile": "channels-last + compile"}


def training_text(r: dict) -> str:
    """Steps, epochs and hours; a new cycle (train --init-from) also gives the hours behind its start."""
    if r.get("members"):
        files = " + ".join(f"`{m['file']}`" for m in r["members"])
        return f"no training of its own: {files}, {r['hours']:.1f} h in all"
    text = f"{r['step']:,} steps ({r['epoch']:.1f} epochs)"
    if r.get("hours") is None:
        return text
    if r.get("parent_hours"):
        parent = Path(r["init_from"]).parent.name
        relation = r.get("parent_relation") or "a new cycle from"
        return (f"{text}, {r['hours']:.1f} h, {relation} `{parent}` ({r['parent_hours']:.1f} h): "
                f"{r['hours'] + r['parent_hours']:.1f} h in all")
    return f"{text}, {r['hours']:.1f} h"


def shipped_size(r: dict, shipped: list[dict]) -> bool:
    return any(s["arch"] == r["arch"] and all(s["size"].get(f) == v for f, v in r["fields"].items()) for s in shipped)


def compiled_base(name: str) -> str | None:
    """The variant a torch.compile variant compiles (the same layout, eager); None for the others."""
    if name != "compile" and not name.endswith("_compile"):
        return None
    return name[: -len("compile")].rstrip("_") or "eager"


def reference_text(reference: dict | None, d: dict) -> str:
    """What "before" is: the recorded figures of the code before the speed changes (reference_before)."""
    if not reference:
        return "No figures of the code before the speed changes are recorded in this file (`reference_before`)"
    code = f"\"Before\" is the model code of commit {reference['code_commit']}"
    if reference.get("date") == d["machine"]["date"]:  # recorded in the run this file holds
        return (f"{code}, which this bench (at commit {reference['measured_at_commit']}) ran verbatim, "
                "interleaved with the code of that time, \"after\", in this file's run")
    return (f"{code}, timed by this bench at commit {reference['measured_at_commit']} ({when(reference['date'])}, "
            f"load average {reference['machine']['load_average_1_5_15'][0]:.2f}) and recorded under "
            "`reference_before`; \"after\" is the code of this run: two runs on a shared machine whose load "
            "differs, so a speedup is a guide, not a measurement in one run")


def worst_text(t: dict) -> str:
    """A target's worst speedup, in words."""
    return f"{t['worst_speedup']:.2f}x at worst" if t.get("worst_speedup") is not None else "no figure of the code before"


def training(d: dict) -> list[str]:
    shipped = list(load("checkpoints.json")["results"].values())
    reference = d.get("reference_before")  # the code before the speed changes, per configuration
    rows, compile_s, compile_gain = [], [], []
    for key, r in d["results"].items():
        v = r["variants"]
        before = ((reference or {}).get("results") or {}).get(key) or v.get("before")
        speedup = r.get("vs_reference_before", r.get("speedup"))
        fastest = v[r["fastest"]]["images_per_s"]["median"]
        size = ", ".join(f"{f} {x}" for f, x in r["fields"].items())
        if shipped_size(r, shipped):
            size += " (a shipped size)"
        rows.append([r["arch"], size, f"{before['images_per_s']['median']:.1f}" if before else "-",
                     f"{fastest:.1f} ({VARIANT.get(r['fastest'], r['fastest'])})",
                     f"{speedup:.2f}x" if speedup is not None else "-"])
        for name, var in v.items():
            base = compiled_base(name)
            if base:
                compile_s.append(var["first_step_seconds"])
                if base in v:
                    compile_gain.append(var["images_per_s"]["median"] / v[base]["images_per_s"]["median"])
    t = d["targets"]
    cfg = d["config"]
    compiled = (f"`--compile` (torch.compile) took {min(compile_s):.0f}-{max(compile_s):.0f} s to compile the first "
                f"step and then ran {min(compile_gain):.2f}x-{max(compile_gain):.2f}x the same layout's eager speed; "
                if compile_s and compile_gain else "")
    return header("Training speed", "training.json", d, "`python -m bench.training --json bench/results/training.json`") + [
        para(f"Training steps (forward, backward, Adam; batch {cfg['batch']}, 1x28x28, {cfg['threads']} thread as "
             f"the long runs use) of each architecture at the shipped and at candidate sizes. "
             f"{reference_text(reference, d)}. Each training option (eager, `--compile`, `--channels-last`) is a "
             f"variant, each variant timed {cfg['repeats']} times, interleaved. Images/s are medians; a speedup is "
             "the ratio of the fastest option's median to \"before\"'s (`vs_reference_before`)."),
        table(["arch", "size", "before (img/s)", "after, fastest option (img/s)", "speedup"], rows),
        para("What changed, computing the same model (tests/test_training_speed.py: outputs and every gradient "
             "equal the plain formulation's to 1e-5): the Diagonal BiLSTM's recurrence runs over in-image pixels "
             "only, both directions in shared ops, one matrix product per step (the old per-step column indexing "
             "made backward write a full zero gradient every step); the Row LSTM iterates rows with `unbind` "
             "(bit-identical); masked convolutions skip the kernel rows the mask zeroes (a 3x3 mask-B kernel "
             f"runs as 2x3). {compiled}`--compile` and `--channels-last` are training flags that `--resume` keeps. "
             f"Data loading: {d['data_loading']['ms_per_batch']['median']:.2f} ms per batch (median)."),
        bullets([f"Diagonal BiLSTM >= {t['diagonal_bilstm']['target']:g}x: **{t['diagonal_bilstm']['status']}** "
                 f"({worst_text(t['diagonal_bilstm'])})",
                 f"PixelCNN family >= {t['pixelcnn']['target']:g}x: **{t['pixelcnn']['status']}** (PixelCNN "
                 f"{worst_text(t['pixelcnn'])}, Gated PixelCNN {worst_text(t['gated_pixelcnn'])})"]),
        para("At one thread the PixelCNN family's convolutions already run near this CPU's peak, so only less "
             "arithmetic helps, and a second thread slows a loaded 2-core machine down. A torch profile (not a "
             "bench figure) puts most of a Gated PixelCNN step in its convolutions, backward costlier than "
             "forward, and the rest in the gates' elementwise ops. Tried and dropped after one quick timing "
             "each (not kept in bench/): running the horizontal stack's 1 x k masked kernel as its k//2+1 "
             "unmasked taps (within this machine's noise), tanh(a) as 2 sigmoid(2a) - 1 (torch's CPU tanh is "
             "slower than its sigmoid, but the extra ops cancel the gain over a whole step), and batches of 32 "
             "to 256 instead of 64 (no faster per image). What would reach the PixelCNN target: a GPU "
             "(`scripts/gpu_train.sh`) or a cheaper model, which the target excludes."),
    ]
