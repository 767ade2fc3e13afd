"""What the self-contained repository costs to serve: tritonserver's resident memory (server and
Python-backend stubs together) and the time from start to ready, for the shipped model (each
repository's own: where the shipped model changed since --before, "before" serves the one then
shipped, named in the JSON's "before_model"):

    before    the repository as committed at --before (default d60f370, the last commit whose
              models imported the project checkout, and through it torch), served from that
              tree with the full environment
    full      today's model_repository/ with the full environment (.venv: torch installed,
              unused by the models)
    runtime   today's model_repository/ copied out of the project, served from an environment
              holding only numpy + onnxruntime (server/runtime_env.py)

    python -m bench.deployment [--json bench/results/deployment.json] [--repeats 3]

Each configuration starts, is measured, and stops --repeats times, interleaved (before, full,
runtime, before, ...); medians with min/max. RSS is read from /proc after one score and one
sample request (the models' imports done), summed over every process of the server's group.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import model_record, reexec_with_malloc_env, result, write_json
from pixelrnn.client import PixelClient
from pixelrnn.server.launcher import PROJECT_ROOT, TritonServer
from pixelrnn.server.runtime_env import make_runtime_env

BEFORE = "d60f370"


def sampler_manifest(repository: Path) -> tuple[dict, Path]:
    """The manifest of the repository's one sampler (NAME_sample/1), and its folder."""
    folder = next(iter(sorted(repository.glob("*_sample/1"))), None)
    if folder is None:
        raise SystemExit(f"error: no NAME_sample/1 model in {repository}")
    return json.loads((folder / "manifest.json").read_text()), folder


def group_rss_mib(pgid: int) -> tuple[float, int]:
    """(resident MiB summed over the processes of process group `pgid`, how many processes)."""
    total, count = 0, 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:  # fields after the command name: state, ppid, pgrp, ...
                continue
            status = (stat.parent / "status").read_text()
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
        kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        total, count = total + kib, count + 1
    return total / 1024, count


def checkout(rev: str, folder: Path) -> Path:
    """The project tree at `rev` (git archive), for the 'before' repository and the code it imports."""
    archive = folder / "before.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "archive", rev], cwd=PROJECT_ROOT, stdout=f, check=True, timeout=120)
    with tarfile.open(archive) as tar:
        tar.extractall(folder / "tree", filter="data")
    return folder / "tree"


def measure(repository: Path, venv: Path, log: Path) -> dict:
    manifest, _ = sampler_manifest(repository)
    started = time.perf_counter()
    with TritonServer(repository, venv=venv, log_path=log) as server:
        ready_s = time.perf_counter() - started
        with PixelClient(server.grpc_url, model=manifest["name"]) as client:
            client.score(np.zeros((2, *manifest["shape"]), np.uint8))
            client.sample_images(1, seed=0)
        rss, processes = group_rss_mib(server.process.pid)
    return {"ready_s": ready_s, "rss_mib": rss, "processes": processes}


def stats(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3),
            "runs": [round(v, 3) for v in values]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.deployment", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default="bench/results/deployment.json")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--before", default=BEFORE, help="git revision of the 'before' repository")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-deployment-") as tmp:
        tmp = Path(tmp)
        print(f"preparing: {args.before} tree, runtime environment", file=sys.stderr, flush=True)
        before_tree = checkout(args.before, tmp)
        before_model = sampler_manifest(before_tree / "model_repository")[0]["name"]
        portable = tmp / "portable" / "model_repository"
        shutil.copytree(PROJECT_ROOT / "model_repository", portable)
        runtime_venv = make_runtime_env(tmp / "runtime-venv")
        configs = {
            "before": (before_tree / "model_repository", PROJECT_ROOT / ".venv"),
            "full": (PROJECT_ROOT / "model_repository", PROJECT_ROOT / ".venv"),
            "runtime": (portable, runtime_venv),
        }
        runs: dict[str, list[dict]] = {k: [] for k in configs}
        for i in range(args.repeats):
            for name, (repository, venv) in configs.items():
                runs[name].append(measure(repository, venv, tmp / f"{name}-{i}.log"))
                print(f"{name} #{i + 1}: {runs[name][-1]}", file=sys.stderr, flush=True)
    results = {name: {"ready_s": stats([r["ready_s"] for r in rs]), "rss_mib": stats([r["rss_mib"] for r in rs]),
                      "processes": rs[-1]["processes"]} for name, rs in runs.items()}
    before_rss = results["before"]["rss_mib"]["median"]
    manifest, folder = sampler_manifest(PROJECT_ROOT / "model_repository")
    payload = {
        **result("deployment", model_record(manifest, folder=folder)), "before_model": before_model,
        "before_revision": args.before, "repeats": args.repeats, "results": results,
        "ratios_of_medians": {
            "rss_runtime_vs_before": round(results["runtime"]["rss_mib"]["median"] / before_rss, 3),
            "rss_full_vs_before": round(results["full"]["rss_mib"]["median"] / before_rss, 3),
            "ready_runtime_vs_before": round(results["runtime"]["ready_s"]["median"] / results["before"]["ready_s"]["median"], 3),
        },
    }
    write_json(args.json, payload)
    for name, r in results.items():
        print(f"{name:<8} ready {r['ready_s']['median']:6.2f} s   RSS {r['rss_mib']['median']:7.1f} MiB ({r['processes']} processes)")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    reexec_with_malloc_env("bench.deployment", sys.argv[1:])
    sys.exit(main())
