"""Cross-sequence sampling engine: every active sequence advances one row per step, in one
batched cell call per step (per stage), whatever request each sequence came from.

Knows nothing of Triton. The caller supplies
    a runner   the cells, as the row loop (runtime/rowloop.py) describes: runtime/runner.py
               runs the exported ONNX graphs, tests use a fake;
    a sink     per request: where its rows go (`row(event)`, `done()`, `error(message)`,
               `cancelled()`); the Triton glue wraps a response sender in one.

A sequence is one sampling job (B images, one seed) keyed by the caller's id (Triton's
correlation id). `start` opens it (refused while one with the same key is live), `resume` adds a request
to it; each request asks for up to `max_rows` more rows (None: to the end) and may `end` the
sequence when its rows are done. Rows go to the oldest open request of the sequence. The
sequence's state is freed when its image is complete, at an `end`, on an error, when the
client is gone, or after `idle_timeout` seconds without an open request (Triton forgets idle
sequences without telling the model, so the engine must expire its own).

What a row step does to a sequence (its random stream, known rows, stages) is the row loop's
(runtime/rowloop.py), the same code export.cells.sample_cached runs: a sequence gives exactly
the image that sampler gives with the same seed, also after a resume from known rows. The
engine only schedules: which sequences share a cell call, requests, sending, expiry.

Threading: `start`/`resume` only validate and queue; everything else (the sequences, the
runner) happens on one worker thread (`start_worker`), or on the caller's thread when a test
drives `step()` itself. Sink calls go through an `Outbox`: with `senders=0` they run inline; with
`senders=K` they run on K sender threads, so that sending a step's rows (a round trip to the
Triton server per response, ~0.5 ms) overlaps the next step's cell call instead of adding to it.
Every message of one sequence goes to the same sender, so a stream's order is kept. A sequence
runs at most `max_ahead` rows ahead of what its sender has sent: the cell calls of a tiny model
outpace the sends many times over, and without that bound every stream's rows would pile up in
the outbox (memory), a client that cancels would be noticed only after the engine had made (and
the senders still had to send) its whole image, and new streams would wait behind the pile.

Coalescing: a sender takes everything queued for it at once, and the consecutive rows of one
request (same stage) waiting there go to its sink in one `send_rows(events)` call, one response,
up to the request's `rows_per_response` (None: no limit but max_ahead). A sender that keeps up
finds one row and sends it at once, so the first row is not delayed; a sender that is behind
sends what has piled up as one response, so the response path's fixed cost per message (IPC,
gRPC, the client's parsing: most of a tiny model's serving cost) is paid once per pile.
Measured, senders mostly keep up (a row step of many sequences costs more than its sends), so
piles rarely form by themselves; `linger` (seconds, 0: off) lets them form: a sequence's rows
wait until `linger` after its previous response went out, or until max_ahead / 2 of them
wait, then go out together. Its first row never waits (first-row latency is kept), nor do the
rows of a request that asked for a per-response limit (ROWS_PER_RESPONSE), nor the last rows
of a request (its final message flushes them).

Overload. Admission: with `max_images`, the images of all live sequences stay within that budget
(server/engine/admission.py derives it from the state sizes and a memory budget): a START that does
not fit is refused at once by `start` raising `Overloaded`, which names the budget and the load
(the caller answers "try later"). With an admission queue (`max_waiting` N > 0, `wait_s`) such a
START waits instead, first come first served, while fewer than N wait: it is admitted as soon as
it fits (as sequences end), or refused with the same overloaded message once it has waited
`wait_s` (the worker wakes for that deadline); a START that fits waits too while others wait
(nobody is passed over), and a full queue refuses at once. Requests of a waiting sequence
(resume, forget) go in right after its START. Fairness: when the sequences that want rows
hold more than one call's worth of images (max_batch), a step makes ONE cell call, for the
sequences that have been served least, counted in image-rows (each row of a B-image sequence
costs B), a newcomer starting level with the least served one and, at a tie, small sequences
first: a 1-image sequence gets its first row from the next call and then rows at a rate set by
the number of calls, not by the other sequences' sizes (weighted fair queuing). Otherwise a step
advances every ready sequence, one call per group, as before. Memory: when the last sequence
is freed the allocator's free memory goes back to the OS (admission.give_back_memory), as the
servers' malloc settings keep glibc from doing it by itself, and once more after `poll` s idle
(after a garbage collection), for what was freed after the first time.

Stuck sends. A sink call that never returns (Triton 2.51's gRPC stream handler can deadlock
when a cancellation races a response write) would stall every sequence on its sender thread.
Each sender records when its current sink call began; the worker's housekeeping (every step, at
least every `poll` s) retires a sender whose call has been outstanding for more than
`stuck_send_s` (0: never; inline sends, `senders=0`, cannot be watched): a fresh thread takes
its slot and the messages it had not sent, in order, except those to the stuck stream, which is
abandoned (nothing more is sent to it: a send would get stuck too). The live sequences of that
slot are then ended with an error starting with protocol.UNHEALTHY, sent after the rows already
made (their clients resume elsewhere from every row made), new sequences of the slot go to the
fresh sender, and `stats()` says healthy 0 while the stuck call has not returned (the Triton
glue publishes it as a metric; server/cluster.py restarts such a replica). The stuck thread is
left in its call; should the call return, the thread sends that given-up stream a final
UNHEALTHY error (so that its client need not wait for its own timeout) and ends.
"""
from __future__ import annotations

import gc
import math
import queue
import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Protocol

import numpy as np

from pixelrnn.server.engine.admission import give_back_memory
from pixelrnn.runtime.protocol import OVERLOADED, UNHEALTHY
from pixelrnn.runtime.rowloop import RowSequence, SampleSpec, Stage, call_row


STUCK_SEND_S = 10.0  # a sink call outstanding this long is stuck (module notes, "Stuck sends")


class Overloaded(RuntimeError):
    """A START that does not fit the sampler's live-images budget: the client should retry later."""


@dataclass
class RowEvent:
    key: Hashable  # the sequence
    stage: int  # index into runner.stages
    index: int  # row index within the stage
    row: np.ndarray  # (B, C, W) uint8
    logprob: np.ndarray  # (B,) float32, log p of the row (grid columns left out in the big stage)
    active: int  # sequences held by the engine after this step
    batched: int  # images in the cell call that made this row (all sequences in the call)


class Sink(Protocol):
    def send_rows(self, events: list[RowEvent]) -> None: ...  # consecutive rows of one stage, one response

    def done(self) -> None: ...  # the request's last message

    def error(self, message: str) -> None: ...  # also the request's last message

    def cancelled(self) -> bool: ...


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


@dataclass(eq=False)  # compared by identity (the spec holds arrays)
class _Waiting:
    """A START waiting in the admission queue for room in the budget (module notes, Overload)."""

    key: Hashable
    spec: SampleSpec
    request: _Request
    deadline: float  # engine clock: refused as overloaded if still waiting then
    later: list = field(default_factory=list)  # inbox items of the same sequence sent meanwhile (resume, forget)


class _Sender:
    """One sender thread, its queue and what it is doing, which the stuck-send watch reads
    (Outbox.retire_stuck); every field but `queue` under Outbox._lock."""

    def __init__(self, slot: int):
        self.slot = slot
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.pile: deque = deque()  # messages taken from the queue, not yet sent
        self.held: dict[Hashable, tuple] = {}  # key -> a row message held back (linger), not yet sent
        self.sent: Counter = Counter()  # rows sent from the current pile, not yet counted down in pending
        self.current: tuple | None = None  # the message whose sink call is in progress
        self.since: float | None = None  # when that call began (time.monotonic)
        self.retired = False  # found stuck: a fresh sender took over its slot and what it had not sent
        self.thread: threading.Thread | None = None


def _sink_of(item) -> Any:
    """The sink a queued message goes to (a row message names it; done/error are its bound methods)."""
    return item[1] if item[1] is not None else getattr(item[2], "__self__", None)


class Outbox:
    """Sink calls, inline (`senders=0`) or on sender threads, in order per sequence key.
    A sink whose `send_rows` raised (client gone) is remembered in `failed` for the engine to drop.
    `pending(key)`: rows of that key queued and not yet sent; `on_sent(key, left, sent)` is
    called by a sender after each response of `sent` rows (the engine waits on it when a
    sequence is too far ahead). Rows waiting together are coalesced (see the module notes).
    A sender whose sink call has not returned for `stuck_send_s` is retired by `retire_stuck`
    (see the module notes, "Stuck sends")."""

    def __init__(self, senders: int = 0, on_sent: Callable[[Hashable, int, int], None] | None = None, linger: float = 0.0,
                 hold_rows: int = 8, stuck_send_s: float = 0.0):
        self.failed: dict[int, str] = {}  # id(sink) -> why; written by senders, read by the worker
        self._linger, self._hold_rows, self._stuck_send_s = linger, hold_rows, stuck_send_s
        self._pending: Counter = Counter()
        self._lock = threading.Lock()  # _pending and the senders' state
        self._on_sent = on_sent
        self._senders = [self._spawn(i) for i in range(senders)]
        self._stuck_senders: list[_Sender] = []  # retired ones; their thread ends if their call ever returns
        self._abandoned: dict[int, Any] = {}  # id(sink) -> a sink a send is stuck on: nothing more goes to it
        self.stuck_sends = 0  # senders found stuck so far
        for sender in self._senders:
            sender.thread.start()

    def _spawn(self, slot: int) -> _Sender:
        sender = _Sender(slot)
        sender.thread = threading.Thread(target=self._loop, args=(sender,), name=f"row-sender-{slot}", daemon=True)
        return sender

    def put(self, key: Hashable, fn: Callable, *args) -> None:
        """A message that is not a row (done, error): failures are the client's, not counted."""
        self._send((key, None, fn, args))

    def put_row(self, key: Hashable, sink, event: RowEvent, per_response: int | None = None) -> None:
        """A row for `sink`; it may share a response with the rows queued next to it for the same
        sink (at most `per_response` rows in one)."""
        if self._senders:
            with self._lock:
                self._pending[key] += 1
        self._send((key, sink, [event], per_response))

    def pending(self, key: Hashable) -> int:
        return self._pending.get(key, 0)

    def slot(self, key: Hashable) -> int | None:
        """The sender slot whose thread sends every message of `key` (None: inline sends)."""
        return hash(key) % len(self._senders) if self._senders else None

    @property
    def healthy(self) -> bool:
        """No sink call is stuck: every sender found stuck has since returned (its thread ended)."""
        return not any(s.thread.is_alive() for s in self._stuck_senders)

    def _send(self, item) -> None:
        if self._senders:
            self._senders[self.slot(item[0])].queue.put(item)
        else:
            self._deliver(item)

    def _deliver(self, item) -> None:
        key, row_sink, fn_or_events, args = item
        if id(_sink_of(item)) in self._abandoned:  # its stream is stuck: a send would get stuck too
            return
        try:
            if row_sink is None:
                fn_or_events(*args)
            else:
                row_sink.send_rows(fn_or_events)
        except Exception as e:  # noqa: BLE001 - a client that is gone must not stop the engine
            if row_sink is not None:  # later rows would be lost: the sequence must go
                self.failed[id(row_sink)] = str(e) or type(e).__name__

    @staticmethod
    def coalesce(items: list) -> list:
        """Queued items -> the messages to send, in order per key: consecutive rows of one sink
        and stage (no other message of that key between them) become one message, up to the
        sink's per-response limit. Items of other keys in between do not separate them."""
        out, runs = [], {}  # runs: key -> the row message still open for more rows of its sink
        for item in items:
            key, sink = item[0], item[1]
            run = runs.get(key)
            if sink is not None and run is not None and run[1] is sink:
                events, limit = run[2], run[3]
                last, new = events[-1], item[2][0]
                if new.stage == last.stage and new.index == last.index + 1 and (limit is None or len(events) < limit):
                    events.append(new)
                    continue
            if sink is not None:
                item = (key, sink, list(item[2]), item[3])
                runs[key] = item
            else:
                runs.pop(key, None)  # a done/error closes the run: nothing joins a row across it
            out.append(item)
        return out

    def _loop(self, sender: _Sender) -> None:
        last: dict[Hashable, float] = {}  # key -> when its last row message was sent
        q = sender.queue
        while True:
            with self._lock:
                held = sender.held
                wait = None if not held else max(0.0, min(last[key] for key in held) + self._linger - time.monotonic())
            items = []
            try:
                items.append(q.get(timeout=wait) if wait is None or wait > 0 else q.get_nowait())
            except queue.Empty:
                pass
            while True:  # everything that piled up while the last messages were sent
                try:
                    items.append(q.get_nowait())
                except queue.Empty:
                    break
            stop = None in items
            with self._lock:  # (a sender is retired only in a sink call: never here)
                messages = self.coalesce([*held.values(), *(i for i in items if i is not None)])
                held.clear()
                sender.pile.extend(messages)
            final = {item[0]: item for item in messages}  # each key's last message
            now = time.monotonic()
            while True:
                with self._lock:
                    if sender.retired or not sender.pile:
                        break
                    item = sender.pile.popleft()
                    key, row_sink = item[0], item[1]
                    if row_sink is not None and not stop and final[key] is item and self._may_hold(item, last.get(key), now):
                        held[key] = item
                        continue
                    sender.current, sender.since = item, time.monotonic()
                self._deliver(item)
                with self._lock:
                    retired = sender.retired  # stuck in that call: a fresh sender has what was left
                    if not retired:
                        sender.current = sender.since = None
                        if row_sink is not None:
                            sender.sent[key] += len(item[2])
                            last[key] = now
                        else:
                            last.pop(key, None)  # done/error: the request is over
                if retired:
                    if row_sink is not None:  # the call did return, but its stream was given up: say so, finally
                        _safe(row_sink.error, f"{UNHEALTHY} a response send to this stream did not return for "
                                              f"{self._stuck_send_s:g} s and the sampler gave the stream up: resume it on "
                                              f"another replica (the rows received as KNOWN, the same seed)")
                    return
            # Counted once the whole pile is sent, not per response: the keys of one sender then
            # drain together, and the engine advances them together (see Engine._ready).
            with self._lock:
                if sender.retired:
                    return
                sent, sender.sent = sender.sent, Counter()
                left = {}
                for key, n in sent.items():
                    left[key] = self._pending[key] = self._pending[key] - n
                    if not left[key]:
                        del self._pending[key]
            if self._on_sent is not None:
                for key, n in sent.items():
                    self._on_sent(key, left[key], n)
            if stop:
                return

    def _may_hold(self, item, last_sent: float | None, now: float) -> bool:
        """Whether a sequence's latest rows may wait for more (linger): only when its previous
        rows went out less than `linger` seconds ago (never its first row: first-row latency is
        kept), fewer than `hold_rows` are waiting, and its request did not ask for a row limit
        per response (ROWS_PER_RESPONSE, strict pacing)."""
        return (self._linger > 0 and last_sent is not None and now - last_sent < self._linger and item[3] is None
                and len(item[2]) < self._hold_rows)

    def retire_stuck(self) -> list[tuple[int, Hashable]]:
        """Retire every sender whose sink call has been outstanding for more than `stuck_send_s`
        (0: never): a fresh sender takes its slot and, in their order, the messages it had not
        sent (taken, held back or queued), except those to the sink it is stuck on, which is
        abandoned (nothing is sent to it any more: its stream is stuck). The stuck thread is left
        to its call; if that ever returns, the thread ends that stream with an error, then itself.
        Returns (slot, key of the stuck message) per sender retired now. The engine's worker
        calls it (Engine._housekeeping)."""
        if not self._stuck_send_s:
            return []
        retired, now = [], time.monotonic()
        with self._lock:
            for slot, sender in enumerate(self._senders):
                if sender.since is None or now - sender.since <= self._stuck_send_s:
                    continue
                sender.retired = True
                stuck = _sink_of(sender.current)
                self._abandoned[id(stuck)] = stuck  # kept alive, so that its id is never another sink's
                rest = [*sender.pile, *sender.held.values()]  # a held message is its key's last in the pile
                while True:
                    try:
                        rest.append(sender.queue.get_nowait())
                    except queue.Empty:
                        break
                # Rows that will never be sent no longer count as pending: those sent from the pile,
                # the stuck message's, and those to the abandoned sink.
                gone = sender.sent + Counter({sender.current[0]: len(sender.current[2])} if sender.current[1] is not None else {})
                fresh = self._spawn(slot)
                for item in rest:
                    if item is not None and _sink_of(item) is stuck:
                        if item[1] is not None:
                            gone[item[0]] += len(item[2])
                        continue
                    fresh.queue.put(item)
                for key, n in gone.items():
                    self._pending[key] -= n
                    if self._pending[key] <= 0:
                        del self._pending[key]
                self._senders[slot] = fresh
                self._stuck_senders.append(sender)
                self.stuck_sends += 1
                retired.append((slot, sender.current[0]))
                fresh.thread.start()
        return retired

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued, then stop the senders (not a stuck one: it is left to its call)."""
        senders = list(self._senders)
        for sender in senders:
            sender.queue.put(None)
        for sender in senders:
            sender.thread.join(timeout)


class Engine:
    def __init__(self, runner, max_batch: int = 64, idle_timeout: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, poll: float = 0.5, senders: int = 0, max_ahead: int = 16,
                 linger: float = 0.0, max_images: int | None = None, trim: Callable[[], Any] = give_back_memory,
                 fair: bool = True, stuck_send_s: float = STUCK_SEND_S, max_waiting: int = 0, wait_s: float = 0.0):
        self.runner = runner
        if max_images is not None and max_images < max_batch:
            raise ValueError(f"max_images ({max_images}) must hold at least one full sequence (max_batch {max_batch})")
        if max_waiting < 0 or (max_waiting and not (wait_s > 0 and max_images is not None)):
            raise ValueError(f"an admission queue (max_waiting {max_waiting}) needs a budget (max_images) and a wait > 0 s, "
                             f"got max_images {max_images}, wait_s {wait_s}")
        self.max_images = max_images  # live-images budget (None: unbounded); see the module notes
        self.max_waiting, self.wait_s = max_waiting, wait_s  # the admission queue (module notes; 0: none)
        self._images = 0  # images of live and admitted sequences; under _cv
        self._waiting: deque[_Waiting] = deque()  # STARTs waiting for room, oldest first; under _cv
        # STARTs admitted (at once or after waiting), queued (they waited) and refused for the
        # budget (at once, or when their wait ran out): under _cv
        self.admitted = self.queued = self.overloaded = 0
        # Give memory back twice per idle period (step): trims done in this one (2: none due; never
        # busy yet), and since when it has been idle (engine clock).
        self._trim, self._trims, self._idle_since = trim, 2, 0.0
        self.fair = fair  # False: every ready sequence in every step, as before (bench/overload.py compares)
        self.stages: list[Stage] = list(runner.stages)
        self.max_batch, self.idle_timeout, self.clock, self.poll = max_batch, idle_timeout, clock, poll
        self._sequences: dict[Hashable, _Sequence] = {}  # worker thread only
        self._inbox: deque = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.max_ahead = max_ahead  # rows a sequence may have queued for its sender (see the module notes)
        # linger: see the module notes. Held rows stay under max_ahead / 2, below where a sequence
        # would wait for its sender (_ready), so holding them never stalls the cell calls.
        self._outbox = Outbox(senders, on_sent=self._row_sent, linger=linger, hold_rows=max(1, max_ahead // 2),
                              stuck_send_s=stuck_send_s)
        self.stuck_send_s = stuck_send_s  # a send outstanding this long is stuck (module notes, "Stuck sends")
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
        """Check a START request's parameters; raises ValueError with a message for the client."""
        c, h, w = self.shape
        levels, classes = self.runner.levels, self.runner.num_classes
        if not 1 <= spec.batch <= self.max_batch:
            raise ValueError(f"BATCH_SIZE must be in [1, {self.max_batch}], got {spec.batch}")
        # A tiny T > 0 (5e-324) makes logits / T overflow to inf and the softmax NaN: the row would be
        # neither sampled nor greedy. 1e-6 is far from that and already as good as greedy.
        min_temperature = 1e-6
        if not (math.isfinite(spec.temperature) and (spec.temperature == 0 or spec.temperature >= min_temperature)):
            raise ValueError(f"TEMPERATURE must be 0 (greedy) or a finite number >= {min_temperature:g}, got {spec.temperature}")
        if not 0 <= spec.seed < 2**64:
            raise ValueError(f"SEED must be in [0, 2**64), got {spec.seed}")
        if classes:
            if spec.labels is None:
                raise ValueError("this model is class-conditional: LABELS (one class id, or one per image) is required")
            labels = np.asarray(spec.labels, np.int64).reshape(-1)
            if labels.size == 1:
                labels = np.repeat(labels, spec.batch)
            if labels.shape != (spec.batch,):
                raise ValueError(f"LABELS must hold 1 class id or one per image ({spec.batch}), got {labels.size}")
            if labels.min() < 0 or labels.max() >= classes:
                raise ValueError(f"LABELS must be in [0, {classes}), got {labels.tolist()}")
            spec.labels = labels
        elif spec.labels is not None:
            raise ValueError("this model is not class-conditional: do not send LABELS")
        if spec.known is not None:
            known = np.asarray(spec.known)
            if known.ndim != 4 or known.shape[0] != spec.batch or known.shape[1] != c or known.shape[3] != w or known.shape[2] > h:
                raise ValueError(f"KNOWN must be {spec.batch} x {c} x R x {w} (R <= {h} known rows), got {' x '.join(map(str, known.shape))}")
            if known.size and int(known.max()) >= levels:
                raise ValueError(f"KNOWN values must be < {levels} (the model's levels), got {int(known.max())}")
            spec.known = known.astype(np.int64)
        return spec

    def start(self, key: Hashable, spec: SampleSpec, sink: Sink, max_rows: int | None = None, end: bool = True,
              rows_per_response: int | None = None) -> None:
        """Open sequence `key` (a START for a key that is live is refused on the request's sink);
        raises ValueError for bad parameters, Overloaded when its images do not fit `max_images`
        and cannot wait (no admission queue, or a full one: module notes); one that waits is
        admitted later, or refused on its sink when its wait runs out. `rows_per_response`: at most this many rows in one `sink.send_rows` call (1: one per row;
        None: as many as are waiting)."""
        self._check_rows(max_rows, rows_per_response)
        self.validate(spec)
        request = _Request(sink, max_rows, end, rows_per_response)
        with self._cv:  # admission and queueing under one lock: concurrent STARTs cannot overshoot
            if self._waiting_for(key) is not None:
                raise ValueError(f"sequence {key} is already waiting for room in the sampler: a START request needs a new "
                                 f"sequence id")
            if self.max_images is None or (not self._waiting and self._images + spec.batch <= self.max_images):
                self._admit(key, spec, request)
            elif len(self._waiting) < self.max_waiting:  # FIFO: a START that fits does not pass one that waits
                self._waiting.append(_Waiting(key, spec, request, self.clock() + self.wait_s))
                self.queued += 1
                self._cv.notify()  # the worker wakes by this deadline at the latest (_loop)
            else:
                self.overloaded += 1
                full = f" and the admission queue is full ({len(self._waiting)} STARTs wait)" if self.max_waiting else ""
                raise Overloaded(f"{self._load()}; a START of {spec.batch} more does not fit{full}: retry later")

    def resume(self, key: Hashable, sink: Sink, max_rows: int | None = None, end: bool = False,
               rows_per_response: int | None = None) -> None:
        """Ask an open sequence for more rows (all remaining when max_rows is None)."""
        self._check_rows(max_rows, rows_per_response)
        self._post_or_hold(("resume", key, None, _Request(sink, max_rows, end, rows_per_response)))

    def forget(self, key: Hashable) -> None:
        """The caller no longer knows sequence `key` (Triton forgets an id at an END flag, even
        on a request it refused): end it once what it already asked for is streamed."""
        self._post_or_hold(("forget", key, None, None))

    def _post_or_hold(self, item) -> None:
        """Queue a request of an open sequence for the worker; one whose START waits for room
        goes in right after that START is admitted (or is refused with it)."""
        with self._cv:
            waiting = self._waiting_for(item[1])
            if waiting is None:
                self._post(item)
            else:
                waiting.later.append(item)

    def _waiting_for(self, key: Hashable) -> _Waiting | None:
        """The waiting START of sequence `key`, if any (under _cv; the queue is short: max_waiting)."""
        return next((w for w in self._waiting if w.key == key), None)

    def _load(self) -> str:
        """How an overloaded refusal begins: the load and the budget (under _cv)."""
        return f"{OVERLOADED} the sampler holds {self._images} live images, its budget is {self.max_images} (max_live_images)"

    def _admit(self, key: Hashable, spec: SampleSpec, request: _Request, later: list = ()) -> None:
        """Take sequence `key` into the budget and queue its START (and what came for it meanwhile)
        for the worker (under _cv)."""
        self._post(("start", key, spec, request))
        for item in later:
            self._post(item)
        self._images += spec.batch
        self.admitted += 1

    def _admit_waiting(self) -> None:
        """Admit the waiting STARTs, oldest first, while the oldest fits (under _cv)."""
        while self._waiting and not self._stopping and self._images + self._waiting[0].spec.batch <= self.max_images:
            waiting = self._waiting.popleft()
            self._admit(waiting.key, waiting.spec, waiting.request, waiting.later)

    def _expire_waiting(self) -> None:
        """Refuse the waiting STARTs whose wait ran out (overloaded, as a START refused at once
        is) and drop those whose client is gone; then admit what fits behind them."""
        with self._cv:
            waiting = list(self._waiting)
        if not waiting:
            return
        now = self.clock()
        # cancelled() may be a round trip to the server (the Triton glue): not under the lock.
        gone = [(w, None if now >= w.deadline else "cancelled") for w in waiting
                if now >= w.deadline or _safe(w.request.sink.cancelled, default=False)]
        refusals = []
        with self._cv:
            for w, message in gone:
                if w in self._waiting:  # not admitted meanwhile
                    self._waiting.remove(w)
                    if message is None:
                        self.overloaded += 1
                        message = (f"{self._load()}; a START of {w.spec.batch} more waited {self.wait_s:g} s for room "
                                   f"(admission_wait_ms): retry later")
                    refusals.append((w, message))
            self._admit_waiting()  # a big START gone from the head may let the smaller ones behind it in
        for w, message in refusals:
            self._refuse_waiting(w, message)

    def _refuse_waiting(self, waiting: _Waiting, message: str) -> None:
        """A waiting START's error, and its sequence's requests that came meanwhile get it too."""
        self._outbox.put(waiting.key, waiting.request.sink.error, message)
        for _, key, _, request in waiting.later:
            if request is not None:  # a resume (a forget has no one to tell)
                self._outbox.put(key, request.sink.error, message)

    @staticmethod
    def _check_rows(max_rows, rows_per_response=None):
        if max_rows is not None and max_rows < 0:
            raise ValueError(f"MAX_ROWS must be >= 0, got {max_rows}")
        if rows_per_response is not None and rows_per_response < 1:
            raise ValueError(f"ROWS_PER_RESPONSE must be >= 1 (1: one response per row), got {rows_per_response}")

    def _release(self, images: int) -> None:
        with self._cv:
            self._images -= images
            self._admit_waiting()

    def _post(self, item) -> None:
        with self._cv:  # an RLock (Condition's default): start() holds it already
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
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cv:
            waiting = list(self._waiting)
            self._waiting.clear()
        for w in waiting:
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
                    self._cv.wait(self.poll if not self._waiting else
                                  min(self.poll, max(0.0, self._waiting[0].deadline - self.clock())))
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
            _safe(self._trim)
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
            elif seq.requests and _safe(seq.requests[0].sink.cancelled, default=False):
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
        stuck: module notes, "Stuck sends") and counters since start: STARTs admitted (at once or
        after waiting) / queued (they waited for room) / overloaded (refused for the budget, at
        once or when their wait ran out), sequences started (opened by the worker) / completed /
        ended / cancelled / disconnected / expired / failed / shutdown / stuck (ended because
        their sender was stuck), requests refused (bad or conflicting), rows streamed, batched
        cell calls, stuck_sends (sender threads found stuck), and cell_seconds (float: wall seconds
        in the cell calls). Worker thread (or, approximately, any thread: plain numbers only)."""
        keys = ("started", "completed", "ended", "cancelled", "disconnected", "expired", "failed", "shutdown", "stuck", "refused",
                "rows")
        return {"live": len(self._sequences), "live_images": self._images, "budget": self.max_images or 0,
                "waiting": len(self._waiting), "admitted": self.admitted, "queued": self.queued,
                "healthy": int(self._outbox.healthy), **{k: self.counts[k] for k in keys}, "overloaded": self.overloaded,
                "calls": self.calls, "stuck_sends": self._outbox.stuck_sends, "cell_seconds": self.cell_seconds}


def _safe(fn, *args, default=None):
    """Call a sink method; a sink that fails (client gone) must not stop the worker."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001
        return default
