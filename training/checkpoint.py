"""Self-describing, corruption-checked checkpoint files.

A checkpoint holds everything needed to rebuild and continue a run: the architecture name and
its config dict (so `load_model` needs nothing but the file), the data spec, model and
optimizer state, step, metrics, history and the training arguments.

On disk: a fixed header, then the torch.save payload.

    MAGIC (16 bytes) | sha256(payload) (32 bytes) | len(payload) (8 bytes, big-endian) | payload

The header makes a truncated, bit-flipped or foreign file fail loudly with a `CheckpointError`
that names the file, instead of a pickle traceback or, worse, silently wrong weights. Files are
written atomically (temp file in the same directory, fsync, os.replace), so a crash mid-write
leaves the previous file intact and never a partial one under the final name (a killed writer
can leave only a dot-named temp file, which `remove_stale_temp_files` clears).
"""
from __future__ import annotations

import hashlib
import io
import os
import struct
import tempfile
from pathlib import Path

import torch

FORMAT = "pixelrnn-checkpoint/1"
MAGIC = b"PIXELRNN-CKPT/1\n"
HEADER = struct.Struct(f">{len(MAGIC)}s32sQ")  # magic, sha256 digest, payload length
REQUIRED_KEYS = ("format", "arch", "config", "data", "model", "optimizer", "step", "epoch", "metrics", "history", "train_args")
DEFAULTS = {"data": None, "optimizer": None, "step": 0, "epoch": 0, "metrics": {}, "history": [], "train_args": {}}


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged, not a checkpoint, or does not fit its model."""


def _fail(path: str | Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}")


# ---------------------------------------------------------------------------- writing

def _write_all(f, header: bytes, payload: bytes) -> None:
    """The raw write, separate so tests can make it fail halfway."""
    f.write(header)
    f.write(payload)


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Atomically write `payload` (must have arch, config and model; the other keys default)."""
    path = Path(path)
    missing = [k for k in ("arch", "config", "model") if k not in payload]
    if missing:
        raise ValueError(f"checkpoint payload lacks {', '.join(missing)}")
    payload = {**DEFAULTS, **payload, "format": FORMAT}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    header = HEADER.pack(MAGIC, hashlib.sha256(data).digest(), len(data))

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as f:
            _write_all(f, header, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def remove_stale_temp_files(path: str | Path) -> list[Path]:
    """Delete the temp files a writer of `path` killed mid-save (SIGKILL, power loss) left behind.

    They are never read (only os.replace makes a checkpoint visible), but each is up to a whole
    checkpoint. Call only while no other process writes `path`, e.g. when a run starts.
    """
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.is_dir() else []
    for tmp in stale:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
    return stale


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform, and not fatal there.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- reading

def _read_payload(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise _fail(path, "checkpoint file not found") from None
    except IsADirectoryError:
        raise _fail(path, "is a directory, not a checkpoint file") from None
    except OSError as e:
        raise _fail(path, f"cannot read checkpoint ({e.strerror or e})") from None
    if not raw:
        raise _fail(path, "empty file (truncated checkpoint?)")
    head = raw[: len(MAGIC)]
    if head != MAGIC[: len(head)]:
        raise _fail(path, "not a pixelrnn checkpoint (bad magic bytes)")
    if len(raw) < HEADER.size:
        raise _fail(path, f"truncated: {len(raw)} bytes, shorter than the {HEADER.size}-byte header")
    _, digest, length = HEADER.unpack_from(raw)
    data = raw[HEADER.size:]
    if len(data) < length:
        raise _fail(path, f"truncated: header promises {length} payload bytes, found {len(data)}")
    if len(data) > length:
        raise _fail(path, f"corrupt: {len(data) - length} unexpected bytes after the {length}-byte payload")
    if hashlib.sha256(data).digest() != digest:
        raise _fail(path, "checksum mismatch: the file is corrupted (sha256 of the payload differs from the header)")
    return data


def load_checkpoint(path: str | Path) -> dict:
    """Read and verify a checkpoint; tensors are loaded onto the CPU."""
    from pixelrnn.training.models import ARCHITECTURES

    path = Path(path)
    data = _read_payload(path)
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a valid checksum over an unloadable payload: written by something else
        raise _fail(path, f"payload cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise _fail(path, f"not a {FORMAT} checkpoint (format: {found!r})")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise _fail(path, f"checkpoint lacks key(s) {', '.join(missing)}")
    if ckpt["arch"] not in ARCHITECTURES:
        raise _fail(path, f"unknown architecture {ckpt['arch']!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    if not isinstance(ckpt["config"], dict) or not isinstance(ckpt["model"], dict):
        raise _fail(path, "config and model must be dicts")
    return ckpt


def _state_mismatch(model: torch.nn.Module, state: dict) -> str | None:
    """Describe the first way `state` does not fit `model`, naming the parameter."""
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in state:
            return f"parameter {name!r} is missing from the file"
        if not isinstance(state[name], torch.Tensor):
            return f"parameter {name!r} is not a tensor in the file"
        if tuple(state[name].shape) != tuple(tensor.shape):
            return f"parameter {name!r} has shape {tuple(state[name].shape)} in the file but the config builds {tuple(tensor.shape)}"
    extra = sorted(set(state) - set(expected))
    if extra:
        return f"parameter {extra[0]!r} in the file does not exist in the model the config builds"
    return None


FIELD_TYPES = {"int": (int,), "int | None": (int, type(None)), "str": (str,), "dict": (dict,), "float": (float, int), "bool": (bool,)}


def _config_problem(arch: str, config: dict) -> str | None:
    """A config the model constructor would misread: a missing image field or a mistyped value."""
    import dataclasses

    from pixelrnn.training.models import config_class
    from pixelrnn.training.models.base import IMAGE_FIELDS

    missing = [k for k in IMAGE_FIELDS if k not in config]
    if missing:
        return f"config lacks {', '.join(missing)} (the image spec cannot be recovered from the weights)"
    for f in dataclasses.fields(config_class(arch)):
        want = FIELD_TYPES.get(f.type if isinstance(f.type, str) else getattr(f.type, "__name__", ""))
        value = config.get(f.name)
        if f.name in config and want and (not isinstance(value, want) or (isinstance(value, bool) and bool not in want)):
            return f"config field {f.name!r} is {value!r} ({type(value).__name__}), expected {f.type}"
    return None


def build_checkpoint_model(path: str | Path, ckpt: dict):
    """The (untrained) model a checkpoint's arch and config describe; CheckpointError if they do not build one."""
    from pixelrnn.training.models import build_model

    problem = _config_problem(ckpt["arch"], ckpt["config"])
    if problem:
        raise _fail(path, problem)
    try:
        return build_model(ckpt["arch"], dict(ckpt["config"]))
    except Exception as e:  # noqa: BLE001 - any failure here is the file's config, reported as such
        raise _fail(path, f"config does not build a {ckpt['arch']} model: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def load_weights(path: str | Path, model: torch.nn.Module, state: dict) -> None:
    """Load a checkpoint's state dict into `model`; CheckpointError naming the first parameter that does not fit."""
    problem = _state_mismatch(model, state)
    if problem:
        raise _fail(path, f"config does not match the weights: {problem}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise _fail(path, f"config does not match the weights: {str(e).splitlines()[0]}") from None


def load_model(path: str | Path, ckpt: dict | None = None):
    """Rebuild the model described by a checkpoint and load its weights: (model in eval mode, ckpt)."""
    ckpt = ckpt if ckpt is not None else load_checkpoint(path)
    model = build_checkpoint_model(path, ckpt)
    load_weights(path, model, ckpt["model"])
    model.eval()
    return model, ckpt
