"""The row engine: many sampling sequences advanced together, one batched cell call per row
step, rows streamed to each sequence's own sink. It knows nothing of Triton (the glue in
server/triton_models/ adapts it), so it is tested in process with fake runners and sinks."""
from pixelrnn.server.engine.admission import DEFAULT_MEMORY_MB, live_images_budget
from pixelrnn.server.engine.scheduler import STUCK_SEND_S, Engine, Overloaded

__all__ = ["DEFAULT_MEMORY_MB", "STUCK_SEND_S", "Engine", "Overloaded", "live_images_budget"]
