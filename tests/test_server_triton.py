"""End to end on a real tritonserver (loopback, free ports), one server for the module: three tiny
checkpoints (a class-conditional RGB Gated PixelCNN exported with `export/build_engine.py
--repository`, a grey multi-scale model with a short sequence idle timeout, and an ensemble of a
PixelCNN and a Row LSTM) sampled over raw gRPC streams (client/stream.py) and scored with plain tritonclient."""
import queue
import re
import shutil
import socket
import urllib.request

import numpy as np
import pytest
import torch

from tests.deployment import Tiny, export_models, require, sampler_metrics, serve, wait_for

tritonclient = require("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from pixelrnn.client.stream import SampleStream, sample_inputs, tensor  # noqa: E402
from pixelrnn.export.cells import build_cell, sample_cached  # noqa: E402
from pixelrnn.runtime import protocol as p  # noqa: E402
from pixelrnn.server import launcher  # noqa: E402
from pixelrnn.server.launcher import ServerError, TritonServer  # noqa: E402
from pixelrnn.training.evaluate import evaluate_images  # noqa: E402

pytestmark = pytest.mark.triton

GATED = dict(in_channels=3, height=5, width=4, levels=4, num_classes=2, hidden=6, layers=1, kernel=3)
MULTISCALE = dict(in_channels=1, height=6, width=4, levels=3, base_arch="gated_pixelcnn", hidden=6, layers=1,
                  small_config=dict(kernel=3), big_config=dict(kernel=3))
# An ensemble (training/models/ensemble.py) of two architectures: served like any one model.
ENSEMBLE = dict(in_channels=1, height=5, width=4, levels=3, members=[
    {"arch": "pixelcnn", "config": dict(hidden=6, layers=1, input_kernel=3)},
    {"arch": "row_lstm", "config": dict(hidden=6, layers=1)}])
IDLE_S = 2.0  # the multi-scale sampler's sequence idle timeout, short for the expiry test
WAIT_S = 60.0  # bound of any one answer: far above what a busy machine needs, short of a hang


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """(server, {name: Exported}) with both models served."""
    root = tmp_path_factory.mktemp("triton")
    models = export_models(root, [Tiny("gated", "gated_pixelcnn", GATED),
                                  Tiny("ms", "multiscale", MULTISCALE, writer=dict(sequence_idle_s=IDLE_S)),
                                  Tiny("ens", "ensemble", ENSEMBLE)], root / "repository")
    with serve(root / "repository", root / "triton.log") as server:
        yield server, models


@pytest.fixture
def client(deployed):
    stream = SampleStream(deployed[0].grpc_url, timeout=WAIT_S)
    yield stream
    assert stream.close(cancel=True), "the stream did not close in time"


@pytest.fixture
def scorer(deployed):
    c = tritonclient.InferenceServerClient(deployed[0].grpc_url)
    yield c
    c.close()


def start(client, model, seq, end=False, req="", **values):
    """A START request with these sample_inputs values."""
    client.send(model, seq, sample_inputs(**values), start=True, end=end, request_id=req)


def more(client, model, seq, end=False, req="", **values):
    """A later request of sequence `seq` (sample_inputs values: max_rows, or start-only ones to be refused)."""
    client.send(model, seq, sample_inputs(**values), end=end, request_id=req)


def image(rows, stage):
    rows = [r for r in rows if r.stage == stage]
    assert [r.index for r in rows] == list(range(len(rows))), "rows out of order"
    return np.stack([r.pixels for r in rows], axis=2)


def expected(model, n, seed, temperature=1.0, labels=None, known=None, known_rows=0):
    labels = None if labels is None else torch.as_tensor(np.broadcast_to(labels, (n,)).copy())
    return sample_cached(build_cell(model), n, seed, temperature, labels, known, known_rows)


def test_rows_stream_in_order_and_make_sample_cached_images(deployed, client):
    _, models = deployed
    gated, ms = models["gated"].model, models["ms"].model
    start(client, "gated_sample", 11, end=True, batch=3, seed=123, temperature=0.9, labels=[0, 1, 1])
    rows, errors = client.collect()
    assert not errors
    assert [(r.stage, r.index) for r in rows] == [(0, i) for i in range(5)]
    assert rows[0].pixels.shape == (3, 3, 4) and rows[0].logprob.shape == (3,) and np.all(rows[0].logprob <= 0)
    np.testing.assert_array_equal(image(rows, 0), expected(gated, 3, 123, 0.9, [0, 1, 1]))

    start(client, "ms_sample", 12, end=True, batch=2, seed=7)
    rows, errors = client.collect()
    assert not errors
    assert [(r.stage, r.index) for r in rows] == [(0, i) for i in range(3)] + [(1, i) for i in range(6)]
    full = expected(ms, 2, 7)
    np.testing.assert_array_equal(image(rows, 1), full)
    np.testing.assert_array_equal(image(rows, 0), full[:, :, ::2, ::2])  # the small image streamed first


def test_an_ensemble_streams_the_full_models_images(deployed, client):
    """The ensemble's served cell draws what its forward pass (the reference sampler) draws."""
    from pixelrnn.training.sample import sample_reference

    model = deployed[1]["ens"].model
    start(client, "ens_sample", 13, end=True, batch=4, seed=5)
    rows, errors = client.collect()
    assert not errors
    np.testing.assert_array_equal(image(rows, 0), sample_reference(model, 4, seed=5))


def test_scores_are_the_models_nll(deployed, scorer):
    _, models = deployed
    for name, labels in (("gated", np.array([0, 1, 1, 0, 1])), ("ms", None), ("ens", None)):
        model, manifest = models[name].model, models[name].manifest
        images = np.random.default_rng(3).integers(0, manifest["levels"], (5, *manifest["shape"])).astype(np.uint8)
        inputs = [tensor(p.IMAGES, images, "UINT8")] + ([tensor(p.LABELS, labels[:, None], "INT64")] if labels is not None else [])
        result = scorer.infer(f"{name}_score", inputs, client_timeout=WAIT_S)
        nll, bpd = result.as_numpy(p.NLL_NATS), result.as_numpy(p.BITS_PER_DIM)
        assert nll.shape == (5, 1) and bpd.shape == (5, 1)
        with torch.no_grad():
            want = model.nll(torch.from_numpy(images).long(), None if labels is None else torch.from_numpy(labels)).numpy()
        np.testing.assert_allclose(nll[:, 0], want, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(bpd[:, 0], want / (images[0].size * np.log(2)), rtol=1e-5, atol=1e-5)
        mean = evaluate_images(model, images, None if labels is None else torch.from_numpy(labels))
        assert abs(nll.mean() - mean) < 1e-3


def test_concurrent_score_requests_are_batched_and_answered_each(deployed, scorer):
    server, models = deployed
    model, manifest = models["ms"].model, models["ms"].manifest
    images = np.random.default_rng(4).integers(0, manifest["levels"], (24, *manifest["shape"])).astype(np.uint8)
    with torch.no_grad():
        want = model.nll(torch.from_numpy(images).long()).numpy()
    before = exec_counts(server, "ms_score")
    done = queue.Queue()
    for k in range(12):  # 12 requests of 2 images, all in flight together
        scorer.async_infer("ms_score", [tensor(p.IMAGES, images[2 * k:2 * k + 2], "UINT8")],
                           callback=lambda result, error, k=k: done.put((k, result, error)), client_timeout=WAIT_S)
    got = {}
    for _ in range(12):
        k, result, error = done.get(timeout=WAIT_S)
        assert error is None, error
        got[k] = result.as_numpy(p.NLL_NATS)[:, 0]
    np.testing.assert_allclose(np.concatenate([got[k] for k in range(12)]), want, rtol=1e-5, atol=1e-4)
    requests, executions = (a - b for a, b in zip(exec_counts(server, "ms_score"), before))
    assert requests == 12 and executions < 12  # the dynamic batcher merged some requests


def test_images_have_one_layout_and_an_n_h_w_input_is_unknown(deployed, scorer):
    """Grey images go as IMAGES, N x 1 x H x W, like any others; N x H x W ones under a name of
    their own (IMAGES_HW) get Triton's one line naming the input the model does not have."""
    manifest = deployed[1]["ms"].manifest
    images = np.random.default_rng(5).integers(0, manifest["levels"], (3, *manifest["shape"])).astype(np.uint8)  # (3, 1, H, W)
    assert scorer.infer("ms_score", [tensor(p.IMAGES, images, "UINT8")], client_timeout=WAIT_S).as_numpy(p.NLL_NATS).shape == (3, 1)
    hw = tensor("IMAGES_HW", images[:, 0], "UINT8")
    with pytest.raises(InferenceServerException, match="unexpected inference input 'IMAGES_HW' for model 'ms_score'"):
        scorer.infer("ms_score", [hw], client_timeout=WAIT_S)
    with pytest.raises(InferenceServerException, match=r"expected 1 inputs but got 2 .*'IMAGES_HW'"):  # beside IMAGES
        scorer.infer("ms_score", [tensor(p.IMAGES, images, "UINT8"), hw], client_timeout=WAIT_S)
    with pytest.raises(InferenceServerException, match="0 inputs"):  # Triton's own check, before the model's
        scorer.infer("ms_score", [], client_timeout=WAIT_S)
    labels = tensor(p.LABELS, np.zeros((3, 1), np.int64), "INT64")
    with pytest.raises(InferenceServerException, match="unexpected inference input 'IMAGES_HW' for model 'gated_score'"):
        scorer.infer("gated_score", [hw, labels], client_timeout=WAIT_S)
    # Triton checks required inputs by their count, and LABELS is optional in the config: LABELS
    # alone reaches the model, which names the images it lacks.
    with pytest.raises(InferenceServerException, match=r"send the images as IMAGES \(uint8 N x C x H x W\)"):
        scorer.infer("gated_score", [labels], client_timeout=WAIT_S)


def exec_counts(server, model):
    """(requests, executions) of a model from Triton's Prometheus metrics."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        text = r.read().decode()

    def value(metric):
        m = re.search(rf'^{metric}{{model="{model}",version="1"}} (\S+)$', text, re.M)
        return int(float(m.group(1))) if m else 0
    return value("nv_inference_request_success"), value("nv_inference_exec_count")


@pytest.mark.parametrize("inputs, message", [
    (lambda im, lb: [tensor(p.IMAGES, im.astype(np.float32), "FP32"), lb], "FP32"),
    (lambda im, lb: [tensor(p.IMAGES, im[:, :, :4], "UINT8"), lb], "shape"),
    (lambda im, lb: [tensor(p.IMAGES, np.full_like(im, 4), "UINT8"), lb], r"\[0, 4\)"),
    (lambda im, lb: [tensor(p.IMAGES, im, "UINT8")], "class-conditional"),
    (lambda im, lb: [tensor(p.IMAGES, im, "UINT8"), tensor(p.LABELS, np.array([[0], [2]]), "INT64")], r"LABELS must be in \[0, 2\)"),
])
def test_bad_score_requests_get_a_clear_error(scorer, inputs, message):
    images = np.zeros((2, 3, 5, 4), np.uint8)
    with pytest.raises(InferenceServerException, match=message):
        scorer.infer("gated_score", inputs(images, tensor(p.LABELS, np.array([[0], [1]]), "INT64")), client_timeout=WAIT_S)
    ok = scorer.infer("gated_score", [tensor(p.IMAGES, images, "UINT8"), tensor(p.LABELS, np.array([[0], [1]]), "INT64")],
                      client_timeout=WAIT_S)
    assert ok.as_numpy(p.NLL_NATS).shape == (2, 1)


def test_interleaved_sequences_keep_their_own_state(deployed, client):
    gated = deployed[1]["gated"].model
    seqs = {21: dict(seed=1, labels=[0]), 22: dict(seed=2, labels=[1])}
    got = {k: [] for k in seqs}
    for step in range(5):  # one row per request, alternating between the two sequences
        for k, s in seqs.items():
            if step == 0:
                start(client, "gated_sample", k, batch=1, seed=s["seed"], labels=s["labels"], max_rows=1)
            else:
                more(client, "gated_sample", k, end=step == 4, max_rows=1)
            rows, errors = client.collect()
            assert not errors and len(rows) == 1
            got[k] += rows
    assert got[22][0].active == 2  # both open when 22's first row was made
    for k, s in seqs.items():
        np.testing.assert_array_equal(image(got[k], 0), expected(gated, 1, s["seed"], labels=s["labels"]))


def test_sequences_in_flight_together_get_their_own_images_from_joint_cell_calls(deployed, client):
    """Two open sequences asked for their rows together: each gets its own seed's image, and
    every row comes from a cell call of its own images or of both sequences' images. Whether a
    call holds both depends here on both requests reaching the engine within one row step,
    which a busy machine may miss; that requests arriving together certainly share the cell
    calls is tests/test_engine.py::test_requests_that_arrive_together_share_every_cell_call."""
    gated = deployed[1]["gated"].model
    start(client, "gated_sample", 31, batch=2, seed=31, labels=[0], max_rows=0)
    start(client, "gated_sample", 32, batch=3, seed=32, labels=[1], max_rows=0)
    assert client.collect(finals=2) == ([], [])
    more(client, "gated_sample", 31, end=True, req="a")
    more(client, "gated_sample", 32, end=True, req="b")
    rows, errors = client.collect(finals=2)
    assert not errors
    np.testing.assert_array_equal(image([r for r in rows if r.request_id == "a"], 0), expected(gated, 2, 31, labels=[0]))
    np.testing.assert_array_equal(image([r for r in rows if r.request_id == "b"], 0), expected(gated, 3, 32, labels=[1]))
    assert {r.batched for r in rows if r.request_id == "a"} <= {2, 5} and {r.batched for r in rows if r.request_id == "b"} <= {3, 5}
    shared = sum(r.batched == 5 for r in rows) // 2
    print(f"\n{shared} of 5 row steps shared by both sequences")


def test_completion_keeps_the_known_rows_and_resume_continues_the_image(deployed, client):
    for name, n, labels in (("gated", 2, [1, 0]), ("ms", 2, None)):
        model, manifest = deployed[1][name].model, deployed[1][name].manifest
        c, h, w = manifest["shape"]
        known = np.random.default_rng(5).integers(0, manifest["levels"], (n, c, 3, w)).astype(np.uint8)
        start(client, f"{name}_sample", 41, end=True, batch=n, seed=9, labels=labels, known=known)
        rows, errors = client.collect()
        assert not errors
        full = image(rows, len(manifest["stages"]) - 1)
        np.testing.assert_array_equal(full[:, :, :3], known)
        np.testing.assert_array_equal(full, expected(model, n, 9, labels=labels, known=known, known_rows=3))

    # Resume: a stream cut after 2 rows restarts from them and ends as the uncut stream does.
    gated = deployed[1]["gated"].model
    start(client, "gated_sample", 42, batch=2, seed=77, labels=[1], max_rows=2)
    first, errors = client.collect()
    assert not errors and len(first) == 2
    start(client, "gated_sample", 43, end=True, seed=77, labels=[1], known=image(first, 0))  # B from KNOWN
    rest, errors = client.collect()
    assert not errors
    np.testing.assert_array_equal(image(rest, 0), expected(gated, 2, 77, labels=[1]))
    more(client, "gated_sample", 42, end=True, max_rows=0)  # cancel the cut stream
    assert client.collect() == ([], [])


def test_bad_sample_requests_get_a_clear_error_and_the_stream_survives(deployed, client):
    bad = [
        dict(model="gated_sample", end=True, batch=1, seed=1),  # no labels
        dict(model="gated_sample", end=True, batch=1000, labels=[0]),
        dict(model="gated_sample", end=True, batch=1, labels=[0], temperature=-1.0),
        dict(model="gated_sample", end=True, batch=1, labels=[0], known=np.zeros((1, 3, 2, 4), np.uint8) + 9),
    ]
    messages = ["class-conditional", "BATCH_SIZE", "TEMPERATURE", "KNOWN values must be < 4"]
    for k, (kwargs, message) in enumerate(zip(bad, messages)):
        start(client, kwargs.pop("model"), 50 + k, **kwargs)
        rows, errors = client.collect()
        assert not rows and len(errors) == 1 and message in errors[0], errors
    # A finished sequence that Triton still knows of: the model says it is gone.
    start(client, "gated_sample", 60, batch=1, labels=[0])
    assert len(client.collect()[0]) == 5
    more(client, "gated_sample", 60, max_rows=1)
    rows, errors = client.collect()
    assert not rows and "not active" in errors[0]
    more(client, "gated_sample", 60, end=True, seed=3)
    rows, errors = client.collect()
    assert "only go with the START request" in errors[0]
    start(client, "gated_sample", 61, end=True, batch=1, labels=[1])
    rows, errors = client.collect()
    assert not errors and len(rows) == 5


def test_idle_sequences_are_expired_by_the_model(deployed, client):
    server = deployed[0]
    before = sampler_metrics(server, "ms_sample")
    start(client, "ms_sample", 71, batch=1, seed=1, max_rows=1)  # left open, never ended
    rows, _ = client.collect()
    assert rows[0].active >= 1
    # The sampler's metrics once they show 71 started (so they are not older than that) and no
    # sequence held: expiry comes IDLE_S after the last request, seen within the engine's and
    # the metrics' 0.5 s periods; the bound only stops a test that would otherwise wait for ever.
    metrics, freed = wait_for(lambda: sampler_metrics(server, "ms_sample"),
                              lambda m: m.get("started", 0) > before.get("started", 0) and m.get("live") == 0, IDLE_S + 30.0)
    assert freed, f"sequence 71 still held {IDLE_S + 30.0:g} s after its last request: {metrics}"
    assert metrics["expired"] == before.get("expired", 0) + 1
    start(client, "ms_sample", 72, end=True, batch=1, seed=2)
    rows, errors = client.collect()
    assert not errors and rows[0].active == 1  # only sequence 72: 71's state was freed


def test_a_second_server_on_a_taken_port_fails_clearly(deployed):
    server, _ = deployed
    with pytest.raises(ServerError, match=f"grpc port {server.ports['grpc']} .* already in use"):
        TritonServer(server.repository, grpc_port=server.ports["grpc"]).start()


def test_picked_ports_taken_before_tritonserver_binds_them_are_picked_again(deployed, tmp_path, monkeypatch):
    """free_port() releases the port it found: another process can take it before tritonserver
    binds it. The launcher then starts again on new ports (it picked them, so it may): here the
    gRPC port is taken on the first start (tritonserver exits), the metrics port on the second
    (tritonserver goes on without metrics), and the third start succeeds."""
    repository = tmp_path / "repository"
    shutil.copytree(deployed[0].repository / "gated_score", repository / "gated_score")  # one model: a quick start
    with socket.socket() as grpc_taken, socket.socket() as metrics_taken:
        for held in (grpc_taken, metrics_taken):
            held.bind((launcher.HOST, 0))
            held.listen()
        taken = [grpc_taken.getsockname()[1], metrics_taken.getsockname()[1]]
        real = launcher.free_port
        picks = iter([taken[0], real(), real(), real(), real(), taken[1]])  # (grpc, http, metrics) per start
        monkeypatch.setattr(launcher, "free_port", lambda: next(picks, None) or real())
        monkeypatch.setattr(launcher, "check_port", lambda port, _: port)  # free when checked, taken when bound: the race
        with TritonServer(repository, log_path=tmp_path / "triton.log") as server:
            assert not set(server.ports.values()) & set(taken)
            assert next(picks, None) is None  # three starts
            assert 'model="gated_score"' in urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
