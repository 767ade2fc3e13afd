"""Restart: tritonserver killed with SIGKILL mid-stream (the server and its backend stubs, as in a
crash) gives the client one clear error; a server restarted on the same repository and ports
serves again, and the client resumes the image from the rows it already has (a KNOWN prefix,
by hand or with PixelClient's retries): under the same seed it ends with the uninterrupted
run's image, which is export.cells.sample_cached's.

A kill follows the k-th row the client reads, while the server goes on making rows: the models
are tall (256 and 64 + 128 rows) and tiny so that it lands mid-image, and where a busy machine
lets the server finish first anyway, the test tries again with the next seed."""
import os
import re
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tritonclient.grpc")

from client import cli  # noqa: E402
from client.library import ClientError, PixelClient, assemble  # noqa: E402
from export import build_engine  # noqa: E402
from export.cells import build_cell, sample_cached  # noqa: E402
from server.launcher import ServerError, TritonServer, find_tritonserver  # noqa: E402
from training.checkpoint import load_model, save_checkpoint  # noqa: E402
from training.models import build_model  # noqa: E402

pytestmark = [pytest.mark.triton, pytest.mark.reliability]

try:
    find_tritonserver()
except ServerError as e:  # pragma: no cover - `make setup` installs it
    pytest.skip(str(e), allow_module_level=True)

MODELS = {
    "tall": ("gated_pixelcnn", dict(in_channels=1, height=256, width=4, levels=2, hidden=6, layers=1, kernel=3)),
    # Streams a 64-row small image (stage 0), then the 128-row full one (stage 1).
    "ms": ("multiscale", dict(in_channels=1, height=128, width=4, levels=2, base_arch="gated_pixelcnn", hidden=6, layers=1,
                              small_config=dict(kernel=3), big_config=dict(kernel=3))),
}
SMALL_ROWS = 64
SEEDS = (11, 12, 13)  # one more try for each kill that came after the image was done
LOST = r"lost the connection to the Triton server at 127\.0\.0\.1:\d+ after (\d+) rows \(.+\)"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """{name: (repository, torch model)}: a repository per model, so a (re)start loads two models."""
    root = tmp_path_factory.mktemp("restart")
    models = {}
    for name, (arch, config) in MODELS.items():
        torch.manual_seed(1)
        save_checkpoint(root / f"{name}.pt", {"arch": arch, "config": config, "model": build_model(arch, dict(config)).state_dict(), "step": 1})
        assert build_engine.main(["--checkpoint", str(root / f"{name}.pt"), "--out", str(root / name), "--name", name,
                                  "--tensorrt", "off", "--repository", str(root / f"{name}-repository")]) == 0
        models[name] = (root / f"{name}-repository", load_model(root / f"{name}.pt")[0])
    return models


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
        """The Python backend's shared memory regions outlive a crash (a stopped server removes
        its own): this removes them after the kill."""
        pid = self.server.process.pid
        regions = set(re.findall(r"/dev/shm/triton_python_backend_shm_region_\S+", Path(f"/proc/{pid}/maps").read_text()))
        os.killpg(pid, signal.SIGKILL)
        self.server.process.wait()
        for region in regions:
            Path(region).unlink(missing_ok=True)

    def restart(self) -> None:
        self.server = self._start(self.ports)
        assert self.server.ports == self.ports

    def ensure_up(self) -> None:
        if not self.server.running():  # an earlier test or try left it down
            self.restart()


@pytest.fixture(scope="module")
def servers(deployed, tmp_path_factory):
    """servers(name) -> the model's running server, one for the module (starts are the slow
    part), made on first use: each test crashes and restarts it."""
    made = {}

    def get(name: str) -> Crashable:
        if name not in made:
            made[name] = Crashable(deployed[name][0], tmp_path_factory.mktemp(f"logs-{name}"))
        made[name].ensure_up()
        return made[name]

    yield get
    for server in made.values():
        if server.server.running():
            server.kill()  # quicker than a clean stop, which the other server tests cover


def expected(model, n, seed):
    return sample_cached(build_cell(model), n, seed, 1.0, None, None, 0)


class CrashAfter:
    """A background thread that kills the server once the client has read `rows` rows, then
    restarts it (unless restart=False). The reading thread calls row(k) after its k-th row and
    waits there for the kill before it reads on."""

    def __init__(self, crash: Crashable, rows: int, restart: bool = True):
        self.rows, self.reached, self.killed, self.failures = rows, threading.Event(), threading.Event(), []
        self.thread = threading.Thread(target=self._run, args=(crash, restart), daemon=True)
        self.thread.start()

    def _run(self, crash: Crashable, restart: bool) -> None:
        try:
            assert self.reached.wait(60), "the client never read its rows"
            crash.kill()
            self.killed.set()
            if restart:
                crash.restart()
        except BaseException as e:  # noqa: BLE001 - reported by finish()
            self.failures.append(e)
            self.killed.set()

    def row(self, k: int) -> None:
        if k == self.rows:
            self.reached.set()
            assert self.killed.wait(60)

    def read(self, rows) -> tuple[list, ClientError | None]:
        """Reads the rows of a PixelClient.sample call -> (rows read, the ClientError that ended it or None)."""
        got, error = [], None
        try:
            for row in rows:
                got.append(row)
                self.row(len(got))
        except ClientError as e:
            error = e
        self.finish()
        return got, error

    def finish(self) -> None:
        self.reached.set()
        self.thread.join(60)
        assert not self.failures, self.failures


def test_kill_mid_stream_is_one_clear_error_and_a_restarted_server_continues_from_the_prefix(deployed, servers):
    crash, model, h = servers("tall"), deployed["tall"][1], MODELS["tall"][1]["height"]
    client = PixelClient(crash.url, "tall")
    for seed in SEEDS:
        crash.ensure_up()
        want = client.sample_images(1, seed=seed)  # the uninterrupted run
        rows, lost = CrashAfter(crash, 3, restart=False).read(client.sample(1, seed=seed))
        if lost is not None:
            break
    else:
        pytest.fail("every kill came after the image was done")
    np.testing.assert_array_equal(want, expected(model, 1, seed))
    message = str(lost)
    assert "\n" not in message and re.fullmatch(LOST, message), message
    assert int(re.fullmatch(LOST, message).group(1)) == len(rows) and 3 <= len(rows) < h

    # While it is down: every call says so in one line; retries give up after their wait.
    with pytest.raises(ClientError, match=r"^cannot reach the Triton server at 127\.0\.0\.1:\d+ \(.*\)$"):
        client.sample_images(1, seed=seed)
    with pytest.raises(ClientError, match=r"^cannot reach the Triton server at 127\.0\.0\.1:\d+ \(.*\)$"):
        PixelClient(crash.url, "tall")
    notes = []
    with pytest.raises(ClientError, match=r"^the Triton server at 127\.0\.0\.1:\d+ did not come back with tall_sample ready "
                                          r"within 1\.5 s$"):
        client.sample_images(1, seed=seed, retries=1, retry_wait_s=1.5, on_retry=notes.append)
    assert len(notes) == 1 and notes[0].startswith("cannot reach the Triton server") and "(retry 1 of 1)" in notes[0], notes

    crash.restart()  # same repository, same ports: the client's address still holds
    prefix = assemble(rows)  # (1, C, R, W)
    resumed = client.sample_images(1, seed=seed, known=prefix, known_rows=prefix.shape[2])
    np.testing.assert_array_equal(resumed, want)
    client.close()


@pytest.mark.parametrize("kill_at, where", [  # the single-stage model's retries: the CLI test
    (3, "small image"),  # only full-image rows make a prefix: it starts over, same seed
    (SMALL_ROWS + 5, "full image"),
])
def test_retries_carry_multiscale_sampling_across_a_kill_and_restart(deployed, servers, kill_at, where):
    crash, model, n, h = servers("ms"), deployed["ms"][1], 2, MODELS["ms"][1]["height"]
    client = PixelClient(crash.url, "ms")
    for seed in SEEDS:
        crash.ensure_up()
        want = client.sample_images(n, seed=seed)
        uninterrupted = [(r.stage, r.index) for r in client.sample(n, seed=seed)]
        notes = []
        rows, error = CrashAfter(crash, kill_at).read(client.sample(n, seed=seed, retries=2, retry_wait_s=60, on_retry=notes.append))
        assert error is None, error
        # Whether or not the kill came in time, the client returns the uninterrupted run's image.
        np.testing.assert_array_equal(assemble(rows, client.info.shape), want)
        assert [(r.stage, r.index) for r in rows] == uninterrupted  # every row once, in order
        lost = re.fullmatch(LOST + r"; waiting up to 60 s for it \(retry 1 of 2\)", notes[0]) if notes else None
        if lost and (where != "small image" or int(lost.group(1)) < SMALL_ROWS):
            break
    else:
        pytest.fail(f"no kill came in the {where}: {notes}")
    np.testing.assert_array_equal(want, expected(model, n, seed))
    assert len(notes) == 2, notes
    received = int(lost.group(1))
    assert kill_at <= received < len(uninterrupted)
    full_rows = max(0, received - SMALL_ROWS)
    assert notes[1] == f"the server is back: resuming from row {full_rows} of {h}"
    client.close()


def test_cli_retries_say_where_they_resume_and_give_the_uninterrupted_image(deployed, servers, tmp_path, capsys, monkeypatch):
    crash, h, real, npy = servers("tall"), MODELS["tall"][1]["height"], PixelClient._stream, tmp_path / "samples.npy"
    for seed in SEEDS:
        crash.ensure_up()
        crasher = CrashAfter(crash, 6)

        def stream(self, *args):  # counts the rows the CLI reads
            for k, row in enumerate(real(self, *args), 1):
                yield row
                crasher.row(k)

        monkeypatch.setattr(PixelClient, "_stream", stream)
        code = cli.main(["sample", "--url", crash.url, "--model", "tall", "--n", "1", "--seed", str(seed), "--retries", "1",
                         "--retry-wait", "60", "--out", str(tmp_path / "grid.png"), "--npy", str(npy)])
        crasher.finish()
        err = capsys.readouterr().err
        assert code == 0, err
        np.testing.assert_array_equal(np.load(npy), expected(deployed["tall"][1], 1, seed))
        lines = re.split(r"[\r\n]", err)  # tqdm.write clears the progress bar with a carriage return
        lost = [m for m in (re.fullmatch("warning: " + LOST + r"; waiting up to 60 s for it \(retry 1 of 1\)", x) for x in lines) if m]
        if lost:
            break
    else:
        pytest.fail("every kill came after the image was done")
    assert len(lost) == 1, err
    assert f"warning: the server is back: resuming from row {lost[0].group(1)} of {h}" in lines, err
