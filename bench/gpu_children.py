"""The GPU session's child processes (bench/gpu_session.py): the environment they get on the GPU
machine, whose Python may lack some of the project's packages (a stand-in for tqdm) and does not
have the project installed (pixelrnn imported from the checkout), and their bounds in time: each
runs in its own process group, ended whole when its time is up or the session is ended.
"""
from __future__ import annotations

import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

# Packages the project imports that the GPU machine's Python may lack, and what their absence does.
OPTIONAL = {
    "tqdm": "training.train imports it: a stand-in is put on PYTHONPATH",
    "matplotlib": "training.train fails after its last checkpoint, drawing loss_curve.png (last.pt still comes back)",
    "skimage": "only the rgb-patches data set needs it",
    "pytest": "the gpu tests cannot run",
    "onnxruntime": "bench.sampling cannot run its onnx path",
}
TQDM_STUB = '''"""Stand-in written by bench/gpu_session.py where tqdm is not installed: no progress bar."""
import sys


class tqdm:
    def __init__(self, *args, **kwargs):
        pass

    def update(self, n=1):
        pass

    def set_postfix_str(self, *args, **kwargs):
        pass

    def write(self, msg, *args, **kwargs):
        print(msg, file=sys.stderr, flush=True)

    def close(self):
        pass
'''

# Where the project is not installed: `pixelrnn` from the checkout, its subpackages in the folders
# pyproject.toml maps them to (pixelrnn.training in training/, ...: the checkout's root), for
# every Python started with this on PYTHONPATH, before it imports anything. The machine's own
# sitecustomize, if it has one, still runs after it.
SITE_HOOK = '''"""Written by bench/gpu_session.py: pixelrnn from the checkout at ROOT (it is not installed here)."""
import importlib.machinery
import importlib.util
import os
import sys

ROOT = {root!r}


class CheckoutFinder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "pixelrnn":
            return None
        return importlib.util.spec_from_file_location(
            name, os.path.join(ROOT, "pixelrnn", "__init__.py"), submodule_search_locations=[os.path.join(ROOT, "pixelrnn"), ROOT])


sys.meta_path.insert(0, CheckoutFinder)
_here = os.path.dirname(os.path.abspath(__file__))
_next = importlib.machinery.PathFinder.find_spec("sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here])
if _next is not None:
    _next.loader.exec_module(importlib.util.module_from_spec(_next))
'''
ROOT = Path(__file__).resolve().parent.parent


def checkout_imports() -> bool:
    """Make pixelrnn's subpackages importable from the checkout in this process where the project
    is not installed (the GPU machine's Python): pixelrnn is then the checkout's pixelrnn/ alone.
    -> whether that was needed (the children then need SITE_HOOK)."""
    try:
        found = importlib.util.find_spec("pixelrnn.training")
    except ModuleNotFoundError:  # no pixelrnn at all: started outside the checkout's root
        sys.path.insert(0, str(ROOT))
        found = None
    import pixelrnn

    if found is not None and str(ROOT) not in pixelrnn.__path__:  # installed (ROOT in it: done here before)
        return False
    if str(ROOT) not in pixelrnn.__path__:
        pixelrnn.__path__.append(str(ROOT))
    return True


def child_env(workdir: Path) -> tuple[dict, list[str], bool]:
    """The environment of the children, with the stand-ins this Python needs written under
    workdir/stub and put on PYTHONPATH -> (env, optional packages missing, whether pixelrnn comes
    from the checkout)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    missing = [name for name in OPTIONAL if importlib.util.find_spec(name) is None]
    stubs = {"tqdm.py": TQDM_STUB} if "tqdm" in missing else {}
    if checkout_imports():
        stubs["sitecustomize.py"] = SITE_HOOK.format(root=str(ROOT))
    if stubs:
        (workdir / "stub").mkdir(exist_ok=True)
        for name, text in stubs.items():
            (workdir / "stub" / name).write_text(text)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(workdir / "stub"), env.get("PYTHONPATH")]))
    return env, missing, "sitecustomize.py" in stubs


def tail(text: str, lines: int = 40) -> str:
    """The last `lines` lines, each as last drawn: a progress bar redraws its line with \\r."""
    return "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")[-lines:])


LIVE: set = set()  # child processes still running, ended with us (see end_children)


def end_children(signum, frame) -> None:
    """SIGTERM (scripts/gpu_train.sh's last-resort `timeout`): end the children too. They run in
    their own sessions, which the GPU machine would leave running after the call."""
    for proc in list(LIVE):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(128 + signum)


def run_bounded(cmd: list[str], timeout: float, log_path: Path, env: dict | None = None) -> dict:
    """Run `cmd` with stdout+stderr to `log_path`; kill its whole process group after `timeout` s."""
    started = time.monotonic()
    with open(log_path, "wb") as out:
        proc = spawn(cmd, out, env)
        timed_out = wait_or_kill(proc, timeout)
    text = log_path.read_text(errors="replace")
    return {"cmd": shlex.join(cmd), "rc": proc.returncode, "seconds": round(time.monotonic() - started, 1),
            "timed_out": timed_out, "output": text}


def spawn(cmd: list[str], out, env: dict | None) -> subprocess.Popen:
    # Its own process group, so that a timeout ends everything it started (bench re-executes
    # itself, pytest may start processes) and nothing of this process.
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    LIVE.add(proc)
    return proc


def wait_or_kill(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait up to `timeout` s; then SIGTERM the process group, SIGKILL 10 s later. -> whether it was killed."""
    try:
        proc.wait(timeout=max(timeout, 0.1))
        LIVE.discard(proc)
        return False
    except subprocess.TimeoutExpired:
        pass
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    LIVE.discard(proc)
    return True
