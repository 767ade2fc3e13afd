"""Restart: tritonserver killed with SIGKILL mid-stream (the server and its backend stubs, as in a
crash) gives the client one clear error; a server restarted on the same repository and ports
serves again, and the client resumes the image from the rows it already has (a KNOWN prefix,
by hand or with PixelClient's retries): under the same seed it ends with the uninterrupted
run's image, which is export.cells.sample_cached's. The models are tall (128 and 64 rows) and
tiny, so a kill a few rows in lands well before the image is done."""
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tritonclient.grpc")

from client import cli  # noqa: E402
from client.library import ClientError, PixelClient, assemble  # noqa: E402
from export.cells import build_cell, sample_cached  # noqa: E402
from server.launcher import ServerError, TritonServer, find_tritonserver  # noqa: E402
from training.checkpoint import load_model, save_checkpoint  # noqa: E402
from training.models import build_model  # noqa: E402

pytestmark = [pytest.mark.triton, pytest.mark.reliability]

try:
    find_tritonserver()
except ServerError as e:  # pragma: no cover - `make setup` installs it
    pytest.skip(str(e), allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
MODELS = {
    "tall": ("gated_pixelcnn", dict(in_channels=1, height=128, width=4, levels=2, hidden=6, layers=1, kernel=3)),
    # Streams a 32-row small image (stage 0), then the 64-row full one (stage 1).
    "ms": ("multiscale", dict(in_channels=1, height=64, width=4, levels=2, base_arch="gated_pixelcnn", hidden=6, layers=1,
                              small_config=dict(kernel=3), big_config=dict(kernel=3))),
}
SMALL_ROWS = 32
LOST = r"lost the connection to the Triton server at 127\.0\.0\.1:\d+ after (\d+) rows \(.+\)"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """(repository, {name: torch model}): both models exported into one repository."""
    root = tmp_path_factory.mktemp("restart")
    models = {}
    for name, (arch, config) in MODELS.items():
        torch.manual_seed(1)
        save_checkpoint(root / f"{name}.pt", {"arch": arch, "config": config, "model": build_model(arch, dict(config)).state_dict(), "step": 1})
        result = subprocess.run([sys.executable, str(REPO / "export" / "build_engine.py"), "--checkpoint", str(root / f"{name}.pt"),
                                 "--out", str(root / name), "--name", name, "--tensorrt", "off", "--repository", str(root / "repository")],
                                capture_output=True, text=True, timeout=300, cwd=REPO)
        assert result.returncode == 0, result.stdout + result.stderr
        models[name] = load_model(root / f"{name}.pt")[0]
    return root / "repository", models


class Crashable:
    """A server that can crash (SIGKILL to its process group: tritonserver and its backend
    stubs) and start again on the same repository and ports."""

    def __init__(self, repository, logs):
        self.repository, self.logs, self.starts = repository, logs, 0
        self.server = self._start({})
        self.ports = dict(self.server.ports)

    def _start(self, ports) -> TritonServer:
        self.starts += 1
        return TritonServer(self.repository, grpc_port=ports.get("grpc"), http_port=ports.get("http"),
                            metrics_port=ports.get("metrics"), log_path=self.logs / f"triton-{self.starts}.log").start()

    @property
    def url(self) -> str:
        return self.server.grpc_url

    def kill(self) -> None:
        os.killpg(self.server.process.pid, signal.SIGKILL)
        self.server.process.wait()

    def restart(self) -> None:
        self.server = self._start(self.ports)
        assert self.server.ports == self.ports

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def server(deployed, tmp_path_factory):
    """One server for the module (starts are the slow part): each test crashes and restarts it."""
    server = Crashable(deployed[0], tmp_path_factory.mktemp("logs"))
    yield server
    server.stop()


@pytest.fixture
def crash(server):
    if not server.server.running():  # an earlier test left it down
        server.restart()
    return server


def expected(model, n, seed):
    return sample_cached(build_cell(model), n, seed, 1.0, None, None, 0)


def crash_after(crash: Crashable, rows: int, restart: bool = True):
    """A background thread that kills the server once `reached` is set, then restarts it. The
    sampling thread sets `reached` after `rows` rows and waits for `killed` before reading on:
    the server needs tens of milliseconds for the rest of a tall image, the kill follows within
    about one, so it lands mid-image (the tests check that it did)."""
    reached, killed, errors = threading.Event(), threading.Event(), []

    def run():
        try:
            assert reached.wait(60), "the client never got its rows"
            crash.kill()
            killed.set()
            if restart:
                crash.restart()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)
            killed.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def at(k: int) -> None:
        if k == rows:
            reached.set()
            assert killed.wait(60)
    return thread, at, errors


def test_kill_mid_stream_is_one_clear_error_and_a_restarted_server_continues_from_the_prefix(deployed, crash):
    model, seed, h = deployed[1]["tall"], 11, MODELS["tall"][1]["height"]
    client = PixelClient(crash.url, "tall")
    want = client.sample_images(1, seed=seed)  # the uninterrupted run
    np.testing.assert_array_equal(want, expected(model, 1, seed))

    rows = []
    with pytest.raises(ClientError) as lost:
        for row in client.sample(1, seed=seed):
            rows.append(row)
            if len(rows) == 3:
                crash.kill()
    message = str(lost.value)
    assert "\n" not in message and re.fullmatch(LOST, message), message
    assert int(re.fullmatch(LOST, message).group(1)) == len(rows) and 3 <= len(rows) < h, "the kill came after the image was done"

    # While it is down: every call says so in one line.
    with pytest.raises(ClientError, match=r"^cannot reach the Triton server at 127\.0\.0\.1:\d+ \(.*\)$"):
        client.sample_images(1, seed=seed)
    with pytest.raises(ClientError, match=r"^cannot reach the Triton server at 127\.0\.0\.1:\d+ \(.*\)$"):
        PixelClient(crash.url, "tall")

    crash.restart()  # same repository, same ports: the client's address still holds
    prefix = assemble(rows)  # (1, C, R, W)
    resumed = client.sample_images(1, seed=seed, known=prefix, known_rows=prefix.shape[2])
    np.testing.assert_array_equal(resumed, want)
    client.close()


@pytest.mark.parametrize("name, kill_at, where", [
    ("tall", 5, "image"),
    ("ms", 3, "small image"),  # only full-image rows make a prefix: it starts over, same seed
    ("ms", SMALL_ROWS + 5, "full image"),
])
def test_retries_carry_sampling_across_a_kill_and_restart(deployed, crash, name, kill_at, where):
    model, seed, n, h = deployed[1][name], 23, 2, MODELS[name][1]["height"]
    client = PixelClient(crash.url, name)
    want = client.sample_images(n, seed=seed)
    np.testing.assert_array_equal(want, expected(model, n, seed))
    uninterrupted = [(r.stage, r.index) for r in client.sample(n, seed=seed)]

    starts = crash.starts
    thread, at, errors = crash_after(crash, kill_at)
    notes, rows = [], []
    for row in client.sample(n, seed=seed, retries=2, retry_wait_s=60, on_retry=notes.append):
        rows.append(row)
        at(len(rows))
    thread.join(60)
    assert not errors, errors
    assert crash.starts == starts + 1

    np.testing.assert_array_equal(assemble(rows, client.info.shape), want)
    assert [(r.stage, r.index) for r in rows] == uninterrupted  # every row once, in order
    assert len(notes) == 2, notes
    waiting = re.fullmatch(LOST + r"; waiting up to 60 s for it \(retry 1 of 2\)", notes[0])
    assert waiting, notes[0]
    received = int(waiting.group(1))
    assert kill_at <= received < len(uninterrupted), "the kill came after the image was done"
    full_rows = received if name == "tall" else max(0, received - SMALL_ROWS)
    if where == "small image":
        assert received < SMALL_ROWS and full_rows == 0
    assert notes[1] == f"the server is back: resuming from row {full_rows} of {h}"
    client.close()


def test_retries_give_up_with_a_clear_error_when_the_server_stays_down(deployed, crash):
    client = PixelClient(crash.url, "tall")
    thread, at, errors = crash_after(crash, 4, restart=False)
    notes = []
    with pytest.raises(ClientError, match=r"^the Triton server at 127\.0\.0\.1:\d+ did not come back with tall_sample ready within 1\.5 s$"):
        for k, _ in enumerate(client.sample(1, seed=3, retries=1, retry_wait_s=1.5, on_retry=notes.append), 1):
            at(k)
    thread.join(10)
    assert not errors and len(notes) == 1 and "retry 1 of 1" in notes[0]
    client.close()


def test_cli_retries_say_where_they_resume_and_give_the_uninterrupted_image(deployed, crash, tmp_path, capsys, monkeypatch):
    seed = 31
    want = expected(deployed[1]["tall"], 1, seed)
    thread, at, errors = crash_after(crash, 6)
    real = PixelClient._stream

    def stream(self, *args):  # counts the rows the CLI receives: the kill comes after the 6th
        for k, row in enumerate(real(self, *args), 1):
            yield row
            at(k)

    monkeypatch.setattr(PixelClient, "_stream", stream)
    npy = tmp_path / "samples.npy"
    code = cli.main(["sample", "--url", crash.url, "--model", "tall", "--n", "1", "--seed", str(seed), "--retries", "1",
                     "--retry-wait", "60", "--out", str(tmp_path / "grid.png"), "--npy", str(npy)])
    thread.join(60)
    assert not errors, errors
    err = capsys.readouterr().err
    assert code == 0, err
    np.testing.assert_array_equal(np.load(npy), want)
    lines = re.split(r"[\r\n]", err)  # tqdm.write clears the progress bar with a carriage return
    lost = [m for m in (re.fullmatch("warning: " + LOST + r"; waiting up to 60 s for it \(retry 1 of 1\)", x) for x in lines) if m]
    assert len(lost) == 1, err
    assert f"warning: the server is back: resuming from row {lost[0].group(1)} of 128" in lines, err
