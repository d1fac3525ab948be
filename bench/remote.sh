#!/usr/bin/env bash
# Remote operations over SSH, side by side: kitepipe, mitogen, execnet and
# plain OpenSSH against one throwaway sshd on 127.0.0.1 (its own keys and
# config in a temp dir; HOME points at an empty directory so no rc files
# run, as in ../shared/bench/remote-baseline.md).
#
#   bench/remote.sh               # RUNS=5 cold starts each, 2,000 small ops
#   RUNS=10 bench/remote.sh
#
# Measures: process start -> first remote exec finished; small operations
# per second over one connection, sequential and pipelined; 100 MiB to the
# host. kitepipe runs as a stripped release build (as distributed): it
# pushes its own binary, so its size is part of the connect time.
# mitogen and execnet come from PyPI into a venv under /tmp.
# Every process it starts is stopped by PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-5}
VENV=${VENV:-/tmp/kp-rbench-venv}
TMP=$(mktemp -d /tmp/kitepipe-bench-remote.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -f "$TMP/sshd.pid" ] && kill "$(cat "$TMP/sshd.pid")" 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT

for tool in /usr/sbin/sshd ssh ssh-keygen strip python3; do
  command -v "$tool" >/dev/null || { echo "remote.sh: $tool is missing (apt-get install openssh-server openssh-client binutils python3-venv)" >&2; exit 1; }
done

# kitepipe: KITEPIPE_BIN and REMOTE_OPS_BIN may name prebuilt binaries.
if [ -z "${KITEPIPE_BIN:-}" ]; then
  cargo build --release -q --bin kitepipe --example remote_ops
  KITEPIPE_BIN=${CARGO_TARGET_DIR:-target}/release/kitepipe
  REMOTE_OPS_BIN=${CARGO_TARGET_DIR:-target}/release/examples/remote_ops
fi
strip -o "$TMP/kitepipe" "$KITEPIPE_BIN"
KP=$TMP/kitepipe
echo "kitepipe binary: $(stat -c %s "$KP") bytes (stripped from $(stat -c %s "$KITEPIPE_BIN"))"

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import mitogen, execnet' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q mitogen execnet
fi
PY=$VENV/bin/python

# --- a throwaway sshd -------------------------------------------------------
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$TMP/home" "$TMP/dst" /run/sshd
ssh-keygen -q -t ed25519 -N '' -f "$TMP/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$TMP/id_ed25519"
cp "$TMP/id_ed25519.pub" "$TMP/authorized_keys"
cat > "$TMP/sshd_config" <<CFG
ListenAddress 127.0.0.1
Port $PORT
HostKey $TMP/host_key
PidFile $TMP/sshd.pid
AuthorizedKeysFile $TMP/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
UseDNS no
MaxStartups 100:30:200
MaxSessions 64
SetEnv HOME=$TMP/home
CFG
cat > "$TMP/ssh_config" <<CFG
Host rbench
  HostName 127.0.0.1
  Port $PORT
Host *
  User $(id -un)
  IdentityFile $TMP/id_ed25519
  IdentitiesOnly yes
  IdentityAgent none
  StrictHostKeyChecking no
  UserKnownHostsFile $TMP/known_hosts
  GlobalKnownHostsFile /dev/null
  BatchMode yes
  LogLevel ERROR
CFG
/usr/sbin/sshd -f "$TMP/sshd_config" -E "$TMP/sshd.log"
for _ in $(seq 50); do ssh -F "$TMP/ssh_config" rbench true 2>/dev/null && break; sleep 0.1; done
CFG=$TMP/ssh_config

now_ms() { date +%s%N | awk '{printf "%.1f", $1/1e6}'; }
median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.1f\n", (a[NR/2]+a[NR/2+1])/2}'; }
wall_ms() { local t0 t1; t0=$(now_ms); "$@" >/dev/null; t1=$(now_ms); awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f\n", b-a}'; }
RESULTS=()
row() { RESULTS+=("$(printf '| %s | %s | %s |' "$1" "$2" "$3")"); printf '%-58s %10s %s\n' "$1" "$2" "$3"; }

# --- cold start: process start -> first remote result -----------------------
row "ssh rbench true (new connection)" "$(for _ in $(seq "$RUNS"); do wall_ms ssh -F "$CFG" rbench true; done | median)" "ms"
row "kitepipe remote exec -- true (whole process, push agent)" "$(for _ in $(seq "$RUNS"); do wall_ms "$KP" remote -F "$CFG" rbench exec -- true; done | median)" "ms"
"$KP" remote -F "$CFG" --cache rbench exec -- true
row "kitepipe remote --cache exec -- true (whole process, cached)" "$(for _ in $(seq "$RUNS"); do wall_ms "$KP" remote -F "$CFG" --cache rbench exec -- true; done | median)" "ms"
rm -rf "$TMP/home/.cache"

cat > "$TMP/mitogen_first.py" <<PYEOF
import os, sys, time
import mitogen.master
broker = mitogen.master.Broker(); router = mitogen.master.Router(broker)
ctx = router.ssh(hostname="127.0.0.1", port=$PORT, username="$(id -un)", identity_file="$TMP/id_ed25519",
                 check_host_keys="ignore", python_path="python3", ssh_args=["-F", "$CFG"])
ctx.call(os.getpid)
print(time.time_ns() / 1e6)
sys.stdout.flush()
broker.shutdown(); broker.join()
PYEOF
cat > "$TMP/execnet_first.py" <<PYEOF
import sys, time, execnet
gw = execnet.makegateway("ssh=-F $CFG rbench//python=python3")
gw.remote_exec("channel.send(42)").receive()
print(time.time_ns() / 1e6)
sys.stdout.flush()
gw.exit()
PYEOF
first_result() { local t0 t1; t0=$(now_ms); t1=$("$PY" "$1" | head -1); awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f\n", b-a}'; }
row "mitogen: process start -> first result" "$(for _ in $(seq "$RUNS"); do first_result "$TMP/mitogen_first.py"; done | median)" "ms"
row "execnet: process start -> first result" "$(for _ in $(seq "$RUNS"); do first_result "$TMP/execnet_first.py"; done | median)" "ms"

# --- small operations over one connection -----------------------------------
KITEPIPE_AGENT=$KP REMOTE_DIR=$TMP/dst "$REMOTE_OPS_BIN" rbench -F "$CFG" > "$TMP/kp_ops.txt"
cat "$TMP/kp_ops.txt" | sed 's/^/  kitepipe: /'
val() { awk -v k="$1" '$1==k {print $2}' "$TMP/kp_ops.txt"; }
row "kitepipe (library): connect -> first exec finished" "$(val connect_to_first_exec)" "ms"
row "kitepipe stat(\"/\"), sequential" "$(val stat_sequential)" "ops/s"
row "kitepipe stat(\"/\"), 8 in flight" "$(val stat_pipelined_8)" "ops/s"
row "kitepipe stat(\"/\"), 64 in flight" "$(val stat_pipelined_64)" "ops/s"
row "kitepipe exec true, sequential" "$(val exec_true_sequential)" "ops/s"

cat > "$TMP/mitogen_ops.py" <<PYEOF
import os, time
import mitogen.master
broker = mitogen.master.Broker(); router = mitogen.master.Router(broker)
ctx = router.ssh(hostname="127.0.0.1", port=$PORT, username="$(id -un)", identity_file="$TMP/id_ed25519",
                 check_host_keys="ignore", python_path="python3", ssh_args=["-F", "$CFG"])
for _ in range(100): ctx.call(os.getpid)
N = 2000
t = time.time()
for _ in range(N): ctx.call(os.getpid)
print("seq", N / (time.time() - t))
for window in (8, 64):
    t = time.time(); pending = []; done = 0; issued = 0
    while done < N:
        while issued < N and len(pending) < window:
            pending.append(ctx.call_async(os.getpid)); issued += 1
        pending.pop(0).get().unpickle(); done += 1
    print("win%d" % window, N / (time.time() - t))
broker.shutdown(); broker.join()
PYEOF
"$PY" "$TMP/mitogen_ops.py" > "$TMP/mitogen_ops.txt"
mval() { awk -v k="$1" '$1==k {printf "%.0f", $2}' "$TMP/mitogen_ops.txt"; }
row "mitogen call(os.getpid), sequential" "$(mval seq)" "ops/s"
row "mitogen call_async, 8 in flight" "$(mval win8)" "ops/s"
row "mitogen call_async, 64 in flight" "$(mval win64)" "ops/s"

cat > "$TMP/execnet_ops.py" <<PYEOF
import time, execnet
gw = execnet.makegateway("ssh=-F $CFG rbench//python=python3")
ch = gw.remote_exec("for item in channel: channel.send(item)")
for i in range(100): ch.send(i); ch.receive()
N = 2000
t = time.time()
for i in range(N): ch.send(i); ch.receive()
print("seq", N / (time.time() - t))
chans = [gw.remote_exec("for item in channel: channel.send(item)") for _ in range(8)]
t = time.time()
for i in range(N // 8):
    for c in chans: c.send(i)
    for c in chans: c.receive()
print("par8", (N // 8) * 8 / (time.time() - t))
gw.exit()
PYEOF
"$PY" "$TMP/execnet_ops.py" > "$TMP/execnet_ops.txt"
eval_() { awk -v k="$1" '$1==k {printf "%.0f", $2}' "$TMP/execnet_ops.txt"; }
row "execnet channel echo, sequential" "$(eval_ seq)" "ops/s"
row "execnet 8 echo channels in parallel" "$(eval_ par8)" "ops/s"

# --- 100 MiB to the host ----------------------------------------------------
head -c $((100 * 1024 * 1024)) /dev/urandom > "$TMP/big.bin"
mibs() { awk -v ms="$1" 'BEGIN{printf "%.0f", 100 / (ms / 1000)}'; }
row "ssh 'cat > f' < 100 MiB, new connection" "$(mibs "$(for _ in $(seq 3); do wall_ms sh -c "ssh -F '$CFG' rbench 'cat > $TMP/dst/x' < '$TMP/big.bin'"; done | median)")" "MiB/s"
ssh -F "$CFG" -N -o ControlMaster=yes -o ControlPath="$TMP/cm.sock" rbench & PIDS+=($!)
for _ in $(seq 50); do [ -S "$TMP/cm.sock" ] && break; sleep 0.1; done
row "ssh 'cat > f' < 100 MiB, ControlMaster already up" "$(mibs "$(for _ in $(seq 3); do wall_ms sh -c "ssh -F '$CFG' -o ControlPath='$TMP/cm.sock' rbench 'cat > $TMP/dst/x' < '$TMP/big.bin'"; done | median)")" "MiB/s"
row "kitepipe remote cp 100 MiB (whole process: connect, push, copy)" "$(mibs "$(for _ in $(seq 3); do wall_ms "$KP" remote -F "$CFG" rbench cp --quiet "$TMP/big.bin" ":$TMP/dst/x"; done | median)")" "MiB/s"
row "kitepipe write 100 MiB on an open session (library)" "$(val write_100mib_open_session)" "MiB/s"
row "kitepipe read 100 MiB on an open session (library)" "$(val read_100mib_open_session)" "MiB/s"

echo
echo "| measurement | median | unit |"
echo "|---|---|---|"
printf '%s\n' "${RESULTS[@]}"
echo
echo "machine: $(nproc) cpus, load $(cut -d' ' -f1-3 /proc/loadavg); $(ssh -V 2>&1); kitepipe $("$KP" --version | awk '{print $2}'); mitogen $("$PY" -c 'import mitogen; print(".".join(map(str, mitogen.__version__)))'); execnet $("$PY" -c 'import execnet; print(execnet.__version__)')"
