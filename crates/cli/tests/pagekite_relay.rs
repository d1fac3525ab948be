//! The relay as a PageKite front-end, end to end: the real pagekite.py
//! (Debian `pagekite` 1.5) and upagekite (PyPI) as back-ends against the
//! built `kitepipe relay --pagekite`: an HTTP kite (with 10 MB both ways
//! and their checksums), a raw kite reached by SSH through `CONNECT`, a
//! wrong secret and a name outside the domain refused, a back-end coming
//! back after the relay restarts, the kite in the admin server's status.

mod support;

#[path = "support/pagekite_be.rs"]
mod pagekite_be;
#[path = "support/sshd.rs"]
mod sshd;

use std::process::Command;

use pagekite_be::{PageKiteBackEnd, UPageKiteBackEnd, pagekite_required, upagekite_required};
use support::*;

const SECRET: &str = "pagekite-test-secret-0123";
const WEB: &str = "web.pk.test";
const SSH: &str = "ssh.pk.test";

/// A relay accepting PageKite back-ends for `*.pk.test`, with an admin
/// server.
fn relay() -> RelayProc {
    Relay::new()
        .arg("--pagekite")
        .domain(&format!("http,https,tcp:*.pk.test:{SECRET}"))
        .args(&["--admin=127.0.0.1:0"])
        .start()
}

/// `GET path` for `host` through the relay's HTTP port: (status, body).
fn get(relay: &RelayProc, host: &str, path: &str) -> (String, Vec<u8>) {
    let url = format!("{}{path}", relay.http_url());
    let (code, out, err) = curl(&["-H", &format!("Host: {host}"), "-w", "\n%{http_code}", &url]);
    assert_eq!(code, 0, "curl {url} for {host}: {err}");
    let split = out.iter().rposition(|b| *b == b'\n').unwrap();
    let status = String::from_utf8_lossy(&out[split + 1..]).into_owned();
    (status, out[..split].to_vec())
}

/// Waits until `host` answers `body` through the relay.
fn wait_served(relay: &RelayProc, host: &str, body: &str) {
    eventually(&format!("{host} served through the relay"), || {
        let (status, got) = get(relay, host, "/");
        (status == "200" && got == body.as_bytes()).then_some(())
    });
}

/// Like `eventually`, for waits pagekite.py makes longer than the
/// fixtures' patience: up to two minutes (scaled).
#[allow(clippy::disallowed_methods)] // Real processes run on the wall clock.
fn wait_long<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let bound = scaled(std::time::Duration::from_secs(120));
    let deadline = std::time::Instant::now() + bound;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {bound:?} waiting for: {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn pagekite_py_serves_http_and_raw_kites_through_the_relay() {
    if !pagekite_required() || !sshd::required() || !require_tool("nc", "netcat-openbsd") {
        return;
    }
    let relay = relay();
    let backend = Backend::start("http");
    let sshd = sshd::Sshd::new().start();
    let be = PageKiteBackEnd::start(
        relay.link,
        &[
            format!("http:{WEB}:127.0.0.1:{}:{SECRET}", backend.port),
            format!("raw-22:{SSH}:127.0.0.1:{}:{SECRET}", sshd.port),
        ],
        &[],
    );
    be.wait_kite(WEB);
    be.wait_kite(SSH);
    relay.proc.wait_for("PageKite kite online");
    wait_served(&relay, WEB, "hello from backend\n");

    // 10 MB down, with its checksum.
    let size = 10 * 1024 * 1024;
    let (status, body) = get(&relay, WEB, &format!("/bytes/{size}"));
    assert_eq!(status, "200");
    assert_eq!(body.len(), size);
    let block: Vec<u8> = (0..=255u8).collect::<Vec<_>>().repeat(256);
    let expected: Vec<u8> = block.iter().copied().cycle().take(size).collect();
    assert_eq!(
        sha256_hex(&body),
        sha256_hex(&expected),
        "download checksum"
    );

    // 10 MB up, checksummed by the backend.
    let upload = pseudo_random(size, 16);
    let dir = TempDir::new("pk-upload");
    let file = dir.path().join("body");
    std::fs::write(&file, &upload).unwrap();
    let reply = curl_ok(&[
        "-H",
        &format!("Host: {WEB}"),
        "--data-binary",
        &format!("@{}", file.display()),
        &format!("{}/sha256", relay.http_url()),
    ]);
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply["len"], size, "{reply}");
    assert_eq!(reply["sha256"], sha256_hex(&upload), "upload checksum");

    // SSH to the raw kite through CONNECT on the relay's HTTP port (no
    // --http-connect: PageKite raw kites are reached this way only).
    let http = relay.http.unwrap();
    let out = Command::new("ssh")
        .arg("-F")
        .arg(sshd.ssh_config())
        .arg("-o")
        .arg(format!("ProxyCommand=nc -X connect -x {http} %h %p"))
        .args([
            "-o",
            "ConnectTimeout=30",
            "-p",
            "22",
            SSH,
            "echo",
            "over-pagekite",
        ])
        .output()
        .expect("run ssh");
    assert!(
        out.status.success(),
        "ssh through CONNECT failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        relay.proc.output()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "over-pagekite\n");

    // The kites are in the relay's status, served by the PageKite tunnel.
    let admin = admin_of(&relay.proc);
    let status: serde_json::Value =
        serde_json::from_str(&curl_ok(&[&format!("http://{admin}/api/status")])).unwrap();
    let kites = status["kites"].as_array().expect("status lists kites");
    let web = kites
        .iter()
        .find(|k| k["name"] == WEB)
        .unwrap_or_else(|| panic!("{WEB} in {status}"));
    assert_eq!(web["online"], true, "{status}");
    assert!(
        web["backends"][0]
            .as_str()
            .is_some_and(|node| node.starts_with("pagekite:")),
        "{status}"
    );
    // ... and counted in /metrics like any kite's visitors (10 MB out).
    let metrics = curl_ok(&[&format!("http://{admin}/metrics")]);
    let out = metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix(&format!(
                "kitepipe_visitor_bytes_total{{kite=\"{WEB}\",direction=\"out\"}} "
            ))
        })
        .and_then(|value| value.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("{WEB}'s bytes out in {metrics}"));
    assert!(out >= size as f64, "{out} bytes out");
    let ssh = kites.iter().find(|k| k["name"] == SSH).expect("raw kite");
    assert_eq!(ssh["proto"], "tcp");
    assert_eq!(ssh["port"], 22);
    drop(be);
    eventually("the kites withdrawn once the back-end is gone", || {
        let (status, _) = get(&relay, WEB, "/");
        (status == "503").then_some(())
    });
    // The back-end starts again: served again.
    let again = PageKiteBackEnd::start(
        relay.link,
        &[format!("http:{WEB}:127.0.0.1:{}:{SECRET}", backend.port)],
        &[],
    );
    again.wait_kite(WEB);
    wait_served(&relay, WEB, "hello from backend\n");
}

#[test]
fn a_wrong_secret_and_a_name_outside_the_domain_are_refused() {
    if !pagekite_required() {
        return;
    }
    let relay = relay();
    let backend = Backend::start("http");
    let wrong = PageKiteBackEnd::start(
        relay.link,
        &[format!(
            "http:wrong.pk.test:127.0.0.1:{}:not-the-secret-at-all",
            backend.port
        )],
        &[],
    );
    wrong.wait_rejected("wrong.pk.test", "signature");
    let outside = PageKiteBackEnd::start(
        relay.link,
        &[format!(
            "http:web.other.test:127.0.0.1:{}:{SECRET}",
            backend.port
        )],
        &[],
    );
    outside.wait_rejected("web.other.test", "unauthorized");
    for host in ["wrong.pk.test", "web.other.test"] {
        let (status, _) = get(&relay, host, "/");
        assert_eq!(status, "404", "{host} is unknown to the relay");
    }
    // The relay says why in its log.
    let log = relay.proc.wait_for("PageKite kite refused");
    assert!(log.contains("wrong.pk.test"), "{log}");
}

#[test]
#[allow(clippy::disallowed_methods)] // Real processes run on the wall clock.
fn pagekite_py_comes_back_after_the_relay_restarts() {
    if !pagekite_required() {
        return;
    }
    let state = TempDir::new("pk-restart");
    let link = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let start = || {
        Relay::new()
            .arg("--pagekite")
            .domain(&format!("http:*.pk.test:{SECRET}"))
            .args(&["--listen", &link, "--http", &http])
            .state_dir(state.path())
            .start()
    };
    let mut relay = start();
    let backend = Backend::start("http");
    let be = PageKiteBackEnd::start(
        relay.link,
        &[format!("http:{WEB}:127.0.0.1:{}:{SECRET}", backend.port)],
        &[],
    );
    be.wait_kite(WEB);
    wait_served(&relay, WEB, "hello from backend\n");
    // pagekite.py tries a front-end again only 60 s after its last
    // connection to it (`CreateTunnels`: "assume this one may still be in
    // flight"), and backs off while it waits: the relay restarts once
    // the tunnel is older than that, as it would be in real life.
    std::thread::sleep(std::time::Duration::from_secs(62));
    // Idle for four heartbeats, the tunnel lived on its pings.
    wait_served(&relay, WEB, "hello from backend\n");
    assert_eq!(relay.proc.count("PageKite tunnel closed"), 0);
    relay.proc.terminate();
    let relay = start();
    wait_long(&format!("{WEB} accepted again"), || {
        (be.proc
            .output()
            .matches(&format!("domain={WEB}; ssl="))
            .count()
            >= 2)
            .then_some(())
    });
    wait_served(&relay, WEB, "hello from backend\n");
}

#[test]
fn pagekite_py_reaches_the_relay_over_tls() {
    if !pagekite_required() {
        return;
    }
    let relay = relay();
    let backend = Backend::start("http");
    // pagekite.py's TLS hop: CONNECT localhost:443 on the relay's port,
    // then TLS verified against the relay's (self-signed) certificate.
    let ca = relay.state_path.join("relay-cert.pem");
    let be = PageKiteBackEnd::start(
        relay.link,
        &[format!("http:{WEB}:127.0.0.1:{}:{SECRET}", backend.port)],
        &[
            "--fe_certname=localhost",
            &format!("--ca_certs={}", ca.display()),
        ],
    );
    be.wait_kite(WEB);
    wait_served(&relay, WEB, "hello from backend\n");
}

#[test]
fn pagekite_py_serves_an_https_kite_by_sni() {
    if !pagekite_required() || !require_tool("openssl", "openssl") {
        return;
    }
    let relay = Relay::new()
        .arg("--pagekite")
        .domain(&format!("https:*.pk.test:{SECRET}"))
        .args(&["--http", "127.0.0.1:0", "--https", "127.0.0.1:0"])
        .start();
    // A TLS server of its own, which the relay passes through undecrypted.
    let dir = TempDir::new("pk-https");
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=secure.pk.test"])
        .args(["-keyout", "key.pem", "-out", "cert.pem"])
        .current_dir(dir.path())
        .output()
        .expect("openssl req");
    assert!(status.status.success(), "{status:?}");
    let port = free_port();
    let mut server = Command::new("openssl");
    server
        .args(["s_server", "-quiet", "-www", "-accept", &port.to_string()])
        .args(["-cert", "cert.pem", "-key", "key.pem"])
        .current_dir(dir.path());
    let server = Proc::spawn("openssl-s_server", server);
    eventually("the TLS server listening", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    let be = PageKiteBackEnd::start(
        relay.link,
        &[format!("https:secure.pk.test:127.0.0.1:{port}:{SECRET}")],
        &[],
    );
    be.wait_kite("secure.pk.test");
    let https = relay.https.expect("relay has an HTTPS listener");
    let url = format!("https://secure.pk.test:{}/", https.port());
    let resolve = format!("secure.pk.test:{}:127.0.0.1", https.port());
    let body = eventually("the https kite answering", || {
        let (code, out, _) = curl(&["-k", "--resolve", &resolve, &url]);
        (code == 0).then_some(out)
    });
    // openssl's status page, from the back-end's own TLS server.
    assert!(
        String::from_utf8_lossy(&body).contains("s_server"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    drop(server);
}

#[test]
fn a_one_port_relay_serves_pagekite_back_ends_and_visitors_on_one_port() {
    if !pagekite_required() {
        return;
    }
    let port = format!("127.0.0.1:{}", free_port());
    let relay = Relay::new()
        .arg("--pagekite")
        .domain(&format!("http:*.pk.test:{SECRET}"))
        .args(&["--listen", &port, "--http", &port])
        .start();
    assert_eq!(Some(relay.link), relay.http, "one port");
    let backend = Backend::start("http");
    let be = PageKiteBackEnd::start(
        relay.link,
        &[format!("http:{WEB}:127.0.0.1:{}:{SECRET}", backend.port)],
        &[],
    );
    be.wait_kite(WEB);
    wait_served(&relay, WEB, "hello from backend\n");
    // Visitors of other names still get the relay's own answers there.
    let (status, _) = get(&relay, "nobody.pk.test", "/");
    assert_eq!(status, "404");
}

#[test]
fn upagekite_serves_an_http_kite_through_the_relay() {
    if !upagekite_required() {
        return;
    }
    let relay = relay();
    let be = UPageKiteBackEnd::start(relay.link, "tiny.pk.test", SECRET);
    be.proc.wait_for("Connected to");
    wait_served(
        &relay,
        "tiny.pk.test",
        "hello from upagekite tiny.pk.test\n",
    );
}
