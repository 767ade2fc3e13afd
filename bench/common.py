"""What every benchmark shares: the allocator settings, machine facts, timing, JSON output.

glibc's malloc reads MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ only at process start, and
with its defaults a small-batch forward pass in a fresh process runs about half as fast (memory
is mapped and returned to the kernel on every call; see ../shared/CALIBRATION.md). The Makefile
exports both; a benchmark started another way re-executes itself with them (`reexec_with_malloc_env`)
and every result records what was in effect.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
NO_REEXEC = "BENCH_NO_REEXEC"  # set (to anything) to run with whatever allocator settings are there


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


def machine_info() -> dict:
    import numpy as np
    import torch

    try:
        import onnxruntime as ort

        ort_version = ort.__version__
    except ImportError:
        ort_version = None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],  # > cpu count: others were busy too
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort_version,
        "numpy": np.__version__,
        "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
        "malloc_env_set": malloc_env_set(),
    }


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




def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
