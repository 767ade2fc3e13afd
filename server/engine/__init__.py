"""The row engine: many sampling sequences advanced together, one batched cell call per row
step, rows streamed to each sequence's own sink. It knows nothing of Triton (the glue in
server/triton_models/ adapts it), so it is tested in process with fake runners and sinks.

    scheduler  the Engine: its workers, where each sequence runs, requests, one view of them all
    worker     one worker thread: its sequences, batched row steps, expiry, fairness, its outbox
    admission  which STARTs it takes in: the live-images budget, the admission queue
    outbox     every sink call: sender threads, row coalescing, stuck sends
"""
from pixelrnn.server.engine.admission import DEFAULT_MEMORY_MB, Overloaded, live_images_budget
from pixelrnn.server.engine.outbox import STUCK_SEND_S, Outbox, RowEvent, Sink
from pixelrnn.server.engine.scheduler import MAX_WORKERS, Engine, default_workers

__all__ = ["DEFAULT_MEMORY_MB", "MAX_WORKERS", "STUCK_SEND_S", "Engine", "Outbox", "Overloaded", "RowEvent", "Sink",
           "default_workers", "live_images_budget"]
