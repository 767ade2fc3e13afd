"""Overload on a real tritonserver (tests/deployment.py): a sampler with a live-images budget of 8
refuses the STARTs of a flood beyond it at once, with a message naming the budget and the load,
serves the admitted sequences their reference images, takes the refused ones once there is
room, and the client library's retries wait for that room. The budget, the load and the refusals
show on the metrics endpoint."""
import threading

import numpy as np
import pytest

from tests.deployment import BUSY_SLACK_S, Tiny, export_models, require, sampler_metrics, serve, wait_for

require("tritonclient.grpc")

from client.library import PixelClient, ServerBusy  # noqa: E402
from client.stream import SampleStream, sample_inputs  # noqa: E402
from export.cells import build_cell, sample_cached  # noqa: E402
from runtime import protocol as p  # noqa: E402

pytestmark = [pytest.mark.triton, pytest.mark.reliability]

CONFIG = dict(in_channels=1, height=6, width=4, levels=4, num_classes=0, hidden=6, layers=1, kernel=3)
NAME, BUDGET, MAX_BATCH = "tiny", 8, 4
SAMPLER = p.sample_model(NAME)
WAIT_S = 30.0 + BUSY_SLACK_S  # any one answer of this tiny model, on a busy machine


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("overload")
    exported = export_models(root, [Tiny(NAME, "gated_pixelcnn", CONFIG, max_batch=MAX_BATCH, seed=3,
                                         writer=dict(max_live_images=BUDGET))], root / "repository")
    with serve(root / "repository", root / "triton.log") as server:
        metrics, up = wait_for(lambda: sampler_metrics(server, SAMPLER), lambda m: m.get("budget") == BUDGET, 10 + BUSY_SLACK_S)
        assert up and metrics["budget"] == BUDGET, metrics
        yield server, build_cell(exported[NAME].model)


def image(rows) -> np.ndarray:
    assert [r.index for r in rows] == list(range(CONFIG["height"]))
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
