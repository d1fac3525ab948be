//! The connector changes its kites while it runs, on a changed `--config`
//! file and on SIGHUP: kites added, removed and retargeted on the live
//! link, while a TCP stream on an unchanged kite keeps flowing; a broken
//! config changes nothing and the log says why.

// Real processes run on the wall clock: pacing the stream and waiting out
// the file poll sleep for real.
#![allow(clippy::disallowed_methods)]

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use support::*;

const SECRET: &str = "reload-secret-0123456789";

/// An HTTP server on 127.0.0.1 answering every request with `tag` (so the
/// test tells which target a kite reached), on a thread of its own.
fn tagged_backend(tag: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(mut sock) = sock else { return };
            std::thread::spawn(move || {
                let _ = sock.set_read_timeout(Some(Duration::from_secs(10)));
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match sock.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{tag}",
                    tag.len()
                );
                let _ = sock.write_all(reply.as_bytes());
            });
        }
    });
    addr
}

/// The config file's text: the secret, then one `[[kite]]` table per
/// (name, protocol, target).
fn config(kites: &[(&str, &str, &str)]) -> String {
    let mut text = format!("secret = {SECRET:?}\n");
    for (name, protocol, target) in kites {
        text.push_str(&format!(
            "\n[[kite]]\nname = {name:?}\nprotocol = {protocol:?}\ntarget = {target:?}\n"
        ));
        if *protocol == "tcp" {
            text.push_str("port = 0\n");
        }
    }
    text
}

/// Writes `text` to `file` at once (a rename, as editors and config
/// managers do), so the connector never reads half a file.
fn replace_file(file: &PathBuf, text: &str) {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

/// The status and body of GET / for `host` through the relay.
fn get(relay: &RelayProc, host: &str) -> (u16, String) {
    let (code, out, err) = curl(&[
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        "-H",
        &format!("Host: {host}"),
        &relay.http_url(),
    ]);
    assert_eq!(code, 0, "curl for {host}: {err}");
    let out = String::from_utf8_lossy(&out).into_owned();
    let (body, status) = out.rsplit_once('\n').unwrap();
    (status.trim().parse().unwrap(), body.to_string())
}

/// A TCP stream through kite A to an echo service: the test sends data
/// in parts (each when told) while a thread reads the echo back.
struct Stream {
    sock: TcpStream,
    sent: Vec<u8>,
    seed: u64,
    echoed: std::thread::JoinHandle<std::io::Result<Vec<u8>>>,
}

impl Stream {
    fn open(port: u16) -> Stream {
        let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
        sock.set_write_timeout(Some(scaled(Duration::from_secs(60))))
            .unwrap();
        let mut reader = sock.try_clone().unwrap();
        reader
            .set_read_timeout(Some(scaled(Duration::from_secs(60))))
            .unwrap();
        let echoed = std::thread::spawn(move || {
            let mut all = Vec::new();
            reader.read_to_end(&mut all)?;
            Ok(all)
        });
        Stream {
            sock,
            sent: Vec::new(),
            seed: 1,
            echoed,
        }
    }

    /// Sends one MiB in 64 KiB chunks, paced over about half a second.
    fn send_part(&mut self) {
        for _ in 0..16 {
            let chunk = pseudo_random(64 * 1024, self.seed);
            self.seed += 1;
            self.sock.write_all(&chunk).unwrap();
            self.sent.extend_from_slice(&chunk);
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    /// Ends the stream; the echo must be every byte sent, in order.
    fn finish(self) {
        self.sock.shutdown(std::net::Shutdown::Write).unwrap();
        let echoed = self
            .echoed
            .join()
            .unwrap()
            .expect("the stream was never cut");
        assert_eq!(echoed.len(), self.sent.len());
        assert_eq!(sha256_hex(&echoed), sha256_hex(&self.sent));
    }
}

#[test]
fn kites_change_live_without_dropping_the_link_or_its_streams() {
    let relay = Relay::new()
        .domain(&format!("http,tcp:*.example.net:{SECRET}"))
        .start();
    let echo = Backend::start("tcp-echo");
    let (b, c_old, c_new, d) = (
        tagged_backend("kite b"),
        tagged_backend("old c"),
        tagged_backend("new c"),
        tagged_backend("kite d"),
    );
    let dir = TempDir::new("reload");
    let file = dir.path().join("connector.toml");
    let a = ("a.example.net", "tcp", echo.addr());
    let first = config(&[
        (a.0, a.1, &a.2),
        ("b.example.net", "http", &b),
        ("c.example.net", "http", &c_old),
    ]);
    std::fs::write(&file, &first).unwrap();
    let connector = Connector::new(&relay)
        .args(&["--config", &path(&file)])
        .start();
    assert_eq!(get(&relay, "b.example.net"), (200, "kite b".into()));
    assert_eq!(get(&relay, "c.example.net"), (200, "old c".into()));
    assert_eq!(get(&relay, "d.example.net").0, 404, "d is unknown yet");

    let port = connector.tcp_kite_port("a.example.net");
    let mut stream = Stream::open(port);
    stream.send_part();

    // The file changes: A stays, B goes, C moves, D comes.
    let second = config(&[
        (a.0, a.1, &a.2),
        ("c.example.net", "http", &c_new),
        ("d.example.net", "http", &d),
    ]);
    let (tx, rx) = mpsc::channel();
    let sender = std::thread::spawn(move || {
        // Traffic flows while the connector reloads.
        stream.send_part();
        tx.send(()).unwrap();
        stream
    });
    replace_file(&file, &second);
    eventually("d serves", || {
        (get(&relay, "d.example.net") == (200, "kite d".into())).then_some(())
    });
    assert_eq!(get(&relay, "c.example.net"), (200, "new c".into()));
    let (status, _) = get(&relay, "b.example.net");
    assert_eq!(status, 503, "a removed kite is offline");
    connector.wait_for("kite removed from the config: withdrawing it");
    rx.recv_timeout(scaled(Duration::from_secs(60))).unwrap();
    let mut stream = sender.join().unwrap();

    // SIGHUP: the same once more, the other way round (B back, D gone, C
    // back to its first target), with the file changed in place keeping
    // its size and time so only the signal can tell.
    let third = config(&[
        (a.0, a.1, &a.2),
        ("b.example.net", "http", &b),
        ("c.example.net", "http", &c_old),
    ]);
    let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
    // Same length as `second`: the names and targets have the same sizes.
    assert_eq!(third.len(), second.len());
    // Written aside with the old time, then renamed over: the watcher never
    // sees a new time or size.
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, &third).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&tmp)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    // Wait out a poll or two: the watcher must not have seen it.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(get(&relay, "d.example.net"), (200, "kite d".into()));
    let reloads = connector.count("config reloaded: updating the kites");
    assert_eq!(reloads, 1, "{}", connector.output());
    let (tx, rx) = mpsc::channel();
    let sender = std::thread::spawn(move || {
        stream.send_part();
        tx.send(()).unwrap();
        stream
    });
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &connector.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    connector.wait_for("SIGHUP: reloading the config");
    eventually("b serves again", || {
        (get(&relay, "b.example.net") == (200, "kite b".into())).then_some(())
    });
    assert_eq!(get(&relay, "c.example.net"), (200, "old c".into()));
    eventually("d is withdrawn", || {
        (get(&relay, "d.example.net").0 == 503).then_some(())
    });
    rx.recv_timeout(scaled(Duration::from_secs(60))).unwrap();
    let mut stream = sender.join().unwrap();

    assert_eq!(
        connector.count("restart the connector"),
        0,
        "only kites changed so far: {}",
        connector.output()
    );

    // A broken file changes nothing, and the log says why.
    replace_file(
        &file,
        "secret = \"x\"\n[[kite]]\nname = \"e.example.net\"\nprotocol = \"http\"\n",
    );
    let out = connector.wait_for("the config cannot be used");
    let why = out
        .lines()
        .find(|l| l.contains("the config cannot be used"))
        .unwrap();
    assert!(
        why.contains("target"),
        "the log names what is missing: {why}"
    );
    assert_eq!(get(&relay, "b.example.net"), (200, "kite b".into()));
    assert_eq!(get(&relay, "c.example.net"), (200, "old c".into()));
    // Settings that need a restart are said so and kept (a new secret
    // too: B keeps proving itself with the running one), and the kites
    // still change: C goes, B gets a visitor policy.
    let mut fewer = config(&[
        (a.0, a.1, &a.2),
        ("e.example.net", "tcp", &a.2),
        ("b.example.net", "http", &b),
    ]);
    fewer.push_str("deny = [\"127.0.0.1\"]\n");
    let fewer = fewer.replace(SECRET, "another-secret-9876543210");
    replace_file(&file, &format!("max_backoff = \"9s\"\n{fewer}"));
    let out = connector.wait_for_count("restart the connector to apply it", 2);
    let warned = |setting: &str| {
        out.lines()
            .any(|l| l.contains("restart the connector to apply it") && l.contains(setting))
    };
    assert!(warned("max_backoff") && warned("secret"), "{out}");
    eventually("c is withdrawn", || {
        (get(&relay, "c.example.net").0 == 503).then_some(())
    });
    assert_eq!(
        connector.count("restart the connector to apply it"),
        2,
        "nothing else needs a restart: {out}"
    );
    eventually("b refuses a denied visitor", || {
        (get(&relay, "b.example.net").0 == 403).then_some(())
    });
    // A TCP kite added live gets a port of its own and serves.
    let e = connector.tcp_kite_port("e.example.net");
    assert_ne!(e, port);
    let mut echo_e = TcpStream::connect(("127.0.0.1", e)).unwrap();
    echo_e
        .set_read_timeout(Some(scaled(Duration::from_secs(30))))
        .unwrap();
    echo_e.write_all(b"ping through e").unwrap();
    let mut back = [0u8; 14];
    echo_e.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping through e");
    stream.send_part();
    stream.finish();

    // One link all along.
    assert_eq!(connector.links_down(), 0, "{}", connector.output());
    assert_eq!(
        relay.proc.count("connector linked"),
        1,
        "{}",
        relay.proc.output()
    );
    assert_eq!(
        connector.count("linked to relay"),
        1,
        "{}",
        connector.output()
    );
}
