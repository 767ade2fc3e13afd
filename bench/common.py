"""What every benchmark shares: allocator settings, machine facts, timing, the model a result was
measured on, serving a checkpoint on a real tritonserver, its metrics, the in-process references
served images and scores are checked against, and the JSON output: `result()` puts "machine"
(date, CPU, cores, load average, versions) and "model" (name, architecture, size, checkpoint)
at the top level of every result.

glibc's malloc reads MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ only at process start, and
with its defaults a small-batch forward pass in a fresh process runs about half as fast (memory
is mapped and returned to the kernel on every call; see ../shared/CALIBRATION.md). The Makefile
exports both; a benchmark started another way re-executes itself with them (`reexec_with_malloc_env`)
and every result records what was in effect.
Serving imports (tritonclient, the launcher) are inside the functions that need them: the
benches that serve nothing (bench.sampling on a GPU machine, say) run without them.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
NO_REEXEC = "BENCH_NO_REEXEC"  # set (to anything) to run with whatever allocator settings are there
SCORE_RTOL, SCORE_ATOL = 1e-5, 1e-3  # nats: the batch a score is computed in changes float32 rounding


# ---------------------------------------------------------------------------- the process and the machine

def malloc_env_set() -> bool:
    return all(os.environ.get(k) == v for k, v in MALLOC_ENV.items())


def reexec_with_malloc_env(module: str, argv: list[str]) -> None:
    """Replace this process by `python -m module argv` with MALLOC_ENV set, unless it already is
    (or BENCH_NO_REEXEC is set). Call it first thing under `if __name__ == "__main__"`."""
    if malloc_env_set() or os.environ.get(NO_REEXEC):
        return
    env = {**os.environ, **MALLOC_ENV, NO_REEXEC: "1"}  # NO_REEXEC: never loop
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(libraries: bool = True) -> dict:
    """When, where and on what: the date, the CPU, its cores and load average (> cores: others
    were busy too); with `libraries`, torch's threads, the versions and the allocator settings
    (without: nothing is imported, for a bench that only drives another program)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    facts = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "load_average_1_5_15": load_average(),
        "python": platform.python_version(),
    }
    if not libraries:
        return facts
    import torch

    try:
        import onnxruntime as ort

        ort_version = ort.__version__
    except ImportError:
        ort_version = None
    return {**facts, "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "onnxruntime": ort_version,
            "numpy": np.__version__, "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
            "malloc_env_set": malloc_env_set()}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def shown(path) -> str:
    """A path as a result records it: relative to the project where it lies inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(PROJECT_ROOT)) if path.is_relative_to(PROJECT_ROOT) else str(path)


# ---------------------------------------------------------------------------- timing

def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(wall seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def spread(runs: list[float]) -> dict:
    """What a timed path reports: the median as `seconds` (ratios and targets use it: on a shared
    CPU the best run flatters a path and the worst measures the neighbours), min, max, all runs."""
    return {"seconds": statistics.median(runs), "min_seconds": min(runs), "max_seconds": max(runs),
            "runs": [round(r, 6) for r in runs]}


def rate(runs: list[float], amount: float, unit: str = "pixels") -> dict:
    """spread(runs) and `amount` per median second, as "{unit}_per_s"."""
    s = spread(runs)
    return {**s, f"{unit}_per_s": amount / s["seconds"]}


def interleaved(paths: dict[str, Callable[[], object]], repeats: int,
                once: Callable[[str, Callable, bool], float] | None = None, warmup: bool = True) -> dict[str, list[float]]:
    """Every path once untimed (unless the caller did: `warmup`; sessions, connections,
    first-call allocations), then `repeats` timed rounds with the paths interleaved, so that load
    from other processes falls on them alike. -> {path: seconds of each timed run}.
    `once(name, fn, timed_run)`, if given, runs a path instead and returns its seconds."""
    runs: dict[str, list[float]] = {k: [] for k in paths}
    once = once or (lambda name, fn, timed_run: timed(fn)[0])
    if warmup:
        print("warm-up ...", file=sys.stderr, flush=True)
        for name, fn in paths.items():
            once(name, fn, False)
    for r in range(repeats):
        print(f"round {r + 1}/{repeats} ...", file=sys.stderr, flush=True)
        for name, fn in paths.items():
            runs[name].append(once(name, fn, True))
    return runs


def percentiles_ms(seconds: list[float]) -> dict:
    if not seconds:
        return {"count": 0}
    ms = np.asarray(seconds) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"count": int(ms.size), "p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(ms.max()),
            "mean": float(ms.mean())}


def timing_cells(s: dict, digits: int = 3) -> str:
    """A timed path's median and min-max as a report's columns."""
    return f"{s['seconds']:>10.{digits}f}{s['min_seconds']:>8.{digits}f}-{s['max_seconds']:<7.{digits}f}"


def together(jobs: list[Callable[[], object]]) -> tuple[float, list]:
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


class Errors:
    """Error messages from every thread, counted (the `keep` most common reported)."""

    def __init__(self, keep: int = 20):
        self.counts, self.keep, self._lock = Counter(), keep, threading.Lock()

    def add(self, message: str) -> None:
        with self._lock:
            self.counts[" ".join(str(message).split())] += 1

    def total(self) -> int:
        return sum(self.counts.values())

    def report(self) -> list[dict]:
        return [{"message": m, "count": k} for m, k in self.counts.most_common(self.keep)]


# ---------------------------------------------------------------------------- the model

def labels_for(manifest: dict, n: int, first: int = 0) -> np.ndarray | None:
    """Class labels first, first+1, ... (mod the classes) for a class-conditional model, else None."""
    k = manifest["num_classes"]
    return (np.arange(first, first + n) % k).astype(np.int64) if k else None


def model_record(manifest: dict, checkpoint=None, folder=None, **extra) -> dict:
    """What a result names as its model: the export's name, architecture, size and shape, and
    where it came from: the checkpoint exported, or the served folder and the checkpoint file its
    manifest names (with its sha256 and step either way)."""
    source = manifest.get("checkpoint") or {}
    record = {k: manifest.get(k) for k in ("name", "arch", "config", "shape", "levels", "max_batch")}
    record.update(checkpoint=shown(checkpoint) if checkpoint else source.get("file"),
                  checkpoint_sha256=source.get("sha256"), checkpoint_step=source.get("step"))
    if folder is not None:
        record["folder"] = shown(folder)
    return {**record, **extra}


def add_repository_args(parser) -> None:
    """The served repository's settings (server/repository.write_repository) as flags."""
    from pixelrnn.server.repository import COALESCE_MS

    parser.add_argument("--onnx-threads", type=int, default=1, help="onnxruntime intra-op threads, in the server and in process")
    parser.add_argument("--sender-threads", type=int, default=2, help="the sampler's response sender threads (0: none)")
    parser.add_argument("--coalesce-ms", type=float, default=COALESCE_MS, help="the sampler's row coalescing window (0: off)")
    parser.add_argument("--score-instances", type=int, default=1, help="instances of NAME_score in the server")
    parser.add_argument("--max-queue-delay-us", type=int, default=2000, help="NAME_score's dynamic batching delay")


REPOSITORY_SETTINGS = ("onnx_threads", "score_instances", "max_queue_delay_us", "sender_threads", "coalesce_ms")


def export(checkpoint, workdir: Path, settings: dict | None = None) -> tuple[dict, Path, Path, float]:
    """The checkpoint through export/build_engine (parity-checked; its progress to stderr) into
    workdir/export, and a Triton repository of it with `settings` (write_repository's keywords;
    none: its defaults) in workdir/repository. -> (manifest, export folder, repository, seconds)."""
    from pixelrnn.export import build_engine
    from pixelrnn.runtime.manifest import read_manifest
    from pixelrnn.server.repository import write_repository

    out, repository = workdir / "export", workdir / "repository"
    print(f"exporting {checkpoint} ...", file=sys.stderr, flush=True)
    with contextlib.redirect_stdout(sys.stderr):
        seconds, code = timed(lambda: build_engine.main(["--checkpoint", str(checkpoint), "--out", str(out), "--tensorrt", "off"]))
    if code:
        raise SystemExit(f"error: export of {checkpoint} failed (exit code {code})")
    manifest = read_manifest(out)
    write_repository(manifest, out, repository, **(settings or {}))
    return manifest, out, repository, seconds


class Served(NamedTuple):
    manifest: dict
    folder: Path  # the exported graphs (manifest.json, cells, scorer)
    server: object  # server.launcher.TritonServer
    record: dict  # the result's "server": version, models, the repository's settings
    model: dict  # the result's "model" (model_record)


@contextlib.contextmanager
def served(checkpoint, args=None, prefix: str = "bench-") -> Iterator[Served]:
    """The checkpoint exported into a temporary repository with the settings of `args` (the
    flags of add_repository_args) and served by tritonserver on free loopback ports."""
    from pixelrnn.server.launcher import TritonServer

    settings = {k: getattr(args, k) for k in REPOSITORY_SETTINGS if args is not None and hasattr(args, k)}
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        manifest, folder, repository, seconds = export(checkpoint, Path(tmp), settings)
        with TritonServer(repository, log_path=Path(tmp) / "triton.log") as server:
            record = {"tritonserver": triton_version(server), "models": server.models, **settings, "sample_instances": 1,
                      "max_batch": manifest["max_batch"], "transport": "gRPC on loopback"}
            yield Served(manifest, folder, server, record, model_record(manifest, checkpoint, export_seconds=seconds))


def triton_version(server) -> str | None:
    try:
        with urllib.request.urlopen(server.http_url + "/v2", timeout=5) as r:
            return json.loads(r.read()).get("version")
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------- the server's metrics

def metrics_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def metric(text: str, name: str, **labels: str) -> float | None:
    """The sum of the samples of metric `name` whose labels include `labels`, in a metrics page
    (None where there is none)."""
    found = None
    for have, value in re.findall(rf"^{re.escape(name)}{{([^}}]*)}}\s+(\S+)$", text, re.M):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', have))
        if all(fields.get(k) == v for k, v in labels.items()):
            found = (found or 0.0) + float(value)
    return found


def model_metrics(metrics_url: str, model: str, names: tuple[str, ...]) -> dict[str, float]:
    """The values of these metrics labelled with this model (NaN for one the server does not show)."""
    text = metrics_text(metrics_url)
    return {name: v if (v := metric(text, name, model=model)) is not None else float("nan") for name in names}


def sampler_metrics(metrics_url: str, model: str) -> dict:
    """{"live": gauge, "events": {event: count}} of a sampler's pixelrnn_sampler_* metrics."""
    text = metrics_text(metrics_url)
    live = metric(text, "pixelrnn_sampler_live_sequences", model=model)
    events = {}
    for have, value in re.findall(r"^pixelrnn_sampler_events_total{([^}]*)}\s+(\S+)$", text, re.M):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', have))
        if fields.get("model") == model:
            events[fields.get("event", "?")] = int(float(value))
    return {"live": None if live is None else int(live), "events": events}


# ---------------------------------------------------------------------------- streams and the in-process references

def stream_image(stream, model: str, n: int, seed: int, labels, per_response: int | None = None,
                 sequence_id: int | None = None) -> tuple[list, float]:
    """One sequence of n images on a client.stream.SampleStream to model's sampler, START and END
    in one request (`per_response`: its ROWS_PER_RESPONSE). -> (its rows, the send time). An error
    response raises RuntimeError, no final response within the stream's timeout StreamTimeout."""
    from pixelrnn.client.library import correlation_id
    from pixelrnn.client.stream import sample_inputs
    from pixelrnn.runtime import protocol as p

    sent = stream.send(p.sample_model(model), sequence_id or correlation_id(),
                       sample_inputs(batch=n, seed=seed, labels=labels, rows_per_response=per_response), start=True, end=True)
    rows, errors = stream.collect()
    if errors:
        raise RuntimeError(f"{p.sample_model(model)}: {errors[0]}")
    return rows, sent


class Collect:
    """An engine sink (the engine's Sink protocol) that keeps the rows and the errors."""

    def __init__(self):
        self.rows, self.errors = [], []
        self.error, self.done, self.cancelled = self.errors.append, (lambda: None), (lambda: False)

    def send_rows(self, events):
        from pixelrnn.client.library import Row

        self.rows += [Row(e.index, e.stage, e.row, e.logprob) for e in events]


def sample_engine(runner, max_batch: int, specs: list, shape) -> list[np.ndarray]:
    """Sequences (runtime.rowloop.SampleSpec) through the server's row engine in process, stepped
    on this thread (all of them in every cell call, as in the server). -> each one's images."""
    from pixelrnn.client.library import assemble
    from pixelrnn.server.engine import Engine

    engine, sinks = Engine(runner, max_batch=max_batch), [Collect() for _ in specs]
    for key, (spec, sink) in enumerate(zip(specs, sinks)):
        engine.start(key, spec, sink)
    while engine.step():
        pass
    errors = [e for sink in sinks for e in sink.errors]
    if errors:
        raise RuntimeError(f"engine: {errors[0]}")
    return [assemble(sink.rows, shape) for sink in sinks]


def score_in_process(scorer, images: np.ndarray, labels, max_batch: int) -> np.ndarray:
    """NLL nats (N,) from runtime.onnx_graphs.OnnxScorer, in chunks of max_batch as PixelClient.score sends them."""
    out = []
    for a in range(0, len(images), max_batch):
        nll, _ = scorer.score(images[a:a + max_batch], None if labels is None else labels[a:a + max_batch])
        out.append(nll)
    return np.concatenate(out)


def verify_content(samplers: list[dict], scorers: list[dict], manifest: dict, folder: Path, images: np.ndarray,
                   labels: np.ndarray | None, errors: Errors) -> dict:
    """After the run (not to load the CPUs during it): every streamed image must be the in-process
    sampler's for its seed (the exported cells through the engine in process, as
    runtime.rowloop draws them), every score the in-process scorer's NLL of its image (float32
    rounding depends on the batch: rtol 1e-5, atol 1e-3 nats). Mismatches are errors."""
    from pixelrnn.runtime.onnx_graphs import OnnxScorer
    from pixelrnn.runtime.rowloop import SampleSpec
    from pixelrnn.runtime.runner import OnnxRunner

    max_batch = int(manifest["max_batch"])
    drawn = [d for r in samplers for d in r["drawn"]]
    runner = OnnxRunner.from_manifest(manifest, folder)
    images_wrong = 0
    for a in range(0, len(drawn), max_batch):  # one engine run per max_batch sequences: batched like the server
        part = drawn[a:a + max_batch]
        want = sample_engine(runner, max_batch, [SampleSpec(batch=1, seed=seed, labels=lab) for seed, lab, _ in part],
                             tuple(manifest["shape"]))
        for (seed, _, got), expected in zip(part, want):
            if not np.array_equal(got, expected):
                images_wrong += 1
                errors.add(f"the image streamed for seed {seed} differs from the in-process sampler's "
                           f"({int((got != expected).sum())} sub-pixels)")
    expected_nll = score_in_process(OnnxScorer(folder / manifest["artifacts"]["scorer"]["file"]), images, labels, max_batch)
    answers = [a for r in scorers for a in r["answers"]]
    scores_wrong = 0
    for take, nll in answers:
        bad = ~np.isclose(nll, expected_nll[take], rtol=SCORE_RTOL, atol=SCORE_ATOL)
        if bad.any():
            scores_wrong += int(bad.sum())
            i = int(np.argmax(bad))
            errors.add(f"score of image {int(take[i])}: {nll[i]:.4f} nats, the in-process scorer says {expected_nll[take][i]:.4f}")
    return {"images_checked": len(drawn), "images_wrong": images_wrong,
            "scores_checked": int(sum(len(t) for t, _ in answers)), "scores_wrong": scores_wrong}


def score_images(checkpoint: str, manifest: dict, count: int, seed: int) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Images to score: the checkpoint's validation split where it is there and fits the model,
    else random levels (the content does not change a scoring pass's cost)."""
    from pixelrnn.training.checkpoint import load_checkpoint
    from pixelrnn.runtime.datasets import DataError, load

    shape, levels = tuple(manifest["shape"]), manifest["levels"]
    why = "no data spec in the checkpoint"
    try:
        spec = load_checkpoint(checkpoint).get("data")
        if spec:
            data = load(spec, "valid")
            if data.shape == shape and data.levels == levels:
                labels = data.labels[:count] if manifest["num_classes"] else None
                return data.images[:count], labels, f"{data.description} ({min(count, len(data))} images)"
            why = f"{data.description} images {data.shape} with {data.levels} levels do not fit the model"
    except (DataError, OSError, ValueError) as e:
        why = f"validation data not available ({e})"
    rng = np.random.default_rng(seed)
    return (rng.integers(0, levels, (count, *shape)).astype(np.uint8), labels_for(manifest, count),
            f"random levels ({why})")


SETTLE_S = 10.0  # samplers push their metrics every 0.5 s: how long to wait for the final counts


def settled_metrics(metrics_urls: list[str], model: str, completed: int) -> tuple[list[dict], float]:
    """The samplers' metrics (sampler_metrics, one server each) once together they count
    `completed` sequences and none is live, or after SETTLE_S (the caller checks) -> (metrics,
    seconds waited)."""
    start = time.perf_counter()
    while True:
        found = [sampler_metrics(url, model) for url in metrics_urls]
        done = all(m["live"] == 0 for m in found) and sum(m["events"].get("completed", 0) for m in found) >= completed
        if done or time.perf_counter() - start > SETTLE_S:
            return found, time.perf_counter() - start
        time.sleep(0.25)


# ---------------------------------------------------------------------------- the result

def result(benchmark: str, model: dict | None = None, machine: dict | None = None, **fields) -> dict:
    """A result's top level: the benchmark, the model it measured (left out by the benches whose
    models are built per architecture, each named in its own entry), the machine (now, unless
    given), then its own fields."""
    return {"benchmark": benchmark, **({"model": model} if model else {}), "machine": machine or machine_info(), **fields}


def machine_line(m: dict, **settings) -> str:
    """The machine facts a report ends with, and the settings given (name value, in order)."""
    extra = "".join(f", {k.replace('_', ' ')} {v}" for k, v in settings.items())
    malloc = f", malloc env {'set' if m['malloc_env_set'] else 'NOT set'}" if "malloc_env_set" in m else ""
    return f"{m['cpu']}, {m['cpu_count']} CPUs, load {m['load_average_1_5_15']}{extra}{malloc}"


def finish(payload: dict, path=None, text: str | None = None) -> None:
    """Print the report and write the JSON (when asked for)."""
    if text:
        print(text)
    if path:
        write_json(path, payload)


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
