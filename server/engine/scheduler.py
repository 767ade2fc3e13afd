"""The row engine: every active sampling sequence advances one row per step, in one batched
cell call per step (per stage) of the worker it runs on, whatever request each sequence came from.

Knows nothing of Triton. The caller supplies
    a runner   the cells, as the row loop (runtime/rowloop.py) describes: runtime/runner.py
               runs the exported ONNX graphs, tests use a fake; one per worker (a list), or one
               that every worker shares;
    a sink     per request: where its rows go (server/engine/outbox.py, Sink); the Triton glue
               wraps a response sender in one.

A sequence is one sampling job (B images, one seed) keyed by the caller's id (Triton's
correlation id). `start` opens it (refused while one with the same key is live), `resume` adds
a request to it; each request asks for up to `max_rows` more rows (None: to the end) and may
`end` the sequence when its rows are done. Rows go to the oldest open request of the sequence.
The sequence's state is freed when its image is complete, at an `end`, on an error, when the
client is gone, or after `idle_timeout` seconds without an open request (Triton forgets idle
sequences without telling the model, so the engine must expire its own). What a request may
ask for is runtime/request.py's.

Workers (server/engine/worker.py). The engine runs `workers` of them, each a thread with its
own runner, its own sequences, batching their row steps, and its own outbox (sender threads).
onnxruntime releases the GIL while a session runs, so the workers' cell calls run on as many
cores at once; what they do in Python between calls (inputs, rows, bookkeeping) still takes
turns. A new sequence goes to the least loaded worker (live images, then live sequences) and
stays there: its requests follow it, and its images do not depend on where it runs (the row
loop draws them). One admission control (server/engine/admission.py: the live-images budget,
the admission queue) serves every worker, and `stats()` adds them up into one view.

Threading: `start`/`resume` only validate and queue (`start` through the admission control);
everything else happens on the workers' threads (`start_worker`), or on the caller's thread
when a test drives `step()` itself (every worker in turn). One lock (an RLock) guards the
inboxes, the placement and the admission control; each worker waits on a Condition of its own
on it, so a request wakes only the worker it is for. Worker 0 keeps the admission queue's
deadlines.

Memory: when the last sequence of the engine is freed the allocator's free memory goes back to
the OS (admission.give_back_memory), and once more after `poll` s idle (after a garbage
collection), for what was freed after the first time.

Stuck sends (server/engine/outbox.py): a worker whose sender is stuck ends its sequences on that
sender (server/engine/worker.py), and `stats()` says healthy 0 while the stuck call has not
returned (the Triton glue publishes it as a metric; server/cluster.py restarts such a replica).
"""
from __future__ import annotations

import gc
import os
import threading
import time
from typing import Any, Callable, Hashable

from pixelrnn.runtime.request import check_max_rows, check_rows_per_response
from pixelrnn.runtime.rowloop import SampleSpec, Stage
from pixelrnn.server.engine.admission import Admission, Waiting, give_back_memory
from pixelrnn.server.engine.outbox import STUCK_SEND_S, Sink, safe_call
from pixelrnn.server.engine.worker import Request, Worker

MAX_WORKERS = 8  # the sampler's default: one worker per usable core but one, at most this many


def default_workers() -> int:
    """One worker per core this process may use but one, at least 1, at most MAX_WORKERS. The
    core left is the response path's: in a server the rows still go through the sampler's
    senders, tritonserver and gRPC, and on two cores a second worker made 16 streams slower, not
    faster (bench/results/engine_workers.json). More workers than cores only add turns for the
    GIL, and past a few the Python part of a row step is what limits them (the same file's
    projection)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores - 1))


class Engine:
    """Sampling sequences advanced together on worker threads, one batched cell call per row step
    of each worker (module notes). `runner`: a list gives one worker per runner; a single runner
    is shared by `workers` workers (default 1), so it must be safe to call from several threads,
    as onnxruntime sessions and the tests' fakes are."""

    def __init__(self, runner, max_batch: int = 64, idle_timeout: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, poll: float = 0.5, senders: int = 0, max_ahead: int = 16,
                 linger: float = 0.0, max_images: int | None = None, trim: Callable[[], Any] = give_back_memory,
                 fair: bool = True, stuck_send_s: float = STUCK_SEND_S, max_waiting: int = 0, wait_s: float = 0.0,
                 workers: int | None = None):
        runners = list(runner) if isinstance(runner, (list, tuple)) else [runner] * (workers or 1)
        if not runners or (workers is not None and workers != len(runners)):
            raise ValueError(f"workers must be >= 1 and match the runners given, got {workers} workers, {len(runners)} runners")
        self.runner = runners[0]  # what START requests are checked against (every runner serves the same model)
        self._lock = threading.RLock()  # the inboxes, the placement and the admission control (module notes)
        self._cv = threading.Condition(self._lock)  # worker 0's: it keeps the admission queue's deadlines
        # The live-images budget and the admission queue (server/engine/admission.py), under _lock;
        # refuses a bad budget or queue before any sender thread starts.
        self._admission = Admission(self._cv, self._post, clock, max_batch, max_images, max_waiting, wait_s)
        # Give memory back twice per idle period (_trim_when_idle): trims done in this one (2: none
        # due; never busy yet), and since when it has been idle (engine clock).
        self._trim, self._trims, self._idle_since = trim, 2, 0.0
        self._trim_lock = threading.Lock()
        self.fair = fair  # False: every ready sequence in every step (bench/overload.py compares the two)
        self.stages: list[Stage] = list(self.runner.stages)
        self.max_batch, self.idle_timeout, self.clock, self.poll = max_batch, idle_timeout, clock, poll
        self.max_ahead = max_ahead  # rows a sequence may have queued for its sender (server/engine/worker.py)
        self.stuck_send_s = stuck_send_s  # a send outstanding this long is stuck (server/engine/outbox.py)
        self._stopping = False
        self._homes: dict[Hashable, Worker] = {}  # sequence key -> the worker it is placed on (under _lock)
        self._workers = [Worker(self, k, r, self._cv if k == 0 else threading.Condition(self._lock), senders, linger)
                         for k, r in enumerate(runners)]

    # -- any thread ------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        last = self.stages[-1]
        return last.channels, last.height, last.width

    @property
    def workers(self) -> int:
        return len(self._workers)

    def validate(self, spec: SampleSpec) -> SampleSpec:
        """Check a START request's parameters (runtime/request.py's rules, for this model and
        max_batch); raises ValueError with a message for the client."""
        return spec.check(self.runner, self.max_batch)

    def start(self, key: Hashable, spec: SampleSpec, sink: Sink, max_rows: int | None = None, end: bool = True,
              rows_per_response: int | None = None) -> None:
        """Open sequence `key` (a START for a key that is live is refused on the request's sink);
        raises ValueError for bad parameters, Overloaded when its images do not fit `max_images`
        and cannot wait (no admission queue, or a full one: server/engine/admission.py); one that
        waits is admitted later, or refused on its sink when its wait runs out.
        `rows_per_response`: at most this many rows in one `sink.send_rows` call (1: one per row;
        None: as many as are waiting)."""
        max_rows, rows_per_response = check_max_rows(max_rows), check_rows_per_response(rows_per_response)
        self.validate(spec)
        self._admission.start(key, spec, Request(sink, max_rows, end, rows_per_response))

    def resume(self, key: Hashable, sink: Sink, max_rows: int | None = None, end: bool = False,
               rows_per_response: int | None = None) -> None:
        """Ask an open sequence for more rows (all remaining when max_rows is None)."""
        max_rows, rows_per_response = check_max_rows(max_rows), check_rows_per_response(rows_per_response)
        self._post_or_hold(("resume", key, None, Request(sink, max_rows, end, rows_per_response)))

    def forget(self, key: Hashable) -> None:
        """The caller no longer knows sequence `key` (Triton forgets an id at an END flag, even
        on a request it refused): end it once what it already asked for is streamed."""
        self._post_or_hold(("forget", key, None, None))

    def _post_or_hold(self, item) -> None:
        """Queue a request of an open sequence for its worker; one whose START waits for room
        goes in right after that START is admitted (or is refused with it)."""
        with self._lock:  # one lock hold: the START cannot be admitted in between
            if not self._admission.hold(item):
                self._post(item)

    def _post(self, item) -> None:
        """Queue an admitted START, or a request of a sequence, on its worker (the admission
        control may hold the lock already: an RLock)."""
        with self._lock:
            if self._stopping:
                raise RuntimeError("the sampler is shutting down")
            self._place(item).post(item)

    def _place(self, item) -> Worker:
        """The worker a request goes to (under _lock): its sequence's, if the sequence is placed
        (live, or its START queued); a new sequence's START to the least loaded worker, lowest
        index at a tie; any other request of an unknown sequence to worker 0, which answers it."""
        kind, key, spec, _ = item
        worker = self._homes.get(key)
        if worker is None:
            if kind != "start":
                return self._workers[0]
            worker = self._homes[key] = min(self._workers, key=lambda w: (w.images, w.placed))
        if kind == "start":
            worker.images += spec.batch
            worker.placed += 1
        return worker

    def _release(self, worker: Worker, key: Hashable, images: int) -> None:
        """A sequence's images left the budget (freed, or admitted and never opened); the
        sequence leaves its worker unless it is still live there or another START of it waits
        there (worker thread)."""
        with self._lock:
            worker.images -= images
            worker.placed -= 1
            if self._homes.get(key) is worker and not worker.holds(key):
                del self._homes[key]
            self._admission.release(images)

    def _expire_waiting(self) -> None:
        """Refuse the waiting STARTs whose wait ran out or whose client is gone (admission.py)."""
        for waiting, message in self._admission.expire(lambda request: safe_call(request.sink.cancelled, default=False)):
            self._refuse_waiting(waiting, message)

    def _refuse_waiting(self, waiting: Waiting, message: str) -> None:
        """A waiting START's error, and its sequence's requests that came meanwhile get it too
        (through worker 0's outbox: the sequence was never placed)."""
        outbox = self._workers[0]._outbox
        outbox.put(waiting.key, waiting.request.sink.error, message)
        for _, key, _, request in waiting.later:
            if request is not None:  # a resume (a forget has no one to tell)
                outbox.put(key, request.sink.error, message)

    def start_worker(self) -> None:
        """Start every worker's thread."""
        for worker in self._workers:
            worker.start_thread()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the workers; open requests get an error."""
        with self._lock:
            self._stopping = True
            self._admission.close()
            for worker in self._workers:
                worker._cv.notify()
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        for w in self._admission.take_waiting():
            self._refuse_waiting(w, "the sampler is shutting down")
        for worker in self._workers:
            worker.shut_down()
        for worker in self._workers:
            worker._outbox.close(max(0.0, deadline - time.monotonic()))

    # -- workers ---------------------------------------------------------------------------
    @property
    def active(self) -> int:
        """Live sequences on every worker."""
        return sum(len(w._sequences) for w in self._workers)

    @property
    def _sequences(self) -> dict:
        """Every worker's live sequences by key (tests; the workers' threads own them)."""
        return {k: s for w in self._workers for k, s in list(w._sequences.items())}

    @property
    def _outbox(self):
        """Worker 0's outbox, the engine's only one with one worker (tests read its queue)."""
        return self._workers[0]._outbox

    @property
    def calls(self) -> int:
        return sum(w.calls for w in self._workers)

    @property
    def cell_seconds(self) -> float:
        return sum(w.cell_seconds for w in self._workers)

    def step(self) -> bool:
        """One step of every worker in turn, on this thread (tests, benches): take queued
        requests, tidy up, then one row for every sequence that has a request waiting for rows.
        Returns whether any row was made."""
        made = [worker.step() for worker in self._workers]
        return any(made)

    def _trim_when_idle(self) -> None:
        """After a worker's step: give memory back when the engine has gone idle. Idle after work:
        what the sequences held goes back to the OS at once, and again once the engine has been
        idle `poll` s, for what was freed after that first trim (the senders' last messages,
        objects only the cyclic garbage collector frees): glibc never trims by itself under the
        servers' malloc settings, so memory freed after a trim stays resident."""
        with self._trim_lock:
            if any(w._sequences for w in self._workers):
                self._trims = 0
            elif self._trims == 0 or (self._trims == 1 and self.clock() - self._idle_since >= self.poll):
                if self._trims == 0:
                    self._idle_since = self.clock()
                else:
                    gc.collect()
                self._trims += 1
                safe_call(self._trim)

    def stats(self) -> dict[str, int | float]:
        """Live sequences, live images (admitted, not yet freed), the live-images budget (0: none),
        waiting (STARTs in the admission queue now), healthy (1; 0 while a response send is
        stuck: server/engine/outbox.py, "Stuck sends") and counters since start: STARTs admitted (at once or
        after waiting) / queued (they waited for room) / overloaded (refused for the budget, at
        once or when their wait ran out), sequences started (opened by a worker) / completed /
        ended / cancelled / disconnected / expired / failed / shutdown / stuck (ended because
        their sender was stuck), requests refused (bad or conflicting), rows streamed, batched
        cell calls, stuck_sends (sender threads found stuck), and cell_seconds (float: wall seconds
        in the cell calls, every worker's added up), over every worker. Any thread (approximately,
        while the workers run: plain numbers only)."""
        keys = ("started", "completed", "ended", "cancelled", "disconnected", "expired", "failed", "shutdown", "stuck", "refused",
                "rows")
        a, workers = self._admission, self._workers
        return {"live": self.active, "live_images": a.images, "budget": a.max_images or 0,
                "waiting": len(a.waiting), "admitted": a.admitted, "queued": a.queued,
                "healthy": int(all(w._outbox.healthy for w in workers)), **{k: sum(w.counts[k] for w in workers) for k in keys},
                "overloaded": a.overloaded, "calls": self.calls, "stuck_sends": sum(w._outbox.stuck_sends for w in workers),
                "cell_seconds": self.cell_seconds}
