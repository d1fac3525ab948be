//! Attacker tests: the relay's PageKite front-end (`--pagekite`).
//!
//! A stranger speaks the PageKite back-end protocol to the relay's link
//! port with hand-made heads and chunks: with PageKite off it is refused
//! with a line naming the flag; garbage, oversized heads and too many kite
//! requests are refused; a forged challenge, a replayed signed request
//! and a signature for another name win nothing; a name of a kitepipe
//! connector's domain needs that domain's secret; and a tunnel that
//! authenticated and then sends garbage chunks, giant chunk lengths, a
//! zlib bomb or tens of thousands of SIDs is closed (or its chunks
//! ignored) with the relay's memory bounded, while the real kites keep
//! answering.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use crate::support::*;

const SECRET: &str = "pagekite-attacker-secret-1";
const CORP_SECRET: &str = "corp-connector-secret-22";
const GOOD: &str = "good.corp.test";

/// SHA-1 of `data`, lowercase hex (PageKite's signatures).
fn sha1_hex(data: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, data.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// pagekite.py's `signToken` without a timestamp.
fn sign(secret: &str, payload: &str, salt: &str) -> String {
    let salt = &salt[..8];
    format!(
        "{salt}{}",
        &sha1_hex(&format!("{secret}{payload}{salt}"))[..28]
    )
}

const SRAND: &str = "0123456789abcdef0123456789abcdef0123";

/// An `X-PageKite:` request for `proto:name` with `token`, signed with
/// `secret`.
fn request(proto: &str, name: &str, token: &str, secret: &str) -> String {
    let payload = format!("{proto}:{name}:{SRAND}:{token}");
    format!(
        "X-PageKite: {payload}:{}\r\n",
        sign(secret, &payload, "a1b2c3d4e5")
    )
}

/// A back-end's head with `lines` (X-PageKite requests and more).
fn head(lines: &str, zchunks: bool) -> String {
    format!(
        "CONNECT PageKite:1 HTTP/1.0\r\nX-PageKite-Features: AddKites\r\n{}\
         X-PageKite-Version: 1.5.2.201011\r\n{lines}\r\n",
        if zchunks {
            "X-PageKite-Features: ZChunks\r\n"
        } else {
            ""
        }
    )
}

fn connect(addr: SocketAddr) -> TcpStream {
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(scaled(Duration::from_secs(20))))
        .unwrap();
    sock
}

/// Reads a reply head (up to the blank line; at most 64 KiB).
fn read_head(sock: &mut TcpStream) -> String {
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

/// Sends `head` on a new connection and returns the relay's reply head.
fn ask(addr: SocketAddr, head: &str) -> (TcpStream, String) {
    let mut sock = connect(addr);
    sock.write_all(head.as_bytes()).unwrap();
    let reply = read_head(&mut sock);
    (sock, reply)
}

/// The challenge tokens of a reply: (`proto:name`, token).
fn challenges(reply: &str) -> Vec<(String, String)> {
    reply
        .lines()
        .filter_map(|line| line.strip_prefix("X-PageKite-SignThis: "))
        .filter_map(|value| {
            let parts: Vec<&str> = value.split(':').collect();
            (parts.len() == 4).then(|| (format!("{}:{}", parts[0], parts[1]), parts[3].to_string()))
        })
        .collect()
}

/// Whether the relay closes `sock` within the patience (EOF or reset),
/// discarding what it still sends.
#[allow(clippy::disallowed_methods)] // Real processes run on the wall clock.
fn closed(sock: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = std::time::Instant::now() + patience();
    while std::time::Instant::now() < deadline {
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

/// A relay with PageKite on for `*.pk.test` (SECRET) and a kitepipe
/// connector serving GOOD under `*.corp.test` (CORP_SECRET).
struct Scene {
    relay: RelayProc,
    _backend: Backend,
    _connector: Proc,
}

impl Scene {
    fn start(pagekite: bool) -> Scene {
        let mut relay = Relay::new()
            .domain(&format!("http,tcp:*.pk.test:{SECRET}"))
            .domain(&format!("http:*.corp.test:{CORP_SECRET}"));
        if pagekite {
            relay = relay.arg("--pagekite");
        }
        let relay = relay.start();
        let backend = Backend::start("http");
        let connector = Connector::new(&relay)
            .secret(CORP_SECRET)
            .kite(&format!("http:{GOOD}={}", backend.addr()))
            .start();
        Scene {
            relay,
            _backend: backend,
            _connector: connector,
        }
    }

    /// The kitepipe connector's kite still answers.
    fn good_answers(&self) {
        let body = curl_ok(&[
            "-H",
            &format!("Host: {GOOD}"),
            &format!("{}/", self.relay.http_url()),
        ]);
        assert_eq!(body, "hello from backend\n");
    }

    /// A tunnel for `evil.pk.test` that got its kite (the real secret,
    /// the relay's challenge signed), with the rest of the reply read.
    fn authenticated_tunnel(&self, zchunks: bool) -> TcpStream {
        let (_, reply) = ask(
            self.relay.link,
            &head(&request("http", "evil.pk.test", "", SECRET), zchunks),
        );
        let (_, token) = challenges(&reply)
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("a challenge in {reply}"));
        let (sock, reply) = ask(
            self.relay.link,
            &head(&request("http", "evil.pk.test", &token, SECRET), zchunks),
        );
        assert!(
            reply.contains("X-PageKite-OK: http:evil.pk.test:"),
            "{reply}"
        );
        sock
    }
}

#[test]
fn pagekite_off_refuses_back_ends_naming_the_flag() {
    let scene = Scene::start(false);
    let (mut sock, reply) = ask(
        scene.relay.link,
        &head(&request("http", "evil.pk.test", "", SECRET), false),
    );
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    let mut body = String::new();
    let _ = sock.read_to_string(&mut body);
    assert!(body.contains("--pagekite"), "{body}");
    scene.relay.proc.wait_for("PageKite support is off");
    scene.good_answers();
}

#[test]
fn garbage_oversized_and_overlong_heads_are_refused() {
    let scene = Scene::start(true);
    // Garbage after the request line.
    let (_, reply) = ask(
        scene.relay.link,
        "CONNECT PageKite:1 HTTP/1.0\r\n\x01\x02 no colon here\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    // A head that never ends: refused past the bound, not buffered.
    let mut sock = connect(scene.relay.link);
    sock.write_all(b"CONNECT PageKite:1 HTTP/1.0\r\n").unwrap();
    let filler = format!("X-Filler: {}\r\n", "a".repeat(1000));
    let mut refused = false;
    for _ in 0..64 {
        if sock.write_all(filler.as_bytes()).is_err() {
            refused = true;
            break;
        }
    }
    let reply = read_head(&mut sock);
    assert!(
        refused || reply.starts_with("HTTP/1.1 400"),
        "an endless head: {reply}"
    );
    // Too many kite requests in one head.
    let lines: String = (0..100)
        .map(|i| request("http", &format!("k{i}.pk.test"), "", SECRET))
        .collect();
    let (_, reply) = ask(scene.relay.link, &head(&lines, false));
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(!reply.contains("X-PageKite-SignThis"), "{reply}");
    scene.good_answers();
}

#[test]
fn forged_replayed_and_misdirected_signatures_win_nothing() {
    let scene = Scene::start(true);
    let link = scene.relay.link;
    // A forged challenge (not the relay's): a fresh challenge, no kite.
    let forged = "t0000000".to_string() + &"0".repeat(28);
    let (_, reply) = ask(
        link,
        &head(&request("http", "evil.pk.test", &forged, SECRET), false),
    );
    assert!(!reply.contains("X-PageKite-OK"), "{reply}");
    assert!(
        reply.contains("X-PageKite-SignThis: http:evil.pk.test:"),
        "{reply}"
    );

    // A real challenge for one name, used for another: no kite.
    let (_, reply) = ask(
        link,
        &head(&request("http", "one.pk.test", "", SECRET), false),
    );
    let (_, token) = challenges(&reply).into_iter().next().expect("challenge");
    let (_, reply) = ask(
        link,
        &head(&request("http", "two.pk.test", &token, SECRET), false),
    );
    assert!(!reply.contains("X-PageKite-OK"), "{reply}");

    // A signed request for one name with its signature on another.
    let (_, reply) = ask(
        link,
        &head(&request("http", "three.pk.test", "", SECRET), false),
    );
    let (_, token) = challenges(&reply).into_iter().next().expect("challenge");
    let good = request("http", "three.pk.test", &token, SECRET);
    let stolen_sign = good.trim_end().rsplit(':').next().unwrap().to_string();
    let misdirected = format!("X-PageKite: http:four.pk.test:{SRAND}:{token}:{stolen_sign}\r\n");
    let (_, reply) = ask(link, &head(&misdirected, false));
    assert!(!reply.contains("X-PageKite-OK"), "{reply}");

    // The genuine request is accepted once; replayed verbatim (an
    // eavesdropper on the plaintext tunnel) it is not.
    let (first, reply) = ask(link, &head(&good, false));
    assert!(
        reply.contains("X-PageKite-OK: http:three.pk.test:"),
        "{reply}"
    );
    let (_, replay) = ask(link, &head(&good, false));
    assert!(!replay.contains("X-PageKite-OK"), "{replay}");
    drop(first);

    // A name under a kitepipe connector's domain with the PageKite
    // domain's secret: refused, the connector keeps its kite alone.
    let (_, reply) = ask(link, &head(&request("http", GOOD, "", SECRET), false));
    let (_, token) = challenges(&reply).into_iter().next().expect("challenge");
    let (_, reply) = ask(link, &head(&request("http", GOOD, &token, SECRET), false));
    assert!(
        reply.contains(&format!(
            "X-PageKite-Invalid-Why: http:{GOOD}:{SRAND};signature"
        )),
        "{reply}"
    );
    for _ in 0..4 {
        scene.good_answers();
    }
}

#[test]
fn a_tunnel_sending_garbage_chunks_is_closed() {
    let scene = Scene::start(true);
    let mut sock = scene.authenticated_tunnel(false);
    sock.write_all(b"zz not a chunk length\r\n").unwrap();
    assert!(closed(&mut sock), "garbage chunk framing closes the tunnel");

    let mut sock = scene.authenticated_tunnel(false);
    sock.write_all(b"ffffffff\r\n").unwrap();
    sock.write_all(&[b'x'; 4096]).unwrap();
    assert!(closed(&mut sock), "a giant chunk length closes the tunnel");
    scene.good_answers();
}

/// `len` zero bytes as one zlib stream, sync-flushed (a PageKite ZChunk's
/// payload), made by Python's zlib.
fn zlib_zeros(len: usize) -> Vec<u8> {
    let out = Command::new("python3")
        .args([
            "-c",
            &format!(
                "import sys, zlib; c = zlib.compressobj(); \
                 sys.stdout.buffer.write(c.compress(bytes({len})) + c.flush(zlib.Z_SYNC_FLUSH))"
            ),
        ])
        .output()
        .expect("python3 zlib");
    assert!(out.status.success());
    out.stdout
}

#[test]
fn a_zlib_bomb_and_a_flood_of_sids_are_bounded() {
    let scene = Scene::start(true);
    let baseline = scene.relay.proc.rss_kib();
    // 512 MiB of zeros in ~500 KiB, claiming a small plain length.
    let bomb = zlib_zeros(512 << 20);
    let mut sock = scene.authenticated_tunnel(true);
    let _ = sock.write_all(format!("400_Z{:x}\r\n", bomb.len()).as_bytes());
    let _ = sock.write_all(&bomb);
    assert!(closed(&mut sock), "a zlib bomb closes the tunnel");
    assert!(
        scene.relay.proc.rss_kib() < baseline + 64 * 1024,
        "relay memory after the bomb: {} KiB from {baseline} KiB",
        scene.relay.proc.rss_kib()
    );
    scene.good_answers();

    // 60k chunks for SIDs the relay never opened: ignored or refused,
    // never kept.
    let mut sock = scene.authenticated_tunnel(false);
    let mut batch = Vec::new();
    for sid in 0..60_000u32 {
        let payload = format!("SID: {sid}\r\n\r\nhello");
        batch.extend_from_slice(format!("{:x}\r\n{payload}", payload.len()).as_bytes());
        if batch.len() > 64 * 1024 {
            if sock.write_all(&batch).is_err() {
                break;
            }
            batch.clear();
        }
    }
    let _ = sock.write_all(&batch);
    assert!(
        scene.relay.proc.rss_kib() < baseline + 64 * 1024,
        "relay memory after 60k SIDs: {} KiB from {baseline} KiB",
        scene.relay.proc.rss_kib()
    );
    drop(sock);
    scene.good_answers();
}

/// The `X-PageKite-SessionID` of a reply head.
fn session_of(reply: &str) -> String {
    reply
        .lines()
        .find_map(|line| line.strip_prefix("X-PageKite-SessionID: "))
        .unwrap_or_else(|| panic!("a session ID in {reply}"))
        .to_string()
}

/// Opens a tunnel for `names` (challenges answered), with `extra` head
/// lines; returns it and its reply head.
fn tunnel(addr: SocketAddr, names: &[&str], extra: &str) -> (TcpStream, String) {
    let lines: String = names
        .iter()
        .map(|name| request("http", name, "", SECRET))
        .collect();
    let (_, reply) = ask(addr, &head(&format!("{extra}{lines}"), false));
    let signed: String = challenges(&reply)
        .into_iter()
        .map(|(what, token)| {
            let name = what.split(':').nth(1).unwrap().to_string();
            request("http", &name, &token, SECRET)
        })
        .collect();
    let (sock, reply) = ask(addr, &head(&format!("{extra}{signed}"), false));
    for name in names {
        assert!(
            reply.contains(&format!("X-PageKite-OK: http:{name}:")),
            "{reply}"
        );
    }
    (sock, reply)
}

#[test]
fn a_session_is_replaced_only_by_a_tunnel_proving_all_its_kites() {
    let scene = Scene::start(true);
    let link = scene.relay.link;
    let (mut old, reply) = tunnel(link, &["a.pk.test", "b.pk.test"], "");
    let session = session_of(&reply);
    // Naming the session but proving only one of its kites: both stay.
    let replace = format!("X-PageKite-Replace: {session}\r\n");
    let (_partial, _) = tunnel(link, &["a.pk.test"], &replace);
    old.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    for _ in 0..4 {
        let mut buf = [0u8; 4096];
        match old.read(&mut buf) {
            // Pings from the relay are fine; an end is not.
            Ok(n) => assert!(n > 0, "the old tunnel was closed by a partial replacement"),
            Err(err) => assert!(
                matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "the old tunnel was cut by a partial replacement: {err}"
            ),
        }
    }
    // Proving all of them: the stale tunnel is closed at once, and the
    // new one keeps the session.
    let (_new, reply) = tunnel(link, &["a.pk.test", "b.pk.test"], &replace);
    assert_eq!(session_of(&reply), session);
    old.set_read_timeout(Some(scaled(Duration::from_secs(20))))
        .unwrap();
    assert!(closed(&mut old), "the replaced tunnel is closed");
    scene.good_answers();
}

#[test]
fn wrong_signatures_are_budgeted_per_tunnel() {
    let scene = Scene::start(true);
    let names: Vec<String> = (0..6).map(|i| format!("guess{i}.pk.test")).collect();
    let lines: String = names
        .iter()
        .map(|name| request("http", name, "", SECRET))
        .collect();
    let (_, reply) = ask(scene.relay.link, &head(&lines, false));
    let guesses: String = challenges(&reply)
        .into_iter()
        .map(|(what, token)| {
            let name = what.split(':').nth(1).unwrap().to_string();
            request("http", &name, &token, "a-guessed-secret-123")
        })
        .collect();
    let (mut sock, reply) = ask(scene.relay.link, &head(&guesses, false));
    let why: Vec<&str> = reply
        .lines()
        .filter_map(|line| line.strip_prefix("X-PageKite-Invalid-Why: "))
        .map(|value| value.rsplit(';').next().unwrap())
        .collect();
    // Four are checked (and wrong); the rest are refused unchecked.
    assert_eq!(
        why,
        [
            "signature",
            "signature",
            "signature",
            "signature",
            "quota",
            "quota"
        ],
        "{reply}"
    );
    assert!(!reply.contains("X-PageKite-OK"), "{reply}");
    assert!(closed(&mut sock), "a tunnel that won nothing is closed");
    scene.good_answers();
}

#[test]
fn a_head_that_never_ends_is_cut_at_the_handshake_deadline() {
    let scene = Scene::start(true);
    let mut sock = connect(scene.relay.link);
    sock.write_all(b"CONNECT PageKite:1 HTTP/1.0\r\nX-PageKite-Features: AddKites\r\n")
        .unwrap();
    // Nothing more: the relay closes it (15 s), and serves others meanwhile.
    scene.good_answers();
    assert!(closed(&mut sock), "a dripping head is cut");
    scene.good_answers();
}

#[test]
fn the_websocket_transport_is_refused_with_501() {
    let scene = Scene::start(true);
    // pagekite.py 1.5's `--wschunks` head (its path says v0.8).
    let lines = request("http", "ws.pk.test", "", SECRET);
    let (_, reply) = ask(
        scene.relay.link,
        &format!(
            "GET /~:PageKite:~/v0.8 HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Protocol: v1.pagekite.org\r\nSec-WebSocket-Version: 13\r\n\
             X-PageKite-Version: 1.5.2.201011\r\n{lines}\r\n"
        ),
    );
    assert!(reply.starts_with("HTTP/1.1 501"), "{reply}");
    scene.relay.proc.wait_for("websocket transport refused");
    scene.good_answers();
}

/// pagekite.py's front-end ping on the link port: a stranger gets the
/// fixed `503` and a close, nothing else; a ping head that never ends is
/// read no further than `MAX_PING` (1 KiB) and goes to the link's TLS
/// handshake, which refuses it; the relay keeps serving.
#[test]
fn front_end_pings_get_a_fixed_answer_and_endless_ones_are_cut() {
    let scene = Scene::start(true);
    let (mut sock, reply) = ask(
        scene.relay.link,
        "HEAD /ping HTTP/1.1\r\nHost: ping.pagekite\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    assert!(closed(&mut sock), "the ping's connection stayed open");

    let failures = scene.relay.proc.count("link TLS handshake failed");
    let mut sock = connect(scene.relay.link);
    sock.write_all(b"HEAD /ping HTTP/1.1\r\nHost: ping.pagekite\r\n")
        .unwrap();
    // Far past MAX_PING without the blank line; the relay stops reading
    // and closes, so later writes may fail.
    let pad = format!("X-Pad: {}\r\n", "a".repeat(1000));
    for _ in 0..8 {
        if sock.write_all(pad.as_bytes()).is_err() {
            break;
        }
    }
    assert!(
        closed(&mut sock),
        "an endless ping head kept its connection"
    );
    scene
        .relay
        .proc
        .wait_for_count("link TLS handshake failed", failures + 1);
    scene.good_answers();
}
