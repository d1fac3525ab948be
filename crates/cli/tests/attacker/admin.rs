//! The admin server (`--admin`): a stranger on the network, a web page in
//! the operator's browser (cross-origin requests, DNS rebinding) and a
//! local client sending garbage.
//!
//! - Bound beyond loopback without a token, the relay refuses to start.
//! - With a token, requests without it (or with a wrong one) get 401.
//! - A `Host` that is not loopback (rebinding) gets 421; a foreign
//!   `Origin` or a cross-site fetch gets 403.
//! - Garbage and oversized request heads get an error, and the server
//!   keeps serving.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use crate::support::*;

/// The status code curl saw for `url` with extra `args`.
fn status(url: &str, args: &[&str]) -> String {
    let mut all = vec!["-o", "/dev/null", "-w", "%{http_code}"];
    all.extend_from_slice(args);
    all.push(url);
    let (_, out, _) = curl(&all);
    String::from_utf8_lossy(&out).into_owned()
}

fn token_file(dir: &TempDir, token: &str) -> String {
    let file = dir.path().join("admin-token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    file.to_string_lossy().into_owned()
}

#[test]
fn admin_beyond_loopback_without_a_token_refuses_to_start() {
    let state = TempDir::new("admin-exposed");
    let out = Command::new(BIN)
        .args(["relay", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .args(["--admin=0.0.0.0:0", "--state-dir"])
        .arg(state.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("beyond loopback"), "{stderr}");
    assert!(stderr.contains("--admin-token-file"), "{stderr}");
    // A token too short to be a lock is refused as well.
    let file = token_file(&state, "short");
    let out = Command::new(BIN)
        .args(["relay", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .args([
            "--admin=0.0.0.0:0",
            "--admin-token-file",
            &file,
            "--state-dir",
        ])
        .arg(state.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("at least 16"), "{stderr}");
}

#[test]
fn admin_with_a_token_refuses_requests_without_it() {
    let dir = TempDir::new("admin-token");
    let token = "0123456789abcdef0123456789abcdef";
    let file = token_file(&dir, token);
    let relay = Relay::new()
        .args(&["--admin=127.0.0.1:0", "--admin-token-file", &file])
        .start();
    let admin = admin_of(&relay.proc);
    for path in ["/metrics", "/api/status", "/api/live", "/", "/app.js"] {
        let url = format!("http://{admin}{path}");
        assert_eq!(status(&url, &[]), "401", "{path} without a token");
        assert_eq!(
            status(
                &url,
                &["-H", "Authorization: Bearer wrong-token-wrong-token"]
            ),
            "401",
            "{path} with a wrong token"
        );
        assert_eq!(
            status(&url, &["-H", &format!("Authorization: Bearer {token}0")]),
            "401",
            "{path} with a longer token"
        );
    }
    let url = format!("http://{admin}/metrics");
    assert_eq!(
        status(&url, &["-H", &format!("Authorization: Bearer {token}")]),
        "200"
    );
    assert_eq!(
        status(&url, &["-H", &format!("X-Kitepipe-Token: {token}")]),
        "200"
    );
    // The browser's way: /?token= sets a cookie the page's requests send.
    let (_, out, _) = curl(&["-i", &format!("http://{admin}/?token={token}")]);
    let head = String::from_utf8_lossy(&out);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.contains(&format!(
            "kitepipe_admin={token}; Path=/; HttpOnly; SameSite=Strict"
        )),
        "{head}"
    );
    assert_eq!(
        status(
            &format!("http://{admin}/api/status"),
            &["-H", &format!("Cookie: kitepipe_admin={token}")]
        ),
        "200"
    );
}

#[test]
fn admin_refuses_other_sites_and_rebound_names() {
    let relay = Relay::new().args(&["--admin=127.0.0.1:0"]).start();
    let admin = admin_of(&relay.proc);
    let url = format!("http://{admin}/api/status");
    assert_eq!(status(&url, &[]), "200");
    assert_eq!(status(&url, &["-H", "Host: localhost"]), "200");
    // DNS rebinding: a page at evil.example whose name now points at
    // 127.0.0.1 reaches the port, but its requests name evil.example.
    assert_eq!(status(&url, &["-H", "Host: evil.example"]), "421");
    assert_eq!(status(&url, &["-H", "Host: evil.example:4040"]), "421");
    assert_eq!(status(&url, &["-H", "Host: 127.0.0.1.evil.example"]), "421");
    // Another site's page (fetch or form) in the operator's browser.
    assert_eq!(status(&url, &["-H", "Origin: http://evil.example"]), "403");
    assert_eq!(status(&url, &["-H", "Origin: null"]), "403");
    assert_eq!(status(&url, &["-H", "Sec-Fetch-Site: cross-site"]), "403");
    // The dashboard's own requests pass.
    assert_eq!(
        status(&url, &["-H", &format!("Origin: http://{admin}")]),
        "200"
    );
    assert_eq!(status(&url, &["-H", "Sec-Fetch-Site: same-origin"]), "200");
    // Writes are refused whatever they carry.
    assert_eq!(status(&url, &["-X", "POST", "-d", "x"]), "405");
}

#[test]
fn admin_survives_garbage_and_oversized_requests() {
    let relay = Relay::new().args(&["--admin=127.0.0.1:0"]).start();
    let admin = admin_of(&relay.proc);
    let exchange = |bytes: &[u8]| -> String {
        let mut sock = TcpStream::connect(admin).unwrap();
        sock.set_read_timeout(Some(scaled(Duration::from_secs(20))))
            .unwrap();
        // The server may answer and close before reading everything.
        let _ = sock.write_all(bytes);
        let mut answer = Vec::new();
        let _ = sock.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    };
    let garbage = exchange(b"\x16\x03\x01\x02\x00garbage\r\n\r\n");
    assert!(
        garbage.is_empty() || garbage.starts_with("HTTP/1.1 400"),
        "{garbage}"
    );
    let mut huge = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 256 * 1024));
    huge.extend(b"\r\n\r\n");
    let oversized = exchange(&huge);
    assert!(
        oversized.is_empty() || oversized.starts_with("HTTP/1.1 431"),
        "{oversized}"
    );
    let no_host = exchange(b"GET /metrics HTTP/1.0\r\n\r\n");
    assert!(
        no_host.starts_with("HTTP/1.0 400") || no_host.starts_with("HTTP/1.1 400"),
        "{no_host}"
    );
    let unknown =
        exchange(b"GET /../../etc/passwd HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    assert!(unknown.starts_with("HTTP/1.1 404"), "{unknown}");
    // Still serving.
    let url = format!("http://{admin}/metrics");
    assert_eq!(status(&url, &[]), "200");
    assert!(relay.proc.exited().is_none());
}

/// A visitor chooses the request target that lands in the access log: it
/// cannot forge fields or lines, nor grow a line without bound.
#[test]
fn access_log_lines_cannot_be_forged_by_visitors() {
    let dir = TempDir::new("access-forge");
    let log = dir.path().join("access.log");
    let relay = Relay::new()
        .domain("http:*.example.net:access-forge-secret")
        .args(&["--access-log", &log.to_string_lossy()])
        .start();
    let backend = Backend::start("http");
    let _connector = Connector::new(&relay)
        .secret("access-forge-secret")
        .kite(&format!("http:app.example.net={}", backend.addr()))
        .start();
    let http = relay.http.unwrap();
    // Spaces and quotes in the target: the relay's scanner refuses it, so it
    // never reaches a log line; the log escapes `"` anyway.
    let forged = "/x\" 200 1 \"evil.example.net\" 0.001";
    let long = format!("/{}?q={}", "a".repeat(8000), "b".repeat(100));
    let mut answers = Vec::new();
    for target in [forged, long.as_str()] {
        let mut sock = TcpStream::connect(http).unwrap();
        sock.set_read_timeout(Some(scaled(Duration::from_secs(20))))
            .unwrap();
        sock.write_all(
            format!("GET {target} HTTP/1.1\r\nHost: app.example.net\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
        let mut answer = Vec::new();
        let _ = sock.read_to_end(&mut answer);
        answers.push(String::from_utf8_lossy(&answer).into_owned());
    }
    assert!(
        answers[0].starts_with("HTTP/1.1 400") || answers[0].starts_with("HTTP/1.1 505"),
        "{}",
        answers[0]
    );
    assert!(answers[1].starts_with("HTTP/1.1 404"), "{}", answers[1]);
    let text = eventually("an access log line", || {
        let text = std::fs::read_to_string(&log).ok()?;
        (text.lines().count() >= 1).then_some(text)
    });
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(!text.contains("evil.example.net"), "{text}");
    // The target is cut: the line stays short.
    assert!(lines[0].len() < 1000, "{} bytes", lines[0].len());
    assert!(lines[0].contains("\"app.example.net\""), "{text}");
    assert_eq!(lines[0].matches('"').count(), 4, "{text}");
}
