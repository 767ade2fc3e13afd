"""Triton's own perf_analyzer (bench/perf_analyzer.py) measures the scorer and the streaming
sampler of a served export: a few seconds each, nonzero throughput, no error; and the request
data the repository writer ships for it fits the models."""
import json
import subprocess
import sys
import time

import pytest

from bench import perf_analyzer as pa
from pixelrnn.server.repository import PERF_INPUT, perf_analyzer_inputs
from pixelrnn.runtime import protocol as p
from tests.deployment import REPO, Tiny, export_models, missing, require, serve

# Class-conditional and RGB: the sampler's data carries LABELS, whose variable dimension needs its shape.
RGB = Tiny("rgb", "gated_pixelcnn", dict(in_channels=3, height=5, width=4, levels=4, num_classes=3, hidden=6, layers=1,
                                         kernel=3), max_batch=8)
ROWS = 5


@pytest.mark.parametrize("num_classes", [0, 3])
def test_input_data_fits_the_models(num_classes):
    docs = perf_analyzer_inputs({"name": "m", "shape": [3, 5, 4], "num_classes": num_classes})
    (score,) = docs["m_score"]["data"]
    assert score[p.IMAGES] == [0] * 60 and (p.LABELS in score) == bool(num_classes)
    streams = docs["m_sample"]["data"]
    assert len(streams) > 1 and all(len(steps) == 1 for steps in streams)  # one START request per sequence
    assert sorted(steps[0][p.SEED][0] for steps in streams) == list(range(len(streams)))
    for (start,) in streams:
        assert start[p.BATCH_SIZE] == [1] and start[p.TEMPERATURE] == [1.0]
        assert (start.get(p.LABELS) == {"content": [0], "shape": [1]}) if num_classes else p.LABELS not in start
        assert start[p.ROWS_PER_RESPONSE] == [1]  # one response per row: perf_analyzer counts responses as rows
        assert set(start) <= {*p.START_ONLY, p.ROWS_PER_RESPONSE}  # KNOWN and MAX_ROWS are left out: not sent


def test_the_shipped_repository_has_its_input_data():
    for model in ("gated_pixelcnn_binarized_mnist_score", "gated_pixelcnn_binarized_mnist_sample"):
        doc = json.loads((REPO / "model_repository" / model / PERF_INPUT).read_text())
        assert doc == perf_analyzer_inputs({"name": "gated_pixelcnn_binarized_mnist", "shape": [1, 28, 28], "num_classes": 0})[model]


def test_a_missing_binary_is_one_line(tmp_path, capsys):
    assert pa.main(["--url", "127.0.0.1:1", "--model", "m", "--perf-analyzer", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: perf_analyzer not found")


@pytest.mark.triton
@pytest.mark.slow
def test_perf_analyzer_measures_scorer_and_streaming_sampler(tmp_path):
    require("tritonclient.grpc")
    try:
        pa.check_binary(pa.find_perf_analyzer(), pa.perf_env())
    except pa.PerfError as e:
        missing(str(e))
    repository = tmp_path / "repository"
    export_models(tmp_path, [RGB], repository)
    assert (repository / "rgb_sample" / PERF_INPUT).is_file()
    out = tmp_path / "perf.json"
    with serve(repository, tmp_path / "triton.log") as server:
        start = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "bench.perf_analyzer", "--url", server.grpc_url, "--model", "rgb",
                                 "--repository", str(repository), "--window-ms", "1000", "--windows", "3",
                                 "--score-batch", "4", "--sample-concurrency", "2", "--timeout", "90", "--json", str(out)],
                                cwd=REPO, capture_output=True, text=True, timeout=240)
        seconds = time.monotonic() - start
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    score, sample = report["results"]["score"], report["results"]["sample"]
    print(f"perf_analyzer: {seconds:.1f} s\n{result.stdout}")
    assert report["errors"] == 0
    for r in (score, sample):
        assert r["perf_analyzer_exit"] == 0 and r["errors"] == 0 and r["server_failed_requests"] == 0
        assert r["images_per_s"] > 0 and r["requests"] > 0 and r["server_successful_requests"] >= r["requests"]
        assert 0 < r["latency_us"]["p50"] <= r["latency_us"]["p99"]
    assert "--streaming" in sample["command"] and "--sequence-length 1" in sample["command"]
    assert sample["rows_per_s"] > 0
    streams = sample["streams"]
    assert streams["requests"] == sample["requests"] and streams["incomplete_requests"] == 0
    assert streams["responses_per_request"] == [ROWS + 1]  # every row, then the final response
    assert 0 < streams["first_row_latency_us"]["p50"] <= streams["image_latency_us"]["p50"]
    assert score["batch"] == 4
