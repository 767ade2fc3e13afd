"""server/launcher.py and `python -m pixelrnn.server`: clear failures (no binary, port taken, a model that
does not load) and, on a real tritonserver with a trivial model, start-up, endpoints and a clean
stop on SIGINT / SIGTERM."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pixelrnn.server.launcher import ServerError, TritonServer, find_tritonserver, load_failures
from tests.deployment import require

REPO = Path(__file__).resolve().parent.parent

ECHO_CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "X" data_type: TYPE_INT32 dims: [ 1 ] }} ]
output [ {{ name: "Y" data_type: TYPE_INT32 dims: [ 1 ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""
ECHO_MODEL = """import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        {init}

    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy())])
                for r in requests]
"""


def model(repository: Path, name: str, init: str = "pass") -> None:
    (repository / name / "1").mkdir(parents=True)
    (repository / name / "config.pbtxt").write_text(ECHO_CONFIG.format(name=name))
    (repository / name / "1" / "model.py").write_text(ECHO_MODEL.format(init=init))


def have_server() -> bool:
    try:
        find_tritonserver()
        return True
    except ServerError:
        return False


def test_missing_binary_repository_and_models_are_reported(tmp_path):
    with pytest.raises(ServerError, match="tritonserver not found at /nowhere/tritonserver: run `make setup`"):
        TritonServer(tmp_path, binary="/nowhere/tritonserver").start()
    if have_server():
        with pytest.raises(ServerError, match="does not exist"):
            TritonServer(tmp_path / "absent").start()
        with pytest.raises(ServerError, match="holds no model"):
            TritonServer(tmp_path).start()


@pytest.mark.skipif(not have_server(), reason="tritonserver not installed (make setup)")
def test_a_port_in_use_is_reported_before_starting(tmp_path):
    model(tmp_path, "echo")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = TritonServer(tmp_path, http_port=port)
        with pytest.raises(ServerError, match=f"http port {port} on 127.0.0.1 is already in use"):
            server.start()
        assert server.process is None
    with pytest.raises(ServerError, match="given twice"):
        TritonServer(tmp_path, http_port=port, grpc_port=port).start()


def test_load_failures_are_read_from_the_log():
    log = ("E1123 17:01:16.2 1 model_lifecycle.cc:654] \"failed to load 'broken' version 1: Internal: ValueError: nope\\n\\nAt:\\n  model.py(6)\\n\"\n"
           "| broken | 1       | UNAVAILABLE: Internal: ValueError: nope |\n"
           "| other  | 1       | UNAVAILABLE: Invalid argument: bad config |\n"
           "| fine   | 1       | READY  |\n")
    assert load_failures(log) == ["broken: Internal: ValueError: nope\n    At:\n      model.py(6)", "other: Invalid argument: bad config"]


@pytest.mark.triton
@pytest.mark.skipif(not have_server(), reason="tritonserver not installed (make setup)")
def test_a_model_that_fails_to_load_is_named(tmp_path):
    model(tmp_path, "fine")
    model(tmp_path, "broken", init='raise ValueError("no weights here")')
    server = TritonServer(tmp_path, startup_timeout=60)
    t0 = time.monotonic()
    with pytest.raises(ServerError) as info:
        server.start()
    message = str(info.value)
    assert "exited with code 1" in message and "broken:" in message and "no weights here" in message, message
    assert "fine:" not in message and not server.running() and time.monotonic() - t0 < 30


def start_cli(repository: Path) -> tuple[subprocess.Popen, list[int], str]:
    """`python -m pixelrnn.server` on free ports (gRPC, HTTP, metrics), once it says it is ready."""
    ports = []
    for _ in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    cli = subprocess.Popen([sys.executable, "-m", "pixelrnn.server", "--repository", str(repository), "--grpc-port", str(ports[0]),
                            "--http-port", str(ports[1]), "--metrics-port", str(ports[2]), "--log", str(repository / "log")],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in cli.stdout:
        lines.append(line)
        if line.strip().startswith("log"):
            break
    return cli, ports, "".join(lines)


@pytest.mark.triton
@pytest.mark.skipif(not have_server(), reason="tritonserver not installed (make setup)")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_serves_until_a_signal_and_stops_cleanly(tmp_path, signum):
    model(tmp_path, "echo")
    cli, ports, text = start_cli(tmp_path)
    try:
        assert "tritonserver ready: models echo" in text, text + cli.stderr.read()
        assert f"127.0.0.1:{ports[0]}" in text and f"http://127.0.0.1:{ports[1]}" in text and f"127.0.0.1:{ports[2]}/metrics" in text
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/v2/models/echo/ready", timeout=5) as r:
            assert r.status == 200
        cli.send_signal(signum)
        out, err = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 0, err
    assert "tritonserver stopped (exit code 0)" in out
    with pytest.raises(OSError):  # the server is gone with it
        urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/v2/health/live", timeout=2)


@pytest.mark.triton
@pytest.mark.skipif(not have_server(), reason="tritonserver not installed (make setup)")
def test_cli_stops_although_a_client_holds_a_stream_open(tmp_path):
    """Triton 2.51 does not exit while a client holds a gRPC stream open: the launcher kills it
    once its models are unloaded, and the stop still counts as clean."""
    grpcclient = require("tritonclient.grpc")
    model(tmp_path, "echo")
    cli, ports, text = start_cli(tmp_path)
    client = None
    try:
        assert "tritonserver ready: models echo" in text, text + cli.stderr.read()
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{ports[0]}")
        client.start_stream(callback=lambda result, error: None)
        cli.send_signal(signal.SIGINT)
        out, err = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
        if client is not None:
            client.stop_stream(cancel_requests=True)
            client.close()
    assert cli.returncode == 0, out + err
    assert "tritonserver stopped: it unloaded its models but had not exited" in out and out.rstrip().endswith("; killed")
    assert "[pixelrnn] killed tritonserver (SIGKILL)" in (tmp_path / "log").read_text()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/v2/health/live", timeout=2)


def test_cli_fails_with_a_message(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pixelrnn.server", "--repository", str(tmp_path / "absent")],
                            cwd=REPO, capture_output=True, text=True, timeout=60, env={**os.environ, "TRITONSERVER": "/nowhere/ts"})
    assert result.returncode == 1 and "error: tritonserver not found at /nowhere/ts" in result.stderr
