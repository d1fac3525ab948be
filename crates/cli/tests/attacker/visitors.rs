//! Attacker tests: visitors. An internet visitor of the relay's HTTP port
//! and of TCP kites' ports, and a connector holding a domain secret, against
//! the real relay.
//!
//! Cases of the trust-model issue: 5 (upgrade smuggling, keep-alive Host
//! bypass), 6 (truncated responses look complete), 8 (TCP kite ports outside
//! `--tcp-ports`, leaked listeners, no per-link cap), 10 (CONNECT past
//! `--tcp-bind`); a visitor of a `proxy_protocol` kite sending its own
//! PROXY header; and hostile ClientHellos on the HTTPS port of a relay
//! that terminates TLS for an http kite (fragmented, truncated, without
//! SNI, oversized or invalid SNI).

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

const SECRET: &str = "visitors-secret";

fn domain() -> String {
    format!("http,https,tcp:*.example.net:{SECRET}")
}

/// A backend written for these tests (standard library only):
///
/// - `http`: answers every request `200` with `ok PATH\n` (a `Connection:
///   Upgrade` request too: it never switches protocols), and prints
///   `REQ <method> <path> host=<Host> xff=<X-Forwarded-For>` for each request
///   it receives. `/cut-length`, `/cut-chunked` and `/cut-close` send part of
///   a response (Content-Length, chunked, or delimited by the connection's
///   end), print `CUT`, and hang.
///   `/reset-length` sends part of a Content-Length response, then resets
///   the connection.
/// - `tcp-cut`: sends `hello\n` to every connection, prints `CUT`, and hangs.
/// - `tcp-reset`: sends `hello\n`, waits for a byte, resets the connection.
/// - `tcp-watch`: reads, printing `GOT <n>` per read and `END clean` or
///   `END reset` for how the connection ended.
const BACKEND: &str = r#"
import socket, socketserver, struct, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_GET(self):
        print("REQ %s %s host=%s xff=%s" % (self.command, self.path,
              self.headers.get("Host"), ",".join(self.headers.get_all("X-Forwarded-For") or [])), flush=True)
        if self.path == "/cut-length":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"line\n" * 10)
        elif self.path == "/cut-chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"5\r\nline\n\r\n" * 10)
        elif self.path == "/reset-length":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"line\n" * 10)
            self.wfile.flush()
            time.sleep(0.5)
            abort(self.connection)
            self.close_connection = True
            return
        elif self.path == "/cut-close":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"line\n" * 10)
        else:
            body = ("ok %s\n" % self.path).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.wfile.flush()
        print("CUT", flush=True)
        time.sleep(600)

def abort(sock):
    # SO_LINGER 0 then close: a TCP reset.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()

class Reset(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(b"hello\n")
        self.request.recv(1)
        abort(self.request)

class Watch(socketserver.BaseRequestHandler):
    def handle(self):
        try:
            while True:
                data = self.request.recv(65536)
                if not data:
                    print("END clean", flush=True)
                    return
                print("GOT %d" % len(data), flush=True)
        except ConnectionResetError:
            print("END reset", flush=True)

class Cut(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(b"hello\n")
        print("CUT", flush=True)
        time.sleep(600)

class Tcp(socketserver.ThreadingTCPServer):
    daemon_threads = True

mode = sys.argv[1]
if mode == "http":
    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
elif mode == "tcp-watch":
    server = Tcp(("127.0.0.1", 0), Watch)
elif mode == "tcp-reset":
    server = Tcp(("127.0.0.1", 0), Reset)
else:
    server = Tcp(("127.0.0.1", 0), Cut)
print("READY %d" % server.server_address[1], flush=True)
server.serve_forever()
"#;

/// The test backend of [`BACKEND`], started in `dir`.
struct Recorder {
    proc: Proc,
    port: u16,
}

impl Recorder {
    fn start(dir: &TempDir, mode: &str) -> Recorder {
        let script: PathBuf = dir.path().join("backend.py");
        std::fs::write(&script, BACKEND).unwrap();
        let mut command = Command::new("python3");
        command.arg("-u").arg(&script).arg(mode);
        let proc = Proc::spawn(&format!("recorder-{mode}"), command);
        let out = proc.wait_for("READY ");
        let port = out
            .lines()
            .find_map(|l| l.strip_prefix("READY "))
            .and_then(|p| p.trim().parse().ok())
            .expect("backend prints its port");
        Recorder { proc, port }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The `REQ` lines printed so far.
    fn requests(&self) -> Vec<String> {
        self.proc
            .output()
            .lines()
            .filter(|l| l.starts_with("REQ "))
            .map(str::to_string)
            .collect()
    }
}

/// A socket to 127.0.0.1:`port` whose reads and writes give up after [`patience`].
fn connect(port: u16) -> TcpStream {
    let sock = TcpStream::connect(("127.0.0.1", port)).expect("connect to the relay");
    sock.set_read_timeout(Some(patience())).unwrap();
    sock.set_write_timeout(Some(patience())).unwrap();
    sock
}

/// Reads one response with a Content-Length body; returns (head, body).
fn read_response(sock: &mut TcpStream) -> (String, String) {
    let mut data = Vec::new();
    let mut byte = [0u8; 1];
    while !data.ends_with(b"\r\n\r\n") {
        let n = sock.read(&mut byte).expect("read a response head");
        assert_eq!(n, 1, "connection ended inside a response head: {data:?}");
        data.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&data).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    sock.read_exact(&mut body).expect("read a response body");
    (head, String::from_utf8_lossy(&body).into_owned())
}

/// Whether a TCP connection to 127.0.0.1:`port` is refused.
fn refused(port: u16) -> bool {
    matches!(
        TcpStream::connect(("127.0.0.1", port)),
        Err(err) if err.kind() == ErrorKind::ConnectionRefused
    )
}

/// Case 5: a request carrying `Connection: Upgrade` that the backend answers
/// with 200 (not 101) leaves the connection HTTP: the next request on it is
/// parsed, routed by its own Host and rewritten, so a second request for
/// `internal.local` with a forged X-Forwarded-For never reaches the backend.
#[test]
fn upgrade_answered_200_keeps_parsing_so_a_smuggled_request_never_reaches_the_backend() {
    let dir = TempDir::new("smuggle");
    let relay = Relay::new().domain(&domain()).start();
    let backend = Recorder::start(&dir, "http");
    let _connector = Connector::new(&relay)
        .secret(SECRET)
        .kite(&format!("http:blog.example.net={}", backend.addr()))
        .start();

    let mut sock = connect(relay.http.unwrap().port());
    sock.write_all(
        b"GET /upgrade HTTP/1.1\r\nHost: blog.example.net\r\nConnection: Upgrade\r\n\
          Upgrade: websocket\r\n\r\n",
    )
    .unwrap();
    let (head, body) = read_response(&mut sock);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "ok /upgrade\n");

    sock.write_all(
        b"GET /smuggled HTTP/1.1\r\nHost: internal.local\r\nX-Forwarded-For: 10.6.6.6\r\n\r\n",
    )
    .unwrap();
    let (head, _) = read_response(&mut sock);
    assert!(head.starts_with("HTTP/1.1 421"), "{head}");

    // A later request on a new connection: once it arrived, anything the
    // relay had let through before it would have too.
    let mut later = connect(relay.http.unwrap().port());
    later
        .write_all(b"GET /later HTTP/1.1\r\nHost: blog.example.net\r\n\r\n")
        .unwrap();
    let (head, _) = read_response(&mut later);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    backend.proc.wait_for("REQ GET /later");
    let seen = backend.requests();
    assert_eq!(seen.len(), 2, "only /upgrade and /later arrived: {seen:?}");
    assert!(
        seen.iter().all(|r| !r.contains("smuggled")
            && !r.contains("internal.local")
            && !r.contains("10.6.6.6")),
        "{seen:?}"
    );
}

/// Case 5: every request on a keep-alive connection is routed by its own
/// Host: one for another kite gets 421 and never travels down the first
/// kite's stream; one for the same kite goes on, its forged X-Forwarded-For
/// replaced by the address the relay saw.
#[test]
fn a_keep_alive_request_for_another_kite_gets_421_and_forwarded_headers_are_replaced() {
    let dir = TempDir::new("keepalive-host");
    let relay = Relay::new().domain(&domain()).start();
    let blog = Recorder::start(&dir, "http");
    let admin_dir = TempDir::new("keepalive-admin");
    let admin = Recorder::start(&admin_dir, "http");
    let _connector = Connector::new(&relay)
        .secret(SECRET)
        .kite(&format!("http:blog.example.net={}", blog.addr()))
        .kite(&format!("http:admin.example.net={}", admin.addr()))
        .start();

    let mut sock = connect(relay.http.unwrap().port());
    sock.write_all(
        b"GET /one HTTP/1.1\r\nHost: blog.example.net\r\nX-Forwarded-For: 10.6.6.6\r\n\r\n\
          GET /two HTTP/1.1\r\nHost: BLOG.example.net.\r\nX-Forwarded-For: 10.7.7.7\r\n\
          X-Forwarded-Proto: https\r\n\r\n",
    )
    .unwrap();
    let (head, body) = read_response(&mut sock);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "ok /one\n");
    let (head, body) = read_response(&mut sock);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "ok /two\n");

    sock.write_all(b"GET /admin HTTP/1.1\r\nHost: admin.example.net\r\n\r\n")
        .unwrap();
    let (head, _) = read_response(&mut sock);
    assert!(head.starts_with("HTTP/1.1 421"), "{head}");
    let mut rest = Vec::new();
    let _ = sock.read_to_end(&mut rest);
    assert!(rest.is_empty(), "the connection ends after the 421");

    blog.proc.wait_for_count("REQ ", 2);
    let seen = blog.requests();
    assert_eq!(
        seen,
        [
            "REQ GET /one host=blog.example.net xff=127.0.0.1",
            "REQ GET /two host=BLOG.example.net. xff=127.0.0.1",
        ],
        "forged X-Forwarded-For replaced on every request"
    );
    assert!(admin.requests().is_empty(), "{:?}", admin.requests());
}

/// Case 10: CONNECT on the HTTP port reaches no TCP kite unless the
/// operator enabled it, and even then not from a listener address that the
/// kite's own port (bound to `--tcp-bind`) would not accept.
#[test]
fn connect_is_refused_by_default_and_never_reaches_past_tcp_bind() {
    let echo = Backend::start("tcp-echo");
    let try_connect = |relay: &RelayProc, connector: &Proc| {
        let port = connector.tcp_kite_port("ssh.example.net");
        let mut sock = connect(relay.http.unwrap().port());
        write!(
            sock,
            "CONNECT ssh.example.net:{port} HTTP/1.1\r\nHost: ssh.example.net:{port}\r\n\r\n"
        )
        .unwrap();
        read_response(&mut sock).0
    };

    // Off by default, even where the kite's port is reachable.
    let relay = Relay::new().domain(&domain()).start();
    let connector = Connector::new(&relay)
        .secret(SECRET)
        .kite(&format!("tcp:ssh.example.net:0={}", echo.addr()))
        .start();
    let head = try_connect(&relay, &connector);
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    drop(connector);
    drop(relay);

    // Enabled, but TCP kites bind to 127.0.0.2 and the visitor came in on
    // 127.0.0.1: it could not have reached the kite's port itself.
    let relay = Relay::new()
        .domain(&domain())
        .args(&["--http-connect", "--tcp-bind", "127.0.0.2"])
        .start();
    let connector = Connector::new(&relay)
        .secret(SECRET)
        .kite(&format!("tcp:ssh.example.net:0={}", echo.addr()))
        .start();
    let head = try_connect(&relay, &connector);
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
}

/// Case 6: a connector killed in the middle of a response (Content-Length,
/// chunked, or delimited by the connection's end) reaches the visitor as a
/// TCP reset: curl fails with "Recv failure" (exit 56), never with a short
/// body that looks complete (exit 0) or a clean close (exit 18).
#[test]
fn a_connector_killed_mid_response_makes_curl_fail_with_a_reset() {
    for path in ["/cut-length", "/cut-chunked", "/cut-close"] {
        let dir = TempDir::new("cut");
        let relay = Relay::new().domain(&domain()).start();
        let backend = Recorder::start(&dir, "http");
        let mut connector = Connector::new(&relay)
            .secret(SECRET)
            .kite(&format!("http:cut.example.net={}", backend.addr()))
            .start();
        let url = format!("{}{path}", relay.http_url());
        let curl = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "60",
                "--noproxy",
                "*",
                "-o",
                "/dev/null",
            ])
            .args(["-H", "Host: cut.example.net", &url])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("curl is installed");
        backend.proc.wait_for("CUT");
        connector.kill();
        let out = curl.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(56), "{path}: curl said {stderr}");
    }
}

/// Case 6: a TCP kite's visitor whose connector dies sees a reset, not EOF.
#[test]
fn a_tcp_kite_visitor_sees_a_reset_when_the_connector_dies() {
    let dir = TempDir::new("tcp-cut");
    let relay = Relay::new().domain(&domain()).start();
    let backend = Recorder::start(&dir, "tcp-cut");
    let mut connector = Connector::new(&relay)
        .secret(SECRET)
        .kite(&format!("tcp:db.example.net:0={}", backend.addr()))
        .start();
    let port = connector.tcp_kite_port("db.example.net");
    let mut sock = connect(port);
    let mut hello = [0u8; 6];
    sock.read_exact(&mut hello).unwrap();
    assert_eq!(&hello, b"hello\n");
    connector.kill();
    let mut rest = Vec::new();
    let err = sock
        .read_to_end(&mut rest)
        .expect_err("the visitor's connection is reset, not ended");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
}

/// Two consecutive free ports on 127.0.0.1.
fn free_port_pair() -> (u16, u16) {
    eventually("two consecutive free ports", || {
        let first = TcpListener::bind("127.0.0.1:0").ok()?;
        let low = first.local_addr().ok()?.port();
        let high = low.checked_add(1)?;
        TcpListener::bind(("127.0.0.1", high)).ok()?;
        Some((low, high))
    })
}

/// Case 8: port-0 claims get ports inside `--tcp-ports`; once the range is
/// used up the next claim is refused with the reason; once the connectors
/// are gone the ports are closed.
#[test]
fn port_zero_claims_stay_in_range_are_refused_when_it_is_full_and_are_released() {
    let echo = Backend::start("tcp-echo");
    let (low, high) = free_port_pair();
    let relay = Relay::new()
        .domain(&domain())
        .args(&["--tcp-ports", &format!("{low}-{high}")])
        .start();
    let mut ports = Vec::new();
    let mut connectors = Vec::new();
    for name in ["a", "b"] {
        let connector = Connector::new(&relay)
            .secret(SECRET)
            .args(&["--name", name])
            .kite(&format!("tcp:{name}.example.net:0={}", echo.addr()))
            .start();
        ports.push(connector.tcp_kite_port(&format!("{name}.example.net")));
        connectors.push(connector);
    }
    ports.sort_unstable();
    assert_eq!(ports, [low, high]);

    let third = Connector::new(&relay)
        .secret(SECRET)
        .args(&["--name", "c"])
        .kite(&format!("tcp:c.example.net:0={}", echo.addr()))
        // Its only kite is refused: the relay closes the link.
        .spawn();
    let out = third.wait_for("relay refused kite");
    assert!(
        out.contains(&format!("no free port in {low}-{high}")),
        "{out}"
    );
    drop(third);

    for port in [low, high] {
        assert!(!refused(port), "port {port} serves its kite");
    }
    drop(connectors);
    eventually("the TCP kite ports to close", || {
        (refused(low) && refused(high)).then_some(())
    });
}

/// Case 8: one link holds at most `MAX_TCP_PORTS_PER_LINK` (16) TCP kite
/// ports; its next claim is refused.
#[test]
fn one_link_cannot_hold_more_than_16_tcp_ports() {
    let echo = Backend::start("tcp-echo");
    let relay = Relay::new().domain(&domain()).start();
    let mut connector = Connector::new(&relay).secret(SECRET);
    for n in 0..17 {
        connector = connector.kite(&format!("tcp:p{n}.example.net:0={}", echo.addr()));
    }
    let connector = connector.start();
    let out = connector.wait_for("relay refused kite");
    assert_eq!(connector.count("kite online kite=tcp:"), 16, "{out}");
    assert!(out.contains("TCP kite ports per link"), "{out}");
}

/// Case 8: one identity (here every holder of the `*.example.net` secret)
/// holds at most `MAX_TCP_PORTS_PER_IDENTITY` (64) TCP kite ports across
/// its links: opening more links gets it no more.
#[test]
fn one_secret_cannot_hold_more_than_64_tcp_ports_across_links() {
    let echo = Backend::start("tcp-echo");
    let relay = Relay::new().domain(&domain()).start();
    let mut connectors = Vec::new();
    for link in 0..5 {
        let mut connector = Connector::new(&relay)
            .secret(SECRET)
            .args(&["--name", &format!("link{link}")]);
        for n in 0..16 {
            connector = connector.kite(&format!("tcp:l{link}p{n}.example.net:0={}", echo.addr()));
        }
        // The last one's kites are all refused: the relay closes its link,
        // so it never shows as up; its log says it registered.
        connectors.push(if link < 4 {
            connector.start()
        } else {
            let last = connector.spawn();
            last.wait_for("linked to relay");
            last
        });
    }
    let online: usize = connectors
        .iter()
        .map(|c| c.count("kite online kite=tcp:"))
        .sum();
    assert_eq!(online, 64);
    let last = connectors.last().unwrap().output();
    assert_eq!(last.matches("relay refused kite").count(), 16, "{last}");
    assert!(last.contains("already holds 64 TCP kite ports"), "{last}");
}

/// Case 8, the other side of releasing ports: a connector whose remembered
/// port is no longer its own (here: a relay restarted with another
/// `--tcp-ports`) asks for any port on the same link instead of staying
/// refused.
#[test]
fn a_connector_whose_old_port_is_gone_gets_another_one() {
    let state = TempDir::new("old-port-state");
    let link = format!("127.0.0.1:{}", free_port());
    let echo = Backend::start("tcp-echo");
    let start = |ports: &str| {
        Relay::new()
            .args(&["--listen", &link, "--tcp-ports", ports])
            .domain(&domain())
            .state_dir(state.path())
            .start()
    };
    let (low, high) = free_port_pair();
    let mut relay = start(&format!("{low}-{low}"));
    let connector = Connector::new(&relay)
        .secret(SECRET)
        .kite(&format!("tcp:db.example.net:0={}", echo.addr()))
        .args(&["--max-backoff", "1s"])
        .start();
    assert_eq!(connector.tcp_kite_port("db.example.net"), low);

    relay.proc.kill();
    relay = start(&format!("{high}-{high}"));
    let kite = format!("tcp:db.example.net:{high}");
    connector.wait_kite_online(&kite, |k| k == kite);
    let mut sock = connect(high);
    sock.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    sock.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping");
    drop(relay);
}

/// Case 6, from the far end: the connector's local service resetting its
/// connection mid-response reaches the visitor as a reset too (the
/// connector resets the stream, the relay the visitor), for an HTTP and a
/// TCP kite.
#[test]
fn a_local_service_reset_mid_response_reaches_the_visitor_as_a_reset() {
    let dir = TempDir::new("reset");
    let relay = Relay::new().domain(&domain()).start();
    let http = Recorder::start(&dir, "http");
    let tcp_dir = TempDir::new("reset-tcp");
    let tcp = Recorder::start(&tcp_dir, "tcp-reset");
    let connector = Connector::new(&relay)
        .secret(SECRET)
        .kite(&format!("http:reset.example.net={}", http.addr()))
        .kite(&format!("tcp:reset.example.net:0={}", tcp.addr()))
        .start();

    let (code, _, err) = curl(&[
        "-o",
        "/dev/null",
        "-H",
        "Host: reset.example.net",
        &format!("{}/reset-length", relay.http_url()),
    ]);
    assert_eq!(code, 56, "curl said {err}");

    let port = connector.tcp_kite_port("reset.example.net");
    let mut sock = connect(port);
    let mut hello = [0u8; 6];
    sock.read_exact(&mut hello).unwrap();
    sock.write_all(b"x").unwrap();
    let mut rest = Vec::new();
    let err = sock
        .read_to_end(&mut rest)
        .expect_err("the visitor's connection is reset, not ended");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
}

/// Case 6, the other way: a link lost in the middle of a TCP visitor's
/// upload reaches the local service as a reset, so a cut upload never looks
/// complete to it either.
#[test]
fn a_link_lost_mid_upload_reaches_the_local_service_as_a_reset() {
    let dir = TempDir::new("watch");
    let mut relay = Relay::new().domain(&domain()).start();
    let backend = Recorder::start(&dir, "tcp-watch");
    let connector = Connector::new(&relay)
        .secret(SECRET)
        .kite(&format!("tcp:upload.example.net:0={}", backend.addr()))
        .start();
    let port = connector.tcp_kite_port("upload.example.net");
    let mut sock = connect(port);
    sock.write_all(b"part of an upload").unwrap();
    backend.proc.wait_for("GOT ");
    relay.proc.kill();
    let out = backend.proc.wait_for("END ");
    assert!(out.contains("END reset"), "{out}");
}

/// A visitor of a TCP kite with `proxy_protocol` that sends its own PROXY
/// header first (v1 text, then v2 binary, claiming 6.6.6.6) does not
/// change the address the backend (a real nginx, `listen ...
/// proxy_protocol`) sees: the connector's header comes first, and the
/// visitor's is only data after it (nginx answers 400 to it as a request).
#[test]
fn a_visitor_cannot_forge_the_proxy_protocol_header() {
    let Some(nginx) = Nginx::proxy_protocol() else {
        return;
    };
    let relay = Relay::new().domain(&domain()).start();
    let mut forged_v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    forged_v2.extend_from_slice(&[6, 6, 6, 6, 6, 6, 6, 6, 0x1f, 0x90, 0, 80]);
    for version in ["v1", "v2"] {
        let name = format!("forged-{version}.example.net");
        let (_connector, _dir, port) =
            proxy_protocol_kite(&relay, SECRET, ("tcp", &name), &nginx.addr(), version);
        for forged in [
            b"PROXY TCP4 6.6.6.6 6.6.6.6 8080 80\r\n".to_vec(),
            forged_v2.clone(),
        ] {
            let mut sock = connect(port);
            let visitor = sock.local_addr().unwrap();
            sock.write_all(&forged).unwrap();
            sock.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut answer = Vec::new();
            let _ = sock.read_to_end(&mut answer);
            let answer = String::from_utf8_lossy(&answer);
            assert!(
                answer.starts_with("HTTP/1.1 400") && !answer.contains("6.6.6.6"),
                "{version}: {answer}"
            );
            // nginx logs every connection with the source its PROXY header
            // named: this one's is the visitor's own.
            let logged = eventually("nginx to log the request", || {
                let logs = nginx.logs();
                logs.contains(&format!("{visitor} ")).then_some(logs)
            });
            assert!(!logged.contains("6.6.6.6:8080 "), "{version}: {logged}");
        }
    }
}

/// A relay terminating HTTPS for the http kite `app.example.net` (a test
/// CA's certificate) in front of a [`Recorder`].
struct Terminating {
    cert: TestCert,
    relay: RelayProc,
    backend: Recorder,
    _connector: Proc,
    _dir: TempDir,
}

impl Terminating {
    fn start() -> Terminating {
        let dir = TempDir::new("terminating");
        let cert = TestCert::new(&["app.example.net"]);
        let relay = Relay::new()
            .domain(&domain())
            .args(&["--https", "127.0.0.1:0", "--tls-cert", &cert.arg()])
            .start();
        let backend = Recorder::start(&dir, "http");
        let connector = Connector::new(&relay)
            .secret(SECRET)
            .kite(&format!("http:app.example.net={}", backend.addr()))
            .start();
        Terminating {
            cert,
            relay,
            backend,
            _connector: connector,
            _dir: dir,
        }
    }

    fn port(&self) -> u16 {
        self.relay.https.unwrap().port()
    }

    /// A TLS client trusting the test CA, for `name` (an IP address: no SNI).
    fn client(&self, name: &str) -> rustls::ClientConnection {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        let ca = rustls::pki_types::CertificateDer::from_pem_file(&self.cert.ca).unwrap();
        roots.add(ca).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap()
    }

    /// A real ClientHello for `name`, as its bytes.
    fn client_hello(&self, name: &str) -> Vec<u8> {
        let mut conn = self.client(name);
        let mut hello = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut hello).unwrap();
        }
        hello
    }

    /// One request over a fresh terminated connection (curl, trusting the
    /// CA): the relay still serves visitors.
    fn still_serves(&self, path: &str) {
        let resolve = format!("app.example.net:{}:127.0.0.1", self.port());
        let url = format!("https://app.example.net:{}{path}", self.port());
        let out = curl_ok(&[
            "--cacert",
            &crate::support::path(&self.cert.ca),
            "--resolve",
            &resolve,
            &url,
        ]);
        assert_eq!(out, format!("ok {path}\n"));
    }
}

/// A socket that sends its first `dribble` bytes one per TCP segment
/// (`TCP_NODELAY`, a short pause after each), then writes normally.
struct Dribble {
    sock: TcpStream,
    dribble: usize,
}

impl Read for Dribble {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.sock.read(buf)
    }
}

impl Write for Dribble {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.dribble == 0 || buf.is_empty() {
            return self.sock.write(buf);
        }
        self.sock.write_all(&buf[..1])?;
        self.dribble -= 1;
        std::thread::park_timeout(std::time::Duration::from_millis(2));
        Ok(1)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.sock.flush()
    }
}

/// How the relay ended a connection it should refuse: the bytes it sent
/// (nothing, or a TLS alert) before closing; panics if it kept it open.
fn closed_by_relay(sock: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        match sock.read(&mut chunk) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(err) if err.kind() == ErrorKind::ConnectionReset => return got,
            Err(err) => panic!("the relay kept the connection open ({err}); got {got:?}"),
        }
        assert!(got.len() < 64, "the relay answered: {got:?}");
    }
}

/// A hand-made ClientHello (TLS 1.2 record, one cipher suite) whose SNI
/// extension carries `name` as it is.
fn client_hello_with_sni(name: &[u8]) -> Vec<u8> {
    let u16be = |n: usize| (n as u16).to_be_bytes();
    let mut sni = Vec::new();
    sni.extend(u16be(name.len() + 3));
    sni.push(0); // host_name
    sni.extend(u16be(name.len()));
    sni.extend_from_slice(name);
    let mut extensions = vec![0, 0];
    extensions.extend(u16be(sni.len()));
    extensions.extend(sni);
    let mut body = vec![3, 3];
    body.extend([7u8; 32]); // random
    body.push(0); // session id
    body.extend([0, 2, 0x13, 0x01]); // TLS_AES_128_GCM_SHA256
    body.extend([1, 0]); // no compression
    body.extend(u16be(extensions.len()));
    body.extend(extensions);
    let mut handshake = vec![1];
    handshake.extend(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend(body);
    let mut record = vec![0x16, 3, 1];
    record.extend(u16be(handshake.len()));
    record.extend(handshake);
    record
}

/// A ClientHello sent one byte per TCP segment is reassembled: the
/// handshake completes and the request is served.
#[test]
fn a_client_hello_fragmented_into_one_byte_segments_still_works() {
    let site = Terminating::start();
    let sock = connect(site.port());
    sock.set_nodelay(true).unwrap();
    let hello_len = site.client_hello("app.example.net").len();
    let mut tls = rustls::StreamOwned::new(
        site.client("app.example.net"),
        Dribble {
            sock,
            dribble: hello_len,
        },
    );
    tls.write_all(b"GET /dribbled HTTP/1.1\r\nHost: app.example.net\r\nConnection: close\r\n\r\n")
        .expect("handshake and request over a dribbled ClientHello");
    let mut response = String::new();
    let _ = tls.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("ok /dribbled\n"), "{response}");
    assert!(hello_len > 200, "a real ClientHello: {hello_len} bytes");
}

/// A ClientHello cut short, then EOF: closed without an answer; one cut
/// short and left hanging does not hold up other visitors.
#[test]
fn a_truncated_client_hello_is_closed_and_the_relay_keeps_serving() {
    let site = Terminating::start();
    let hello = site.client_hello("app.example.net");
    let mut cut = connect(site.port());
    cut.write_all(&hello[..hello.len() / 2]).unwrap();
    cut.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(closed_by_relay(&mut cut), Vec::<u8>::new());

    let mut hanging = connect(site.port());
    hanging.write_all(&hello[..hello.len() / 2]).unwrap();
    site.still_serves("/while-one-hangs");
    drop(hanging);
    site.still_serves("/after");
    assert!(
        site.backend.requests().len() == 2,
        "{:?}",
        site.backend.requests()
    );
}

/// No SNI (a client dialing an address): nothing to terminate for, the
/// `unrecognized_name` alert as before, and the relay keeps serving.
#[test]
fn a_client_hello_without_sni_gets_the_unrecognized_name_alert() {
    let site = Terminating::start();
    let mut sock = connect(site.port());
    let mut conn = site.client("127.0.0.1");
    let err = conn
        .complete_io(&mut sock)
        .expect_err("no handshake without SNI");
    assert!(
        err.to_string().contains("UnrecognisedName") || err.to_string().contains("Unrecognised"),
        "{err}"
    );
    site.still_serves("/after-no-sni");
}

/// An SNI longer than a DNS name may be (253 bytes), or with bytes no
/// host name has: closed cleanly, no certificate served, and the relay
/// keeps serving others.
#[test]
fn oversized_or_invalid_sni_is_closed_and_the_relay_keeps_serving() {
    let site = Terminating::start();
    let long = format!("{}.example.net", "a.".repeat(130));
    let names: [&[u8]; 4] = [
        long.as_bytes(),
        b"app\x00.example.net",
        b"app example.net",
        b"app.example.net\xff",
    ];
    for name in names {
        let mut sock = connect(site.port());
        sock.write_all(&client_hello_with_sni(name)).unwrap();
        let answer = closed_by_relay(&mut sock);
        // Nothing but at most an alert record: never a ServerHello.
        assert!(
            answer.is_empty() || answer[0] == 0x15,
            "{:?}: {answer:?}",
            String::from_utf8_lossy(name)
        );
    }
    site.still_serves("/after-bad-sni");
}

/// A stranger at 127.0.0.2 sends 1000 wrong passwords to a kite with basic
/// auth: after a few 401s (the failure burst) it gets only 429s, and no
/// more password hashes run for it; meanwhile the team member at 127.0.0.1
/// logs in and is answered promptly every time.
#[test]
// How long the team member waits is real time.
#[allow(clippy::disallowed_methods)]
fn a_stranger_guessing_passwords_gets_429_and_others_are_served_promptly() {
    let relay = Relay::new().domain(&domain()).start();
    let backend = Backend::start("http");
    let dir = TempDir::new("guessing");
    let htpasswd = dir.path().join("htpasswd");
    // `htpasswd -nbB u pw`: bcrypt, cost 5.
    std::fs::write(
        &htpasswd,
        "u:$2y$05$i8GgOYQdRdwWE4vd1BtQou38w9yCUMjZ/3KVUmr.o0.Og3EAq2W3y\n",
    )
    .unwrap();
    let config = dir.path().join("connector.toml");
    std::fs::write(
        &config,
        format!(
            "secret = {SECRET:?}\n\n[[kite]]\nname = \"team.example.net\"\nprotocol = \"http\"\n\
             target = {:?}\nbasic_auth = {:?}\n",
            backend.addr(),
            path(&htpasswd)
        ),
    )
    .unwrap();
    let _connector = Connector::new(&relay)
        .args(&["--config", &path(&config)])
        .start();
    let base = relay.http_url();

    let stranger = {
        let url = format!("{base}/guess[1-1000]");
        std::thread::spawn(move || {
            let started = Instant::now();
            let out = curl_ok(&[
                "--interface",
                "127.0.0.2",
                "-u",
                "u:wrong",
                "-H",
                "Host: team.example.net",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}\n",
                &url,
            ]);
            (out, started.elapsed())
        })
    };
    let mut slowest = Duration::ZERO;
    let mut visits = 0;
    while !stranger.is_finished() || visits < 5 {
        let started = Instant::now();
        let body = curl_ok(&[
            "--interface",
            "127.0.0.1",
            "-u",
            "u:pw",
            "-H",
            "Host: team.example.net",
            &format!("{base}/"),
        ]);
        slowest = slowest.max(started.elapsed());
        assert_eq!(body, "hello from backend\n");
        visits += 1;
        std::thread::park_timeout(Duration::from_millis(50));
    }
    let (out, took) = stranger.join().unwrap();
    let codes: Vec<&str> = out.lines().collect();
    assert_eq!(codes.len(), 1000, "{out}");
    let unauthorized = codes.iter().filter(|code| **code == "401").count();
    let limited = codes.iter().filter(|code| **code == "429").count();
    assert_eq!(unauthorized + limited, 1000, "{out}");
    // 10 failures at once, then one a second.
    let allowed = 10 + took.as_secs() as usize + 1;
    assert!(
        (10..=allowed).contains(&unauthorized),
        "{unauthorized} wrong passwords checked in {took:?}"
    );
    assert!(
        slowest < scaled(Duration::from_secs(1)),
        "the team member waited {slowest:?} during the guessing"
    );
    assert!(relay.proc.exited().is_none());
}

/// A visitor that sends a whole ClientHello for a terminated name, then
/// never finishes the handshake: the relay answers, waits out its
/// handshake deadline (10 s) and closes; others are served meanwhile.
#[test]
// The relay's deadline is real time, and so is what this test measures.
#[allow(clippy::disallowed_methods)]
fn a_stalled_tls_handshake_is_closed_after_the_handshake_deadline() {
    let site = Terminating::start();
    let mut sock = connect(site.port());
    sock.write_all(&site.client_hello("app.example.net"))
        .unwrap();
    let mut first = [0u8; 1];
    sock.read_exact(&mut first)
        .expect("the relay answers the ClientHello");
    assert_eq!(first[0], 0x16, "a handshake record (ServerHello)");
    site.still_serves("/while-one-stalls");
    let started = std::time::Instant::now();
    sock.set_read_timeout(Some(scaled(std::time::Duration::from_secs(25))))
        .unwrap();
    let rest = closed_by_relay_after_flight(&mut sock);
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(5),
        "closed too early ({:?}): {rest} bytes",
        started.elapsed()
    );
}

/// Reads (and drops) until the relay closes; the number of bytes read.
/// Panics if it keeps the connection open past the socket's timeout.
fn closed_by_relay_after_flight(sock: &mut TcpStream) -> usize {
    let mut total = 0;
    let mut chunk = [0u8; 4096];
    loop {
        match sock.read(&mut chunk) {
            Ok(0) => return total,
            Ok(n) => total += n,
            Err(err) if err.kind() == ErrorKind::ConnectionReset => return total,
            Err(err) => panic!("the relay kept a stalled handshake open ({err})"),
        }
        assert!(total < 64 * 1024, "the relay keeps sending");
    }
}
