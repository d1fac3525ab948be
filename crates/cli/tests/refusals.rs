//! Refusals, produced for real: a relay and connectors as real processes on
//! loopback. Each refusal is checked on both sides (what the relay logs and
//! what the connector logs), and a good connector keeps being served by the
//! relay throughout.

mod support;

use std::process::{Command, ExitStatus};

use support::*;

const SECRET: &str = "refusals-secret";
const GOOD_HOST: &str = "good.example.net";

/// A relay whose only domain allows HTTP kites under `*.example.net`, with a
/// good connector serving `http:good.example.net` from a real backend.
struct Scene {
    relay: RelayProc,
    _backend: Backend,
    _good: Proc,
}

impl Scene {
    fn start() -> Scene {
        let relay = Relay::new()
            .domain(&format!("http:*.example.net:{SECRET}"))
            .start();
        let backend = Backend::start("http");
        let good = Connector::new(&relay)
            .secret(SECRET)
            .kite(&format!("http:{GOOD_HOST}={}", backend.addr()))
            .start();
        let scene = Scene {
            relay,
            _backend: backend,
            _good: good,
        };
        scene.assert_good_served();
        scene
    }

    /// The good kite answers through the relay, and the relay is alive.
    fn assert_good_served(&self) {
        assert!(self.relay.proc.exited().is_none(), "relay exited");
        let body = curl_ok(&[
            "-H",
            &format!("Host: {GOOD_HOST}"),
            &format!("{}/", self.relay.http_url()),
        ]);
        assert_eq!(body, "hello from backend\n");
    }

    /// The status line the relay answers for `host`, e.g. `HTTP/1.1 404 Not Found`.
    fn status_line(&self, host: &str) -> String {
        let (code, out, err) = curl(&[
            "-i",
            "-H",
            &format!("Host: {host}"),
            &format!("{}/", self.relay.http_url()),
        ]);
        assert_eq!(code, 0, "curl for {host} failed: {err}");
        String::from_utf8_lossy(&out)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// Asserts the relay does not serve `host`: an error page, 404 or 503.
    fn assert_not_served(&self, host: &str) {
        let status = self.status_line(host);
        assert!(
            status.contains(" 404 ") || status.contains(" 503 "),
            "{host} should not be served, got {status:?}"
        );
    }
}

/// The lines of `proc`'s output that contain every one of `needles`,
/// waiting until there is at least one.
fn wait_for_line(proc: &Proc, needles: &[&str]) -> String {
    eventually(
        &format!("{} to print a line with {needles:?}", proc.name),
        || {
            proc.output()
                .lines()
                .find(|line| needles.iter().all(|n| line.contains(n)))
                .map(str::to_string)
        },
    )
}

/// Waits for `proc` to exit and for its output to contain `needle`.
fn wait_exit(proc: &Proc, needle: &str) -> (ExitStatus, String) {
    let status = eventually(&format!("{} to exit", proc.name), || proc.exited());
    // The output threads may still be draining the pipes after the exit.
    let out = eventually(&format!("{} to have printed {needle:?}", proc.name), || {
        let out = proc.output();
        out.contains(needle).then_some(out)
    });
    (status, out)
}

/// A fingerprint in the right format that is not `fingerprint`.
fn other_fingerprint(fingerprint: &str) -> String {
    let mut other = fingerprint.to_string();
    let last = other.pop().expect("fingerprint is not empty");
    other.push(if last == '0' { '1' } else { '0' });
    assert_ne!(other, fingerprint);
    other
}

#[test]
fn wrong_secret_is_refused_on_both_sides_and_the_name_stays_unserved() {
    let scene = Scene::start();
    // It also tries to take over the good name: that must be refused too.
    let bad = Connector::new(&scene.relay)
        .secret("not-the-secret")
        .kite("http:bad.example.net=127.0.0.1:9")
        .kite(&format!("http:{GOOD_HOST}=127.0.0.1:9"))
        // Every kite refused: the relay closes the link, it never stays up.
        .spawn();

    let line = wait_for_line(
        &bad,
        &["relay refused kite", "bad.example.net", "wrong secret"],
    );
    assert!(line.contains("BadSecret"), "{line}");
    wait_for_line(&bad, &["relay refused kite", GOOD_HOST, "wrong secret"]);
    wait_for_line(&bad, &["linked to relay", "online=0", "refused=2"]);
    let line = wait_for_line(
        &scene.relay.proc,
        &["kite refused", "bad.example.net", "wrong secret"],
    );
    assert!(line.contains("BadSecret"), "{line}");
    wait_for_line(
        &scene.relay.proc,
        &["kite refused", GOOD_HOST, "wrong secret"],
    );

    scene.assert_not_served("bad.example.net");
    // Every request still reaches the good backend, never the bad target.
    for _ in 0..5 {
        scene.assert_good_served();
    }
    assert!(
        bad.exited().is_none(),
        "a refused kite does not stop the connector"
    );
}

#[test]
fn name_outside_every_domain_is_refused() {
    let scene = Scene::start();
    let evil = Connector::new(&scene.relay)
        .secret(SECRET)
        .kite("http:evil.other.net=127.0.0.1:9")
        // Every kite refused: the relay closes the link, it never stays up.
        .spawn();

    let expected = "no domain on this relay covers evil.other.net for http";
    let line = wait_for_line(&evil, &["relay refused kite", expected]);
    assert!(line.contains("NoDomain"), "{line}");
    let line = wait_for_line(&scene.relay.proc, &["kite refused", expected]);
    assert!(line.contains("NoDomain"), "{line}");

    scene.assert_not_served("evil.other.net");
    scene.assert_good_served();
}

#[test]
fn protocol_the_domain_does_not_allow_is_refused() {
    let scene = Scene::start();
    let tcp = Connector::new(&scene.relay)
        .secret(SECRET)
        .kite("tcp:db.example.net:0=127.0.0.1:9")
        // Every kite refused: the relay closes the link, it never stays up.
        .spawn();

    let expected = "no domain on this relay covers db.example.net for tcp";
    wait_for_line(&tcp, &["relay refused kite", expected]);
    wait_for_line(&scene.relay.proc, &["kite refused", expected]);
    wait_for_line(&tcp, &["linked to relay", "online=0", "refused=1"]);
    assert!(
        !scene.relay.proc.output().contains("listening for TCP kite"),
        "a refused TCP kite must not get a public port"
    );
    scene.assert_good_served();
}

#[test]
fn wrong_fingerprint_is_refused_and_the_connector_keeps_retrying() {
    let scene = Scene::start();
    let wrong = other_fingerprint(&scene.relay.fingerprint);
    let impostor = Connector::to(&scene.relay.link.to_string(), &wrong)
        .secret(SECRET)
        .kite("http:pinned.example.net=127.0.0.1:9")
        .spawn();

    // It retries instead of exiting: a second failed attempt appears.
    let out = impostor.wait_for_count("cannot link to relay", 2);
    assert!(impostor.exited().is_none(), "connector exited:\n{out}");
    let line = wait_for_line(
        &impostor,
        &["cannot link to relay", "does not match the pinned"],
    );
    assert!(line.contains(&wrong), "{line}");
    assert!(
        line.contains("check the fingerprint"),
        "the hint is missing: {line}"
    );
    assert_eq!(impostor.links_up(), 0, "{out}");
    wait_for_line(&scene.relay.proc, &["link TLS handshake failed"]);

    scene.assert_not_served("pinned.example.net");
    scene.assert_good_served();
}

#[test]
fn ca_that_did_not_sign_the_relay_is_refused() {
    let scene = Scene::start();
    let dir = TempDir::new("other-ca");
    let ca = dir.path().join("ca.pem");
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ])
        .arg("-keyout")
        .arg(dir.path().join("ca.key"))
        .arg("-out")
        .arg(&ca)
        .args(["-days", "2", "-subj", "/CN=Some Other CA"])
        .output()
        .expect("openssl is installed");
    assert!(
        status.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&status.stderr)
    );

    let connector = Connector::to(&scene.relay.link.to_string(), "")
        .no_fingerprint()
        .arg("--ca")
        .arg(ca.to_str().expect("temp path is UTF-8"))
        .secret(SECRET)
        .kite("http:ca.example.net=127.0.0.1:9")
        .spawn();

    let out = connector.wait_for_count("cannot link to relay", 2);
    assert!(connector.exited().is_none(), "connector exited:\n{out}");
    wait_for_line(
        &connector,
        &["cannot link to relay", "not signed by the CA in --ca"],
    );
    assert_eq!(connector.links_up(), 0, "{out}");
    wait_for_line(&scene.relay.proc, &["link TLS handshake failed"]);

    scene.assert_not_served("ca.example.net");
    scene.assert_good_served();
}

#[test]
fn connector_that_cannot_verify_the_relay_exits_with_usage_error() {
    let connector = Connector::to("127.0.0.1:9", "")
        .no_fingerprint()
        .secret(SECRET)
        .kite(&format!("http:{GOOD_HOST}=127.0.0.1:9"))
        .spawn();
    let (status, out) = wait_exit(&connector, "--ca");
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(
        out.contains("--fingerprint") && out.contains("--ca"),
        "{out}"
    );
    assert!(out.contains("must verify the relay"), "{out}");
}

#[test]
fn bad_connector_arguments_exit_with_usage_error_and_a_clear_message() {
    let cases: &[(&[&str], &str)] = &[
        (&["--kite", "http:blog.example.net"], "invalid kite"),
        (
            &["--kite", "gopher:blog.example.net=127.0.0.1:9"],
            "invalid kite",
        ),
        (
            &["--kite", "tcp:db.example.net=127.0.0.1:9"],
            "needs its public port",
        ),
        (
            &[
                "--kite",
                "http:blog.example.net=127.0.0.1:9",
                "--fingerprint",
                "SHA256:zz",
            ],
            "invalid fingerprint",
        ),
    ];
    for (args, expected) in cases {
        let mut connector = Connector::to("127.0.0.1:9", "")
            .no_fingerprint()
            .secret(SECRET);
        if !args.contains(&"--fingerprint") {
            connector = connector.args(&["--fingerprint", &format!("SHA256:{}", "ab".repeat(32))]);
        }
        let connector = connector.args(args).spawn();
        let (status, out) = wait_exit(&connector, expected);
        assert_eq!(status.code(), Some(2), "{args:?}:\n{out}");
        assert!(!out.contains("panicked"), "{args:?}:\n{out}");
    }
}

#[test]
fn connector_started_before_the_relay_links_once_it_starts() {
    let state = TempDir::new("restart-state");
    let listen = format!("127.0.0.1:{}", free_port());
    let domain = format!("http:*.example.net:{SECRET}");
    // A first run creates the certificate in the shared state dir, so the
    // fingerprint is known before the relay that the connector will reach.
    let mut first = Relay::new()
        .domain(&domain)
        .args(&["--listen", &listen])
        .state_dir(state.path())
        .start();
    let fingerprint = first.fingerprint.clone();
    assert!(first.proc.terminate().success(), "{}", first.proc.output());
    drop(first);

    let backend = Backend::start("http");
    let connector = Connector::to(&listen, &fingerprint)
        .secret(SECRET)
        .kite(&format!("http:{GOOD_HOST}={}", backend.addr()))
        .args(&["--max-backoff", "1s"])
        .spawn();
    let out = connector.wait_for_count("reconnecting", 2);
    assert!(out.contains("cannot link to relay"), "{out}");
    assert_eq!(connector.links_up(), 0, "{out}");

    let relay = Relay::new()
        .domain(&domain)
        .args(&["--listen", &listen])
        .state_dir(state.path())
        .start();
    assert_eq!(
        relay.fingerprint, fingerprint,
        "same state dir, same certificate"
    );
    connector.wait_links_up(1);
    wait_for_line(&connector, &["kite online", GOOD_HOST]);
    let body = curl_ok(&[
        "-H",
        &format!("Host: {GOOD_HOST}"),
        &format!("{}/", relay.http_url()),
    ]);
    assert_eq!(body, "hello from backend\n");
}
