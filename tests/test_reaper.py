"""server/reaper.py without Triton: stand-in processes named as tritonserver's backend stubs and
files in /dev/shm named as their regions. end_server ends exactly the server with the prefix;
the watchdog ends its watched servers when its launcher dies, and none once told they are done.
(tests/test_server_stop.py does the same with real servers.)"""
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pixelrnn.server import reaper
from tests.deployment import BUSY_SLACK_S, wait_for

END_S = reaper.END_WAIT_S + BUSY_SLACK_S


def stub(prefix: str) -> subprocess.Popen:
    """A process that looks like a backend stub of the server with this prefix (its program's
    name, the region name among its arguments)."""
    command = f"exec -a /x/triton_python_backend_stub {shlex.quote(sys.executable)} -c 'import time; time.sleep(600)' {prefix}0123"
    return subprocess.Popen(["bash", "-c", command])


def region(prefix: str) -> Path:
    path = Path("/dev/shm") / f"{prefix}0123"
    path.write_bytes(b"\0")
    return path


@pytest.fixture
def prefixes():
    made = [reaper.unique_prefix() + f"{k}-" for k in range(2)]
    yield made
    for prefix in made:  # whatever a failed test left
        reaper.end_server(prefix, wait_s=1)


def test_end_server_ends_that_server_only(prefixes):
    mine, other = prefixes
    processes, regions = [stub(mine), stub(other)], [region(mine), region(other)]
    try:
        assert wait_for(lambda: reaper.server_processes(mine), lambda found: found == [processes[0].pid], END_S)[1]
        ended = reaper.end_server(mine)
        assert ended == {"killed": [processes[0].pid], "removed": [str(regions[0])], "alive": []}
        assert processes[0].wait(END_S) == -signal.SIGKILL and not regions[0].exists()
        assert processes[1].poll() is None and regions[1].exists()  # another server's
    finally:
        for process in processes:
            process.kill()
            process.wait()


# A launcher stand-in: starts the watchdog as server/launcher.py does, has it watch one prefix
# (and, with "done", tells it the server is done), then waits to be killed.
LAUNCHER = r"""
import json, subprocess, sys, time
prefix, done = sys.argv[1], sys.argv[2] == "done"
watchdog = subprocess.Popen([sys.executable, "-I", "-S", sys.argv[3]], stdin=subprocess.PIPE, start_new_session=True)
watchdog.stdin.write((json.dumps({"watch": prefix, "log": sys.argv[4]}) + "\n").encode())
if done:
    watchdog.stdin.write((json.dumps({"done": prefix}) + "\n").encode())
watchdog.stdin.flush()
print(watchdog.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("done", [False, True], ids=["watched", "done"])
def test_the_watchdog_ends_a_watched_server_when_its_launcher_dies(prefixes, tmp_path, done):
    prefix, log = prefixes[0], tmp_path / "log"
    process, path = stub(prefix), region(prefix)
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, prefix, "done" if done else "watch", reaper.__file__, str(log)],
                                stdout=subprocess.PIPE, text=True)
    try:
        watchdog = int(launcher.stdout.readline())
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        # The watchdog exits once it has done what it had to: then the outcome is final.
        assert wait_for(lambda: Path(f"/proc/{watchdog}/cmdline").exists() and Path(f"/proc/{watchdog}/cmdline").read_bytes(),
                        lambda alive: not alive, END_S)[1], "the watchdog did not exit"
        if done:
            assert process.poll() is None and path.exists() and not log.exists()
        else:
            assert process.wait(END_S) == -signal.SIGKILL and not path.exists()
            assert "went away without stopping this tritonserver: killed 1 process(es)" in log.read_text()
    finally:
        if launcher.poll() is None:
            launcher.kill()
        process.kill()
        process.wait()
