"""Checkpoint files: round trip, every kind of damage is a CheckpointError naming the file, atomic writes."""
import hashlib
import io

import pytest
import torch

from pixelrnn.training import checkpoint
from pixelrnn.training.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from pixelrnn.training.models import build_model

CONFIG = dict(in_channels=1, height=6, width=6, levels=2, hidden=6, layers=1, input_kernel=3)


def tiny_model(**overrides):
    torch.manual_seed(0)
    return build_model("pixelcnn", {**CONFIG, **overrides})


def payload(model, config=None, **extra):
    return {"arch": "pixelcnn", "config": dict(config or CONFIG), "data": {"name": "synthetic", "size": 6},
            "model": model.state_dict(), "step": 7, "metrics": {"nll_nats": 1.5}, **extra}


def write_raw(path, obj):
    """A file with a valid header around an arbitrary torch.save payload."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    path.write_bytes(checkpoint.HEADER.pack(checkpoint.MAGIC, hashlib.sha256(data).digest(), len(data)) + data)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "last.pt"
    model = tiny_model()
    save_checkpoint(path, payload(model))
    return path, model


def test_round_trip(saved):
    path, model = saved
    loaded, ckpt = load_model(path)
    assert ckpt["format"] == checkpoint.FORMAT
    assert ckpt["arch"] == "pixelcnn" and ckpt["config"] == CONFIG and ckpt["step"] == 7
    assert ckpt["metrics"] == {"nll_nats": 1.5} and ckpt["history"] == [] and ckpt["train_args"] == {}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    x = torch.randint(0, 2, (3, 1, 6, 6))
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    assert not loaded.training


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="not found") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("keep", [0, 5, checkpoint.HEADER.size - 1, checkpoint.HEADER.size + 10, -1])
def test_truncated(saved, keep):
    path, _ = saved
    raw = path.read_bytes()
    path.write_bytes(raw[:keep] if keep >= 0 else raw[:-1])
    with pytest.raises(CheckpointError, match="truncated|empty") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


def test_trailing_bytes(saved):
    path, _ = saved
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(CheckpointError, match="unexpected bytes"):
        load_checkpoint(path)


def test_flipped_byte(saved):
    path, _ = saved
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum mismatch") as e:
        load_model(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("content", [b"hello, this is not a checkpoint at all", bytes(range(256)) * 4])
def test_garbage(tmp_path, content):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a pixelrnn checkpoint") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


def test_plain_torch_save_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(payload(tiny_model()), path)
    with pytest.raises(CheckpointError, match="not a pixelrnn checkpoint"):
        load_checkpoint(path)


def test_valid_header_around_foreign_payload(tmp_path):
    path = tmp_path / "foreign.pt"
    write_raw(path, [1, 2, 3])
    with pytest.raises(CheckpointError, match="not a pixelrnn-checkpoint/1 checkpoint"):
        load_checkpoint(path)
    path.write_bytes(checkpoint.HEADER.pack(checkpoint.MAGIC, hashlib.sha256(b"junk").digest(), 4) + b"junk")
    with pytest.raises(CheckpointError, match="payload cannot be loaded") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


def test_missing_keys(tmp_path):
    path = tmp_path / "partial.pt"
    write_raw(path, {"format": checkpoint.FORMAT, "arch": "pixelcnn", "config": CONFIG})
    with pytest.raises(CheckpointError, match="lacks key.*model") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


def test_unknown_arch(tmp_path):
    path = tmp_path / "alien.pt"
    save_checkpoint(path, {**payload(tiny_model()), "arch": "transformer9000"})
    with pytest.raises(CheckpointError, match="unknown architecture 'transformer9000'") as e:
        load_model(path)
    assert str(path) in str(e.value)


def test_config_weights_mismatch(tmp_path):
    path = tmp_path / "mismatch.pt"
    wider = tiny_model(hidden=9)
    save_checkpoint(path, payload(wider, config=CONFIG))  # says hidden=6, holds hidden=9 weights
    with pytest.raises(CheckpointError, match="input_conv.weight") as e:
        load_model(path)
    assert str(path) in str(e.value) and "does not match the weights" in str(e.value)


def test_config_missing_layer(tmp_path):
    path = tmp_path / "deeper.pt"
    save_checkpoint(path, payload(tiny_model(), config={**CONFIG, "layers": 2}))
    with pytest.raises(CheckpointError, match=r"blocks\.1\..*missing"):
        load_model(path)


def test_invalid_config(tmp_path):
    path = tmp_path / "bad-config.pt"
    save_checkpoint(path, payload(tiny_model(), config={**CONFIG, "no_such_field": 1}))
    with pytest.raises(CheckpointError, match="no_such_field"):
        load_model(path)


def test_payload_needs_model():
    with pytest.raises(ValueError, match="model"):
        save_checkpoint("unused.pt", {"arch": "pixelcnn", "config": CONFIG})


def test_failed_write_leaves_previous_file(saved, monkeypatch):
    path, _ = saved
    before = path.read_bytes()

    def half_then_fail(f, header, data):
        f.write(header)
        f.write(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_write_all", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, payload(tiny_model(hidden=9)))
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temp file left behind
    load_model(path)


def test_failed_fsync_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"

    def boom(fd):
        raise OSError("I/O error")

    monkeypatch.setattr(checkpoint.os, "fsync", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, payload(tiny_model()))
    assert list(tmp_path.iterdir()) == []
