"""The training speed changes compute the same thing: the rewritten Diagonal BiLSTM, the Row LSTM
row loop and the PixelCNN's cropped kernels against the code before them (bench.training's
`legacy_code`, the old forwards verbatim), and the --channels-last / --compile options against
the plain step, on the same batch and weights: loss and every gradient to 1e-5 (the loss in
nats per sub-pixel, as training.train optimizes it). Then resumes with the options stay
bit-exact, and `bench.training --quick` writes its JSON."""
from __future__ import annotations

import json

import pytest
import torch

from bench import training as bench
from pixelrnn.training import train
from pixelrnn.training.checkpoint import load_checkpoint
from pixelrnn.training.models import build_model
from pixelrnn.training.models.diagonal_bilstm import DiagonalLSTM, diagonal_order

TOL = dict(rtol=1e-5, atol=1e-5)


def make(arch, c=1, height=6, width=6, levels=2, seed=0, **fields):
    torch.manual_seed(seed)
    model = build_model(arch, dict(in_channels=c, height=height, width=width, levels=levels, **fields))
    with torch.no_grad():  # larger weights than the init, so that every gate and tap matters
        for p in model.parameters():
            p.mul_(2.0)
    return model


def batch(model, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randint(0, cfg.levels, (n, cfg.in_channels, cfg.height, cfg.width), generator=g)
    y = torch.randint(0, cfg.num_classes, (n,), generator=g) if cfg.num_classes else None
    return x, y


def loss_and_grads(model, x, y=None, legacy=False):
    """The training loss (nats per sub-pixel) and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    with bench.legacy_code() if legacy else torch.enable_grad():
        loss = model.nll(x, y).mean() / model.dims
        loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same(a, b, exact=False, **tol):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert grads_a.keys() == grads_b.keys()
    check = torch.equal if exact else (lambda u, v: torch.allclose(u, v, **(tol or TOL)))
    assert check(loss_a, loss_b), (loss_a, loss_b)
    for name in grads_a:
        assert check(grads_a[name], grads_b[name]), (name, (grads_a[name] - grads_b[name]).abs().max())


# ---------------------------------------------------------------------------- Diagonal BiLSTM

@pytest.mark.parametrize("c, height, width, levels, hidden, layers", [
    (1, 6, 6, 2, 6, 1),
    (1, 4, 9, 2, 6, 2),  # wider than tall: skewed columns run past the image on both sides
    (1, 9, 3, 256, 6, 2),  # taller than wide
    (3, 5, 4, 4, 6, 2),  # colour groups in the gates
    (1, 1, 5, 2, 3, 1),  # one row
])
def test_diagonal_bilstm_equals_the_skewed_loop(c, height, width, levels, hidden, layers):
    model = make("diagonal_bilstm", c, height, width, levels, hidden=hidden, layers=layers)
    x, _ = batch(model)
    assert_same(loss_and_grads(model, x), loss_and_grads(model, x, legacy=True))
    # In float64 the two agree to rounding: the same arithmetic, not an approximation.
    model, x = model.double(), x.double()
    assert_same(loss_and_grads(model, x), loss_and_grads(model, x, legacy=True), rtol=1e-10, atol=1e-12)


def test_one_direction_and_the_input_gradient_equal_the_skewed_loop():
    torch.manual_seed(0)
    lstm = DiagonalLSTM(6, 3)
    x = torch.randn(2, 6, 5, 7, requires_grad=True)
    out = lstm(x)
    (grad_new,) = torch.autograd.grad(out.square().sum(), x)
    ref = bench.legacy_diagonal_lstm_forward(lstm, x)
    (grad_ref,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(grad_new, grad_ref, **TOL)


def test_diagonal_order_visits_every_pixel_once_column_by_column():
    order, sizes, first_rows = diagonal_order(3, 4)
    assert sorted(order.tolist()) == list(range(12)) and sum(sizes) == 12
    # (i, j) in skewed column i + j, rows ascending
    assert order.tolist() == [0, 1, 4, 2, 5, 8, 3, 6, 9, 7, 10, 11]
    assert sizes == (1, 2, 3, 3, 2, 1) and first_rows == (0, 0, 0, 0, 1, 2)


def test_diagonal_bilstm_state_dict_is_unchanged():
    model = make("diagonal_bilstm", hidden=6, layers=1)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "input_conv.weight": (6, 1, 7, 7), "input_conv.bias": (6,),
        "layers.0.left_to_right.input_to_state.weight": (24, 6, 1, 1),
        "layers.0.left_to_right.input_to_state.bias": (24,),
        "layers.0.left_to_right.state_to_state.weight": (24, 6, 2),
        "layers.0.right_to_left.input_to_state.weight": (24, 6, 1, 1),
        "layers.0.right_to_left.input_to_state.bias": (24,),
        "layers.0.right_to_left.state_to_state.weight": (24, 6, 2),
        "layers.0.residual.weight": (6, 6, 1, 1), "layers.0.residual.bias": (6,),
        "head1.weight": (6, 6, 1, 1), "head1.bias": (6,), "head2.weight": (1, 6, 1, 1), "head2.bias": (1,),
    }


# ---------------------------------------------------------------------------- Row LSTM, PixelCNN

@pytest.mark.parametrize("c, levels", [(1, 2), (3, 4)])
def test_row_lstm_is_bit_identical_to_the_old_loop(c, levels):
    # Bit for bit, so a run started before the change (runs/long) resumes on the same trajectory.
    model = make("row_lstm", c, 5, 7, levels, hidden=6, layers=2)
    x, _ = batch(model)
    assert_same(loss_and_grads(model, x), loss_and_grads(model, x, legacy=True), exact=True)


@pytest.mark.parametrize("c, levels, input_kernel", [(1, 2, 7), (3, 4, 7), (1, 256, 3)])
def test_pixelcnn_cropped_kernels_equal_the_full_masked_kernels(c, levels, input_kernel):
    model = make("pixelcnn", c, 7, 5, levels, hidden=6, layers=2, input_kernel=input_kernel)
    x, _ = batch(model)
    assert_same(loss_and_grads(model, x), loss_and_grads(model, x, legacy=True))


# ---------------------------------------------------------------------------- --channels-last, --compile

@pytest.mark.parametrize("arch, fields", [
    ("gated_pixelcnn", dict(hidden=6, layers=2, levels=256, num_classes=3)),
    ("pixelcnn", dict(hidden=6, layers=2)),
    ("row_lstm", dict(hidden=6, layers=1)),
    ("diagonal_bilstm", dict(hidden=6, layers=1)),
])
def test_channels_last_computes_the_same_loss_and_gradients(arch, fields):
    plain = make(arch, **fields)
    x, y = batch(plain)
    fast = make(arch, **fields).to(memory_format=torch.channels_last)
    assert_same(loss_and_grads(fast, x.contiguous(memory_format=torch.channels_last), y), loss_and_grads(plain, x, y))


@pytest.mark.slow
@pytest.mark.parametrize("arch, fields", [
    ("pixelcnn", dict(hidden=6, layers=2)),
    ("gated_pixelcnn", dict(hidden=6, layers=2, levels=256, num_classes=3)),
])
def test_compile_computes_the_same_loss_and_gradients(arch, fields):
    plain = make(arch, **fields)
    x, y = batch(plain)
    fast = make(arch, **fields)
    compiled = torch.compile(train.NLLObjective(fast))
    fast.zero_grad(set_to_none=True)
    loss = compiled(x, y).mean() / fast.dims
    loss.backward()
    assert_same((loss.detach(), {n: p.grad for n, p in fast.named_parameters()}), loss_and_grads(plain, x, y))


# ---------------------------------------------------------------------------- training.train with the options

TINY = ["--arch", "pixelcnn", "--data", "synthetic", "--data-arg", "size=8", "--data-arg", "count=64", "--bits", "1",
        "--hidden", "6", "--layers", "1", "--model-arg", "input_kernel=3", "--batch-size", "16", "--valid-every", "3",
        "--checkpoint-every", "2", "--valid-images", "16", "--seed", "3", "--threads", "1", "--steps", "6"]


def run_resumed_and_uninterrupted(tmp_path, *flags):
    """Train 6 steps straight, and 4 then --resume (with no flags repeated); return both checkpoints."""
    assert train.main(TINY + ["--out", str(tmp_path / "full"), *flags]) == 0
    assert train.main(TINY + ["--out", str(tmp_path / "parts"), "--stop-at", "4", *flags]) == 0
    assert train.main(["--out", str(tmp_path / "parts"), "--resume", "--threads", "1"]) == 0
    return load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "parts" / "last.pt")


def assert_bit_exact(full, parts):
    assert parts["step"] == full["step"] == 6
    for key, value in full["model"].items():
        assert torch.equal(parts["model"][key], value), key


def test_channels_last_run_resumes_bit_exact_and_keeps_the_flag(tmp_path):
    full, parts = run_resumed_and_uninterrupted(tmp_path, "--channels-last")
    assert_bit_exact(full, parts)
    assert parts["train_args"]["channels_last"] is True and parts["train_args"]["compile"] is False


@pytest.mark.slow
def test_compiled_run_resumes_bit_exact_and_keeps_the_flag(tmp_path):
    from torch._dynamo.utils import counters

    frames = counters["stats"]["unique_graphs"]
    full, parts = run_resumed_and_uninterrupted(tmp_path, "--compile")
    assert counters["stats"]["unique_graphs"] > frames  # it did compile (not a silent fallback to eager)
    assert_bit_exact(full, parts)
    assert parts["train_args"]["compile"] is True


def test_speed_flags_default_off_and_can_be_turned_off_on_resume():
    args = train.parse_args(["--out", "x", "--resume", "--no-compile", "--no-channels-last"])
    assert args.compile is False and args.channels_last is False
    assert {"compile", "channels_last"} <= args.explicit
    args = train.parse_args(["--arch", "pixelcnn", "--data", "synthetic", "--out", "x"])
    assert args.compile is False and args.channels_last is False and not args.explicit & {"compile", "channels_last"}


# ---------------------------------------------------------------------------- the benchmark

def test_bench_quick_writes_the_json(tmp_path, capsys):
    out = tmp_path / "training.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "training" and data["config"]["quick"] is True
    for key in ("cpu_count", "load_average_1_5_15", "torch", "malloc_env_set"):
        assert key in data["machine"]
    assert len(data["load_average_after"]) == 3 and data["data_loading"]["ms_per_batch"]["median"] > 0
    assert set(data["results"]) == {c.name for c in bench.QUICK_CONFIGS}
    for r in data["results"].values():
        assert set(r["variants"]) >= {"before"} and r["fastest"] in r["variants"] and r["fastest"] != "before"
        assert len(r["load_average_1_5_15"]) == 3
        for name, v in r["variants"].items():
            assert len(v["runs"]) == data["config"]["repeats"] == 2  # the same number of windows each
            assert v["images_per_s"]["min"] <= v["images_per_s"]["median"] <= v["images_per_s"]["max"]
            assert v["first_step_seconds"] > 0 and v["timed_steps"] >= 2
            if name != "before":
                ratio = v["images_per_s"]["median"] / r["variants"]["before"]["images_per_s"]["median"]
                assert v["speedup"] == pytest.approx(ratio, rel=1e-2)
                assert set(v["paired_ratio"]) == {"median", "min", "max"}
        assert r["speedup"] == r["variants"][r["fastest"]]["speedup"]
    targets = data["targets"]
    assert set(targets) == {"pixelcnn", "gated_pixelcnn", "diagonal_bilstm"}
    for arch, t in targets.items():
        assert t["status"] in ("met", "not met") and t["target"] == bench.TARGETS[arch]
        assert t["summary"].startswith(t["status"])
    assert "target diagonal_bilstm" in capsys.readouterr().out


def test_bench_rejects_unknown_configs():
    with pytest.raises(SystemExit):
        bench.parse_args(["--configs", "nope"])
