"""Triton Python-backend glue of NAME_sample (copied as model.py by server/repository.py).

Streaming (decoupled) and stateful: requests only validate and queue work for the row engine
(server/engine.py), whose worker thread advances all active sequences together and streams
each sequence's rows through its own response sender. Protocol: server/protocol.py.
"""
import json
import secrets
import sys
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

START = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
END = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CANCEL_CHECK_S = 0.2  # is_cancelled() is a round trip to the server: not on every row


def use_project(config: dict, folder: Path) -> None:
    """The stub runs Python in isolated mode (PYTHONPATH ignored): put the project on sys.path.
    A relative project_root is relative to the model's version folder (a repository kept
    inside the project, like model_repository/, then works from any clone)."""
    root = config.get("parameters", {}).get("project_root", {}).get("string_value")
    path = (folder / root).resolve() if root else None
    if path is None or not (path / "server" / "runner.py").is_file():
        raise pb_utils.TritonModelException(f"parameter project_root ({root!r}) is not the project's folder")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


class ResponseSink:
    """One request's response stream, as the engine's Sink."""

    def __init__(self, request):
        self.sender = request.get_response_sender()
        self._checked, self._cancelled = 0.0, False

    def row(self, event) -> None:
        from server import protocol as p

        self.sender.send(pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(p.STAGE, np.array([event.stage], np.int32)),
            pb_utils.Tensor(p.ROW_INDEX, np.array([event.index], np.int32)),
            pb_utils.Tensor(p.ROW, np.ascontiguousarray(event.row, np.uint8)),
            pb_utils.Tensor(p.ROW_LOGPROB, np.ascontiguousarray(event.logprob, np.float32)),
            pb_utils.Tensor(p.ACTIVE, np.array([event.active], np.int32)),
            pb_utils.Tensor(p.CALL_BATCH, np.array([event.batched], np.int32)),
        ]))

    def done(self) -> None:
        self.sender.send(flags=FINAL)

    def error(self, message: str) -> None:
        self.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)

    def cancelled(self) -> bool:
        now = time.monotonic()
        if not self._cancelled and now - self._checked > CANCEL_CHECK_S:
            self._checked = now
            self._cancelled = bool(self.sender.is_cancelled())
        return self._cancelled


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
        config = json.loads(args["model_config"])
        use_project(config, Path(args["model_repository"]) / args["model_version"])
        from server.engine import Engine
        from server.runner import OnnxRunner, read_manifest

        folder = Path(args["model_repository"]) / args["model_version"]
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        manifest = read_manifest(folder)
        runner = OnnxRunner(manifest, folder, threads=int(params.get("onnx_threads", "1")))
        # Triton forgets idle sequences without telling the model: expire ours on the same clock.
        idle_us = int(config["sequence_batching"].get("max_sequence_idle_microseconds", 60_000_000))
        self.engine = Engine(runner, max_batch=int(manifest["max_batch"]), idle_timeout=idle_us / 1e6)
        self.engine.start_worker()
        pb_utils.Logger.log_info(f"{args['model_name']}: {manifest['arch']} {manifest['shape']} levels {manifest['levels']}, "
                                 f"stages {[s.name for s in runner.stages]}, idle timeout {idle_us / 1e6:g} s")

    def execute(self, requests):
        from server import protocol as p
        from server.engine import SampleSpec

        for request in requests:
            sink = ResponseSink(request)
            try:
                key, flags = request.correlation_id(), request.flags()
                max_rows = one_value(request, p.MAX_ROWS, int)
                end = bool(flags & END)
                if flags & START:
                    known = array(request, p.KNOWN)
                    seed = one_value(request, p.SEED, int)
                    spec = SampleSpec(
                        batch=one_value(request, p.BATCH_SIZE, int, 1 if known is None else known.shape[0]),
                        temperature=one_value(request, p.TEMPERATURE, float, 1.0),
                        seed=secrets.randbits(63) if seed is None else seed,
                        labels=array(request, p.LABELS),
                        known=known,
                    )
                    self.engine.start(key, spec, sink, max_rows, end)
                else:
                    extra = [n for n in p.START_ONLY if pb_utils.get_input_tensor_by_name(request, n) is not None]
                    if extra:
                        raise ValueError(f"{', '.join(extra)} only go with the START request of a sequence")
                    self.engine.resume(key, sink, max_rows, end)
            except Exception as e:  # noqa: BLE001 - every error goes back on the request's stream
                sink.error(str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}")
        return None

    def finalize(self):
        self.engine.stop()
