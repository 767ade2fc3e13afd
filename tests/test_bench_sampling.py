"""bench.sampling on tiny configs: the JSON's structure, the identical-image checks (full and
partial naive runs, multi-scale included) and the allocator re-exec. No timing is asserted."""
import json

import numpy as np
import pytest

from bench import common
from bench import sampling

TINY = ["--batch", "2", "--hidden", "6", "--layers", "1", "--repeats", "1", "--threads", "1"]
PATHS = ("cached_torch", "cached_onnx")


def run(tmp_path, *extra):
    out = tmp_path / "sampling.json"
    rc = sampling.main([*TINY, *extra, "--json", str(out)])
    return rc, json.loads(out.read_text())


def test_partial_naive_run_writes_the_json_and_the_paths_agree(tmp_path, capsys):
    rc, data = run(tmp_path, "--size", "6", "--archs", "pixelcnn,multiscale", "--naive-rows", "2")
    assert rc == 0 and data["identical"] is True
    assert data["config"]["naive_rows"] == 2 and data["config"]["archs"] == ["pixelcnn", "multiscale"]
    machine = data["machine"]
    for key in ("date", "cpu_count", "torch_threads", "torch", "onnxruntime", "malloc_env", "malloc_env_set"):
        assert key in machine
    assert machine["torch_threads"] == 1 and set(machine["malloc_env"]) == set(common.MALLOC_ENV)
    assert set(data["results"]) == {"pixelcnn", "multiscale"}
    for arch, r in data["results"].items():
        assert r["identical"] and r["identical_torch_onnx"] and r["identical_naive_torch"]
        assert r["pixels"] == 2 * 6 * 6
        naive = r["naive"]
        assert naive["naive_extrapolated_from_rows"] == 2 and naive["full"] is False
        assert naive["seconds"] > naive["measured_seconds"] > 0 and len(naive["runs"]) == 1  # as many runs as every path
        for path in PATHS:
            p = r[path]
            assert p["seconds"] > 0 and len(p["runs"]) == 1 and p["min_seconds"] <= p["seconds"] <= p["max_seconds"]
            assert p["speedup_over_naive"] == pytest.approx(naive["seconds"] / p["seconds"])
            assert p["vs_scoring"] == pytest.approx(p["seconds"] / r["scoring"]["seconds"])
        assert r["cached_onnx"]["export_seconds"] > 0
        t = data["targets"]["per_arch"][arch]
        assert t["speedup_target"] == 100 and t["vs_scoring_target"] == (3 if arch == "pixelcnn" else 5)
        assert isinstance(t["speedup_met"], bool) and isinstance(t["vs_scoring_met"], bool)
    # pixelcnn: naive rows 0-1 of 6; multiscale: only the small image's rows 0-1 (3x3 grid, 2 rows).
    assert data["results"]["pixelcnn"]["naive_compared_pixels_per_image"] == 12
    assert data["results"]["multiscale"]["naive_compared_pixels_per_image"] == 6
    assert isinstance(data["targets"]["all_met"], bool)
    table = capsys.readouterr().out
    assert "pixelcnn" in table and "extrapolated from the first 2 rows" in table


def test_full_naive_run_compares_every_pixel(tmp_path):
    rc, data = run(tmp_path, "--size", "4", "--archs", "row_lstm", "--levels", "4")
    r = data["results"]["row_lstm"]
    assert rc == 0 and r["identical"]
    assert r["naive"]["full"] is True and r["naive"]["naive_extrapolated_from_rows"] is None
    assert r["naive"]["seconds"] == r["naive"]["measured_seconds"]
    assert r["naive_compared_pixels_per_image"] == 16
    assert data["targets"]["per_arch"]["row_lstm"]["speedup_target"] == 30


def test_multiscale_big_rows_are_compared_once_the_small_image_is_done(tmp_path):
    rc, data = run(tmp_path, "--size", "4", "--archs", "multiscale", "--naive-rows", "2")
    r = data["results"]["multiscale"]
    assert rc == 0 and r["identical"] and r["naive_compared_pixels_per_image"] == 8 + 2  # big rows 0-1, grid pixels of row 2


def test_a_sampler_that_draws_another_image_fails_the_bench(tmp_path, monkeypatch):
    real = sampling.OnnxSampler.sample

    def wrong(self, n, seed, labels):
        image = real(self, n, seed, labels)
        image[0, 0, -1, -1] ^= 1
        return image

    monkeypatch.setattr(sampling.OnnxSampler, "sample", wrong)
    rc, data = run(tmp_path, "--size", "4", "--archs", "pixelcnn", "--naive-rows", "1")
    r = data["results"]["pixelcnn"]
    assert rc == 1 and data["identical"] is False
    assert r["identical"] is False and r["identical_torch_onnx"] is False and r["identical_naive_torch"] is True


def test_unknown_architecture_is_refused():
    with pytest.raises(SystemExit):
        sampling.parse_args(["--archs", "pixelcnn,nope"])


def test_reexec_sets_the_malloc_env_once(monkeypatch):
    calls = []
    monkeypatch.setattr(common.os, "execve", lambda exe, argv, env: calls.append((argv, env)))
    for k in common.MALLOC_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv(common.NO_REEXEC, raising=False)
    assert not common.malloc_env_set()
    common.reexec_with_malloc_env("bench.sampling", ["--size", "4"])
    (argv, env), = calls
    assert argv[1:] == ["-m", "bench.sampling", "--size", "4"]
    assert all(env[k] == v for k, v in common.MALLOC_ENV.items()) and env[common.NO_REEXEC]
    monkeypatch.setenv(common.NO_REEXEC, "1")  # the re-executed process does not loop
    common.reexec_with_malloc_env("bench.sampling", [])
    assert len(calls) == 1


def test_paths_report_the_median_with_min_and_max():
    s = common.spread([3.0, 1.0, 2.0, 10.0, 2.5])
    assert (s["seconds"], s["min_seconds"], s["max_seconds"]) == (2.5, 1.0, 10.0) and len(s["runs"]) == 5
    assert np.isclose(common.timed(lambda: 1)[0], 0, atol=1.0)


def test_device_flag_is_recorded_and_cuda_needs_a_gpu(tmp_path):
    rc, data = run(tmp_path, "--size", "4", "--archs", "pixelcnn", "--device", "cpu")
    assert rc == 0 and data["config"]["device"] == "cpu" and data["identical"]
    if not __import__("torch").cuda.is_available():
        with pytest.raises(SystemExit):
            sampling.parse_args(["--device", "cuda"])


@pytest.mark.gpu
def test_cuda_paths_draw_the_cpu_images(tmp_path):
    if not __import__("torch").cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    rc, data = run(tmp_path, "--size", "6", "--archs", "pixelcnn,gated_pixelcnn", "--device", "cuda", "--naive-rows", "2")
    assert rc == 0 and data["identical"] and data["config"]["device"] == "cuda"
