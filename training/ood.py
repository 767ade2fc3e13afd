"""Per-image likelihoods of a data set under trained models, for out-of-distribution detection
(the scores themselves: runtime/ood.py; the benchmark: bench/ood.py).

A class-conditional model scores p(x) by summing p(x | y) over its classes (uniform p(y)): one
pass per class, so it costs num_classes times an unconditional model. A model trained on some of
its classes only (data spec `classes`) sums over those: the others were never trained.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from pixelrnn.runtime import ood


def trained_classes(ckpt: dict) -> list[int] | None:
    """The classes a checkpoint's model was trained on when only some (its data spec's `classes`)."""
    return (ckpt.get("data") or {}).get("classes")


@torch.no_grad()
def image_nll(model, images: np.ndarray, batch_size: int = 128, desc: str | None = None,
              classes: list[int] | None = None) -> np.ndarray:
    """-log p(x) in nats of each image (N, C, H, W), marginal over the classes of a
    class-conditional model (`classes`: over these only); float64 (N,)."""
    model.eval()
    num_classes = int(getattr(model.config, "num_classes", 0) or 0)
    labels_used = (list(classes) if classes is not None else list(range(num_classes))) if num_classes else [None]
    per_class = np.empty((len(images), len(labels_used)))
    bar = tqdm(total=len(images) * len(labels_used), desc=desc, disable=desc is None, unit="img", leave=False)
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.asarray(images[start:start + batch_size])).long()
        for column, k in enumerate(labels_used):
            labels = None if k is None else torch.full((len(x),), k, dtype=torch.long)
            per_class[start:start + len(x), column] = model.nll(x, labels).double().numpy()
            bar.update(len(x))
    bar.close()
    return ood.marginal_nll(per_class) if num_classes else per_class[:, 0]
