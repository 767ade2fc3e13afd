"""The web gateway: a small HTTP app between the page (web/static/) and a Triton server, which it
reaches only through the gRPC client (client.PixelClient, client.catalog; web/detector.py reads
one config parameter the same way).

    GET  /                 the page
    GET  /api/models       the models the server serves (shape, levels, classes, stages)
    POST /api/sample       JSON {model, n, seed, temperature, label, image?, known_rows?}
                           -> NDJSON stream: start, one line per row as it arrives, done (scores)
    POST /api/score        JSON {model, images, labels?, per_pixel?} -> {nll, bpd, pixel_nll?}
    POST /api/ood          JSON {model, images} -> the detector's scores, verdicts and threshold,
                           or {"detector": null, "message": why not} where the model has none
    POST /api/upload?model=NAME   PNG bytes -> {image}: the picture as the model's levels (C, H, W)

Rows go out as newline-delimited JSON on one streamed HTTP response (web/streams.py; the page
reads it with fetch): a plain POST carries the drawn image of a completion, bad parameters get a
4xx before any row, and the page's Stop (or closing the tab) closes the connection, which cancels
the Triton sequence. Each request opens its own sequences; requests from several tabs meet in the
sampler, which batches their row steps.

What one client may take is bounded (web/limits.py): open streams per address and in all (429
with Retry-After past either), request bodies (413), and the threads making blocking calls.

Errors are JSON {"error": one line} with a 4xx (bad input, unknown model, over a limit) or 503 (no
server); once rows flow, an error is a last NDJSON line {"type": "error", ...}.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pixelrnn.client.catalog import served_models
from pixelrnn.client.connection import PLAIN, Credentials
from pixelrnn.client.library import ClientError, ModelInfo, PixelClient, Row, ServerGone
from pixelrnn.runtime import request
from pixelrnn.runtime.protocol import detect_model
from pixelrnn.web.detector import detector_threshold
from pixelrnn.web.errors import GatewayError
from pixelrnn.web.limits import BodyLimit, Limits, StreamSlots
from pixelrnn.web.streams import RowStream
from pixelrnn.web.uploads import MAX_BYTES, UploadError, to_levels

STATIC = Path(__file__).resolve().parent / "static"
MAX_IMAGES = 16  # per sample / completion request: what a page shows at once
MAX_SCORE_IMAGES = 64


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
    per_pixel: bool = False  # also each sub-pixel's NLL (N, C, H, W): the page's heatmap


class OodRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    images: list = Field(min_length=1, max_length=MAX_SCORE_IMAGES)  # (N, C, H, W) levels; no labels: p(x) is the marginal


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


def unreachable(e: ServerGone) -> GatewayError:
    return GatewayError(503, f"the Triton server is not reachable: {e}")


class Gateway:
    """What the routes share: the Triton address and how long a call to it may take. Every
    method blocks (gRPC calls): the routes run them on the bounded thread pool."""

    def __init__(self, triton_url: str, timeout: float = 10.0, credentials: Credentials = PLAIN):
        self.url, self.timeout, self.credentials = triton_url, timeout, credentials

    def models(self) -> dict[str, ModelInfo]:
        try:
            return {m.name: m for m in served_models(self.url, timeout=self.timeout, credentials=self.credentials)}
        except ServerGone as e:
            raise unreachable(e) from None
        except ClientError as e:
            raise GatewayError(502, str(e)) from None

    def connect(self, model: str) -> PixelClient:
        """A client of `model`: 404 if the server does not serve it, 503 if the server is gone."""
        known = self.models()
        if model not in known:
            raise GatewayError(404, f"unknown model {model!r}; the server serves: {', '.join(known) or 'none'}")
        try:
            return PixelClient(self.url, model, timeout=self.timeout, credentials=self.credentials)
        except ServerGone as e:
            raise unreachable(e) from None
        except ClientError as e:
            raise GatewayError(502, str(e)) from None

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

    def score(self, req: ScoreRequest) -> dict:
        client = self.connect(req.model)
        try:
            images = as_levels(req.images, "images", 4)
            scores = client.score(images, req.labels, per_pixel=req.per_pixel)
            out = {"nll": scores.nll_nats.tolist(), "bpd": scores.bits_per_dim.tolist()}
            if req.per_pixel:
                out["pixel_nll"] = scores.pixel_nll.tolist()  # (N, C, H, W) nats, summing to nll
            return out
        except ServerGone as e:
            raise unreachable(e) from None
        except ClientError as e:
            raise GatewayError(400, str(e)) from None
        finally:
            client.close()

    def ood(self, req: OodRequest) -> dict:
        """The detector's answer; a model without one is not an error, the page says so."""
        client = self.connect(req.model)
        try:
            threshold = detector_threshold(self.url, req.model, self.timeout, self.credentials)
            if threshold is None:
                return {"detector": None, "message": f"model {req.model!r} has no out-of-distribution detector: the "
                                                      f"server does not serve {detect_model(req.model)} (export the "
                                                      f"model with --background to have one)"}
            s = client.ood(as_levels(req.images, "images", 4))
            return {"detector": detect_model(req.model), "nll": s.nll_nats.tolist(),
                    "background_nll": s.background_nll_nats.tolist(), "llr": s.llr.tolist(),
                    "complexity": s.complexity.tolist(), "ood": s.ood.tolist(),
                    "threshold": {"score": threshold.score, "value": threshold.value,
                                  "false_positive_rate": threshold.false_positive_rate,
                                  "calibration_images": threshold.calibration_images}}
        except ServerGone as e:
            raise unreachable(e) from None
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


def validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(x) for x in error.get("loc", ()) if x != "body") or "request"
        rule = (error.get("ctx") or {}).get("error")  # a field validator's own message (runtime/request.py)
        parts.append(f"{where}: {rule if isinstance(rule, ValueError) else error.get('msg', 'invalid')}")
    return "; ".join(parts)


def create_app(triton_url: str, timeout: float = 10.0, limits: Limits = Limits(), credentials: Credentials = PLAIN) -> FastAPI:
    gateway = Gateway(triton_url, timeout, credentials)
    slots = StreamSlots(limits)
    threads = anyio.CapacityLimiter(limits.threads)
    app = FastAPI(title="PixelRNN web gateway", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway, app.state.slots, app.state.threads = gateway, slots, threads
    app.add_middleware(BodyLimit, default=limits.json_bytes, limits={"/api/upload": MAX_BYTES})

    async def blocking(fn, *args):
        """A blocking client call on the gateway's bounded threads (waits for one when all are busy)."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=threads)

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError):  # noqa: ARG001
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers())

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):  # noqa: ARG001
        return JSONResponse({"error": validation_message(exc)}, status_code=422)

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/api/models")
    async def models():
        found = await blocking(gateway.models)
        return {"triton": triton_url, "models": [describe(m) for m in found.values()]}

    @app.post("/api/sample")
    async def sample(req: SampleRequest, request: Request):
        release = slots.take(request.client.host if request.client else "unknown")  # 429 before anything is opened
        try:
            client, rows, labels, known = await blocking(gateway.open_sample, req)
        except BaseException:
            release()
            raise
        start = {"type": "start", "model": describe(client.info), "n": req.n, "known_rows": req.known_rows,
                 "labels": None if labels is None else labels.tolist()}
        try:
            stream = RowStream(start, client, rows, labels, known, req.known_rows, release)
        except BaseException:  # no worker (no thread to be had): nothing else will close these
            rows.close()
            client.close()
            release()
            raise
        return stream.response()

    @app.post("/api/score")
    async def score(req: ScoreRequest):
        return await blocking(gateway.score, req)

    @app.post("/api/ood")
    async def ood(req: OodRequest):
        return await blocking(gateway.ood, req)

    @app.post("/api/upload")
    async def upload(request: Request, model: str):
        data = await request.body()  # at most MAX_BYTES: BodyLimit refuses more
        return await blocking(gateway.upload, model, data)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
