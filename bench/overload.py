"""Overload of the row engine, in process, with the ONNX cell of the model the committed
model_repository/ serves (named in the JSON's "model"): what a flood of 64-image sequences does
to a 1-image sequence, with fair scheduling (server/engine/scheduler.py, the default) and without
(every sequence one row per step), what the live-images budget admits of the issue's flood, and the memory a flood leaves
resident with and without giving it back (server/engine/admission.py). With --server, also the issue's
flood through a real tritonserver serving the committed model_repository/: 150 STARTs of 64
images on one stream, a 1-image client during it, and the server's RSS (all its processes)
before, at the peak and in the 30 s after the flood; --server-repeats floods (3), each on a fresh
server, as what the server keeps after a flood varies from one flood to the next: the run with
the median after-flood RSS is `server_flood`, every run's outcome is in `server_floods`.

    python -m bench.overload --json bench/results/overload.json --server

In process, not through Triton: the scheduling and the allocator are the engine's; Triton adds a
fixed cost per response, the same either way. Times are medians of interleaved repeats; the
throughput cost of fairness is the ratio of image-rows per CPU second of the workload.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from pathlib import Path

from bench.common import model_record, reexec_with_malloc_env, result, write_json
from pixelrnn.server.engine import admission
from pixelrnn.server.engine import Engine, Overloaded
from pixelrnn.runtime.rowloop import SampleSpec
from pixelrnn.runtime.runner import OnnxRunner

REPO = Path(__file__).resolve().parent.parent
# The sampler's version folder of the committed repository (one model: NAME_sample/1).
FOLDER = next(iter(sorted((REPO / "model_repository").glob("*_sample/1"))), REPO / "model_repository")


class Sink:
    def __init__(self):
        self.rows, self.first, self.done_at, self.errors = 0, None, None, []

    def send_rows(self, events):
        self.rows += len(events)
        if self.first is None:
            self.first = time.perf_counter()

    def done(self):
        self.done_at = time.perf_counter()

    def error(self, message):
        self.errors.append(message)

    def cancelled(self):
        return False


def rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def flood(engine: Engine, sequences: int, batch: int, seed0: int = 0) -> list[Sink]:
    sinks = [Sink() for _ in range(sequences)]
    for k, sink in enumerate(sinks):
        engine.start(("flood", seed0 + k), SampleSpec(batch=batch, seed=seed0 + k), sink)
    return sinks


def victim_run(runner, fair: bool, sequences: int, max_batch: int) -> dict:
    """A flood of `sequences` x max_batch images one round under way, then a 1-image sequence:
    its first-row and whole-image latency (seconds and cell calls), and the image-rows per
    second of the whole workload, from the victim's start until the flood is done too."""
    engine = Engine(runner, max_batch=max_batch, trim=lambda: None, fair=fair)
    sinks = flood(engine, sequences, max_batch)
    while engine.calls < sequences:  # every flood sequence has its first row, or is about to
        engine.step()
    victim = Sink()
    calls0 = engine.calls
    images0 = sum(s.rows for s in sinks) * max_batch
    start, cpu = time.perf_counter(), time.process_time()
    engine.start("victim", SampleSpec(batch=1, seed=12345), victim)
    first_calls = None
    while victim.done_at is None:
        engine.step()
        if first_calls is None and victim.first is not None:
            first_calls = engine.calls - calls0
    image_calls = engine.calls - calls0
    while engine.active:
        engine.step()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    made = sum(s.rows for s in sinks) * max_batch - images0 + victim.rows  # image-rows in the window
    assert all(s.done_at is not None and not s.errors for s in sinks)
    engine.stop()
    return {"first_row_s": victim.first - start, "first_row_calls": first_calls, "image_s": victim.done_at - start,
            "image_calls": image_calls, "workload_s": elapsed, "image_rows_per_s": made / elapsed,
            "workload_cpu_s": cpu, "image_rows_per_cpu_s": made / cpu}


def admission_counts(manifest: dict, runner, sequences: int = 150, batch: int = 64) -> dict:
    """The issue's flood (150 STARTs of 64 images) against the default budget: STARTs only."""
    budget = admission.live_images_budget(manifest)
    engine = Engine(runner, max_batch=int(manifest["max_batch"]), max_images=budget, trim=lambda: None)
    admitted = refused = 0
    message = None
    for k in range(sequences):
        try:
            engine.start(k, SampleSpec(batch=batch, seed=k), Sink())
            admitted += 1
        except Overloaded as e:
            refused += 1
            message = message or str(e)
    engine.stop()
    return {"budget_images": budget, "memory_mb": admission.DEFAULT_MEMORY_MB, "image_bytes": admission.image_bytes(manifest),
            "starts": sequences, "admitted": admitted, "refused": refused, "admitted_images": admitted * batch,
            "first_refusal": message}


def memory_run(runner, sequences: int, max_batch: int, steps: int) -> dict:
    """RSS before, at the peak of, and after a flood (all its sequences ended), first as the
    allocator leaves it (the servers' MALLOC_TRIM_THRESHOLD_ keeps glibc from trimming), then
    after admission.give_back_memory(), as the engine calls it when it goes idle."""
    admission.give_back_memory()
    baseline = rss_mib()
    engine = Engine(runner, max_batch=max_batch, trim=lambda: None)
    flood(engine, sequences, max_batch, seed0=1000)
    peak = baseline
    for _ in range(steps):
        engine.step()
        peak = max(peak, rss_mib())
    engine.stop()  # every sequence dropped, as cancelled clients leave them
    after = rss_mib()
    start = time.perf_counter()
    returned = admission.give_back_memory()
    trim_s = time.perf_counter() - start
    trimmed = rss_mib()
    return {"baseline_mib": baseline, "peak_mib": peak, "after_flood_mib": after, "after_trim_mib": trimmed,
            "trim_seconds": trim_s, "trim_returned": returned, "after_trim_within_20pct": trimmed <= 1.2 * baseline,
            "after_flood_within_20pct": after <= 1.2 * baseline}


def trim_cost(runner, sequences: int, max_batch: int, steps: int, repeats: int) -> dict:
    """The speed cost of trimming: a flood's first `steps` calls right after a trim (the pages
    must be faulted in again) against the same without one, interleaved."""
    times = {"trimmed": [], "kept": []}
    for r in range(repeats):
        for mode in ("trimmed", "kept"):
            engine = Engine(runner, max_batch=max_batch, trim=lambda: None)
            flood(engine, sequences, max_batch, seed0=2000 + r)
            if mode == "trimmed":
                admission.give_back_memory()
            start = time.perf_counter()
            for _ in range(steps):
                engine.step()
            times[mode].append(time.perf_counter() - start)
            engine.stop()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"steps": steps, "seconds": med, "runs": times, "slowdown_after_trim": med["trimmed"] / med["kept"]}


def server_flood(manifest: dict, starts: int = 150, settle_s: float = 30.0) -> dict:
    """The issue's flood through tritonserver (module notes); RSS sampled every 0.2 s."""
    import tempfile
    import threading

    from bench.deployment import group_rss_mib
    from pixelrnn.client.stream import SampleStream, sample_inputs
    from pixelrnn.runtime import protocol as p
    from pixelrnn.server.launcher import TritonServer

    sampler = p.sample_model(manifest["name"])
    with tempfile.TemporaryDirectory() as tmp:
        server = TritonServer(REPO / "model_repository", log_path=Path(tmp) / "triton.log").start()
        try:
            time.sleep(2.0)  # the stubs' start-up allocations settle
            pgid = server.process.pid
            baseline = group_rss_mib(pgid)[0]
            samples, stop = [], threading.Event()

            def sample_rss():
                while not stop.wait(0.2):
                    samples.append((time.perf_counter(), group_rss_mib(pgid)[0]))

            sampler_thread = threading.Thread(target=sample_rss, daemon=True)
            sampler_thread.start()
            with SampleStream(server.grpc_url, timeout=600.0, outputs=(p.ROW_INDEX, p.ROW_COUNT, p.ROW)) as stream:
                start = time.perf_counter()
                for k in range(starts):
                    stream.send(sampler, 10_000 + k, sample_inputs(batch=64, seed=k), start=True, end=True, request_id=str(k))
                sent_s = time.perf_counter() - start
                time.sleep(1.0)  # the flood under way
                with SampleStream(server.grpc_url, timeout=600.0) as victim:
                    v0 = time.perf_counter()
                    victim.send(sampler, 99_999, sample_inputs(batch=1, seed=7), start=True, end=True)
                    first = victim.get()
                    first_s = first.at - v0
                    rest = victim.collect(1)
                    victim_s = time.perf_counter() - v0
                    victim_rows = len(first.rows) + len(rest.rows)
                got = stream.collect(starts)
                flood_s = time.perf_counter() - start
            done = time.perf_counter()
            refusals = [e for e in got.errors if p.OVERLOADED in e]
            time.sleep(settle_s)
            stop.set()
            sampler_thread.join()
            after = [(t - done, r) for t, r in samples if t >= done]
            back = next((t for t, r in after if r <= 1.2 * baseline), None)
            return {"starts": starts, "images_each": 64, "sent_in_s": sent_s, "refused": len(refusals),
                    "other_errors": len(got.errors) - len(refusals), "admitted": starts - len(got.errors),
                    "rows_received": len(got.rows), "flood_s": flood_s,
                    "victim": {"first_row_s": first_s, "image_s": victim_s, "rows": victim_rows,
                               "error": first.error or (rest.errors[0] if rest.errors else None)},
                    "rss_mib": {"baseline": baseline, "peak": max(r for _, r in samples), "after_settle": after[-1][1] if after else None},
                    "seconds_to_within_20pct": back, "settle_window_s": settle_s}
        finally:
            server.stop()


@contextlib.contextmanager
def arena_setting(arenas: str | None):
    """MALLOC_ARENA_MAX for the servers started inside (None: the launcher's default)."""
    before = os.environ.pop("MALLOC_ARENA_MAX", None)
    if arenas is not None:
        os.environ["MALLOC_ARENA_MAX"] = arenas
    try:
        yield
    finally:
        os.environ.pop("MALLOC_ARENA_MAX", None)
        if before is not None:
            os.environ["MALLOC_ARENA_MAX"] = before


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--flood", type=int, default=16, help="64-image sequences in the flood (default 16: 1,024 images)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--server", action="store_true", help="also the flood through tritonserver (server_flood)")
    parser.add_argument("--no-arena-compare", dest="arena_compare", action="store_false",
                        help="leave out the floods with glibc's default malloc arenas (the launcher sets one)")
    parser.add_argument("--server-repeats", type=int, default=3,
                        help="floods through tritonserver, each on a fresh server (the median run by after-flood RSS is reported)")
    args = parser.parse_args(argv)
    manifest = json.loads((FOLDER / "manifest.json").read_text())
    runner = OnnxRunner.from_manifest(manifest, FOLDER, threads=1)
    max_batch = int(manifest["max_batch"])
    runs = {"fair": [], "unfair": []}
    for _ in range(args.repeats):  # interleaved: the machine's load falls on both alike
        for mode in runs:
            runs[mode].append(victim_run(runner, mode == "fair", args.flood, max_batch))
    victim = {mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for mode, rs in runs.items()}
    # Per CPU second of this (single-threaded) process: on a shared machine wall time mostly
    # measures the neighbours; the wall-time ratio is reported beside it.
    throughput_ratio = victim["fair"]["image_rows_per_cpu_s"] / victim["unfair"]["image_rows_per_cpu_s"]
    payload = {
        **result("overload", model_record(manifest, folder=FOLDER)),
        "flood": {"sequences": args.flood, "images_each": max_batch, "repeats": args.repeats},
        "victim": victim, "victim_runs": runs,
        "fairness_throughput_ratio": throughput_ratio, "fairness_within_10pct": throughput_ratio >= 0.9,
        "fairness_wall_throughput_ratio": victim["fair"]["image_rows_per_s"] / victim["unfair"]["image_rows_per_s"],
        "admission": admission_counts(manifest, runner),
        "memory": memory_run(runner, args.flood * 2, max_batch, steps=4 * args.flood),
        "trim_cost": trim_cost(runner, args.flood, max_batch, steps=args.flood, repeats=args.repeats),
    }
    if args.server:
        # The launcher's malloc setting (one arena, server/launcher.python_env) against glibc's
        # default (8 per core), interleaved, each flood on a fresh server.
        variants = {"server_floods": None}
        if args.arena_compare:
            variants["arena_default"] = str(8 * (os.cpu_count() or 1))
        floods = {name: [] for name in variants}
        for _ in range(args.server_repeats):
            for name, arenas in variants.items():
                with arena_setting(arenas):
                    floods[name].append(server_flood(manifest))
        # What the server keeps after a flood varies from one flood to the next (fragmentation):
        # the run with the median after-flood RSS is the figure, every run's outcome beside it.
        payload["server_flood"] = sorted(floods["server_floods"], key=lambda f: f["rss_mib"]["after_settle"])[len(floods["server_floods"]) // 2]
        for name, runs in floods.items():
            payload[name] = {
                "malloc_arena_max": variants[name] or "1 (server/launcher.py)",
                "runs": len(runs),
                "within_20pct": sum(f["seconds_to_within_20pct"] is not None for f in runs),
                "after_settle_mib": [round(f["rss_mib"]["after_settle"], 1) for f in runs],
                "baseline_mib": [round(f["rss_mib"]["baseline"], 1) for f in runs],
                "flood_s": [round(f["flood_s"], 2) for f in runs],
                "flood_s_median": statistics.median(f["flood_s"] for f in runs),
                "victim_first_row_s": [f["victim"]["first_row_s"] for f in runs],
                "victim_image_s": [f["victim"]["image_s"] for f in runs],
            }
    print(json.dumps({k: payload.get(k) for k in ("victim", "fairness_throughput_ratio", "admission", "memory", "trim_cost",
                                                  "server_flood", "server_floods", "arena_default")},
                     indent=1, default=str))
    if args.json:
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    reexec_with_malloc_env("bench.overload", __import__("sys").argv[1:])
    raise SystemExit(main())
