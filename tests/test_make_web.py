"""`make web` on a checkout as cloned: it serves the shipped model_repository/ on tritonserver plus
the web gateway, the page lists the shipped model and streams a whole image, and Ctrl-C (SIGINT
to the terminal's process group) stops both, quietly, also while the gateway is still starting."""
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from pixelrnn.server.launcher import free_port
from tests.deployment import REPO, require, require_tritonserver, stop_group, wait_for
from tests.test_make_serve import setup_is_current
from tests.test_web_main import importing

require("fastapi")
require("uvicorn")
pytestmark = [pytest.mark.triton, pytest.mark.slow]

MODEL = "gated_pixelcnn_binarized_mnist"  # what model_repository/ holds
START_S = 150  # tritonserver loads two models and the gateway starts: seconds on a busy machine
STOP_S = 60


def make_web(tmp_path) -> tuple[subprocess.Popen, dict[str, int], object]:
    """`make web` on free ports, its output to tmp_path/make.out: (process, ports, output path)."""
    require_tritonserver()
    ports = {k: free_port() for k in ("GRPC_PORT", "HTTP_PORT", "METRICS_PORT", "WEB_PORT")}
    skip_setup = [] if setup_is_current() else ["-o", "setup"]  # as tests/test_make_serve.py: no reinstall mid-suite
    out = tmp_path / "make.out"
    with open(out, "w") as log:
        process = subprocess.Popen(["make", "--no-print-directory", *skip_setup, "web", *(f"{k}={v}" for k, v in ports.items())],
                                   cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, env={**os.environ, "WEB_LOG_DIR": str(tmp_path / "logs")},
                                   # a terminal's Ctrl-C: SIGINT handled as by default, whatever this process inherited
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return process, ports, out


def ctrl_c(process, out) -> float:
    """SIGINT to make's process group, as a terminal's Ctrl-C: seconds until it ended."""
    os.killpg(process.pid, signal.SIGINT)
    start = time.monotonic()
    try:
        process.wait(STOP_S)
    except subprocess.TimeoutExpired:
        stop_group(process)
        pytest.fail(f"make web still running {STOP_S} s after Ctrl-C:\n{out.read_text()}")
    return time.monotonic() - start


def gateway_importing(group: int) -> bool:
    """Whether the gateway process (`python -m pixelrnn.web --triton ...`) of process group `group`
    is inside its imports (tests/test_web_main.py importing)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.getpgid(int(proc.name)) == group and b"--triton" in (proc / "cmdline").read_bytes():
                return importing(int(proc.name))
        except (OSError, ProcessLookupError):
            continue
    return False


def test_make_web_serves_the_shipped_model_and_stops_on_ctrl_c(tmp_path):
    process, ports, out = make_web(tmp_path)
    url = f"http://127.0.0.1:{ports['WEB_PORT']}"
    try:
        _, up = wait_for(lambda: "web page: http://localhost:" in out.read_text() or process.poll() is not None, bool, START_S, 0.2)
        assert up and process.poll() is None, f"make web did not come up:\n{out.read_text()}"

        def models():
            try:
                with urllib.request.urlopen(f"{url}/api/models", timeout=10) as r:
                    return json.loads(r.read())["models"]
            except OSError:
                return None

        listed, ok = wait_for(models, bool, 30, 0.2)
        assert ok, f"the gateway does not answer:\n{out.read_text()}"
        assert [(m["name"], m["shape"], m["levels"]) for m in listed] == [(MODEL, [1, 28, 28], 2)]
        request = urllib.request.Request(f"{url}/api/sample", data=json.dumps({"model": MODEL, "n": 2, "seed": 0}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            lines = [json.loads(x) for x in r.read().decode().splitlines()]
        assert [x["type"] for x in lines] == ["start"] + ["row"] * 28 + ["done"], lines[-1]
        assert len(lines[-1]["nll"]) == 2 and all(v > 0 for v in lines[-1]["nll"])
    finally:
        seconds = ctrl_c(process, out) if process.poll() is None else 0.0
    print(f"make web stopped {seconds:.1f} s after Ctrl-C")
    text = out.read_text()
    assert "Traceback" not in text, text
    assert (tmp_path / "logs" / "server.out").read_text().strip().splitlines()[-1] == "tritonserver stopped (exit code 0)"


def test_ctrl_c_while_the_gateway_starts_stops_make_web_quietly(tmp_path):
    # Once tritonserver is ready the gateway starts: a second or two of imports, where Ctrl-C used
    # to end in a KeyboardInterrupt traceback out of whatever was importing. Ctrl-C while it imports.
    process, ports, out = make_web(tmp_path)
    try:
        _, started = wait_for(lambda: gateway_importing(process.pid) or process.poll() is not None, bool, START_S, 0.005)
        assert started and process.poll() is None, f"make web did not get as far as the gateway:\n{out.read_text()}"
    finally:
        ctrl_c(process, out)
    text = out.read_text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert "web page:" not in text, f"the gateway was already serving: this tried nothing new\n{text}"
    assert (tmp_path / "logs" / "server.out").read_text().strip().splitlines()[-1] == "tritonserver stopped (exit code 0)"
