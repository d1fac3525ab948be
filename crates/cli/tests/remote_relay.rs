//! Remote operations on connectors through the relay: real relay and
//! connector processes, `kitepipe remote node:NAME` run against the relay's
//! gateway. A connector accepts only what it opted in to
//! (`--allow-remote`), the relay only what its `[[remote]]` rules grant,
//! and both log each operation with the caller.
// Real processes and real time.
#![allow(clippy::disallowed_methods)]

mod support;

use std::process::{Command, Stdio};

use support::*;

const SECRET: &str = "s3cret-for-tests-1";
const DOMAIN: &str = "http:*.example.net:s3cret-for-tests-1";

/// A connector named `name`.example.net (under the secret's domain, so the
/// secret proves the name), holding a kite (so it links), with `args`.
fn connector(relay: &RelayProc, name: &str, args: &[&str]) -> Proc {
    Connector::new(relay)
        .secret(SECRET)
        .kite(&format!("http:{name}.example.net=127.0.0.1:9"))
        .args(&["--name", &format!("{name}.example.net")])
        .args(args)
        .start()
}

/// `kitepipe remote node:NODE.example.net --gateway GW ARGS...`: exit
/// code, stdout, stderr.
fn remote(relay: &RelayProc, node: &str, args: &[&str]) -> (i32, String, String) {
    remote_with_stdin(relay, node, args, b"")
}

fn remote_with_stdin(
    relay: &RelayProc,
    node: &str,
    args: &[&str],
    stdin: &[u8],
) -> (i32, String, String) {
    use std::io::Write;
    let gateway = relay.gateway.expect("the relay runs a gateway").to_string();
    let mut child = Command::new(BIN)
        .args([
            "remote",
            &format!("node:{node}.example.net"),
            "--gateway",
            &gateway,
        ])
        .args(["--connect-timeout", "10s"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kitepipe runs");
    let mut input = child.stdin.take().expect("piped");
    let stdin = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let out = wait_bounded(child);
    let _ = writer.join();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Waits for a child with the tests' patience, killing it by PID past it.
fn wait_bounded(child: std::process::Child) -> std::process::Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(patience()) {
        Ok(out) => out.expect("kitepipe ran"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("kitepipe remote (pid {pid}) hung past {:?}", patience());
        }
    }
}

#[test]
fn exec_and_files_on_an_opted_in_connector_are_logged_on_both_sides() {
    let relay = Relay::new()
        .domain(DOMAIN)
        .args(&["--remote", "laptop.example.net:exec,fs"])
        .start();
    let laptop = connector(&relay, "laptop", &["--allow-remote", "exec,fs"]);
    let dir = TempDir::new("remote-relay");
    let path = dir.path().to_str().unwrap().to_string();

    // exec: output streams apart, exit status comes back, stdin goes in.
    let (code, out, err) = remote_with_stdin(
        &relay,
        "laptop",
        &[
            "exec",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; read line; echo \"got $line\"; exit 3",
        ],
        b"hello\n",
    );
    assert_eq!(code, 3, "stdout {out:?} stderr {err:?}");
    assert_eq!(out, "out\ngot hello\n");
    assert!(err.contains("err\n"), "{err}");
    // It ran as the connector's process, on the connector's side.
    let (code, out, _) = remote(&relay, "laptop", &["exec", "--", "sh", "-c", "echo $PPID"]);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), laptop.pid().to_string());

    // Files: write, read back, list.
    let file = format!("{path}/note.txt");
    let data = pseudo_random(300_000, 7);
    let (code, _, err) = remote_with_stdin(&relay, "laptop", &["write", &file], &data);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), data);
    let gateway = relay.gateway.unwrap().to_string();
    let read = wait_bounded(
        Command::new(BIN)
            .args([
                "remote",
                "node:laptop.example.net",
                "--gateway",
                &gateway,
                "read",
                &file,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    assert!(read.status.success());
    assert_eq!(sha256_hex(&read.stdout), sha256_hex(&data));
    let (code, out, _) = remote(&relay, "laptop", &["ls", &path]);
    assert_eq!(code, 0);
    assert!(out.contains("note.txt"), "{out}");

    // A typed remote error comes back as the host's.
    let (code, _, err) = remote(&relay, "laptop", &["read", &format!("{path}/missing")]);
    assert_eq!(code, 4, "{err}");
    assert!(err.to_lowercase().contains("no such file"), "{err}");

    // Both sides logged the operations with who asked.
    relay.proc.wait_for("remote operation");
    let relay_log = relay.proc.output();
    assert!(relay_log.contains("exec [\"sh\", \"-c\""), "{relay_log}");
    assert!(
        relay_log.contains("gateway client 127.0.0.1:"),
        "{relay_log}"
    );
    let laptop_log = laptop.output();
    assert!(laptop_log.contains("remote operation"), "{laptop_log}");
    assert!(
        laptop_log.contains("gateway client 127.0.0.1:"),
        "{laptop_log}"
    );
    assert!(
        laptop_log.contains(&format!("write {file:?}")),
        "{laptop_log}"
    );
}

#[test]
fn refused_where_the_connector_did_not_opt_in_or_the_rules_do_not_grant() {
    let relay = Relay::new()
        .domain(DOMAIN)
        .args(&[
            "--remote",
            "desk.example.net:exec,fs",
            "--remote",
            "ci-*:fs",
        ])
        // Unknown nodes are unknown (not waited for) once the relay is older.
        .args(&["--event-wait", "1s"])
        .start();
    let _desk = connector(&relay, "desk", &[]);
    let other = connector(&relay, "other", &["--allow-remote", "all"]);
    let ci = connector(&relay, "ci-1", &["--allow-remote", "all"]);
    let mark = std::env::temp_dir().join(format!("kitepipe-remote-mark-{}", std::process::id()));
    let touch = ["exec", "--", "touch", mark.to_str().unwrap()];

    // Not opted in: refused before anything runs.
    let (code, _, err) = remote(&relay, "desk", &touch);
    assert_eq!(code, 255, "{err}");
    assert!(err.contains("accepts no remote operations"), "{err}");
    assert!(err.contains("--allow-remote"), "{err}");

    // Opted in, but no rule names it.
    let (code, _, err) = remote(&relay, "other", &touch);
    assert_eq!(code, 255, "{err}");
    assert!(
        err.contains("rules grant no remote operations on node other"),
        "{err}"
    );

    // The rules grant fs, not exec: exec is refused typed, fs works.
    // (126, as a shell says "cannot execute".)
    let (code, _, err) = remote(&relay, "ci-1", &touch);
    assert_eq!(code, 126, "{err}");
    assert!(err.contains("do not grant exec operations"), "{err}");
    let (code, out, err) = remote(&relay, "ci-1", &["stat", "/"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("dir"), "{out}");
    assert!(!mark.exists(), "a refused exec ran anyway");

    // An unknown node is named as such.
    let (code, _, err) = remote(&relay, "ghost", &["stat", "/"]);
    assert_eq!(code, 255, "{err}");
    assert!(err.contains("no connector named ghost"), "{err}");

    // Refusals are logged; nothing reached the refusing connectors.
    relay.proc.wait_for("remote operation refused");
    assert!(!other.output().contains("remote operation"));
    assert!(!ci.output().contains("remote operation refused"));
}

#[test]
fn the_connector_refuses_kinds_it_did_not_opt_in_to_even_if_the_relay_grants_them() {
    // The relay grants everything; the connector accepts fs only. The
    // session opens (fs is common), exec on it is refused by the relay
    // (it knows the offer) and, were the relay to pass it, by the connector.
    let relay = Relay::new()
        .domain(DOMAIN)
        .args(&["--remote", "*:all"])
        .start();
    let _files = connector(&relay, "files", &["--allow-remote", "fs"]);
    let (code, _, err) = remote(&relay, "files", &["exec", "--", "true"]);
    assert_eq!(code, 126, "{err}");
    assert!(
        err.contains("does not accept exec operations (it accepts fs)"),
        "{err}"
    );
    let (code, _, err) = remote(&relay, "files", &["stat", "/"]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn plain_requests_to_the_remote_route_get_a_clear_400() {
    let relay = Relay::new()
        .domain(DOMAIN)
        .args(&["--remote", "laptop:all"])
        .start();
    let url = format!("http://{}/remote/laptop", relay.gateway.unwrap());
    let token = relay.token_header();
    let (code, body, _) = curl(&["-s", "-H", &token, "-w", "\n%{http_code}", &url]);
    assert_eq!(code, 0);
    let body = String::from_utf8_lossy(&body);
    assert!(body.ends_with("\n400"), "{body}");
    assert!(body.contains("kitepipe remote node:NODE"), "{body}");
}
