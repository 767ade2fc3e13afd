"""The sampler's metrics thread (SamplerMetrics in server/triton_models/sample_model.py), with a
stand-in for Triton's triton_python_backend_utils: every value reaches the server by increments
(Metric.set holds the GIL while it waits for the server), gauges that go down included, and
stop() neither waits on a call the server does not answer nor lets another call start."""
import importlib.util
import sys
import threading
import types
from pathlib import Path

import pytest

GLUE = Path(__file__).resolve().parent.parent / "server" / "triton_models" / "sample_model.py"
BOUND_S = 30.0  # bound on waits for the metrics thread (never reached when it works)


class Metric:
    def __init__(self, family, labels, blocker):
        self.family, self.labels, self.value, self.calls, self.blocker = family, labels, 0.0, 0, blocker

    def increment(self, value):
        self.calls += 1
        self.blocker.enter()
        if self.family.kind == "counter" and value < 0:
            raise ValueError("a counter only goes up")
        self.value += value

    def set(self, value):  # noqa: ARG002
        raise AssertionError("Metric.set holds the GIL while it waits for the server")


class Family:
    GAUGE, COUNTER = "gauge", "counter"

    def __init__(self, name, description, kind, blocker):
        self.name, self.kind, self.metrics, self.blocker = name, kind, [], blocker

    def Metric(self, labels):  # noqa: N802 - Triton's name
        metric = Metric(self, labels, self.blocker)
        self.metrics.append(metric)
        return metric


class Blocker:
    """Once armed, the next metric call blocks until released, as one the server never answers."""

    def __init__(self):
        self.armed, self.inside, self.release = False, threading.Event(), threading.Event()

    def enter(self):
        if self.armed:
            self.armed = False
            self.inside.set()
            self.release.wait()


class Engine:
    def __init__(self):
        self.values = {"live": 0, "live_images": 0, "budget": 8, "healthy": 1, "waiting": 0, "started": 0, "rows": 0,
                       "cell_seconds": 0.0}

    def stats(self):
        return dict(self.values)


@pytest.fixture
def glue(monkeypatch):
    """sample_model.py imported with the stand-in module; (module, blocker)."""
    blocker = Blocker()
    pb = types.ModuleType("triton_python_backend_utils")
    pb.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START, pb.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 1, 2
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    pb.MetricFamily = lambda name, description, kind: Family(name, description, kind, blocker)
    pb.MetricFamily.GAUGE, pb.MetricFamily.COUNTER = Family.GAUGE, Family.COUNTER
    pb.Logger = types.SimpleNamespace(log_warn=lambda message: None, log_info=lambda message: None)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the glue puts its folder first
    monkeypatch.setattr(sys, "dont_write_bytecode", sys.dont_write_bytecode)
    spec = importlib.util.spec_from_file_location("sample_model_under_test", GLUE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, blocker


def values(metrics) -> dict:
    return {k: m.value for k, m in {**metrics.gauges, **metrics.counters}.items()}


def test_every_value_arrives_by_increments(glue, monkeypatch):
    module, _ = glue
    monkeypatch.setattr(module, "METRICS_PERIOD_S", 3600.0)  # pushed by hand here
    engine = Engine()
    metrics = module.SamplerMetrics(engine, "m")
    try:
        for change in ({"live": 3, "live_images": 12, "started": 3, "rows": 40, "cell_seconds": 0.25},
                       {"live": 1, "live_images": 4, "healthy": 0, "rows": 90, "cell_seconds": 0.75},  # gauges go down
                       {"live": 0, "live_images": 0, "healthy": 1, "waiting": 2}):
            engine.values.update(change)
            metrics.push()
            assert values(metrics) == pytest.approx(engine.values)
    finally:
        metrics.stop()


def test_stop_leaves_a_call_the_server_never_answers_and_starts_none(glue, monkeypatch):
    module, blocker = glue
    monkeypatch.setattr(module, "METRICS_PERIOD_S", 0.01)
    engine = Engine()
    engine.values.update(live=2, live_images=2, started=2, rows=5)
    blocker.armed = True
    metrics = module.SamplerMetrics(engine, "m")
    assert blocker.inside.wait(BOUND_S), "the metrics thread made no call"
    stopper = threading.Thread(target=metrics.stop)
    stopper.start()
    stopper.join(BOUND_S)
    assert not stopper.is_alive(), "stop() waited on a metric call the server does not answer"
    blocker.release.set()  # the server answers at last: the push must end without another call
    metrics._thread.join(BOUND_S)
    assert not metrics._thread.is_alive()
    assert sum(m.calls for m in {**metrics.gauges, **metrics.counters}.values()) == 1
