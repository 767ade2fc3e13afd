"""Deepening a trained Row LSTM / Diagonal BiLSTM: the same function at first, then trainable layers."""
from __future__ import annotations

import pytest
import torch

from pixelrnn.training import train
from pixelrnn.training.causality import check_model
from pixelrnn.training.checkpoint import load_checkpoint, load_model
from pixelrnn.training.models import build_model
from pixelrnn.training.models.pixelrnn import deepen


def trained(arch: str, c: int = 1, levels: int = 2):
    torch.manual_seed(0)
    model = build_model(arch, dict(in_channels=c, height=6, width=6, levels=levels, hidden=6 * c, layers=1))
    with torch.no_grad():  # weights away from their initial values, so that nothing matches by accident
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("arch,c,levels", [("row_lstm", 1, 2), ("diagonal_bilstm", 1, 2), ("row_lstm", 3, 4)])
def test_deepened_model_computes_the_same_function_and_stays_causal(arch, c, levels):
    model = trained(arch, c, levels)
    deeper = deepen(model, 3).eval()
    assert deeper.config.layers == 3 and len(deeper.layers) == 3
    x = torch.randint(0, levels, (4, c, 6, 6)).float()
    assert torch.equal(model(x), deeper(x))
    for layer in deeper.layers[1:]:  # the new layers are real layers with their own LSTM weights
        assert layer.residual.weight.abs().sum() == 0 and any(p.abs().sum() > 0 for p in layer.parameters())
    report = check_model(deeper, c, 6, 6, levels)
    assert report.ok, report.describe()


def test_the_new_layers_learn():
    model = trained("row_lstm")
    deeper = deepen(model, 2).train()
    x = torch.randint(0, 2, (8, 1, 6, 6)).float()
    deeper.nll(x).mean().backward()
    assert deeper.layers[1].residual.weight.grad.abs().sum() > 0


def test_deepen_asks_for_more_layers():
    with pytest.raises(ValueError, match="has 1 layers already"):
        deepen(trained("row_lstm"), 1)


TINY = ["--data", "synthetic", "--data-arg", "size=6", "--data-arg", "count=32", "--bits", "1", "--batch-size", "8",
        "--valid-images", "16", "--threads", "1"]


def test_init_from_with_more_layers_starts_a_deeper_run(tmp_path, capsys):
    """--init-from CKPT --layers N: the run's model is CKPT's deepened, with CKPT's NLL at step 0;
    a width change or a PixelCNN to deepen is a one-line error."""
    source = tmp_path / "source"
    assert train.main(["--arch", "row_lstm", "--hidden", "6", "--layers", "1", "--out", str(source), "--steps", "2", *TINY]) == 0
    deeper = tmp_path / "deeper"
    assert train.main(["--init-from", str(source / "last.pt"), "--layers", "3", "--out", str(deeper), "--steps", "0", *TINY]) == 0
    ckpt = load_checkpoint(deeper / "last.pt")
    assert ckpt["config"]["layers"] == 3 and ckpt["step"] == 0
    x = torch.randint(0, 2, (4, 1, 6, 6)).float()
    assert torch.equal(load_model(source / "last.pt")[0](x), load_model(deeper / "last.pt")[0](x))
    assert ckpt["metrics"]["nll_nats"] == pytest.approx(load_checkpoint(source / "last.pt")["metrics"]["nll_nats"], abs=1e-4)
    capsys.readouterr()
    assert train.main(["--init-from", str(source / "last.pt"), "--hidden", "12", "--out", str(tmp_path / "w"), "--steps", "1", *TINY]) == 2
    assert "--hidden 12 differs" in capsys.readouterr().err
    pcnn = tmp_path / "pcnn"
    assert train.main(["--arch", "pixelcnn", "--hidden", "6", "--layers", "1", "--model-arg", "input_kernel=3",
                       "--out", str(pcnn), "--steps", "1", *TINY]) == 0
    capsys.readouterr()
    assert train.main(["--init-from", str(pcnn / "last.pt"), "--layers", "2", "--out", str(tmp_path / "p"), "--steps", "1", *TINY]) == 2
    assert "only a Row LSTM or Diagonal BiLSTM can be deepened" in capsys.readouterr().err


def test_init_from_takes_model_args_that_keep_the_weights(tmp_path, capsys):
    """--init-from with --model-arg dropout=P: the same weights under a new config; a field that
    changes the weights' shapes is a one-line error naming the mismatch."""
    source = tmp_path / "gated"
    assert train.main(["--arch", "gated_pixelcnn", "--hidden", "6", "--layers", "1", "--model-arg", "kernel=3",
                       "--out", str(source), "--steps", "1", *TINY]) == 0
    cycle = tmp_path / "cycle"
    assert train.main(["--init-from", str(source / "last.pt"), "--model-arg", "dropout=0.2", "--out", str(cycle),
                       "--steps", "0", *TINY]) == 0
    ckpt = load_checkpoint(cycle / "last.pt")
    assert ckpt["config"]["dropout"] == 0.2
    for key, value in load_checkpoint(source / "last.pt")["model"].items():
        assert torch.equal(ckpt["model"][key], value), key
    capsys.readouterr()
    assert train.main(["--init-from", str(source / "last.pt"), "--model-arg", "kernel=5", "--out", str(tmp_path / "k"),
                       "--steps", "1", *TINY]) == 2
    assert "does not match the weights" in capsys.readouterr().err
