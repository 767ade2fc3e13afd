"""bench.cluster: a bounded run (--quick: 1 and 2 replicas behind nginx, and one replica direct,
4 streams and a scorer for 1.5 s each) on a tiny model: zero errors, the JSON's figures present
and consistent, and through the 2-replica proxy both scoring and sampling reach both replicas;
and a bounded --sustained run (every image and score checked). No speed is asserted."""
import json

import pytest
import torch

from tests.deployment import require, require_tritonserver

require("tritonclient.grpc")

from bench import cluster  # noqa: E402
from tests.test_cluster import nginx_or_skip  # noqa: E402
from pixelrnn.training.checkpoint import save_checkpoint  # noqa: E402
from pixelrnn.training.models import build_model  # noqa: E402

CONFIG = dict(in_channels=1, height=8, width=4, levels=2, hidden=6, layers=1, kernel=3)


def tiny_checkpoint(tmp_path):
    """A tiny checkpoint to benchmark (skips, or fails under CI, without tritonserver or nginx)."""
    require_tritonserver()
    nginx_or_skip()
    torch.manual_seed(1)
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(checkpoint, {"arch": "gated_pixelcnn", "config": CONFIG,
                                 "model": build_model("gated_pixelcnn", dict(CONFIG)).state_dict(), "step": 1})
    return checkpoint


@pytest.mark.triton
@pytest.mark.slow
def test_bounded_cluster_run_has_no_errors_and_writes_consistent_figures(tmp_path, capsys):
    checkpoint = tiny_checkpoint(tmp_path)
    out = tmp_path / "cluster.json"
    code = cluster.main(["--quick", "--checkpoint", str(checkpoint), "--json", str(out)])
    data = json.loads(out.read_text())
    assert code == 0 and data["errors"] == 0, data["error_messages"]
    assert data["benchmark"] == "cluster" and data["settings"]["replicas"] == cluster.QUICK["replicas"]
    results = data["results"]
    assert sorted(results) == ["1", "2", "direct"]
    for name, r in results.items():
        assert len(r["runs"]) == cluster.QUICK["repeats"]
        for run in r["runs"]:
            assert run["images"] > 0 and run["scored"] > 0 and run["seconds"] >= cluster.QUICK["seconds"]
            assert run["pixels_per_s"] == pytest.approx(run["images"] * 8 * 4 / run["seconds"])
        assert r["pixels_per_s_min"] <= r["pixels_per_s"] <= r["pixels_per_s_max"]
        assert r["scored_images_per_s_min"] <= r["scored_images_per_s"] <= r["scored_images_per_s_max"]
        assert r["sampling_vs_one_replica"] == pytest.approx(r["pixels_per_s"] / results["1"]["pixels_per_s"])
    assert results["1"]["sampling_vs_one_replica"] == 1.0
    one, two = results["1"]["runs"][0], results["2"]["runs"][0]
    assert one["score_calls_per_replica"][1] == 0 and one["sequences_per_replica"][1] == 0  # the proxy over replica 0 only
    assert all(c > 0 for c in two["score_calls_per_replica"]), two
    assert all(c > 0 for c in two["sequences_per_replica"]), two
    assert "2: sampling" in capsys.readouterr().out


@pytest.mark.triton
@pytest.mark.slow
def test_bounded_sustained_run_checks_every_image_and_reaches_every_replica(tmp_path, capsys):
    """--sustained --quick: 2 replicas behind one proxy, 4 streams and a scorer for 2 s; every image
    and score checked against the in-process graphs, zero errors, every replica served both, the
    section written under "sustained" beside what the file held."""
    checkpoint = tiny_checkpoint(tmp_path)
    out = tmp_path / "cluster.json"
    out.write_text(json.dumps({"benchmark": "cluster", "results": {"1": "kept"}}))
    code = cluster.main(["--sustained", "--quick", "--checkpoint", str(checkpoint), "--json", str(out)])
    data = json.loads(out.read_text())
    s = data["sustained"]
    assert code == 0 and s["errors"] == 0, s["error_messages"]
    assert data["results"] == {"1": "kept"}
    assert s["settings"]["replicas"] == 2 and s["settings"]["streams"] == cluster.SUSTAINED_QUICK["streams"]
    c = s["content"]
    assert c["images_checked"] == s["totals"]["images_sampled"] > 0 and c["images_wrong"] == 0
    assert c["scores_checked"] > 0 and c["scores_wrong"] == 0
    assert all(n > 0 for n in s["score_calls_per_replica"]) and all(n > 0 for n in s["sequences_per_replica"])
    assert sum(m["events_total"]["completed"] for m in s["sampler_metrics"]) == s["expected_completed"]
    assert all(m["live"] == 0 for m in s["sampler_metrics"])
    assert "errors: 0" in capsys.readouterr().out
