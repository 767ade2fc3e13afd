"""A tiny HTTP/1.1 client on asyncio for the gateway's limit tests (tests/test_web_limits.py,
tests/test_web.py): hundreds of connections at once, from chosen loopback addresses (127.0.0.x:
the gateway tells clients apart by address), without a thread each."""
from __future__ import annotations

import asyncio
import json
import time


async def request(port: int, path: str, body: bytes | None = None, source: str = "127.0.0.1", chunked: bool = False):
    """Send a POST from `source` -> (status, headers, reader, writer); the body is left unread."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    head = [f"POST {path} HTTP/1.1", "Host: gateway", "Content-Type: application/json"]
    head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body or b'')}")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
    if body:
        writer.write(f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n" if chunked else body)
    await writer.drain()
    status, headers = await read_head(reader)
    return status, headers, reader, writer


async def read_head(reader) -> tuple[int, dict[str, str]]:
    status = int((await reader.readline()).split()[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        key, _, value = line.decode().partition(":")
        headers[key.strip().lower()] = value.strip()
    return status, headers


async def read_json(reader, headers) -> dict:
    return json.loads(await reader.readexactly(int(headers["content-length"])))


async def read_lines(reader) -> list[dict]:
    """The NDJSON lines of a chunked stream, to its end."""
    lines = []
    while (size := int((await reader.readline()).strip(), 16)) > 0:
        lines += [json.loads(x) for x in (await reader.readexactly(size + 2))[:-2].splitlines()]
    return lines


async def until(ok, timeout: float) -> bool:
    """wait_for for a coroutine: the event loop goes on (closing connections) while it waits."""
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


CHUNK = b"[" * (256 * 1024)  # one buffer sent again and again: the sender holds no large body itself


async def post_big(port: int, path: str, size: int, chunked: bool) -> tuple[int, dict, int]:
    """POST `size` bytes (declared in Content-Length, or chunked), all of them, then a GET on the
    same connection -> (status, JSON answer, the GET's status)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = [f"POST {path} HTTP/1.1", "Host: gateway", "Content-Type: application/json"]
    head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
    for start in range(0, size, len(CHUNK)):
        piece = CHUNK[:size - start]
        writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece)
        await writer.drain()
    if chunked:
        writer.write(b"0\r\n\r\n")
    await writer.drain()
    status, headers = await read_head(reader)
    answer = await read_json(reader, headers)
    # The connection goes on serving: the refused body was read and dropped, not left in the pipe.
    writer.write(b"GET /static/style.css HTTP/1.1\r\nHost: gateway\r\n\r\n")
    await writer.drain()
    after, _ = await read_head(reader)
    writer.close()
    return status, answer, after
