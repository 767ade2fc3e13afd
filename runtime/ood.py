"""Out-of-distribution scores from exact likelihoods, numpy only (the Triton detector runs it).

Raw likelihood is a poor detector: a model gives simpler images than its own data higher
likelihood (Nalisnick et al. 2019, "Do deep generative models know what they don't know?").
Two published corrections, each a score where HIGHER means MORE out-of-distribution:

- likelihood ratio (Ren et al. 2019): NLL under the model minus NLL under a background model
  trained on perturbed copies of the same data. The background model learns the population
  statistics (smoothness, how much ink) that dominate the raw likelihood; the difference is
  what only the real model explains: the semantics.
- input complexity (Serra et al. 2020): NLL in bits minus the length in bits of a lossless
  compression of the image, a stand-in for its complexity under a universal model.

A class-conditional model scores p(x) = sum over classes of p(x | y) p(y), with a uniform p(y).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

SCORES = ("nll", "complexity", "llr")  # raw NLL (nats), input complexity (bits), likelihood ratio (nats)


def marginal_nll(nll_per_class: np.ndarray) -> np.ndarray:
    """-log p(x) from -log p(x | y) for every class, (N, K) -> (N,), uniform p(y) = 1/K."""
    nll_per_class = np.asarray(nll_per_class, np.float64)
    k = nll_per_class.shape[1]
    low = nll_per_class.min(axis=1)  # log-sum-exp shifted by the largest term, so nothing underflows
    return low - np.log(np.exp(low[:, None] - nll_per_class).sum(axis=1)) + math.log(k)


def compressed_bits(images: np.ndarray, levels: int) -> np.ndarray:
    """Bits of a lossless deflate (zlib, level 9) of each image (N, C, H, W): binary images as
    packed bits, others as one byte per sub-pixel (what a PNG of that depth would hold)."""
    images = np.asarray(images)
    out = np.empty(len(images))
    for i, image in enumerate(images):
        raw = np.packbits(image.astype(np.uint8).ravel()) if levels == 2 else image.astype(np.uint8).ravel()
        out[i] = 8 * len(zlib.compress(raw.tobytes(), 9))
    return out


def scores(nll: np.ndarray, images: np.ndarray, levels: int, background_nll: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every score for N images: nll (nats), complexity (bits), and llr (nats) when the
    background model's NLL is given."""
    nll = np.asarray(nll, np.float64)
    out = {"nll": nll, "complexity": nll / math.log(2) - compressed_bits(images, levels)}
    if background_nll is not None:
        out["llr"] = nll - np.asarray(background_nll, np.float64)
    return out


@dataclass(frozen=True)
class Threshold:
    """Above `value`, an image is called out-of-distribution: set so that a fraction
    `false_positive_rate` of in-distribution validation images are (wrongly) called so."""
    score: str
    value: float
    false_positive_rate: float
    calibration_images: int

    @classmethod
    def calibrate(cls, score: str, in_distribution: np.ndarray, false_positive_rate: float = 0.05) -> "Threshold":
        if not 0 < false_positive_rate < 1:
            raise ValueError(f"false_positive_rate must be in (0, 1), got {false_positive_rate}")
        values = np.asarray(in_distribution, np.float64)
        if values.size == 0 or not np.isfinite(values).all():
            raise ValueError(f"calibration needs finite {score} scores of in-distribution images, got {values.size} values")
        # 'higher' quantile: at most the asked fraction of the calibration images lies above it.
        value = float(np.quantile(values, 1 - false_positive_rate, method="higher"))
        return cls(score, value, false_positive_rate, int(values.size))

    def flags(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, np.float64) > self.value

    def to_json(self) -> dict:
        return {"score": self.score, "value": self.value, "false_positive_rate": self.false_positive_rate,
                "calibration_images": self.calibration_images}

    @classmethod
    def from_json(cls, d: dict) -> "Threshold":
        return cls(str(d["score"]), float(d["value"]), float(d["false_positive_rate"]), int(d["calibration_images"]))
