"""bench.common, the scaffolding every bench writes its results through: the top level of a result
(machine and model), the model record, the interleaved timing, the metrics parsing; and the
committed results files, which must all say when, where and on what they were measured."""
import json
from pathlib import Path

import pytest

from bench import common

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
MACHINE_KEYS = ("date", "cpu", "cpu_count", "load_average_1_5_15")
# Results whose figures depend on the model served (or run in process from a served repository).
SERVED = {"abandoned_streams.json", "cluster.json", "deployment.json", "engine_batching.json", "load.json",
          "load_16_streams.json", "overload.json", "perf_analyzer.json", "serving.json", "serving_gated_pixelcnn.json",
          "serving_no_window.json"}
MANIFEST = {"name": "tiny", "arch": "gated_pixelcnn", "config": {"hidden": 6, "layers": 1}, "shape": [1, 4, 3], "levels": 2,
            "max_batch": 8, "num_classes": 0, "checkpoint": {"file": "tiny.pt", "sha256": "ab" * 32, "step": 7}}


def test_a_result_starts_with_the_benchmark_its_model_and_the_machine():
    r = common.result("x", {"name": "m"}, config={"a": 1})
    assert list(r)[:3] == ["benchmark", "model", "machine"] and r["config"] == {"a": 1}
    assert all(k in r["machine"] for k in MACHINE_KEYS) and r["machine"]["cpu_count"] >= 1
    assert "model" not in common.result("x")  # a bench of per-architecture models names them in its entries
    assert set(common.machine_info(libraries=False)) == {"date", "cpu", "cpu_count", "cpus_usable", "load_average_1_5_15", "python"}


def test_model_record_names_the_checkpoint_exported_or_the_one_a_served_folder_came_from(tmp_path):
    exported = common.model_record(MANIFEST, tmp_path / "tiny.pt", export_seconds=1.5)
    assert exported["checkpoint"] == str(tmp_path / "tiny.pt") and exported["export_seconds"] == 1.5
    served = common.model_record(MANIFEST, folder=common.PROJECT_ROOT / "model_repository" / "tiny_sample" / "1")
    assert served["checkpoint"] == "tiny.pt" and served["folder"] == "model_repository/tiny_sample/1"
    for record in (exported, served):
        assert (record["name"], record["arch"], record["shape"], record["max_batch"]) == ("tiny", "gated_pixelcnn", [1, 4, 3], 8)
        assert record["checkpoint_sha256"] == "ab" * 32 and record["checkpoint_step"] == 7


def test_interleaved_warms_up_then_times_the_paths_in_turns():
    calls = []
    runs = common.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 2)
    assert calls == ["a", "b"] * 3 and {k: len(v) for k, v in runs.items()} == {"a": 2, "b": 2}
    seen = []
    runs = common.interleaved({"a": None, "b": None}, 1, once=lambda name, fn, timed_run: seen.append((name, timed_run)) or 0.5,
                              warmup=False)
    assert seen == [("a", True), ("b", True)] and runs == {"a": [0.5], "b": [0.5]}
    assert common.rate([2.0, 1.0, 4.0], 10, "images")["images_per_s"] == 5.0


def test_metrics_are_summed_over_the_samples_whose_labels_match():
    page = ('nv_inference_count{model="m_score",version="1"} 12\n'
            'nv_inference_count{model="other",version="1"} 5\n'
            'pixelrnn_sampler_events_total{model="m_sample",event="started"} 3\n'
            'pixelrnn_sampler_events_total{model="m_sample",event="completed"} 2\n')
    assert common.metric(page, "nv_inference_count", model="m_score") == 12
    assert common.metric(page, "nv_inference_count") == 17
    assert common.metric(page, "pixelrnn_sampler_events_total", model="m_sample", event="completed") == 2
    assert common.metric(page, "nv_inference_exec_count", model="m_score") is None


def test_errors_are_counted_by_message():
    errors = common.Errors(keep=1)
    for message in ("a\n b", "a b", "c"):
        errors.add(message)
    assert errors.total() == 3 and errors.report() == [{"message": "a b", "count": 2}]


@pytest.mark.parametrize("name", sorted(p.name for p in RESULTS.glob("*.json")))
def test_every_result_says_when_where_and_on_what_it_was_measured(name):
    d = json.loads((RESULTS / name).read_text())
    if isinstance(d, list):  # long_runs.json: a table of runs (training.curves), each naming its run and devices
        assert all("path" in r and "devices" in r for r in d)
        return
    machine = d["machine"]
    assert all(k in machine for k in MACHINE_KEYS), name
    assert machine["date"][:4] == "2026" and (machine["cpu"] is None) == (machine["cpu_count"] is None)
    if name in SERVED:
        model = d["model"]
        assert isinstance(model, dict) and model["name"] and model.get("arch"), name
        assert model.get("checkpoint") or d.get("checkpoint") or model.get("weights"), name
