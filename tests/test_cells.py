"""Row cells reproduce the full model exactly, and the cached sampler is deterministic."""
import numpy as np
import pytest
import torch

from pixelrnn.export.cells import build_cell, sample_cached, teacher_forced_logits
from pixelrnn.training.models import build_model

CASES = [
    ("pixelcnn", dict(hidden=12, layers=3), 1, 2),
    ("pixelcnn", dict(hidden=12, layers=2), 1, 256),
    ("pixelcnn", dict(hidden=12, layers=2, input_kernel=5), 3, 4),
]


def make(arch, fields, channels, levels, h=6, w=5):
    torch.manual_seed(0)
    return build_model(arch, dict(in_channels=channels, height=h, width=w, levels=levels, **fields)).eval()


@pytest.mark.parametrize("arch, fields, channels, levels", CASES)
def test_step_by_step_logits_equal_the_full_model(arch, fields, channels, levels):
    model = make(arch, fields, channels, levels)
    x = torch.randint(0, levels, (3, channels, 6, 5))
    with torch.no_grad():
        full, nll = model(x), model.nll(x)
    logits, logprob = teacher_forced_logits(build_cell(model), x)
    assert torch.allclose(logits, full, atol=1e-4), (logits - full).abs().max()
    assert torch.allclose(-logprob, nll, atol=1e-4)


@pytest.mark.parametrize("arch, fields, channels, levels", CASES)
def test_sampled_image_is_consistent_with_its_logits(arch, fields, channels, levels):
    # Greedy sampling must pick, at every sub-pixel, the argmax of the full model's logits on
    # the finished image: a cell that read a different prefix than the model would disagree.
    model = make(arch, fields, channels, levels)
    images = sample_cached(build_cell(model), 3, seed=1, temperature=0.0)
    x = torch.from_numpy(images.astype(np.int64))
    with torch.no_grad():
        logits = model(x)
    greedy = (logits[:, :, 0] > 0).long() if levels == 2 else logits.argmax(dim=2)
    assert torch.equal(greedy, x)


def test_cached_sampler_is_deterministic_and_keeps_known_rows():
    model = make("pixelcnn", dict(hidden=12, layers=2), 1, 4)
    cell = build_cell(model)
    a, b = sample_cached(cell, 4, seed=3), sample_cached(cell, 4, seed=3)
    assert np.array_equal(a, b) and not np.array_equal(a, sample_cached(cell, 4, seed=4))
    known = np.random.default_rng(0).integers(0, 4, (4, 1, 6, 5)).astype(np.uint8)
    done = sample_cached(cell, 4, seed=3, known=known, known_rows=3)
    assert np.array_equal(done[:, :, :3], known[:, :, :3])


@pytest.mark.parametrize("arch, fields, channels, levels", CASES)
def test_cached_and_reference_samplers_draw_the_same_image(arch, fields, channels, levels):
    from pixelrnn.training.sample import sample_reference

    model = make(arch, fields, channels, levels)
    known = np.random.default_rng(2).integers(0, levels, (2, channels, 6, 5)).astype(np.uint8)
    for known_rows in (0, 2):
        cached = sample_cached(build_cell(model), 2, seed=5, known=known, known_rows=known_rows)
        reference = sample_reference(model, 2, seed=5, known=known, known_rows=known_rows)
        assert np.array_equal(cached, reference)
