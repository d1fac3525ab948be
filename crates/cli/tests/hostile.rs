//! Hostile visitors against real relay and connector processes on loopback:
//! garbage on every port, oversized and dripping heads, floods of
//! connections and readers that never read. No node crashes, nothing leaks,
//! and a good kite keeps being served throughout.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::*;

const SECRET: &str = "hostile-secret";
const GOOD_HOST: &str = "good.example.net";
const ECHO_KITE: &str = "echo.example.net";

/// The relay's `HEAD_TIMEOUT`: a visitor's first head must arrive within it.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a test socket waits to connect, or for one read or write
/// (20 s, scaled like the tests' patience).
fn io_timeout() -> Duration {
    scaled(Duration::from_secs(20))
}

/// Visitor connections opened at once by the flood tests.
const FLOOD: usize = 2_000;

/// Open file descriptors a process may keep above its baseline after a
/// flood (e.g. a connection the relay is still finishing).
const FD_TOLERANCE: usize = 5;

/// A relay serving an HTTP kite and a TCP kite (an echo service) from one
/// connector.
struct Scene {
    relay: RelayProc,
    _http: Backend,
    echo: EchoServer,
    connector: Proc,
    /// Public port of the TCP kite on the relay.
    tcp_port: u16,
}

impl Scene {
    fn start() -> Scene {
        let relay = Relay::new()
            .domain(&format!("http,tcp:*.example.net:{SECRET}"))
            .start();
        let http = Backend::start("http");
        let echo = EchoServer::start();
        let connector = Connector::new(&relay)
            .secret(SECRET)
            .kite(&format!("http:{GOOD_HOST}={}", http.addr()))
            .kite(&format!("tcp:{ECHO_KITE}:0={}", echo.addr()))
            .start();
        let needle = format!("kite=tcp:{ECHO_KITE}:");
        let tcp_port = connector
            .output()
            .lines()
            .filter(|l| l.contains("kite online"))
            .find_map(|l| {
                let rest = &l[l.find(&needle)? + needle.len()..];
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                digits.parse().ok()
            })
            .expect("connector reports the TCP kite's public port");
        let scene = Scene {
            relay,
            _http: http,
            echo,
            connector,
            tcp_port,
        };
        scene.assert_healthy();
        scene
    }

    fn http_addr(&self) -> SocketAddr {
        self.relay.http.expect("relay has an HTTP listener")
    }

    fn tcp_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.tcp_port))
    }

    fn good_url(&self, path: &str) -> String {
        format!("{}{path}", self.relay.http_url())
    }

    /// Both nodes alive, the HTTP kite and the TCP kite both answering.
    fn assert_healthy(&self) {
        assert!(
            self.relay.proc.exited().is_none(),
            "relay exited:\n{}",
            self.relay.proc.output()
        );
        assert!(
            self.connector.exited().is_none(),
            "connector exited:\n{}",
            self.connector.output()
        );
        assert_eq!(self.get_good(), "hello from backend\n");
        let payload = pseudo_random(4096, 7);
        assert_eq!(
            exchange(self.tcp_addr(), &payload, true),
            payload,
            "TCP kite echo"
        );
    }

    fn get_good(&self) -> String {
        curl_ok(&["-H", &format!("Host: {GOOD_HOST}"), &self.good_url("/")])
    }
}

/// An echo service for the TCP kite, on a tokio runtime in its own thread.
///
/// The Python backend listens with a backlog of 5: under a flood its kernel
/// completes handshakes it never accepts, and the connector would then wait
/// minutes for connections the backend does not know about. This one
/// accepts as fast as it is dialed; stopped (runtime dropped) on drop.
struct EchoServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    open: Arc<AtomicUsize>,
}

impl EchoServer {
    fn start() -> EchoServer {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("echo runtime");
        let socket = tokio::net::TcpSocket::new_v4().expect("echo socket");
        let listener = runtime.block_on(async {
            socket
                .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
                .expect("echo bind");
            socket.listen(4096).expect("echo listen")
        });
        let addr = listener.local_addr().expect("echo address");
        let open = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let counter = open.clone();
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let mut conns = tokio::task::JoinSet::new();
                tokio::pin!(stopped);
                loop {
                    tokio::select! {
                        _ = &mut stopped => return,
                        Some(_) = conns.join_next(), if !conns.is_empty() => {}
                        accepted = listener.accept() => {
                            let Ok((mut sock, _)) = accepted else { continue };
                            let counter = counter.clone();
                            counter.fetch_add(1, Ordering::SeqCst);
                            conns.spawn(async move {
                                let (mut reader, mut writer) = sock.split();
                                let _ = tokio::io::copy(&mut reader, &mut writer).await;
                                let _ = tokio::io::AsyncWriteExt::shutdown(&mut writer).await;
                                counter.fetch_sub(1, Ordering::SeqCst);
                            });
                        }
                    }
                }
            });
        });
        EchoServer {
            addr,
            stop: Some(stop),
            thread: Some(thread),
            open,
        }
    }

    fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Connections currently open.
    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[allow(clippy::disallowed_methods)] // Real processes run on the wall clock.
fn now() -> Instant {
    Instant::now()
}

fn connect(addr: SocketAddr) -> TcpStream {
    let sock = TcpStream::connect_timeout(&addr, io_timeout())
        .unwrap_or_else(|err| panic!("connect {addr}: {err}"));
    sock.set_read_timeout(Some(io_timeout()))
        .expect("set read timeout");
    sock.set_write_timeout(Some(io_timeout()))
        .expect("set write timeout");
    sock
}

/// How many of `socks` the peer has closed (EOF or reset), without
/// blocking or consuming what they received.
fn closed_by_peer(socks: &[TcpStream]) -> usize {
    let mut byte = [0u8; 1];
    socks
        .iter()
        .filter(|sock| {
            sock.set_nonblocking(true).expect("set nonblocking");
            let closed = match sock.peek(&mut byte) {
                Ok(0) => true,
                Ok(_) => false,
                Err(err) => err.kind() != std::io::ErrorKind::WouldBlock,
            };
            sock.set_nonblocking(false).expect("set blocking");
            closed
        })
        .count()
}

/// Reads until the peer closes (EOF or reset); panics if it keeps the
/// connection open past [`io_timeout`]. Returns what arrived (at most 1 MiB).
fn read_until_closed(sock: &mut TcpStream) -> Vec<u8> {
    let deadline = now() + io_timeout();
    let mut got = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    while got.len() < 1 << 20 {
        match sock.read(&mut chunk) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(err)
                if matches!(
                    err.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
                ) =>
            {
                return got;
            }
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!(
                    "peer kept the connection open for {:?}; got {} bytes",
                    io_timeout(),
                    got.len()
                )
            }
            Err(err) => panic!("read failed: {err}"),
        }
        assert!(now() < deadline, "peer kept sending for {:?}", io_timeout());
    }
    panic!("peer sent more than 1 MiB");
}

/// Sends `bytes` (half-closing after them if `half_close`), then reads until
/// the peer closes; returns what came back.
fn exchange(addr: SocketAddr, bytes: &[u8], half_close: bool) -> Vec<u8> {
    let mut sock = connect(addr);
    // The peer may close while we are still writing: that is allowed.
    let _ = sock.write_all(bytes);
    if half_close {
        let _ = sock.shutdown(Shutdown::Write);
    }
    read_until_closed(&mut sock)
}

/// Waits until `proc`'s open descriptors are back within tolerance of `baseline`.
fn wait_fds_back(proc: &Proc, baseline: usize) {
    eventually(
        &format!("{} fds back to {baseline} (+{FD_TOLERANCE})", proc.name),
        || (proc.fd_count() <= baseline + FD_TOLERANCE).then_some(()),
    );
}

/// Takes a process's descriptor count once it is steady (transient
/// connections from earlier checks finished).
fn steady_fds(proc: &Proc) -> usize {
    let mut last = proc.fd_count();
    eventually(&format!("{} fd count to settle", proc.name), || {
        let current = proc.fd_count();
        let steady = current == last;
        last = current;
        steady.then_some(current)
    })
}

fn status_line(response: &[u8]) -> String {
    String::from_utf8_lossy(response)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn garbage_on_every_port_closes_that_connection_only() {
    let scene = Scene::start();
    let link = scene.relay.link;
    let http = scene.http_addr();
    let random = pseudo_random(64 * 1024, 42);
    let http_request = format!("GET / HTTP/1.1\r\nHost: {GOOD_HOST}\r\n\r\n").into_bytes();
    // A TLS handshake record header followed by junk (a record length no
    // TLS peer may send, then noise).
    let mut tls_junk = vec![0x16, 0x03, 0x01, 0xff, 0xff];
    tls_junk.extend(pseudo_random(4096, 9));

    let handshake_failures = scene.relay.proc.count("link TLS handshake failed");
    for (what, bytes) in [
        ("random bytes", &random),
        ("an HTTP request", &http_request),
        ("a TLS junk handshake", &tls_junk),
    ] {
        let back = exchange(link, bytes, false);
        assert!(
            !String::from_utf8_lossy(&back).contains("hello from backend"),
            "{what} on the link port reached a kite"
        );
        scene.assert_healthy();
    }
    scene
        .relay
        .proc
        .wait_for_count("link TLS handshake failed", handshake_failures + 3);

    // The HTTP port answers junk with an error page (or just closes).
    for (what, bytes) in [
        ("random bytes", &random),
        ("a TLS junk handshake", &tls_junk),
    ] {
        let back = exchange(http, bytes, false);
        let status = status_line(&back);
        assert!(
            back.is_empty() || status.starts_with("HTTP/1.1 4"),
            "{what} on the HTTP port got {status:?}"
        );
        scene.assert_healthy();
    }

    // A TCP kite passes bytes through untouched: the echo service returns them.
    for bytes in [&random, &tls_junk] {
        assert_eq!(exchange(scene.tcp_addr(), bytes, true), *bytes);
        scene.assert_healthy();
    }
}

#[test]
fn oversized_head_gets_431_and_the_connection_is_closed() {
    let scene = Scene::start();
    let mut head = format!("GET / HTTP/1.1\r\nHost: {GOOD_HOST}\r\n").into_bytes();
    let pad = "a".repeat(1000);
    for i in 0..1000 {
        head.extend_from_slice(format!("X-Pad-{i}: {pad}\r\n").as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    assert!(head.len() > 1_000_000);

    let mut sock = connect(scene.http_addr());
    let mut writer = sock.try_clone().expect("clone socket");
    // Write from another thread: the relay answers (and closes) long before
    // the megabyte is sent, and the answer must be read meanwhile.
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(&head);
    });
    let back = read_until_closed(&mut sock);
    sender.join().expect("sender thread");
    let status = status_line(&back);
    assert!(status.starts_with("HTTP/1.1 431"), "got {status:?}");
    scene.assert_healthy();
}

#[test]
fn slowloris_gets_408_while_others_are_served() {
    let scene = Scene::start();
    let drip = format!(
        "GET / HTTP/1.1\r\nHost: {GOOD_HOST}\r\nX-Slow: {}",
        "a".repeat(64)
    )
    .into_bytes();
    let mut sock = connect(scene.http_addr());
    // Each read waits up to a second for the answer: that paces the drip.
    sock.set_read_timeout(Some(Duration::from_secs(1)))
        .expect("set read timeout");
    let started = now();
    let mut back = Vec::new();
    let mut closed = false;
    let mut chunk = [0u8; 4096];
    for byte in drip.iter().take(30) {
        // The relay may have closed already; the read below tells.
        let _ = sock.write_all(std::slice::from_ref(byte));
        match sock.read(&mut chunk) {
            Ok(0) => closed = true,
            Ok(n) => back.extend_from_slice(&chunk[..n]),
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => closed = true,
        }
        if closed || !back.is_empty() {
            break;
        }
        // Meanwhile other visitors are served normally.
        assert_eq!(scene.get_good(), "hello from backend\n");
    }
    let answered_after = started.elapsed();
    assert!(
        closed || !back.is_empty(),
        "relay kept the slow visitor for {answered_after:?}"
    );
    assert!(
        answered_after <= HEAD_TIMEOUT + scaled(Duration::from_secs(5)),
        "relay answered the slow visitor after {answered_after:?}"
    );
    if !closed {
        sock.set_read_timeout(Some(io_timeout()))
            .expect("set read timeout");
        back.extend(read_until_closed(&mut sock));
    }
    let status = status_line(&back);
    assert!(status.starts_with("HTTP/1.1 408"), "got {status:?}");
    scene.assert_healthy();
}

#[test]
fn flood_of_http_visitors_leaks_nothing() {
    let scene = Scene::start();
    let baseline = steady_fds(&scene.relay.proc);
    let partial = format!("GET / HTTP/1.1\r\nHost: {GOOD_HOST}\r\nX-Part");
    let mut socks = Vec::with_capacity(FLOOD);
    for i in 0..FLOOD {
        let mut sock = connect(scene.http_addr());
        if i % 2 == 0 {
            sock.write_all(partial.as_bytes())
                .expect("send a partial head");
        }
        socks.push(sock);
    }
    // The relay really holds them all, and still serves others.
    eventually("relay to accept the flood", || {
        (scene.relay.proc.fd_count() >= baseline + FLOOD - FD_TOLERANCE).then_some(())
    });
    for _ in 0..3 {
        assert_eq!(scene.get_good(), "hello from backend\n");
    }
    drop(socks);
    wait_fds_back(&scene.relay.proc, baseline);
    scene.assert_healthy();
}

#[test]
fn flood_of_tcp_visitors_leaks_nothing_on_either_node() {
    let scene = Scene::start();
    let relay_baseline = steady_fds(&scene.relay.proc);
    let connector_baseline = steady_fds(&scene.connector);
    let mut socks = Vec::with_capacity(FLOOD);
    for i in 0..FLOOD {
        let mut sock = connect(scene.tcp_addr());
        if i % 2 == 0 {
            sock.write_all(b"partial")
                .expect("send bytes to the TCP kite");
        }
        socks.push(sock);
    }
    // Every visitor is held, except those a bound refused: past the link's
    // queue of streams waiting to be accepted (`ACCEPT_QUEUE`, 1024) the
    // connector resets a stream `busy` and the relay closes its visitor,
    // which happens when the connector falls behind (two loaded cores). A
    // refused visitor is closed, never left hanging: count them on our side.
    let refused = eventually("relay to accept the flood", || {
        let refused = closed_by_peer(&socks);
        let held = FLOOD - refused;
        (scene.relay.proc.fd_count() + FD_TOLERANCE >= relay_baseline + held).then_some(refused)
    });
    assert!(
        refused <= FLOOD / 2,
        "{refused} of {FLOOD} visitors refused: more than the queue bound explains"
    );
    // Visitors keep being served while the flood is held.
    assert_eq!(scene.get_good(), "hello from backend\n");
    let payload = pseudo_random(1024, 3);
    assert_eq!(exchange(scene.tcp_addr(), &payload, true), payload);
    drop(socks);
    wait_fds_back(&scene.relay.proc, relay_baseline);
    wait_fds_back(&scene.connector, connector_baseline);
    assert_eq!(scene.echo.open(), 0, "echo backend still holds connections");
    scene.assert_healthy();
}

#[test]
fn slow_reader_does_not_stall_others_or_grow_memory() {
    let scene = Scene::start();
    let mut slow = connect(scene.http_addr());
    slow.write_all(
        format!("GET /bytes/200000000 HTTP/1.1\r\nHost: {GOOD_HOST}\r\n\r\n").as_bytes(),
    )
    .expect("send the slow request");
    // The download has started flowing; from here on nobody reads it.
    let mut peek = [0u8; 64];
    let n = slow.peek(&mut peek).expect("the slow download starts");
    assert!(status_line(&peek[..n]).starts_with("HTTP/1.1 200"));

    let started = now();
    let (code, out, err) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
        "--max-time",
        "30",
        "-H",
        &format!("Host: {GOOD_HOST}"),
        &scene.good_url("/bytes/10000000"),
    ]);
    let took = started.elapsed();
    assert_eq!(
        code, 0,
        "download next to a slow reader failed after {took:?}: {err}"
    );
    assert_eq!(String::from_utf8_lossy(&out), "10000000");
    assert!(
        took < scaled(Duration::from_secs(20)),
        "download took {took:?} next to a slow reader"
    );

    for _ in 0..3 {
        assert_eq!(scene.get_good(), "hello from backend\n");
    }
    let relay_rss = scene.relay.proc.rss_kib();
    let connector_rss = scene.connector.rss_kib();
    assert!(
        relay_rss > 0 && relay_rss < 100 * 1024,
        "relay RSS {relay_rss} KiB"
    );
    assert!(
        connector_rss > 0 && connector_rss < 100 * 1024,
        "connector RSS {connector_rss} KiB"
    );
    drop(slow);
    scene.assert_healthy();
}
