//! Certificates from ACME (RFC 8555) against a real ACME server on
//! loopback: Debian's `pebble`, resolving every name to 127.0.0.1 through
//! `pebble-challtestsrv`, validating on the relay's own HTTP and HTTPS
//! ports. The relay answers HTTP-01 and TLS-ALPN-01 itself, keeps the
//! account and certificates in its state directory, serves them on its
//! terminating HTTPS path, renews them, and orders only for names a
//! connector claimed and the relay accepted.

#![allow(clippy::disallowed_methods)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::pebble::{Pebble, PebblePlan};
use support::*;

const SECRET: &str = "acme-test-secret-0123456789";
const DOMAIN: &str = "http:*.example.test:acme-test-secret-0123456789";
const APP: &str = "app.example.test";

/// Whether pebble and openssl are here (else the test says so and returns).
fn tools() -> bool {
    require_tool("pebble", "pebble")
        && require_tool("pebble-challtestsrv", "pebble")
        && require_tool("openssl", "openssl")
        && require_tool("curl", "curl")
}

/// A relay with HTTP and HTTPS listeners, ACME on against `plan`'s pebble.
fn acme_relay(plan: &PebblePlan, challenge: &str, extra: &[&str]) -> RelayProc {
    acme_relay_in(plan, challenge, extra, None)
}

fn acme_relay_in(
    plan: &PebblePlan,
    challenge: &str,
    extra: &[&str],
    state: Option<&Path>,
) -> RelayProc {
    let acme = plan.relay_args(challenge);
    let mut args: Vec<&str> = Vec::new();
    // A flag `extra` gives replaces the plan's (e.g. --acme-directory).
    let mut pairs = acme.iter().map(String::as_str).peekable();
    while let Some(flag) = pairs.next() {
        let value = pairs.next_if(|v| !v.starts_with("--"));
        if !extra.contains(&flag) {
            args.push(flag);
            args.extend(value);
        }
    }
    if !extra.contains(&"--http") {
        args.extend(["--http", "127.0.0.1:0", "--https", "127.0.0.1:0"]);
    }
    args.extend(extra);
    let mut relay = Relay::new().domain(DOMAIN).args(&args);
    if let Some(dir) = state {
        relay = relay.state_dir(dir);
    }
    relay.start()
}

/// Pebble validating on `relay`'s HTTP and HTTPS ports.
fn pebble_for(plan: PebblePlan, relay: &RelayProc, validity_secs: u64) -> Pebble {
    plan.start(
        relay.http.expect("HTTP listener").port(),
        relay.https.expect("HTTPS listener").port(),
        validity_secs,
    )
}

/// A connector serving `backend` as http kites `names` on `relay`.
fn connector(relay: &RelayProc, backend: &Backend, names: &[&str]) -> Proc {
    let mut conn = Connector::new(relay).secret(SECRET);
    for name in names {
        conn = conn.kite(&format!("http:{name}={}", backend.addr()));
    }
    conn.start()
}

fn cert_file(relay: &RelayProc, name: &str) -> PathBuf {
    relay
        .state_path
        .join("acme/certs")
        .join(format!("{name}.pem"))
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|err| panic!("{}: {err}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// GET `path` of `name` over the relay's terminating HTTPS, trusting only
/// pebble's root: (curl's exit code, body, stderr).
fn https_get(pebble: &Pebble, relay: &RelayProc, name: &str, path: &str) -> (i32, String, String) {
    let port = relay.https.expect("HTTPS listener").port();
    let (code, body, err) = curl(&[
        "--max-time",
        "10",
        "--cacert",
        pebble.root().to_str().unwrap(),
        "--resolve",
        &format!("{name}:{port}:127.0.0.1"),
        &format!("https://{name}:{port}{path}"),
    ]);
    (code, String::from_utf8_lossy(&body).into_owned(), err)
}

/// Checks with `openssl verify` that the chain stored for `name` verifies
/// against pebble's root for TLS servers, and names `name`.
fn assert_chain_verifies(pebble: &Pebble, relay: &RelayProc, name: &str) {
    let file = cert_file(relay, name);
    let pem = std::fs::read_to_string(&file).unwrap();
    let start = pem
        .find("-----BEGIN CERTIFICATE-----")
        .expect("the file holds the chain after the key");
    assert!(
        pem[..start].contains("PRIVATE KEY"),
        "the key comes first in {}",
        file.display()
    );
    let dir = TempDir::new("chain");
    let chain = dir.path().join("chain.pem");
    std::fs::write(&chain, &pem[start..]).unwrap();
    let out = Command::new("openssl")
        .args(["verify", "-purpose", "sslserver", "-verify_hostname", name])
        .arg("-CAfile")
        .arg(pebble.root())
        .arg("-untrusted")
        .arg(&chain)
        .arg(&chain)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.contains(": OK"),
        "openssl verify: {said}"
    );
}

/// The serial number of the certificate the relay serves for `name`.
fn served_serial(relay: &RelayProc, name: &str) -> String {
    let port = relay.https.expect("HTTPS listener").port();
    let script = format!(
        "openssl s_client -connect 127.0.0.1:{port} -servername {name} </dev/null 2>/dev/null \
         | openssl x509 -noout -serial"
    );
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The relay obtains, stores and serves a certificate for `APP` by
/// `challenge`, answering the CA's validation itself.
fn issues_by(challenge: &str, answered: &str) {
    if !tools() {
        return;
    }
    let plan = PebblePlan::new();
    let relay = acme_relay(&plan, challenge, &[]);
    let pebble = pebble_for(plan, &relay, 0);
    let backend = Backend::start("http");
    let _conn = connector(&relay, &backend, &[APP]);
    relay.proc.wait_for("ACME certificate issued");
    let out = relay.proc.output();
    assert!(
        out.contains(&format!("challenge=\"{challenge}\"")),
        "ordered with {challenge}:\n{out}"
    );
    assert!(out.contains(answered), "the relay answered the CA:\n{out}");
    let acme_dir = relay.state_path.join("acme");
    assert_eq!(mode_of(&acme_dir), 0o700);
    assert_eq!(mode_of(&cert_file(&relay, APP)), 0o600);
    let accounts: Vec<_> = std::fs::read_dir(&acme_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".json"))
        .collect();
    assert_eq!(accounts.len(), 1, "one account file: {accounts:?}");
    assert_eq!(mode_of(&accounts[0]), 0o600);
    assert_chain_verifies(&pebble, &relay, APP);
    let (code, body, err) = https_get(&pebble, &relay, APP, "/");
    assert_eq!(code, 0, "curl over the ACME certificate: {err}");
    assert_eq!(body, "hello from backend\n");
    assert_eq!(pebble.orders(), 1, "one order:\n{}", pebble.proc.output());
}

#[test]
fn http01_certificate_is_issued_stored_and_served() {
    issues_by("http-01", "answered an HTTP-01 challenge");
}

#[test]
fn tls_alpn01_certificate_is_issued_stored_and_served() {
    issues_by("tls-alpn-01", "answered a TLS-ALPN-01 challenge");
}

/// `auto` tries TLS-ALPN-01 first and falls back to HTTP-01 in the same
/// issuance: pebble validates TLS-ALPN-01 on a closed port here.
#[test]
fn auto_falls_back_to_http01_when_tls_alpn01_fails() {
    if !tools() {
        return;
    }
    let plan = PebblePlan::new();
    let relay = acme_relay(&plan, "auto", &[]);
    let closed = free_port();
    let pebble = plan.start(relay.http.unwrap().port(), closed, 0);
    let backend = Backend::start("http");
    let _conn = connector(&relay, &backend, &[APP]);
    let out = relay.proc.wait_for("ACME certificate issued");
    let tls_alpn = out
        .find("challenge=\"tls-alpn-01\"")
        .expect("tls-alpn-01 first");
    let failed = out
        .find("ACME challenge failed; trying the next type")
        .expect("tls-alpn-01 failed");
    let http01 = out.find("challenge=\"http-01\"").expect("then http-01");
    assert!(tls_alpn < failed && failed < http01, "{out}");
    assert!(
        out.contains("urn:ietf:params:acme:error:"),
        "the CA's problem type is logged:\n{out}"
    );
    assert_eq!(relay.proc.count("ACME issuance failed"), 0, "one issuance");
    assert_eq!(pebble.orders(), 2, "two orders, one per challenge type");
    assert_chain_verifies(&pebble, &relay, APP);
}

/// Pebble's certificates live an hour here (pebble 2.4's
/// `certificateValidityPeriod`; its default is 5 years) and the relay
/// renews 3590 s before expiry: due 10 s after each issuance. Requests keep flowing
/// over new and kept-alive connections while the certificate is swapped
/// twice; none fails and the served serial changes.
#[test]
fn renewal_swaps_the_certificate_without_dropping_a_request() {
    if !tools() {
        return;
    }
    let plan = PebblePlan::new();
    let relay = acme_relay(&plan, "tls-alpn-01", &["--acme-renew-before", "3590s"]);
    let pebble = pebble_for(plan, &relay, 3600);
    let backend = Backend::start("http");
    let _conn = connector(&relay, &backend, &[APP]);
    relay.proc.wait_for("ACME certificate issued");
    let first = served_serial(&relay, APP);
    assert!(!first.is_empty(), "a certificate is served");
    let port = relay.https.unwrap().port();
    let url = format!("https://{APP}:{port}/");
    let resolve = format!("{APP}:{port}:127.0.0.1");
    let root = pebble.root().to_str().unwrap().to_string();
    let deadline = Instant::now() + scaled(Duration::from_secs(90));
    let mut requests = 0;
    // Bounded: until two renewals are through, or the deadline.
    while relay.proc.count("ACME certificate issued") < 3 {
        assert!(
            Instant::now() < deadline,
            "no two renewals in time:\n{}",
            relay.proc.output()
        );
        // Three requests on one kept-alive connection per round.
        let (code, body, err) = curl(&[
            "--max-time",
            "10",
            "--cacert",
            &root,
            "--resolve",
            &resolve,
            &url,
            &url,
            &url,
        ]);
        assert_eq!(code, 0, "request {requests} failed during renewal: {err}");
        assert_eq!(
            String::from_utf8_lossy(&body),
            "hello from backend\n".repeat(3)
        );
        requests += 3;
        std::thread::park_timeout(Duration::from_millis(100));
    }
    assert!(requests >= 30, "requests flowed throughout ({requests})");
    let now = served_serial(&relay, APP);
    assert!(
        !now.is_empty() && now != first,
        "the renewed certificate is served ({first} -> {now})"
    );
    assert_chain_verifies(&pebble, &relay, APP);
}

/// Claims the relay refuses (a wrong secret, a name outside its domains)
/// never reach the CA: the one order pebble sees is the accepted kite's.
#[test]
fn refused_names_cause_no_order() {
    if !tools() {
        return;
    }
    let plan = PebblePlan::new();
    let relay = acme_relay(&plan, "http-01", &[]);
    let pebble = pebble_for(plan, &relay, 0);
    let backend = Backend::start("http");
    let wrong = Connector::new(&relay)
        .secret("not-the-secret-0123456789")
        .kite(&format!("http:stolen.example.test={}", backend.addr()))
        .spawn();
    wrong.wait_for("wrong secret");
    let outside = Connector::new(&relay)
        .secret(SECRET)
        .kite(&format!("http:app.elsewhere.test={}", backend.addr()))
        .spawn();
    outside.wait_for("relay refused kite");
    let _good = connector(&relay, &backend, &["good.example.test"]);
    relay.proc.wait_for("ACME certificate issued");
    assert_eq!(pebble.orders(), 1, "{}", pebble.proc.output());
    let out = relay.proc.output();
    for refused in ["stolen.example.test", "app.elsewhere.test"] {
        assert!(
            !out.lines()
                .any(|l| l.contains("acme") && l.contains(refused)),
            "no ACME work for {refused}:\n{out}"
        );
        assert!(!cert_file(&relay, refused).exists());
    }
}

/// An unreachable directory: a clear error, retried with backoff; plain
/// HTTP keeps serving the kite and HTTPS has no certificate for it.
#[test]
fn unreachable_directory_is_logged_retried_and_breaks_nothing() {
    if !tools() {
        return;
    }
    let closed = free_port();
    let plan = PebblePlan::new();
    let directory = format!("https://127.0.0.1:{closed}/dir");
    let relay = acme_relay(&plan, "http-01", &["--acme-directory", &directory]);
    assert_breaks_nothing(&relay, "cannot connect to the ACME server");
}

/// A directory answering garbage (a tiny HTTPS server returning junk):
/// the same.
#[test]
fn garbage_directory_is_logged_retried_and_breaks_nothing() {
    if !tools() || !require_tool("python3", "python3") {
        return;
    }
    let plan = PebblePlan::new();
    let junk = JunkServer::start(&plan.tls);
    let directory = format!("https://127.0.0.1:{}/dir", junk.port);
    let relay = acme_relay(&plan, "http-01", &["--acme-directory", &directory]);
    assert_breaks_nothing(&relay, "failed to (de)serialize JSON");
}

fn assert_breaks_nothing(relay: &RelayProc, why: &str) {
    let backend = Backend::start("http");
    let _conn = connector(relay, &backend, &[APP]);
    // Two attempts: the first at once, the second after the backoff.
    let out = relay.proc.wait_for_count("ACME issuance failed", 2);
    let failures: Vec<_> = out
        .lines()
        .filter(|l| l.contains("ACME issuance failed"))
        .collect();
    assert!(
        failures.iter().all(|l| l.contains(why)),
        "each failure says why ({why}):\n{out}"
    );
    assert!(failures[0].contains("attempt=1") && failures[1].contains("attempt=2"));
    let http = relay.http.unwrap();
    let body = curl_ok(&[
        "--resolve",
        &format!("{APP}:{}:127.0.0.1", http.port()),
        &format!("http://{APP}:{}/", http.port()),
    ]);
    assert_eq!(body, "hello from backend\n", "plain HTTP still serves");
    let port = relay.https.unwrap().port();
    let (code, _, _) = curl(&[
        "--max-time",
        "10",
        "-k",
        "--resolve",
        &format!("{APP}:{port}:127.0.0.1"),
        &format!("https://{APP}:{port}/"),
    ]);
    assert_ne!(code, 0, "no certificate, so no HTTPS for {APP}");
    assert!(!cert_file(relay, APP).exists());
}

/// A restarted relay serves its stored certificate without a new order,
/// and orders for a new name with its stored account.
#[test]
fn restart_reuses_the_stored_certificate_and_account() {
    if !tools() {
        return;
    }
    let state = TempDir::new("acme-state");
    let plan = PebblePlan::new();
    let http_port = free_port();
    let https_port = free_port();
    let ports = [
        "--http".to_string(),
        format!("127.0.0.1:{http_port}"),
        "--https".to_string(),
        format!("127.0.0.1:{https_port}"),
    ];
    let ports: Vec<&str> = ports.iter().map(String::as_str).collect();
    let start = |plan: &PebblePlan| acme_relay_in(plan, "http-01", &ports, Some(state.path()));
    let mut relay = start(&plan);
    let pebble = pebble_for(plan, &relay, 0);
    let backend = Backend::start("http");
    let conn = connector(&relay, &backend, &[APP]);
    relay.proc.wait_for("ACME certificate issued");
    let serial = served_serial(&relay, APP);
    relay.proc.terminate();
    drop(conn);
    assert_eq!((pebble.orders(), pebble.new_accounts()), (1, 1));

    let relay = start(&pebble.plan);
    let out = relay.proc.wait_for("serving stored ACME certificate");
    assert!(out.contains(APP), "{out}");
    let _conn = connector(&relay, &backend, &[APP, "new.example.test"]);
    relay.proc.wait_for("ACME certificate issued");
    let out = relay.proc.output();
    assert!(out.contains("ACME account loaded"), "{out}");
    assert!(!out.contains("ACME account created"), "{out}");
    assert!(
        out.contains("a valid certificate covers this name"),
        "the stored certificate is reused:\n{out}"
    );
    assert_eq!(
        (pebble.orders(), pebble.new_accounts()),
        (2, 1),
        "one new order (the new name), no new account"
    );
    assert_eq!(served_serial(&relay, APP), serial);
    let (code, body, err) = https_get(&pebble, &relay, APP, "/");
    assert_eq!((code, body.as_str()), (0, "hello from backend\n"), "{err}");
}

/// The relay intercepts `acme-tls/1` only for its own pending orders: an
/// https (passthrough) kite's own ACME client, validated through the
/// relay, still gets the CA's TLS-ALPN-01 connection.
#[test]
fn acme_tls_alpn_for_a_passthrough_kite_still_reaches_it() {
    if !tools() {
        return;
    }
    let plan = PebblePlan::new();
    let acme = plan.relay_args("tls-alpn-01");
    let mut args: Vec<&str> = acme.iter().map(String::as_str).collect();
    args.extend(["--http", "127.0.0.1:0", "--https", "127.0.0.1:0"]);
    let relay = Relay::new()
        .domain(&format!("http,https:*.example.test:{SECRET}"))
        .args(&args)
        .start();
    // The kite's own TLS server, speaking acme-tls/1 as its ACME client would.
    let cert = TestCert::new(&["own.example.test"]);
    let port = free_port();
    let mut server = Command::new("openssl");
    server
        .args(["s_server", "-accept", &format!("127.0.0.1:{port}")])
        .arg("-cert")
        .arg(&cert.cert)
        .arg("-key")
        .arg(&cert.key)
        .args(["-alpn", "acme-tls/1", "-quiet"]);
    let _server = Proc::spawn("openssl-s_server", server);
    eventually("s_server to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    let _conn = Connector::new(&relay)
        .secret(SECRET)
        .kite(&format!("https:own.example.test=127.0.0.1:{port}"))
        .start();
    let https = relay.https.unwrap().port();
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{https}")])
        .args(["-servername", "own.example.test", "-alpn", "acme-tls/1"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("ALPN protocol: acme-tls/1") && said.contains("own.example.test"),
        "the kite's own server answered:\n{said}"
    );
    assert_eq!(
        relay.proc.count("ACME order placed"),
        0,
        "https kites get no order"
    );
}

/// A tiny HTTPS server answering every request with junk, stopped by PID.
struct JunkServer {
    _proc: Proc,
    port: u16,
}

impl JunkServer {
    fn start(tls: &TestCert) -> JunkServer {
        let script = r#"
import http.server, ssl, sys
class Junk(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"<html>this is not an ACME directory</html>"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_HEAD = do_GET
    do_POST = do_GET
server = http.server.HTTPServer(("127.0.0.1", 0), Junk)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
server.socket = ctx.wrap_socket(server.socket, server_side=True)
print("READY", server.server_address[1], flush=True)
server.serve_forever()
"#;
        let mut command = Command::new("python3");
        command
            .args(["-u", "-c", script])
            .arg(&tls.cert)
            .arg(&tls.key);
        let proc = Proc::spawn("junk-https", command);
        let out = proc.wait_for("READY ");
        let port = out
            .lines()
            .find_map(|l| l.strip_prefix("READY "))
            .and_then(|p| p.trim().parse().ok())
            .expect("junk server prints its port");
        JunkServer { _proc: proc, port }
    }
}

/// ACME settings that cannot work stop the relay at start, saying why.
#[test]
fn bad_acme_settings_stop_the_relay_with_a_clear_error() {
    let dir = TempDir::new("acme-bad");
    let not_pem = dir.path().join("not-a-cert.pem");
    std::fs::write(&not_pem, "garbage\n").unwrap();
    let cases: [(&[&str], &str); 3] = [
        (
            &["--acme-ca-root", "/nonexistent/root.pem"],
            "--acme-ca-root /nonexistent/root.pem",
        ),
        (
            &["--acme-ca-root", not_pem.to_str().unwrap()],
            "no certificate in the file",
        ),
        (
            &["--acme-challenge", "dns-01"],
            "tls-alpn-01, http-01 or auto",
        ),
    ];
    for (args, why) in cases {
        let out = Command::new(BIN)
            .args(["relay", "--listen", "127.0.0.1:0", "--https", "127.0.0.1:0"])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--acme")
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(why),
            "{args:?}: {err}"
        );
    }
    let out = Command::new(BIN)
        .args(["relay", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--acme")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--acme needs an --https listener"),
        "{err}"
    );
}
