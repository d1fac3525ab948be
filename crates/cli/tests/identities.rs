//! Certificate identities, end to end and only through the CLI: a CA made
//! with `kitepipe ca`, relays verifying connectors' certificates, the rules
//! saying what each identity may claim, reloads, revocation, and every
//! refusal produced for real and checked on both sides.
// Certificates are about wall-clock time: validity windows are computed
// from the real clock on purpose.
#![allow(clippy::disallowed_methods)]

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime};

use support::*;

const DOMAIN: &str = "example.net";

/// Runs `kitepipe ARGS` to completion.
fn kitepipe(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("KITEPIPE_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("run kitepipe")
}

/// Runs `kitepipe ARGS`, asserts success, returns stdout.
fn kitepipe_ok(args: &[&str]) -> String {
    let out = kitepipe(args);
    assert!(
        out.status.success(),
        "kitepipe {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What only these tests do with the shared [`Ca`].
impl Ca {
    fn revoke(&self, name: &str) -> String {
        kitepipe_ok(&["ca", "revoke", name, "--dir", &path(&self.dir())])
    }
}

/// RFC 3339 for now + `offset` (negative: in the past).
fn rfc3339(offset_days: i64) -> String {
    let offset = Duration::from_secs(offset_days.unsigned_abs() * 24 * 60 * 60);
    let time = if offset_days < 0 {
        SystemTime::now() - offset
    } else {
        SystemTime::now() + offset
    };
    humantime::format_rfc3339_seconds(time).to_string()
}

/// A relay (self-signed link certificate) that verifies connectors
/// against `ca` and gives each identity NAME.example.net and
/// *.NAME.example.net, plus `args`.
fn cert_relay(ca: &Ca, args: &[&str]) -> RelayProc {
    Relay::new()
        .args(&["--client-ca", &ca.cert(), "--cert-domain", DOMAIN])
        .args(args)
        .start()
}

/// The first line of `proc`'s output containing every one of `needles`,
/// waiting until there is one.
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

/// The HTTP status line the relay answers for `host`.
fn status_line(relay: &RelayProc, host: &str) -> String {
    let (code, out, err) = curl(&[
        "-i",
        "-H",
        &format!("Host: {host}"),
        &format!("{}/", relay.http_url()),
    ]);
    assert_eq!(code, 0, "curl for {host} failed: {err}");
    String::from_utf8_lossy(&out)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn assert_served(relay: &RelayProc, host: &str) {
    let body = curl_ok(&[
        "-H",
        &format!("Host: {host}"),
        &format!("{}/", relay.http_url()),
    ]);
    assert_eq!(body, "hello from backend\n", "{host}");
}

/// Starts a connector to `relay` with the identity in `identity` and `kites`.
fn cert_connector(relay: &RelayProc, identity: &Path, kites: &[&str]) -> Connector {
    let mut connector = Connector::new(relay).args(&["--identity", &path(identity)]);
    for kite in kites {
        connector = connector.kite(kite);
    }
    connector
}

#[test]
fn whole_flow_from_ca_init_to_a_kite_over_mutual_tls() {
    let ca = Ca::init("flow");
    let ca_dir = path(&ca.dir());
    // The relay's own certificate comes from the same CA, so the connector
    // needs nothing but its identity directory (its ca.pem verifies the relay).
    let relay_id = ca.issue(
        "relay",
        &[
            "--role",
            "relay",
            "--san",
            "127.0.0.1",
            "--san",
            "localhost",
        ],
    );
    let laptop = ca.issue("laptop", &[]);
    for file in ["cert.pem", "key.pem", "ca.pem"] {
        assert!(laptop.join(file).is_file(), "{file} written");
    }
    let mode = |file: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(file).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode(&laptop.join("key.pem")), 0o600);
    assert_eq!(mode(&ca.dir().join("ca-key.pem")), 0o600);

    // Nothing is overwritten without --force.
    let again = kitepipe(&["ca", "issue", "laptop", "--dir", &ca_dir]);
    assert_eq!(again.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("already exists: pass --force"), "{stderr}");
    let again = kitepipe(&["ca", "init", &ca_dir]);
    assert_eq!(again.status.code(), Some(2));
    let laptop_cert = std::fs::read(laptop.join("cert.pem")).unwrap();
    kitepipe_ok(&["ca", "issue", "laptop", "--dir", &ca_dir, "--force"]);
    assert_ne!(std::fs::read(laptop.join("cert.pem")).unwrap(), laptop_cert);

    let list = kitepipe_ok(&["ca", "list", "--dir", &ca_dir]);
    let lines: Vec<&str> = list.lines().filter(|l| l.starts_with("laptop ")).collect();
    assert_eq!(lines.len(), 2, "{list}");
    assert!(lines.iter().all(|l| l.ends_with("valid")), "{list}");
    assert!(list.contains("(127.0.0.1, localhost)"), "{list}");

    let backend = Backend::start("http");
    let relay = Relay::new()
        .args(&[
            "--cert",
            &path(&relay_id.join("cert.pem")),
            "--key",
            &path(&relay_id.join("key.pem")),
            "--client-ca",
            &ca.cert(),
            "--cert-domain",
            DOMAIN,
        ])
        .start();
    let connector = Connector::new(&relay)
        .no_fingerprint()
        .args(&["--identity", &path(&laptop)])
        .kite(&format!("http:laptop.{DOMAIN}={}", backend.addr()))
        .start();
    wait_for_line(&connector, &["kite online", "http:laptop.example.net"]);
    wait_for_line(
        &relay.proc,
        &["connector linked", "identity=laptop", "serial="],
    );
    assert_served(&relay, "laptop.example.net");
}

#[test]
fn expired_certificate_is_refused_on_both_sides() {
    let ca = Ca::init("expired");
    let old = ca.issue(
        "old",
        &[
            "--not-before",
            "2020-01-01T00:00:00Z",
            "--not-after",
            "2021-01-01T00:00:00Z",
        ],
    );
    let relay = cert_relay(&ca, &[]);
    let connector = cert_connector(&relay, &old, &["http:old.example.net=127.0.0.1:9"]).spawn();

    wait_for_line(
        &connector,
        &[
            "certificate old expired at 2021-01-01T00:00:00Z",
            "relays will refuse it",
        ],
    );
    let line = wait_for_line(&connector, &["cannot link to relay", "CertificateExpired"]);
    assert!(
        line.contains("hint=certificate old expired at 2021-01-01T00:00:00Z")
            && line.contains("expired or not yet valid"),
        "{line}"
    );
    let line = wait_for_line(
        &relay.proc,
        &["refused connector certificate", "identity=old"],
    );
    assert!(line.contains("connector certificate expired"), "{line}");
    assert_eq!(
        status_line(&relay, "old.example.net"),
        "HTTP/1.1 404 Not Found"
    );
}

#[test]
fn not_yet_valid_certificate_is_refused_on_both_sides() {
    let ca = Ca::init("future");
    let future = ca.issue(
        "future",
        &["--not-before", &rfc3339(10), "--not-after", &rfc3339(20)],
    );
    let relay = cert_relay(&ca, &[]);
    let connector =
        cert_connector(&relay, &future, &["http:future.example.net=127.0.0.1:9"]).spawn();

    let line = wait_for_line(&connector, &["cannot link to relay", "CertificateExpired"]);
    assert!(
        line.contains("hint=certificate future is not valid until "),
        "{line}"
    );
    let line = wait_for_line(
        &relay.proc,
        &["refused connector certificate", "identity=future"],
    );
    assert!(
        line.contains("connector certificate not valid yet"),
        "{line}"
    );
}

#[test]
fn certificate_from_another_ca_is_refused_on_both_sides() {
    let ca = Ca::init("trusted");
    let other = Ca::init("other");
    let stranger = other.issue("stranger", &[]);
    let relay = cert_relay(&ca, &[]);
    let connector = cert_connector(
        &relay,
        &stranger,
        &["http:stranger.example.net=127.0.0.1:9"],
    )
    .spawn();

    let line = wait_for_line(&connector, &["cannot link to relay", "UnknownCA"]);
    assert!(
        line.contains("the relay does not trust the CA that issued this connector's certificate"),
        "{line}"
    );
    let line = wait_for_line(
        &relay.proc,
        &["refused connector certificate", "identity=stranger"],
    );
    assert!(
        line.contains("connector certificate not issued by the CA in --client-ca"),
        "{line}"
    );
}

#[test]
fn revoked_certificate_is_refused_on_both_sides() {
    let ca = Ca::init("revoked");
    let lost = ca.issue("lost", &[]);
    let out = ca.revoke("lost");
    assert!(out.contains("revoked lost (serial "), "{out}");
    assert!(ca.revoke("lost").contains("lost: already revoked"));
    let list = kitepipe_ok(&["ca", "list", "--dir", &path(&ca.dir())]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("lost ") && l.ends_with("revoked")),
        "{list}"
    );

    let relay = cert_relay(&ca, &[]);
    let connector = cert_connector(&relay, &lost, &["http:lost.example.net=127.0.0.1:9"]).spawn();

    let line = wait_for_line(&connector, &["cannot link to relay", "CertificateRevoked"]);
    assert!(
        line.contains("the relay's CA revoked this connector's certificate"),
        "{line}"
    );
    let line = wait_for_line(
        &relay.proc,
        &["refused connector certificate", "identity=lost"],
    );
    assert!(line.contains("connector certificate revoked"), "{line}");
}

#[test]
fn names_outside_the_rules_are_refused_per_kite_on_both_sides() {
    let ca = Ca::init("names");
    let laptop = ca.issue("laptop", &[]);
    let backend = Backend::start("http");
    let relay = cert_relay(&ca, &[]);
    let target = backend.addr();
    let connector = cert_connector(
        &relay,
        &laptop,
        &[
            &format!("http:laptop.example.net={target}"),
            &format!("http:*.laptop.example.net={target}"),
            &format!("http:desktop.example.net={target}"),
            &format!("http:*.example.net={target}"),
        ],
    )
    .start();

    wait_for_line(&connector, &["linked to relay", "online=2", "refused=2"]);
    for kite in ["desktop.example.net", "*.example.net"] {
        let line = wait_for_line(
            &connector,
            &["relay refused kite", &format!("kite=http:{kite} ")],
        );
        assert!(
            line.contains("reason=NotAllowed")
                && line.contains(&format!("identity laptop may not claim http:{kite}"))
                && line.contains("it may claim: *:laptop.example.net, *:*.laptop.example.net"),
            "{line}"
        );
        let line = wait_for_line(
            &relay.proc,
            &["kite refused", &format!("kite=http:{kite} ")],
        );
        assert!(line.contains("NotAllowed"), "{line}");
    }
    assert_served(&relay, "laptop.example.net");
    assert_served(&relay, "www.laptop.example.net");
    assert_eq!(
        status_line(&relay, "desktop.example.net"),
        "HTTP/1.1 404 Not Found"
    );
}

#[test]
fn a_relay_with_only_a_client_ca_refuses_connectors_without_certificates() {
    let ca = Ca::init("nocert");
    let relay = cert_relay(&ca, &[]);
    let connector = Connector::new(&relay)
        .secret("no-such-secret")
        .kite("http:laptop.example.net=127.0.0.1:9")
        .spawn();

    let line = wait_for_line(&connector, &["cannot link to relay", "CertificateRequired"]);
    assert!(
        line.contains("the relay requires a client certificate: connect with --identity DIR"),
        "{line}"
    );
    wait_for_line(
        &relay.proc,
        &[
            "link TLS handshake failed",
            "the connector presented no certificate",
        ],
    );
}

#[test]
fn secret_and_certificate_connectors_share_one_relay() {
    let ca = Ca::init("mixed");
    let laptop = ca.issue("laptop", &[]);
    let backend = Backend::start("http");
    let relay = cert_relay(&ca, &["--domain", "http:*.shared.example.org:mixed-secret"]);
    let _by_secret = Connector::new(&relay)
        .secret("mixed-secret")
        .kite(&format!("http:blog.shared.example.org={}", backend.addr()))
        .start();
    let by_cert = cert_connector(
        &relay,
        &laptop,
        &[&format!("http:laptop.example.net={}", backend.addr())],
    )
    .start();
    wait_for_line(&by_cert, &["linked to relay", "online=1", "refused=0"]);
    assert_served(&relay, "blog.shared.example.org");
    assert_served(&relay, "laptop.example.net");

    // A certificate does not open secret domains, and a secret connector
    // cannot claim a certificate identity's names.
    let intruder = Connector::new(&relay)
        .secret("mixed-secret")
        .kite("http:laptop.example.net=127.0.0.1:9")
        // Its only kite is refused: the relay closes the link.
        .spawn();
    let line = wait_for_line(&intruder, &["relay refused kite", "laptop.example.net"]);
    assert!(line.contains("NoDomain"), "{line}");
}

#[test]
fn reload_withdraws_forbidden_kites_keeps_the_rest_and_revocation_disconnects() {
    let ca = Ca::init("reload");
    let laptop = ca.issue("laptop", &[]);
    let backend = Backend::start("http");
    let config_dir = TempDir::new("reload-config");
    let config = config_dir.path().join("relay.toml");
    let rules = |extra: bool| {
        let mut text = format!(
            "client_ca = {:?}\ncert_domain = [\"{DOMAIN}\"]\n",
            ca.cert()
        );
        if extra {
            text.push_str(
                "\n[[allow]]\nidentity = \"lap*\"\nkites = [\"http:extra.example.org\"]\n",
            );
        }
        text
    };
    std::fs::write(&config, rules(true)).unwrap();
    let relay = Relay::new().args(&["--config", &path(&config)]).start();

    // SIGHUP reloads (nothing changed yet: nothing happens to links).
    let hup = |relay: &RelayProc| {
        let status = Command::new("kill")
            .args(["-HUP", &relay.proc.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    hup(&relay);
    wait_for_line(
        &relay.proc,
        &[
            "identity settings reloaded",
            "why=reload requested",
            "links_closed=0",
        ],
    );

    let target = backend.addr();
    let connector = cert_connector(
        &relay,
        &laptop,
        &[
            &format!("http:laptop.example.net={target}"),
            &format!("http:extra.example.org={target}"),
        ],
    )
    .start();
    wait_for_line(&connector, &["linked to relay", "online=2", "refused=0"]);
    assert_served(&relay, "laptop.example.net");
    assert_served(&relay, "extra.example.org");

    // The rule goes away: the file change is noticed, extra is withdrawn,
    // the link and the default kite stay.
    std::fs::write(&config, rules(false)).unwrap();
    let line = wait_for_line(
        &connector,
        &["relay withdrew kite", "kite=http:extra.example.org"],
    );
    assert!(
        line.contains("the relay's rules no longer let identity laptop claim these kites"),
        "{line}"
    );
    wait_for_line(
        &relay.proc,
        &[
            "kite withdrawn: the rules no longer allow it",
            "kite=http:extra.example.org",
        ],
    );
    wait_for_line(
        &relay.proc,
        &["identity settings reloaded", "kites_withdrawn=1"],
    );
    assert_eq!(
        status_line(&relay, "extra.example.org"),
        "HTTP/1.1 503 Service Unavailable"
    );
    assert_served(&relay, "laptop.example.net");
    assert_eq!(connector.links_up(), 1, "the link stayed up");
    assert_eq!(connector.links_down(), 0);

    // A broken rules file is refused and the previous rules stay.
    std::fs::write(&config, "client_ca = 7\n").unwrap();
    wait_for_line(
        &relay.proc,
        &["reload failed; keeping the previous identity settings"],
    );
    assert_served(&relay, "laptop.example.net");
    std::fs::write(&config, rules(false)).unwrap();

    // Revocation: the link is told why and closed, and reconnecting fails.
    ca.revoke("laptop");
    let line = wait_for_line(
        &connector,
        &["cannot link to relay", "is no longer accepted"],
    );
    assert!(
        line.contains("certificate laptop (serial ")
            && line.contains("connector certificate revoked"),
        "{line}"
    );
    wait_for_line(
        &relay.proc,
        &[
            "closing link: certificate no longer accepted",
            "identity=laptop",
        ],
    );
    wait_for_line(&connector, &["cannot link to relay", "CertificateRevoked"]);
    wait_for_line(
        &relay.proc,
        &[
            "refused connector certificate",
            "identity=laptop",
            "Revoked",
        ],
    );
    assert_eq!(
        status_line(&relay, "laptop.example.net"),
        "HTTP/1.1 503 Service Unavailable"
    );
    assert_eq!(connector.links_up(), 1, "it never linked again");
}

#[test]
fn openssl_s_client_needs_a_certificate_from_the_ca() {
    let ca = Ca::init("openssl");
    let laptop = ca.issue("laptop", &[]);
    let relay = cert_relay(&ca, &[]);
    let port = relay.link.to_string();
    let s_client = |extra: &[&str]| {
        let out = Command::new("timeout")
            .args([
                "20",
                "openssl",
                "s_client",
                "-connect",
                &port,
                "-alpn",
                "kitepipe/1",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|err| panic!("cannot run openssl: {err} ({DEPS_HINT})"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };

    // Without a certificate: TLS 1.3 finishes on the client's side, then
    // the relay's alert arrives (-ign_eof keeps s_client reading for it).
    let (code, out) = s_client(&["-ign_eof"]);
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("alert certificate required"), "{out}");
    wait_for_line(
        &relay.proc,
        &[
            "link TLS handshake failed",
            "the connector presented no certificate",
        ],
    );

    // With the CA's certificate the TLS layer accepts it (the link protocol
    // then waits for a hello that s_client never sends).
    let (code, out) = s_client(&[
        "-cert",
        &path(&laptop.join("cert.pem")),
        "-key",
        &path(&laptop.join("key.pem")),
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("ALPN protocol: kitepipe/1"), "{out}");
    assert!(!out.contains("alert"), "{out}");
    wait_for_line(
        &relay.proc,
        &["connector certificate verified", "identity=laptop"],
    );
}
