"""Triton Python-backend glue of NAME_sample (copied as model.py, beside the pixelrnn modules it
imports, by server/repository.py).

Streaming (decoupled) and stateful: requests only validate and queue work for the row engine
(server/engine/), whose worker threads advance their active sequences together and stream
each sequence's rows through its own response sender, the rows that waited together in one
response. Protocol: runtime/protocol.py. A START over the live-images budget (server/engine/admission.py,
the config's max_live_images / sampler_memory_mb) is answered at once with an UNAVAILABLE error
naming the budget and the load: the client may retry later (client/library.py does when asked);
with the config's admission_queue / admission_wait_ms it waits for room first, and only then
gets that error.
"""
import secrets
import sys
import threading
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

# The pixelrnn modules this file imports are copied beside it (server/repository.py): the
# repository needs no project checkout and no install. The stub runs Python in isolated mode
# (PYTHONPATH ignored), so the folder goes on sys.path here, first, ahead of any pixelrnn the
# environment may hold.
# No __pycache__ written into the repository: it may be read-only (a mounted volume).
sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pixelrnn  # noqa: E402
from pixelrnn.runtime import protocol as p  # noqa: E402
from pixelrnn.server.engine import (DEFAULT_MEMORY_MB, STUCK_SEND_S, Engine, Overloaded, default_workers,  # noqa: E402
                                    live_images_budget)
from pixelrnn.runtime.manifest import model_folder  # noqa: E402
from pixelrnn.runtime.rowloop import SampleSpec  # noqa: E402
from pixelrnn.runtime.runner import OnnxRunner  # noqa: E402

START = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
END = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CANCEL_CHECK_S = 0.2  # is_cancelled() is a round trip to the server: not on every row
METRICS_PERIOD_S = 0.5  # so is every metric update


class ResponseSink:
    """One request's response stream, as the engine's Sink."""

    def __init__(self, request):
        self.sender = request.get_response_sender()
        # Only the outputs the client asked for (all, unless it named some): every tensor of a
        # streamed row costs shared memory and copies in the backend and in Triton.
        self.outputs = set(request.requested_output_names())
        self._checked, self._cancelled = 0.0, False

    def send_rows(self, events) -> None:
        """Consecutive rows of one stage as one response (the engine coalesces the rows that
        waited for this sender; runtime/protocol.py): ROW B x C x R x W, ROW_LOGPROB B x R."""
        last, wanted = events[-1], self.outputs
        values = {
            p.STAGE: lambda: np.array([last.stage], np.int32),
            p.ROW_INDEX: lambda: np.array([events[0].index], np.int32),
            p.ROW_COUNT: lambda: np.array([len(events)], np.int32),
            p.ROW: lambda: np.stack([e.row for e in events], axis=2).astype(np.uint8, copy=False),
            p.ROW_LOGPROB: lambda: np.stack([e.logprob for e in events], axis=1).astype(np.float32, copy=False),
            p.ACTIVE: lambda: np.array([last.active], np.int32),
            p.CALL_BATCH: lambda: np.array([e.batched for e in events], np.int32),
        }
        self.sender.send(pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, make()) for name, make in values.items() if not wanted or name in wanted]))

    def done(self) -> None:
        self.sender.send(flags=FINAL)

    def error(self, message: str, code=None) -> None:
        if code is None and message.startswith(p.OVERLOADED):  # a START whose wait for room ran out (server/engine/)
            code = pb_utils.TritonError.UNAVAILABLE  # not the request's fault: the client may retry
        error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
        self.sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)

    def cancelled(self) -> bool:
        now = time.monotonic()
        if not self._cancelled and now - self._checked > CANCEL_CHECK_S:
            self._checked = now
            self._cancelled = bool(self.sender.is_cancelled())
        return self._cancelled


class SamplerMetrics:
    """The engine's stats as Triton custom metrics, on the server's metrics endpoint
    (http://HOST:METRICS_PORT/metrics): pixelrnn_sampler_live_sequences{model=...},
    pixelrnn_sampler_live_images{model=...} (admitted, not yet freed),
    pixelrnn_sampler_images_budget{model=...} (max live images; 0: none),
    pixelrnn_sampler_waiting_starts{model=...} (STARTs in the admission queue now),
    pixelrnn_sampler_healthy{model=...} (1; 0 while a response send is stuck: server/engine/,
    "Stuck sends"; server/cluster.py restarts a replica that says 0),
    pixelrnn_sampler_cell_seconds_total{model=...} (wall seconds in batched cell calls: over a
    time span, the share of it the cells took; bench.serving reads it) and
    pixelrnn_sampler_events_total{model=..., event=started|completed|...|overloaded|rows|calls|stuck_sends}
    (admitted: STARTs admitted, at once or after waiting; queued: STARTs that waited for room;
    overloaded: STARTs refused for the budget, at once or when their wait ran out; started:
    sequences opened; refused: bad or conflicting requests; stuck_sends: sender
    threads found stuck; stuck: sequences ended for it).
    A thread of its own pushes changes, so the engine never waits on the round trips.

    Every metric moves by increments, the gauges too (by their change since the last push): in
    Triton 2.51 Metric.set waits for the server's answer holding the GIL, increment releases it.
    A set that a server shutting down never answers froze the whole stub, finalize included, and
    the stub outlived tritonserver."""

    def __init__(self, engine, model: str):
        self.engine = engine
        live = pb_utils.MetricFamily(name="pixelrnn_sampler_live_sequences", description="sampling sequences held in memory",
                                     kind=pb_utils.MetricFamily.GAUGE)
        events = pb_utils.MetricFamily(name="pixelrnn_sampler_events_total", description="sampler events since the model loaded",
                                       kind=pb_utils.MetricFamily.COUNTER)
        images = pb_utils.MetricFamily(name="pixelrnn_sampler_live_images", description="images of the live sampling sequences",
                                       kind=pb_utils.MetricFamily.GAUGE)
        budget = pb_utils.MetricFamily(name="pixelrnn_sampler_images_budget",
                                       description="live images the sampler admits (0: no budget)", kind=pb_utils.MetricFamily.GAUGE)
        healthy = pb_utils.MetricFamily(name="pixelrnn_sampler_healthy", kind=pb_utils.MetricFamily.GAUGE,
                                        description="1, or 0 while a response send is stuck (restart the server)")
        waiting = pb_utils.MetricFamily(name="pixelrnn_sampler_waiting_starts", kind=pb_utils.MetricFamily.GAUGE,
                                        description="STARTs waiting in the admission queue for room in the budget")
        cells = pb_utils.MetricFamily(name="pixelrnn_sampler_cell_seconds_total", kind=pb_utils.MetricFamily.COUNTER,
                                      description="wall seconds the sampler spent in batched cell calls")
        self.families = (live, events, images, budget, healthy, waiting, cells)  # a family must outlive its metrics
        self.gauges = {"live": live.Metric(labels={"model": model}), "live_images": images.Metric(labels={"model": model}),
                       "budget": budget.Metric(labels={"model": model}), "healthy": healthy.Metric(labels={"model": model}),
                       "waiting": waiting.Metric(labels={"model": model})}
        # Every counter is pushed the same way (increments since the last push); cell_seconds has a
        # family of its own (seconds, not events).
        self.counters = {k: events.Metric(labels={"model": model, "event": k}) for k in engine.stats()
                         if k not in self.gauges and k != "cell_seconds"}
        self.counters["cell_seconds"] = cells.Metric(labels={"model": model})
        self._sent = {k: 0 for k in (*self.gauges, *self.counters)}  # a new metric starts at 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sampler-metrics", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(METRICS_PERIOD_S):
            try:
                self.push()
            except Exception as e:  # noqa: BLE001 - metrics must never take the sampler down
                if not self._stop.is_set():  # a server shutting down may refuse the last push: nothing to report
                    pb_utils.Logger.log_warn(f"sampler metrics: {type(e).__name__}: {e}")

    def push(self) -> None:
        stats = self.engine.stats()
        for metrics, signed in ((self.gauges, True), (self.counters, False)):
            for k, metric in metrics.items():
                change = stats[k] - self._sent[k]
                if self._stop.is_set():  # no call to the server once stop() began
                    return
                if change > 0 or (signed and change):
                    metric.increment(change)
                    self._sent[k] = stats[k]

    def stop(self) -> None:
        """No metric call starts after this. One under way gets a moment to finish, no more: the
        server may never answer it (its thread is a daemon and waits without the GIL)."""
        self._stop.set()
        self._thread.join(METRICS_PERIOD_S)


def one_value(request, name: str, kind: type, default=None):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    value = tensor.as_numpy()
    if value.size != 1:
        raise ValueError(f"{name} must hold one value, got shape {list(value.shape)}")
    return kind(value.reshape(-1)[0])


def array(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class TritonPythonModel:
    def initialize(self, args):
        model = model_folder(args)
        config, params, manifest = model.config, model.params, model.manifest
        # Engine workers (server/engine/): each runs its sequences' cell calls on a session of its own,
        # on its own core (onnxruntime releases the GIL while a session runs); 0: the usable cores but one.
        workers = int(params.get("engine_workers", "0")) or default_workers()
        runners = [OnnxRunner.from_manifest(manifest, model.folder, threads=int(params.get("onnx_threads", "1")))
                   for _ in range(workers)]
        runner = runners[0]
        # Triton forgets idle sequences without telling the model: expire ours on the same clock.
        idle_us = int(config["sequence_batching"].get("max_sequence_idle_microseconds", 60_000_000))
        # Sender threads: each response is a round trip to the server; several overlap them with
        # each other and with the next step's cell call.
        senders = int(params.get("sender_threads", "2"))
        # Row coalescing window (server/engine/): a sequence's rows may wait this long after its
        # previous response to go out together; each response costs IPC, gRPC and client CPU.
        linger_ms = float(params.get("coalesce_ms", "0"))
        # A response send outstanding this long is stuck (server/engine/, "Stuck sends"; 0: off).
        stuck_send_s = float(params.get("stuck_send_s", str(STUCK_SEND_S)))
        # Live-images budget (server/engine/admission.py): the config's max_live_images, else what
        # sampler_memory_mb holds at the state size per image the manifest gives.
        budget = int(params.get("max_live_images", "0")) or live_images_budget(
            manifest, float(params.get("sampler_memory_mb", DEFAULT_MEMORY_MB)))
        # Admission queue (server/engine/, Overload): STARTs that do not fit wait this long, this many at most (0: none).
        queue_starts, wait_ms = int(params.get("admission_queue", "0")), float(params.get("admission_wait_ms", "0"))
        self.engine = Engine(runners, max_batch=int(manifest["max_batch"]), idle_timeout=idle_us / 1e6, senders=senders,
                             linger=linger_ms / 1e3, max_images=budget, stuck_send_s=stuck_send_s, max_waiting=queue_starts,
                             wait_s=wait_ms / 1e3)
        self.engine.start_worker()
        self.metrics = SamplerMetrics(self.engine, args["model_name"])
        pb_utils.Logger.log_info(f"{args['model_name']}: {manifest['arch']} {manifest['shape']} levels {manifest['levels']}, "
                                 f"stages {[s.name for s in runner.stages]}, idle timeout {idle_us / 1e6:g} s, {workers} engine workers "
                                 f"with {senders} sender threads each, "
                                 f"coalescing window {linger_ms:g} ms, live-images budget {budget}, admission queue {queue_starts} "
                                 f"(wait {wait_ms:g} ms), stuck-send bound {stuck_send_s:g} s, "
                                 f"pixelrnn from {Path(pixelrnn.__file__).parent}")

    def execute(self, requests):
        for request in requests:
            sink = ResponseSink(request)
            key, flags = request.correlation_id(), request.flags()
            end = bool(flags & END)
            try:
                max_rows = one_value(request, p.MAX_ROWS, int)
                per_response = one_value(request, p.ROWS_PER_RESPONSE, int)
                if flags & START:
                    known = array(request, p.KNOWN)
                    seed = one_value(request, p.SEED, int)
                    batch = one_value(request, p.BATCH_SIZE, int)
                    if batch is None and known is not None and not 1 <= known.shape[0] <= self.engine.max_batch:
                        # The batch comes from KNOWN here: a BATCH_SIZE message would name an input never sent.
                        raise ValueError(f"KNOWN must hold between 1 and {self.engine.max_batch} images (B of B x C x R x W), got {known.shape[0]}")
                    spec = SampleSpec(
                        batch=(1 if known is None else known.shape[0]) if batch is None else batch,
                        temperature=one_value(request, p.TEMPERATURE, float, 1.0),
                        seed=secrets.randbits(63) if seed is None else seed,
                        labels=array(request, p.LABELS),
                        known=known,
                    )
                    self.engine.start(key, spec, sink, max_rows, end, per_response)
                else:
                    extra = [n for n in p.START_ONLY if pb_utils.get_input_tensor_by_name(request, n) is not None]
                    if extra:
                        raise ValueError(f"{', '.join(extra)} only go with the START request of a sequence")
                    self.engine.resume(key, sink, max_rows, end, per_response)
            except Exception as e:  # noqa: BLE001 - every error goes back on the request's stream
                if end:
                    # Triton forgets the sequence at this END although the request was refused. The engine
                    # must too, or the id stays "already active" until the idle timeout while Triton refuses
                    # every later request of it that is not a START.
                    try:
                        self.engine.forget(key)
                    except RuntimeError:  # shutting down: nothing left to free
                        pass
                if isinstance(e, Overloaded):  # not the request's fault: UNAVAILABLE, the client may retry
                    sink.error(str(e), pb_utils.TritonError.UNAVAILABLE)
                else:
                    sink.error(str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}")
        return None

    def finalize(self):
        # Metrics first: no call to the server starts once the model is going away. The engine's
        # stop is bounded well inside tritonserver's exit timeout (--exit-timeout-secs, 10 s in
        # server/launcher.py), past which tritonserver exits without waiting for this stub.
        self.metrics.stop()
        self.engine.stop(timeout=5.0)
