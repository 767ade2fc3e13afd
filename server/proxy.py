"""nginx as the gRPC proxy in front of tritonserver replicas (server/cluster.py runs one over its
replicas; bench/cluster.py one over any of their gRPC ports):

    with Proxy([7001, 7002], run_dir) as proxy:                      # plain gRPC on loopback
        proxy.url                                                     # "127.0.0.1:PORT"
    tls = ProxyTls("server.pem", "server.key", token_file="token")  # scripts/dev_certs.sh makes these
    with Proxy([7001], run_dir, tls=tls, listen="0.0.0.0") as proxy:  # TLS, and a bearer token on every call
        ...

The config is server/deploy/nginx.conf.template with its fields filled in; nginx runs in the
foreground with its pid, logs and temp files under the run directory (no system service). With
TLS the proxy's port is the only one that may face the network: the replicas' own plain-text
ports stay on loopback (server/launcher.py), and a proxy listening beyond loopback must have
both TLS and a token. The token never enters nginx.conf or a log line: nginx reads the check from
auth.conf, which only the owner can read. Refusals and a dead upstream come back as gRPC statuses
(UNAUTHENTICATED, UNAVAILABLE), never as nginx's HTML error pages, which gRPC clients cannot parse.
"""
from __future__ import annotations

import getpass
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pixelrnn.server.launcher import HOST, START_ATTEMPTS, ServerError, check_port, free_port

TEMPLATE = Path(__file__).resolve().parent / "deploy" / "nginx.conf.template"
# RFC 6750's b64token: what an `authorization: Bearer` header may carry, and nothing nginx's
# config syntax would read as a quote, a variable or a comment.
TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")
AUTH_FILE = "auth.conf"


def find_nginx(path: str | Path | None = None) -> Path:
    """The nginx binary: `path`, else $NGINX, else nginx on PATH or /usr/sbin (Debian's)."""
    found = path or os.environ.get("NGINX") or shutil.which("nginx") or "/usr/sbin/nginx"
    binary = Path(found)
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise ServerError(f"nginx not found at {binary}: run `make setup` (it installs Debian's nginx) or set NGINX")
    return binary


def check_fail_timeout(seconds) -> None:
    if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds < 1:  # nginx's fail_timeout: whole seconds
        raise ServerError(f"fail_timeout_s must be a whole number of seconds >= 1, got {seconds!r}")


@dataclass(frozen=True)
class ProxyTls:
    """TLS on the proxy's port: `cert` the PEM chain it sends (its certificate first), `key` its
    private key; with `token_file`, every call must carry `authorization: Bearer <the file's
    token>` (gRPC metadata), and one without it or with another is refused UNAUTHENTICATED."""

    cert: str | Path
    key: str | Path
    token_file: str | Path | None = None

    def check(self) -> str | None:
        """The token (None: none required) after checking that every file is readable; ServerError
        naming the file and the fault otherwise. nginx checks the certificate and key themselves
        (that they parse and match) when it tests its config."""
        for what, path in (("TLS certificate", self.cert), ("TLS key", self.key)):
            if not os.access(path, os.R_OK) or not Path(path).is_file():
                raise ServerError(f"{what} {path} is not a readable file")
        if self.token_file is None:
            return None
        try:
            token = Path(self.token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ServerError(f"cannot read the token file {self.token_file}: {getattr(e, 'strerror', None) or e}") from None
        if not TOKEN.fullmatch(token):  # the message never shows the token
            raise ServerError(f"the token in {self.token_file} must be one line of the characters A-Z a-z 0-9 - . _ ~ + / "
                              f"(then '=' padding), {'and not empty' if not token else 'and nothing else'}")
        return token


def check_listen(listen: str, tls: ProxyTls | None) -> str:
    """The address the proxy listens on: an IP address (0.0.0.0 or :: for all); beyond loopback
    only with TLS and a token, so nothing goes over the network in plain text or unchecked."""
    try:
        address = ipaddress.ip_address(listen)
    except ValueError:
        raise ServerError(f"the proxy's listen address must be an IP address (e.g. 127.0.0.1 or 0.0.0.0), got {listen!r}") from None
    if not address.is_loopback and (tls is None or tls.token_file is None):
        raise ServerError(f"listening on {listen} (beyond loopback) needs TLS and a token: give a TLS certificate, key "
                          "and token file (scripts/dev_certs.sh makes them for development)")
    return str(address)


def render_config(run_dir: Path, port: int, grpc_ports: list[int], fail_timeout_s: int, template: Path = TEMPLATE, *,
                  tls: ProxyTls | None = None, listen: str = HOST) -> str:
    """The nginx config for replicas on `grpc_ports`, listening on `listen`:`port`; with a token
    (tls.token_file) it includes RUN_DIR/auth.conf, which write_auth writes."""
    fail_timeout = f"{fail_timeout_s}s"
    servers = "\n".join(f"        server {HOST}:{p} max_fails=1 fail_timeout={fail_timeout};" for p in grpc_ports)
    if tls is None:
        ssl = "        # no TLS: plain gRPC (h2c), on loopback only"
    else:
        ssl = (f"        ssl_certificate {Path(tls.cert).resolve()};\n        ssl_certificate_key {Path(tls.key).resolve()};\n"
               "        ssl_protocols TLSv1.2 TLSv1.3;")
    auth = (f"            include {run_dir / AUTH_FILE};   # the token check (write_auth)" if tls and tls.token_file
            else "            # no token required")
    fields = {"RUN_DIR": str(run_dir), "LISTEN": f"[{listen}]" if ":" in listen else listen, "PORT": str(port),
              "LISTEN_FLAGS": "ssl http2" if tls else "http2", "SSL": ssl, "AUTH": auth, "SERVERS": servers,
              "REPLICAS": str(len(grpc_ports)), "FAIL_TIMEOUT": fail_timeout, "USER": getpass.getuser()}
    text = template.read_text()
    for key, value in fields.items():
        text = text.replace("{{" + key + "}}", value)
    left = re.findall(r"\{\{\w+\}\}", text)
    if left:
        raise ServerError(f"{template}: no value for {', '.join(sorted(set(left)))}")
    return text


def write_auth(run_dir: Path, token: str) -> Path:
    """RUN_DIR/auth.conf, readable by its owner only: the check that refuses a call (401, which
    the config turns into UNAUTHENTICATED) unless it carries `authorization: Bearer <token>`."""
    path = run_dir / AUTH_FILE
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as f:
        f.write(f'if ($http_authorization != "Bearer {token}") {{\n    return 401;\n}}\n')
    return path


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Proxy:
    """nginx in the foreground, balancing gRPC over the replicas on `grpc_ports` (any tritonserver
    gRPC endpoints on loopback), its config, pid, logs and temp files under `run_dir`; `tls`:
    TLS and the token (ProxyTls), `listen`: its address (loopback unless TLS and a token)."""

    def __init__(self, grpc_ports: list[int], run_dir: str | Path, *, port: int | None = None, fail_timeout_s: int = 2,
                 nginx: str | Path | None = None, tls: ProxyTls | None = None, listen: str = HOST):
        if not grpc_ports:
            raise ServerError("a proxy needs at least one replica")
        check_fail_timeout(fail_timeout_s)
        self.listen = check_listen(listen, tls)
        self.token = tls.check() if tls is not None else None  # now, before anything starts
        self.grpc_ports, self.run_dir, self.port, self.tls = list(grpc_ports), Path(run_dir), port, tls
        self.fail_timeout_s, self.binary = fail_timeout_s, nginx
        self.process: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        """The address a client on this machine dials: loopback where nginx listens on all."""
        return HOST if ipaddress.ip_address(self.listen).is_unspecified else self.listen

    @property
    def url(self) -> str:
        return _address(self.host, self.port)

    @property
    def listen_url(self) -> str:
        """Where nginx listens (0.0.0.0:PORT: every address of this machine)."""
        return _address(self.listen, self.port)

    def start(self) -> "Proxy":
        nginx = find_nginx(self.binary)
        (self.run_dir / "temp").mkdir(parents=True, exist_ok=True)
        if self.token is not None:
            write_auth(self.run_dir, self.token)
        picked = self.port is None
        for attempt in range(1, START_ATTEMPTS + 1):
            self.port = free_port() if picked else self._check_port(self.port)
            try:
                return self._launch(nginx)
            except ServerError as e:
                # A free port found here can be taken before nginx binds it: pick another.
                if not picked or "Address already in use" not in str(e) or attempt == START_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def _check_port(self, port: int) -> int:
        if self.listen == HOST:
            return check_port(port, "proxy")
        check_port(port, "proxy")  # the range, and loopback (part of an unspecified address)
        family = socket.AF_INET6 if ":" in self.listen else socket.AF_INET
        with socket.socket(family) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((self.listen, port))
            except OSError as e:
                raise ServerError(f"proxy port {port} on {self.listen} cannot be used ({e.strerror})") from None
        return port

    def _launch(self, nginx: Path) -> "Proxy":
        conf = self.run_dir / "nginx.conf"
        conf.write_text(render_config(self.run_dir, self.port, self.grpc_ports, self.fail_timeout_s, tls=self.tls,
                                      listen=self.listen))
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
                socket.create_connection((self.host, self.port), timeout=1).close()
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
        """Fast shutdown (SIGTERM): open streams are cut, and their clients resume elsewhere. The
        token's copy in the run directory goes with it (the logs stay)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.token is not None:
            (self.run_dir / AUTH_FILE).unlink(missing_ok=True)

    def __enter__(self) -> "Proxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
