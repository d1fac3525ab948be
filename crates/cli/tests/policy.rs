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

// ---- HTTP rules: basic auth, rate and connection limits, header edits ----

/// Writes an htpasswd file in `dir` with a bcrypt user made by Debian's
/// `htpasswd -B` and an argon2id user made with the `argon2` crate; None
/// (the test returns) without `htpasswd`.
fn htpasswd_file(
    dir: &TempDir,
    bcrypt_user: (&str, &str),
    argon2_user: (&str, &str),
) -> Option<std::path::PathBuf> {
    if !require_tool("htpasswd", "apache2-utils") {
        return None;
    }
    let file = dir.path().join("team.htpasswd");
    let out = std::process::Command::new("htpasswd")
        .args(["-B", "-b", "-c", &path(&file), bcrypt_user.0, bcrypt_user.1])
        .output()
        .expect("run htpasswd");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str(&format!(
        "{}:{}\n",
        argon2_user.0,
        argon2_hash(argon2_user.1)
    ));
    std::fs::write(&file, text).unwrap();
    Some(file)
}

/// An argon2id PHC string of `password` (small parameters: tests stay quick).
fn argon2_hash(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::encode_b64(&pseudo_random(16, password.len() as u64)).unwrap();
    let params = argon2::Params::new(4096, 1, 1, None).unwrap();
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

/// `curl -i` with `args` to the relay for `host`: (status, whole answer).
fn get(relay: &RelayProc, host: &str, path: &str, args: &[&str]) -> (u16, String) {
    let url = format!("{}{path}", relay.http_url());
    let host = format!("Host: {host}");
    let mut all = vec!["-i", "-H", &host];
    all.extend_from_slice(args);
    all.push(&url);
    let (code, out, err) = curl(&all);
    assert_eq!(code, 0, "curl {all:?}: {err}");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    (status, text)
}

/// The value of header `name` in a `curl -i` answer.
fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    answer.split("\r\n\r\n").next()?.lines().find_map(|line| {
        let (field, value) = line.split_once(':')?;
        field.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

/// Basic auth from an htpasswd file with a bcrypt and an argon2 user: no
/// credentials get 401 with the realm's challenge (and nothing reaches
/// the backend), a wrong password 401, each user with their password the
/// backend's answer; a denied address 403 whatever its password.
#[test]
fn basic_auth_asks_for_and_admits_bcrypt_and_argon2_users() {
    let dir = TempDir::new("basic-auth");
    let Some(file) = htpasswd_file(&dir, ("bob", "bob-pass"), ("alice", "alice-pass")) else {
        return;
    };
    let relay = Relay::new().domain(&domain()).start();
    let backend = Counting::start("http", "127.0.0.1");
    let extra = format!(
        "basic_auth = {:?}\nauth_realm = \"Team only\"\ndeny = [\"127.0.0.2\"]",
        path(&file)
    );
    let (_connector, _dir) = policy_kite(
        &relay,
        ("http", "auth.example.net"),
        &backend.addr.to_string(),
        &extra,
    );
    let host = "auth.example.net";

    let (status, answer) = get(&relay, host, "/", &[]);
    assert_eq!(status, 401, "{answer}");
    assert_eq!(
        header(&answer, "www-authenticate"),
        Some("Basic realm=\"Team only\", charset=\"UTF-8\""),
        "{answer}"
    );
    assert!(answer.contains("<h1>Unauthorized</h1>"), "{answer}");
    assert_eq!(header(&answer, "x-kitepipe-error"), Some("401"));
    for wrong in ["bob:alice-pass", "alice:bob-pass", "carol:bob-pass", "bob:"] {
        let (status, answer) = get(&relay, host, "/", &["-u", wrong]);
        assert_eq!(status, 401, "{wrong}: {answer}");
    }
    assert_eq!(
        backend.accepted(),
        0,
        "a refused visitor reached the backend"
    );
    for right in ["bob:bob-pass", "alice:alice-pass", "bob:bob-pass"] {
        let (status, answer) = get(&relay, host, "/", &["-u", right]);
        assert_eq!(status, 200, "{right}: {answer}");
        assert!(answer.ends_with("backend\n"), "{answer}");
    }
    assert_eq!(backend.accepted(), 3);
    // The allow/deny lists answer first: a denied address gets 403 even
    // with the right password (and costs no hash).
    let (status, answer) = get(
        &relay,
        host,
        "/",
        &["--interface", "127.0.0.2", "-u", "bob:bob-pass"],
    );
    assert_eq!(status, 403, "{answer}");
    assert_forbidden(&answer);
}

/// `rate_limit = 5`, `rate_burst = 5`: 20 quick requests from 127.0.0.1
/// get some 429s (with `Retry-After`), and 127.0.0.2 is still served.
#[test]
fn a_burst_gets_429_with_retry_after_and_other_addresses_are_served() {
    let relay = Relay::new().domain(&domain()).start();
    let backend = Backend::start("http");
    let (_connector, _dir) = policy_kite(
        &relay,
        ("http", "rate.example.net"),
        &backend.addr(),
        "rate_limit = 5\nrate_burst = 5",
    );
    // One curl, 20 transfers (URL globbing), as fast as they go.
    let url = format!("{}/bytes/[1-20]", relay.http_url());
    let out = curl_ok(&[
        "--interface",
        "127.0.0.1",
        "-H",
        "Host: rate.example.net",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}\n",
        &url,
    ]);
    let codes: Vec<&str> = out.lines().collect();
    assert_eq!(codes.len(), 20, "{out}");
    let ok = codes.iter().filter(|code| **code == "200").count();
    let limited = codes.iter().filter(|code| **code == "429").count();
    assert_eq!(ok + limited, 20, "{out}");
    assert!(ok >= 5, "the burst passes: {out}");
    assert!(limited >= 5, "the burst is cut: {out}");
    assert!(codes[..5].iter().all(|code| *code == "200"), "{out}");

    let (status, answer) = get(
        &relay,
        "rate.example.net",
        "/",
        &["--interface", "127.0.0.1"],
    );
    if status == 429 {
        let retry: u64 = header(&answer, "retry-after")
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no Retry-After: {answer}"));
        assert!((1..=2).contains(&retry), "{answer}");
        assert!(answer.contains("<h1>Too Many Requests</h1>"), "{answer}");
    }
    let (status, answer) = get(
        &relay,
        "rate.example.net",
        "/",
        &["--interface", "127.0.0.2"],
    );
    assert_eq!(status, 200, "another address has its own bucket: {answer}");
}

/// Sends one request for `host` on `sock` (with `fields`, each ending in
/// CRLF) and reads its answer up to the end of the head plus
/// `Content-Length` bytes: the status.
fn request_on(sock: &mut TcpStream, host: &str, fields: &str) -> u16 {
    sock.set_read_timeout(Some(patience())).unwrap();
    write!(sock, "GET / HTTP/1.1\r\nHost: {host}\r\n{fields}\r\n").unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        assert_eq!(sock.read(&mut byte).unwrap(), 1, "cut: {got:?}");
        got.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&got).into_owned();
    let len: usize = header(&head, "content-length").unwrap().parse().unwrap();
    let mut body = vec![0u8; len];
    sock.read_exact(&mut body).unwrap();
    head.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `max_connections = 2`: two held keep-alive connections are served,
/// a third gets 429 with `Retry-After`; once one closes, a new one is
/// served again.
#[test]
fn max_connections_refuses_the_connection_past_the_limit() {
    let relay = Relay::new().domain(&domain()).start();
    let backend = Backend::start("http");
    let (_connector, _dir) = policy_kite(
        &relay,
        ("http", "conns.example.net"),
        &backend.addr(),
        "max_connections = 2",
    );
    let addr = relay.http_url().trim_start_matches("http://").to_string();
    let host = "conns.example.net";
    let mut first = TcpStream::connect(&addr).unwrap();
    assert_eq!(request_on(&mut first, host, ""), 200);
    let mut second = TcpStream::connect(&addr).unwrap();
    assert_eq!(request_on(&mut second, host, ""), 200);
    let mut third = TcpStream::connect(&addr).unwrap();
    assert_eq!(request_on(&mut third, host, ""), 429);
    let (status, answer) = get(&relay, host, "/", &[]);
    assert_eq!(status, 429, "{answer}");
    assert_eq!(header(&answer, "retry-after"), Some("1"), "{answer}");
    // The held ones keep working (keep-alive).
    assert_eq!(request_on(&mut first, host, ""), 200);
    drop(first);
    eventually("a freed connection slot", || {
        (get(&relay, host, "/", &[]).0 == 200).then_some(())
    });
    assert_eq!(request_on(&mut second, host, ""), 200);
}

/// Header edits both ways and `X-Forwarded-Host`: the backend (which
/// echoes the request's headers) sees the set header and not the removed
/// one, plus `X-Forwarded-Host`; the visitor sees the response's edits. A
/// kite without `forwarded_host` sends none (and drops a visitor's).
#[test]
fn headers_are_set_and_removed_as_configured() {
    let relay = Relay::new().domain(&domain()).start();
    let backend = Backend::start("http");
    let (_edits, _dir) = policy_kite(
        &relay,
        ("http", "edits.example.net"),
        &backend.addr(),
        "forwarded_host = true\n\
         request_headers = { set = { \"X-Team\" = \"blue\" }, remove = [\"Cookie\"] }\n\
         response_headers = { set = { \"X-Frame-Options\" = \"DENY\" }, remove = [\"Server\"] }",
    );
    let (_plain, _dir2) = policy_kite(&relay, ("http", "plain.example.net"), &backend.addr(), "");
    let visitor_headers = [
        "-H",
        "Cookie: session=secret",
        "-H",
        "X-Team: red",
        "-H",
        "X-Forwarded-Host: evil.example",
    ];

    let (status, answer) = get(&relay, "edits.example.net", "/headers", &visitor_headers);
    assert_eq!(status, 200, "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap();
    let seen: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(seen["x-team"], "blue", "{seen}");
    assert!(seen.get("cookie").is_none(), "{seen}");
    assert_eq!(seen["x-forwarded-host"], "edits.example.net", "{seen}");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1", "{seen}");
    assert_eq!(header(&answer, "x-frame-options"), Some("DENY"), "{answer}");
    assert_eq!(header(&answer, "server"), None, "{answer}");

    let (status, answer) = get(&relay, "plain.example.net", "/headers", &visitor_headers);
    assert_eq!(status, 200, "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap();
    let seen: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(seen["x-team"], "red", "{seen}");
    assert_eq!(seen["cookie"], "session=secret", "{seen}");
    assert!(seen.get("x-forwarded-host").is_none(), "{seen}");
    assert!(header(&answer, "server").is_some(), "{answer}");
    assert_eq!(header(&answer, "x-frame-options"), None, "{answer}");
}

/// Pipelined requests on one keep-alive connection to a kite with rules
/// (basic auth, a generous rate) are each checked and all answered in
/// order; the same on a kite without rules.
#[test]
fn allowed_visitors_keep_alive_and_pipeline_through_rules() {
    let dir = TempDir::new("pipeline-auth");
    let Some(file) = htpasswd_file(&dir, ("bob", "bob-pass"), ("alice", "alice-pass")) else {
        return;
    };
    let relay = Relay::new().domain(&domain()).start();
    let backend = Backend::start("http");
    let extra = format!("basic_auth = {:?}\nrate_limit = 100", path(&file));
    let (_ruled, _dir) = policy_kite(
        &relay,
        ("http", "ruled.example.net"),
        &backend.addr(),
        &extra,
    );
    let (_plain, _dir2) = policy_kite(&relay, ("http", "free.example.net"), &backend.addr(), "");
    let addr = relay.http_url().trim_start_matches("http://").to_string();
    // bob:bob-pass
    let auth = "Authorization: Basic Ym9iOmJvYi1wYXNz\r\n";
    for (host, auth) in [("ruled.example.net", auth), ("free.example.net", "")] {
        let mut sock = TcpStream::connect(&addr).unwrap();
        sock.set_read_timeout(Some(patience())).unwrap();
        let one = format!("GET /conn HTTP/1.1\r\nHost: {host}\r\n{auth}\r\n");
        let last = format!("GET / HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n");
        sock.write_all(format!("{one}{one}{last}").as_bytes())
            .unwrap();
        let mut got = String::new();
        sock.read_to_string(&mut got).unwrap();
        assert_eq!(got.matches("HTTP/1.1 200 OK").count(), 3, "{host}: {got}");
        assert!(got.ends_with("hello from backend\n"), "{host}: {got}");
        // One backend connection served all three: the same client port.
        let ports: Vec<&str> = got
            .split("\r\n\r\n")
            .filter_map(|part| part.split("HTTP/1.1").next())
            .filter(|part| part.starts_with("127.0.0.1:"))
            .collect();
        assert_eq!(ports.len(), 2, "{host}: {got}");
        assert_eq!(ports[0], ports[1], "{host}: {got}");
    }
}

/// The htpasswd file changes while the connector runs: within a few
/// seconds the new user gets in and the removed one does not (not even on
/// a keep-alive connection opened before), on the same link (never
/// dropped). A file that then turns bad (an MD5 line) keeps
/// the last good users, and the connector says why.
#[test]
fn a_changed_htpasswd_file_replaces_the_users_without_dropping_the_link() {
    let dir = TempDir::new("htpasswd-reload");
    let Some(file) = htpasswd_file(&dir, ("bob", "bob-pass"), ("alice", "alice-pass")) else {
        return;
    };
    let relay = Relay::new().domain(&domain()).start();
    let backend = Backend::start("http");
    let extra = format!("basic_auth = {:?}", path(&file));
    let (connector, _dir) = policy_kite(
        &relay,
        ("http", "team.example.net"),
        &backend.addr(),
        &extra,
    );
    let host = "team.example.net";
    assert_eq!(get(&relay, host, "/", &["-u", "bob:bob-pass"]).0, 200);
    assert_eq!(get(&relay, host, "/", &["-u", "carol:carol-pass"]).0, 401);
    // Bob keeps a connection open across the change.
    let addr = relay.http_url().trim_start_matches("http://").to_string();
    let mut kept = TcpStream::connect(&addr).unwrap();
    // bob:bob-pass
    let bob = "Authorization: Basic Ym9iOmJvYi1wYXNz\r\n";
    assert_eq!(request_on(&mut kept, host, bob), 200);

    // Bob leaves, carol joins (a new file, as `htpasswd -c` writes it).
    let out = std::process::Command::new("htpasswd")
        .args(["-B", "-b", "-c", &path(&file), "carol", "carol-pass"])
        .output()
        .unwrap();
    assert!(out.status.success());
    eventually("carol gets in", || {
        (get(&relay, host, "/", &["-u", "carol:carol-pass"]).0 == 200).then_some(())
    });
    assert_eq!(get(&relay, host, "/", &["-u", "bob:bob-pass"]).0, 401);
    assert_eq!(get(&relay, host, "/", &["-u", "alice:alice-pass"]).0, 401);
    assert_eq!(
        request_on(&mut kept, host, bob),
        401,
        "a connection opened before the change keeps the old users"
    );
    connector.wait_for("htpasswd file changed: sending the new users");

    // A bad file: the last good users stay.
    std::fs::write(&file, "carol:$apr1$x8fV2$0RLJXDUj4dS9JVz4jVoSq1\n").unwrap();
    connector.wait_for("cannot be used: keeping the last good users");
    assert!(
        connector.output().contains("line 1: MD5"),
        "{}",
        connector.output()
    );
    assert_eq!(get(&relay, host, "/", &["-u", "carol:carol-pass"]).0, 200);

    assert_eq!(connector.links_down(), 0, "the link was dropped");
    assert_eq!(
        connector.count("linked to relay"),
        1,
        "{}",
        connector.output()
    );
    assert!(
        !relay.proc.output().contains("link closed"),
        "{}",
        relay.proc.output()
    );
}
