# Sourced by scripts/demo.sh and scripts/web.sh (which set PY): start `python -m pixelrnn.server` in the
# background, stop it (SIGINT: Triton's clean shutdown) when the script exits, and wait, bounded,
# until every model is ready.
#   start_server REPOSITORY GRPC_PORT HTTP_PORT METRICS_PORT DIR   -> $SERVER; DIR/server.out, DIR/tritonserver.log
start_server() {
  local repository=$1 grpc=$2 http=$3 metrics=$4 dir=$5
  $PY -m pixelrnn.server --repository "$repository" --grpc-port "$grpc" --http-port "$http" --metrics-port "$metrics" \
      --log "$dir/tritonserver.log" > "$dir/server.out" 2>&1 &
  SERVER=$!
  trap 'kill -INT $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
  for _ in $(seq 240); do grep -q "tritonserver ready" "$dir/server.out" && break
    kill -0 $SERVER 2>/dev/null || { cat "$dir/server.out"; exit 1; }; sleep 0.5; done
  grep -q "tritonserver ready" "$dir/server.out" || { cat "$dir/server.out"; echo "error: tritonserver not ready after 120 s" >&2; exit 1; }
  cat "$dir/server.out"
}
