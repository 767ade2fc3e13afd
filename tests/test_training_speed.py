"""The training speed code computes what its plain formulation does: the Diagonal BiLSTM's
recursion over in-image pixels (both directions in one loop) against the diagonal LSTM's
equations run pixel by pixel, the PixelCNN's cropped kernels against the full masked
convolution, and the --channels-last / --compile options against the plain step, on the same
batch and weights: outputs and every gradient to 1e-5 (the loss in nats per sub-pixel, as
training.train optimizes it). Then resumes with the options stay bit-exact, and
`bench.training --quick` writes its JSON."""
from __future__ import annotations

import json

import pytest
import torch

from bench import training as bench
from pixelrnn.training import train
from pixelrnn.training.checkpoint import load_checkpoint
from pixelrnn.training.masks import MaskedConv2d
from pixelrnn.training.models import build_model
from pixelrnn.training.models.diagonal_bilstm import DiagonalLSTM, diagonal_order, run_diagonal_lstms
from pixelrnn.training.models.pixelcnn import masked_conv_upper

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


def loss_and_grads(model, x, y=None):
    """The training loss (nats per sub-pixel) and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
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


def outputs_and_grads(fn, x: torch.Tensor, params: list[torch.Tensor]):
    """fn(x) and the gradients of a fixed random projection of it with respect to x and params."""
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    grads = torch.autograd.grad((out * weight).sum(), [x, *params])
    return out.detach(), grads


def assert_close_with_grads(a, b, **tol):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a, out_b, **(tol or TOL))
    for k, (u, v) in enumerate(zip(grads_a, grads_b)):
        torch.testing.assert_close(u, v, **(tol or TOL), msg=lambda m, k=k: f"gradient {k}: {m}")


# ---------------------------------------------------------------------------- Diagonal BiLSTM

def diagonal_lstm_by_pixel(lstm: DiagonalLSTM, x: torch.Tensor) -> torch.Tensor:
    """One left-to-right diagonal LSTM from its equations, pixel by pixel in raster order: pixel
    (i, j) reads the hidden state of the pixel above, (i-1, j), through state-to-state tap 0 and
    that of its left neighbour, (i, j-1), through tap 1, and carries the left neighbour's cell;
    zeros outside the image. Gates in o, f, i, g order. (B, h, H, W) -> (B, h, H, W)."""
    x_is = lstm.input_to_state(x)  # the masked 1x1 input-to-state convolution, (B, 4h, H, W)
    b, _, height, width = x.shape
    w_above, w_left = lstm.state_to_state.weight.unbind(2)  # (4h, h) each
    zero = x.new_zeros(b, lstm.hidden)
    h = [[zero] * width for _ in range(height)]
    c = [[zero] * width for _ in range(height)]
    for i in range(height):
        for j in range(width):
            above = h[i - 1][j] if i else zero
            left_h, left_c = (h[i][j - 1], c[i][j - 1]) if j else (zero, zero)
            gates = x_is[:, :, i, j] + above @ w_above.t() + left_h @ w_left.t()
            o, f, g_in, g = gates.split(lstm.hidden, dim=1)
            c[i][j] = torch.sigmoid(f) * left_c + torch.sigmoid(g_in) * torch.tanh(g)
            h[i][j] = torch.sigmoid(o) * torch.tanh(c[i][j])
    return torch.stack([torch.stack(row, dim=2) for row in h], dim=2)


@pytest.mark.parametrize("height, width, hidden, groups", [
    (6, 6, 6, 1),
    (4, 9, 6, 1),  # wider than tall: skewed columns run past the image on both sides
    (9, 3, 6, 1),  # taller than wide
    (5, 4, 6, 3),  # colour groups in the gates
    (1, 5, 3, 1),  # one row
])
def test_diagonal_lstms_equal_their_equations_pixel_by_pixel(height, width, hidden, groups):
    """Both directions in one loop (run_diagonal_lstms, as the BiLSTM layer runs them): the
    left-to-right LSTM on the image, the right-to-left one on the mirrored image, mirrored back."""
    torch.manual_seed(0)
    ltr, rtl = DiagonalLSTM(hidden, groups), DiagonalLSTM(hidden, groups)
    with torch.no_grad():
        for p in [*ltr.parameters(), *rtl.parameters()]:
            p.mul_(2.0)
    params = [*ltr.parameters(), *rtl.parameters()]
    x = torch.randn(2, hidden, height, width)

    def fast(x):
        return torch.cat(run_diagonal_lstms(x, [ltr, rtl], [0, 1]), dim=1)

    def plain(x):
        return torch.cat([diagonal_lstm_by_pixel(ltr, x), diagonal_lstm_by_pixel(rtl, x.flip(3)).flip(3)], dim=1)

    assert_close_with_grads(outputs_and_grads(fast, x, params), outputs_and_grads(plain, x, params))
    # In float64 the two agree to rounding: the same arithmetic, not an approximation.
    ltr, rtl, x = ltr.double(), rtl.double(), x.double()
    params = [*ltr.parameters(), *rtl.parameters()]
    assert_close_with_grads(outputs_and_grads(fast, x, params), outputs_and_grads(plain, x, params), rtol=1e-10, atol=1e-12)


def test_a_wrong_tap_is_caught_by_the_pixel_by_pixel_equations():
    """The comparison can fail: the state-to-state taps swapped (above read as left) differ."""
    torch.manual_seed(0)
    lstm = DiagonalLSTM(6, 1)
    x = torch.randn(2, 6, 4, 5)
    swapped = DiagonalLSTM(6, 1)
    swapped.load_state_dict(lstm.state_dict())
    with torch.no_grad():
        swapped.state_to_state.weight.copy_(lstm.state_to_state.weight.flip(2))
    assert not torch.allclose(lstm(x), diagonal_lstm_by_pixel(swapped, x), **TOL)
    torch.testing.assert_close(lstm(x), diagonal_lstm_by_pixel(lstm, x), **TOL)


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


# ---------------------------------------------------------------------------- PixelCNN

@pytest.mark.parametrize("channels, kernel, mask, groups, height, width", [
    (6, 3, "B", 1, 7, 5),
    (6, 3, "B", 3, 5, 4),  # colour groups
    (1, 7, "A", 1, 7, 5),  # the input convolution
    (3, 7, "A", 3, 6, 6),
    (1, 3, "A", 1, 1, 4),  # one row: every row below the centre falls outside
])
def test_cropped_masked_convolution_equals_the_full_masked_convolution(channels, kernel, mask, groups, height, width):
    """masked_conv_upper (the kernel rows below the centre left out) against MaskedConv2d itself,
    the convolution with the whole masked kernel: output and the gradients of input, weight, bias."""
    torch.manual_seed(0)
    conv = MaskedConv2d(channels, 6, kernel, mask, colour_groups=groups)
    x = torch.randn(2, channels, height, width)
    params = [conv.weight, conv.bias]
    assert_close_with_grads(outputs_and_grads(lambda x: masked_conv_upper(conv, x), x, params),
                            outputs_and_grads(conv, x, params))


@pytest.mark.parametrize("c, levels, input_kernel", [(1, 2, 7), (3, 4, 7), (1, 256, 3)])
def test_pixelcnn_loss_equals_the_one_through_full_masked_convolutions(c, levels, input_kernel, monkeypatch):
    """The whole model: its loss and gradients with every convolution as MaskedConv2d computes it."""
    model = make("pixelcnn", c, 7, 5, levels, hidden=6, layers=2, input_kernel=input_kernel)
    x, _ = batch(model)
    fast = loss_and_grads(model, x)
    monkeypatch.setattr("pixelrnn.training.models.pixelcnn.masked_conv_upper", lambda conv, x: conv(x))
    assert_same(fast, loss_and_grads(model, x))


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
    reference = tmp_path / "reference.json"
    recorded = {"code_commit": "abc1234", "date": "2026-01-01T00:00:00+00:00",
                "results": {"row_lstm_quick": {"images_per_s": {"median": 1e-3, "min": 1e-3, "max": 1e-3}}}}
    reference.write_text(json.dumps({"reference_before": recorded}))
    assert bench.main(["--quick", "--json", str(out), "--reference", str(reference)]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "training" and data["config"]["quick"] is True and "model" not in data
    for key in ("date", "cpu", "cpu_count", "load_average_1_5_15", "torch", "malloc_env_set"):
        assert key in data["machine"]
    assert len(data["load_average_after"]) == 3 and data["data_loading"]["ms_per_batch"]["median"] > 0
    assert set(data["results"]) == {c.name for c in bench.QUICK_CONFIGS}
    for name, r in data["results"].items():
        assert "eager" in r["variants"] and r["fastest"] in r["variants"] and len(r["load_average_1_5_15"]) == 3
        fastest = r["variants"][r["fastest"]]["images_per_s"]["median"]
        assert all(v["images_per_s"]["median"] <= fastest for v in r["variants"].values())
        for variant, v in r["variants"].items():
            assert len(v["runs"]) == data["config"]["repeats"] == 2  # the same number of windows each
            assert v["images_per_s"]["min"] <= v["images_per_s"]["median"] <= v["images_per_s"]["max"]
            assert v["first_step_seconds"] > 0 and v["timed_steps"] >= 2
            if variant != "eager":
                ratio = v["images_per_s"]["median"] / r["variants"]["eager"]["images_per_s"]["median"]
                assert v["vs_eager"] == pytest.approx(ratio, rel=1e-2)
                assert set(v["paired_ratio_vs_eager"]) == {"median", "min", "max"}
    # The recorded figures of the code before are carried over, and a configuration that has one
    # is set against it; the others are not.
    assert data["reference_before"] == recorded
    r = data["results"]["row_lstm_quick"]
    assert r["vs_reference_before"] == pytest.approx(r["variants"][r["fastest"]]["images_per_s"]["median"] / 1e-3, rel=1e-2)
    assert all("vs_reference_before" not in r for name, r in data["results"].items() if name != "row_lstm_quick")
    targets = data["targets"]
    assert set(targets) == set(bench.TARGETS)
    for arch, t in targets.items():  # none of the target architectures has a reference figure here
        assert t["status"] == "no reference" and t["target"] == bench.TARGETS[arch]
    assert "target diagonal_bilstm" in capsys.readouterr().out


def test_targets_judge_the_fastest_variants_against_the_recorded_code_before():
    results = {"a": {"arch": "pixelcnn", "fastest": "compile", "vs_reference_before": 1.6},
               "b": {"arch": "pixelcnn", "fastest": "eager", "vs_reference_before": 1.2},
               "c": {"arch": "diagonal_bilstm", "fastest": "eager", "vs_reference_before": 5.0},
               "d": {"arch": "gated_pixelcnn", "fastest": "eager"}}
    t = bench.targets(results)
    assert t["pixelcnn"]["status"] == "not met" and t["pixelcnn"]["worst_speedup"] == 1.2
    assert t["diagonal_bilstm"]["status"] == "met" and t["diagonal_bilstm"]["summary"].startswith("met: 5.00x")
    assert t["gated_pixelcnn"]["status"] == "no reference"


def test_the_committed_result_records_the_code_before():
    """bench/results/training.json keeps the figures of the code before the speed changes, which
    this bench no longer runs: per configuration, with the commit of that code and the date."""
    ref = json.loads(bench.REFERENCE.read_text())["reference_before"]
    assert ref["code_commit"] and ref["date"].startswith("20") and ref["machine"]["cpu_count"]
    assert {c.name for c in bench.CONFIGS} <= set(ref["results"])
    assert all(r["images_per_s"]["median"] > 0 for r in ref["results"].values())


def test_bench_rejects_unknown_configs():
    with pytest.raises(SystemExit):
        bench.parse_args(["--configs", "nope"])
