//! Running kitepipe as an installed server: JSON logs and the log filter's
//! sources, systemd's readiness protocol (a datagram socket the test
//! binds as `NOTIFY_SOCKET`), `STATE_DIRECTORY`, shell completions and man
//! pages. The Debian package itself is checked by packaging/check-deb.

mod support;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::*;

const SECRET: &str = "install-test-secret";

fn domain() -> String {
    format!("http,tcp:*.example.net:{SECRET}")
}

/// A relay process started by hand (stderr into a file, so that the log
/// lines can be read apart from stdout), killed by PID on drop.
struct LoggingRelay {
    child: Child,
    stderr: std::path::PathBuf,
    _dir: TempDir,
}

impl LoggingRelay {
    /// Starts `kitepipe relay` on loopback with `args` and `env` (and no
    /// inherited KITEPIPE_LOG or RUST_LOG), and waits for its ready line.
    fn start(args: &[&str], env: &[(&str, &str)]) -> LoggingRelay {
        let dir = TempDir::new("install-logs");
        let stderr = dir.path().join("stderr");
        let mut command = Command::new(BIN);
        command
            .args(["relay", "--ready-json", "--listen", "127.0.0.1:0"])
            .args(["--http", "127.0.0.1:0", "--domain", &domain()])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(args)
            .env_remove("KITEPIPE_LOG")
            .env_remove("RUST_LOG")
            .env_remove("KITEPIPE_LOG_FORMAT")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap());
        let mut child = command.spawn().expect("start kitepipe relay");
        let stdout = child.stdout.take().unwrap();
        let mut relay = LoggingRelay {
            child,
            stderr,
            _dir: dir,
        };
        // The ready line is the relay's first stdout line; a relay that
        // exits first closes stdout, and the read ends.
        let mut stdout = BufReader::new(stdout);
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        if !first.starts_with("{\"ready\":\"relay\"") {
            let _ = relay.child.kill();
            panic!("relay did not start: {first:?}\n{}", relay.logs());
        }
        // The rest of stdout is drained (and ends with the process), so
        // that the relay's later lines find a reader.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        relay
    }

    /// Everything the relay wrote on stderr so far.
    fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Stops the relay (SIGTERM, so that its shutdown logs too), waits for
    /// it, and returns its stderr.
    fn stop(mut self) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        eventually("the relay to exit after SIGTERM", || {
            self.child.try_wait().unwrap().map(|_| ())
        });
        self.logs()
    }
}

impl Drop for LoggingRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `--log-format json`: every stderr line, start to shutdown, is one JSON
/// object with a level, a target and a message.
#[test]
fn json_logs_are_one_object_per_line() {
    let logs = LoggingRelay::start(&["--log-format", "json"], &[]).stop();
    let lines: Vec<&str> = logs.lines().collect();
    assert!(!lines.is_empty(), "no log lines at all");
    for line in &lines {
        let object: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|err| panic!("not a JSON line ({err}): {line:?}\n{logs}"));
        for field in ["timestamp", "level", "target", "message"] {
            assert!(
                object[field].is_string(),
                "no {field} in {line}\n(all logs: {logs})"
            );
        }
    }
    // And text is still the default: the same relay logs no JSON.
    let text = LoggingRelay::start(&[], &[]).stop();
    assert!(!text.is_empty());
    assert!(
        text.lines().all(|l| !l.starts_with('{')),
        "text logs by default:\n{text}"
    );
}

/// The filter's sources: RUST_LOG is honoured, and --log (or
/// KITEPIPE_LOG) wins over it. A relay starting with a fresh state dir
/// logs its new certificate at info.
#[test]
fn rust_log_is_honoured_and_log_flag_wins() {
    let info_lines = |logs: &str| {
        logs.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| l["level"] == "INFO")
            .count()
    };
    let json = ("KITEPIPE_LOG_FORMAT", "json");
    let default = LoggingRelay::start(&[], &[json]).stop();
    assert!(info_lines(&default) > 0, "info by default:\n{default}");

    let rust_log = LoggingRelay::start(&[], &[json, ("RUST_LOG", "warn")]).stop();
    assert_eq!(info_lines(&rust_log), 0, "RUST_LOG=warn:\n{rust_log}");
    assert!(rust_log.contains("\"WARN\""), "warnings still: {rust_log}");

    let flag = LoggingRelay::start(&["--log", "info"], &[json, ("RUST_LOG", "warn")]).stop();
    assert!(info_lines(&flag) > 0, "--log info beats RUST_LOG:\n{flag}");

    let variable =
        LoggingRelay::start(&[], &[json, ("RUST_LOG", "warn"), ("KITEPIPE_LOG", "info")]).stop();
    assert!(info_lines(&variable) > 0, "KITEPIPE_LOG beats RUST_LOG");

    // A RUST_LOG this filter cannot read is reported, not fatal.
    let bad = LoggingRelay::start(&[], &[json, ("RUST_LOG", "kitepipe[span]=x")]).stop();
    assert!(bad.contains("ignoring RUST_LOG"), "{bad}");
    assert!(info_lines(&bad) > 0, "falls back to info:\n{bad}");
}

/// A datagram socket standing in for systemd's notify socket.
struct NotifySocket {
    socket: UnixDatagram,
    dir: TempDir,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = TempDir::new("notify");
        let socket = UnixDatagram::bind(dir.path().join("notify")).unwrap();
        NotifySocket { socket, dir }
    }

    fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("notify")
    }

    /// The next message, or None after `wait`.
    fn recv(&self, wait: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(wait)).unwrap();
        let mut buf = vec![0u8; 4096];
        loop {
            return match self.socket.recv(&mut buf) {
                Ok(n) => Some(String::from_utf8(buf[..n].to_vec()).expect("UTF-8 message")),
                Err(err)
                    if matches!(
                        err.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    None
                }
                // A signal (the test's own children ending) interrupted the wait.
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => panic!("notify socket: {err} ({:?})", err.kind()),
            };
        }
    }

    /// The next message, which must come within patience.
    fn expect(&self, what: &str) -> String {
        self.recv(patience())
            .unwrap_or_else(|| panic!("no {what} on NOTIFY_SOCKET within {:?}", patience()))
    }
}

/// The relay says READY=1 once its listeners are bound (every address its
/// STATUS names accepts a connection at that moment), and STOPPING=1 on
/// SIGTERM.
#[test]
fn relay_notifies_systemd_when_bound_and_when_stopping() {
    let notify = NotifySocket::bind();
    let mut command = Command::new(BIN);
    let state = TempDir::new("notify-relay");
    command
        .args(["relay", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .args(["--domain", &domain(), "--state-dir", &path(state.path())])
        .env("NOTIFY_SOCKET", notify.path());
    let mut relay = Proc::spawn("relay", command);
    let ready = notify.expect("READY=1");
    let mut lines = ready.lines();
    assert_eq!(lines.next(), Some("READY=1"), "{ready:?}");
    let status = lines
        .next()
        .and_then(|l| l.strip_prefix("STATUS=serving on "))
        .unwrap_or_else(|| panic!("no STATUS after READY=1: {ready:?}"));
    let (addrs, fingerprint) = status
        .split_once("; fingerprint ")
        .unwrap_or_else(|| panic!("no fingerprint in the status: {status}"));
    assert!(fingerprint.starts_with("SHA256:"), "{status}");
    let addrs: Vec<&str> = addrs.split(", ").collect();
    assert_eq!(addrs.len(), 2, "links and HTTP: {status}");
    for addr in addrs {
        std::net::TcpStream::connect(addr)
            .unwrap_or_else(|err| panic!("{addr} not bound at READY=1: {err}"));
    }
    assert!(relay.exited().is_none());
    relay.terminate();
    let stopping = notify.expect("STOPPING=1");
    assert!(stopping.starts_with("STOPPING=1\n"), "{stopping:?}");
}

/// The connector says READY=1 only once a link is up: not while its relay
/// is unreachable, and as soon as the relay appears.
#[test]
fn connector_notifies_systemd_when_its_link_is_up() {
    // A relay started once to learn its fingerprint and port, then stopped.
    let state = TempDir::new("notify-relay-state");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let relay = Relay::new()
        .domain(&domain())
        .args(&["--listen", &listen])
        .state_dir(state.path())
        .start();
    let fingerprint = relay.fingerprint.clone();
    drop(relay);

    let notify = NotifySocket::bind();
    let mut command = Command::new(BIN);
    command
        .args([
            "connect",
            "--ready-json",
            &listen,
            "--fingerprint",
            &fingerprint,
        ])
        .args(["--secret", SECRET, "--name", "notify-test"])
        .args(["--kite", "tcp:echo.example.net:0=127.0.0.1:9"])
        .args(["--max-backoff", "200ms"])
        .env("NOTIFY_SOCKET", notify.path());
    let connector = Proc::spawn("connector", command);
    connector.wait_ready("connector", 1, |_| true);
    // Its attempts fail for these seconds: no readiness, no status.
    let early = notify.recv(Duration::from_secs(2));
    assert_eq!(early, None, "notified before any link was up");

    let _relay = Relay::new()
        .domain(&domain())
        .args(&["--listen", &listen])
        .state_dir(state.path())
        .start();
    let ready = notify.expect("READY=1");
    assert!(
        ready.starts_with("READY=1\nSTATUS=link to "),
        "{ready:?}\n{}",
        connector.output()
    );
    assert!(ready.ends_with(" up, 1 kites"), "{ready:?}");
    connector.wait_links_up(1);

    // SIGTERM: STOPPING=1 (after any status changes the shutdown causes).
    let mut connector = connector;
    connector.terminate();
    let mut messages = Vec::new();
    while let Some(message) = notify.recv(scaled(Duration::from_secs(5))) {
        let stopping = message.starts_with("STOPPING=1\n");
        messages.push(message);
        if stopping {
            return;
        }
    }
    panic!("no STOPPING=1 after SIGTERM: {messages:?}");
}

/// Without --state-dir, a relay under systemd keeps its state in
/// `$STATE_DIRECTORY` (what `StateDirectory=kitepipe` makes).
#[test]
fn relay_state_defaults_to_state_directory() {
    let dir = TempDir::new("state-directory");
    let state = dir.path().join("var-lib-kitepipe");
    std::fs::create_dir(&state).unwrap();
    let out = Command::new(BIN)
        .args(["config", "check", "relay"])
        .env_remove("KITEPIPE_STATE_DIR")
        .env("STATE_DIRECTORY", &state)
        .env("HOME", dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let toml = String::from_utf8(out.stdout).unwrap();
    assert!(
        toml.contains(&format!("state_dir = \"{}\"", state.display())),
        "{toml}"
    );
    // And the relay really writes its certificate there.
    let mut command = Command::new(BIN);
    command
        .args(["relay", "--ready-json", "--listen", "127.0.0.1:0"])
        .args(["--http", "127.0.0.1:0", "--domain", &domain()])
        .env_remove("KITEPIPE_STATE_DIR")
        .env("STATE_DIRECTORY", &state)
        .env("HOME", dir.path());
    let relay = Proc::spawn("relay", command);
    relay.wait_ready("relay", 1, |_| true);
    let files: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        files.iter().any(|f| f == "relay-cert.pem"),
        "no certificate in STATE_DIRECTORY: {files:?}"
    );
    assert!(!dir.path().join(".local").exists(), "used HOME instead");
}

/// `kitepipe completions SHELL` prints a script for each shell, and bash
/// parses its own.
#[test]
fn completions_for_bash_zsh_fish() {
    for (shell, marker) in [
        ("bash", "complete -F _kitepipe"),
        ("zsh", "#compdef kitepipe"),
        ("fish", "complete -c kitepipe"),
    ] {
        let script = kitepipe_ok(&["completions", shell]);
        assert!(script.contains(marker), "{shell}: no {marker:?}");
        assert!(script.contains("relay"), "{shell}: no subcommands");
    }
    if !require_tool("bash", "bash") {
        return;
    }
    let dir = TempDir::new("completions");
    let file = dir.path().join("kitepipe.bash");
    std::fs::write(&file, kitepipe_ok(&["completions", "bash"])).unwrap();
    let check = Command::new("bash").arg("-n").arg(&file).output().unwrap();
    assert!(check.status.success(), "bash -n: {check:?}");
    // Sourced, it completes the subcommands.
    let complete = Command::new("bash")
        .arg("-c")
        .arg(format!(
            ". {} && COMP_WORDS=(kitepipe re) COMP_CWORD=1 && _kitepipe kitepipe re kitepipe \
             && printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            file.display()
        ))
        .output()
        .unwrap();
    let words = String::from_utf8_lossy(&complete.stdout);
    assert!(
        words.lines().any(|w| w == "relay") && words.lines().any(|w| w == "remote"),
        "completing 're': {words:?} {}",
        String::from_utf8_lossy(&complete.stderr)
    );
    // Bad shells are refused with a usage error.
    let bad = Command::new(BIN)
        .args(["completions", "powershell-ish"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

/// `kitepipe man DIR` writes kitepipe.1 and a page per subcommand, and
/// man renders them.
#[test]
fn man_pages_render() {
    let dir = TempDir::new("man");
    kitepipe_ok(&["man", &path(dir.path())]);
    for page in [
        "kitepipe.1",
        "kitepipe-relay.1",
        "kitepipe-connect.1",
        "kitepipe-ca-issue.1",
    ] {
        assert!(dir.path().join(page).exists(), "no {page}");
    }
    assert!(
        !dir.path().join("kitepipe-agent.1").exists(),
        "the hidden agent has no page"
    );
    if !require_tool("man", "man-db") || !require_tool("groff", "groff-base") {
        return;
    }
    for (page, expect) in [
        ("kitepipe.1", "Make machines behind NAT"),
        ("kitepipe-relay.1", "--state-dir"),
    ] {
        let out = Command::new("man")
            .arg("-l")
            .arg(dir.path().join(page))
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "man -l {page}: {out:?}");
        // man renders hyphens as U+2010 on UTF-8 terminals; compare the ASCII.
        let text = text.replace('\u{2010}', "-");
        assert!(text.contains(expect), "{page} lacks {expect:?}:\n{text}");
    }
}
