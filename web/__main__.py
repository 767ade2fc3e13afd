"""python -m pixelrnn.web --triton localhost:8001 --port 8080: serve the page and its gateway (uvicorn)."""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys


def check_port(host: str, port: int) -> str | None:
    """Why the gateway cannot listen on host:port, or None (uvicorn's own failure is a log line
    amid others; this says it in one)."""
    if not 0 < port < 65536:
        return f"port {port} is not a valid port"
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        return f"cannot listen on {host}:{port} ({e.strerror or e})"
    return None


def quiet_interrupt(signum, frame) -> None:  # noqa: ARG001
    """Ctrl-C before uvicorn takes over its signals (during the imports, a second or two): exit
    as uvicorn does on it, with no KeyboardInterrupt traceback out of whatever was importing.
    At once: nothing is serving yet, and unwinding a half-done import of gRPC can hang at exit."""
    sys.stdout.flush()
    os._exit(130)


def main(argv=None) -> int:
    previous = signal.signal(signal.SIGINT, quiet_interrupt)
    try:
        return serve(argv)
    finally:
        signal.signal(signal.SIGINT, previous)  # as it was for a caller in the same process (the console command, tests)


def serve(argv) -> int:
    from pixelrnn.web.limits import Limits  # here, not above: the less before main(), the less a Ctrl-C can catch unhandled

    defaults = Limits()
    parser = argparse.ArgumentParser(prog="python -m pixelrnn.web", description="The live web page of a Triton-served PixelRNN model.")
    parser.add_argument("--triton", default="localhost:8001", help="the Triton server's gRPC address (host:port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds any one metadata or score call may take")
    parser.add_argument("--tls", action="store_true", help="speak gRPC over TLS to --triton (a proxy: pixelrnn cluster --tls-cert ...)")
    parser.add_argument("--root-cert", help="PEM of the CA that signed the server's certificate (implies --tls)")
    parser.add_argument("--token", help="bearer token for the proxy (default: $PIXELRNN_TOKEN with --tls); never printed")
    parser.add_argument("--check-port", action="store_true", help="only say whether --host:--port is free (exit 1 if not)")
    limits = parser.add_argument_group("limits (one machine's defaults)")
    limits.add_argument("--max-streams-per-client", type=int, default=defaults.streams_per_client,
                        help=f"sample streams one client address may have open (default {defaults.streams_per_client})")
    limits.add_argument("--max-streams", type=int, default=defaults.streams,
                        help=f"sample streams open in all, each up to 16 images; keep streams x 16 below the sampler's "
                             f"live-images budget (default {defaults.streams})")
    limits.add_argument("--max-json-kib", type=int, default=defaults.json_bytes // 1024,
                        help=f"largest JSON request body, KiB (default {defaults.json_bytes // 1024}); uploads: 2 MiB")
    limits.add_argument("--threads", type=int, default=defaults.threads,
                        help=f"blocking calls to Triton at once; the rest wait (default {defaults.threads})")
    args = parser.parse_args(argv)
    try:
        chosen = Limits(streams_per_client=args.max_streams_per_client, streams=args.max_streams,
                        json_bytes=args.max_json_kib * 1024, threads=args.threads)
    except ValueError as e:
        parser.error(str(e))
    from pixelrnn.client.connection import Credentials, token_from
    from pixelrnn.client.types import ClientError

    try:  # read the certificate and check the token now, before the page is served
        tls = args.tls or args.root_cert is not None
        credentials = Credentials(tls=tls, root_cert=args.root_cert, token=token_from(args.token, tls))
    except ClientError as e:
        parser.error(str(e))
    problem = check_port(args.host, args.port)
    if problem or args.check_port:
        if problem:
            print(f"error: {problem}", file=sys.stderr)
        return 1 if problem else 0

    import uvicorn

    from pixelrnn.web.gateway import create_app

    app = create_app(args.triton, timeout=args.timeout, limits=chosen, credentials=credentials)
    shown = "localhost" if args.host in ("127.0.0.1", "0.0.0.0") else args.host
    print(f"web page: http://{shown}:{args.port}/  (Triton gRPC at {args.triton}, {credentials.describe()}; Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
