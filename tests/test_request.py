"""runtime/request.py: one rule per field of a sampling request, each value it accepts as the
sampler uses it, each one it refuses with one line naming the field and the value."""
import math
import re

import numpy as np
import pytest

from pixelrnn.runtime import request as rq
from pixelrnn.runtime.rowloop import SampleSpec, Stage


def refused(pattern: str, fn, *args, **kwargs) -> str:
    with pytest.raises(rq.RequestError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert re.search(pattern, message), f"{message!r} does not match {pattern!r}"
    assert "\n" not in message
    return message


def test_request_errors_are_value_errors():
    assert issubclass(rq.RequestError, ValueError)


@pytest.mark.parametrize("value", [1, 3, np.int32(4), np.uint64(2)])
def test_batch_accepted(value):
    got = rq.check_batch(value, 4)
    assert got == int(value) and type(got) is int


@pytest.mark.parametrize("value, pattern", [
    (0, r"^BATCH_SIZE must be in \[1, 4\], got 0$"),
    (-3, r"^BATCH_SIZE must be in \[1, 4\], got -3$"),
    (5, r"^BATCH_SIZE must be in \[1, 4\], got 5$"),
    (1.0, r"^BATCH_SIZE must be a whole number in \[1, 4\], got 1.0$"),
    (True, r"^BATCH_SIZE must be a whole number in \[1, 4\], got True$"),
    ("2", r"^BATCH_SIZE must be a whole number in \[1, 4\], got '2'$"),
    (None, r"^BATCH_SIZE must be a whole number in \[1, 4\], got None$"),
])
def test_batch_refused(value, pattern):
    refused(pattern, rq.check_batch, value, 4)


def test_batch_without_a_max_and_under_another_name():
    assert rq.check_batch(10_000) == 10_000
    refused(r"^n must be >= 1, got 0$", rq.check_batch, 0, name="n")


@pytest.mark.parametrize("value, want", [
    (0, 0.0), (0.0, 0.0), (-0.0, 0.0), (rq.MIN_TEMPERATURE, rq.MIN_TEMPERATURE), (0.7, 0.7), (1, 1.0),
    (np.float64(0.5), 0.5), (np.float32(2.0), 2.0), (rq.MAX_TEMPERATURE, rq.MAX_TEMPERATURE),
])
def test_temperature_accepted(value, want):
    got = rq.check_temperature(value)
    assert got == want and type(got) is float and math.copysign(1, got) == math.copysign(1, want)


@pytest.mark.parametrize("value, shown", [
    (-0.5, "-0.5"), (-1e-300, "-1e-300"), (float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "-inf"),
    (5e-324, "5e-324"), (1e-7, "1e-07"), (rq.MAX_TEMPERATURE * 1.01, "5.05"), (99, "99"), (1e308, "1e+308"),
    (np.float64("nan"), "nan"), (True, "True"), ("1.0", "'1.0'"), (None, "None"),
])
def test_temperature_refused(value, shown):
    refused(r"^TEMPERATURE must be 0 \(greedy\) or a finite number in \[1e-06, 5\], got " + re.escape(shown) + "$",
            rq.check_temperature, value)
    refused(r"^temperature must be 0 \(greedy\)", rq.check_temperature, value, name="temperature")


@pytest.mark.parametrize("value", [0, 1, 12345, 2**64 - 1, np.uint64(2**64 - 1), np.int64(7)])
def test_seed_accepted(value):
    got = rq.check_seed(value)
    assert got == int(value) and type(got) is int


@pytest.mark.parametrize("value, shown", [(-1, "-1"), (2**64, str(2**64)), (1.0, "1.0"), (False, "False"), ("3", "'3'")])
def test_seed_refused(value, shown):
    refused(r"^SEED must be a whole number in \[0, 2\*\*64\), got " + re.escape(shown) + "$", rq.check_seed, value)


def test_labels_accepted_as_int64_one_per_image():
    for value in (2, [2], np.array([[2]]), np.int64(2), 2.0):
        got = rq.check_labels(value, 3, 4)
        assert got.dtype == np.int64 and got.tolist() == [2, 2, 2]
    assert rq.check_labels([0, 3, 1], 3, 4).tolist() == [0, 3, 1]
    assert rq.check_labels(np.array([0, 1], np.int32), 2, 2).tolist() == [0, 1]
    assert rq.check_labels([7, 9], 2, None).tolist() == [7, 9]  # class count not known: ids only >= 0
    assert rq.check_labels(None, 2, 0) is None  # not class-conditional, none sent


@pytest.mark.parametrize("value, batch, classes, pattern", [
    (None, 2, 3, r"^this model is class-conditional: LABELS \(one class id, or one per image\) is required$"),
    ([1], 2, 0, r"^this model is not class-conditional: do not send LABELS$"),
    ([0, 1, 1], 2, 3, r"^LABELS must hold 1 class id or one per image \(2\), got 3$"),
    (np.zeros(0, np.int64), 2, 3, r"^LABELS must hold 1 class id or one per image \(2\), got 0$"),
    ([3], 2, 3, r"^LABELS must be in \[0, 3\), got \[3, 3\]$"),
    ([-1, 0], 2, 3, r"^LABELS must be in \[0, 3\), got \[-1, 0\]$"),
    ([-1, 0], 2, None, r"^LABELS must be >= 0, got \[-1, 0\]$"),
    ([0.5, 1], 2, 3, r"^LABELS must be whole numbers, got float64 \[0.5, 1.0\]$"),
    (["a"], 1, 3, r"^LABELS must be whole numbers, got <U1 \['a'\]$"),
    ([[0], [1, 2]], 2, 3, r"^LABELS must be an array of whole numbers, got"),
])
def test_labels_refused(value, batch, classes, pattern):
    refused(pattern, rq.check_labels, value, batch, classes)


def test_labels_under_the_clients_name():
    refused(r"^labels must be in \[0, 3\), got \[3\]$", rq.check_labels, 3, 1, 3, name="labels")


def test_known_rows_accepted():
    assert rq.check_known_rows(0, 5) == 0 and rq.check_known_rows(5, 5) == 5 and rq.check_known_rows(np.int16(2), 5) == 2
    assert rq.check_known_rows(100) == 100  # no height given: only >= 0


@pytest.mark.parametrize("value, height, pattern", [
    (6, 5, r"^known_rows must be in \[0, 5\], got 6$"), (-1, 5, r"^known_rows must be in \[0, 5\], got -1$"),
    (-1, None, r"^known_rows must be >= 0, got -1$"), (1.5, 5, r"^known_rows must be a whole number in \[0, 5\], got 1.5$"),
])
def test_known_rows_refused(value, height, pattern):
    refused(pattern, rq.check_known_rows, value, height)


SHAPE = (3, 5, 4)  # C, H, W


def test_known_accepted_as_int64():
    assert rq.check_known(None, 2, SHAPE, 4) is None
    for rows in (0, 2, 5):
        known = np.full((2, 3, rows, 4), 3, np.uint8)
        got = rq.check_known(known, 2, SHAPE, 4)
        assert got.dtype == np.int64 and got.shape == (2, 3, rows, 4) and (not rows or got.max() == 3)
    assert rq.check_known(np.full((1, 3, 1, 4), 255, np.uint8), 1, SHAPE, None).max() == 255  # levels not known: a byte


@pytest.mark.parametrize("value, levels, pattern", [
    (np.zeros((1, 3, 2, 4), np.uint8), 4, r"^KNOWN must be 2 x 3 x R x 4 \(R <= 5 known rows\), got 1 x 3 x 2 x 4$"),
    (np.zeros((2, 3, 6, 4), np.uint8), 4, r"R <= 5 known rows\), got 2 x 3 x 6 x 4$"),
    (np.zeros((2, 1, 2, 4), np.uint8), 4, r"got 2 x 1 x 2 x 4$"),
    (np.zeros((2, 3, 2, 5), np.uint8), 4, r"got 2 x 3 x 2 x 5$"),
    (np.zeros((3, 2, 4), np.uint8), 4, r"got 3 x 2 x 4$"),
    (np.full((2, 3, 2, 4), 4, np.uint8), 4, r"^KNOWN values must be < 4 \(the model's levels\), got 4$"),
    (np.full((2, 3, 2, 4), 300, np.int64), None, r"^KNOWN values must be < 256 \(one byte\), got 300$"),
    (np.full((2, 3, 2, 4), -1, np.int64), 4, r"^KNOWN values must be >= 0, got -1$"),
    (np.full((2, 3, 2, 4), 0.5), 4, r"^KNOWN values must be whole numbers, got float64"),
])
def test_known_refused(value, levels, pattern):
    refused(pattern, rq.check_known, value, 2, SHAPE, levels)


@pytest.mark.parametrize("value, want", [(None, None), (0, 0), (7, 7), (np.int32(3), 3)])
def test_max_rows_accepted(value, want):
    assert rq.check_max_rows(value) == want


@pytest.mark.parametrize("value, pattern", [
    (-1, r"^MAX_ROWS must be >= 0, got -1$"),
    (2.0, r"^MAX_ROWS must be a whole number >= 0 \(or none: every row left\), got 2.0$"),
    (True, r"^MAX_ROWS must be a whole number >= 0"),
])
def test_max_rows_refused(value, pattern):
    refused(pattern, rq.check_max_rows, value)


@pytest.mark.parametrize("value, want", [(None, None), (1, 1), (16, 16), (np.int64(2), 2)])
def test_rows_per_response_accepted(value, want):
    assert rq.check_rows_per_response(value) == want


@pytest.mark.parametrize("value, pattern", [
    (0, r"^ROWS_PER_RESPONSE must be >= 1 \(1: one response per row\), got 0$"),
    (-2, r"^ROWS_PER_RESPONSE must be >= 1 \(1: one response per row\), got -2$"),
    (1.5, r"^ROWS_PER_RESPONSE must be a whole number >= 1 \(1: one response per row; or none: no limit\), got 1.5$"),
])
def test_rows_per_response_refused(value, pattern):
    refused(pattern, rq.check_rows_per_response, value)


def test_a_long_bad_value_is_shown_on_one_short_line():
    message = refused(r"got 'x+\.\.\.$", rq.check_seed, "x" * 500)
    assert len(message) < 150


class Runner:  # what SampleSpec.check reads of a runner
    stages = [Stage("cell", 3, 5, 4)]
    levels, num_classes = 4, 3


def test_sample_spec_checks_itself_by_these_rules():
    spec = SampleSpec(batch=np.int32(2), temperature=-0.0, seed=np.uint64(9), labels=1, known=np.ones((2, 3, 1, 4), np.uint8))
    assert spec.check(Runner(), max_batch=2) is spec
    assert (spec.batch, spec.temperature, spec.seed) == (2, 0.0, 9)
    assert spec.labels.tolist() == [1, 1] and spec.known.dtype == np.int64
    refused(r"^BATCH_SIZE must be in \[1, 1\], got 2$", SampleSpec(batch=2, labels=0).check, Runner(), 1)
    refused(r"^TEMPERATURE", SampleSpec(temperature=float("nan"), labels=0).check, Runner())
    refused(r"^SEED", SampleSpec(seed=-1, labels=0).check, Runner())
    refused(r"^this model is class-conditional", SampleSpec().check, Runner())
    refused(r"^KNOWN values must be < 4", SampleSpec(labels=0, known=np.full((1, 3, 1, 4), 4)).check, Runner())


def test_the_module_imports_nothing_outside_runtime():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(rq.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "math", "numpy", "pixelrnn.runtime.protocol"}, imported


def test_score_images_takes_images_within_the_models_levels():
    from pixelrnn.runtime.request import score_images
    images = np.ones((2, 1, 3, 4), np.uint8)
    assert score_images(images, 2) is images
    assert score_images(np.zeros((0, 1, 3, 4), np.uint8), 2).shape == (0, 1, 3, 4)
    for given, why in ((None, r"^send the images as IMAGES \(uint8 N x C x H x W\)$"),
                       (images + 1, r"^IMAGES values must be in \[0, 2\) \(the model's levels\), got 2$")):
        with pytest.raises(rq.RequestError, match=why):
            score_images(given, 2)
