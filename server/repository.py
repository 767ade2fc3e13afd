"""Write a Triton model repository for one exported checkpoint (export/build_engine.py calls
`write_repository` with its manifest):

    REPOSITORY/NAME_score/config.pbtxt    batch likelihood scorer, dynamic batching
    REPOSITORY/NAME_score/1/              model.py, runtime/, scorer.onnx, manifest.json
    REPOSITORY/NAME_sample/config.pbtxt   streaming, stateful row sampler
    REPOSITORY/NAME_sample/1/             model.py, runtime/, the cell(s) (+ condition.onnx), manifest.json
    REPOSITORY/NAME_sample/perf_analyzer_input.json
                                          the sampler's request data for Triton's perf_analyzer
                                          (--input-data; python -m bench.perf_analyzer uses it;
                                          the scorer needs none: --input-data zero)

Both models run in Triton's Python backend (the wheel's server has no onnxruntime backend),
which calls onnxruntime. A repository is self-contained: model.py (from server/triton_models/)
imports only the copy of the torch-free runtime package (runtime/) written beside it, so a
stock Triton with a Python environment holding numpy<2 and onnxruntime serves it from
anywhere: no project checkout, no torch, no absolute path in any file. The request/response
protocol is in runtime/protocol.py.

To (re)write a repository from an export folder with other settings than build_engine's:
    python -m pixelrnn.server.repository --export build/export/NAME --repository DIR [--sequence-idle-s S]
        [--max-sequences N] [--max-queue-delay-us U] [--score-instances N] [--onnx-threads N]
        [--engine-workers N] [--sender-threads N] [--coalesce-ms MS] [--sampler-memory-mb MB] [--max-live-images N]
        [--stuck-send-s S] [--admission-queue N --admission-wait-ms MS]

Overload: the sampler admits sequences while their images fit its live-images budget
(server/engine/admission.py): max_live_images when given, else as many images as sampler_memory_mb holds
at the state size per image the manifest gives (default 512 MiB: 3,938 images of the shipped
PixelCNN, 133 KiB each). A START over it gets an immediate UNAVAILABLE error naming the budget and the load,
or, with admission_queue N > 0, waits for room first, first come first served, N STARTs at most, for
admission_wait_ms at most (below the sequence idle timeout, after which Triton forgets the id),
and gets that error only then (server/engine/admission.py, Admission).
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import shutil
import sys
from pathlib import Path

from pixelrnn.server.engine.admission import DEFAULT_MEMORY_MB
from pixelrnn.server.engine import MAX_WORKERS, STUCK_SEND_S
from pixelrnn.runtime.manifest import MANIFEST
from pixelrnn.runtime import protocol as p

TEMPLATES = Path(__file__).resolve().parent / "triton_models"
ROOT = Path(__file__).resolve().parent.parent  # the checkout: pyproject.toml maps its folders to pixelrnn.*
PACKAGE_DIRS = {"pixelrnn": ROOT / "pixelrnn", "pixelrnn.runtime": ROOT / "runtime", "pixelrnn.server": ROOT / "server"}
VERSION = "1"


def _dims(dims) -> str:
    return "[ " + ", ".join(str(int(d)) for d in dims) + " ]"


def _io(name: str, dtype: str, dims, optional: bool = False) -> str:
    return f'  {{ name: "{name}" data_type: {dtype} dims: {_dims(dims)}{" optional: true" if optional else ""} }}'


def _block(kind: str, entries: list[str]) -> str:
    return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"


def _parameters(params: dict[str, str]) -> str:
    entries = [f'  {{ key: "{k}" value: {{ string_value: {json.dumps(str(v))} }} }}' for k, v in params.items()]
    return _block("parameters", entries)


def score_config(manifest: dict, max_queue_delay_us: int, instances: int, params: dict) -> str:
    c, h, w = manifest["shape"]
    max_batch = int(manifest["max_batch"])
    # One image layout, required: generic clients (perf_analyzer, which sends every declared input)
    # then make valid requests; two exclusive optional layouts made every such request a conflict.
    inputs = [_io(p.IMAGES, "TYPE_UINT8", [c, h, w])]
    if manifest["num_classes"]:
        inputs.append(_io(p.LABELS, "TYPE_INT64", [1], optional=True))  # optional: model.py explains a missing one
    preferred = [b for b in (4, 8, 16, 32, 64, 128, 256) if b <= max_batch] or [max_batch]
    return (
        f'name: "{p.score_model(manifest["name"])}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
        + _block("input", inputs)
        + _block("output", [_io(p.NLL_NATS, "TYPE_FP32", [1]), _io(p.BITS_PER_DIM, "TYPE_FP32", [1]),
                            _io(p.PIXEL_NLL, "TYPE_FP32", [c, h, w])])
        + f"dynamic_batching {{\n  preferred_batch_size: {_dims(preferred)}\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}\n"
        + f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]\n"
        + _parameters(params)
    )


def sample_config(manifest: dict, idle_s: float, max_sequences: int, params: dict) -> str:
    c, _, w = manifest["shape"]
    inputs = [
        _io(p.BATCH_SIZE, "TYPE_INT32", [1], True),
        _io(p.TEMPERATURE, "TYPE_FP64", [1], True),  # float64: a float32 0.7 is not the sampler's 0.7
        _io(p.SEED, "TYPE_UINT64", [1], True),
        _io(p.KNOWN, "TYPE_UINT8", [-1, c, -1, w], True),
        _io(p.MAX_ROWS, "TYPE_INT32", [1], True),
        _io(p.ROWS_PER_RESPONSE, "TYPE_INT32", [1], True),
    ]
    if manifest["num_classes"]:
        inputs.insert(3, _io(p.LABELS, "TYPE_INT64", [-1], True))
    outputs = [
        _io(p.STAGE, "TYPE_INT32", [1]),
        _io(p.ROW_INDEX, "TYPE_INT32", [1]),  # the first of the response's rows
        _io(p.ROW_COUNT, "TYPE_INT32", [1]),
        _io(p.ROW, "TYPE_UINT8", [-1, c, -1, -1]),  # B x C x R x W; the width is the stage's (multi-scale: W/f, then W)
        _io(p.ROW_LOGPROB, "TYPE_FP32", [-1, -1]),  # B x R
        _io(p.ACTIVE, "TYPE_INT32", [1]),
        _io(p.CALL_BATCH, "TYPE_INT32", [-1]),  # one per row
    ]
    return (
        f'name: "{p.sample_model(manifest["name"])}"\nbackend: "python"\n'
        "# Batching happens across sequences inside the model (the row engine, server/engine/), not in Triton.\n"
        "max_batch_size: 0\nmodel_transaction_policy { decoupled: true }\n"
        + _block("input", inputs) + _block("output", outputs)
        + "sequence_batching {\n"
        "  # Triton drops a sequence idle this long without telling the model; the model's engine\n"
        "  # expires its own state after the same time. Backlog time counts as idle, so keep\n"
        "  # max_candidate_sequences above the number of concurrent sequences.\n"
        f"  max_sequence_idle_microseconds: {int(idle_s * 1e6)}\n"
        f"  oldest {{ max_candidate_sequences: {max_sequences} }}\n}}\n"
        # One instance: the engine batches across every sequence only if they all reach it.
        "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
        + _parameters(params)
    )


# The sampler's row coalescing window (ms). Each response costs the server (backend IPC, gRPC)
# and the client CPU, and senders mostly keep up, so without a window every row is a response;
# with it a busy sampler sends a few rows per response. A sequence's first row never waits.
COALESCE_MS = 20.0
PERF_INPUT = "perf_analyzer_input.json"
PERF_STREAMS = 4  # sampler: data streams (seeds 0..3), which perf_analyzer takes in turn per new sequence


def perf_analyzer_input(manifest: dict) -> dict:
    """perf_analyzer's --input-data for NAME_sample (a JSON document): its own data is no use
    there, as every sequence needs a START request. The scorer needs no file: perf_analyzer's
    --input-data zero sends all-zero images (and class 0), valid at any number of levels.

    Sequences of one request each, with sequence start and end set by perf_analyzer:
    BATCH_SIZE 1, TEMPERATURE 1, SEED 0..3 (+ LABELS 0), so every request streams a whole image,
    row by row, then its final response; ROWS_PER_RESPONSE 1, as perf_analyzer counts responses
    (its response throughput is then rows per second)."""
    conditional = bool(manifest["num_classes"])
    streams = []
    for seed in range(PERF_STREAMS):
        start = {p.BATCH_SIZE: [1], p.TEMPERATURE: [1.0], p.SEED: [seed], p.ROWS_PER_RESPONSE: [1]}
        if conditional:  # LABELS has a variable dimension: its shape goes with it
            start[p.LABELS] = {"content": [0], "shape": [1]}
        streams.append([start])
    return {"data": streams}


def _files(manifest: dict, names: list[str]) -> list[str]:
    return [manifest["artifacts"][n]["file"] for n in names]


def stage_rows(manifest: dict) -> list[int]:
    """Rows streamed per stage: the full image, preceded by the small one for multi-scale models."""
    small = [manifest["multiscale"]["small_shape"][1]] if manifest.get("multiscale") else []
    return small + [manifest["shape"][1]]


def write_repository(manifest: dict, onnx_dir: str | Path, repository_dir: str | Path, *, sequence_idle_s: float = 60.0,
                     max_sequences: int = 1024, max_queue_delay_us: int = 2000, score_instances: int = 1,
                     onnx_threads: int = 1, engine_workers: int = 0, sender_threads: int = 2, coalesce_ms: float = COALESCE_MS,
                     sampler_memory_mb: float = DEFAULT_MEMORY_MB, max_live_images: int = 0,
                     stuck_send_s: float = STUCK_SEND_S, admission_queue: int = 0, admission_wait_ms: float = 0.0,
                     sampler: bool = True) -> list[Path]:
    """Write (or overwrite) NAME_score and NAME_sample (sampler=False: NAME_score alone) under
    repository_dir; returns their folders.
    engine_workers: the sampler's engine workers, each a thread with its own cell session and
    sequences (server/engine/scheduler.py); 0: one per core the sampler process may use when it
    loads but one (left to the response path), at least 1, at most MAX_WORKERS (a repository does
    not fix the size of the machine that serves it).
    coalesce_ms: the sampler's row coalescing window (server/engine/outbox.py; 0: rows only share a
    response when they waited for a busy sender). sampler_memory_mb / max_live_images: the
    sampler's live-images budget (module notes; max_live_images 0: from sampler_memory_mb).
    admission_queue / admission_wait_ms: STARTs over the budget that may wait for room, and for
    how long (module notes; 0: refused at once).
    stuck_send_s: a response send outstanding this long marks the sampler unhealthy and ends the
    sequences on its sender thread (server/engine/outbox.py, "Stuck sends"; 0: off)."""
    onnx_dir, repository_dir = Path(onnx_dir), Path(repository_dir)
    name = manifest["name"]
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"model name {name!r} is not a plain identifier")
    if sequence_idle_s <= 0 or max_sequences < 1 or sender_threads < 0 or engine_workers < 0:
        raise ValueError("sequence_idle_s must be > 0, max_sequences >= 1, sender_threads >= 0 and engine_workers >= 0")
    if not 0 <= coalesce_ms <= 1000:
        raise ValueError(f"coalesce_ms must be in [0, 1000], got {coalesce_ms}")
    if not sampler_memory_mb > 0 or max_live_images < 0:
        raise ValueError(f"sampler_memory_mb must be > 0 and max_live_images >= 0, got {sampler_memory_mb}, {max_live_images}")
    if not 0 <= stuck_send_s <= 3600:
        raise ValueError(f"stuck_send_s must be in [0, 3600] (0: off), got {stuck_send_s}")
    if 0 < max_live_images < int(manifest["max_batch"]):
        raise ValueError(f"max_live_images must hold at least one full sequence (max_batch {manifest['max_batch']}), "
                         f"got {max_live_images}")
    if admission_queue < 0 or (admission_queue and not 0 < admission_wait_ms < sequence_idle_s * 1000):
        raise ValueError(f"admission_queue must be >= 0, and with a queue admission_wait_ms must be > 0 and below the sequence "
                         f"idle timeout ({sequence_idle_s * 1000:g} ms), got {admission_queue}, {admission_wait_ms:g}")
    stages = list(manifest["stages"]) + (["condition"] if manifest.get("multiscale") else [])
    params = {"onnx_threads": str(onnx_threads),
              # Published so clients can validate input and lay out streamed rows before sending.
              "levels": str(manifest["levels"]), "num_classes": str(manifest["num_classes"]),
              "stage_rows": ",".join(str(rows) for rows in stage_rows(manifest))}
    sample_params = {**params, "engine_workers": str(engine_workers), "sender_threads": str(sender_threads),
                     "coalesce_ms": f"{coalesce_ms:g}",
                     # The budget itself is the model's to derive (log line, metrics): editing
                     # sampler_memory_mb here changes it with nothing else to keep in step.
                     "sampler_memory_mb": f"{sampler_memory_mb:g}", "max_live_images": str(max_live_images),
                     "stuck_send_s": f"{stuck_send_s:g}",
                     "admission_queue": str(admission_queue), "admission_wait_ms": f"{admission_wait_ms:g}"}
    models = {p.score_model(name): ("score_model.py", _files(manifest, ["scorer"]),
                                    score_config(manifest, max_queue_delay_us, score_instances, params))}
    if sampler:  # without: a scorer alone, e.g. a detector's background model, never sampled
        models[p.sample_model(name)] = ("sample_model.py", _files(manifest, stages),
                                        sample_config(manifest, sequence_idle_s, max_sequences, sample_params))
    missing = [f for _, files, _ in models.values() for f in files if not (onnx_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{onnx_dir}: missing exported files {missing} (run export/build_engine.py)")

    repository_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for model, (template, files, config) in models.items():
        # Build beside the target, then swap, so a failure leaves the old model in place.
        tmp = repository_dir / f".{model}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / VERSION).mkdir(parents=True)
        (tmp / "config.pbtxt").write_text(config)
        if model == p.sample_model(name):
            (tmp / PERF_INPUT).write_text(json.dumps(perf_analyzer_input(manifest)) + "\n")
        shutil.copyfile(TEMPLATES / template, tmp / VERSION / "model.py")
        copy_modules(TEMPLATES / template, tmp / VERSION)
        for f in files:
            shutil.copyfile(onnx_dir / f, tmp / VERSION / f)
        (tmp / VERSION / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        target = repository_dir / model
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        written.append(target)
    return written


def module_file(name: str) -> Path:
    """The source file of pixelrnn module `name` in this checkout (a package's __init__.py)."""
    for prefix in sorted(PACKAGE_DIRS, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            base = PACKAGE_DIRS[prefix].joinpath(*name[len(prefix):].split(".")[1:])
            return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    raise ValueError(f"{name}: not a module a model repository may carry (only {', '.join(PACKAGE_DIRS)})")


def _pixelrnn_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
    return {n for n in names if n == "pixelrnn" or n.startswith("pixelrnn.")}


def served_modules(glue: Path) -> list[str]:
    """Every pixelrnn module the glue file imports, directly or not, with the packages that hold
    them: exactly what a repository must carry to run with no checkout and no install."""
    seen, todo = set(), sorted(_pixelrnn_imports(glue))
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
            module = ".".join(parts[:i])
            if module in seen:
                continue
            path = module_file(module)
            if not path.exists():
                if i == len(parts) and "." in module:  # `from pkg import name`: name was not a module
                    break
                raise FileNotFoundError(f"{glue.name} imports {module}, which has no file at {path}")
            seen.add(module)
            todo.extend(_pixelrnn_imports(path) - seen)
    return sorted(seen)


def copy_modules(glue: Path, version_dir: Path) -> list[Path]:
    """Copy the pixelrnn modules `glue` needs into version_dir/pixelrnn/..., as their package tree."""
    written = []
    for name in served_modules(glue):
        source = module_file(name)
        target = version_dir.joinpath(*name.split("."))
        target = target / "__init__.py" if source.name == "__init__.py" else target.with_suffix(".py")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        written.append(target)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pixelrnn.server.repository", description="Write NAME_score and NAME_sample from an export folder.")
    parser.add_argument("--export", required=True, help="folder with manifest.json and the ONNX files (export/build_engine.py --out)")
    parser.add_argument("--repository", required=True)
    parser.add_argument("--sequence-idle-s", type=float, default=60.0, help="free a sampling sequence idle this long")
    parser.add_argument("--max-sequences", type=int, default=1024, help="sequences Triton tracks at once")
    parser.add_argument("--max-queue-delay-us", type=int, default=2000, help="scorer: how long to wait to fill a batch")
    parser.add_argument("--score-instances", type=int, default=1)
    parser.add_argument("--onnx-threads", type=int, default=1, help="onnxruntime threads per graph")
    parser.add_argument("--engine-workers", type=int, default=0,
                        help="sampler: engine worker threads, each with its own cell session and sequences, on a core "
                             f"of its own (0: one per core the sampler may use when it loads but one, at most {MAX_WORKERS})")
    parser.add_argument("--sender-threads", type=int, default=2,
                        help="sampler: threads sending streamed rows, per engine worker (0: the worker's own)")
    parser.add_argument("--coalesce-ms", type=float, default=COALESCE_MS,
                        help="sampler: a sequence's rows may wait this long after its last response to share the next "
                             f"(first rows never wait; 0: off; default {COALESCE_MS:g})")
    parser.add_argument("--sampler-memory-mb", type=float, default=DEFAULT_MEMORY_MB,
                        help=f"sampler: memory for live sequences' state, sets the live-images budget (default {DEFAULT_MEMORY_MB})")
    parser.add_argument("--max-live-images", type=int, default=0,
                        help="sampler: live-images budget itself (0: from --sampler-memory-mb); STARTs over it are refused")
    parser.add_argument("--admission-queue", type=int, default=0,
                        help="sampler: STARTs over the budget that may wait for room, first come first served (0: refused at once)")
    parser.add_argument("--admission-wait-ms", type=float, default=0.0,
                        help="sampler: how long such a START waits before it is refused (needs --admission-queue)")
    parser.add_argument("--stuck-send-s", type=float, default=STUCK_SEND_S,
                        help="sampler: a response send outstanding this long marks it unhealthy and ends the sequences on "
                             f"its sender thread (0: off; default {STUCK_SEND_S:g})")
    args = parser.parse_args(argv)
    try:
        manifest = json.loads((Path(args.export) / MANIFEST).read_text())
        written = write_repository(manifest, args.export, args.repository, sequence_idle_s=args.sequence_idle_s,
                                   max_sequences=args.max_sequences, max_queue_delay_us=args.max_queue_delay_us,
                                   score_instances=args.score_instances, onnx_threads=args.onnx_threads,
                                   engine_workers=args.engine_workers, sender_threads=args.sender_threads,
                                   coalesce_ms=args.coalesce_ms,
                                   sampler_memory_mb=args.sampler_memory_mb, max_live_images=args.max_live_images,
                                   stuck_send_s=args.stuck_send_s, admission_queue=args.admission_queue,
                                   admission_wait_ms=args.admission_wait_ms)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(d) for d in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
