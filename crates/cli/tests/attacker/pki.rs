//! Attacker tests: certificates and secrets (cases 24 and the argv part of
//! 15 of the trust-model issue).
//!
//! - A connector certificate carrying the relay's name (`--san`) cannot
//!   impersonate the relay: leaves are issued for one role, client by
//!   default, server only with `--role relay`, and both sides check it.
//! - Directories and files holding keys are tightened (ours) or refused
//!   (someone else's) when loose, with the path and mode in the message.
//! - Secrets stay out of argv (`--secret-file`, `--domain-file`), a secret
//!   on the command line is warned about, and short secrets are refused.
// Certificates and process listings are about the real clock and the real
// /proc: no tokio time here.
#![allow(clippy::disallowed_methods)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::support::*;

/// A secret long and varied enough to be accepted without a warning.
const STRONG_SECRET: &str = "pki-attacker-7f3c9a1e5b";

/// Runs `kitepipe ARGS` to completion.
fn kitepipe(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("KITEPIPE_LOG", "info")
        .env_remove("KITEPIPE_SECRET")
        .stdin(Stdio::null())
        .output()
        .expect("run kitepipe")
}

/// Runs `kitepipe ARGS`, asserts success, returns stdout and stderr.
fn kitepipe_ok(args: &[&str]) -> String {
    let out = kitepipe(args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kitepipe {args:?} failed: {text}");
    text
}

/// Runs `kitepipe ARGS` as a process that should exit by itself (it is
/// killed after the test's patience if it does not); returns its status
/// and output.
fn kitepipe_exits(args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut command = Command::new(BIN);
    command.args(args).env_remove("KITEPIPE_SECRET");
    let proc = Proc::spawn("kitepipe", command);
    let status = eventually(&format!("kitepipe {args:?} to exit"), || proc.exited());
    if !status.success() {
        // The output threads finish after the process: wait for the error
        // line `main` prints last.
        eventually("the error line to be read", || {
            let out = proc.output();
            out.lines()
                .any(|l| l.starts_with("kitepipe: "))
                .then_some(())
        });
    }
    (status, proc.output())
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `openssl x509 -text` of a certificate file.
fn openssl_text(cert: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(cert)
        .output()
        .unwrap_or_else(|err| panic!("cannot run openssl: {err} ({DEPS_HINT})"));
    assert!(out.status.success(), "openssl failed on {}", cert.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A relay presenting the certificate in `identity` and verifying
/// connectors against `ca`, with one secret domain for kites, plus `args`.
fn relay_with_leaf(ca: &Ca, identity: &Path, domain_file: &Path, args: &[&str]) -> RelayProc {
    Relay::new()
        .args(&[
            "--cert",
            &path(&identity.join("cert.pem")),
            "--key",
            &path(&identity.join("key.pem")),
            "--client-ca",
            &ca.cert(),
            "--domain-file",
            &path(domain_file),
        ])
        .args(args)
        .start()
}

/// Writes a domain file for `*.example.net` with [`STRONG_SECRET`] (0600).
fn domain_file(dir: &Path) -> PathBuf {
    let file = dir.join("domains");
    std::fs::write(
        &file,
        format!("# kites of the test\nhttp,tcp:*.example.net:{STRONG_SECRET}\n"),
    )
    .unwrap();
    chmod(&file, 0o600);
    file
}

/// Writes [`STRONG_SECRET`] to a secret file (0600).
fn secret_file(dir: &Path) -> PathBuf {
    let file = dir.join("secret");
    std::fs::write(&file, format!("{STRONG_SECRET}\n")).unwrap();
    chmod(&file, 0o600);
    file
}

/// What a connector reached first: linked, or refused by its own TLS check.
fn link_outcome(connector: &Proc) -> String {
    eventually("the connector to link or give up on the relay", || {
        connector
            .output()
            .lines()
            .find(|l| l.contains("linked to relay") || l.contains("cannot link to relay"))
            .map(str::to_string)
    })
}

#[test]
fn issued_leaves_carry_key_identifiers_and_one_purpose() {
    let ca = Ca::init("pki-eku");
    let laptop = openssl_text(&ca.issue("laptop", &[]).join("cert.pem"));
    let relay = openssl_text(
        &ca.issue("relay", &["--role", "relay", "--san", "relay.example.net"])
            .join("cert.pem"),
    );
    let sneaky = openssl_text(
        &ca.issue("sneaky", &["--san", "relay.example.net"])
            .join("cert.pem"),
    );
    for (name, text) in [("laptop", &laptop), ("relay", &relay), ("sneaky", &sneaky)] {
        assert!(
            text.contains("X509v3 Subject Key Identifier"),
            "{name}: {text}"
        );
        assert!(
            text.contains("X509v3 Authority Key Identifier"),
            "{name}: {text}"
        );
        assert!(text.contains("CA:FALSE"), "{name}: {text}");
    }
    for (name, text) in [("laptop", &laptop), ("sneaky", &sneaky)] {
        assert!(
            text.contains("TLS Web Client Authentication"),
            "{name}: {text}"
        );
        assert!(
            !text.contains("TLS Web Server Authentication"),
            "{name}: {text}"
        );
    }
    assert!(relay.contains("TLS Web Server Authentication"), "{relay}");
    assert!(!relay.contains("TLS Web Client Authentication"), "{relay}");
    // A relay certificate without a name no connector could dial is a mistake.
    let out = kitepipe(&[
        "ca",
        "issue",
        "nameless",
        "--role",
        "relay",
        "--dir",
        &path(&ca.dir()),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--san"));
}

/// Starts a connector to `relay` with the identity in `identity` (checking
/// the relay against the identity's `ca.pem`, no pinned fingerprint) and
/// returns what it reached first (see [`link_outcome`]), with the connector
/// still running.
fn identity_link_outcome(relay: &RelayProc, identity: &Path) -> (Proc, String) {
    let connector = Connector::new(relay)
        .no_fingerprint()
        .args(&[
            "--identity",
            &path(identity),
            "--kite",
            "http:laptop.example.net=8000",
        ])
        .spawn();
    let outcome = link_outcome(&connector);
    (connector, outcome)
}

#[test]
fn connector_leaf_with_the_relays_name_cannot_impersonate_the_relay() {
    let ca = Ca::init("pki-impersonate");
    // The CA's operator gave a connector the relay's address as a name:
    // it still is a client certificate, and a connector trusting the CA
    // refuses it as a relay.
    let sneaky = ca.issue("sneaky", &["--san", "127.0.0.1"]);
    let laptop = ca.issue("laptop", &[]);
    let files = TempDir::new("pki-impersonate-files");
    let fake_relay = relay_with_leaf(&ca, &sneaky, &domain_file(files.path()), &[]);
    let (victim, outcome) = identity_link_outcome(&fake_relay, &laptop);
    assert!(outcome.contains("cannot link to relay"), "{outcome}");
    assert!(
        outcome.contains("not for server authentication"),
        "the connector says why: {outcome}"
    );
    assert_eq!(victim.links_up(), 0);
}

#[test]
fn relay_leaf_serves_connectors_and_cannot_serve_as_a_connector() {
    let ca = Ca::init("pki-relay-role");
    let relay_id = ca.issue("relay", &["--role", "relay", "--san", "127.0.0.1"]);
    let laptop = ca.issue("laptop", &[]);
    let files = TempDir::new("pki-relay-role-files");
    let relay = relay_with_leaf(
        &ca,
        &relay_id,
        &domain_file(files.path()),
        &["--cert-domain", "example.net"],
    );
    let (_good, outcome) = identity_link_outcome(&relay, &laptop);
    assert!(outcome.contains("linked to relay"), "{outcome}");

    // The relay's own certificate presented by a connector: not a client
    // certificate, so the relay refuses it at the TLS layer.
    let impostor = Connector::new(&relay)
        .no_fingerprint()
        .args(&[
            "--cert",
            &path(&relay_id.join("cert.pem")),
            "--key",
            &path(&relay_id.join("key.pem")),
            "--ca",
            &ca.cert(),
            "--name",
            "relay",
        ])
        .spawn();
    relay
        .proc
        .wait_for("connector certificate is not for client authentication");
    let outcome = link_outcome(&impostor);
    assert!(outcome.contains("cannot link to relay"), "{outcome}");
}

#[test]
fn ca_init_into_a_world_writable_directory_is_tightened_with_a_message() {
    let base = TempDir::new("pki-loose-ca");
    let dir = base.path().join("ca");
    std::fs::create_dir(&dir).unwrap();
    chmod(&dir, 0o777);
    let out = kitepipe_ok(&["ca", "init", &path(&dir)]);
    assert_eq!(mode(&dir), 0o700, "{out}");
    assert!(
        out.contains(&path(&dir)) && out.contains("0777") && out.contains("0700"),
        "the message names the path and both modes: {out}"
    );

    // An existing CA whose directory was opened up later, and an --out
    // directory that others may write: both tightened when used.
    chmod(&dir, 0o755);
    let out_dir = base.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    chmod(&out_dir, 0o777);
    let out = kitepipe_ok(&[
        "ca",
        "issue",
        "laptop",
        "--dir",
        &path(&dir),
        "--out",
        &path(&out_dir),
    ]);
    assert_eq!(mode(&dir), 0o700, "{out}");
    assert_eq!(mode(&out_dir), 0o700, "{out}");
    assert!(out.contains("0755") && out.contains("0777"), "{out}");

    // A shared directory (sticky, like /tmp) is never made private: refused.
    let shared = base.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    chmod(&shared, 0o1777);
    let refused = kitepipe(&["ca", "init", &path(&shared)]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains(&path(&shared)) && stderr.contains("1777"),
        "{stderr}"
    );
    assert_eq!(mode(&shared), 0o1777);
    assert!(!shared.join("ca-key.pem").exists());
}

#[test]
fn key_directory_of_another_user_is_refused() {
    // Only root can give a directory to another user.
    if !crate::support::require_root("giving a directory to another user") {
        return;
    }
    let base = TempDir::new("pki-foreign");
    let dir = base.path().join("ca");
    std::fs::create_dir(&dir).unwrap();
    chmod(&dir, 0o777);
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    let refused = kitepipe(&["ca", "init", &path(&dir)]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains(&path(&dir)) && stderr.contains("owned by uid 65534"),
        "{stderr}"
    );
    assert!(!dir.join("ca-key.pem").exists());
    assert_eq!(mode(&dir), 0o777, "someone else's directory is left alone");
}

#[test]
fn key_files_made_world_readable_are_tightened_with_a_message() {
    let ca = Ca::init("pki-loose-key");
    let ca_key = ca.dir().join("ca-key.pem");
    chmod(&ca_key, 0o644);
    let out = kitepipe_ok(&["ca", "issue", "laptop", "--dir", &path(&ca.dir())]);
    assert_eq!(mode(&ca_key), 0o600, "{out}");
    assert!(
        out.contains(&path(&ca_key)) && out.contains("0644"),
        "the message names the file and its mode: {out}"
    );

    // A connector's identity key, opened up after it was issued.
    let laptop = ca.dir().join("issued/laptop");
    let key = laptop.join("key.pem");
    chmod(&key, 0o644);
    chmod(&laptop, 0o755);
    let connector = Connector::to("127.0.0.1:9", "")
        .no_fingerprint()
        .args(&["--identity", &path(&laptop)])
        .spawn();
    let out = connector.wait_for("cannot link to relay");
    assert_eq!(mode(&key), 0o600, "{out}");
    assert_eq!(mode(&laptop), 0o700, "{out}");
    assert!(out.contains(&path(&key)) && out.contains("0644"), "{out}");
}

#[test]
fn secret_files_keep_secrets_out_of_every_command_line() {
    let files = TempDir::new("pki-argv");
    let backend = Backend::start("http");
    let relay = Relay::new()
        .args(&["--domain-file", &path(&domain_file(files.path()))])
        .start();
    let connector = Connector::new(&relay)
        .args(&["--secret-file", &path(&secret_file(files.path()))])
        .kite(&format!("http:argv.example.net={}", backend.addr()))
        .start();
    // The environment keeps working too (only the same user and root can
    // read /proc/PID/environ).
    let mut by_env = Command::new(BIN);
    by_env
        .args([
            "connect",
            &relay.link.to_string(),
            "--fingerprint",
            &relay.fingerprint,
        ])
        .args(["--name", "env-connector", "--kite"])
        .arg(format!("http:env.example.net={}", backend.addr()))
        .env("KITEPIPE_SECRET", STRONG_SECRET);
    let by_env = Proc::spawn("env-connector", by_env);
    by_env.wait_links_up(1);
    for host in ["argv.example.net", "env.example.net"] {
        let body = curl_ok(&[
            "-H",
            &format!("Host: {host}"),
            &format!("{}/", relay.http_url()),
        ]);
        assert_eq!(body, "hello from backend\n", "{host}");
    }
    // Every process on the machine, as any local user could list them.
    let mut seen = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        seen += 1;
        let text = String::from_utf8_lossy(&cmdline);
        assert!(
            !text.contains(STRONG_SECRET),
            "the secret is in /proc/{}/cmdline",
            entry.file_name().to_string_lossy()
        );
    }
    assert!(seen > 3, "read the command lines of the test's processes");
    for proc in [&relay.proc, &connector, &by_env] {
        assert!(
            !proc.output().contains("on the command line"),
            "{}",
            proc.output()
        );
    }
}

#[test]
fn secrets_on_the_command_line_are_warned_about() {
    let relay = Relay::new()
        .domain(&format!("http:*.example.net:{STRONG_SECRET}"))
        .start();
    let warning = relay.proc.wait_for("--domain-file");
    assert!(warning.contains("on the command line"), "{warning}");
    let connector = Connector::new(&relay)
        .secret(STRONG_SECRET)
        .kite("http:warn.example.net=8000")
        .start();
    let out = connector.wait_for("--secret-file");
    assert!(out.contains("on the command line"), "{out}");
}

#[test]
fn short_secrets_are_refused_with_a_clear_error() {
    let files = TempDir::new("pki-short");
    let (status, out) = kitepipe_exits(&[
        "relay",
        "--state-dir",
        &path(files.path()),
        "--listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--domain",
        "http:*.example.net:s3cret",
    ]);
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(out.contains("at least 12"), "{out}");
    assert!(
        !out.contains("s3cret"),
        "the error never echoes the secret: {out}"
    );

    let short = files.path().join("secret");
    std::fs::write(&short, "hunter2\n").unwrap();
    chmod(&short, 0o600);
    let (status, out) = kitepipe_exits(&[
        "connect",
        "127.0.0.1:9",
        "--fingerprint",
        &format!("SHA256:{}", "aa".repeat(32)),
        "--secret-file",
        &path(&short),
        "--kite",
        "http:short.example.net=8000",
    ]);
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(out.contains("at least 12"), "{out}");
    assert!(!out.contains("hunter2"), "{out}");

    // Long enough but low in variety: accepted, with a warning.
    let relay = Relay::new()
        .args(&[
            "--domain-file",
            &path(&{
                let file = files.path().join("weak-domains");
                std::fs::write(&file, "http:*.example.net:aaaaaaaaaaaaaaaaaaaa\n").unwrap();
                chmod(&file, 0o600);
                file
            }),
        ])
        .start();
    relay.proc.wait_for("weak secret");
}
