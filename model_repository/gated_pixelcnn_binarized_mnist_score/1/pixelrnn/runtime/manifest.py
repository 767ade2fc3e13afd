"""An export folder's manifest.json: its name, format tag, the sha256 it records for every file,
and reading it back with every graph checked against that checksum.

export/build_engine.py writes the manifest; the runner (runtime/runner.py) reads it. A flipped
byte in an ONNX file's weights still loads in onnxruntime and would serve wrong numbers, so a
damaged or swapped file must stop the model from loading instead (one line naming the file:
Triton shows it as the model's load error).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = "pixelrnn-export/1"


class ModelFilesError(ValueError):
    """An export folder's manifest or graph file is missing, unreadable or not what was exported."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):  # graphs and plans can be large: 1 MiB at a time
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ModelFilesError(f"{path}: missing (the export manifest: re-export with export/build_engine.py)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelFilesError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelFilesError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ModelFilesError(f"{path}: format {found!r}, expected {FORMAT!r}")
    return manifest


def artifact_path(manifest: dict, folder: str | Path, name: str) -> Path:
    """The file of graph `name`, after checking it exists and has the sha256 the manifest records."""
    folder = Path(folder)
    entry = (manifest.get("artifacts") or {}).get(name)
    if not isinstance(entry, dict) or not entry.get("file"):
        raise ModelFilesError(f"{folder / MANIFEST}: lists no {name!r} graph")
    path = folder / entry["file"]
    if not path.is_file():
        raise ModelFilesError(f"{path}: missing (the {name} graph listed in {MANIFEST})")
    want = entry.get("sha256")
    if not want:
        raise ModelFilesError(f"{folder / MANIFEST}: records no sha256 for {entry['file']}: re-export with export/build_engine.py")
    found = file_sha256(path)
    if found != want:
        raise ModelFilesError(f"{path}: corrupted or replaced: sha256 {found[:16]}... differs from the "
                              f"{want[:16]}... recorded in {MANIFEST} (re-export with export/build_engine.py)")
    return path


@dataclass
class ModelFolder:
    """A repository model as Triton's initialize(args) hands it over (see model_folder)."""

    config: dict  # config.pbtxt as JSON
    folder: Path  # the version folder: model.py, runtime/, the graphs, manifest.json
    params: dict[str, str]  # config.pbtxt's parameters
    manifest: dict


def model_folder(args: dict) -> ModelFolder:
    """Parse the `args` of a Triton Python model's initialize and read its manifest."""
    config = json.loads(args["model_config"])
    folder = Path(args["model_repository"]) / args["model_version"]
    return ModelFolder(config, folder, model_params(config), read_manifest(folder))


def model_params(config: dict) -> dict[str, str]:
    """config.pbtxt's parameters (as Triton hands the config over in JSON): name -> string value."""
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
