"""The web gateway: a small HTTP app between the page (web/static/) and a Triton server, which it
reaches only through the gRPC client (client.PixelClient, client.catalog).

    GET  /                 the page
    GET  /api/models       the models the server serves (shape, levels, classes, stages)
    POST /api/sample       JSON {model, n, seed, temperature, label, image?, known_rows?}
                           -> NDJSON stream: start, one line per row as it arrives, done (scores)
    POST /api/score        JSON {model, images, labels?} -> {nll, bpd}
    POST /api/upload?model=NAME   PNG bytes -> {image}: the picture as the model's levels (C, H, W)

Rows go out as newline-delimited JSON on one streamed HTTP response (the page reads it with
fetch): a plain POST carries the drawn image of a completion, bad parameters get a 4xx before any
row, and the page's Stop (or closing the tab) closes the connection. The server notices the
closed connection, stops reading rows, and closing PixelClient's row generator cancels the Triton
sequence (client.stream.close_stream), so the sampler frees it at once. Each request opens its own
sequences; requests from several tabs meet in the sampler, which batches their row steps.

Errors are JSON {"error": one line} with a 4xx (bad input, unknown model) or 503 (no server);
once rows flow, an error is a last NDJSON line {"type": "error", ...}.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pixelrnn.client.catalog import served_models
from pixelrnn.client.library import ClientError, ModelInfo, PixelClient, Row, ServerGone, assemble
from pixelrnn.runtime import request
from pixelrnn.web.uploads import MAX_BYTES, UploadError, to_levels

STATIC = Path(__file__).resolve().parent / "static"
MAX_IMAGES = 16  # per sample / completion request: what a page shows at once
MAX_SCORE_IMAGES = 64
DRAIN_FACTOR = 8  # read_body: how much of an oversized body is read before answering
log = logging.getLogger("web")


class GatewayError(Exception):
    """Answered as {"error": message} with `status`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, " ".join(str(message).split())


class SampleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    n: int = Field(1, ge=1, le=MAX_IMAGES)
    seed: int | None = None
    temperature: float = 1.0
    label: int | None = None
    image: list | None = None  # completion: (C, H, W) levels, the same known rows for all n
    known_rows: int = 0

    # The sampling protocol's rules (runtime/request.py); a value that breaks one is a 422 like
    # any malformed field. What depends on the model (labels, known_rows <= H) the client checks.
    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        return request.check_temperature(value, name="temperature")

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int | None) -> int | None:
        return None if value is None else request.check_seed(value, name="seed")

    @field_validator("known_rows")
    @classmethod
    def _known_rows(cls, value: int) -> int:
        return request.check_known_rows(value, name="known_rows")


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    images: list = Field(min_length=1, max_length=MAX_SCORE_IMAGES)  # (N, C, H, W) levels
    labels: list[int] | None = None


def describe(info: ModelInfo) -> dict[str, Any]:
    c, h, w = info.shape
    stage_rows = list(info.stage_rows or [h])
    return {"name": info.name, "shape": [c, h, w], "levels": info.levels, "conditional": info.conditional,
            "num_classes": info.num_classes, "max_batch": info.max_batch, "stage_rows": stage_rows}


def as_levels(value, what: str, ndim: int) -> np.ndarray:
    """A nested JSON list -> an integer array of `ndim` dimensions (values are checked by the client)."""
    try:
        arr = np.asarray(value)
    except ValueError:
        raise GatewayError(400, f"{what} is not a rectangular array") from None
    if arr.ndim != ndim or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise GatewayError(400, f"{what} must be a {ndim}-dimensional array of levels, got shape {arr.shape} of {arr.dtype}")
    return arr


def line(obj: dict) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


class Gateway:
    """What the routes share: the Triton address and how long a call to it may take."""

    def __init__(self, triton_url: str, timeout: float = 10.0):
        self.url, self.timeout = triton_url, timeout

    def models(self) -> dict[str, ModelInfo]:
        try:
            return {m.name: m for m in served_models(self.url, timeout=self.timeout)}
        except ServerGone as e:
            raise GatewayError(503, f"the Triton server is not reachable: {e}") from None
        except ClientError as e:
            raise GatewayError(502, str(e)) from None

    def connect(self, model: str) -> PixelClient:
        """A client of `model`: 404 if the server does not serve it, 503 if the server is gone."""
        known = self.models()
        if model not in known:
            raise GatewayError(404, f"unknown model {model!r}; the server serves: {', '.join(known) or 'none'}")
        try:
            return PixelClient(self.url, model, timeout=self.timeout)
        except ServerGone as e:
            raise GatewayError(503, f"the Triton server is not reachable: {e}") from None
        except ClientError as e:
            raise GatewayError(502, str(e)) from None

    # -- sampling and completion ----------------------------------------------------------------
    def open_sample(self, req: SampleRequest) -> tuple[PixelClient, Iterator[Row], np.ndarray | None, np.ndarray | None]:
        """Check the request and open the stream (no row asked for yet): (client, rows, labels, known)."""
        client = self.connect(req.model)
        try:
            labels = client.check_labels(req.label, req.n)
            known = None
            if req.image is not None or req.known_rows:
                if req.image is None:
                    raise ClientError("known_rows > 0 needs the image whose rows are kept")
                image = client.check_images(as_levels(req.image, "image", 3)[None], what="image")[0]  # (C, H, W)
                known = np.repeat(image[None], req.n, axis=0)  # (n, C, H, W): every completion keeps the same rows
            rows = client.sample(req.n, req.seed, req.temperature, labels, known, req.known_rows)
            return client, rows, labels, known
        except ClientError as e:
            client.close()
            raise GatewayError(400, str(e)) from None
        except GatewayError:
            client.close()
            raise

    async def stream(self, req: SampleRequest, client: PixelClient, rows: Iterator[Row], labels, known) -> AsyncIterator[bytes]:
        """NDJSON lines of the sequence's rows as PixelClient yields them. A worker thread reads
        the blocking row generator; leaving early (the browser went away: this generator is
        cancelled) tells it to stop, and it closes the generator, which cancels the sequence."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:
                pass  # the event loop is gone (the gateway is shutting down)

        def produce() -> None:
            received, start = [], time.monotonic()
            try:
                for row in rows:
                    if stop.is_set():
                        return
                    received.append(row)
                    put({"type": "row", "stage": row.stage, "index": row.index, "pixels": row.pixels.tolist()})
                images = assemble(received, client.info.shape)
                if known is not None and not np.array_equal(images[:, :, :req.known_rows], known[:, :, :req.known_rows]):
                    raise ClientError("the server changed known rows")
                seconds = time.monotonic() - start
                scores = client.score(images, labels)
                put({"type": "done", "rows": len(received), "seconds": round(seconds, 4),
                     "nll": scores.nll_nats.tolist(), "bpd": scores.bits_per_dim.tolist(),
                     "labels": None if labels is None else labels.tolist()})
            except ClientError as e:
                put({"type": "error", "message": str(e)})
            except Exception as e:  # noqa: BLE001 - a bug must still end the page's stream with a line
                log.exception("sampling failed")
                put({"type": "error", "message": f"internal error: {type(e).__name__}: {e}"})
            finally:
                rows.close()  # unfinished: cancels the Triton sequence (client.stream.close_stream)
                client.close()
                put(None)

        worker = threading.Thread(target=produce, name="web-sample", daemon=True)
        worker.start()
        try:
            yield line({"type": "start", "model": describe(client.info), "n": req.n,
                        "known_rows": req.known_rows, "labels": None if labels is None else labels.tolist()})
            while (item := await queue.get()) is not None:
                yield line(item)
        finally:
            stop.set()

    # -- scoring and uploads ----------------------------------------------------------------------
    def score(self, req: ScoreRequest) -> dict:
        client = self.connect(req.model)
        try:
            images = as_levels(req.images, "images", 4)
            scores = client.score(images, req.labels)
            return {"nll": scores.nll_nats.tolist(), "bpd": scores.bits_per_dim.tolist()}
        except ServerGone as e:
            raise GatewayError(503, f"the Triton server is not reachable: {e}") from None
        except ClientError as e:
            raise GatewayError(400, str(e)) from None
        finally:
            client.close()

    def upload(self, model: str, data: bytes) -> dict:
        info = self.models().get(model)
        if info is None:
            raise GatewayError(404, f"unknown model {model!r}")
        if not info.levels:
            raise GatewayError(400, f"model {model!r} does not publish its levels, so a PNG cannot be mapped to them")
        try:
            return {"image": to_levels(data, info.shape, info.levels).tolist()}
        except UploadError as e:
            raise GatewayError(e.status, str(e)) from None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) once it passes `limit` bytes.

    An oversized body is still read (and dropped) up to DRAIN_FACTOR x limit before the answer:
    a server that answers and closes while the client is still sending makes the client fail
    with a broken pipe instead of showing the message (seen with urllib; browsers alike)."""
    declared = request.headers.get("content-length")
    too_big = bool(declared and declared.isdigit() and int(declared) > limit)
    size, body = 0, bytearray()
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            too_big = True
        if too_big:
            if size > DRAIN_FACTOR * limit:
                break
            continue
        body += chunk
    if too_big:
        shown = int(declared) if declared and declared.isdigit() else size
        raise GatewayError(413, f"the upload is {shown / 1e6:.1f} MB; at most {limit / 1e6:.1f} MB is accepted")
    return bytes(body)


def validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(x) for x in error.get("loc", ()) if x != "body") or "request"
        rule = (error.get("ctx") or {}).get("error")  # a field validator's own message (runtime/request.py)
        parts.append(f"{where}: {rule if isinstance(rule, ValueError) else error.get('msg', 'invalid')}")
    return "; ".join(parts)


def create_app(triton_url: str, timeout: float = 10.0) -> FastAPI:
    gateway = Gateway(triton_url, timeout)
    app = FastAPI(title="PixelRNN web gateway", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gateway

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError):  # noqa: ARG001
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):  # noqa: ARG001
        return JSONResponse({"error": validation_message(exc)}, status_code=422)

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/api/models")
    async def models():
        found = await run_in_threadpool(gateway.models)
        return {"triton": triton_url, "models": [describe(m) for m in found.values()]}

    @app.post("/api/sample")
    async def sample(req: SampleRequest):
        client, rows, labels, known = await run_in_threadpool(gateway.open_sample, req)
        return StreamingResponse(gateway.stream(req, client, rows, labels, known), media_type="application/x-ndjson",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @app.post("/api/score")
    async def score(req: ScoreRequest):
        return await run_in_threadpool(gateway.score, req)

    @app.post("/api/upload")
    async def upload(request: Request, model: str):
        data = await read_body(request, MAX_BYTES)
        return await run_in_threadpool(gateway.upload, model, data)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
