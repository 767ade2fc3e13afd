"""Sections on serving under load: coalescing under load, the load bench, replicas behind nginx."""
from __future__ import annotations

from bench.report.common import bullets, header, k, machine_text, met, para, table


def load_16_streams(d: dict) -> list[str]:
    before, c = d["per_row"], d["config"]

    def col(x):
        lat, t = x["latency_ms"], x["totals"]
        return [f"{x['throughput']['rows_per_s']:,.0f}", f"{x['throughput']['images_scored_per_s']:.0f}",
                f"{lat['first_row']['p50']:.1f} / {lat['first_row']['p99']:.0f} ms",
                f"{lat['response']['p50']:.1f} / {lat['response']['p99']:.0f} ms",
                f"{x['responses']['rows_per_response_mean']:.2f}", f"{x['streams']['call_batch_mean']:.1f}",
                str(t["errors"]), f"{x['content']['images_checked']:,} / {x['content']['images_wrong']}"]

    labels = ["rows/s", "images scored/s", "first row p50 / p99", "between responses p50 / p99",
              "rows per response", "images per cell call", "errors", "images checked / wrong"]
    rows = [[label, a, b] for label, a, b in zip(labels, col(before), col(d))]
    sooner = d["latency_ms"]["first_row"]["p50"] <= before["latency_ms"]["first_row"]["p50"]
    return header("Coalescing under load", "load_16_streams.json", d,
                  "`python -m bench.load --streams 16 --seconds 30 --compare-per-row --json "
                  "bench/results/load_16_streams.json`") + [
        para(f"The same {c['seconds']:g} s load twice on one server, first with one response per row, then "
             f"coalesced: {c['streams']} sampling streams of single images and {c['score_clients']} scoring "
             f"clients (batch {c['score_batch']}). Every streamed image is checked against the in-process sampler. "
             f"Target: the first row no later under load with coalescing than without: {met(sooner)}."),
        table(["measure", "one row per response", "coalesced"], rows),
    ]


def load_run(d: dict) -> list[str]:
    t, th, lat, m, c, cfg = d["totals"], d["throughput"], d["latency_ms"], d["sampler_metrics"], d["content"], d["config"]
    return header("Load", "load.json", d, "`python -m bench.load --json bench/results/load.json`") + [
        para(f"{cfg['streams']} concurrent sampling streams (one image each, back to back) for {cfg['seconds']:g} s "
             f"plus {cfg['score_clients']} scoring clients (batch {cfg['score_batch']}); a bounded run is in "
             "tests/test_bench_load.py. After the run every streamed image is compared with the in-process "
             "sampler's for its seed and every score with the in-process scorer's NLL."),
        bullets([f"{t['errors']} errors; {t['images_sampled']:,} images sampled ({th['rows_per_s']:,.0f} rows/s, "
                 f"{d['streams']['call_batch_mean']:.1f} images per cell call), {t['images_scored']:,} images "
                 f"scored ({th['images_scored_per_s']:.0f}/s)",
                 f"per-row latency p50 {lat['row']['p50']:.1f} ms, p99 {lat['row']['p99']:.0f} ms; rows come "
                 f"{d['responses']['rows_per_response_mean']:.2f} to a response: between responses p50 "
                 f"{lat['response']['p50']:.1f} ms, p99 {lat['response']['p99']:.0f} ms",
                 f"first row p50 {lat['first_row']['p50']:.0f} ms, p99 {lat['first_row']['p99']:.0f} ms",
                 f"{m['events_total']['completed']:,} of {m['expected_completed']:,} sequences completed, "
                 f"{m['live_sequences']} left live",
                 f"{c['images_checked']:,} images and {c['scores_checked']:,} scores checked after the run, "
                 f"{c['images_wrong'] + c['scores_wrong']} wrong"]),
    ]


def cluster(d: dict) -> list[str]:
    r, st = d["results"], d["settings"]
    labels = {"direct": "1, no proxy (direct)"}
    rows = [[labels.get(n, n), f"{k(x['pixels_per_s'])} pixels/s ({x['sampling_vs_one_replica']:.2f}x; "
             f"{k(x['pixels_per_s_min'])}-{k(x['pixels_per_s_max'])})",
             f"{x['scored_images_per_s']:.0f} images/s ({x['scoring_vs_one_replica']:.2f}x; "
             f"{x['scored_images_per_s_min']:.0f}-{x['scored_images_per_s_max']:.0f})"] for n, x in r.items()]
    s = d["sustained"]
    ss, t, c, lat = s["settings"], s["throughput"], s["content"], s["latency_ms"]["first_row"]
    completed = sum(m["events_total"]["completed"] for m in s["sampler_metrics"])
    live = sum(m["live"] for m in s["sampler_metrics"])
    return header("Replicas behind nginx", "cluster.json", d,
                  "`python -m bench.cluster --json bench/results/cluster.json` (and `--sustained`)") + [
        para(f"Throughput: {st['streams']} sampling streams and {st['score_clients']} scoring clients (batch "
             f"{st['score_batch']}) against 1, 2 and 3 replicas behind {d['proxy']}, and against one replica with "
             f"no proxy; {st['seconds']:g} s windows, {st['repeats']} interleaved repeats, medians (windows min-max); "
             f"the clients in the same process on the same cores. {d['errors']} errors."),
        table(["replicas behind nginx", "sampling (vs 1 replica; windows min-max)",
               "scoring (vs 1 replica; windows min-max)"], rows),
        para("More replicas on the same cores add processes, not CPU: sampling stays about flat, and scoring "
             "suffers (its small requests are batched less when spread over more replicas, and more scorer "
             "processes share the cores); compare the proxy's row with the direct one for what nginx costs. The "
             "figures show that the proxy and the replicas work under load, not a speed-up: that needs replicas "
             "on their own machines."),
        para(f"Sustained (the `sustained` section, its own date and load below): {ss['replicas']} replicas behind "
             f"nginx, {ss['streams']} concurrent sampling streams and {ss['score_clients']} scoring clients for "
             f"{ss['seconds']:g} s. " + machine_text(s.get("machine"))),
        bullets([f"{s['totals']['images_sampled']:,} images sampled ({k(t['pixels_per_s'])} pixels/s) and "
                 f"{s['totals']['images_scored']:,} images scored ({t['images_scored_per_s']:.0f}/s), {s['errors']} errors",
                 f"content: {c['images_checked']:,} images and {c['scores_checked']:,} scores checked against the "
                 f"in-process sampler and scorer, {c['images_wrong'] + c['scores_wrong']} wrong",
                 "score calls per replica " + " / ".join(f"{x:,}" for x in s["score_calls_per_replica"])
                 + "; sequences per replica " + " / ".join(f"{x:,}" for x in s["sequences_per_replica"])
                 + " (each replica's metrics, warm-up included)",
                 f"{completed:,} of {s['expected_completed']:,} sequences completed, {live} left live",
                 f"first row p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms"]),
        para(f"With {ss['streams']} streams the sampler's cell calls batch more images than with {st['streams']}, "
             "hence more pixels/s than in the table above: a different load, not a like-for-like ratio."),
    ]
