"""Serving benchmark: the real Triton server against the same exported ONNX graphs in process.

    python -m bench.serving --json bench/results/serving.json [--checkpoint PATH] [--repeats N]
                            [--streams 1,4,16] [--coalesce-ms MS] [--no-pinned] [--quick]

The checkpoint is exported once (export/build_engine.py, parity-checked) into a temporary Triton
repository (server/repository.py; its settings are recorded), served by a real tritonserver on
free loopback ports (server/launcher.py), and the same exported files are loaded in this process
with the same onnxruntime thread count. Measured in one run, on one machine:

  sampling  one stream, one sequence of --batch images (client.PixelClient.sample_images, which
            opens a gRPC channel per call; also through a bare stream kept open), vs the same
            cells row by row in process (OnnxRunner.run_row, i.e. OnnxCell.run_row), and vs the
            server's row engine (server/engine.py) in process, driven on this thread: Triton,
            gRPC and the backend's IPC are the difference between Triton and the engine.
  streams   N concurrent client threads, each with its own gRPC stream and one single-image
            sequence (BATCH_SIZE 1), started together: the aggregate pixel rate, and the
            CALL_BATCH of the rows, the images per cell call (the engine's cross-sequence
            batching). PixelClient does not expose CALL_BATCH, so these streams are bare
            gRPC streams (client/stream.py's SampleStream). For each count, the sampler's own wall
            time in its cell calls during the runs (its pixelrnn_sampler_cell_seconds_total metric,
            read around every timed run): the 16-stream target's `cell_bound` is the ratio the
            runs would reach if they took no longer than those calls.
  scoring   PixelClient.score over --score-images images (chunks of the model's max batch), and
            the same images as many small concurrent requests (--score-clients threads, each
            with its own PixelClient, --score-request images per request) that Triton's dynamic
            batcher gathers (images per execution read from Triton's metrics), vs
            OnnxScorer.score in process in max-batch chunks.

Before and after row coalescing, in the same run: every Triton sampling path also runs with
ROWS_PER_RESPONSE 1 (one response per row, as the server sent before coalescing: "per_row"),
and the streams report how many rows a response carried. Pinned (unless --no-pinned): the
single-stream paths and the 1- and most-stream paths again with the server (tritonserver and
its stub processes, every thread; bench/cpu.py) on one CPU and this process (the clients, and
the in-process paths) on another, the fair comparison of a server whose clients run
elsewhere. For every sampling path, CPU seconds per 1000 streamed rows (a row of one sequence)
of the server (/proc of tritonserver and its children) and of this process.

Every path draws from the same seeds, so the images are compared (`identical`; exit status 1
when they differ) and the scores must agree to float32 rounding. Each path runs once untimed
first (warm-up: sessions, connections, first-call allocations), then --repeats timed rounds with
the paths interleaved, so load from other processes hits them alike; every path reports its
median (`seconds`, which every rate and ratio uses) with min, max and all runs.
The targets (Triton sampling >= 0.9x in process, pinned >= 0.95x, 16 streams >= 6x one
stream, Triton scoring >= 0.9x in process) are recorded in "targets", not enforced; the 16-stream
one with its ceiling from the same run (batching_ceiling).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from bench.common import machine_info, reexec_with_malloc_env, spread, timed, write_json
from bench.cpu import cpu_seconds, pin, process_tree
from pixelrnn.client.library import ROW_OUTPUTS, PixelClient, Row, assemble, correlation_id
from pixelrnn.client.stream import SampleStream, sample_inputs
from pixelrnn.runtime.onnx_graphs import OnnxScorer
from pixelrnn.runtime import protocol as p
from pixelrnn.runtime import rowloop
from pixelrnn.server.engine import Engine
from pixelrnn.runtime.rowloop import SampleSpec
from pixelrnn.server.launcher import TritonServer
from pixelrnn.server.repository import COALESCE_MS, write_repository
from pixelrnn.runtime.manifest import read_manifest
from pixelrnn.runtime.runner import OnnxRunner

DEFAULT_CHECKPOINT = "checkpoints/pixelcnn_binarized_mnist.pt"
TARGETS = {"sampling_vs_in_process": 0.9, "pinned_sampling_vs_in_process": 0.95, "streams_16_vs_1": 6.0,
           "scoring_vs_in_process": 0.9}
SCORE_RTOL, SCORE_ATOL = 1e-5, 1e-3  # nats: the batch a score is computed in changes float32 rounding
# The sampler pushes its metrics every 0.5 s (server/triton_models/sample_model.py METRICS_PERIOD_S).
METRICS_PUSH_S = 0.6
QUICK = dict(batch=2, streams=[1, 2], score_images=8, score_clients=2, score_request=1, repeats=1)


# ---------------------------------------------------------------------------- in process

def sample_in_process(runner: OnnxRunner, n: int, seed: int, labels: np.ndarray | None) -> np.ndarray:
    """The exported cells through the row loop in process, one job alone. -> uint8 (n, C, H, W)."""
    return rowloop.sample(runner, SampleSpec(batch=n, seed=seed, labels=labels))


class _Collect:
    """An engine sink that keeps the rows (the engine's Sink protocol)."""

    def __init__(self):
        self.rows, self.errors = [], []

    def send_rows(self, events):
        self.rows += [Row(e.index, e.stage, e.row, e.logprob) for e in events]

    def done(self):
        pass

    def error(self, message):
        self.errors.append(message)

    def cancelled(self):
        return False


def sample_engine(runner: OnnxRunner, max_batch: int, specs: list[SampleSpec], shape) -> list[np.ndarray]:
    """Sequences through server/engine.py in process, stepped on this thread (all of them in
    every cell call, as in the server). -> each sequence's images."""
    engine, sinks = Engine(runner, max_batch=max_batch), [_Collect() for _ in specs]
    for key, (spec, sink) in enumerate(zip(specs, sinks)):
        engine.start(key, spec, sink)
    while engine.step():
        pass
    errors = [e for sink in sinks for e in sink.errors]
    if errors:
        raise RuntimeError(f"engine: {errors[0]}")
    return [assemble(sink.rows, shape) for sink in sinks]


def score_in_process(scorer: OnnxScorer, images: np.ndarray, labels, max_batch: int) -> np.ndarray:
    """NLL nats (N,), in chunks of max_batch as PixelClient.score sends them."""
    out = []
    for a in range(0, len(images), max_batch):
        nll, _ = scorer.score(images[a:a + max_batch], None if labels is None else labels[a:a + max_batch])
        out.append(nll)
    return np.concatenate(out)


# ---------------------------------------------------------------------------- through Triton

def row_stream(url: str) -> SampleStream:
    """A bare stream to the server that also reads what PixelClient leaves out: the CALL_BATCH
    and ACTIVE of every row."""
    return SampleStream(url, outputs=(*ROW_OUTPUTS, p.CALL_BATCH, p.ACTIVE), timeout=120.0)


def stream_sample(stream: SampleStream, model: str, n: int, seed: int, labels: np.ndarray | None,
                  shape: tuple[int, int, int], per_response: int | None = None) -> tuple[np.ndarray, list[int], list[int]]:
    """One sequence of n images on the stream (`per_response`: ROWS_PER_RESPONSE) -> (images
    uint8 (n, C, H, W), CALL_BATCH per row, ACTIVE per row, responses)."""
    stream.send(p.sample_model(model), correlation_id(), sample_inputs(batch=n, seed=seed, labels=labels, rows_per_response=per_response),
                start=True, end=True)
    rows, errors = stream.collect()
    if errors:
        raise RuntimeError(f"{p.sample_model(model)}: {errors[0]}")
    responses = sum(1 / r.response_rows for r in rows)  # each response's rows count 1/R each
    return assemble(rows, shape), [r.batched for r in rows], [r.active for r in rows], responses


def together(jobs: list) -> tuple[float, list]:
    """Run the callables on their own threads, released at once; -> (wall seconds from the
    release to the last one's end, their results in order). A failure is raised here."""
    gate = threading.Barrier(len(jobs) + 1)
    results, errors = [None] * len(jobs), []

    def work(k, job):
        gate.wait()
        try:
            results[k] = job()
        except Exception as e:  # noqa: BLE001 - re-raised on the calling thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k, job), daemon=True) for k, job in enumerate(jobs)]
    for t in threads:
        t.start()
    gate.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    return seconds, results


def model_metrics(server: TritonServer, model: str, names: tuple[str, ...]) -> dict[str, float]:
    """The values of these metrics labelled with this model, from the server's metrics endpoint
    (NaN for one it does not show)."""
    with urllib.request.urlopen(server.metrics_url, timeout=5) as r:
        text = r.read().decode()
    found = {}
    for name in names:
        m = re.search(rf'^{name}{{[^}}]*model="{re.escape(model)}"[^}}]*}}\s+(\S+)$', text, re.M)
        found[name] = float(m.group(1)) if m else float("nan")
    return found


def triton_metrics(server: TritonServer, model: str) -> dict[str, float]:
    """Triton's counters of one model: nv_inference_count (images), nv_inference_exec_count
    (batched executions), nv_inference_request_success (requests)."""
    return model_metrics(server, model, ("nv_inference_count", "nv_inference_exec_count", "nv_inference_request_success"))


def sampler_cell_seconds(server: TritonServer, model: str) -> float:
    """The sampler's pixelrnn_sampler_cell_seconds_total (its wall time in batched cell calls) as
    of its last metrics push; waits one push period first, so that what the last path did is in."""
    time.sleep(METRICS_PUSH_S)
    name = "pixelrnn_sampler_cell_seconds_total"
    return model_metrics(server, p.sample_model(model), (name,))[name]


def triton_version(server: TritonServer) -> str | None:
    try:
        with urllib.request.urlopen(server.http_url + "/v2", timeout=5) as r:
            return json.loads(r.read()).get("version")
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------- the benchmark

def export(checkpoint: str, workdir: Path, args) -> tuple[dict, Path, Path, float]:
    """-> (manifest, export folder, repository, export seconds). build_engine's progress goes to stderr."""
    from pixelrnn.export import build_engine

    out, repository = workdir / "export", workdir / "repository"
    with contextlib.redirect_stdout(sys.stderr):
        seconds, code = timed(lambda: build_engine.main(["--checkpoint", checkpoint, "--out", str(out), "--tensorrt", "off"]))
    if code:
        raise SystemExit(f"error: export of {checkpoint} failed (exit code {code})")
    manifest = read_manifest(out)
    write_repository(manifest, out, repository, onnx_threads=args.onnx_threads, score_instances=args.score_instances,
                     max_queue_delay_us=args.max_queue_delay_us, sender_threads=args.sender_threads, coalesce_ms=args.coalesce_ms)
    return manifest, out, repository, seconds


def labels_for(manifest: dict, n: int, first: int = 0) -> np.ndarray | None:
    k = manifest["num_classes"]
    return (np.arange(first, first + n) % k).astype(np.int64) if k else None


def run_benchmark(args, manifest: dict, folder: Path, server: TritonServer) -> dict:
    name, shape, max_batch = manifest["name"], tuple(manifest["shape"]), int(manifest["max_batch"])
    c, h, w = shape
    n, seed = args.batch, args.seed
    labels = labels_for(manifest, n)
    runner = OnnxRunner.from_manifest(manifest, folder, threads=args.onnx_threads)
    scorer = OnnxScorer(folder / manifest["artifacts"]["scorer"]["file"], args.onnx_threads)
    client = PixelClient(server.grpc_url, model=name)
    most = max(args.streams)
    streams = [row_stream(server.grpc_url) for _ in range(most)]
    score_clients = [PixelClient(server.grpc_url, model=name) for _ in range(args.score_clients)]
    rng = np.random.default_rng(seed)
    # Random levels: the content does not change the cost of a scoring pass.
    score_images = rng.integers(0, manifest["levels"], (args.score_images, c, h, w)).astype(np.uint8)
    score_labels = labels_for(manifest, args.score_images)
    requests = [(a, min(a + args.score_request, args.score_images)) for a in range(0, args.score_images, args.score_request)]

    # "per_row": ROWS_PER_RESPONSE 1, one response per row as before row coalescing ("before");
    # the plain paths let the server coalesce ("after"). Both run in this one run, interleaved.
    def triton_sample(per_response=None):
        return lambda: client.sample_images(n, seed=seed, label=labels, rows_per_response=per_response)

    def triton_stream_sample():
        return stream_sample(streams[0], name, n, seed, labels, shape)

    def process_sample():
        return sample_in_process(runner, n, seed, labels)

    def engine_sample():
        return sample_engine(runner, max_batch, [SampleSpec(batch=n, seed=seed, labels=labels)], shape)[0]

    def concurrent(k, per_response=None):
        """k streams, stream i: one image, seed + i."""
        return lambda: together([lambda i=i: stream_sample(streams[i], name, 1, seed + i, labels_for(manifest, 1, i), shape, per_response)
                                 for i in range(k)])

    def engine_sequences(k):
        """The same k single-image sequences through the engine in process: the streams' ceiling."""
        return lambda: sample_engine(runner, max_batch, [SampleSpec(batch=1, seed=seed + i, labels=labels_for(manifest, 1, i))
                                                         for i in range(k)], shape)

    def triton_score():
        return client.score(score_images, score_labels).nll_nats

    def process_score():
        return score_in_process(scorer, score_images, score_labels, max_batch)

    def triton_score_concurrent():
        """Requests dealt round-robin to the clients; each client sends its own one by one."""
        nll = np.zeros(args.score_images, np.float32)

        def job(k):
            for a, b in requests[k::len(score_clients)]:
                nll[a:b] = score_clients[k].score(score_images[a:b],
                                                  None if score_labels is None else score_labels[a:b]).nll_nats

        together([lambda k=k: job(k) for k in range(len(score_clients))])
        return nll

    sample_paths = {"triton": triton_sample(), "triton_per_row": triton_sample(1), "triton_stream": triton_stream_sample,
                    "in_process": process_sample, "engine_in_process": engine_sample}
    score_paths = {"triton": triton_score, "triton_concurrent": triton_score_concurrent, "in_process": process_score}
    order = [(f"sample/{k}", fn) for k, fn in sample_paths.items()]
    for k in args.streams:
        order += [(f"streams/{k}", concurrent(k)), (f"streams_per_row/{k}", concurrent(k, 1)), (f"engine/{k}", engine_sequences(k))]
    order += [(f"score/{k}", fn) for k, fn in score_paths.items()]
    # Pinned: the server (tritonserver and its stubs) on one CPU, this process (the clients, and
    # the in-process paths) on another, as with clients on other machines; set before each of
    # these paths, undone after it.
    cpus = sorted(os.sched_getaffinity(0))
    pinned = args.pinned and len(cpus) >= 2
    server_tree = process_tree(server.process.pid)
    if pinned:
        order += [("pinned/sample/triton", sample_paths["triton"]), ("pinned/sample/triton_per_row", sample_paths["triton_per_row"]),
                  ("pinned/sample/in_process", process_sample), ("pinned/sample/engine_in_process", engine_sample)]
        for k in sorted({min(args.streams), most}):
            order += [(f"pinned/streams/{k}", concurrent(k)), (f"pinned/streams_per_row/{k}", concurrent(k, 1)),
                      (f"pinned/engine/{k}", engine_sequences(k))]
    rows = sum(st.height for st in runner.stages)  # rows per sequence (one response each when per row)
    sequence_rows = {}  # path -> sequence rows streamed per run: what CPU seconds are counted per
    for path, _ in order:
        kind = path.removeprefix("pinned/")
        if kind.startswith(("sample/", "streams/", "streams_per_row/", "engine/")):
            sequence_rows[path] = rows * (1 if kind.startswith("sample/") else int(kind.split("/")[1]))
    runs = {path: [] for path, _ in order}
    outputs = {}  # path -> every run's result, warm-up included (for the comparisons)
    call_batches = {k: [] for k in args.streams}
    active = {k: [] for k in args.streams}
    score_metrics = {}  # Triton's counters of NAME_score, summed over the timed concurrent runs
    cpu = {path: {"server": 0.0, "client": 0.0} for path in sequence_rows}  # CPU seconds over the timed runs
    affinities = set()  # the server processes' CPU sets seen during the pinned paths
    responses = {}  # streams paths: responses received over the timed runs (rows per response: coalescing)
    cell_seconds = {k: [] for k in args.streams}  # streams/k: the sampler's seconds in cell calls, per timed run

    def once(path: str, fn, timed_run: bool):
        if path == "score/triton_concurrent":
            before = triton_metrics(server, p.score_model(name))
        if timed_run and path.startswith("streams/"):
            cells_before = sampler_cell_seconds(server, name)
        if path.startswith("pinned/"):
            pin(server_tree, {cpus[0]})
            pin([os.getpid()], {cpus[1]})
            affinities.update(tuple(sorted(os.sched_getaffinity(pid))) for pid in server_tree)  # what took effect
        server_cpu, client_cpu = cpu_seconds(server_tree), cpu_seconds([os.getpid()])
        try:
            seconds, result = timed(fn)
        finally:
            server_cpu, client_cpu = cpu_seconds(server_tree) - server_cpu, cpu_seconds([os.getpid()]) - client_cpu
            if path.startswith("pinned/"):
                pin(server_tree, set(cpus))
                pin([os.getpid()], set(cpus))
        if timed_run and path in cpu:
            cpu[path]["server"] += server_cpu
            cpu[path]["client"] += client_cpu
        kind = path.removeprefix("pinned/")
        if kind.startswith(("streams/", "streams_per_row/")):
            seconds, result = result  # together()'s own clock starts at the release
            if timed_run and path.startswith("streams/"):
                k = int(path.split("/")[1])
                call_batches[k] += [b for _, bs, _, _ in result for b in bs]
                active[k] += [a for _, _, acts, _ in result for a in acts]
                cell_seconds[k].append(sampler_cell_seconds(server, name) - cells_before)
            if timed_run:
                responses[path] = responses.get(path, 0.0) + sum(r for _, _, _, r in result)
            result = [image for image, _, _, _ in result]
        if path == "score/triton_concurrent" and timed_run:
            after = triton_metrics(server, p.score_model(name))
            for key in after:
                score_metrics[key] = score_metrics.get(key, 0.0) + after[key] - before[key]
        outputs.setdefault(path, []).append(result)
        if timed_run:
            runs[path].append(seconds)

    try:
        print("warm-up ...", file=sys.stderr, flush=True)
        for path, fn in order:
            once(path, fn, timed_run=False)
        for r in range(args.repeats):
            print(f"round {r + 1}/{args.repeats} ...", file=sys.stderr, flush=True)
            for path, fn in order:
                once(path, fn, timed_run=True)
    finally:
        for stream in streams:
            stream.close(cancel=True)  # bounded: a stream that does not close is left behind
        for closable in [client, *score_clients]:
            closable.close()

    # -- comparisons: every run of every path against the in-process one
    want = outputs["sample/in_process"][0]
    singles = [sample_in_process(runner, 1, seed + i, labels_for(manifest, 1, i)) for i in range(most)]
    same = {
        "sample_triton_vs_in_process": all(np.array_equal(x, want) for path in outputs
                                           if path.endswith(("sample/triton", "sample/triton_per_row")) for x in outputs[path]),
        "sample_triton_stream_vs_in_process": all(np.array_equal(x[0], want) for x in outputs["sample/triton_stream"]),
        "sample_engine_vs_in_process": all(np.array_equal(x, want) for x in outputs["sample/engine_in_process"]),
        "sample_in_process_repeatable": all(np.array_equal(x, want) for x in outputs["sample/in_process"]),
        "streams_vs_in_process": all(np.array_equal(image, singles[i]) for path in outputs if "streams" in path
                                     for run in outputs[path] for i, image in enumerate(run)),
        "streams_engine_vs_in_process": all(np.array_equal(image, singles[i]) for k in args.streams
                                            for run in outputs[f"engine/{k}"] for i, image in enumerate(run)),
    }
    want_nll = outputs["score/in_process"][0]
    score_diff = max(float(np.max(np.abs(x - want_nll))) for k in score_paths for x in outputs[f"score/{k}"])
    scores_agree = all(np.allclose(x, want_nll, rtol=SCORE_RTOL, atol=SCORE_ATOL)
                       for k in score_paths for x in outputs[f"score/{k}"])

    # -- figures
    pixels = n * c * h * w  # sub-pixels drawn per batch (one per channel and position)
    sampling = {}
    for k in sample_paths:
        sampling[k] = spread(runs[f"sample/{k}"])
        sampling[k]["pixels_per_s"] = pixels / sampling[k]["seconds"]
    sampling["triton_stream"]["call_batch_seen"] = sorted({b for _, bs, _, _ in outputs["sample/triton_stream"] for b in bs})
    streamed = outputs["sample/triton_stream"]
    sampling["triton_stream"]["rows_per_response"] = len(streamed) * rows / sum(r for _, _, _, r in streamed)
    rate = {k: sampling[k]["pixels_per_s"] for k in sample_paths}
    sampling["ratio_triton_vs_in_process"] = rate["triton"] / rate["in_process"]
    sampling["ratio_triton_per_row_vs_in_process"] = rate["triton_per_row"] / rate["in_process"]
    sampling["ratio_engine_vs_in_process"] = rate["engine_in_process"] / rate["in_process"]
    sampling["ratio_triton_vs_engine"] = rate["triton"] / rate["engine_in_process"]
    # What Triton adds per streamed row (response) beyond the engine's own work, on average.
    sampling["triton_ms_per_row_response"] = 1e3 * (sampling["triton"]["seconds"] - sampling["engine_in_process"]["seconds"]) / rows

    per_stream = c * h * w
    stream_results = {}
    for k in args.streams:
        timing, engine = spread(runs[f"streams/{k}"]), spread(runs[f"engine/{k}"])
        cb = np.array(call_batches[k])
        stream_results[str(k)] = {
            **timing, "images": k, "pixels_per_s": k * per_stream / timing["seconds"],
            "call_batch": {"mean": float(cb.mean()), "max": int(cb.max()), "min": int(cb.min()),
                           "histogram": {str(v): int(count) for v, count in zip(*np.unique(cb, return_counts=True))}},
            "active_max": int(max(active[k])),
            "engine_in_process": {**engine, "pixels_per_s": k * per_stream / engine["seconds"]},
        }
        r = stream_results[str(k)]
        r["triton_ms_per_row_response"] = 1e3 * (timing["seconds"] - engine["seconds"]) / (k * rows)
        per_row = spread(runs[f"streams_per_row/{k}"])
        r["per_row"] = {**per_row, "pixels_per_s": k * per_stream / per_row["seconds"]}
        r["rows_per_response"] = args.repeats * k * rows / responses[f"streams/{k}"]
        # The sampler's own time in its cell calls during these runs (its metric), and their share
        # of the run: what is left is everything else the streams cost, on the same cores.
        r["cell_seconds"] = float(np.median(cell_seconds[k]))
        r["cell_share"] = r["cell_seconds"] / timing["seconds"]
    base = stream_results.get("1")
    for k, r in stream_results.items():
        r["vs_one_stream"] = r["pixels_per_s"] / base["pixels_per_s"] if base else None
        r["per_row"]["vs_one_stream"] = r["per_row"]["pixels_per_s"] / base["per_row"]["pixels_per_s"] if base else None

    # CPU seconds per 1000 sequence rows (a row of one sequence: one response when per row), over
    # the timed runs: the server's (tritonserver and its stubs) and this process's (the clients;
    # for the in-process paths, the sampling itself).
    cpu_per_1000 = {path: {who: 1000 * v / (sequence_rows[path] * args.repeats) for who, v in cpu[path].items()}
                    for path in cpu}
    pinned_result = None
    if pinned:
        pinned_result = {"server_cpu": cpus[0], "client_cpu": cpus[1], "server_processes": len(server_tree),
                         "server_affinity_seen": sorted(map(list, affinities)), "sampling": {}, "streams": {}}
        ps = pinned_result["sampling"]
        for k in ("triton", "triton_per_row", "in_process", "engine_in_process"):
            ps[k] = {**spread(runs[f"pinned/sample/{k}"])}
            ps[k]["pixels_per_s"] = pixels / ps[k]["seconds"]
        ps["ratio_triton_vs_in_process"] = ps["triton"]["pixels_per_s"] / ps["in_process"]["pixels_per_s"]
        ps["ratio_triton_per_row_vs_in_process"] = ps["triton_per_row"]["pixels_per_s"] / ps["in_process"]["pixels_per_s"]
        for k in sorted({min(args.streams), most}):
            pr = {kind: spread(runs[f"pinned/{kind}/{k}"]) for kind in ("streams", "streams_per_row", "engine")}
            for v in pr.values():
                v["pixels_per_s"] = k * per_stream / v["seconds"]
            pr["streams"]["rows_per_response"] = args.repeats * k * rows / responses[f"pinned/streams/{k}"]
            pinned_result["streams"][str(k)] = pr
        one = pinned_result["streams"].get("1")
        for k, pr in pinned_result["streams"].items():
            for kind in ("streams", "streams_per_row", "engine"):
                pr[kind]["vs_one_stream"] = pr[kind]["pixels_per_s"] / one[kind]["pixels_per_s"] if one else None

    scoring = {"images": args.score_images, "request_images": args.score_request, "clients": args.score_clients,
               "chunk": max_batch}
    for k in score_paths:
        scoring[k] = spread(runs[f"score/{k}"])
        scoring[k]["images_per_s"] = args.score_images / scoring[k]["seconds"]
    executions = score_metrics.get("nv_inference_exec_count", 0.0)
    scoring["triton_concurrent"].update(
        requests_per_run=len(requests),
        images_per_execution=score_metrics["nv_inference_count"] / executions if executions else None,
        requests_per_execution=score_metrics["nv_inference_request_success"] / executions if executions else None)
    for k in ("triton", "triton_concurrent"):
        scoring[f"ratio_{k}_vs_in_process"] = scoring[k]["images_per_s"] / scoring["in_process"]["images_per_s"]
    scoring["max_abs_nll_difference"] = score_diff

    identical = {**same, "scores_agree": scores_agree, "all": all(same.values()) and scores_agree}
    return {"sampling": {"pixels": pixels, "batch": n, **sampling}, "streams": stream_results, "scoring": scoring,
            "pinned": pinned_result, "cpu_seconds_per_1000_rows": cpu_per_1000, "identical": identical}


def batching_ceiling(result: dict) -> dict:
    """What 16 single-image streams could reach at best, measured in the same run: one stream of
    one 16-image sequence (every row one cell call of 16, one response per row set, no work per
    extra stream) over one single-image stream. 16 streams run the same calls at best, plus each
    stream's own requests and responses, so their ratio cannot exceed this one; where the ceiling
    is below the target, it is the cell's cost at batch 16 against batch 1 that stops it, not the
    serving. Only when the one-stream sequence has 16 images (--batch 16)."""
    if result["sampling"].get("batch") != 16:
        return {}
    one = result["streams"]["1"]["pixels_per_s"]
    out = {"ceiling": result["sampling"]["triton_stream"]["pixels_per_s"] / one}
    out["of_ceiling"] = result["streams"]["16"]["vs_one_stream"] / out["ceiling"]
    # cell_bound: the ratio if a 16-stream run took no longer than the sampler's cell calls in it
    # (as measured there, on cores shared with the response path): no serving can beat it.
    sixteen = result["streams"]["16"]
    if "cell_seconds" in sixteen and sixteen["cell_seconds"] > 0:
        out["cell_bound"] = 16 * result["streams"]["1"]["seconds"] / sixteen["cell_seconds"]
    # engine_bound: the ratio if a 16-stream run took no longer than the same 16 sequences through
    # the row engine in this process, with no server at all; the sampler runs that engine and more.
    if "engine_in_process" in sixteen:
        out["engine_bound"] = 16 * result["streams"]["1"]["seconds"] / sixteen["engine_in_process"]["seconds"]
    pinned = result.get("pinned")
    if pinned and "1" in pinned["streams"] and "16" in pinned["streams"]:
        p1 = pinned["streams"]["1"]["streams"]["pixels_per_s"]
        out["pinned"] = {"value": pinned["streams"]["16"]["streams"]["vs_one_stream"],
                         "ceiling": pinned["sampling"]["triton"]["pixels_per_s"] / p1}
    return out


def targets(result: dict) -> dict:
    def check(value, target):
        return {"value": value, "target": target, "met": None if value is None or target is None else bool(value >= target)}

    streams = result["streams"]
    if "16" in streams and "1" in streams:
        scaling = {"streams": 16, **check(streams["16"]["vs_one_stream"], TARGETS["streams_16_vs_1"])}
        scaling.update(batching_ceiling(result))
    else:  # the 6x target is for 16 streams; other counts are recorded only
        top = max(streams, key=int)
        scaling = {"streams": int(top), **check(streams[top]["vs_one_stream"], None)}
    t = {
        "sampling_vs_in_process": check(result["sampling"]["ratio_triton_vs_in_process"], TARGETS["sampling_vs_in_process"]),
        "streams_scaling": scaling,
        "scoring_vs_in_process": check(result["scoring"]["ratio_triton_vs_in_process"], TARGETS["scoring_vs_in_process"]),
        "scoring_concurrent_vs_in_process": check(result["scoring"]["ratio_triton_concurrent_vs_in_process"],
                                                  TARGETS["scoring_vs_in_process"]),
    }
    if result.get("pinned"):
        t["pinned_sampling_vs_in_process"] = check(result["pinned"]["sampling"]["ratio_triton_vs_in_process"],
                                                   TARGETS["pinned_sampling_vs_in_process"])
    t["all_met"] = all(v["met"] for v in t.values() if v["met"] is not None)
    return t


# ---------------------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    p_ = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0])
    p_.add_argument("--json", help="write the results here")
    p_.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="the model to export and serve")
    p_.add_argument("--repeats", type=int, default=7, help="timed rounds of every path (best counts)")
    p_.add_argument("--streams", default="1,4,16", help="comma-separated counts of concurrent single-image streams")
    p_.add_argument("--batch", type=int, default=16, help="images in the one-stream sequence")
    p_.add_argument("--score-images", type=int, default=256, help="images scored per run")
    p_.add_argument("--score-clients", type=int, default=16, help="client threads of the concurrent scoring path")
    p_.add_argument("--score-request", type=int, default=1, help="images per request of the concurrent scoring path")
    p_.add_argument("--onnx-threads", type=int, default=1, help="onnxruntime intra-op threads, in the server and in process")
    p_.add_argument("--sender-threads", type=int, default=2, help="the sampler's response sender threads (0: none)")
    p_.add_argument("--coalesce-ms", type=float, default=COALESCE_MS, help="the sampler's row coalescing window (0: off)")
    p_.add_argument("--score-instances", type=int, default=1, help="instances of NAME_score in the server")
    p_.add_argument("--max-queue-delay-us", type=int, default=2000, help="NAME_score's dynamic batching delay")
    p_.add_argument("--no-pinned", dest="pinned", action="store_false",
                    help="skip the pinned paths (server on one CPU, clients and in-process paths on another)")
    p_.add_argument("--seed", type=int, default=0)
    p_.add_argument("--quick", action="store_true", help="a tiny run for tests: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()))
    args = p_.parse_args(argv)
    try:
        args.streams = sorted({int(s) for s in args.streams.split(",") if s.strip()})
    except ValueError:
        p_.error(f"--streams must be comma-separated numbers, got {args.streams!r}")
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    for k in ("repeats", "batch", "score_images", "score_clients", "score_request", "onnx_threads", "score_instances"):
        if getattr(args, k) < 1:
            p_.error(f"--{k.replace('_', '-')} must be at least 1")
    if not args.streams or min(args.streams) < 1:
        p_.error("--streams must list counts >= 1")
    return args


def report(payload: dict) -> str:
    s, st, sc, t = payload["sampling"], payload["streams"], payload["scoring"], payload["targets"]
    cols = f"{'median s':>10}{'min-max s':>15}"
    lines = [f"{'sampling: one stream of ' + str(payload['config']['batch']) + ' images':<42}{cols}{'pixels/s':>11}"]
    for k, label in (("triton", "Triton (PixelClient), coalesced"), ("triton_per_row", "Triton (PixelClient), one row/response"),
                     ("triton_stream", "Triton (bare persistent stream)"),
                     ("engine_in_process", "row engine in process"),
                     ("in_process", "ONNX cells in process")):
        lines.append(f"  {label:<40}{s[k]['seconds']:>10.3f}{s[k]['min_seconds']:>7.3f}-{s[k]['max_seconds']:<7.3f}{s[k]['pixels_per_s']:>11.0f}")
    lines.append(f"  Triton / in process {s['ratio_triton_vs_in_process']:.2f} (one row per response: "
                 f"{s['ratio_triton_per_row_vs_in_process']:.2f}), engine / in process "
                 f"{s['ratio_engine_vs_in_process']:.2f}; Triton adds {s['triton_ms_per_row_response']:.2f} ms per streamed row")
    lines.append(f"{'concurrent single-image streams':<42}{cols}{'pixels/s':>11}{'x one':>7}{'CALL_BATCH':>11}"
                 f"{'engine px/s':>12}{'ms/row':>8}")
    for k, r in st.items():
        x = f"{r['vs_one_stream']:.2f}" if r["vs_one_stream"] is not None else "-"
        lines.append(f"  {k + ' streams':<40}{r['seconds']:>10.3f}{r['min_seconds']:>7.3f}-{r['max_seconds']:<7.3f}{r['pixels_per_s']:>11.0f}{x:>7}"
                     f"{r['call_batch']['mean']:>11.1f}{r['engine_in_process']['pixels_per_s']:>12.0f}"
                     f"{r['triton_ms_per_row_response']:>8.2f}")
    lines.append("  CALL_BATCH: mean images per cell call; engine: the same sequences through the row engine in process;")
    lines.append("  ms/row: (Triton time - engine time) / streamed rows")
    lines.append("  sampler's time in cell calls: " + ", ".join(f"{k} streams {1e3 * r['cell_seconds']:.1f} ms "
                                                               f"({100 * r['cell_share']:.0f}% of the run)" for k, r in st.items()))
    lines.append("  rows per response (coalesced): " + ", ".join(f"{k} streams {r['rows_per_response']:.2f}" for k, r in st.items())
                 + f"; one stream of {payload['config']['batch']} images {s['triton_stream']['rows_per_response']:.2f}")
    lines.append("  one row per response: " + ", ".join(f"{k} streams {r['per_row']['pixels_per_s']:.0f} pixels/s" +
                                                       (f" ({r['per_row']['vs_one_stream']:.2f}x)" if r['per_row']['vs_one_stream'] else "")
                                                       for k, r in st.items()))
    pinned = payload.get("pinned")
    if pinned:
        ps = pinned["sampling"]
        lines.append(f"pinned: server on CPU {pinned['server_cpu']}, clients and in-process paths on CPU {pinned['client_cpu']}")
        for k in ("triton", "triton_per_row", "engine_in_process", "in_process"):
            lines.append(f"  {'one stream, ' + k:<40}{ps[k]['seconds']:>10.3f}{ps[k]['min_seconds']:>7.3f}-{ps[k]['max_seconds']:<7.3f}"
                         f"{ps[k]['pixels_per_s']:>11.0f}")
        lines.append(f"  Triton / in process {ps['ratio_triton_vs_in_process']:.2f} (one row per response: "
                     f"{ps['ratio_triton_per_row_vs_in_process']:.2f})")
        for k, pr in pinned["streams"].items():
            lines.append(f"  {k} streams: coalesced {pr['streams']['pixels_per_s']:.0f}, one row/response "
                         f"{pr['streams_per_row']['pixels_per_s']:.0f}, engine {pr['engine']['pixels_per_s']:.0f} pixels/s"
                         + (f"; x one stream {pr['streams']['vs_one_stream']:.2f} / {pr['streams_per_row']['vs_one_stream']:.2f}"
                            f" / {pr['engine']['vs_one_stream']:.2f}" if pr['streams']['vs_one_stream'] else "")
                         + f"; {pr['streams']['rows_per_response']:.2f} rows per response")
    lines.append("CPU seconds per 1000 sequence rows (server = tritonserver + stubs; client = this process)")
    for path, v in payload["cpu_seconds_per_1000_rows"].items():
        if "triton" in path or "streams" in path:
            lines.append(f"  {path:<40}server {v['server']:>7.3f}  client {v['client']:>7.3f}")
    lines.append(f"{'scoring ' + str(sc['images']) + ' images':<42}{cols}{'images/s':>11}")
    for k, label in (("triton", f"Triton, chunks of {sc['chunk']}"),
                     ("triton_concurrent", f"Triton, {sc['clients']} clients x {sc['request_images']}-image requests"),
                     ("in_process", f"OnnxScorer in process, chunks of {sc['chunk']}")):
        lines.append(f"  {label:<40}{sc[k]['seconds']:>10.3f}{sc[k]['min_seconds']:>7.3f}-{sc[k]['max_seconds']:<7.3f}{sc[k]['images_per_s']:>11.1f}")
    ipe = sc["triton_concurrent"]["images_per_execution"]
    lines.append(f"  Triton / in process {sc['ratio_triton_vs_in_process']:.2f}, concurrent / in process "
                 f"{sc['ratio_triton_concurrent_vs_in_process']:.2f}; dynamic batches of "
                 + (f"{ipe:.1f}" if ipe is not None else "?") + " images on average")
    for k, v in t.items():
        if k == "all_met":
            continue
        if v["target"] is None:
            lines.append(f"{k} ({v.get('streams')} streams): {v['value']:.2f} (no target)")
        else:
            lines.append(f"target {k}: {v['value']:.2f} >= {v['target']:g}: {'met' if v['met'] else 'NOT met'}")
        if "ceiling" in v:
            lines.append(f"  at best {v['ceiling']:.2f} here (one 16-image sequence / one single-image stream): "
                         f"{100 * v['of_ceiling']:.0f}% of it reached"
                         + (f"; pinned {v['pinned']['value']:.2f} of at best {v['pinned']['ceiling']:.2f}" if "pinned" in v else ""))
        if "cell_bound" in v:
            lines.append(f"  the sampler's cell calls alone in a 16-stream run allow at most {v['cell_bound']:.2f}")
        if "engine_bound" in v:
            lines.append(f"  the 16 sequences through the row engine in process, no server, allow at most {v['engine_bound']:.2f}")
    lines.append(f"identical images: {'yes' if payload['identical']['all'] else 'NO'} "
                 f"(scores: max |difference| {sc['max_abs_nll_difference']:.1e} nats)")
    m, sv = payload["machine"], payload["server"]
    lines.append(f"{m['cpu']}, {m['cpu_count']} CPUs, load {m['load_average_1_5_15']}, onnx threads {sv['onnx_threads']}, "
                 f"score instances {sv['score_instances']}, tritonserver {sv['tritonserver']}, "
                 f"malloc env {'set' if m['malloc_env_set'] else 'NOT set'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        print(f"exporting {args.checkpoint} ...", file=sys.stderr, flush=True)
        manifest, folder, repository, export_seconds = export(args.checkpoint, Path(tmp), args)
        with TritonServer(repository, log_path=Path(tmp) / "triton.log") as server:
            server_info = {
                "tritonserver": triton_version(server), "models": server.models,
                "onnx_threads": args.onnx_threads, "score_instances": args.score_instances, "sample_instances": 1,
                "sender_threads": args.sender_threads, "coalesce_ms": args.coalesce_ms,
                "max_queue_delay_us": args.max_queue_delay_us, "max_batch": manifest["max_batch"],
                "transport": "gRPC on loopback",
            }
            result = run_benchmark(args, manifest, folder, server)
    payload = {
        "benchmark": "serving",
        "config": {"checkpoint": args.checkpoint, "batch": args.batch, "streams": args.streams, "stream_images": 1,
                   "repeats": args.repeats, "seed": args.seed, "score_images": args.score_images,
                   "score_clients": args.score_clients, "score_request": args.score_request, "quick": args.quick},
        "model": {"name": manifest["name"], "arch": manifest["arch"], "config": manifest["config"], "shape": manifest["shape"],
                  "levels": manifest["levels"], "export_seconds": export_seconds},
        "server": server_info,
        "machine": machine_info(),
        **result,
    }
    payload["targets"] = targets(result)
    print(report(payload))
    if args.json:
        write_json(args.json, payload)
    if not payload["identical"]["all"]:
        print("error: Triton and the in-process cells gave different images or scores", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    reexec_with_malloc_env("bench.serving", sys.argv[1:])
    sys.exit(main())
