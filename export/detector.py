"""The out-of-distribution detector of an exported model (export/build_engine.py --background):
export the background model's scorer, calibrate the threshold, write NAME_ood.

The threshold is set on in-distribution images only: the model's own validation split (the
data spec its checkpoint records), at the chosen false-positive rate. No out-of-distribution
set takes part, so the detector is not tuned to the sets it is later tried on.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pixelrnn.runtime import ood
from pixelrnn.runtime.datasets import load
from pixelrnn.server.detector import write_detector
from pixelrnn.server.repository import write_repository
from pixelrnn.training.checkpoint import load_model
from pixelrnn.training.ood import image_nll

SCORE = "llr"  # the score the verdict uses: the likelihood ratio, the published detector


def calibrate(model, background, images: np.ndarray, false_positive_rate: float) -> ood.Threshold:
    """The threshold of the likelihood ratio over in-distribution `images`."""
    nll = image_nll(model, images, desc="calibrating: model")
    background_nll = image_nll(background, images, desc="calibrating: background")
    values = ood.scores(nll, images, model.config.levels, background_nll)[SCORE]
    return ood.Threshold.calibrate(SCORE, values, false_positive_rate)


def calibration_images(ckpt: dict, count: int, data_dir: str | None = None) -> np.ndarray:
    if not ckpt.get("data"):
        raise ValueError("the checkpoint records no data set, so there is no validation split to calibrate on")
    spec = dict(ckpt["data"], **({"data_dir": data_dir} if data_dir else {}))
    images = load(spec, "valid").images
    return images[:count] if count else images


def add_detector(manifest: dict, model, ckpt: dict, background_manifest: dict, background_checkpoint: Path,
                 export_dir: Path, repository: Path, false_positive_rate: float, count: int,
                 data_dir: str | None = None) -> ood.Threshold:
    """Write BACKGROUND_score (scorer only) and NAME_ood into `repository`, which holds NAME_score."""
    background, _ = load_model(background_checkpoint)
    images = calibration_images(ckpt, count, data_dir)
    threshold = calibrate(model, background, images, false_positive_rate)
    write_repository(background_manifest, export_dir, repository, sampler=False)
    write_detector(repository, manifest, background_manifest, threshold)
    return threshold
