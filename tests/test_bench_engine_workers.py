"""bench.engine_workers on a tiny class-conditional checkpoint: in process (fast) and through a
real tritonserver (marked triton): the JSON's figures are consistent with the timed paths, every
image is the same for its seed with any worker count, and bad arguments are refused. No speed is
asserted."""
import json

import pytest
import torch

from bench import engine_workers
from pixelrnn.training.checkpoint import save_checkpoint
from pixelrnn.training.models import build_model
from tests.deployment import require_tritonserver

CONFIG = dict(in_channels=1, height=6, width=5, levels=4, hidden=6, layers=1, kernel=3, num_classes=3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine-workers") / "tiny.pt"
    torch.manual_seed(5)
    save_checkpoint(path, {"arch": "gated_pixelcnn", "config": CONFIG,
                           "model": build_model("gated_pixelcnn", dict(CONFIG)).state_dict(), "step": 1})
    return path


def run(checkpoint, tmp_path, *extra):
    out = tmp_path / "ew.json"
    assert engine_workers.main(["--checkpoint", str(checkpoint), "--workers", "1,2", "--sequences", "2,4", "--repeats", "2",
                                "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_in_process_figures_are_consistent_and_the_images_identical(checkpoint, tmp_path, capsys):
    d = run(checkpoint, tmp_path, "--no-triton")
    r = d["results"]
    assert d["benchmark"] == "engine_workers" and d["model"]["arch"] == "gated_pixelcnn" and d["machine"]["cpu_count"]
    assert r["identical"] is True and r["triton"] is None and r["in_process"]["rows_per_image"] == CONFIG["height"]
    for s in ("2", "4"):
        x = r["in_process"]["sequences"][s]
        pixels = int(s) * CONFIG["height"] * CONFIG["width"]
        for n in ("1", "2"):
            f = x["workers"][n]
            assert len(f["runs"]) == 2 and f["pixels_per_s"] == pytest.approx(pixels / f["seconds"])
            assert f["vs_one_worker"] == pytest.approx(f["pixels_per_s"] / x["workers"]["1"]["pixels_per_s"])
            assert f["cells_alone"]["vs_one_thread"] == pytest.approx(
                f["cells_alone"]["pixels_per_s"] / x["workers"]["1"]["cells_alone"]["pixels_per_s"])
        assert x["python_us_per_row"] > 0 and x["cell_us_per_row"] > 0
        assert x["python_share"] == pytest.approx(x["python_us_per_row"] / (x["python_us_per_row"] + x["cell_us_per_row"]))
        pr = x["projection"]
        for n in ("2", "4", "8", "16"):  # never better than the Python of every sequence, taking turns, allows
            assert 0 < pr[n]["speedup"] <= pr["amdahl_limit"] + 1e-9 and pr[n]["batch_per_call"] == int(s) // min(int(n), int(s))
            assert pr[n]["pixels_per_s"] == pytest.approx(x["workers"]["1"]["pixels_per_s"] * pr[n]["speedup"])
    assert d["targets"]["in_process_64"]["value"] is None  # not measured at 64 here
    b = d["background"]
    assert b["wall_s"] > 0 and b["benchmark_cpu_s"] > 0 and b["niced_cpu_s"] >= 0
    assert "identical images: yes" in capsys.readouterr().out


@pytest.mark.triton
def test_through_triton_every_stream_draws_the_in_process_image(checkpoint, tmp_path):
    require_tritonserver()
    d = run(checkpoint, tmp_path, "--streams", "1,3", "--score-images", "6", "--score-clients", "2")
    t = d["results"]["triton"]
    assert d["results"]["identical"] is True and t["identical"] is True
    assert {f"gated_pixelcnn_w{n}_sample" for n in (1, 2)} <= set(t["server"]["models"])
    for k in ("1", "3"):
        assert t["streams"][k]["2"]["vs_one_worker"] == pytest.approx(
            t["streams"][k]["2"]["pixels_per_s"] / t["streams"][k]["1"]["pixels_per_s"])
        for f in t["streams"][k].values():  # CPU in clock ticks: a tiny model's run may take less than one
            assert set(f["cpu_s_per_run"]) == {"server", "client"} and f["cores_busy"] >= 0
            assert 0 < f["worker_cell_share"] <= 1.05  # a worker is in at most one cell call at a time (+ metric timing)
    for how in ("concurrent", "chunks"):
        assert set(t["scoring"][how]) == {"w1", "i2", "t2"} and t["scoring"][how]["w1"]["vs_shipped"] == 1.0


@pytest.mark.parametrize("argv", [["--workers", "0"], ["--sequences", "x"], ["--repeats", "0"],
                                  ["--sequences", "2", "--streams", "4"]])
def test_bad_arguments_are_refused(checkpoint, argv):
    with pytest.raises(SystemExit):
        engine_workers.main(["--checkpoint", str(checkpoint), *argv])
