"""`python -m pixelrnn.web` itself: its limit flags, the port check `make web` runs first, and
Ctrl-C, which ends it quietly whether it is still importing (a second or two) or serving. No
Triton server is needed: the gateway starts without one and says so per request."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pixelrnn.server.launcher import free_port
from tests.deployment import REPO, require, wait_for

require("fastapi")
require("uvicorn")
from pixelrnn.web.__main__ import main  # noqa: E402

WAIT_S = 30.0


def test_limit_flags_are_checked(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--max-streams", "0"])
    assert e.value.code == 2 and "streams must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--max-streams-per-client", "9", "--max-streams", "8"])
    assert "more than streams" in capsys.readouterr().err


def test_the_port_check_says_whether_the_port_is_free(capsys):
    port = free_port()
    assert main(["--port", str(port), "--check-port"]) == 0
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        assert main(["--port", str(port), "--check-port"]) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def importing(pid: int) -> bool:
    """Whether the gateway process `pid` is inside its heavy imports: numpy's core extension is
    mapped (only pixelrnn.web.gateway, imported in main(), brings it in), so main() has begun."""
    try:
        return "_multiarray_umath" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def interrupted(when: str) -> tuple[int, str]:
    """Start the gateway, SIGINT it while it imports ("importing") or once it serves ("serving")
    -> (exit code, output)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "pixelrnn.web", "--triton", "127.0.0.1:1", "--port", str(port)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               # a terminal's Ctrl-C: SIGINT handled as by default, whatever this process inherited
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        def serving():
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0
        ready = (lambda: importing(process.pid)) if when == "importing" else serving
        _, ok = wait_for(lambda: ready() or process.poll() is not None, bool, WAIT_S, 0.005)
        assert ok and process.poll() is None, f"the gateway did not get to {when}"
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=WAIT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, output


def test_ctrl_c_ends_the_gateway_quietly_while_it_imports_and_while_it_serves():
    for when in ("importing", "serving"):
        code, output = interrupted(when)
        assert "Traceback" not in output and code == 130, f"SIGINT while {when}: exit code {code}\n{output}"
        assert ("web page:" in output) == (when == "serving"), f"SIGINT while {when}:\n{output}"


def test_credential_flags_are_checked_before_anything_is_served(tmp_path, capsys, monkeypatch):
    """--token needs TLS and --root-cert a readable PEM: one line each, and the token unseen."""
    monkeypatch.delenv("PIXELRNN_TOKEN", raising=False)
    with pytest.raises(SystemExit):
        main(["--token", "s3cret-token", "--check-port"])
    err = capsys.readouterr().err
    assert "over TLS only" in err and "s3cret-token" not in err
    with pytest.raises(SystemExit):
        main(["--root-cert", str(tmp_path / "missing.pem"), "--check-port"])
    assert "cannot read the root certificate" in capsys.readouterr().err
