"""Row LSTM: causality (grey, RGB, both heads), a leaking variant caught, LSTM gates, training sanity."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pixelrnn.training.causality import check_model, measure_dependencies
from pixelrnn.training.models import ARCHITECTURES, build_model
from pixelrnn.training.models.row_lstm import RowLSTM, RowLSTMConfig, RowLSTMLayer


def make(c=1, size=6, levels=2, hidden=6, layers=2, seed=0) -> RowLSTM:
    torch.manual_seed(seed)
    return RowLSTM(RowLSTMConfig(in_channels=c, height=size, width=size, levels=levels, hidden=hidden, layers=layers))


@pytest.mark.parametrize(
    "c,size,levels,hidden",
    [(1, 7, 2, 6), (1, 6, 4, 6), (1, 4, 256, 6), (3, 5, 4, 6), (3, 4, 2, 12)],
)
def test_causal(c, size, levels, hidden):
    report = check_model(make(c, size, levels, hidden), c, size, size, levels)
    assert report.ok, report.describe()


def test_rgb_reads_earlier_channels_of_the_same_pixel():
    # Wide and probed on many images, so that no path hides behind a dead ReLU.
    report = check_model(make(3, 4, 4, hidden=24), 3, 4, 4, 4, n_images=8)
    assert report.ok, report.describe()
    assert report.sees((1, 2, 2), (0, 2, 2))  # G sees R
    assert report.sees((2, 2, 2), (1, 2, 2))  # B sees G
    assert report.sees((0, 2, 2), (2, 1, 3))  # R sees any channel of an earlier pixel


def test_unmasked_input_to_state_is_caught():
    model = make(1, 5, 2)
    for layer in model.layers:
        layer.input_to_state.mask.fill_(1)  # the current row's right neighbour and the pixel itself
    report = check_model(model, 1, 5, 5, 2)
    assert not report.ok
    assert report.sees((0, 2, 1), (0, 2, 2))  # reads the pixel to its right


def test_layer_receptive_field_is_the_triangle_above():
    # One channel, no ReLU in a layer: the Jacobian shows the exact field of the recurrence.
    torch.manual_seed(0)
    layer = RowLSTMLayer(1, 1).double()
    size = 6
    report = measure_dependencies(lambda x: layer(x).unsqueeze(2), 1, size, size, levels=4)
    i, j = 5, 2
    expected = torch.zeros(size, size, dtype=torch.bool)
    expected[i, j - 1 : j + 1] = True  # the current row: left neighbour and the pixel itself (mask B)
    for d in range(1, i + 1):  # row i-d: columns j-d-1 .. j+d
        expected[i - d, max(j - d - 1, 0) : j + d + 1] = True
    assert torch.equal(report.depends[0, i, j, 0], expected)


def reference_step(layer: RowLSTMLayer, x_is, h_prev, c_prev):
    """A hand-written LSTM step for one row: sigmoid gates, tanh candidate."""
    s = F.conv1d(h_prev, layer.state_to_state.weight, padding=1)
    o, f, i, g = (x_is + s).split(layer.hidden, dim=1)
    c = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def test_step_matches_hand_written_lstm():
    torch.manual_seed(0)
    layer = RowLSTMLayer(6, 3)
    x_is, h_prev, c_prev = torch.randn(2, 24, 5), torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    h, c = layer.step(x_is, h_prev, c_prev)
    h_ref, c_ref = reference_step(layer, x_is, h_prev, c_prev)
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(c, c_ref)


def test_candidate_uses_tanh():
    # From a zero state, a negative candidate must give a negative cell and output; with a
    # sigmoid candidate both would stay positive.
    layer = RowLSTMLayer(2, 1)
    x_is = torch.zeros(1, 8, 3)
    x_is[:, 6:] = -5.0  # candidate block g
    zeros = torch.zeros(1, 2, 3)
    h, c = layer.step(x_is, zeros, zeros)
    expected_c = 0.5 * torch.tanh(torch.tensor(-5.0))
    torch.testing.assert_close(c, torch.full_like(c, expected_c.item()))
    torch.testing.assert_close(h, 0.5 * torch.tanh(c))
    assert (h < 0).all()


@pytest.mark.parametrize("c,levels,k", [(1, 2, 1), (3, 2, 1), (1, 16, 16), (3, 256, 256)])
def test_logit_shapes_and_finite_nll(c, levels, k):
    model = make(c, 5, levels, hidden=6)
    x = torch.randint(0, levels, (2, c, 5, 5))
    assert model(x).shape == (2, c, k, 5, 5)
    nll = model.nll(x)
    assert nll.shape == (2,) and torch.isfinite(nll).all()


def test_a_few_steps_reduce_nll():
    model = make(1, 5, 2, hidden=6, layers=1)
    x = (torch.arange(5) % 2).expand(4, 1, 5, 5)  # vertical stripes: learnable from the left neighbour
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = model.nll(x).mean().item()
    for _ in range(15):
        opt.zero_grad()
        loss = model.nll(x).mean()
        loss.backward()
        opt.step()
    assert model.nll(x).mean().item() < 0.7 * first


def test_rejects_labels_and_bad_rgb_hidden():
    with pytest.raises(ValueError):
        RowLSTM(RowLSTMConfig(num_classes=10))
    with pytest.raises(ValueError):
        RowLSTM(RowLSTMConfig(in_channels=3, hidden=8))


def test_registry_builds_it():
    assert ARCHITECTURES["row_lstm"] == (RowLSTMConfig, RowLSTM)
    model = build_model("row_lstm", {"height": 4, "width": 4, "hidden": 6, "layers": 1})
    assert isinstance(model, RowLSTM) and len(model.layers) == 1
