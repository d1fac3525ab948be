//! Attacker tests: a hostile PageKite front-end against our connector
//! (`kitepipe connect --protocol pagekite`).
//!
//! A PageKite front-end is not authenticated (the tunnel is plaintext;
//! the kites' signatures prove the back-end, not the front-end), so
//! whoever answers on the front-end's address is a stranger. The fake
//! front-end here answers garbage heads, oversized and endless heads,
//! giant chunks, a zip bomb, 60,000 SIDs, and SIDs for names and
//! protocols the connector does not serve. The connector must stay
//! bounded (memory, descriptors), say what went wrong, reconnect, and
//! connect to nothing but its configured targets.

// Real processes and sockets run on the wall clock.
#![allow(clippy::disallowed_methods)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;

const SECRET: &str = "pagekite-hostile-fe-secret";
const KITE: &str = "app.pk.test";

/// What the fake front-end does with connection number `n` (from 0).
type Behaviour = Arc<dyn Fn(usize, TcpStream) + Send + Sync>;

/// A fake front-end: accepts on 127.0.0.1:0 and runs `behaviour` on each
/// connection in a thread of its own, until dropped.
struct HostileFe {
    port: u16,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl HostileFe {
    fn start(behaviour: Behaviour) -> HostileFe {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (accepted, stop) = (accepted.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((sock, _)) => {
                            sock.set_nonblocking(false).unwrap();
                            let n = accepted.fetch_add(1, Ordering::SeqCst);
                            let behaviour = behaviour.clone();
                            std::thread::spawn(move || behaviour(n, sock));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            });
        }
        HostileFe {
            port,
            accepted,
            stop,
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Waits until the connector dialed `count` times in all.
    fn wait_dials(&self, count: usize, bound: Duration) {
        let deadline = Instant::now() + bound;
        while self.accepted.load(Ordering::SeqCst) < count {
            assert!(
                Instant::now() < deadline,
                "the connector dialed {} times, not {count}, within {bound:?}",
                self.accepted.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for HostileFe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A local target that counts the connections it gets (and holds them).
struct Target {
    port: u16,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Target {
    fn start() -> Target {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (accepted, stop) = (accepted.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut held = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut sock, _)) => {
                            accepted.fetch_add(1, Ordering::SeqCst);
                            let _ =
                                sock.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n");
                            held.push(sock);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            });
        }
        Target {
            port,
            accepted,
            stop,
        }
    }

    fn count(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Our connector for `kites`, speaking PageKite to `fe`.
fn connector(fe: &HostileFe, kites: &[String]) -> Proc {
    let mut connector = Connector::to(&fe.addr(), "")
        .no_fingerprint()
        .args(&["--protocol", "pagekite", "--secret", SECRET])
        .args(&["--heartbeat", "3s", "--max-backoff", "1s"]);
    for kite in kites {
        connector = connector.kite(kite);
    }
    connector.spawn()
}

/// Reads the back-end's head (bounded) and returns it.
fn read_head(sock: &mut TcpStream) -> String {
    sock.set_read_timeout(Some(patience())).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
        match sock.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A front-end head accepting every kite the back-end asked for.
fn accept_all(head: &str, zchunks: bool) -> Vec<u8> {
    let mut out = String::from("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n");
    out.push_str("X-PageKite-Features: AddKites\r\n");
    if zchunks {
        out.push_str("X-PageKite-Features: ZChunks\r\n");
    }
    out.push_str("X-PageKite-Protos: http, raw\r\nX-PageKite-Ports: 80\r\n");
    for line in head.lines() {
        if let Some(request) = line.strip_prefix("X-PageKite: ") {
            let what: Vec<&str> = request.splitn(4, ':').take(3).collect();
            out.push_str(&format!("X-PageKite-OK: {}\r\n", what.join(":")));
        }
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// A plain chunk.
fn chunk(payload: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out
}

/// A chunk opening stream `sid` with these destination headers and an
/// HTTP request.
fn open_sid(sid: u32, proto: &str, host: &str, port: u16) -> Vec<u8> {
    chunk(
        format!(
            "SID: {sid}\r\nProto: {proto}\r\nHost: {host}\r\nPort: {port}\r\n\
             RIP: 192.0.2.7\r\nRPort: 4000\r\n\r\nGET / HTTP/1.1\r\nHost: {host}\r\n\r\n"
        )
        .as_bytes(),
    )
}

/// Drains what the connector sends on `sock` in a thread; the total.
fn drain(sock: &TcpStream) -> Arc<AtomicUsize> {
    let total = Arc::new(AtomicUsize::new(0));
    let mut reader = sock.try_clone().unwrap();
    let counted = total.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            counted.fetch_add(n, Ordering::SeqCst);
        }
    });
    total
}

/// Waits until the connector closed `sock` (a read gives EOF or an error).
fn wait_closed(sock: &mut TcpStream, within: Duration) -> bool {
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match sock.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

/// Waits until the connector sent `needle` on `sock` (true), or closed it
/// (true too: cut), within `within`.
fn wait_for_bytes(sock: &mut TcpStream, needle: &[u8], within: Duration) -> bool {
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match sock.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => {
                seen.extend_from_slice(&buf[..n]);
                if seen.windows(needle.len()).any(|w| w == needle) {
                    return true;
                }
                if seen.len() > 1 << 20 {
                    seen.drain(..seen.len() - needle.len());
                }
            }
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn garbage_oversized_and_endless_heads_are_cut_and_retried() {
    let closed = Arc::new(Mutex::new(Vec::new()));
    let seen = closed.clone();
    let fe = HostileFe::start(Arc::new(move |n, mut sock| {
        let head = read_head(&mut sock);
        assert!(
            head.starts_with("CONNECT PageKite:1 HTTP/1.0\r\n"),
            "{head}"
        );
        assert!(
            head.contains(&format!("X-PageKite: http:{KITE}:")),
            "{head}"
        );
        let cut = match n {
            // Not HTTP at all.
            0 => {
                let _ = sock.write_all(b"SSH-2.0-OpenSSH_9.2\r\n\xff\xfe\r\n\r\n");
                wait_closed(&mut sock, scaled(Duration::from_secs(10)))
            }
            // A head that never ends, as fast as the connector reads: cut
            // at the head bound, long before 8 MiB.
            1 => {
                let _ = sock.write_all(b"HTTP/1.1 200 OK\r\n");
                let line = format!("X-Pad: {}\r\n", "a".repeat(1000));
                let mut sent = 0;
                while sent < 8 << 20 {
                    if sock.write_all(line.as_bytes()).is_err() {
                        break;
                    }
                    sent += line.len();
                }
                sent < 8 << 20 || wait_closed(&mut sock, scaled(Duration::from_secs(10)))
            }
            // A head that trickles: cut by the handshake timeout.
            2 => {
                let _ = sock.write_all(b"HTTP/1.1 200 OK\r\nX-Slow: ");
                let started = Instant::now();
                let mut cut = false;
                while started.elapsed() < scaled(Duration::from_secs(40)) {
                    if sock.write_all(b"a").is_err() {
                        cut = true;
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
                cut
            }
            // Refusals by a front-end that says nothing useful.
            _ => {
                let _ = sock.write_all(b"HTTP/1.1 403 Forbidden\r\n\r\n");
                true
            }
        };
        seen.lock().unwrap().push((n, cut));
    }));
    let target = Target::start();
    let connector = connector(&fe, &[format!("http:{KITE}=127.0.0.1:{}", target.port)]);
    fe.wait_dials(4, patience() + scaled(Duration::from_secs(20)));
    eventually("the first three connections cut", || {
        let closed = closed.lock().unwrap();
        (closed.iter().filter(|(n, _)| *n < 3).count() == 3).then_some(())
    });
    for (n, cut) in closed.lock().unwrap().iter() {
        assert!(*cut, "connection {n} was not cut by the connector");
    }
    assert!(connector.exited().is_none(), "{}", connector.output());
    let out = connector.output();
    assert!(out.contains("cannot link to PageKite front-end"), "{out}");
    assert_eq!(connector.links_up(), 0, "{out}");
    assert_eq!(target.count(), 0);
}

#[test]
fn sids_for_names_and_protocols_we_do_not_serve_reach_nothing() {
    let target = Target::start();
    let other = Target::start();
    let answered = Arc::new(AtomicUsize::new(0));
    let replies = answered.clone();
    let fe = HostileFe::start(Arc::new(move |n, mut sock| {
        let head = read_head(&mut sock);
        if n > 0 {
            return;
        }
        sock.write_all(&accept_all(&head, false)).unwrap();
        let total = drain(&sock);
        let mut sid = 1;
        for (proto, host, port) in [
            ("http", "evil.example.net", 80),
            ("http", "pk.test", 80),
            ("http", "app.pk.test.evil.example.net", 80),
            ("https", KITE, 443),
            ("raw", KITE, 22),
            ("raw", "ssh.pk.test", 2222),
            ("gopher", KITE, 70),
            ("http", "127.0.0.1", 80),
        ] {
            sock.write_all(&open_sid(sid, proto, host, port)).unwrap();
            sid += 1;
        }
        // The one SID that is ours, last: once it reached the target the
        // others were all decided.
        sock.write_all(&open_sid(sid, "http", "APP.pk.test.", 80))
            .unwrap();
        std::thread::sleep(scaled(Duration::from_secs(3)));
        replies.store(total.load(Ordering::SeqCst), Ordering::SeqCst);
        wait_closed(&mut sock, patience());
    }));
    let connector = connector(
        &fe,
        &[
            format!("http:{KITE}=127.0.0.1:{}", target.port),
            format!("tcp:ssh.pk.test:22=127.0.0.1:{}", other.port),
        ],
    );
    connector.wait_links_up(1);
    eventually("the kite's own SID to reach its target", || {
        (target.count() == 1).then_some(())
    });
    eventually("the connector to answer the refused SIDs", || {
        (answered.load(Ordering::SeqCst) > 0).then_some(())
    });
    assert_eq!(target.count(), 1, "only the kite's own SID connects");
    assert_eq!(other.count(), 0, "raw SIDs for other names or ports");
    assert!(connector.exited().is_none(), "{}", connector.output());
}

#[test]
fn sixty_thousand_sids_stay_bounded() {
    // The kite's target refuses connections: every SID is tried and ends.
    let closed_port = free_port();
    let fe = HostileFe::start(Arc::new(move |n, mut sock| {
        let head = read_head(&mut sock);
        if n > 0 {
            return;
        }
        sock.write_all(&accept_all(&head, false)).unwrap();
        let _total = drain(&sock);
        let mut batch = Vec::new();
        for sid in 1..=60_000u32 {
            batch.extend_from_slice(&open_sid(sid, "http", KITE, 80));
            if batch.len() > 256 * 1024 {
                if sock.write_all(&batch).is_err() {
                    return;
                }
                batch.clear();
            }
        }
        let _ = sock.write_all(&batch);
        std::thread::sleep(patience());
    }));
    let connector = connector(&fe, &[format!("http:{KITE}=127.0.0.1:{closed_port}")]);
    connector.wait_links_up(1);
    let rss_before = connector.rss_kib();
    let started = Instant::now();
    let (mut max_fds, mut max_rss) = (0, 0);
    while started.elapsed() < scaled(Duration::from_secs(15)) {
        max_fds = max_fds.max(connector.fd_count());
        max_rss = max_rss.max(connector.rss_kib());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(connector.exited().is_none(), "{}", connector.output());
    // Every SID was tried, long past the 256 open at once: each ended
    // and gave its slot back.
    eventually("most of the 60,000 SIDs tried", || {
        (connector.count("local target unreachable") > 50_000).then_some(())
    });
    assert!(max_fds < 4096 + 64, "descriptors: {max_fds}");
    assert!(
        max_rss < rss_before + 160 * 1024,
        "memory grew from {rss_before} KiB to {max_rss} KiB"
    );
}

#[test]
fn a_giant_chunk_and_a_zip_bomb_are_refused_and_retried() {
    if !require_tool("python3", "python3") {
        return;
    }
    // 64 MiB of zeros in one zlib stream, flushed like a PageKite chunk.
    let bomb = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, zlib\n\
             c = zlib.compressobj(9)\n\
             sys.stdout.buffer.write(c.compress(b'SID: 1\\r\\n\\r\\n' + bytes(64 << 20)) + c.flush(zlib.Z_SYNC_FLUSH))",
        ])
        .output()
        .unwrap()
        .stdout;
    assert!(bomb.len() < 256 * 1024, "{}", bomb.len());
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let seen = outcomes.clone();
    let fe = HostileFe::start(Arc::new(move |n, mut sock| {
        let head = read_head(&mut sock);
        let _ = sock.write_all(&accept_all(&head, true));
        let cut = match n {
            // A chunk of 2 GiB announced.
            0 => {
                let _ = sock.write_all(b"7fffffff\r\nSID: 1\r\n\r\n");
                let junk = vec![b'x'; 64 * 1024];
                for _ in 0..64 {
                    if sock.write_all(&junk).is_err() {
                        break;
                    }
                }
                wait_closed(&mut sock, patience())
            }
            // A compressed chunk that says it is small and inflates to
            // 64 MiB: inflated no further than it said, then the connector
            // asks for a new compressor (ZRST) or closes.
            1 => {
                let _ = sock.write_all(format!("100Z{:x}\r\n", bomb.len()).as_bytes());
                let _ = sock.write_all(&bomb);
                let said = wait_for_bytes(&mut sock, b"ZRST", patience());
                let _ = sock.shutdown(std::net::Shutdown::Both);
                said
            }
            // One that says how big it is.
            2 => {
                let _ = sock.write_all(format!("4000000Z{:x}\r\n", bomb.len()).as_bytes());
                let _ = sock.write_all(&bomb);
                wait_closed(&mut sock, patience())
            }
            _ => {
                std::thread::sleep(patience());
                true
            }
        };
        seen.lock().unwrap().push((n, cut));
    }));
    let target = Target::start();
    let connector = connector(&fe, &[format!("http:{KITE}=127.0.0.1:{}", target.port)]);
    connector.wait_links_up(1);
    let rss_before = connector.rss_kib();
    fe.wait_dials(4, patience());
    let mut max_rss = connector.rss_kib();
    eventually("the three hostile tunnels cut", || {
        max_rss = max_rss.max(connector.rss_kib());
        let outcomes = outcomes.lock().unwrap();
        (outcomes.iter().filter(|(n, _)| *n < 3).count() == 3).then_some(())
    });
    for (n, cut) in outcomes.lock().unwrap().iter().filter(|(n, _)| *n < 3) {
        assert!(*cut, "tunnel {n} was not cut by the connector");
    }
    assert!(
        max_rss < rss_before + 32 * 1024,
        "memory grew from {rss_before} KiB to {max_rss} KiB"
    );
    assert_eq!(target.count(), 0, "no SID reached the target");
    assert!(connector.exited().is_none(), "{}", connector.output());
}

#[test]
fn data_flooded_toward_a_target_that_never_reads_stays_bounded() {
    // The target accepts and never reads: what the front-end sends piles
    // up in the connector unless its per-SID and per-tunnel bounds hold.
    let target = Target::start();
    let sent = Arc::new(AtomicUsize::new(0));
    let counted = sent.clone();
    let fe = HostileFe::start(Arc::new(move |n, mut sock| {
        let head = read_head(&mut sock);
        if n > 0 {
            return;
        }
        sock.write_all(&accept_all(&head, false)).unwrap();
        let _total = drain(&sock);
        // Short writes only: a stalled tunnel must not hold this thread.
        sock.set_write_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        for sid in 1..=400u32 {
            if sock.write_all(&open_sid(sid, "http", KITE, 80)).is_err() {
                return;
            }
        }
        let mut payload = Vec::new();
        let data = vec![b'x'; 200 * 1024];
        'flood: for _round in 0..16 {
            for sid in 1..=400u32 {
                payload.clear();
                payload.extend_from_slice(format!("SID: {sid}\r\n\r\n").as_bytes());
                payload.extend_from_slice(&data);
                if sock.write_all(&chunk(&payload)).is_err() {
                    break 'flood;
                }
                counted.fetch_add(data.len(), Ordering::SeqCst);
            }
        }
        std::thread::sleep(patience());
    }));
    let connector = connector(&fe, &[format!("http:{KITE}=127.0.0.1:{}", target.port)]);
    connector.wait_links_up(1);
    let rss_before = connector.rss_kib();
    let started = Instant::now();
    let mut max_rss = 0;
    while started.elapsed() < scaled(Duration::from_secs(10)) {
        max_rss = max_rss.max(connector.rss_kib());
        std::thread::sleep(Duration::from_millis(100));
    }
    let sent = sent.load(Ordering::SeqCst);
    assert!(sent > 64 << 20, "the front-end got only {sent} bytes out");
    assert!(
        target.count() <= 256,
        "{} SIDs reached the target at once (the tunnel's bound is 256)",
        target.count()
    );
    assert!(
        max_rss < rss_before + 192 * 1024,
        "memory grew from {rss_before} KiB to {max_rss} KiB with {sent} bytes sent"
    );
    assert!(connector.exited().is_none(), "{}", connector.output());
}
