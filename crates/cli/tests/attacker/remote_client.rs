//! Attacker tests: the remote host is the attacker (`kitepipe remote`).
//!
//! Cases of the trust-model issue played here: 7 (a cached agent runs
//! unchecked; the `/tmp/.cache` fallback), 19 (a host exhausts the client's
//! memory with endless `Items`), 20 (terminal escapes in names, messages,
//! the platform string and ssh's stderr), 21 (waits without deadline on a
//! silent host; an interrupted download leaves its temporary file).
//!
//! The hostile host is a fake agent run by the test on 127.0.0.1, reached
//! through a fake `ssh` (a bash script in the test's temp dir, given with
//! `--ssh`) that bridges its stdin and stdout to the fake agent's port. The
//! fake agent takes the pushed binary like the bootstrap would, prints the
//! start marker and then speaks the link with kitepipe's own `Mux` and the
//! remote records of `kitepipe_proto`, misbehaving as each test asks. The
//! cache tests use another fake `ssh` that runs the real bootstrap script
//! locally with a HOME of the test's choosing (so they need no sshd).
// Real processes, real time: runs are bounded by the wall clock.
#![allow(clippy::disallowed_methods)]

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use kitepipe::link::{IncomingStream, Mux, MuxConfig, MuxStream, Side};
use kitepipe_proto::message;
use kitepipe_proto::remote::{
    AgentHello, AgentRecord, DirEntry, ErrorKind, ErrorReply, FileKind, FileStat, ReadHead,
    RemoteHeader, RemoteOp, to_json as json,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::support::{BIN, TempDir, eventually, patience, scaled, sha256_hex};

/// What a hostile host puts in every string it controls: sets the window
/// title, clears the screen, homes the cursor, prints a reassuring lie,
/// returns the carriage, and adds a C1 CSI, a DEL and a backspace.
const EVIL: &str =
    "\u{1b}]0;pwned\u{7}\u{1b}[2J\u{1b}[Hall files verified OK\r\u{9b}31m\u{7f}\u{8}";

/// How the fake agent misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Host {
    /// `ls`: `Items` without end, as fast as the client takes them.
    FloodLs,
    /// `ls`: one small `Items` every 50 ms, forever.
    DripLs,
    /// Every string it sends (names, messages, paths, platform) is EVIL.
    Escapes,
    /// Takes every operation (and its input) and never answers.
    Silent,
    /// `read`: a head and 1 MiB of a 64 MiB file, then silence.
    CutReadSilent,
    /// `read`: a head and 1 MiB of a 64 MiB file, then a stream reset.
    CutReadReset,
}

/// A fake host: the fake agent's listener and the fake ssh reaching it.
struct FakeHost {
    dir: TempDir,
    ssh: PathBuf,
    rt: Option<tokio::runtime::Runtime>,
}

impl FakeHost {
    fn start(host: Host) -> FakeHost {
        let dir = TempDir::new("fakehost");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        rt.spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve(sock, host));
            }
        });
        let ssh = dir.path().join("ssh");
        write_script(
            &ssh,
            &format!(
                "#!/usr/bin/env bash\n\
                 # A fake ssh: the session is a TCP connection to the fake agent.\n\
                 exec 3<>/dev/tcp/127.0.0.1/{port} || exit 255\n\
                 cat <&3 &\n\
                 cat >&3\n\
                 wait\n"
            ),
        );
        FakeHost {
            dir,
            ssh,
            rt: Some(rt),
        }
    }

    /// `kitepipe remote --ssh FAKE OPTS... fake-host ARGS...`.
    fn kitepipe(&self, opts: &[&str], args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .arg("remote")
            .arg("--ssh")
            .arg(&self.ssh)
            .args(["--connect-timeout", "60s"])
            .args(opts)
            .arg("fake-host")
            .args(args);
        command
    }
}

impl Drop for FakeHost {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn write_script(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Plays the agent on one connection of the fake ssh.
async fn serve(mut sock: tokio::net::TcpStream, host: Host) {
    // The bootstrap takes exactly the agent's size from the session first.
    let mut left = std::fs::metadata(BIN).unwrap().len();
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 {
        let want = buf.len().min(left as usize);
        match sock.read(&mut buf[..want]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => left -= n as u64,
        }
    }
    if sock.write_all(b"KITEPIPE-AGENT-START\n").await.is_err() {
        return;
    }
    let tracker = TaskTracker::new();
    let token = CancellationToken::new();
    let (mux, mut receivers) = Mux::start(
        sock,
        BytesMut::new(),
        Side::Relay,
        &MuxConfig::default(),
        &tracker,
        token.clone(),
    );
    let platform = if host == Host::Escapes {
        format!("linux {EVIL}")
    } else {
        "linux fake".into()
    };
    let hello = AgentHello {
        version: message::PROTOCOL_VERSION,
        software: "fake-agent".into(),
        pid: 1,
        uid: 0,
        platform,
    };
    if mux.send_control(message::encode(&hello)).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            incoming = receivers.incoming.recv() => match incoming {
                Some(incoming) => {
                    tracker.spawn(operation(incoming, host));
                }
                None => break,
            },
            control = receivers.control.recv() => if control.is_none() { break },
            _ = mux.closed() => break,
        }
    }
    token.cancel();
}

fn record(record: &AgentRecord) -> Bytes {
    let mut buf = BytesMut::new();
    record.encode(&mut buf);
    buf.freeze()
}

fn entry(name: String) -> DirEntry {
    DirEntry {
        name,
        stat: FileStat {
            kind: FileKind::File,
            size: 1,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
        },
    }
}

fn evil_error() -> AgentRecord {
    AgentRecord::Error(ErrorReply {
        kind: ErrorKind::NotFound,
        errno: Some(2),
        message: EVIL.into(),
        path: Some(format!("/{EVIL}")),
    })
}

/// Reads and drops everything the client sends until its FIN.
async fn drain(stream: &mut MuxStream) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

async fn operation(incoming: IncomingStream, host: Host) {
    let IncomingStream { header, mut stream } = incoming;
    let Ok(RemoteHeader::Remote(op)) = message::decode::<RemoteHeader>(&header) else {
        return;
    };
    let done = record(&AgentRecord::Done(Bytes::from_static(b"{}")));
    match (host, op) {
        (Host::FloodLs, RemoteOp::Ls(_)) => {
            // 512 entries of 200-byte names: about 120 KB per record.
            let batch: Vec<DirEntry> = (0..512).map(|i| entry(format!("{i:0>200}"))).collect();
            let items = record(&AgentRecord::Items(json(&batch)));
            while stream.write_all(&items).await.is_ok() {}
        }
        (Host::DripLs, RemoteOp::Ls(_)) => {
            let items = record(&AgentRecord::Items(json(&vec![entry("drip".into())])));
            while stream.write_all(&items).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        (Host::Escapes, RemoteOp::Ls(_)) => {
            let batch = vec![entry(EVIL.into()), entry(format!("plain{EVIL}\nsecond"))];
            let _ = stream
                .write_all(&record(&AgentRecord::Items(json(&batch))))
                .await;
            let _ = stream.write_all(&done).await;
            let _ = stream.shutdown().await;
            drain(&mut stream).await;
        }
        (Host::Escapes, _) => {
            let _ = stream.write_all(&record(&evil_error())).await;
            let _ = stream.shutdown().await;
            drain(&mut stream).await;
        }
        (Host::CutReadSilent | Host::CutReadReset, RemoteOp::Read(_)) => {
            let head = ReadHead {
                size: 64 * 1024 * 1024,
            };
            let _ = stream
                .write_all(&record(&AgentRecord::Head(json(&head))))
                .await;
            let chunk = record(&AgentRecord::Data(Bytes::from(vec![b'x'; 128 * 1024])));
            for _ in 0..8 {
                let _ = stream.write_all(&chunk).await;
            }
            let _ = stream.flush().await;
            if host == Host::CutReadReset {
                stream.reset(kitepipe_proto::frame::ResetCode::Refused, "cut");
                return;
            }
            drain(&mut stream).await;
            std::future::pending::<()>().await;
        }
        _ => {
            // Silent: take the input, hold the stream, never answer.
            drain(&mut stream).await;
            std::future::pending::<()>().await;
        }
    }
}

/// A finished `kitepipe` run.
struct Run {
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    took: Duration,
    /// Highest resident memory seen while it ran, in KiB.
    peak_rss_kib: u64,
}

impl Run {
    /// Asserts that stderr contains `needle`; `context` (if not empty)
    /// prefixes the message, which shows the whole run.
    fn assert_stderr_has(&self, needle: &str, context: &str) {
        assert!(
            String::from_utf8_lossy(&self.stderr).contains(needle),
            "{context}{}stderr lacks {needle:?}: {}",
            if context.is_empty() { "" } else { ": " },
            self.text()
        );
    }

    fn text(&self) -> String {
        format!(
            "exit {:?} after {:?}\nstdout: {}\nstderr: {}",
            self.code,
            self.took,
            String::from_utf8_lossy(&self.stdout),
            String::from_utf8_lossy(&self.stderr)
        )
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Runs `command` with `stdin`, sampling its memory; kills it (and fails
/// the test) if it has not ended within `limit`.
fn run_within(mut command: Command, stdin: &[u8], limit: Duration) -> Run {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = command.spawn().expect("run kitepipe");
    let pid = child.id();
    let mut pipe = child.stdin.take().unwrap();
    let input = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let _ = pipe.write_all(&input);
    });
    let collect = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut out);
            }
            out
        })
    };
    let stdout = collect(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = collect(child.stderr.take().map(|p| Box::new(p) as _));
    let mut peak = 0;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        peak = peak.max(rss_kib(pid));
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let out = Run {
                code: None,
                stdout: stdout.join().unwrap(),
                stderr: stderr.join().unwrap(),
                took: started.elapsed(),
                peak_rss_kib: peak,
            };
            panic!("kitepipe still ran after {limit:?}: {}", out.text());
        }
        std::thread::park_timeout(Duration::from_millis(20));
    };
    let took = started.elapsed();
    writer.join().unwrap();
    Run {
        code: status.code(),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
        took,
        peak_rss_kib: peak,
    }
}

/// Panics if `out` holds a byte or character that drives a terminal:
/// C0 controls other than newline and tab, DEL, and C1 controls (raw or
/// UTF-8 encoded).
fn assert_no_terminal_controls(out: &[u8], what: &str) {
    let text = String::from_utf8_lossy(out);
    let bad = text
        .chars()
        .find(|&c| (c.is_control() && c != '\n' && c != '\t') || c == char::REPLACEMENT_CHARACTER);
    assert!(
        bad.is_none(),
        "{what} carries the raw control {bad:?}: {text:?}"
    );
}

/// The `.NAME.kitepipe-*` files left in `dir`.
fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains(".kitepipe-"))
        .collect()
}

/// How long a run bounded by a 2 s `--timeout` may take at most: the
/// deadline, the session's start and close, and a loaded machine.
fn bounded() -> Duration {
    patience()
}

// Case 19: a host that answers `ls` with `Items` without end gets a clear
// error once the listing passes its bound; the client's memory stays bounded.
#[test]
fn endless_listing_is_cut_at_its_bound() {
    let host = FakeHost::start(Host::FloodLs);
    let out = run_within(
        host.kitepipe(&["--timeout", "120s"], &["ls", "/"]),
        b"",
        scaled(Duration::from_secs(120)),
    );
    assert_eq!(out.code, Some(4), "{}", out.text());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("more than") && stderr.contains("entries")
            || stderr.contains("bytes of listing"),
        "the error names the bound: {stderr}"
    );
    // The bound (MAX_LS_BYTES of listing) and the binary's own size.
    assert!(
        out.peak_rss_kib < 400 * 1024,
        "client RSS peaked at {} KiB",
        out.peak_rss_kib
    );

    // A short --timeout ends the flood too (the reader yields to the
    // deadline while records keep arriving), unless a fast machine reaches
    // the bound first.
    let out = run_within(
        host.kitepipe(&["--timeout", "1s"], &["ls", "/"]),
        b"",
        bounded(),
    );
    assert!(
        out.code == Some(124) || out.code == Some(4),
        "{}",
        out.text()
    );
}

// Case 19: `--timeout` ends a listing that never ends, even while the host
// keeps talking.
#[test]
fn dripping_listing_ends_at_the_timeout() {
    let host = FakeHost::start(Host::DripLs);
    let out = run_within(
        host.kitepipe(&["--timeout", "2s"], &["ls", "/"]),
        b"",
        bounded(),
    );
    assert_eq!(out.code, Some(124), "{}", out.text());
    out.assert_stderr_has("timed out", "");
}

// Case 20: names, error messages, paths and the platform string from the
// host reach the terminal escaped; `ls --json` gives scripts the exact names.
#[test]
fn escapes_from_the_host_never_reach_the_terminal() {
    let host = FakeHost::start(Host::Escapes);
    for long in [false, true] {
        let args: &[&str] = if long {
            &["ls", "-l", "/"]
        } else {
            &["ls", "/"]
        };
        let out = run_within(host.kitepipe(&[], args), b"", bounded());
        assert_eq!(out.code, Some(0), "{}", out.text());
        assert_no_terminal_controls(&out.stdout, "ls output");
        assert_no_terminal_controls(&out.stderr, "ls stderr");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("all files verified OK") && stdout.contains("\\x1b"),
            "the names are shown, escaped: {stdout}"
        );
        // One line per entry: a newline in a name is escaped too.
        assert_eq!(stdout.lines().count(), 2, "{stdout}");
    }

    let out = run_within(host.kitepipe(&[], &["ls", "--json", "/"]), b"", bounded());
    assert_eq!(out.code, Some(0), "{}", out.text());
    assert_no_terminal_controls(&out.stdout, "ls --json output");
    let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            value["name"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(names, [EVIL.to_string(), format!("plain{EVIL}\nsecond")]);

    for args in [
        &["stat", "/x"][..],
        &["read", "/x"],
        &["mkdir", "/x"],
        &["exec", "-n", "--", "true"],
        &["cp", ":/x", "local"],
    ] {
        let mut command = host.kitepipe(&[], args);
        command.current_dir(host.dir.path());
        let out = run_within(command, b"", bounded());
        assert_ne!(out.code, Some(0), "{args:?}: {}", out.text());
        assert_no_terminal_controls(&out.stdout, &format!("{args:?} stdout"));
        assert_no_terminal_controls(&out.stderr, &format!("{args:?} stderr"));
        out.assert_stderr_has(
            "all files verified OK",
            &format!("{args:?}: the host's message is shown, escaped"),
        );
    }

    // `forward` prints the agent's platform string.
    let mut child = host
        .kitepipe(&[], &["forward", "0:127.0.0.1:9"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let line = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut byte = [0u8; 1];
        while let Ok(1) = stdout.read(&mut byte) {
            out.push(byte[0]);
            if byte[0] == b'\n' {
                break;
            }
        }
        out
    });
    eventually("forward prints its first line", || {
        line.is_finished().then_some(())
    });
    let _ = child.kill();
    let _ = child.wait();
    let line = line.join().unwrap();
    assert_no_terminal_controls(&line, "forward's banner");
    assert!(
        String::from_utf8_lossy(&line).contains("all files verified OK"),
        "{:?}",
        String::from_utf8_lossy(&line)
    );
}

// Case 20: ssh's own diagnostics, relayed in kitepipe's error, are escaped.
#[test]
fn ssh_diagnostics_are_escaped() {
    let dir = TempDir::new("fakessh");
    let ssh = dir.path().join("ssh");
    write_script(
        &ssh,
        "#!/bin/sh\n\
         printf '\\033]0;pwned\\007\\033[2J\\033[Hall files verified OK\\r\\302\\233\\n' >&2\n\
         exit 255\n",
    );
    let mut command = Command::new(BIN);
    command
        .arg("remote")
        .arg("--ssh")
        .arg(&ssh)
        .args(["fake-host", "ls", "/"]);
    let out = run_within(command, b"", bounded());
    assert_eq!(out.code, Some(255), "{}", out.text());
    assert_no_terminal_controls(&out.stderr, "ssh failure");
    out.assert_stderr_has("all files verified OK", "");
}

// Case 21: a host that stays alive (its link answers pings) but never
// answers exec, read, write or cp cannot hold the client past --timeout.
#[test]
fn silent_host_cannot_hold_exec_read_or_write() {
    let host = FakeHost::start(Host::Silent);
    let local = host.dir.path().join("up");
    std::fs::write(&local, b"upload").unwrap();
    let local = local.display().to_string();
    let dl = host.dir.path().join("dl").display().to_string();
    for (args, stdin) in [
        (&["exec", "-n", "--", "true"][..], &b""[..]),
        (&["exec", "--", "cat"], b"input"),
        (&["read", "/f"], b""),
        (&["write", "/f"], b"data"),
        (&["cp", &local, ":/f"], b""),
        (&["cp", ":/f", &dl], b""),
    ] {
        let out = run_within(host.kitepipe(&["--timeout", "2s"], args), stdin, bounded());
        assert_eq!(out.code, Some(124), "{args:?}: {}", out.text());
        out.assert_stderr_has("timed out", &format!("{args:?}"));
    }
    assert_eq!(temp_files(host.dir.path()), Vec::<String>::new());
    assert!(!Path::new(&dl).exists());
}

// Case 21: a download cut midway (the host falls silent, resets the stream,
// or the user interrupts kitepipe) leaves no `.NAME.kitepipe-*` behind.
#[test]
fn interrupted_download_leaves_no_temp_file() {
    for (host, code) in [(Host::CutReadSilent, 124), (Host::CutReadReset, 255)] {
        let fake = FakeHost::start(host);
        let dest = fake.dir.path().join("dl");
        let out = run_within(
            fake.kitepipe(
                &["--timeout", "2s"],
                &["cp", ":/big", &dest.display().to_string()],
            ),
            b"",
            bounded(),
        );
        assert_eq!(out.code, Some(code), "{host:?}: {}", out.text());
        assert_eq!(
            temp_files(fake.dir.path()),
            Vec::<String>::new(),
            "{host:?}"
        );
        assert!(!dest.exists(), "{host:?}");
    }

    // Interrupted by the user (SIGINT, then SIGTERM) while the data stalls.
    for (signal, code) in [("-INT", 130), ("-TERM", 143)] {
        let fake = FakeHost::start(Host::CutReadSilent);
        let dest = fake.dir.path().join("dl");
        let mut child = fake
            .kitepipe(
                &["--timeout", "600s"],
                &["cp", "--quiet", ":/big", &dest.display().to_string()],
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        eventually("the download's temporary file", || {
            (!temp_files(fake.dir.path()).is_empty()).then_some(())
        });
        // The first MiB has arrived (or soon will); interrupt.
        let _ = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status();
        let status = eventually("kitepipe to exit after the signal", || {
            child.try_wait().unwrap()
        });
        assert_eq!(status.code(), Some(code), "{signal}: {status}");
        assert_eq!(
            temp_files(fake.dir.path()),
            Vec::<String>::new(),
            "{signal}"
        );
        assert!(!dest.exists(), "{signal}");
    }
}

/// A fake ssh that runs the real bootstrap locally: the remote command is
/// its last argument, run by `sh -c` with the environment `env` sets up.
fn local_ssh(dir: &Path, env: &str) -> PathBuf {
    let ssh = dir.join("local-ssh");
    write_script(
        &ssh,
        &format!(
            "#!/bin/sh\n\
             for last; do :; done\n\
             exec env -u XDG_CACHE_HOME {env} sh -c \"$last\"\n"
        ),
    );
    ssh
}

fn agent_hash() -> String {
    sha256_hex(&std::fs::read(BIN).unwrap())
}

// Case 7: an executable planted at the cache path (right name, wrong
// contents) is not run; the real agent is pushed and replaces it.
#[test]
fn planted_cache_file_is_not_run() {
    let dir = TempDir::new("cache");
    let home = dir.path().join("home");
    let cache = home.join(".cache").join("kitepipe");
    std::fs::create_dir_all(&cache).unwrap();
    let hash = agent_hash();
    let planted = cache.join(format!("agent-{hash}"));
    let marker = dir.path().join("planted-ran");
    write_script(
        &planted,
        &format!("#!/bin/sh\ntouch {}\nexit 0\n", marker.display()),
    );
    let ssh = local_ssh(dir.path(), &format!("HOME={}", home.display()));
    let mut command = Command::new(BIN);
    command.arg("remote").arg("--ssh").arg(&ssh).args([
        "--cache",
        "fake-host",
        "exec",
        "-n",
        "--",
        "echo",
        "real",
    ]);
    let out = run_within(command, b"", bounded());
    assert!(!marker.exists(), "the planted file ran: {}", out.text());
    assert_eq!(out.code, Some(0), "{}", out.text());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "real\n");
    // The cache now holds the real agent, owner-only.
    let cached = std::fs::read(&planted).unwrap();
    assert_eq!(sha256_hex(&cached), hash, "the cache holds the real agent");
    let mode = std::fs::metadata(&planted).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}

// Case 7: a cache entry in a directory others may write is not trusted,
// even with the right contents (it could be swapped before it runs).
#[test]
fn loose_cache_directory_is_not_trusted() {
    let dir = TempDir::new("cache");
    let home = dir.path().join("home");
    let cache = home.join(".cache").join("kitepipe");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    let hash = agent_hash();
    let planted = cache.join(format!("agent-{hash}"));
    std::fs::copy(BIN, &planted).unwrap();
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o777)).unwrap();
    let ssh = local_ssh(dir.path(), &format!("HOME={}", home.display()));
    let mut command = Command::new(BIN);
    command
        .env("KITEPIPE_LOG", "kitepipe=debug")
        .arg("remote")
        .arg("--ssh")
        .arg(&ssh)
        .args(["--cache", "fake-host", "exec", "-n", "--", "echo", "real"]);
    let out = run_within(command, b"", bounded());
    assert_eq!(out.code, Some(0), "{}", out.text());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "real\n");
    // The bootstrap said why (kitepipe logs ssh's stderr at debug).
    out.assert_stderr_has("not using the agent cache", "");
    // Left as it was: neither run from there nor tightened behind the
    // owner's back (the session used a private temporary copy).
    let mode = std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o777);
}

// Case 7: with HOME unset there is no cache (never a shared /tmp/.cache).
#[test]
fn no_home_means_no_cache() {
    let dir = TempDir::new("nohome");
    let shared = Path::new("/tmp/.cache/kitepipe").join(format!("agent-{}", agent_hash()));
    if shared.exists() {
        // Left by an earlier run of the unfixed code as this user.
        let _ = std::fs::remove_file(&shared);
    }
    let ssh = local_ssh(dir.path(), "-u HOME");
    let mut command = Command::new(BIN);
    command.arg("remote").arg("--ssh").arg(&ssh).args([
        "--cache",
        "fake-host",
        "exec",
        "-n",
        "--",
        "echo",
        "real",
    ]);
    let out = run_within(command, b"", bounded());
    assert_eq!(out.code, Some(0), "{}", out.text());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "real\n");
    assert!(
        !shared.exists(),
        "the agent was cached in {}",
        shared.display()
    );
}

#[path = "../support/sshd.rs"]
mod sshd;

// Case 7 under a real OpenSSH server (skipped where sshd is missing, run
// in CI): the planted file at the cache path is not run, the real agent is
// pushed and replaces it.
#[test]
fn planted_cache_file_is_not_run_over_real_ssh() {
    if !sshd::required() {
        return;
    }
    let sshd = sshd::Sshd::new().start();
    let cache = sshd.home.join(".cache").join("kitepipe");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).unwrap();
    let hash = agent_hash();
    let planted = cache.join(format!("agent-{hash}"));
    let marker = sshd.dir.path().join("planted-ran");
    write_script(
        &planted,
        &format!("#!/bin/sh\ntouch {}\nexit 0\n", marker.display()),
    );
    let out = run_within(
        sshd.kitepipe_with(&["--cache"], &["exec", "-n", "--", "echo", "real"]),
        b"",
        scaled(Duration::from_secs(120)),
    );
    assert!(!marker.exists(), "the planted file ran: {}", out.text());
    assert_eq!(out.code, Some(0), "{}", out.text());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "real\n");
    assert_eq!(sha256_hex(&std::fs::read(&planted).unwrap()), hash);
}

// Case 7: a host that cannot compute a SHA-256 (no sha256sum, shasum or
// openssl) gets no cache: the agent is pushed as without --cache.
#[test]
fn no_hash_tool_means_no_cache() {
    let dir = TempDir::new("nohash");
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    // A PATH with the bootstrap's tools and nothing to hash with.
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for tool in [
        "sh", "uname", "head", "mktemp", "chmod", "rm", "mkdir", "mv", "ls", "id",
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .unwrap();
        let path = String::from_utf8_lossy(&found.stdout).trim().to_string();
        assert!(!path.is_empty(), "no {tool} here");
        std::os::unix::fs::symlink(path, bin.join(tool)).unwrap();
    }
    let ssh = local_ssh(
        dir.path(),
        &format!("HOME={} PATH={}", home.display(), bin.display()),
    );
    let mut command = Command::new(BIN);
    command
        .env("KITEPIPE_LOG", "kitepipe=debug")
        .arg("remote")
        .arg("--ssh")
        .arg(&ssh)
        .args([
            "--cache",
            "fake-host",
            "exec",
            "-n",
            "--",
            "/bin/echo",
            "real",
        ]);
    let out = run_within(command, b"", bounded());
    assert_eq!(out.code, Some(0), "{}", out.text());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "real\n");
    out.assert_stderr_has("no sha256sum, shasum or openssl", "");
    let cached = home
        .join(".cache/kitepipe")
        .join(format!("agent-{}", agent_hash()));
    assert!(!cached.exists(), "cached without a way to check it");
}
