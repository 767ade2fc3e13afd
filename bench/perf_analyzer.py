"""Triton's own load generator, perf_analyzer, against a served export NAME: a short, bounded
measurement of the scorer (NAME_score) and of the streaming sampler (NAME_sample).

    python -m bench.perf_analyzer --url HOST:GRPC_PORT --model NAME [--json PATH]
        [--repository model_repository] [--window-ms 2000] [--windows 3]
        [--score-batch 16] [--score-concurrency 2] [--sample-concurrency 4] [--timeout 120]

perf_analyzer is the binary the pinned tritonclient wheel ships (.venv/bin/perf_analyzer); it
links libb64.so.0d (Debian's libb64-0d) and libcudart.so.12 (PyPI's nvidia-cuda-runtime-cu12,
whose lib/ folder this wrapper puts on LD_LIBRARY_PATH); `make setup` installs both.

Request data. The scorer needs no file: --input-data zero, all-zero images (and class 0), valid
at any number of levels. perf_analyzer sends every input a model declares, and the scorer
declares IMAGES (+ LABELS) only; its default random data is one fixed pseudo-random byte
pattern, pixel values up to 255, which only a 256-level model accepts (any other answers
"IMAGES values must be in [0, levels)"). The sampler takes NAME_sample/perf_analyzer_input.json
of the repository (written by server/repository.py). What perf_analyzer 2.51 needs for the
sampler, a decoupled (streaming) stateful model:
  -i grpc --streaming --async   decoupled models only run over a gRPC stream
  --sequence-length 1 --sequence-length-variation 0
                                every sequence is one START request that also ends the sequence
                                (perf_analyzer sets both flags): it streams a whole image. Longer
                                sequences would repeat the START inputs in continuation
                                requests, which the sampler refuses.
  --input-data FILE             the START inputs (BATCH_SIZE, TEMPERATURE, SEED, + LABELS for a
                                class-conditional model, with its shape: a variable dimension);
                                optional inputs left out of the file (KNOWN, MAX_ROWS) are not
                                sent, so no --shape is needed. Without the file perf_analyzer
                                stops on KNOWN's variable shape.
  --sequence-id-range           not needed: ids count up from 1, one per sequence.
Each measurement is --windows time windows of --window-ms (--measurement-mode time_windows,
--max-trials = --windows) at a fixed concurrency, and the stability test is widened
(--stability-percentage 1000) so that the windows are reported as measured: on a shared 2-core
machine the load of the neighbours changes from window to window, and perf_analyzer's default
10 % test would otherwise fail the run (exit 2, nothing reported). A run still going after
--timeout seconds is killed.

Reported per model (JSON): perf_analyzer's own figures from its CSV report (throughput in
inferences = images per second, for the sampler also responses = rows per second; its client
latency percentiles, which for the streaming sampler run from the request to the final
response: one whole image), and, for the sampler, from perf_analyzer's profile export, the time
to the first streamed row and the number of responses per request. Errors counted: a non-zero
exit of perf_analyzer (it stops on the first failed request), requests Triton counts as failed
during the run (its per-model statistics, before and after), and sampler requests that did not
get every row. Exit status 1 if any.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import PROJECT_ROOT, machine_info, model_record, shown, write_json
from pixelrnn.runtime import protocol as p

PERF_INPUT = "perf_analyzer_input.json"  # the sampler's request data, server/repository.py writes it
SCORE_DATA = "zero"  # the scorer's: perf_analyzer's all-zero images (module notes)
STABILITY_PERCENTAGE = 1000


class PerfError(RuntimeError):
    """The measurement could not be made (the message says why, in one line)."""


# ---------------------------------------------------------------------------- the binary

def find_perf_analyzer(path: str | None = None) -> Path:
    candidates = [path] if path else [os.environ.get("PERF_ANALYZER"), Path(sys.executable).parent / "perf_analyzer",
                                      shutil.which("perf_analyzer")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise PerfError(f"perf_analyzer not found ({path or 'beside ' + sys.executable + ' or on PATH'}): "
                    "it comes with tritonclient==2.51.0 (`make setup`)")


def cudart_dir() -> Path | None:
    """lib/ of PyPI's nvidia-cuda-runtime-cu12 (libcudart.so.12, which perf_analyzer links)."""
    try:
        spec = importlib.util.find_spec("nvidia.cuda_runtime")
    except ImportError:
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        lib = Path(folder) / "lib"
        if list(lib.glob("libcudart.so.12*")):
            return lib
    return None


def perf_env() -> dict[str, str]:
    env = dict(os.environ)
    lib = cudart_dir()
    if lib is not None:
        env["LD_LIBRARY_PATH"] = str(lib) + (os.pathsep + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    return env


def check_binary(binary: Path, env: dict) -> str:
    """perf_analyzer's version; a missing shared library comes back as one line saying what to install."""
    result = subprocess.run([str(binary), "--version"], capture_output=True, text=True, env=env, timeout=60)
    out = (result.stdout + result.stderr).strip()
    if "error while loading shared libraries" in out:
        library = out.split("error while loading shared libraries:", 1)[1].split(":", 1)[0].strip()
        package = {"libb64.so.0d": "Debian's libb64-0d (apt-get install libb64-0d)",
                   "libcudart.so.12": "PyPI's nvidia-cuda-runtime-cu12"}.get(library, "the library")
        raise PerfError(f"{binary} cannot start: {library} is missing; install {package}, or run `make setup`")
    if result.returncode != 0:
        raise PerfError(f"{binary} --version failed (exit {result.returncode}): {out.splitlines()[-1] if out else ''}")
    found = re.search(r"Version (\S+)", out)
    return found.group(1) if found else out


# ---------------------------------------------------------------------------- the server

def server_info(url: str, models: list[str]) -> dict:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    try:
        client = grpcclient.InferenceServerClient(url)
        meta = client.get_server_metadata()
        for model in models:
            if not client.is_model_ready(model):
                raise PerfError(f"model {model} is not ready on the Triton server at {url}")
        config = client.get_model_config(models[-1]).config
        rows = [int(r) for r in config.parameters["stage_rows"].string_value.split(",")]
        client.close()
    except InferenceServerException as e:
        raise PerfError(f"cannot reach the Triton server at {url}: {e.message() or e}") from None
    return {"tritonserver": meta.version, "rows_per_image": sum(rows)}


def failures(url: str, model: str) -> tuple[int, int]:
    """(requests Triton counts as failed, as succeeded) for `model` since it loaded."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]["inference_stats"]
    client.close()
    return int(stats.get("fail", {}).get("count", 0)), int(stats.get("success", {}).get("count", 0))


# ---------------------------------------------------------------------------- one measurement

def command(binary: Path, url: str, model: str, input_data: Path | str, args, sampler: bool) -> list[str]:
    common = ["-m", model, "-u", url, "-i", "grpc", "--input-data", str(input_data),
              "--measurement-mode", "time_windows", "-p", str(args.window_ms), "--max-trials", str(args.windows),
              "--stability-percentage", str(STABILITY_PERCENTAGE)]
    if sampler:
        return [str(binary), *common, "--streaming", "--async", "--sequence-length", "1",
                "--sequence-length-variation", "0", "--concurrency-range", str(args.sample_concurrency)]
    return [str(binary), *common, "-b", str(args.score_batch), "--concurrency-range", str(args.score_concurrency)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def stream_figures(export: dict, rows: int) -> dict:
    """From perf_analyzer's profile export: per sampler request, the time to its first response
    (the first row) and to its last, and how many responses came (rows + the final one)."""
    requests = [r for experiment in export.get("experiments", []) for r in experiment.get("requests", [])]
    first = [(r["response_timestamps"][0] - r["timestamp"]) / 1e3 for r in requests if r["response_timestamps"]]
    last = [(r["response_timestamps"][-1] - r["timestamp"]) / 1e3 for r in requests if r["response_timestamps"]]
    incomplete = sum(1 for r in requests if len(r["response_timestamps"]) < rows)
    return {
        "requests": len(requests),
        "responses_per_request": sorted({len(r["response_timestamps"]) for r in requests}),
        "incomplete_requests": incomplete,
        "first_row_latency_us": {"p50": round(percentile(first, 50)), "p90": round(percentile(first, 90)),
                                 "p99": round(percentile(first, 99)), "avg": round(statistics.fmean(first))} if first else None,
        "image_latency_us": {"p50": round(percentile(last, 50)), "p99": round(percentile(last, 99))} if last else None,
    }


def measure(binary: Path, env: dict, url: str, model: str, input_data: Path | str, args, sampler: bool, rows: int) -> dict:
    if isinstance(input_data, Path) and not input_data.is_file():
        raise PerfError(f"no perf_analyzer input data at {input_data} (server/repository.py writes it; "
                        "rewrite the repository with this version)")
    with tempfile.TemporaryDirectory(prefix="perf_analyzer-") as tmp:
        report, profile = Path(tmp) / "report.csv", Path(tmp) / "profile.json"
        argv = command(binary, url, model, input_data, args, sampler)
        run_argv = argv + ["-f", str(report)] + (["--profile-export-file", str(profile)] if sampler else [])
        failed_before, ok_before = failures(url, model)
        start = time.monotonic()
        try:
            result = subprocess.run(run_argv, capture_output=True, text=True, env=env, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            raise PerfError(f"perf_analyzer on {model} still running after {args.timeout:g} s: stopped") from None
        seconds = time.monotonic() - start
        failed_after, ok_after = failures(url, model)
        out = (result.stdout + result.stderr).strip()
        row = next(csv.DictReader(report.open()), None) if report.is_file() else None
        data = shown(input_data) if isinstance(input_data, Path) else input_data
        shown_argv = ["perf_analyzer" if a == str(binary) else data if a == str(input_data) else a for a in argv]
        figures = {"command": " ".join(shown_argv),
                   "seconds": round(seconds, 2), "perf_analyzer_exit": result.returncode,
                   "server_failed_requests": failed_after - failed_before,
                   "server_successful_requests": ok_after - ok_before}
        if result.returncode != 0 or row is None:
            figures["perf_analyzer_output_tail"] = out.splitlines()[-6:]
            figures["errors"] = max(1, figures["server_failed_requests"])
            return figures
        concurrency = int(row["Concurrency"])
        figures.update({
            "concurrency": concurrency,
            "images_per_s": float(row["Inferences/Second"]),
            "latency_us": {k: int(row[f"{k} latency"]) for k in ("p50", "p90", "p95", "p99")},
        })
        for line in out.splitlines():
            line = line.strip()
            if line.startswith("Request count:"):
                figures["requests"] = int(line.split(":")[1])
            elif line.startswith("Avg latency:"):
                figures["latency_us"]["avg"] = int(line.split(":")[1].split()[0])
        if sampler:
            figures["rows_per_s"] = float(row["Response Throughput"])
            figures["streams"] = stream_figures(json.loads(profile.read_text()), rows)
        else:
            figures["batch"] = args.score_batch
        figures["errors"] = figures["server_failed_requests"] + (figures["streams"]["incomplete_requests"] if sampler else 0)
        return figures


def run(args) -> dict:
    binary = find_perf_analyzer(args.perf_analyzer)
    env = perf_env()
    version = check_binary(binary, env)
    score, sample = p.score_model(args.model), p.sample_model(args.model)
    server = server_info(args.url, [score, sample])
    repository = Path(args.repository)
    results = {}
    for key, model, sampler in (("score", score, False), ("sample", sample, True)):
        results[key] = measure(binary, env, args.url, model, repository / model / PERF_INPUT if sampler else SCORE_DATA,
                               args, sampler, server["rows_per_image"])
    # The served model as the repository describes it (its manifest), where the repository has it.
    manifest_path = repository / sample / "1" / "manifest.json"
    model = (model_record(json.loads(manifest_path.read_text()), folder=manifest_path.parent) if manifest_path.is_file()
             else {"name": args.model, "folder": None})
    return {
        "benchmark": "perf_analyzer",
        "model": model,
        "config": {"url": args.url, "model": args.model, "repository": shown(args.repository),
                   "measurement_mode": "time_windows", "window_ms": args.window_ms, "windows": args.windows,
                   "stability_percentage": STABILITY_PERCENTAGE, "score_batch": args.score_batch,
                   "score_concurrency": args.score_concurrency, "sample_concurrency": args.sample_concurrency,
                   "input_data": {"score": SCORE_DATA, "sample": f"{{model}}/{PERF_INPUT} of the repository"}},
        "perf_analyzer": version,
        "server": {**server, "url": args.url},
        "machine": machine_info(libraries=False),  # this process only drives perf_analyzer
        "results": results,
        "errors": sum(r["errors"] for r in results.values()),
    }


def describe(payload: dict) -> str:
    lines = []
    for key, r in payload["results"].items():
        name = f"{payload['config']['model']}_{key}"
        if r.get("perf_analyzer_exit") or "images_per_s" not in r:
            lines.append(f"{name}: perf_analyzer failed (exit {r['perf_analyzer_exit']}): " + " | ".join(r.get("perf_analyzer_output_tail", [])))
            continue
        text = f"{name}: {r['images_per_s']:.1f} images/s at concurrency {r['concurrency']}"
        if key == "sample":
            s = r["streams"]
            first = s["first_row_latency_us"] or {}
            text += (f", {r['rows_per_s']:.0f} rows/s; image p50 {r['latency_us']['p50'] / 1e3:.1f} ms, "
                     f"first row p50 {first.get('p50', 0) / 1e3:.1f} ms; {s['requests']} streams")
        else:
            text += f" (batch {r['batch']}); latency p50 {r['latency_us']['p50'] / 1e3:.1f} ms, p99 {r['latency_us']['p99'] / 1e3:.1f} ms"
        lines.append(text + f"; errors {r['errors']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.perf_analyzer", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the Triton server's gRPC endpoint, HOST:PORT")
    parser.add_argument("--model", required=True, help="the export's NAME (models NAME_score and NAME_sample)")
    parser.add_argument("--repository", default=str(PROJECT_ROOT / "model_repository"),
                        help="the served repository, for NAME_sample/perf_analyzer_input.json (default: model_repository/)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--window-ms", type=int, default=2000, help="perf_analyzer -p: one measurement window")
    parser.add_argument("--windows", type=int, default=3, help="windows per measurement (perf_analyzer --max-trials; at least 3)")
    parser.add_argument("--score-batch", type=int, default=16, help="images per scoring request (perf_analyzer -b)")
    parser.add_argument("--score-concurrency", type=int, default=2, help="scoring requests in flight")
    parser.add_argument("--sample-concurrency", type=int, default=4, help="sampling streams (sequences) at once")
    parser.add_argument("--timeout", type=float, default=120.0, help="kill a perf_analyzer run after this many seconds")
    parser.add_argument("--perf-analyzer", help="the binary (default: beside this Python, else on PATH)")
    args = parser.parse_args(argv)
    if args.windows < 3:
        parser.error("--windows must be at least 3 (perf_analyzer's stability test compares 3 windows)")
    try:
        payload = run(args)
    except (PerfError, OSError, subprocess.SubprocessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(payload))
    if args.json:
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    return 1 if payload["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
