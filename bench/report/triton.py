"""Sections on serving through tritonserver: what a repository costs, perf_analyzer, and the
serving bench (its window, no window, and the Gated PixelCNN)."""
from __future__ import annotations

from pathlib import Path

from bench.report.common import bullets, code, header, k, met, ms, para, pct, served_models, table


# -- deployment ------------------------------------------------------------------------------------

def deployment(d: dict) -> list[str]:
    r = d["results"]
    rows = [[f"before (`{d['before_revision']}`: models import the project, and torch)", "full `.venv`", r["before"]],
            ["today's `model_repository/`", "full `.venv` (torch unused)", r["full"]],
            ["today's, copied out of the project", "numpy + onnxruntime only", r["runtime"]]]
    return header("What a repository costs to serve", "deployment.json", d, "`python -m bench.deployment`") + [
        para(f"Start to ready and resident memory of tritonserver plus both backend stubs after one score and "
             f"one sample request; medians of {d['repeats']} interleaved starts (min and max in the file)."),
        table(["repository", "Python environment", "start to ready", "RSS"],
              [[a, b, f"{x['ready_s']['median']:.2f} s", f"{x['rss_mib']['median']:.1f} MiB"] for a, b, x in rows]),
    ]


def perf_analyzer(d: dict) -> list[str]:
    s, p = d["results"]["score"], d["results"]["sample"]
    st = p["streams"]
    rows = [["scorer", f"batch {s['batch']}, {s['concurrency']} requests in flight", f"{s['images_per_s']:.0f} images/s",
             f"p50 {s['latency_us']['p50'] / 1000:.0f} ms, p99 {s['latency_us']['p99'] / 1000:.0f} ms", "", s["errors"]],
            ["sampler", f"{p['concurrency']} concurrent streams",
             f"{p['images_per_s']:.1f} images/s = {p['rows_per_s']:.0f} rows/s",
             f"p50 {p['latency_us']['p50'] / 1000:.0f} ms, p99 {p['latency_us']['p99'] / 1000:.0f} ms",
             f"p50 {st['first_row_latency_us']['p50'] / 1000:.1f} ms, p99 {st['first_row_latency_us']['p99'] / 1000:.0f} ms",
             p["errors"]]]
    c = d["config"]
    # As the record ran: its input_data is per model where the scorer ran on --input-data zero, else one file per model folder.
    data = ("(the scorer with all-zero images, `--input-data zero`, valid at any number of levels; the sampler with "
            "the request data its model folder ships, `NAME_sample/perf_analyzer_input.json`)"
            if isinstance(c.get("input_data"), dict) else
            "with the request data each model folder ships (`NAME_*/perf_analyzer_input.json`)")
    return header("Triton's perf_analyzer", "perf_analyzer.json", d,
                  "`python -m bench.perf_analyzer --url HOST:PORT --model NAME --json bench/results/perf_analyzer.json`") + [
        para(f"Triton's own load generator (version {d['perf_analyzer']}, from the pinned `tritonclient` wheel) "
             f"measures both models {data}: "
             f"{c['windows']} windows of {c['window_ms'] / 1000:g} s per model; the streaming sampler runs as a "
             "decoupled sequence model over a gRPC stream, each sequence one START request that streams a whole "
             "image. The commands, as run:"),
        code(f"{s['command']}\n{p['command']}"),
        table(["model", "load", "throughput", "latency (whole request)", "first row", "errors"], rows),
    ]


# -- serving ---------------------------------------------------------------------------------------

def serving_table(d: dict) -> str:
    s, st, sc, pn, cpu, t = (d["sampling"], d["streams"], d["scoring"], d.get("pinned"),
                             d["cpu_seconds_per_1000_rows"], d["targets"])
    n = max(st, key=int)

    def scaling(r16, r1, x):
        return f"{k(r16['pixels_per_s'])} vs {k(r1['pixels_per_s'])} pixels/s, {x:.2f}x"

    def cpu_row(path):
        return f"server {cpu[path]['server']:.2f} s, client {cpu[path]['client']:.2f} s"

    engine_x = st[n]["engine_in_process"]["pixels_per_s"] / st["1"]["engine_in_process"]["pixels_per_s"]
    target = t["streams_scaling"]["target"]
    rows = [[f"sampling, one stream of {s.get('batch', d['config']['batch'])} images",
             f"{k(s['triton_per_row']['pixels_per_s'])} pixels/s ({s['ratio_triton_per_row_vs_in_process']:.2f})",
             f"{k(s['triton']['pixels_per_s'])} pixels/s ({s['ratio_triton_vs_in_process']:.2f})",
             f"{k(s['in_process']['pixels_per_s'])} pixels/s (engine {k(s['engine_in_process']['pixels_per_s'])})",
             f">= {t['sampling_vs_in_process']['target']:g} ({met(t['sampling_vs_in_process']['met'])})"]]
    if pn:
        ps = pn["sampling"]
        rows.append(["the same, pinned",
                     f"{k(ps['triton_per_row']['pixels_per_s'])} pixels/s ({ps['ratio_triton_per_row_vs_in_process']:.2f})",
                     f"{k(ps['triton']['pixels_per_s'])} pixels/s ({ps['ratio_triton_vs_in_process']:.2f})",
                     f"{k(ps['in_process']['pixels_per_s'])} pixels/s (engine {k(ps['engine_in_process']['pixels_per_s'])})",
                     f">= {t['pinned_sampling_vs_in_process']['target']:g} ({met(t['pinned_sampling_vs_in_process']['met'])})"])
    rows.append([f"{n} concurrent single-image streams vs 1",
                 scaling(st[n]["per_row"], st["1"]["per_row"], st[n]["per_row"]["vs_one_stream"]),
                 scaling(st[n], st["1"], st[n]["vs_one_stream"]),
                 "engine alone " + scaling(st[n]["engine_in_process"], st["1"]["engine_in_process"], engine_x),
                 f">= {target:g}x ({met(t['streams_scaling']['met'])})"])
    if pn:
        p1, pm = pn["streams"]["1"], pn["streams"][n]
        rows.append(["the same, pinned", scaling(pm["streams_per_row"], p1["streams_per_row"], pm["streams_per_row"]["vs_one_stream"]),
                     scaling(pm["streams"], p1["streams"], pm["streams"]["vs_one_stream"]),
                     "engine alone " + scaling(pm["engine"], p1["engine"], pm["engine"]["vs_one_stream"]),
                     f">= {target:g}x ({met(pm['streams']['vs_one_stream'] >= target)})"])
    rows += [[f"CPU seconds per 1000 rows, {n} streams", cpu_row(f"streams_per_row/{n}"), cpu_row(f"streams/{n}"),
              f"engine {cpu[f'engine/{n}']['client']:.2f} s", ""],
             ["CPU seconds per 1000 rows, one stream of 16 images", cpu_row("sample/triton_per_row"),
              cpu_row("sample/triton"), f"engine {cpu['sample/engine_in_process']['client']:.2f} s", ""],
             [f"scoring {sc['images']} images (chunks of {sc['chunk']})", "",
              f"{sc['triton']['images_per_s']:.0f} images/s ({sc['ratio_triton_vs_in_process']:.2f})",
              f"{sc['in_process']['images_per_s']:.0f} images/s",
              f">= {t['scoring_vs_in_process']['target']:g} ({met(t['scoring_vs_in_process']['met'])})"],
             [f"scoring, {sc['clients']} clients x {sc['request_images']}-image requests", "",
              f"{sc['triton_concurrent']['images_per_s']:.0f} images/s ({sc['ratio_triton_concurrent_vs_in_process']:.2f})",
              f"{sc['in_process']['images_per_s']:.0f} images/s",
              f">= {t['scoring_concurrent_vs_in_process']['target']:g} ({met(t['scoring_concurrent_vs_in_process']['met'])})"],
             [f"rows per response, {n} streams / one stream of 16 images", "1 / 1",
              f"{st[n]['rows_per_response']:.2f} / {s['triton_stream']['rows_per_response']:.2f}", "", ""],
             [f"images per cell call, {n} streams", "", f"{st[n]['call_batch']['mean']:.1f}", "", ""]]
    return table(["measure", "`ROWS_PER_RESPONSE` 1", "no row limit (default)", "in process", "target"], rows)


def serving_intro(d: dict) -> str:
    c, sv = d["config"], d["server"]
    pinned = d.get("pinned")
    text = (f"Serves `{c['checkpoint']}` on a real tritonserver ({sv['tritonserver']}, {sv['transport']}) and "
            f"compares it with the same ONNX cells in process, in one run: medians of {c['repeats']} interleaved "
            "repeats, ratios of medians (in brackets: Triton over in process); onnxruntime "
            f"{sv['onnx_threads']} thread, {sv['sender_threads']} sender threads, a {sv['coalesce_ms']:g} ms row "
            "coalescing window. The first column is the server sending every row in its own response "
            "(`ROWS_PER_RESPONSE` 1), the next the default (no limit: rows that wait go out together); both in "
            "the same run. ")
    if pinned:
        text += (f"Shared: server, clients and in-process paths on the same cores; pinned: the server (tritonserver "
                 f"and its backend stubs, every thread) on CPU {pinned['server_cpu']}, the clients on CPU "
                 f"{pinned['client_cpu']}, the in-process paths on one core (`os.sched_setaffinity` per thread, "
                 "what `taskset -a` does). ")
    text += ("CPU seconds per 1000 rows are read from /proc (tritonserver and its stubs; the client process) over "
             "the timed runs, per streamed row of one sequence. Images through Triton equal the in-process ones "
             f"in every path: {'yes' if d['identical']['all'] else 'NO'}. Single figures move between runs on a "
             "shared machine; the ratios, measured within one run, are what to compare.")
    return para(text)


def serving(d: dict) -> list[str]:
    s, st, t, cpu = d["sampling"], d["streams"], d["targets"], d["cpu_seconds_per_1000_rows"]
    sc = t["streams_scaling"]
    n = str(sc["streams"])
    rows = int(n) * d["model"]["shape"][1]  # rows of one n-stream run: n images of H rows
    cpu_n = cpu[f"streams/{n}"]["server"] + cpu[f"streams/{n}"]["client"]
    cpu_run = cpu_n * rows / 1000
    busy = cpu_run / st[n]["seconds"]
    at_target = st[n]["seconds"] * st[n]["vs_one_stream"] / sc["target"]
    cell_per_1000 = 1000 * st[n]["cell_seconds"] / rows
    per_row_gain = st[n]["pixels_per_s"] / st[n]["per_row"]["pixels_per_s"] - 1
    sv = d["server"]
    return header("Serving speed", "serving.json", d, "`python -m bench.serving --json bench/results/serving.json`") + [
        serving_intro(d), serving_table(d),
        para(f"Coalescing. A response may carry several consecutive rows of a sequence (runtime/protocol.py). "
             "Without a window the senders keep up with the cell calls, so rows seldom wait and responses stay at "
             "about one row (Serving without the coalescing window, below): the cost per row is CPU, not a "
             f"lagging sender. The window lets a sequence's rows gather for up to {sv['coalesce_ms']:g} ms after "
             "its previous response (never its first row, never more than half the engine's rows-ahead bound, so "
             f"the cell calls never wait for a sender): {st[n]['rows_per_response']:.2f} rows per response with "
             f"{n} streams, {s['triton_stream']['rows_per_response']:.2f} with one stream of 16 images, while "
             f"cross-sequence batching goes on ({st[n]['call_batch']['mean']:.1f} images per cell call with {n} "
             "streams). Fewer responses cut the server's response work (backend IPC, Triton's gRPC) and the "
             f"client's (its gRPC thread, and parsing) per row: {per_row_gain:+.0%} pixels/s for {n} streams, and "
             f"the client spends {cpu[f'streams/{n}']['client'] / cpu[f'streams/{n}']['server']:.2f} of the "
             "server's CPU per row. `pixelrnn repository --coalesce-ms MS` sets the window (0: off); a client "
             "that wants every row as soon as it is made asks for `ROWS_PER_RESPONSE` 1. Triton against the "
             f"engine in process: {s['ratio_triton_vs_engine']:.2f} for one stream of 16 images, "
             f"{st[n]['pixels_per_s'] / st[n]['engine_in_process']['pixels_per_s']:.2f} for {n} streams."),
        para(f"Scaling with streams. Target: {n} streams >= {sc['target']:g}x one stream, "
             f"{met(sc['met'])} ({sc['value']:.2f}x). Three bounds, each measured in the same run "
             "(`targets.streams_scaling`), say why:"),
        bullets([
            f"`ceiling` {sc['ceiling']:.2f}: one {n}-image sequence through Triton over one single-image stream. "
            f"{n} single-image streams make at best that sequence's cell calls, so the cell's own batching "
            "(Cell and engine batching, below) is not what stops them.",
            f"`engine_bound` {sc['engine_bound']:.2f}: the same {n} single-image sequences through the row engine "
            "in process, with no server at all, over one stream through Triton. The sampler runs that engine "
            "and its response sends besides, so no serving of it reaches more.",
            f"`cell_bound` {sc['cell_bound']:.2f}: the sampler's own time in its cell calls during a {n}-stream "
            "run (its `pixelrnn_sampler_cell_seconds_total` metric, read around every run): "
            f"{ms(st[n]['cell_seconds'])} of the {ms(st[n]['seconds'])} run ({pct(st[n]['cell_share'])}), against "
            f"{ms(st['1']['cell_seconds'])} of a one-stream run's {ms(st['1']['seconds'])}. Even a server whose "
            f"response path cost nothing would stay below {sc['cell_bound']:.1f}x here, because the same calls "
            "take longer inside the loaded server than in a quiet process (Cell and engine batching).",
        ]),
        para(f"The cores are not saturated, yet they could not carry {sc['target']:g}x: over a {n}-stream run "
             f"server and client keep {busy:.2f} of the {d['machine']['cpu_count']} cores busy ({cpu_n:.2f} s per "
             f"1000 rows, {rows} rows in {ms(st[n]['seconds'])}); at {sc['target']:g}x the same run would have to "
             f"end in {ms(at_target)}, which at the same CPU per row needs {cpu_run / at_target:.2f} cores. The "
             f"sampler's cell calls are {cell_per_1000:.2f} s of the {cpu_n:.2f} s per 1000 rows, so "
             f"{cpu_n - cell_per_1000:.2f} s (the response path: sender threads, tritonserver's gRPC, and the "
             "clients) runs beside them on the same cores. What holds the run at its length is one serial path, "
             "the sampler's engine thread: it makes every cell call in turn, in the one stub process whose Python "
             "interpreter also builds and sends every response."),
        para("Ad-hoc probes (per-thread figures from /proc/PID/task, training paused; not kept in a results "
             "file) agree: under 16 streams the engine thread is preempted many times per cell call (hardly at "
             "all with one 16-image stream); run as `SCHED_FIFO` it waits on the GIL and locks instead and the "
             "runs are no shorter; a busy neighbour core slows the cell only a little; a second sampler instance "
             "splits the batches and gains nothing. A batch-16 cell call costs more CPU inside the loaded stub "
             "than in a quiet process, also with no sender threads at all, so it is not the senders' share of "
             "the GIL. With the engine thread alone on one core and everything else, clients included, on the "
             "other, its calls got faster and 16 streams scaled better, but a server cannot keep its clients off "
             "a core, and pinning only the server's own threads away from the engine gave nothing. Also tried, "
             "with no gain beyond noise: more malloc arenas, a shorter GIL switch interval, the above-row "
             "convolutions of all images as one long row, 2 onnxruntime threads (slower at every batch), "
             "coalescing windows of 50 or 100 ms, and 1, 4 or 8 sender threads; trimming the allocator only "
             "after `poll` s idle instead of at once gained a few percent (memory goes back later; not adopted). "
             f"What would reach {sc['target']:g}x: a response path that costs a fraction of the cell calls (a C++ "
             "backend with the engine in it; the Python backend is the only one this Triton build has), clients "
             "on other machines, or more cores."),
    ]


def serving_no_window(d: dict) -> list[str]:
    st, s = d["streams"], d["sampling"]
    n = str(d["targets"]["streams_scaling"]["streams"])
    return header("Serving without the coalescing window", "serving_no_window.json", d,
                  "`python -m bench.serving --coalesce-ms 0 --json bench/results/serving_no_window.json`") + [
        para(f"The same bench with the window off (server `coalesce_ms` {d['server']['coalesce_ms']:g}): the "
             "senders keep up with the cell calls, so rows seldom wait and responses stay at about one row: "
             f"{st[n]['rows_per_response']:.2f} rows per response with {n} streams and "
             f"{s['triton_stream']['rows_per_response']:.2f} with one stream of 16 images."),
        serving_intro(d), serving_table(d),
    ]


def serving_gated_pixelcnn(d: dict) -> list[str]:
    sc = d["targets"]["streams_scaling"]
    n = str(sc["streams"])
    name = Path(d["config"]["checkpoint"]).stem
    served = (f" `{name}` is what the committed `model_repository/` serves."
              if name in served_models() else "")
    return header("Serving the Gated PixelCNN", "serving_gated_pixelcnn.json", d,
                  "`python -m bench.serving --checkpoint checkpoints/gated_pixelcnn_binarized_mnist.pt "
                  "--json bench/results/serving_gated_pixelcnn.json`") + [
        para(f"The serving bench on the Gated PixelCNN, a model with more arithmetic per row than the PixelCNN "
             f"above.{served} {n} streams made {d['streams'][n]['vs_one_stream']:.2f}x one stream, against a "
             f"ceiling of {sc['ceiling']:.2f} ({pct(sc['of_ceiling'])} of it)."),
        serving_intro(d), serving_table(d),
    ]
