"""A response send that never returns (Triton 2.51's gRPC stream deadlock: docs/reliability.md,
"Cancelled and abandoned streams" and "A stuck replica"),
injected in the engine (server/engine/outbox.py, "Stuck sends") as a sink whose send_rows blocks on an Event: the
sender is found stuck after stuck_send_s, the other sequences on its thread get every row made
and then a clear UNHEALTHY error (or, when their images were already made, the rest of their
rows and their final message), sequences on the other sender finish untouched, new sequences
avoid the stuck thread, and the engine reports itself unhealthy until the send returns (then
the given-up stream gets its final error). The
bound is a repository setting (stuck_send_s). On Triton, behind nginx: tests/test_cluster.py.
Bounded: stuck_send_s 0.5 s, every wait with its own bound (a few seconds in all)."""
import threading
import time

import numpy as np
import pytest

from pixelrnn.runtime import protocol as p
from pixelrnn.server.engine import Engine
from pixelrnn.runtime.rowloop import SampleSpec
from tests.deployment import BUSY_SLACK_S, REPO
from tests.test_engine import FakeRunner, Sink, solo, wait_for

STUCK_S = 0.5
POLL_S = 0.05
HEIGHT = 12
SENDERS = 2  # integer keys go to sender hash(key) % 2: even keys share the stuck one


class Stuck(Sink):
    """A client stream whose response send hangs, from its first row until `release` is set."""

    def __init__(self):
        super().__init__()
        self.release, self.entered = threading.Event(), threading.Event()

    def send_rows(self, events):
        self.entered.set()
        assert self.release.wait(30)
        super().send_rows(events)


def engine_with_a_stuck_send(max_ahead: int):
    """Sequence 0 hangs sender 0 at its first row; 2 and 4 share that sender, 1 and 3 have the other."""
    engine = Engine(FakeRunner(h=HEIGHT), poll=POLL_S, senders=SENDERS, max_ahead=max_ahead, stuck_send_s=STUCK_S)
    engine.start_worker()
    stuck = Stuck()
    engine.start(0, SampleSpec(seed=100), stuck)
    assert stuck.entered.wait(BUSY_SLACK_S)
    began = time.monotonic()
    sinks = {k: Sink() for k in (1, 2, 3, 4)}
    for k, sink in sinks.items():
        engine.start(k, SampleSpec(seed=k), sink)
    return engine, stuck, sinks, began


def test_sequences_behind_a_stuck_send_end_with_a_clear_error_after_every_row_made():
    engine, stuck, sinks, began = engine_with_a_stuck_send(max_ahead=4)
    try:
        # 2 and 4 stop at max_ahead / 2 rows queued behind the stuck send; 1 and 3 go on to the end.
        for k in (1, 3):
            assert sinks[k].finished.wait(BUSY_SLACK_S) and not sinks[k].errors
            np.testing.assert_array_equal(sinks[k].image(), solo(FakeRunner(h=HEIGHT), SampleSpec(seed=k)))
        bound = STUCK_S + POLL_S + BUSY_SLACK_S
        for k in (2, 4):
            assert sinks[k].finished.wait(bound), f"sequence {k} behind the stuck send got no error within {bound:g} s"
        waited = time.monotonic() - began
        stats = engine.stats()
        for k in (2, 4):
            (message,) = sinks[k].errors
            assert message.startswith(p.UNHEALTHY) and f"sequence {k}, on the same sender thread, is ended" in message
            assert f"has not returned for {STUCK_S:g} s" in message and "sequence 0)" in message
            # Every row made reached the client before the error, in order: it resumes from all of them.
            rows = sinks[k].rows
            assert 0 < len(rows) < HEIGHT and [e.index for e in rows] == list(range(len(rows)))
            want = solo(FakeRunner(h=HEIGHT), SampleSpec(seed=k))
            np.testing.assert_array_equal(sinks[k].image(), want[:, :, :len(rows)])
        assert waited >= STUCK_S  # not before the bound
        assert stats["healthy"] == 0 and stats["stuck_sends"] == 1 and stats["stuck"] == 3  # 0, 2 and 4
        assert stats["live"] == 0 and stats["completed"] == 2
        assert not stuck.finished.is_set() and stuck.rows == []  # nothing more tried on the stuck stream

        # A new sequence of the stuck sender's slot is served by a fresh thread.
        late = Sink()
        engine.start(6, SampleSpec(seed=6), late)
        assert late.finished.wait(BUSY_SLACK_S) and not late.errors
        np.testing.assert_array_equal(late.image(), solo(FakeRunner(h=HEIGHT), SampleSpec(seed=6)))
        assert engine.stats()["healthy"] == 0  # the stuck call has still not returned

        # The stuck call returns at last: its thread ends, after telling that stream, which was
        # given up, why it ends (else its client would wait for its own timeout).
        stuck.release.set()
        assert wait_for(lambda: engine.stats()["healthy"] == 1, BUSY_SLACK_S)
        assert stuck.finished.wait(BUSY_SLACK_S) and len(stuck.responses) == 1  # the one it was stuck in
        (message,) = stuck.errors
        assert message.startswith(p.UNHEALTHY) and f"did not return for {STUCK_S:g} s" in message
        assert all(engine._outbox.pending(k) == 0 for k in range(7))  # no row counted as queued for ever
    finally:
        stuck.release.set()
        engine.stop()


def test_images_made_before_the_stuck_send_was_found_reach_their_clients_whole():
    """With room to run ahead (max_ahead over the image), every image is made whole while the rows
    and final messages of 2 and 4 wait behind the stuck send: the fresh sender delivers all of
    them; no live sequence is left to end, and the stuck stream gets nothing more."""
    engine, stuck, sinks, _ = engine_with_a_stuck_send(max_ahead=4 * HEIGHT)
    try:
        assert wait_for(lambda: engine.stats()["completed"] == 5, BUSY_SLACK_S)
        assert not sinks[2].finished.is_set() and not sinks[4].finished.is_set()  # still behind the stuck send
        for k in (1, 2, 3, 4):
            assert sinks[k].finished.wait(STUCK_S + POLL_S + BUSY_SLACK_S) and not sinks[k].errors
            np.testing.assert_array_equal(sinks[k].image(), solo(FakeRunner(h=HEIGHT), SampleSpec(seed=k)))
        stats = engine.stats()
        assert stats["stuck_sends"] == 1 and stats["stuck"] == 0 and stats["healthy"] == 0
        assert stuck.rows == [] and not stuck.finished.is_set()
    finally:
        stuck.release.set()
        engine.stop()


def test_without_a_bound_a_slow_send_is_only_slow():
    """stuck_send_s 0: a send that takes longer than any bound is waited for; nothing is retired."""
    engine = Engine(FakeRunner(h=4), poll=POLL_S, senders=1, stuck_send_s=0)
    engine.start_worker()
    slow = Stuck()
    try:
        engine.start(0, SampleSpec(seed=3), slow)
        assert slow.entered.wait(BUSY_SLACK_S)
        time.sleep(3 * STUCK_S)
        assert engine.stats()["stuck_sends"] == 0 and engine.stats()["healthy"] == 1
        slow.release.set()
        assert slow.finished.wait(BUSY_SLACK_S) and not slow.errors
        np.testing.assert_array_equal(slow.image(), solo(FakeRunner(h=4), SampleSpec(seed=3)))
    finally:
        slow.release.set()
        engine.stop()


def test_the_bound_is_a_repository_setting_and_a_bad_one_is_refused(tmp_path, capsys):
    """python -m pixelrnn.server.repository --stuck-send-s S writes the sampler's stuck_send_s parameter
    (10 s by default, as the Triton glue reads it); a bound out of range is refused naming it."""
    import json

    from pixelrnn.server.repository import main, write_repository
    from pixelrnn.server.engine import STUCK_SEND_S
    from tests.test_server_repository import config, manifest, onnx_folder

    m = manifest()
    folder = onnx_folder(tmp_path, m)
    (folder / "manifest.json").write_text(json.dumps(m))
    repo = tmp_path / "repo"
    assert main(["--export", str(folder), "--repository", str(repo)]) == 0
    assert config(repo / "tiny_sample" / "config.pbtxt").parameters["stuck_send_s"].string_value == f"{STUCK_SEND_S:g}" == "10"
    assert main(["--export", str(folder), "--repository", str(repo), "--stuck-send-s", "2.5"]) == 0
    assert config(repo / "tiny_sample" / "config.pbtxt").parameters["stuck_send_s"].string_value == "2.5"
    for bad in (-1, 7200):
        with pytest.raises(ValueError, match=rf"stuck_send_s must be in \[0, 3600\] \(0: off\), got {bad}"):
            write_repository(m, folder, repo, stuck_send_s=bad)
    assert main(["--export", str(folder), "--repository", str(repo), "--stuck-send-s", "-3"]) == 2
    assert "stuck_send_s must be in [0, 3600]" in capsys.readouterr().err
    glue = (REPO / "server" / "triton_models" / "sample_model.py").read_text()
    assert 'params.get("stuck_send_s", str(STUCK_SEND_S))' in glue  # the same default when a config lacks it
