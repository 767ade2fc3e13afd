"""bench.serving --quick on tiny checkpoints through a real tritonserver: the JSON's structure,
and that the images streamed through Triton are the in-process cells' images (`identical`).
A class-conditional RGB model covers labels, a multi-scale one the two-stage streams. No timing
is asserted."""
import json

import pytest
import torch

from tests.deployment import require, require_tritonserver  # noqa: E402

require("tritonclient.grpc")

from bench import common  # noqa: E402
from bench import serving  # noqa: E402
from pixelrnn.training.checkpoint import save_checkpoint  # noqa: E402
from pixelrnn.training.models import build_model  # noqa: E402

MODELS = {
    "gated": ("gated_pixelcnn", dict(in_channels=3, height=5, width=4, levels=4, num_classes=2, hidden=6, layers=1, kernel=3)),
    "ms": ("multiscale", dict(in_channels=1, height=6, width=4, levels=3, base_arch="gated_pixelcnn", hidden=6, layers=1,
                              small_config=dict(kernel=3), big_config=dict(kernel=3))),
}
TIMED = ("seconds", "min_seconds", "max_seconds", "runs")  # seconds: the median


@pytest.fixture(scope="module")
def tritonserver():
    require_tritonserver()


def checkpoint(tmp_path, name):
    arch, config = MODELS[name]
    torch.manual_seed(1)
    path = tmp_path / f"{name}.pt"
    save_checkpoint(path, {"arch": arch, "config": config, "model": build_model(arch, dict(config)).state_dict(), "step": 1})
    return path


@pytest.mark.triton
@pytest.mark.parametrize("name", list(MODELS))
def test_quick_run_through_triton_writes_the_json_and_triton_draws_the_in_process_images(tritonserver, tmp_path, capsys, name):
    out = tmp_path / "serving.json"
    assert serving.main(["--quick", "--checkpoint", str(checkpoint(tmp_path, name)), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    arch, config = MODELS[name]
    quick = serving.QUICK

    assert data["benchmark"] == "serving" and data["config"]["quick"] is True
    assert data["config"]["streams"] == quick["streams"] and data["config"]["repeats"] == quick["repeats"]
    assert data["model"]["arch"] == arch and data["model"]["config"]["height"] == config["height"]
    server = data["server"]
    assert server["onnx_threads"] == 1 and server["score_instances"] == 1 and server["sample_instances"] == 1
    assert server["tritonserver"] and set(server["models"]) == {f"{arch}_sample", f"{arch}_score"}
    assert set(common.MALLOC_ENV) == set(data["machine"]["malloc_env"])

    identical = data["identical"]
    assert identical["all"] is True
    assert identical["sample_triton_vs_in_process"] and identical["streams_vs_in_process"] and identical["scores_agree"]

    s = data["sampling"]
    assert s["pixels"] == quick["batch"] * config["in_channels"] * config["height"] * config["width"]
    for path in ("triton", "triton_per_row", "triton_stream", "in_process", "engine_in_process"):
        assert all(k in s[path] for k in TIMED) and len(s[path]["runs"]) == quick["repeats"]
        assert s[path]["pixels_per_s"] == pytest.approx(s["pixels"] / s[path]["seconds"])
    assert s["ratio_triton_vs_in_process"] == pytest.approx(s["triton"]["pixels_per_s"] / s["in_process"]["pixels_per_s"])
    assert s["ratio_triton_per_row_vs_in_process"] == pytest.approx(s["triton_per_row"]["pixels_per_s"] / s["in_process"]["pixels_per_s"])
    assert s["triton_stream"]["call_batch_seen"] == [quick["batch"]]  # one sequence: its own images only

    streams = data["streams"]
    assert list(streams) == [str(k) for k in quick["streams"]]
    for k, r in streams.items():
        assert r["images"] == int(k) and all(key in r for key in TIMED)
        assert 1 <= r["call_batch"]["min"] <= r["call_batch"]["mean"] <= r["call_batch"]["max"] <= int(k)
        assert sum(r["call_batch"]["histogram"].values()) > 0 and r["active_max"] <= int(k)
        assert r["engine_in_process"]["pixels_per_s"] > 0
        assert all(key in r["per_row"] for key in TIMED) and r["per_row"]["pixels_per_s"] > 0  # ROWS_PER_RESPONSE 1
        # the sampler's own time in cell calls (its metric): some, and less than the whole run
        assert 0 < r["cell_seconds"] < r["max_seconds"] and r["cell_share"] == pytest.approx(r["cell_seconds"] / r["seconds"])
    assert streams["1"]["call_batch"]["max"] == 1 and streams["1"]["vs_one_stream"] == 1.0 == streams["1"]["per_row"]["vs_one_stream"]

    # pinned: the server's processes on one CPU, this process on the other (2 CPUs here)
    pinned = data["pinned"]
    assert pinned["server_cpu"] != pinned["client_cpu"] and pinned["server_processes"] >= 3  # tritonserver + 2 stubs
    assert pinned["server_affinity_seen"] == [[pinned["server_cpu"]]]  # every server process was on its one CPU
    ps = pinned["sampling"]
    assert ps["ratio_triton_vs_in_process"] == pytest.approx(ps["triton"]["pixels_per_s"] / ps["in_process"]["pixels_per_s"])
    assert set(pinned["streams"]) == {str(min(quick["streams"])), str(max(quick["streams"]))}
    # CPU seconds per 1000 rows, server and client, for every sampling path
    cpu = data["cpu_seconds_per_1000_rows"]
    for path in ("sample/triton", "sample/triton_per_row", "pinned/sample/triton", "streams/2", "streams_per_row/2"):
        assert set(cpu[path]) == {"server", "client"} and cpu[path]["server"] >= 0 and cpu[path]["client"] >= 0
    assert set(cpu["sample/in_process"]) == {"server", "client"}  # (clock ticks of 10 ms: a tiny model's runs may read 0)

    sc = data["scoring"]
    assert sc["images"] == quick["score_images"] and sc["triton_concurrent"]["requests_per_run"] == quick["score_images"]
    for path in ("triton", "triton_concurrent", "in_process"):
        assert sc[path]["images_per_s"] == pytest.approx(sc["images"] / sc[path]["seconds"])
    assert sc["triton_concurrent"]["images_per_execution"] >= 1  # read from Triton's metrics
    assert sc["max_abs_nll_difference"] <= 1e-3

    t = data["targets"]
    for key in ("sampling_vs_in_process", "scoring_vs_in_process", "scoring_concurrent_vs_in_process"):
        assert t[key]["target"] == 0.9 and isinstance(t[key]["met"], bool)
    assert t["streams_scaling"]["streams"] == max(quick["streams"]) and t["streams_scaling"]["met"] is None  # 6x is for 16
    assert t["pinned_sampling_vs_in_process"]["target"] == 0.95
    assert isinstance(t["all_met"], bool)
    table = capsys.readouterr().out
    assert "Triton (PixelClient)" in table and "identical images: yes" in table


def test_arguments():
    args = serving.parse_args(["--streams", "16,1,4", "--repeats", "2"])
    assert args.streams == [1, 4, 16] and args.repeats == 2 and args.checkpoint == serving.DEFAULT_CHECKPOINT
    assert serving.parse_args(["--quick"]).streams == serving.QUICK["streams"]
    for bad in (["--streams", "0,2"], ["--streams", "a"], ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            serving.parse_args(bad)


def test_targets_need_one_and_sixteen_streams_for_the_scaling_target():
    def result(streams):
        return {"sampling": {"ratio_triton_vs_in_process": 0.95}, "scoring": {"ratio_triton_vs_in_process": 0.8,
                "ratio_triton_concurrent_vs_in_process": 0.91}, "streams": streams}

    t = serving.targets(result({"1": {"vs_one_stream": 1.0}, "16": {"vs_one_stream": 6.5}}))
    assert t["streams_scaling"] == {"streams": 16, "value": 6.5, "target": 6.0, "met": True}
    assert t["sampling_vs_in_process"]["met"] and not t["scoring_vs_in_process"]["met"] and not t["all_met"]
    t = serving.targets(result({"1": {"vs_one_stream": 1.0}, "4": {"vs_one_stream": 3.0}}))
    assert t["streams_scaling"]["met"] is None and t["streams_scaling"]["streams"] == 4


def test_the_scaling_target_carries_its_batching_ceiling_when_the_sequence_has_16_images():
    """16 single-image streams at best run one 16-image sequence's cell calls: that path's rate over
    one stream's is the ceiling, recorded (and pinned too) beside the 16-stream ratio; and with the
    sampler's cell time in the 16-stream runs, the ratio those calls alone allow (cell_bound)."""
    def result(batch, pinned=None):
        return {"sampling": {"batch": batch, "ratio_triton_vs_in_process": 1.0, "triton_stream": {"pixels_per_s": 5000.0}},
                "scoring": {"ratio_triton_vs_in_process": 1.0, "ratio_triton_concurrent_vs_in_process": 1.0},
                "streams": {"1": {"pixels_per_s": 1000.0, "vs_one_stream": 1.0, "seconds": 0.03},
                            "16": {"pixels_per_s": 4000.0, "vs_one_stream": 4.0, "cell_seconds": 0.08,
                                   "engine_in_process": {"seconds": 0.1}}}, "pinned": pinned}

    s = serving.targets(result(16))["streams_scaling"]
    assert s["value"] == 4.0 and s["ceiling"] == 5.0 and s["of_ceiling"] == pytest.approx(0.8) and "pinned" not in s
    assert s["cell_bound"] == pytest.approx(16 * 0.03 / 0.08)  # 16 streams in no more time than their cell calls took
    assert s["engine_bound"] == pytest.approx(16 * 0.03 / 0.1)  # ... than the engine in process took for them
    pinned = {"sampling": {"triton": {"pixels_per_s": 3000.0}, "ratio_triton_vs_in_process": 1.0},
              "streams": {"1": {"streams": {"pixels_per_s": 500.0}}, "16": {"streams": {"vs_one_stream": 3.5}}}}
    assert serving.targets(result(16, pinned))["streams_scaling"]["pinned"] == {"value": 3.5, "ceiling": 6.0}
    assert "ceiling" not in serving.targets(result(8))["streams_scaling"]  # another batch bounds nothing
