#!/usr/bin/env bash
# Event pipe round trips, side by side with a direct local HTTP server.
#
#   bench/events.sh            # 10 s per run
#   DURATION=30s bench/events.sh
#
# Starts a relay and a connector (release build) on 127.0.0.1, then runs
# wrk -t2 -c64 against the connector's gateway for the built-in handler
# `time` (GET /server/time: gateway -> event stream over the TLS link ->
# the relay's handler -> reply back), and the same request straight to a
# local nginx returning a JSON body of the same size (python3 http.server
# when nginx is missing). Prints requests/s and p50/p99 latency of both.
# Every process it starts is stopped by PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
THREADS=2
CONNECTIONS=64
command -v wrk >/dev/null || { echo "events.sh: wrk is not installed (apt-get install wrk)" >&2; exit 1; }

# KITEPIPE_BIN: a kitepipe binary to use instead of building one.
if [ -n "${KITEPIPE_BIN:-}" ]; then
  BIN=$KITEPIPE_BIN
else
  cargo build --release -q --bin kitepipe
  BIN=target/release/kitepipe
fi
TMP=$(mktemp -d /tmp/kitepipe-bench-events.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT INT TERM HUP

# Waits until FILE contains PATTERN (up to 20 s).
wait_for() {
  for _ in $(seq 200); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "events.sh: timed out waiting for '$2' in $1:" >&2; cat "$1" >&2; exit 1
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

SECRET="bench-$$-$RANDOM-$RANDOM"
"$BIN" relay --listen 127.0.0.1:0 --http 127.0.0.1:0 --state-dir "$TMP/relay" \
  --domain "http:*.bench.test:$SECRET" --log warn >"$TMP/relay.out" 2>&1 &
PIDS+=($!)
wait_for "$TMP/relay.out" "connectors: kitepipe connect"
LINK=$(awk '/links on/ {print $NF; exit}' "$TMP/relay.out")
FP=$(awk '$1 == "fingerprint" {print $2; exit}' "$TMP/relay.out")

"$BIN" connect "$LINK" --fingerprint "$FP" --secret "$SECRET" --name bench-laptop \
  --kite "http:laptop.bench.test=127.0.0.1:9" --log warn >"$TMP/connector.out" 2>&1 &
PIDS+=($!)
wait_for "$TMP/connector.out" "gateway on"
GATEWAY=$(awk '/gateway on/ {print $NF; exit}' "$TMP/connector.out")
for _ in $(seq 100); do
  curl -sf --noproxy '*' "http://$GATEWAY/server/time" >/dev/null && break
  sleep 0.1
done
SAMPLE=$(curl -sf --noproxy '*' "http://$GATEWAY/server/time")

# The direct comparison: the same body size from a plain local server.
DIRECT_PORT=$(free_port)
BODY=$(printf '%s' "$SAMPLE" | sed 's/./x/g')
if command -v nginx >/dev/null; then
  mkdir -p "$TMP/nginx"
  cat >"$TMP/nginx/nginx.conf" <<EOF
worker_processes 2;
daemon off;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $TMP/nginx;
  proxy_temp_path $TMP/nginx;
  fastcgi_temp_path $TMP/nginx;
  uwsgi_temp_path $TMP/nginx;
  scgi_temp_path $TMP/nginx;
  server {
    listen 127.0.0.1:$DIRECT_PORT;
    location / { default_type application/json; return 200 '$BODY'; }
  }
}
EOF
  nginx -c "$TMP/nginx/nginx.conf" -p "$TMP/nginx" &
  PIDS+=($!)
  DIRECT_NAME="nginx (2 workers)"
else
  mkdir -p "$TMP/www"
  printf '%s' "$BODY" >"$TMP/www/time"
  python3 -m http.server "$DIRECT_PORT" --bind 127.0.0.1 --directory "$TMP/www" >/dev/null 2>&1 &
  PIDS+=($!)
  DIRECT_NAME="python3 http.server"
fi
for _ in $(seq 100); do
  curl -sf --noproxy '*' "http://127.0.0.1:$DIRECT_PORT/time" >/dev/null && break
  sleep 0.1
done

# Runs wrk against URL; prints "REQ_PER_S P50 P99".
run_wrk() {
  wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$1" >"$TMP/wrk.out" 2>&1
  awk '
    /Requests\/sec/ {rps = $2}
    /^ +50%/ {p50 = $2}
    /^ +99%/ {p99 = $2}
    /Non-2xx/ {bad = $NF}
    END {printf "%s %s %s %s\n", rps, p50, p99, (bad == "" ? 0 : bad)}' "$TMP/wrk.out"
}

read -r EV_RPS EV_P50 EV_P99 EV_BAD < <(run_wrk "http://$GATEWAY/server/time")
read -r DI_RPS DI_P50 DI_P99 DI_BAD < <(run_wrk "http://127.0.0.1:$DIRECT_PORT/time")

echo "kitepipe event pipe benchmark ($(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores)"
echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION, body ${#SAMPLE} bytes"
printf '%-44s %12s %10s %10s %8s\n' "path" "requests/s" "p50" "p99" "non-2xx"
printf '%-44s %12s %10s %10s %8s\n' "event: gateway -> link -> relay built-in time" "$EV_RPS" "$EV_P50" "$EV_P99" "$EV_BAD"
printf '%-44s %12s %10s %10s %8s\n' "direct: $DIRECT_NAME" "$DI_RPS" "$DI_P50" "$DI_P99" "$DI_BAD"
