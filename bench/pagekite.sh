#!/usr/bin/env bash
# PageKite (issue 16): a pagekite.py back-end through kitepipe's relay
# (`--pagekite`) side by side with pagekite.py as front-end and back-end,
# and, for context, kitepipe's own connector and relay on the same targets.
#
#   bench/pagekite.sh                       # 3 runs per cell, 10 s iperf3/wrk runs (~5 min)
#   RUNS=1 DURATION=3 bench/pagekite.sh     # a quick look
#   ONLY=pagekite,kitepipe-pk bench/pagekite.sh
#
# The measurements are the peer baseline's (../shared/bench/peer-baseline.md):
# nginx (1 worker, sendfile, tcp_nodelay, access_log off, keep-alive) serving
# /small.txt (100 bytes) and /big.bin (10 MiB), `iperf3 -s`; then per config
# `iperf3 -c -t DURATION -P 1 -J` (end.sum_received), `wrk -t2 -c64
# -dDURATIONs --latency -H 'Host: ...' /small.txt` (req/s, p50, p99), a
# 10 MiB `curl` (time_total, counted only with status 200 and the full
# size), the RSS (VmRSS) of the front-end and the back-end 2 s after the
# tunnel serves and its peak sampled every 0.2 s during wrk. Before every run
# a request checks the tunnel serves (waiting up to 30 s for a back-end that
# reconnects); after every run the same check counts "tunnel died".
# Differences from the baseline: pagekite.py is Debian's package (1.5.2.201011)
# run as `pagekite`, the baseline ran PyPagekite's source (1.5.2.260113);
# iperf3 reaches the raw kite through HTTP `CONNECT name:port` on the
# front-end's HTTP port (a CONNECT shim, bench/pagekite_helper.py, in front of
# iperf3 for every config, since kitepipe's relay routes PageKite raw kites by
# CONNECT, not by "the last HTTP Host this IP asked for"); the -P 8 and ab
# runs are left out (pagekite.py's tunnel drops under -P 8, and ab's 1000 new
# connections take 100 s per run through it).
#
# Everything is on 127.0.0.1 (ports picked by binding port 0); every process
# it starts is stopped by PID on exit, every run is bounded by `timeout`.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
CURLS=${CURLS:-5}
ONLY=${ONLY:-pagekite,kitepipe-pk,kitepipe}
for tool in pagekite iperf3 wrk nginx curl python3; do
  command -v "$tool" >/dev/null || {
    echo "pagekite.sh: $tool is not installed (apt-get install pagekite iperf3 wrk nginx-light curl python3)" >&2
    exit 1
  }
done

# KITEPIPE_BIN: a kitepipe binary to use instead of building one.
if [ -n "${KITEPIPE_BIN:-}" ]; then
  BIN=$KITEPIPE_BIN
else
  cargo build --release -q --bin kitepipe
  BIN=target/release/kitepipe
fi
HELPER=bench/pagekite_helper.py
TMP=$(mktemp -d /tmp/kitepipe-bench-pagekite.XXXXXX)
# nginx's worker (nobody, when started as root) reads the files served.
chmod 755 "$TMP"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT INT TERM HUP

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Stops the processes whose PIDs are given (and forgets them).
stop() {
  local pid keep=()
  for pid in "$@"; do kill "$pid" 2>/dev/null || true; done
  for pid in "$@"; do wait "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    [[ " $* " == *" $pid "* ]] || keep+=("$pid")
  done
  PIDS=("${keep[@]}")
}
# Waits until FILE contains PATTERN (up to 20 s).
wait_for() {
  for _ in $(seq 200); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "pagekite.sh: timed out waiting for '$2' in $1:" >&2; cat "$1" >&2; exit 1
}
rss() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
record() { printf '%s\t%s\t%s\n' "$CONFIG" "$1" "$2" >>"$TMP/raw.tsv"; }

NAME=foo.bench.test
SECRET="bench-$$-$RANDOM-$RANDOM"
NGINX_PORT=$(free_port)
IPERF_PORT=$(free_port)
RAW_PORT=$(free_port)   # the raw kite's port number (CONNECT NAME:RAW_PORT)
SHIM_PORT=$(free_port)

# ------------------------------------------------------------------ targets
mkdir -p "$TMP/nginx/www"
printf '%s' "kitepipe bench: a small static file of exactly one hundred bytes, served by nginx for wrk and ab!!." \
  >"$TMP/nginx/www/small.txt"
printf '\n' >>"$TMP/nginx/www/small.txt"
head -c 10485760 /dev/urandom >"$TMP/nginx/www/big.bin"
cat >"$TMP/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on;
  tcp_nodelay on;
  keepalive_requests 1000000;
  client_body_temp_path $TMP/nginx;
  proxy_temp_path $TMP/nginx;
  fastcgi_temp_path $TMP/nginx;
  uwsgi_temp_path $TMP/nginx;
  scgi_temp_path $TMP/nginx;
  server {
    listen 127.0.0.1:$NGINX_PORT;
    root $TMP/nginx/www;
  }
}
EOF
nginx -c "$TMP/nginx/nginx.conf" -p "$TMP/nginx" &
PIDS+=($!)
iperf3 -s -B 127.0.0.1 -p "$IPERF_PORT" --idle-timeout 30 >"$TMP/iperf3.out" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -sf --noproxy '*' -o /dev/null "http://127.0.0.1:$NGINX_PORT/small.txt" && break; sleep 0.1; done
curl -sf --noproxy '*' -o /dev/null "http://127.0.0.1:$NGINX_PORT/big.bin" ||
  { echo "pagekite.sh: nginx does not serve $TMP/nginx/www:" >&2; cat "$TMP/nginx/error.log" >&2; exit 1; }

# ------------------------------------------------------------------ configs
# Each start_* sets FE_PID, BE_PID, HTTP_PORT (visitors' HTTP port, also the
# CONNECT proxy for the raw kite) and TUNNEL_PIDS.
pagekite_be() { # FRONTEND_PORT
  HOME="$TMP/home" pagekite --clean --nullui --nocrashreport \
    --frontend="127.0.0.1:$1" \
    --service_on="http:$NAME:127.0.0.1:$NGINX_PORT:$SECRET" \
    --service_on="raw/$RAW_PORT:$NAME:127.0.0.1:$IPERF_PORT:$SECRET" \
    --logfile="$TMP/$CONFIG-be.log" >"$TMP/$CONFIG-be.out" 2>&1 &
  BE_PID=$!
  PIDS+=("$BE_PID")
}

start_pagekite() {
  HTTP_PORT=$(free_port)
  HOME="$TMP/home" pagekite --clean --nullui --nocrashreport --isfrontend --host=127.0.0.1 \
    --ports="$HTTP_PORT" --rawports="$RAW_PORT" --protos=http,raw \
    --domain="http,raw:*.bench.test:$SECRET" \
    --logfile="$TMP/$CONFIG-fe.log" >"$TMP/$CONFIG-fe.out" 2>&1 &
  FE_PID=$!
  PIDS+=("$FE_PID")
  wait_for "$TMP/$CONFIG-fe.log" "listen=.*:$HTTP_PORT"
  pagekite_be "$HTTP_PORT"
}

start_relay() { # EXTRA_ARGS...
  local link
  link=$(free_port)
  HTTP_PORT=$(free_port)
  "$BIN" relay --listen "127.0.0.1:$link" --http "127.0.0.1:$HTTP_PORT" --tcp-bind 127.0.0.1 \
    --http-connect --domain "http,tcp:*.bench.test:$SECRET" --state-dir "$TMP/$CONFIG-state" \
    --log warn "$@" >"$TMP/$CONFIG-fe.out" 2>&1 &
  FE_PID=$!
  PIDS+=("$FE_PID")
  wait_for "$TMP/$CONFIG-fe.out" "connectors: kitepipe connect"
  LINK_PORT=$link
}

start_kitepipe-pk() {
  start_relay --pagekite
  pagekite_be "$LINK_PORT"
}

start_kitepipe() {
  start_relay
  local fp
  fp=$(awk '$1 == "fingerprint" {print $2; exit}' "$TMP/$CONFIG-fe.out")
  "$BIN" connect "127.0.0.1:$LINK_PORT" --fingerprint "$fp" --secret "$SECRET" --name bench \
    --log warn --kite "http:$NAME=127.0.0.1:$NGINX_PORT" \
    --kite "tcp:$NAME:$RAW_PORT=127.0.0.1:$IPERF_PORT" >"$TMP/$CONFIG-be.out" 2>&1 &
  BE_PID=$!
  PIDS+=("$BE_PID")
}

# Whether a visitor gets /small.txt through the tunnel now.
serves() {
  [ "$(curl -s --noproxy '*' --max-time 5 -o /dev/null -w '%{http_code}' -H "Host: $NAME" \
    "http://127.0.0.1:$HTTP_PORT/small.txt")" = 200 ]
}
# Waits (up to 30 s) until the tunnel serves; false if it does not.
await_serving() {
  local deadline=$((SECONDS + 30))
  while [ $SECONDS -lt $deadline ]; do serves && return 0; sleep 0.2; done
  return 1
}
DIED=0
# After a run: counts a tunnel that no longer serves, and waits for it back.
after_run() {
  if ! serves; then
    DIED=$((DIED + 1))
    log "$CONFIG: the tunnel stopped serving after $1; waiting for it to come back"
    await_serving || { log "$CONFIG: the tunnel did not come back within 30 s"; return 1; }
  fi
}

run_iperf() {
  local out="$TMP/iperf.json" bps
  timeout $((DURATION + 30)) iperf3 -c 127.0.0.1 -p "$SHIM_PORT" -t "$DURATION" -P 1 -J >"$out" 2>&1 || true
  bps=$(python3 -c 'import json,sys
try: print(json.load(open(sys.argv[1]))["end"]["sum_received"]["bits_per_second"])
except Exception: print("fail")' "$out")
  record iperf_bps "$bps"
  log "$CONFIG: iperf3 $bps bit/s"
}

run_wrk() {
  local out="$TMP/wrk.out" sampler fe be
  rm -f "$TMP/fe-peak" "$TMP/be-peak"
  python3 "$HELPER" rss-peak "$TMP/fe-peak" "$FE_PID" &
  fe=$!
  python3 "$HELPER" rss-peak "$TMP/be-peak" "$BE_PID" &
  be=$!
  PIDS+=("$fe" "$be")
  timeout $((DURATION + 30)) wrk -t2 -c64 -d"${DURATION}s" --latency -H "Host: $NAME" \
    "http://127.0.0.1:$HTTP_PORT/small.txt" >"$out" 2>&1 || true
  stop "$fe" "$be"
  record fe_rss_peak_kib "$(cat "$TMP/fe-peak" 2>/dev/null || echo fail)"
  record be_rss_peak_kib "$(cat "$TMP/be-peak" 2>/dev/null || echo fail)"
  # Latency lines are "    99%    4.31ms" (us, ms or s).
  read -r rps p50 p99 errors < <(awk '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    /^Requests\/sec:/ {rps = $2}
    $1 == "50%" {p50 = ms($2)}
    $1 == "99%" {p99 = ms($2)}
    /Socket errors:/ {gsub(/,/, ""); errors += $4 + $6 + $8 + $10}
    /Non-2xx/ {errors += $NF}
    END {printf "%s %s %s %d\n", (rps == "" ? "fail" : rps), (p50 == "" ? "fail" : p50), (p99 == "" ? "fail" : p99), errors}' "$out")
  record wrk_rps "$rps"
  record wrk_p50_ms "$p50"
  record wrk_p99_ms "$p99"
  record wrk_errors "$errors"
  log "$CONFIG: wrk $rps req/s, p50 $p50 ms, p99 $p99 ms, $errors errors"
}

run_curl() {
  local line time size code
  line=$(curl -s --noproxy '*' --max-time 120 -o /dev/null -H "Host: $NAME" \
    -w '%{time_total} %{size_download} %{http_code}' "http://127.0.0.1:$HTTP_PORT/big.bin" || true)
  read -r time size code <<<"$line"
  if [ "${code:-}" = 200 ] && [ "${size:-}" = 10485760 ]; then
    record curl_ms "$(awk -v t="$time" 'BEGIN {printf "%.1f", t * 1000}')"
  else
    record curl_ms fail
  fi
  log "$CONFIG: curl 10 MiB: $line"
}

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
STARTED=$(date -u '+%Y-%m-%d %H:%M UTC')
: >"$TMP/raw.tsv"
IFS=, read -ra CONFIGS <<<"$ONLY"
for CONFIG in "${CONFIGS[@]}"; do
  log "$CONFIG: starting"
  DIED=0
  "start_$CONFIG"
  if ! await_serving; then
    log "$CONFIG: the tunnel never served; skipped (logs: $TMP/$CONFIG-*)"
    cat "$TMP/$CONFIG"-* >&2 || true
    stop "$FE_PID" "$BE_PID"
    continue
  fi
  python3 "$HELPER" connect-shim "$SHIM_PORT" 127.0.0.1 "$HTTP_PORT" "$NAME:$RAW_PORT" \
    >"$TMP/$CONFIG-shim.out" 2>&1 &
  SHIM_PID=$!
  PIDS+=("$SHIM_PID")
  wait_for "$TMP/$CONFIG-shim.out" READY
  sleep 2
  record fe_rss_idle_kib "$(rss "$FE_PID")"
  record be_rss_idle_kib "$(rss "$BE_PID")"
  for _ in $(seq "$RUNS"); do
    await_serving || break
    run_iperf
    after_run iperf3 || break
  done
  for _ in $(seq "$RUNS"); do
    await_serving || break
    run_wrk
    after_run wrk || break
  done
  for _ in $(seq "$CURLS"); do
    await_serving || break
    run_curl
    after_run curl || break
  done
  record died "$DIED"
  stop "$SHIM_PID" "$BE_PID" "$FE_PID"
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

mkdir -p bench/out
REPORT="bench/out/pagekite-$(date -u +%Y%m%d-%H%M%S).md"
{
  echo "PageKite benchmark ($STARTED, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores, load $LOAD_START -> $LOAD_END)"
  echo "pagekite.py $(dpkg-query -W -f '${Version}' pagekite 2>/dev/null || echo '?') (Debian), $("$BIN" --version | head -1), $(nginx -v 2>&1 | sed 's/.*: //'), $(iperf3 --version | head -1 | cut -d' ' -f1-2)"
  echo "RUNS=$RUNS DURATION=$DURATION CURLS=$CURLS: cells are median (min–max)"
  echo
  python3 "$HELPER" summary "$TMP/raw.tsv"
  echo
  echo "raw samples (config, metric, value):"
  echo
  sed 's/^/    /' "$TMP/raw.tsv"
} | tee "$REPORT"
log "written to $REPORT"
