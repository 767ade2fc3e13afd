"""The engine's response outbox: every sink call (rows, done, error) of the row engine
(server/engine/scheduler.py), inline or on sender threads, in order per sequence.

Senders. With `senders=0` sink calls run inline on the caller's thread; with `senders=K` they
run on K sender threads, so that sending a step's rows (a round trip to the Triton server per
response, ~0.5 ms) overlaps the next step's cell call instead of adding to it. Every message of
one sequence goes to the same sender (its slot), so a stream's order is kept. The outbox counts
each sequence's rows queued and not yet sent (`pending`) and reports every response sent
(`on_sent`): the engine keeps a sequence at most `max_ahead` rows ahead of its sender with them.

Coalescing. A sender takes everything queued for it at once, and the consecutive rows of one
request (same stage) waiting there go to its sink in one `send_rows(events)` call, one response,
up to the request's `rows_per_response` (None: no limit). A sender that keeps up finds one row
and sends it at once, so the first row is not delayed; a sender that is behind sends what has
piled up as one response, so the response path's fixed cost per message (IPC, gRPC, the
client's parsing: most of a tiny model's serving cost) is paid once per pile. Senders mostly
keep up (a row step of many sequences costs more than its sends), so piles rarely form by
themselves; `linger` (seconds, 0: off) lets them form: a sequence's rows wait until `linger`
after its previous response went out, or until `hold_rows` of them wait, then go out together.
Its first row never waits (first-row latency is kept), nor do the rows of a request that asked
for a per-response limit (ROWS_PER_RESPONSE), nor the last rows of a request (its final message
flushes them).

Stuck sends. A sink call that never returns (Triton 2.51's gRPC stream handler can deadlock
when a cancellation races a response write) would stall every sequence on its sender thread.
Each sender records when its current sink call began; `retire_stuck` (the engine's housekeeping
calls it) retires a sender whose call has been outstanding for more than `stuck_send_s` (0:
never; inline sends cannot be watched): a fresh thread takes its slot and the messages it had
not sent, in order, except those to the stuck stream, which is abandoned (nothing more is sent
to it: a send would get stuck too). `healthy` is False while the stuck call has not returned.
The stuck thread is left in its call; should the call return, the thread sends that given-up
stream a final UNHEALTHY error (so that its client need not wait for its own timeout) and ends.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Protocol

import numpy as np

from pixelrnn.runtime.protocol import UNHEALTHY

STUCK_SEND_S = 10.0  # a sink call outstanding this long is stuck (module notes, "Stuck sends")


@dataclass
class RowEvent:
    """One row the engine made for a sequence, as its sink gets it."""

    key: Hashable  # the sequence
    stage: int  # index into runner.stages
    index: int  # row index within the stage
    row: np.ndarray  # (B, C, W) uint8
    logprob: np.ndarray  # (B,) float32, log p of the row (grid columns left out in the big stage)
    active: int  # sequences held by the engine after this step
    batched: int  # images in the cell call that made this row (all sequences in the call)


class Sink(Protocol):
    """Where one request's rows go (the Triton glue wraps a response sender in one)."""

    def send_rows(self, events: list[RowEvent]) -> None: ...  # consecutive rows of one stage, one response

    def done(self) -> None: ...  # the request's last message

    def error(self, message: str) -> None: ...  # also the request's last message

    def cancelled(self) -> bool: ...


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
                        safe_call(row_sink.error, f"{UNHEALTHY} a response send to this stream did not return for "
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


def safe_call(fn, *args, default=None):
    """Call a sink method; a sink that fails (client gone) must not stop the worker."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001
        return default
