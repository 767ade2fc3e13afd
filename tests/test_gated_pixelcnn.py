"""Gated PixelCNN: causality (grey, RGB, class-conditional), shapes, labels, the vertical stack."""
import pytest
import torch

from pixelrnn.training.causality import check_model
from pixelrnn.training.models import build_model
from pixelrnn.training.models.gated_pixelcnn import shift_down


def gated(**kw):
    torch.manual_seed(0)
    cfg = dict(in_channels=1, height=5, width=5, levels=2, hidden=6, layers=3, kernel=3)
    cfg.update(kw)
    return build_model("gated_pixelcnn", cfg)


@pytest.mark.parametrize(
    "kw",
    [
        dict(levels=2),
        dict(levels=4),
        dict(levels=4, kernel=5, layers=2),
        dict(in_channels=3, levels=4, height=4, width=4),
        dict(in_channels=3, levels=2, height=4, width=4),
    ],
)
def test_causal(kw):
    model = gated(**kw)
    report = check_model(model, model.config.in_channels, model.config.height, model.config.width, model.config.levels)
    assert report.ok, report.describe()


def test_causal_conditional():
    model = gated(in_channels=3, levels=4, height=4, width=4, num_classes=3)
    report = check_model(model, 3, 4, 4, 4, labels=torch.tensor([0, 1, 2]))
    assert report.ok, report.describe()


def test_rgb_sees_earlier_channels_of_own_pixel():
    model = gated(in_channels=3, levels=4, height=4, width=4)
    report = check_model(model, 3, 4, 4, 4)
    assert report.sees((2, 2, 2), (0, 2, 2)) and report.sees((2, 2, 2), (1, 2, 2))
    assert report.sees((1, 2, 2), (0, 2, 2))


@pytest.mark.parametrize("c,levels,k", [(1, 2, 1), (1, 256, 256), (3, 2, 1), (3, 256, 256)])
def test_shapes(c, levels, k):
    model = gated(in_channels=c, levels=levels, height=6, width=7)
    x = torch.randint(0, levels, (2, c, 6, 7))
    assert model(x).shape == (2, c, k, 6, 7)
    nll = model.nll(x)
    assert nll.shape == (2,) and torch.isfinite(nll).all()


def test_label_changes_logits():
    model = gated(num_classes=4)
    x = torch.randint(0, 2, (2, 1, 5, 5))
    a = model(x, torch.tensor([0, 0]))
    b = model(x, torch.tensor([3, 0]))
    assert not torch.allclose(a[0], b[0])
    assert torch.allclose(a[1], b[1])


def test_bad_labels():
    model = gated(num_classes=4)
    x = torch.randint(0, 2, (2, 1, 5, 5))
    with pytest.raises(ValueError, match="labels"):
        model(x, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="labels"):
        model(x, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="labels"):
        model(x, torch.tensor([0]))
    with pytest.raises(ValueError, match="labels"):
        model(x)


def test_rgb_needs_multiple_of_three():
    with pytest.raises(ValueError, match="multiple"):
        gated(in_channels=3, hidden=8)


def test_vertical_link_sees_only_rows_above():
    """What the horizontal stack receives from the vertical stack at row i depends on rows < i only."""
    model = gated(height=6, width=6).double()
    x = torch.randint(0, 2, (1, 1, 6, 6)).double().requires_grad_(True)
    v = model.preprocess(x)
    for layer in model.layers:
        v_pre = layer.vertical(v)
        link = shift_down(v_pre)  # (1, 2h, 6, 6)
        (grad,) = torch.autograd.grad(link[0, :, 3, 2].sum(), x, retain_graph=True)
        rows = grad[0, 0].abs().sum(1) > 0
        assert not rows[3:].any() and rows[2]
        v = torch.tanh(v_pre[:, :6]) * torch.sigmoid(v_pre[:, 6:])


def test_dropout_acts_in_training_only_and_keeps_causality():
    """--model-arg dropout=P: random in train mode, identity in eval mode (what cells and exports
    are built from), elementwise so the masks stay causal."""
    cfg = dict(in_channels=3, height=5, width=5, levels=4, hidden=6, layers=3, kernel=3)
    torch.manual_seed(0)
    plain = build_model("gated_pixelcnn", cfg)
    dropped = build_model("gated_pixelcnn", dict(cfg, dropout=0.5))
    dropped.load_state_dict(plain.state_dict())  # no weights of its own
    x = torch.randint(0, 4, (2, 3, 5, 5))
    with torch.no_grad():
        torch.testing.assert_close(dropped.eval()(x), plain.eval()(x))
        dropped.train()
        assert not torch.allclose(dropped(x), dropped(x))
    report = check_model(dropped, 3, 5, 5, 4)
    assert report.ok, report.describe()
    with pytest.raises(ValueError, match="dropout must be in"):
        build_model("gated_pixelcnn", dict(cfg, dropout=1.0))
