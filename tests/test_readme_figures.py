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
    for t in d["targets"]["per_arch"].values():
        assert t["speedup_met"] and t["vs_scoring_met"]  # the README says all are met
    return rows + [f"load average\n{d['machine']['load_average_1_5_15'][0]:g} on 2 cores"]


def cell_graphs(d):
    return [f"| {arch} | {r['nodes_exported']} | {r['nodes_run']} | {r['nodes_run_per_pixel']:.0f} |"
            for arch, r in d["results"].items()] + [f"(load average {d['machine']['load_average_1_5_15'][0]:g};"]


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


def long_run_nll(r) -> str:
    """A long run's best validation figure as the README gives it (a run that just started has none yet)."""
    if r["best_valid_nll_nats"] is None:
        return "none yet (first validation at step 500)"
    if r["unit"] == "bits/dim":
        return f"{r['best_valid_bits_per_dim']:.3f} bits/dim (2,000-image subset, step {r['best_step']})"
    return f"{r['best_valid_nll_nats']:.2f} (2,000-image subset, step {r['best_step']})"


def long_runs(runs):
    return [f"| {r['steps']} steps x 64 ({r['epochs']:.2f} epochs) | {r['hours']:.2f} h, {'/'.join(r['devices'])} | "
            f"{long_run_nll(r)} |" for r in runs]


def deployment(d):
    r = d["results"]
    return [f"| {r[n]['ready_s']['median']:.2f} s | {r[n]['rss_mib']['median']:.1f} MiB |" for n in ("before", "full", "runtime")]


def met(ok: bool) -> str:
    return "met" if ok else "not met"


def serving(d):
    s, st, sc, pn, cpu, t = d["sampling"], d["streams"], d["scoring"], d["pinned"], d["cpu_seconds_per_1000_rows"], d["targets"]
    ps, p1, p16 = pn["sampling"], pn["streams"]["1"], pn["streams"]["16"]

    def scaling(r16, r1, x):
        return f"{k(r16['pixels_per_s'])} vs {k(r1['pixels_per_s'])} pixels/s, {x:.2f}x"

    def cpu_row(path):
        return f"server {cpu[path]['server']:.2f} s, client {cpu[path]['client']:.2f} s"

    engine_x = st['16']['engine_in_process']['pixels_per_s'] / st['1']['engine_in_process']['pixels_per_s']
    # Cores busy over a 16-stream run: server and client CPU over its rows (16 images of H rows).
    rows_16 = 16 * d["model"]["shape"][1]
    cpu_16 = cpu["streams/16"]["server"] + cpu["streams/16"]["client"]
    cpu_run = cpu_16 * rows_16 / 1000  # CPU seconds of one 16-stream run
    busy_cores = cpu_run / st["16"]["seconds"]
    at_6x = st["16"]["seconds"] * st["16"]["vs_one_stream"] / 6  # the run's length if it made 6x one stream

    return [
        f"| sampling, one stream of 16 images | {k(s['triton_per_row']['pixels_per_s'])} pixels/s "
        f"({s['ratio_triton_per_row_vs_in_process']:.2f}) | {k(s['triton']['pixels_per_s'])} pixels/s ({s['ratio_triton_vs_in_process']:.2f}) | "
        f"{k(s['in_process']['pixels_per_s'])} pixels/s (engine {k(s['engine_in_process']['pixels_per_s'])}) | "
        f">= 0.9 ({met(t['sampling_vs_in_process']['met'])}) |",
        f"| the same, pinned | {k(ps['triton_per_row']['pixels_per_s'])} pixels/s ({ps['ratio_triton_per_row_vs_in_process']:.2f}) | "
        f"{k(ps['triton']['pixels_per_s'])} pixels/s ({ps['ratio_triton_vs_in_process']:.2f}) | {k(ps['in_process']['pixels_per_s'])} pixels/s "
        f"(engine {k(ps['engine_in_process']['pixels_per_s'])}) | >= 0.95 ({met(t['pinned_sampling_vs_in_process']['met'])}) |",
        f"| 16 concurrent single-image streams vs 1 | {scaling(st['16']['per_row'], st['1']['per_row'], st['16']['per_row']['vs_one_stream'])} | "
        f"{scaling(st['16'], st['1'], st['16']['vs_one_stream'])} | engine alone "
        f"{scaling(st['16']['engine_in_process'], st['1']['engine_in_process'], engine_x)} | "
        f">= 6x ({met(t['streams_scaling']['met'])}) |",
        f"| the same, pinned | {scaling(p16['streams_per_row'], p1['streams_per_row'], p16['streams_per_row']['vs_one_stream'])} | "
        f"{scaling(p16['streams'], p1['streams'], p16['streams']['vs_one_stream'])} | engine alone "
        f"{scaling(p16['engine'], p1['engine'], p16['engine']['vs_one_stream'])} | >= 6x ({met(p16['streams']['vs_one_stream'] >= 6)}) |",
        f"| CPU seconds per 1000 rows, 16 streams | {cpu_row('streams_per_row/16')} | {cpu_row('streams/16')} | "
        f"engine {cpu['engine/16']['client']:.2f} s |",
        f"| CPU seconds per 1000 rows, one stream of 16 images | {cpu_row('sample/triton_per_row')} | {cpu_row('sample/triton')} | "
        f"engine {cpu['sample/engine_in_process']['client']:.2f} s |",
        f"| scoring 256 images (chunks of 64) | | {sc['triton']['images_per_s']:.0f} images/s ({sc['ratio_triton_vs_in_process']:.2f}) | "
        f"{sc['in_process']['images_per_s']:.0f} images/s | >= 0.9 ({met(t['scoring_vs_in_process']['met'])}) |",
        f"| scoring, 16 clients x 1-image requests | | {sc['triton_concurrent']['images_per_s']:.0f} images/s "
        f"({sc['ratio_triton_concurrent_vs_in_process']:.2f}) | {sc['in_process']['images_per_s']:.0f} images/s | "
        f">= 0.9 ({met(t['scoring_concurrent_vs_in_process']['met'])}) |",
        f"{st['16']['rows_per_response']:.2f} rows per response with 16 streams, {s['triton_stream']['rows_per_response']:.2f} "
        f"with one stream of 16 images",
        f"{st['16']['call_batch']['mean']:.1f} images per cell call with 16 streams",
        f"load average {d['machine']['load_average_1_5_15'][0]:g}",
        f"Triton against the engine in process is {s['ratio_triton_vs_engine']:.2f} for one stream of 16 images and "
        f"{st['16']['pixels_per_s'] / st['16']['engine_in_process']['pixels_per_s']:.2f} for 16 streams",
        f"{st['16']['pixels_per_s'] / st['16']['per_row']['pixels_per_s'] - 1:+.0%} for 16 streams",
        f"`ceiling` {t['streams_scaling']['ceiling']:.2f}", f"`engine_bound` {t['streams_scaling']['engine_bound']:.2f}",
        f"`cell_bound` {t['streams_scaling']['cell_bound']:.2f}",
        f"{1e3 * st['16']['cell_seconds']:.0f} ms of the {1e3 * st['16']['seconds']:.0f} ms run ({100 * st['16']['cell_share']:.0f}%), "
        f"against {1e3 * st['1']['cell_seconds']:.0f} ms of a one-stream run's {1e3 * st['1']['seconds']:.0f} ms",
        f"keep {busy_cores:.2f} of the 2 cores busy ({cpu_16:.2f} s per 1000 rows, {rows_16} rows in "
        f"{1e3 * st['16']['seconds']:.0f} ms); at 6x the same run would have to end in {1e3 * at_6x:.0f} ms, which at the same "
        f"CPU per row needs {cpu_run / at_6x:.2f} cores",
    ]


def serving_no_window(d):
    return [f"{d['streams']['16']['rows_per_response']:.2f} rows per response with 16 streams and "
            f"{d['sampling']['triton_stream']['rows_per_response']:.2f} with one stream of 16 images "
            f"(`bench/results/serving_no_window.json`, `--coalesce-ms 0`, load average {d['machine']['load_average_1_5_15'][0]:g})"]


def serving_gated_pixelcnn(d):
    st, sc = d["streams"], d["targets"]["streams_scaling"]
    return [f"{st['16']['vs_one_stream']:.2f}x one stream against a bound of {sc['ceiling']:.2f} "
            f"({100 * sc['of_ceiling']:.0f}% of it"]


def engine_batching(d):
    r = d["results"]
    return [f"bound {r['bound']:.2f}x, the engine {r['scaling']:.2f}x ({100 * r['share']:.0f}% of it; "
            f"{r['per_sequence_row_us']:.0f} us more per row of each separate sequence",
            f"a call of {d['config']['streams']} images yields {r['cell_bound']:.2f}x a call of one, the cell alone",
            f"{1e3 * r['paths']['cell_one_sequence']['seconds']:.0f} ms for {d['results']['model']['shape'][1]} batch-{d['config']['streams']} calls"]


def load_16_streams(d):
    before, lat = d["per_row"], d["latency_ms"]
    return [f"| first row p50, 16 streams + 2 scoring clients (`bench.load`) | {before['latency_ms']['first_row']['p50']:.1f} ms | "
            f"{lat['first_row']['p50']:.1f} ms | | no worse ({met(lat['first_row']['p50'] <= before['latency_ms']['first_row']['p50'])}) |",
            f"| rows/s under that load | {before['throughput']['rows_per_s']:,.0f} | {d['throughput']['rows_per_s']:,.0f} | | |",
            f"load average {d['machine']['load_average_1_5_15'][0]:g}, {d['totals']['errors'] + before['totals']['errors']} errors, "
            f"{d['content']['images_checked'] + before['content']['images_checked']:,} images checked"]


def load_run(d):
    t, th, lat, m, c = d["totals"], d["throughput"], d["latency_ms"], d["sampler_metrics"], d["content"]
    return [f"{t['errors']} errors, {t['images_sampled']:,} images", f"({th['rows_per_s']:,.0f} rows/s, {d['streams']['call_batch_mean']:.1f} images per cell call)",
            f"{t['images_scored']:,} images scored", f"({th['images_scored_per_s']:.0f}/s)", f"p50 {lat['row']['p50']:.1f} ms, p99 {lat['row']['p99']:.0f} ms",
            f"{d['responses']['rows_per_response_mean']:.2f} to a response: between responses p50 {lat['response']['p50']:.1f} ms, "
            f"p99 {lat['response']['p99']:.0f} ms", f"load average {d['machine']['load_average_1_5_15'][0]:g}",
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


def cluster(d):
    r = d["results"]
    rows = [f"| {label} | {k(r[n]['pixels_per_s'])} pixels/s ({r[n]['sampling_vs_one_replica']:.2f}x; "
            f"{k(r[n]['pixels_per_s_min'])}-{k(r[n]['pixels_per_s_max'])}) | {r[n]['scored_images_per_s']:.0f} images/s "
            f"({r[n]['scoring_vs_one_replica']:.2f}x; {r[n]['scored_images_per_s_min']:.0f}-{r[n]['scored_images_per_s_max']:.0f}) |"
            for n, label in (("direct", "1, no proxy (direct)"), ("1", "1"), ("2", "2"), ("3", "3"))]
    s = d["sustained"]  # bench.cluster --sustained
    t, c, lat, st = s["throughput"], s["content"], s["latency_ms"]["first_row"], s["settings"]
    assert s["errors"] == 0 and c["images_wrong"] == 0 and c["scores_wrong"] == 0  # the README says so
    assert all(m["live"] == 0 for m in s["sampler_metrics"])
    assert sum(m["events_total"]["completed"] for m in s["sampler_metrics"]) == s["expected_completed"]
    sustained = [f"{st['replicas']} replicas behind nginx, {st['streams']} concurrent sampling streams and "
                 f"{st['score_clients']} scoring clients for {st['seconds']:.0f} s",
                 f"{s['totals']['images_sampled']:,} images sampled ({k(t['pixels_per_s'])} pixels/s) and "
                 f"{s['totals']['images_scored']:,} images scored ({t['images_scored_per_s']:.0f}/s), {s['errors']} errors",
                 f"({c['images_checked']:,} images and {c['scores_checked']:,} scores checked, 0 wrong)",
                 "score calls per replica " + " / ".join(str(n) for n in s["score_calls_per_replica"]),
                 "sequences per replica " + " / ".join(f"{n:,}" for n in s["sequences_per_replica"]),
                 f"all {s['expected_completed']:,} sequences completed",
                 f"first row p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms; load average "
                 f"{s['machine']['load_average_1_5_15'][0]:.0f} on 2 cores"]
    return rows + sustained + [f"{d['errors']} errors; load average {d['machine']['load_average_1_5_15'][0]:.0f} on 2 cores",
                               f"5 s windows, {d['settings']['repeats']} interleaved repeats"]


def overload(d):
    v, a, m, t, sf = d["victim"], d["admission"], d["memory"], d["trim_cost"], d["server_flood"]
    fair, unfair = v["fair"], v["unfair"]
    assert m["after_trim_within_20pct"] and d["fairness_within_10pct"]  # the README says so
    return [f"{a['budget_images']:,} images ({a['image_bytes'] / 1024:.0f} KiB each)",
            f"({sf['starts']} STARTs of {sf['images_each']} images on one stream) had {sf['admitted']} admitted and "
            f"{sf['refused']} refused at once",
            f"first row after {sf['victim']['first_row_s'] * 1e3:.0f} ms and its image after {sf['victim']['image_s']:.2f} s",
            f"the flood was done in {sf['flood_s']:.1f} s",
            f"with {d['flood']['sequences']} sequences of 64 images under way",
            f"first row after {fair['first_row_s'] * 1e3:.1f} ms ({fair['first_row_calls']} cell call) and its whole image "
            f"after {fair['image_s']:.2f} s ({fair['image_calls']} calls)",
            f"gave {unfair['first_row_s'] * 1e3:.0f} ms ({unfair['first_row_calls']} calls) and {unfair['image_s']:.2f} s "
            f"({unfair['image_calls']} calls)",
            f"{d['fairness_throughput_ratio']:.2f}x the image-rows per CPU second (medians of {d['flood']['repeats']} interleaved repeats)",
            f"a flood of {2 * d['flood']['sequences']} such sequences",  # bench.overload's memory run: twice the flood
            f"RSS {m['baseline_mib']:.0f} MiB before, {m['peak_mib']:.0f} MiB at the peak, {m['after_flood_mib']:.0f} MiB after "
            f"the flood as the allocator leaves it, {m['after_trim_mib']:.0f} MiB after the trim ({m['trim_seconds'] * 1e3:.0f} ms)",
            f"first {t['steps']} calls right after a trim ran {t['slowdown_after_trim']:.2f}x slower",
            f"held {sf['rss_mib']['baseline']:.0f} MiB before the flood, {sf['rss_mib']['peak']:.0f} MiB at the peak and "
            f"{sf['rss_mib']['after_settle']:.0f} MiB {sf['settle_window_s']:.0f} s after, "
            + (f"back within 20% of the baseline {sf['seconds_to_within_20pct']:.1f} s after the flood"
               if sf["seconds_to_within_20pct"] is not None else  # whichever the run measured, the README says
               f"not back within 20% of the baseline in {sf['settle_window_s']:.0f} s")] + floods(d.get("server_floods")) + (
        arena_default(d) if "arena_default" in d else [])


def floods(fl) -> list[str]:
    """bench.overload's repeated floods through the server: how many gave the memory back."""
    if fl is None:
        return []
    mib = [f"{x:.0f}" for x in fl["after_settle_mib"]]
    return [f"{fl['within_20pct']} of the {fl['runs']} floods were back within 20% ({', '.join(mib[:-1])} and {mib[-1]} MiB"]


def arena_default(d) -> list[str]:
    """bench.overload's floods with glibc's default malloc arenas, beside the launcher's one."""
    a, one = d["arena_default"], d["server_floods"]
    mib = [f"{x:.0f}" for x in a["after_settle_mib"]]
    return [f"{a['within_20pct']} of the {a['runs']} floods was back within 20% ({', '.join(mib[:-1])} and {mib[-1]} MiB)",
            f"(median {a['flood_s_median']:.1f} s, against {one['flood_s_median']:.1f} s with one arena"]


FIGURES = {
    "checkpoints.json": checkpoints, "sampling.json": sampling, "training.json": training, "long_runs.json": long_runs,
    "deployment.json": deployment, "serving.json": serving, "serving_no_window.json": serving_no_window,
    "serving_gated_pixelcnn.json": serving_gated_pixelcnn, "engine_batching.json": engine_batching,
    "load_16_streams.json": load_16_streams, "load.json": load_run, "perf_analyzer.json": perf_analyzer,
    "abandoned_streams.json": abandoned_streams, "cluster.json": cluster, "cell_graphs.json": cell_graphs,
    "overload.json": overload,
}


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_readme_quotes_the_json(name):
    flat = " ".join(README.split())  # the README wraps lines anywhere
    missing = [s for s in FIGURES[name](load(name)) if " ".join(s.split()) not in flat]
    assert not missing, f"README.md does not quote bench/results/{name} as {missing}"
    assert f"bench/results/{name}" in README or name == "long_runs.json" and "bench/results/long_runs.json" in flat
