"""Python client of a deployed checkpoint: NAME_sample (streamed rows) and NAME_score over gRPC.

    client = PixelClient("localhost:8001", model="NAME")
    for row in client.sample(16, seed=0):         # rows as the server makes them
        ...                                         # row.stage, row.index, row.pixels (16, C, W_stage)
    images = client.sample_images(16, seed=0)     # uint8 levels (16, C, H, W)
    done = client.complete(images, known_rows=3)  # rows < 3 kept, the rest sampled
    scores = client.score(images)                 # .nll_nats, .bits_per_dim, (16,) each
    scores = client.score(images, per_pixel=True) # also .pixel_nll (16, C, H, W), sums to .nll_nats
    verdict = client.ood(images)                  # NAME_ood: .llr, .complexity, .ood (bool), ...
    images = client.sample_images(16, seed=0, retries=3)  # survives server restarts (resumes)
    PixelClient("host:8443", model="NAME", credentials=Credentials(tls=True, root_cert="ca.pem", token=TOKEN))

The same seed gives the images export.cells.sample_cached gives (for n <= the model's max batch;
a larger n runs as several sequences, chunk k seeded seed + k). Everything that goes wrong,
unreachable server, unknown model, bad input, an error from the model, comes out as a
ClientError whose message is one line; a call refused for a missing or wrong token is an
Unauthenticated error (client/connection.py: TLS and the token). The protocol is in
runtime/protocol.py.

The server may send several rows in one response when it is busy (row coalescing); the client
yields them one by one all the same. `sample(..., rows_per_response=1)` asks for one response
per row (strict per-row pacing; more responses, so more CPU on both sides).

With retries > 0, sampling survives the server going away (a crash, a restart): the client
waits for the server to be ready again and reopens the sequences with the same seeds and the
rows it already has as KNOWN rows. Known rows consume the random numbers their sampling would
have, so the images end exactly as an uninterrupted stream's, and no row is yielded twice.
Behind a load balancer (python -m pixelrnn.server.cluster) the reopened stream lands on a live replica;
a stream that a replica ends because one of its response sends got stuck (an error starting
with runtime/protocol.py UNHEALTHY) is resumed the same way, as from a lost server.
score(..., retries=N) sends a chunk again the same way. A sampler at its live-images budget
refuses a START at once (ServerBusy, runtime/protocol.py OVERLOADED); with retries the client
tries again after a growing, jittered wait, up to retry_wait_s.

What the client knows of the model comes from Triton's config of NAME_score: the image shape
(IMAGES dims), the max batch, whether it takes LABELS, and, where the repository writes them as
config parameters, `levels`, `num_classes` and `stage_rows` (rows streamed per stage, e.g.
"3,6"). Without those the server is left to check values and labels.
"""
from __future__ import annotations

import queue
import random
import secrets
import time
from typing import Callable, Iterable, Iterator

import numpy as np

# client.connection before tritonclient: it sets grpc's log level, which grpc reads as it loads.
from pixelrnn.client.connection import PLAIN, Credentials, error_message, is_unauthenticated, is_unavailable, refused, unreachable
import tritonclient.grpc as grpcclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from pixelrnn.client.stream import close_stream, decode, sample_inputs, split_rows  # noqa: E402
from pixelrnn.client.types import (ClientError, ModelInfo, OodScores, Row, Scores, ServerBusy, ServerGone,  # noqa: E402, F401
                                   Unauthenticated, model_info)
from pixelrnn.runtime import protocol as p
from pixelrnn.runtime import request

DEFAULT_URL = "localhost:8001"
ROW_OUTPUTS = (p.STAGE, p.ROW_INDEX, p.ROW, p.ROW_LOGPROB)
UINT64 = 2**64


def assemble(rows: Iterable[Row], shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """The final images (n, C, H, W) from a sequence's rows: the last stage's rows, in order
    (multi-scale: stage 0 is the small image, stage 1 the full one)."""
    rows = list(rows)
    if not rows:
        raise ClientError("no rows to assemble")
    last = max(r.stage for r in rows)
    rows = [r for r in rows if r.stage == last]
    if [r.index for r in rows] != list(range(len(rows))):
        raise ClientError(f"stage {last} rows are missing or out of order: {[r.index for r in rows]}")
    images = np.stack([r.pixels for r in rows], axis=2)  # H x (n, C, W) -> (n, C, H, W)
    if shape is not None and images.shape[1:] != tuple(shape):
        raise ClientError(f"the server streamed images of shape {images.shape[1:]}, expected {tuple(shape)}")
    return images


def _check_retries(retries, retry_wait_s) -> None:
    if isinstance(retries, bool) or not isinstance(retries, (int, np.integer)) or retries < 0:
        raise ClientError(f"retries must be a whole number >= 0, got {retries!r}")
    if not (isinstance(retry_wait_s, (int, float)) and retry_wait_s > 0):
        raise ClientError(f"retry_wait_s must be a number of seconds > 0, got {retry_wait_s!r}")


def correlation_id() -> int:
    """A random nonzero sequence id (tritonclient sends it as int64, hence 63 bits)."""
    return secrets.randbits(63) or 1


def _tensor(name: str, value: np.ndarray, dtype: str) -> grpcclient.InferInput:
    value = np.ascontiguousarray(value)
    t = grpcclient.InferInput(name, list(value.shape), dtype)
    t.set_data_from_numpy(value)
    return t


def _integers(what: str, values, low: int, high: int | None, note: str = "") -> np.ndarray:
    """Integer-valued array in [low, high) (high None: not checked), as int64."""
    arr = np.asarray(values)
    if arr.dtype == bool:
        arr = arr.astype(np.int64)
    if not (np.issubdtype(arr.dtype, np.integer) or (np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)))):
        raise ClientError(f"{what} must be integers, got {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < low or (high is not None and arr.max() >= high)):
        bound = f"[{low}, {high})" if high is not None else f">= {low}"
        found = f"{arr.min()}" if arr.min() == arr.max() else f"{arr.min()}..{arr.max()}"
        raise ClientError(f"{what} must be in {bound}{note}, got {found}")
    return arr


class PixelClient:
    """Client of NAME_sample and NAME_score on a Triton server at `url` (host:port, gRPC)."""

    def __init__(self, url: str = DEFAULT_URL, model: str = "", timeout: float = 60.0, row_timeout: float = 300.0, *,
                 credentials: Credentials | None = None):
        """Reads the model's config: raises ClientError if the server is unreachable or does not
        serve both NAME_score and NAME_sample. `timeout` bounds each metadata/score call,
        `row_timeout` the wait for any one streamed row. `credentials`: TLS and a bearer token
        (client/connection.py; None: plain gRPC)."""
        if not model:
            raise ClientError("no model name given")
        self.url, self.model = url, model
        self.timeout, self.row_timeout = timeout, row_timeout
        self.credentials = credentials or PLAIN
        try:
            self._client = self._connect()
        except Exception as e:  # noqa: BLE001 - a malformed url fails here
            raise ClientError(f"cannot use server address {url!r}: {error_message(e)}") from None
        self.info = self._read_info()

    # -- connection and metadata --------------------------------------------------------------
    def _connect(self) -> grpcclient.InferenceServerClient:
        """A new gRPC client of the server (its own channel) with this client's credentials."""
        return self.credentials.connect(self.url)

    def _fail(self, e: Exception, doing: str) -> ClientError:
        if is_unavailable(e):
            return unreachable(self.url, self.credentials, e)
        if is_unauthenticated(e):
            return refused(self.url, self.credentials, e)
        message = error_message(e)
        if "unknown model" in message:
            return ClientError(f"model {self.model!r} is not served at {self.url} ({message})")
        return ClientError(f"{doing}: {message}")

    def _read_info(self) -> ModelInfo:
        # NAME_score's config says all the client needs; a model may be served without a sampler
        # (a detector's background model), and sampling one says so when it is tried.
        name = p.score_model(self.model)
        try:
            config = self._client.get_model_config(name, as_json=True, client_timeout=self.timeout)["config"]
        except InferenceServerException as e:
            raise self._fail(e, f"reading the config of {name}") from None
        return model_info(self.model, config)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "PixelClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- input checks ---------------------------------------------------------------------------
    def check_images(self, images, what: str = "images") -> np.ndarray:
        """(N, C, H, W) levels (or (N, H, W) for a grey model) -> uint8 (N, C, H, W); ClientError if
        the shape is not the model's or a value is not a level."""
        c, h, w = self.info.shape
        arr = np.asarray(images)
        if arr.ndim == 3 and c == 1:
            arr = arr[:, None]  # (N, H, W) -> (N, 1, H, W)
        if arr.ndim != 4 or arr.shape[1:] != (c, h, w):
            raise ClientError(f"{what} must be N x {c} x {h} x {w} (the model's shape), got {' x '.join(map(str, arr.shape))}")
        high = self.info.levels if self.info.levels is not None else 256
        return _integers(f"{what} values", arr, 0, high, " (the model's levels)" if self.info.levels else "").astype(np.uint8)

    def check_labels(self, labels, n: int) -> np.ndarray | None:
        """None, one class id, or n of them -> int64 (n,) for a conditional model (None there cycles
        through the classes when the model's class count is known), None otherwise."""
        if not self.info.conditional:
            if labels is not None:
                raise ClientError(f"model {self.model!r} is not class-conditional: give no label")
            return None
        if labels is None:
            if not self.info.num_classes:
                raise ClientError(f"model {self.model!r} is class-conditional: give a label (class id)")
            return np.arange(n, dtype=np.int64) % self.info.num_classes
        try:  # the protocol's rule for LABELS (runtime/request.py); None: the class count is not published
            return request.check_labels(labels, n, self.info.num_classes, name="labels")
        except request.RequestError as e:
            raise ClientError(str(e)) from None

    # -- sampling --------------------------------------------------------------------------------
    def sample(self, n: int, seed: int | None = None, temperature: float = 1.0, label=None, known=None,
               known_rows: int = 0, retries: int = 0, retry_wait_s: float = 60.0,
               on_retry: Callable[[str], None] | None = None, rows_per_response: int | None = None) -> Iterator[Row]:
        """Sample n images; yields every row as the server streams it (known rows included), each
        stage's rows in order. `label`: one class id or n (class-conditional models). `known`
        (n, C, >= known_rows, W) with known_rows > 0: those rows are kept (completion).
        `retries`: times to resume after losing the server, waiting up to `retry_wait_s` each
        time for it to be ready again; `on_retry` gets a line saying what happens (a resumable
        stream needs a seed: without one, the client draws it). `rows_per_response`: at most
        this many rows per server response (1: one response per row; None: the server sends the
        rows that wait together in one response); the rows yielded are the same either way.
        Checks the arguments now, before the first row is asked for."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ClientError(f"n must be a positive number of images, got {n!r}")
        n, c, h, w = int(n), *self.info.shape
        try:  # the protocol's rules (runtime/request.py), under this method's argument names
            temperature = request.check_temperature(temperature, name="temperature")
            seed = None if seed is None else request.check_seed(seed, name="seed")
            known_rows = request.check_known_rows(known_rows, h, name="known_rows")
            per_response = request.check_rows_per_response(rows_per_response, name="rows_per_response")
        except request.RequestError as e:
            raise ClientError(str(e)) from None
        labels = self.check_labels(label, n)
        if known_rows:
            if known is None:
                raise ClientError("known_rows > 0 needs the known images")
            known = np.asarray(known)
            if known.ndim != 4 or known.shape[0] != n or known.shape[1] != c or known.shape[3] != w or known.shape[2] < known_rows:
                raise ClientError(f"known images must be {n} x {c} x R x {w} with R >= {known_rows}, got {' x '.join(map(str, known.shape))}")
            try:
                known = request.check_known(known[:, :, :known_rows], n, (c, h, w), self.info.levels, name="known").astype(np.uint8)
            except request.RequestError as e:
                raise ClientError(str(e)) from None
        _check_retries(retries, retry_wait_s)
        if retries and seed is None:
            seed = secrets.randbits(64)  # a resumed sequence must draw the random numbers the lost one drew
        chunks = []  # (first image, images, seed)
        for k, a in enumerate(range(0, n, self.info.max_batch)):
            chunks.append((a, min(self.info.max_batch, n - a), None if seed is None else (int(seed) + k) % UINT64))
        known = known if known_rows else None
        if retries:
            return self._resuming(chunks, float(temperature), labels, known, int(retries), float(retry_wait_s), on_retry,
                                  per_response)
        return self._stream(chunks, float(temperature), labels, known, per_response)

    def _resuming(self, chunks, temperature, labels, known, retries, wait_s, on_retry, per_response=None) -> Iterator[Row]:
        """_stream, reopened after the server went away: the same seeds, and the full image's rows
        received so far as KNOWN (a multi-scale model's small image cannot be a prefix: cut off
        there, the sequences start over). The new stream repeats the rows already yielded, which
        are checked and skipped."""
        rows, (_, h, w) = [], self.info.shape
        notice = on_retry or (lambda line: None)
        for attempt in range(retries + 1):
            full = [r.pixels for r in rows if r.pixels.shape[-1] == w]  # a multi-scale small image is narrower
            prefix = known
            if len(full) > (0 if known is None else known.shape[2]):
                prefix = np.stack(full, axis=2)  # (n, C, R, W), the given known rows among them
            if attempt:
                notice(f"the server is back: resuming from row {0 if prefix is None else prefix.shape[2]} of {h}")
            try:
                for k, row in enumerate(self._stream(chunks, temperature, labels, prefix, per_response)):
                    if k >= len(rows):
                        rows.append(row)
                        yield row
                    elif not np.array_equal(row.pixels, rows[k].pixels):
                        raise ClientError(f"the resumed stream differs from the lost one at stage {row.stage} row {row.index} "
                                          "(was the model changed?)")
                return
            except ServerBusy as e:
                if attempt == retries:
                    raise
                # Backoff: 0.5 s doubling per try, up to wait_s, jittered so refused clients spread out.
                pause = min(wait_s, 0.5 * 2 ** attempt) * random.uniform(0.5, 1.0)
                notice(f"{e}; trying again in {pause:.1f} s (retry {attempt + 1} of {retries})")
                time.sleep(pause)
            except ServerGone as e:
                if attempt == retries:
                    raise
                notice(f"{e}; waiting up to {wait_s:g} s for it (retry {attempt + 1} of {retries})")
                self._wait_ready(wait_s)

    def _wait_ready(self, seconds: float) -> None:
        """Until NAME_sample is ready again. A fresh channel each try: one that lost its server
        reconnects only after a backoff that grows with every failed attempt."""
        deadline = time.monotonic() + seconds
        while True:
            probe = self._connect()
            try:
                if probe.is_model_ready(p.sample_model(self.model), client_timeout=min(2.0, seconds)):
                    return
            except InferenceServerException as e:
                if is_unauthenticated(e):  # up, but it will not take this client's calls: waiting cannot help
                    raise refused(self.url, self.credentials, e) from None
                # else not up yet
            finally:
                probe.close()
            if time.monotonic() >= deadline:
                raise ServerGone(f"the Triton server at {self.url} did not come back with {p.sample_model(self.model)} ready "
                                 f"within {seconds:g} s")
            time.sleep(0.2)

    def _stream(self, chunks, temperature, labels, known, per_response=None) -> Iterator[Row]:
        """One gRPC stream, one sequence per chunk; yields each row once every chunk has sent it
        (a response may carry several rows of a chunk: split here, views into its arrays)."""
        responses = queue.SimpleQueue()
        stream = self._connect()
        finished = False
        try:
            stream.start_stream(callback=lambda result, error: responses.put((result, error)))
            outputs = [grpcclient.InferRequestedOutput(n) for n in ROW_OUTPUTS]  # not ACTIVE, CALL_BATCH: less to send
            for k, (a, size, seed) in enumerate(chunks):
                inputs = sample_inputs(batch=size, temperature=temperature, seed=seed, rows_per_response=per_response,
                                       labels=None if labels is None else labels[a:a + size],
                                       known=None if known is None else known[a:a + size])
                stream.async_stream_infer(p.sample_model(self.model), inputs, outputs=outputs, request_id=str(k),
                                          sequence_id=correlation_id(), sequence_start=True, sequence_end=True,
                                          enable_empty_final_response=True)
            pending = [[] for _ in chunks]  # per chunk: rows received but not yet yielded
            open_chunks, yielded = len(chunks), 0
            while open_chunks:
                try:
                    result, error = responses.get(timeout=self.row_timeout)
                except queue.Empty:
                    raise ClientError(f"no row from {p.sample_model(self.model)} for {self.row_timeout:g} s") from None
                if error is not None:
                    if error_message(error).startswith(p.OVERLOADED):  # nothing was sampled: the stream may start over
                        raise ServerBusy(f"{p.sample_model(self.model)} is busy: {error_message(error)}")
                    if error_message(error).startswith(p.UNHEALTHY):  # its sender got stuck (server/engine/scheduler.py): resume elsewhere
                        raise ServerGone(f"{p.sample_model(self.model)} at {self.url} ended the stream after {yielded} rows: "
                                         f"{error_message(error)}")
                    if yielded and is_unavailable(error):  # the server died or restarted mid-stream
                        raise ServerGone(f"lost the connection to the Triton server at {self.url} after {yielded} rows "
                                         f"({error_message(error)})")
                    raise self._fail(error, f"{p.sample_model(self.model)} failed")
                response = result.get_response()
                if response.parameters["triton_final_response"].bool_param:
                    open_chunks -= 1
                    continue
                pending[int(response.id)] += [Row(index, stage, pixels, logprob)
                                              for index, stage, pixels, logprob, _ in split_rows(decode(response))]
                while all(pending):
                    heads = [q.pop(0) for q in pending]
                    if len({(r.stage, r.index) for r in heads}) != 1:
                        raise ClientError(f"the sequences streamed different rows: {[(r.stage, r.index) for r in heads]}")
                    yield heads[0] if len(heads) == 1 else Row(heads[0].index, heads[0].stage, np.concatenate([r.pixels for r in heads]),
                                                               np.concatenate([r.logprob for r in heads]))
                    yielded += 1
            if any(pending):
                raise ClientError("the sequences streamed different numbers of rows")
            finished = True
        except InferenceServerException as e:
            # A stream that broke before its requests went out (no server) says why through the callback.
            try:
                _, reported = responses.get(timeout=1.0)
            except queue.Empty:
                reported = None
            raise self._fail(reported or e, f"streaming from {p.sample_model(self.model)}") from None
        finally:
            # Closing early (an error, or the caller stopped reading) cancels the server's sequences;
            # bounded, as a server that never ends the stream would hold stop_stream for ever.
            close_stream(stream, cancel=not finished, timeout=self.row_timeout)

    def sample_images(self, n: int, seed: int | None = None, temperature: float = 1.0, label=None, known=None,
                      known_rows: int = 0, **resume) -> np.ndarray:
        """sample()'s final images, uint8 levels (n, C, H, W); `resume`: sample()'s retries,
        retry_wait_s, on_retry."""
        return assemble(self.sample(n, seed, temperature, label, known, known_rows, **resume), self.info.shape)

    def complete(self, images, known_rows: int, seed: int | None = None, temperature: float = 1.0, label=None,
                 **resume) -> np.ndarray:
        """Keep rows < known_rows of every image (N, C, H, W) and sample the rest."""
        images = self.check_images(images)
        done = self.sample_images(len(images), seed, temperature, label, images, known_rows, **resume)
        if not np.array_equal(done[:, :, :known_rows], images[:, :, :known_rows]):
            raise ClientError("the server changed known rows")
        return done

    # -- scoring ---------------------------------------------------------------------------------
    def score(self, images, labels=None, retries: int = 0, retry_wait_s: float = 60.0, per_pixel: bool = False) -> Scores:
        """-log p of each image (N, C, H, W), in chunks of at most the model's max batch.
        `per_pixel`: also the NLL of every sub-pixel (Scores.pixel_nll), which the server
        sends only to requests that ask for it. `retries`: times a chunk is sent again after
        losing the server, waiting up to `retry_wait_s` each time for it to be ready (scoring is
        stateless: behind a proxy such as python -m pixelrnn.server.cluster, any live replica answers)."""
        _check_retries(retries, retry_wait_s)
        images = self.check_images(images)
        if self.info.conditional and labels is None:  # no cycling through classes here: a score needs the true class
            raise ClientError(f"model {self.model!r} is class-conditional: give labels for scoring")
        labels = self.check_labels(labels, len(images))
        names = [p.NLL_NATS, p.BITS_PER_DIM] + ([p.PIXEL_NLL] if per_pixel else [])
        parts = self._infer_chunks(p.score_model(self.model), images, labels, names, retries, retry_wait_s)
        if not parts:
            c, h, w = self.info.shape
            return Scores(np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros((0, c, h, w), np.float32) if per_pixel else None)
        nll, bpd = (np.concatenate([q[n].reshape(-1) for q in parts]) for n in (p.NLL_NATS, p.BITS_PER_DIM))
        return Scores(nll, bpd, np.concatenate([q[p.PIXEL_NLL] for q in parts]) if per_pixel else None)

    def ood(self, images, retries: int = 0, retry_wait_s: float = 60.0) -> OodScores:
        """Out-of-distribution scores and verdicts of images (N, C, H, W) from NAME_ood, the
        detector a repository has when the model was exported with a background model."""
        _check_retries(retries, retry_wait_s)
        images = self.check_images(images)
        names = [p.NLL_NATS, p.BACKGROUND_NLL_NATS, p.LLR, p.COMPLEXITY, p.OOD]
        try:
            parts = self._infer_chunks(p.detect_model(self.model), images, None, names, retries, retry_wait_s)
        except ClientError as e:
            if "is not served" in str(e) or "unknown model" in str(e):
                raise ClientError(f"model {self.model!r} has no out-of-distribution detector at {self.url} "
                                  f"({p.detect_model(self.model)} is not served; export with --background)") from None
            raise
        columns = [np.concatenate([q[n].reshape(-1) for q in parts]) if parts else np.zeros(0, bool if n == p.OOD else np.float32)
                   for n in names]
        return OodScores(*columns)

    def _infer_chunks(self, model: str, images: np.ndarray, labels, names: list[str], retries: int,
                      retry_wait_s: float) -> list[dict[str, np.ndarray]]:
        """One request per max-batch chunk, asking for `names` only (unnamed, Triton would make
        and send every output); each chunk sent again on a lost server, `retries` times."""
        parts = []
        outputs = [grpcclient.InferRequestedOutput(n) for n in names]
        for a in range(0, len(images), self.info.max_batch):
            b = a + self.info.max_batch
            inputs = [_tensor(p.IMAGES, images[a:b], "UINT8")]
            if labels is not None:
                inputs.append(_tensor(p.LABELS, labels[a:b, None], "INT64"))  # N x 1
            for attempt in range(int(retries) + 1):
                try:
                    result = self._client.infer(model, inputs, outputs=outputs, client_timeout=self.timeout)
                    break
                except InferenceServerException as e:
                    failure = self._fail(e, f"{model} failed")
                    if not isinstance(failure, ServerGone) or attempt == retries:
                        raise failure from None
                self._wait_ready(retry_wait_s)
                # A fresh channel: the old one, after losing its server, reconnects only after a backoff.
                self._client.close()
                self._client = self._connect()
            parts.append({n: result.as_numpy(n) for n in names})
        return parts

