//! Attacker tests: HTTP/2 visitors (h2c with prior knowledge on the relay's
//! plain HTTP port) sending frames by hand: the rapid-reset flood
//! (CVE-2023-44487: HEADERS then RST_STREAM, thousands of times) and the
//! CONTINUATION flood (a header block that never ends). The relay's memory
//! stays under a bound, the flooding connection is cut, and another
//! visitor is served during and after.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::support::*;

const SECRET: &str = "h2-attacker-secret";

/// The HTTP/2 connection preface a client sends first (RFC 9113 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How far the relay's resident memory may grow during a flood. A relay
/// that kept a stream, a link stream or a header block per frame would
/// pass it within seconds of these floods.
const RSS_GROWTH_KIB: u64 = 64 * 1024;

/// The frame types these tests write or look for (RFC 9113 6).
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// A relay with an http kite `h2.example.net` in front of the test
/// backend; the connector is linked.
fn scene() -> (RelayProc, Backend, Proc) {
    let relay = Relay::new()
        .domain(&format!("http:*.example.net:{SECRET}"))
        .start();
    let backend = Backend::start("http");
    let connector = Connector::new(&relay)
        .secret(SECRET)
        .kite(&format!("http:h2.example.net={}", backend.addr()))
        .start();
    (relay, backend, connector)
}

/// One frame: 9-byte header (length, type, flags, stream id), payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("test frames are small");
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK header block for `GET http://h2.example.net/` using only the
/// static table and literals (no dynamic table, no Huffman).
fn get_block() -> Vec<u8> {
    let authority = b"h2.example.net";
    // :method GET, :scheme http, :path / (static indexes 2, 6, 4).
    let mut block = vec![0x82, 0x86, 0x84];
    // :authority (static name 1), literal without indexing.
    block.push(0x01);
    block.push(authority.len() as u8);
    block.extend_from_slice(authority);
    block
}

/// A connection to the relay's HTTP port that has sent the preface and
/// an empty SETTINGS; a thread drains what the relay sends and records
/// whether a GOAWAY came, and when the connection ended.
struct Visitor {
    sock: TcpStream,
    goaway: Arc<AtomicBool>,
    ended: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    /// HEADERS frames received (responses begun).
    responses: Arc<AtomicU64>,
}

impl Visitor {
    fn open(relay: &RelayProc) -> Visitor {
        let mut sock = TcpStream::connect(relay.http.expect("relay has an HTTP port"))
            .expect("connect to the relay");
        sock.set_write_timeout(Some(patience())).unwrap();
        sock.write_all(PREFACE).unwrap();
        sock.write_all(&frame(SETTINGS, 0, 0, &[])).unwrap();
        let goaway = Arc::new(AtomicBool::new(false));
        let ended = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let responses = Arc::new(AtomicU64::new(0));
        let mut reader = sock.try_clone().unwrap();
        reader.set_read_timeout(Some(patience() * 2)).unwrap();
        let (goaway2, ended2, received2) = (goaway.clone(), ended.clone(), received.clone());
        let responses2 = responses.clone();
        std::thread::spawn(move || {
            let mut header = [0u8; 9];
            let mut payload = vec![0u8; 1 << 24];
            loop {
                if reader.read_exact(&mut header).is_err() {
                    break;
                }
                let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
                if reader.read_exact(&mut payload[..len]).is_err() {
                    break;
                }
                received2.fetch_add(1, Ordering::SeqCst);
                match header[3] {
                    GOAWAY => goaway2.store(true, Ordering::SeqCst),
                    HEADERS => {
                        responses2.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {}
                }
            }
            ended2.store(true, Ordering::SeqCst);
        });
        Visitor {
            sock,
            goaway,
            ended,
            received,
            responses,
        }
    }
}

/// `curl --http2-prior-knowledge` through the relay: the body of `/`.
fn h2_visit(relay: &RelayProc) -> String {
    curl_ok(&[
        "--http2-prior-knowledge",
        "-H",
        "Host: h2.example.net",
        &format!("{}/", relay.http_url()),
    ])
}

/// Writes `batch` until 64 MiB went out, or the relay closes or stops
/// reading (a write stalled for [`patience`]); samples the relay's memory
/// on the way. Returns (bytes sent, peak RSS in KiB).
fn flood(
    relay: &RelayProc,
    visitor: &mut Visitor,
    mut batch: impl FnMut() -> Vec<u8>,
) -> (u64, u64) {
    const MAX_BYTES: u64 = 64 << 20;
    let mut sent = 0u64;
    let mut peak = relay.proc.rss_kib();
    let mut n_batches = 0u64;
    while sent < MAX_BYTES {
        let bytes = batch();
        if visitor.sock.write_all(&bytes).is_err() {
            break;
        }
        sent += bytes.len() as u64;
        n_batches += 1;
        if n_batches.is_multiple_of(16) {
            peak = peak.max(relay.proc.rss_kib());
        }
    }
    (sent, peak.max(relay.proc.rss_kib()))
}

/// Rapid reset: a visitor opens a stream and cancels it at once, tens of
/// thousands of times on one connection. hyper's bound on streams reset
/// before they were served ends the connection with GOAWAY; the relay's
/// memory stays bounded and a well-behaved h2 visitor is served during
/// the flood and after it.
#[test]
fn an_h2_rapid_reset_flood_is_cut_and_others_are_served() {
    if !require_tool("curl", "curl") {
        return;
    }
    let (relay, _backend, _connector) = scene();
    assert_eq!(h2_visit(&relay), "hello from backend\n");
    let baseline = relay.proc.rss_kib();
    let mut visitor = Visitor::open(&relay);
    let others = {
        let url = relay.http_url();
        std::thread::spawn(move || {
            (0..5)
                .map(|_| {
                    curl(&[
                        "--http2-prior-knowledge",
                        "-H",
                        "Host: h2.example.net",
                        &format!("{url}/"),
                    ])
                })
                .collect::<Vec<_>>()
        })
    };
    let block = get_block();
    let mut stream = 1u32;
    let (sent, peak) = flood(&relay, &mut visitor, || {
        let mut bytes = Vec::new();
        for _ in 0..100 {
            bytes.extend(frame(HEADERS, END_STREAM | END_HEADERS, stream, &block));
            // CANCEL (0x8).
            bytes.extend(frame(RST_STREAM, 0, stream, &8u32.to_be_bytes()));
            stream += 2;
        }
        bytes
    });
    eprintln!(
        "rapid reset: {} streams, {sent} bytes, peak RSS {peak} KiB (baseline {baseline})",
        stream / 2
    );
    eventually("the relay ends the flooding connection", || {
        visitor.ended.load(Ordering::SeqCst).then_some(())
    });
    assert!(
        visitor.goaway.load(Ordering::SeqCst),
        "the relay cut the flood without a GOAWAY ({} frames received)",
        visitor.received.load(Ordering::SeqCst)
    );
    assert!(
        stream / 2 < 200_000,
        "the relay accepted {} streams on one connection",
        stream / 2
    );
    assert!(
        peak < baseline + RSS_GROWTH_KIB,
        "relay RSS grew from {baseline} KiB to {peak} KiB"
    );
    for (code, body, err) in others.join().unwrap() {
        assert_eq!(code, 0, "another visitor during the flood: {err}");
        assert_eq!(body, b"hello from backend\n");
    }
    assert_eq!(h2_visit(&relay), "hello from backend\n");
}

/// CONTINUATION flood: a HEADERS frame without END_HEADERS, then header
/// bytes in CONTINUATION frames that never end the block. The relay
/// refuses the block once it passes the header list bound and closes the
/// connection, without buffering what it was sent; others are served.
#[test]
fn an_h2_continuation_flood_is_cut_and_others_are_served() {
    if !require_tool("curl", "curl") {
        return;
    }
    let (relay, _backend, _connector) = scene();
    assert_eq!(h2_visit(&relay), "hello from backend\n");
    let baseline = relay.proc.rss_kib();
    let mut visitor = Visitor::open(&relay);
    visitor
        .sock
        .write_all(&frame(HEADERS, END_STREAM, 1, &get_block()))
        .unwrap();
    // Literal header fields without indexing, new name `x-a`, a 100-byte
    // value: each one adds 135 bytes to the header list.
    let mut field = vec![0x00, 0x03];
    field.extend_from_slice(b"x-a");
    field.push(100);
    field.extend_from_slice(&[b'v'; 100]);
    let payload: Vec<u8> = field.iter().copied().cycle().take(16_000).collect();
    let (sent, peak) = flood(&relay, &mut visitor, || {
        let mut bytes = Vec::new();
        for _ in 0..4 {
            bytes.extend(frame(CONTINUATION, 0, 1, &payload));
        }
        bytes
    });
    eprintln!("continuation: {sent} bytes, peak RSS {peak} KiB (baseline {baseline})");
    eventually("the relay ends the flooding connection", || {
        visitor.ended.load(Ordering::SeqCst).then_some(())
    });
    // The socket buffers on both sides hold a few MiB; the relay must
    // have stopped long before the flood's 64 MiB.
    assert!(
        sent < 32 << 20,
        "the relay read {sent} bytes of one header block"
    );
    assert!(
        peak < baseline + RSS_GROWTH_KIB,
        "relay RSS grew from {baseline} KiB to {peak} KiB"
    );
    assert_eq!(h2_visit(&relay), "hello from backend\n");
}

/// Slow drip: a HEADERS frame announced at 16 KiB whose bytes come one
/// every 50 ms. The relay closes the connection once it has had no
/// complete request for its head timeout (10 s, then a GOAWAY grace),
/// like a slowloris on the HTTP/1 path; the drip does not keep it open for
/// the test's patience (30 s, about 600 bytes of the 16 KiB).
#[test]
fn an_h2_header_frame_dripped_forever_is_cut() {
    let (relay, _backend, _connector) = scene();
    let mut visitor = Visitor::open(&relay);
    let mut block = get_block();
    // Padding the block with one literal `x-a: vvv...` to 16 KiB.
    let value_len = 16_384 - block.len() - 8;
    block.extend_from_slice(&[0x00, 0x03, b'x', b'-', b'a', 0x7f]);
    // The value's length past the 7-bit prefix (RFC 7541 5.1), < 128^2.
    let rest = value_len - 127;
    block.extend_from_slice(&[0x80 | (rest % 128) as u8, (rest / 128) as u8]);
    block.resize(block.len() + value_len, b'v');
    let whole = frame(HEADERS, END_STREAM | END_HEADERS, 1, &block);
    let mut bytes = whole.iter();
    let mut n_dripped = 0u32;
    eventually("the relay cuts the dripping connection", || {
        if let Some(byte) = bytes.next()
            && visitor.sock.write_all(&[*byte]).is_ok()
        {
            n_dripped += 1;
        }
        visitor.ended.load(Ordering::SeqCst).then_some(())
    });
    eprintln!("drip: cut after {n_dripped} bytes");
    assert!(
        (n_dripped as usize) < whole.len(),
        "the whole frame went out before the relay cut the connection"
    );
    assert!(
        n_dripped > 100,
        "cut after {n_dripped} bytes: by something else than the head timeout"
    );
    assert_eq!(h2_visit(&relay), "hello from backend\n");
}

/// A cut response never looks complete over HTTP/2 either: the local
/// service sends part of a Content-Length body, then its connector dies;
/// the relay resets the visitor's stream, and curl fails instead of
/// ending the response cleanly.
#[test]
fn a_connector_killed_mid_response_resets_the_h2_stream() {
    if !require_tool("curl", "curl") {
        return;
    }
    let relay = Relay::new()
        .domain(&format!("http:*.example.net:{SECRET}"))
        .start();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = listener.local_addr().unwrap();
    let wrote = Arc::new(AtomicBool::new(false));
    let wrote2 = wrote.clone();
    // Serves one connection: half a response, then nothing, for as long as
    // the test process lives.
    std::thread::spawn(move || {
        let (mut sock, _) = listener.accept().unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && sock.read(&mut byte).is_ok_and(|n| n == 1) {
            head.push(byte[0]);
        }
        let _ = sock.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n");
        let _ = sock.write_all(&[b'x'; 5000]);
        wrote2.store(true, Ordering::SeqCst);
        let _ = sock.read(&mut byte);
    });
    let mut connector = Connector::new(&relay)
        .secret(SECRET)
        .kite(&format!("http:cut.example.net={backend}"))
        .start();
    let url = format!("{}/", relay.http_url());
    let dir = TempDir::new("h2-cut");
    let file = dir.path().join("body");
    let out = path(&file);
    let visit = std::thread::spawn(move || {
        curl(&[
            "--http2-prior-knowledge",
            "-H",
            "Host: cut.example.net",
            "--no-buffer",
            "-o",
            &out,
            &url,
        ])
    });
    // The visitor has the head and part of the body: the response began.
    eventually("curl received half a response", || {
        let len = std::fs::metadata(&file).map_or(0, |m| m.len());
        (wrote.load(Ordering::SeqCst) && len == 5000).then_some(())
    });
    connector.kill();
    let (code, _, err) = visit.join().unwrap();
    assert_ne!(code, 0, "curl took a cut response for a whole one");
    let len = std::fs::metadata(&file).map_or(0, |m| m.len());
    assert_eq!(len, 5000);
    eprintln!("curl: exit {code}: {err}");
}

/// One visitor connection cannot open more than `HTTP1_POOL` (8)
/// connections to an HTTP/1.1 local service: 100 requests at once on one
/// h2 connection (the most it may have open), answered only once the
/// service is told to, reach it over 8 connections; the rest wait, then
/// reuse them, and every request is answered.
#[test]
fn one_h2_connection_opens_at_most_8_connections_to_an_http1_service() {
    let relay = Relay::new()
        .domain(&format!("http:*.example.net:{SECRET}"))
        .start();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let gate = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    let (accepted2, gate2) = (accepted.clone(), gate.clone());
    // Answers every request `ok` on keep-alive connections, once the gate
    // is open; lives as long as the test process.
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(mut sock) = sock else { continue };
            accepted2.fetch_add(1, Ordering::SeqCst);
            let gate = gate2.clone();
            std::thread::spawn(move || {
                loop {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match sock.read(&mut byte) {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let (open, opened) = &*gate;
                    let mut open = open.lock().unwrap();
                    while !*open {
                        open = opened.wait(open).unwrap();
                    }
                    drop(open);
                    if sock
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    let _connector = Connector::new(&relay)
        .secret(SECRET)
        .kite(&format!("http:h2.example.net={backend}"))
        .start();
    let mut visitor = Visitor::open(&relay);
    let block = get_block();
    let mut requests = Vec::new();
    for n in 0..100u32 {
        requests.extend(frame(HEADERS, END_STREAM | END_HEADERS, 2 * n + 1, &block));
    }
    visitor.sock.write_all(&requests).unwrap();
    eventually("the relay opens its pool's 8 connections", || {
        (accepted.load(Ordering::SeqCst) >= 8).then_some(())
    });
    // Give the relay time to open more, if it would.
    std::thread::park_timeout(std::time::Duration::from_millis(500));
    assert_eq!(accepted.load(Ordering::SeqCst), 8);
    assert_eq!(visitor.responses.load(Ordering::SeqCst), 0);
    let (open, opened) = &*gate;
    *open.lock().unwrap() = true;
    opened.notify_all();
    eventually("every request is answered", || {
        (visitor.responses.load(Ordering::SeqCst) == 100).then_some(())
    });
    assert_eq!(accepted.load(Ordering::SeqCst), 8);
}

/// A visitor that never reads: it opens 100 streams for 10 MB downloads,
/// announces the largest flow-control windows, and never reads a byte.
/// The relay queues a bounded amount per stream and stops reading the
/// local service (no body is buffered whole), and keeps serving others.
#[test]
fn an_h2_visitor_that_never_reads_holds_bounded_memory() {
    let (relay, _backend, _connector) = scene();
    assert_eq!(h2_visit(&relay), "hello from backend\n");
    let baseline = relay.proc.rss_kib();
    let mut sock = TcpStream::connect(relay.http.expect("relay has an HTTP port")).unwrap();
    sock.set_write_timeout(Some(patience())).unwrap();
    // SETTINGS_INITIAL_WINDOW_SIZE (0x4) = 2^31 - 1, and the connection's
    // window raised as far (WINDOW_UPDATE, type 0x8).
    let mut settings = vec![0x00, 0x04];
    settings.extend_from_slice(&0x7fff_ffffu32.to_be_bytes());
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(SETTINGS, 0, 0, &settings));
    bytes.extend(frame(0x8, 0, 0, &0x7fff_0000u32.to_be_bytes()));
    let authority = b"h2.example.net";
    let path = b"/bytes/10000000";
    for n in 0..100u32 {
        // :method GET, :scheme http, :path and :authority as literals.
        let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
        block.extend_from_slice(path);
        block.push(0x01);
        block.push(authority.len() as u8);
        block.extend_from_slice(authority);
        bytes.extend(frame(HEADERS, END_STREAM | END_HEADERS, 2 * n + 1, &block));
    }
    sock.write_all(&bytes).unwrap();
    let mut peak = baseline;
    for _ in 0..30 {
        std::thread::park_timeout(std::time::Duration::from_millis(100));
        peak = peak.max(relay.proc.rss_kib());
    }
    eprintln!("never reads: peak RSS {peak} KiB (baseline {baseline})");
    // The pool's 8 link streams hold at most their 1 MiB windows, the
    // streams' send queues 64 KiB each: about 15 MiB with the buffers
    // around them (a pool of 32 made it 40 MiB).
    assert!(
        peak < baseline + 24 * 1024,
        "relay RSS grew from {baseline} KiB to {peak} KiB"
    );
    assert_eq!(h2_visit(&relay), "hello from backend\n");
    drop(sock);
}
