#!/usr/bin/env python3
"""Helpers for bench/pagekite.sh (standard library only).

  pagekite_helper.py connect-shim LISTEN_PORT PROXY_HOST PROXY_PORT TARGET
      A local TCP forwarder for tools that cannot speak HTTP CONNECT
      (iperf3): every connection to 127.0.0.1:LISTEN_PORT becomes
      `CONNECT TARGET HTTP/1.1` on PROXY_HOST:PROXY_PORT (a PageKite
      front-end's or kitepipe relay's HTTP port), then bytes both ways.
      Prints READY when listening. Runs until killed.
  pagekite_helper.py rss-peak OUT PID...
      Samples the summed VmRSS (KiB) of PIDs every 0.2 s and keeps the
      largest in OUT (rewritten on every new peak). Runs until killed.
  pagekite_helper.py summary TSV
      Prints the side-by-side markdown table from the raw samples
      (lines "CONFIG<TAB>METRIC<TAB>VALUE").
"""

import os
import socket
import statistics
import sys
import threading
import time


def pump(src, dst):
    try:
        while True:
            data = src.recv(262144)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def serve_shim(listen_port, proxy_host, proxy_port, target):
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", int(listen_port)))
    lsock.listen(64)
    print("READY", flush=True)

    def handle(client):
        try:
            up = socket.create_connection((proxy_host, int(proxy_port)), timeout=10)
            up.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                data = up.recv(4096)
                if not data or len(head) > 16384:
                    raise OSError(f"CONNECT {target}: no answer ({head[:200]!r})")
                head += data
            status = head.split(b"\r\n", 1)[0]
            if b" 200" not in status:
                raise OSError(f"CONNECT {target}: {status!r}")
            up.settimeout(None)
            for s in (client, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rest = head.split(b"\r\n\r\n", 1)[1]
            if rest:
                client.sendall(rest)
            t = threading.Thread(target=pump, args=(client, up), daemon=True)
            t.start()
            pump(up, client)
            t.join()
        except OSError as err:
            print(f"shim: {err}", file=sys.stderr, flush=True)
        finally:
            client.close()

    while True:
        client, _ = lsock.accept()
        threading.Thread(target=handle, args=(client,), daemon=True).start()


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def rss_peak(out, pids):
    peak = 0
    while True:
        now = rss_kib(pids)
        if now > peak:
            peak = now
            with open(out + ".tmp", "w") as f:
                f.write(f"{peak}\n")
            os.replace(out + ".tmp", out)
        time.sleep(0.2)


def cell(values, fmt):
    if not values:
        return "–"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def summary(tsv):
    data = {}
    order = []
    with open(tsv) as f:
        for line in f:
            config, metric, value = line.rstrip("\n").split("\t")
            if config not in data:
                data[config] = {}
                order.append(config)
            data[config].setdefault(metric, []).append(value)
    names = {
        "pagekite": "pagekite.py front-end + pagekite.py back-end",
        "kitepipe-pk": "kitepipe relay (`--pagekite`) + pagekite.py back-end",
        "kitepipe": "kitepipe relay + kitepipe connector (context)",
    }

    def num(config, metric):
        return [float(v) for v in data[config].get(metric, []) if v not in ("", "fail")]

    def fails(config, metric):
        return sum(1 for v in data[config].get(metric, []) if v == "fail")

    print("| front-end + back-end | iperf3 1 stream Gbit/s | wrk req/s | wrk p50 / p99 ms "
          "| wrk errors | 10 MiB curl ms | RSS front-end idle / peak MiB "
          "| RSS back-end idle / peak MiB | failed runs | tunnel died (runs) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for config in order:
        gbit = num(config, "iperf_bps")
        gbit = [v / 1e9 for v in gbit]
        rps = num(config, "wrk_rps")
        p50 = num(config, "wrk_p50_ms")
        p99 = num(config, "wrk_p99_ms")
        curl = num(config, "curl_ms")
        errors = num(config, "wrk_errors")
        fe_idle = [v / 1024 for v in num(config, "fe_rss_idle_kib")]
        fe_peak = [v / 1024 for v in num(config, "fe_rss_peak_kib")]
        be_idle = [v / 1024 for v in num(config, "be_rss_idle_kib")]
        be_peak = [v / 1024 for v in num(config, "be_rss_peak_kib")]
        failed = ", ".join(f"{m.split('_')[0]}×{fails(config, m)}"
                           for m in ("iperf_bps", "wrk_rps", "curl_ms") if fails(config, m)) or "0"
        died = ", ".join(f"{v}" for v in data[config].get("died", [])) or "0"
        print(f"| {names.get(config, config)} | {cell(gbit, '{:.3f}')} | {cell(rps, '{:,.0f}')} "
              f"| {cell(p50, '{:.2f}')} / {cell(p99, '{:.2f}')} | {cell(errors, '{:,.0f}')} "
              f"| {cell(curl, '{:,.0f}')} "
              f"| {cell(fe_idle, '{:.1f}')} / {cell(fe_peak, '{:.1f}')} "
              f"| {cell(be_idle, '{:.1f}')} / {cell(be_peak, '{:.1f}')} | {failed} | {died} |")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "connect-shim" and len(args) == 4:
        serve_shim(*args)
    elif cmd == "rss-peak" and len(args) >= 2:
        rss_peak(args[0], args[1:])
    elif cmd == "summary" and len(args) == 1:
        summary(args[0])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
