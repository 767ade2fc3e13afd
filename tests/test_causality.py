"""The harness accepts correct masked stacks and rejects broken ones."""
import pytest
import torch
import torch.nn as nn

from pixelrnn.training.causality import allowed_dependencies, check_model, measure_dependencies
from pixelrnn.training.masks import MaskedConv2d
from pixelrnn.training.models import build_model


class Stack(nn.Module):
    """A minimal masked-conv stack: first layer, two 3x3 layers, 1x1 output into (B, C, K, H, W).
    tanh between layers, not ReLU: a ReLU unit that is dead on every test image hides a real
    dependency, so whether the mask's allowed paths show up would depend on the weight draw."""

    def __init__(self, channels, k, first_mask="A", groups=None, hidden=12):
        super().__init__()
        g = channels if groups is None else groups
        self.channels, self.k = channels, k
        self.first = MaskedConv2d(channels, hidden, 5, first_mask, colour_groups=g)
        self.mid = nn.ModuleList(MaskedConv2d(hidden, hidden, 3, "B", colour_groups=g) for _ in range(2))
        self.out = MaskedConv2d(hidden, channels * k, 1, "B", colour_groups=g)

    def forward(self, x):
        h = self.first(x)
        for conv in self.mid:
            h = conv(torch.tanh(h))
        out = self.out(torch.tanh(h))
        return out.view(x.shape[0], self.channels, self.k, *x.shape[2:])


def harness(model, channels, size=5, levels=4):
    model = model.double()
    return measure_dependencies(model, channels, size, size, levels, n_images=4)


@pytest.mark.parametrize("channels", [1, 3])
def test_correct_stacks_are_accepted(channels):
    report = harness(Stack(channels, 4), channels)
    assert report.ok, report.describe()
    # ...and the harness really sees dependencies: the pixel above is read.
    assert report.sees((0, 2, 2), (0, 1, 2))
    if channels == 3:
        assert report.sees((2, 2, 2), (0, 2, 2)) and report.sees((2, 2, 2), (1, 2, 2))  # B reads R, G
        assert not report.sees((0, 2, 2), (1, 2, 2))  # R never reads G of its own pixel


@pytest.mark.parametrize("channels", [1, 3])
def test_mask_b_in_the_first_layer_is_rejected(channels):
    report = harness(Stack(channels, 4, first_mask="B"), channels)
    assert not report.ok
    assert report.violations[0, 2, 2, 0, 2, 2]  # a pixel sees itself
    assert "depend on pixel (" in report.describe()


@pytest.mark.parametrize("channels", [1, 3])
def test_off_by_one_shifted_mask_is_rejected(channels):
    model = Stack(channels, 4)
    # Shift the first layer's mask one tap to the right: the centre (and right neighbour) leak in.
    model.first.mask = torch.roll(model.first.mask, shifts=1, dims=-1)
    report = harness(model, channels)
    assert not report.ok
    assert report.violations[:, 2, 1].any()  # pixel (2,1) reads (2,2) or itself


def test_colour_mask_without_rgb_ordering_is_rejected():
    # The pitfall: a first-layer mask that only hides each channel from itself (no R -> G -> B
    # order) lets R read G and B of its own pixel.
    model = Stack(3, 4)
    out_g, in_g = torch.arange(12) // 4, torch.arange(3)
    model.first.mask[:, :, 2, 2] = (out_g[:, None] != in_g[None, :]).float()
    report = harness(model, 3)
    assert not report.ok
    assert report.violations[0, 2, 2, 1:, 2, 2].any()  # R of pixel (2,2) reads its own G or B


def test_allowed_set_is_raster_then_channel_order():
    allowed = allowed_dependencies(3, 2, 2)
    assert allowed[1, 1, 0, 0, 0, 1]  # pixel (1,0) may read (0,1)
    assert not allowed[0, 0, 1, 0, 1, 0]  # (0,1) may not read (1,0)
    assert allowed[2, 0, 0, 1, 0, 0] and not allowed[1, 0, 0, 2, 0, 0]  # B reads G, G not B
    assert not allowed[0, 0, 0, 0, 0, 0]  # never itself


@pytest.mark.parametrize("channels, levels", [(1, 2), (1, 256), (3, 4)])
def test_pixelcnn_passes_the_harness(channels, levels):
    model = build_model("pixelcnn", dict(in_channels=channels, height=5, width=5, levels=levels, hidden=6, layers=2))
    report = check_model(model, channels, 5, 5, levels)
    assert report.ok, report.describe()


def test_harness_checks_the_logits_shape():
    with pytest.raises(ValueError, match="logits of shape"):
        measure_dependencies(lambda x: x, 1, 3, 3, 2)
