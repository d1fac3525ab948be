//! Per-kite visitor policy (`allow` and `deny` in `[[kite]]` tables),
//! enforced by the relay before anything reaches the link, and the
//! relay's listeners on IPv6 (`[::1]`). Each backend here counts the
//! connections it accepts, so a test can show that a refused visitor
//! never reached it.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use support::*;

const SECRET: &str = "policy-test-secret";

fn domain() -> String {
    format!("http,tcp:*.example.net:{SECRET}")
}

/// A backend on loopback that counts the connections it accepts: `http`
/// answers one request per connection with 200 `backend`, `tcp` greets
/// with `banner` and closes.
struct Counting {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl Counting {
    fn start(mode: &'static str, bind: &str) -> Counting {
        let listener = TcpListener::bind((bind, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            for sock in listener.incoming() {
                let Ok(mut sock) = sock else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    if mode == "tcp" {
                        let _ = sock.write_all(b"banner\n");
                        return;
                    }
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match sock.read(&mut byte) {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let _ = sock.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nbackend\n",
                    );
                });
            }
        });
        Counting { addr, accepted }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// A connector serving one `[[kite]]` table with `extra` lines (the
/// lists); returns it and the config's directory.
fn policy_kite(
    relay: &RelayProc,
    (protocol, name): (&str, &str),
    target: &str,
    extra: &str,
) -> (Proc, TempDir) {
    let port = if protocol == "tcp" { "port = 0\n" } else { "" };
    let dir = TempDir::new("policy-kite");
    let file = dir.path().join("connector.toml");
    std::fs::write(
        &file,
        format!(
            "secret = {SECRET:?}\n\n[[kite]]\nname = {name:?}\nprotocol = {protocol:?}\n\
             {port}target = {target:?}\n{extra}\n"
        ),
    )
    .expect("write the connector's config");
    let connector = Connector::new(relay)
        .args(&["--config", &path(&file)])
        .start();
    (connector, dir)
}

/// `curl -i` from `interface` (a local address) to `url` with `host`:
/// (status, whole answer).
fn visit(interface: &str, url: &str, host: &str) -> (u16, String) {
    let host = format!("Host: {host}");
    let (code, out, err) = curl(&["-g", "-i", "--interface", interface, "-H", &host, url]);
    assert_eq!(code, 0, "curl {url} from {interface} failed: {err}");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    (status, text)
}

fn assert_forbidden(answer: &str) {
    let lower = answer.to_ascii_lowercase();
    assert!(lower.contains("connection: close"), "{answer}");
    assert!(lower.contains("x-kitepipe-error: 403"), "{answer}");
    assert!(answer.contains("<h1>Forbidden</h1>"), "{answer}");
}

/// `deny = ["127.0.0.2"]` on an HTTP kite: 127.0.0.1 gets the backend's
/// answer, 127.0.0.2 the relay's styled 403 page, and the backend never
/// sees the denied visitor's connection.
#[test]
fn a_denied_address_gets_403_and_never_reaches_the_backend() {
    let relay = Relay::new().domain(&domain()).start();
    let backend = Counting::start("http", "127.0.0.1");
    let (_connector, _dir) = policy_kite(
        &relay,
        ("http", "deny.example.net"),
        &backend.addr.to_string(),
        "deny = [\"127.0.0.2\"]",
    );
    let url = relay.http_url() + "/";

    let (status, answer) = visit("127.0.0.1", &url, "deny.example.net");
    assert_eq!(status, 200, "{answer}");
    assert!(answer.ends_with("backend\n"), "{answer}");
    assert_eq!(backend.accepted(), 1);

    for _ in 0..3 {
        let (status, answer) = visit("127.0.0.2", &url, "deny.example.net");
        assert_eq!(status, 403, "{answer}");
        assert_forbidden(&answer);
        assert!(answer.contains("127.0.0.2"), "{answer}");
    }
    // The allowed visitor once more: its connection arriving proves the
    // denied ones, sent before it on the same link, would have too.
    let (status, _) = visit("127.0.0.1", &url, "deny.example.net");
    assert_eq!(status, 200);
    assert_eq!(
        backend.accepted(),
        2,
        "the denied visitors reached the backend"
    );
}

/// `allow = ["127.0.0.2/32"]` on an HTTP kite: the reverse, only
/// 127.0.0.2 reaches the backend.
#[test]
fn an_allow_list_admits_only_its_addresses() {
    let relay = Relay::new().domain(&domain()).start();
    let backend = Counting::start("http", "127.0.0.1");
    let (_connector, _dir) = policy_kite(
        &relay,
        ("http", "allow.example.net"),
        &backend.addr.to_string(),
        "allow = [\"127.0.0.2/32\"]",
    );
    let url = relay.http_url() + "/";

    let (status, answer) = visit("127.0.0.1", &url, "allow.example.net");
    assert_eq!(status, 403, "{answer}");
    assert_forbidden(&answer);
    let (status, answer) = visit("127.0.0.2", &url, "allow.example.net");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        backend.accepted(),
        1,
        "the refused visitor reached the backend"
    );
}

/// Connects to a TCP kite from `from` and reads until the relay or the
/// backend ends the connection: (bytes read, whether it ended in an error
/// such as a reset).
fn tcp_visit(from: &str, to: SocketAddr) -> (Vec<u8>, bool) {
    let local: SocketAddr = format!("{from}:0")
        .parse()
        .or_else(|_| format!("[{from}]:0").parse())
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let sock = runtime.block_on(async {
        let sock = if to.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .unwrap();
        sock.bind(local).unwrap();
        sock.connect(to).await.unwrap().into_std().unwrap()
    });
    let mut sock: TcpStream = sock;
    sock.set_nonblocking(false).unwrap();
    sock.set_read_timeout(Some(patience())).unwrap();
    let mut got = Vec::new();
    let failed = sock.read_to_end(&mut got).is_err();
    (got, failed)
}

/// A TCP kite with `deny = ["127.0.0.2"]`: the denied visitor's
/// connection is closed with nothing from the backend (a reset), and the
/// backend saw no connection; 127.0.0.1 gets the banner.
#[test]
fn a_denied_tcp_visitor_is_closed_before_a_stream_opens() {
    let relay = Relay::new().domain(&domain()).start();
    let backend = Counting::start("tcp", "127.0.0.1");
    let (connector, _dir) = policy_kite(
        &relay,
        ("tcp", "deny-tcp.example.net"),
        &backend.addr.to_string(),
        "deny = [\"127.0.0.2\"]",
    );
    let port = connector.tcp_kite_port("deny-tcp.example.net");
    let kite: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    let (got, failed) = tcp_visit("127.0.0.2", kite);
    assert!(got.is_empty(), "{got:?}");
    assert!(failed, "the denied visitor's connection should be reset");
    let (got, _) = tcp_visit("127.0.0.1", kite);
    assert_eq!(got, b"banner\n");
    assert_eq!(
        backend.accepted(),
        1,
        "the denied visitor reached the backend"
    );
}

/// The address of the first `role` listener (`http`, `listen`) of the
/// relay's ready line whose address satisfies `pick`.
fn listener(relay: &RelayProc, role: &str, pick: impl Fn(&SocketAddr) -> bool) -> SocketAddr {
    let ready = relay.proc.wait_ready("relay", 1, |_| true);
    ready[role]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|addr| addr.as_str()?.parse().ok())
        .find(|addr| pick(addr))
        .unwrap_or_else(|| panic!("no {role} listener as asked in {ready}"))
}

/// IPv6 end to end: a relay whose link, HTTP and HTTPS listeners are on `[::1]`
/// (plus a second HTTP listener on 127.0.0.1) and whose TCP kites bind to
/// `::1`; a connector linked over `[::1]`. An HTTP kite with `allow =
/// ["::1/128"]` serves curl over `[::1]` and refuses (403) the same
/// request on the IPv4 listener; a TCP kite is reached on `[::1]`.
#[test]
fn ipv6_listeners_serve_kites_and_policies_match_ipv6_visitors() {
    let relay = Relay::new()
        .domain(&domain())
        .args(&[
            "--listen",
            "[::1]:0",
            "--http",
            "[::1]:0",
            "--http",
            "127.0.0.1:0",
            "--https",
            "[::1]:0",
        ])
        .args(&["--tcp-bind", "::1"])
        .start();
    assert!(relay.link.is_ipv6(), "{}", relay.link);
    let http6 = listener(&relay, "http", SocketAddr::is_ipv6);
    let http4 = listener(&relay, "http", SocketAddr::is_ipv4);
    let https6 = listener(&relay, "https", SocketAddr::is_ipv6);
    assert_eq!(https6.ip().to_string(), "::1");
    let backend = Counting::start("http", "127.0.0.1");
    let (_connector, _dir) = policy_kite(
        &relay,
        ("http", "v6.example.net"),
        &backend.addr.to_string(),
        "allow = [\"::1/128\"]",
    );

    let (status, answer) = visit("::1", &format!("http://{http6}/"), "v6.example.net");
    assert_eq!(status, 200, "{answer}");
    assert!(answer.ends_with("backend\n"), "{answer}");
    let (status, answer) = visit("127.0.0.1", &format!("http://{http4}/"), "v6.example.net");
    assert_eq!(status, 403, "{answer}");
    assert_forbidden(&answer);
    assert_eq!(
        backend.accepted(),
        1,
        "the refused visitor reached the backend"
    );

    let echo = Counting::start("tcp", "::1");
    let (connector, _dir) = policy_kite(
        &relay,
        ("tcp", "v6-tcp.example.net"),
        &echo.addr.to_string(),
        "",
    );
    let port = connector.tcp_kite_port("v6-tcp.example.net");
    let (got, _) = tcp_visit("::1", format!("[::1]:{port}").parse().unwrap());
    assert_eq!(got, b"banner\n");
    assert_eq!(echo.accepted(), 1);
}

/// An HTTPS kite (SNI passthrough) with `deny = ["127.0.0.2"]`: the
/// denied visitor's ClientHello goes nowhere (its connection is closed and
/// the backend sees no connection); an allowed one reaches the backend
/// (which answers with no TLS, so curl fails there too, after it).
#[test]
fn a_denied_https_visitor_is_closed_before_a_stream_opens() {
    let relay = Relay::new()
        .domain(&format!("https:*.example.net:{SECRET}"))
        .args(&["--https", "127.0.0.1:0"])
        .start();
    let https = relay.https.expect("relay has an HTTPS listener");
    let backend = Counting::start("tcp", "127.0.0.1");
    let (_connector, _dir) = policy_kite(
        &relay,
        ("https", "tls.example.net"),
        &backend.addr.to_string(),
        "deny = [\"127.0.0.2\"]",
    );
    let resolve = format!("tls.example.net:{}:127.0.0.1", https.port());
    let url = format!("https://tls.example.net:{}/", https.port());
    for from in ["127.0.0.2", "127.0.0.1"] {
        let (code, _, err) = curl(&["-k", "--interface", from, "--resolve", &resolve, &url]);
        assert_ne!(code, 0, "{from}: the backend speaks no TLS: {err}");
        let want = usize::from(from == "127.0.0.1");
        assert_eq!(backend.accepted(), want, "{from}: {err}");
    }
}
