"""Overload on a real tritonserver (tests/deployment.py): a sampler with a live-images budget of 8
refuses the STARTs of a flood beyond it at once, with a message naming the budget and the load,
serves the admitted sequences their reference images, takes the refused ones once there is
room, and the client library's retries wait for that room; one with an admission queue makes
STARTs wait for room instead, up to its deadline. The budget, the load, the refusals and the
waiting show on the metrics endpoint. A flood of a wider model, which takes the server's memory
well up, does not hold a 1-image client back, and the memory goes back once the flood ends."""
import threading
import time

import numpy as np
import pytest

from bench.deployment import group_rss_mib
from tests.deployment import BUSY_SLACK_S, Tiny, export_models, require, sampler_metrics, serve, wait_for

require("tritonclient.grpc")

from pixelrnn.client.library import PixelClient, ServerBusy  # noqa: E402
from pixelrnn.client.stream import SampleStream, sample_inputs  # noqa: E402
from pixelrnn.export.cells import build_cell, sample_cached  # noqa: E402
from pixelrnn.runtime import protocol as p  # noqa: E402

pytestmark = [pytest.mark.triton, pytest.mark.reliability]

CONFIG = dict(in_channels=1, height=6, width=4, levels=4, num_classes=0, hidden=6, layers=1, kernel=3)
NAME, BUDGET, MAX_BATCH = "tiny", 8, 4
SAMPLER = p.sample_model(NAME)
# The same model again, with an admission queue: 2 STARTs may wait QUEUE_WAIT_MS for room.
QUEUED = "queued"
QUEUE_WAIT_MS = int(1000 * BUSY_SLACK_S)  # long enough for the test to act within it on a busy machine
WAIT_S = 30.0 + BUSY_SLACK_S  # any one answer of this tiny model, on a busy machine


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("overload")
    exported = export_models(root, [Tiny(NAME, "gated_pixelcnn", CONFIG, max_batch=MAX_BATCH, seed=3,
                                         writer=dict(max_live_images=BUDGET)),
                                    Tiny(QUEUED, "gated_pixelcnn", CONFIG, max_batch=MAX_BATCH, seed=3,
                                         writer=dict(max_live_images=MAX_BATCH, admission_queue=2,
                                                     admission_wait_ms=QUEUE_WAIT_MS))], root / "repository")
    with serve(root / "repository", root / "triton.log") as server:
        for model, budget in ((SAMPLER, BUDGET), (p.sample_model(QUEUED), MAX_BATCH)):
            metrics, up = wait_for(lambda: sampler_metrics(server, model), lambda m: m.get("budget") == budget, 10 + BUSY_SLACK_S)
            assert up and metrics["budget"] == budget, metrics
        yield server, build_cell(exported[NAME].model)  # the same weights (seed 3) for both models


def image(rows, height: int = CONFIG["height"]) -> np.ndarray:
    assert [r.index for r in rows] == list(range(height))
    return np.stack([r.pixels for r in rows], axis=2)


def test_a_flood_over_the_budget_is_refused_at_once_and_the_admitted_images_are_right(served):
    server, cell = served
    before = sampler_metrics(server, SAMPLER)
    with SampleStream(server.grpc_url, timeout=WAIT_S) as stream:
        # Six 2-image STARTs that stream nothing yet (MAX_ROWS 0) but hold their images: 12 > 8.
        for k in range(6):
            stream.send(SAMPLER, 700 + k, sample_inputs(batch=2, seed=k, max_rows=0), start=True, request_id=str(k))
        answers = [stream.get() for _ in range(6)]
        admitted = sorted(int(a.request_id) for a in answers if a.error is None)
        refusals = [a.error for a in answers if a.error is not None]
        assert len(admitted) == 4 and len(refusals) == 2, answers
        for message in refusals:
            assert f"{p.OVERLOADED} the sampler holds 8 live images, its budget is {BUDGET}" in message
            assert "START of 2 more does not fit: retry later" in message
        held, full = wait_for(lambda: sampler_metrics(server, SAMPLER), lambda m: m["live_images"] == BUDGET, WAIT_S)
        assert full, held
        for k in admitted:  # the admitted sequences stream their images, the reference sampler's
            stream.send(SAMPLER, 700 + k, end=True, request_id=str(k))
        got = stream.collect(len(admitted))
        assert not got.errors, got.errors
        for k in admitted:
            np.testing.assert_array_equal(image([r for r in got.rows if r.request_id == str(k)]), sample_cached(cell, 2, k))
        refused = sorted(set(range(6)) - set(admitted))
        for k in refused:  # Triton opened these ids though the model refused them: end them there too
            reply = stream.request(SAMPLER, 700 + k, sample_inputs(max_rows=0), end=True, request_id=str(k))
            assert reply.error and "is not active" in reply.error, reply
        for k in refused:  # room again: the refused ones, retried with fresh sequence ids, succeed
            reply = stream.request(SAMPLER, 800 + k, sample_inputs(batch=2, seed=k), start=True, end=True, request_id=str(k))
            assert reply.error is None, reply.error
            np.testing.assert_array_equal(image(reply.rows), sample_cached(cell, 2, k))
    after, settled = wait_for(lambda: sampler_metrics(server, SAMPLER),
                              lambda m: m["live_images"] == 0 and m["overloaded"] - before["overloaded"] == 2
                              and m["started"] - before["started"] == 6, WAIT_S)
    assert settled, (before, after)
    assert after["budget"] == BUDGET and after["live"] == 0


def test_the_client_retries_a_busy_sampler_and_gets_its_image(served):
    server, cell = served
    with SampleStream(server.grpc_url, timeout=WAIT_S) as holder:
        for k in range(2):  # the whole budget, held open
            holder.send(SAMPLER, 900 + k, sample_inputs(batch=MAX_BATCH, seed=k, max_rows=0), start=True, request_id=str(k))
        assert all(holder.get().error is None for _ in range(2))
        with PixelClient(server.grpc_url, model=NAME, timeout=WAIT_S) as client:
            with pytest.raises(ServerBusy, match=rf"{SAMPLER} is busy: {p.OVERLOADED} .* its budget is {BUDGET}"):
                client.sample_images(1, seed=5)  # no retries asked: the refusal, as it came
            notes, result = [], {}

            def sample():
                try:
                    result["images"] = client.sample_images(2, seed=5, retries=6, retry_wait_s=1.0, on_retry=notes.append)
                except Exception as e:  # noqa: BLE001 - reported by the assertions below
                    result["error"] = e

            worker = threading.Thread(target=sample)
            worker.start()
            _, refused = wait_for(lambda: len(notes), lambda n: n >= 1, WAIT_S)
            assert refused, result
            for k in range(2):  # room again
                holder.send(SAMPLER, 900 + k, sample_inputs(max_rows=0), end=True, request_id=str(k))
            worker.join(WAIT_S + 10)
        assert not worker.is_alive() and "error" not in result, result
        assert "is busy" in notes[0] and "trying again in" in notes[0] and "(retry 1 of 6)" in notes[0]
        np.testing.assert_array_equal(result["images"], sample_cached(cell, 2, 5))


def test_with_an_admission_queue_a_start_waits_for_room_until_its_deadline(served):
    """Budget 4, 2 STARTs may wait QUEUE_WAIT_MS. While 4 images are held: a START waits and gets the
    overloaded error (which clients retry) only at its deadline; of three more, two wait and
    one is refused at once (the queue is full); when the holder ends, both waiting ones start
    (as the budget allows) and stream the reference images."""
    server, cell = served
    sampler = p.sample_model(QUEUED)
    before = sampler_metrics(server, sampler)
    with SampleStream(server.grpc_url, timeout=WAIT_S) as stream:
        stream.send(sampler, 600, sample_inputs(batch=MAX_BATCH, seed=0, max_rows=0), start=True, request_id="holder")
        assert stream.get().error is None  # admitted; streams nothing yet
        sent = stream.send(sampler, 601, sample_inputs(batch=1, seed=1), start=True, end=True, request_id="expires")
        waiting, seen = wait_for(lambda: sampler_metrics(server, sampler), lambda m: m.get("waiting") == 1, QUEUE_WAIT_MS / 1e3)
        assert seen, waiting
        refusal = stream.get()
        assert refusal.error is not None and (
            f"{p.OVERLOADED} the sampler holds {MAX_BATCH} live images, its budget is {MAX_BATCH} (max_live_images); a START of 1 "
            f"more waited {QUEUE_WAIT_MS / 1e3:g} s for room (admission_wait_ms): retry later") in refusal.error, refusal
        assert refusal.at - sent >= QUEUE_WAIT_MS / 1e3  # it waited its whole deadline
        # Three more: two wait, the third is refused at once (which one is Triton's to choose: it
        # may hand the model requests of different sequences in another order than they were sent).
        batches = {2: 1, 3: 3, 4: 2}
        for k, batch in batches.items():
            stream.send(sampler, 600 + k, sample_inputs(batch=batch, seed=k), start=True, end=True, request_id=str(k))
        full = stream.get()
        assert full.error and "the admission queue is full (2 STARTs wait): retry later" in full.error, full
        stream.send(sampler, 600, sample_inputs(max_rows=0), end=True, request_id="holder")  # room again
        got = stream.collect(3)  # the holder's final response and both waiting sequences' images
        assert not got.errors, got.errors
        started = sorted({r.request_id for r in got.rows})
        assert len(started) == 2 and set(started) <= {"2", "3", "4"}, started
        for k in map(int, started):
            np.testing.assert_array_equal(image([r for r in got.rows if r.request_id == str(k)]), sample_cached(cell, batches[k], k))
    after, settled = wait_for(lambda: sampler_metrics(server, sampler),
                              lambda m: m["live_images"] == 0 and m["waiting"] == 0 and m["admitted"] - before["admitted"] == 3, WAIT_S)
    assert settled, (before, after)
    assert (after["queued"] - before["queued"], after["overloaded"] - before["overloaded"]) == (3, 2), (before, after)


# A wider model, its own server (the whole server's memory is measured): 64 STARTs of 64 images
# fill the budget all but the victim's 1 image; each image holds 16 KiB of cell state, so the
# flood takes the server's memory up by far more than 20% (measured: by up to 95 MiB, from 168).
WIDE = dict(in_channels=1, height=8, width=32, levels=2, hidden=16, layers=8)
WIDE_BATCH, FLOOD_STARTS, FLOOD_STREAMS = 64, 68, 4
WIDE_BUDGET = 64 * WIDE_BATCH + 1  # the flood's 64-image STARTs leave 1 image: the victim's
VICTIM_SEED = 7
# Bounds on the victim, from measurement on the project's busy 2-core machine (during the flood,
# 5 runs: first row after 6 to 48 ms, image after 0.10 to 0.30 s), with room to spare, plus the
# slack any one event gets here. They bound the latency, they do not tell fair scheduling from
# the old one row per sequence per round (tests/test_overload.py counts cell calls for that).
VICTIM_FIRST_ROW_S = 1.0 + BUSY_SLACK_S
VICTIM_IMAGE_S = 3.0 + BUSY_SLACK_S
MEMORY_BACK_S = 30.0  # the bound: RSS within 20% of the baseline this soon after the flood


@pytest.mark.slow
def test_a_flood_does_not_hold_a_small_client_back_and_its_memory_goes_back(tmp_path):
    """4 plain tritonclient streams send 68 STARTs of 64 images (up to 4 refused: see the count
    below); once their states have taken the server's RSS 30% up, a 1-image client gets its
    first row and its image within bounds, the in-process sampler's image; the flood's clients
    then cancel, and the live sequences and images go to 0 and the RSS to within 20% of its
    baseline."""
    exported = export_models(tmp_path, [Tiny("wide", "pixelcnn", WIDE, max_batch=WIDE_BATCH, seed=5,
                                             writer=dict(max_live_images=WIDE_BUDGET))], tmp_path / "repository")
    cell = build_cell(exported["wide"].model)
    sampler = p.sample_model("wide")
    with serve(tmp_path / "repository", tmp_path / "triton.log") as server:
        rss = lambda: group_rss_mib(server.process.pid)[0]  # noqa: E731 - tritonserver and its backend stubs
        with SampleStream(server.grpc_url, timeout=WAIT_S) as warm:  # the stubs' first-call allocations, before the baseline
            assert warm.request(sampler, 1, sample_inputs(batch=1, seed=VICTIM_SEED), start=True, end=True).error is None
        # Idle, and the warm-up START counted (the sampler pushes its metrics every half second).
        before, idle = wait_for(lambda: sampler_metrics(server, sampler), lambda m: m.get("live") == 0 and m.get("admitted") == 1, WAIT_S)
        assert idle
        idle_counts = before["admitted"] + before["overloaded"]
        baseline = rss()
        streams = [SampleStream(server.grpc_url, timeout=WAIT_S, outputs=(p.ROW_INDEX, p.ROW_COUNT)) for _ in range(FLOOD_STREAMS)]
        try:
            for k in range(FLOOD_STARTS):
                streams[k % FLOOD_STREAMS].send(sampler, 1000 + k, sample_inputs(batch=WIDE_BATCH, seed=k), start=True, end=True)
            peak, risen = wait_for(rss, lambda r: r > 1.3 * baseline, WAIT_S)  # the flood's states are being made
            assert risen, f"the flood took the server's RSS from {baseline:.0f} MiB only to {peak:.0f} MiB"
            with SampleStream(server.grpc_url, timeout=WAIT_S) as victim:
                sent = victim.send(sampler, 99, sample_inputs(batch=1, seed=VICTIM_SEED), start=True, end=True)
                first = victim.get()
                rest = victim.collect(1)
                done = time.perf_counter()
            assert first.error is None and not rest.errors, (first.error, rest.errors)
            first_row_s, image_s = first.at - sent, done - sent
            np.testing.assert_array_equal(image([*first.rows, *rest.rows], WIDE["height"]), sample_cached(cell, 1, VICTIM_SEED))
            flood = sampler_metrics(server, sampler)
            peak = max(peak, rss())
            # Every flood START answered, admitted or refused, before the streams close. How many
            # are refused depends on timing: 4 when all 68 arrive before any flood sequence ends,
            # fewer on a busy machine, where the last STARTs can wait in Triton until earlier
            # flood sequences (8 rows each) have finished and made room. So the test counts:
            # every START admitted or refused, every refusal received and naming the budget.
            answered, all_in = wait_for(lambda: sampler_metrics(server, sampler),
                                        lambda m: m["admitted"] + m["overloaded"] - idle_counts == FLOOD_STARTS + 1, WAIT_S)
            assert all_in, (answered, idle_counts)
            refused = answered["overloaded"] - before["overloaded"]
            got = []

            def refusals_so_far() -> list[str]:
                got.extend(r for s in streams for r in s.received())
                return [r.error for r in got if r.error and p.OVERLOADED in r.error]

            wait_for(refusals_so_far, lambda errors: len(errors) >= refused, WAIT_S)
        finally:
            for stream in streams:  # the flood's clients give up: every sequence cancelled
                stream.close(cancel=True)
        refusals = refusals_so_far()
        assert len(refusals) == refused <= FLOOD_STARTS - 64, (refusals, refused)
        assert all(f"its budget is {WIDE_BUDGET}" in e for e in refusals), refusals
        assert first_row_s < VICTIM_FIRST_ROW_S and image_s < VICTIM_IMAGE_S, (first_row_s, image_s, flood)
        after, freed = wait_for(lambda: sampler_metrics(server, sampler), lambda m: m["live"] == 0 and m["live_images"] == 0, WAIT_S)
        assert freed, after
        back_at = time.perf_counter()
        settled, back = wait_for(rss, lambda r: r <= 1.2 * baseline, MEMORY_BACK_S, interval=0.2)
        assert back, f"RSS {baseline:.0f} MiB before the flood, {peak:.0f} at its peak, {settled:.0f} {MEMORY_BACK_S:g} s after it"
        print(f"victim first row {first_row_s:.3f} s, image {image_s:.3f} s; RSS {baseline:.0f} -> {peak:.0f} -> {settled:.0f} MiB "
              f"(back {time.perf_counter() - back_at:.2f} s after the sequences were freed)")
