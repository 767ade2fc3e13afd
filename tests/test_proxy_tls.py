"""The proxy in front of Triton with TLS and a bearer token (server/proxy.py, client/connection.py),
with certificates from scripts/dev_certs.sh made into a temporary directory, against real nginx.

Without a server: the script's chain verifies, nginx accepts the TLS config and the token stays out
of it, bad arguments and credentials are refused in one line, and a proxy whose upstream is dead
answers a gRPC status, UNAVAILABLE with its message, to unary calls and streams (not the HTML 502
page gRPC clients cannot parse); a call without the token or with another gets UNAUTHENTICATED,
which the command line reports in one line without printing the token. With a tritonserver (one
replica of a tiny model behind the TLS proxy): the client with the token samples the in-process
sampler's images and scores the model's NLL, the command line too; a plain client, or one that
does not trust the CA, is told what is wrong; a killed replica is UNAVAILABLE through the proxy."""
import queue
import re
import shutil
import socket
import stat
import subprocess

import numpy as np
import pytest
import torch

from pixelrnn.server.cluster import Cluster, describe, main as cluster_main
from pixelrnn.server.launcher import ServerError, free_port
from pixelrnn.server.proxy import TOKEN, Proxy, ProxyTls, find_nginx, render_config
from tests.deployment import REPO, Tiny, export_models, kill_hard, missing, require, wait_for

require("tritonclient.grpc")

from tritonclient.utils import InferenceServerException  # noqa: E402

from pixelrnn.client.cli import main as cli_main  # noqa: E402
from pixelrnn.client.connection import TOKEN_ENV, Credentials  # noqa: E402
from pixelrnn.client.library import ClientError, PixelClient, ServerGone, Unauthenticated  # noqa: E402
from pixelrnn.client.stream import SampleStream, sample_inputs  # noqa: E402
from pixelrnn.export.cells import build_cell, sample_cached  # noqa: E402
from pixelrnn.runtime import protocol as p  # noqa: E402

MODEL = "tls"
CONFIG = dict(in_channels=1, height=6, width=4, levels=2, hidden=6, layers=1, kernel=3)
UNAVAILABLE_MESSAGE = "no Triton replica answered the proxy"  # server/deploy/nginx.conf.template


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """scripts/dev_certs.sh's CA, server chain, key and token, in a fresh directory."""
    try:
        find_nginx()
    except ServerError as e:
        missing(str(e))
    if shutil.which("openssl") is None:
        missing("openssl not found (Debian's openssl package)")
    folder = tmp_path_factory.mktemp("certs")
    made = subprocess.run(["bash", str(REPO / "scripts" / "dev_certs.sh"), str(folder), "proxy.example", "10.1.2.3"],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    return folder


def tls(certs) -> ProxyTls:
    return ProxyTls(certs / "server.pem", certs / "server.key", certs / "token")


def creds(certs, token: str | None = "right") -> Credentials:
    """TLS trusting the development CA, with the right token, none, or `token` itself."""
    return Credentials(tls=True, root_cert=str(certs / "ca.pem"),
                       token=(certs / "token").read_text() if token == "right" else token)


def unary_and_stream(url: str, credentials: Credentials) -> list[InferenceServerException | None]:
    """The errors of a unary call (readiness) and of a streamed request through `url` (None: it
    went through)."""
    client = credentials.connect(url)
    errors = []
    try:
        try:
            client.is_server_ready(client_timeout=20)
            errors.append(None)
        except InferenceServerException as e:
            errors.append(e)
        got = queue.Queue()
        client.start_stream(callback=lambda result, error: got.put(error))
        try:
            client.async_stream_infer(p.sample_model(MODEL), sample_inputs(batch=1, seed=0))
        except InferenceServerException:
            pass  # the stream may have failed before the request went out: the callback says why
        errors.append(got.get(timeout=20))
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    return errors


# ------------------------------------------------------------------------------ without a server

def test_the_script_makes_a_ca_and_a_server_chain_that_verify(certs):
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(certs / "ca.pem"), str(certs / "server.pem")],
                            capture_output=True, text=True, timeout=30)
    assert verify.returncode == 0, verify.stderr
    text = subprocess.run(["openssl", "x509", "-in", str(certs / "server.pem"), "-noout", "-ext", "subjectAltName"],
                          capture_output=True, text=True, timeout=30).stdout
    for name in ("DNS:localhost", "IP Address:127.0.0.1", "DNS:proxy.example", "IP Address:10.1.2.3"):
        assert name in text, text
    for secret in ("server.key", "ca.key", "token"):
        assert stat.S_IMODE((certs / secret).stat().st_mode) == 0o600, secret
    assert TOKEN.fullmatch((certs / "token").read_text()) and len((certs / "token").read_text()) >= 40
    usage = subprocess.run(["bash", str(REPO / "scripts" / "dev_certs.sh")], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and usage.stderr.startswith("usage:")


def test_nginx_accepts_the_tls_config_and_the_token_stays_out_of_it(certs, tmp_path):
    proxy = Proxy([free_port()], tmp_path, tls=tls(certs))
    text = render_config(tmp_path, 18443, [7001], 2, tls=tls(certs))
    assert "listen 127.0.0.1:18443 ssl http2;" in text and f"ssl_certificate {certs / 'server.pem'};" in text
    assert "error_page 502 503 504 = /grpc_unavailable;" in text and "add_header grpc-status 14;" in text
    with proxy:
        token = (certs / "token").read_text()
        assert token not in (tmp_path / "nginx.conf").read_text()
        assert token in (tmp_path / "auth.conf").read_text()
        assert stat.S_IMODE((tmp_path / "auth.conf").stat().st_mode) == 0o600
    assert not (tmp_path / "auth.conf").exists()  # gone with the proxy
    assert "ssl" not in render_config(tmp_path, 18001, [7001], 2).split("listen", 1)[1].split(";")[0]  # plain: h2c


@pytest.mark.parametrize("argv, message", [
    (["--token-file", "token"], "--token-file needs --tls-cert and --tls-key"),
    (["--tls-cert", "server.pem"], "TLS needs both --tls-cert and --tls-key"),
    (["--listen", "0.0.0.0"], "listening on 0.0.0.0 (beyond loopback) needs TLS and a token"),
    (["--listen", "0.0.0.0", "--tls-cert", "server.pem", "--tls-key", "server.key"], "needs TLS and a token"),
    (["--listen", "example.org"], "the proxy's listen address must be an IP address"),
    (["--tls-cert", "nowhere.pem", "--tls-key", "server.key"], "TLS certificate nowhere.pem is not a readable file"),
    (["--tls-cert", "server.pem", "--tls-key", "server.key", "--token-file", "bad_token"], "must be one line of the characters"),
])
def test_the_cluster_command_refuses_bad_tls_arguments_in_one_line(certs, tmp_path, capsys, monkeypatch, argv, message):
    (certs / "bad_token").write_text("secret with spaces\n")
    monkeypatch.chdir(certs)
    assert cluster_main(["--replicas", "1", "--repository", str(tmp_path), "--port", str(free_port()), *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert "secret" not in err[0]


def test_the_client_refuses_bad_credentials_in_one_line_without_showing_the_token(certs, tmp_path):
    with pytest.raises(ClientError, match=r"a token is sent over TLS only"):
        Credentials(token="abc")
    with pytest.raises(ClientError, match=r"the token must be one line") as e:
        Credentials(tls=True, token="two words")
    assert "two words" not in str(e.value)
    with pytest.raises(ClientError, match=rf"cannot read the root certificate {tmp_path}/none.pem: No such file"):
        Credentials(root_cert=str(tmp_path / "none.pem"))
    with pytest.raises(ClientError, match=r"server.key is not a PEM certificate"):
        Credentials(root_cert=str(certs / "server.key"))
    made = Credentials(root_cert=str(certs / "ca.pem"), token="s3cret")
    assert made.tls and "s3cret" not in repr(made)


def test_a_dead_upstream_is_unavailable_with_a_message_for_calls_and_streams(certs, tmp_path):
    """Every replica down (nothing listens on the upstream port): the proxy, plain and with TLS,
    answers UNAVAILABLE with its own message, not nginx's HTML 502 (which gRPC would report as
    'Received http2 header with status: 502', and perf_analyzer as a content-type error)."""
    dead = free_port()
    for name, secure, listen in (("plain", None, "127.0.0.1"), ("tls", tls(certs), "127.0.0.1"), ("all", tls(certs), "0.0.0.0")):
        with Proxy([dead], tmp_path / name, tls=secure, fail_timeout_s=1, listen=listen) as proxy:
            assert f"listen {listen}:{proxy.port} " in (tmp_path / name / "nginx.conf").read_text()
            credentials = creds(certs) if secure else Credentials()
            for error in unary_and_stream(proxy.url, credentials):
                assert error is not None and "UNAVAILABLE" in str(error.status()) and UNAVAILABLE_MESSAGE in error.message(), (name, error)
            with pytest.raises(ServerGone, match=rf"cannot reach the Triton server at {re.escape(proxy.url)} .*"
                                                 f"{UNAVAILABLE_MESSAGE}"):
                PixelClient(proxy.url, model=MODEL, timeout=20, credentials=credentials)
        log = (tmp_path / name / "access.log").read_text()
        assert " 204 " in log and " 502 " not in log, log  # nginx answered the gRPC status, not its error page


def test_a_tls_client_on_a_plain_port_is_told_so(certs, tmp_path):
    with Proxy([free_port()], tmp_path) as proxy:
        with pytest.raises(ServerGone, match=r"the server did not answer in TLS: is it a plain gRPC port") as e:
            PixelClient(proxy.url, model=MODEL, timeout=20, credentials=creds(certs, None))
    assert "\n" not in str(e.value)


def test_a_missing_or_wrong_token_is_unauthenticated_in_one_line(certs, tmp_path, capsys, monkeypatch):
    """Checked by the proxy before any replica is asked (the upstream here is dead): the right
    token gets as far as the dead upstream, none or another is UNAUTHENTICATED, for a unary call
    and a stream; the command line says so in one line and never prints the token."""
    images = tmp_path / "images.npy"
    np.save(images, np.zeros((1, 1, 6, 4), np.uint8))
    token = (certs / "token").read_text()
    with Proxy([free_port()], tmp_path / "run", tls=tls(certs)) as proxy:
        for sent in (None, "not-the-token"):
            for error in unary_and_stream(proxy.url, creds(certs, sent)):
                assert error is not None and "UNAUTHENTICATED" in str(error.status()) and "missing or wrong bearer token" in error.message(), error
            with pytest.raises(Unauthenticated, match=r"^UNAUTHENTICATED: the server at \S+ refused the call"):
                PixelClient(proxy.url, model=MODEL, timeout=20, credentials=creds(certs, sent))
        assert all(e is not None and "UNAVAILABLE" in str(e.status()) for e in unary_and_stream(proxy.url, creds(certs)))

        def run(*argv, env_token=None) -> tuple[int, list[str], str]:
            if env_token is None:
                monkeypatch.delenv(TOKEN_ENV, raising=False)
            else:
                monkeypatch.setenv(TOKEN_ENV, env_token)
            code = cli_main(["score", "--url", proxy.url, "--model", MODEL, "--timeout", "20", *argv, str(images)])
            out, err = capsys.readouterr()
            return code, err.strip().splitlines(), out + err

        code, err, everything = run("--root-cert", str(certs / "ca.pem"))
        assert code == 2 and len(err) == 1 and err[0].startswith("error: UNAUTHENTICATED: ") and "sent no token" in err[0], err
        code, err, everything = run("--tls", "--root-cert", str(certs / "ca.pem"), env_token="wrong-token")
        assert code == 2 and len(err) == 1 and "UNAUTHENTICATED" in err[0] and "did not accept" in err[0], err
        assert "wrong-token" not in everything
        code, err, everything = run("--root-cert", str(certs / "ca.pem"), "--token", "wrong-token")
        assert code == 2 and len(err) == 1 and "UNAUTHENTICATED" in err[0] and "wrong-token" not in everything, err
        code, err, everything = run("--root-cert", str(certs / "ca.pem"), env_token=token)  # accepted: on to the dead upstream
        assert code == 2 and len(err) == 1 and UNAVAILABLE_MESSAGE in err[0] and token not in everything, err
        code, err, _ = run("--token", "abc")  # no --tls
        assert code == 2 and err == ["error: a token is sent over TLS only (tls=True, --tls): in plain text it could be read "
                                     "on the way"], err


MAIN_CONF = """daemon off;
worker_processes 1;
pid {run}/nginx.pid;
error_log {run}/error.log notice;
events {{ worker_connections 64; }}
http {{
    access_log {run}/access.log;
    client_body_temp_path {run}/client_body;
    proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;
    include {run}/conf.d/*.conf;
}}
"""


def test_the_kubernetes_sidecar_config_runs_on_nginx_with_its_secret(certs, tmp_path):
    """server/deploy/triton-replicas.yaml's proxy sidecar, as written but for its paths (the Secret,
    auth.conf and conf.d moved into a temporary directory, the port to a free one on loopback, and
    Triton's 127.0.0.1:8001 to a dead port), in the stock image's nginx.conf shape: its start-up
    script writes the token check, refusing a token nginx's syntax could misread; nginx then
    answers UNAUTHENTICATED without the token and UNAVAILABLE with it (no Triton there)."""
    yaml = require("yaml")
    resources = [r for r in yaml.safe_load_all((REPO / "server" / "deploy" / "triton-replicas.yaml").read_text()) if r]
    pod = next(r for r in resources if r["kind"] == "Deployment")["spec"]["template"]["spec"]
    (sidecar,) = [c for c in pod["containers"] if c["name"] == "proxy"]
    config = next(r for r in resources if r["kind"] == "ConfigMap")["data"]["default.conf"]
    script = sidecar["command"][2]
    assert sidecar["command"][:2] == ["sh", "-c"] and script.rstrip().endswith("exec nginx -g 'daemon off;'")
    secret, run = tmp_path / "secret", tmp_path / "run"
    (run / "conf.d").mkdir(parents=True)
    secret.mkdir()
    (secret / "tls.crt").write_bytes((certs / "server.pem").read_bytes())
    (secret / "tls.key").write_bytes((certs / "server.key").read_bytes())
    port, dead = free_port(), free_port()

    def local(text: str) -> str:
        return (text.replace("/etc/pixelrnn/proxy", str(secret)).replace("/etc/nginx/auth.conf", str(run / "auth.conf"))
                .replace("exec nginx -g 'daemon off;'", "").replace("listen 8443 ", f"listen 127.0.0.1:{port} ")
                .replace("127.0.0.1:8001", f"127.0.0.1:{dead}"))

    assert local(config) != config and local(script) != script
    (secret / "token").write_text("two words\n")
    bad = subprocess.run(["sh", "-c", local(script)], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "error: the token in Secret pixelrnn-proxy must be one line" in bad.stderr
    assert "two words" not in bad.stderr
    (secret / "token").write_text((certs / "token").read_text() + "\n")  # as `kubectl create secret --from-file` may hold it
    made = subprocess.run(["sh", "-c", local(script)], capture_output=True, text=True, timeout=30)
    assert made.returncode == 0, made.stderr
    (run / "conf.d" / "default.conf").write_text(local(config))
    (run / "nginx.conf").write_text(MAIN_CONF.format(run=run))
    nginx = subprocess.Popen([str(find_nginx()), "-p", str(run), "-c", str(run / "nginx.conf"), "-e", str(run / "error.log")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, ok = wait_for(lambda: port_open(port), bool, 30)
        assert ok, f"the sidecar's nginx did not start: {(run / 'error.log').read_text()}"
        url = f"127.0.0.1:{port}"
        for error in unary_and_stream(url, creds(certs, None)):
            assert error is not None and "UNAUTHENTICATED" in str(error.status()), error
        for error in unary_and_stream(url, creds(certs)):
            assert error is not None and "UNAVAILABLE" in str(error.status()) and UNAVAILABLE_MESSAGE in error.message(), error
    finally:
        nginx.terminate()
        nginx.wait(15)


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------ with a replica

@pytest.fixture(scope="module")
def deployed(tmp_path_factory, certs):
    """One replica of a tiny binary model behind the TLS proxy that wants the token; no restarts
    (the last test kills the replica)."""
    root = tmp_path_factory.mktemp("tls_cluster")
    exported = export_models(root, [Tiny(MODEL, "gated_pixelcnn", CONFIG, max_batch=4)], root / "repository")
    with Cluster(root / "repository", 1, run_dir=root / "run", supervise=False, tls=tls(certs)) as cluster:
        yield cluster, exported[MODEL].model


@pytest.mark.triton
@pytest.mark.slow
def test_with_the_token_the_client_samples_and_scores_as_in_process(deployed, certs, tmp_path, capsys, monkeypatch):
    cluster, model = deployed
    assert cluster.replicas[0].grpc_url.startswith("127.0.0.1:")  # the plain-text port stays on loopback
    said = describe(cluster)
    assert f"{cluster.url} over TLS, bearer token required" in said and (certs / "token").read_text() not in said
    want = sample_cached(build_cell(model), 3, 5, 1.0, None, None, 0)
    images = np.random.default_rng(0).integers(0, 2, (5, 1, 6, 4)).astype(np.uint8)
    with torch.no_grad():
        want_nll = model.nll(torch.from_numpy(images).long()).numpy()
    with PixelClient(cluster.url, model=MODEL, credentials=creds(certs)) as client:
        np.testing.assert_array_equal(client.sample_images(3, seed=5), want)
        np.testing.assert_allclose(client.score(images).nll_nats, want_nll, rtol=1e-5, atol=1e-4)
    with SampleStream(cluster.url, credentials=creds(certs)) as stream:  # the raw stream of the tests and benches
        rows, error = stream.request(p.sample_model(MODEL), 11, sample_inputs(batch=1, seed=5), start=True, end=True)
        assert error is None and len(rows) == CONFIG["height"]

    monkeypatch.setenv(TOKEN_ENV, (certs / "token").read_text())
    code = cli_main(["sample", "--url", cluster.url, "--model", MODEL, "--tls", "--root-cert", str(certs / "ca.pem"), "--n", "3",
                     "--seed", "5", "--out", str(tmp_path / "grid.png"), "--npy", str(tmp_path / "samples.npy")])
    out, err = capsys.readouterr()
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "samples.npy"), want)
    assert (certs / "token").read_text() not in out + err


@pytest.mark.triton
@pytest.mark.slow
def test_a_client_without_tls_or_without_the_ca_is_told_what_is_wrong(deployed, certs):
    cluster, _ = deployed
    with pytest.raises(ServerGone, match=r"the server did not speak plain gRPC: is it a TLS port") as e:
        PixelClient(cluster.url, model=MODEL, timeout=20)
    assert "\n" not in str(e.value)
    # The system's trusted CAs do not include the development CA.
    with pytest.raises(ServerGone, match=r"the TLS handshake failed: is the server.s certificate signed by a CA this system trusts"):
        PixelClient(cluster.url, model=MODEL, timeout=20, credentials=Credentials(tls=True))


@pytest.mark.triton
@pytest.mark.slow
def test_the_web_gateway_reaches_models_through_the_tls_proxy(deployed, certs):
    """The page's gateway (python -m pixelrnn.web --tls --root-cert ... --token ...) lists and
    scores through the proxy with the token; without it the proxy refuses it."""
    from pixelrnn.web.gateway import Gateway, GatewayError, ScoreRequest

    cluster, model = deployed
    images = np.random.default_rng(1).integers(0, 2, (2, 1, 6, 4)).astype(np.uint8)
    with torch.no_grad():
        want = model.nll(torch.from_numpy(images).long()).numpy()
    gateway = Gateway(cluster.url, timeout=10.0, credentials=creds(certs))
    assert MODEL in gateway.models()
    scored = gateway.score(ScoreRequest(model=MODEL, images=images.tolist()))
    np.testing.assert_allclose(scored["nll"], want, rtol=1e-5, atol=1e-4)
    with pytest.raises(GatewayError) as refused:
        Gateway(cluster.url, timeout=10.0, credentials=creds(certs, token=None)).models()
    assert "UNAUTHENTICATED" in refused.value.message and (certs / "token").read_text() not in refused.value.message


@pytest.mark.triton
@pytest.mark.slow
def test_a_killed_replica_is_unavailable_through_the_proxy(deployed, certs):
    """Runs last in the module: the replica is killed and not restarted (supervise=False)."""
    cluster, _ = deployed
    with PixelClient(cluster.url, model=MODEL, timeout=20, credentials=creds(certs)) as client:
        kill_hard(cluster.replicas[0])
        with pytest.raises(ServerGone, match=UNAVAILABLE_MESSAGE):
            client.score(np.zeros((1, 1, 6, 4), np.uint8))
        with pytest.raises(ServerGone, match=UNAVAILABLE_MESSAGE):
            list(client.sample(1, seed=0))
