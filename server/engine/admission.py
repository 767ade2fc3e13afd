"""Which STARTs the row engine (server/engine/scheduler.py) takes in, and how much memory it
holds: the live-images budget, the admission queue, and giving freed memory back to the OS.

Budget. A sequence of B images holds, per image, the cell state of its current stage (the
manifest lists each state tensor's shape, the batch axis first) and its canvases (int64, every
stage). During a cell call the state exists twice more: the batch's concatenated input and the
cell's output, before the output is split back per sequence. The budget counts an image as its
canvases plus three copies of its largest stage state, so `memory_mb` bounds what the states can
take (`live_images_budget`).

Admission. With a budget (`max_images`) the images of all live sequences stay within it: a START
that does not fit is refused at once with `Overloaded`, which names the budget and the load (the
caller answers "try later"). With an admission queue (`max_waiting` N > 0, `wait_s`) such a
START waits instead, first come first served, while fewer than N wait: it is admitted as soon as
it fits (as sequences end), or refused with the same overloaded message once it has waited
`wait_s`; a START that fits waits too while others wait (nobody is passed over), and a full
queue refuses at once. Requests of a waiting sequence (resume, forget) go in right after its
START.

Memory. When the last sequence is freed the engine gives the allocator's free memory back to the
OS (`give_back_memory`), as the servers' malloc settings keep glibc from doing it by itself.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import numpy as np

from pixelrnn.runtime.protocol import OVERLOADED

DEFAULT_MEMORY_MB = 512  # the sampler's state budget when the repository does not name one
STATE_COPIES = 3  # held + concatenated input + output of a call (module notes, Budget)


def image_bytes(manifest: dict) -> int:
    """Bytes one live image costs the sampler (module notes, Budget), from the manifest's state shapes."""
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


class Overloaded(RuntimeError):
    """A START that does not fit the sampler's live-images budget: the client should retry later."""


@dataclass(eq=False)  # compared by identity (the spec holds arrays)
class Waiting:
    """A START waiting in the admission queue for room in the budget."""

    key: Hashable
    spec: Any  # the sequence's SampleSpec (its batch is what it needs of the budget)
    request: Any  # the engine's request of the START (its sink gets a refusal)
    deadline: float  # engine clock: refused as overloaded if still waiting then
    later: list = field(default_factory=list)  # inbox items of the same sequence sent meanwhile (resume, forget)


class Admission:
    """The live-images budget and the admission queue of one engine (module notes, Admission).
    Its state is under the engine's lock (`lock`, a Condition on an RLock: the engine may hold
    it already); `post(item)` queues an admitted START, or a request of its sequence, for the
    engine's worker, and raises RuntimeError once the engine stops."""

    def __init__(self, lock: threading.Condition, post: Callable[[tuple], None], clock: Callable[[], float],
                 max_batch: int, max_images: int | None = None, max_waiting: int = 0, wait_s: float = 0.0):
        if max_images is not None and max_images < max_batch:
            raise ValueError(f"max_images ({max_images}) must hold at least one full sequence (max_batch {max_batch})")
        if max_waiting < 0 or (max_waiting and not (wait_s > 0 and max_images is not None)):
            raise ValueError(f"an admission queue (max_waiting {max_waiting}) needs a budget (max_images) and a wait > 0 s, "
                             f"got max_images {max_images}, wait_s {wait_s}")
        self._lock, self._post, self._clock = lock, post, clock
        self.max_images = max_images  # live-images budget (None: unbounded)
        self.max_waiting, self.wait_s = max_waiting, wait_s  # the admission queue (0: none)
        self.images = 0  # images of live and admitted sequences
        self.waiting: deque[Waiting] = deque()  # STARTs waiting for room, oldest first
        # STARTs admitted (at once or after waiting), queued (they waited) and refused for the
        # budget (at once, or when their wait ran out)
        self.admitted = self.queued = self.overloaded = 0
        self._closed = False  # the engine is stopping: nobody is admitted any more

    def start(self, key: Hashable, spec, request) -> None:
        """Admit a START (`spec.batch` images) or queue it; raises Overloaded when it can do
        neither, ValueError when sequence `key` already waits."""
        with self._lock:  # admission and queueing under one lock: concurrent STARTs cannot overshoot
            if self.waiting_for(key) is not None:
                raise ValueError(f"sequence {key} is already waiting for room in the sampler: a START request needs a new "
                                 f"sequence id")
            if self.max_images is None or (not self.waiting and self.images + spec.batch <= self.max_images):
                self._admit(key, spec, request)
            elif len(self.waiting) < self.max_waiting:  # FIFO: a START that fits does not pass one that waits
                self.waiting.append(Waiting(key, spec, request, self._clock() + self.wait_s))
                self.queued += 1
                self._lock.notify()  # the worker wakes by this deadline at the latest (Engine._loop)
            else:
                self.overloaded += 1
                full = f" and the admission queue is full ({len(self.waiting)} STARTs wait)" if self.max_waiting else ""
                raise Overloaded(f"{self.load()}; a START of {spec.batch} more does not fit{full}: retry later")

    def hold(self, item) -> bool:
        """Keep a request of a sequence whose START waits (item[1] is its key) to go in right
        after that START; False if no START of that sequence waits."""
        with self._lock:
            waiting = self.waiting_for(item[1])
            if waiting is not None:
                waiting.later.append(item)
            return waiting is not None

    def waiting_for(self, key: Hashable) -> Waiting | None:
        """The waiting START of sequence `key`, if any (the queue is short: max_waiting)."""
        with self._lock:
            return next((w for w in self.waiting if w.key == key), None)

    def deadline(self) -> float | None:
        """When the oldest waiting START runs out of time (engine clock); None: none waits."""
        with self._lock:
            return self.waiting[0].deadline if self.waiting else None

    def load(self) -> str:
        """How an overloaded refusal begins: the load and the budget."""
        with self._lock:
            return f"{OVERLOADED} the sampler holds {self.images} live images, its budget is {self.max_images} (max_live_images)"

    def release(self, images: int) -> None:
        """A sequence's images left the budget (freed, or admitted and never opened)."""
        with self._lock:
            self.images -= images
            self._admit_waiting()

    def expire(self, cancelled: Callable[[Any], bool]) -> list[tuple[Waiting, str]]:
        """Take out the waiting STARTs whose wait ran out (overloaded, as a START refused at once
        is) and those whose client is gone (`cancelled(request)`, called without the lock: it may
        be a round trip to the server), then admit what fits behind them. Returns each one taken
        out with the error its sink is owed."""
        with self._lock:
            waiting = list(self.waiting)
        if not waiting:
            return []
        now = self._clock()
        gone = [(w, None if now >= w.deadline else "cancelled") for w in waiting if now >= w.deadline or cancelled(w.request)]
        refusals = []
        with self._lock:
            for w, message in gone:
                if w in self.waiting:  # not admitted meanwhile
                    self.waiting.remove(w)
                    if message is None:
                        self.overloaded += 1
                        message = (f"{self.load()}; a START of {w.spec.batch} more waited {self.wait_s:g} s for room "
                                   f"(admission_wait_ms): retry later")
                    refusals.append((w, message))
            self._admit_waiting()  # a big START gone from the head may let the smaller ones behind it in
        return refusals

    def close(self) -> None:
        """Admit nobody any more (the engine is stopping)."""
        with self._lock:
            self._closed = True

    def take_waiting(self) -> list[Waiting]:
        """Empty the queue; returns the STARTs that were waiting (each is owed a refusal)."""
        with self._lock:
            waiting = list(self.waiting)
            self.waiting.clear()
        return waiting

    def _admit(self, key: Hashable, spec, request, later: list = ()) -> None:
        """Take sequence `key` into the budget and queue its START (and what came for it
        meanwhile) for the worker (under the lock)."""
        self._post(("start", key, spec, request))
        for item in later:
            self._post(item)
        self.images += spec.batch
        self.admitted += 1

    def _admit_waiting(self) -> None:
        """Admit the waiting STARTs, oldest first, while the oldest fits (under the lock)."""
        while self.waiting and not self._closed and self.images + self.waiting[0].spec.batch <= self.max_images:
            waiting = self.waiting.popleft()
            self._admit(waiting.key, waiting.spec, waiting.request, waiting.later)
