//! End to end through a real NAT (`tools/netlab`): the backend and the
//! connector sit in the `device` namespace behind a masquerading NAT that
//! drops every connection from outside; the relay and the visitor sit on the
//! lab's "internet". Each test builds its own lab, breaks the network the way
//! users' networks break, and checks that the kite comes back by itself.
//!
//! Needs root (network namespaces, nftables) and the tools in
//! tools/test-deps.txt; says which is missing otherwise (and fails under `CI`).

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use support::*;
use tokio::time::Instant;

/// The lab tool, in the repository.
const NETLAB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tools/netlab/netlab");

const SECRET: &str = "netlab-secret";
const KITE: &str = "blog.example.net";
const HELLO: &str = "hello from backend\n";

/// The relay's address in every lab. Its namespace is brand new and runs
/// nothing else, so fixed ports are free.
const RELAY_IP: &str = "198.51.100.1";
const LINK_PORT: u16 = 8443;
const HTTP_PORT: u16 = 8080;
const TCP_KITE_PORT: u16 = 9000;

/// Short enough that a dead link is noticed in a few seconds, long enough
/// that a loaded two-core CI machine does not see false timeouts.
const HEARTBEAT: &str = "3s";
const MAX_BACKOFF: &str = "2s";

/// Detection must take about one heartbeat (pings every third of it, a check
/// every third): 3-4 s. The bound (10 s, scaled like the tests' patience)
/// leaves room for a loaded machine.
fn detect_within() -> Duration {
    scaled(Duration::from_secs(10))
}

/// One lab (namespaces, NAT, addresses), removed with `netlab down` on drop.
struct Lab {
    id: String,
    vars: HashMap<String, String>,
}

impl Lab {
    /// Builds a lab, or says why this machine cannot and returns `None`
    /// (under `CI`, fails instead).
    fn up() -> Option<Lab> {
        let ready = require_root("network namespaces (netlab)")
            && require_tool("ip", "iproute2")
            && require_tool("nft", "nftables")
            && require_tool("conntrack", "conntrack")
            && require_tool("python3", "python3")
            && require_tool("curl", "curl");
        if !ready {
            return None;
        }
        let out = Command::new(NETLAB)
            .arg("up")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|err| panic!("cannot run {NETLAB}: {err}"));
        assert!(
            out.status.success(),
            "netlab up failed as root ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let vars: HashMap<String, String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let id = vars
            .get("NETLAB_ID")
            .expect("netlab up prints NETLAB_ID")
            .clone();
        let lab = Lab { id, vars };
        assert_eq!(lab.var("NETLAB_RELAY_IP"), RELAY_IP);
        Some(lab)
    }

    fn var(&self, key: &str) -> &str {
        self.vars
            .get(key)
            .unwrap_or_else(|| panic!("netlab up did not print {key}"))
    }

    /// The wrapper that runs a command in `role`'s namespace.
    fn prefix<'a>(&'a self, role: &'a str) -> [&'a str; 5] {
        [NETLAB, "exec", &self.id, role, "--"]
    }

    /// Runs `netlab CMD ID ARGS...` and asserts it worked; returns stdout.
    fn netlab(&self, cmd: &str, args: &[&str]) -> String {
        let out = Command::new(NETLAB)
            .arg(cmd)
            .arg(&self.id)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run netlab");
        assert!(
            out.status.success(),
            "netlab {cmd} {} failed: {}",
            self.id,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `cmd` in `role`'s namespace and returns its output.
    fn exec(&self, role: &str, cmd: &[&str]) -> Output {
        Command::new(NETLAB)
            .args(&self.prefix(role)[1..])
            .args(cmd)
            .stdin(Stdio::null())
            .output()
            .expect("run netlab exec")
    }

    /// A visitor's GET of `path` on the kite: `Some((status, body))`, or
    /// `None` if curl got no HTTP answer within 3 s.
    fn visit(&self, path: &str) -> Option<(u16, String)> {
        let host = format!("Host: {KITE}");
        let url = format!("http://{RELAY_IP}:{HTTP_PORT}{path}");
        let out = self.exec(
            "visitor",
            &[
                "curl",
                "-sS",
                "--noproxy",
                "*",
                "--max-time",
                "3",
                "-H",
                &host,
                "-w",
                "\n%{http_code}",
                &url,
            ],
        );
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, status) = text.rsplit_once('\n')?;
        Some((status.parse().ok()?, body.to_string()))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new(NETLAB)
            .args(["down", &self.id])
            .stdin(Stdio::null())
            .output();
    }
}

/// Starts the relay in the relay namespace with the lab's fixed ports.
fn start_relay(lab: &Lab, state: &Path) -> RelayProc {
    let link = format!("{RELAY_IP}:{LINK_PORT}");
    let http = format!("{RELAY_IP}:{HTTP_PORT}");
    Relay::new()
        .wrapped(&lab.prefix("relay"))
        .args(&["--listen", &link, "--http", &http, "--tcp-bind", RELAY_IP])
        .args(&["--heartbeat", HEARTBEAT])
        .domain(&format!("http,tcp:*.example.net:{SECRET}"))
        .state_dir(state)
        .start()
}

/// A relay, and behind the NAT a backend and a connector serving it.
struct Site {
    connector: Proc,
    relay: RelayProc,
    /// The kite's target; held so it runs as long as the site.
    _backend: Backend,
    /// The relay's state dir (certificate), kept across relay restarts.
    state: TempDir,
}

impl Site {
    /// An HTTP kite for a backend on the device's loopback.
    fn start(lab: &Lab) -> Site {
        let backend = Backend::start_wrapped("http", &lab.prefix("device"), "127.0.0.1");
        let kite = format!("http:{KITE}={}", backend.addr());
        Site::start_with(lab, backend, &kite)
    }

    fn start_with(lab: &Lab, backend: Backend, kite: &str) -> Site {
        let state = TempDir::new("netlab-relay-state");
        let relay = start_relay(lab, state.path());
        assert_eq!(relay.link.to_string(), format!("{RELAY_IP}:{LINK_PORT}"));
        let connector = Connector::new(&relay)
            .wrapped(&lab.prefix("device"))
            .secret(SECRET)
            .kite(kite)
            .args(&["--heartbeat", HEARTBEAT, "--max-backoff", MAX_BACKOFF])
            .start();
        Site {
            connector,
            relay,
            _backend: backend,
            state,
        }
    }
}

/// Waits until a visitor gets the backend's page; returns the time since `since`.
fn kite_serves(lab: &Lab, since: Instant, what: &str) -> Duration {
    eventually(&format!("the kite to serve after {what}"), || {
        let (status, body) = lab.visit("/")?;
        (status == 200 && body == HELLO).then_some(())
    });
    let took = since.elapsed();
    eprintln!("netlab: kite served {took:.2?} after {what}");
    took
}

/// Waits for `needle` in `proc`'s log; returns the time since `since`.
fn logged(proc: &Proc, needle: &str, since: Instant) -> Duration {
    proc.wait_for(needle);
    let took = since.elapsed();
    eprintln!(
        "netlab: {} logged {needle:?} {took:.2?} after the fault",
        proc.name
    );
    took
}

/// The relay's "connector linked" lines (their span names the peer address).
fn link_lines(relay: &RelayProc) -> Vec<String> {
    relay
        .proc
        .output()
        .lines()
        .filter(|l| l.contains("connector linked"))
        .map(str::to_string)
        .collect()
}

#[test]
fn through_nat() {
    let Some(lab) = Lab::up() else {
        return;
    };
    // Bound to every address of the device: only the NAT keeps outsiders away.
    let backend = Backend::start_wrapped("http", &lab.prefix("device"), "0.0.0.0");
    let port = backend.port;
    let site = Site::start_with(&lab, backend, &format!("http:{KITE}=127.0.0.1:{port}"));

    assert_eq!(lab.visit("/"), Some((200, HELLO.to_string())));
    let (status, headers) = lab.visit("/headers").expect("visitor gets an answer");
    assert_eq!(status, 200);
    let headers: serde_json::Value = serde_json::from_str(&headers).unwrap();
    assert_eq!(headers["x-forwarded-for"], lab.var("NETLAB_VISITOR_IP"));
    assert_eq!(headers["host"], KITE);

    // The relay sees the link coming from the NAT, never from the LAN.
    let public = lab.var("NETLAB_NAT_PUBLIC_IP");
    let device = lab.var("NETLAB_DEVICE_IP");
    let links = link_lines(&site.relay);
    assert_eq!(links.len(), 1, "one link:\n{}", site.relay.proc.output());
    assert!(links[0].contains(&format!("peer={public}:")), "{links:?}");
    assert!(
        !site.relay.proc.output().contains(device),
        "{}",
        site.relay.proc.output()
    );

    // The backend answers on the device's address inside the LAN...
    let direct = format!("http://{device}:{port}/");
    let inside = lab.exec("device", &["curl", "-sS", "--max-time", "3", &direct]);
    assert!(
        inside.status.success(),
        "{}",
        String::from_utf8_lossy(&inside.stderr)
    );
    // ...but the relay, which has a route to the LAN through the NAT, cannot
    // open a connection to it: the NAT drops it (curl exit 28: timed out, not refused).
    let outside = lab.exec("relay", &["curl", "-sS", "--max-time", "3", &direct]);
    assert_eq!(
        outside.status.code(),
        Some(28),
        "relay reached the device directly: {}",
        String::from_utf8_lossy(&outside.stderr)
    );
    // The kite still works.
    assert_eq!(lab.visit("/"), Some((200, HELLO.to_string())));
}

#[test]
fn relay_restart() {
    let Some(lab) = Lab::up() else {
        return;
    };
    let mut site = Site::start(&lab);
    assert_eq!(lab.visit("/"), Some((200, HELLO.to_string())));
    let fingerprint = site.relay.fingerprint.clone();

    let killed = Instant::now();
    site.relay.proc.kill();
    site.connector.wait_links_down(1);
    eprintln!("netlab: link lost {:.2?} after the kill", killed.elapsed());
    // Same state dir: same certificate, so the connector's pin still holds.
    let restarted = Instant::now();
    site.relay = start_relay(&lab, site.state.path());
    assert_eq!(site.relay.fingerprint, fingerprint);

    kite_serves(&lab, restarted, "the relay restarted");
    site.connector.wait_links_up(2);
    assert_eq!(link_lines(&site.relay).len(), 1);
}

#[test]
fn cut_restore() {
    let Some(lab) = Lab::up() else {
        return;
    };
    let site = Site::start(&lab);
    assert_eq!(lab.visit("/"), Some((200, HELLO.to_string())));

    let cut = Instant::now();
    lab.netlab("cut", &[]);
    let connector_saw = logged(&site.connector, "heartbeat timeout", cut);
    let relay_saw = logged(&site.relay.proc, "heartbeat timeout", cut);
    assert!(
        connector_saw < detect_within(),
        "connector took {connector_saw:?}"
    );
    assert!(relay_saw < detect_within(), "relay took {relay_saw:?}");
    assert!(site.connector.links_down() >= 1);
    // Meanwhile visitors get a prompt "offline" page, not a hang.
    let (status, body) = lab
        .visit("/")
        .expect("relay answers while the kite is offline");
    assert_eq!(status, 503, "{body}");

    let restored = Instant::now();
    lab.netlab("restore", &[]);
    kite_serves(&lab, restored, "netlab restore");
    assert!(site.connector.links_up() >= 2);
}

#[test]
fn nat_reset() {
    let Some(lab) = Lab::up() else {
        return;
    };
    let site = Site::start(&lab);
    assert_eq!(lab.visit("/"), Some((200, HELLO.to_string())));

    let reset = Instant::now();
    lab.netlab("nat-reset", &[]);
    let detected = logged(&site.connector, "heartbeat timeout", reset);
    assert!(detected < detect_within(), "connector took {detected:?}");
    kite_serves(&lab, reset, "netlab nat-reset");
    assert!(site.connector.links_up() >= 2);
    // The new link comes through the same NAT address.
    let public = lab.var("NETLAB_NAT_PUBLIC_IP");
    let links = link_lines(&site.relay);
    assert!(links.len() >= 2, "{links:?}");
    assert!(
        links.iter().all(|l| l.contains(&format!("peer={public}:"))),
        "{links:?}"
    );
}

#[test]
fn move_to_another_address() {
    let Some(lab) = Lab::up() else {
        return;
    };
    let site = Site::start(&lab);
    assert_eq!(lab.visit("/"), Some((200, HELLO.to_string())));
    let old = lab.var("NETLAB_NAT_PUBLIC_IP");
    assert!(link_lines(&site.relay)[0].contains(&format!("peer={old}:")));

    let moved = Instant::now();
    let printed = lab.netlab("move", &[]);
    let new = printed
        .lines()
        .find_map(|l| l.strip_prefix("NETLAB_NAT_PUBLIC_IP="))
        .expect("netlab move prints the new address")
        .trim()
        .to_string();
    assert_ne!(new, old);
    let detected = logged(&site.connector, "heartbeat timeout", moved);
    assert!(detected < detect_within(), "connector took {detected:?}");
    kite_serves(&lab, moved, "netlab move");

    // The relay now sees the link from the new address.
    let links = link_lines(&site.relay);
    let last = links.last().expect("a link line");
    assert!(last.contains(&format!("peer={new}:")), "{links:?}");
}

#[test]
fn tcp_kite_through_nat_carries_bytes_both_ways() {
    let Some(lab) = Lab::up() else {
        return;
    };
    let echo = Backend::start_wrapped("tcp-echo", &lab.prefix("device"), "127.0.0.1");
    let kite = format!("tcp:db.example.net:{TCP_KITE_PORT}={}", echo.addr());
    let _site = Site::start_with(&lab, echo, &kite);

    let sent = pseudo_random(4 << 20, 7);
    let received = visitor_tcp_exchange(&lab, TCP_KITE_PORT, &sent);
    assert_eq!(received.len(), sent.len());
    assert_eq!(sha256_hex(&received), sha256_hex(&sent));
}

/// In the visitor namespace: connects to the relay's `port`, sends `data`,
/// half-closes, and returns everything that came back.
fn visitor_tcp_exchange(lab: &Lab, port: u16, data: &[u8]) -> Vec<u8> {
    // Socket operations time out after 20 s, which bounds the whole exchange.
    const CLIENT: &str = r#"
import socket, sys, threading
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
def up():
    while True:
        b = sys.stdin.buffer.read1(65536)
        if not b:
            break
        s.sendall(b)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while True:
    b = s.recv(65536)
    if not b:
        break
    sys.stdout.buffer.write(b)
sys.stdout.buffer.flush()
"#;
    let mut child = Command::new(NETLAB)
        .args(&lab.prefix("visitor")[1..])
        .args(["python3", "-c", CLIENT, RELAY_IP, &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python3 in the visitor namespace");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || {
        // An error here shows up as a short echo below.
        let _ = stdin.write_all(&data);
    });
    let mut received = Vec::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut received)
        .unwrap();
    writer.join().unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "visitor client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    received
}

/// A connector that comes back after an unclean drop gets its names at once:
/// the relay (with a long heartbeat, so it still believes in the dead link)
/// replaces the stale link instead of answering "name taken" or routing
/// visitors into it until it times out.
#[test]
fn a_returning_connector_replaces_its_stale_link_at_once() {
    let Some(lab) = Lab::up() else {
        return;
    };
    let state = TempDir::new("netlab-relay-state");
    let relay = Relay::new()
        .wrapped(&lab.prefix("relay"))
        .args(&[
            "--listen",
            &format!("{RELAY_IP}:{LINK_PORT}"),
            "--http",
            &format!("{RELAY_IP}:{HTTP_PORT}"),
        ])
        // Far longer than the test: the relay never notices the drop itself.
        .args(&["--heartbeat", "300s"])
        .domain(&format!("http,tcp:*.example.net:{SECRET}"))
        .state_dir(state.path())
        .start();
    let backend = Backend::start_wrapped("http", &lab.prefix("device"), "127.0.0.1");
    let connector = Connector::new(&relay)
        .wrapped(&lab.prefix("device"))
        .secret(SECRET)
        .kite(&format!("http:{KITE}={}", backend.addr()))
        .args(&["--heartbeat", HEARTBEAT, "--max-backoff", MAX_BACKOFF])
        .start();
    assert_eq!(lab.visit("/"), Some((200, HELLO.to_string())));

    let reset = Instant::now();
    lab.netlab("nat-reset", &[]);
    logged(&connector, "heartbeat timeout", reset);
    let took = kite_serves(&lab, reset, "nat-reset with a stale link on the relay");
    assert!(
        took < scaled(Duration::from_secs(60)),
        "kite came back only after {took:?}"
    );
    relay.proc.wait_for("replacing its previous link");
    assert_eq!(
        relay.proc.count("heartbeat timeout"),
        0,
        "the relay never timed the old link out"
    );
    assert_eq!(link_lines(&relay).len(), 2);
}

/// A pagekite.py back-end (Debian's `pagekite`) behind the NAT serves an
/// HTTP kite through kitepipe's relay speaking PageKite (`--pagekite`), and
/// after the NAT forgets its tunnel it notices by its own pings, dials
/// again through the NAT and serves again.
#[test]
fn pagekite_backend_through_nat_and_after_a_nat_reset() {
    let Some(lab) = Lab::up() else {
        return;
    };
    if !require_tool("pagekite", "pagekite") {
        return;
    }
    let state = TempDir::new("netlab-relay-state");
    let relay = Relay::new()
        .wrapped(&lab.prefix("relay"))
        .args(&[
            "--listen",
            &format!("{RELAY_IP}:{LINK_PORT}"),
            "--http",
            &format!("{RELAY_IP}:{HTTP_PORT}"),
            "--tcp-bind",
            RELAY_IP,
            "--pagekite",
        ])
        .args(&["--heartbeat", HEARTBEAT])
        .domain(&format!("http,tcp:*.example.net:{SECRET}"))
        .state_dir(state.path())
        .start();
    let backend = Backend::start_wrapped("http", &lab.prefix("device"), "127.0.0.1");
    let home = TempDir::new("netlab-pagekite-home");
    let pagekite = start_pagekite_backend(&lab, &backend, home.path());

    let started = Instant::now();
    kite_serves(&lab, started, "pagekite.py started");
    let (status, headers) = lab.visit("/headers").expect("visitor gets an answer");
    assert_eq!(status, 200);
    let headers: serde_json::Value = serde_json::from_str(&headers).unwrap();
    assert_eq!(headers["host"], KITE);
    // The visitor's address crossed the tunnel (RIP), and pagekite.py put it
    // in X-Forwarded-For.
    assert_eq!(headers["x-forwarded-for"], lab.var("NETLAB_VISITOR_IP"));
    assert_eq!(pagekite.count(PAGEKITE_DIALS), 1, "{}", pagekite.output());
    // The relay sees the tunnel coming from the NAT, never from the LAN.
    let public = lab.var("NETLAB_NAT_PUBLIC_IP");
    let tunnels = pagekite_tunnel_lines(&relay);
    assert_eq!(tunnels.len(), 1, "{}", relay.proc.output());
    assert!(
        tunnels[0].contains(&format!("peer={public}:")),
        "{tunnels:?}"
    );
    let device = lab.var("NETLAB_DEVICE_IP");
    assert!(
        !relay.proc.output().contains(device),
        "{}",
        relay.proc.output()
    );

    let reset = Instant::now();
    lab.netlab("nat-reset", &[]);
    // The old tunnel is dead at once: the NAT drops its packets silently.
    assert_ne!(
        lab.visit("/"),
        Some((200, HELLO.to_string())),
        "the old tunnel still serves"
    );
    // pagekite.py pings an idle tunnel every 20 s (`--keepalive`, its
    // minimum) and drops it 45 s after the last sign of life (its fixed
    // grace), then dials again within its 5 s check loop: about 50-70 s.
    wait_within(
        "pagekite.py to dial the relay again after the nat-reset",
        scaled(Duration::from_secs(150)),
        || (pagekite.count(PAGEKITE_DIALS) >= 2).then_some(()),
    );
    eprintln!(
        "netlab: pagekite.py dialed again {:.2?} after the nat-reset",
        reset.elapsed()
    );
    kite_serves(&lab, reset, "netlab nat-reset (pagekite.py back-end)");
    let (status, headers) = lab.visit("/headers").expect("visitor gets an answer");
    assert_eq!(status, 200);
    let headers: serde_json::Value = serde_json::from_str(&headers).unwrap();
    assert_eq!(headers["host"], KITE);
    assert_eq!(headers["x-forwarded-for"], lab.var("NETLAB_VISITOR_IP"));
    // The new tunnel came through the same NAT, on a new connection.
    let tunnels = pagekite_tunnel_lines(&relay);
    assert_eq!(tunnels.len(), 2, "{}", relay.proc.output());
    assert!(
        tunnels
            .iter()
            .all(|l| l.contains(&format!("peer={public}:"))),
        "{tunnels:?}"
    );
}

/// The relay's "PageKite kite online" lines (their span names the peer address).
fn pagekite_tunnel_lines(relay: &RelayProc) -> Vec<String> {
    relay
        .proc
        .output()
        .lines()
        .filter(|l| l.contains("PageKite kite online"))
        .map(str::to_string)
        .collect()
}

/// What pagekite.py logs each time it dials its front-end (the relay).
const PAGEKITE_DIALS: &str = "connect=198.51.100.1:8443";

/// pagekite.py as a back-end in the device namespace: one HTTP kite for
/// `backend`, the relay as its front-end, its own empty `home` (`--clean`:
/// no ~/.pagekite.rc), logging to stdout. Stopped by PID when dropped.
fn start_pagekite_backend(lab: &Lab, backend: &Backend, home: &Path) -> Proc {
    assert_eq!(PAGEKITE_DIALS, format!("connect={RELAY_IP}:{LINK_PORT}"));
    let mut command = Command::new(NETLAB);
    command
        .args(&lab.prefix("device")[1..])
        .arg("env")
        .arg(format!("HOME={}", home.display()))
        .args([
            "pagekite",
            "--clean",
            "--nullui",
            "--nocrashreport",
            "--logfile=stdio",
            "--keepalive=20",
        ])
        .arg(format!("--frontend={RELAY_IP}:{LINK_PORT}"))
        .arg(format!(
            "--service_on=http:{KITE}:127.0.0.1:{}:{SECRET}",
            backend.port
        ));
    Proc::spawn("pagekite", command)
}

/// Polls `check` until it returns `Some`, or panics after `bound` (for
/// waits longer than `patience()`, e.g. a peer's own fixed timers); returns
/// what it returned.
fn wait_within<T>(what: &str, bound: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            start.elapsed() < bound,
            "timed out after {bound:?} waiting for: {what}"
        );
        std::thread::park_timeout(Duration::from_millis(100));
    }
}
