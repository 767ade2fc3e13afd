"""server/engine/ without Triton: a fake runner checks the batching and bookkeeping; the real
ONNX runner checks that the engine's images are export.cells.sample_cached's images. Every test
runs with one worker and with two (`workers`); where the calls differ, each count is given."""
import threading
import time

import numpy as np
import pytest
import torch

from pixelrnn.export import build_engine
from pixelrnn.export.cells import build_cell, sample_cached
from pixelrnn.runtime import rowloop
from pixelrnn.server.engine import Engine
from pixelrnn.runtime.rowloop import SampleSpec, Stage
from pixelrnn.runtime.manifest import read_manifest
from pixelrnn.runtime.runner import OnnxRunner
from pixelrnn.training.checkpoint import save_checkpoint
from pixelrnn.training.models import build_model


class FakeRunner:
    """Row values from the uniforms, offset by a per-image row counter kept in the state, so a
    state that is split or concatenated wrongly shows in the values."""

    levels, num_classes, factor = 4, 0, 1

    def __init__(self, c=1, h=4, w=3, fail_calls=()):
        self.stages = [Stage("cell", c, h, w)]
        self.calls = []  # (stage, batch)
        self.fail_calls = set(fail_calls)

    def initial_state(self, stage, batch):
        return (np.zeros((batch, 1), np.float32),)

    def run_row(self, stage, state, uniforms, temperature, forced, force, labels=None, condition=None, fixed=None):
        self.calls.append((stage, forced.shape[0]))
        if len(self.calls) in self.fail_calls:
            raise RuntimeError("boom")
        (count,) = state
        w, c, b = uniforms.shape
        drawn = (np.floor(uniforms * self.levels).astype(np.int64).transpose(2, 1, 0) + count[:, :, None].astype(np.int64)) % self.levels
        row = np.where(force[:, None, None], forced, drawn)  # (B, C, W)
        return row, -count[:, 0], (count + 1,)


def solo(runner, spec: SampleSpec) -> np.ndarray:
    """The image one sequence should get: the row loop with the runner on its own."""
    return rowloop.sample(runner, spec).astype(np.int64)


class Sink:
    def __init__(self):
        self.rows, self.errors, self.finished, self.is_cancelled = [], [], threading.Event(), False
        self.responses = []  # rows per send_rows call (one response each)

    def send_rows(self, events):
        assert not self.finished.is_set(), "row after the final message"
        first = events[0]
        assert [(e.stage, e.index) for e in events] == [(first.stage, first.index + j) for j in range(len(events))], \
            "a response's rows must be consecutive rows of one stage"
        self.responses.append(len(events))
        self.rows += events

    def done(self):
        assert not self.finished.is_set(), "two final messages"
        self.finished.set()

    def error(self, message):
        self.errors.append(message)
        self.finished.set()

    def cancelled(self):
        return self.is_cancelled

    def image(self, stage=0):
        rows = [e for e in self.rows if e.stage == stage]
        assert [e.index for e in rows] == list(range(len(rows)))
        return np.stack([e.row for e in rows], axis=2)  # (B, C, H, W)


@pytest.fixture(params=[1, 2], ids=["1-worker", "2-workers"])
def workers(request) -> int:
    """Engine workers (server/engine/worker.py): with two, sequences are spread over both, each
    worker batching its own; with 1 and 2 sequences 0, 1, 2, ... of one image each go to worker
    0, then alternate."""
    return request.param


def drain(engine, limit=100):
    for _ in range(limit):
        if not engine.step():
            return
    raise AssertionError("engine did not settle")


def test_all_sequences_advance_in_one_batched_call_per_step(workers):
    runner = FakeRunner()
    engine = Engine(runner, max_batch=16, workers=workers)
    specs = {7: SampleSpec(batch=1, seed=1), 8: SampleSpec(batch=2, seed=2), 9: SampleSpec(batch=3, seed=3, temperature=0.5)}
    sinks = {k: Sink() for k in specs}
    for k, spec in specs.items():
        engine.start(k, spec, sinks[k])
    drain(engine)
    if workers == 1:
        assert runner.calls == [(0, 6)] * 4  # 4 rows, all three sequences in every call
        assert {e.batched for s in sinks.values() for e in s.rows} == {6}
    else:  # 7 and 9 (4 images) on worker 0, 8 (2 images, the least loaded then) on worker 1
        assert runner.calls == [(0, 4), (0, 2)] * 4
        assert {e.batched for k in (7, 9) for e in sinks[k].rows} == {4} and {e.batched for e in sinks[8].rows} == {2}
    for k, spec in specs.items():
        assert sinks[k].finished.is_set() and not sinks[k].errors
        np.testing.assert_array_equal(sinks[k].image(), solo(FakeRunner(), spec))
        assert all(e.row.dtype == np.uint8 and e.row.shape == (spec.batch, 1, 3) and e.logprob.shape == (spec.batch,) for e in sinks[k].rows)
    assert engine.active == 0


def test_cell_seconds_count_the_time_in_cell_calls_only(workers):
    """stats()["cell_seconds"] (the sampler's pixelrnn_sampler_cell_seconds_total): the wall time
    of the batched calls, not of what the engine does around them (a slow sink here)."""
    class SlowRunner(FakeRunner):
        def run_row(self, *args, **kw):
            time.sleep(0.01)
            return super().run_row(*args, **kw)

    class SlowSink(Sink):
        def send_rows(self, events):
            time.sleep(0.1)
            super().send_rows(events)

    engine = Engine(SlowRunner(h=4), max_batch=16, workers=workers)
    assert engine.stats()["cell_seconds"] == 0.0
    engine.start(1, SampleSpec(seed=1), SlowSink())
    engine.start(2, SampleSpec(seed=2), SlowSink())
    drain(engine)
    stats = engine.stats()
    # 4 calls of >= 10 ms per worker (one sequence each with two); the 8 row sends (inline, 0.1 s
    # each) are not in it, even on a slow machine.
    assert stats["calls"] == 4 * workers and 4 * workers * 0.01 <= stats["cell_seconds"] < 8 * 0.1 / 2, stats


def test_calls_hold_at_most_max_batch_images_and_late_sequences_join(workers):
    runner = FakeRunner()
    engine = Engine(runner, max_batch=4, workers=workers)
    a, b, c = Sink(), Sink(), Sink()
    engine.start(1, SampleSpec(batch=3, seed=1), a)
    engine.start(2, SampleSpec(batch=3, seed=2), b)
    engine.step()  # 6 images do not fit one call: one call per step, the least served first
    engine.step()  # (two workers: one sequence each, one call each per step)
    assert runner.calls == [(0, 3), (0, 3)] * workers
    engine.start(3, SampleSpec(batch=1, seed=3), c)  # joins the running ones at its own row 0
    engine.step()  # level with them (3 image-rows each), and the smaller first at the tie
    assert runner.calls[2 * workers:] == ([(0, 4)] if workers == 1 else [(0, 4), (0, 3)])
    drain(engine)
    for sink, spec in ((a, SampleSpec(batch=3, seed=1)), (b, SampleSpec(batch=3, seed=2)), (c, SampleSpec(batch=1, seed=3))):
        np.testing.assert_array_equal(sink.image(), solo(FakeRunner(), spec))


def test_known_rows_are_kept_and_still_consume_their_uniforms(workers):
    known = np.random.default_rng(0).integers(0, 4, (2, 1, 2, 3))
    spec = SampleSpec(batch=2, seed=5, known=known)
    sink = Sink()
    engine = Engine(FakeRunner(), workers=workers)
    engine.start(1, spec, sink)
    drain(engine)
    image = sink.image()
    np.testing.assert_array_equal(image[:, :, :2], known)
    np.testing.assert_array_equal(image, solo(FakeRunner(), SampleSpec(batch=2, seed=5, known=known)))


def test_rows_are_handed_out_per_request_and_end_frees_the_state(workers):
    engine = Engine(FakeRunner(), workers=workers)
    first, second, third = Sink(), Sink(), Sink()
    engine.start(1, SampleSpec(seed=4), first, max_rows=1, end=False)
    engine.resume(1, second, max_rows=2)
    drain(engine)
    assert [e.index for e in first.rows] == [0] and [e.index for e in second.rows] == [1, 2]
    assert first.finished.is_set() and second.finished.is_set() and engine.active == 1
    engine.resume(1, third, max_rows=0, end=True)  # a cancel: no rows, state freed
    drain(engine)
    assert third.finished.is_set() and not third.rows and engine.active == 0
    late = Sink()
    engine.resume(1, late)
    engine.step()
    assert late.errors and "not active" in late.errors[0]


def test_resumed_rows_continue_the_same_image(workers):
    engine = Engine(FakeRunner(), workers=workers)
    a, b = Sink(), Sink()
    engine.start(1, SampleSpec(seed=9), a, max_rows=2, end=False)
    drain(engine)
    engine.resume(1, b, max_rows=None, end=True)
    drain(engine)
    events = a.rows + b.rows
    assert [e.index for e in events] == [0, 1, 2, 3] and engine.active == 0
    np.testing.assert_array_equal(np.stack([e.row for e in events], axis=2), solo(FakeRunner(), SampleSpec(seed=9)))


def test_idle_sequences_expire(workers):
    now = [0.0]
    engine = Engine(FakeRunner(), idle_timeout=5.0, clock=lambda: now[0], workers=workers)
    engine.start(1, SampleSpec(), Sink(), max_rows=1, end=False)
    engine.start(2, SampleSpec(), Sink(), max_rows=1, end=False)
    drain(engine)
    assert engine.active == 2
    now[0] = 4.0
    engine.resume(2, Sink(), max_rows=1)  # activity keeps sequence 2
    drain(engine)
    now[0] = 6.0
    engine.step()
    assert engine.active == 1
    now[0] = 9.5
    engine.step()
    assert engine.active == 0


def test_a_failing_call_fails_only_its_sequences_and_the_engine_goes_on(workers):
    runner = FakeRunner(fail_calls={2})
    engine = Engine(runner, workers=workers)
    a, b = Sink(), Sink()
    engine.start(1, SampleSpec(seed=1), a)
    engine.start(2, SampleSpec(seed=2), b)
    drain(engine)
    if workers == 1:  # the second call held both
        for sink in (a, b):
            assert len(sink.rows) == 1 and sink.errors and "boom" in sink.errors[0]
    else:  # the second call was worker 1's first, for b alone
        assert len(a.rows) == 4 and not a.errors and not b.rows and "boom" in b.errors[0]
    assert engine.active == 0
    c = Sink()
    engine.start(3, SampleSpec(seed=3), c)
    drain(engine)
    assert len(c.rows) == 4 and not c.errors


def test_cancelled_and_failing_sinks_free_their_sequences(workers):
    class Broken(Sink):
        def send_rows(self, events):
            raise ConnectionError("gone")

    engine = Engine(FakeRunner(), workers=workers)
    a, broken, ok = Sink(), Broken(), Sink()
    engine.start(1, SampleSpec(), a)
    engine.start(2, SampleSpec(), broken)
    engine.start(3, SampleSpec(), ok)
    engine.step()
    a.is_cancelled = True
    drain(engine)
    assert len(a.rows) == 1 and engine.active == 0 and len(ok.rows) == 4 and ok.finished.is_set()


def test_a_refused_second_start_with_end_ends_the_live_sequence_after_its_open_request(workers):
    # Triton forgets a sequence id at an END flag, even on a refused request: the live sequence
    # can get no more requests, so it ends once what it already asked for is streamed.
    engine = Engine(FakeRunner(), workers=workers)
    idle, busy = Sink(), Sink()
    engine.start(1, SampleSpec(seed=1), idle, max_rows=1, end=False)
    engine.start(2, SampleSpec(seed=2), busy, max_rows=3, end=False)
    engine.step()  # sequence 1 has sent its row; sequence 2 still owes two
    engine.start(1, SampleSpec(), refused1 := Sink(), end=True)
    engine.start(2, SampleSpec(), refused2 := Sink(), end=True)
    drain(engine)
    assert "already active" in refused1.errors[0] and "already active" in refused2.errors[0]
    assert engine.active == 0 and len(idle.rows) == 1 and len(busy.rows) == 3 and not busy.errors and busy.finished.is_set()
    assert engine.stats()["ended"] == 2


def test_a_forgotten_sequence_ends_after_its_open_request_and_an_unknown_one_is_ignored(workers):
    engine = Engine(FakeRunner(), workers=workers)
    idle, busy = Sink(), Sink()
    engine.start(1, SampleSpec(seed=1), idle, max_rows=1, end=False)
    engine.start(2, SampleSpec(seed=2), busy, max_rows=3, end=False)
    engine.step()
    for key in (1, 2, 99):
        engine.forget(key)
    drain(engine)
    assert engine.active == 0 and len(idle.rows) == 1 and len(busy.rows) == 3 and not busy.errors and busy.finished.is_set()
    stats = engine.stats()
    assert stats["ended"] == 2 and stats["refused"] == 0


def test_a_second_start_for_a_live_sequence_is_refused_and_the_first_goes_on(workers):
    engine = Engine(FakeRunner(), workers=workers)
    first, second = Sink(), Sink()
    engine.start(1, SampleSpec(seed=1), first)
    engine.step()
    engine.start(1, SampleSpec(seed=2), second)
    drain(engine)
    assert not second.rows and "already active" in second.errors[0]
    assert not first.errors
    np.testing.assert_array_equal(first.image(), solo(FakeRunner(), SampleSpec(seed=1)))
    stats = engine.stats()
    assert stats["live"] == 0 and stats["started"] == 1 and stats["completed"] == 1 and stats["refused"] == 1
    again = Sink()  # the id is free again once the image is complete
    engine.start(1, SampleSpec(seed=2), again)
    drain(engine)
    np.testing.assert_array_equal(again.image(), solo(FakeRunner(), SampleSpec(seed=2)))


@pytest.mark.parametrize("spec, message", [
    (SampleSpec(batch=0), "BATCH_SIZE"), (SampleSpec(batch=99), "BATCH_SIZE"),
    (SampleSpec(temperature=-1.0), "TEMPERATURE"), (SampleSpec(temperature=float("nan")), "TEMPERATURE"),
    (SampleSpec(seed=-1), "SEED"), (SampleSpec(labels=np.array([1])), "not class-conditional"),
    (SampleSpec(known=np.zeros((1, 1, 2, 5), np.uint8)), "KNOWN must be 1 x 1 x R x 3"),
    (SampleSpec(known=np.zeros((1, 1, 5, 3), np.uint8)), "R <= 4"),
    (SampleSpec(known=np.full((1, 1, 2, 3), 4, np.uint8)), "must be < 4"),
])
def test_bad_parameters_are_refused_with_a_message(spec, message, workers):
    engine = Engine(FakeRunner(), max_batch=8, workers=workers)
    with pytest.raises(ValueError, match=message):
        engine.start(1, spec, Sink())
    with pytest.raises(ValueError, match="MAX_ROWS"):
        engine.resume(1, Sink(), max_rows=-1)


def test_class_labels_are_required_and_broadcast(workers):
    runner = FakeRunner()
    runner.num_classes = 3
    engine = Engine(runner, workers=workers)
    with pytest.raises(ValueError, match="LABELS"):
        engine.start(1, SampleSpec(batch=2), Sink())
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        engine.start(1, SampleSpec(batch=2, labels=np.array([3])), Sink())
    spec = SampleSpec(batch=2, labels=np.array([2]))
    engine.start(1, spec, Sink())
    assert spec.labels.tolist() == [2, 2]


def test_the_worker_thread_serves_sequences_and_stops_cleanly(workers):
    engine = Engine(FakeRunner(h=6), poll=0.05, workers=workers)
    engine.start_worker()
    sinks = [Sink() for _ in range(3)]
    for k, sink in enumerate(sinks):
        engine.start(k + 1, SampleSpec(seed=k), sink)
    for sink in sinks:
        assert sink.finished.wait(10) and len(sink.rows) == 6
    pending = Sink()
    engine.start(9, SampleSpec(), pending, max_rows=0, end=False)
    engine.resume(9, pending2 := Sink(), max_rows=None)
    engine.stop()
    assert pending2.finished.is_set()
    with pytest.raises(RuntimeError, match="shutting down"):
        engine.start(10, SampleSpec(), Sink())


def test_sender_threads_keep_each_stream_in_order_and_drop_broken_clients(workers):
    class Slow(Sink):  # a send that takes time, as a Triton response does, lets the engine run ahead
        def send_rows(self, events):
            threading.Event().wait(0.002)
            super().send_rows(events)

    class Broken(Sink):
        def send_rows(self, events):
            raise ConnectionError("gone")

    runner = FakeRunner(h=6)
    engine = Engine(runner, poll=0.05, senders=3, workers=workers)
    engine.start_worker()
    specs = [SampleSpec(seed=k) for k in range(8)]
    sinks = [Slow() for _ in specs]
    broken = Broken()
    engine.start(99, SampleSpec(seed=99), broken)
    for k, (spec, sink) in enumerate(zip(specs, sinks)):
        engine.start(k, spec, sink)
    for spec, sink in zip(specs, sinks):
        assert sink.finished.wait(10) and not sink.errors
        np.testing.assert_array_equal(sink.image(), solo(FakeRunner(h=6), spec))  # rows in order, none lost
    deadline = threading.Event()
    for _ in range(100):
        if engine.stats()["live"] == 0:
            break
        deadline.wait(0.05)
    stats = engine.stats()
    engine.stop()
    assert stats["live"] == 0 and stats["completed"] + stats["disconnected"] == 9 and stats["started"] == 9
    assert len(broken.rows) == 0


# ------------------------------------------------------------------------------ real ONNX cells

GATED = dict(in_channels=1, height=5, width=4, levels=4, num_classes=2, hidden=6, layers=1, kernel=3)
MULTISCALE = dict(in_channels=1, height=6, width=4, levels=3, num_classes=0, base_arch="gated_pixelcnn", hidden=6, layers=1,
                  small_config=dict(kernel=3), big_config=dict(kernel=3))


@pytest.fixture(scope="module", params=[("gated_pixelcnn", GATED), ("multiscale", MULTISCALE)], ids=["gated", "multiscale"])
def exported(request, tmp_path_factory):
    arch, config = request.param
    folder = tmp_path_factory.mktemp(arch)
    torch.manual_seed(0)
    model = build_model(arch, dict(config))
    save_checkpoint(folder / "tiny.pt", {"arch": arch, "config": config, "model": model.state_dict(), "step": 1})
    assert build_engine.main(["--checkpoint", str(folder / "tiny.pt"), "--out", str(folder / "out"), "--tensorrt", "off"]) == 0
    return model, read_manifest(folder / "out"), folder / "out"


def test_engine_images_are_sample_cached_images(exported, workers):
    model, manifest, folder = exported
    runners = [OnnxRunner.from_manifest(manifest, folder) for _ in range(workers)]  # a session of its own each
    runner, engine = runners[0], Engine(runners)
    c, h, w = manifest["shape"]
    conditional = manifest["num_classes"] > 0
    known = np.random.default_rng(1).integers(0, manifest["levels"], (2, c, 3, w)).astype(np.uint8)
    jobs = {
        1: dict(n=2, seed=11, temperature=1.0, labels=[0, 1] if conditional else None, known=None),
        2: dict(n=1, seed=12, temperature=0.0, labels=[1] if conditional else None, known=None),
        3: dict(n=2, seed=13, temperature=0.8, labels=[1, 1] if conditional else None, known=known),
    }
    sinks = {k: Sink() for k in jobs}
    for k, j in jobs.items():
        spec = SampleSpec(j["n"], j["temperature"], j["seed"], None if j["labels"] is None else np.array(j["labels"]), j["known"])
        engine.start(k, spec, sinks[k])
    drain(engine)
    cell = build_cell(model)
    for k, j in jobs.items():
        labels = None if j["labels"] is None else torch.tensor(j["labels"])
        want = sample_cached(cell, j["n"], j["seed"], j["temperature"], labels, j["known"], 0 if j["known"] is None else 3)
        sink = sinks[k]
        assert not sink.errors
        np.testing.assert_array_equal(sink.image(len(runner.stages) - 1), want)
        if j["known"] is not None:
            np.testing.assert_array_equal(want[:, :, :3], known)
    # The three sequences run in step: one call per row of each stage (of each worker).
    assert engine.calls == workers * sum(st.height for st in runner.stages)


def test_requests_after_an_end_and_worker_bugs_get_errors_not_silence(workers):
    engine = Engine(FakeRunner(), workers=workers)
    first, after = Sink(), Sink()
    engine.start(1, SampleSpec(), first, max_rows=1, end=True)
    engine.resume(1, after)
    drain(engine)
    assert len(first.rows) == 1 and first.finished.is_set() and not first.errors
    assert "ended" in after.errors[0] and engine.active == 0

    engine = Engine(FakeRunner(), poll=0.05, workers=workers)
    for worker in engine._workers:
        def step_with_bug(real_step=worker.step):
            if engine.active:  # the step after the sequence opened
                raise KeyError("bug")
            return real_step()

        worker.step = step_with_bug
    engine.start_worker()
    hanging = Sink()
    engine.start(1, SampleSpec(), hanging)
    assert hanging.finished.wait(10) and "internal error" in hanging.errors[0]
    engine.stop()


# ------------------------------------------------------------------------------ backpressure

class Gate(Sink):
    """A client whose sends block until the test lets them through (a stalled stream)."""

    def __init__(self):
        super().__init__()
        self.open = threading.Event()

    def send_rows(self, events):
        assert self.open.wait(10)
        super().send_rows(events)


def wait_for(condition, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_sequence_runs_at_most_max_ahead_rows_ahead_of_its_sender(workers):
    runner = FakeRunner(h=40)
    engine = Engine(runner, poll=0.05, senders=1, max_ahead=4, workers=workers)
    engine.start_worker()
    gate = Gate()
    engine.start(1, SampleSpec(seed=5), gate)
    # Alone, a sequence goes on while at most max_ahead / 2 of its rows wait: 3 rows, then it waits.
    assert wait_for(lambda: engine.stats()["rows"] == 3)
    time.sleep(0.2)  # the sender is stuck on the first row: no further row may be made meanwhile
    assert engine.stats()["rows"] == 3 and len(runner.calls) == 3
    gate.open.set()
    assert gate.finished.wait(10) and not gate.errors
    np.testing.assert_array_equal(gate.image(), solo(FakeRunner(h=40), SampleSpec(seed=5)))
    engine.stop()


def test_rows_that_wait_for_the_sender_go_out_as_one_response(workers):
    """Row coalescing: while a send is stuck, the rows made meanwhile (up to max_ahead) pile up
    and leave in one response; ROWS_PER_RESPONSE caps it (1: one response per row). Images and
    row order stay exactly the row loop's."""
    got = {}
    for per_response in (None, 3, 1):
        runner = FakeRunner(h=12)
        engine = Engine(runner, poll=0.05, senders=1, max_ahead=8, workers=workers)
        engine.start_worker()
        gate = Gate()
        engine.start(1, SampleSpec(seed=4), gate, rows_per_response=per_response)
        assert wait_for(lambda: engine.stats()["rows"] == 5)  # then it waits (max_ahead / 2 + 1, as above)
        gate.open.set()
        assert gate.finished.wait(10) and not gate.errors
        np.testing.assert_array_equal(gate.image(), solo(FakeRunner(h=12), SampleSpec(seed=4)))
        engine.stop()
        got[per_response] = gate.responses
    # The 5 rows made while the first send was stuck leave in at most 2 responses (the first may
    # have gone before the rest were made), never more than max_ahead rows in one.
    assert 5 in (got[None][0], sum(got[None][:2])) and max(got[None]) <= 8 and sum(got[None]) == 12
    assert max(got[3]) == 3 and sum(got[3]) == 12 and len(got[3]) >= 4
    assert got[1] == [1] * 12


class SlowRunner(FakeRunner):
    """A cell call that takes 3 ms: a sender keeps up with it easily."""

    def run_row(self, *args, **kwargs):
        time.sleep(0.003)
        return super().run_row(*args, **kwargs)


def test_linger_lets_rows_gather_but_never_holds_a_first_row_or_strict_pacing(workers):
    got = {}
    for per_response in (None, 1):
        engine = Engine(SlowRunner(h=24), poll=0.05, senders=1, max_ahead=8, linger=0.05, workers=workers)
        engine.start_worker()
        sink = Sink()
        engine.start(1, SampleSpec(seed=6), sink, rows_per_response=per_response)
        assert sink.finished.wait(10) and not sink.errors
        np.testing.assert_array_equal(sink.image(), solo(FakeRunner(h=24), SampleSpec(seed=6)))
        engine.stop()
        got[per_response] = sink.responses
    # The first row is not held (alone, or with the one more row a busy machine let pile up before
    # the sender ran: it is never lingered up to a full pile); then rows gather for up to 50 ms
    # (~16 calls of 3 ms), but a sender holds at most max_ahead / 2 = 4 (where the sequence would
    # otherwise wait for it): responses of 4, more only when the sender fell behind (never over max_ahead).
    assert got[None][0] <= 2 and 1 < max(got[None]) <= 8 and sum(got[None]) == 24 and len(got[None]) <= 12
    assert got[1] == [1] * 24


def test_a_sender_that_keeps_up_sends_every_row_on_its_own(workers):
    engine = Engine(FakeRunner(h=5), workers=workers)  # inline sends: each row is sent before the next is made
    sink = Sink()
    engine.start(1, SampleSpec(seed=2), sink)
    drain(engine)
    assert sink.finished.is_set() and sink.responses == [1] * 5


def test_coalescing_keeps_each_key_in_order_and_never_joins_across_a_final_message():
    from pixelrnn.server.engine import Outbox, RowEvent

    def ev(key, index, stage=0):
        return RowEvent(key, stage, index, np.zeros((1, 1, 2), np.uint8), np.zeros(1, np.float32), 1, 1)

    a, b, a2 = Sink(), Sink(), Sink()
    items = [("a", a, [ev("a", 0)], None), ("b", b, [ev("b", 5)], None), ("a", a, [ev("a", 1)], None),
             ("a", None, a.done, ()), ("a", a2, [ev("a", 2)], None), ("a", a2, [ev("a", 3)], 2), ("a", a2, [ev("a", 4)], 2),
             ("b", b, [ev("b", 0, stage=1)], None), ("b", b, [ev("b", 7)], None)]
    out = Outbox.coalesce(items)
    shape = [(key, None if sink is None else [(e.stage, e.index) for e in payload]) for key, sink, payload, _ in out]
    assert shape == [("a", [(0, 0), (0, 1)]), ("b", [(0, 5)]), ("a", None), ("a", [(0, 2), (0, 3), (0, 4)]),
                     ("b", [(1, 0)]), ("b", [(0, 7)])]
    # the limit is the request's (the first row's item carries it): a2's run of 3 stays whole only without one
    limited = Outbox.coalesce([("k", a2, [ev("k", i)], 2) for i in range(5)])
    assert [len(item[2]) for item in limited] == [2, 2, 1]


def test_rows_per_response_below_one_is_refused(workers):
    engine = Engine(FakeRunner(), workers=workers)
    with pytest.raises(ValueError, match="ROWS_PER_RESPONSE must be >= 1"):
        engine.start(1, SampleSpec(), Sink(), rows_per_response=0)
    with pytest.raises(ValueError, match="ROWS_PER_RESPONSE"):
        engine.resume(1, Sink(), rows_per_response=-2)


def test_a_held_back_sequence_is_freed_when_its_client_cancels(workers):
    engine = Engine(FakeRunner(h=40), poll=0.05, senders=1, max_ahead=2, workers=workers)
    engine.start_worker()
    gate = Gate()
    engine.start(1, SampleSpec(), gate)
    assert wait_for(lambda: engine.stats()["rows"] == 2)
    gate.is_cancelled = True
    assert wait_for(lambda: engine.stats()["live"] == 0)  # while its sends are still stuck
    stats = engine.stats()
    assert stats["cancelled"] == 1 and stats["rows"] == 2
    gate.open.set()
    assert gate.finished.wait(10) and len(gate.rows) == 2 and gate.errors == ["cancelled"]
    engine.stop()


def test_sequences_held_back_by_slow_sends_still_share_cell_calls(workers):
    class Slow(Sink):
        def send_rows(self, events):
            time.sleep(0.001)
            super().send_rows(events)

    runner = FakeRunner(h=30)
    engine = Engine(runner, poll=0.05, senders=2, workers=workers)
    engine.start_worker()
    specs = [SampleSpec(seed=k) for k in range(6)]
    sinks = [Slow() for _ in specs]
    for k, (spec, sink) in enumerate(zip(specs, sinks)):
        engine.start(k, spec, sink)
    for spec, sink in zip(specs, sinks):
        assert sink.finished.wait(10) and not sink.errors
        np.testing.assert_array_equal(sink.image(), solo(FakeRunner(h=30), spec))
    engine.stop()
    # 30 calls if the six went in lockstep, 180 if each went alone; held back and let go one at a
    # time, they would drift apart (measured: 2 rows ahead 150 calls, 4: 60, 16: 32). Two workers:
    # three sequences each, 30 calls each in lockstep.
    assert len(runner.calls) <= 45 * workers, len(runner.calls)


def test_requests_that_arrive_together_share_every_cell_call():
    """One worker thread with sender threads, as in the server (sequences on two workers never
    share a call): two open sequences whose requests
    for rows reach the engine before its next step share every cell call of their images (all 5
    images in each). Through Triton the two requests race the worker, so sharing is left to
    chance there (tests/test_server_triton.py); here the worker is certainly kept from starting
    a step while both are posted: the test holds the engine's condition, which the worker takes
    before every step and for every inbox access, and which posting takes again (an RLock)."""
    runner = FakeRunner(h=5)
    engine = Engine(runner, max_batch=16, senders=2)
    engine.start_worker()
    try:
        opened = [Sink(), Sink()]
        engine.start(31, SampleSpec(batch=2, seed=31), opened[0], max_rows=0, end=False)
        engine.start(32, SampleSpec(batch=3, seed=32), opened[1], max_rows=0, end=False)
        assert all(s.finished.wait(10) for s in opened) and not any(s.rows or s.errors for s in opened)
        a, b = Sink(), Sink()
        with engine._cv:  # no step starts meanwhile
            engine.resume(31, a, end=True)
            time.sleep(0.05)  # the second request well after the first, as a busy machine may deliver it
            engine.resume(32, b, end=True)
        assert a.finished.wait(10) and b.finished.wait(10) and not (a.errors or b.errors)
    finally:
        engine.stop()
    assert runner.calls == [(0, 5)] * 5
    assert {e.batched for e in a.rows + b.rows} == {5}
    np.testing.assert_array_equal(a.image(), solo(FakeRunner(h=5), SampleSpec(batch=2, seed=31)))
    np.testing.assert_array_equal(b.image(), solo(FakeRunner(h=5), SampleSpec(batch=3, seed=32)))
