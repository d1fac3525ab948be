//! `kitepipe demo`: run it, then do exactly what it tells the user to try.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::Command;

use support::*;

/// Splits a command line on spaces, keeping single-quoted words together
/// (without their quotes), the way a shell would for the lines the demo prints.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut in_word = false;
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                in_word = true;
            }
            ' ' if !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    assert!(!quoted, "unbalanced quote in {line:?}");
    if in_word {
        words.push(word);
    }
    words
}

#[test]
fn shell_words_keeps_quoted_header_together() {
    assert_eq!(
        shell_words("curl -H 'Host: a.b' http://x/"),
        ["curl", "-H", "Host: a.b", "http://x/"]
    );
}

#[test]
fn demo_commands_work_as_printed_and_sigterm_exits_zero() {
    let mut command = Command::new(BIN);
    command.arg("demo");
    let mut demo = Proc::spawn("demo", command);
    let out = demo.wait_for("Press Ctrl-C");
    // Its ready line (`--ready-json`, on by the fixture's environment)
    // names the same relay the text does.
    let ready = demo.wait_ready("demo", 1, |_| true);
    let http = ready["http"].as_str().expect("the demo's HTTP address");
    assert!(
        out.contains(&format!("visitors' HTTP on {http}")),
        "{ready}\n{out}"
    );

    let curl_line = out
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("curl -H "))
        .expect("the demo prints a curl command with a Host header");
    let words = shell_words(curl_line);
    assert_eq!(words[0], "curl");
    let args: Vec<&str> = words[1..].iter().map(String::as_str).collect();
    assert!(args.iter().all(|a| !a.contains('\'')), "{args:?}");
    let page = curl_ok(&args);
    assert!(page.contains("Hello through kitepipe"), "{page}");

    let echo_line = out
        .lines()
        .map(str::trim)
        .find(|l| l.contains("| nc "))
        .expect("the demo prints a TCP echo command");
    let words = shell_words(echo_line);
    let nc = words
        .iter()
        .position(|w| w == "nc")
        .expect("nc in the echo line");
    assert_eq!(words[nc + 2], "127.0.0.1", "{echo_line}");
    let port: u16 = words[nc + 3].parse().expect("a port after the address");
    let mut sock = TcpStream::connect(("127.0.0.1", port)).expect("connect to the TCP kite");
    sock.set_read_timeout(Some(patience())).unwrap();
    let data = pseudo_random(200_000, 5);
    let mut writer = sock.try_clone().unwrap();
    let to_send = data.clone();
    let sender = std::thread::spawn(move || {
        writer.write_all(&to_send).expect("send to the echo kite");
        writer.shutdown(Shutdown::Write).expect("half-close");
    });
    let mut back = Vec::new();
    sock.read_to_end(&mut back).expect("read the echo");
    sender.join().unwrap();
    assert_eq!(back.len(), data.len());
    assert_eq!(sha256_hex(&back), sha256_hex(&data));

    let status = demo.terminate();
    assert!(status.success(), "demo exit: {status}\n{}", demo.output());
}
