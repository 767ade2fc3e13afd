"""Overload without Triton (server/engine/scheduler.py, server/engine/admission.py): the live-images budget
refuses what does not fit and frees what ends, a flood of big sequences does not hold a 1-image
sequence back, and memory is given back once the engine goes idle."""
import json
import weakref
from pathlib import Path

import numpy as np
import pytest

from pixelrnn.server.engine import admission
from pixelrnn.server.engine import Engine, Overloaded
from pixelrnn.runtime.rowloop import SampleSpec
from tests.deployment import BUSY_SLACK_S
from tests.test_engine import FakeRunner, Sink, drain, solo

REPO = Path(__file__).resolve().parent.parent


def test_a_start_over_the_budget_is_refused_at_once_naming_budget_and_load():
    engine = Engine(FakeRunner(h=3), max_batch=4, max_images=6)
    sinks = [Sink() for _ in range(3)]
    engine.start(1, SampleSpec(batch=4, seed=1), sinks[0])
    engine.start(2, SampleSpec(batch=2, seed=2), sinks[1])
    with pytest.raises(Overloaded, match=r"holds 6 live images, its budget is 6 .*START of 1 more does not fit: retry later"):
        engine.start(3, SampleSpec(batch=1, seed=3), sinks[2])
    stats = engine.stats()
    assert (stats["live_images"], stats["budget"], stats["overloaded"]) == (6, 6, 1)
    drain(engine)
    assert engine.stats()["live_images"] == 0 and engine.active == 0
    engine.start(3, SampleSpec(batch=1, seed=3), sinks[2])  # fits once the others are done
    drain(engine)
    for k, sink in enumerate(sinks):
        assert sink.finished.is_set() and not sink.errors
        np.testing.assert_array_equal(sink.image(), solo(FakeRunner(h=3), SampleSpec(batch=(4, 2, 1)[k], seed=k + 1)))
    assert engine.stats()["started"] == 3


def test_every_way_out_gives_the_images_back():
    engine = Engine(FakeRunner(h=6), max_batch=2, max_images=2, idle_timeout=0.0)
    a, b, c, d = Sink(), Sink(), Sink(), Sink()
    engine.start(1, SampleSpec(batch=2), a, max_rows=1, end=False)
    with pytest.raises(Overloaded):
        engine.start(2, SampleSpec(batch=1), b)
    drain(engine)  # one row, then no open request: expired at once (idle_timeout 0)
    engine.step()
    assert engine.stats()["expired"] == 1 and engine.stats()["live_images"] == 0
    engine.start(3, SampleSpec(batch=1), c)
    c.is_cancelled = True
    drain(engine)
    assert c.errors == ["cancelled"] and engine.stats()["live_images"] == 0
    engine.start(4, SampleSpec(batch=2), d)  # the whole budget again
    drain(engine)
    assert d.finished.is_set() and not d.errors and engine.stats()["live_images"] == 0


def test_a_duplicate_or_bad_start_does_not_keep_its_images():
    engine = Engine(FakeRunner(h=2), max_batch=2, max_images=3)
    first, duplicate = Sink(), Sink()
    engine.start(1, SampleSpec(batch=2), first, max_rows=0, end=False)
    engine.start(1, SampleSpec(batch=1), duplicate, end=False)  # refused by the worker: the key is live
    drain(engine)
    assert duplicate.errors and "already active" in duplicate.errors[0]
    assert engine.stats()["live_images"] == 2
    with pytest.raises(ValueError, match="BATCH_SIZE"):  # refused before admission: nothing taken
        engine.start(2, SampleSpec(batch=5), Sink())
    assert engine.stats()["live_images"] == 2 and engine.stats()["overloaded"] == 0
    with pytest.raises(ValueError, match="at least one full sequence"):
        Engine(FakeRunner(), max_batch=4, max_images=3)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_queued_start_waits_first_come_first_served_and_starts_when_room_frees():
    """Budget 4, a queue of 2: with 3 images held, a 2-image START waits, a 1-image one that
    would fit waits behind it (nobody is passed over), a third is refused at once; when the
    holder ends, both start in order and stream the reference images."""
    engine = Engine(FakeRunner(h=3), max_batch=4, max_images=4, max_waiting=2, wait_s=10.0, clock=Clock())
    holder, big, small, late, later = Sink(), Sink(), Sink(), Sink(), Sink()
    engine.start(1, SampleSpec(batch=3, seed=1), holder, max_rows=0, end=False)
    engine.start(2, SampleSpec(batch=2, seed=2), big, max_rows=1, end=False)
    engine.start(3, SampleSpec(batch=1, seed=3), small)
    engine.resume(2, later, end=True)  # a waiting sequence's next request goes in after its START
    with pytest.raises(Overloaded, match=r"holds 3 live images, its budget is 4 .*START of 1 more does not fit and the admission "
                                         r"queue is full \(2 STARTs wait\): retry later"):
        engine.start(4, SampleSpec(batch=1, seed=4), late)
    with pytest.raises(ValueError, match="sequence 2 is already waiting for room"):
        engine.start(2, SampleSpec(batch=1), Sink())
    drain(engine)
    assert not big.rows and not small.rows and not big.finished.is_set() and not small.finished.is_set()
    assert {k: engine.stats()[k] for k in ("waiting", "queued", "admitted", "overloaded", "live_images")} == \
        {"waiting": 2, "queued": 2, "admitted": 1, "overloaded": 1, "live_images": 3}
    engine.resume(1, Sink(), max_rows=0, end=True)  # the holder ends: room for both
    engine.step()  # ends it, and admits the waiting STARTs into the inbox, for the next steps
    drain(engine)
    assert len(big.rows) == 1 and big.finished.is_set() and later.finished.is_set() and small.finished.is_set()
    assert not (big.errors or later.errors or small.errors)
    np.testing.assert_array_equal(np.stack([e.row for e in big.rows + later.rows], axis=2),
                                  solo(FakeRunner(h=3), SampleSpec(batch=2, seed=2)))
    np.testing.assert_array_equal(small.image(), solo(FakeRunner(h=3), SampleSpec(batch=1, seed=3)))
    assert {k: engine.stats()[k] for k in ("waiting", "admitted", "live_images", "started")} == \
        {"waiting": 0, "admitted": 3, "live_images": 0, "started": 3}


def test_a_queued_start_is_refused_at_its_deadline_with_the_overloaded_message():
    clock = Clock()
    engine = Engine(FakeRunner(h=3), max_batch=2, max_images=2, max_waiting=4, wait_s=10.0, clock=clock)
    holder, waiter, its_next, gone = Sink(), Sink(), Sink(), Sink()
    engine.start(1, SampleSpec(batch=2), holder, max_rows=0, end=False)
    engine.start(2, SampleSpec(batch=1), waiter, max_rows=1, end=False)
    engine.resume(2, its_next, end=True)
    engine.start(3, SampleSpec(batch=1), gone)
    gone.is_cancelled = True  # its client leaves while it waits
    clock.now = 9.0
    drain(engine)
    assert gone.errors == ["cancelled"] and not waiter.finished.is_set() and engine.stats()["waiting"] == 1
    clock.now = 10.0
    drain(engine)
    message = ("overloaded: the sampler holds 2 live images, its budget is 2 (max_live_images); a START of 1 more waited 10 s "
               "for room (admission_wait_ms): retry later")
    assert waiter.errors == [message] and its_next.errors == [message] and not waiter.rows
    stats = engine.stats()
    assert (stats["waiting"], stats["queued"], stats["overloaded"], stats["admitted"]) == (0, 2, 1, 1)
    engine.resume(1, Sink(), max_rows=0, end=True)
    drain(engine)
    assert engine.stats()["live_images"] == 0 and engine.stats()["started"] == 1  # the refused ones never start


def test_the_worker_refuses_a_waiting_start_at_its_deadline_and_admits_on_release():
    """With the worker thread: a deadline far shorter than its poll period still ends the wait
    on time (the worker wakes for it), and a START waiting when room frees starts."""
    engine = Engine(FakeRunner(h=3), max_batch=2, max_images=2, max_waiting=2, wait_s=0.3, poll=60.0, senders=1)
    engine.start_worker()
    try:
        holder, expires, admitted = Sink(), Sink(), Sink()
        engine.start(1, SampleSpec(batch=2), holder, max_rows=0, end=False)
        engine.start(2, SampleSpec(batch=1), expires)
        assert expires.finished.wait(0.3 + BUSY_SLACK_S), "the wait did not end at its deadline"
        assert expires.errors and "waited 0.3 s for room" in expires.errors[0]
        engine.start(3, SampleSpec(batch=2, seed=3), admitted)
        engine.resume(1, Sink(), max_rows=0, end=True)  # room: 3 starts, within its wait
        assert admitted.finished.wait(0.3 + BUSY_SLACK_S) and not admitted.errors, admitted.errors
        np.testing.assert_array_equal(admitted.image(), solo(FakeRunner(h=3), SampleSpec(batch=2, seed=3)))
    finally:
        engine.stop()


def test_a_waiting_start_gets_an_error_at_shutdown_and_the_queue_needs_a_budget_and_a_wait():
    engine = Engine(FakeRunner(h=3), max_batch=2, max_images=2, max_waiting=1, wait_s=5.0)
    waiter = Sink()
    engine.start(1, SampleSpec(batch=2), Sink(), max_rows=0, end=False)
    engine.start(2, SampleSpec(batch=1), waiter)
    engine.stop()
    assert waiter.errors == ["the sampler is shutting down"]
    with pytest.raises(ValueError, match="admission queue .* needs a budget"):
        Engine(FakeRunner(), max_batch=2, max_waiting=1, wait_s=5.0)
    with pytest.raises(ValueError, match="admission queue .* needs a budget .* and a wait > 0 s"):
        Engine(FakeRunner(), max_batch=2, max_images=2, max_waiting=1)


def test_a_one_image_sequence_is_not_held_back_by_a_flood_of_big_ones():
    """max_batch 8, twenty 8-image sequences of 20 rows (160 images: 20 calls a round), then a
    1-image one. Its first row comes from the next call. Served in image-rows, it makes 8 rows
    while each flood sequence makes 1 (its own calls: no 8-image sequence fits beside it), so
    its 20 rows take at most 20 of its calls and 3 rounds of the flood's, where one row a round,
    as before fair scheduling, took 20 rounds (400 calls)."""
    runner = FakeRunner(h=20)
    engine = Engine(runner, max_batch=8)
    flood = [Sink() for _ in range(20)]
    for k, sink in enumerate(flood):
        engine.start(k, SampleSpec(batch=8, seed=k), sink)
    for _ in range(30):  # the flood is under way, its sequences at different rows
        engine.step()
    victim = Sink()
    engine.start("victim", SampleSpec(batch=1, seed=99), victim)
    calls_before = len(runner.calls)
    engine.step()
    assert len(victim.rows) == 1 and len(runner.calls) == calls_before + 1
    while not victim.finished.is_set():
        engine.step()
    assert len(runner.calls) - calls_before <= 20 + 3 * 20
    np.testing.assert_array_equal(victim.image(), solo(FakeRunner(h=20), SampleSpec(batch=1, seed=99)))
    drain(engine, limit=1000)
    for k, sink in enumerate(flood):  # the flood still completes, with its own images
        assert sink.finished.is_set() and not sink.errors
        np.testing.assert_array_equal(sink.image(), solo(FakeRunner(h=20), SampleSpec(batch=8, seed=k)))
    # Fairness costs the flood no calls: every call but the victim's is full.
    assert sum(b for _, b in runner.calls) == 20 * 8 * 20 + 20 and len(runner.calls) == 20 * 20 + 20


def test_big_sequences_share_calls_evenly_in_image_rows():
    runner = FakeRunner(h=12)
    engine = Engine(runner, max_batch=4)
    sinks = {k: Sink() for k in range(3)}
    for k, sink in sinks.items():
        engine.start(k, SampleSpec(batch=(4, 2, 2)[k], seed=k), sink)
    for _ in range(12):
        engine.step()
    rows = {k: len(s.rows) for k, s in sinks.items()}
    # 12 calls of 4 images: 48 image-rows, 16 each: the 4-image sequence 4 rows, the others 8
    assert abs(rows[0] * 4 - rows[1] * 2) <= 4 and rows[1] == rows[2] and sum(b for _, b in runner.calls) == 48


def test_memory_is_given_back_when_the_engine_goes_idle_and_once_more_after_poll():
    trims, clock = [], Clock()
    engine = Engine(FakeRunner(h=3), trim=lambda: trims.append(engine.active), clock=clock, poll=0.5)
    engine.step()
    clock.now = 10.0
    engine.step()
    assert trims == []  # never busy yet: nothing to give back
    engine.start(1, SampleSpec(batch=2), Sink())
    engine.start(2, SampleSpec(batch=1), Sink())
    engine.step()
    assert trims == []  # sequences live
    drain(engine)
    engine.step()
    assert trims == [0]  # at once, with nothing live
    clock.now = 10.4
    engine.step()
    assert trims == [0]
    clock.now = 10.5  # idle for `poll`: once more, for what was freed after the first trim
    engine.step()
    clock.now = 20.0
    engine.step()
    assert trims == [0, 0]
    engine.start(3, SampleSpec(batch=1), Sink())
    drain(engine)
    assert trims == [0, 0, 0]


def test_the_trim_comes_after_the_last_sequences_are_freed():
    """The sequences that complete in a step are gone before that step trims: a trim while the
    step still held them would leave their states resident for good (glibc does not trim itself)."""
    alive = []
    engine = Engine(FakeRunner(h=2), trim=lambda: alive.append(sum(r() is not None for r in refs)))
    for k in range(3):
        engine.start(k, SampleSpec(batch=1, seed=k), Sink())
    engine.step()  # row 0 of all three; row 1, the last, comes in the next step, which then trims
    refs = [weakref.ref(seq) for seq in engine._sequences.values()]
    assert len(refs) == 3
    engine.step()
    assert alive == [0] and engine.active == 0


def test_give_back_memory_runs_on_this_libc():
    assert isinstance(admission.give_back_memory(), bool)


def test_the_budget_comes_from_the_manifests_state_shapes():
    manifest = json.loads((REPO / "model_repository" / "gated_pixelcnn_binarized_mnist_sample" / "1" / "manifest.json").read_text())
    # Gated PixelCNN h48 x 8: the vertical stack's rows (the input's 1 x 2 x 28, then 7 layers of
    # 48 x 2 x 28) and 8 layers' pre-activations 96 x 28, float32; canvas 28 x 28 int64
    state = (1 * 2 * 28 + 7 * 48 * 2 * 28 + 8 * 96 * 28) * 4
    assert admission.image_bytes(manifest) == 3 * state + 28 * 28 * 8
    assert admission.live_images_budget(manifest, 512) == 512 * 2**20 // (3 * state + 28 * 28 * 8)
    assert admission.live_images_budget(manifest, 0.001) == manifest["max_batch"]  # never below one full sequence


def test_the_overload_bench_runs_and_reports_what_the_readme_quotes(tmp_path):
    """bench.overload, bounded (2 flood sequences, 1 repeat): the fields docs/measurements.md
    quotes (bench/report, checked by tests/test_docs.py), and what must hold whatever the
    machine's load."""
    from bench import overload

    out = tmp_path / "overload.json"
    assert overload.main(["--json", str(out), "--flood", "2", "--repeats", "1"]) == 0
    d = json.loads(out.read_text())
    fair, unfair = d["victim"]["fair"], d["victim"]["unfair"]
    assert fair["first_row_calls"] == 1 and unfair["first_row_calls"] == 3  # next call vs after the whole round
    assert fair["image_calls"] < unfair["image_calls"]
    a = d["admission"]
    assert a["admitted"] * 64 <= a["budget_images"] < (a["admitted"] + 1) * 64 and a["admitted"] + a["refused"] == 150
    assert a["first_refusal"].startswith("overloaded: ")
    m = d["memory"]
    assert m["baseline_mib"] <= m["peak_mib"] and m["after_trim_mib"] <= m["after_flood_mib"] + 1  # trimming never adds
    assert d["trim_cost"]["steps"] == 2 and d["fairness_throughput_ratio"] > 0 and fair["image_rows_per_cpu_s"] > 0
    assert "server_flood" not in d  # only with --server (a tritonserver run: bench.overload's own)


def test_the_repository_writer_takes_an_admission_queue_only_with_a_wait_below_the_idle_timeout(tmp_path):
    from pixelrnn.server.repository import write_repository

    folder = REPO / "model_repository" / "gated_pixelcnn_binarized_mnist_sample" / "1"
    manifest = json.loads((folder / "manifest.json").read_text())
    for queue, wait_ms in ((2, 0), (2, 60_000), (-1, 100)):  # no wait; a wait Triton outlives (idle 60 s); a negative queue
        with pytest.raises(ValueError, match="admission_queue must be >= 0, and with a queue admission_wait_ms must be > 0 and "
                                             r"below the sequence idle timeout \(60000 ms\)"):
            write_repository(manifest, folder, tmp_path, sequence_idle_s=60, admission_queue=queue, admission_wait_ms=wait_ms)
    assert not list(tmp_path.iterdir())  # refused before anything was written
    config = (REPO / "model_repository" / "gated_pixelcnn_binarized_mnist_sample" / "config.pbtxt").read_text()
    assert '{ key: "admission_queue" value: { string_value: "0" } }' in config  # the shipped sampler refuses at once
