//! HTTPS terminated by the relay for http kites (`--tls-cert`): curl and
//! headless Chromium load a page through it, the backend sees
//! `X-Forwarded-Proto: https`, wildcard certificates, keep-alive, the
//! redirect from plain HTTP (`https_redirect` in `[[kite]]`), and SNI
//! passthrough still winning for an `https` kite of the same name.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

const SECRET: &str = "terminate-test-secret";

/// A relay with HTTP and HTTPS listeners on loopback serving `cert`.
fn relay(certs: &[&TestCert]) -> RelayProc {
    let mut relay = Relay::new()
        .domain(&format!("http,https:*.example.test:{SECRET}"))
        .args(&["--http", "127.0.0.1:0", "--https", "127.0.0.1:0"]);
    for cert in certs {
        relay = relay.args(&["--tls-cert", &cert.arg()]);
    }
    relay.start()
}

/// A connector serving the `[[kite]]` tables `kites` (TOML), with the
/// directory of its config file.
fn connector(relay: &RelayProc, kites: &str) -> (Proc, TempDir) {
    let dir = TempDir::new("terminate-connector");
    let file = dir.path().join("connector.toml");
    std::fs::write(&file, format!("secret = {SECRET:?}\n\n{kites}")).unwrap();
    let connector = Connector::new(relay)
        .args(&["--config", &path(&file)])
        .start();
    (connector, dir)
}

/// A `[[kite]]` table for an http kite.
fn http_kite(name: &str, target: &str, extra: &str) -> String {
    format!("[[kite]]\nname = {name:?}\nprotocol = \"http\"\ntarget = {target:?}\n{extra}\n")
}

/// curl against the relay's HTTPS port for `name`, trusting `ca`.
fn curl_https(
    relay: &RelayProc,
    ca: &TestCert,
    name: &str,
    args: &[&str],
) -> (i32, String, String) {
    let port = relay.https.expect("an HTTPS listener").port();
    let resolve = format!("{name}:{port}:127.0.0.1");
    let cacert = path(&ca.ca);
    let mut all = vec!["--http1.1", "--cacert", &cacert, "--resolve", &resolve];
    all.extend_from_slice(args);
    let (code, out, err) = curl(&all);
    (code, String::from_utf8_lossy(&out).into_owned(), err)
}

fn https_url(relay: &RelayProc, name: &str, path: &str) -> String {
    format!("https://{name}:{}{path}", relay.https.unwrap().port())
}

#[test]
fn curl_gets_the_page_over_terminated_tls_with_forwarded_proto_https_and_keep_alive() {
    let cert = TestCert::new(&["app.example.test"]);
    let relay = relay(&[&cert]);
    let backend = Backend::start("http");
    let (connector, _dir) = connector(&relay, &http_kite("app.example.test", &backend.addr(), ""));
    // The kite's public URL is the terminated HTTPS one.
    let link = connector.wait_links_up(1);
    assert_eq!(
        link["kites"][0]["public"],
        https_url(&relay, "app.example.test", "/"),
        "{link}"
    );

    let page = https_url(&relay, "app.example.test", "/");
    let (code, out, err) = curl_https(&relay, &cert, "app.example.test", &[&page]);
    assert_eq!(code, 0, "curl failed: {err}");
    assert_eq!(out, "hello from backend\n");

    let headers = https_url(&relay, "app.example.test", "/headers");
    let (code, out, err) = curl_https(&relay, &cert, "app.example.test", &[&headers]);
    assert_eq!(code, 0, "curl failed: {err}");
    let headers: serde_json::Value = serde_json::from_str(&out).expect("JSON headers");
    assert_eq!(headers["x-forwarded-proto"], "https", "{headers}");
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1", "{headers}");
    assert_eq!(
        headers["host"],
        format!("app.example.test:{}", relay.https.unwrap().port())
    );

    // Several requests on one connection: curl connects once.
    let conn = https_url(&relay, "app.example.test", "/conn");
    let (code, out, err) = curl_https(
        &relay,
        &cert,
        "app.example.test",
        &[
            "-w",
            "%{num_connects}/%{http_code} ",
            "-o",
            "/dev/null",
            &conn,
            "-o",
            "/dev/null",
            &conn,
            "-o",
            "/dev/null",
            &page,
            "-o",
            "/dev/null",
            &conn,
        ],
    );
    assert_eq!(code, 0, "curl failed: {err}");
    assert_eq!(out, "1/200 0/200 0/200 0/200 ", "{err}");

    // TLS 1.2 works as well as 1.3.
    let (code, out, err) = curl_https(
        &relay,
        &cert,
        "app.example.test",
        &["--tlsv1.2", "--tls-max", "1.2", &page],
    );
    assert_eq!(code, 0, "curl over TLS 1.2 failed: {err}");
    assert_eq!(out, "hello from backend\n");
}

#[test]
fn a_wildcard_certificate_serves_its_names_and_a_name_without_one_is_refused_as_before() {
    let cert = TestCert::new(&["*.example.test"]);
    let relay = relay(&[&cert]);
    let backend = Backend::start("http");
    let (_connector, _dir) = connector(
        &relay,
        &format!(
            "{}{}",
            http_kite("x.example.test", &backend.addr(), ""),
            http_kite("nocert.other.example.test", &backend.addr(), "")
        ),
    );
    let (code, out, err) = curl_https(
        &relay,
        &cert,
        "x.example.test",
        &[&https_url(&relay, "x.example.test", "/")],
    );
    assert_eq!(code, 0, "curl failed: {err}");
    assert_eq!(out, "hello from backend\n");

    // A kite whose name no certificate covers (the wildcard covers one
    // label only): the handshake is refused, as for any unknown SNI.
    let (code, out, err) = curl_https(
        &relay,
        &cert,
        "nocert.other.example.test",
        &[&https_url(&relay, "nocert.other.example.test", "/")],
    );
    assert_eq!(code, 35, "expected a failed handshake: {out} {err}");
    assert!(out.is_empty(), "{out}");

    // A Host other than the TLS name on a terminated connection: 421.
    let (code, out, err) = curl_https(
        &relay,
        &cert,
        "x.example.test",
        &[
            "-H",
            "Host: nocert.other.example.test",
            "-w",
            "%{http_code}",
            "-o",
            "/dev/null",
            &https_url(&relay, "x.example.test", "/"),
        ],
    );
    assert_eq!(code, 0, "curl failed: {err}");
    assert_eq!(out, "421");
}

#[test]
fn an_offline_kite_gets_the_styled_503_page_over_tls() {
    let cert = TestCert::new(&["app.example.test"]);
    let relay = relay(&[&cert]);
    let backend = Backend::start("http");
    let (mut connector, _dir) =
        connector(&relay, &http_kite("app.example.test", &backend.addr(), ""));
    connector.kill();
    let page = https_url(&relay, "app.example.test", "/");
    let status = eventually("the kite to go offline", || {
        let (code, out, _) = curl_https(
            &relay,
            &cert,
            "app.example.test",
            &["-w", "\n%{http_code}", &page],
        );
        (code == 0 && out.ends_with("\n503")).then_some(out)
    });
    assert!(status.contains("Kite offline"), "{status}");
}

#[test]
fn plain_http_is_redirected_to_https_when_the_kite_asks() {
    let cert = TestCert::new(&["app.example.test"]);
    let relay = relay(&[&cert]);
    let backend = Backend::start("http");
    let (_connector, _dir) = connector(
        &relay,
        &format!(
            "{}{}",
            http_kite("app.example.test", &backend.addr(), "https_redirect = true"),
            http_kite("plain.example.test", &backend.addr(), "")
        ),
    );
    let http = relay.http.unwrap();
    let https_port = relay.https.unwrap().port();
    let resolve_http = format!("app.example.test:{}:127.0.0.1", http.port());
    let resolve_https = format!("app.example.test:{https_port}:127.0.0.1");
    let url = format!("http://app.example.test:{}/x?y", http.port());
    let (code, out, err) = curl(&[
        "--resolve",
        &resolve_http,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{redirect_url}",
        &url,
    ]);
    assert_eq!(code, 0, "curl failed: {err}");
    assert_eq!(
        String::from_utf8_lossy(&out),
        format!("308 https://app.example.test:{https_port}/x?y")
    );

    // Followed, with the CA: the page over HTTPS.
    let cacert = path(&cert.ca);
    let url = format!("http://app.example.test:{}/", http.port());
    let out = curl_ok(&[
        "--http1.1",
        "-L",
        "--cacert",
        &cacert,
        "--resolve",
        &resolve_http,
        "--resolve",
        &resolve_https,
        &url,
    ]);
    assert_eq!(out, "hello from backend\n");

    // ACME's HTTP-01 path is never redirected: it reaches the backend.
    let url = format!(
        "http://app.example.test:{}/.well-known/acme-challenge/token",
        http.port()
    );
    let (code, out, err) = curl(&["--resolve", &resolve_http, "-w", " %{http_code}", &url]);
    assert_eq!(code, 0, "curl failed: {err}");
    assert_eq!(String::from_utf8_lossy(&out), "no such path\n 404");

    // A kite that does not ask is served over plain HTTP.
    let resolve_plain = format!("plain.example.test:{}:127.0.0.1", http.port());
    let url = format!("http://plain.example.test:{}/", http.port());
    assert_eq!(
        curl_ok(&["--resolve", &resolve_plain, &url]),
        "hello from backend\n"
    );
}

#[test]
fn sni_passthrough_still_wins_for_an_https_kite_of_the_same_name() {
    if !require_tool("openssl", "openssl") {
        return;
    }
    // The relay holds a certificate for the name, and the kite's own TLS
    // server another one from another CA: trusting only the latter, curl
    // succeeds only if the relay passed the TLS through.
    let relay_cert = TestCert::new(&["app.example.test"]);
    let own_cert = TestCert::new(&["app.example.test"]);
    let relay = relay(&[&relay_cert]);
    let port = free_port();
    let server = Proc::spawn("openssl-s_server", {
        let mut command = Command::new("openssl");
        command.args([
            "s_server",
            "-accept",
            &format!("127.0.0.1:{port}"),
            "-cert",
            &path(&own_cert.cert),
            "-key",
            &path(&own_cert.key),
            "-www",
        ]);
        command
    });
    eventually("openssl s_server to listen", || {
        listening_on(port).then_some(())
    });
    let backend = Backend::start("http");
    let (_connector, _dir) = connector(
        &relay,
        &format!(
            "{}[[kite]]\nname = \"app.example.test\"\nprotocol = \"https\"\ntarget = \"127.0.0.1:{port}\"\n",
            http_kite("app.example.test", &backend.addr(), "")
        ),
    );
    let url = https_url(&relay, "app.example.test", "/");
    let (code, out, err) = curl_https(&relay, &own_cert, "app.example.test", &[&url]);
    assert_eq!(code, 0, "curl through the passthrough failed: {err}");
    assert!(out.contains("s_server"), "{out}");
    let (code, out, err) = curl_https(&relay, &relay_cert, "app.example.test", &[&url]);
    assert_ne!(
        code, 0,
        "the relay's certificate must not be served: {out} {err}"
    );
    drop(server);
}

#[test]
fn headless_chromium_loads_the_page_through_the_relay() {
    let chromium = "/usr/bin/chromium";
    if !require_tool(chromium, "chromium") {
        return;
    }
    let cert = TestCert::new(&["app.example.test"]);
    let relay = relay(&[&cert]);
    let backend = Backend::start("http");
    let (_connector, _dir) = connector(&relay, &http_kite("app.example.test", &backend.addr(), ""));
    let profile = TempDir::new("chromium-profile");
    let mut command = Command::new(chromium);
    command.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        &format!("--user-data-dir={}", path(profile.path())),
        "--host-resolver-rules=MAP app.example.test 127.0.0.1",
        &format!("--ignore-certificate-errors-spki-list={}", cert.spki_sha256),
        "--dump-dom",
        &https_url(&relay, "app.example.test", "/"),
    ]);
    let mut browser = Proc::spawn("chromium", command);
    let Some(status) = browser.wait_exit(scaled(Duration::from_secs(60))) else {
        let out = browser.output();
        browser.kill();
        panic!("chromium did not finish in time:\n{out}");
    };
    let out = browser.output();
    assert!(status.success(), "chromium failed ({status}):\n{out}");
    assert!(
        out.contains("hello from backend"),
        "no page in the DOM:\n{out}"
    );
}

#[test]
fn sighup_rereads_the_certificate_files() {
    let first = TestCert::new(&["app.example.test"]);
    let second = TestCert::new(&["app.example.test"]);
    // The relay reads the pair from one place, which the test overwrites.
    let dir = TempDir::new("reloaded-cert");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let install = |from: &TestCert| {
        std::fs::copy(&from.cert, &cert).unwrap();
        std::fs::copy(&from.key, &key).unwrap();
    };
    install(&first);
    let relay = Relay::new()
        .domain(&format!("http:*.example.test:{SECRET}"))
        .args(&["--https", "127.0.0.1:0"])
        .args(&["--tls-cert", &format!("{}:{}", path(&cert), path(&key))])
        .start();
    let backend = Backend::start("http");
    let (_connector, _dir) = connector(&relay, &http_kite("app.example.test", &backend.addr(), ""));
    let page = https_url(&relay, "app.example.test", "/");
    let (code, _, err) = curl_https(&relay, &first, "app.example.test", &[&page]);
    assert_eq!(code, 0, "curl failed: {err}");

    install(&second);
    let _ = Command::new("kill")
        .args(["-HUP", &relay.proc.pid().to_string()])
        .status();
    relay
        .proc
        .wait_for("certificates for terminated HTTPS reloaded");
    let (code, out, err) = curl_https(&relay, &second, "app.example.test", &[&page]);
    assert_eq!(code, 0, "curl with the new CA failed: {err}");
    assert_eq!(out, "hello from backend\n");
    let (code, _, _) = curl_https(&relay, &first, "app.example.test", &[&page]);
    assert_ne!(code, 0, "the old certificate is still served");

    // A broken pair on reload: logged, and the served one stays.
    std::fs::copy(&first.key, &key).unwrap();
    let _ = Command::new("kill")
        .args(["-HUP", &relay.proc.pid().to_string()])
        .status();
    relay.proc.wait_for("certificate reload failed");
    let (code, _, err) = curl_https(&relay, &second, "app.example.test", &[&page]);
    assert_eq!(code, 0, "the served certificate was dropped: {err}");
}

/// `kitepipe relay --tls-cert SPEC` with otherwise loopback settings:
/// its exit status and stderr (it must not start).
fn relay_refuses(spec: &str) -> String {
    let state = TempDir::new("refused-relay");
    let out = Command::new(BIN)
        .args(["relay", "--listen", "127.0.0.1:0", "--https", "127.0.0.1:0"])
        .args(["--tls-cert", spec, "--state-dir", &path(state.path())])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run kitepipe relay");
    assert!(
        !out.status.success(),
        "the relay started with --tls-cert {spec}"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_bad_certificate_pair_stops_the_relay_with_a_clear_error() {
    let one = TestCert::new(&["app.example.test"]);
    let other = TestCert::new(&["app.example.test"]);
    let err = relay_refuses(&format!("{}:{}", path(&one.cert), path(&other.key)));
    assert!(err.contains("does not match the certificate"), "{err}");
    assert!(err.contains(&path(&other.key)), "{err}");

    let err = relay_refuses(&format!("{}:{}", path(&one.cert), "/nonexistent/key.pem"));
    assert!(err.contains("/nonexistent/key.pem"), "{err}");

    // Expired: served, with a warning (the operator may be replacing it).
    let expired = TestCert::expired(&["app.example.test"]);
    let relay = relay(&[&expired]);
    relay.proc.wait_for("this certificate has expired");

    let err = relay_refuses(&path(&one.cert));
    assert!(err.contains("CERT.pem:KEY.pem"), "{err}");

    if require_tool("openssl", "openssl") {
        // A certificate with a common name but no subjectAltName.
        let dir = TempDir::new("no-san");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let status = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-subj", "/CN=app.example.test", "-days", "2"])
            .args(["-keyout", &path(&key), "-out", &path(&cert)])
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let err = relay_refuses(&format!("{}:{}", path(&cert), path(&key)));
        assert!(err.contains("no DNS name"), "{err}");
    }
}
