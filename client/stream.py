"""One raw gRPC stream to a sampler model (NAME_sample), for the tests and the benchmarks.

client.PixelClient is the library: it checks its arguments and hides the protocol. SampleStream
is the thin layer the tests and benchmarks need under it: it sends any request on one
tritonclient bidirectional stream (start_stream / async_stream_infer), deliberately malformed
ones too, and hands back every response as it came: rows (with ACTIVE and CALL_BATCH where asked
for), error messages and final markers, each stamped with its arrival time. A response may carry
several rows (the server coalesces rows that waited to be sent, runtime/protocol.py); they come
out as one StreamRow each, in order, with `response_rows` saying how many shared the response.
Every wait is bounded, closing too.

    with SampleStream("127.0.0.1:8001") as stream:
        stream.send("m_sample", 7, sample_inputs(batch=2, seed=1, max_rows=2), start=True)
        rows, errors = stream.collect()        # until the request's final response (or error)
        stream.send("m_sample", 7, sample_inputs(max_rows=0), end=True)   # a follow-up request
        rows, error = stream.request("m_sample", 8, [tensor("SEED", [-1], "INT64")], start=True, end=True)
        images = assemble(rows)                # client.library.assemble: (B, C, H, W)

Tensor names and the sampler's protocol: runtime/protocol.py. Like the rest of client/, this
imports no torch.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Iterable, NamedTuple

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import triton_to_np_dtype

from pixelrnn.client.connection import PLAIN, Credentials
from pixelrnn.runtime import protocol as p

# The inputs of NAME_sample and their Triton dtypes (runtime/protocol.py).
SAMPLE_DTYPES = {p.BATCH_SIZE: "INT32", p.TEMPERATURE: "FP64", p.SEED: "UINT64", p.LABELS: "INT64", p.KNOWN: "UINT8",
                 p.MAX_ROWS: "INT32", p.ROWS_PER_RESPONSE: "INT32"}
# Numpy types of the sampler's outputs (runtime/protocol.py), for decoding a response in one pass.
OUTPUT_DTYPES = {"UINT8": np.uint8, "INT32": np.int32, "FP32": np.float32, "INT64": np.int64, "FP64": np.float64}
# gRPC channel options for a TCP connection of the channel's own, as a separate client process
# has: channels of one process share connections by default, and one closing can then cut
# another's new stream.
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)
FINAL = "triton_final_response"


class StreamTimeout(TimeoutError):
    """A wait on the stream ran past its bound; the message says what was still missing."""


class StreamRow(NamedTuple):
    """A streamed row; the first four fields are client.library.Row's, so assemble() takes these."""

    index: int  # ROW_INDEX: the row within its stage
    stage: int  # STAGE
    pixels: np.ndarray  # ROW, uint8 (B, C, W_stage)
    logprob: np.ndarray  # ROW_LOGPROB, float32 (B,)
    request_id: str  # the id the request was sent with
    active: int | None  # ACTIVE: sequences the sampler held (None: not asked for)
    batched: int | None  # CALL_BATCH: images in the cell call that made the row (None: not asked for)
    at: float  # time.perf_counter() when the stream's callback got it
    response_rows: int = 1  # rows in the response that carried this one (ROW_COUNT)


@dataclass(frozen=True)
class Response:
    """One message of the stream: a row, a request's empty final response, or an error (which
    is its request's last message too, or the stream's if the connection broke)."""

    request_id: str
    at: float  # time.perf_counter() on arrival
    rows: tuple[StreamRow, ...] = ()  # the response's rows, in order (none: a final response or an error)
    error: str | None = None  # str() of tritonclient's exception: "[StatusCode.X] message" or the model's message
    final: bool = False  # the request is over (its final response, or an error)


class Collected(NamedTuple):
    rows: list[StreamRow]
    errors: list[str]


class Reply(NamedTuple):
    rows: list[StreamRow]
    error: str | None


def tensor(name: str, value, dtype: str) -> grpcclient.InferInput:
    """An input exactly as given: `value` as the numpy type of the Triton `dtype` (BYTES:
    Python objects), its shape kept (a 0-d value stays 0-d). Nothing is checked, so a test's
    malformed input goes out as it is."""
    value = np.asarray(value, dtype=object if dtype == "BYTES" else triton_to_np_dtype(dtype))
    t = grpcclient.InferInput(name, list(value.shape), dtype)
    t.set_data_from_numpy(value.copy(order="C"))  # not ascontiguousarray: it makes a 0-d value 1-d
    return t


def decode(response) -> dict[str, np.ndarray]:
    """A sampler response (the ModelInferResponse protobuf of tritonclient's InferResult, from
    get_response()) -> {output name: array}, in one pass over its outputs. What
    InferResult.as_numpy does per name, less its search through the outputs on every call and
    its general dtype handling: this runs once for every response a stream gets."""
    raw = response.raw_output_contents
    return {o.name: np.frombuffer(raw[i], OUTPUT_DTYPES[o.datatype]).reshape(o.shape) for i, o in enumerate(response.outputs)}


def split_rows(outputs: dict[str, np.ndarray]) -> list[tuple[int, int, np.ndarray, np.ndarray, int | None]]:
    """A decoded sampler response -> its rows in order: (index, stage, pixels (B, C, W) a view,
    logprob (B,) a view, CALL_BATCH or None). A response without ROW (a final one) has none."""
    pixels = outputs.get(p.ROW)
    if pixels is None:
        return []
    first, stage = (None if outputs.get(n) is None else int(outputs[n][0]) for n in (p.ROW_INDEX, p.STAGE))  # None: not asked for
    logprob, batched = outputs.get(p.ROW_LOGPROB), outputs.get(p.CALL_BATCH)
    return [(None if first is None else first + j, stage, pixels[:, :, j], None if logprob is None else logprob[:, j],
             None if batched is None else int(batched[j])) for j in range(pixels.shape[2])]


def sample_inputs(*, batch: int | None = None, temperature: float | None = None, seed: int | None = None, labels=None,
                  known=None, max_rows: int | None = None, rows_per_response: int | None = None) -> list[grpcclient.InferInput]:
    """The inputs of a NAME_sample request in the protocol's dtypes, those given only (None:
    left out): BATCH_SIZE, TEMPERATURE, SEED, MAX_ROWS and ROWS_PER_RESPONSE one value each,
    LABELS 1-d (one class id or one per image), KNOWN B x C x R x W. Values are not checked
    (the server does)."""
    inputs = [tensor(name, [value], SAMPLE_DTYPES[name]) for name, value in
              ((p.BATCH_SIZE, batch), (p.TEMPERATURE, temperature), (p.SEED, seed), (p.MAX_ROWS, max_rows),
               (p.ROWS_PER_RESPONSE, rows_per_response)) if value is not None]
    if labels is not None:
        inputs.append(tensor(p.LABELS, np.asarray(labels).reshape(-1), SAMPLE_DTYPES[p.LABELS]))
    if known is not None:
        inputs.append(tensor(p.KNOWN, known, SAMPLE_DTYPES[p.KNOWN]))
    return inputs


def close_stream(client: grpcclient.InferenceServerClient, cancel: bool, timeout: float) -> bool:
    """stop_stream + close of a tritonclient client within `timeout` s; whether that finished.
    stop_stream joins the stream's response thread, which a server that never ends the stream
    holds for ever: it runs on a daemon thread joined with the bound; past it the channel is
    closed under the stream (which cancels the call) and False is returned."""
    failed = []

    def stop():
        try:
            client.stop_stream(cancel_requests=cancel)
            client.close()
        except Exception as e:  # noqa: BLE001 - raised on the caller's thread
            failed.append(e)

    closer = threading.Thread(target=stop, name="sample-stream-close", daemon=True)
    closer.start()
    closer.join(timeout)
    if closer.is_alive():
        client._channel.close()  # no public way to cancel the call from outside the stream
        closer.join(5.0)
        return False
    if failed:
        raise failed[0]
    return True


class SampleStream:
    """One gRPC channel with one bidirectional stream to a Triton server. The responses of every
    request sent on it land on one queue, in arrival order; get / collect / request / take_rows
    read it, each wait bounded by `timeout` seconds unless a call gives its own."""

    def __init__(self, url: str, *, outputs: Iterable[str] | None = None, timeout: float = 60.0,
                 channel_args: Iterable[tuple] | None = None, credentials: Credentials | None = None):
        """`outputs`: the outputs every request asks for (None: all; fewer is less to send).
        `channel_args`: gRPC channel options, e.g. OWN_CONNECTION. `credentials`: TLS and a
        bearer token (client/connection.py; None: plain gRPC)."""
        self.url, self.timeout = url, timeout
        self.outputs = None if outputs is None else tuple(outputs)
        self.client = (credentials or PLAIN).connect(url, None if channel_args is None else list(channel_args))
        self._responses: queue.Queue = queue.Queue()
        self._held: deque[Response] = deque()  # read, with rows take_rows left for the next reader
        self._closed = False
        self.client.start_stream(callback=self._arrived)

    def _arrived(self, result, error) -> None:  # tritonclient's stream thread
        self._responses.put((time.perf_counter(), result, error))

    # -- sending ------------------------------------------------------------------------------
    def send(self, model: str, sequence_id: int, inputs: Iterable[grpcclient.InferInput] = (), *, start: bool = False,
             end: bool = False, request_id: str = "", outputs: Iterable[str] | None = None) -> float:
        """Send one request (START with start=True, else a follow-up of the sequence) as given,
        with an empty final response asked for; `outputs` overrides the stream's for it.
        Returns time.perf_counter() just before it went out."""
        names = self.outputs if outputs is None else tuple(outputs)
        requested = None if names is None else [grpcclient.InferRequestedOutput(n) for n in names]
        sent = time.perf_counter()
        self.client.async_stream_infer(model, list(inputs), outputs=requested, request_id=request_id, sequence_id=sequence_id,
                                       sequence_start=start, sequence_end=end, enable_empty_final_response=True)
        return sent

    # -- receiving ----------------------------------------------------------------------------
    def get(self, timeout: float | None = None) -> Response:
        """The next response, waiting at most `timeout` s; StreamTimeout if none came."""
        if self._held:
            return self._held.popleft()
        wait = self.timeout if timeout is None else timeout
        try:
            return self._parse(*self._responses.get(timeout=max(0.0, wait)))
        except queue.Empty:
            raise StreamTimeout(f"no response on the stream to {self.url} within {wait:g} s") from None

    def received(self) -> list[Response]:
        """Every response already received and not yet read, without waiting."""
        out = list(self._held)
        self._held.clear()
        while True:
            try:
                out.append(self._parse(*self._responses.get_nowait()))
            except queue.Empty:
                return out

    def collect(self, finals: int = 1, timeout: float | None = None) -> Collected:
        """Rows and error messages until `finals` requests have ended (each with its final
        response or an error), all within `timeout` s; StreamTimeout otherwise."""
        rows, errors = [], []
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while finals > 0:
            try:
                response = self.get(deadline - time.monotonic())
            except StreamTimeout:
                raise StreamTimeout(f"{finals} request(s) on the stream to {self.url} not over within {limit:g} s "
                                    f"({len(rows)} rows, errors {errors} so far)") from None
            rows += response.rows
            if response.error is not None:
                errors.append(response.error)
            if response.final:
                finals -= 1
        return Collected(rows, errors)

    def request(self, model: str, sequence_id: int, inputs: Iterable[grpcclient.InferInput] = (), *, start: bool = False,
                end: bool = False, timeout: float | None = None, **send) -> Reply:
        """send() one request and collect() it: (its rows, its error message or None)."""
        self.send(model, sequence_id, inputs, start=start, end=end, **send)
        rows, errors = self.collect(1, timeout)
        return Reply(rows, errors[0] if errors else None)

    def take_rows(self, k: int, timeout: float | None = None) -> list[StreamRow]:
        """The next k rows (final responses passed over), all within `timeout` s; an error
        response raises RuntimeError with its message, a missing row StreamTimeout. Rows of the
        last response beyond the k-th stay for the next read (get, collect, take_rows ...)."""
        rows, limit = [], self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while len(rows) < k:
            try:
                response = self.get(deadline - time.monotonic())
            except StreamTimeout:
                raise StreamTimeout(f"{len(rows)} of {k} rows on the stream to {self.url} within {limit:g} s") from None
            if response.error is not None:
                raise RuntimeError(f"error after {len(rows)} of {k} rows: {response.error}")
            need = k - len(rows)
            rows += response.rows[:need]
            if len(response.rows) > need:  # the rest of this response is the next reader's
                self._held.appendleft(replace(response, rows=response.rows[need:]))
        return rows

    @staticmethod
    def _parse(at: float, result, error) -> Response:
        if error is not None:
            return Response("", at, error=str(error), final=True)
        response = result.get_response()
        final = FINAL in response.parameters and response.parameters[FINAL].bool_param
        outputs = decode(response)
        active = outputs.get(p.ACTIVE)
        active = None if active is None else int(active[0])
        rows = split_rows(outputs)
        return Response(response.id, at, final=final, rows=tuple(
            StreamRow(index, stage, pixels, logprob, response.id, active, batched, at, len(rows))
            for index, stage, pixels, logprob, batched in rows))

    # -- closing ------------------------------------------------------------------------------
    def close(self, cancel: bool = False, timeout: float = 30.0) -> bool:
        """End the stream and close the channel within `timeout` s; returns whether that finished.
        cancel=False is a half-close: tritonclient waits until the server has sent every
        response asked for (they still land on the queue: received()). cancel=True cancels the
        gRPC call, and the server sees the requests in flight cancelled. See close_stream."""
        if self._closed:
            return True
        self._closed = True
        return close_stream(self.client, cancel, timeout)

    def drop_channel(self, timeout: float = 30.0) -> bool:
        """Close the gRPC channel under the open stream, as a client that exits or loses its
        channel does (the server sees the call cancelled), then tidy up the stream's own thread,
        bounded as close() is."""
        self.client._channel.close()
        return self.close(cancel=True, timeout=timeout)

    def __enter__(self) -> "SampleStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close(cancel=True)
