"""Start and stop the real tritonserver (Triton 2.51 from the nvidia-pytriton wheel that `make
setup` installs under .triton/) on loopback, for `python -m pixelrnn.server` and for tests:

    with TritonServer("model_repository") as server:   # free ports unless given
        server.grpc_url                                  # "127.0.0.1:PORT"

Start-up waits until the server and every model of the repository are ready. Whatever goes
wrong comes back as a ServerError that says what: no binary, a port in use, a model that failed
to load (Triton then exits 1; one line names each such model with the first line of its error
from the log: an exception in its initialize, e.g. a damaged ONNX file or a missing
manifest.json, or a config.pbtxt Triton cannot parse; the traceback stays in the log).

The models' Python (the backend stub) is the project venv: its bin/ goes first on PATH (the stub
takes sys.prefix from the first python3 there) and LD_LIBRARY_PATH gets the venv's base
interpreter's LIBDIR, so the stub's libpython matches the venv's standard library.

Nothing of a server outlives its end (server/reaper.py): each server gets a unique shared-memory
prefix, and whenever tritonserver is seen gone (stop(), wait(), running()), the backend stubs it
left are killed and its regions in /dev/shm removed. It leaves them when its stop gives up
("Exit timeout expired": a sequence a client left open counts as a request in flight until its
idle timeout, and a model a client's open gRPC stream holds never unloads) or when it is killed.
A watchdog process (server/reaper.py run as a script) does the same when the launcher process
itself ends without stopping its server, SIGKILL included. stop() is bounded: Triton 2.51 never
exits while a client holds a gRPC stream open, so it is killed once its models are unloaded or
it gave up on them.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from pixelrnn.server import reaper

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TRITON_HOME = PROJECT_ROOT / ".triton" / "pytriton" / "tritonserver"
HOST = "127.0.0.1"


# Triton's words when it cannot bind a port: gRPC and HTTP make it exit, metrics it goes on without.
BIND_FAILED = re.compile(r"failed to start (GRPC|HTTP|Metrics) service: .*already in use", re.I)
# Start-ups tried when a free port picked here was taken by another process before tritonserver
# bound it (free_port releases the port it found: a race on a busy machine, not an error).
START_ATTEMPTS = 3
# tritonserver --exit-timeout-secs: how long its stop waits for requests in flight and for its models
# to unload. Past it, it gives up ("failed to stop server: ... Exit timeout expired") and exits.
EXIT_TIMEOUT_S = 10
# Once its models are unloaded (or it gave up on them), tritonserver stops its endpoints and exits
# within about a second, unless a client holds a gRPC stream open: Triton 2.51's gRPC shutdown then
# waits for that client for ever (a stream that carried requests also holds up the unload until the
# exit timeout). Past this grace the launcher kills it: nothing is left to finish.
EXIT_GRACE_S = 3.0
SHUTDOWN_GAVE_UP = "failed to stop server"


def shutdown_state(log_since_stop: str, models: list[str]) -> str | None:
    """From tritonserver's log since the stop: "unloaded" (every model unloaded), "gave up" (its exit
    timeout expired), or None (still stopping)."""
    if SHUTDOWN_GAVE_UP in log_since_stop:
        return "gave up"
    if all(f"successfully unloaded '{m}'" in log_since_stop for m in models):
        return "unloaded"
    return None


class ServerError(RuntimeError):
    """tritonserver could not be started (the message says why)."""


def find_tritonserver(path: str | Path | None = None) -> Path:
    """The binary: `path`, else $TRITONSERVER, else the one `make setup` installs."""
    binary = Path(path or os.environ.get("TRITONSERVER") or TRITON_HOME / "bin" / "tritonserver")
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise ServerError(f"tritonserver not found at {binary}: run `make setup` (or set TRITONSERVER)")
    stub = binary.parent.parent / "backends" / "python" / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"the Python backend stub is missing ({stub}): run `make setup`")
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def check_port(port: int, what: str) -> int:
    if not 0 < port < 65536:
        raise ServerError(f"{what} port {port} is not a valid port")
    with socket.socket() as s:
        # As Triton binds: a port a killed server left connections on (TIME_WAIT) is free again
        # at once; one with a listener on it is still in use.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError as e:
            raise ServerError(f"{what} port {port} on {HOST} is already in use ({e.strerror})") from None
    return port


def _is_free(port: int, what: str) -> bool:
    try:
        check_port(port, what)
        return True
    except ServerError:
        return False


def model_names(repository: Path) -> list[str]:
    return sorted(d.name for d in repository.iterdir() if (d / "config.pbtxt").is_file() and not d.name.startswith("."))


def python_env(venv: Path) -> dict[str, str]:
    """Environment for the server: the venv's Python for the backend stub (see the module notes)."""
    python = venv / "bin" / "python"
    if not python.exists():
        raise ServerError(f"no Python environment for the models at {venv}: run `make setup`")
    env = dict(os.environ)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    # One malloc arena: with one per thread (glibc's default, up to 8 per core) the sampler's stub
    # kept over 20% of a flood's memory resident after its trims in most floods, with one arena in
    # none, at the same flood time (bench/results/overload.json: server_floods, arena_default).
    env.setdefault("MALLOC_ARENA_MAX", "1")
    libdir = subprocess.run([str(python), "-c", "import sysconfig as s; print(s.get_config_var('LIBDIR') or '')"],
                            capture_output=True, text=True, check=False).stdout.strip()
    if libdir and list(Path(libdir).glob("libpython3*.so*")):
        env["LD_LIBRARY_PATH"] = libdir + (os.pathsep + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    env.pop("PYTHONHOME", None)
    return env


def load_failures(log: str) -> list[str]:
    """'model: reason' for each model Triton says it failed to load."""
    found = {}
    # A config.pbtxt Triton cannot parse: protobuf says why on the line before the model's.
    detail = None
    for line in log.splitlines():
        parse = re.search(r"Error parsing text-format [\w.]+: (.*)", line)
        if parse:
            detail = parse.group(1).strip()
            continue
        m = re.search(r"Poll failed for model directory '([^']+)': (.*?)\"?\s*$", line)
        if m:
            found.setdefault(m.group(1), m.group(2).strip() + (f" ({detail})" if detail else ""))
            detail = None
    for m in re.finditer(r"failed to load '([^']+)' version \d+: (.*)", log):  # one quoted line, \n escaped
        why = m.group(2).strip().removesuffix('"').replace("\\n", "\n").strip()
        found.setdefault(m.group(1), "\n    ".join(line.rstrip() for line in why.splitlines() if line.strip()))
    for m in re.finditer(r"^\|\s*(\S+)\s*\|\s*\d+\s*\|\s*UNAVAILABLE: (.*?)\s*\|\s*$", log, re.M):  # the status table
        found.setdefault(m.group(1), m.group(2).strip())
    return [f"{name}: {why}" for name, why in found.items()]


class TritonServer:
    def __init__(self, repository: str | Path, *, grpc_port: int | None = None, http_port: int | None = None,
                 metrics_port: int | None = None, binary: str | Path | None = None, venv: str | Path | None = None,
                 log_path: str | Path | None = None, startup_timeout: float = 120.0, extra_args: list[str] = ()):
        self.repository = Path(repository).resolve()
        self.binary = binary
        self.venv = Path(venv) if venv else PROJECT_ROOT / ".venv"
        self.ports = {"grpc": grpc_port, "http": http_port, "metrics": metrics_port}
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen | None = None
        self.models: list[str] = []
        self.shm_prefix: str | None = None  # of the server started last (server/reaper.py)
        self.leftovers: dict[str, list] | None = None  # what its end found left behind: reaper.end_server's answer
        # How the last stop() ended: "exited" (by itself), else why the launcher killed it: "unloaded"
        # (its models were, the exit hung on a client), "gave up" (on unloading), "timeout" (neither).
        self.stopped: str | None = None
        self._watchdog: subprocess.Popen | None = None
        self._ending = threading.Lock()  # the cluster's supervisor and its owner may both see the server gone

    # -- endpoints ---------------------------------------------------------------------------
    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.ports['http']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.ports['metrics']}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> "TritonServer":
        binary = find_tritonserver(self.binary)
        if not self.repository.is_dir():
            raise ServerError(f"model repository {self.repository} does not exist")
        self.models = model_names(self.repository)
        if not self.models:
            raise ServerError(f"model repository {self.repository} holds no model (no */config.pbtxt)")
        if any("shm-region-prefix-name" in a for a in self.extra_args):
            raise ServerError("the Python backend's shm-region-prefix-name is the launcher's to set (server/reaper.py)")
        picked = [what for what, port in self.ports.items() if port is None]  # free ports chosen here
        env = python_env(self.venv)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        for attempt in range(1, START_ATTEMPTS + 1):
            self._choose_ports()
            self.shm_prefix, self.leftovers = reaper.unique_prefix(), None
            args = [
                str(binary), f"--model-repository={self.repository}",
                f"--backend-directory={binary.parent.parent / 'backends'}",
                f"--http-address={HOST}", f"--http-port={self.ports['http']}",
                f"--grpc-address={HOST}", f"--grpc-port={self.ports['grpc']}",
                f"--metrics-address={HOST}", f"--metrics-port={self.ports['metrics']}",
                "--disable-auto-complete-config", "--pinned-memory-pool-byte-size=0", f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
                f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
                *self.extra_args,
            ]
            self._watch()  # before the server exists: the launcher may be killed at any moment
            with open(self.log_path, "wb") as log:
                # Own session: a Ctrl-C in the terminal reaches us, and we stop the server in order.
                self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                env=env, cwd=str(self.repository), start_new_session=True)
            try:
                self._wait_ready()
                return self
            except ServerError:
                self.stop()
                busy = BIND_FAILED.search(self.log())
                if busy is None:
                    raise
                what = busy.group(1).lower()
                if what not in picked or attempt == START_ATTEMPTS:
                    tries = f" (ports picked {attempt} times)" if what in picked else ""
                    raise ServerError(f"{what} port {self.ports[what]} on {HOST} is already in use: taken while tritonserver "
                                      f"started{tries} (full log: {self.log_path})") from None
                for what in picked:  # another process took one between free_port() and tritonserver's bind
                    self.ports[what] = None
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _choose_ports(self) -> None:
        """Free ports for those not given; every port checked (a busy given one is a ServerError)."""
        taken = set()
        for what, port in self.ports.items():
            if port is None:
                for _ in range(20):  # one found free can be taken before it is checked
                    port = free_port()
                    if port not in taken and _is_free(port, what):
                        break
            elif port in taken:
                raise ServerError(f"{what} port {port} is given twice")
            self.ports[what] = check_port(port, what)
            taken.add(port)

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0

    def _metrics(self) -> str:
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=2) as r:
                return r.read().decode(errors="replace")
        except OSError:
            return ""

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServerError(self._failure(f"tritonserver exited with code {code} during start-up"))
            if self._get("/v2/health/ready") == 200 and all(self._get(f"/v2/models/{m}/ready") == 200 for m in self.models):
                # Triton does not exit when it cannot bind the metrics port: the endpoint must be its own.
                if BIND_FAILED.search(self.log()):
                    raise ServerError(self._failure("tritonserver could not bind a port"))
                if "--allow-metrics=false" in self.extra_args or f'model="{self.models[0]}"' in self._metrics():
                    return
            time.sleep(0.1)
        raise ServerError(self._failure(f"tritonserver was not ready after {self.startup_timeout:g} s"))

    def _failure(self, headline: str) -> str:
        log = self.log()
        failures = [failure.splitlines()[0] for failure in load_failures(log)]  # the Python traceback stays in the log
        if failures:
            return f"{headline}; failed to load: {'; '.join(failures)} (full log: {self.log_path})"
        detail = "last lines of its log:\n  " + "\n  ".join(log.strip().splitlines()[-15:])
        return f"{headline}; {detail}\n(full log: {self.log_path})"

    def running(self) -> bool:
        if self.process is None:
            return False
        if self.process.poll() is None:
            return True
        self._end()
        return False

    def signal(self, signum: int) -> None:
        if self.running():
            self.process.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait for the exit: tritonserver lets the requests in flight finish and
        unloads the models. SIGKILL EXIT_GRACE_S after it has unloaded them or given up on them
        without exiting (a client's open gRPC stream), or after `timeout`; `stopped` says which.
        Then whatever of the server is left is ended (module notes)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            start = self.log_path.stat().st_size if self.log_path.exists() else 0
            self.process.send_signal(signal.SIGTERM)  # a second one is ignored: its stop goes on
            self.stopped = self._await_exit(start, timeout)
            if self.stopped != "exited":
                os.killpg(self.process.pid, signal.SIGKILL)  # the server and its backend stubs
                self.process.wait()
                reaper.note(str(self.log_path), f"[pixelrnn] killed tritonserver (SIGKILL): {self.why_killed()}")
        self._end()
        return self.process.returncode

    def _await_exit(self, log_start: int, timeout: float) -> str:
        deadline, state, since = time.monotonic() + timeout, None, 0.0
        while True:
            try:
                self.process.wait(0.1)
                return "exited"
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if state is None:
                with open(self.log_path, "rb") as log:
                    log.seek(log_start)
                    state, since = shutdown_state(log.read().decode(errors="replace"), self.models), now
            elif now - since > EXIT_GRACE_S:
                return state
            if now > deadline:
                return "timeout"

    def why_killed(self) -> str:
        return {"unloaded": f"it unloaded its models but had not exited {EXIT_GRACE_S:g} s later (a client holds a gRPC "
                            "stream open: Triton 2.51 waits for it)",
                "gave up": f"its exit timeout expired before its models unloaded (one still finishing, or held by a "
                           f"client's open gRPC stream) and it had not exited {EXIT_GRACE_S:g} s later",
                "timeout": "it was still stopping at the launcher's stop timeout"}.get(self.stopped, "")

    def wait(self) -> int:
        code = self.process.wait()
        self._end()
        return code

    # -- what a server leaves (server/reaper.py) ----------------------------------------------
    def _watch(self) -> None:
        """Have the watchdog end this server should the launcher process end first."""
        if self._watchdog is None:
            script = Path(reaper.__file__)
            # Its own session: a Ctrl-C or a kill of the launcher's process group must not reach it.
            self._watchdog = subprocess.Popen([sys.executable, "-I", "-S", str(script)], stdin=subprocess.PIPE,
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self._tell(watch=self.shm_prefix, log=str(self.log_path))

    def _tell(self, **message) -> None:
        try:
            self._watchdog.stdin.write(json.dumps(message).encode() + b"\n")
            self._watchdog.stdin.flush()
        except OSError:  # the watchdog is gone (killed): stop() still cleans up
            pass

    def _end(self) -> None:
        """Once tritonserver has exited: kill the backend stubs it left, remove their regions."""
        with self._ending:
            if self.shm_prefix is None or self.leftovers is not None:
                return
            self.leftovers = reaper.end_server(self.shm_prefix)
            if self.leftovers["killed"] or self.leftovers["removed"]:
                reaper.note(str(self.log_path), f"[pixelrnn] tritonserver exited (code {self.process.returncode}) "
                                                f"leaving some of it behind: {reaper.describe(self.leftovers)}")
            if self._watchdog is not None:
                self._tell(done=self.shm_prefix)
                try:
                    self._watchdog.stdin.close()
                    self._watchdog.wait(10)
                except OSError:  # it is gone already
                    pass
                except subprocess.TimeoutExpired:
                    self._watchdog.kill()
                    self._watchdog.wait()
                self._watchdog = None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def describe(server: TritonServer) -> str:
    return (f"tritonserver ready: models {', '.join(server.models)}\n"
            f"  gRPC     {server.grpc_url}\n  HTTP     {server.http_url}\n  metrics  {server.metrics_url}\n"
            f"  log      {server.log_path}")


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pixelrnn.server", description="Serve a Triton model repository on loopback.")
    parser.add_argument("--repository", required=True, help="model repository (export/build_engine.py --repository)")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--log", help="tritonserver's log file (default: a temporary file)")
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    args = parser.parse_args(argv)

    server = TritonServer(args.repository, grpc_port=args.grpc_port, http_port=args.http_port, metrics_port=args.metrics_port,
                          log_path=args.log, startup_timeout=args.startup_timeout)
    stopping, ready = [], []

    def note(signum, frame):  # noqa: ARG001
        stopping.append(signum)
        if not ready:  # still starting: end the start-up (start() reports the exit)
            server.signal(signal.SIGTERM)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, note)
    try:
        server.start()
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    ready.append(True)
    print(describe(server), flush=True)
    while not stopping and server.running():
        time.sleep(0.1)
    if stopping:
        code = server.stop()  # Triton's clean shutdown (unload the models, then exit), bounded
        if server.stopped == "exited":
            print(f"tritonserver stopped (exit code {code})", flush=True)
            return 0 if code == 0 else code
        print(f"tritonserver stopped: {server.why_killed()}; killed", flush=True)
        return 0 if server.stopped == "unloaded" else 1
    code = server.process.returncode
    print(f"error: tritonserver exited unexpectedly with code {code}; last lines of its log:\n  "
          + "\n  ".join(server.log().strip().splitlines()[-15:]), file=sys.stderr)
    return code or 1
