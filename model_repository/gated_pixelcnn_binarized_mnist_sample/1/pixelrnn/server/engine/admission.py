"""How much work the sampler may hold: the live-images budget from the manifest's state sizes,
and giving freed memory back to the operating system.

A sequence of B images holds, per image, the cell state of its current stage (the manifest
lists each state tensor's shape, the batch axis first) and its canvases (int64, every stage).
During a cell call the state exists twice more: the batch's concatenated input and the cell's
output, before the output is split back per sequence. The budget counts an image as its canvases
plus three copies of its largest stage state, so `memory_mb` bounds what the states can take.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math

import numpy as np

DEFAULT_MEMORY_MB = 512  # the sampler's state budget when the repository does not name one
STATE_COPIES = 3  # held + concatenated input + output of a call (see the module notes)


def image_bytes(manifest: dict) -> int:
    """Bytes one live image costs the sampler (module notes), from the manifest's state shapes."""
    stage_state = []
    for name in manifest["stages"]:
        tensors = manifest["artifacts"][name].get("state", [])
        stage_state.append(sum(math.prod(int(d) for d in t["shape"][1:]) * np.dtype(t["dtype"]).itemsize for t in tensors))
    c, h, w = manifest["shape"]
    canvases = c * h * w * 8
    small = (manifest.get("multiscale") or {}).get("small_shape")
    if small:
        canvases += math.prod(int(d) for d in small) * 8
    return STATE_COPIES * max(stage_state, default=0) + canvases


def live_images_budget(manifest: dict, memory_mb: float = DEFAULT_MEMORY_MB) -> int:
    """Live images that fit `memory_mb` (at least one full sequence, max_batch images)."""
    return max(int(manifest["max_batch"]), int(memory_mb * 2**20) // max(1, image_bytes(manifest)))


def _malloc_trim():
    """glibc's malloc_trim, or None (another C library, or none found)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


_TRIM = _malloc_trim()


def give_back_memory() -> bool:
    """Return the allocator's free memory to the OS; whether any was returned. The servers run
    with MALLOC_TRIM_THRESHOLD_ / MALLOC_MMAP_THRESHOLD_ high (Makefile, bench/common.py: fewer
    page faults per cell call), so glibc never trims by itself and a flood's states would stay
    resident after they are freed; the engine calls this when it goes idle. It reaches what was
    malloc'ed only, which is why runtime/onnx_graphs.make_session turns onnxruntime's CPU memory
    arena off: the arena would keep the cell outputs' memory, most of a flood's states, for itself."""
    return bool(_TRIM(0)) if _TRIM is not None else False
