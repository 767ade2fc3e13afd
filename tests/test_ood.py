"""Out-of-distribution scores (runtime/ood.py) and per-image likelihoods (training/ood.py)."""
import math

import numpy as np
import pytest
import torch

from pixelrnn.runtime import ood
from pixelrnn.training.models import build_model
from pixelrnn.training.ood import image_nll


def test_marginal_nll_is_the_log_mean_of_the_class_likelihoods():
    nll = np.array([[2.0, 3.0, 5.0], [1.0, 1.0, 1.0]])
    want = -np.log(np.exp(-nll).mean(axis=1))
    assert np.allclose(ood.marginal_nll(nll), want)
    # Image-sized NLLs (exp(-1500) underflows to 0): still finite, and within log K of the best class.
    big = np.array([[1500.0, 1510.0], [1600.0, 1600.0]])
    got = ood.marginal_nll(big)
    assert np.isfinite(got).all() and np.allclose(got, [1500 - math.log1p(math.exp(-10)) + math.log(2), 1600.0])


def test_compressed_bits_tell_simple_images_from_noise():
    rng = np.random.default_rng(0)
    flat, noise = np.zeros((1, 1, 28, 28), np.uint8), rng.integers(0, 256, (1, 1, 28, 28)).astype(np.uint8)
    assert ood.compressed_bits(flat, 256)[0] < 200 < 28 * 28 * 8 <= ood.compressed_bits(noise, 256)[0]
    binary = rng.integers(0, 2, (2, 1, 28, 28))
    # binary images are packed 8 pixels a byte before deflate: noise costs about a bit a pixel, not 8
    assert 28 * 28 <= ood.compressed_bits(binary, 2).min() < 2 * 28 * 28


def test_scores_orient_higher_as_more_out_of_distribution():
    images = np.zeros((2, 1, 4, 4), np.uint8)
    s = ood.scores(np.array([10.0, 20.0]), images, 256, background_nll=np.array([12.0, 12.0]))
    assert list(s) == ["nll", "complexity", "llr"]
    assert np.allclose(s["llr"], [-2.0, 8.0]) and s["complexity"][1] - s["complexity"][0] == pytest.approx(10 / math.log(2))
    assert "llr" not in ood.scores(np.array([1.0]), images[:1], 256)


def test_threshold_calls_at_most_the_chosen_share_of_calibration_images():
    values = np.random.default_rng(1).normal(size=1000)
    t = ood.Threshold.calibrate("llr", values, 0.05)
    assert 0.04 <= t.flags(values).mean() <= 0.05 and t.calibration_images == 1000
    assert ood.Threshold.from_json(t.to_json()) == t
    for fpr in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="false_positive_rate"):
            ood.Threshold.calibrate("llr", values, fpr)
    with pytest.raises(ValueError, match="finite llr scores"):
        ood.Threshold.calibrate("llr", np.array([1.0, np.nan]))


def test_image_nll_of_a_class_conditional_model_sums_over_its_classes():
    model = build_model("gated_pixelcnn", dict(in_channels=1, height=5, width=4, levels=4, num_classes=3, hidden=6, layers=1, kernel=3))
    images = np.random.default_rng(2).integers(0, 4, (5, 1, 5, 4)).astype(np.uint8)
    got = image_nll(model, images, batch_size=2)
    with torch.no_grad():
        x = torch.from_numpy(images).long()
        per_class = torch.stack([model.nll(x, torch.full((5,), k)) for k in range(3)], 1).double()
    assert np.allclose(got, -(torch.logsumexp(-per_class, 1) - math.log(3)).numpy())
    some = image_nll(model, images, classes=[0, 2])  # a model trained on classes 0 and 2 only
    assert np.allclose(some, -(torch.logsumexp(-per_class[:, [0, 2]], 1) - math.log(2)).numpy())
    plain = build_model("pixelcnn", dict(in_channels=1, height=5, width=4, levels=2, hidden=6, layers=1))
    binary = images % 2
    with torch.no_grad():
        assert np.allclose(image_nll(plain, binary), plain.nll(torch.from_numpy(binary).long()).numpy(), atol=1e-5)
