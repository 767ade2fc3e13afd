"""Row LSTM and Diagonal BiLSTM row cells reproduce the full models exactly."""
import numpy as np
import pytest
import torch

from pixelrnn.export.cells import build_cell, sample_cached, teacher_forced_logits
from pixelrnn.export.cells.diagonal_bilstm import DiagonalBiLSTMCell
from pixelrnn.export.cells.row_lstm import RowLSTMCell
from pixelrnn.training.models import build_model

H, W = 5, 4
CASES = [  # arch, fields, channels, levels
    ("row_lstm", dict(hidden=6, layers=1), 1, 2),
    ("row_lstm", dict(hidden=6, layers=2), 1, 256),
    ("row_lstm", dict(hidden=6, layers=2), 3, 4),
    ("diagonal_bilstm", dict(hidden=6, layers=1), 1, 2),
    ("diagonal_bilstm", dict(hidden=6, layers=2), 1, 256),
    ("diagonal_bilstm", dict(hidden=6, layers=2), 3, 4),
]


def make(arch, fields, channels, levels, h=H, w=W):
    torch.manual_seed(0)
    model = build_model(arch, dict(in_channels=channels, height=h, width=w, levels=levels, **fields)).eval()
    with torch.no_grad():  # larger weights than the init, so every LSTM gate and tap matters
        for p in model.parameters():
            p.mul_(2.0)
    return model


def greedy(logits, levels):
    return (logits[:, :, 0] > 0).long() if levels == 2 else logits.argmax(dim=2)


@pytest.mark.parametrize("arch, fields, channels, levels", CASES)
def test_teacher_forced_logits_equal_the_full_model(arch, fields, channels, levels):
    model = make(arch, fields, channels, levels)
    x = torch.randint(0, levels, (3, channels, H, W))
    with torch.no_grad():
        full, nll = model(x), model.nll(x)
    logits, logprob = teacher_forced_logits(build_cell(model), x)
    assert torch.allclose(logits, full, atol=1e-4), (logits - full).abs().max()
    assert torch.allclose(-logprob, nll, atol=1e-4)


@pytest.mark.parametrize("arch", ["row_lstm", "diagonal_bilstm"])
def test_wide_image_parity(arch):
    # Wider than tall, so the diagonal's skewed columns run past the image on both sides.
    model = make(arch, dict(hidden=6, layers=2), 1, 4, h=3, w=7)
    x = torch.randint(0, 4, (2, 1, 3, 7))
    with torch.no_grad():
        full = model(x)
    logits, _ = teacher_forced_logits(build_cell(model), x)
    assert torch.allclose(logits, full, atol=1e-4), (logits - full).abs().max()


@pytest.mark.parametrize("arch, fields, channels, levels", CASES)
def test_greedy_sample_is_the_argmax_of_its_logits(arch, fields, channels, levels):
    model = make(arch, fields, channels, levels)
    x = torch.from_numpy(sample_cached(build_cell(model), 3, seed=1, temperature=0.0).astype(np.int64))
    with torch.no_grad():
        assert torch.equal(greedy(model(x), levels), x)


@pytest.mark.parametrize("arch, fields, channels, levels", [CASES[2], CASES[5]])
def test_cached_and_reference_samplers_draw_the_same_image(arch, fields, channels, levels):
    from pixelrnn.training.sample import sample_reference

    model = make(arch, fields, channels, levels)
    cell = build_cell(model)
    known = np.random.default_rng(2).integers(0, levels, (2, channels, H, W)).astype(np.uint8)
    for known_rows in (0, 2):
        cached = sample_cached(cell, 2, seed=5, known=known, known_rows=known_rows)
        reference = sample_reference(model, 2, seed=5, known=known, known_rows=known_rows)
        assert np.array_equal(cached, reference)
    assert np.array_equal(cached[:, :, :2], known[:, :, :2])


@pytest.mark.parametrize("arch", ["row_lstm", "diagonal_bilstm"])
def test_state_is_the_same_size_for_every_row(arch):
    # The work per row is a function of the state's shapes and the row width only: if the state
    # stays the same size from row to row, so does the cost of a row.
    model = make(arch, dict(hidden=6, layers=2), 3, 4, h=8, w=W)
    cell = build_cell(model)
    state = cell.initial_state(2)
    expected = [s for _, s in cell.state_shapes(2)]
    assert [tuple(t.shape) for t in state] == expected
    u = torch.rand(W, 3, 2, dtype=torch.float64)
    temp, force = torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.bool)
    with torch.no_grad():
        for _ in range(model.config.height):
            _, _, _, state = cell.run_row(state, u, temp, torch.zeros(2, 3, W, dtype=torch.long), force)
            assert [tuple(t.shape) for t in state] == expected


def test_state_layouts():
    row = build_cell(make("row_lstm", dict(hidden=6, layers=2), 3, 4))
    assert isinstance(row, RowLSTMCell)
    shapes = dict(row.state_shapes(2))
    assert list(shapes) == ["rows", "h_0", "h_1", "c_0", "c_1"]
    assert shapes["rows"] == (2, 3, 3, W) and shapes["c_1"] == (2, 6, W)
    diag = build_cell(make("diagonal_bilstm", dict(hidden=6, layers=2), 1, 2))
    assert isinstance(diag, DiagonalBiLSTMCell)
    shapes = dict(diag.state_shapes(2))
    assert list(shapes) == ["rows", "ltr_h_0", "ltr_h_1", "rtl_h_0", "rtl_h_1"]
    assert shapes["rows"] == (2, 1, 3, W) and shapes["rtl_h_0"] == (2, 6, W)


@pytest.mark.parametrize("arch", ["row_lstm", "diagonal_bilstm"])
def test_flat_forward_matches_run_row(arch):
    """The signature a later ONNX export uses."""
    model = make(arch, dict(hidden=6, layers=1), 1, 4)
    cell = build_cell(model)
    b = 2
    state = tuple(torch.randn(s) for _, s in cell.state_shapes(b))
    u = torch.rand(W, 1, b, dtype=torch.float64)
    temp = torch.ones(b, dtype=torch.float64)
    forced, force = torch.randint(0, 4, (b, 1, W)), torch.tensor([True, False])
    with torch.no_grad():
        row, logprob, logits, new = cell.run_row(state, u, temp, forced, force)
        flat = cell(*state, u, temp, forced, force)
    assert torch.equal(flat[0], row) and torch.equal(flat[1], logprob) and torch.equal(flat[2], logits)
    assert all(torch.equal(p, q) for p, q in zip(flat[3:], new))
    assert torch.equal(row[0], forced[0])
