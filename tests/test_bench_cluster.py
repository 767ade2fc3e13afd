"""bench.cluster: a bounded run (--quick: 1 and 2 replicas behind nginx, and one replica direct,
4 streams and a scorer for 1.5 s each) on a tiny model: zero errors, the JSON's figures present
and consistent, and through the 2-replica proxy both scoring and sampling reach both replicas.
No speed is asserted."""
import json

import pytest
import torch

from tests.deployment import require, require_tritonserver

require("tritonclient.grpc")

from bench import cluster  # noqa: E402
from tests.test_cluster import nginx_or_skip  # noqa: E402
from training.checkpoint import save_checkpoint  # noqa: E402
from training.models import build_model  # noqa: E402

CONFIG = dict(in_channels=1, height=8, width=4, levels=2, hidden=6, layers=1, kernel=3)


@pytest.mark.triton
@pytest.mark.slow
def test_bounded_cluster_run_has_no_errors_and_writes_consistent_figures(tmp_path, capsys):
    require_tritonserver()
    nginx_or_skip()
    torch.manual_seed(1)
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(checkpoint, {"arch": "gated_pixelcnn", "config": CONFIG,
                                 "model": build_model("gated_pixelcnn", dict(CONFIG)).state_dict(), "step": 1})
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
