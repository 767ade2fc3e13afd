"""web/limits.py through the gateway's HTTP: stream caps per client address and in all (429 with
Retry-After), request body limits (413, declared or chunked, with the gateway's memory kept flat),
and bounded worker threads. The gateway runs in this process (uvicorn in a thread) in front of a
fake sampler, so hundreds of streams cost nothing: what is measured is the gateway's own work.
The same caps against a real tritonserver are in tests/test_web.py."""
from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from pixelrnn.client.library import ModelInfo, Row, Scores
from pixelrnn.server.launcher import free_port
from tests.deployment import require, wait_for
from tests.web_http import post_big, read_json, read_lines, request, until

require("fastapi")
uvicorn = require("uvicorn")
from pixelrnn.web.gateway import create_app  # noqa: E402
from pixelrnn.web.limits import MIB, Limits  # noqa: E402

LIMITS = Limits(streams_per_client=4, streams=8, json_bytes=MIB, threads=3)
WAIT_S = 30.0  # bound of any one exchange: far above a busy machine's need, short of a hang
ROW_PERIOD_S = 0.02  # a "slow" model's rows: a stream that stays open until its client leaves
SHAPES = {"small": (1, 2, 2), "slow": (1, 100_000, 2)}


class FakeClient:
    """What RowStream uses of a PixelClient."""

    def __init__(self, model: str):
        self.info = ModelInfo(model, SHAPES[model], max_batch=16, conditional=False, levels=2)
        self.closed = False

    def score(self, images, labels=None):
        n = len(images)
        return Scores(np.ones(n, np.float32), np.ones(n, np.float32), None)

    def close(self):
        self.closed = True


def fake_rows(model: str, n: int):
    c, h, w = SHAPES[model]
    for index in range(h):
        if model == "slow":
            time.sleep(ROW_PERIOD_S)
        yield Row(index, 0, np.zeros((n, c, w), np.uint8), np.zeros(n, np.float32))


class Served:
    def __init__(self, limits: Limits):
        self.app = create_app("127.0.0.1:1", limits=limits)  # nothing there: the fakes answer
        gateway = self.app.state.gateway
        gateway.open_sample = lambda req: (FakeClient(req.model), fake_rows(req.model, req.n), None, None)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def slots(self):
        return self.app.state.slots


@pytest.fixture
def served():
    s = Served(LIMITS)
    s.thread.start()
    _, up = wait_for(lambda: s.server.started, bool, WAIT_S)
    assert up, "the gateway did not start"
    yield s
    s.server.should_exit = True
    s.thread.join(WAIT_S)


def sample(model: str, n: int = 1) -> bytes:
    return json.dumps({"model": model, "n": n}).encode()


def threads_of_gateway(before: set[int]) -> int:
    return len({t.ident for t in threading.enumerate()} - before)


# -- streams ----------------------------------------------------------------------------------------
def test_one_client_flooding_streams_is_capped_and_another_client_still_samples(served):
    before = {t.ident for t in threading.enumerate()}

    async def scenario():
        flood = await asyncio.wait_for(asyncio.gather(*(request(served.port, "/api/sample", sample("slow", 16))
                                                        for _ in range(300))), WAIT_S)
        statuses = [s for s, *_ in flood]
        assert statuses.count(200) == LIMITS.streams_per_client and statuses.count(429) == 300 - LIMITS.streams_per_client
        refused = [f for f in flood if f[0] == 429]
        assert {h["retry-after"] for _, h, _, _ in refused} == {str(LIMITS.retry_after_s)}
        answer = await read_json(refused[0][2], refused[0][1])
        assert "127.0.0.1 already has 4 sample streams open" in answer["error"], answer
        assert served.slots.by_client == {"127.0.0.1": LIMITS.streams_per_client}
        threads = threads_of_gateway(before)  # unbounded, 300 streams took 695 threads
        assert threads <= LIMITS.streams + LIMITS.threads + 2, f"{threads} threads for {LIMITS.streams_per_client} streams"

        # Another address is not held back by the first one's refusals: its sample runs to the end.
        started = time.monotonic()
        status, headers, reader, writer = await request(served.port, "/api/sample", sample("small"), source="127.0.0.2")
        assert status == 200
        lines = await asyncio.wait_for(read_lines(reader), WAIT_S)
        print(f"another client's 1-image sample beside the flood: {time.monotonic() - started:.3f} s")
        assert [x["type"] for x in lines] == ["start", "row", "row", "done"], lines
        writer.close()

        # The cap in all: a third address fills the gateway, a fourth is refused with the global message.
        third = [await request(served.port, "/api/sample", sample("slow"), source="127.0.0.3") for _ in range(4)]
        assert [s for s, *_ in third] == [200] * 4
        status, headers, reader, _ = await request(served.port, "/api/sample", sample("small"), source="127.0.0.4")
        assert status == 429 and headers["retry-after"] == str(LIMITS.retry_after_s)
        assert "the gateway is streaming 8 samples, its limit" in (await read_json(reader, headers))["error"]

        # Leaving (closing the connections) gives the slots back once each worker has stopped.
        for *_, writer in flood + third:
            writer.close()
        freed = await until(lambda: served.slots.open == 0, WAIT_S)
        assert freed, f"slots still taken after every client left: {dict(served.slots.by_client)}"
        status, _, reader, writer = await request(served.port, "/api/sample", sample("small"), source="127.0.0.4")
        assert status == 200 and [x["type"] for x in await read_lines(reader)][-1] == "done"
        writer.close()

    asyncio.run(scenario())


def test_a_failed_open_gives_its_slot_back(served):
    def refuse(req):
        from pixelrnn.web.errors import GatewayError
        raise GatewayError(400, "no such thing")

    served.app.state.gateway.open_sample = refuse

    async def scenario():
        for _ in range(2 * LIMITS.streams_per_client):  # past the cap, had any slot leaked
            status, headers, reader, writer = await request(served.port, "/api/sample", sample("small"))
            assert status == 400 and (await read_json(reader, headers))["error"] == "no such thing"
            writer.close()

    asyncio.run(scenario())
    assert served.slots.open == 0


# -- bodies ---------------------------------------------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024


BIG = 32 * 1000 * 1000  # what was sent in the report: 32 MB
RSS_BOUND = 16 * MIB  # measured +0-2 MiB; unbounded, the same body took the gateway +254 MB


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path, limit, words", [("/api/score", MIB, "the request body"), ("/api/sample", MIB, "the request body"),
                                                 ("/api/upload?model=x", 2 * MIB, "the upload")])
def test_a_32_mb_body_gets_413_and_the_gateway_stays_small(served, path, limit, words, chunked):
    asyncio.run(asyncio.wait_for(post_big(served.port, path, BIG, chunked), WAIT_S))  # warm: the first request's imports and buffers
    before = rss_bytes()
    status, answer, after = asyncio.run(asyncio.wait_for(post_big(served.port, path, BIG, chunked), WAIT_S))
    grown = rss_bytes() - before
    print(f"{path} {'chunked' if chunked else 'declared'} 32 MB: RSS {grown / MIB:+.1f} MiB; {answer}")
    assert status == 413 and answer["error"].startswith(words), answer
    assert f"at most {limit // MIB} MiB" in answer["error"] or f"larger than {limit // MIB} MiB" in answer["error"], answer
    assert after == 200
    assert grown < RSS_BOUND, f"the gateway grew by {grown / MIB:.1f} MiB on a refused body"


def test_a_client_that_closes_after_its_request_still_reads_the_413(served):
    # urllib says "Connection: close" and sends the whole body before reading: answered and cut
    # off at once, it failed with a broken pipe about half the time. The refused body is drained.
    for path, size, times in (("/api/upload?model=x", 3 * MIB, 6), ("/api/score", BIG, 2)):
        for _ in range(times):
            req = urllib.request.Request(f"http://127.0.0.1:{served.port}{path}", data=bytes(size),
                                         headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=WAIT_S)
            assert e.value.code == 413 and "at most" in json.loads(e.value.read())["error"]


def test_a_body_under_the_limit_reaches_the_app(served):
    served.app.state.gateway.score = lambda req: {"nll": [float(len(req.images))], "bpd": [0.0]}
    images = [[[[0] * 28] * 28]] * 64  # the most images a score takes, of a 28 x 28 model: well under 1 MiB

    async def scenario():
        body = json.dumps({"model": "small", "images": images}).encode()
        status, headers, reader, writer = await request(served.port, "/api/score", body, chunked=True)
        assert (status, await read_json(reader, headers)) == (200, {"nll": [64.0], "bpd": [0.0]})
        writer.close()

    asyncio.run(scenario())


# -- threads --------------------------------------------------------------------------------------
def test_blocking_calls_share_a_bounded_pool(served):
    running, most, lock = [0], [0], threading.Lock()

    def slow_score(req):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.1)
        with lock:
            running[0] -= 1
        return {"nll": [0.0], "bpd": [0.0]}

    served.app.state.gateway.score = slow_score
    body = json.dumps({"model": "small", "images": [[[[0, 0], [0, 0]]]]}).encode()

    async def scenario():
        answers = await asyncio.wait_for(asyncio.gather(*(request(served.port, "/api/score", body) for _ in range(40))), WAIT_S)
        assert [s for s, *_ in answers] == [200] * 40  # the rest waited their turn: none refused
        for *_, writer in answers:
            writer.close()

    asyncio.run(scenario())
    assert most[0] == LIMITS.threads, f"at most {most[0]} calls at once; the pool has {LIMITS.threads}"


def test_limits_refuse_nonsense():
    with pytest.raises(ValueError, match="streams must be at least 1"):
        Limits(streams=0)
    with pytest.raises(ValueError, match="more than streams"):
        Limits(streams_per_client=10, streams=5)
