"""How the client reaches a server: plain gRPC (a tritonserver on loopback), or gRPC over TLS
with a bearer token (a proxy such as `pixelrnn cluster --tls-cert ... --token-file ...`):

    credentials = Credentials(tls=True, root_cert="ca.pem", token=os.environ["PIXELRNN_TOKEN"])
    client = credentials.connect("host:8443")   # a tritonclient.grpc.InferenceServerClient

The token travels as `authorization: Bearer TOKEN` metadata on every call and stream, through
gRPC's call credentials, which gRPC sends over TLS only. It is kept out of repr() and out of
every message here, so a log line or a traceback does not show it. It also sorts
the errors of failed calls (unreachable, refused, reset by a proxy) into one-line ClientErrors.
Like the rest of client/, this imports no torch.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

# grpc's documented default; its logging prints INFO lines (a failed TLS handshake, for one) on
# stderr when the variable is unset, besides the error the client reports in one line.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from pixelrnn.client.types import ClientError, ServerGone, Unauthenticated  # noqa: E402

TOKEN_ENV = "PIXELRNN_TOKEN"  # where the command line and the web gateway read a token from
# RFC 6750's b64token: what an `authorization: Bearer` header may carry (server/proxy.py TOKEN).
TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")


@dataclass(frozen=True)
class Credentials:
    """`tls`: gRPC over TLS; `root_cert`: PEM file of the CA that signed the server's certificate
    (None: the system's trusted roots; giving one implies tls); `token`: the bearer token (TLS
    only). Checked when made: ClientError names the fault, never the token."""

    tls: bool = False
    root_cert: str | None = None
    token: str | None = field(default=None, repr=False)
    _roots: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.root_cert is not None:
            object.__setattr__(self, "tls", True)
            object.__setattr__(self, "_roots", read_root_cert(self.root_cert))
        if self.token is not None:
            if not isinstance(self.token, str) or not TOKEN.fullmatch(self.token):
                raise ClientError("the token must be one line of the characters A-Z a-z 0-9 - . _ ~ + / (then '=' padding), "
                                  "as an `authorization: Bearer` header carries it")
            if not self.tls:
                raise ClientError("a token is sent over TLS only (tls=True, --tls): in plain text it could be read on the way")

    def connect(self, url: str, channel_args: list | None = None) -> grpcclient.InferenceServerClient:
        """A tritonclient gRPC client of `url` with these credentials (`channel_args`: gRPC
        channel options, None: tritonclient's)."""
        if not self.tls:
            return grpcclient.InferenceServerClient(url, channel_args=channel_args)
        creds = grpc.ssl_channel_credentials(root_certificates=self._roots)
        if self.token is not None:
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(self.token))
        return grpcclient.InferenceServerClient(url, creds=creds, channel_args=channel_args)

    def describe(self) -> str:
        """How calls go, for messages: 'plain gRPC', 'TLS', 'TLS with a token'."""
        return "plain gRPC" if not self.tls else "TLS with a token" if self.token else "TLS"


PLAIN = Credentials()


def read_root_cert(path: str) -> bytes:
    """The PEM bytes of a root certificate file; ClientError if it cannot be read or holds none."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ClientError(f"cannot read the root certificate {path}: {e.strerror or e}") from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ClientError(f"{path} is not a PEM certificate (no BEGIN CERTIFICATE block)")
    return data


# -- what a failed call says about the connection ---------------------------------------------

def error_message(e: Exception) -> str:
    """What the server or gRPC said, without tritonclient's status prefix."""
    if isinstance(e, InferenceServerException):
        return e.message() or str(e)
    return str(e)


def is_unavailable(e: Exception) -> bool:
    """The server is down, restarting or unreachable, or a proxy lost it mid-stream: worth a retry."""
    return isinstance(e, InferenceServerException) and ("UNAVAILABLE" in str(e.status() or "") or proxy_reset(e))


def is_unauthenticated(e: Exception) -> bool:
    return isinstance(e, InferenceServerException) and "UNAUTHENTICATED" in str(e.status() or "")


def unreachable(url: str, credentials: Credentials, e: Exception) -> ServerGone:
    """The one-line error of a server that cannot be reached, with a hint where TLS is the likely
    cause: gRPC's message names the handshake or the HTTP/1 answer of a TLS port, not what to
    change."""
    message = error_message(e)
    hint = ""
    if credentials.tls and "WRONG_VERSION_NUMBER" in message:  # an answer that is not TLS
        hint = "the server did not answer in TLS: is it a plain gRPC port (no tls, no --tls)? "
    elif credentials.tls and ("handshake" in message.lower() or "SSL" in message):
        trusted = credentials.root_cert or "a CA this system trusts (give its CA: root_cert=..., --root-cert)"
        hint = f"the TLS handshake failed: is the server's certificate signed by {trusted}, and does it name this host? "
    elif not credentials.tls and "http1.x server" in message:
        hint = "the server did not speak plain gRPC: is it a TLS port (tls=True, --tls)? "
    return ServerGone(f"cannot reach the Triton server at {url} ({hint}{message})")


def refused(url: str, credentials: Credentials, e: Exception) -> Unauthenticated:
    """The one-line error of a call the server refused for its token (never shows the token)."""
    sent = "a token, which it did not accept" if credentials.token else "no token (give one: token=..., --token or $PIXELRNN_TOKEN)"
    return Unauthenticated(f"UNAUTHENTICATED: the server at {url} refused the call: {error_message(e)}; this client sent {sent}")


def proxy_reset(e: InferenceServerException) -> bool:
    """A gRPC proxy (nginx, python -m pixelrnn.server.cluster) whose replica died mid-stream resets the
    client's stream: INTERNAL, "Received RST_STREAM with error code 2". The server is gone as
    surely as when the connection drops (UNAVAILABLE), and another replica can take the stream
    up; the model's own errors come on the stream without a status, never as this."""
    return "INTERNAL" in str(e.status() or "") and "RST_STREAM" in error_message(e)


def token_from(value: str | None, tls: bool, environ=os.environ) -> str | None:
    """The token a command sends: `value` (a --token flag) if given, else $PIXELRNN_TOKEN, but
    that one only with TLS, where it is meant for (a plain local server needs none)."""
    if value is not None:
        return value
    return (environ.get(TOKEN_ENV) or None) if tls else None
