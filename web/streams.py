"""One sample or completion request's rows as newline-delimited JSON: start, a line per row as
PixelClient yields it, then done (with the images' scores) or error.

A worker thread reads the blocking row generator and hands rows to the event loop. Leaving early
(Stop, a closed tab: the response ends) tells the worker to stop; it closes the generator, which
cancels the Triton sequence (client.stream.close_stream), so the sampler frees it at once. The
stream's slot (limits.StreamSlots) is given back when the worker ends, not when the response
does: until then the sequence and the thread are still there.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import AsyncIterator, Callable, Iterator

import numpy as np
from starlette.responses import StreamingResponse

from pixelrnn.client.library import ClientError, PixelClient, Row, assemble

log = logging.getLogger("web")


def line(obj: dict) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


class RowStream:
    """Starts reading `rows` at once (in its worker thread); lines() is what the response sends."""

    def __init__(self, start: dict, client: PixelClient, rows: Iterator[Row], labels, known, known_rows: int,
                 release: Callable[[], None]):
        self.start, self.client, self.rows = start, client, rows
        self.labels, self.known, self.known_rows, self.release = labels, known, known_rows, release
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stop = threading.Event()
        self.worker = threading.Thread(target=self._produce, name="web-sample", daemon=True)
        self.worker.start()

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            pass  # the event loop is gone (the gateway is shutting down)

    def _produce(self) -> None:
        client, received, started = self.client, [], time.monotonic()
        try:
            for row in self.rows:
                if self.stop.is_set():
                    return
                received.append(row)
                self._put({"type": "row", "stage": row.stage, "index": row.index, "pixels": row.pixels.tolist()})
            images = assemble(received, client.info.shape)
            k = self.known_rows
            if self.known is not None and not np.array_equal(images[:, :, :k], self.known[:, :, :k]):
                raise ClientError("the server changed known rows")
            seconds = time.monotonic() - started
            scores = client.score(images, self.labels)
            self._put({"type": "done", "rows": len(received), "seconds": round(seconds, 4),
                       "nll": scores.nll_nats.tolist(), "bpd": scores.bits_per_dim.tolist(),
                       "labels": None if self.labels is None else self.labels.tolist()})
        except ClientError as e:
            self._put({"type": "error", "message": str(e)})
        except Exception as e:  # noqa: BLE001 - a bug must still end the page's stream with a line
            log.exception("sampling failed")
            self._put({"type": "error", "message": f"internal error: {type(e).__name__}: {e}"})
        finally:
            try:
                self.rows.close()  # unfinished: cancels the Triton sequence
                client.close()
            finally:
                self.release()
                self._put(None)

    async def lines(self) -> AsyncIterator[bytes]:
        try:
            yield line(self.start)
            while (item := await self.queue.get()) is not None:
                yield line(item)
        finally:
            self.stop.set()

    def response(self) -> StreamingResponse:
        return NdjsonResponse(self)


class NdjsonResponse(StreamingResponse):
    """The stream's response; however sending it ends (finished, the browser gone, the gateway
    stopping), the worker is told to stop."""

    def __init__(self, stream: RowStream):
        super().__init__(stream.lines(), media_type="application/x-ndjson",
                         headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        self.stream = stream

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stream.stop.set()
