"""The Python environment a deployed model repository needs: numpy<2 and onnxruntime, nothing
else (no torch, no project). Triton's Python backend stub runs its models in it (put its bin/
first on PATH, or pass it to server.launcher.TritonServer(venv=...)).

    python -m pixelrnn.server.runtime_env DIR      # a virtual environment with the pinned versions

The versions are the project's own pins (the running interpreter's numpy and onnxruntime), so
the served graphs run on exactly what the exporter checked them against.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy
import onnxruntime


def requirements() -> list[str]:
    return [f"numpy=={numpy.__version__}", f"onnxruntime=={onnxruntime.__version__}"]


def make_runtime_env(folder: str | Path, timeout: float = 600) -> Path:
    """Create `folder` as a virtual environment holding only the runtime's requirements (and
    their own dependencies), installed from the package index. Raises RuntimeError saying why."""
    folder = Path(folder)
    made = subprocess.run([sys.executable, "-m", "venv", str(folder)], capture_output=True, text=True, timeout=180)
    if made.returncode:
        raise RuntimeError(f"cannot create a virtual environment at {folder}: {made.stderr.strip().splitlines()[-1:]}")
    pip = [str(folder / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", *requirements()]
    done = subprocess.run(pip, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"pip could not install {' '.join(requirements())} into {folder}: {done.stderr.strip()[-500:]}")
    return folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pixelrnn.server.runtime_env", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="where to create the virtual environment")
    args = p.parse_args(argv)
    try:
        make_runtime_env(args.folder)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.folder}: {' '.join(requirements())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
