"""The row engine: every active sampling sequence advances one row per step, in one batched
cell call per step (per stage), whatever request each sequence came from.

Knows nothing of Triton. The caller supplies
    a runner   the cells, as the row loop (runtime/rowloop.py) describes: runtime/runner.py
               runs the exported ONNX graphs, tests use a fake;
    a sink     per request: where its rows go (server/engine/outbox.py, Sink); the Triton glue
               wraps a response sender in one.

A sequence is one sampling job (B images, one seed) keyed by the caller's id (Triton's
correlation id). `start` opens it (refused while one with the same key is live), `resume` adds
a request to it; each request asks for up to `max_rows` more rows (None: to the end) and may
`end` the sequence when its rows are done. Rows go to the oldest open request of the sequence.
The sequence's state is freed when its image is complete, at an `end`, on an error, when the
client is gone, or after `idle_timeout` seconds without an open request (Triton forgets idle
sequences without telling the model, so the engine must expire its own).

What a row step does to a sequence (its random stream, known rows, stages) is the row loop's,
the same code export.cells.sample_cached runs: a sequence gives exactly the image that sampler
gives with the same seed, also after a resume from known rows. What a request may ask for is
runtime/request.py's. The engine only schedules: which sequences share a cell call, requests,
sending, expiry.

Threading: `start`/`resume` only validate and queue (`start` through the admission control of
server/engine/admission.py: the live-images budget, the admission queue); everything else (the
sequences, the runner) happens on one worker thread (`start_worker`), or on the caller's thread
when a test drives `step()` itself. Sink calls go through the outbox (server/engine/outbox.py:
inline, or on sender threads that overlap sending with the next cell call, coalescing the rows
that wait together). A sequence runs at most `max_ahead` rows ahead of what its sender has sent:
the cell calls of a tiny model outpace the sends many times over, and without that bound every
stream's rows would pile up in the outbox (memory), a client that cancels would be noticed only
after the engine had made (and the senders still had to send) its whole image, and new streams
would wait behind the pile.

Fairness: when the sequences that want rows hold more than one call's worth of images
(max_batch), a step makes ONE cell call, for the sequences that have been served least, counted
in image-rows (each row of a B-image sequence costs B), a newcomer starting level with the least
served one and, at a tie, small sequences first: a 1-image sequence gets its first row from the
next call and then rows at a rate set by the number of calls, not by the other sequences' sizes
(weighted fair queuing). Otherwise a step advances every ready sequence, one call per group.

Memory: when the last sequence is freed the allocator's free memory goes back to the OS
(admission.give_back_memory), and once more after `poll` s idle (after a garbage collection),
for what was freed after the first time.

Stuck sends: the worker's housekeeping (every step, at least every `poll` s) has the outbox
retire a sender stuck in a sink call for more than `stuck_send_s`; the live sequences of that
sender's slot are then ended with an error starting with protocol.UNHEALTHY, sent after the rows
already made (their clients resume elsewhere from every row made), new sequences of the slot go
to the fresh sender, and `stats()` says healthy 0 while the stuck call has not returned (the
Triton glue publishes it as a metric; server/cluster.py restarts such a replica).
"""
from __future__ import annotations

import gc
import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import numpy as np

from pixelrnn.runtime.protocol import UNHEALTHY
from pixelrnn.runtime.request import check_max_rows, check_rows_per_response
from pixelrnn.runtime.rowloop import RowSequence, SampleSpec, Stage, call_row
from pixelrnn.server.engine.admission import Admission, Waiting, give_back_memory
from pixelrnn.server.engine.outbox import STUCK_SEND_S, Outbox, RowEvent, Sink, safe_call


@dataclass
class _Request:
    sink: Sink
    rows_left: int | None  # None: until the image is complete
    end: bool
    per_response: int | None = None  # rows one response may carry (None: as many as are waiting)


@dataclass
class _Sequence:
    key: Hashable
    job: RowSequence  # the row loop's state of this sampling job (runtime/rowloop.py)
    requests: deque = field(default_factory=deque)
    last_active: float = 0.0
    served: int = 0  # image-rows made so far, from the level it started at (fair scheduling)

    @property
    def spec(self) -> SampleSpec:
        return self.job.spec


class Engine:
    """Sampling sequences advanced together, one batched cell call per row step (module notes)."""

    def __init__(self, runner, max_batch: int = 64, idle_timeout: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, poll: float = 0.5, senders: int = 0, max_ahead: int = 16,
                 linger: float = 0.0, max_images: int | None = None, trim: Callable[[], Any] = give_back_memory,
                 fair: bool = True, stuck_send_s: float = STUCK_SEND_S, max_waiting: int = 0, wait_s: float = 0.0):
        self.runner = runner
        self._cv = threading.Condition()
        # The live-images budget and the admission queue (server/engine/admission.py), under _cv;
        # refuses a bad budget or queue before any sender thread starts.
        self._admission = Admission(self._cv, self._post, clock, max_batch, max_images, max_waiting, wait_s)
        # Give memory back twice per idle period (step): trims done in this one (2: none due; never
        # busy yet), and since when it has been idle (engine clock).
        self._trim, self._trims, self._idle_since = trim, 2, 0.0
        self.fair = fair  # False: every ready sequence in every step (bench/overload.py compares the two)
        self.stages: list[Stage] = list(runner.stages)
        self.max_batch, self.idle_timeout, self.clock, self.poll = max_batch, idle_timeout, clock, poll
        self._sequences: dict[Hashable, _Sequence] = {}  # worker thread only
        self._inbox: deque = deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.max_ahead = max_ahead  # rows a sequence may have queued for its sender (see the module notes)
        # linger: server/engine/outbox.py, "Coalescing". Held rows stay under max_ahead / 2, below
        # where a sequence would wait for its sender (_ready), so holding them never stalls the cell calls.
        self._outbox = Outbox(senders, on_sent=self._row_sent, linger=linger, hold_rows=max(1, max_ahead // 2),
                              stuck_send_s=stuck_send_s)
        self.stuck_send_s = stuck_send_s  # a send outstanding this long is stuck (server/engine/outbox.py)
        self.calls = 0  # batched cell calls so far (tests, metrics)
        # Wall seconds spent in them (call_row: the sequences' inputs, the run, the outputs split):
        # with the rows made, what share of the engine's time the cells take (metrics, bench.serving).
        self.cell_seconds = 0.0
        # Sequences by how they ended, and requests refused (see `stats`); worker thread only.
        self.counts: Counter = Counter()

    # -- any thread ------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        last = self.stages[-1]
        return last.channels, last.height, last.width

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
        self._admission.start(key, spec, _Request(sink, max_rows, end, rows_per_response))

    def resume(self, key: Hashable, sink: Sink, max_rows: int | None = None, end: bool = False,
               rows_per_response: int | None = None) -> None:
        """Ask an open sequence for more rows (all remaining when max_rows is None)."""
        max_rows, rows_per_response = check_max_rows(max_rows), check_rows_per_response(rows_per_response)
        self._post_or_hold(("resume", key, None, _Request(sink, max_rows, end, rows_per_response)))

    def forget(self, key: Hashable) -> None:
        """The caller no longer knows sequence `key` (Triton forgets an id at an END flag, even
        on a request it refused): end it once what it already asked for is streamed."""
        self._post_or_hold(("forget", key, None, None))

    def _post_or_hold(self, item) -> None:
        """Queue a request of an open sequence for the worker; one whose START waits for room
        goes in right after that START is admitted (or is refused with it)."""
        with self._cv:  # one lock hold: the START cannot be admitted in between
            if not self._admission.hold(item):
                self._post(item)

    def _expire_waiting(self) -> None:
        """Refuse the waiting STARTs whose wait ran out or whose client is gone (admission.py)."""
        for waiting, message in self._admission.expire(lambda request: safe_call(request.sink.cancelled, default=False)):
            self._refuse_waiting(waiting, message)

    def _refuse_waiting(self, waiting: Waiting, message: str) -> None:
        """A waiting START's error, and its sequence's requests that came meanwhile get it too."""
        self._outbox.put(waiting.key, waiting.request.sink.error, message)
        for _, key, _, request in waiting.later:
            if request is not None:  # a resume (a forget has no one to tell)
                self._outbox.put(key, request.sink.error, message)

    def _release(self, images: int) -> None:
        self._admission.release(images)

    def _post(self, item) -> None:
        with self._cv:  # an RLock (Condition's default): the admission control may hold it already
            if self._stopping:
                raise RuntimeError("the sampler is shutting down")
            self._inbox.append(item)
            self._cv.notify()

    def start_worker(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="row-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker; open requests get an error."""
        with self._cv:
            self._stopping = True
            self._admission.close()
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        for w in self._admission.take_waiting():
            self._refuse_waiting(w, "the sampler is shutting down")
        self._drain_inbox()
        for seq in list(self._sequences.values()):
            self._drop(seq, "the sampler is shutting down", "shutdown")
        self._outbox.close(timeout)

    # -- worker ----------------------------------------------------------------------------
    @property
    def active(self) -> int:
        return len(self._sequences)

    def _loop(self) -> None:
        while True:
            with self._cv:
                if self._stopping:
                    return
                if not self._inbox and not self._ready():
                    # A waiting START is refused at its deadline, not up to `poll` later.
                    deadline = self._admission.deadline()
                    self._cv.wait(self.poll if deadline is None else min(self.poll, max(0.0, deadline - self.clock())))
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - a bug must not leave every stream hanging
                for seq in list(self._sequences.values()):
                    self._drop(seq, f"internal error in the sampler: {type(e).__name__}: {e}", "failed")

    def _ready(self) -> list[_Sequence]:
        """The sequences to advance now: none while every sequence that wants rows has more than
        max_ahead / 2 of them still queued for its sender (nobody is short of rows: wait for a
        sender), else all of them that are below max_ahead, together. Waiting for the first to
        drain to half, rather than going on as soon as any row is sent, keeps sequences in step:
        a sender that drains one sequence's pile in one response would otherwise let that
        sequence go on alone, and the sequences would drift into calls of their own."""
        waiting = [s for s in self._sequences.values() if s.requests and s.requests[0].rows_left != 0]
        pending = [self._outbox.pending(s.key) for s in waiting]
        if not waiting or min(pending) > self.max_ahead // 2:
            return []
        return [s for s, n in zip(waiting, pending) if n < self.max_ahead]

    def _row_sent(self, key: Hashable, left: int, sent: int) -> None:
        """Sender threads: wake the worker once a held-back sequence is half drained, not at its
        first sent row, so that the sequences held back meanwhile go on together in one call
        (one response may drain many rows: woken when it crosses the half)."""
        if left <= self.max_ahead // 2 < left + sent:
            with self._cv:
                self._cv.notify()

    def step(self) -> bool:
        """Take queued requests, tidy up, then one row for every sequence that has a request
        waiting for rows. Returns whether any row was made."""
        made = self._rows()
        # Here, not in _rows: the sequences _rows ran are still referenced by its locals there,
        # and a trim while the last ones' states are alive would leave them resident for good.
        # Idle after work: what the sequences held goes back to the OS at once, and again once the
        # engine has been idle `poll` s, for what was freed after that first trim (the senders'
        # last messages, objects only the cyclic garbage collector frees): glibc never trims by
        # itself under the servers' malloc settings, so memory freed after a trim stays resident.
        if self._sequences:
            self._trims = 0
        elif self._trims == 0 or (self._trims == 1 and self.clock() - self._idle_since >= self.poll):
            if self._trims == 0:
                self._idle_since = self.clock()
            else:
                gc.collect()
            self._trims += 1
            safe_call(self._trim)
        return made

    def _rows(self) -> bool:
        """step() but the memory: requests, housekeeping, one row per ready sequence."""
        self._expire_waiting()
        self._drain_inbox()
        self._housekeeping()
        ready = self._ready()
        if self.fair and sum(s.spec.batch for s in ready) > self.max_batch:
            ready = self._least_served(ready)
        groups: dict[Any, list[_Sequence]] = defaultdict(list)
        for seq in ready:
            groups[seq.job.group()].append(seq)
        for seqs in groups.values():
            chunk, size = [], 0
            for seq in seqs:  # at most max_batch images per call; each sequence has <= max_batch
                if chunk and size + seq.spec.batch > self.max_batch:
                    self._run(chunk)
                    chunk, size = [], 0
                chunk.append(seq)
                size += seq.spec.batch
            if chunk:
                self._run(chunk)
        self._housekeeping()
        return bool(ready)

    def _least_served(self, ready: list[_Sequence]) -> list[_Sequence]:
        """One call's sequences when they do not all fit: the least served one (image-rows), then
        the next least served of its group that still fit, small ones first at a tie. Always
        taking the least served one starves nobody; counting image-rows gives every image, not
        every sequence, the same share, so a flood of big sequences cannot hold a small one back."""
        order = sorted(ready, key=lambda s: (s.served, s.spec.batch))  # stable: older first at a full tie
        group = order[0].job.group()
        chosen, size = [], 0
        for seq in order:
            if seq.job.group() == group and size + seq.spec.batch <= self.max_batch:
                chosen.append(seq)
                size += seq.spec.batch
        return chosen

    def _drain_inbox(self) -> None:
        while True:
            with self._cv:
                if not self._inbox:
                    return
                kind, key, spec, request = self._inbox.popleft()
            if kind == "forget":
                if key in self._sequences:
                    self._end_when_streamed(self._sequences[key])
                continue
            if kind == "start" and (self._stopping or key in self._sequences):
                self._release(spec.batch)  # admitted by start(), never opened
            if self._stopping:
                self._outbox.put(key, request.sink.error, "the sampler is shutting down")
                continue
            if kind == "start":
                if key in self._sequences:  # the live sequence is someone's stream: leave it alone
                    self.counts["refused"] += 1
                    self._outbox.put(key, request.sink.error, f"sequence {key} is already active: a START request needs a new "
                                     f"sequence id (or end this one first: sequence_end with MAX_ROWS 0)")
                    if request.end:  # Triton forgets the id at this END: no later request can reach the live one
                        self._end_when_streamed(self._sequences[key])
                    continue
                try:
                    seq = _Sequence(key, RowSequence.open(self.runner, spec), last_active=self.clock())
                except Exception as e:  # noqa: BLE001 - reported to the client, not raised
                    self._release(spec.batch)
                    self.counts["refused"] += 1
                    self._outbox.put(key, request.sink.error, f"cannot start sequence {key}: {e}")
                    continue
                # Level with the least served live sequence: not ahead of the others for the rows it
                # never waited for, nor behind them (fair scheduling, see the module notes).
                seq.served = min((s.served for s in self._sequences.values()), default=0)
                self._sequences[key] = seq
                self.counts["started"] += 1
            else:
                seq = self._sequences.get(key)
                if seq is None:
                    self.counts["refused"] += 1
                    self._outbox.put(key, request.sink.error, f"sequence {key} is not active (finished, cancelled, expired after "
                                              f"{self.idle_timeout:g} s idle, or never started): send a START request")
                    continue
            seq.requests.append(request)
            seq.last_active = self.clock()

    def _end_when_streamed(self, seq: _Sequence) -> None:
        """The caller's id is gone: end the sequence once its open requests are streamed."""
        if seq.requests:
            seq.requests[-1].end = True
        else:
            self._free(seq, "ended")

    def _housekeeping(self) -> None:
        now = self.clock()
        for slot, key in self._outbox.retire_stuck():
            self._sender_stuck(slot, key)
        if self._outbox.failed:  # forget failures of sinks no sequence waits on any more
            waiting = {id(r.sink) for seq in self._sequences.values() for r in seq.requests}
            for sink_id in list(self._outbox.failed):
                if sink_id not in waiting:
                    self._outbox.failed.pop(sink_id, None)
        for seq in list(self._sequences.values()):
            while seq.requests and seq.requests[0].rows_left == 0:  # a request's rows are all sent
                request = seq.requests.popleft()
                self._outbox.put(seq.key, request.sink.done)
                seq.last_active = now
                if request.end:
                    self._drop(seq, f"sequence {seq.key} was ended by an earlier request", "ended")  # anything queued after the end
                    break
            if seq.key not in self._sequences:
                continue
            if seq.requests and id(seq.requests[0].sink) in self._outbox.failed:
                self._drop(seq, f"cannot send: {self._outbox.failed.pop(id(seq.requests[0].sink))}", "disconnected")
            elif seq.requests and safe_call(seq.requests[0].sink.cancelled, default=False):
                self._drop(seq, "cancelled", "cancelled")
            elif not seq.requests and now - seq.last_active > self.idle_timeout:
                self._free(seq, "expired")

    def _run(self, seqs: list[_Sequence]) -> None:
        """One batched cell call for these sequences (one group of the row loop)."""
        stage = seqs[0].job.stage
        try:
            self.calls += 1
            began = time.perf_counter()
            results = call_row(self.runner, [s.job for s in seqs])
            self.cell_seconds += time.perf_counter() - began
        except Exception as e:  # noqa: BLE001 - every sequence in the call gets the error
            for seq in seqs:
                self._drop(seq, f"sampling failed: {type(e).__name__}: {e}", "failed")
            return
        active, batched = len(self._sequences), sum(s.spec.batch for s in seqs)
        for seq, (row, logprob, state) in zip(seqs, results):
            index = seq.job.row
            try:
                seq.job.take(self.runner, row, state)
            except Exception as e:  # noqa: BLE001 - the multi-scale condition graph failed
                self._drop(seq, f"sampling failed: {type(e).__name__}: {e}", "failed")
                continue
            seq.last_active = self.clock()
            request = seq.requests[0]
            seq.served += seq.spec.batch
            self._outbox.put_row(seq.key, request.sink, RowEvent(seq.key, stage, index, row.astype(np.uint8), logprob, active, batched),
                                 request.per_response)
            self.counts["rows"] += 1
            if request.rows_left is not None:
                request.rows_left -= 1
            if seq.job.done:  # image complete: every open request is done
                for r in seq.requests:
                    self._outbox.put(seq.key, r.sink.done)
                seq.requests.clear()
                self._free(seq, "completed")

    def _free(self, seq: _Sequence, why: str) -> None:
        if self._sequences.pop(seq.key, None) is not None:
            self.counts[why] += 1
            self._release(seq.spec.batch)

    def _drop(self, seq: _Sequence, message: str, why: str) -> None:
        """Free the sequence; each of its open requests gets `message` as an error."""
        if self._sequences.get(seq.key) is seq:
            self._free(seq, why)
        for request in seq.requests:
            self._outbox.put(seq.key, request.sink.error, message)
        seq.requests.clear()

    def _sender_stuck(self, slot: int, key: Hashable) -> None:
        """A sender was stuck in a send to sequence `key`'s stream and is retired (Outbox.retire_stuck):
        every live sequence of its slot ends with an UNHEALTHY error, sent by the fresh sender
        after the rows it had not sent (so a client resumes from every row made), except to the
        stuck stream, which nothing reaches any more."""
        for seq in list(self._sequences.values()):
            if self._outbox.slot(seq.key) == slot:
                self._drop(seq, f"{UNHEALTHY} a response send of this sampler has not returned for {self.stuck_send_s:g} s (a stuck "
                                f"stream, sequence {key}); sequence {seq.key}, on the same sender thread, is ended after the rows "
                                f"it was sent: resume it on another replica (those rows as KNOWN, the same seed)", "stuck")

    def stats(self) -> dict[str, int | float]:
        """Live sequences, live images (admitted, not yet freed), the live-images budget (0: none),
        waiting (STARTs in the admission queue now), healthy (1; 0 while a response send is
        stuck: server/engine/outbox.py, "Stuck sends") and counters since start: STARTs admitted (at once or
        after waiting) / queued (they waited for room) / overloaded (refused for the budget, at
        once or when their wait ran out), sequences started (opened by the worker) / completed /
        ended / cancelled / disconnected / expired / failed / shutdown / stuck (ended because
        their sender was stuck), requests refused (bad or conflicting), rows streamed, batched
        cell calls, stuck_sends (sender threads found stuck), and cell_seconds (float: wall seconds
        in the cell calls). Worker thread (or, approximately, any thread: plain numbers only)."""
        keys = ("started", "completed", "ended", "cancelled", "disconnected", "expired", "failed", "shutdown", "stuck", "refused",
                "rows")
        a = self._admission
        return {"live": len(self._sequences), "live_images": a.images, "budget": a.max_images or 0,
                "waiting": len(a.waiting), "admitted": a.admitted, "queued": a.queued,
                "healthy": int(self._outbox.healthy), **{k: self.counts[k] for k in keys}, "overloaded": a.overloaded,
                "calls": self.calls, "stuck_sends": self._outbox.stuck_sends, "cell_seconds": self.cell_seconds}

