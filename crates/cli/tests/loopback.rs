//! End to end on loopback: real relay and connector processes, a real
//! backend, real curl.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use support::*;

const SECRET: &str = "loopback-secret";

fn domain() -> String {
    format!("http,https,tcp:*.example.net:{SECRET}")
}

fn setup() -> (RelayProc, Backend, Proc) {
    let relay = Relay::new().domain(&domain()).start();
    let backend = Backend::start("http");
    let connector = Connector::new(&relay)
        .secret(SECRET)
        .kite(&format!("http:blog.example.net={}", backend.addr()))
        .start();
    (relay, backend, connector)
}

/// A `backend_extra.py whoami` backend: answers every GET with `backend PORT`.
struct WhoAmI {
    _proc: Proc,
    port: u16,
}

impl WhoAmI {
    fn start() -> WhoAmI {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/backend_extra.py");
        let mut command = Command::new("python3");
        command.arg("-u").arg(script).arg("whoami");
        let proc = Proc::spawn("backend-whoami", command);
        let out = proc.wait_for("READY ");
        let port = out
            .lines()
            .find_map(|l| l.strip_prefix("READY "))
            .and_then(|p| p.trim().parse().ok())
            .expect("whoami backend prints its port");
        WhoAmI { _proc: proc, port }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn answer(&self) -> String {
        format!("backend {}\n", self.port)
    }
}

/// Runs `curl -i` and splits the answer: (status, head, body).
fn curl_response(args: &[&str]) -> (u16, String, String) {
    let mut all = vec!["-i"];
    all.extend_from_slice(args);
    let (code, out, err) = curl(&all);
    assert_eq!(code, 0, "curl {args:?} failed: {err}");
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, head.to_string(), body.to_string())
}

/// The value of header `name` in a response head, if present.
fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().to_string())
    })
}

/// A socket to 127.0.0.1:`port` whose reads and writes give up after [`patience`].
fn connect(port: u16) -> TcpStream {
    let sock = TcpStream::connect(("127.0.0.1", port)).expect("connect to the relay");
    sock.set_read_timeout(Some(patience())).unwrap();
    sock.set_write_timeout(Some(patience())).unwrap();
    sock
}

fn write_temp(dir: &TempDir, name: &str, data: &[u8]) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, data).expect("write temp file");
    path
}

#[test]
fn get_through_the_relay_reaches_the_backend_with_forwarding_headers() {
    let (relay, _backend, _connector) = setup();
    let body = curl_ok(&[
        "-H",
        "Host: blog.example.net",
        &format!("{}/", relay.http_url()),
    ]);
    assert_eq!(body, "hello from backend\n");
    let headers = curl_ok(&[
        "-H",
        "Host: blog.example.net",
        &format!("{}/headers", relay.http_url()),
    ]);
    let headers: serde_json::Value = serde_json::from_str(&headers).unwrap();
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(headers["host"], "blog.example.net");
}

#[test]
fn a_10_mib_upload_arrives_intact_with_content_length_and_chunked() {
    let (relay, _backend, _connector) = setup();
    let data = pseudo_random(10 * 1024 * 1024, 7);
    let expected = sha256_hex(&data);
    let dir = TempDir::new("upload");
    let file = write_temp(&dir, "body.bin", &data);
    let body_arg = format!("@{}", file.display());
    let url = format!("{}/sha256", relay.http_url());
    for extra in [None, Some("Transfer-Encoding: chunked")] {
        let mut args = vec!["-H", "Host: blog.example.net", "--data-binary", &body_arg];
        if let Some(extra) = extra {
            args.extend(["-H", extra]);
        }
        args.push(&url);
        let answer: serde_json::Value = serde_json::from_str(&curl_ok(&args)).unwrap();
        assert_eq!(answer["len"], data.len(), "length with {extra:?}");
        assert_eq!(answer["sha256"], expected.as_str(), "digest with {extra:?}");
    }
}

#[test]
fn a_chunked_response_arrives_complete_and_in_order() {
    let (relay, _backend, _connector) = setup();
    let url = format!("{}/chunked", relay.http_url());
    let (status, head, body) = curl_response(&["-H", "Host: blog.example.net", &url]);
    assert_eq!(status, 200);
    assert_eq!(
        header(&head, "transfer-encoding").as_deref(),
        Some("chunked")
    );
    let expected: String = (0..10).map(|i| format!("chunk-{i}\n")).collect();
    assert_eq!(body, expected);
    // The chunk framing itself passes through untouched.
    let raw = curl_ok(&["--raw", "-H", "Host: blog.example.net", &url]);
    assert!(raw.starts_with("8\r\nchunk-0\n\r\n"), "{raw:?}");
    assert!(raw.ends_with("8\r\nchunk-9\n\r\n0\r\n\r\n"), "{raw:?}");
}

#[test]
fn keep_alive_requests_share_one_connection_to_the_backend() {
    let (relay, _backend, _connector) = setup();
    let url = format!("{}/conn", relay.http_url());
    let out = curl_ok(&[
        "-H",
        "Host: blog.example.net",
        "-w",
        "\n%{num_connects}\n",
        &url,
        &url,
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out:?}");
    assert_eq!(lines[1], "1", "first request connects: {out:?}");
    assert_eq!(
        lines[3], "0",
        "second request reuses the connection: {out:?}"
    );
    assert!(lines[0].starts_with("127.0.0.1:"), "{out:?}");
    assert_eq!(
        lines[0], lines[2],
        "the backend saw one client connection: {out:?}"
    );
}

// --- WebSocket ---

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn hand_written_base64_matches_rfc_4648_vectors() {
    let cases = [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ];
    for (input, expected) in cases {
        assert_eq!(base64(input.as_bytes()), expected, "{input:?}");
    }
}

fn websocket_accept(key: &str) -> String {
    let input = format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC11B85");
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, input.as_bytes());
    base64(digest.as_ref())
}

fn write_frame(sock: &mut TcpStream, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n < 65536 => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    sock.write_all(&frame).expect("send frame");
}

/// Reads one unmasked frame from the server: (first byte, payload).
fn read_frame(sock: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    sock.read_exact(&mut head).expect("frame head");
    assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
    let len = match head[1] & 0x7f {
        126 => {
            let mut n = [0u8; 2];
            sock.read_exact(&mut n).unwrap();
            u64::from(u16::from_be_bytes(n))
        }
        127 => {
            let mut n = [0u8; 8];
            sock.read_exact(&mut n).unwrap();
            u64::from_be_bytes(n)
        }
        n => u64::from(n),
    };
    assert!(len <= 1 << 20, "frame too long: {len}");
    let mut payload = vec![0u8; len as usize];
    sock.read_exact(&mut payload).expect("frame payload");
    (head[0], payload)
}

/// Reads a response head (up to 16 KiB) byte by byte, so nothing after it is consumed.
fn read_head(sock: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert!(head.len() < 16 * 1024, "response head too long");
        sock.read_exact(&mut byte).expect("response head");
        head.push(byte[0]);
    }
    String::from_utf8(head).expect("ASCII head")
}

#[test]
fn websocket_upgrade_and_frames_pass_through_the_relay() {
    let (relay, _backend, _connector) = setup();
    let mut sock = connect(relay.http.unwrap().port());
    let key = base64(&pseudo_random(16, 3));
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: blog.example.net\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    sock.write_all(request.as_bytes()).unwrap();
    let head = read_head(&mut sock);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(
        header(&head, "sec-websocket-accept"),
        Some(websocket_accept(&key)),
        "{head}"
    );
    assert_eq!(
        header(&head, "upgrade")
            .map(|v| v.to_ascii_lowercase())
            .as_deref(),
        Some("websocket")
    );

    write_frame(&mut sock, 0x1, b"hello through the relay", [1, 2, 3, 4]);
    assert_eq!(
        read_frame(&mut sock),
        (0x81, b"hello through the relay".to_vec())
    );

    let binary = pseudo_random(100_000, 11);
    write_frame(&mut sock, 0x2, &binary, [0xde, 0xad, 0xbe, 0xef]);
    let (first, echoed) = read_frame(&mut sock);
    assert_eq!(first, 0x82);
    assert_eq!(echoed.len(), binary.len());
    assert_eq!(sha256_hex(&echoed), sha256_hex(&binary));

    let medium = pseudo_random(1000, 12);
    write_frame(&mut sock, 0x2, &medium, [9, 8, 7, 6]);
    assert_eq!(read_frame(&mut sock), (0x82, medium));

    write_frame(&mut sock, 0x8, b"", [5, 6, 7, 8]);
    assert_eq!(read_frame(&mut sock), (0x88, Vec::new()));
}

// --- TCP kites ---

/// Sends `data` on a fresh connection to `port`, half-closes, reads everything back.
fn echo_round_trip(port: u16, data: Vec<u8>) -> Vec<u8> {
    let sock = connect(port);
    let mut writer = sock.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        writer.write_all(&data).expect("send to the TCP kite");
        writer.shutdown(Shutdown::Write).expect("half-close");
    });
    let mut back = Vec::new();
    let mut reader = sock;
    reader.read_to_end(&mut back).expect("read the echo");
    sender.join().expect("sender thread");
    back
}

/// Threads of a process, from /proc.
fn thread_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("read /proc/PID/task")
        .count()
}

/// Four concurrent connections through a TCP kite, 5 MiB each way each.
/// Returns the relay's and the connector's thread counts.
fn tcp_kite_round_trips(relay_args: &[&str], connector_args: &[&str]) -> (usize, usize) {
    let relay = Relay::new().domain(&domain()).args(relay_args).start();
    let echo = Backend::start("tcp-echo");
    let connector = Connector::new(&relay)
        .secret(SECRET)
        .kite(&format!("tcp:db.example.net:0={}", echo.addr()))
        .args(connector_args)
        .start();
    let port = connector.tcp_kite_port("db.example.net");
    assert_ne!(port, 0);
    let workers: Vec<_> = (0..4u64)
        .map(|i| {
            std::thread::spawn(move || {
                let data = pseudo_random(5 * 1024 * 1024, 100 + i);
                let expected = sha256_hex(&data);
                let back = echo_round_trip(port, data);
                assert_eq!(back.len(), 5 * 1024 * 1024, "connection {i}");
                assert_eq!(sha256_hex(&back), expected, "connection {i}");
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("a TCP kite connection failed");
    }
    assert_eq!(connector.links_up(), 1, "one link carried everything");
    (
        thread_count(relay.proc.pid()),
        thread_count(connector.pid()),
    )
}

#[test]
fn tcp_kite_carries_5_mib_both_ways_on_four_concurrent_connections() {
    // Defaults: the connector on one thread.
    let (_, connector_threads) = tcp_kite_round_trips(&[], &[]);
    assert_eq!(connector_threads, 1, "a connector runs on one thread");
}

#[test]
fn tcp_kite_carries_the_same_with_both_ends_on_several_threads() {
    let (relay_threads, connector_threads) =
        tcp_kite_round_trips(&["--threads", "3"], &["--threads", "3"]);
    // The main thread and three workers (and perhaps a blocking-pool thread).
    assert!(relay_threads >= 4, "relay has {relay_threads} threads");
    assert!(
        connector_threads >= 4,
        "connector has {connector_threads} threads"
    );
}

// --- Error pages ---

#[test]
fn unknown_name_gets_a_404_page_naming_it() {
    let (relay, _backend, _connector) = setup();
    let (status, head, body) =
        curl_response(&["-H", "Host: nosuch.example.org", &relay.http_url()]);
    assert_eq!(status, 404, "{head}");
    assert_eq!(header(&head, "x-kitepipe-error").as_deref(), Some("404"));
    assert!(body.contains("nosuch.example.org"), "{body}");
}

#[test]
fn kite_of_a_stopped_connector_gets_a_503_offline_page() {
    let (relay, _backend, mut connector) = setup();
    let url = relay.http_url();
    assert_eq!(
        curl_ok(&["-H", "Host: blog.example.net", &url]),
        "hello from backend\n"
    );
    connector.kill();
    let (head, body) = eventually("the relay to report the kite offline", || {
        // Until the relay notices, a request may fail in other ways: retry.
        let (code, out, _) = curl(&["-i", "-H", "Host: blog.example.net", &url]);
        let text = String::from_utf8_lossy(&out).into_owned();
        let (head, body) = text.split_once("\r\n\r\n")?;
        (code == 0 && head.starts_with("HTTP/1.1 503 "))
            .then(|| (head.to_string(), body.to_string()))
    });
    assert_eq!(header(&head, "x-kitepipe-error").as_deref(), Some("503"));
    assert!(body.to_lowercase().contains("offline"), "{body}");
    assert!(body.contains("blog.example.net"), "{body}");
}

#[test]
fn request_without_host_gets_a_400_page() {
    let (relay, _backend, _connector) = setup();
    // `-H 'Host:'` makes curl send no Host header at all.
    let (status, head, _body) = curl_response(&["-H", "Host:", &relay.http_url()]);
    assert_eq!(status, 400, "{head}");
    assert_eq!(header(&head, "x-kitepipe-error").as_deref(), Some("400"));
}

#[test]
fn unreachable_target_gets_a_502_page_naming_it() {
    let relay = Relay::new().domain(&domain()).start();
    let closed = format!("127.0.0.1:{}", free_port());
    let _connector = Connector::new(&relay)
        .secret(SECRET)
        .kite(&format!("http:down.example.net={closed}"))
        .start();
    let (status, head, body) = curl_response(&["-H", "Host: down.example.net", &relay.http_url()]);
    assert_eq!(status, 502, "{head}");
    assert_eq!(header(&head, "x-kitepipe-error").as_deref(), Some("502"));
    assert!(body.contains(&closed), "{body}");
}

// --- Routing between connectors ---

#[test]
fn exact_kite_wins_over_wildcard_kite_of_another_connector() {
    let relay = Relay::new().domain(&domain()).start();
    let wild = WhoAmI::start();
    let exact = WhoAmI::start();
    let _wild_connector = Connector::new(&relay)
        .secret(SECRET)
        .kite(&format!("http:*.example.net={}", wild.addr()))
        .start();
    let _exact_connector = Connector::new(&relay)
        .secret(SECRET)
        .kite(&format!("http:blog.example.net={}", exact.addr()))
        .start();
    let url = relay.http_url();
    assert_eq!(
        curl_ok(&["-H", "Host: blog.example.net", &url]),
        exact.answer()
    );
    assert_eq!(curl_ok(&["-H", "Host: x.example.net", &url]), wild.answer());
    assert_eq!(
        curl_ok(&["-H", "Host: deep.x.example.net", &url]),
        wild.answer()
    );
}

#[test]
fn two_connectors_share_a_kite_and_one_fails_over_to_the_other() {
    let relay = Relay::new().domain(&domain()).start();
    let a = WhoAmI::start();
    let b = WhoAmI::start();
    let mut connector_a = Connector::new(&relay)
        .secret(SECRET)
        .kite(&format!("http:blog.example.net={}", a.addr()))
        .start();
    let _connector_b = Connector::new(&relay)
        .secret(SECRET)
        .kite(&format!("http:blog.example.net={}", b.addr()))
        .start();
    let url = relay.http_url();
    let answers: Vec<String> = (0..20)
        .map(|_| curl_ok(&["-H", "Host: blog.example.net", &url]))
        .collect();
    let from_a = answers.iter().filter(|s| **s == a.answer()).count();
    let from_b = answers.iter().filter(|s| **s == b.answer()).count();
    assert_eq!(from_a + from_b, 20, "{answers:?}");
    assert!(from_a > 0 && from_b > 0, "both backends serve: {answers:?}");

    connector_a.kill();
    eventually("requests to reach the remaining connector", || {
        let (code, out, _) = curl(&["-f", "-H", "Host: blog.example.net", &url]);
        (code == 0 && out == b.answer().as_bytes()).then_some(())
    });
    for i in 0..20 {
        let (status, _head, body) = curl_response(&["-H", "Host: blog.example.net", &url]);
        assert_eq!(
            (status, body.as_str()),
            (200, b.answer().as_str()),
            "request {i} after failover"
        );
    }
}

#[test]
fn one_connector_serves_its_kite_through_two_relays() {
    let first = Relay::new().domain(&domain()).start();
    // Same state dir: same certificate, so one pinned fingerprint fits both.
    let second = Relay::new()
        .domain(&domain())
        .state_dir(first.state.path())
        .start();
    assert_eq!(first.fingerprint, second.fingerprint);
    let backend = Backend::start("http");
    let connector = Connector::new(&first)
        .also_relay(&second.link.to_string())
        .secret(SECRET)
        .kite(&format!("http:blog.example.net={}", backend.addr()))
        .spawn();
    connector.wait_links_up(2);
    for relay in [&first, &second] {
        let body = curl_ok(&["-H", "Host: blog.example.net", &relay.http_url()]);
        assert_eq!(body, "hello from backend\n", "through {}", relay.link);
    }
}

// --- HTTPS passthrough ---

/// A self-signed certificate for `name` and its key, written into `dir` by
/// openssl; returns (cert.pem, key.pem).
fn self_signed(dir: &TempDir, name: &str) -> (PathBuf, PathBuf) {
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .arg("-subj")
        .arg(format!("/CN={name}"))
        .arg("-addext")
        .arg(format!("subjectAltName=DNS:{name}"))
        .args(["-days", "1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl is installed");
    assert!(status.success(), "openssl req failed");
    (cert, key)
}

/// An `openssl s_server -www` with a self-signed certificate for `name`.
struct TlsBackend {
    proc: Proc,
    port: u16,
    cert: PathBuf,
    _dir: TempDir,
}

impl TlsBackend {
    fn start(name: &str) -> TlsBackend {
        let dir = TempDir::new("tls-backend");
        let (cert, key) = self_signed(&dir, name);
        // openssl cannot report a port it picked: a free port is fine for a backend.
        let port = free_port();
        let mut command = Command::new("openssl");
        command
            .args(["s_server", "-www", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key);
        let proc = Proc::spawn("openssl-s_server", command);
        proc.wait_for("ACCEPT");
        TlsBackend {
            proc,
            port,
            cert,
            _dir: dir,
        }
    }
}

#[test]
fn https_is_passed_through_by_sni_with_the_backends_own_certificate() {
    let relay = Relay::new()
        .domain(&domain())
        .args(&["--https", "127.0.0.1:0"])
        .start();
    let https = relay.https.expect("relay has an HTTPS listener");
    let backend = TlsBackend::start("secure.example.net");
    let _connector = Connector::new(&relay)
        .secret(SECRET)
        .kite(&format!(
            "https:secure.example.net=127.0.0.1:{}",
            backend.port
        ))
        .start();
    let port = https.port();
    let resolve = format!("secure.example.net:{port}:127.0.0.1");
    let url = format!("https://secure.example.net:{port}/");
    let cacert = backend.cert.display().to_string();
    let page = curl_ok(&["--cacert", &cacert, "--resolve", &resolve, &url]);
    assert!(page.contains("s_server"), "openssl's -www page: {page}");
    assert!(backend.proc.output().contains("ACCEPT"));

    let resolve = format!("other.example.net:{port}:127.0.0.1");
    let url = format!("https://other.example.net:{port}/");
    let (code, _out, err) = curl(&["--cacert", &cacert, "--resolve", &resolve, &url]);
    assert_eq!(code, 35, "unknown SNI is a TLS failure: {err}");
    assert!(err.contains("unrecognized name"), "{err}");
}

// --- One port, shutdown ---

#[test]
fn one_port_serves_links_and_http() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let relay = Relay::new()
        .domain(&domain())
        .args(&["--listen", &addr, "--http", &addr])
        .start();
    assert_eq!(relay.link.port(), port);
    assert_eq!(relay.http.map(|a| a.port()), Some(port));
    let backend = Backend::start("http");
    let _connector = Connector::new(&relay)
        .secret(SECRET)
        .kite(&format!("http:blog.example.net={}", backend.addr()))
        .start();
    let body = curl_ok(&["-H", "Host: blog.example.net", &format!("http://{addr}/")]);
    assert_eq!(body, "hello from backend\n");
}

#[test]
fn sigterm_stops_relay_and_connector_cleanly() {
    let (mut relay, _backend, mut connector) = setup();
    assert_eq!(
        curl_ok(&["-H", "Host: blog.example.net", &relay.http_url()]),
        "hello from backend\n"
    );
    let status = relay.proc.terminate();
    assert!(
        status.success(),
        "relay exit: {status}\n{}",
        relay.proc.output()
    );
    let status = connector.terminate();
    assert!(
        status.success(),
        "connector exit: {status}\n{}",
        connector.output()
    );
}

#[test]
fn http_connect_on_the_http_port_reaches_a_tcp_kite() {
    // CONNECT is off unless the operator enables it.
    let relay = Relay::new().domain(&domain()).arg("--http-connect").start();
    let echo = Backend::start("tcp-echo");
    let connector = Connector::new(&relay)
        .secret(SECRET)
        .kite(&format!("tcp:ssh.example.net:0={}", echo.addr()))
        .start();
    let port = connector.tcp_kite_port("ssh.example.net");
    let http_port = relay.http.expect("relay has an HTTP listener").port();

    let mut sock = connect(http_port);
    // The first payload bytes travel in the same packet as the request.
    write!(
        sock,
        "CONNECT ssh.example.net:{port} HTTP/1.1\r\nHost: ssh.example.net:{port}\r\n\r\nSSH-2.0-test\r\n"
    )
    .unwrap();
    let head = read_head(&mut sock);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut echoed = [0u8; 14];
    sock.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"SSH-2.0-test\r\n");
    let data = pseudo_random(256 * 1024, 7);
    let mut writer = sock.try_clone().unwrap();
    let expected = sha256_hex(&data);
    let sender = std::thread::spawn(move || {
        writer.write_all(&data).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    sock.read_to_end(&mut back).unwrap();
    sender.join().unwrap();
    assert_eq!(sha256_hex(&back), expected);

    // A name that does not own the port is refused with a page, not connected.
    let mut wrong = connect(http_port);
    write!(
        wrong,
        "CONNECT other.example.net:{port} HTTP/1.1\r\nHost: other.example.net:{port}\r\n\r\n"
    )
    .unwrap();
    let head = read_head(&mut wrong);
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}

/// Regression: after a relay restart the connector asked for its HTTP kite
/// with the TCP port the relay had given a TCP kite of the same name, and the
/// relay refused it ("only TCP kites have a port").
#[test]
fn http_and_tcp_kites_of_one_name_both_return_after_a_relay_restart() {
    let state = TempDir::new("restart-state");
    let link = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let start = || {
        Relay::new()
            .args(&["--listen", &link, "--http", &http])
            .domain(&domain())
            .state_dir(state.path())
            .start()
    };
    let mut relay = start();
    let backend = Backend::start("http");
    let connector = Connector::new(&relay)
        .secret(SECRET)
        .kite(&format!("http:web.example.net={}", backend.addr()))
        .kite(&format!("tcp:web.example.net:0={}", backend.addr()))
        .args(&["--max-backoff", "1s"])
        .start();
    let tcp_port = connector.tcp_kite_port("web.example.net");
    let url = format!("{}/", relay.http_url());
    assert_eq!(
        curl_ok(&["-H", "Host: web.example.net", &url]),
        "hello from backend\n"
    );

    relay.proc.kill();
    relay = start();
    connector.wait_links_up(2);
    assert_eq!(
        connector.count("relay refused kite"),
        0,
        "{}",
        connector.output()
    );
    assert_eq!(
        curl_ok(&["-H", "Host: web.example.net", &url]),
        "hello from backend\n"
    );
    assert_eq!(
        curl_ok(&[&format!("http://127.0.0.1:{tcp_port}/")]),
        "hello from backend\n"
    );
    drop(relay);
}

/// nginx behind a TCP kite with `proxy_protocol = "v1"` and `"v2"`
/// (`listen ... proxy_protocol`) sees the visitor's own address and port as
/// the source and the relay's public address as the destination: from
/// 127.0.0.1, and from 127.0.0.2 (curl bound to it), an address that is
/// neither the relay's nor the connector's.
#[test]
fn nginx_behind_a_proxy_protocol_kite_sees_the_visitor() {
    let Some(nginx) = Nginx::proxy_protocol() else {
        return;
    };
    let relay = Relay::new().domain(&domain()).start();
    for version in ["v1", "v2"] {
        let name = format!("nginx-{version}.example.net");
        let (_connector, _dir, port) =
            proxy_protocol_kite(&relay, SECRET, ("tcp", &name), &nginx.addr(), version);

        let mut sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
        sock.set_read_timeout(Some(patience())).unwrap();
        let visitor = sock.local_addr().unwrap();
        sock.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        sock.read_to_string(&mut answer).unwrap();
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        assert_eq!(
            body,
            format!("{visitor} -> 127.0.0.1:{port}\n"),
            "{version}: {answer}\n{}",
            nginx.logs()
        );

        let url = format!("http://127.0.0.1:{port}/");
        let body = curl_ok(&["--interface", "127.0.0.2", &url]);
        assert!(
            body.starts_with("127.0.0.2:") && body.ends_with(&format!(" -> 127.0.0.1:{port}\n")),
            "{version}: {body}\n{}",
            nginx.logs()
        );
        assert!(nginx.logs().contains("127.0.0.2:"), "{}", nginx.logs());
    }
}

/// An HTTPS kite with `proxy_protocol = "v1"` (passed through by SNI):
/// nginx, `listen ... ssl proxy_protocol`, reads the header before the
/// visitor's ClientHello and sees the visitor's address and the relay's
/// HTTPS address; the visitor's TLS session is end to end as before.
#[test]
fn nginx_behind_a_proxy_protocol_https_kite_sees_the_visitor() {
    let dir = TempDir::new("proxy-protocol-https");
    let name = "tls-pp.example.net";
    let (cert, key) = self_signed(&dir, name);
    let Some(nginx) = Nginx::proxy_protocol_tls(&cert, &key) else {
        return;
    };
    let relay = Relay::new()
        .domain(&domain())
        .args(&["--https", "127.0.0.1:0"])
        .start();
    let https = relay.https.expect("relay has an HTTPS listener");
    let (_connector, _dir, _) =
        proxy_protocol_kite(&relay, SECRET, ("https", name), &nginx.addr(), "v1");
    let resolve = format!("{name}:{}:127.0.0.1", https.port());
    let url = format!("https://{name}:{}/", https.port());
    let body = curl_ok(&[
        "--cacert",
        &path(&cert),
        "--resolve",
        &resolve,
        "--interface",
        "127.0.0.2",
        &url,
    ]);
    assert!(
        body.starts_with("127.0.0.2:") && body.ends_with(&format!(" -> {https}\n")),
        "{body}\n{}",
        nginx.logs()
    );
}
