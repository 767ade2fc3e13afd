"""docs/measurements.md, generated from bench/results/*.json: every measured figure the docs give.

    python -m bench.report            # write docs/measurements.md (what `make docs` runs)
    python -m bench.report --check    # exit 1 if docs/measurements.md is not what it would write

One section per results file, in the order of SECTIONS: the file, the script that writes it,
when, on what machine, under what load (the file's "machine" object) and, where the figures
depend on it, the model (the file's "model"). The prose that explains a figure is static text
here; every number in the output comes from the JSON files (and from nothing else), so rerunning
a bench and then this script is all it takes to update the docs. A results file without a
section here is an error: a new bench gets its section before its figures can be published.
tests/test_docs.py fails while docs/measurements.md differs from what `render()` returns.

Standard library only, so it runs wherever the JSON files are.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import textwrap
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
OUT = ROOT / "docs" / "measurements.md"
MACHINE_KEYS = ("date", "cpu", "cpu_count", "load_average_1_5_15")  # every results file's "machine" has them
# Results files that may lack a "machine" object: long_runs.json is training/curves.py's table of
# runs, each trained over many days and machines (its rows name their devices).
MACHINE_OPTIONAL = frozenset({"long_runs.json"})

ARCH = {"pixelcnn": "PixelCNN", "row_lstm": "Row LSTM", "diagonal_bilstm": "Diagonal BiLSTM",
        "gated_pixelcnn": "Gated PixelCNN", "multiscale": "multi-scale PixelRNN"}
# van den Oord et al. 2016, "Pixel Recurrent Neural Networks", binarized-MNIST test NLL in nats
# (literature, not a measurement of ours; training/curves.py draws the same reference lines). The
# paper has no Gated PixelCNN on binarized MNIST; its PixelCNN is the nearest figure.
PAPER_NATS = {"pixelcnn": "81.30", "row_lstm": "80.54", "diagonal_bilstm": "79.20",
              "gated_pixelcnn": "none (its PixelCNN: 81.30)"}
PAPER_DATA = "binarized-mnist"


# -- formatting --------------------------------------------------------------------------------

_BLOCK_START = re.compile(r"^([-+*>#|]|\d+[.)])(\s|$)")  # a wrapped line must not start a markdown block


def para(text: str, indent: str = "", first: str | None = None) -> str:
    """One paragraph, wrapped at 100 columns; no line starts what markdown reads as a new block."""
    lines = textwrap.wrap(" ".join(text.split()), width=100, initial_indent=indent if first is None else first,
                          subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)
    out: list[str] = []
    for line in lines:
        if out and _BLOCK_START.match(line.strip()):
            out[-1] += " " + line.strip()
        else:
            out.append(line)
    return "\n".join(out)


def bullet(text: str) -> str:
    return para(text, indent="  ", first="- ")


def bullets(items: list[str]) -> str:
    return "\n".join(bullet(t) for t in items)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def code(text: str, lang: str = "sh") -> str:
    return f"```{lang}\n{text.strip()}\n```"


def k(x: float) -> str:
    return f"{x / 1000:.1f}k"


def met(ok: bool) -> str:
    return "met" if ok else "not met"


def ms(seconds: float, digits: int = 0) -> str:
    return f"{seconds * 1e3:.{digits}f} ms"


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def spread_ms(p: dict) -> str:
    """A timed path's median with its min-max, in ms."""
    return f"{ms(p['seconds'], 1)} ({p['min_seconds'] * 1e3:.1f}-{p['max_seconds'] * 1e3:.1f})"


def load(name: str):
    return json.loads((RESULTS / name).read_text())


# -- what every section starts with: its file, date, machine, load, model -------------------

def machine_of(name: str, d) -> dict | None:
    m = d.get("machine") if isinstance(d, dict) else None
    if m is None:
        if name in MACHINE_OPTIONAL:
            return None
        raise ValueError(f"bench/results/{name} has no \"machine\" object")
    missing = [key for key in MACHINE_KEYS if key not in m]
    if missing:
        raise ValueError(f"bench/results/{name}: \"machine\" lacks {', '.join(missing)}")
    return m


def when(date: str) -> str:
    try:
        t = dt.datetime.fromisoformat(date)
    except ValueError:
        return date
    if len(date) <= 10:
        return t.date().isoformat()
    if t.tzinfo is not None:
        t = t.astimezone(dt.timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M UTC")


def machine_text(m: dict | None) -> str:
    if m is None:
        return "Date, machine and load: not recorded in this file."
    if m["load_average_1_5_15"] is None:  # a file dated afterwards: the facts the run did not record are null
        if m.get("date_source"):
            return f"Dated {when(m['date'])}: {m['date_source']}."
        return f"Dated {when(m['date'])}; machine and load not recorded in this file."
    load1, load5, load15 = m["load_average_1_5_15"]
    usable = m.get("cpus_usable")
    cpus = f"{m['cpu_count']} CPUs" + (f" ({usable} usable)" if usable not in (None, m["cpu_count"]) else "")
    busy = "; above the CPU count: other work shared the machine" if load1 > m["cpu_count"] else ""
    return (f"Measured {when(m['date'])} on {m['cpu']}, {cpus}; load average {load1:.2f} / {load5:.2f} / "
            f"{load15:.2f} (1 / 5 / 15 min){busy}.")


def size_text(cfg: dict) -> str:
    parts = []
    if cfg.get("hidden") is not None:
        parts.append(f"h{cfg['hidden']} x {cfg['layers']}")
    if cfg.get("kernel") is not None and cfg.get("kernel") != 3:
        parts.append(f"kernel {cfg['kernel']}")
    if cfg.get("num_classes"):
        parts.append(f"{cfg['num_classes']} classes")
    if cfg.get("levels") and cfg["levels"] > 2:
        parts.append(f"{cfg['levels']} levels")
    return ", ".join(parts)


def model_text(d: dict) -> str | None:
    """The model a results file names, in words (None where it names none)."""
    m = d.get("model")
    if m is None and isinstance(d.get("results"), dict):
        m = d["results"].get("model")
    if m is None and isinstance(d.get("config"), dict):
        m = d["config"].get("model")
    ckpt = ((m.get("checkpoint") if isinstance(m, dict) else None) or d.get("checkpoint")
            or (d.get("config") or {}).get("checkpoint"))
    if m is None and ckpt is None:
        return None
    if isinstance(m, str):
        text = f"`{m}`"
    elif isinstance(m, dict):
        arch = m.get("arch") or m.get("name")
        cfg = dict(m.get("config") or {})
        cfg.setdefault("levels", m.get("levels"))
        shape = m.get("shape")
        bits = [ARCH.get(arch, arch)]
        if size_text(cfg):
            bits.append(size_text(cfg))
        if shape:
            bits.append("x".join(str(s) for s in shape))
        text = ", ".join(bits)
        if m.get("name") and m.get("name") != arch:
            text = f"`{m['name']}`: {text}"
        if m.get("dir") or m.get("folder"):
            text += f"; served from `{m.get('folder') or m['dir']}`"
        if m.get("weights"):
            text += f"; weights: {m['weights']}"
    else:
        text = ""
    if ckpt:
        text += ("; " if text else "") + f"checkpoint `{ckpt}`"
        if isinstance(m, dict) and m.get("checkpoint_step") is not None:
            text += f" (step {m['checkpoint_step']:,})"
    return f"Model: {text}."


def header(title: str, name: str, d, script: str) -> list[str]:
    m = machine_of(name, d)
    lines = [f"## {title}", para(f"`bench/results/{name}`, written by {script}. {machine_text(m)}")]
    model = model_text(d) if isinstance(d, dict) else None
    if model:
        lines[-1] += "\n" + para(model)
    return lines


# -- shipped checkpoints -----------------------------------------------------------------------

def nll_text(r: dict) -> str:
    """A checkpoint's validation NLL as the README's and this file's tables give it."""
    if r["size"].get("levels", 2) == 2:
        return f"{r['valid_nll_nats']:.2f} nats ({r['valid_bits_per_dim']:.4f} bits/dim)"
    return f"{r['valid_nll_nats']:.1f} nats ({r['valid_bits_per_dim']:.3f} bits/dim)"


def paper_text(r: dict) -> str:
    return PAPER_NATS.get(r["arch"], "-") if r["data"]["name"] == PAPER_DATA else "-"


def model_words(r: dict) -> str:
    words = ARCH.get(r["arch"], r["arch"])
    if r["size"].get("num_classes"):
        words = "class-conditional " + words
    return f"{words}, {size_text(r['size'])}"


def checkpoints(d: dict) -> list[str]:
    res = d["results"]
    rows = [[f"`{Path(r['file']).name}`", model_words(r), r["data"]["name"],
             f"{r['step']:,} steps ({r['epoch']:.1f} epochs), {r['hours']:.1f} h", nll_text(r), paper_text(r)]
            for r in res.values()]
    binary = {n: r for n, r in res.items() if r["data"]["name"] == PAPER_DATA}
    best = min(binary.values(), key=lambda r: r["valid_nll_nats"]) if binary else None
    targets = []
    if best:
        targets.append(f"best binarized-MNIST model <= 84.0 nats: {met(best['valid_nll_nats'] <= 84.0)} "
                       f"({best['valid_nll_nats']:.2f}, {ARCH[best['arch']]}; the paper's best PixelCNN 81.30)")
    for arch in ("row_lstm", "diagonal_bilstm"):
        for r in binary.values():
            if r["arch"] == arch:
                targets.append(f"{ARCH[arch]} <= 87.0 nats: {met(r['valid_nll_nats'] <= 87.0)} ({r['valid_nll_nats']:.2f})")
    for r in res.values():
        if r["data"]["name"] == "fashion-mnist":
            targets.append(f"Fashion-MNIST <= 3.10 bits/dim: {met(r['valid_bits_per_dim'] <= 3.10)} "
                           f"({r['valid_bits_per_dim']:.3f})")
    images = sorted({r["valid_images"] for r in res.values()})
    return header("Shipped checkpoints", "checkpoints.json", d, "`python -m bench.checkpoints`") + [
        para(f"Validation NLL of every `checkpoints/*.pt` on its data set's full validation split "
             f"({' / '.join(f'{n:,}' for n in images)} images; the binarized-MNIST test split is held out), "
             "the same figure as `pixelrnn evaluate --checkpoint checkpoints/NAME.pt --split valid`. The "
             "file also records each checkpoint's sha256, so every figure traces to exact weights. All were "
             "trained on the project's CPU (batch 64, Adam, cosine schedule); each is the best checkpoint of "
             "its long run (Long training runs, below). The paper's column is the PixelRNN paper's "
             "binarized-MNIST test NLL (van den Oord et al. 2016), for models trained for days on GPUs with "
             "far larger networks."),
        table(["checkpoint", "model", "data", "trained", "valid NLL", "paper (nats)"], rows),
        para("Targets (full validation split):"), bullets(targets),
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
        return f"{value} (step {r['best_step']:,})"

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
             "continues the runs on a CUDA machine (see its header); the device column says where each ran."),
        "![validation NLL against hours of training](../bench/results/training_curves.png)",
        table(["run", "model", "data", "trained", "time, device", "steps/s", "best valid NLL (subset)"], rows),
    ]


VARIANT = {"after": "eager", "after_compile": "compile", "after_channels_last": "channels-last",
           "after_channels_last_compile": "channels-last + compile"}


def shipped_size(r: dict, shipped: list[dict]) -> bool:
    return any(s["arch"] == r["arch"] and all(s["size"].get(f) == v for f, v in r["fields"].items()) for s in shipped)


def training(d: dict) -> list[str]:
    shipped = list(load("checkpoints.json")["results"].values())
    reference = d.get("reference_before")  # the old code's figures, when the bench no longer runs it
    rows, compile_s, compile_gain = [], [], []
    for key, r in d["results"].items():
        v = r["variants"]
        before = v["before"] if "before" in v else reference["results"][key]
        fastest = v[r["fastest"]]["images_per_s"]["median"]
        size = ", ".join(f"{f} {x}" for f, x in r["fields"].items())
        if shipped_size(r, shipped):
            size += " (a shipped size)"
        rows.append([r["arch"], size, f"{before['images_per_s']['median']:.1f}",
                     f"{fastest:.1f} ({VARIANT.get(r['fastest'], r['fastest'])})",
                     f"{fastest / before['images_per_s']['median']:.2f}x"])
        for name, var in v.items():
            if name.endswith("_compile"):
                compile_s.append(var["first_step_seconds"])
                base = v.get(name[: -len("_compile")])
                if base:
                    compile_gain.append(var["images_per_s"]["median"] / base["images_per_s"]["median"])
    t = d["targets"]
    cfg = d["config"]
    if reference and not any("before" in r["variants"] for r in d["results"].values()):
        before = (f"\"Before\" is the model code of commit {reference['code_commit']}, timed by this bench at commit "
                  f"{reference['measured_at_commit']} ({when(reference['date'])}, load average "
                  f"{reference['machine']['load_average_1_5_15'][0]:.2f}) interleaved with the code of that time; "
                  "\"after\" is today's code")
    else:
        before = ("\"Before\" is the previous forward code, kept verbatim in the bench and timed interleaved with "
                  "today's, \"after\"")
    return header("Training speed", "training.json", d, "`python -m bench.training --json bench/results/training.json`") + [
        para(f"Training steps (forward, backward, Adam; batch {cfg['batch']}, 1x28x28, {cfg['threads']} thread as "
             f"the long runs use) of each architecture at the shipped and at candidate sizes. {before}, with each "
             f"training option (eager, `--compile`, `--channels-last`); each variant timed {cfg['repeats']} times, "
             "interleaved. Images/s are medians; a speedup is the ratio of the fastest option's median to "
             "\"before\"'s."),
        table(["arch", "size", "before (img/s)", "after, fastest option (img/s)", "speedup"], rows),
        para("What changed, computing the same model (tests/test_training_speed.py: losses and gradients "
             "equal the old code's to 1e-5): the Diagonal BiLSTM's recurrence runs over in-image pixels only, "
             "both directions in shared ops, one matrix product per step (the old per-step column indexing "
             "made backward write a full zero gradient every step); the Row LSTM iterates rows with `unbind` "
             "(bit-identical); masked convolutions skip the kernel rows the mask zeroes (a 3x3 mask-B kernel "
             f"runs as 2x3). `--compile` (torch.compile) took {min(compile_s):.0f}-{max(compile_s):.0f} s to "
             f"compile the first step and then ran {min(compile_gain):.2f}x-{max(compile_gain):.2f}x the same "
             "layout's eager speed; `--compile` and `--channels-last` are training flags that `--resume` keeps. "
             f"Data loading: {d['data_loading']['ms_per_batch']['median']:.2f} ms per batch (median)."),
        bullets([f"Diagonal BiLSTM >= {t['diagonal_bilstm']['target']:g}x: **{t['diagonal_bilstm']['status']}** "
                 f"({t['diagonal_bilstm']['worst_speedup']:.2f}x at worst)",
                 f"PixelCNN family >= {t['pixelcnn']['target']:g}x: **{t['pixelcnn']['status']}** (PixelCNN "
                 f"{t['pixelcnn']['worst_speedup']:.2f}x, Gated PixelCNN {t['gated_pixelcnn']['worst_speedup']:.2f}x "
                 "at worst)"]),
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


# -- sampling and the exported cells ---------------------------------------------------------------

def sampling(d: dict) -> list[str]:
    cfg = d["config"]
    rows = []
    for arch, r in d["results"].items():
        t, o = r["cached_torch"], r["cached_onnx"]
        rows.append([arch, size_text(r["model"]["config"]) or "default", f"{r['model']['parameters']:,}",
                     f"{r['naive']['seconds']:.1f} s", f"{t['seconds']:.2f} s ({t['speedup_over_naive']:.0f}x)",
                     f"{o['seconds']:.2f} s ({o['speedup_over_naive']:.0f}x)", f"{o['vs_scoring']:.1f}"])
    tg = d["targets"]
    per = tg["per_arch"]
    after = d.get("load_average_after")
    return header("Sampling speed", "sampling.json", d, "`python -m bench.sampling --json bench/results/sampling.json`") + [
        para(f"Per architecture, with the same randomly initialised model at its default size, batch "
             f"{cfg['batch']}, {cfg['size']}x{cfg['size']}, {cfg['levels']} levels, seed {cfg['seed']}, "
             f"{cfg['threads']} thread: naive sampling (a full forward pass per sub-pixel, extrapolated from its "
             f"first {cfg['naive_rows']} rows per repeat), the cached row cells in torch, and the same cells in "
             "onnxruntime, beside one scoring pass of the same batch. Every path runs "
             f"{cfg['repeats']} times, interleaved; the table gives medians (min and max are in the file) and "
             "speedups are ratios of medians. All paths draw identical images: "
             f"{'yes' if d['identical'] else 'NO'}."
             + (f" Load average after the run: {after[0]:.2f}." if after else "")),
        table(["arch", "size", "parameters", "naive", "torch cells", "onnxruntime cells",
               "sampling / one scoring pass (onnx)"], rows),
        para(f"Targets: >= {tg['speedup_over_naive']['pixelcnn_type']:g}x over naive for PixelCNN-type models "
             f"and >= {tg['speedup_over_naive']['lstm']:g}x for the LSTMs; sampling at most "
             f"{tg['vs_scoring_at_most']['pixelcnn']:g}x one scoring pass for the PixelCNN and "
             f"{tg['vs_scoring_at_most']['default']:g}x for every architecture (a scoring pass is the floor, "
             f"about 1). Speedup targets met by {sum(p['speedup_met'] for p in per.values())} of {len(per)} "
             f"architectures, scoring-pass targets by {sum(p['vs_scoring_met'] for p in per.values())} of "
             f"{len(per)}, on the onnxruntime cells' medians. The torch cells pay Python overhead per pixel and "
             "layer; why an onnxruntime cell costs what it costs is the next section."),
    ]


SESSION_VARIANT = {"optimize_extended": "extended optimisations", "optimize_basic": "basic optimisations",
                   "two_intra_op_threads": "2 intra-op threads", "no_memory_pattern": "no memory pattern",
                   "cpu_memory_arena": "CPU memory arena on"}


def cell_graphs(d: dict) -> list[str]:
    res = d["results"]
    rows = [[arch, f"{r['nodes_exported']:,}", f"{r['nodes_run']:,}", f"{r['nodes_run_per_pixel']:.0f}"]
            for arch, r in res.items()]
    variants = [v for v in next(iter(res.values()))["image_batch_seconds"] if v != "make_session"]
    vrows = [[arch] + [f"{r['image_batch_seconds'][v]['vs_make_session']:.2f}x" for v in variants]
             for arch, r in res.items()]
    options = [r["image_batch_seconds"][v]["vs_make_session"] for r in res.values() for v in variants
               if v != "cpu_memory_arena"]
    arena = [r["image_batch_seconds"]["cpu_memory_arena"]["vs_make_session"] for r in res.values()]
    cfg = d["config"]
    return header("Row-cell graphs", "cell_graphs.json", d,
                  "`python -m bench.cell_graphs --json bench/results/cell_graphs.json`") + [
        para("An exported cell is one image row unrolled: thousands of tiny ops whose cost is per-op overhead "
             "in onnxruntime, not arithmetic. The bench records each cell's op histogram as exported and as "
             "onnxruntime runs it after its graph optimisations (in the file), and times session-option "
             "variants against the settings `runtime/onnx_graphs.make_session` uses (batch "
             f"{cfg['batch']}, {cfg['size']}x{cfg['size']}, {cfg['repeats']} interleaved repeats, randomly "
             "initialised models at the default sizes). What keeps the op count down (export/cells/base.py):"),
        bullets([
            "per-row maps (the rows above's contribution, the previous row's states, the uniforms and forced "
            "values) are split into columns once per row (`columns`: Transpose, Reshape, one Split) instead of "
            "being indexed per pixel;",
            "the taps on the current row are one Concat + Gemm with the bias folded in (`row_taps`), not a "
            "stacked window and an Einsum;",
            "finished columns are reassembled with one Concat (`from_columns`);",
            "the temperature is prepared once per row, and the Diagonal BiLSTM's state-to-state tap on the row "
            "above is applied to the whole row at once;",
            "nothing branches on or recomputes a shape at run time: only the batch axis is dynamic, so sizes "
            "are constants (`squeeze(2)` would export as an If per layer and row, `chunk()` as Shape, Gather, "
            "Add, Div and Mul before every Split: see `drop_row_axis`, `gated_pixelcnn.gate`, "
            "`row_lstm.lstm_update`);",
            "the row's log-probability is computed once per row from its logits, not per sub-pixel.",
        ]),
        para("tests/test_bench_cell_graphs.py keeps that shape: no Einsum, no Gather added per pixel, no If, "
             "no Shape op added per pixel. Every sampler still draws identical images from a seed "
             f"({'all identical' if all(r['identical_images'] for r in res.values()) else 'NOT all identical'} "
             "in this run)."),
        table(["arch", "nodes exported", "nodes run (after onnxruntime's optimisations)", "run per pixel"], rows),
        para("A batch's time under each session variant, relative to `make_session`'s settings (medians):"),
        table(["arch"] + [SESSION_VARIANT.get(v, v) for v in variants], vrows),
        para(f"No session option helps reliably: the others range from {min(options):.2f}x to "
             f"{max(options):.2f}x of `make_session`'s time, in both directions per architecture and within "
             "this machine's noise (the repeats' min and max are in the file), so the settings stay: one "
             "thread, all optimisations, no spinning. `make_session` turns onnxruntime's CPU memory arena off "
             "so that a sampler gives a flood's memory back (docs/reliability.md, Overload); with the arena on "
             f"a batch took {min(arena):.2f}x to {max(arena):.2f}x the time, so going without it costs up to "
             f"{pct(1 / min(arena) - 1)}."),
    ]


# -- deployment ------------------------------------------------------------------------------------

def deployment(d: dict) -> list[str]:
    r = d["results"]
    rows = [[f"before (`{d['before_revision']}`: models import the project, and torch)", "full `.venv`", r["before"]],
            ["today's `model_repository/`", "full `.venv` (torch unused)", r["full"]],
            ["today's, copied out of the project", "numpy + onnxruntime only", r["runtime"]]]
    return header("What a repository costs to serve", "deployment.json", d, "`python -m bench.deployment`") + [
        para(f"Start to ready and resident memory of tritonserver plus both backend stubs after one score and "
             f"one sample request; medians of {d['repeats']} interleaved starts (min and max in the file)."),
        table(["repository", "Python environment", "start to ready", "RSS"],
              [[a, b, f"{x['ready_s']['median']:.2f} s", f"{x['rss_mib']['median']:.1f} MiB"] for a, b, x in rows]),
    ]


def perf_analyzer(d: dict) -> list[str]:
    s, p = d["results"]["score"], d["results"]["sample"]
    st = p["streams"]
    rows = [["scorer", f"batch {s['batch']}, {s['concurrency']} requests in flight", f"{s['images_per_s']:.0f} images/s",
             f"p50 {s['latency_us']['p50'] / 1000:.0f} ms, p99 {s['latency_us']['p99'] / 1000:.0f} ms", "", s["errors"]],
            ["sampler", f"{p['concurrency']} concurrent streams",
             f"{p['images_per_s']:.1f} images/s = {p['rows_per_s']:.0f} rows/s",
             f"p50 {p['latency_us']['p50'] / 1000:.0f} ms, p99 {p['latency_us']['p99'] / 1000:.0f} ms",
             f"p50 {st['first_row_latency_us']['p50'] / 1000:.1f} ms, p99 {st['first_row_latency_us']['p99'] / 1000:.0f} ms",
             p["errors"]]]
    c = d["config"]
    return header("Triton's perf_analyzer", "perf_analyzer.json", d,
                  "`python -m bench.perf_analyzer --url HOST:PORT --model NAME --json bench/results/perf_analyzer.json`") + [
        para(f"Triton's own load generator (version {d['perf_analyzer']}, from the pinned `tritonclient` wheel) "
             f"measures both models with the request data each model folder ships (`NAME_*/perf_analyzer_input.json`): "
             f"{c['windows']} windows of {c['window_ms'] / 1000:g} s per model; the streaming sampler runs as a "
             "decoupled sequence model over a gRPC stream, each sequence one START request that streams a whole "
             "image. The commands, as run:"),
        code(f"{s['command']}\n{p['command']}"),
        table(["model", "load", "throughput", "latency (whole request)", "first row", "errors"], rows),
    ]


# -- serving ---------------------------------------------------------------------------------------

def serving_table(d: dict) -> str:
    s, st, sc, pn, cpu, t = (d["sampling"], d["streams"], d["scoring"], d.get("pinned"),
                             d["cpu_seconds_per_1000_rows"], d["targets"])
    n = max(st, key=int)

    def scaling(r16, r1, x):
        return f"{k(r16['pixels_per_s'])} vs {k(r1['pixels_per_s'])} pixels/s, {x:.2f}x"

    def cpu_row(path):
        return f"server {cpu[path]['server']:.2f} s, client {cpu[path]['client']:.2f} s"

    engine_x = st[n]["engine_in_process"]["pixels_per_s"] / st["1"]["engine_in_process"]["pixels_per_s"]
    target = t["streams_scaling"]["target"]
    rows = [[f"sampling, one stream of {s.get('batch', d['config']['batch'])} images",
             f"{k(s['triton_per_row']['pixels_per_s'])} pixels/s ({s['ratio_triton_per_row_vs_in_process']:.2f})",
             f"{k(s['triton']['pixels_per_s'])} pixels/s ({s['ratio_triton_vs_in_process']:.2f})",
             f"{k(s['in_process']['pixels_per_s'])} pixels/s (engine {k(s['engine_in_process']['pixels_per_s'])})",
             f">= {t['sampling_vs_in_process']['target']:g} ({met(t['sampling_vs_in_process']['met'])})"]]
    if pn:
        ps = pn["sampling"]
        rows.append(["the same, pinned",
                     f"{k(ps['triton_per_row']['pixels_per_s'])} pixels/s ({ps['ratio_triton_per_row_vs_in_process']:.2f})",
                     f"{k(ps['triton']['pixels_per_s'])} pixels/s ({ps['ratio_triton_vs_in_process']:.2f})",
                     f"{k(ps['in_process']['pixels_per_s'])} pixels/s (engine {k(ps['engine_in_process']['pixels_per_s'])})",
                     f">= {t['pinned_sampling_vs_in_process']['target']:g} ({met(t['pinned_sampling_vs_in_process']['met'])})"])
    rows.append([f"{n} concurrent single-image streams vs 1",
                 scaling(st[n]["per_row"], st["1"]["per_row"], st[n]["per_row"]["vs_one_stream"]),
                 scaling(st[n], st["1"], st[n]["vs_one_stream"]),
                 "engine alone " + scaling(st[n]["engine_in_process"], st["1"]["engine_in_process"], engine_x),
                 f">= {target:g}x ({met(t['streams_scaling']['met'])})"])
    if pn:
        p1, pm = pn["streams"]["1"], pn["streams"][n]
        rows.append(["the same, pinned", scaling(pm["streams_per_row"], p1["streams_per_row"], pm["streams_per_row"]["vs_one_stream"]),
                     scaling(pm["streams"], p1["streams"], pm["streams"]["vs_one_stream"]),
                     "engine alone " + scaling(pm["engine"], p1["engine"], pm["engine"]["vs_one_stream"]),
                     f">= {target:g}x ({met(pm['streams']['vs_one_stream'] >= target)})"])
    rows += [[f"CPU seconds per 1000 rows, {n} streams", cpu_row(f"streams_per_row/{n}"), cpu_row(f"streams/{n}"),
              f"engine {cpu[f'engine/{n}']['client']:.2f} s", ""],
             ["CPU seconds per 1000 rows, one stream of 16 images", cpu_row("sample/triton_per_row"),
              cpu_row("sample/triton"), f"engine {cpu['sample/engine_in_process']['client']:.2f} s", ""],
             [f"scoring {sc['images']} images (chunks of {sc['chunk']})", "",
              f"{sc['triton']['images_per_s']:.0f} images/s ({sc['ratio_triton_vs_in_process']:.2f})",
              f"{sc['in_process']['images_per_s']:.0f} images/s",
              f">= {t['scoring_vs_in_process']['target']:g} ({met(t['scoring_vs_in_process']['met'])})"],
             [f"scoring, {sc['clients']} clients x {sc['request_images']}-image requests", "",
              f"{sc['triton_concurrent']['images_per_s']:.0f} images/s ({sc['ratio_triton_concurrent_vs_in_process']:.2f})",
              f"{sc['in_process']['images_per_s']:.0f} images/s",
              f">= {t['scoring_concurrent_vs_in_process']['target']:g} ({met(t['scoring_concurrent_vs_in_process']['met'])})"],
             [f"rows per response, {n} streams / one stream of 16 images", "1 / 1",
              f"{st[n]['rows_per_response']:.2f} / {s['triton_stream']['rows_per_response']:.2f}", "", ""],
             [f"images per cell call, {n} streams", "", f"{st[n]['call_batch']['mean']:.1f}", "", ""]]
    return table(["measure", "`ROWS_PER_RESPONSE` 1", "no row limit (default)", "in process", "target"], rows)


def serving_intro(d: dict) -> str:
    c, sv = d["config"], d["server"]
    pinned = d.get("pinned")
    text = (f"Serves `{c['checkpoint']}` on a real tritonserver ({sv['tritonserver']}, {sv['transport']}) and "
            f"compares it with the same ONNX cells in process, in one run: medians of {c['repeats']} interleaved "
            "repeats, ratios of medians (in brackets: Triton over in process); onnxruntime "
            f"{sv['onnx_threads']} thread, {sv['sender_threads']} sender threads, a {sv['coalesce_ms']:g} ms row "
            "coalescing window. The first column is the server sending every row in its own response "
            "(`ROWS_PER_RESPONSE` 1), the next the default (no limit: rows that wait go out together); both in "
            "the same run. ")
    if pinned:
        text += (f"Shared: server, clients and in-process paths on the same cores; pinned: the server (tritonserver "
                 f"and its backend stubs, every thread) on CPU {pinned['server_cpu']}, the clients on CPU "
                 f"{pinned['client_cpu']}, the in-process paths on one core (`os.sched_setaffinity` per thread, "
                 "what `taskset -a` does). ")
    text += ("CPU seconds per 1000 rows are read from /proc (tritonserver and its stubs; the client process) over "
             "the timed runs, per streamed row of one sequence. Images through Triton equal the in-process ones "
             f"in every path: {'yes' if d['identical']['all'] else 'NO'}. Single figures move between runs on a "
             "shared machine; the ratios, measured within one run, are what to compare.")
    return para(text)


def serving(d: dict) -> list[str]:
    s, st, t, cpu = d["sampling"], d["streams"], d["targets"], d["cpu_seconds_per_1000_rows"]
    sc = t["streams_scaling"]
    n = str(sc["streams"])
    rows = int(n) * d["model"]["shape"][1]  # rows of one n-stream run: n images of H rows
    cpu_n = cpu[f"streams/{n}"]["server"] + cpu[f"streams/{n}"]["client"]
    cpu_run = cpu_n * rows / 1000
    busy = cpu_run / st[n]["seconds"]
    at_target = st[n]["seconds"] * st[n]["vs_one_stream"] / sc["target"]
    cell_per_1000 = 1000 * st[n]["cell_seconds"] / rows
    per_row_gain = st[n]["pixels_per_s"] / st[n]["per_row"]["pixels_per_s"] - 1
    sv = d["server"]
    return header("Serving speed", "serving.json", d, "`python -m bench.serving --json bench/results/serving.json`") + [
        serving_intro(d), serving_table(d),
        para(f"Coalescing. A response may carry several consecutive rows of a sequence (runtime/protocol.py). "
             "Without a window the senders keep up with the cell calls, so rows seldom wait and responses stay at "
             "about one row (Serving without the coalescing window, below): the cost per row is CPU, not a "
             f"lagging sender. The window lets a sequence's rows gather for up to {sv['coalesce_ms']:g} ms after "
             "its previous response (never its first row, never more than half the engine's rows-ahead bound, so "
             f"the cell calls never wait for a sender): {st[n]['rows_per_response']:.2f} rows per response with "
             f"{n} streams, {s['triton_stream']['rows_per_response']:.2f} with one stream of 16 images, while "
             f"cross-sequence batching goes on ({st[n]['call_batch']['mean']:.1f} images per cell call with {n} "
             "streams). Fewer responses cut the server's response work (backend IPC, Triton's gRPC) and the "
             f"client's (its gRPC thread, and parsing) per row: {per_row_gain:+.0%} pixels/s for {n} streams, and "
             f"the client spends {cpu[f'streams/{n}']['client'] / cpu[f'streams/{n}']['server']:.2f} of the "
             "server's CPU per row. `pixelrnn repository --coalesce-ms MS` sets the window (0: off); a client "
             "that wants every row as soon as it is made asks for `ROWS_PER_RESPONSE` 1. Triton against the "
             f"engine in process: {s['ratio_triton_vs_engine']:.2f} for one stream of 16 images, "
             f"{st[n]['pixels_per_s'] / st[n]['engine_in_process']['pixels_per_s']:.2f} for {n} streams."),
        para(f"Scaling with streams. Target: {n} streams >= {sc['target']:g}x one stream, "
             f"{met(sc['met'])} ({sc['value']:.2f}x). Three bounds, each measured in the same run "
             "(`targets.streams_scaling`), say why:"),
        bullets([
            f"`ceiling` {sc['ceiling']:.2f}: one {n}-image sequence through Triton over one single-image stream. "
            f"{n} single-image streams make at best that sequence's cell calls, so the cell's own batching "
            "(Cell and engine batching, below) is not what stops them.",
            f"`engine_bound` {sc['engine_bound']:.2f}: the same {n} single-image sequences through the row engine "
            "in process, with no server at all, over one stream through Triton. The sampler runs that engine "
            "and its response sends besides, so no serving of it reaches more.",
            f"`cell_bound` {sc['cell_bound']:.2f}: the sampler's own time in its cell calls during a {n}-stream "
            "run (its `pixelrnn_sampler_cell_seconds_total` metric, read around every run): "
            f"{ms(st[n]['cell_seconds'])} of the {ms(st[n]['seconds'])} run ({pct(st[n]['cell_share'])}), against "
            f"{ms(st['1']['cell_seconds'])} of a one-stream run's {ms(st['1']['seconds'])}. Even a server whose "
            f"response path cost nothing would stay below {sc['cell_bound']:.1f}x here, because the same calls "
            "take longer inside the loaded server than in a quiet process (Cell and engine batching).",
        ]),
        para(f"The cores are not saturated, yet they could not carry {sc['target']:g}x: over a {n}-stream run "
             f"server and client keep {busy:.2f} of the {d['machine']['cpu_count']} cores busy ({cpu_n:.2f} s per "
             f"1000 rows, {rows} rows in {ms(st[n]['seconds'])}); at {sc['target']:g}x the same run would have to "
             f"end in {ms(at_target)}, which at the same CPU per row needs {cpu_run / at_target:.2f} cores. The "
             f"sampler's cell calls are {cell_per_1000:.2f} s of the {cpu_n:.2f} s per 1000 rows, so "
             f"{cpu_n - cell_per_1000:.2f} s (the response path: sender threads, tritonserver's gRPC, and the "
             "clients) runs beside them on the same cores. What holds the run at its length is one serial path, "
             "the sampler's engine thread: it makes every cell call in turn, in the one stub process whose Python "
             "interpreter also builds and sends every response."),
        para("Ad-hoc probes (per-thread figures from /proc/PID/task, training paused; not kept in a results "
             "file) agree: under 16 streams the engine thread is preempted many times per cell call (hardly at "
             "all with one 16-image stream); run as `SCHED_FIFO` it waits on the GIL and locks instead and the "
             "runs are no shorter; a busy neighbour core slows the cell only a little; a second sampler instance "
             "splits the batches and gains nothing. A batch-16 cell call costs more CPU inside the loaded stub "
             "than in a quiet process, also with no sender threads at all, so it is not the senders' share of "
             "the GIL. With the engine thread alone on one core and everything else, clients included, on the "
             "other, its calls got faster and 16 streams scaled better, but a server cannot keep its clients off "
             "a core, and pinning only the server's own threads away from the engine gave nothing. Also tried, "
             "with no gain beyond noise: more malloc arenas, a shorter GIL switch interval, the above-row "
             "convolutions of all images as one long row, 2 onnxruntime threads (slower at every batch), "
             "coalescing windows of 50 or 100 ms, and 1, 4 or 8 sender threads; trimming the allocator only "
             "after `poll` s idle instead of at once gained a few percent (memory goes back later; not adopted). "
             f"What would reach {sc['target']:g}x: a response path that costs a fraction of the cell calls (a C++ "
             "backend with the engine in it; the Python backend is the only one this Triton build has), clients "
             "on other machines, or more cores."),
    ]


def serving_no_window(d: dict) -> list[str]:
    st, s = d["streams"], d["sampling"]
    n = str(d["targets"]["streams_scaling"]["streams"])
    return header("Serving without the coalescing window", "serving_no_window.json", d,
                  "`python -m bench.serving --coalesce-ms 0 --json bench/results/serving_no_window.json`") + [
        para(f"The same bench with the window off (server `coalesce_ms` {d['server']['coalesce_ms']:g}): the "
             "senders keep up with the cell calls, so rows seldom wait and responses stay at about one row: "
             f"{st[n]['rows_per_response']:.2f} rows per response with {n} streams and "
             f"{s['triton_stream']['rows_per_response']:.2f} with one stream of 16 images."),
        serving_intro(d), serving_table(d),
    ]


def served_models() -> list[str]:
    repo = ROOT / "model_repository"
    return sorted(p.name[: -len("_score")] for p in repo.glob("*_score")) if repo.is_dir() else []


def serving_gated_pixelcnn(d: dict) -> list[str]:
    sc = d["targets"]["streams_scaling"]
    n = str(sc["streams"])
    name = Path(d["config"]["checkpoint"]).stem
    served = (f" `{name}` is what the committed `model_repository/` serves."
              if name in served_models() else "")
    return header("Serving the Gated PixelCNN", "serving_gated_pixelcnn.json", d,
                  "`python -m bench.serving --checkpoint checkpoints/gated_pixelcnn_binarized_mnist.pt "
                  "--json bench/results/serving_gated_pixelcnn.json`") + [
        para(f"The serving bench on the Gated PixelCNN, a model with more arithmetic per row than the PixelCNN "
             f"above.{served} {n} streams made {d['streams'][n]['vs_one_stream']:.2f}x one stream, against a "
             f"ceiling of {sc['ceiling']:.2f} ({pct(sc['of_ceiling'])} of it)."),
        serving_intro(d), serving_table(d),
    ]


ENGINE_PATH = {"one_image": "engine, one 1-image sequence", "one_sequence": "engine, one {n}-image sequence",
               "sequences": "engine, {n} single-image sequences", "cell_one_image": "cell alone, batch 1",
               "cell_one_sequence": "cell alone, batch {n}"}


def engine_batching(d: dict) -> list[str]:
    r, n = d["results"], d["config"]["streams"]
    h = r["model"]["shape"][1]
    rows = [[ENGINE_PATH.get(p, p).format(n=n), spread_ms(x)] for p, x in r["paths"].items()]
    return header("Cell and engine batching", "engine_batching.json", d,
                  "`python -m bench.engine_batching --json bench/results/engine_batching.json`") + [
        para(f"In process, with no server: one image, one {n}-image sequence, {n} single-image sequences batched "
             f"by the row engine, and the cell alone at batch 1 and {n} ({h} calls, one image's rows); "
             f"{d['config']['repeats']} interleaved repeats, medians (min-max). Images identical on every path: "
             f"{'yes' if r['identical'] else 'NO'}."),
        table(["path", "time per image batch"], rows),
        bullets([f"the cell alone: a call of {n} images yields {r['cell_bound']:.2f}x a call of one "
                 f"({ms(r['paths']['cell_one_sequence']['seconds'])} for {h} batch-{n} calls);",
                 f"bound (one {n}-image sequence against one image): {r['bound']:.2f}x;",
                 f"the engine with {n} separate sequences: {r['scaling']:.2f}x ({pct(r['share'])} of the bound), "
                 f"{r['per_sequence_row_us']:.0f} us more per row of each separate sequence (its state, random "
                 "numbers and row bookkeeping)."]),
    ]


# -- load, reliability and overload ----------------------------------------------------------------

def load_16_streams(d: dict) -> list[str]:
    before, c = d["per_row"], d["config"]

    def col(x):
        lat, t = x["latency_ms"], x["totals"]
        return [f"{x['throughput']['rows_per_s']:,.0f}", f"{x['throughput']['images_scored_per_s']:.0f}",
                f"{lat['first_row']['p50']:.1f} / {lat['first_row']['p99']:.0f} ms",
                f"{lat['response']['p50']:.1f} / {lat['response']['p99']:.0f} ms",
                f"{x['responses']['rows_per_response_mean']:.2f}", f"{x['streams']['call_batch_mean']:.1f}",
                str(t["errors"]), f"{x['content']['images_checked']:,} / {x['content']['images_wrong']}"]

    labels = ["rows/s", "images scored/s", "first row p50 / p99", "between responses p50 / p99",
              "rows per response", "images per cell call", "errors", "images checked / wrong"]
    rows = [[label, a, b] for label, a, b in zip(labels, col(before), col(d))]
    sooner = d["latency_ms"]["first_row"]["p50"] <= before["latency_ms"]["first_row"]["p50"]
    return header("Coalescing under load", "load_16_streams.json", d,
                  "`python -m bench.load --streams 16 --seconds 30 --compare-per-row --json "
                  "bench/results/load_16_streams.json`") + [
        para(f"The same {c['seconds']:g} s load twice on one server, first with one response per row, then "
             f"coalesced: {c['streams']} sampling streams of single images and {c['score_clients']} scoring "
             f"clients (batch {c['score_batch']}). Every streamed image is checked against the in-process sampler. "
             f"Target: the first row no later under load with coalescing than without: {met(sooner)}."),
        table(["measure", "one row per response", "coalesced"], rows),
    ]


def load_run(d: dict) -> list[str]:
    t, th, lat, m, c, cfg = d["totals"], d["throughput"], d["latency_ms"], d["sampler_metrics"], d["content"], d["config"]
    return header("Load", "load.json", d, "`python -m bench.load --json bench/results/load.json`") + [
        para(f"{cfg['streams']} concurrent sampling streams (one image each, back to back) for {cfg['seconds']:g} s "
             f"plus {cfg['score_clients']} scoring clients (batch {cfg['score_batch']}); a bounded run is in "
             "tests/test_bench_load.py. After the run every streamed image is compared with the in-process "
             "sampler's for its seed and every score with the in-process scorer's NLL."),
        bullets([f"{t['errors']} errors; {t['images_sampled']:,} images sampled ({th['rows_per_s']:,.0f} rows/s, "
                 f"{d['streams']['call_batch_mean']:.1f} images per cell call), {t['images_scored']:,} images "
                 f"scored ({th['images_scored_per_s']:.0f}/s)",
                 f"per-row latency p50 {lat['row']['p50']:.1f} ms, p99 {lat['row']['p99']:.0f} ms; rows come "
                 f"{d['responses']['rows_per_response_mean']:.2f} to a response: between responses p50 "
                 f"{lat['response']['p50']:.1f} ms, p99 {lat['response']['p99']:.0f} ms",
                 f"first row p50 {lat['first_row']['p50']:.0f} ms, p99 {lat['first_row']['p99']:.0f} ms",
                 f"{m['events_total']['completed']:,} of {m['expected_completed']:,} sequences completed, "
                 f"{m['live_sequences']} left live",
                 f"{c['images_checked']:,} images and {c['scores_checked']:,} scores checked after the run, "
                 f"{c['images_wrong'] + c['scores_wrong']} wrong"]),
    ]


def abandoned_streams(d: dict) -> list[str]:
    mib, ev, g = d["rss_mib_total"], d["events_200"], d["growth_kb_per_100"]
    return header("Abandoned streams", "abandoned_streams.json", d,
                  "tests/test_reliability_streams.py run with `PIXELRNN_WRITE_RESULTS=1`") + [
        para("200 clients drop mid-image: they cancel, drop the channel, are SIGKILLed or leave their sequence "
             "open (docs/reliability.md, Cancelled and abandoned streams). Server RSS is tritonserver and both "
             "backend stubs together."),
        bullets([f"sampler events over the 200: started {ev['started']}, cancelled {ev['cancelled']}, expired "
                 f"{ev['expired']}, failed {ev['failed']}; at most {d['peak_live_sequences']} sequences live at once, "
                 f"{d['live_after']} after",
                 f"live sequences back to 0 {d['seconds_to_settle_after_last_drop']:.1f} s after the last drop",
                 f"server RSS {mib['start']} MiB at the start, {mib['after_warmup_50']} MiB after 50 warm-up drops, "
                 f"{mib['after_100']} MiB after 100, {mib['after_200']} MiB after 200: {g[0] / 1024:+.1f} MiB over "
                 f"the first 100, {g[1] / 1024:+.1f} MiB over the second. A leak grows in both halves; the test "
                 "fails if the flatter half grows by more than 8 MiB per 100 streams"]),
    ]


def overload(d: dict) -> list[str]:
    v, a, m, t, sf = d["victim"], d["admission"], d["memory"], d["trim_cost"], d["server_flood"]
    fair, unfair, fl = v["fair"], v["unfair"], d["flood"]
    floods, arena = d.get("server_floods"), d.get("arena_default")
    back = (f"back within 20% of the baseline {sf['seconds_to_within_20pct']:.2f} s after the flood"
            if sf["seconds_to_within_20pct"] is not None else
            f"not back within 20% of the baseline in {sf['settle_window_s']:.0f} s")
    items = [
        f"Admission: the sampler's budget at `--sampler-memory-mb {a['memory_mb']}` is {a['budget_images']:,} images "
        f"({a['image_bytes'] / 1024:.0f} KiB each). In process, {a['starts']} STARTs of {fl['images_each']} images: "
        f"{a['admitted']} admitted ({a['admitted_images']:,} images), {a['refused']} refused at once; the first "
        f"refusal reads `{a['first_refusal']}`.",
        f"Through tritonserver, {sf['starts']} STARTs of {sf['images_each']} images on one stream had "
        f"{sf['admitted']} admitted and {sf['refused']} refused at once ({sf['other_errors']} other errors); a "
        f"1-image client meanwhile got its first row after {ms(sf['victim']['first_row_s'])} and its image after "
        f"{sf['victim']['image_s']:.2f} s, and the flood was done in {sf['flood_s']:.1f} s.",
        f"Fairness, in process, with {fl['sequences']} sequences of {fl['images_each']} images under way: a 1-image "
        f"sequence got its first row after {ms(fair['first_row_s'], 1)} ({fair['first_row_calls']} cell call) and "
        f"its whole image after {fair['image_s']:.2f} s ({fair['image_calls']} calls), where one row per sequence "
        f"per round gave {ms(unfair['first_row_s'])} ({unfair['first_row_calls']} calls) and "
        f"{unfair['image_s']:.2f} s ({unfair['image_calls']} calls); the workload got "
        f"{d['fairness_throughput_ratio']:.2f}x the image-rows per CPU second (medians of {fl['repeats']} "
        "interleaved repeats).",
        f"Memory, in process: a flood of {2 * fl['sequences']} such sequences took RSS {m['baseline_mib']:.0f} MiB "
        f"before, {m['peak_mib']:.0f} MiB at the peak, {m['after_flood_mib']:.0f} MiB after the flood as the "
        f"allocator leaves it, {m['after_trim_mib']:.0f} MiB after the trim ({ms(m['trim_seconds'])}); the first "
        f"{t['steps']} calls right after a trim ran {t['slowdown_after_trim']:.2f}x slower, once per idle period.",
        f"Memory, through tritonserver: the server's processes held {sf['rss_mib']['baseline']:.0f} MiB before the "
        f"flood, {sf['rss_mib']['peak']:.0f} MiB at the peak and {sf['rss_mib']['after_settle']:.0f} MiB "
        f"{sf['settle_window_s']:.0f} s after, {back}.",
    ]
    if floods:
        mibs = ", ".join(f"{x:.0f}" for x in floods["after_settle_mib"])
        items.append(f"Repeated floods with `MALLOC_ARENA_MAX` {floods['malloc_arena_max']}: {floods['within_20pct']} "
                     f"of {floods['runs']} floods back within 20% ({mibs} MiB {sf['settle_window_s']:.0f} s after); "
                     f"median flood time {floods['flood_s_median']:.1f} s.")
    if arena:
        mibs = ", ".join(f"{x:.0f}" for x in arena["after_settle_mib"])
        items.append(f"The same floods interleaved with glibc's default arenas (`MALLOC_ARENA_MAX` "
                     f"{arena['malloc_arena_max']}): {arena['within_20pct']} of {arena['runs']} back within 20% "
                     f"({mibs} MiB); median flood time {arena['flood_s_median']:.1f} s.")
    return header("Overload", "overload.json", d, "`python -m bench.overload --json bench/results/overload.json --server`") + [
        para("How the sampler's admission, scheduling and memory behave under a flood of big sampling "
             "requests (docs/reliability.md, Overload, says what each mechanism does):"),
        bullets(items),
    ]


def cluster(d: dict) -> list[str]:
    r, st = d["results"], d["settings"]
    labels = {"direct": "1, no proxy (direct)"}
    rows = [[labels.get(n, n), f"{k(x['pixels_per_s'])} pixels/s ({x['sampling_vs_one_replica']:.2f}x; "
             f"{k(x['pixels_per_s_min'])}-{k(x['pixels_per_s_max'])})",
             f"{x['scored_images_per_s']:.0f} images/s ({x['scoring_vs_one_replica']:.2f}x; "
             f"{x['scored_images_per_s_min']:.0f}-{x['scored_images_per_s_max']:.0f})"] for n, x in r.items()]
    s = d["sustained"]
    ss, t, c, lat = s["settings"], s["throughput"], s["content"], s["latency_ms"]["first_row"]
    completed = sum(m["events_total"]["completed"] for m in s["sampler_metrics"])
    live = sum(m["live"] for m in s["sampler_metrics"])
    return header("Replicas behind nginx", "cluster.json", d,
                  "`python -m bench.cluster --json bench/results/cluster.json` (and `--sustained`)") + [
        para(f"Throughput: {st['streams']} sampling streams and {st['score_clients']} scoring clients (batch "
             f"{st['score_batch']}) against 1, 2 and 3 replicas behind {d['proxy']}, and against one replica with "
             f"no proxy; {st['seconds']:g} s windows, {st['repeats']} interleaved repeats, medians (windows min-max); "
             f"the clients in the same process on the same cores. {d['errors']} errors."),
        table(["replicas behind nginx", "sampling (vs 1 replica; windows min-max)",
               "scoring (vs 1 replica; windows min-max)"], rows),
        para("More replicas on the same cores add processes, not CPU: sampling stays about flat, and scoring "
             "suffers (its small requests are batched less when spread over more replicas, and more scorer "
             "processes share the cores); compare the proxy's row with the direct one for what nginx costs. The "
             "figures show that the proxy and the replicas work under load, not a speed-up: that needs replicas "
             "on their own machines."),
        para(f"Sustained (the `sustained` section, its own date and load below): {ss['replicas']} replicas behind "
             f"nginx, {ss['streams']} concurrent sampling streams and {ss['score_clients']} scoring clients for "
             f"{ss['seconds']:g} s. " + machine_text(s.get("machine"))),
        bullets([f"{s['totals']['images_sampled']:,} images sampled ({k(t['pixels_per_s'])} pixels/s) and "
                 f"{s['totals']['images_scored']:,} images scored ({t['images_scored_per_s']:.0f}/s), {s['errors']} errors",
                 f"content: {c['images_checked']:,} images and {c['scores_checked']:,} scores checked against the "
                 f"in-process sampler and scorer, {c['images_wrong'] + c['scores_wrong']} wrong",
                 "score calls per replica " + " / ".join(f"{x:,}" for x in s["score_calls_per_replica"])
                 + "; sequences per replica " + " / ".join(f"{x:,}" for x in s["sequences_per_replica"])
                 + " (each replica's metrics, warm-up included)",
                 f"{completed:,} of {s['expected_completed']:,} sequences completed, {live} left live",
                 f"first row p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms"]),
        para(f"With {ss['streams']} streams the sampler's cell calls batch more images than with {st['streams']}, "
             "hence more pixels/s than in the table above: a different load, not a like-for-like ratio."),
    ]


# -- the document ---------------------------------------------------------------------------------

SECTIONS: dict[str, Callable] = {
    "checkpoints.json": checkpoints, "long_runs.json": long_runs, "training.json": training,
    "sampling.json": sampling, "cell_graphs.json": cell_graphs, "deployment.json": deployment,
    "perf_analyzer.json": perf_analyzer, "serving.json": serving, "serving_no_window.json": serving_no_window,
    "serving_gated_pixelcnn.json": serving_gated_pixelcnn, "engine_batching.json": engine_batching,
    "load_16_streams.json": load_16_streams, "load.json": load_run, "abandoned_streams.json": abandoned_streams,
    "overload.json": overload, "cluster.json": cluster,
}


def slug(title: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def render() -> str:
    present = sorted(p.name for p in RESULTS.glob("*.json"))
    unknown = [n for n in present if n not in SECTIONS]
    if unknown:
        raise ValueError(f"bench/results/{', '.join(unknown)}: no section in bench/report.py (SECTIONS)")
    sections = [SECTIONS[name](load(name)) for name in SECTIONS if name in present]
    toc = [f"- [{s[0][3:]}](#{slug(s[0][3:])})" for s in sections]
    served = ", ".join(f"`{n}`" for n in served_models()) or "nothing"
    intro = [
        "# Measurements",
        "<!-- Generated by `python -m bench.report` (`make docs`) from bench/results/*.json: do not edit by hand. -->",
        para("Every measured figure of the project, one section per results file in `bench/results/`: the file, "
             "the command that writes it, when it ran, on what machine and under what load, and the model where "
             "the figures depend on it. This page is generated from those files by `python -m bench.report` "
             "(`make docs`); tests/test_docs.py fails when it differs from what the generator writes, so rerun a "
             "bench, then `make docs`. The machines are shared CPUs: a load average above the CPU count means "
             "other work (training runs, tests) shared the cores, which inflates absolute times; ratios are "
             "measured within one run, so compare those. Serving figures depend on the model's size, not its "
             f"weights; the committed `model_repository/` serves {served}, and each section names the model it "
             "measured."),
        "\n".join(toc),
    ]
    blocks = intro + [b for s in sections for b in s]
    return "\n\n".join(blocks) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(OUT), help=f"where to write (default {OUT.relative_to(ROOT)})")
    p.add_argument("--check", action="store_true", help="only compare: exit 1 if the file differs")
    args = p.parse_args(argv)
    text, out = render(), Path(args.out)
    if args.check:
        same = out.is_file() and out.read_text() == text
        print(f"{out}: {'up to date' if same else 'differs from python -m bench.report: run make docs'}")
        return 0 if same else 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
