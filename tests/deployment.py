"""The one deployment fixture of the triton tests: export tiny checkpoints, write a repository,
serve it on tritonserver (free ports), stop it, and clean up what a killed server leaves.

    models = export_models(root, [Tiny("gated", "gated_pixelcnn", GATED, max_batch=4)], root / "repository")
    with serve(root / "repository", root / "triton.log") as server:
        ...  # server.grpc_url; models["gated"].model / .manifest / .export_dir

Components that `make setup` installs (tritonserver, tritonclient, hypothesis, ...) are
required through `require_tritonserver` / `require`: without one the tests skip, naming it and
the command that installs it; where CI is set, a missing component fails instead.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import os
import re
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NoReturn, TypeVar

import pytest
import torch

from pixelrnn.export import build_engine
from pixelrnn.server.repository import write_repository
from pixelrnn.server.engine import Engine
from pixelrnn.runtime.manifest import read_manifest
from pixelrnn.server.launcher import ServerError, TritonServer, find_tritonserver
from pixelrnn.training.checkpoint import load_model, save_checkpoint
from pixelrnn.training.models import build_model

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
# What a busy 2-core machine (training runs, other test processes) may add to the time of any
# one event a test waits for: scheduling stalls of the server, its stubs or the test itself.
# Bounds on how soon something must happen are the configured period plus this.
BUSY_SLACK_S = 5.0


@dataclass
class Tiny:
    """A randomly initialised checkpoint to export: small enough to export in seconds.
    `writer`: this model's repository writer options (sequence_idle_s, sender_threads, ...)."""

    name: str
    arch: str
    config: dict
    max_batch: int = 64
    seed: int = 1
    writer: dict = field(default_factory=dict)


@dataclass
class Exported:
    model: torch.nn.Module  # the checkpoint's model, for in-process expectations
    manifest: dict
    export_dir: Path
    checkpoint: Path
    extra: dict = field(default_factory=dict)


def missing(what: str) -> NoReturn:
    """Skip (tests, fixtures or a whole module) because `what` is missing; under CI, fail."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must run every test; `make setup` installs it)", pytrace=False)
    pytest.skip(f"{what}; install it with `make setup`", allow_module_level=True)


def require(module: str):
    """Import and return `module` (e.g. "tritonclient.grpc", "hypothesis"), which `make setup`
    installs: instead of pytest.importorskip, so that CI fails where it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing(f"{module} cannot be imported ({e})")


def require_tritonserver() -> None:
    """Skip (or, under CI, fail) when `make setup` has not installed tritonserver."""
    try:
        find_tritonserver()
    except ServerError as e:
        missing(str(e))


def export_models(root: Path, models: list[Tiny], repository: Path | None = None, **writer) -> dict[str, Exported]:
    """Save and export (parity-checked) each model; with `repository`, write it there with the
    repository writer's keyword arguments `writer` and the model's own (Tiny.writer). A model
    without writer options goes through `build_engine --repository` itself, as a user's would."""
    out = {}
    for tiny in models:
        torch.manual_seed(tiny.seed)
        ckpt = root / f"{tiny.name}.pt"
        save_checkpoint(ckpt, {"arch": tiny.arch, "config": dict(tiny.config),
                               "model": build_model(tiny.arch, dict(tiny.config)).state_dict(), "step": 1})
        folder = root / f"{tiny.name}_export"
        options = {**writer, **tiny.writer}
        cli = repository is not None and not options
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            code = build_engine.main(["--checkpoint", str(ckpt), "--out", str(folder), "--name", tiny.name, "--tensorrt", "off",
                                      "--max-batch", str(tiny.max_batch), *(["--repository", str(repository)] if cli else [])])
        assert code == 0, f"export of {tiny.name} failed:\n{printed.getvalue()[-3000:]}"
        manifest = read_manifest(folder)
        if cli:
            assert f"Triton model repository written to {repository}" in printed.getvalue()
        elif repository is not None:
            write_repository(manifest, folder, repository, **options)
        out[tiny.name] = Exported(load_model(ckpt)[0], manifest, folder, ckpt)
    return out


METADATA = ("levels", "num_classes", "stage_rows")


def set_metadata(config_path: Path, values: dict | None) -> None:
    """Give a written config.pbtxt exactly these metadata parameters (None: none of them, as a
    repository written by other means may lack them), keeping its other parameters."""
    text = config_path.read_text()
    block = re.search(r"parameters \[\n(.*?)\n\]\n", text, re.S)
    entries = [e.rstrip(",") for e in block.group(1).split("\n") if not any(f'key: "{k}"' in e for k in METADATA)]
    entries += [f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in (values or {}).items()]
    config_path.write_text(text[:block.start()] + "parameters [\n" + ",\n".join(entries) + "\n]\n" + text[block.end():])


def launch(repository: Path, log_path: Path, **launcher) -> TritonServer:
    """A started tritonserver for `repository`; launcher keyword arguments: grpc_port, http_port,
    metrics_port (free ones unless given), venv, ... The caller stops it (or kill_hard)."""
    require_tritonserver()
    return TritonServer(repository, log_path=log_path, **launcher).start()


@contextlib.contextmanager
def serve(repository: Path, log_path: Path, **launcher):
    """A running tritonserver for `repository` (launch's keyword arguments), stopped after."""
    server = launch(repository, log_path, **launcher)
    try:
        yield server
    finally:
        server.stop()


def kill_hard(server: TritonServer) -> None:
    """SIGKILL the server's process group and remove the Python backend's shared-memory regions,
    which outlive a crash (a server stopped cleanly removes its own)."""
    pid = server.process.pid
    regions = set(re.findall(r"/dev/shm/triton_python_backend_shm_region_\S+", Path(f"/proc/{pid}/maps").read_text()))
    os.killpg(pid, signal.SIGKILL)
    server.process.wait(timeout=30)
    for region in regions:
        Path(region).unlink(missing_ok=True)


def sampler_metrics(server: TritonServer, model: str) -> dict[str, int]:
    """One sampler model's own metrics, {"live": sequences held, "live_images": their images,
    "budget": the live-images budget, "healthy", "waiting": STARTs in the admission queue,
    "cell_seconds": seconds in cell calls (a float), event: count}, as Triton's
    metrics endpoint shows them (the model pushes them every 0.5 s; {} before its first push)."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    found = {}
    for name, labels, value in re.findall(r"^(pixelrnn_sampler_\w+)\{([^}]*)\} (\S+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if labels.get("model") == model:
            gauge = {"pixelrnn_sampler_live_sequences": "live", "pixelrnn_sampler_live_images": "live_images",
                     "pixelrnn_sampler_images_budget": "budget", "pixelrnn_sampler_healthy": "healthy",
                     "pixelrnn_sampler_waiting_starts": "waiting"}.get(name)
            if name == "pixelrnn_sampler_cell_seconds_total":
                found["cell_seconds"] = float(value)
                continue
            found[gauge or labels["event"]] = int(float(value))
    return found


def sampler_periods() -> dict[str, float]:
    """How often the sampler looks at things, for bounds derived from them: CANCEL_CHECK_S (a
    request's is_cancelled polling) and METRICS_PERIOD_S (metrics pushes), read from the Triton
    glue server/triton_models/sample_model.py (it imports Triton's own module, so it cannot be
    imported here), and ENGINE_POLL_S, the engine's default housekeeping period (idle expiry)."""
    text = (REPO / "server" / "triton_models" / "sample_model.py").read_text()
    found = {k: float(re.search(rf"^{k} = ([0-9.]+)", text, re.M).group(1)) for k in ("CANCEL_CHECK_S", "METRICS_PERIOD_S")}
    found["ENGINE_POLL_S"] = float(inspect.signature(Engine).parameters["poll"].default)
    return found


def wait_for(probe: Callable[[], T], ok: Callable[[T], bool], timeout: float, interval: float = 0.05) -> tuple[T, bool]:
    """Call probe() until ok(its value) or `timeout` s have passed -> (the last value, whether ok)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if ok(value):
            return value, True
        if time.monotonic() >= deadline:
            return value, False
        time.sleep(interval)


def stop_group(process, wait_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL, the process group of `process` (started with start_new_session),
    each given `wait_s` to end it: what a test does with a command that ran past its bound."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        if process.poll() is None:
            os.killpg(process.pid, signum)
            try:
                process.wait(wait_s)
            except subprocess.TimeoutExpired:
                pass
