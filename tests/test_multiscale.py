"""Multi-scale model: shapes, the two-part likelihood, causality of each part, config handling."""
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pixelrnn.training.causality import check_model, measure_dependencies
from pixelrnn.training.distributions import log_prob, nll_nats
from pixelrnn.training.models import build_model


def multiscale(**kw):
    torch.manual_seed(0)
    cfg = dict(in_channels=1, height=8, width=8, levels=2, hidden=6, layers=2)
    cfg.update(kw)
    return build_model("multiscale", cfg)


@pytest.mark.parametrize("base", ["pixelcnn", "gated_pixelcnn"])
@pytest.mark.parametrize("c,levels,k", [(1, 2, 1), (1, 256, 256), (3, 2, 1), (3, 256, 256)])
def test_shapes(base, c, levels, k):
    model = multiscale(base_arch=base, in_channels=c, levels=levels)
    assert model.small_model.config.height == 4 and model.big_model.config.height == 8
    x = torch.randint(0, levels, (2, c, 8, 8))
    assert model(x).shape == (2, c, k, 8, 8)
    nll = model.nll(x)
    assert nll.shape == (2,) and torch.isfinite(nll).all()


@pytest.mark.parametrize("base,c,levels", [("pixelcnn", 1, 2), ("gated_pixelcnn", 3, 4), ("pixelcnn", 3, 256)])
def test_nll_is_small_plus_off_grid_big(base, c, levels):
    model = multiscale(base_arch=base, in_channels=c, levels=levels)
    x = torch.randint(0, levels, (3, c, 8, 8))
    small = x[:, :, 0::2, 0::2]
    expected = nll_nats(model.small_model(small), small, levels)
    scaled = small.float() / (levels - 1) * 2 - 1
    cond = model.condition_conv(F.interpolate(scaled, scale_factor=2, mode="nearest"))
    lp = log_prob(model.big_model(x, condition=cond), x, levels)  # (B, C, 8, 8)
    for i in range(8):
        for j in range(8):
            if i % 2 or j % 2:
                expected = expected - lp[:, :, i, j].sum(1)
    torch.testing.assert_close(model.nll(x), expected)


@pytest.mark.parametrize("base,c,levels", [("pixelcnn", 1, 2), ("gated_pixelcnn", 1, 4), ("gated_pixelcnn", 3, 4)])
def test_parts_are_causal(base, c, levels):
    model = multiscale(base_arch=base, in_channels=c, levels=levels)
    small_report = check_model(model.small_model, c, 4, 4, levels)
    assert small_report.ok, small_report.describe()

    probe = copy.deepcopy(model).double().eval()
    small_given = torch.randint(0, levels, (3, c, 4, 4), generator=torch.Generator().manual_seed(1)).double()
    cond = probe.condition(small_given).detach()
    big_report = measure_dependencies(lambda x: probe.big_model(x, condition=cond), c, 8, 8, levels)
    assert big_report.ok, big_report.describe()


@pytest.mark.parametrize("base", ["pixelcnn", "gated_pixelcnn"])
def test_big_model_sees_small_pixel_below_right(base):
    """The 3x3 condition conv lets an off-grid pixel read the grid pixels around it, later ones too."""
    model = multiscale(base_arch=base, levels=4)
    x = torch.randint(0, 4, (1, 1, 8, 8))
    y = x.clone()
    y[0, 0, 2, 2] = (x[0, 0, 2, 2] + 1) % 4  # grid pixel after (1, 1) in raster order
    assert not torch.allclose(model(x)[..., 1, 1], model(y)[..., 1, 1])


def test_conditional_labels_reach_both_parts():
    model = multiscale(base_arch="gated_pixelcnn", num_classes=3)
    x = torch.randint(0, 2, (2, 1, 8, 8))
    a, b = model.nll(x, torch.tensor([0, 1])), model.nll(x, torch.tensor([2, 1]))
    assert a[0] != b[0] and a[1] == b[1]
    with pytest.raises(ValueError, match="labels"):
        model.nll(x, torch.tensor([0, 3]))


def test_config_fields():
    model = multiscale(base_arch="gated_pixelcnn", factor=4, small_config=dict(layers=1, kernel=3), big_config=dict(hidden=9))
    assert model.small_model.config.height == 2 and model.small_model.config.layers == 1
    assert model.small_model.config.hidden == 6 and model.big_model.config.hidden == 9
    assert model.big_model.config.layers == 2
    rebuilt = build_model("multiscale", dataclasses.asdict(model.config))
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randint(0, 2, (1, 1, 8, 8))
    torch.testing.assert_close(rebuilt.nll(x), model.nll(x))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(height=7), "multiple of factor"),
        (dict(factor=1), "factor"),
        (dict(small_config=dict(height=4)), "small_config"),
        (dict(base_arch="multiscale"), "single-scale"),
        (dict(base_arch="nope"), "unknown architecture"),
        (dict(big_config=dict(bogus=1)), "bogus"),
    ],
)
def test_bad_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        multiscale(**kw)
