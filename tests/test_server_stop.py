"""A stop that always ends everything (server/launcher.py, server/reaper.py, the sampler's
finalize in server/triton_models/sample_model.py), on a real tritonserver:

- 30 stops with sampling streams open mid-image: in half of them the clients close their
  streams while the server stops (it lets the images finish, unloads and exits by itself, code
  0); in the other half they keep them open, which Triton 2.51 cannot exit past (its gRPC
  shutdown waits for them), and the launcher kills it once its models are unloaded or its exit
  timeout expired. Either way no process and no shared-memory region of the server is left;
- a model whose finalize hangs holding the GIL (what a metrics push stuck in Metric.set did):
  tritonserver gives up after its exit timeout and leaves the stub; the launcher kills it and
  removes its region;
- a launcher killed with SIGKILL while streams are open: its watchdog ends the server.

"Left" is what server/reaper.py finds by the server's unique shared-memory prefix: tritonserver
and backend stub processes (by command line, whoever their parent is) and /dev/shm regions."""
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pixelrnn.server import reaper
from pixelrnn.server.launcher import TritonServer
from tests.deployment import BUSY_SLACK_S, Tiny, export_models, require, require_tritonserver, wait_for
from tests.test_server_launcher import model

require("tritonclient.grpc")

from pixelrnn.client.stream import SampleStream, sample_inputs  # noqa: E402

pytestmark = [pytest.mark.triton, pytest.mark.reliability]

REPO = Path(__file__).resolve().parent.parent
# Tall enough that a stream is mid-image when the server is told to stop (256 rows of 3 pixels),
# small enough that the images in flight end well inside tritonserver's exit timeout.
CONFIG = dict(in_channels=1, height=256, width=3, levels=2, num_classes=0, hidden=4, layers=1, kernel=3)
MODEL = "stop_sample"
CYCLES, LANES = 30, 3  # servers run LANES at a time: most of a start or a stop is waiting
STREAMS = 3  # per cycle, each mid-image at the stop, plus one sequence left open (MAX_ROWS without END)
END_S = reaper.END_WAIT_S + BUSY_SLACK_S  # bound on the watchdog's clean-up once the launcher is gone


def left(prefix: str) -> tuple[list[int], list[str]]:
    return reaper.server_processes(prefix), reaper.shm_regions(prefix)


@pytest.fixture(scope="module")
def sampler_only(tmp_path_factory):
    """A repository holding one tiny sampler (its scorer removed: one stub per server)."""
    require_tritonserver()
    root = tmp_path_factory.mktemp("stop")
    repository = root / "repository"
    export_models(root, [Tiny("stop", "gated_pixelcnn", CONFIG, max_batch=4, writer=dict(sequence_idle_s=30.0))], repository)
    for folder in repository.iterdir():
        if folder.name != MODEL:
            subprocess.run(["rm", "-rf", str(folder)], check=True)
    return repository


def open_streams(url: str, first_id: int) -> list[SampleStream]:
    """STREAMS streams each a few rows into an image, and one whose sequence is left open (its
    last request answered, no END: Triton counts it in flight until the END or its idle timeout)."""
    streams = []
    for k in range(STREAMS + 1):
        stream = SampleStream(url, timeout=60.0)
        streams.append(stream)
        if k < STREAMS:
            stream.send(MODEL, first_id + k, sample_inputs(seed=k), start=True, end=True)
        else:
            stream.send(MODEL, first_id + k, sample_inputs(seed=k, max_rows=2), start=True, end=False)
        stream.take_rows(2)
    return streams


def cycle(repository: Path, logs: Path, k: int) -> dict:
    """Start, open streams, stop: clients that leave during the stop (even k) or stay (odd k)."""
    leave = k % 2 == 0
    # Staying clients hold the stop until tritonserver's exit timeout: a short one only saves time.
    server = TritonServer(repository, log_path=logs / f"triton-{k}.log", startup_timeout=120,
                          extra_args=[] if leave else ["--exit-timeout-secs=3"])
    server.start()
    streams, rows, code = [], [], None
    try:
        streams = open_streams(server.grpc_url, 100 * (k + 1))
        if leave:
            with ThreadPoolExecutor(1) as stopper:
                stopping = stopper.submit(server.stop)
                # As clients that go away properly: the open sequence ended, then every stream
                # half-closed, which waits for the rest of its image.
                assert streams[-1].request(MODEL, 100 * (k + 1) + STREAMS, sample_inputs(max_rows=0), end=True).error is None
                assert all(stream.close(timeout=60) for stream in streams), f"cycle {k}: a stream did not close"
                code = stopping.result()
            rows = [sum(len(r.rows) for r in stream.received()) for stream in streams[:STREAMS]]
        else:
            code = server.stop()
    finally:
        server.stop()
        for stream in streams:
            stream.close(cancel=True, timeout=30)
    return {"cycle": k, "code": code, "stopped": server.stopped, "rows": rows, "left": left(server.shm_prefix),
            "log": str(server.log_path)}


@pytest.mark.slow
def test_stops_with_streams_open_end_everything(sampler_only, tmp_path):
    with ThreadPoolExecutor(LANES) as pool:
        results = list(pool.map(lambda k: cycle(sampler_only, tmp_path, k), range(CYCLES)))
    assert all(r["left"] == ([], []) for r in results), [r for r in results if r["left"] != ([], [])]
    leaving, staying = results[::2], results[1::2]
    # Clients gone: the images in flight finished (every row after the 2 taken), then a clean exit.
    assert all(r["code"] == 0 and r["stopped"] == "exited" for r in leaving), leaving
    assert all(r["rows"] == [CONFIG["height"] - 2] * STREAMS for r in leaving), leaving
    # Clients still there: killed once Triton had unloaded its models or given up on them.
    assert all(r["stopped"] in ("unloaded", "gave up") for r in staying), staying


def test_a_stub_that_never_finishes_is_killed_at_the_stop(tmp_path):
    require_tritonserver()
    # Held GIL, never returns: the stub can neither finish nor exit when its parent goes away.
    model(tmp_path, "echo", init="pass\n\n    def finalize(self):\n        import ctypes\n        ctypes.PyDLL(None).sleep(3600)")
    server = TritonServer(tmp_path, log_path=tmp_path / "triton.log", startup_timeout=60,
                          extra_args=["--exit-timeout-secs=1"])  # Triton's last flag wins: give up at once
    server.start()
    processes, regions = left(server.shm_prefix)
    assert len(processes) == 2 and len(regions) == 1, (processes, regions)  # tritonserver, the stub; its region
    code = server.stop()
    assert code != 0 and "Exit timeout expired" in server.log(), server.log()[-2000:]
    assert server.leftovers["killed"] == [p for p in processes if p != server.process.pid], server.leftovers
    assert server.leftovers["removed"] == regions and not server.leftovers["alive"]
    assert left(server.shm_prefix) == ([], [])
    assert "leaving some of it behind: killed 1 process(es)" in server.log()


# A launcher in a process of its own: it starts the server, says its prefix, then waits to be killed.
LAUNCHER = r"""
import sys, time
from pixelrnn.server.launcher import TritonServer
server = TritonServer(sys.argv[1], log_path=sys.argv[2], startup_timeout=120).start()
print(server.shm_prefix, server.process.pid, server.grpc_url, flush=True)
time.sleep(3600)
"""


def test_a_killed_launcher_leaves_no_server(sampler_only, tmp_path):
    log = tmp_path / "triton.log"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(sampler_only), str(log)], cwd=REPO,
                                stdout=subprocess.PIPE, text=True)
    streams = []
    try:
        prefix, pid, url = launcher.stdout.readline().split()
        processes, regions = left(prefix)
        assert int(pid) in processes and len(processes) == 2 and len(regions) == 1, (processes, regions)
        streams = open_streams(url, 1)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(30)
        found, gone = wait_for(lambda: left(prefix), lambda found: found == ([], []), END_S)
        assert gone, f"left behind by a launcher killed with SIGKILL: {found}"
        assert f"the launcher (pid {launcher.pid}) went away without stopping this tritonserver: killed 2 process(es)" in log.read_text()
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for stream in streams:
            stream.close(cancel=True, timeout=30)
