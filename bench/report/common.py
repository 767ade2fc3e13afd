"""What every section of docs/measurements.md is made of: the paths, the results files, markdown
formatting, and the header that gives a section's file, date, machine, load and model."""
from __future__ import annotations

import datetime as dt
import json
import re
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
OUT = ROOT / "docs" / "measurements.md"
MACHINE_KEYS = ("date", "cpu", "cpu_count", "load_average_1_5_15")  # every results file's "machine" has them
# Results files that may lack a "machine" object: long_runs.json is training/curves.py's table of
# runs, each trained over many days and machines (its rows name their devices).
MACHINE_OPTIONAL = frozenset({"long_runs.json"})

ARCH = {"pixelcnn": "PixelCNN", "row_lstm": "Row LSTM", "diagonal_bilstm": "Diagonal BiLSTM",
        "gated_pixelcnn": "Gated PixelCNN", "multiscale": "multi-scale PixelRNN", "ensemble": "ensemble"}
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


def served_models() -> list[str]:
    repo = ROOT / "model_repository"
    return sorted(p.name[: -len("_score")] for p in repo.glob("*_score")) if repo.is_dir() else []


def slug(title: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
