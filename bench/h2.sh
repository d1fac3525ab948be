#!/usr/bin/env bash
# HTTP/2 through the relay (h2c prior knowledge), side by side with the
# same requests straight to the backend and through nginx doing the same
# job (an h2c front proxying to the HTTP/1.1 backend).
#
#   bench/h2.sh                # 10 s per run
#   DURATION=30 bench/h2.sh
#
# Starts nginx (the backend: a 1 KiB body over HTTP/1.1 and over h2c; and
# the peer: h2c in front of the HTTP/1.1 backend), a relay and a connector
# (release build) on 127.0.0.1 with two kites: `h1.bench.test` (HTTP/1.1
# backend, the relay translates) and `h2c.bench.test` (`backend = "h2c"`).
# Runs `h2load -c16 -m10` (16 connections, 10 streams each) against each
# path and prints requests/s and mean/max request time. Every process it
# starts is stopped by PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
CLIENTS=16
STREAMS=10
THREADS=2
command -v h2load >/dev/null || { echo "h2.sh: h2load is not installed (apt-get install nghttp2-client)" >&2; exit 1; }
command -v nginx >/dev/null || { echo "h2.sh: nginx is not installed (apt-get install nginx-light)" >&2; exit 1; }

# KITEPIPE_BIN: a kitepipe binary to use instead of building one.
if [ -n "${KITEPIPE_BIN:-}" ]; then
  BIN=$KITEPIPE_BIN
else
  cargo build --release -q --bin kitepipe
  BIN=target/release/kitepipe
fi
TMP=$(mktemp -d /tmp/kitepipe-bench-h2.XXXXXX)
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
  echo "h2.sh: timed out waiting for '$2' in $1:" >&2; cat "$1" >&2; exit 1
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

H1_PORT=$(free_port)
H2C_PORT=$(free_port)
PEER_PORT=$(free_port)
BODY=$(head -c 1024 /dev/zero | tr '\0' x)
mkdir -p "$TMP/nginx"
cat >"$TMP/nginx/nginx.conf" <<EOF
worker_processes 2;
daemon off;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  # One connection serves the whole run (nginx closes it after 1000
  # requests by default, and h2load does not reconnect).
  keepalive_requests 10000000;
  client_body_temp_path $TMP/nginx;
  proxy_temp_path $TMP/nginx;
  fastcgi_temp_path $TMP/nginx;
  uwsgi_temp_path $TMP/nginx;
  scgi_temp_path $TMP/nginx;
  upstream backend { server 127.0.0.1:$H1_PORT; keepalive 64; }
  server {
    listen 127.0.0.1:$H1_PORT;
    location / { default_type text/plain; return 200 '$BODY'; }
  }
  server {
    listen 127.0.0.1:$H2C_PORT http2;
    location / { default_type text/plain; return 200 '$BODY'; }
  }
  server {
    listen 127.0.0.1:$PEER_PORT http2;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
nginx -c "$TMP/nginx/nginx.conf" -p "$TMP/nginx" &
PIDS+=($!)

SECRET="bench-$$-$RANDOM-$RANDOM"
"$BIN" relay --listen 127.0.0.1:0 --http 127.0.0.1:0 --state-dir "$TMP/relay" \
  --domain "http:*.bench.test:$SECRET" --log warn >"$TMP/relay.out" 2>&1 &
PIDS+=($!)
wait_for "$TMP/relay.out" "connectors: kitepipe connect"
LINK=$(awk '/links on/ {print $NF; exit}' "$TMP/relay.out")
HTTP=$(awk '/http on/ {print $NF; exit}' "$TMP/relay.out")
FP=$(awk '$1 == "fingerprint" {print $2; exit}' "$TMP/relay.out")

cat >"$TMP/connector.toml" <<EOF
secret = "$SECRET"

[[kite]]
name = "h1.bench.test"
protocol = "http"
target = "127.0.0.1:$H1_PORT"

[[kite]]
name = "h2c.bench.test"
protocol = "http"
target = "127.0.0.1:$H2C_PORT"
backend = "h2c"
EOF
chmod 600 "$TMP/connector.toml"
"$BIN" connect "$LINK" --fingerprint "$FP" --config "$TMP/connector.toml" --name bench-laptop \
  --log warn >"$TMP/connector.out" 2>&1 &
PIDS+=($!)
for host in h1.bench.test h2c.bench.test; do
  for _ in $(seq 200); do
    curl -sf --noproxy '*' --http2-prior-knowledge -H "Host: $host" "http://$HTTP/" >/dev/null && break
    sleep 0.1
  done
done

# Runs h2load against URL (with :authority HOST, if given); prints
# "REQ_PER_S MEAN MAX FAILED".
run_h2load() {
  local url=$1 host=${2:-}
  local args=(-c"$CLIENTS" -m"$STREAMS" -t"$THREADS" -D"$DURATION")
  [ -n "$host" ] && args+=(-H ":authority: $host")
  h2load "${args[@]}" "$url" >"$TMP/h2load.out" 2>&1 || true
  awk '
    /^finished in/ {rps = $4}
    /^requests:/ {failed = $10}
    /^time for request:/ {mean = $6; max = $5}
    END {printf "%s %s %s %s\n", rps, mean, max, failed}' "$TMP/h2load.out"
}

read -r H1_RPS H1_MEAN H1_MAX H1_BAD < <(run_h2load "http://$HTTP/" h1.bench.test)
read -r H2_RPS H2_MEAN H2_MAX H2_BAD < <(run_h2load "http://$HTTP/" h2c.bench.test)
read -r PE_RPS PE_MEAN PE_MAX PE_BAD < <(run_h2load "http://127.0.0.1:$PEER_PORT/")
read -r DI_RPS DI_MEAN DI_MAX DI_BAD < <(run_h2load "http://127.0.0.1:$H2C_PORT/")

echo "kitepipe HTTP/2 benchmark ($(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores)"
echo "h2load -c$CLIENTS -m$STREAMS -t$THREADS -D$DURATION (h2c prior knowledge), body ${#BODY} bytes"
printf '%-52s %12s %10s %10s %8s\n' "path" "requests/s" "mean" "max" "failed"
printf '%-52s %12s %10s %10s %8s\n' "relay -> link -> HTTP/1.1 nginx (translated)" "$H1_RPS" "$H1_MEAN" "$H1_MAX" "$H1_BAD"
printf '%-52s %12s %10s %10s %8s\n' "relay -> link -> h2c nginx (backend = \"h2c\")" "$H2_RPS" "$H2_MEAN" "$H2_MAX" "$H2_BAD"
printf '%-52s %12s %10s %10s %8s\n' "peer: nginx h2c front -> HTTP/1.1 nginx" "$PE_RPS" "$PE_MEAN" "$PE_MAX" "$PE_BAD"
printf '%-52s %12s %10s %10s %8s\n' "direct: h2c nginx" "$DI_RPS" "$DI_MEAN" "$DI_MAX" "$DI_BAD"
