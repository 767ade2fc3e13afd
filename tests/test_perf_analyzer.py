"""Triton's own perf_analyzer (bench/perf_analyzer.py) measures the scorer and the streaming
sampler of a served export: a few seconds each, nonzero throughput, no error; the request data
the repository writer ships for the sampler fits it; and perf_analyzer needs no input file for a
scorer (zero data everywhere, its default random data on a 256-level model; random data beyond
a model's levels gets the scorer's one-line error)."""
import json
import subprocess
import sys
import time

import pytest

from bench import perf_analyzer as pa
from pixelrnn.server.repository import PERF_INPUT, perf_analyzer_input
from pixelrnn.runtime import protocol as p
from tests.deployment import REPO, Tiny, export_models, missing, require, serve

# Class-conditional and RGB: the sampler's data carries LABELS, whose variable dimension needs its shape.
RGB = Tiny("rgb", "gated_pixelcnn", dict(in_channels=3, height=5, width=4, levels=4, num_classes=3, hidden=6, layers=1,
                                         kernel=3), max_batch=8)
ROWS = 5


@pytest.mark.parametrize("num_classes", [0, 3])
def test_input_data_fits_the_sampler(num_classes):
    streams = perf_analyzer_input({"name": "m", "shape": [3, 5, 4], "num_classes": num_classes})["data"]
    assert len(streams) > 1 and all(len(steps) == 1 for steps in streams)  # one START request per sequence
    assert sorted(steps[0][p.SEED][0] for steps in streams) == list(range(len(streams)))
    for (start,) in streams:
        assert start[p.BATCH_SIZE] == [1] and start[p.TEMPERATURE] == [1.0]
        assert (start.get(p.LABELS) == {"content": [0], "shape": [1]}) if num_classes else p.LABELS not in start
        assert start[p.ROWS_PER_RESPONSE] == [1]  # one response per row: perf_analyzer counts responses as rows
        assert set(start) <= {*p.START_ONLY, p.ROWS_PER_RESPONSE}  # KNOWN and MAX_ROWS are left out: not sent


def test_the_shipped_repository_has_its_input_data():
    doc = json.loads((REPO / "model_repository" / "gated_pixelcnn_binarized_mnist_sample" / PERF_INPUT).read_text())
    assert doc == perf_analyzer_input({"name": "gated_pixelcnn_binarized_mnist", "shape": [1, 28, 28], "num_classes": 0})


def test_a_missing_binary_is_one_line(tmp_path, capsys):
    assert pa.main(["--url", "127.0.0.1:1", "--model", "m", "--perf-analyzer", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: perf_analyzer not found")


def require_perf_analyzer() -> None:
    require("tritonclient.grpc")
    try:
        pa.check_binary(pa.find_perf_analyzer(), pa.perf_env())
    except pa.PerfError as e:
        missing(str(e))


@pytest.mark.triton
@pytest.mark.slow
def test_perf_analyzer_measures_scorer_and_streaming_sampler(tmp_path):
    require_perf_analyzer()
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
    assert score["batch"] == 4 and "--input-data zero" in score["command"]


def run_perf_analyzer(url: str, model: str, *extra: str) -> tuple[int, str]:
    """perf_analyzer's default call on `model` (shortened windows) with `extra` options."""
    result = subprocess.run([str(pa.find_perf_analyzer()), "-m", model, "-u", url, "-i", "grpc", "-p", "300", "--max-trials", "3",
                             "--stability-percentage", "1000", *extra], capture_output=True, text=True, env=pa.perf_env(),
                            timeout=120)
    return result.returncode, result.stdout + result.stderr


@pytest.mark.triton
@pytest.mark.slow
def test_perf_analyzer_needs_no_input_file_for_a_scorer(tmp_path):
    require_perf_analyzer()
    grey = dict(in_channels=1, height=4, width=3, hidden=4, layers=1)
    scorers = [Tiny("bin", "pixelcnn", dict(grey, levels=2), max_batch=4), RGB, Tiny("byte", "pixelcnn", dict(grey, levels=256), max_batch=4)]
    repository = tmp_path / "repository"
    export_models(tmp_path, scorers, repository)
    for folder in repository.glob("*_sample"):  # scorers only: fewer stubs to start
        subprocess.run(["rm", "-rf", str(folder)], check=True)
    with serve(repository, tmp_path / "triton.log") as server:
        # Random data, perf_analyzer's default, holds pixel values up to 255: bad input to a 2-level model.
        code, out = run_perf_analyzer(server.grpc_url, "bin_score")
        assert code != 0 and "IMAGES values must be in [0, 2) (the model's levels), got 255" in out, out
        code, out = run_perf_analyzer(server.grpc_url, "byte_score")  # fine for a 256-level one
        assert code == 0 and "Throughput:" in out, out
        for model in ("bin_score", "rgb_score", "byte_score"):  # zero data fits every scorer (LABELS 0 too)
            code, out = run_perf_analyzer(server.grpc_url, model, "--input-data", "zero")
            assert code == 0 and "Throughput:" in out, f"{model}: {out}"
