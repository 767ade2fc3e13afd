"""Overload without Triton (runtime/engine.py, runtime/admission.py): the live-images budget
refuses what does not fit and frees what ends, a flood of big sequences does not hold a 1-image
sequence back, and memory is given back once the engine goes idle."""
import json
from pathlib import Path

import numpy as np
import pytest

from runtime import admission
from runtime.engine import Engine, Overloaded
from runtime.rowloop import SampleSpec
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


def test_memory_is_given_back_once_when_the_engine_goes_idle():
    trims = []
    engine = Engine(FakeRunner(h=3), trim=lambda: trims.append(engine.active))
    engine.step()
    assert trims == []  # never busy yet: nothing to give back
    engine.start(1, SampleSpec(batch=2), Sink())
    engine.start(2, SampleSpec(batch=1), Sink())
    engine.step()
    assert trims == []  # sequences live
    drain(engine)
    engine.step()
    assert trims == [0]  # once, with nothing live
    engine.start(3, SampleSpec(batch=1), Sink())
    drain(engine)
    assert trims == [0, 0]


def test_give_back_memory_runs_on_this_libc():
    assert isinstance(admission.give_back_memory(), bool)


def test_the_budget_comes_from_the_manifests_state_shapes():
    manifest = json.loads((REPO / "model_repository" / "pixelcnn_binarized_mnist_sample" / "1" / "manifest.json").read_text())
    # PixelCNN: the input rows (1 x 3 x 28) and 8 layers of 48 x 1 x 28, float32; canvas 28 x 28 int64
    state = (1 * 3 * 28 + 8 * 48 * 28) * 4
    assert admission.image_bytes(manifest) == 3 * state + 28 * 28 * 8
    assert admission.live_images_budget(manifest, 512) == 512 * 2**20 // (3 * state + 28 * 28 * 8)
    assert admission.live_images_budget(manifest, 0.001) == manifest["max_batch"]  # never below one full sequence


def test_the_overload_bench_runs_and_reports_what_the_readme_quotes(tmp_path):
    """bench.overload, bounded (2 flood sequences, 1 repeat): the fields the README and
    tests/test_readme_figures.py read, and what must hold whatever the machine's load."""
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
