//! Attacker tests: ACME. A stranger on the relay's public ports trying to
//! make it order certificates (burning the CA's rate limits) or to read or
//! plant challenge answers: TLS ClientHellos offering ALPN `acme-tls/1`
//! for names with no pending challenge, visitors' SNI for names no
//! connector claimed, requests for unknown `/.well-known/acme-challenge/`
//! tokens. The relay answers only its own pending challenges and orders
//! only for names a connector claimed and it accepted.

use std::process::Command;

use crate::support::pebble::{Pebble, PebblePlan};
use crate::support::*;

const SECRET: &str = "acme-attacker-secret-0123456789";
const APP: &str = "app.example.test";

fn tools() -> bool {
    require_tool("pebble", "pebble")
        && require_tool("pebble-challtestsrv", "pebble")
        && require_tool("openssl", "openssl")
}

/// A relay with ACME on against pebble, a kite for `APP` whose certificate
/// has been issued (so no challenge is pending), and the backend.
fn issued() -> (RelayProc, Pebble, Backend, Proc) {
    let plan = PebblePlan::new();
    let acme = plan.relay_args("auto");
    let mut args: Vec<&str> = acme.iter().map(String::as_str).collect();
    args.extend(["--http", "127.0.0.1:0", "--https", "127.0.0.1:0"]);
    let relay = Relay::new()
        .domain(&format!("http:*.example.test:{SECRET}"))
        .args(&args)
        .start();
    let pebble = plan.start(relay.http.unwrap().port(), relay.https.unwrap().port(), 0);
    let backend = Backend::start("http");
    let conn = Connector::new(&relay)
        .secret(SECRET)
        .kite(&format!("http:{APP}={}", backend.addr()))
        .start();
    relay.proc.wait_for("ACME certificate issued");
    assert_eq!(pebble.orders(), 1);
    (relay, pebble, backend, conn)
}

/// `openssl s_client` offering `alpn` with `sni` (none if empty): whether
/// the relay presented a certificate.
fn got_certificate(port: u16, sni: &str, alpn: &str) -> bool {
    let mut command = Command::new("openssl");
    command
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-alpn", alpn]);
    if sni.is_empty() {
        command.arg("-noservername");
    } else {
        command.args(["-servername", sni]);
    }
    let out = command
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl runs");
    String::from_utf8_lossy(&out.stdout).contains("BEGIN CERTIFICATE")
}

#[test]
fn acme_tls_alpn_without_a_pending_challenge_gets_nothing_and_orders_nothing() {
    if !tools() {
        return;
    }
    let (relay, pebble, _backend, _conn) = issued();
    let port = relay.https.unwrap().port();
    // The issued name, a name no one claimed, an IP, no SNI at all.
    for sni in [APP, "stranger.example.test", "127.0.0.1", ""] {
        assert!(
            !got_certificate(port, sni, "acme-tls/1"),
            "acme-tls/1 for {sni:?} got a certificate"
        );
    }
    // The relay still serves the issued name to ordinary visitors.
    assert!(got_certificate(port, APP, "http/1.1"));
    // Ordinary visitors' SNI for names no connector claimed: no order.
    for sni in [
        "stranger.example.test",
        "x.stranger.example.test",
        "example.test",
    ] {
        assert!(!got_certificate(port, sni, "http/1.1"), "{sni}");
    }
    std::thread::park_timeout(std::time::Duration::from_millis(500));
    assert_eq!(pebble.orders(), 1, "{}", pebble.proc.output());
    assert_eq!(relay.proc.count("ACME order placed"), 1);
}

#[test]
fn unknown_acme_challenge_tokens_route_as_usual() {
    if !tools() {
        return;
    }
    let (relay, pebble, _backend, _conn) = issued();
    let http = relay.http.unwrap();
    let get = |host: &str, token: &str| {
        let (code, body, err) = curl(&[
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-H",
            &format!("Host: {host}"),
            &format!("http://{http}/.well-known/acme-challenge/{token}"),
        ]);
        assert_eq!(code, 0, "{err}");
        String::from_utf8_lossy(&body).into_owned()
    };
    // A claimed name: the kite answers (the backend's own 404).
    let out = get(APP, "no-such-token");
    assert!(
        out.ends_with("\n404") && out.contains("no such path"),
        "{out}"
    );
    // A long token, and the bare prefix: the same.
    let out = get(APP, &"A".repeat(4000));
    assert!(out.contains("no such path"), "{out}");
    let out = get(APP, "");
    assert!(out.contains("no such path"), "{out}");
    // A name no kite serves: the relay's own 404 page.
    let out = get("stranger.example.test", "no-such-token");
    assert!(
        out.ends_with("\n404") && out.contains("Unknown kite"),
        "{out}"
    );
    assert_eq!(pebble.orders(), 1);
}
