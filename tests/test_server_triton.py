"""End to end on a real tritonserver (loopback, free ports), one server for the module: two tiny
checkpoints (a class-conditional RGB Gated PixelCNN and a grey multi-scale model) exported
with `export/build_engine.py --repository`, then sampled and scored over gRPC."""
import queue
import re
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch

tritonclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from export.cells import build_cell, sample_cached  # noqa: E402
from runtime import protocol as p  # noqa: E402
from server.launcher import ServerError, TritonServer, find_tritonserver  # noqa: E402
from export.repository import write_repository  # noqa: E402
from runtime.manifest import read_manifest  # noqa: E402
from training.checkpoint import load_model, save_checkpoint  # noqa: E402
from training.evaluate import evaluate_images  # noqa: E402
from training.models import build_model  # noqa: E402

pytestmark = pytest.mark.triton

try:
    find_tritonserver()
except ServerError as e:  # pragma: no cover - `make setup` installs it
    pytest.skip(str(e), allow_module_level=True)

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent
GATED = dict(in_channels=3, height=5, width=4, levels=4, num_classes=2, hidden=6, layers=1, kernel=3)
MULTISCALE = dict(in_channels=1, height=6, width=4, levels=3, base_arch="gated_pixelcnn", hidden=6, layers=1,
                  small_config=dict(kernel=3), big_config=dict(kernel=3))
IDLE_S = 2.0  # the multi-scale sampler's sequence idle timeout, short for the expiry test


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """{name: (model, manifest)} and a running server with both models."""
    root = tmp_path_factory.mktemp("triton")
    repository = root / "repository"
    models = {}
    for name, arch, config in (("gated", "gated_pixelcnn", GATED), ("ms", "multiscale", MULTISCALE)):
        torch.manual_seed(1)
        save_checkpoint(root / f"{name}.pt", {"arch": arch, "config": config, "model": build_model(arch, dict(config)).state_dict(), "step": 1})
        out = root / name
        result = subprocess.run([sys.executable, str(REPO / "export" / "build_engine.py"), "--checkpoint", str(root / f"{name}.pt"),
                                 "--out", str(out), "--name", name, "--tensorrt", "off", "--repository", str(repository)],
                                capture_output=True, text=True, timeout=300, cwd=REPO)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Triton model repository written" in result.stdout
        models[name] = (load_model(root / f"{name}.pt")[0], read_manifest(out))
    write_repository(models["ms"][1], root / "ms", repository, sequence_idle_s=IDLE_S)
    with TritonServer(repository, log_path=root / "triton.log") as server:
        yield server, models


@pytest.fixture
def client(deployed):
    c = Stream(deployed[0].grpc_url)
    yield c
    c.close()


def tensor(name, value, dtype):
    value = np.ascontiguousarray(value)
    t = tritonclient.InferInput(name, list(value.shape), dtype)
    t.set_data_from_numpy(value)
    return t


class Stream:
    """One gRPC stream to the sampler; responses of every request land on one queue."""

    def __init__(self, url):
        self.client = tritonclient.InferenceServerClient(url)
        self.q = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.q.put((result, error)))

    def send(self, model, seq, start=False, end=False, batch=None, seed=None, temperature=None, labels=None, known=None, max_rows=None, req=""):
        inputs = []
        for name, value, dtype in ((p.BATCH_SIZE, batch, "INT32"), (p.SEED, seed, "UINT64"), (p.TEMPERATURE, temperature, "FP64"),
                                   (p.MAX_ROWS, max_rows, "INT32")):
            if value is not None:
                inputs.append(tensor(name, np.array([value], dtype=dtype.lower().replace("fp", "float")), dtype))
        if labels is not None:
            inputs.append(tensor(p.LABELS, np.asarray(labels, np.int64), "INT64"))
        if known is not None:
            inputs.append(tensor(p.KNOWN, np.asarray(known, np.uint8), "UINT8"))
        self.client.async_stream_infer(model, inputs, request_id=req, sequence_id=seq, sequence_start=start, sequence_end=end,
                                       enable_empty_final_response=True)

    def collect(self, finals=1, timeout=30.0):
        """Rows (dicts) until `finals` final responses; errors as strings."""
        rows, errors = [], []
        while finals:
            result, error = self.q.get(timeout=timeout)
            if error is not None:  # an error ends its request (it carries the final flag)
                errors.append(str(error))
                finals -= 1
                continue
            response = result.get_response()
            if response.parameters["triton_final_response"].bool_param:
                finals -= 1
                continue
            rows.append(dict(id=response.id, stage=int(result.as_numpy(p.STAGE)[0]), index=int(result.as_numpy(p.ROW_INDEX)[0]),
                             row=result.as_numpy(p.ROW), logprob=result.as_numpy(p.ROW_LOGPROB),
                             active=int(result.as_numpy(p.ACTIVE)[0]), batched=int(result.as_numpy(p.CALL_BATCH)[0])))
        return rows, errors

    def close(self):
        self.client.stop_stream()
        self.client.close()


def image(rows, stage):
    rows = [r for r in rows if r["stage"] == stage]
    assert [r["index"] for r in rows] == list(range(len(rows))), "rows out of order"
    return np.stack([r["row"] for r in rows], axis=2)


def expected(model, n, seed, temperature=1.0, labels=None, known=None, known_rows=0):
    labels = None if labels is None else torch.as_tensor(np.broadcast_to(labels, (n,)).copy())
    return sample_cached(build_cell(model), n, seed, temperature, labels, known, known_rows)


def test_rows_stream_in_order_and_make_sample_cached_images(deployed, client):
    _, models = deployed
    gated, ms = models["gated"][0], models["ms"][0]
    client.send("gated_sample", 11, start=True, end=True, batch=3, seed=123, temperature=0.9, labels=[0, 1, 1])
    rows, errors = client.collect()
    assert not errors
    assert [(r["stage"], r["index"]) for r in rows] == [(0, i) for i in range(5)]
    assert rows[0]["row"].shape == (3, 3, 4) and rows[0]["logprob"].shape == (3,) and np.all(rows[0]["logprob"] <= 0)
    np.testing.assert_array_equal(image(rows, 0), expected(gated, 3, 123, 0.9, [0, 1, 1]))

    client.send("ms_sample", 12, start=True, end=True, batch=2, seed=7)
    rows, errors = client.collect()
    assert not errors
    assert [(r["stage"], r["index"]) for r in rows] == [(0, i) for i in range(3)] + [(1, i) for i in range(6)]
    full = expected(ms, 2, 7)
    np.testing.assert_array_equal(image(rows, 1), full)
    np.testing.assert_array_equal(image(rows, 0), full[:, :, ::2, ::2])  # the small image streamed first


def test_scores_are_the_models_nll(deployed):
    server, models = deployed
    client = tritonclient.InferenceServerClient(server.grpc_url)
    for name, labels in (("gated", np.array([0, 1, 1, 0, 1])), ("ms", None)):
        model, manifest = models[name]
        images = np.random.default_rng(3).integers(0, manifest["levels"], (5, *manifest["shape"])).astype(np.uint8)
        inputs = [tensor(p.IMAGES, images, "UINT8")] + ([tensor(p.LABELS, labels[:, None], "INT64")] if labels is not None else [])
        result = client.infer(f"{name}_score", inputs)
        nll, bpd = result.as_numpy(p.NLL_NATS), result.as_numpy(p.BITS_PER_DIM)
        assert nll.shape == (5, 1) and bpd.shape == (5, 1)
        with torch.no_grad():
            want = model.nll(torch.from_numpy(images).long(), None if labels is None else torch.from_numpy(labels)).numpy()
        np.testing.assert_allclose(nll[:, 0], want, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(bpd[:, 0], want / (images[0].size * np.log(2)), rtol=1e-5, atol=1e-5)
        mean = evaluate_images(model, images, None if labels is None else torch.from_numpy(labels))
        assert abs(nll.mean() - mean) < 1e-3
    client.close()


def test_concurrent_score_requests_are_batched_and_answered_each(deployed):
    server, models = deployed
    model, manifest = models["ms"]
    client = tritonclient.InferenceServerClient(server.grpc_url)
    images = np.random.default_rng(4).integers(0, manifest["levels"], (24, *manifest["shape"])).astype(np.uint8)
    with torch.no_grad():
        want = model.nll(torch.from_numpy(images).long()).numpy()
    before = exec_counts(server, "ms_score")
    done = queue.Queue()
    for k in range(12):  # 12 requests of 2 images, all in flight together
        client.async_infer("ms_score", [tensor(p.IMAGES, images[2 * k:2 * k + 2], "UINT8")],
                           callback=lambda result, error, k=k: done.put((k, result, error)))
    got = {}
    for _ in range(12):
        k, result, error = done.get(timeout=30)
        assert error is None, error
        got[k] = result.as_numpy(p.NLL_NATS)[:, 0]
    np.testing.assert_allclose(np.concatenate([got[k] for k in range(12)]), want, rtol=1e-5, atol=1e-4)
    requests, executions = (a - b for a, b in zip(exec_counts(server, "ms_score"), before))
    assert requests == 12 and executions < 12  # the dynamic batcher merged some requests
    client.close()


def test_grey_images_score_the_same_as_n_h_w_and_exactly_one_layout_is_accepted(deployed):
    server, models = deployed
    _, manifest = models["ms"]
    client = tritonclient.InferenceServerClient(server.grpc_url)
    images = np.random.default_rng(5).integers(0, manifest["levels"], (3, *manifest["shape"])).astype(np.uint8)  # (3, 1, H, W)
    nchw = client.infer("ms_score", [tensor(p.IMAGES, images, "UINT8")]).as_numpy(p.NLL_NATS)
    nhw = client.infer("ms_score", [tensor(p.IMAGES_HW, images[:, 0], "UINT8")]).as_numpy(p.NLL_NATS)
    np.testing.assert_array_equal(nhw, nchw)
    with pytest.raises(InferenceServerException, match="exactly one of IMAGES .* got both"):
        client.infer("ms_score", [tensor(p.IMAGES, images, "UINT8"), tensor(p.IMAGES_HW, images[:, 0], "UINT8")])
    with pytest.raises(InferenceServerException, match="0 inputs"):  # Triton's own check, before the model's
        client.infer("ms_score", [])
    with pytest.raises(InferenceServerException, match="IMAGES_HW"):  # a colour model has no N x H x W layout
        client.infer("gated_score", [tensor(p.IMAGES_HW, images[:, 0], "UINT8")])
    client.close()


def exec_counts(server, model):
    """(requests, executions) of a model from Triton's Prometheus metrics."""
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()

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
def test_bad_score_requests_get_a_clear_error(deployed, inputs, message):
    server, models = deployed
    client = tritonclient.InferenceServerClient(server.grpc_url)
    images = np.zeros((2, 3, 5, 4), np.uint8)
    with pytest.raises(InferenceServerException, match=message):
        client.infer("gated_score", inputs(images, tensor(p.LABELS, np.array([[0], [1]]), "INT64")))
    ok = client.infer("gated_score", [tensor(p.IMAGES, images, "UINT8"), tensor(p.LABELS, np.array([[0], [1]]), "INT64")])
    assert ok.as_numpy(p.NLL_NATS).shape == (2, 1)
    client.close()


def test_interleaved_sequences_keep_their_own_state(deployed, client):
    gated = deployed[1]["gated"][0]
    seqs = {21: dict(seed=1, labels=[0]), 22: dict(seed=2, labels=[1])}
    got = {k: [] for k in seqs}
    for step in range(5):  # one row per request, alternating between the two sequences
        for k, s in seqs.items():
            if step == 0:
                client.send("gated_sample", k, start=True, batch=1, seed=s["seed"], labels=s["labels"], max_rows=1)
            else:
                client.send("gated_sample", k, end=step == 4, max_rows=1)
            rows, errors = client.collect()
            assert not errors and len(rows) == 1
            got[k] += rows
    assert got[22][0]["active"] == 2  # both open when 22's first row was made
    for k, s in seqs.items():
        np.testing.assert_array_equal(image(got[k], 0), expected(gated, 1, s["seed"], labels=s["labels"]))


def test_sequences_in_flight_together_share_cell_calls(deployed, client):
    gated = deployed[1]["gated"][0]
    for attempt in range(10):  # the two requests must reach the engine within one row step (a busy machine may miss it)
        client.send("gated_sample", 31, start=True, batch=2, seed=31, labels=[0], max_rows=0)
        client.send("gated_sample", 32, start=True, batch=3, seed=32, labels=[1], max_rows=0)
        assert client.collect(finals=2) == ([], [])
        client.send("gated_sample", 31, end=True, req="a")
        client.send("gated_sample", 32, end=True, req="b")
        rows, errors = client.collect(finals=2)
        assert not errors
        np.testing.assert_array_equal(image([r for r in rows if r["id"] == "a"], 0), expected(gated, 2, 31, labels=[0]))
        np.testing.assert_array_equal(image([r for r in rows if r["id"] == "b"], 0), expected(gated, 3, 32, labels=[1]))
        if max(r["batched"] for r in rows) == 5:
            return
    pytest.fail("the two sequences never shared a cell call")


def test_completion_keeps_the_known_rows_and_resume_continues_the_image(deployed, client):
    for name, n, labels in (("gated", 2, [1, 0]), ("ms", 2, None)):
        model, manifest = deployed[1][name]
        c, h, w = manifest["shape"]
        known = np.random.default_rng(5).integers(0, manifest["levels"], (n, c, 3, w)).astype(np.uint8)
        client.send(f"{name}_sample", 41, start=True, end=True, batch=n, seed=9, labels=labels, known=known)
        rows, errors = client.collect()
        assert not errors
        full = image(rows, len(manifest["stages"]) - 1)
        np.testing.assert_array_equal(full[:, :, :3], known)
        np.testing.assert_array_equal(full, expected(model, n, 9, labels=labels, known=known, known_rows=3))

    # Resume: a stream cut after 2 rows restarts from them and ends as the uncut stream does.
    gated = deployed[1]["gated"][0]
    client.send("gated_sample", 42, start=True, batch=2, seed=77, labels=[1], max_rows=2)
    first, errors = client.collect()
    assert not errors and len(first) == 2
    client.send("gated_sample", 43, start=True, end=True, seed=77, labels=[1], known=image(first, 0))  # B from KNOWN
    rest, errors = client.collect()
    assert not errors
    np.testing.assert_array_equal(image(rest, 0), expected(gated, 2, 77, labels=[1]))
    client.send("gated_sample", 42, end=True, max_rows=0)  # cancel the cut stream
    assert client.collect() == ([], [])


def test_bad_sample_requests_get_a_clear_error_and_the_stream_survives(deployed, client):
    bad = [
        dict(model="gated_sample", start=True, end=True, batch=1, seed=1),  # no labels
        dict(model="gated_sample", start=True, end=True, batch=1000, labels=[0]),
        dict(model="gated_sample", start=True, end=True, batch=1, labels=[0], temperature=-1.0),
        dict(model="gated_sample", start=True, end=True, batch=1, labels=[0], known=np.zeros((1, 3, 2, 4), np.uint8) + 9),
    ]
    messages = ["class-conditional", "BATCH_SIZE", "TEMPERATURE", "KNOWN values must be < 4"]
    for k, (kwargs, message) in enumerate(zip(bad, messages)):
        client.send(kwargs.pop("model"), 50 + k, **kwargs)
        rows, errors = client.collect()
        assert not rows and len(errors) == 1 and message in errors[0], errors
    # A finished sequence that Triton still knows of: the model says it is gone.
    client.send("gated_sample", 60, start=True, batch=1, labels=[0])
    assert len(client.collect()[0]) == 5
    client.send("gated_sample", 60, max_rows=1)
    rows, errors = client.collect()
    assert not rows and "not active" in errors[0]
    client.send("gated_sample", 60, end=True, seed=3)
    rows, errors = client.collect()
    assert "only go with the START request" in errors[0]
    client.send("gated_sample", 61, start=True, end=True, batch=1, labels=[1])
    rows, errors = client.collect()
    assert not errors and len(rows) == 5


def test_idle_sequences_are_expired_by_the_model(deployed, client):
    client.send("ms_sample", 71, start=True, batch=1, seed=1, max_rows=1)  # left open, never ended
    rows, _ = client.collect()
    assert rows[0]["active"] >= 1
    time.sleep(IDLE_S + 1.0)
    client.send("ms_sample", 72, start=True, end=True, batch=1, seed=2)
    rows, errors = client.collect()
    assert not errors and rows[0]["active"] == 1  # only sequence 72: 71's state was freed


def test_a_second_server_on_a_taken_port_fails_clearly(deployed, tmp_path):
    server, _ = deployed
    with pytest.raises(ServerError, match=f"grpc port {server.ports['grpc']} .* already in use"):
        TritonServer(server.repository, grpc_port=server.ports["grpc"]).start()
