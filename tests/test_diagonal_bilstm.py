"""Diagonal BiLSTM: skew, causality (grey, RGB, both heads), the two pitfalls caught, gates, training."""
from __future__ import annotations

import pytest
import torch

from pixelrnn.training.causality import check_model, measure_dependencies
from pixelrnn.training.models import ARCHITECTURES, build_model
from pixelrnn.training.models import diagonal_bilstm
from pixelrnn.training.models.diagonal_bilstm import (
    DiagonalBiLSTM,
    DiagonalBiLSTMConfig,
    DiagonalBiLSTMLayer,
    DiagonalLSTM,
    skew,
    unskew,
)


def make(c=1, size=6, levels=2, hidden=6, layers=1, seed=0, width=None) -> DiagonalBiLSTM:
    torch.manual_seed(seed)
    cfg = DiagonalBiLSTMConfig(
        in_channels=c, height=size, width=width or size, levels=levels, hidden=hidden, layers=layers
    )
    return DiagonalBiLSTM(cfg)


def test_skew_moves_row_i_right_by_i_and_unskew_inverts_it():
    x = torch.randn(2, 3, 4, 5)
    s = skew(x)
    assert s.shape == (2, 3, 4, 8)
    for i in range(4):
        torch.testing.assert_close(s[:, :, i, i : i + 5], x[:, :, i])
        assert (s[:, :, i, :i] == 0).all() and (s[:, :, i, i + 5 :] == 0).all()
    torch.testing.assert_close(unskew(s, 5), x)


@pytest.mark.parametrize(
    "c,size,levels,hidden,layers",
    [(1, 7, 2, 6, 1), (1, 6, 4, 6, 2), (1, 4, 256, 6, 1), (3, 5, 4, 6, 1), (3, 4, 2, 12, 2)],
)
def test_causal(c, size, levels, hidden, layers):
    report = check_model(make(c, size, levels, hidden, layers), c, size, size, levels)
    assert report.ok, report.describe()


def test_rgb_reads_earlier_channels_of_the_same_pixel():
    # Wide and probed on many images, so that no path hides behind a dead ReLU.
    report = check_model(make(3, 4, 4, hidden=24), 3, 4, 4, 4, n_images=8)
    assert report.ok, report.describe()
    assert report.sees((1, 2, 2), (0, 2, 2))  # G sees R
    assert report.sees((2, 2, 2), (1, 2, 2))  # B sees G


def test_sees_above_right_beyond_the_input_convolution():
    # Two rows up and five columns right is out of the 7x7 mask-A reach (3) and of a Row LSTM's
    # triangle: only the right-to-left direction can bring it in.
    report = check_model(make(1, 4, 2, width=9), 1, 4, 9, 2)
    assert report.ok, report.describe()
    assert report.sees((0, 3, 0), (0, 1, 5))


def test_only_gap_is_the_last_pixel_of_the_row_above():
    height, width = 4, 7
    report = check_model(make(1, height, 2, hidden=12, width=width), 1, height, width, 2, n_images=8)
    missing = (report.allowed & ~report.depends)[0, :, :, 0].nonzero().tolist()
    expected = [[i, j, i - 1, width - 1] for i in range(1, height) for j in range(width - 4)]
    assert missing == expected


def layer_dependencies(layer: DiagonalBiLSTMLayer, size: int):
    """Exact field of one layer (one channel, no ReLU inside, so no dependency hides)."""
    layer = layer.double()
    return measure_dependencies(lambda x: layer(x).unsqueeze(2), 1, size, size, levels=4).depends[0, :, :, 0]


def test_layer_receptive_field_is_the_whole_past():
    torch.manual_seed(0)
    size = 5
    depends = layer_dependencies(DiagonalBiLSTMLayer(1, 1), size)  # (H, W, H, W)
    pos = torch.arange(size * size)
    past_or_self = (pos[None, :] <= pos[:, None]).reshape(size, size, size, size)
    assert torch.equal(depends, past_or_self)


def test_missing_down_shift_is_caught(monkeypatch):
    monkeypatch.setattr(diagonal_bilstm, "shift_down", lambda x: x)
    report = check_model(make(1, 6, 2), 1, 6, 6, 2)
    assert not report.ok
    assert report.sees((0, 3, 1), (0, 3, 4))  # the right-to-left pass saw its own row to the right


def test_state_padding_at_the_bottom_is_caught(monkeypatch):
    # "Same" padding of the 2x1 state-to-state convolution: row i reads rows (i, i+1).
    monkeypatch.setattr(DiagonalLSTM, "state_padding", (0, 1))
    report = check_model(make(1, 6, 2), 1, 6, 6, 2)
    assert not report.ok
    assert report.violations[0, 2, 3, 0, 3:].any()  # pixel (2, 3) depends on rows below


def reference_step(lstm: DiagonalLSTM, x_is, h_prev, c_prev):
    """A hand-written step for one skewed column: row i reads the previous column at rows i-1, i."""
    w = lstm.state_to_state.weight  # (4h, h, 2): tap 0 = row above, tap 1 = same row
    above = torch.cat([torch.zeros_like(h_prev[:, :, :1]), h_prev[:, :, :-1]], dim=2)
    s = torch.einsum("oc,bci->boi", w[:, :, 0], above) + torch.einsum("oc,bci->boi", w[:, :, 1], h_prev)
    o, f, i, g = (x_is + s).split(lstm.hidden, dim=1)
    c = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def test_step_matches_hand_written_lstm():
    torch.manual_seed(0)
    lstm = DiagonalLSTM(6, 3)
    x_is, h_prev, c_prev = torch.randn(2, 24, 5), torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    h, c = lstm.step(x_is, h_prev, c_prev)
    h_ref, c_ref = reference_step(lstm, x_is, h_prev, c_prev)
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(c, c_ref)


def test_candidate_uses_tanh():
    lstm = DiagonalLSTM(2, 1)
    x_is = torch.zeros(1, 8, 4)
    x_is[:, 6:] = -5.0  # candidate block g
    zeros = torch.zeros(1, 2, 4)
    h, c = lstm.step(x_is, zeros, zeros)
    torch.testing.assert_close(c, torch.full_like(c, 0.5 * torch.tanh(torch.tensor(-5.0)).item()))
    assert (h < 0).all()


@pytest.mark.parametrize("c,levels,k", [(1, 2, 1), (3, 2, 1), (1, 16, 16), (3, 256, 256)])
def test_logit_shapes_and_finite_nll(c, levels, k):
    model = make(c, 5, levels, hidden=6, width=6)
    x = torch.randint(0, levels, (2, c, 5, 6))
    assert model(x).shape == (2, c, k, 5, 6)
    nll = model.nll(x)
    assert nll.shape == (2,) and torch.isfinite(nll).all()


def test_a_few_steps_reduce_nll():
    model = make(1, 5, 2, hidden=6)
    x = (torch.arange(5) % 2).expand(4, 1, 5, 5)  # vertical stripes: learnable from the left neighbour
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = model.nll(x).mean().item()
    for _ in range(15):
        opt.zero_grad()
        model.nll(x).mean().backward()
        opt.step()
    assert model.nll(x).mean().item() < 0.7 * first


def test_rejects_labels_and_bad_rgb_hidden():
    with pytest.raises(ValueError):
        DiagonalBiLSTM(DiagonalBiLSTMConfig(num_classes=10))
    with pytest.raises(ValueError):
        DiagonalBiLSTM(DiagonalBiLSTMConfig(in_channels=3, hidden=8))


def test_registry_builds_it():
    assert ARCHITECTURES["diagonal_bilstm"] == (DiagonalBiLSTMConfig, DiagonalBiLSTM)
    model = build_model("diagonal_bilstm", {"height": 4, "width": 4, "hidden": 6})
    assert isinstance(model, DiagonalBiLSTM) and len(model.layers) == 1
