"""How the sampler's throughput grows with its engine's workers, in process and through Triton,
and what the scorer gains from more instances or onnxruntime threads.

    python -m bench.engine_workers --json bench/results/engine_workers.json [--checkpoint PATH]
        [--workers 1,2] [--sequences 16,64] [--streams 16,64] [--repeats 5] [--no-triton]

The checkpoint is exported once (parity-checked). In one run, each part's paths interleaved
(bench/common.interleaved), medians:

  in process   the row engine (server/engine/) with each --workers count (a cell session per
               worker, worker threads running, inline sends), --sequences single-image
               sequences started together: pixels/s, and the ratio to one worker. With one
               worker the cell calls are timed on the worker's thread (CPU seconds inside the
               session run, where onnxruntime releases the GIL, and between the calls: the
               engine's Python), per sequence-row.
  projection   what more cores would give, from those figures and the cell alone at the batch
               each worker would call it with (sequences / workers): every worker's Python takes
               turns for the GIL, so a step takes at least the Python of all sequences, and at
               least one worker's Python plus its call: step(N) = max(S py, S/N py + cell(S/N)),
               against step(1) = S py + cell(S). `amdahl` is the plain law with the Python share
               of one worker's step serial and the cell share divided evenly.
  triton       a tritonserver with one sampler per --workers count (its engine_workers, the
               repository's other settings as shipped), --streams concurrent bare gRPC streams
               of one single-image sequence each: pixels/s and the ratio to one worker, the CPU
               seconds of the server and of the clients per run (bench/cpu.py), and the share of
               a run each worker spent in cell calls (the sampler's cell-seconds metric).
  scorer       the scorer as shipped (1 instance, 1 onnxruntime thread) against 2 instances and
               against 2 threads, on the same server: 16 clients sending 1-image requests (Triton's
               dynamic batcher gathers them), and one client sending chunks of the max batch.

Every image must be the same for its seed with any worker count, in process and through Triton
(`identical`; exit status 1 otherwise). "background" records the CPU the rest of the machine
took during the run (/proc/stat: niced processes apart), the benchmark's own (its server
included), and whether the kernel groups processes by session (autogroup: a niced job in another
session then still takes its group's full share, as much as the benchmark's). On such a machine a
session of its own with a raised group priority gives the benchmark what a niced job leaves:
    setsid sh -c 'echo -10 > /proc/self/autogroup; exec python -m bench.engine_workers ...'
(the group's nice is recorded).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import (Collect, export, finish, interleaved, labels_for, machine_info, machine_line, model_record,
                          reexec_with_malloc_env, rate, result, together)
from bench.cpu import CLOCK_TICKS, CpuAccount
from pixelrnn.runtime.rowloop import RowSequence, SampleSpec
from pixelrnn.runtime.runner import OnnxRunner
from pixelrnn.server.engine import Engine

DEFAULT_CHECKPOINT = "checkpoints/gated_pixelcnn_binarized_mnist.pt"
PROJECTED_CORES = (4, 8, 16)
TARGETS = {"in_process_64": 1.6, "in_process_16": 1.3, "triton_64": 1.0}  # 2 workers / 1, pixels/s (triton: more than)
SCORER_VARIANTS = {"i2": dict(score_instances=2), "t2": dict(onnx_threads=2)}


# ---------------------------------------------------------------------------- the machine's other work

def cpu_jiffies() -> dict[str, int]:
    """/proc/stat's first line: the whole machine's CPU time by kind, in clock ticks."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return dict(zip(("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"), map(int, fields)))


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have ended (the
    tritonserver it ran, with its stubs, once it is stopped)."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / CLOCK_TICKS  # utime, stime, cutime, cstime


@contextlib.contextmanager
def background(record: dict):
    """Fills `record` with the CPU seconds the machine spent meanwhile: in niced processes, in
    everything else but this benchmark (this process and the server it runs), and this
    benchmark's own, with the wall seconds, whether autogroup is on and this session's group nice."""
    before, own, start = cpu_jiffies(), own_cpu_seconds(), time.perf_counter()
    try:
        yield
    finally:
        after = cpu_jiffies()
        d = {k: (after[k] - before[k]) / CLOCK_TICKS for k in after}
        mine = own_cpu_seconds() - own
        try:
            autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
            group_nice = int(Path("/proc/self/autogroup").read_text().split()[-1]) if autogroup else None
        except (OSError, ValueError, IndexError):
            autogroup = group_nice = None
        record.update(wall_s=time.perf_counter() - start, niced_cpu_s=d["nice"], benchmark_cpu_s=mine,
                      other_cpu_s=max(0.0, d["user"] + d["system"] + d["irq"] + d["softirq"] - mine), autogroup=autogroup,
                      autogroup_nice=group_nice)


# ---------------------------------------------------------------------------- in process

class TimedRunner:
    """A runner whose cell calls are timed in CPU seconds of the calling thread (one worker
    each): inside run_row (the session run, without the GIL) and between two calls (the
    engine's Python: inputs, rows, bookkeeping, sends)."""

    def __init__(self, runner):
        self.runner, self.cell, self.between = runner, 0.0, 0.0
        self._local = threading.local()  # the last call's end on this thread (each run has threads of its own)

    def __getattr__(self, name):  # stages, levels, initial_state, condition, ...
        return getattr(self.runner, name)

    def run_row(self, *args, **kwargs):
        entered, left = time.thread_time(), getattr(self._local, "left", None)
        if left is not None:  # thread_time is per thread: a difference means something on one thread only
            self.between += entered - left
        out = self.runner.run_row(*args, **kwargs)
        self._local.left = time.thread_time()
        self.cell += self._local.left - entered
        return out


class Finished(Collect):
    """Collect (rows and errors) with an event set by the final message."""

    def __init__(self):
        super().__init__()
        self.finished = threading.Event()
        self.done = self.finished.set

    def error(self, message):
        self.errors.append(message)
        self.finished.set()


def engine_run(runners: list, max_batch: int, specs: list[SampleSpec], shape) -> tuple[float, list[np.ndarray]]:
    """The sequences through an engine with one worker per runner, its threads running: all are
    queued first, then the workers start. -> (wall seconds from the start to the last image,
    each sequence's image)."""
    from pixelrnn.client.library import assemble

    engine, sinks = Engine(runners, max_batch=max_batch, trim=lambda: None), [Finished() for _ in specs]
    for key, (spec, sink) in enumerate(zip(specs, sinks)):
        engine.start(key, spec, sink)
    start = time.perf_counter()
    engine.start_worker()
    try:
        for sink in sinks:
            if not sink.finished.wait(600) or sink.errors:
                raise RuntimeError(f"engine: {sink.errors[0] if sink.errors else 'no final message in 600 s'}")
        seconds = time.perf_counter() - start
    finally:
        engine.stop()
    return seconds, [assemble(sink.rows, shape) for sink in sinks]


def cells_at_once(runners: list, specs: list[SampleSpec], calls: int) -> float:
    """`calls` calls of the first cell on each runner's own thread, all at once, each at its
    spec's batch (fixed inputs): what the CPUs allow parallel cell calls right now, with no
    engine around them. -> wall seconds."""
    def job(runner, spec):
        seq = RowSequence.open(runner, spec)
        inputs, state = seq.inputs(), seq.state
        return lambda: [runner.run_row(0, state, **inputs) for _ in range(calls)] and None

    return together([job(r, spec) for r, spec in zip(runners, specs)])[0]


def batch_spec(spec: SampleSpec, batch: int) -> SampleSpec:
    """spec with `batch` images (its labels repeated to fit)."""
    return SampleSpec(batch=batch, seed=spec.seed, labels=None if spec.labels is None else np.resize(spec.labels, batch))


def cell_call_cpu(runner, spec: SampleSpec, calls: int) -> float:
    """CPU seconds of one call of the first cell at spec's batch (fixed inputs), median of `calls`."""
    seq = RowSequence.open(runner, spec)
    inputs, state, seconds = seq.inputs(), seq.state, []
    runner.run_row(0, state, **inputs)  # first-call allocations
    for _ in range(calls):
        began = time.thread_time()
        runner.run_row(0, state, **inputs)
        seconds.append(time.thread_time() - began)
    return float(np.median(seconds))


def in_process(args, manifest: dict, folder: Path) -> tuple[dict, dict]:
    """-> (the in-process figures and projection, {sequences: the one-worker images})."""
    max_batch, shape = int(manifest["max_batch"]), tuple(manifest["shape"])
    c, h, w = shape
    rows = sum(st.height for st in OnnxRunner.from_manifest(manifest, folder).stages)
    runners = {n: [OnnxRunner.from_manifest(manifest, folder, threads=1) for _ in range(n)] for n in args.workers}
    timed = {s: TimedRunner(OnnxRunner.from_manifest(manifest, folder)) for s in args.sequences}  # one worker, timed
    specs = {s: [SampleSpec(batch=1, seed=args.seed + i, labels=labels_for(manifest, 1, i)) for i in range(s)]
             for s in args.sequences}
    outputs: dict[str, list] = {}

    def path(name, rs, s):
        def run():
            seconds, images = engine_run(rs, max_batch, specs[s], shape)
            outputs.setdefault(name, []).append(images)
            return seconds
        return run

    def cells(n, s):  # the cell alone on n threads at once, s / n images per call each: the CPUs' own ceiling
        return lambda: cells_at_once(runners[n], [batch_spec(specs[s][0], max(1, s // n))] * n, rows)

    paths = {f"{n}/{s}": path(f"{n}/{s}", runners[n], s) for s in args.sequences for n in args.workers}
    paths.update({f"timed/{s}": path(f"timed/{s}", [timed[s]], s) for s in args.sequences})
    paths.update({f"cells/{n}/{s}": cells(n, s) for s in args.sequences for n in args.workers})
    runs = interleaved(paths, args.repeats, once=lambda name, fn, timed_run: fn())
    results, images = {}, {}
    for s in args.sequences:
        images[s] = outputs[f"{min(args.workers)}/{s}"][0]
        figures = {str(n): rate(runs[f"{n}/{s}"], s * c * h * w) for n in args.workers}
        one = figures[str(min(args.workers))]["pixels_per_s"]
        alone = {str(n): rate(runs[f"cells/{n}/{s}"], s * c * h * w) for n in args.workers}
        for n, f in figures.items():
            f["vs_one_worker"] = f["pixels_per_s"] / one
            # The same split of the images over n threads, cell calls only: what this machine's
            # CPUs let n workers gain during the run, whatever the engine does.
            f["cells_alone"] = {**alone[n], "vs_one_thread": alone[n]["pixels_per_s"] / alone[str(min(args.workers))]["pixels_per_s"]}
        t = timed[s]
        sequence_rows = s * rows * (args.repeats + 1)  # the warm-up run counts too
        py, cell = t.between / sequence_rows, t.cell / sequence_rows
        results[str(s)] = {"workers": figures, "python_us_per_row": 1e6 * py, "cell_us_per_row": 1e6 * cell,
                           "python_share": py / (py + cell), "timed_one_worker": rate(runs[f"timed/{s}"], s * c * h * w),
                           "projection": projection(t.runner, specs[s], s, py, one, rows)}
    identical = all(np.array_equal(a, b) for key, runs_ in outputs.items() for run in runs_
                    for a, b in zip(run, images[int(key.split("/")[1])]))
    return {"sequences": results, "identical": identical, "rows_per_image": rows}, images


def projection(runner, specs: list[SampleSpec], s: int, py: float, one_worker_px: float, rows: int) -> dict:
    """The throughput on more cores, one worker per core (module notes): from the Python CPU per
    sequence-row and the cell's CPU per call at each worker's batch."""
    calls = max(3, rows // 2)
    batches = sorted({s // min(n, s) for n in (1, 2, *PROJECTED_CORES)})  # more workers than sequences: some idle
    cell = {b: cell_call_cpu(runner, batch_spec(specs[0], b), calls) for b in batches}
    step_one = s * py + cell[s]
    out = {"cell_ms_per_call": {str(b): 1e3 * v for b, v in cell.items()}, "model_step_ms": {"1": 1e3 * step_one}}
    share = s * py / step_one
    for n in (2, *PROJECTED_CORES):
        b = s // min(n, s)
        step = max(s * py, b * py + cell[b])
        out["model_step_ms"][str(n)] = 1e3 * step
        out[str(n)] = {"speedup": step_one / step, "pixels_per_s": one_worker_px * step_one / step,
                       "amdahl": 1 / (share + (1 - share) / n), "batch_per_call": b,
                       "limit": "GIL (Python of every sequence)" if s * py >= (s / n) * py + cell[b] else "a worker's call and Python"}
    out["amdahl_limit"] = 1 / share
    return out


# ---------------------------------------------------------------------------- through Triton

def variant(manifest: dict, suffix: str) -> dict:
    return {**manifest, "name": f"{manifest['name']}_{suffix}"}


def through_triton(args, manifest: dict, folder: Path, workdir: Path, images: dict) -> dict:
    """The samplers of each worker count and the scorer variants on one tritonserver."""
    from bench.serving import row_stream, sampler_cell_seconds, stream_sample
    from pixelrnn.client.library import PixelClient
    from pixelrnn.server.launcher import TritonServer
    from pixelrnn.server.repository import write_repository

    repository = workdir / "variants"
    for n in args.workers:
        write_repository(variant(manifest, f"w{n}"), folder, repository, engine_workers=n)
    for suffix, settings in SCORER_VARIANTS.items():
        write_repository(variant(manifest, suffix), folder, repository, sampler=False, **settings)
    shape, max_batch = tuple(manifest["shape"]), int(manifest["max_batch"])
    c, h, w = shape
    rng = np.random.default_rng(args.seed)
    score_images = rng.integers(0, manifest["levels"], (args.score_images, c, h, w)).astype(np.uint8)
    score_labels = labels_for(manifest, args.score_images)
    with TritonServer(repository, log_path=workdir / "triton.log") as server:
        account = CpuAccount(server.process.pid, pin_apart=False)  # the server's and the clients' CPU per path
        most = max(args.streams)
        streams = [row_stream(server.grpc_url) for _ in range(most)]
        scorers = {k: [PixelClient(server.grpc_url, model=variant(manifest, k)["name"]) for _ in range(args.score_clients)]
                   for k in ("w1" if 1 in args.workers else f"w{min(args.workers)}", *SCORER_VARIANTS)}
        base = next(iter(scorers))
        drawn: dict[str, list] = {}

        def concurrent(n, k):
            model = variant(manifest, f"w{n}")["name"]

            def run():
                seconds, out = together([lambda i=i: stream_sample(streams[i], model, 1, args.seed + i, labels_for(manifest, 1, i),
                                                                   shape)[0] for i in range(k)])
                drawn.setdefault(f"{n}/{k}", []).append(out)
                return seconds
            return run

        def score(kind, clients):
            def run():
                requests = ([(a, a + 1) for a in range(args.score_images)] if clients > 1 else
                            [(a, min(a + max_batch, args.score_images)) for a in range(0, args.score_images, max_batch)])

                def job(j):
                    for a, b in requests[j::clients]:
                        scorers[kind][j].score(score_images[a:b], None if score_labels is None else score_labels[a:b])
                return together([lambda j=j: job(j) for j in range(clients)])[0]
            return run

        paths = {f"streams/{n}/{k}": concurrent(n, k) for k in args.streams for n in args.workers}
        for kind in scorers:
            paths.update({f"score/{kind}/concurrent": score(kind, args.score_clients), f"score/{kind}/chunks": score(kind, 1)})
        cell_seconds: dict[str, list[float]] = {}  # streams path -> its sampler's wall seconds in cell calls, per timed run

        def once(name, fn, timed_run):
            model = variant(manifest, f"w{name.split('/')[1]}")["name"] if name.startswith("streams/") else None
            before = sampler_cell_seconds(server, model) if model and timed_run else None
            with account.run(name, count=timed_run):
                seconds = fn()
            if before is not None:
                cell_seconds.setdefault(name, []).append(sampler_cell_seconds(server, model) - before)
            return seconds

        try:
            runs = interleaved(paths, args.repeats, once=once)
        finally:
            for stream in streams:
                stream.close(cancel=True)
            for clients in scorers.values():
                for client in clients:
                    client.close()
    streams_out = {}
    for k in args.streams:
        figures = {str(n): rate(runs[f"streams/{n}/{k}"], k * c * h * w) for n in args.workers}
        one = figures[str(min(args.workers))]["pixels_per_s"]
        for n, f in figures.items():
            f["vs_one_worker"] = f["pixels_per_s"] / one
            # CPU seconds per run of the server (tritonserver and its stubs) and of the clients (this
            # process), and the cores they kept busy together: near the usable cores, the CPUs are the limit.
            cpu = {who: v / args.repeats for who, v in account.seconds[f"streams/{n}/{k}"].items()}
            f["cpu_s_per_run"] = cpu
            f["cores_busy"] = (cpu["server"] + cpu["client"]) * args.repeats / sum(runs[f"streams/{n}/{k}"])
            # The share of a run each worker spent in cell calls (the sampler's metric, every worker's
            # added up): well below 1, the workers waited for the response path, not for the cells.
            f["worker_cell_share"] = sum(cell_seconds[f"streams/{n}/{k}"]) / (int(n) * sum(runs[f"streams/{n}/{k}"]))
        streams_out[str(k)] = figures
    scoring = {}
    for how in ("concurrent", "chunks"):
        figures = {kind: rate(runs[f"score/{kind}/{how}"], args.score_images, "images") for kind in scorers}
        for f in figures.values():
            f["vs_shipped"] = f["images_per_s"] / figures[base]["images_per_s"]
        scoring[how] = figures
    # Through Triton each stream i draws seed + i: the in-process images of the same seeds.
    same = all(np.array_equal(got, want) for runs_ in drawn.values() for run in runs_ for got, want in zip(run, images[max(images)]))
    return {"streams": streams_out, "scoring": {"images": args.score_images, "clients": args.score_clients, "chunk": max_batch,
                                                "variants": {"shipped": {"score_instances": 1, "onnx_threads": 1},
                                                             **SCORER_VARIANTS}, **scoring},
            "identical": same, "server": {"models": server.models, "transport": "gRPC on loopback",
                                          "settings": "the repository writer's defaults; engine_workers per sampler"}}


# ---------------------------------------------------------------------------- report and CLI

def targets(r: dict) -> dict:
    def ratio(by_workers: dict | None) -> float | None:
        return (by_workers or {}).get("2", {}).get("vs_one_worker")

    sequences = r["in_process"]["sequences"]
    out = {}
    for key, value in (("in_process_64", ratio(sequences.get("64", {}).get("workers"))),
                       ("in_process_16", ratio(sequences.get("16", {}).get("workers"))),
                       ("triton_64", ratio(r["triton"]["streams"].get("64")) if r.get("triton") else None)):
        target = TARGETS[key]
        met = None if value is None else (value > target if key.startswith("triton") else value >= target)
        out[key] = {"value": value, "target": target, "met": met}
    return out


def report(payload: dict) -> str:
    r, cfg = payload["results"], payload["config"]
    ip = r["in_process"]
    lines = [f"in process: single-image sequences, pixels/s by engine workers (x one worker)"]
    for s, x in ip["sequences"].items():
        cells = ", ".join(f"{n} workers {f['pixels_per_s']:.0f} ({f['vs_one_worker']:.2f}x; cells alone "
                          f"{f['cells_alone']['vs_one_thread']:.2f}x)" for n, f in x["workers"].items())
        lines.append(f"  {s:>3} sequences: {cells}; Python {x['python_us_per_row']:.0f} us + cell {x['cell_us_per_row']:.0f} us "
                     f"CPU per sequence-row ({100 * x['python_share']:.0f}% Python)")
        pr = x["projection"]
        lines.append("       projected: " + ", ".join(f"{n} cores {pr[str(n)]['speedup']:.2f}x (Amdahl {pr[str(n)]['amdahl']:.2f}x)"
                                                    for n in (2, *PROJECTED_CORES)) + f"; at most {pr['amdahl_limit']:.1f}x")
    if r.get("triton"):
        lines.append("through tritonserver: concurrent single-image streams, pixels/s by engine workers (x one worker)")
        for k, x in r["triton"]["streams"].items():
            lines.append(f"  {k:>3} streams: " + ", ".join(f"{n} workers {f['pixels_per_s']:.0f} ({f['vs_one_worker']:.2f}x; "
                                                       f"server {f['cpu_s_per_run']['server']:.2f} + clients "
                                                       f"{f['cpu_s_per_run']['client']:.2f} CPU s a run, {f['cores_busy']:.2f} "
                                                       f"cores busy, each worker {100 * f['worker_cell_share']:.0f}% in cell calls)"
                                                       for n, f in x.items()))
        sc = r["triton"]["scoring"]
        for how in ("concurrent", "chunks"):
            lines.append(f"  scorer, {how}: " + ", ".join(f"{kind} {f['images_per_s']:.0f} images/s ({f['vs_shipped']:.2f}x)"
                                                          for kind, f in sc[how].items()))
    for key, t in payload["targets"].items():
        if t["value"] is not None:
            lines.append(f"target {key}: {t['value']:.2f} vs {t['target']:g}: {'met' if t['met'] else 'NOT met'}")
    b = payload["background"]
    lines.append(f"meanwhile: niced processes {b['niced_cpu_s']:.0f} CPU s, other processes {b['other_cpu_s']:.0f} CPU s, "
                 f"this benchmark (its server included) {b['benchmark_cpu_s']:.0f} CPU s in {b['wall_s']:.0f} s (autogroup "
                 f"{b['autogroup']}, this session's group nice {b['autogroup_nice']})")
    lines.append(f"identical images: {'yes' if r['identical'] else 'NO'}")
    lines.append(machine_line(payload["machine"], repeats=cfg["repeats"]))
    return "\n".join(lines)


def counts(text: str, what: str, p: argparse.ArgumentParser) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        p.error(f"--{what} must be comma-separated numbers, got {text!r}")
    if not values or values[0] < 1:
        p.error(f"--{what} must list counts >= 1")
    return values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.engine_workers", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="the model to export (and serve)")
    p.add_argument("--workers", default="1,2", help="engine worker counts to compare (the first is the baseline)")
    p.add_argument("--sequences", default="16,64", help="single-image sequences at once, in process")
    p.add_argument("--streams", default="16,64", help="concurrent single-image streams through Triton")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--score-images", type=int, default=256)
    p.add_argument("--score-clients", type=int, default=16)
    p.add_argument("--no-triton", dest="triton", action="store_false", help="in process only")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.workers, args.sequences, args.streams = (counts(getattr(args, k), k, p) for k in ("workers", "sequences", "streams"))
    if args.repeats < 1 or args.score_images < 1 or args.score_clients < 1:
        p.error("--repeats, --score-images and --score-clients must be at least 1")
    if args.triton and max(args.streams) > max(args.sequences):
        p.error("--streams must not exceed the most --sequences (streams are checked against those images)")
    machine, meanwhile = machine_info(), {}  # before the run: its load average
    with tempfile.TemporaryDirectory(prefix="bench-engine-workers-") as tmp, background(meanwhile):
        manifest, folder, _, seconds = export(args.checkpoint, Path(tmp))
        if max(args.sequences) > int(manifest["max_batch"]):
            raise SystemExit(f"--sequences must be at most the model's max batch {manifest['max_batch']}")
        measured, images = in_process(args, manifest, folder)
        served = through_triton(args, manifest, folder, Path(tmp), images) if args.triton else None
    measured = {"in_process": measured, "triton": served,
                "identical": measured["identical"] and (served is None or served["identical"])}
    config = {k: getattr(args, k) for k in ("checkpoint", "workers", "sequences", "streams", "repeats", "score_images",
                                            "score_clients", "triton", "seed")}
    payload = result("engine_workers", model_record(manifest, args.checkpoint, export_seconds=seconds), machine,
                     config=config, background=meanwhile, results=measured)
    payload["targets"] = targets(measured)
    finish(payload, args.json, report(payload))
    return 0 if measured["identical"] else 1


if __name__ == "__main__":
    reexec_with_malloc_env("bench.engine_workers", sys.argv[1:])
    sys.exit(main())
