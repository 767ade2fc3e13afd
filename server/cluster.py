"""N tritonserver replicas of one repository behind nginx as the L7 gRPC load balancer, on loopback:

    python -m pixelrnn.server.cluster --replicas 3 --repository model_repository [--port 8001]

    with Cluster("model_repository", replicas=3) as cluster:   # free ports unless given
        cluster.url                  # "127.0.0.1:PORT": the proxy, all a client needs to know
        cluster.replicas[k]          # server.launcher.TritonServer: grpc_url, metrics_url, ...

Each replica is a server.launcher.TritonServer (free ports of its own, its own log). nginx runs
in the foreground with the config server/deploy/nginx.conf.template renders (prefix, pid, logs
and temp files under the run directory; no system service). A sampling stream is one HTTP/2
stream, which nginx keeps on one replica, so a sequence stays where its state is; unary calls
(scoring) spread over the replicas; a replica that refuses connections is left out for a while
(passive failure detection, see the template). A supervisor thread restarts a replica that dies
on its own ports, so the proxy, which tries it again after fail_timeout, takes it back. A stuck
replica is a dead one: a replica whose sampler reports a response send that does not return
(pixelrnn_sampler_healthy 0 on its metrics page; server/engine/outbox.py, "Stuck sends") is killed
with SIGKILL and restarted the same way, which cuts its streams so their clients resume elsewhere.
SIGINT/SIGTERM stop nginx, then every replica. Proxy is nginx alone, over any replicas' gRPC
ports (bench/cluster.py puts one over the first 1, 2, 3 replicas of one cluster).
"""
from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pixelrnn.server.launcher import HOST, START_ATTEMPTS, ServerError, TritonServer, check_port, free_port

TEMPLATE = Path(__file__).resolve().parent / "deploy" / "nginx.conf.template"
SUPERVISE_S = 0.5  # how often the supervisor looks at the replicas
HEALTH_S = 1.0  # how often it reads their metrics for a stuck sampler (an HTTP call per replica)
HEALTH_METRIC = "pixelrnn_sampler_healthy"  # server/triton_models/sample_model.py SamplerMetrics
SHM_REGION = re.compile(r"/dev/shm/triton_python_backend_shm_region_\S+")


def find_nginx(path: str | Path | None = None) -> Path:
    """The nginx binary: `path`, else $NGINX, else nginx on PATH or /usr/sbin (Debian's)."""
    found = path or os.environ.get("NGINX") or shutil.which("nginx") or "/usr/sbin/nginx"
    binary = Path(found)
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise ServerError(f"nginx not found at {binary}: run `make setup` (it installs Debian's nginx) or set NGINX")
    return binary


def render_config(run_dir: Path, port: int, grpc_ports: list[int], fail_timeout_s: int,
                  template: Path = TEMPLATE) -> str:
    """The nginx config for replicas on `grpc_ports`, listening on `port`."""
    fail_timeout = f"{fail_timeout_s}s"
    servers = "\n".join(f"        server {HOST}:{p} max_fails=1 fail_timeout={fail_timeout};" for p in grpc_ports)
    fields = {"RUN_DIR": str(run_dir), "HOST": HOST, "PORT": str(port), "SERVERS": servers, "REPLICAS": str(len(grpc_ports)),
              "FAIL_TIMEOUT": fail_timeout, "USER": getpass.getuser()}
    text = template.read_text()
    for key, value in fields.items():
        text = text.replace("{{" + key + "}}", value)
    left = re.findall(r"\{\{\w+\}\}", text)
    if left:
        raise ServerError(f"{template}: no value for {', '.join(sorted(set(left)))}")
    return text


def check_fail_timeout(seconds) -> None:
    if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds < 1:  # nginx's fail_timeout: whole seconds
        raise ServerError(f"fail_timeout_s must be a whole number of seconds >= 1, got {seconds!r}")


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


class Proxy:
    """nginx in the foreground, balancing gRPC over the replicas on `grpc_ports` (any tritonserver
    gRPC endpoints on loopback), its config, pid, logs and temp files under `run_dir`."""

    def __init__(self, grpc_ports: list[int], run_dir: str | Path, *, port: int | None = None, fail_timeout_s: int = 2,
                 nginx: str | Path | None = None):
        if not grpc_ports:
            raise ServerError("a proxy needs at least one replica")
        check_fail_timeout(fail_timeout_s)
        self.grpc_ports, self.run_dir, self.port = list(grpc_ports), Path(run_dir), port
        self.fail_timeout_s, self.binary = fail_timeout_s, nginx
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> "Proxy":
        nginx = find_nginx(self.binary)
        (self.run_dir / "temp").mkdir(parents=True, exist_ok=True)
        picked = self.port is None
        for attempt in range(1, START_ATTEMPTS + 1):
            self.port = free_port() if picked else check_port(self.port, "proxy")
            try:
                return self._launch(nginx)
            except ServerError as e:
                # A free port found here can be taken before nginx binds it: pick another.
                if not picked or "Address already in use" not in str(e) or attempt == START_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def _launch(self, nginx: Path) -> "Proxy":
        conf = self.run_dir / "nginx.conf"
        conf.write_text(render_config(self.run_dir, self.port, self.grpc_ports, self.fail_timeout_s))
        base = [str(nginx), "-p", str(self.run_dir), "-c", str(conf), "-e", str(self.run_dir / "error.log")]
        test = subprocess.run([*base, "-t", "-q"], capture_output=True, text=True, check=False)
        if test.returncode != 0:
            raise ServerError(f"nginx refuses its config {conf}: {' '.join(test.stderr.split())}")
        self.process = subprocess.Popen(base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                        start_new_session=True)  # a Ctrl-C reaches us, and we stop it in order
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"nginx exited with code {self.process.returncode} at start-up: "
                                  f"{self.errors() or 'no error logged'} (log: {self.run_dir / 'error.log'})")
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise ServerError(f"nginx did not accept connections on {self.url} within 30 s")

    def errors(self) -> str:
        """nginx's emergency and alert lines (why it stopped), from its error log."""
        log = self.run_dir / "error.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        return " | ".join(line for line in lines if "[emerg]" in line or "[alert]" in line)[-500:]

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """Fast shutdown (SIGTERM): open streams are cut, and their clients resume elsewhere."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self) -> "Proxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Cluster:
    def __init__(self, repository: str | Path, replicas: int, *, port: int | None = None, run_dir: str | Path | None = None,
                 fail_timeout_s: int = 2, supervise: bool = True, startup_timeout: float = 120.0,
                 nginx: str | Path | None = None, log=None):
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise ServerError(f"replicas must be a whole number >= 1, got {replicas!r}")
        check_fail_timeout(fail_timeout_s)  # now, not after the replicas' start-ups
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
        return f"{HOST}:{self.port}"

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
                               fail_timeout_s=self.fail_timeout_s, nginx=self.nginx_binary).start()
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
    lines = [f"{cluster.count} tritonserver replicas behind nginx: models {', '.join(cluster.replicas[0].models)}",
             f"  gRPC (the proxy; clients use this)  {cluster.url}"]
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
    parser.add_argument("--run-dir", help="nginx config, logs and replica logs (default: a new temporary directory)")
    parser.add_argument("--fail-timeout-s", type=int, default=2,
                        help="how long the proxy leaves out a replica that refused a connection")
    parser.add_argument("--no-restart", action="store_true", help="do not restart a replica that dies")
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    args = parser.parse_args(argv)

    try:
        cluster = Cluster(args.repository, args.replicas, port=args.port, run_dir=args.run_dir,
                          fail_timeout_s=args.fail_timeout_s, supervise=not args.no_restart,
                          startup_timeout=args.startup_timeout)
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
