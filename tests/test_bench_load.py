"""bench.load: a bounded run (--quick: 8 streams for a few seconds plus scoring) through a real
tritonserver on a tiny class-conditional multi-scale model (two stages, labels): zero errors,
every figure of the JSON present and consistent, the sampler's own metrics back to no live
sequence. Also the image checks and the argument handling, without a server. No speed is
asserted."""
import json

import numpy as np
import pytest
import torch

from tests.deployment import require, require_tritonserver  # noqa: E402

require("tritonclient.grpc")

from bench import common  # noqa: E402
from bench import load  # noqa: E402
from pixelrnn.client.library import Row  # noqa: E402
from pixelrnn.training.checkpoint import save_checkpoint  # noqa: E402
from pixelrnn.training.models import build_model  # noqa: E402

CONFIG = dict(in_channels=1, height=8, width=4, levels=3, num_classes=2, base_arch="gated_pixelcnn", hidden=6, layers=1,
              small_config=dict(kernel=3), big_config=dict(kernel=3))
MANIFEST = {"shape": [1, 8, 4], "levels": 3, "multiscale": {"small_shape": [1, 4, 2]}}  # what check_image reads


@pytest.mark.triton
@pytest.mark.reliability
def test_bounded_load_run_has_no_errors_and_writes_consistent_figures(tmp_path, capsys):
    require_tritonserver()
    torch.manual_seed(1)
    checkpoint = tmp_path / "ms.pt"
    save_checkpoint(checkpoint, {"arch": "multiscale", "config": CONFIG, "model": build_model("multiscale", dict(CONFIG)).state_dict(),
                                 "step": 1})
    out = tmp_path / "load.json"
    code = load.main(["--quick", "--checkpoint", str(checkpoint), "--json", str(out), "--compare-per-row"])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert code == 0, data["totals"]["error_messages"]

    cfg, t, th, lat = data["config"], data["totals"], data["throughput"], data["latency_ms"]
    assert data["benchmark"] == "load" and cfg["quick"] is True
    assert (cfg["streams"], cfg["seconds"], cfg["score_clients"], cfg["score_batch"]) == tuple(load.QUICK.values())
    assert t["errors"] == 0 and t["error_messages"] == []
    rows_per_image = 4 + 8  # the small image's rows, then the full one's
    assert data["model"]["rows_per_image"] == rows_per_image
    assert t["images_sampled"] >= cfg["streams"] and t["rows"] == t["images_sampled"] * rows_per_image
    assert t["pixels"] == t["images_sampled"] * 8 * 4
    assert t["score_requests"] > 0 and t["images_scored"] == t["score_requests"] * cfg["score_batch"]
    assert data["score_data"].startswith("random levels")  # the checkpoint names no data set
    assert data["seconds"] >= cfg["seconds"]
    assert th["rows_per_s"] == pytest.approx(t["rows"] / data["seconds"])
    assert th["images_sampled_per_s"] == pytest.approx(t["images_sampled"] / data["seconds"])
    assert th["images_scored_per_s"] == pytest.approx(t["images_scored"] / data["seconds"])

    assert lat["row"]["count"] == t["images_sampled"] * (rows_per_image - 1)  # gaps between a sequence's rows
    assert lat["first_row"]["count"] == t["images_sampled"] and lat["score_request"]["count"] == t["score_requests"]
    responses = data["responses"]
    assert t["images_sampled"] <= responses["count"] <= t["rows"]  # coalesced: one row or more per response
    assert lat["response"]["count"] == responses["count"] - t["images_sampled"]
    assert responses["rows_per_response_mean"] == pytest.approx(t["rows"] / responses["count"])
    for key, d in lat.items():  # rows that came in one response have a gap of 0
        assert d["max"] >= d["p99"] >= d["p90"] >= d["p50"] >= (0 if key == "row" else 1e-9)

    before = data["per_row"]  # phase 1 on the same server: one response per row
    assert before["rows_per_response"] == 1 and before["totals"]["errors"] == 0
    assert before["responses"]["count"] == before["totals"]["rows"] and before["responses"]["rows_per_response_mean"] == 1
    assert before["latency_ms"]["row"]["p50"] > 0 and before["content"]["images_wrong"] == 0
    assert before["sampler_metrics"]["expected_completed"] == before["totals"]["images_sampled"] + cfg["streams"]

    st = data["streams"]
    assert 1 <= st["images_per_stream_min"] <= st["images_per_stream_max"]
    assert 1 <= st["call_batch_mean"] <= st["call_batch_max"] <= cfg["streams"]

    content = data["content"]  # every timed image, and every score (warm-up requests too), compared with the in-process graphs
    warmup_scores = cfg["score_clients"] * cfg["score_batch"]
    assert content == {"images_checked": t["images_sampled"], "images_wrong": 0,
                       "scores_checked": t["images_scored"] + warmup_scores, "scores_wrong": 0}

    m = data["sampler_metrics"]
    assert m["live_sequences"] == 0
    events = m["events_total"]
    # the server's counters since it started: both phases
    assert events["completed"] == events["started"] == m["expected_completed"] == \
        before["sampler_metrics"]["expected_completed"] + t["images_sampled"] + cfg["streams"]
    assert events["rows"] == events["completed"] * rows_per_image
    assert all(events[k] == 0 for k in ("failed", "expired", "refused", "disconnected", "cancelled"))

    assert data["server"]["tritonserver"] and set(common.MALLOC_ENV) == set(data["machine"]["malloc_env"])
    assert "errors: 0" in printed and "row latency" in printed and "live sequences 0" in printed
    assert "one response per row (phase 1" in printed


def rows(order, widths=(2, 4), value=1, logprob=-0.5):
    return [Row(i, s, np.full((1, 1, widths[s]), value, np.uint8), np.array([logprob], np.float32)) for s, i in order]


WHOLE = [(0, i) for i in range(4)] + [(1, i) for i in range(8)]


def test_check_image_accepts_a_whole_image_and_names_what_is_wrong():
    load.check_image(rows(WHOLE), MANIFEST)
    cases = [
        (rows(WHOLE[:-1]), "11 rows, expected 12"),
        (rows(WHOLE[:4] + WHOLE[5:] + WHOLE[4:5]), r"are not"),
        (rows(WHOLE, widths=(2, 3)), r"expected uint8 \(1, 1, 4\)"),
        (rows(WHOLE, value=3), "value 3 >= 3 levels"),
        (rows(WHOLE, logprob=np.nan), "not a log-probability"),
        (rows(WHOLE, logprob=0.5), "not a log-probability"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            load.check_image(bad, MANIFEST)


def test_content_check_catches_a_wrong_image_and_a_wrong_score(tmp_path):
    from pixelrnn.runtime import rowloop
    from pixelrnn.runtime.runner import OnnxRunner
    from tests.deployment import Tiny, export_models

    m = export_models(tmp_path, [Tiny("px", "pixelcnn", dict(in_channels=1, height=4, width=3, levels=2, hidden=4, layers=1), max_batch=4)])["px"]
    runner = OnnxRunner.from_manifest(m.manifest, m.export_dir)
    drawn = [(seed, None, rowloop.sample(runner, rowloop.SampleSpec(batch=1, seed=seed))) for seed in range(6)]
    images = np.stack([d[2][0] for d in drawn])
    with torch.no_grad():
        nll = m.model.nll(torch.from_numpy(images).long()).numpy()
    take = np.arange(6)
    errors = load.Errors()
    ok = load.verify_content([{"drawn": drawn}], [{"answers": [(take, nll)]}], m.manifest, m.export_dir, images, None, errors)
    assert errors.total() == 0 and ok == {"images_checked": 6, "images_wrong": 0, "scores_checked": 6, "scores_wrong": 0}
    tampered = drawn[:5] + [(5, None, 1 - drawn[5][2])]  # seed 5's image with every pixel flipped
    wrong_nll = nll.copy()
    wrong_nll[2] += 0.5
    bad = load.verify_content([{"drawn": tampered}], [{"answers": [(take, wrong_nll)]}], m.manifest, m.export_dir, images, None, errors)
    assert (bad["images_wrong"], bad["scores_wrong"]) == (1, 1) and errors.total() == 2
    messages = " ".join(e["message"] for e in errors.report())
    assert "seed 5 differs" in messages and "score of image 2" in messages


def test_percentiles_and_errors():
    d = load.percentiles_ms([0.001 * k for k in range(1, 101)])
    assert d["count"] == 100 and d["p50"] == pytest.approx(50.5) and d["p99"] == pytest.approx(99.01) and d["max"] == 100
    assert load.percentiles_ms([]) == {"count": 0}
    errors = load.Errors()
    for message in ("a\n  b", "a b", "c"):
        errors.add(message)
    assert errors.total() == 3 and errors.report() == [{"message": "a b", "count": 2}, {"message": "c", "count": 1}]


def test_arguments():
    args = load.parse_args([])
    assert (args.streams, args.seconds, args.score_clients, args.score_batch) == tuple(load.DEFAULTS.values())
    args = load.parse_args(["--quick", "--streams", "3"])
    assert args.streams == 3 and args.seconds == load.QUICK["seconds"]
    for bad in (["--streams", "0"], ["--seconds", "0"], ["--score-clients", "-1"], ["--score-batch", "0"]):
        with pytest.raises(SystemExit):
            load.parse_args(bad)
