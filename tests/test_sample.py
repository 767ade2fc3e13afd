"""Reference sampler, PNG grids and the sampling CLI."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pixelrnn.export import sample
from pixelrnn.runtime import images
from pixelrnn.runtime.images import grid_array, load_images, save_grid, to_display
from pixelrnn.runtime.randomness import sampling_rng
from pixelrnn.training import distributions
from pixelrnn.training import sample as reference
from pixelrnn.training.checkpoint import save_checkpoint
from pixelrnn.training.models import ARCHITECTURES, build_model
from pixelrnn.training.sample import sample_reference


def tiny(channels=1, levels=2, size=5, **fields):
    torch.manual_seed(1)
    hidden = 6 if channels == 3 else 4
    return build_model("pixelcnn", dict(in_channels=channels, height=size, width=size, levels=levels,
                                        hidden=hidden, layers=1, input_kernel=3, **fields))


@pytest.fixture(params=[(1, 2), (3, 4)], ids=["grey-binary", "rgb-4-levels"])
def model(request):
    return tiny(*request.param)


def test_deterministic_under_seed(model):
    a = sample_reference(model, 3, seed=7)
    assert a.dtype == np.uint8 and a.shape == (3, model.config.in_channels, 5, 5)
    assert a.max() < model.config.levels
    assert np.array_equal(a, sample_reference(model, 3, seed=7))
    assert not np.array_equal(a, sample_reference(model, 3, seed=8))


def test_temperature_zero_is_argmax(model):
    x = sample_reference(model, 2, seed=0, temperature=0)
    assert np.array_equal(x, sample_reference(model, 2, seed=99, temperature=0))  # no randomness left
    with torch.no_grad():
        logits = model(torch.as_tensor(x).long())  # (B, C, K, H, W); causal, so these are the logits used
    greedy = (logits[:, :, 0] > 0).long() if model.config.levels == 2 else logits.argmax(dim=2)
    assert np.array_equal(greedy.numpy(), x)


def test_completion_keeps_known_rows_and_the_stream(model):
    full = sample_reference(model, 4, seed=3)
    known = np.roll(full, 1, axis=0)  # different images as the known part
    done = sample_reference(model, 4, seed=3, known=known, known_rows=2)
    assert np.array_equal(done[:, :, :2], known[:, :, :2])
    # Known rows still consume their uniforms: completing a sample from its own first rows with
    # the same seed reproduces that sample exactly.
    for rows in (1, 3, 5):
        assert np.array_equal(sample_reference(model, 4, seed=3, known=full, known_rows=rows), full)


def test_sampler_feeds_integer_levels_like_training(model):
    """Record every forward call: the inputs are raw integer levels (what training feeds), and the
    logits the sampler saw equal model(final image) at each sub-pixel."""
    calls = []
    forward = model.forward

    def recording(x, labels=None):
        out = forward(x, labels)
        calls.append((x.clone(), out.clone()))
        return out

    model.forward = recording
    x = sample_reference(model, 2, seed=5)
    del model.forward
    c, h, w = x.shape[1:]
    assert len(calls) == c * h * w
    final = torch.as_tensor(x).long()
    with torch.no_grad():
        reference = model(final)
    order = [(i, j, ch) for i in range(h) for j in range(w) for ch in range(c)]
    for t, (i, j, ch) in enumerate(order):
        seen, logits = calls[t]
        assert not seen.is_floating_point() and seen.min() >= 0 and seen.max() < model.config.levels
        flat = seen.flatten(2)[:, :, : i * w + j]  # everything before this pixel
        assert torch.equal(flat, final.flatten(2)[:, :, : i * w + j])
        torch.testing.assert_close(logits[:, ch, :, i, j], reference[:, ch, :, i, j])
    # The training loss scores the same scale: nll == -sum log_prob of the same logits.
    nll = model.nll(final)
    torch.testing.assert_close(nll, -distributions.log_prob(reference, final, model.config.levels).flatten(1).sum(1))


def test_argument_checks(model):
    with pytest.raises(ValueError, match="known images"):
        sample_reference(model, 2, seed=0, known_rows=1)
    with pytest.raises(ValueError, match="known_rows"):
        sample_reference(model, 2, seed=0, known=np.zeros((2, model.config.in_channels, 5, 5)), known_rows=9)
    with pytest.raises(ValueError, match="temperature"):
        sample_reference(model, 1, seed=0, temperature=-1)


@pytest.mark.skipif("gated_pixelcnn" not in ARCHITECTURES, reason="gated_pixelcnn not in the registry yet")
def test_conditional_needs_and_uses_labels():
    torch.manual_seed(0)
    model = build_model("gated_pixelcnn", dict(in_channels=1, height=4, width=4, levels=2, num_classes=3, hidden=4, layers=1))
    with pytest.raises(ValueError, match="labels"):
        sample_reference(model, 2, seed=0)
    a = sample_reference(model, 2, seed=0, labels=[0, 1])
    assert np.array_equal(a, sample_reference(model, 2, seed=0, labels=np.array([0, 1])))
    assert sample_reference(model, 2, seed=0, labels=2).shape == (2, 1, 4, 4)


@pytest.mark.skipif("multiscale" not in ARCHITECTURES, reason="multiscale not in the registry yet")
def test_multiscale_samples_small_then_big():
    torch.manual_seed(0)
    model = build_model("multiscale", dict(in_channels=1, height=4, width=4, levels=2, factor=2, hidden=4, layers=1))
    x = sample_reference(model, 3, seed=2)
    assert x.shape == (3, 1, 4, 4) and np.array_equal(x, sample_reference(model, 3, seed=2))
    rng = sampling_rng(2)  # the small image uses the first rows of the stream
    small = reference._sample_single(model.small_model, 3, rng, 1.0, None, None, 0, False).numpy()
    assert np.array_equal(x[:, :, ::2, ::2], small)
    assert np.array_equal(sample_reference(model, 3, seed=2, known=x, known_rows=3), x)
    greedy = sample_reference(model, 2, seed=0, temperature=0)
    assert np.array_equal(greedy, sample_reference(model, 2, seed=1, temperature=0))


# ---------------------------------------------------------------------------- images

def test_grid_size_and_scaling(tmp_path):
    images = np.random.default_rng(0).integers(0, 4, (5, 3, 8, 6)).astype(np.uint8)
    path = save_grid(images, 4, tmp_path / "g.png", nrow=3)
    with Image.open(path) as img:
        assert img.mode == "RGB" and img.size == (3 * (6 + 2) + 2, 2 * (8 + 2) + 2)
        arr = np.asarray(img)
    assert np.array_equal(arr[2:10, 2:8].transpose(2, 0, 1), images[0].astype(int) * 85)
    grey = save_grid(np.ones((4, 1, 5, 5), np.uint8), 2, tmp_path / "grey.png")
    with Image.open(grey) as img:
        assert img.mode == "L" and img.size == (2 * 7 + 2, 2 * 7 + 2)
        assert np.asarray(img)[2:7, 2:7].min() == 255
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        to_display(np.full((1, 1, 2, 2), 2), 2)


def test_load_images_round_trip(tmp_path):
    images = np.random.default_rng(1).integers(0, 16, (2, 3, 4, 5)).astype(np.uint8)
    for k in range(2):
        save_grid(images[k:k + 1], 16, tmp_path / f"{k}.png", nrow=1, pad=0)
    np.save(tmp_path / "both.npy", images)
    np.save(tmp_path / "one.npy", images[0, 0])  # (H, W) -> one grey image
    loaded = load_images([tmp_path / "0.png", tmp_path / "1.png"], levels=16)
    assert loaded.shape == (2, 3, 4, 5) and np.array_equal(loaded, images)
    assert np.array_equal(load_images(tmp_path / "both.npy", levels=16), images)
    assert load_images(tmp_path / "0.png").max() == to_display(images[:1], 16).max()  # raw 0..255 without levels
    assert load_images(tmp_path / "one.npy").shape == (1, 1, 4, 5)
    with pytest.raises(ValueError, match="outside"):
        load_images(tmp_path / "both.npy", levels=8)
    with pytest.raises(ValueError, match="differ in shape"):
        load_images([tmp_path / "0.png", tmp_path / "one.npy"])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png"):
        load_images(tmp_path / "bad.png")


# ---------------------------------------------------------------------------- CLI

@pytest.fixture
def checkpoint_file(tmp_path):
    model = tiny(size=6)
    path = tmp_path / "model.pt"
    save_checkpoint(path, {"arch": "pixelcnn", "config": {**vars(model.config)}, "model": model.state_dict(),
                           "data": {"name": "synthetic", "size": 6, "bits": 1, "count": 8}})
    return path, model


def test_cli_samples(checkpoint_file, tmp_path, capsys):
    path, model = checkpoint_file
    out, npy = tmp_path / "s.png", tmp_path / "s.npy"
    argv = ["--checkpoint", str(path), "--n", "5", "--out", str(out), "--seed", "4", "--npy", str(npy)]
    assert sample.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 5
    with Image.open(out) as img:
        # ceil(sqrt(5)) = 3 per row, 6x6 images, pad 2, enlarged 3x by default
        assert img.size == (3 * (3 * 8 + 2), 3 * (2 * 8 + 2))
    assert np.array_equal(np.load(npy), sample_reference(model, 5, seed=4))
    assert sample.main(argv + ["--label", "1"]) == 2
    assert "not class-conditional" in capsys.readouterr().err


def test_cli_completion_grid(checkpoint_file, tmp_path, capsys):
    path, model = checkpoint_file
    out, npy = tmp_path / "c.png", tmp_path / "c.npy"
    argv = ["--checkpoint", str(path), "--complete", "--split", "test", "--known-rows", "2", "--n", "3", "--k", "2",
            "--out", str(out), "--npy", str(npy), "--scale", "1"]
    assert sample.main(argv) == 0
    with Image.open(out) as img:
        arr = np.asarray(img)
    assert arr.shape == (3 * 8 + 2, 4 * 8 + 2)  # rows: original | occluded | 2 completions (--scale 1)
    from pixelrnn.runtime.datasets import DataSpec, load

    originals = load(DataSpec("synthetic", size=6, bits=1, count=8), "test").images[:3]
    done = np.load(npy)
    assert done.shape == (6, 1, 6, 6)
    assert np.array_equal(done[:, :, :2], np.repeat(originals, 2, axis=0)[:, :, :2])
    assert np.array_equal(arr[2:8, 2:8], originals[0, 0] * 255)  # the original
    assert (arr[2 + 2:8, 10:16] == images.OCCLUDED_GREY).all()  # hidden rows of the occluded copy
    assert np.array_equal(arr[2:4, 10:16], originals[0, 0, :2] * 255)
    assert np.array_equal(arr[2:8, 18:24], done[0, 0] * 255)


def test_completion_takes_the_validation_split_by_default():
    """The test split stays held out unless asked for."""
    assert sample.parse_args(["--checkpoint", "x.pt", "--complete"]).split == "valid"


def test_cli_bad_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    assert sample.main(["--checkpoint", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "not a pixelrnn checkpoint" in err
    assert not (tmp_path / "x.png").exists()


def test_grid_array_pads_between_cells():
    g = grid_array(np.zeros((2, 1, 3, 3), np.uint8), 2, nrow=2, pad=1)
    assert g.shape == (5, 9, 1) and (g[:, 4] == 255).all() and (g[1:4, 1:4] == 0).all()


def test_cached_and_reference_cli_paths_draw_the_same_images(tmp_path):
    from pixelrnn.training.checkpoint import save_checkpoint
    from pixelrnn.training.models import build_model

    torch.manual_seed(0)
    model = build_model("pixelcnn", dict(in_channels=1, height=6, width=6, levels=4, hidden=6, layers=1))
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, {"format": "pixelrnn-checkpoint/1", "arch": "pixelcnn", "config": vars(model.config),
                           "data": {"name": "synthetic", "size": 6, "bits": 2}, "model": model.state_dict(),
                           "optimizer": None, "step": 0, "epoch": 0, "metrics": {}, "history": [], "train_args": {}})
    out = {}
    for which in ("cached", "reference"):
        code = sample.main(["--checkpoint", str(ckpt), "--n", "3", "--seed", "4", "--sampler", which,
                            "--out", str(tmp_path / f"{which}.png"), "--npy", str(tmp_path / f"{which}.npy")])
        assert code == 0
        out[which] = np.load(tmp_path / f"{which}.npy")
    assert np.array_equal(out["cached"], out["reference"])
