import math

import numpy as np
import pytest
import torch

from pixelrnn.runtime import randomness as R
from pixelrnn.training import distributions as D


def test_softmax_nll_equals_direct_sum_of_minus_log_p():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 256, 4, 5)
    x = torch.randint(0, 256, (2, 3, 4, 5))
    p = torch.softmax(logits, dim=2)
    direct = torch.zeros(2)
    for b in range(2):
        for c in range(3):
            for i in range(4):
                for j in range(5):
                    direct[b] -= math.log(p[b, c, x[b, c, i, j], i, j].item())
    assert torch.allclose(D.nll_nats(logits, x, 256), direct, rtol=1e-5)
    bpd = D.nats_to_bits_per_dim(D.nll_nats(logits, x, 256), 3 * 4 * 5)
    assert torch.allclose(bpd, direct / (60 * math.log(2)), rtol=1e-5)


def test_bernoulli_nll_equals_direct_sum():
    torch.manual_seed(1)
    logits = torch.randn(3, 1, 1, 4, 4)
    x = torch.randint(0, 2, (3, 1, 4, 4))
    p1 = torch.sigmoid(logits[:, :, 0])
    direct = -(x * p1.log() + (1 - x) * (1 - p1).log()).flatten(1).sum(1)
    assert torch.allclose(D.nll_nats(logits, x, 2), direct, atol=1e-5)


def test_logits_shape_must_fit_levels():
    with pytest.raises(ValueError, match="levels"):
        D.log_prob(torch.zeros(1, 1, 4, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.long), 256)


def test_inverse_cdf_sampling_matches_the_distribution():
    rng = R.sampling_rng(0)
    logits = np.log(np.array([[0.1, 0.2, 0.7]] * 20000))
    values = R.sample_from_logits(logits, rng.random(20000), 3)
    freq = np.bincount(values, minlength=3) / 20000
    assert np.allclose(freq, [0.1, 0.2, 0.7], atol=0.015)
    # Bernoulli head: p(1) = sigmoid(logit)
    ones = R.sample_from_logits(np.full((20000, 1), math.log(3)), rng.random(20000), 2).mean()
    assert abs(ones - 0.75) < 0.015


def test_temperature_zero_is_greedy_and_bad_temperature_is_refused():
    logits = np.array([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    assert R.sample_from_logits(logits, np.array([0.99, 0.99]), 3, temperature=0).tolist() == [1, 0]
    for bad in (float("nan"), -1.0, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            R.sample_from_logits(logits, np.array([0.5, 0.5]), 3, temperature=bad)


def test_row_uniforms_are_a_reproducible_stream():
    a, b = R.sampling_rng(7), R.sampling_rng(7)
    first = R.draw_row_uniforms(a, 4, 3, 5)
    assert first.shape == (5, 3, 4)
    assert np.array_equal(first, R.draw_row_uniforms(b, 4, 3, 5))


def test_bernoulli_log_prob_is_finite_for_extreme_logits():
    logits = torch.tensor([-200.0, -30.0, 0.0, 30.0, 200.0])
    for v in (0, 1):
        value = torch.full_like(logits, v, dtype=torch.long)
        got = D.bernoulli_log_prob(logits, value)
        want = -torch.nn.functional.binary_cross_entropy_with_logits(logits, value.float(), reduction="none")
        assert torch.isfinite(got).all() and torch.allclose(got, want, atol=1e-6)
