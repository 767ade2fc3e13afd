"""Triton replicas behind nginx (server/cluster.py), on loopback: sequences stay on their replica,
scoring spreads over all of them, and a replica killed with SIGKILL mid-load loses nothing.

One module-wide cluster of 3 replicas of a tiny 128-row model serves the stickiness and the
failover tests (the replica to be killed runs its sampler slowed first, and is killed once a
stream on it is mid-image: see Throttle and freeze_mid_image) and the stuck-replica test (a
response send hung by the sampler's test-only hook, tests/triton_test_model.py: the supervisor
kills and restarts that replica); a smaller one is started through `make serve REPLICAS=2` and stopped with Ctrl-C
(SIGINT). Images are checked against the in-process sampler, scores against the model's NLL.
Bounded: 8 s of load (12 sampling streams, 2 scoring clients), then a few seconds of 7 streams
around the stuck replica; every wait has its own bound. The manifest for Kubernetes is checked against the Kubernetes schema here too."""
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from pixelrnn.server.cluster import HEALTH_S, Cluster, stuck_models
from pixelrnn.server.proxy import Proxy, find_nginx, render_config
from pixelrnn.server.launcher import ServerError, check_port, free_port
from tests.deployment import (BUSY_SLACK_S, REPO, Tiny, export_models, kill_hard, missing, require, require_tritonserver,
                              sampler_metrics, sampler_periods, stop_group, wait_for)
from tests.test_make_serve import setup_is_current

require("tritonclient.grpc")

from pixelrnn.client.library import PixelClient, ServerGone, assemble  # noqa: E402
from pixelrnn.client.stream import SampleStream, sample_inputs  # noqa: E402
from pixelrnn.runtime import protocol as p  # noqa: E402
from pixelrnn.runtime.manifest import read_manifest  # noqa: E402

MODEL = "tall"
HEIGHT = 128
CONFIG = dict(in_channels=1, height=HEIGHT, width=4, levels=2, hidden=6, layers=1, kernel=3)
REPLICAS = 3
STREAMS, SCORERS = 12, 2
LOAD_S, KILL_AT_S = 8.0, 3.0
THROTTLE_S = 1.0  # the killed replica's sampler runs slowed for this long before the kill (Throttle)
KILLED = 1  # the replica killed mid-load
FAIL_TIMEOUT_S = 1  # how long nginx leaves out a replica that refused a connection
RETRIES = dict(retries=3, retry_wait_s=60.0)
# A freeze of the sampler to be killed (freeze_mid_image) lasts FREEZE_S when it finds no stream
# mid-image there: Triton's Python backend calls a stub that has not answered a message for 1 s
# unhealthy (and fails the requests sent to it) if it is stopped while holding its health lock.
FREEZE_S = 0.2
STUCK_SEND_S = 3  # the replicas' stuck-send bound (server/repository.py stuck_send_s; 10 s by default)
STUCK_SEED = 987654321  # tests/triton_test_model.py (the replicas' sampler here) gets this seed's sends stuck


def nginx_or_skip():
    try:
        find_nginx()
    except ServerError as e:
        missing(str(e))


def counter(server, metric: str, model: str) -> float:
    """One of Triton's per-model counters (e.g. nv_inference_request_success) on a replica."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    found = re.search(rf'^{metric}\{{[^}}]*model="{model}"[^}}]*\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


# ------------------------------------------------------------------------------ no server

def test_the_config_lists_every_replica_and_nginx_accepts_it(tmp_path):
    nginx_or_skip()
    text = render_config(tmp_path, 18001, [7001, 7002, 7003], 3)
    assert re.search(r"\{\{\w+\}\}", text) is None  # every field filled in
    for port in (7001, 7002, 7003):
        assert f"server 127.0.0.1:{port} max_fails=1 fail_timeout=3s;" in text
    assert "listen 127.0.0.1:18001 http2;" in text and "grpc_next_upstream_tries 3;" in text
    (tmp_path / "temp").mkdir()
    (tmp_path / "nginx.conf").write_text(text)
    check = subprocess.run([str(find_nginx()), "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
                            "-e", str(tmp_path / "error.log")], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("replicas", [0, -1, 1.5, True])
def test_a_bad_replica_count_is_refused_in_one_line(tmp_path, replicas):
    with pytest.raises(ServerError, match=r"replicas must be a whole number >= 1"):
        Cluster(tmp_path, replicas)


def test_the_command_refuses_bad_arguments_in_one_line_before_starting_anything(tmp_path, capsys):
    from pixelrnn.server.cluster import main

    assert main(["--replicas", "0", "--repository", str(tmp_path), "--port", str(free_port())]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: replicas must be a whole number >= 1, got 0"]


@pytest.mark.parametrize("seconds", [0, 0.5, 1.5, -2])
def test_a_fail_timeout_nginx_cannot_take_is_refused_in_one_line(tmp_path, seconds):
    with pytest.raises(ServerError, match=r"fail_timeout_s must be a whole number of seconds >= 1"):
        Cluster(tmp_path, 2, fail_timeout_s=seconds)


def test_a_proxy_on_a_busy_port_is_refused_naming_it(tmp_path):
    nginx_or_skip()
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        with pytest.raises(ServerError, match=rf"proxy port {port} on 127.0.0.1 is already in use"):
            Proxy([7001], tmp_path, port=port).start()


def test_the_supervisor_reads_a_stuck_sampler_from_a_metrics_page():
    """stuck_models: the sampler models whose pixelrnn_sampler_healthy gauge is 0 on a replica's
    metrics page (Triton's format); a page that does not answer names none."""
    import http.server

    page = (b'# HELP pixelrnn_sampler_healthy 1, or 0 while a response send is stuck\n'
            b'pixelrnn_sampler_healthy{model="a_sample"} 1\npixelrnn_sampler_healthy{model="b_sample"} 0\n'
            b'nv_inference_request_success{model="c_score",version="1"} 0\n')

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert stuck_models(f"http://127.0.0.1:{server.server_port}/metrics") == ["b_sample"]
    finally:
        server.shutdown()
        server.server_close()
    assert stuck_models(f"http://127.0.0.1:{server.server_port}/metrics", timeout=1) == []


def test_the_kubernetes_manifest_is_valid_against_the_kubernetes_schema():
    """server/deploy/triton-replicas.yaml against the schema kubernetes-validate bundles (offline;
    the manifest is not run on a cluster here): every resource valid in strict mode (no unknown
    field), and a broken copy is caught, so the check is not vacuous."""
    validator = require("kubernetes_validate")
    yaml = require("yaml")
    resources = [r for r in yaml.safe_load_all((REPO / "server" / "deploy" / "triton-replicas.yaml").read_text()) if r]
    kinds = sorted(r["kind"] for r in resources)
    assert kinds == ["ConfigMap", "Deployment", "Service", "Service"]
    version = validator.latest_version()
    for resource in resources:
        validator.validate(resource, version, strict=True)
    deployment = next(r for r in resources if r["kind"] == "Deployment")
    container, proxy = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"].startswith("nvcr.io/nvidia/tritonserver:")  # the stock image
    assert {"name": "model-repository", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
    # Triton's plain-text gRPC and HTTP on the pod's loopback; the Service reaches the TLS sidecar only
    # (its config runs on real nginx in tests/test_proxy_tls.py).
    assert {"--grpc-address=127.0.0.1", "--http-address=127.0.0.1"} <= set(container["args"])
    assert [p["name"] for p in container["ports"]] == ["metrics"]
    assert {"name": "proxy-secret", "mountPath": "/etc/pixelrnn/proxy", "readOnly": True} in proxy["volumeMounts"]
    service = next(r for r in resources if r["kind"] == "Service" and r["metadata"]["name"] == "pixelrnn")
    assert service["spec"]["ports"] == [{"name": "grpcs", "port": 8443, "targetPort": "grpcs"}]
    broken = {**deployment, "spec": {**deployment["spec"], "replicas": "three"}}
    with pytest.raises(validator.ValidationError):
        validator.validate(broken, version, strict=True)


@pytest.mark.parametrize("live, healthy, passes", [(200, "1", True), (200, "0", False), (503, "1", False)])
def test_the_kubernetes_liveness_probe_fails_a_stuck_or_dead_replica(live, healthy, passes):
    """The manifest's liveness command, run as written against a fake Triton (its ports moved to
    free ones): it passes a live replica whose sampler is healthy, and fails one whose health
    endpoint errs or whose sampler says pixelrnn_sampler_healthy 0 (a stuck send)."""
    import http.server
    import sys

    yaml = require("yaml")
    resources = [r for r in yaml.safe_load_all((REPO / "server" / "deploy" / "triton-replicas.yaml").read_text()) if r]
    container = next(r for r in resources if r["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    command = container["livenessProbe"]["exec"]["command"]
    assert command[:2] == ["python3", "-c"]
    metrics = (f'# TYPE pixelrnn_sampler_healthy gauge\npixelrnn_sampler_healthy{{model="a_sample"}} 1\n'
               f'pixelrnn_sampler_healthy{{model="b_sample"}} {healthy}\n')

    class Fake(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            code, body = (live, b"") if self.path == "/v2/health/live" else (200, metrics.encode())
            self.send_response(code)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), Fake) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        script = command[2].replace("127.0.0.1:8000", f"127.0.0.1:{servers[0].server_port}")
        script = script.replace("127.0.0.1:8002", f"127.0.0.1:{servers[1].server_port}")
        assert script != command[2]
        probe = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    finally:
        for server in servers:
            server.shutdown()
    assert (probe.returncode == 0) == passes, probe.stderr
    if healthy == "0":
        assert 'stuck: pixelrnn_sampler_healthy{model="b_sample"} 0' in probe.stderr


# ------------------------------------------------------------------------------ a cluster

@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    require_tritonserver()
    nginx_or_skip()
    root = tmp_path_factory.mktemp("cluster")
    exported = export_models(root, [Tiny(MODEL, "gated_pixelcnn", CONFIG, max_batch=16, writer=dict(stuck_send_s=STUCK_SEND_S))],
                             root / "repository")
    return root, exported[MODEL].model


def with_test_hooks(repository: Path, into: Path) -> Path:
    """A copy of `repository` whose sampler is tests/triton_test_model.py around the shipped
    model.py (renamed shipped_model.py): STUCK_SEED's sends get stuck, every START is recorded in
    a ledger per replica (open_there), every seed is served as shipped. The shipped glue carries no
    test hook."""
    shutil.copytree(repository, into)
    version = into / p.sample_model(MODEL) / "1"
    (version / "model.py").rename(version / "shipped_model.py")
    shutil.copyfile(Path(__file__).with_name("triton_test_model.py"), version / "model.py")
    (version / "stuck_seed").write_text(str(STUCK_SEED))
    return into


@pytest.fixture(scope="module")
def cluster(deployed):
    """The replicas' sampler gets STUCK_SEED's sends stuck and keeps a ledger of its sequences
    (with_test_hooks; every seed is served as usual): the stuck-replica and the kill tests."""
    root, _ = deployed
    events = []
    repository = with_test_hooks(root / "repository", root / "repository_test_hooks")
    with Cluster(repository, REPLICAS, run_dir=root / "run", fail_timeout_s=FAIL_TIMEOUT_S, log=events.append) as c:
        c.events, c.repository = events, repository
        yield c


@pytest.mark.triton
@pytest.mark.slow
def test_a_sequence_of_several_requests_stays_on_its_replica(cluster, deployed):
    """Each sequence here is 4 requests on one stream (START for 32 rows, then 32 more each, the
    next sent once the last one's rows are in): a request that reached another replica would be
    refused there (no START), so every image coming out whole, equal to the in-process sampler's,
    shows the stream stayed on one replica."""
    streams = [SampleStream(cluster.url, timeout=60) for _ in range(2 * REPLICAS)]
    rows = [[] for _ in streams]
    try:
        for step in range(4):
            for k, stream in enumerate(streams):
                stream.send(p.sample_model(MODEL), 100 + k, sample_inputs(batch=1, seed=k, max_rows=HEIGHT // 4) if step == 0
                            else sample_inputs(max_rows=HEIGHT // 4), start=step == 0, end=step == 3)
            for k, stream in enumerate(streams):
                got, errors = stream.collect()
                assert not errors, errors
                rows[k] += got
        want = in_process_images(deployed, range(len(streams)))
        for k in range(len(streams)):
            assert [r.index for r in rows[k]] == list(range(HEIGHT))
            np.testing.assert_array_equal(assemble(rows[k]), want[k])
    finally:
        for stream in streams:
            stream.close()
    # nginx's log (a line once a stream is over): each stream went to one replica, the streams to more than one.
    def upstreams():
        log = (cluster.run_dir / "access.log").read_text().splitlines()
        return [re.search(r"upstream=(\S+) ", line).group(1) for line in log if "ModelStreamInfer" in line]

    logged, ok = wait_for(upstreams, lambda u: len(u) >= len(streams), BUSY_SLACK_S)
    assert ok, f"nginx logged {len(logged)} of {len(streams)} streams"
    assert all("," not in u for u in logged[-len(streams):]) and len(set(logged[-len(streams):])) > 1, logged


class Throttle:
    """Slows a replica's sampler to about a fifth of its speed: SIGSTOP / SIGCONT in turns to
    its backend stub (the process that makes the rows), as on a replica behind on its work. Its
    gRPC front end runs on at full speed, so streams whose images are done close as usual, and
    those still open when the replica is killed are cut mid-image (at full speed this tiny model
    makes an image in a few ms, and a kill would find its streams being set up or closed).
    `freeze` stops the stub outright (SIGSTOP held), `thaw` goes back to throttling."""

    STOPPED_S, RUNNING_S = 0.04, 0.01

    def __init__(self, server, model: str):
        children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()
        stubs = [int(c) for c in children if f"/{model}/1/model.py" in Path(f"/proc/{c}/cmdline").read_text(errors="replace")]
        assert len(stubs) == 1, f"no single backend stub of {model} among the replica's processes {children}"
        self.pid, self.done = stubs[0], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.done.is_set():
            for signum, pause in ((signal.SIGSTOP, self.STOPPED_S), (signal.SIGCONT, self.RUNNING_S)):
                try:
                    os.kill(self.pid, signum)
                except ProcessLookupError:
                    return
                time.sleep(pause)

    def stop(self):
        self.done.set()
        self.thread.join(timeout=5)

    def freeze(self):
        self.stop()
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self):
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()


def open_there(repository: Path, server) -> set[int]:
    """The seeds whose START request is open on replica `server` by its sampler's ledger
    (tests/triton_test_model.py): started there and not yet ended."""
    ledger = repository / p.sample_model(MODEL) / "1" / f"ledger-{server.process.pid}"
    started, ended = set(), set()
    for line in ledger.read_text().splitlines() if ledger.exists() else []:
        event, seed = line.split()
        (started if event == "start" else ended).add(int(seed))
    return started - ended


def freeze_mid_image(throttle: Throttle, progress: dict, repository: Path, server, bound: float) -> list[int]:
    """Freeze the throttled sampler of replica `server` with a stream of it mid-image, within
    `bound` s, and return (the caller kills it at once): a sampler whose current image has rows at
    the client and is open on that replica by its ledger (open_there), so a kill cuts it mid-image;
    none: thaw a while and try again. -> the samplers found (progress: sampler -> [seed of its
    current image, rows of it received, whether it is open]); [] when the bound ran out."""
    deadline = time.monotonic() + bound
    while True:
        throttle.freeze()
        # The ledger is still once the stub is stopped; the client may have a row or two more to read.
        found, ok = wait_for(lambda: [k for k, (seed, rows, open_) in list(progress.items())
                                      if open_ and rows and seed in open_there(repository, server)],
                             bool, FREEZE_S, interval=0.02)
        if ok or time.monotonic() > deadline:
            return found
        throttle.thaw()
        time.sleep(THROTTLE_S / 5)


def in_process_images(deployed, seeds) -> dict[int, np.ndarray]:
    """The in-process sampler's image for each seed: the exported ONNX cells through the engine
    (server/engine/scheduler.py), max_batch sequences per cell call, as bench.load checks its images (the
    same seed gives export.cells.sample_cached's image: tests/test_server_triton.py)."""
    from bench.serving import sample_engine
    from pixelrnn.runtime.rowloop import SampleSpec
    from pixelrnn.runtime.runner import OnnxRunner

    root, _ = deployed
    manifest, folder = read_manifest(root / f"{MODEL}_export"), root / f"{MODEL}_export"
    runner, batch, seeds = OnnxRunner.from_manifest(manifest, folder), int(manifest["max_batch"]), sorted(seeds)
    out = {}
    for a in range(0, len(seeds), batch):
        part = seeds[a:a + batch]
        for seed, image in zip(part, sample_engine(runner, batch, [SampleSpec(batch=1, seed=s) for s in part],
                                                   tuple(manifest["shape"]))):
            out[seed] = image
    return out


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.reliability
def test_load_spreads_and_a_replica_killed_mid_load_loses_nothing(cluster, deployed):
    model = deployed[1]
    periods = sampler_periods()
    score_images = np.random.default_rng(0).integers(0, 2, (4, 1, HEIGHT, 4)).astype(np.uint8)
    with torch.no_grad():
        want_nll = model.nll(torch.from_numpy(score_images).long()).numpy()
    stop_at = [float("inf")]
    errors, notices, images, scores = [], [], {}, []
    progress = {k: [None, 0, False] for k in range(STREAMS)}  # see freeze_mid_image

    def sampler(k):
        try:
            with PixelClient(cluster.url, model=MODEL) as client:
                n = 0
                while time.monotonic() < stop_at[0]:
                    seed, rows, track = 1000 * k + n, [], progress[k]
                    track[:] = [seed, 0, True]
                    for row in client.sample(1, seed=seed, on_retry=lambda line: notices.append((seed, line)), **RETRIES):
                        rows.append(row)
                        track[1] = len(rows)
                    track[2] = False
                    images[seed] = rows
                    n += 1
        except Exception as e:  # noqa: BLE001 - every failure is a test failure, reported below
            errors.append(f"sampler {k}: {type(e).__name__}: {e}")

    def scorer(k):
        try:
            with PixelClient(cluster.url, model=MODEL) as client:
                while time.monotonic() < stop_at[0]:
                    scores.append(client.score(score_images, **RETRIES).nll_nats)
        except Exception as e:  # noqa: BLE001
            errors.append(f"scorer {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=sampler, args=(k,), daemon=True) for k in range(STREAMS)]
    threads += [threading.Thread(target=scorer, args=(k,), daemon=True) for k in range(SCORERS)]
    start = time.monotonic()
    stop_at[0] = start + LOAD_S
    for t in threads:
        t.start()
    time.sleep(KILL_AT_S - THROTTLE_S)
    throttle = Throttle(cluster.replicas[KILLED], p.sample_model(MODEL))
    time.sleep(THROTTLE_S)
    # Before the kill: scoring and sampling landed on every replica (Triton's and the sampler's metrics).
    spread = [counter(r, "nv_inference_request_success", p.score_model(MODEL)) for r in cluster.replicas]
    started = [sampler_metrics(r, p.sample_model(MODEL)).get("started", 0) for r in cluster.replicas]
    # The kill must find a stream there mid-image (the test's point): it waits, bounded, for one.
    cut = freeze_mid_image(throttle, progress, cluster.repository, cluster.replicas[KILLED], BUSY_SLACK_S)
    kill_hard(cluster.replicas[KILLED])
    throttle.stop()
    for t in threads:
        t.join(timeout=LOAD_S + 120)
    assert not any(t.is_alive() for t in threads), "a client did not finish within its bound"
    print(f"score requests per replica before the kill {spread}, sequences started {started}, samplers mid-image there {cut}; "
          f"{len(images)} images, {len(scores)} score calls; notices: {notices[:6]}")
    assert not errors, errors[:5]
    assert cut, f"no stream was mid-image on replica {KILLED} within {BUSY_SLACK_S:g} s of trying"
    assert all(s > 0 for s in spread), f"scoring did not reach every replica: {spread}"
    assert all(s > 0 for s in started), f"sampling did not reach every replica: {started}"

    # The kill cut streams mid-image; each resumed from its received rows and lost nothing.
    resumed = [int(m.group(1)) for _, line in notices if (m := re.search(r"resuming from row (\d+)", line))]
    assert any(r > 0 for r in resumed), f"no stream was cut mid-image by the kill: {notices}"
    want = in_process_images(deployed, images)
    for seed, rows in images.items():
        assert [(r.stage, r.index) for r in rows] == [(0, i) for i in range(HEIGHT)], f"seed {seed}: rows lost or repeated"
        np.testing.assert_array_equal(assemble(rows), want[seed], err_msg=f"seed {seed}")
    assert len(scores) > 0
    for nll in scores:
        np.testing.assert_allclose(nll, want_nll, rtol=1e-5, atol=1e-4)

    # The survivors hold no sequence once the clients are done.
    bound = periods["METRICS_PERIOD_S"] + periods["CANCEL_CHECK_S"] + BUSY_SLACK_S
    for k, replica in enumerate(cluster.replicas):
        if k != KILLED:
            live, ok = wait_for(lambda: sampler_metrics(replica, p.sample_model(MODEL)).get("live"), lambda v: v == 0, bound)
            assert ok, f"replica {k} still holds {live} sequences {bound:g} s after the load"

    # The supervisor restarted the killed replica; the proxy sends it scoring and streams again.
    _, back = wait_for(lambda: cluster.restarts[KILLED], lambda n: n == 1, 60 + BUSY_SLACK_S, interval=0.2)
    assert back and cluster.replicas[KILLED].running(), cluster.events
    assert any("restarting it" in e for e in cluster.events)
    restarted = cluster.replicas[KILLED]  # its counters start at 0
    with PixelClient(cluster.url, model=MODEL) as client:
        def one_score():
            np.testing.assert_allclose(client.score(score_images, **RETRIES).nll_nats, want_nll, rtol=1e-5, atol=1e-4)
            return counter(restarted, "nv_inference_request_success", p.score_model(MODEL))

        _, ok = wait_for(one_score, lambda c: c > 0, 30)
        assert ok, "the restarted replica got no score request"
        seeds = iter(range(10**6, 10**7))

        def one_image():
            seed = next(seeds)
            np.testing.assert_array_equal(client.sample_images(1, seed=seed, **RETRIES), in_process_images(deployed, [seed])[seed])
            return sampler_metrics(restarted, p.sample_model(MODEL)).get("started", 0)

        _, ok = wait_for(one_image, lambda n: n > 0, 30)
        assert ok, "the restarted replica got no sampling stream"


@pytest.mark.triton
@pytest.mark.reliability
def test_score_with_retries_waits_for_its_server_and_sends_again(cluster, deployed):
    """PixelClient.score(retries=N) on a replica's own address (no proxy to go elsewhere): the
    replica killed, a score call without retries fails in one line, one with retries waits for
    the supervisor's restart and gets the model's NLL."""
    images = np.random.default_rng(1).integers(0, 2, (3, 1, HEIGHT, 4)).astype(np.uint8)
    with torch.no_grad():
        want = deployed[1].nll(torch.from_numpy(images).long()).numpy()
    restarts = cluster.restarts[0]
    with PixelClient(cluster.replicas[0].grpc_url, model=MODEL) as client:
        kill_hard(cluster.replicas[0])
        with pytest.raises(ServerGone, match=r"cannot reach the Triton server at 127\.0\.0\.1:\d+"):
            client.score(images)
        np.testing.assert_allclose(client.score(images, retries=2, retry_wait_s=60).nll_nats, want, rtol=1e-5, atol=1e-4)
    # The retry may get through as soon as the new server is ready, a readiness poll before the
    # supervisor (its own poll of the same server) records the restart.
    count, _ = wait_for(lambda: cluster.restarts[0], lambda n: n > restarts, BUSY_SLACK_S, interval=0.1)
    assert count == restarts + 1


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.reliability
def test_a_replica_with_a_stuck_send_is_restarted_and_its_streams_resume(cluster, deployed):
    """A response send that never returns (tests/triton_test_model.py for STUCK_SEED: its
    second send hangs, as one caught in Triton 2.51's gRPC stream deadlock does), on whichever
    replica the proxy gives that stream, under 6 more sampling streams: after STUCK_SEND_S that
    sampler ends the other sequences on the stuck sender thread with an UNHEALTHY error and says
    pixelrnn_sampler_healthy 0; the supervisor kills the replica (SIGKILL) and restarts it. Every
    client, the stuck one too, resumes on a live replica and gets the in-process sampler's image."""
    periods = sampler_periods()
    restarts, stuck = list(cluster.restarts), list(cluster.stuck)
    stop = threading.Event()
    errors, notices, images = [], [], {}

    def sampler(seeds):
        try:
            with PixelClient(cluster.url, model=MODEL) as client:
                for seed in seeds:
                    if stop.is_set():
                        return
                    images[seed] = list(client.sample(1, seed=seed, on_retry=lambda line: notices.append((seed, line)),
                                                      retries=4, retry_wait_s=60.0))
        except Exception as e:  # noqa: BLE001 - every failure is a test failure, reported below
            errors.append(f"seeds from {seeds[0]}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=sampler, args=([STUCK_SEED],), daemon=True)]
    threads += [threading.Thread(target=sampler, args=(range(3000 * k, 3000 * (k + 1)),), daemon=True) for k in range(1, 7)]
    for t in threads:
        t.start()
    bound = STUCK_SEND_S + periods["ENGINE_POLL_S"] + periods["METRICS_PERIOD_S"] + HEALTH_S + BUSY_SLACK_S
    _, found = wait_for(lambda: cluster.stuck, lambda now: now != stuck, bound)
    time.sleep(1.0)  # load on the survivors after the kill
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a client did not finish within its bound"
    assert found, f"no replica was found stuck within {bound:g} s: {cluster.events[-5:]}"
    (k,) = [k for k in range(REPLICAS) if cluster.stuck[k] != stuck[k]]
    print(f"replica {k} stuck and killed; {len(images)} images; notices: {notices[:6]}")
    assert not errors, errors[:5]
    assert any(f"replica {k} " in e and "is stuck" in e and "pixelrnn_sampler_healthy 0" in e for e in cluster.events)
    # The streams behind the stuck send were ended with the clear error and resumed; the stuck one
    # was cut by the kill after its first response and resumed from its rows.
    assert any("unhealthy: a response send of this sampler has not returned" in line for _, line in notices), notices
    assert any(seed == STUCK_SEED and (m := re.search(r"resuming from row (\d+)", line)) and int(m.group(1)) > 0
               for seed, line in notices), notices
    want = in_process_images(deployed, images)
    assert STUCK_SEED in images
    for seed, rows in images.items():
        assert [(r.stage, r.index) for r in rows] == [(0, i) for i in range(HEIGHT)], f"seed {seed}: rows lost or repeated"
        np.testing.assert_array_equal(assemble(rows), want[seed], err_msg=f"seed {seed}")
    # Restarted, healthy, and the module's cluster whole again for the other tests.
    _, back = wait_for(lambda: cluster.restarts[k], lambda n: n == restarts[k] + 1, 60 + BUSY_SLACK_S, interval=0.2)
    assert back and cluster.replicas[k].running(), cluster.events[-5:]
    healthy, ok = wait_for(lambda: sampler_metrics(cluster.replicas[k], p.sample_model(MODEL)).get("healthy"), lambda v: v == 1,
                           periods["METRICS_PERIOD_S"] + BUSY_SLACK_S)
    assert ok, f"the restarted replica says healthy {healthy}"


# ------------------------------------------------------------------------------ the command

@pytest.mark.triton
@pytest.mark.slow
def test_make_serve_replicas_serves_through_the_proxy_and_ctrl_c_stops_everything(deployed):
    root, _ = deployed
    port = free_port()
    skip_setup = [] if setup_is_current() else ["-o", "setup"]  # as in test_make_serve.py
    argv = ["make", "--no-print-directory", *skip_setup, "serve", "REPLICAS=2", f"REPOSITORY={root / 'repository'}",
            f"GRPC_PORT={port}"]
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 120
        while not any("nginx      config" in line for line in lines):  # the last line of the description
            line = process.stdout.readline()
            assert line and time.monotonic() < deadline, "make serve REPLICAS=2 did not come up:\n" + "".join(lines)
            lines.append(line)
        text = "".join(lines)
        assert f"gRPC (the proxy; clients use this)  127.0.0.1:{port}" in text
        metrics = re.findall(r"metrics (http://\S+/metrics)", text)
        grpc_ports = [int(g) for g in re.findall(r"replica \d+  gRPC 127\.0\.0\.1:(\d+)", text)]
        assert len(metrics) == 2 and len(grpc_ports) == 2
        with PixelClient(f"127.0.0.1:{port}", model=MODEL) as client:
            client.score(np.zeros((2, 1, HEIGHT, 4), np.uint8))
        for url in metrics:  # each replica's metrics are reachable
            with urllib.request.urlopen(url, timeout=10) as r:
                assert f'model="{p.score_model(MODEL)}"' in r.read().decode()
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the terminal: make and the cluster get it
        rest, _ = process.communicate(timeout=60)
    except BaseException:
        stop_group(process)
        raise
    assert "cluster stopped" in rest, text + rest
    assert "Traceback" not in rest
    for used in [port, *grpc_ports]:  # nginx and both replicas are gone: their ports are free again
        check_port(used, "gRPC")
