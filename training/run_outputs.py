"""What a training run writes besides checkpoints: the loss curve (PNG) and metrics (JSON),
each replaced atomically, and the NLL in the data's customary unit."""
from __future__ import annotations

import json
import os
from pathlib import Path

from pixelrnn.training import distributions


def nll_units(levels: int, nats: float, dims: int) -> tuple[str, float]:
    """The customary unit: nats per image for binary data, bits per dimension otherwise."""
    return ("nats", nats) if levels == 2 else ("bits/dim", float(distributions.nats_to_bits_per_dim(nats, dims)))


def plot_loss_curve(history: list[dict], path: Path, levels: int, dims: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, style in (("train", "-"), ("valid", "o-")):
        points = [(h["step"], h[f"{kind}_nll_nats"]) for h in history if f"{kind}_nll_nats" in h]
        if points:
            steps, nats = zip(*points)
            ax.plot(steps, [nll_units(levels, v, dims)[1] for v in nats], style, label=kind, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(f"NLL ({nll_units(levels, 0.0, dims)[0]})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
