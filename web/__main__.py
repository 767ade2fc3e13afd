"""python -m pixelrnn.web --triton localhost:8001 --port 8080: serve the page and its gateway (uvicorn)."""
from __future__ import annotations

import argparse
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pixelrnn.web", description="The live web page of a Triton-served PixelRNN model.")
    parser.add_argument("--triton", default="localhost:8001", help="the Triton server's gRPC address (host:port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds any one metadata or score call may take")
    args = parser.parse_args(argv)
    problem = check_port(args.host, args.port)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1

    import uvicorn

    from pixelrnn.web.gateway import create_app

    app = create_app(args.triton, timeout=args.timeout)
    shown = "localhost" if args.host in ("127.0.0.1", "0.0.0.0") else args.host
    print(f"web page: http://{shown}:{args.port}/  (Triton gRPC at {args.triton}; Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
