"""Write NAME_ood, the out-of-distribution detector, into a model repository that already holds
NAME_score and BACKGROUND_score (export/build_engine.py --background writes all three).

    REPOSITORY/NAME_ood/config.pbtxt   inputs as NAME_score, the scores out (runtime/protocol.py);
                                       parameters: the two scorers it calls, the threshold
    REPOSITORY/NAME_ood/1/             model.py (server/triton_models/ood_model.py) and the
                                       pixelrnn modules it imports

The detector is business-logic scripting over the two scorers (Triton's way to compose models
when the composition is more than a fixed graph: a class-conditional model is called once per
class), so each scorer keeps its own instances and dynamic batching.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from pixelrnn.runtime import protocol as p
from pixelrnn.runtime.ood import Threshold
from pixelrnn.server.repository import TEMPLATES, VERSION, _block, _dims, _io, _parameters, copy_modules

TEMPLATE = TEMPLATES / "ood_model.py"


def detector_config(manifest: dict, background: dict, threshold: Threshold, max_queue_delay_us: int = 2000) -> str:
    c, h, w = manifest["shape"]
    max_batch = min(int(manifest["max_batch"]), int(background["max_batch"]))  # one request per scorer call
    inputs = [_io(p.IMAGES, "TYPE_UINT8", [c, h, w])]  # one layout, required, as NAME_score (server/repository.py)
    outputs = [_io(n, "TYPE_FP32", [1]) for n in (p.NLL_NATS, p.BACKGROUND_NLL_NATS, p.LLR, p.COMPLEXITY)]
    outputs.append(_io(p.OOD, "TYPE_BOOL", [1]))
    params = {"foreground_model": p.score_model(manifest["name"]), "background_model": p.score_model(background["name"]),
              "levels": manifest["levels"], "num_classes": manifest["num_classes"], "threshold": json.dumps(threshold.to_json())}
    preferred = [b for b in (4, 8, 16, 32, 64) if b <= max_batch] or [max_batch]
    return (
        f'name: "{p.detect_model(manifest["name"])}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
        + _block("input", inputs) + _block("output", outputs)
        + f"dynamic_batching {{\n  preferred_batch_size: {_dims(preferred)}\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}\n"
        + "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
        + _parameters(params)
    )


def check_pair(manifest: dict, background: dict) -> None:
    """The background model must read the same images: same shape and levels."""
    for key in ("shape", "levels"):
        if json.dumps(manifest[key]) != json.dumps(background[key]):
            raise ValueError(f"background model {background['name']} has {key} {background[key]}, "
                             f"the model {manifest['name']} {manifest[key]}: it cannot score the same images")
    if background["num_classes"]:
        raise ValueError(f"background model {background['name']} is class-conditional: a background model scores "
                         "images without labels")


def write_detector(repository_dir: str | Path, manifest: dict, background: dict, threshold: Threshold) -> Path:
    """Write (or overwrite) NAME_ood; returns its folder."""
    check_pair(manifest, background)
    repository_dir = Path(repository_dir)
    for needed in (p.score_model(manifest["name"]), p.score_model(background["name"])):
        if not (repository_dir / needed / "config.pbtxt").is_file():
            raise ValueError(f"{repository_dir} has no {needed}: the detector calls it")
    model = p.detect_model(manifest["name"])
    tmp = repository_dir / f".{model}.tmp"  # built beside the target, then swapped in
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / VERSION).mkdir(parents=True)
    (tmp / "config.pbtxt").write_text(detector_config(manifest, background, threshold))
    shutil.copyfile(TEMPLATE, tmp / VERSION / "model.py")
    copy_modules(TEMPLATE, tmp / VERSION)
    target = repository_dir / model
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target
