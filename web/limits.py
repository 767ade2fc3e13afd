"""What one gateway lets in: sample streams per client address and in all, the size of a request
body, and the threads that make blocking calls to Triton.

Each open stream holds a Triton sequence (its images count against the sampler's live-images
budget), a gRPC stream and a worker thread. Unbounded, one address opening 300 streams took
3,936 of the sampler's 3,938 images, grew the gateway from 3 to 695 threads and slowed another
user's 1-image sample from 0.07 s to 1.75 s; one 32 MB JSON body grew the gateway by 250 MB
before it was refused. Streams over a cap get 429 with Retry-After at once (nothing opened);
a body over its limit gets 413 before it is read (Content-Length) or as soon as it passes the
limit (chunked), and what was read of it is dropped.

A client still sending when the 413 goes out must be let finish, or it fails with a broken pipe
instead of reading the answer: uvicorn closes at once after a response to a request that said
"Connection: close" (urllib does). So the refusal is sent first, and the rest of the body is read
and dropped, up to REFUSED_BYTES or REFUSED_S, before the response ends (nginx's lingering close).

Clients are told apart by remote address only: behind a reverse proxy every user shares one.
"""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import anyio

from pixelrnn.web.errors import GatewayError

MIB = 1 << 20
REFUSED_BYTES = 64 * MIB  # of a refused body, read and dropped so the client sees the 413; more is cut off
REFUSED_S = 10.0  # nor longer than this (a client trickling bytes does not hold the connection)


@dataclass(frozen=True)
class Limits:
    streams_per_client: int = 4  # a page runs one stream at a time: a few tabs' worth
    streams: int = 64  # x 16 images = 1,024 live images at most: below the shipped model's sampler budget (1,629)
    json_bytes: int = MIB  # the largest score request (64 images of 3 x 32 x 32 at 256 levels) is ~0.8 MB
    threads: int = 8  # blocking calls to Triton at once (model lists, scores, uploads, opening streams)
    retry_after_s: int = 2  # told to a refused stream: a page's sample of a small model takes about that

    def __post_init__(self):
        for name in ("streams_per_client", "streams", "json_bytes", "threads", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.streams_per_client > self.streams:
            raise ValueError(f"streams_per_client ({self.streams_per_client}) is more than streams ({self.streams})")


def mib(n: int) -> str:
    return f"{n / MIB:.3g} MiB"


class StreamSlots:
    """Counts open sample streams, per client address and in all; take() refuses past either cap."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.by_client: Counter[str] = Counter()
        self._lock = threading.Lock()  # released from the streams' worker threads

    @property
    def open(self) -> int:
        return sum(self.by_client.values())

    def take(self, client: str) -> Callable[[], None]:
        """A slot for one stream of `client`, or GatewayError 429; call the result (once or more) to give it back."""
        limits = self.limits
        with self._lock:
            if self.by_client[client] >= limits.streams_per_client:
                raise GatewayError(429, f"{client} already has {self.by_client[client]} sample streams open, the most one "
                                        f"client may have; wait for one to finish or stop it", retry_after=limits.retry_after_s)
            if self.open >= limits.streams:
                raise GatewayError(429, f"the gateway is streaming {self.open} samples, its limit; try again in a few "
                                        f"seconds", retry_after=limits.retry_after_s)
            self.by_client[client] += 1
        given = threading.Event()

        def release() -> None:
            with self._lock:
                if given.is_set():
                    return
                given.set()
                self.by_client[client] -= 1
                if not self.by_client[client]:
                    del self.by_client[client]
        return release


class BodyLimit:
    """ASGI middleware: a request body over its path's limit (`limits`, else `default`) is answered
    413 {"error": ...} by this middleware, whatever the app would have said. A declared
    Content-Length over the limit is refused before the app runs or any body is read; a chunked
    body is counted as the app reads it, and once past the limit the app sees a disconnect."""

    def __init__(self, app, default: int, limits: dict[str, int] | None = None):
        self.app, self.default, self.limits = app, default, dict(limits or {})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        limit = self.limits.get(path, self.default)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await refuse(receive, send, path, limit, int(declared))
        seen, over, started = 0, False, False

        async def counted():
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    over = True  # the chunk is dropped; the app's reading ends here
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message):
            nonlocal started
            if over:
                return  # the app's answer to a body it never got in full: replaced by the 413 below
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not over:
                raise
        if over and not started:
            await refuse(receive, send, path, limit, None)


async def refuse(receive, send, path: str, limit: int, size: int | None) -> None:
    what = "the upload" if path.endswith("/upload") else "the request body"
    said = f"{what} is {mib(size)}; at most {mib(limit)} is accepted" if size is not None else \
        f"{what} is larger than {mib(limit)}, the most accepted"  # chunked: read no further than the limit
    body = GatewayError(413, said).body()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": True})  # the whole answer, sent now
    dropped = 0
    with anyio.move_on_after(REFUSED_S):
        while dropped < REFUSED_BYTES:
            message = await receive()
            dropped += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body"):
                break
    await send({"type": "http.response.body", "body": b""})
