"""The row engine's workers (server/engine/worker.py, scheduler.py) without Triton: where a
sequence runs, one budget and one view over all workers, the workers' cell calls running at
once, and the same image for the same seed with one worker or several. tests/test_engine.py
runs every engine test with one worker and with two; the overload and stuck-send tests run here
again with two."""
import functools
import os
import threading

import numpy as np
import pytest

from pixelrnn.runtime.rowloop import SampleSpec
from pixelrnn.runtime.runner import OnnxRunner
from pixelrnn.server.engine import MAX_WORKERS, Engine, Overloaded, default_workers
from tests import test_overload, test_stuck_sender
from tests.test_engine import FakeRunner, Sink, drain, exported, solo  # noqa: F401 - exported: a fixture

# The tests of the budget, the admission queue, the memory trim and stuck sends. Left out: the two
# fairness tests of test_overload, which count one worker's calls (tests/test_engine.py runs
# fairness with two workers), and the stuck-send test whose stuck sequence may be complete, and
# so gone from its worker, before the others start: they then go elsewhere than its sender.
TWICE = [test_overload.test_a_start_over_the_budget_is_refused_at_once_naming_budget_and_load,
         test_overload.test_every_way_out_gives_the_images_back,
         test_overload.test_a_duplicate_or_bad_start_does_not_keep_its_images,
         test_overload.test_a_queued_start_waits_first_come_first_served_and_starts_when_room_frees,
         test_overload.test_a_queued_start_is_refused_at_its_deadline_with_the_overloaded_message,
         test_overload.test_the_worker_refuses_a_waiting_start_at_its_deadline_and_admits_on_release,
         test_overload.test_a_waiting_start_gets_an_error_at_shutdown_and_the_queue_needs_a_budget_and_a_wait,
         test_overload.test_memory_is_given_back_when_the_engine_goes_idle_and_once_more_after_poll,
         test_overload.test_the_trim_comes_after_the_last_sequences_are_freed,
         test_stuck_sender.test_sequences_behind_a_stuck_send_end_with_a_clear_error_after_every_row_made,
         test_stuck_sender.test_without_a_bound_a_slow_send_is_only_slow]


@pytest.mark.parametrize("test", TWICE, ids=lambda t: t.__name__.removeprefix("test_"))
def test_with_two_workers(test, monkeypatch):
    module = test_overload if test.__module__.endswith("test_overload") else test_stuck_sender
    monkeypatch.setattr(module, "Engine", functools.partial(Engine, workers=2))
    test()


def test_a_new_sequence_goes_to_the_least_loaded_worker_and_stays_there():
    runners = [FakeRunner(h=4), FakeRunner(h=4)]
    engine = Engine(runners, max_batch=16)
    sinks = {k: Sink() for k in range(4)}
    engine.start(0, SampleSpec(batch=3, seed=0), sinks[0], max_rows=1, end=False)  # worker 0 (both empty)
    engine.start(1, SampleSpec(batch=1, seed=1), sinks[1], max_rows=1, end=False)  # worker 1: 0 images
    engine.start(2, SampleSpec(batch=1, seed=2), sinks[2], max_rows=1, end=False)  # worker 1: 1 image < 3
    engine.start(3, SampleSpec(batch=2, seed=3), sinks[3], max_rows=1, end=False)  # worker 1 (2 < 3), then 4 images
    drain(engine)
    assert [sorted(w._sequences) for w in engine._workers] == [[0], [1, 2, 3]]
    assert runners[0].calls == [(0, 3)] and runners[1].calls == [(0, 4)]  # each worker its own runner
    more = {k: Sink() for k in sinks}
    for k, sink in more.items():  # the rest of each image, on the worker it started on
        engine.resume(k, sink, end=True)
    drain(engine)
    assert runners[0].calls == [(0, 3)] * 4 and runners[1].calls == [(0, 4)] * 4
    for k, spec in enumerate([SampleSpec(batch=3, seed=0), SampleSpec(seed=1), SampleSpec(seed=2), SampleSpec(batch=2, seed=3)]):
        assert more[k].finished.is_set() and not more[k].errors
        rows = sinks[k].rows + more[k].rows
        np.testing.assert_array_equal(np.stack([e.row for e in rows], axis=2), solo(FakeRunner(h=4), spec))
    stats = engine.stats()  # one view of both workers
    assert (stats["started"], stats["completed"], stats["rows"], stats["calls"], stats["live"]) == (4, 4, 16, 8, 0)
    assert engine._homes == {}  # nothing is kept of sequences that are gone
    late = Sink()  # an id no worker holds any more: answered, not lost
    engine.resume(2, late)
    engine.step()
    assert "not active" in late.errors[0]


def test_one_budget_holds_for_all_workers():
    """Four images in all, whichever worker has room: the fifth is refused though each worker
    alone holds fewer than four."""
    engine = Engine(FakeRunner(h=3), max_batch=2, max_images=4, workers=2)
    for k in range(4):
        engine.start(k, SampleSpec(seed=k), Sink(), max_rows=0, end=False)
    with pytest.raises(Overloaded, match="holds 4 live images, its budget is 4"):
        engine.start(9, SampleSpec(seed=9), Sink())
    drain(engine)
    assert [len(w._sequences) for w in engine._workers] == [2, 2] and engine.stats()["live_images"] == 4
    engine.forget(1)  # ends at once (no open request): room for one more
    engine.step()
    again = Sink()
    engine.start(9, SampleSpec(seed=9), again)
    drain(engine)
    assert again.finished.is_set() and not again.errors and sorted(engine._sequences) == [0, 2, 3]


def test_cancelled_and_idle_sequences_are_freed_on_every_worker():
    now = [0.0]
    engine = Engine(FakeRunner(h=6), idle_timeout=5.0, clock=lambda: now[0], workers=2)
    idle, cancelled = Sink(), Sink()
    engine.start(1, SampleSpec(seed=1), idle, max_rows=1, end=False)  # worker 0
    engine.start(2, SampleSpec(seed=2), cancelled)  # worker 1
    engine.step()
    cancelled.is_cancelled = True
    drain(engine)
    assert cancelled.errors == ["cancelled"] and [len(w._sequences) for w in engine._workers] == [1, 0]
    now[0] = 6.0
    engine.step()
    stats = engine.stats()
    assert (stats["cancelled"], stats["expired"], stats["live"], stats["live_images"]) == (1, 1, 0, 0)


class MeetingRunner(FakeRunner):
    """A cell call that returns only once another call is in progress at the same time (as
    onnxruntime runs, without the GIL): two workers' threads get there, one thread never does."""

    def __init__(self, meeting: threading.Barrier, **kw):
        super().__init__(**kw)
        self.meeting = meeting

    def run_row(self, *args, **kwargs):
        self.meeting.wait()
        return super().run_row(*args, **kwargs)


def test_two_workers_make_their_cell_calls_at_the_same_time():
    meeting = threading.Barrier(2, timeout=10)
    engine = Engine([MeetingRunner(meeting, h=5), MeetingRunner(meeting, h=5)], poll=0.05, senders=1)
    engine.start_worker()
    try:
        sinks = [Sink(), Sink()]
        for k, sink in enumerate(sinks):
            engine.start(k, SampleSpec(seed=k), sink)
        for k, sink in enumerate(sinks):
            assert sink.finished.wait(20) and not sink.errors  # a lone call would have broken the barrier
            np.testing.assert_array_equal(sink.image(), solo(FakeRunner(h=5), SampleSpec(seed=k)))
    finally:
        meeting.abort()  # never leave a worker waiting at the barrier
        engine.stop()


def test_the_same_seed_gives_the_same_image_on_any_number_of_workers(exported):
    """Real cells, worker threads running, sequences of 1 to 3 images with known rows and
    temperatures: every image is the same with 1, 2 and 3 workers, and differs between seeds."""
    _, manifest, folder = exported
    c, h, w = manifest["shape"]
    classes, levels = manifest["num_classes"], manifest["levels"]
    rng = np.random.default_rng(7)
    specs = []
    for k in range(8):
        n = 1 + k % 3
        known = rng.integers(0, levels, (n, c, 2, w)).astype(np.uint8) if k % 4 == 3 else None
        specs.append(SampleSpec(batch=n, temperature=(1.0, 0.7)[k % 2], seed=100 + k, known=known,
                                labels=np.arange(n) % classes if classes else None))
    images = {}
    for workers in (1, 2, 3):
        engine = Engine([OnnxRunner.from_manifest(manifest, folder) for _ in range(workers)], poll=0.05, senders=1)
        engine.start_worker()
        sinks = [Sink() for _ in specs]
        try:
            for k, (spec, sink) in enumerate(zip(specs, sinks)):
                engine.start(k, spec, sink)
            assert all(sink.finished.wait(30) and not sink.errors for sink in sinks)
            assert engine.stats()["calls"] >= workers * h  # every worker had sequences of its own
        finally:
            engine.stop()
        images[workers] = [sink.image(len(engine.stages) - 1) for sink in sinks]
    for a, b, c3 in zip(images[1], images[2], images[3]):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c3)
    assert len({img.tobytes() for img in images[1]}) == len(specs)


def test_workers_must_match_the_runners_and_the_default_leaves_one_usable_core():
    with pytest.raises(ValueError, match="workers must be >= 1"):
        Engine([FakeRunner(), FakeRunner()], workers=3)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        Engine(FakeRunner(), workers=0)
    assert Engine(FakeRunner(), workers=3).workers == 3 and Engine([FakeRunner()] * 2).workers == 2
    assert default_workers() == max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0)) - 1))
