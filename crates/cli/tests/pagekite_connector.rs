//! kitepipe's connector as a PageKite back-end (`--protocol pagekite`)
//! against the real pagekite.py (Debian `pagekite`) as the front-end: an
//! HTTP kite served (bodies with their checksums), a raw kite through
//! pagekite.py's `CONNECT`, the tunnel back after the front-end restarts,
//! a wrong secret refused and said so, and the flags that make no sense
//! over PageKite refused at start.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

use support::*;

/// The PageKite secret of `*.pk.test` on the front-end.
const SECRET: &str = "pagekite-connector-test-secret";

/// pagekite.py as a front-end on 127.0.0.1:`port`, accepting http and raw
/// kites under `*.pk.test` signed with `secret`, raw ports through
/// `CONNECT` (`--rawports=virtual`); its own HOME, no config file.
struct FrontEnd {
    proc: Proc,
    _home: TempDir,
}

impl FrontEnd {
    fn start(port: u16, secret: &str) -> FrontEnd {
        let home = TempDir::new("pk-fe");
        let mut command = Command::new("pagekite");
        command
            .env("HOME", home.path())
            .arg("--clean")
            .arg("--isfrontend")
            .arg("--host=127.0.0.1")
            .arg(format!("--ports={port}"))
            .arg("--protos=http,raw")
            .arg("--rawports=virtual")
            .arg(format!("--domain=http,raw:*.pk.test:{secret}"))
            .arg("--nullui")
            .arg("--logfile=stdio");
        let proc = Proc::spawn("pagekite-frontend", command);
        eventually("pagekite.py to listen", || {
            if let Some(status) = proc.exited() {
                panic!("pagekite.py exited ({status}):\n{}", proc.output());
            }
            listening_on(port).then_some(())
        });
        FrontEnd { proc, _home: home }
    }
}

/// Our connector speaking PageKite to the front-end at 127.0.0.1:`port`.
fn connector(port: u16, secret: &str, kites: &[&str]) -> Proc {
    let mut connector = support::Connector::to(&format!("127.0.0.1:{port}"), "")
        .no_fingerprint()
        .args(&["--protocol", "pagekite", "--secret", secret]);
    for kite in kites {
        connector = connector.kite(kite);
    }
    connector.spawn()
}

/// `curl` through the front-end's port with `Host: host`.
fn through(port: u16, host: &str, path: &str, extra: &[&str]) -> (i32, Vec<u8>, String) {
    let url = format!("http://127.0.0.1:{port}{path}");
    let host = format!("Host: {host}");
    let mut args = vec!["-H", host.as_str()];
    args.extend_from_slice(extra);
    args.push(&url);
    curl(&args)
}

fn have_pagekite() -> bool {
    require_tool("pagekite", "pagekite") && require_tool("curl", "curl")
}

#[test]
fn an_http_kite_is_served_through_pagekite_py() {
    if !have_pagekite() {
        return;
    }
    let backend = Backend::start("http");
    let port = free_port();
    let _fe = FrontEnd::start(port, SECRET);
    let kite = format!("http:app.pk.test={}", backend.addr());
    let connector = connector(port, SECRET, &[&kite]);
    let up = connector.wait_links_up(1);
    assert_eq!(up["kites"][0]["kite"], "http:app.pk.test", "{up}");

    let (code, body, err) = through(port, "app.pk.test", "/", &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(body, b"hello from backend\n");

    // A body up and one down, each with its checksum.
    let data = pseudo_random(10 * 1024 * 1024, 16);
    let dir = TempDir::new("pk-upload");
    let file = dir.path().join("body.bin");
    std::fs::write(&file, &data).unwrap();
    let body_arg = format!("@{}", file.display());
    let (code, answer, err) = through(
        port,
        "app.pk.test",
        "/sha256",
        &["--data-binary", &body_arg],
    );
    assert_eq!(code, 0, "{err}");
    let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(answer["len"], data.len());
    assert_eq!(answer["sha256"], sha256_hex(&data).as_str());
    let size = 10 * 1024 * 1024;
    let (code, body, err) = through(port, "app.pk.test", &format!("/bytes/{size}"), &[]);
    assert_eq!(code, 0, "{err}");
    let expected: Vec<u8> = (0..size).map(|i| (i % 256) as u8).collect();
    assert_eq!(body.len(), size);
    assert_eq!(sha256_hex(&body), sha256_hex(&expected));

    // A name the connector does not serve is not served (pagekite.py has
    // no tunnel for it).
    let (_, body, _) = through(port, "other.pk.test", "/", &[]);
    assert!(!body.starts_with(b"hello from backend"));
}

#[test]
fn a_raw_kite_is_served_through_pagekite_py_connect() {
    if !have_pagekite() {
        return;
    }
    let echo = Backend::start("tcp-echo");
    let port = free_port();
    let _fe = FrontEnd::start(port, SECRET);
    let kite = format!("tcp:ssh.pk.test:22={}", echo.addr());
    let connector = connector(port, SECRET, &[&kite]);
    connector.wait_kite_online("the raw kite", |k| k == "tcp:ssh.pk.test:22");

    let mut sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(patience())).unwrap();
    sock.write_all(b"CONNECT ssh.pk.test:22 HTTP/1.1\r\nHost: ssh.pk.test:22\r\n\r\n")
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(sock.read(&mut byte).unwrap(), 1, "head so far: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.contains(" 200 "), "{head}");
    let data = pseudo_random(256 * 1024, 22);
    let mut writer = sock.try_clone().unwrap();
    let sent = data.clone();
    let send = std::thread::spawn(move || writer.write_all(&sent).unwrap());
    let mut echoed = vec![0u8; data.len()];
    sock.read_exact(&mut echoed).unwrap();
    send.join().unwrap();
    assert_eq!(sha256_hex(&echoed), sha256_hex(&data));
}

#[test]
fn the_tunnel_comes_back_after_the_front_end_restarts() {
    if !have_pagekite() {
        return;
    }
    let backend = Backend::start("http");
    let port = free_port();
    let mut fe = FrontEnd::start(port, SECRET);
    let kite = format!("http:app.pk.test={}", backend.addr());
    let connector = connector(port, SECRET, &[&kite]);
    connector.wait_links_up(1);
    let (code, body, err) = through(port, "app.pk.test", "/", &[]);
    assert_eq!(
        (code, body.as_slice()),
        (0, &b"hello from backend\n"[..]),
        "{err}"
    );

    fe.proc.kill();
    connector.wait_links_down(1);
    let _fe = FrontEnd::start(port, SECRET);
    connector.wait_links_up(2);
    let (code, body, err) = through(port, "app.pk.test", "/", &[]);
    assert_eq!(
        (code, body.as_slice()),
        (0, &b"hello from backend\n"[..]),
        "{err}"
    );
}

#[test]
fn a_wrong_secret_is_reported_and_retried_and_serves_nothing() {
    if !have_pagekite() {
        return;
    }
    let backend = Backend::start("http");
    let port = free_port();
    let _fe = FrontEnd::start(port, SECRET);
    let kite = format!("http:app.pk.test={}", backend.addr());
    let connector = connector(port, "not-the-pagekite-secret-at-all", &[&kite]);
    // Refused, said clearly, and tried again with backoff.
    let out = connector.wait_for_count("cannot link to PageKite front-end", 2);
    assert!(
        out.contains("app.pk.test"),
        "the refusal names the kite:\n{out}"
    );
    assert!(out.contains("reconnecting"), "{out}");
    assert_eq!(connector.links_up(), 0, "{out}");
    let (_, body, _) = through(port, "app.pk.test", "/", &[]);
    assert!(!body.starts_with(b"hello from backend"));
}

#[test]
fn flags_that_mean_nothing_over_pagekite_are_refused() {
    let fingerprint = format!("SHA256:{}", "ab".repeat(32));
    for (extra, needle) in [
        (vec!["--fingerprint", fingerprint.as_str()], "--fingerprint"),
        (vec!["--ca", "/etc/hostname"], "--ca"),
        (vec!["--allow-remote", "exec"], "--allow-remote"),
        (
            vec!["--kite", "tcp:db.pk.test:0=127.0.0.1:5432"],
            "needs its public port",
        ),
    ] {
        let out = Command::new(BIN)
            .args(["connect", "127.0.0.1:9", "--protocol", "pagekite"])
            .args(["--secret", SECRET, "--kite", "http:app.pk.test=8000"])
            .args(&extra)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} accepted");
        assert!(
            err.contains(needle) && err.contains("pagekite"),
            "{extra:?}: {err}"
        );
    }
    // `config check` shows the protocol.
    let out = kitepipe_ok(&[
        "config",
        "check",
        "connect",
        "127.0.0.1:9",
        "--protocol",
        "pagekite",
        "--secret",
        SECRET,
    ]);
    assert!(out.contains("protocol = \"pagekite\""), "{out}");
}

#[test]
fn kites_added_by_a_reload_are_registered_with_the_front_end() {
    if !have_pagekite() {
        return;
    }
    let backend = Backend::start("http");
    let port = free_port();
    let _fe = FrontEnd::start(port, SECRET);
    let dir = TempDir::new("pk-reload");
    let file = dir.path().join("connector.toml");
    let config = |kites: &[&str]| {
        let mut text = format!(
            "relay = [\"127.0.0.1:{port}\"]\nprotocol = \"pagekite\"\nsecret = \"{SECRET}\"\n"
        );
        for name in kites {
            text.push_str(&format!(
                "\n[[kite]]\nname = \"{name}\"\nprotocol = \"http\"\ntarget = \"{}\"\n",
                backend.addr()
            ));
        }
        text
    };
    std::fs::write(&file, config(&["app.pk.test"])).unwrap();
    // The front-end's address and the protocol come from the file alone.
    let mut command = Command::new(BIN);
    command.args(["connect", "--ready-json", "--config", &path(&file)]);
    let connector = Proc::spawn("connector", command);
    connector.wait_links_up(1);
    let (_, body, _) = through(port, "blog.pk.test", "/", &[]);
    assert!(!body.starts_with(b"hello from backend"));

    std::fs::write(&file, config(&["app.pk.test", "blog.pk.test"])).unwrap();
    connector.wait_kite_online("the added kite", |k| k == "http:blog.pk.test");
    for host in ["app.pk.test", "blog.pk.test"] {
        let (code, body, err) = through(port, host, "/", &[]);
        assert_eq!(
            (code, body.as_slice()),
            (0, &b"hello from backend\n"[..]),
            "{host}: {err}"
        );
    }
}

#[test]
#[allow(clippy::disallowed_methods)] // Real processes run on the wall clock.
fn the_tunnel_outlives_its_pings() {
    if !have_pagekite() {
        return;
    }
    // pagekite.py 1.5 under Python 3 crashes answering a PING on a tunnel
    // whose kites were added in a NOOP (AddKites); ours are not, so the
    // tunnel lives through many pings (every second with --heartbeat 3s).
    let backend = Backend::start("http");
    let port = free_port();
    let _fe = FrontEnd::start(port, SECRET);
    let kite = format!("http:app.pk.test={}", backend.addr());
    let connector = support::Connector::to(&format!("127.0.0.1:{port}"), "")
        .no_fingerprint()
        .args(&["--protocol", "pagekite", "--secret", SECRET])
        .args(&["--heartbeat", "3s"])
        .args(&["--log", "info,kitepipe::pagekite=trace"])
        .kite(&kite)
        .spawn();
    connector.wait_links_up(1);
    // Pings did cross and pagekite.py answered them (not a quiet tunnel
    // that merely was not pinged yet).
    connector.wait_for_count("pagekite tunnel: pong", 3);
    let (code, body, err) = through(port, "app.pk.test", "/", &[]);
    assert_eq!(
        (code, body.as_slice()),
        (0, &b"hello from backend\n"[..]),
        "{err}"
    );
    assert_eq!(connector.links_down(), 0, "{}", connector.output());
    assert_eq!(connector.links_up(), 1, "{}", connector.output());
}

#[test]
fn a_raw_kite_gets_the_visitor_address_in_a_proxy_header() {
    if !have_pagekite() {
        return;
    }
    // The local service: reads the PROXY line and says it back.
    let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let service_port = service.local_addr().unwrap().port();
    let line = std::thread::spawn(move || {
        let (mut sock, _) = service.accept().unwrap();
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\r\n") && line.len() < 256 {
            if sock.read(&mut byte).unwrap() == 0 {
                break;
            }
            line.push(byte[0]);
        }
        let _ = sock.write_all(b"hi\n");
        String::from_utf8_lossy(&line).into_owned()
    });
    let port = free_port();
    let _fe = FrontEnd::start(port, SECRET);
    let dir = TempDir::new("pk-proxy");
    let file = dir.path().join("connector.toml");
    std::fs::write(
        &file,
        format!(
            "relay = [\"127.0.0.1:{port}\"]\nprotocol = \"pagekite\"\nsecret = \"{SECRET}\"\n\n\
             [[kite]]\nname = \"db.pk.test\"\nprotocol = \"tcp\"\nport = 5432\n\
             target = \"127.0.0.1:{service_port}\"\nproxy_protocol = \"v1\"\n"
        ),
    )
    .unwrap();
    let mut command = Command::new(BIN);
    command.args(["connect", "--ready-json", "--config", &path(&file)]);
    let connector = Proc::spawn("connector", command);
    connector.wait_kite_online("the raw kite", |k| k == "tcp:db.pk.test:5432");

    let mut sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let visitor = sock.local_addr().unwrap();
    sock.set_read_timeout(Some(patience())).unwrap();
    sock.write_all(b"CONNECT db.pk.test:5432 HTTP/1.1\r\n\r\n")
        .unwrap();
    let mut reply = Vec::new();
    let mut buf = [0u8; 256];
    while !reply.ends_with(b"hi\n") {
        let n = sock.read(&mut buf).unwrap();
        assert!(n > 0, "reply so far: {:?}", String::from_utf8_lossy(&reply));
        reply.extend_from_slice(&buf[..n]);
    }
    let line = line.join().unwrap();
    // pagekite.py says `::ffff:127.0.0.1`: the header has it as IPv4.
    assert!(
        line.starts_with("PROXY TCP4 127.0.0.1 ")
            && line.contains(&format!(" {} ", visitor.port())),
        "{line:?} for visitor {visitor}"
    );
}

#[test]
fn the_gateway_says_events_do_not_cross_a_pagekite_tunnel() {
    if !have_pagekite() {
        return;
    }
    let port = free_port();
    let _fe = FrontEnd::start(port, SECRET);
    let connector = connector(port, SECRET, &["http:app.pk.test=127.0.0.1:9"]);
    connector.wait_links_up(1);
    let gateway = gateway_of(&connector);
    let (code, body, err) = curl(&[
        "-w",
        "\n%{http_code}",
        &format!("http://{gateway}/server/time"),
    ]);
    assert_eq!(code, 0, "{err}");
    let body = String::from_utf8_lossy(&body);
    assert!(body.ends_with("\n404"), "{body}");
    assert!(
        body.contains("events do not cross a PageKite tunnel"),
        "{body}"
    );
}
