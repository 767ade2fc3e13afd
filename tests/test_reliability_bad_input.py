"""Bad input to a real tritonserver: every malformed request to NAME_score and NAME_sample gets an
error naming the problem (one line, no traceback, within a deadline), and a correct request right
after still gets the right answer. Two tiny models cover both kinds of head and conditioning: a
grey binary (levels 2, Bernoulli) unconditional PixelCNN and an RGB class-conditional Gated
PixelCNN with 4 levels. Requests go out as built (client/stream.py over plain tritonclient), not
through PixelClient, which checks them first, so the server's own checks are what is tested.

A hypothesis fuzz then sends 2500 random requests. Its oracles: a refused request's message names
an input at fault (or the sequence id / START flag at fault); a scored request's NLL is the
model's; every row of an accepted sampling request is the in-process sampler's row
(runtime.rowloop.sample with the exported cells) for its sequence's seed and known prefix."""
import itertools
import math
import re
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from tests.deployment import Tiny, export_models, require, sampler_metrics, serve, wait_for

tritonclient = require("tritonclient.grpc")
require("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from tritonclient.utils import InferenceServerException, triton_to_np_dtype  # noqa: E402

from pixelrnn.client.stream import SampleStream, tensor  # noqa: E402
from pixelrnn.runtime import protocol as p  # noqa: E402
from pixelrnn.runtime import rowloop  # noqa: E402
from pixelrnn.runtime.request import MAX_TEMPERATURE, MIN_TEMPERATURE  # noqa: E402
from pixelrnn.runtime.runner import OnnxRunner  # noqa: E402

pytestmark = [pytest.mark.triton, pytest.mark.reliability]

BINARY = dict(in_channels=1, height=6, width=5, levels=2, hidden=6, layers=1, kernel=3)
RGB = dict(in_channels=3, height=5, width=4, levels=4, num_classes=2, hidden=6, layers=1, kernel=3)
MAX_BATCH = 4  # small, so "over the maximum" is a cheap request
IDLE_S = 2.0  # sequences the fuzz leaves open must be gone this soon
DEADLINE_S = 10.0  # an answer later than this is a hang
TRACEBACK = re.compile(r"Traceback|File \"")
SAMPLE_SEED = 4242


@dataclass
class Model:
    name: str
    model: torch.nn.Module
    runner: OnnxRunner  # the exported cells in process: the sampler's oracle (runtime.rowloop.sample)
    c: int
    h: int
    w: int
    levels: int
    classes: int
    images: np.ndarray  # a correct request's images and labels, and their NLL
    labels: np.ndarray | None
    nll: np.ndarray
    sample: np.ndarray  # the image the sampler must give for SAMPLE_SEED with sample_labels
    sample_labels: list | None

    def __repr__(self):  # hypothesis prints the strategies' arguments
        return f"Model({self.name})"

    def expected(self, batch, seed, temperature=1.0, labels=None, known=None) -> np.ndarray:
        """The in-process sampler's images (batch, C, H, W) for a START request's values, as the
        engine takes them: one label stands for every image, KNOWN rows are kept."""
        if labels is not None:
            labels = np.asarray(labels, np.int64).reshape(-1)
            labels = np.repeat(labels, batch) if labels.size == 1 else labels
        spec = rowloop.SampleSpec(batch=batch, temperature=temperature, seed=seed, labels=labels, known=known)
        return rowloop.sample(self.runner, spec)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """(server, {"bin": Model, "rgb": Model})."""
    root = tmp_path_factory.mktemp("bad_input")
    tinies = [Tiny("bin", "pixelcnn", BINARY, max_batch=MAX_BATCH, seed=2), Tiny("rgb", "gated_pixelcnn", RGB, max_batch=MAX_BATCH, seed=2)]
    exported = export_models(root, tinies, root / "repository", sequence_idle_s=IDLE_S)
    models = {}
    for name, config in (("bin", BINARY), ("rgb", RGB)):
        model, runner = exported[name].model, OnnxRunner.from_manifest(exported[name].manifest, exported[name].export_dir)
        c, h, w, levels, classes = config["in_channels"], config["height"], config["width"], config["levels"], config.get("num_classes", 0)
        images = np.random.default_rng(1).integers(0, levels, (2, c, h, w)).astype(np.uint8)
        labels = np.array([0, 1]) if classes else None
        sample_labels = [1, 0] if classes else None
        with torch.no_grad():
            nll = model.nll(torch.from_numpy(images).long(), None if labels is None else torch.from_numpy(labels)).numpy()
        m = Model(name, model, runner, c, h, w, levels, classes, images, labels, nll, None, sample_labels)
        m.sample = m.expected(2, SAMPLE_SEED, labels=sample_labels)
        models[name] = m
    with serve(root / "repository", root / "triton.log") as server:
        yield server, models


def build(tensors: dict) -> list:
    """{name: (values, Triton dtype) or None (left out)} -> InferInputs."""
    return [tensor(name, *spec) for name, spec in tensors.items() if spec is not None]


def check_message(message: str, pattern: str) -> None:
    assert re.search(pattern, message), f"{message!r} does not match {pattern!r}"
    assert not TRACEBACK.search(message) and "\n" not in message.strip(), f"not one clear line: {message!r}"


@pytest.fixture(scope="module")
def scorer(deployed):
    client = tritonclient.InferenceServerClient(deployed[0].grpc_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def stream(deployed):
    """One stream for the module's sampler requests; stream.request(...) -> (rows, error or None),
    a request without its final response within DEADLINE_S raises StreamTimeout (a hang)."""
    s = SampleStream(deployed[0].grpc_url, timeout=DEADLINE_S)
    yield s
    assert s.close(cancel=True), "the stream did not close in time"


SEQ = itertools.count(100)  # every case its own sequence ids


def score(client, m: Model, inputs):
    """The NLL of a request, or the error message; a hang fails."""
    try:
        return client.infer(f"{m.name}_score", inputs, client_timeout=DEADLINE_S).as_numpy(p.NLL_NATS), None
    except InferenceServerException as e:
        assert "DEADLINE_EXCEEDED" not in str(e.status()), f"{m.name}_score did not answer within {DEADLINE_S} s"
        return None, str(e)


def good_score(m: Model, **change):
    tensors = {p.IMAGES: (m.images, "UINT8")}
    if m.classes:
        tensors[p.LABELS] = (m.labels[:, None], "INT64")
    tensors.update(change)
    return build(tensors)


def good_start(m: Model, **change):
    tensors = {p.BATCH_SIZE: ([1], "INT32"), p.SEED: ([7], "UINT64")}
    if m.classes:
        tensors[p.LABELS] = ([0], "INT64")
    tensors.update(change)
    return build(tensors)


def assert_scores_correctly(client, m: Model):
    nll, error = score(client, m, good_score(m))
    assert error is None, error
    np.testing.assert_allclose(nll[:, 0], m.nll, rtol=1e-5, atol=1e-4)


def assert_samples_correctly(stream: SampleStream, m: Model):
    tensors = {p.BATCH_SIZE: ([2], "INT32"), p.SEED: ([SAMPLE_SEED], "UINT64")}
    if m.classes:
        tensors[p.LABELS] = (m.sample_labels, "INT64")
    rows, error = stream.request(f"{m.name}_sample", next(SEQ), build(tensors), start=True, end=True)
    assert error is None, error
    assert [r.index for r in rows] == list(range(m.h))
    np.testing.assert_array_equal(np.stack([r.pixels for r in rows], axis=2), m.sample)


# -- the scorer: one bad request per case, for both models --------------------------------------

HW = "IMAGES_HW"  # N x H x W images under a name of their own: an input no model has


def hw(m, n=2):
    return np.zeros((n, m.h, m.w), np.uint8)


def nchw(m, n=2, value=0, dtype=np.uint8):
    return np.full((n, m.c, m.h, m.w), value, dtype)


DTYPE = r"input '{name}' data-type is '{got}', but model '\w+' expects '{want}'"
SHAPE = r"unexpected shape for input '{name}'"
SCORE_CASES = {  # id: (models, request changes, message pattern)
    "float images": ("both", lambda m: good_score(m, IMAGES=(nchw(m, dtype=np.float32), "FP32")), DTYPE.format(name="IMAGES", got="FP32", want="UINT8")),
    "300 as uint16": ("both", lambda m: good_score(m, IMAGES=(nchw(m, 2, 300, np.uint16), "UINT16")), DTYPE.format(name="IMAGES", got="UINT16", want="UINT8")),
    "300 as int32": ("both", lambda m: good_score(m, IMAGES=(nchw(m, 2, 300, np.int32), "INT32")), DTYPE.format(name="IMAGES", got="INT32", want="UINT8")),
    "images as strings": ("both", lambda m: good_score(m, IMAGES=(nchw(m).astype(bytes), "BYTES")), DTYPE.format(name="IMAGES", got="BYTES", want="UINT8")),
    "rank 3": ("both", lambda m: good_score(m, IMAGES=(nchw(m)[:, 0], "UINT8")), SHAPE.format(name="IMAGES")),
    "rank 5": ("both", lambda m: good_score(m, IMAGES=(nchw(m)[:, None], "UINT8")), SHAPE.format(name="IMAGES")),
    "wrong height": ("both", lambda m: good_score(m, IMAGES=(np.zeros((2, m.c, m.h + 1, m.w), np.uint8), "UINT8")), SHAPE.format(name="IMAGES")),
    "wrong width": ("both", lambda m: good_score(m, IMAGES=(np.zeros((2, m.c, m.h, m.w - 1), np.uint8), "UINT8")), SHAPE.format(name="IMAGES")),
    "wrong channels": ("both", lambda m: good_score(m, IMAGES=(np.zeros((2, m.c + 1, m.h, m.w), np.uint8), "UINT8")), SHAPE.format(name="IMAGES")),
    "zero width": ("both", lambda m: good_score(m, IMAGES=(np.zeros((2, m.c, m.h, 0), np.uint8), "UINT8")), SHAPE.format(name="IMAGES")),
    "value = levels": ("both", lambda m: good_score(m, IMAGES=(nchw(m, 2, m.levels), "UINT8")), r"IMAGES values must be in \[0, {levels}\).*got {levels}"),
    "value 255": ("both", lambda m: good_score(m, IMAGES=(nchw(m, 2, 255), "UINT8")), r"IMAGES values must be in \[0, {levels}\).*got 255"),
    # Triton refuses an empty batch itself, before the model, as a byte-size mismatch of IMAGES.
    "empty batch": ("both", lambda m: good_score(m, IMAGES=(nchw(m, 0), "UINT8"), **({"LABELS": (np.zeros((0, 1), np.int64), "INT64")} if m.classes else {})),
                    r"input '(IMAGES|LABELS)'.*got 0"),
    "batch over the maximum": ("both", lambda m: good_score(m, IMAGES=(nchw(m, MAX_BATCH + 1), "UINT8"),
                                                           **({"LABELS": (np.zeros((MAX_BATCH + 1, 1), np.int64), "INT64")} if m.classes else {})),
                               rf"batch-size must be <= {MAX_BATCH}"),
    "unknown input": ("both", lambda m: good_score(m, FOO=(np.zeros((2, 1), np.int32), "INT32")), r"'FOO'"),
    # Triton checks required inputs by their count: LABELS alone (rgb) reaches the model.
    "no images": ("both", lambda m: good_score(m, IMAGES=None), r"send the images as IMAGES|0 inputs"),
    # One image layout: N x H x W images under a name of their own are an unknown input (Triton's words).
    "N x H x W images": ("both", lambda m: good_score(m, IMAGES=None, IMAGES_HW=(hw(m), "UINT8")), r"unexpected inference input 'IMAGES_HW'"),
    "N x H x W images beside IMAGES": ("both", lambda m: good_score(m, IMAGES_HW=(hw(m), "UINT8")),
                                       r"but got \d inputs .*Got input\(s\) \[.*'IMAGES_HW'"),  # one input too many
    "labels to an unconditional model": ("bin", lambda m: good_score(m, LABELS=(np.zeros((2, 1), np.int64), "INT64")),
                                         r"expected 1 inputs but got 2 .*Got input\(s\) \[.*'LABELS'"),  # one input too many
    "no labels": ("rgb", lambda m: good_score(m, LABELS=None), r"class-conditional: send LABELS"),
    "unknown class label": ("rgb", lambda m: good_score(m, LABELS=(np.array([[0], [2]]), "INT64")), r"LABELS must be in \[0, 2\), got \[0, 2\]"),
    "negative label": ("rgb", lambda m: good_score(m, LABELS=(np.array([[-1], [0]]), "INT64")), r"LABELS must be in \[0, 2\), got \[-1, 0\]"),
    "huge label": ("rgb", lambda m: good_score(m, LABELS=(np.array([[2**62], [0]]), "INT64")), r"LABELS must be in \[0, 2\)"),
    "labels as int32": ("rgb", lambda m: good_score(m, LABELS=(np.array([[0], [1]], np.int32), "INT32")), DTYPE.format(name="LABELS", got="INT32", want="INT64")),
    "labels of rank 1": ("rgb", lambda m: good_score(m, LABELS=(np.array([0, 1]), "INT64")), SHAPE.format(name="LABELS")),
    "one label for two images": ("rgb", lambda m: good_score(m, LABELS=(np.array([[0]]), "INT64")), r"batch size does not match other inputs"),
}
SCORE_MATRIX = [(case, name) for case, (models, _, _) in SCORE_CASES.items() for name in ("bin", "rgb") if models in ("both", name)]


@pytest.mark.parametrize("case, name", SCORE_MATRIX, ids=[f"{n}-{c}" for c, n in SCORE_MATRIX])
def test_bad_score_request_gets_a_clear_error_then_scoring_works(deployed, scorer, case, name):
    m = deployed[1][name]
    _, make, pattern = SCORE_CASES[case]
    start = time.monotonic()
    nll, error = score(scorer, m, make(m))
    assert error is not None, f"accepted: {nll}"
    assert time.monotonic() - start < DEADLINE_S
    check_message(error, pattern.format(levels=m.levels))
    assert error.startswith("[StatusCode.INVALID_ARGUMENT]"), "the client's mistake, not the server's"
    assert_scores_correctly(scorer, m)


# -- the sampler ---------------------------------------------------------------------------------

def known(m, n=1, rows=2, value=0, dtype=np.uint8, c=None, w=None):
    return np.full((n, m.c if c is None else c, rows, m.w if w is None else w), value, dtype)


TEMPERATURE = r"TEMPERATURE must be 0 \(greedy\) or"
SAMPLE_CASES = {  # id: (models, [(start, end, request)], message pattern of the last request's error)
    "NaN temperature": ("both", [(True, True, lambda m: good_start(m, TEMPERATURE=([math.nan], "FP64")))], TEMPERATURE + r".*got nan"),
    "negative temperature": ("both", [(True, True, lambda m: good_start(m, TEMPERATURE=([-0.5], "FP64")))], TEMPERATURE + r".*got -0.5"),
    "infinite temperature": ("both", [(True, True, lambda m: good_start(m, TEMPERATURE=([math.inf], "FP64")))], TEMPERATURE + r".*got inf"),
    "too hot temperature": ("both", [(True, True, lambda m: good_start(m, TEMPERATURE=([6.0], "FP64")))], TEMPERATURE + r".*got 6.0"),
    # 1/T overflows: the softmax turns to NaN and the "sample" is neither sampled nor greedy.
    "subnormal temperature": ("both", [(True, True, lambda m: good_start(m, TEMPERATURE=([5e-324], "FP64")))], TEMPERATURE + r".*got 5e-324"),
    "float32 temperature": ("both", [(True, True, lambda m: good_start(m, TEMPERATURE=([1.0], "FP32")))], DTYPE.format(name="TEMPERATURE", got="FP32", want="FP64")),
    "two temperatures": ("both", [(True, True, lambda m: good_start(m, TEMPERATURE=([1.0, 1.0], "FP64")))], SHAPE.format(name="TEMPERATURE")),
    "scalar temperature": ("both", [(True, True, lambda m: good_start(m, TEMPERATURE=(np.float64(1.0), "FP64")))], SHAPE.format(name="TEMPERATURE")),
    "empty batch": ("both", [(True, True, lambda m: good_start(m, BATCH_SIZE=([0], "INT32")))], rf"BATCH_SIZE must be in \[1, {MAX_BATCH}\], got 0"),
    "negative batch": ("both", [(True, True, lambda m: good_start(m, BATCH_SIZE=([-3], "INT32")))], rf"BATCH_SIZE must be in \[1, {MAX_BATCH}\], got -3"),
    "batch over the maximum": ("both", [(True, True, lambda m: good_start(m, BATCH_SIZE=([MAX_BATCH + 1], "INT32")))],
                               rf"BATCH_SIZE must be in \[1, {MAX_BATCH}\], got {MAX_BATCH + 1}"),
    "batch as int64": ("both", [(True, True, lambda m: good_start(m, BATCH_SIZE=([1], "INT64")))], DTYPE.format(name="BATCH_SIZE", got="INT64", want="INT32")),
    "negative seed as int64": ("both", [(True, True, lambda m: good_start(m, SEED=([-1], "INT64")))], DTYPE.format(name="SEED", got="INT64", want="UINT64")),
    "negative max rows": ("both", [(True, True, lambda m: good_start(m, MAX_ROWS=([-1], "INT32")))], r"MAX_ROWS must be >= 0, got -1"),
    "zero rows per response": ("both", [(True, True, lambda m: good_start(m, ROWS_PER_RESPONSE=([0], "INT32")))],
                               r"ROWS_PER_RESPONSE must be >= 1 .*got 0"),
    "rows per response as int64": ("both", [(True, True, lambda m: good_start(m, ROWS_PER_RESPONSE=([1], "INT64")))],
                                   DTYPE.format(name="ROWS_PER_RESPONSE", got="INT64", want="INT32")),
    "negative rows per response on a later step": ("both", [(True, False, lambda m: good_start(m, MAX_ROWS=([1], "INT32"))),
                                                            (False, True, lambda m: build({p.ROWS_PER_RESPONSE: ([-2], "INT32")}))],
                                                   r"ROWS_PER_RESPONSE must be >= 1 .*got -2"),
    "prefix value = levels": ("both", [(True, True, lambda m: good_start(m, KNOWN=(known(m, value=m.levels), "UINT8")))],
                              r"KNOWN values must be < {levels}.*got {levels}"),
    "prefix value 255": ("both", [(True, True, lambda m: good_start(m, KNOWN=(known(m, value=255), "UINT8")))], r"KNOWN values must be < {levels}.*got 255"),
    "prefix 300 as uint16": ("both", [(True, True, lambda m: good_start(m, KNOWN=(known(m, value=300, dtype=np.uint16), "UINT16")))],
                             DTYPE.format(name="KNOWN", got="UINT16", want="UINT8")),
    "prefix longer than the image": ("both", [(True, True, lambda m: good_start(m, KNOWN=(known(m, rows=m.h + 1), "UINT8")))], r"KNOWN must be 1 x .*R <= {h}"),
    "prefix of the wrong width": ("both", [(True, True, lambda m: good_start(m, KNOWN=(known(m, w=m.w + 1), "UINT8")))], SHAPE.format(name="KNOWN")),
    "prefix of the wrong channels": ("both", [(True, True, lambda m: good_start(m, KNOWN=(known(m, c=m.c + 1), "UINT8")))], SHAPE.format(name="KNOWN")),
    "prefix of rank 3": ("both", [(True, True, lambda m: good_start(m, KNOWN=(known(m)[0], "UINT8")))], SHAPE.format(name="KNOWN")),
    "prefix of 0 images": ("both", [(True, True, lambda m: good_start(m, BATCH_SIZE=None, KNOWN=(known(m, n=0), "UINT8")))], rf"KNOWN must hold between 1 and {MAX_BATCH} images.*got 0"),
    "prefix over the maximum batch": ("both", [(True, True, lambda m: good_start(m, BATCH_SIZE=None, KNOWN=(known(m, n=MAX_BATCH + 1), "UINT8")))],
                                      rf"KNOWN must hold between 1 and {MAX_BATCH} images.*got {MAX_BATCH + 1}"),
    "prefix batch is not BATCH_SIZE": ("both", [(True, True, lambda m: good_start(m, BATCH_SIZE=([2], "INT32"), KNOWN=(known(m, n=1), "UINT8")))],
                                       r"KNOWN must be 2 x .*got 1 x"),
    "unknown input": ("both", [(True, True, lambda m: good_start(m, FOO=([1], "INT32")))], r"unexpected inference input 'FOO'"),
    "labels to an unconditional model": ("bin", [(True, True, lambda m: good_start(m, LABELS=([0], "INT64")))], r"unexpected inference input 'LABELS'"),
    "no labels": ("rgb", [(True, True, lambda m: good_start(m, LABELS=None))], r"class-conditional: LABELS .* is required"),
    "unknown class label": ("rgb", [(True, True, lambda m: good_start(m, LABELS=([2], "INT64")))], r"LABELS must be in \[0, 2\), got \[2\]"),
    "negative label": ("rgb", [(True, True, lambda m: good_start(m, LABELS=([-1], "INT64")))], r"LABELS must be in \[0, 2\), got \[-1\]"),
    "no label values": ("rgb", [(True, True, lambda m: good_start(m, LABELS=(np.zeros(0, np.int64), "INT64")))], r"LABELS must hold 1 .*got 0"),
    "three labels for two images": ("rgb", [(True, True, lambda m: good_start(m, BATCH_SIZE=([2], "INT32"), LABELS=([0, 1, 1], "INT64")))],
                                    r"LABELS must hold 1 class id or one per image \(2\), got 3"),
    "labels as int32": ("rgb", [(True, True, lambda m: good_start(m, LABELS=([0], "INT32")))], DTYPE.format(name="LABELS", got="INT32", want="INT64")),
    "labels of rank 2": ("rgb", [(True, True, lambda m: good_start(m, LABELS=([[0]], "INT64")))], SHAPE.format(name="LABELS")),
    "correlation id 0": ("both", [("seq0", True, lambda m: good_start(m))], r"non-zero .*correlation ID"),
    "a step for a sequence never started": ("both", [(False, False, lambda m: [])], r"sequence \d+ .*must specify the START flag"),
    "an ending step for a sequence never started": ("both", [(False, True, lambda m: build({p.MAX_ROWS: ([1], "INT32")}))], r"must specify the START flag"),
    "start-only input on a later step": ("both", [(True, False, lambda m: good_start(m, MAX_ROWS=([1], "INT32"))),
                                                  (False, True, lambda m: build({p.SEED: ([3], "UINT64")}))], r"SEED only go with the START request"),
    "a step after the image is complete": ("both", [(True, False, lambda m: good_start(m)), (False, True, lambda m: [])], r"sequence \d+ is not active"),
}
SAMPLE_MATRIX = [(case, name) for case, (models, _, _) in SAMPLE_CASES.items() for name in ("bin", "rgb") if models in ("both", name)]


@pytest.mark.parametrize("case, name", SAMPLE_MATRIX, ids=[f"{n}-{c}" for c, n in SAMPLE_MATRIX])
def test_bad_sample_request_gets_a_clear_error_then_sampling_works(deployed, stream, case, name):
    m = deployed[1][name]
    _, requests, pattern = SAMPLE_CASES[case]
    seq = next(SEQ)
    for k, (start, end, make) in enumerate(requests):
        last = k == len(requests) - 1
        t0 = time.monotonic()
        rows, error = stream.request(f"{m.name}_sample", 0 if start == "seq0" else seq, make(m), start=bool(start), end=end)
        assert time.monotonic() - t0 < DEADLINE_S
        if not last:
            assert error is None, error
            continue
        assert error is not None and not rows, f"accepted: {len(rows)} rows"
        check_message(error, pattern.format(levels=m.levels, h=m.h))
    assert_samples_correctly(stream, m)


@pytest.mark.parametrize("name", ["bin", "rgb"])
def test_a_second_start_for_a_live_sequence_is_refused_and_the_live_one_goes_on(deployed, stream, name):
    m = deployed[1][name]
    seq = next(SEQ)
    tensors = {p.BATCH_SIZE: ([2], "INT32"), p.SEED: ([SAMPLE_SEED], "UINT64"), p.MAX_ROWS: ([2], "INT32")}
    if m.classes:
        tensors[p.LABELS] = (m.sample_labels, "INT64")
    first, error = stream.request(f"{name}_sample", seq, build(tensors), start=True)
    assert error is None and len(first) == 2
    # Without sequence_end: an END flag would make Triton forget the live sequence's id.
    rows, error = stream.request(f"{name}_sample", seq, good_start(m, SEED=([99], "UINT64")), start=True)
    assert not rows and error is not None
    check_message(error, rf"sequence {seq} is already active")
    rest, error = stream.request(f"{name}_sample", seq, [], end=True)  # the live stream is untouched: same seed, same image
    assert error is None
    assert [r.index for r in first + rest] == list(range(m.h))
    np.testing.assert_array_equal(np.stack([r.pixels for r in first + rest], axis=2), m.sample)
    assert_samples_correctly(stream, m)


def start_request(m: Model, max_rows=None):
    tensors = {p.BATCH_SIZE: ([2], "INT32"), p.SEED: ([SAMPLE_SEED], "UINT64"), p.MAX_ROWS: None if max_rows is None else ([max_rows], "INT32")}
    if m.classes:
        tensors[p.LABELS] = (m.sample_labels, "INT64")
    return build(tensors)


REFUSED_ENDINGS = {  # a live sequence, then a refused request with sequence_end
    "later step with a start-only input": (False, lambda m: build({p.SEED: ([3], "UINT64")}), r"SEED only go with the START"),
    "later step with negative max rows": (False, lambda m: build({p.MAX_ROWS: ([-1], "INT32")}), r"MAX_ROWS must be >= 0"),
    "start with a NaN temperature": (True, lambda m: good_start(m, TEMPERATURE=([math.nan], "FP64")), r"TEMPERATURE must be"),
}


@pytest.mark.parametrize("case", REFUSED_ENDINGS)
@pytest.mark.parametrize("name", ["bin", "rgb"])
def test_a_refused_request_with_sequence_end_frees_the_sequence_id(deployed, stream, name, case):
    """Triton forgets a sequence at its END even when the model refuses the request: the sampler
    must free it too, or a new START with the id is "already active" until the idle timeout."""
    m = deployed[1][name]
    start, make, pattern = REFUSED_ENDINGS[case]
    seq = next(SEQ)
    rows, error = stream.request(f"{name}_sample", seq, start_request(m, max_rows=1), start=True)
    assert error is None and len(rows) == 1
    rows, error = stream.request(f"{name}_sample", seq, make(m), start=start, end=True)
    assert not rows and error is not None
    check_message(error, pattern)
    rows, error = stream.request(f"{name}_sample", seq, start_request(m), start=True, end=True)
    assert error is None, error
    np.testing.assert_array_equal(np.stack([r.pixels for r in rows], axis=2), m.sample)


def test_a_second_start_with_sequence_end_frees_the_sequence_id(deployed, stream):
    m = deployed[1]["bin"]
    seq = next(SEQ)
    assert len(stream.request("bin_sample", seq, start_request(m, max_rows=1), start=True)[0]) == 1
    rows, error = stream.request("bin_sample", seq, start_request(m), start=True, end=True)
    assert error is not None and "already active" in error
    rows, error = stream.request("bin_sample", seq, start_request(m), start=True, end=True)
    assert error is None, error


# -- fuzz ----------------------------------------------------------------------------------------

DTYPES = ["UINT8", "UINT16", "INT8", "INT32", "INT64", "UINT64", "FP16", "FP32", "FP64", "BOOL", "BYTES"]
SPECIAL = [0, 1, 2, 3, 4, 5, 255, 256, 300, -1, -128, 2**31 - 1, -2**31, 2**63 - 1, 2**64 - 1, 0.5, -0.0, 1e-310, 5e-324, 1e308,
           math.nan, math.inf, -math.inf]


def cast(values: np.ndarray, dtype: str) -> np.ndarray:
    """Float64/object values into a Triton dtype the way a careless client might: clipped, NaN -> 0."""
    values = np.asarray(values)  # rng.integers gives a plain int for shape ()
    if dtype == "BYTES":
        return np.array([str(v).encode() for v in values.reshape(-1)], dtype=object).reshape(values.shape)
    np_dtype = np.dtype(triton_to_np_dtype(dtype))
    if np_dtype.kind in "iu":
        info = np.iinfo(np_dtype)
        flat = [0 if not math.isfinite(float(v)) else min(max(int(v), info.min), info.max) for v in values.reshape(-1)]
        return np.array(flat, dtype=np_dtype).reshape(values.shape)
    with np.errstate(over="ignore", invalid="ignore"):
        return values.astype(np.float64).astype(np_dtype)


@st.composite
def mutated(draw, tensors: dict, table: dict, unwanted: list):
    """A correct request after 0 to 3 random mutations: an input dropped or added (one of
    `unwanted`), a dtype or shape changed, values replaced by extreme ones. table: {name:
    (dtype, dims with None for free sizes, [low, high) of correct values)}."""
    tensors = dict(tensors)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 1, 1, 2, 3]))):
        kind = draw(st.sampled_from(["drop", "add", "dtype", "shape", "values", "values"]))
        if kind == "add" or not tensors:
            name = draw(st.sampled_from(unwanted))
            dtype, dims, (low, high) = table[name]
            values = rng.integers(low, high, [int(rng.integers(0, MAX_BATCH + 2)) if d is None else d for d in dims])
            tensors[name] = (cast(values, dtype), dtype)
            continue
        name = draw(st.sampled_from(sorted(tensors)))
        values, dtype = tensors[name]
        if kind == "drop":
            del tensors[name]
        elif kind == "dtype":
            dtype = draw(st.sampled_from(DTYPES))
            tensors[name] = (cast(values, dtype), dtype)
        elif kind == "shape":
            shape = list(values.shape)
            how = draw(st.sampled_from(["dim", "zero", "rank-", "rank+", "random"]))
            if how in ("dim", "zero") and shape:
                shape[draw(st.integers(0, len(shape) - 1))] = 0 if how == "zero" else draw(st.integers(0, 7))
            elif how == "rank-" and shape:
                shape.pop(draw(st.integers(0, len(shape) - 1)))
            elif how == "rank+":
                shape.insert(draw(st.integers(0, len(shape))), draw(st.integers(0, 3)))
            else:
                shape = draw(st.lists(st.integers(0, 4), max_size=4))
            low, high = table[name][2]
            tensors[name] = (cast(rng.integers(low, high, shape), dtype), dtype)
        else:
            special = np.array(SPECIAL, dtype=object)
            fill = np.full(values.shape, draw(st.sampled_from(SPECIAL)), dtype=object) if draw(st.booleans()) \
                else special[rng.integers(0, len(special), values.shape)]
            tensors[name] = (cast(fill, dtype), dtype)
    return tensors


def one_line_error(message: str) -> None:
    assert not TRACEBACK.search(message) and "\n" not in message.strip(), f"not one clear line: {message!r}"
    assert "DEADLINE_EXCEEDED" not in message, "no answer within the deadline"
    assert re.search(r"\b(IMAGES(_HW)?|LABELS|BATCH_SIZE|TEMPERATURE|SEED|KNOWN|MAX_ROWS|ROWS_PER_RESPONSE|FOO)\b|input|batch-size|sequence|correlation ID",
                     message), f"names nothing: {message!r}"


def right(spec, dtype, shape) -> bool:
    values, got = spec
    return got == dtype and values.ndim == len(shape) and all(d is None or d == s for d, s in zip(shape, values.shape))


def first(spec):
    return spec[0].reshape(-1)[0]


def score_is_valid(m: Model, tensors: dict) -> bool:
    """Whether the scorer must accept this request (the protocol, server/protocol.py)."""
    allowed = {p.IMAGES} | ({p.LABELS} if m.classes else set())
    if set(tensors) - allowed or p.IMAGES not in tensors:
        return False
    images, _ = tensors[p.IMAGES]
    if not right(tensors[p.IMAGES], "UINT8", (None, m.c, m.h, m.w)):
        return False
    if not 1 <= images.shape[0] <= MAX_BATCH or images.max() >= m.levels:
        return False
    if m.classes:
        if p.LABELS not in tensors or not right(tensors[p.LABELS], "INT64", (images.shape[0], 1)):
            return False
        labels = tensors[p.LABELS][0]
        return bool(labels.min() >= 0 and labels.max() < m.classes)
    return True


BATCH = "batch-size"  # the batch dimension at fault: Triton says "batch-size must be <= N"
CORRELATION = "correlation ID"  # a sequence id of 0: Triton asks for "a non-zero ... correlation ID"
NO_INPUTS = "request has 0 inputs"  # no input at all: Triton's words


def names_one(message: str, culprits: set[str]) -> bool:
    """Whether the message names one of the culprits: an input name as a whole word (IMAGES is
    not named by IMAGES_HW, an unknown input the fuzz sends), or one of the phrases above."""
    return any(re.search(re.escape(c) if c in (BATCH, CORRELATION, NO_INPUTS) else rf"\b{re.escape(c)}\b", message) for c in culprits)


def score_culprits(m: Model, tensors: dict) -> set[str]:
    """What is wrong with a scoring request (the protocol, runtime/protocol.py): every input at
    fault (missing ones too), BATCH for a batch over the maximum; empty for a valid request.
    A request wrong in several ways may be refused for any of them."""
    allowed = {p.IMAGES} | ({p.LABELS} if m.classes else set())
    culprits = set(tensors) - allowed  # unknown inputs: FOO, IMAGES_HW (N x H x W images), LABELS to an unconditional model
    # Triton takes every input's first dimension as the batch and checks it first: over the
    # maximum, or not the same in every input (then it names any one of them).
    if any(v.ndim and v.shape[0] > MAX_BATCH for v, _ in tensors.values()):
        culprits.add(BATCH)
    if len({v.shape[0] for v, _ in tensors.values() if v.ndim}) > 1:
        culprits |= {n for n, (v, _) in tensors.items() if v.ndim}
    if p.IMAGES not in tensors:
        culprits.add(p.IMAGES)
    if not tensors:
        culprits.add(NO_INPUTS)
    batches = set()
    if p.IMAGES in tensors:
        if not right(tensors[p.IMAGES], "UINT8", (None, m.c, m.h, m.w)):
            culprits.add(p.IMAGES)
        else:
            images = tensors[p.IMAGES][0]
            batches.add(images.shape[0])
            if images.shape[0] == 0 or (images.size and images.max() >= m.levels):
                culprits.add(p.IMAGES)
    if m.classes:
        if p.LABELS not in tensors or not right(tensors[p.LABELS], "INT64", (None, 1)):
            culprits.add(p.LABELS)
        else:
            labels = tensors[p.LABELS][0]
            if labels.shape[0] == 0 or (labels.size and (labels.min() < 0 or labels.max() >= m.classes)):
                culprits.add(p.LABELS)
            if batches and labels.shape[0] not in batches:  # one label per image
                culprits |= {p.LABELS, p.IMAGES}
    return culprits


def fuzz_settings(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=list(HealthCheck))


N_SCORE_FUZZ, N_SAMPLE_FUZZ = 1250, 1250


def score_table(m: Model) -> dict:
    return {p.IMAGES: ("UINT8", (None, m.c, m.h, m.w), (0, m.levels)), HW: ("UINT8", (None, m.h, m.w), (0, m.levels)),
            p.LABELS: ("INT64", (None, 1), (0, max(m.classes, 1))), "FOO": ("INT32", (None,), (0, 2))}


@st.composite
def score_request(draw, m: Model):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    images = rng.integers(0, m.levels, (draw(st.integers(1, MAX_BATCH)), m.c, m.h, m.w)).astype(np.uint8)
    tensors = {p.IMAGES: (images, "UINT8")}
    if m.classes:
        tensors[p.LABELS] = (rng.integers(0, m.classes, (len(images), 1)), "INT64")
    return draw(mutated(tensors, score_table(m), ["FOO", HW, p.IMAGES, p.LABELS]))


def test_fuzz_score(deployed, scorer):
    """Random requests: the valid ones are scored right, the others refused with one clear line."""
    models = deployed[1]
    counts = {"scored": 0, "refused": 0}

    @fuzz_settings(N_SCORE_FUZZ)
    @given(data=st.data())
    def one(data):
        m = models[data.draw(st.sampled_from(["bin", "rgb"]))]
        tensors = data.draw(score_request(m))
        nll, error = score(scorer, m, build(tensors))
        valid = score_is_valid(m, tensors)
        culprits = score_culprits(m, tensors)
        assert valid == (not culprits), f"the two oracles disagree: valid {valid}, culprits {culprits}"
        if error is not None:
            counts["refused"] += 1
            one_line_error(error)
            assert not valid, f"a valid request was refused: {error}"
            assert error.startswith("[StatusCode.INVALID_ARGUMENT]"), error
            assert names_one(error, culprits), f"names none of {sorted(culprits)}: {error!r}"
            return
        counts["scored"] += 1
        assert valid, "an invalid request was scored"
        images = tensors[p.IMAGES][0]
        assert nll.shape == (len(images), 1) and np.all(np.isfinite(nll)) and np.all(nll >= 0)
        labels = torch.from_numpy(tensors[p.LABELS][0][:, 0]) if m.classes else None
        with torch.no_grad():
            want = m.model.nll(torch.from_numpy(images.astype(np.int64)), labels).numpy()
        np.testing.assert_allclose(nll[:, 0], want, rtol=1e-4, atol=1e-3)

    one()
    print(f"\nscorer fuzz: {counts}")
    assert min(counts.values()) > N_SCORE_FUZZ // 10, counts  # both paths well exercised
    assert deployed[0].running() and scorer.is_server_live(client_timeout=DEADLINE_S)
    for m in models.values():
        assert_scores_correctly(scorer, m)


SAMPLE_INPUTS = {p.BATCH_SIZE: "INT32", p.TEMPERATURE: "FP64", p.SEED: "UINT64", p.LABELS: "INT64", p.KNOWN: "UINT8", p.MAX_ROWS: "INT32",
                 p.ROWS_PER_RESPONSE: "INT32"}


def sample_must_fail(m: Model, tensors: dict, start: bool, seq: int) -> bool:
    """Whether a sampler request is wrong whatever the sequence's state (server/protocol.py)."""
    dims = {p.BATCH_SIZE: (1,), p.TEMPERATURE: (1,), p.SEED: (1,), p.LABELS: (None,), p.KNOWN: (None, m.c, None, m.w), p.MAX_ROWS: (1,),
            p.ROWS_PER_RESPONSE: (1,)}
    allowed = set(SAMPLE_INPUTS) - (set() if m.classes else {p.LABELS})
    if seq == 0 or set(tensors) - allowed or any(not right(t, SAMPLE_INPUTS[n], dims[n]) for n, t in tensors.items()):
        return True
    if p.MAX_ROWS in tensors and first(tensors[p.MAX_ROWS]) < 0:
        return True
    if p.ROWS_PER_RESPONSE in tensors and first(tensors[p.ROWS_PER_RESPONSE]) < 1:
        return True
    if not start:
        return bool(set(tensors) & set(p.START_ONLY))
    known = tensors[p.KNOWN][0] if p.KNOWN in tensors else None
    batch = int(first(tensors[p.BATCH_SIZE])) if p.BATCH_SIZE in tensors else 1 if known is None else known.shape[0]
    t = float(first(tensors[p.TEMPERATURE])) if p.TEMPERATURE in tensors else 1.0
    if not 1 <= batch <= MAX_BATCH or not (math.isfinite(t) and (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE)):
        return True
    if m.classes:
        labels = tensors[p.LABELS][0] if p.LABELS in tensors else np.zeros(0)
        if labels.size not in (1, batch) or labels.min() < 0 or labels.max() >= m.classes:
            return True
    return known is not None and (known.shape[0] != batch or known.shape[2] > m.h or (known.size and known.max() >= m.levels))


def triton_culprits(m: Model, tensors: dict, seq: int) -> set[str]:
    """What Triton itself refuses in a sampler request, before the model sees it: sequence id 0,
    inputs the model does not have, inputs of the wrong dtype or shape."""
    dims = {p.BATCH_SIZE: (1,), p.TEMPERATURE: (1,), p.SEED: (1,), p.LABELS: (None,), p.KNOWN: (None, m.c, None, m.w), p.MAX_ROWS: (1,),
            p.ROWS_PER_RESPONSE: (1,)}
    allowed = set(SAMPLE_INPUTS) - (set() if m.classes else {p.LABELS})
    culprits = (set(tensors) - allowed) | {n for n, t in tensors.items() if n in allowed and not right(t, SAMPLE_INPUTS[n], dims[n])}
    return culprits | ({CORRELATION} if seq == 0 else set())


def sample_culprits(m: Model, tensors: dict, start: bool, seq: int) -> set[str]:
    """What is wrong with a sampler request whatever the sequence's state: the inputs at fault,
    CORRELATION for sequence id 0; empty where sample_must_fail is False. Triton's own checks
    (the sequence id, input names, dtypes, shapes) come before the model sees anything, so where
    one fails only those are returned; otherwise every fault the model's checks can name."""
    culprits = triton_culprits(m, tensors, seq)
    if culprits:
        return culprits
    if p.MAX_ROWS in tensors and first(tensors[p.MAX_ROWS]) < 0:
        culprits.add(p.MAX_ROWS)
    if p.ROWS_PER_RESPONSE in tensors and first(tensors[p.ROWS_PER_RESPONSE]) < 1:
        culprits.add(p.ROWS_PER_RESPONSE)
    if not start:
        return culprits | (set(tensors) & set(p.START_ONLY))
    known = tensors[p.KNOWN][0] if p.KNOWN in tensors else None
    batch = int(first(tensors[p.BATCH_SIZE])) if p.BATCH_SIZE in tensors else 1 if known is None else known.shape[0]
    t = float(first(tensors[p.TEMPERATURE])) if p.TEMPERATURE in tensors else 1.0
    if not 1 <= batch <= MAX_BATCH:
        culprits.add(p.BATCH_SIZE if p.BATCH_SIZE in tensors else p.KNOWN)  # without BATCH_SIZE, KNOWN's images are the batch
    if not (math.isfinite(t) and (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE)):
        culprits.add(p.TEMPERATURE)
    if m.classes:
        labels = tensors[p.LABELS][0] if p.LABELS in tensors else np.zeros(0)
        if labels.size == 0 or labels.size not in (1, batch) or labels.min() < 0 or labels.max() >= m.classes:
            culprits.add(p.LABELS)
    if known is not None and (known.shape[0] != batch or known.shape[2] > m.h or (known.size and known.max() >= m.levels)):
        culprits.add(p.KNOWN)
    return culprits


def sample_table(m: Model) -> dict:
    return {p.BATCH_SIZE: ("INT32", (1,), (1, MAX_BATCH + 1)), p.TEMPERATURE: ("FP64", (1,), (0, 2)), p.SEED: ("UINT64", (1,), (0, 2**62)),
            p.LABELS: ("INT64", (None,), (0, max(m.classes, 1))), p.KNOWN: ("UINT8", (None, m.c, None, m.w), (0, m.levels)),
            p.MAX_ROWS: ("INT32", (1,), (0, m.h + 2)), p.ROWS_PER_RESPONSE: ("INT32", (1,), (1, 4)), "FOO": ("INT32", (1,), (0, 2))}


@st.composite
def sample_request(draw, m: Model, start: bool):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    tensors = {}
    if start:
        b = draw(st.integers(1, MAX_BATCH))
        if draw(st.booleans()):
            tensors[p.KNOWN] = (rng.integers(0, m.levels, (b, m.c, draw(st.integers(0, m.h)), m.w)).astype(np.uint8), "UINT8")
        if p.KNOWN not in tensors or draw(st.booleans()):
            tensors[p.BATCH_SIZE] = (np.array([b], np.int32), "INT32")
        if draw(st.booleans()):
            # Around the edges of what is allowed too: greedy, just above/below the smallest T > 0 and
            # the largest, huge.
            temperatures = [0.0, -0.0, 1e-6, 0.3, 1.0, 2.5, MAX_TEMPERATURE, MAX_TEMPERATURE * 1.01, 1e308, 5e-324, 1e-310, 1e-7,
                            -1e-300]
            tensors[p.TEMPERATURE] = (np.array([draw(st.sampled_from(temperatures))]), "FP64")
        if draw(st.booleans()):
            tensors[p.SEED] = (np.array([draw(st.sampled_from([0, 1, 2**64 - 1, 12345]))], np.uint64), "UINT64")
        if m.classes:
            tensors[p.LABELS] = (rng.integers(0, m.classes, draw(st.sampled_from([1, b]))), "INT64")
    if draw(st.booleans()):
        tensors[p.MAX_ROWS] = (np.array([rng.integers(0, m.h + 2)], np.int32), "INT32")
    if draw(st.integers(0, 3)) == 0:
        tensors[p.ROWS_PER_RESPONSE] = (np.array([rng.integers(1, 4)], np.int32), "INT32")
    unwanted = ["FOO", p.LABELS, *(n for n in sample_table(m) if n not in tensors)]
    return draw(mutated(tensors, sample_table(m), unwanted))


FUZZ_SEQUENCES = range(5000, 5040)  # few ids, so that later requests often find a live sequence


STATE_ERROR_START = r"is already active"  # a START for a live sequence id
STATE_ERROR_LATER = r"is not active|must specify the START flag"  # a later request for a sequence not (or no longer) open


def test_fuzz_sample(deployed, stream):
    """Random requests and sequence flags: well-formed rows or one clear line naming what is at
    fault; every row accepted is the in-process sampler's row for its sequence's START request
    (where that named a seed); afterwards the server answers right and every sequence the fuzz
    left open has expired."""
    server, models = deployed
    counts = {"rows": 0, "refused": 0}
    checked = [0]  # accepted requests whose rows were compared with the in-process sampler's
    # (model, sequence id) -> its last accepted START's values (None: no SEED, the image is unknown);
    # an accepted later request can only continue that sequence: any other START was refused.
    opened: dict[tuple[str, int], dict | None] = {}
    images: dict[tuple[str, int], np.ndarray] = {}

    def expected(m: Model, key) -> np.ndarray | None:
        if opened.get(key) is None:
            return None
        if key not in images:
            images[key] = m.expected(**opened[key])
        return images[key]

    @fuzz_settings(N_SAMPLE_FUZZ)
    @given(data=st.data())
    def one(data):
        m = models[data.draw(st.sampled_from(["bin", "rgb"]))]
        start, end = data.draw(st.integers(0, 9)) < 7, data.draw(st.integers(0, 9)) < 7
        seq = data.draw(st.sampled_from([0, *FUZZ_SEQUENCES]))
        tensors = data.draw(sample_request(m, start))
        rows, error = stream.request(f"{m.name}_sample", seq, build(tensors), start=start, end=end)
        must_fail = sample_must_fail(m, tensors, start, seq)
        culprits = sample_culprits(m, tensors, start, seq)
        assert must_fail == bool(culprits), f"the two oracles disagree: must fail {must_fail}, culprits {culprits}"
        if error is not None:
            counts["refused"] += 1
            one_line_error(error)
            if must_fail:  # named, or (a later request that passed Triton's checks) its missing START flag is at fault too
                flag = not start and not triton_culprits(m, tensors, seq) and re.search(STATE_ERROR_LATER, error)
                assert names_one(error, culprits) or flag, f"names none of {sorted(culprits)}: {error!r}"
            else:
                assert re.search(STATE_ERROR_START if start else STATE_ERROR_LATER, error), f"a valid request was refused: {error}"
            assert not rows or not start, "rows of a refused START request"
            return
        assert not must_fail, "an invalid request was answered"
        counts["rows"] += 1
        key = (m.name, seq)
        if start:
            known = tensors[p.KNOWN][0] if p.KNOWN in tensors else None
            opened[key] = None if p.SEED not in tensors else dict(
                batch=int(first(tensors[p.BATCH_SIZE])) if p.BATCH_SIZE in tensors else 1 if known is None else known.shape[0],
                seed=int(first(tensors[p.SEED])), labels=tensors[p.LABELS][0] if p.LABELS in tensors else None, known=known,
                temperature=float(first(tensors[p.TEMPERATURE])) if p.TEMPERATURE in tensors else 1.0)
            images.pop(key, None)
        max_rows = int(first(tensors[p.MAX_ROWS])) if p.MAX_ROWS in tensors else None
        indices = [r.index for r in rows]
        assert all(r.stage == 0 for r in rows) and np.all(np.diff(indices) == 1), indices
        assert max_rows is None or len(rows) <= max_rows
        if p.ROWS_PER_RESPONSE in tensors:  # the cap holds however busy the server is
            assert all(r.response_rows <= first(tensors[p.ROWS_PER_RESPONSE]) for r in rows)
        if start:
            assert len(rows) == (m.h if max_rows is None else min(max_rows, m.h)) and (not rows or indices[0] == 0)
            batch = int(first(tensors[p.BATCH_SIZE])) if p.BATCH_SIZE in tensors else len(tensors[p.KNOWN][0]) if p.KNOWN in tensors else 1
            assert all(r.pixels.shape[0] == batch for r in rows)
        batches = {r.pixels.shape[0] for r in rows}
        assert len(batches) <= 1 and all(1 <= b <= MAX_BATCH for b in batches)
        for r in rows:
            b = r.pixels.shape[0]
            assert r.pixels.shape == (b, m.c, m.w) and r.pixels.dtype == np.uint8 and r.pixels.max() < m.levels
            assert r.logprob.shape == (b,) and np.all(np.isfinite(r.logprob)) and np.all(r.logprob <= 1e-4)
        if start and p.KNOWN in tensors:
            known = tensors[p.KNOWN][0]
            for r in rows[:known.shape[2]]:
                np.testing.assert_array_equal(r.pixels, known[:, :, r.index])
        want = expected(m, key) if rows else None
        if want is not None:  # the sequence's own image, row by row, wherever in it this request is
            for r in rows:
                np.testing.assert_array_equal(r.pixels, want[:, :, r.index], err_msg=f"{key} row {r.index} {opened[key]}")
            checked[0] += 1

    one()
    print(f"\nsampler fuzz: {counts}, {checked[0]} compared with the in-process sampler")
    assert min(counts.values()) > N_SAMPLE_FUZZ // 10, counts
    assert checked[0] > N_SAMPLE_FUZZ // 20, checked  # the image oracle well exercised (~180 of 1250)
    assert server.running() and stream.client.is_server_live(client_timeout=DEADLINE_S)
    for m in models.values():
        assert_samples_correctly(stream, m)
        assert_live_sequences_drain(server, f"{m.name}_sample")


def assert_live_sequences_drain(server, model):
    """No sequence held: the fuzz's last open ones expire IDLE_S after their last request, seen
    within the engine's and the metrics' periods (0.5 s each); the slack is for a busy machine."""
    timeout = IDLE_S + 0.5 + 0.5 + 10.0
    metrics, drained = wait_for(lambda: sampler_metrics(server, model), lambda m: m.get("live") == 0, timeout, interval=0.2)
    assert drained, f"{model} still holds {metrics.get('live')} sequences {timeout:g} s after the fuzz"
