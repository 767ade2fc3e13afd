"""The ensemble (training/models/ensemble.py): causal, its conditionals the mean of its members',
its row cell equal to its forward, the same image from every sampler, and checkpoints built from
trained members with clear errors for misfits."""
import json

import numpy as np
import pytest
import torch

from pixelrnn.export.cells import build_cell, sample_cached, teacher_forced_logits
from pixelrnn.training import ensemble as builder
from pixelrnn.training import evaluate, train
from pixelrnn.training.causality import check_model
from pixelrnn.training.checkpoint import load_checkpoint, load_model
from pixelrnn.training.models import build_model
from pixelrnn.training.sample import sample_reference

PIXELCNN = {"arch": "pixelcnn", "config": dict(hidden=6, layers=2, input_kernel=3)}
ROW_LSTM = {"arch": "row_lstm", "config": dict(hidden=6, layers=1)}
DIAGONAL = {"arch": "diagonal_bilstm", "config": dict(hidden=6, layers=1)}
GATED = {"arch": "gated_pixelcnn", "config": dict(hidden=6, layers=2, kernel=3)}


def ensemble(channels=1, levels=2, members=(PIXELCNN, ROW_LSTM), classes=0, size=5):
    torch.manual_seed(0)
    return build_model("ensemble", dict(in_channels=channels, height=size, width=size, levels=levels,
                                        num_classes=classes, members=list(members))).eval()


def images(model, n=6, seed=1):
    c = model.config
    return torch.from_numpy(np.random.default_rng(seed).integers(0, c.levels, (n, c.in_channels, c.height, c.width)))


@pytest.mark.parametrize("channels, levels, members", [
    (1, 2, (PIXELCNN, ROW_LSTM)), (3, 4, (PIXELCNN, DIAGONAL)), (1, 256, (GATED, ROW_LSTM, PIXELCNN))])
def test_the_ensemble_is_causal(channels, levels, members):
    if channels == 3:
        members = [{"arch": m["arch"], "config": dict(m["config"], hidden=6)} for m in members]
    model = ensemble(channels, levels, members)
    report = check_model(model, channels, 5, 5, levels)
    assert report.ok, report.describe()


@pytest.mark.parametrize("levels", [2, 4])
def test_each_conditional_is_the_mean_of_the_members(levels):
    model = ensemble(levels=levels)
    x = images(model)
    with torch.no_grad():
        members = torch.stack([torch.exp(-m.pixel_nll(x)) for m in model.members])  # p of each observed sub-pixel
        want = -torch.log(members.double().mean(0))
        got = model.pixel_nll(x).double()
        twice = build_model("ensemble", dict(model.config.__dict__, members=[PIXELCNN, PIXELCNN]))
        twice.members[1].load_state_dict(twice.members[0].state_dict())
        alone = twice.members[0].nll(x)
        same = twice.nll(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.sum((1, 2, 3)), model.nll(x).double(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(same, alone, rtol=1e-5, atol=1e-4)  # an ensemble of one model twice is that model


@pytest.mark.parametrize("channels, levels, members, classes", [
    (1, 2, (GATED, DIAGONAL), 0), (3, 4, (PIXELCNN, ROW_LSTM), 0), (1, 2, (GATED, GATED), 3)])
def test_the_row_cell_reproduces_the_model_and_samples_the_same_image(channels, levels, members, classes):
    if classes:
        members = [GATED, {"arch": "gated_pixelcnn", "config": dict(hidden=3, layers=1, kernel=5)}]
    model = ensemble(channels, levels, members, classes)
    x = images(model, n=4)
    labels = torch.arange(4) % classes if classes else None
    cell = build_cell(model)
    assert len(cell.state_names) == len(set(cell.state_names))  # prefixed per member
    logits, logp = teacher_forced_logits(cell, x, labels)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x, labels), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logp, -model.nll(x, labels), rtol=1e-5, atol=1e-4)
    want = sample_reference(model, 4, seed=7, labels=labels)
    got = sample_cached(cell, 4, seed=7, labels=labels)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("members, message", [
    ([PIXELCNN], "at least 2 members"),
    ([PIXELCNN, {"arch": "multiscale", "config": {}}], "cannot be an ensemble member"),
    ([PIXELCNN, {"arch": "row_lstm", "config": dict(hidden=6, layers=1, levels=4)}], "levels 4 differs from the ensemble's 2"),
    ([PIXELCNN, {"arch": "row_lstm"}], "expected {'arch'"),
])
def test_bad_member_lists_are_refused_by_name(members, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("(", r"\(")):
        build_model("ensemble", dict(height=5, width=5, levels=2, members=members))


TINY = ["--data", "synthetic", "--data-arg", "size=6", "--data-arg", "count=32", "--bits", "1", "--batch-size", "16",
        "--valid-images", "16", "--threads", "1", "--steps", "4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("members")
    runs = {"pixelcnn": ["--hidden", "6", "--layers", "1", "--model-arg", "input_kernel=3"],
            "row_lstm": ["--hidden", "6", "--layers", "1"]}
    for arch, flags in runs.items():
        assert train.main(["--arch", arch, *TINY, *flags, "--out", str(root / arch)]) == 0
    assert train.main(["--arch", "pixelcnn", *TINY, "--data-arg", "size=8", "--hidden", "6", "--layers", "1",
                       "--out", str(root / "other_data")]) == 0
    return root


def test_built_from_checkpoints_it_evaluates_and_records_its_members(trained, tmp_path, capsys):
    out = tmp_path / "ensemble.pt"
    members = [trained / "pixelcnn" / "last.pt", trained / "row_lstm" / "last.pt"]
    assert builder.main([*map(str, members), "--out", str(out)]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt["arch"] == "ensemble" and [m["arch"] for m in ckpt["members"]] == ["pixelcnn", "row_lstm"]
    assert ckpt["data"] == load_checkpoint(members[0])["data"] and ckpt["optimizer"] is None
    assert ckpt["hours"] == pytest.approx(sum(load_checkpoint(m)["hours"] for m in members))
    model, _ = load_model(out)
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 2, (3, 1, 6, 6)))
    with torch.no_grad():
        want = -torch.log(torch.stack([torch.exp(-load_model(m)[0].nll(x).double()) for m in members]).mean(0))
        # The image-level mixture bounds nothing here; the per-pixel average is what is built:
        per_pixel = -torch.log(torch.stack([torch.exp(-load_model(m)[0].pixel_nll(x).double()) for m in members]).mean(0))
    torch.testing.assert_close(model.nll(x).double(), per_pixel.sum((1, 2, 3)), rtol=1e-5, atol=1e-4)
    assert not torch.allclose(model.nll(x).double(), want)  # and it is not the image-level mixture
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(out), "--limit", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["n_images"] == 8


def test_the_builder_refuses_misfits_in_one_line(trained, tmp_path, capsys):
    out = tmp_path / "never.pt"
    assert builder.main([str(trained / "pixelcnn" / "last.pt"), str(trained / "other_data" / "last.pt"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the members of an ensemble model the same data" in err and err.count("\n") == 1
    assert builder.main([str(trained / "pixelcnn" / "last.pt"), "--out", str(out)]) == 2
    assert "at least 2 checkpoints" in capsys.readouterr().err
    assert builder.main([str(trained / "pixelcnn" / "last.pt"), str(tmp_path / "missing.pt"), "--out", str(out)]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert not out.exists()


def test_the_trainer_does_not_offer_it(capsys):
    with pytest.raises(SystemExit):
        train.main(["--arch", "ensemble", "--data", "synthetic", "--out", "x"])
    assert "invalid choice: 'ensemble'" in capsys.readouterr().err


@pytest.mark.parametrize("levels", [2, 4])
def test_the_average_exports_exactly_for_confident_members(levels, tmp_path):
    """Trained members are confident (logits of +-15 and more): the exported average must not go
    through an approximate sigmoid (onnxruntime's was 8e-3 off in the log of tiny probabilities)."""
    import onnxruntime

    from pixelrnn.training.distributions import average_conditionals

    class Average(torch.nn.Module):
        def forward(self, a, b):
            return average_conditionals([a, b], levels, dim=1)

    k = 1 if levels == 2 else levels
    a, b = (torch.linspace(-30, 30, 240).reshape(-1, k)[torch.randperm(240 // k)] for _ in range(2))
    path = tmp_path / "average.onnx"
    torch.onnx.export(Average(), (a, b), str(path), input_names=["a", "b"], output_names=["out"], dynamo=False)
    got = onnxruntime.InferenceSession(str(path)).run(None, {"a": a.numpy(), "b": b.numpy()})[0]
    np.testing.assert_allclose(got, Average()(a, b).numpy(), rtol=0, atol=1e-4)


def test_the_bench_compares_the_ensemble_with_its_members_and_their_mixture(trained, tmp_path, capsys):
    from bench import ensembles

    out = tmp_path / "ensemble.pt"
    members = [trained / "pixelcnn" / "last.pt", trained / "row_lstm" / "last.pt"]
    assert builder.main([*map(str, members), "--out", str(out)]) == 0
    assert ensembles.main([str(out), "--json", str(tmp_path / "e.json")]) == 0
    r = json.loads((tmp_path / "e.json").read_text())["results"]["ensemble"]
    assert [m["arch"] for m in r["members"]] == ["pixelcnn", "row_lstm"]
    model, _ = load_model(out)
    from pixelrnn.runtime.datasets import load

    split = load(load_checkpoint(out)["data"], "valid")
    with torch.no_grad():
        x = torch.from_numpy(split.images).long()
        assert r["ensemble_nll_nats"] == pytest.approx(float(model.nll(x).mean()), abs=1e-3)
        alone = [float(m.nll(x).mean()) for m in model.members]
    assert [m["valid_nll_nats"] for m in r["members"]] == pytest.approx(alone, abs=1e-3)
    # A mixture of whole images is within log(2) of its best member per image, so on average too.
    assert r["mixture_nll_nats"] <= min(alone) + np.log(2) + 1e-6
    assert ensembles.main([str(members[0]), "--json", str(tmp_path / "x.json")]) == 2
    assert "is not an ensemble" in capsys.readouterr().err
