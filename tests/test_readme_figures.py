"""Every measured figure the README quotes is the one in the JSON file a committed script wrote
(bench/results/*.json): each JSON below renders the strings the README must contain, formatted
as the README gives them. Rerunning a bench without updating the README (or the reverse) fails
here."""
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def load(name: str) -> dict:
    return json.loads((REPO / "bench" / "results" / name).read_text())


def k(x: float) -> str:
    return f"{x / 1000:.1f}k"


def checkpoints(d):
    r = d["results"]
    out = [f"| {r[n]['valid_nll_nats']:.2f} nats ({r[n]['valid_bits_per_dim']:.4f} bits/dim) |"
           for n in ("pixelcnn_binarized_mnist", "gated_pixelcnn_binarized_mnist", "row_lstm_binarized_mnist",
                     "diagonal_bilstm_binarized_mnist")]
    g = r["gated_pixelcnn_fashion_mnist"]
    return out + [f"| {g['valid_nll_nats']:.1f} nats ({g['valid_bits_per_dim']:.3f} bits/dim) |"]


def sampling(d):
    rows = []
    for arch, r in d["results"].items():
        t, o = r["cached_torch"], r["cached_onnx"]
        rows.append(f"| {arch} | {r['naive']['seconds']:.1f} s | {t['seconds']:.2f} s ({t['speedup_over_naive']:.0f}x) | "
                    f"{o['seconds']:.2f} s ({o['speedup_over_naive']:.0f}x) | {o['vs_scoring']:.1f} |")
    return rows + [f"load average\n{d['machine']['load_average_1_5_15'][0]:g} on 2 cores"]


def training(d):
    rows = []
    for r in d["results"].values():
        v = r["variants"]
        rows.append(f"| {v['before']['images_per_s']['median']:.1f} | {v[r['fastest']]['images_per_s']['median']:.1f} ")
        rows.append(f"| {r['speedup']:.2f}x |")
    t = d["targets"]
    return rows + [f"**{t['diagonal_bilstm']['status']}** ({t['diagonal_bilstm']['worst_speedup']:.2f}x at worst)",
                   f"**{t['pixelcnn']['status']}** (PixelCNN {t['pixelcnn']['worst_speedup']:.2f}x, "
                   f"Gated PixelCNN {t['gated_pixelcnn']['worst_speedup']:.2f}x at worst)"]


def long_runs(runs):
    return [f"| {r['steps']} steps x 64 ({r['epochs']:.2f} epochs) | {r['hours']:.2f} h, {'/'.join(r['devices'])} | "
            f"{r['best_valid_nll_nats']:.2f} (2,000-image subset, step {r['best_step']}) |" for r in runs]


def deployment(d):
    r = d["results"]
    return [f"| {r[n]['ready_s']['median']:.2f} s | {r[n]['rss_mib']['median']:.1f} MiB |" for n in ("before", "full", "runtime")]


def serving(d):
    s, st, sc = d["sampling"], d["streams"], d["scoring"]
    return [
        f"| {k(s['triton']['pixels_per_s'])} pixels/s | {k(s['in_process']['pixels_per_s'])} pixels/s | {s['ratio_triton_vs_in_process']:.2f} |",
        f"| {k(st['16']['pixels_per_s'])} vs {k(st['1']['pixels_per_s'])} pixels/s | "
        f"{k(st['16']['engine_in_process']['pixels_per_s'])} vs {k(st['1']['engine_in_process']['pixels_per_s'])} (engine alone) | "
        f"{st['16']['vs_one_stream']:.2f}x |",
        f"| {sc['triton']['images_per_s']:.0f} images/s | {sc['in_process']['images_per_s']:.0f} images/s | {sc['ratio_triton_vs_in_process']:.2f} |",
        f"| {sc['triton_concurrent']['images_per_s']:.0f} images/s | {sc['in_process']['images_per_s']:.0f} images/s | "
        f"{sc['ratio_triton_concurrent_vs_in_process']:.2f} |",
        f"({st['16']['call_batch']['mean']:.1f} images per cell call with 16 streams)",
        f"load average {d['machine']['load_average_1_5_15'][0]:g}",
    ]


def load_run(d):
    t, th, lat, m, c = d["totals"], d["throughput"], d["latency_ms"], d["sampler_metrics"], d["content"]
    return [f"{t['errors']} errors, {t['images_sampled']:,} images", f"({th['rows_per_s']:,.0f} rows/s, {d['streams']['call_batch_mean']:.1f} images per cell call)",
            f"{t['images_scored']:,} images scored", f"({th['images_scored_per_s']:.0f}/s)", f"p50 {lat['row']['p50']:.1f} ms, p99 {lat['row']['p99']:.0f} ms",
            f"{lat['first_row']['p50']:.0f} ms, p99 {lat['first_row']['p99']:.0f} ms", f"all {m['expected_completed']:,} sequences completed",
            f"({c['images_checked']:,} images and {c['scores_checked']:,} scores checked after the run, {c['images_wrong'] + c['scores_wrong']} wrong)"]


def perf_analyzer(d):
    score, sample = d["results"]["score"], d["results"]["sample"]
    return [f"scorer {score['images_per_s']:.0f} images/s", f"p50 {score['latency_us']['p50'] / 1000:.0f} ms",
            f"sampler {sample['images_per_s']:.1f} images/s = {sample['rows_per_s']:.0f} rows/s",
            f"first row p50 {sample['streams']['first_row_latency_us']['p50'] / 1000:.1f} ms",
            f"whole image p50 {sample['latency_us']['p50'] / 1000:.0f} ms",
            f"load average {d['machine']['load_average_1_5_15'][0]:.0f}"]


def abandoned_streams(d):
    mib = d["rss_mib_total"]
    return [f"{mib['after_warmup_50']} MiB after 50 warm-up drops", f"{mib['after_200']} MiB after 200",
            f"live sequences are back to 0 {d['seconds_to_settle_after_last_drop']:.1f} s after the last drop"]


FIGURES = {
    "checkpoints.json": checkpoints, "sampling.json": sampling, "training.json": training, "long_runs.json": long_runs,
    "deployment.json": deployment, "serving.json": serving, "load.json": load_run, "perf_analyzer.json": perf_analyzer,
    "abandoned_streams.json": abandoned_streams,
}


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_readme_quotes_the_json(name):
    flat = " ".join(README.split())  # the README wraps lines anywhere
    missing = [s for s in FIGURES[name](load(name)) if " ".join(s.split()) not in flat]
    assert not missing, f"README.md does not quote bench/results/{name} as {missing}"
    assert f"bench/results/{name}" in README or name == "long_runs.json" and "bench/results/long_runs.json" in flat
