//! Attacker tests: the relay's log as a log collector reads it. A visitor
//! (and a stranger on the link port) sends bytes meant to break or forge
//! `--log-format json` records: quotes, braces, backslashes, control
//! characters, bare CR and LF, invalid UTF-8. Every stderr line must stay
//! one JSON object of the relay's own making, and none may claim a level
//! the relay did not log.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::support::*;

const SECRET: &str = "logs-attacker-secret";

/// Lines the relay prints on stdout (its banner and `--ready-json`): the
/// fixture interleaves them with stderr.
fn is_stdout_line(line: &str) -> bool {
    line.starts_with("{\"ready\":")
        || line.starts_with("kitepipe relay ready")
        || line.starts_with("  ")
        || line.starts_with("connectors: ")
}

/// Sends `bytes` to `addr` and reads whatever comes back, bounded in time.
fn poke(addr: std::net::SocketAddr, bytes: &[u8]) {
    let Ok(mut sock) = TcpStream::connect(addr) else {
        return;
    };
    sock.set_read_timeout(Some(scaled(Duration::from_secs(5))))
        .unwrap();
    let _ = sock.write_all(bytes);
    let _ = sock.shutdown(std::net::Shutdown::Write);
    let mut sink = Vec::new();
    let _ = sock.read_to_end(&mut sink);
}

#[test]
fn a_visitor_cannot_break_or_forge_json_log_records() {
    let mut relay = Relay::new()
        .domain(&format!("http,tcp:*.example.net:{SECRET}"))
        .args(&["--log-format", "json"])
        .start();
    let http = relay.http.expect("an HTTP listener");
    let forged = "\"},\"level\":\"ERROR\",\"message\":\"forged\",\"x\":{\"";
    let hostile: Vec<Vec<u8>> = vec![
        format!("GET /{forged} HTTP/1.1\r\nHost: nosuch.example.net\r\n\r\n").into_bytes(),
        format!("GET / HTTP/1.1\r\nHost: {forged}\r\n\r\n").into_bytes(),
        b"GET / HTTP/1.1\r\nHost: a\rb.example.net\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: a\nb.example.net\r\n\r\n".to_vec(),
        b"GET /\x1b[31m HTTP/1.1\r\nHost: x.example.net\r\nX: \x1b]0;title\x07\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: \xff\xfe.example.net\r\n\r\n".to_vec(),
        b"\\\"\n{\"level\":\"ERROR\"}\n\r\n\r\n".to_vec(),
        // A keep-alive request for another kite: its Host is logged.
        b"GET / HTTP/1.1\r\nHost: nosuch.example.net\r\n\r\nGET / HTTP/1.1\r\nHost: other.example.net\r\n\r\n"
            .to_vec(),
    ];
    for bytes in &hostile {
        poke(http, bytes);
    }
    // A stranger on the link port: not TLS at all.
    poke(relay.link, format!("{forged}\n\x00\x1b\n").as_bytes());
    // The relay logged the visitors it refused (at debug: the fixture's
    // KITEPIPE_LOG) before we stop it.
    relay.proc.wait_for_count("refusing visitor", 3);
    relay.proc.terminate();

    let out = relay.proc.output();
    let mut n_records = 0;
    for line in out.lines().filter(|l| !is_stdout_line(l)) {
        let record: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|err| panic!("a log line is not JSON ({err}): {line:?}\n{out}"));
        assert!(record.is_object(), "{line}");
        assert_ne!(record["message"], "forged", "a forged record: {line}");
        assert_ne!(record["level"], "ERROR", "nothing here is an error: {line}");
        assert!(
            record["level"].is_string() && record["target"].is_string(),
            "{line}"
        );
        n_records += 1;
    }
    assert!(n_records >= 3, "too few records to judge:\n{out}");
}
