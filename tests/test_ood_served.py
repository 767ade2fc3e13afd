"""The out-of-distribution detector through a real tritonserver: build_engine --background
writes the background scorer and NAME_ood, whose scores equal the in-process ones
(runtime/ood.py over training/ood.py), with its threshold calibrated on validation images."""
import json

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from pixelrnn.export import build_engine
from pixelrnn.runtime import ood
from pixelrnn.runtime import protocol as p
from pixelrnn.runtime.datasets import load
from pixelrnn.training.checkpoint import save_checkpoint
from pixelrnn.training.models import build_model
from pixelrnn.training.ood import image_nll
from tests.deployment import require, serve

grpc = require("tritonclient.grpc")
model_config_pb2 = require("tritonclient.grpc.model_config_pb2")
DATA = {"name": "synthetic", "size": 6, "bits": 2, "count": 40}
FOREGROUND = ("gated_pixelcnn", dict(in_channels=1, height=6, width=6, levels=4, num_classes=3, hidden=6, layers=1, kernel=3))
BACKGROUND = ("pixelcnn", dict(in_channels=1, height=6, width=6, levels=4, hidden=6, layers=1))


def checkpoint(path, arch, config, seed):
    torch.manual_seed(seed)
    save_checkpoint(path, {"arch": arch, "config": dict(config), "model": build_model(arch, dict(config)).state_dict(),
                           "step": 1, "data": DATA})
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("ood")
    fg, bg = checkpoint(root / "fg.pt", *FOREGROUND, 1), checkpoint(root / "bg.pt", *BACKGROUND, 2)
    code = build_engine.main(["--checkpoint", str(fg), "--name", "fg", "--out", str(root / "build" / "fg"), "--tensorrt", "off",
                              "--max-batch", "8", "--repository", str(root / "repository"), "--background", str(bg),
                              "--calibration-images", "0", "--ood-fpr", "0.1"])
    assert code == 0
    return root


def test_the_repository_holds_the_background_scorer_and_the_detector(exported):
    repo = exported / "repository"
    assert sorted(d.name for d in repo.iterdir() if not d.name.startswith(".")) == [
        "fg_background_score", "fg_ood", "fg_sample", "fg_score"]
    carried = {str(f.relative_to(repo / "fg_ood" / "1")) for f in (repo / "fg_ood" / "1").rglob("*.py")}
    assert "pixelrnn/runtime/ood.py" in carried and not any("server/engine" in f for f in carried)
    # Grey images too in the one layout, required, as the scorers take them.
    config = text_format.Parse((repo / "fg_ood" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert [(i.name, list(i.dims), i.optional) for i in config.input] == [(p.IMAGES, [1, 6, 6], False)]


def served_threshold(repo) -> ood.Threshold:
    text = (repo / "fg_ood" / "config.pbtxt").read_text()
    raw = text.split('key: "threshold" value: { string_value: ')[1].split(" }")[0]
    return ood.Threshold.from_json(json.loads(json.loads(raw)))


def test_the_threshold_is_calibrated_on_validation_images_only(exported):
    from pixelrnn.training.checkpoint import load_model
    fg, _ = load_model(exported / "fg.pt")
    bg, _ = load_model(exported / "bg.pt")
    valid = load(DATA, "valid").images
    values = ood.scores(image_nll(fg, valid), valid, 4, image_nll(bg, valid))["llr"]
    assert served_threshold(exported / "repository") == ood.Threshold.calibrate("llr", values, 0.1)


@pytest.mark.triton
def test_served_scores_equal_the_in_process_ones(exported, tmp_path):
    from pixelrnn.training.checkpoint import load_model
    fg, _ = load_model(exported / "fg.pt")
    bg, _ = load_model(exported / "bg.pt")
    rng = np.random.default_rng(0)
    images = np.concatenate([load(DATA, "test").images[:5], rng.integers(0, 4, (3, 1, 6, 6)).astype(np.uint8)])
    want = ood.scores(image_nll(fg, images), images, 4, image_nll(bg, images))
    threshold = served_threshold(exported / "repository")
    with serve(exported / "repository", tmp_path / "triton.log") as server:
        client = grpc.InferenceServerClient(server.grpc_url)
        request = grpc.InferInput(p.IMAGES, list(images.shape), "UINT8")
        request.set_data_from_numpy(images)
        result = client.infer(p.detect_model("fg"), [request])
        got = {name: result.as_numpy(name)[:, 0] for name in (p.NLL_NATS, p.BACKGROUND_NLL_NATS, p.LLR, p.COMPLEXITY, p.OOD)}
        bad = grpc.InferInput(p.IMAGES, [1, 1, 6, 6], "UINT8")
        bad.set_data_from_numpy(np.full((1, 1, 6, 6), 4, np.uint8))
        with pytest.raises(Exception, match=r"IMAGES values must be in \[0, 4\)"):
            client.infer(p.detect_model("fg"), [bad])
        hw = grpc.InferInput("IMAGES_HW", [1, 6, 6], "UINT8")  # grey images as N x H x W: no such input
        hw.set_data_from_numpy(np.zeros((1, 6, 6), np.uint8))
        with pytest.raises(Exception, match=r"unexpected inference input 'IMAGES_HW' for model 'fg_ood'"):
            client.infer(p.detect_model("fg"), [hw])
        again = client.infer(p.detect_model("fg"), [request])  # the server goes on serving
        assert np.array_equal(again.as_numpy(p.OOD)[:, 0], got[p.OOD])
    assert np.allclose(got[p.NLL_NATS], want["nll"], atol=1e-3)
    assert np.allclose(got[p.LLR], want["llr"], atol=1e-3) and np.allclose(got[p.COMPLEXITY], want["complexity"], atol=1e-3)
    assert np.array_equal(got[p.OOD], threshold.flags(want["llr"]))


@pytest.mark.triton
def test_the_client_library_and_cli_ask_the_detector_and_the_per_pixel_map(exported, tmp_path):
    from pixelrnn.client import ClientError, PixelClient
    from pixelrnn.client.cli import main as cli
    from pixelrnn.training.checkpoint import load_model

    fg, _ = load_model(exported / "fg.pt")
    images = load(DATA, "test").images[:6]
    np.save(tmp_path / "images.npy", images)
    labels = np.arange(6) % 3
    with serve(exported / "repository", tmp_path / "triton.log") as server:
        with PixelClient(server.grpc_url, model="fg") as client:
            verdict = client.ood(images)
            scores = client.score(images, labels, per_pixel=True)
            plain = client.score(images, labels)
        with PixelClient(server.grpc_url, model="fg_background") as client:
            with pytest.raises(ClientError, match="has no out-of-distribution detector .*export with --background"):
                client.ood(images)
        code = cli(["ood", "--url", server.grpc_url, "--model", "fg", str(tmp_path / "images.npy"), "--json", str(tmp_path / "ood.json")])
        assert code == 0
        code = cli(["score", "--url", server.grpc_url, "--model", "fg", "--label", "1", str(tmp_path / "images.npy"),
                    "--per-pixel", str(tmp_path / "maps"), "--json"])
        assert code == 0
    with torch.no_grad():
        want_pixel = fg.pixel_nll(torch.from_numpy(images).long(), torch.as_tensor(labels)).numpy()
    assert verdict.ood.dtype == bool and verdict.llr.shape == (6,)
    assert np.allclose(verdict.llr, verdict.nll_nats - verdict.background_nll_nats, atol=1e-4)
    assert scores.pixel_nll.shape == images.shape and np.allclose(scores.pixel_nll, want_pixel, atol=1e-4)
    assert np.allclose(scores.pixel_nll.reshape(6, -1).sum(1), scores.nll_nats, atol=1e-3) and plain.pixel_nll is None
    report = json.loads((tmp_path / "ood.json").read_text())
    assert [r["verdict"] == "out" for r in report["images"]] == verdict.ood.tolist()
    assert np.allclose([r["llr"] for r in report["images"]], verdict.llr, atol=1e-4)
    maps = sorted((tmp_path / "maps").glob("*.png"))
    assert len(maps) == 6 and all(m.stat().st_size > 0 for m in maps)


def test_a_background_that_does_not_fit_is_refused_in_one_line(exported, tmp_path, capsys):
    other = checkpoint(tmp_path / "other.pt", "pixelcnn", dict(BACKGROUND[1], levels=2), 3)
    code = build_engine.main(["--checkpoint", str(exported / "fg.pt"), "--name", "fg", "--out", str(tmp_path / "fg"),
                              "--tensorrt", "off", "--repository", str(tmp_path / "repo"), "--background", str(other)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "has levels 2" in err and "cannot score the same images" in err
    with pytest.raises(SystemExit):
        build_engine.main(["--checkpoint", str(exported / "fg.pt"), "--background", str(other)])
    assert "--background needs --repository" in capsys.readouterr().err
