"""`make demo`'s script end to end, in its short mode (DEMO_SHORT=1: fewer images, every step):
evaluate, export, serve on tritonserver, stream samples, complete, score, stop."""
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.deployment import REPO, require, require_tritonserver, stop_group

TIMEOUT_S = 300  # about 45 s on the busy 2-core machine


def servers_of(repository: Path) -> list[int]:
    """Pids of tritonserver processes serving `repository`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"tritonserver") and f"--model-repository={repository}".encode() in args:
            found.append(int(proc.name))
    return found


def stop(process: subprocess.Popen, repository: Path) -> None:
    """After a timeout: SIGTERM the demo (its EXIT trap stops the server), then SIGKILL, then the
    server it started (own session) if still there."""
    stop_group(process, 20)
    for pid in servers_of(repository):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.triton
@pytest.mark.slow
def test_short_demo_runs_end_to_end(tmp_path):
    require_tritonserver()
    require("tritonclient.grpc")
    out = tmp_path / "demo"
    repository = (out / "repository").resolve()
    env = {**os.environ, "DEMO_SHORT": "1", "DEMO_OUT": str(out)}
    start = time.monotonic()
    process = subprocess.Popen(["bash", "scripts/demo.sh"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stop(process, repository)
        pytest.fail(f"the short demo still running after {TIMEOUT_S} s")
    seconds = time.monotonic() - start
    print(f"short demo: {seconds:.1f} s")
    assert process.returncode == 0, output[-4000:]
    steps = re.findall(r"^== (\d)\.", output, re.M)
    assert steps == [str(i) for i in range(1, 8)], output[-4000:]  # every step ran, in order
    assert "== demo done" in output
    for name in ("samples.png", "samples.npy", "completions.png", "valid1.npy"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "repository" / "demo_score" / "config.pbtxt").is_file()
    assert '"images": 4' in output  # 4 streamed samples (short mode)
    # The score lines: one per streamed sample (file, index, NLL nats, bits/dim), then the mean.
    assert len(re.findall(rf"^{re.escape(str(out / 'samples.npy'))}\s+\d+\s+\d+\.\d+\s+\d+\.\d+$", output, re.M)) >= 3, output[-2000:]
    assert re.search(r"^mean\s+5\s+\d+\.\d+\s+\d+\.\d+$", output, re.M), output[-2000:]
    # The server stopped cleanly, and nothing is left of it.
    assert (out / "server.out").read_text().strip().splitlines()[-1] == "tritonserver stopped (exit code 0)"
    assert servers_of(repository) == []
