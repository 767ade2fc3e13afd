"""Gated PixelCNN and multi-scale row cells reproduce the full models exactly."""
import numpy as np
import pytest
import torch

from pixelrnn.export.cells import build_cell, sample_cached, teacher_forced_logits
from pixelrnn.export.cells.multiscale import MultiScaleSampler
from pixelrnn.training.models import build_model

H, W = 6, 5
GATED = [  # fields, channels, levels
    (dict(hidden=8, layers=3, kernel=3), 1, 2),
    (dict(hidden=8, layers=2, kernel=5), 1, 256),
    (dict(hidden=6, layers=3, kernel=3), 3, 4),
    (dict(hidden=8, layers=2, kernel=3, num_classes=3), 1, 4),
    (dict(hidden=6, layers=2, kernel=1, num_classes=2), 3, 2),
]
MULTISCALE = [  # base, channels, levels, labels
    ("gated_pixelcnn", 1, 2, 0),
    ("gated_pixelcnn", 3, 4, 2),
    ("pixelcnn", 1, 4, 0),
]


def gated(fields, channels, levels):
    torch.manual_seed(0)
    return build_model("gated_pixelcnn", dict(in_channels=channels, height=H, width=W, levels=levels, **fields)).eval()


def multiscale(base, channels, levels, num_classes):
    torch.manual_seed(0)
    cfg = dict(base_arch=base, in_channels=channels, height=8, width=8, levels=levels, hidden=6, layers=2, num_classes=num_classes)
    return build_model("multiscale", cfg).eval()


def labels_for(model, n):
    k = model.config.num_classes
    return torch.arange(n) % k if k else None


def greedy(logits, levels):
    return (logits[:, :, 0] > 0).long() if levels == 2 else logits.argmax(dim=2)


@pytest.mark.parametrize("fields, channels, levels", GATED)
def test_gated_teacher_forced_logits_equal_the_full_model(fields, channels, levels):
    model = gated(fields, channels, levels)
    x, labels = torch.randint(0, levels, (3, channels, H, W)), labels_for(model, 3)
    with torch.no_grad():
        full, nll = model(x, labels), model.nll(x, labels)
    logits, logprob = teacher_forced_logits(build_cell(model), x, labels)
    assert torch.allclose(logits, full, atol=1e-4), (logits - full).abs().max()
    assert torch.allclose(-logprob, nll, atol=1e-4)


@pytest.mark.parametrize("fields, channels, levels", GATED)
def test_gated_greedy_sample_is_the_argmax_of_its_logits(fields, channels, levels):
    model = gated(fields, channels, levels)
    labels = labels_for(model, 3)
    x = torch.from_numpy(sample_cached(build_cell(model), 3, seed=1, temperature=0.0, labels=labels).astype(np.int64))
    with torch.no_grad():
        assert torch.equal(greedy(model(x, labels), levels), x)


def test_gated_sampler_is_deterministic_keeps_known_rows_and_uses_labels():
    model = gated(dict(hidden=8, layers=2, kernel=3, num_classes=3), 1, 4)
    cell = build_cell(model)
    labels = torch.tensor([0, 1, 2, 0])
    a, b = sample_cached(cell, 4, seed=3, labels=labels), sample_cached(cell, 4, seed=3, labels=labels)
    assert np.array_equal(a, b) and not np.array_equal(a, sample_cached(cell, 4, seed=4, labels=labels))
    assert not np.array_equal(a, sample_cached(cell, 4, seed=3, labels=(labels + 1) % 3))
    known = np.random.default_rng(0).integers(0, 4, (4, 1, H, W)).astype(np.uint8)
    done = sample_cached(cell, 4, seed=3, labels=labels, known=known, known_rows=3)
    assert np.array_equal(done[:, :, :3], known[:, :, :3])


def test_gated_state_layout():
    model = gated(dict(hidden=6, layers=3, kernel=5), 3, 4)
    cell = build_cell(model)
    shapes = dict(cell.state_shapes(2))
    assert list(shapes) == ["v_rows_0", "v_rows_1", "v_rows_2", "v_pre_0", "v_pre_1", "v_pre_2"]
    assert shapes["v_rows_0"] == (2, 3, 2, W) and shapes["v_rows_2"] == (2, 6, 2, W) and shapes["v_pre_1"] == (2, 12, W)


@pytest.mark.parametrize("base, channels, levels, num_classes", MULTISCALE)
def test_multiscale_big_part_given_the_small_image_equals_the_model(base, channels, levels, num_classes):
    model = multiscale(base, channels, levels, num_classes)
    x, labels = torch.randint(0, levels, (2, channels, 8, 8)), labels_for(model, 2)
    with torch.no_grad():
        full = model.big_model(x, labels, condition=model.condition(model.subsample(x)))
        nll = model.nll(x, labels)
    sampler = build_cell(model)
    assert isinstance(sampler, MultiScaleSampler)
    logits, logprob = teacher_forced_logits(sampler, x, labels)
    assert torch.allclose(logits, full, atol=1e-4), (logits - full).abs().max()
    assert torch.allclose(-logprob, nll, atol=1e-4)  # small part + off-grid big terms only


@pytest.mark.parametrize("base, channels, levels, num_classes", MULTISCALE)
def test_multiscale_greedy_sample_is_consistent_with_both_parts(base, channels, levels, num_classes):
    model = multiscale(base, channels, levels, num_classes)
    labels = labels_for(model, 3)
    x = torch.from_numpy(sample_cached(build_cell(model), 3, seed=2, temperature=0.0, labels=labels).astype(np.int64))
    small = model.subsample(x)
    off_grid = ~model.grid_mask()
    with torch.no_grad():
        assert torch.equal(greedy(model.small_model(small, labels), levels), small)
        big = greedy(model.big_model(x, labels, condition=model.condition(small)), levels)
    assert torch.equal(big[..., off_grid], x[..., off_grid])


def test_multiscale_sampler_is_deterministic_and_keeps_known_rows():
    model = multiscale("gated_pixelcnn", 1, 4, 0)
    sampler = build_cell(model)
    a, b = sample_cached(sampler, 3, seed=5), sample_cached(sampler, 3, seed=5)
    assert np.array_equal(a, b) and not np.array_equal(a, sample_cached(sampler, 3, seed=6))
    known = np.random.default_rng(0).integers(0, 4, (3, 1, 8, 8)).astype(np.uint8)
    done = sample_cached(sampler, 3, seed=5, known=known, known_rows=3)
    assert np.array_equal(done[:, :, :3], known[:, :, :3])
    assert np.array_equal(done[:, :, 2, ::2], known[:, :, 2, ::2])  # small row 1 was known too


def test_big_part_flat_forward_matches_run_row():
    """The signature a later ONNX export of the big part uses."""
    model = multiscale("gated_pixelcnn", 3, 4, 2)
    big = build_cell(model).big
    b = 2
    state = tuple(torch.randn(s) for _, s in big.state_shapes(b))
    u = torch.rand(8, 3, b, dtype=torch.float64)
    temp = torch.ones(b, dtype=torch.float64)
    forced, force = torch.randint(0, 4, (b, 3, 8)), torch.tensor([True, False])
    cond, fixed, labels = torch.randn(b, model.big_model.condition_channels, 8), torch.arange(8) % 2 == 0, torch.tensor([0, 1])
    with torch.no_grad():
        row, logprob, logits, new = big.run_row(state, u, temp, forced, force, labels, condition=cond, fixed=fixed)
        flat = big(*state, u, temp, forced, force, cond, fixed, labels)
    assert torch.equal(flat[0], row) and torch.equal(flat[1], logprob) and torch.equal(flat[2], logits)
    assert all(torch.equal(p, q) for p, q in zip(flat[3:], new))
    assert torch.equal(row[:, :, ::2], forced[:, :, ::2]) and torch.equal(row[0], forced[0])


@pytest.mark.parametrize("arch", ["gated_pixelcnn", "multiscale"])
def test_cached_sampler_draws_the_reference_samplers_image(arch):
    from pixelrnn.training import sample as reference
    if arch == "multiscale":
        model, known_rows = multiscale("gated_pixelcnn", 1, 4, 0), 3
        known = np.random.default_rng(1).integers(0, 4, (2, 1, 8, 8)).astype(np.uint8)
    else:
        model, known_rows = gated(dict(hidden=8, layers=2, kernel=3), 1, 4), 2
        known = np.random.default_rng(1).integers(0, 4, (2, 1, H, W)).astype(np.uint8)
    cell = build_cell(model)
    for kw in (dict(), dict(known=known, known_rows=known_rows)):
        expected = reference.sample_reference(model, 2, seed=7, **kw)
        assert np.array_equal(sample_cached(cell, 2, seed=7, **kw), expected)
