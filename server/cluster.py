"""N tritonserver replicas of one repository behind nginx as the L7 gRPC load balancer:

    python -m pixelrnn.server.cluster --replicas 3 --repository model_repository [--port 8001]
    python -m pixelrnn.server.cluster ... --tls-cert server.pem --tls-key server.key --token-file token [--listen 0.0.0.0]

    with Cluster("model_repository", replicas=3) as cluster:   # free ports unless given
        cluster.url                  # "127.0.0.1:PORT": the proxy, all a client needs to know
        cluster.replicas[k]          # server.launcher.TritonServer: grpc_url, metrics_url, ...
    Cluster(..., tls=ProxyTls("server.pem", "server.key", token_file="token"))   # TLS and a bearer token

Each replica is a server.launcher.TritonServer (free ports of its own on loopback, its own log).
nginx (server/proxy.py) runs in the foreground with the config server/deploy/nginx.conf.template
renders (prefix, pid, logs and temp files under the run directory; no system service); with TLS
and a token its port may face the network (--listen), and calls without the token are refused.
A sampling stream is one HTTP/2 stream, which nginx keeps on one replica, so a sequence stays
where its state is; unary calls (scoring) spread over the replicas; a replica that refuses
connections is left out for a while (passive failure detection, see the template). A supervisor thread restarts a replica that dies
on its own ports, so the proxy, which tries it again after fail_timeout, takes it back. A stuck
replica is a dead one: a replica whose sampler reports a response send that does not return
(pixelrnn_sampler_healthy 0 on its metrics page; server/engine/outbox.py, "Stuck sends") is killed
with SIGKILL and restarted the same way, which cuts its streams so their clients resume elsewhere.
SIGINT/SIGTERM stop nginx, then every replica.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pixelrnn.server.launcher import HOST, ServerError, TritonServer, check_port
from pixelrnn.server.proxy import Proxy, ProxyTls, check_fail_timeout, check_listen, find_nginx

SUPERVISE_S = 0.5  # how often the supervisor looks at the replicas
HEALTH_S = 1.0  # how often it reads their metrics for a stuck sampler (an HTTP call per replica)
HEALTH_METRIC = "pixelrnn_sampler_healthy"  # server/triton_models/sample_model.py SamplerMetrics
SHM_REGION = re.compile(r"/dev/shm/triton_python_backend_shm_region_\S+")


def stuck_models(metrics_url: str, timeout: float = 2.0) -> list[str]:
    """The sampler models whose gauge on this metrics page says a response send is stuck
    (HEALTH_METRIC 0); [] when the page does not answer (a replica starting up, or a dead one,
    which the supervisor sees by its process)."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout) as r:
            text = r.read().decode(errors="replace")
    except OSError:
        return []
    found = re.findall(rf'^{HEALTH_METRIC}\{{[^}}]*model="([^"]*)"[^}}]*\}} (\S+)$', text, re.M)
    return sorted(model for model, value in found if float(value) == 0)


def _shm_regions(pid: int) -> set[str]:
    """The Python backend's shared-memory regions a replica maps: a killed replica leaves them."""
    try:
        return set(SHM_REGION.findall(Path(f"/proc/{pid}/maps").read_text()))
    except OSError:
        return set()


class Cluster:
    def __init__(self, repository: str | Path, replicas: int, *, port: int | None = None, run_dir: str | Path | None = None,
                 fail_timeout_s: int = 2, supervise: bool = True, startup_timeout: float = 120.0,
                 nginx: str | Path | None = None, log=None, tls: ProxyTls | None = None, listen: str = HOST):
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise ServerError(f"replicas must be a whole number >= 1, got {replicas!r}")
        check_fail_timeout(fail_timeout_s)  # these now, not after the replicas' start-ups
        self.listen = check_listen(listen, tls)
        if tls is not None:
            tls.check()
        self.tls = tls
        self.repository = Path(repository).resolve()
        self.count, self.port, self.fail_timeout_s = replicas, port, fail_timeout_s
        self.run_dir = Path(run_dir) if run_dir else None
        self.supervise, self.startup_timeout, self.nginx_binary = supervise, startup_timeout, nginx
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.replicas: list[TritonServer] = []
        self.restarts = [0] * replicas  # per replica: restarts by the supervisor
        self.stuck = [0] * replicas  # per replica: kills by the supervisor because a sampler said it was stuck
        self.proxy: Proxy | None = None
        self._regions: list[set[str]] = [set() for _ in range(replicas)]
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._lock = threading.Lock()  # replicas[k] is replaced by the supervisor

    # -- endpoints ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The proxy's address for a client on this machine."""
        return self.proxy.url if self.proxy is not None else f"{HOST}:{self.port}"

    @property
    def metrics_urls(self) -> list[str]:
        return [r.metrics_url for r in self.replicas]

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> "Cluster":
        find_nginx(self.nginx_binary)  # these two before minutes of replica start-ups
        if self.port is not None:
            check_port(self.port, "proxy")
        if self.run_dir is None:
            self.run_dir = Path(tempfile.mkdtemp(prefix="pixelrnn-cluster-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            # In parallel: most of a start is waiting for the models to load.
            with ThreadPoolExecutor(self.count) as pool:
                futures = [pool.submit(self._start_replica, k) for k in range(self.count)]
            self.replicas = [f.result() for f in futures if f.exception() is None]  # stop() stops these
            for f in futures:
                if f.exception() is not None:
                    raise f.exception()
            self.proxy = Proxy([r.ports["grpc"] for r in self.replicas], self.run_dir, port=self.port,
                               fail_timeout_s=self.fail_timeout_s, nginx=self.nginx_binary, tls=self.tls,
                               listen=self.listen).start()
            self.port = self.proxy.port
        except BaseException:
            self.stop()
            raise
        if self.supervise:
            self._supervisor = threading.Thread(target=self._watch, name="cluster-supervisor", daemon=True)
            self._supervisor.start()
        return self

    def _start_replica(self, k: int, ports: dict | None = None) -> TritonServer:
        ports = ports or {}
        server = TritonServer(self.repository, grpc_port=ports.get("grpc"), http_port=ports.get("http"),
                              metrics_port=ports.get("metrics"), log_path=self.run_dir / f"replica-{k}.log",
                              startup_timeout=self.startup_timeout)
        try:
            server.start()
        except ServerError as e:
            raise ServerError(f"replica {k}: {e}") from None
        self._regions[k] = _shm_regions(server.process.pid)
        return server

    def _watch(self) -> None:
        """Restart a replica that died, on its own ports (the proxy's upstream list is fixed); kill
        and restart one whose sampler says it is stuck."""
        retry_at, check_at = [0.0] * self.count, 0.0
        while not self._stopping.wait(SUPERVISE_S):
            check = time.monotonic() >= check_at
            if check:
                check_at = time.monotonic() + HEALTH_S
            for k in range(self.count):
                server = self.replicas[k]
                if time.monotonic() < retry_at[k] or self._stopping.is_set():
                    continue
                if server.running():
                    stuck = stuck_models(server.metrics_url) if check else []
                    if not stuck or self._stopping.is_set():
                        continue
                    self.log(f"replica {k} ({server.grpc_url}) is stuck: {', '.join(stuck)} has a response send that does "
                             f"not return ({HEALTH_METRIC} 0): killing it (SIGKILL)")
                    self.stuck[k] += 1
                    self._kill(k)
                self.log(f"replica {k} ({server.grpc_url}) exited with code {server.process.returncode}: restarting it")
                self._clean_up(k)
                try:
                    replacement = self._start_replica(k, dict(server.ports))
                except ServerError as e:
                    self.log(f"restart failed, trying again in 5 s: {e}")
                    retry_at[k] = time.monotonic() + 5
                    continue
                with self._lock:
                    if self._stopping.is_set():
                        replacement.stop()
                        return
                    self.replicas[k] = replacement
                    self.restarts[k] += 1
                self.log(f"replica {k} is back on {replacement.grpc_url}")

    def _kill(self, k: int) -> None:
        """SIGKILL replica k's process group (the server and its backend stubs) and reap it."""
        process = self.replicas[k].process
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            self.log(f"replica {k} did not exit within 30 s of SIGKILL")

    def _clean_up(self, k: int) -> None:
        """What a killed replica leaves: its backend stubs (its process group) and shared memory."""
        try:
            os.killpg(self.replicas[k].process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for region in self._regions[k]:
            Path(region).unlink(missing_ok=True)

    def stop(self) -> None:
        """nginx first (no new calls reach a replica that is going), then every replica, in parallel."""
        self._stopping.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(timeout=self.startup_timeout + 30)  # a restart in progress finishes first
        if self.proxy is not None:
            self.proxy.stop()
        with self._lock:
            replicas = list(self.replicas)
        if replicas:
            with ThreadPoolExecutor(len(replicas)) as pool:
                list(pool.map(lambda r: r.stop(), replicas))

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def describe(cluster: Cluster) -> str:
    secured = "" if cluster.tls is None else " over TLS" + (", bearer token required" if cluster.tls.token_file else "")
    lines = [f"{cluster.count} tritonserver replicas behind nginx: models {', '.join(cluster.replicas[0].models)}",
             f"  gRPC (the proxy; clients use this)  {cluster.proxy.listen_url}{secured}"]
    for k, r in enumerate(cluster.replicas):
        lines.append(f"  replica {k}  gRPC {r.grpc_url}  HTTP {r.http_url}  metrics {r.metrics_url}  log {r.log_path}")
    lines.append(f"  nginx      config {cluster.run_dir / 'nginx.conf'}  access log {cluster.run_dir / 'access.log'}  "
                 f"error log {cluster.run_dir / 'error.log'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pixelrnn.server.cluster",
                                     description="Serve a model repository on N tritonserver replicas behind nginx (gRPC), on loopback.")
    parser.add_argument("--replicas", type=int, required=True, help="number of tritonserver replicas")
    parser.add_argument("--repository", required=True, help="model repository (export/build_engine.py --repository)")
    parser.add_argument("--port", type=int, default=8001, help="the proxy's gRPC port (replicas get free ports)")
    parser.add_argument("--listen", default=HOST,
                        help=f"the proxy's address (default {HOST}); beyond loopback only with TLS and a token")
    parser.add_argument("--tls-cert", help="PEM certificate chain: the proxy speaks gRPC over TLS (scripts/dev_certs.sh)")
    parser.add_argument("--tls-key", help="the certificate's PEM private key")
    parser.add_argument("--token-file", help="a file holding the bearer token every call must carry (needs TLS)")
    parser.add_argument("--run-dir", help="nginx config, logs and replica logs (default: a new temporary directory)")
    parser.add_argument("--fail-timeout-s", type=int, default=2,
                        help="how long the proxy leaves out a replica that refused a connection")
    parser.add_argument("--no-restart", action="store_true", help="do not restart a replica that dies")
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    args = parser.parse_args(argv)

    try:
        cluster = Cluster(args.repository, args.replicas, port=args.port, run_dir=args.run_dir,
                          fail_timeout_s=args.fail_timeout_s, supervise=not args.no_restart,
                          startup_timeout=args.startup_timeout, tls=tls_arguments(args), listen=args.listen)
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    stopping = threading.Event()
    previous = {signum: signal.signal(signum, lambda signum, frame: stopping.set()) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _serve(cluster, stopping, args.no_restart)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def tls_arguments(args) -> ProxyTls | None:
    """ProxyTls from --tls-cert, --tls-key and --token-file; ServerError when they do not go together."""
    if not (args.tls_cert or args.tls_key):
        if args.token_file:
            raise ServerError("--token-file needs --tls-cert and --tls-key: a token sent in plain text could be read on the way")
        return None
    if not (args.tls_cert and args.tls_key):
        raise ServerError("TLS needs both --tls-cert and --tls-key")
    return ProxyTls(args.tls_cert, args.tls_key, args.token_file)


def _serve(cluster: Cluster, stopping: threading.Event, no_restart: bool) -> int:
    """Start, then watch until a signal (or nginx, or with no_restart a replica, exits); stop."""
    try:
        cluster.start()  # a signal meanwhile stops the cluster once it is up
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(describe(cluster), flush=True)
    code = 0
    while not stopping.wait(SUPERVISE_S):
        if not cluster.proxy.running():
            print(f"error: nginx exited unexpectedly with code {cluster.proxy.process.returncode}: {cluster.proxy.errors()}",
                  file=sys.stderr)
            code = 1
            break
        if no_restart and not all(r.running() for r in cluster.replicas):
            down = [k for k, r in enumerate(cluster.replicas) if not r.running()]
            print(f"error: replica(s) {down} exited (--no-restart)", file=sys.stderr)
            code = 1
            break
    cluster.stop()
    print("cluster stopped", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
