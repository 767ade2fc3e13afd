"""One worker of the row engine (server/engine/scheduler.py): its own runner (cell sessions),
its own sequences, their batched row steps, and its own outbox (sender threads). The engine
places each new sequence on one worker, where it stays; everything that touches a sequence
happens on that worker's thread (or on the caller's, when a test drives `step()`).

What a row step does to a sequence (its random stream, known rows, stages) is the row loop's,
the same code export.cells.sample_cached runs: a sequence gives exactly the image that sampler
gives with the same seed, whichever worker runs it and whichever sequences share its calls,
also after a resume from known rows. The worker only schedules: which of its sequences share a
cell call, requests, sending, expiry.

Backpressure. A sequence runs at most `max_ahead` rows ahead of what its sender has sent: the
cell calls of a tiny model outpace the sends many times over, and without that bound every
stream's rows would pile up in the outbox (memory), a client that cancels would be noticed only
after the worker had made (and the senders still had to send) its whole image, and new streams
would wait behind the pile.

Fairness: when the worker's sequences that want rows hold more than one call's worth of images
(max_batch), a step makes ONE cell call, for the sequences that have been served least, counted
in image-rows (each row of a B-image sequence costs B), a newcomer starting level with the least
served one and, at a tie, small sequences first: a 1-image sequence gets its first row from the
next call and then rows at a rate set by the number of calls, not by the other sequences' sizes
(weighted fair queuing). Otherwise a step advances every ready sequence, one call per group.

Stuck sends: the worker's housekeeping (every step, at least every `poll` s) has its outbox
retire a sender stuck in a sink call for more than `stuck_send_s`; the worker's live sequences
of that sender's slot are then ended with an error starting with protocol.UNHEALTHY, sent after
the rows already made (their clients resume elsewhere from every row made), and its new
sequences of the slot go to the fresh sender.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Hashable

import numpy as np

from pixelrnn.runtime.protocol import UNHEALTHY
from pixelrnn.runtime.rowloop import RowSequence, SampleSpec, call_row
from pixelrnn.server.engine.outbox import Outbox, RowEvent, Sink, safe_call


@dataclass
class Request:
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


class Worker:
    """One worker's sequences, advanced together, one batched cell call per row step (module
    notes). `engine` holds what the workers share: the settings, the lock (its `_lock`: every
    inbox is under it), the admission control, the placement of sequences and the memory trim."""

    def __init__(self, engine, index: int, runner, cv: threading.Condition, senders: int, linger: float):
        self.engine, self.index, self.runner = engine, index, runner
        self._cv = cv  # a Condition on the engine's lock: wakes this worker only
        self._inbox: deque = deque()  # under the engine's lock
        self._sequences: dict[Hashable, _Sequence] = {}  # this worker's thread only
        self._thread: threading.Thread | None = None
        # Images and sequences placed here (STARTs queued or live) and not yet released (engine's lock).
        self.images = self.placed = 0
        # linger: server/engine/outbox.py, "Coalescing". Held rows stay under max_ahead / 2, below
        # where a sequence would wait for its sender (_ready), so holding them never stalls the cell calls.
        self._outbox = Outbox(senders, on_sent=self._row_sent, linger=linger, hold_rows=max(1, engine.max_ahead // 2),
                              stuck_send_s=engine.stuck_send_s)
        self.calls = 0  # batched cell calls so far (tests, metrics)
        # Wall seconds spent in them (call_row: the sequences' inputs, the run, the outputs split):
        # with the rows made, what share of the worker's time the cells take (metrics, bench.serving).
        self.cell_seconds = 0.0
        # Sequences by how they ended, and requests refused (Engine.stats); this worker's thread only.
        self.counts: Counter = Counter()

    # -- any thread ------------------------------------------------------------------------
    def post(self, item) -> None:
        """Queue a request for this worker (the caller holds the engine's lock)."""
        self._inbox.append(item)
        self._cv.notify()

    def holds(self, key: Hashable) -> bool:
        """Sequence `key` is live here or its START waits in this worker's inbox (engine's lock)."""
        return key in self._sequences or any(kind == "start" and k == key for kind, k, _, _ in self._inbox)

    def start_thread(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"row-engine-{self.index}", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def shut_down(self) -> None:
        """After the thread stopped: open requests get an error (the outbox still sends)."""
        self._drain_inbox()
        for seq in list(self._sequences.values()):
            self._drop(seq, "the sampler is shutting down", "shutdown")

    # -- this worker's thread --------------------------------------------------------------
    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._cv:
                if engine._stopping:
                    return
                if not self._inbox and not self._ready():
                    # A waiting START is refused at its deadline, not up to `poll` later (worker 0 keeps the queue).
                    deadline = engine._admission.deadline() if self.index == 0 else None
                    self._cv.wait(engine.poll if deadline is None else min(engine.poll, max(0.0, deadline - engine.clock())))
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
        max_ahead = self.engine.max_ahead
        waiting = [s for s in self._sequences.values() if s.requests and s.requests[0].rows_left != 0]
        pending = [self._outbox.pending(s.key) for s in waiting]
        if not waiting or min(pending) > max_ahead // 2:
            return []
        return [s for s, n in zip(waiting, pending) if n < max_ahead]

    def _row_sent(self, key: Hashable, left: int, sent: int) -> None:
        """Sender threads: wake the worker once a held-back sequence is half drained, not at its
        first sent row, so that the sequences held back meanwhile go on together in one call
        (one response may drain many rows: woken when it crosses the half)."""
        if left <= self.engine.max_ahead // 2 < left + sent:
            with self._cv:
                self._cv.notify()

    def step(self) -> bool:
        """Take queued requests, tidy up, then one row for every sequence that has a request
        waiting for rows; then the engine's memory trim when it is idle. Returns whether any
        row was made."""
        made = self._rows()
        # Here, not in _rows: the sequences _rows ran are still referenced by its locals there,
        # and a trim while the last ones' states are alive would leave them resident for good.
        self.engine._trim_when_idle()
        return made

    def _rows(self) -> bool:
        """step() but the memory: requests, housekeeping, one row per ready sequence."""
        if self.index == 0:
            self.engine._expire_waiting()
        self._drain_inbox()
        self._housekeeping()
        ready = self._ready()
        max_batch = self.engine.max_batch
        if self.engine.fair and sum(s.spec.batch for s in ready) > max_batch:
            ready = self._least_served(ready)
        groups: dict[Any, list[_Sequence]] = defaultdict(list)
        for seq in ready:
            groups[seq.job.group()].append(seq)
        for seqs in groups.values():
            chunk, size = [], 0
            for seq in seqs:  # at most max_batch images per call; each sequence has <= max_batch
                if chunk and size + seq.spec.batch > max_batch:
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
            if seq.job.group() == group and size + seq.spec.batch <= self.engine.max_batch:
                chosen.append(seq)
                size += seq.spec.batch
        return chosen

    def _drain_inbox(self) -> None:
        engine = self.engine
        while True:
            with self._cv:
                if not self._inbox:
                    return
                kind, key, spec, request = self._inbox.popleft()
            if kind == "forget":
                if key in self._sequences:
                    self._end_when_streamed(self._sequences[key])
                continue
            if kind == "start" and (engine._stopping or key in self._sequences):
                self._release(key, spec.batch)  # admitted by start(), never opened
            if engine._stopping:
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
                    seq = _Sequence(key, RowSequence.open(self.runner, spec), last_active=engine.clock())
                except Exception as e:  # noqa: BLE001 - reported to the client, not raised
                    self._release(key, spec.batch)
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
                                              f"{engine.idle_timeout:g} s idle, or never started): send a START request")
                    continue
            seq.requests.append(request)
            seq.last_active = engine.clock()

    def _end_when_streamed(self, seq: _Sequence) -> None:
        """The caller's id is gone: end the sequence once its open requests are streamed."""
        if seq.requests:
            seq.requests[-1].end = True
        else:
            self._free(seq, "ended")

    def _housekeeping(self) -> None:
        now = self.engine.clock()
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
            elif not seq.requests and now - seq.last_active > self.engine.idle_timeout:
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
        active, batched = self.engine.active, sum(s.spec.batch for s in seqs)
        for seq, (row, logprob, state) in zip(seqs, results):
            index = seq.job.row
            try:
                seq.job.take(self.runner, row, state)
            except Exception as e:  # noqa: BLE001 - the multi-scale condition graph failed
                self._drop(seq, f"sampling failed: {type(e).__name__}: {e}", "failed")
                continue
            seq.last_active = self.engine.clock()
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

    def _release(self, key: Hashable, images: int) -> None:
        self.engine._release(self, key, images)

    def _free(self, seq: _Sequence, why: str) -> None:
        if self._sequences.pop(seq.key, None) is not None:
            self.counts[why] += 1
            self._release(seq.key, seq.spec.batch)

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
                self._drop(seq, f"{UNHEALTHY} a response send of this sampler has not returned for {self.engine.stuck_send_s:g} s "
                                f"(a stuck stream, sequence {key}); sequence {seq.key}, on the same sender thread, is ended after "
                                f"the rows it was sent: resume it on another replica (those rows as KNOWN, the same seed)", "stuck")
