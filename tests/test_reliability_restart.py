"""Restart: tritonserver killed with SIGKILL mid-stream (the server and its backend stubs, as in a
crash) gives the client one clear error; a server restarted on the same repository and ports
serves again, and the client resumes the image from the rows it already has (a KNOWN prefix,
by hand or with PixelClient's retries): under the same seed it ends with the uninterrupted
run's image, which is export.cells.sample_cached's.

A kill follows the k-th row the client reads: the reading thread freezes the server (SIGSTOP to
its process group) at once, then the kill (tests/deployment.kill_hard) and the restart run on
another thread. The models are tall (256 and 64 + 128 rows) and tiny, so the freeze lands
mid-image unless the server made and sent every remaining row between the client's read and
the freeze. Nothing outside the server can pace it, so that stays possible on a busy machine:
then the kill missed, and the test tries again with the next seed, up to len(SEEDS) tries, as
its name says; a test that needed more than one try says so in a KillRetried warning and in its
`kill_tries` property (junit XML)."""
import os
import re
import signal
import threading
import warnings

import numpy as np
import pytest

from tests.deployment import Tiny, export_models, kill_hard, launch, require

require("tritonclient.grpc")

from pixelrnn.client import cli  # noqa: E402
from pixelrnn.client.library import ClientError, PixelClient, assemble  # noqa: E402
from pixelrnn.export.cells import build_cell, sample_cached  # noqa: E402
from pixelrnn.server.launcher import TritonServer  # noqa: E402

pytestmark = [pytest.mark.triton, pytest.mark.reliability]

MODELS = {
    "tall": ("gated_pixelcnn", dict(in_channels=1, height=256, width=4, levels=2, hidden=6, layers=1, kernel=3)),
    # Streams a 64-row small image (stage 0), then the 128-row full one (stage 1).
    "ms": ("multiscale", dict(in_channels=1, height=128, width=4, levels=2, base_arch="gated_pixelcnn", hidden=6, layers=1,
                              small_config=dict(kernel=3), big_config=dict(kernel=3))),
}
SMALL_ROWS = 64
SEEDS = (11, 12, 13)  # one more try for each kill that came after the image was done
LOST = r"lost the connection to the Triton server at 127\.0\.0\.1:\d+ after (\d+) rows \(.+\)"


class KillRetried(UserWarning):
    """A kill came after the server had finished the image: the test tried again."""


def report_tries(record_property, tries: int, what: str) -> None:
    record_property("kill_tries", tries)
    if tries > 1:
        warnings.warn(KillRetried(f"{what}: {tries - 1} kill(s) came after the image was done; landed on try {tries} of {len(SEEDS)}"))


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """{name: (repository, torch model)}: a repository per model, so a (re)start loads two models."""
    root = tmp_path_factory.mktemp("restart")
    models = {}
    for name, (arch, config) in MODELS.items():
        exported = export_models(root, [Tiny(name, arch, config)], root / f"{name}-repository")
        models[name] = (root / f"{name}-repository", exported[name].model)
    return models


class Crashable:
    """A server that can crash (tests/deployment.kill_hard: SIGKILL to its process group,
    tritonserver and its backend stubs) and start again on the same repository and ports."""

    def __init__(self, repository, logs):
        self.repository, self.logs, self.starts = repository, logs, 0
        self.server = self._start({})
        self.ports = dict(self.server.ports)

    def _start(self, ports) -> TritonServer:
        self.starts += 1
        return launch(self.repository, self.logs / f"triton-{self.starts}.log", grpc_port=ports.get("grpc"),
                      http_port=ports.get("http"), metrics_port=ports.get("metrics"))

    @property
    def url(self) -> str:
        return self.server.grpc_url

    def freeze(self) -> None:
        """SIGSTOP the server's process group: it makes and sends nothing more (kill() follows)."""
        os.killpg(self.server.process.pid, signal.SIGSTOP)

    def kill(self) -> None:
        kill_hard(self.server)

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
    restarts it (unless restart=False). The reading thread calls row(k) after its k-th row: at
    `rows` it freezes the server itself, at once, and waits there for the kill before it reads on."""

    def __init__(self, crash: Crashable, rows: int, restart: bool = True):
        self.crash = crash
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
        if k == self.rows and not self.reached.is_set():  # not again in a resumed stream: the server is a new one
            self.crash.freeze()
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


def test_kill_mid_stream_is_one_clear_error_and_a_restarted_server_continues_from_the_prefix__3_seeds_for_a_kill_mid_image(
        deployed, servers, record_property):
    crash, model, h = servers("tall"), deployed["tall"][1], MODELS["tall"][1]["height"]
    client = PixelClient(crash.url, "tall")
    for tries, seed in enumerate(SEEDS, 1):
        crash.ensure_up()
        want = client.sample_images(1, seed=seed)  # the uninterrupted run
        rows, lost = CrashAfter(crash, 3, restart=False).read(client.sample(1, seed=seed))
        if lost is not None:
            break
    else:
        pytest.fail("every kill came after the image was done")
    report_tries(record_property, tries, "kill mid-stream")
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
def test_retries_carry_multiscale_sampling_across_a_kill_and_restart__3_seeds_for_a_kill_mid_image(
        deployed, servers, record_property, kill_at, where):
    crash, model, n, h = servers("ms"), deployed["ms"][1], 2, MODELS["ms"][1]["height"]
    client = PixelClient(crash.url, "ms")
    for tries, seed in enumerate(SEEDS, 1):
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
    report_tries(record_property, tries, f"multi-scale, kill in the {where}")
    np.testing.assert_array_equal(want, expected(model, n, seed))
    assert len(notes) == 2, notes
    received = int(lost.group(1))
    assert kill_at <= received < len(uninterrupted)
    full_rows = max(0, received - SMALL_ROWS)
    assert notes[1] == f"the server is back: resuming from row {full_rows} of {h}"
    client.close()


def test_cli_retries_say_where_they_resume_and_give_the_uninterrupted_image__3_seeds_for_a_kill_mid_image(
        deployed, servers, tmp_path, capsys, monkeypatch, record_property):
    crash, h, real, npy = servers("tall"), MODELS["tall"][1]["height"], PixelClient._stream, tmp_path / "samples.npy"
    for tries, seed in enumerate(SEEDS, 1):
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
    report_tries(record_property, tries, "CLI retries")
    assert len(lost) == 1, err
    assert f"warning: the server is back: resuming from row {lost[0].group(1)} of {h}" in lines, err
