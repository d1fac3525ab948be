//! Fixtures for end-to-end tests of the `kitepipe` binary: real processes on
//! loopback (or in netlab namespaces), each in a fresh temp dir, stopped by
//! PID when the fixture drops.
//!
//! ```ignore
//! let relay = Relay::new().domain("http,tcp:*.example.net:s3cret").start();
//! let conn = Connector::new(&relay).secret("s3cret-for-tests-1").kite("http:blog.example.net=127.0.0.1:8000").start();
//! ```
#![allow(dead_code, unreachable_pub)]
// Test processes are real and so is their time: these waits measure the
// wall clock on purpose (the library itself only uses tokio's clock).
#![allow(clippy::disallowed_methods)]

pub mod pebble;

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_kitepipe");

/// How to install every tool the tests run, for messages about a missing one.
pub const DEPS_HINT: &str = "the tests' tools: sudo apt-get install $(cat tools/test-deps.txt)";

/// How long to wait for things that should happen "soon" (a process being
/// ready, a link coming back). `KITEPIPE_TEST_PATIENCE` (seconds) raises it
/// on slow machines.
pub fn patience() -> Duration {
    let secs = std::env::var("KITEPIPE_TEST_PATIENCE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_PATIENCE_SECS);
    Duration::from_secs(secs)
}

/// The default of [`patience`], in seconds: the bounds tests write are
/// for a machine this patient.
const DEFAULT_PATIENCE_SECS: u64 = 30;

/// `bound` (an upper bound on how long something may take, as a test
/// writes it) scaled like [`patience`]: unchanged by default, twice as
/// long with `KITEPIPE_TEST_PATIENCE=60`.
pub fn scaled(bound: Duration) -> Duration {
    bound.mul_f64(patience().as_secs_f64() / DEFAULT_PATIENCE_SECS as f64)
}

/// Polls `check` until it returns `Some`, or panics after [`patience`].
/// The one place tests poll; use it only when there is no event to await.
pub fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + patience();
    loop {
        if let Some(value) = check() {
            return value;
        }
        if std::time::Instant::now() > deadline {
            panic!("timed out after {:?} waiting for: {what}", patience());
        }
        std::thread::park_timeout(Duration::from_millis(50));
    }
}

/// Whether this machine has `tool` (a command on `PATH`, or an absolute
/// path), which Debian ships in `package`. When it does not, the test
/// cannot run: this says so on the terminal (past the test harness's
/// capture, so a plain `cargo test` shows it) naming the test, the tool and
/// how to get it, and returns false for the test to return early. With `CI`
/// set it fails the test instead: CI installs every tool
/// (tools/test-deps.txt), so a missing one there is a bug.
///
/// ```ignore
/// if !require_tool("/usr/sbin/sshd", "openssh-server") {
///     return;
/// }
/// ```
pub fn require_tool(tool: &str, package: &str) -> bool {
    let found = if tool.starts_with('/') {
        Path::new(tool).exists()
    } else {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|out| out.status.success())
    };
    found
        || cannot_run(&format!(
            "needs {tool}, which is not installed: sudo apt-get install {package} \
             (every test package: sudo apt-get install $(cat tools/test-deps.txt))"
        ))
}

/// Whether this machine's `python3` can import `module`, which PyPI ships
/// as `package`; otherwise like a missing tool in [`require_tool`].
pub fn require_python_module(module: &str, package: &str) -> bool {
    let found = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|out| out.status.success());
    found
        || cannot_run(&format!(
            "needs the Python module {module}, which is not installed: \
             python3 -m pip install {package} (.ci/run installs it)"
        ))
}

/// Whether the test runs as root (network namespaces, other users'
/// files, sudo); otherwise like a missing tool in [`require_tool`]: said
/// on the terminal, or a failure with `CI` set.
pub fn require_root(what: &str) -> bool {
    is_root()
        || cannot_run(&format!(
            "needs root for {what}: run the tests as root (e.g. sudo -E cargo test)"
        ))
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Reports that the current test cannot run, `why`; returns false, or
/// panics with `CI` set.
fn cannot_run(why: &str) -> bool {
    let thread = std::thread::current();
    let test = match thread.name() {
        Some(name) if name != "main" => name,
        _ => "a test",
    };
    if std::env::var_os("CI").is_some() {
        panic!("{test} {why} (CI installs every tool: .ci/run)");
    }
    // Straight to the stderr handle rather than `eprintln!`, which the
    // test harness captures and shows only for failing tests.
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "NOT RUN {test}: {why}");
    false
}

/// A fresh temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("kitepipe-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running process whose stdout and stderr are collected; killed (by PID)
/// when dropped.
pub struct Proc {
    pub name: String,
    child: Mutex<Option<Child>>,
    pid: u32,
    output: Arc<Mutex<String>>,
}

impl Proc {
    /// Spawns `program args...` with stdout and stderr captured.
    pub fn spawn(name: &str, mut command: Command) -> Proc {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("KITEPIPE_LOG", "info,kitepipe=debug")
            // Relays and connectors say when they are ready in JSON lines
            // (`--ready-json`), which the fixtures wait on.
            .env("KITEPIPE_READY_JSON", "1");
        let mut child = command
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {name}: {err} ({DEPS_HINT})"));
        let output = Arc::new(Mutex::new(String::new()));
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let mut out = output.lock().unwrap();
                    out.push_str(&line);
                    out.push('\n');
                }
            });
        }
        Proc {
            name: name.to_string(),
            pid: child.id(),
            child: Mutex::new(Some(child)),
            output,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Everything the process printed so far (stdout and stderr interleaved by line).
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Waits until the output contains `needle`; returns the output.
    pub fn wait_for(&self, needle: &str) -> String {
        self.wait_for_count(needle, 1)
    }

    /// Waits until `needle` occurs at least `count` times in the output.
    pub fn wait_for_count(&self, needle: &str, count: usize) -> String {
        eventually(
            &format!("{} to print {needle:?} x{count}", self.name),
            || {
                let out = self.output();
                if out.matches(needle).count() >= count {
                    return Some(out);
                }
                if let Some(status) = self.exited() {
                    panic!(
                        "{} exited ({status}) before printing {needle:?}:\n{out}",
                        self.name
                    );
                }
                None
            },
        )
    }

    /// The `--ready-json` lines (crates/cli/src/ready.rs) printed so far,
    /// parsed, in order: the machine-readable readiness of a relay or a
    /// connector, which tests wait on instead of log text.
    pub fn ready_lines(&self) -> Vec<serde_json::Value> {
        self.output()
            .lines()
            .filter(|l| l.starts_with("{\"ready\":"))
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|err| panic!("bad ready line {l:?}: {err}"))
            })
            .collect()
    }

    /// Waits until `count` ready lines of kind `ready` (and matching
    /// `also`) were printed; returns the `count`-th.
    pub fn wait_ready(
        &self,
        ready: &str,
        count: usize,
        also: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        self.wait_ready_where(&format!("ready {ready:?}"), count, |l| {
            l["ready"] == ready && also(l)
        })
    }

    /// Waits until `count` ready lines matching `pick` (described as
    /// `what`) were printed; returns the `count`-th.
    pub fn wait_ready_where(
        &self,
        what: &str,
        count: usize,
        pick: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        eventually(&format!("{} to say {what} x{count}", self.name), || {
            let lines: Vec<_> = self.ready_lines().into_iter().filter(&pick).collect();
            if lines.len() >= count {
                return lines.into_iter().nth(count - 1);
            }
            if let Some(status) = self.exited() {
                panic!(
                    "{} exited ({status}) before saying {what} x{count}:\n{}",
                    self.name,
                    self.output()
                );
            }
            None
        })
    }

    /// How many times a connector's links came up (to any relay) so far:
    /// each registration a relay confirmed.
    pub fn links_up(&self) -> usize {
        self.count_links("up")
    }

    /// How many times a connector's links were lost so far.
    pub fn links_down(&self) -> usize {
        self.count_links("down")
    }

    fn count_links(&self, state: &str) -> usize {
        self.ready_lines()
            .iter()
            .filter(|l| l["ready"] == "link" && l["state"] == state)
            .count()
    }

    /// Waits until a connector's links came up `count` times in all.
    pub fn wait_links_up(&self, count: usize) -> serde_json::Value {
        self.wait_ready("link", count, |l| l["state"] == "up")
    }

    /// Waits until a link came up with a kite whose name (`tcp:NAME:PORT`,
    /// `http:NAME`) matches `pick`; returns that name.
    pub fn wait_kite_online(&self, what: &str, pick: impl Fn(&str) -> bool) -> String {
        let kite_of = |line: &serde_json::Value| -> Option<String> {
            line["kites"].as_array()?.iter().find_map(|k| {
                let kite = k["kite"].as_str()?;
                pick(kite).then(|| kite.to_string())
            })
        };
        let line = self.wait_ready("link", 1, |l| l["state"] == "up" && kite_of(l).is_some());
        kite_of(&line).unwrap_or_else(|| panic!("{what} in {line}"))
    }

    /// The public port a relay gave the TCP kite `name`, as the connector
    /// said when the kite came online (the first time).
    pub fn tcp_kite_port(&self, name: &str) -> u16 {
        let prefix = format!("tcp:{name}:");
        let kite = self.wait_kite_online(&prefix, |k| k.starts_with(&prefix));
        kite[prefix.len()..]
            .parse()
            .unwrap_or_else(|_| panic!("no port in {kite:?}"))
    }

    /// Waits until a connector's links were lost `count` times in all.
    pub fn wait_links_down(&self, count: usize) -> serde_json::Value {
        self.wait_ready("link", count, |l| l["state"] == "down")
    }

    /// How many times `needle` occurs in the output so far.
    pub fn count(&self, needle: &str) -> usize {
        self.output().matches(needle).count()
    }

    /// The exit status, if the process has exited.
    pub fn exited(&self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.lock().unwrap();
        child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Number of open file descriptors of the process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Resident memory in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Waits up to `bound` for the process to exit by itself; its status,
    /// or `None` if it still runs.
    pub fn wait_exit(&self, bound: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + bound;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::park_timeout(Duration::from_millis(50));
        }
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits (up to patience) for a clean exit; returns the status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self
            .child
            .lock()
            .unwrap()
            .take()
            .expect("process still running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + patience();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "{} did not exit after SIGTERM:\n{}",
                    self.name,
                    self.output()
                );
            }
            std::thread::park_timeout(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("----- output of {} -----\n{}", self.name, self.output());
        }
    }
}

/// A free TCP port on 127.0.0.1 (bound then released; for processes that
/// must be told a port up front, e.g. a relay restarted on the same port).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Builder for a relay process.
pub struct Relay {
    args: Vec<String>,
    prefix: Vec<String>,
    state: Option<PathBuf>,
}

/// A running relay.
pub struct RelayProc {
    pub proc: Proc,
    pub fingerprint: String,
    pub link: SocketAddr,
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    /// The event gateway, when it listens on TCP.
    pub gateway: Option<SocketAddr>,
    pub state: Arc<TempDir>,
    /// The state dir the relay runs with (`state`, or the one it was given).
    pub state_path: PathBuf,
}

impl Relay {
    pub fn new() -> Relay {
        Relay {
            args: Vec::new(),
            prefix: Vec::new(),
            state: None,
        }
    }

    /// Runs the relay through a wrapper (e.g. `netlab exec ID relay --`).
    pub fn wrapped(mut self, prefix: &[&str]) -> Relay {
        self.prefix = prefix.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn arg(mut self, arg: &str) -> Relay {
        self.args.push(arg.to_string());
        self
    }

    pub fn args(mut self, args: &[&str]) -> Relay {
        self.args.extend(args.iter().map(|s| s.to_string()));
        self
    }

    pub fn domain(self, spec: &str) -> Relay {
        self.args(&["--domain", spec])
    }

    /// Reuse a state dir (same certificate across restarts).
    pub fn state_dir(mut self, dir: &Path) -> Relay {
        self.state = Some(dir.to_path_buf());
        self
    }

    /// Starts with defaults for loopback: links and HTTP on 127.0.0.1:0,
    /// TCP kites bound to 127.0.0.1, unless the args say otherwise.
    pub fn start(self) -> RelayProc {
        let has = |flag: &str| self.args.iter().any(|a| a == flag);
        let mut args = self.args.clone();
        if !has("--listen") {
            args.extend(["--listen".into(), "127.0.0.1:0".into()]);
        }
        if !has("--http") && !has("--https") {
            args.extend(["--http".into(), "127.0.0.1:0".into()]);
        }
        if !has("--tcp-bind") {
            args.extend(["--tcp-bind".into(), "127.0.0.1".into()]);
        }
        let state = Arc::new(TempDir::new("relay"));
        let state_path = self
            .state
            .clone()
            .unwrap_or_else(|| state.path().to_path_buf());
        let mut command = if self.prefix.is_empty() {
            Command::new(BIN)
        } else {
            let mut c = Command::new(&self.prefix[0]);
            c.args(&self.prefix[1..]).arg(BIN);
            c
        };
        command
            .args(["relay", "--ready-json"])
            .args(&args)
            .arg("--state-dir")
            .arg(&state_path)
            .current_dir(state.path());
        let proc = Proc::spawn("relay", command);
        let ready = proc.wait_ready("relay", 1, |_| true);
        let first = |role: &str| {
            ready[role]
                .get(0)
                .and_then(|addr| addr.as_str()?.parse::<SocketAddr>().ok())
        };
        RelayProc {
            link: first("listen").expect("relay says its link address"),
            http: first("http"),
            https: first("https"),
            gateway: ready["gateway"].as_str().and_then(|g| g.parse().ok()),
            fingerprint: ready["fingerprint"]
                .as_str()
                .expect("relay says its fingerprint")
                .to_string(),
            proc,
            state,
            state_path,
        }
    }
}

impl RelayProc {
    /// The gateway's owner token (written by the relay at start), as the
    /// `X-Kitepipe-Token: ...` header its gateway requires.
    pub fn token_header(&self) -> String {
        let token = std::fs::read_to_string(self.state_path.join("gateway-token"))
            .expect("the relay writes its gateway token into its state dir");
        format!("X-Kitepipe-Token: {}", token.trim())
    }

    /// Base URL of the HTTP listener.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http.expect("relay has an HTTP listener"))
    }
}

/// Builder for a connector process.
pub struct Connector {
    relays: Vec<String>,
    fingerprint: Option<String>,
    args: Vec<String>,
    prefix: Vec<String>,
}

impl Connector {
    /// A connector linking to `relay`, pinning its fingerprint.
    pub fn new(relay: &RelayProc) -> Connector {
        Connector {
            relays: vec![relay.link.to_string()],
            fingerprint: Some(relay.fingerprint.clone()),
            args: Vec::new(),
            prefix: Vec::new(),
        }
    }

    /// A connector linking to a relay at `addr` with a known fingerprint.
    pub fn to(addr: &str, fingerprint: &str) -> Connector {
        Connector {
            relays: vec![addr.to_string()],
            fingerprint: Some(fingerprint.to_string()),
            args: Vec::new(),
            prefix: Vec::new(),
        }
    }

    pub fn also_relay(mut self, addr: &str) -> Connector {
        self.relays.push(addr.to_string());
        self
    }

    pub fn no_fingerprint(mut self) -> Connector {
        self.fingerprint = None;
        self
    }

    pub fn wrapped(mut self, prefix: &[&str]) -> Connector {
        self.prefix = prefix.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn secret(self, secret: &str) -> Connector {
        self.args(&["--secret", secret])
    }

    pub fn kite(self, spec: &str) -> Connector {
        self.args(&["--kite", spec])
    }

    pub fn arg(mut self, arg: &str) -> Connector {
        self.args.push(arg.to_string());
        self
    }

    pub fn args(mut self, args: &[&str]) -> Connector {
        self.args.extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// Starts the process without waiting for anything.
    pub fn spawn(self) -> Proc {
        let mut command = if self.prefix.is_empty() {
            Command::new(BIN)
        } else {
            let mut c = Command::new(&self.prefix[0]);
            c.args(&self.prefix[1..]).arg(BIN);
            c
        };
        command.args(["connect", "--ready-json"]).args(&self.relays);
        if let Some(fp) = &self.fingerprint {
            command.args(["--fingerprint", fp]);
        }
        command.args(&self.args);
        if !self.args.iter().any(|a| a == "--name") {
            command.args(["--name", "test-connector"]);
        }
        Proc::spawn("connector", command)
    }

    /// Starts and waits until the first relay confirmed the registration.
    pub fn start(self) -> Proc {
        let proc = self.spawn();
        proc.wait_links_up(1);
        proc
    }
}

/// The event gateway's TCP address a relay or connector said at start
/// (its ready line; the process runs with `--ready-json`).
pub fn gateway_of(proc: &Proc) -> SocketAddr {
    let ready = proc.wait_ready_where("its start", 1, |l| {
        l["ready"] == "relay" || l["ready"] == "connector"
    });
    ready["gateway"]
        .as_str()
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("{} has no TCP gateway: {ready}", proc.name))
}

/// Runs curl with `args`; returns (exit status code, stdout bytes, stderr).
pub fn curl(args: &[&str]) -> (i32, Vec<u8>, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60", "--noproxy", "*"])
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run curl: {err} ({DEPS_HINT})"));
    (
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs curl and returns stdout as a string, asserting success.
pub fn curl_ok(args: &[&str]) -> String {
    let (code, out, err) = curl(args);
    assert_eq!(code, 0, "curl {args:?} failed: {err}");
    String::from_utf8_lossy(&out).into_owned()
}

/// Path of the Python test backend (HTTP, WebSocket and TCP services).
pub fn backend_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/backend.py")
}

/// A Python backend started by the test: `mode` is `http` or `tcp-echo`.
/// Prints `READY <port>` when listening on 127.0.0.1 (or `--bind`).
pub struct Backend {
    pub proc: Proc,
    pub port: u16,
}

impl Backend {
    pub fn start(mode: &str) -> Backend {
        Backend::start_wrapped(mode, &[], "127.0.0.1")
    }

    pub fn start_wrapped(mode: &str, prefix: &[&str], bind: &str) -> Backend {
        let mut command = if prefix.is_empty() {
            Command::new("python3")
        } else {
            let mut c = Command::new(prefix[0]);
            c.args(&prefix[1..]).arg("python3");
            c
        };
        command
            .arg("-u")
            .arg(backend_script())
            .arg(mode)
            .args(["--bind", bind]);
        let proc = Proc::spawn(&format!("backend-{mode}"), command);
        let out = proc.wait_for("READY ");
        let port = out
            .lines()
            .find_map(|l| l.strip_prefix("READY "))
            .and_then(|p| p.trim().parse().ok())
            .expect("backend prints its port");
        Backend { proc, port }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// SHA-256 of `data`, lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Deterministic pseudo-random bytes.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A directory of handler executables: `(name, shell script body)`, each
/// written as `#!/bin/sh` with mode 0755.
pub fn handlers(tag: &str, scripts: &[(&str, &str)]) -> TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new(tag);
    for (name, body) in scripts {
        let file = dir.path().join(name);
        std::fs::write(&file, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

/// A gate for handler scripts, so a test orders events by what it sees
/// rather than by sleeping: a script made by [`Gate::script`] marks that
/// it started, then waits until the test calls [`Gate::open`] (or gives
/// up after twice the patience, so a failed test leaves nothing behind).
pub struct Gate {
    dir: TempDir,
}

impl Gate {
    pub fn new(tag: &str) -> Gate {
        Gate {
            dir: TempDir::new(tag),
        }
    }

    /// Shell lines for a handler named `name`: mark the start, wait for
    /// the gate.
    pub fn script(&self, name: &str) -> String {
        let dir = self.dir.path().display();
        let polls = patience().as_secs() * 2 * 20;
        format!(
            ": > '{dir}/started-{name}-'$$\n\
             i=0; while [ ! -e '{dir}/open' ] && [ $i -lt {polls} ]; do sleep 0.05; i=$((i+1)); done"
        )
    }

    /// Waits until handlers named `name` started `count` times in all.
    pub fn wait_started(&self, name: &str, count: usize) {
        let prefix = format!("started-{name}-");
        eventually(&format!("handler {name} to start x{count}"), || {
            let started = std::fs::read_dir(self.dir.path())
                .map(|d| {
                    d.filter_map(Result::ok)
                        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                        .count()
                })
                .unwrap_or(0);
            (started >= count).then_some(())
        });
    }

    /// Lets every waiting (and later) script go on.
    pub fn open(&self) {
        std::fs::write(self.dir.path().join("open"), b"").unwrap();
    }
}

/// How many TCP connections to `port` on this machine the server side
/// holds (established, IPv4 and IPv6), from /proc/net: a sign that a
/// client's request reached a listener, when there is no log line for it.
pub fn connections_to(port: u16) -> usize {
    let port = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|file| std::fs::read_to_string(file).ok())
        .map(|table| {
            table
                .lines()
                .skip(1)
                .filter(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    // local_address is field 1, st (01 = established) field 3.
                    fields.len() > 3 && fields[1].ends_with(&port) && fields[3] == "01"
                })
                .count()
        })
        .sum()
}

/// A temp path as a command-line argument.
pub fn path(path: &Path) -> String {
    path.to_str().expect("temp paths are UTF-8").to_string()
}

/// Runs `kitepipe ARGS` with stdin closed, asserts it succeeded (showing
/// its stderr if not), returns its stdout.
pub fn kitepipe_ok(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run kitepipe");
    assert!(
        out.status.success(),
        "kitepipe {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A CA made by `kitepipe ca init` in a fresh directory (`ca` inside a
/// temp dir), issuing identities with `kitepipe ca issue`.
pub struct Ca {
    dir: TempDir,
}

impl Ca {
    pub fn init(tag: &str) -> Ca {
        let dir = TempDir::new(tag);
        kitepipe_ok(&["ca", "init", &path(&dir.path().join("ca"))]);
        Ca { dir }
    }

    /// The CA directory.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    /// The CA certificate, as a command-line argument.
    pub fn cert(&self) -> String {
        path(&self.dir().join("ca-cert.pem"))
    }

    /// Issues a certificate for `name` with extra `args`, asserts the CLI
    /// says so, and returns its identity directory.
    pub fn issue(&self, name: &str, args: &[&str]) -> PathBuf {
        let dir = self.dir();
        let mut all = vec!["ca", "issue", name, "--dir", dir.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = kitepipe_ok(&all);
        assert!(out.contains(&format!("issued {name} (serial ")), "{out}");
        dir.join("issued").join(name)
    }
}

/// Where Debian's nginx (`nginx-light`) is installed.
pub const NGINX: &str = "/usr/sbin/nginx";

/// A real nginx on `127.0.0.1:PORT` whose listener requires a PROXY
/// protocol header (v1 or v2, `listen ... proxy_protocol`) and answers
/// every HTTP request with what the header said:
/// `$proxy_protocol_addr:$proxy_protocol_port -> $proxy_protocol_server_addr:$proxy_protocol_server_port`.
/// With [`Nginx::proxy_protocol_tls`] the listener speaks TLS after the
/// header (the backend of an HTTPS kite). Its config, temp paths and logs
/// live in a fresh temp dir; it runs in the foreground as one process,
/// stopped by PID when dropped.
pub struct Nginx {
    pub proc: Proc,
    pub port: u16,
    dir: TempDir,
}

impl Nginx {
    /// Starts nginx and waits until it listens; `None` (said through
    /// [`require_tool`]) where nginx is not installed.
    pub fn proxy_protocol() -> Option<Nginx> {
        Nginx::start("")
    }

    /// Like [`Nginx::proxy_protocol`], serving TLS with the certificate
    /// chain `cert` and its key `key` (PEM files) after the header.
    pub fn proxy_protocol_tls(cert: &Path, key: &Path) -> Option<Nginx> {
        Nginx::start(&format!(
            " ssl;\n ssl_certificate {};\n ssl_certificate_key {}",
            path(cert),
            path(key)
        ))
    }

    /// `tls`: what follows `proxy_protocol` in the `listen` line.
    fn start(tls: &str) -> Option<Nginx> {
        if !require_tool(NGINX, "nginx-light") {
            return None;
        }
        let dir = TempDir::new("nginx");
        let root = path(dir.path());
        let port = free_port();
        let conf = format!(
            "daemon off;\n\
             master_process off;\n\
             pid {root}/nginx.pid;\n\
             error_log {root}/error.log info;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n\
                 log_format visitor '$proxy_protocol_addr:$proxy_protocol_port $status';\n\
                 access_log {root}/access.log visitor;\n\
                 client_body_temp_path {root}/body;\n\
                 proxy_temp_path {root}/proxy;\n\
                 fastcgi_temp_path {root}/fastcgi;\n\
                 uwsgi_temp_path {root}/uwsgi;\n\
                 scgi_temp_path {root}/scgi;\n\
                 server {{\n\
                     listen 127.0.0.1:{port} proxy_protocol{tls};\n\
                     default_type text/plain;\n\
                     location / {{\n\
                         return 200 \"$proxy_protocol_addr:$proxy_protocol_port -> \
                         $proxy_protocol_server_addr:$proxy_protocol_server_port\\n\";\n\
                     }}\n\
                 }}\n\
             }}\n"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let mut command = Command::new(NGINX);
        command
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(dir.path().join("error.log"));
        let proc = Proc::spawn("nginx", command);
        eventually("nginx to listen", || {
            if let Some(status) = proc.exited() {
                panic!(
                    "nginx exited ({status}):\n{}\n{}",
                    proc.output(),
                    std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
                );
            }
            listening_on(port).then_some(())
        });
        Some(Nginx { proc, port, dir })
    }

    /// `127.0.0.1:PORT`, the target of the kite in front of it.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// What nginx logged so far: its access log (one line per request,
    /// the PROXY header's source first) and its error log.
    pub fn logs(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.path().join(name));
        format!(
            "{}{}",
            read("access.log").unwrap_or_default(),
            read("error.log").unwrap_or_default()
        )
    }
}

/// Whether a socket on this machine listens on TCP `port` (IPv4 or IPv6),
/// from /proc/net: readiness of a server that prints nothing when ready.
pub fn listening_on(port: u16) -> bool {
    let port = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|file| std::fs::read_to_string(file).ok())
        .any(|table| {
            table.lines().skip(1).any(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                // local_address is field 1, st (0A = listen) field 3.
                fields.len() > 3 && fields[1].ends_with(&port) && fields[3] == "0A"
            })
        })
}

/// A connector linked to `relay` serving the kite `PROTOCOL:NAME` (`tcp`:
/// public port picked by the relay; `https`: the relay's HTTPS port) from
/// a `[[kite]]` table with `proxy_protocol = VERSION`, in front of
/// `target`, proving the name with `secret`. Returns it, the directory of
/// its config file, and the TCP kite's public port (0 for HTTPS).
pub fn proxy_protocol_kite(
    relay: &RelayProc,
    secret: &str,
    (protocol, name): (&str, &str),
    target: &str,
    version: &str,
) -> (Proc, TempDir, u16) {
    let port = if protocol == "tcp" { "port = 0\n" } else { "" };
    let dir = TempDir::new("proxy-protocol-kite");
    let file = dir.path().join("connector.toml");
    std::fs::write(
        &file,
        format!(
            "secret = {secret:?}\n\n\
             [[kite]]\n\
             name = {name:?}\n\
             protocol = {protocol:?}\n\
             {port}\
             target = {target:?}\n\
             proxy_protocol = {version:?}\n"
        ),
    )
    .expect("write the connector's config");
    let connector = Connector::new(relay)
        .args(&["--config", &path(&file)])
        .start();
    let port = match protocol {
        "tcp" => connector.tcp_kite_port(name),
        _ => 0,
    };
    (connector, dir, port)
}

/// A test CA and a certificate for some DNS names issued by it (ECDSA
/// P-256), as PEM files in a fresh temp dir: `ca.pem`, `cert.pem` (the
/// certificate, then the CA) and `key.pem` (mode 0600), for a relay's
/// `--tls-cert` and its visitors' `--cacert`.
pub struct TestCert {
    pub dir: TempDir,
    /// The CA certificate visitors trust.
    pub ca: PathBuf,
    /// The certificate chain.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// Base64 of the SHA-256 of the certificate's SubjectPublicKeyInfo
    /// (Chromium's `--ignore-certificate-errors-spki-list`).
    pub spki_sha256: String,
}

impl TestCert {
    pub fn new(names: &[&str]) -> TestCert {
        TestCert::issue(names, false)
    }

    /// Like [`TestCert::new`], valid only in 2020.
    pub fn expired(names: &[&str]) -> TestCert {
        TestCert::issue(names, true)
    }

    fn issue(names: &[&str], expired: bool) -> TestCert {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, PublicKeyData,
        };
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new("tls-cert");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "kitepipe test CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 12, 31);
        }
        params
            .distinguished_name
            .push(DnType::CommonName, names[0].as_str());
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let ca = dir.path().join("ca.pem");
        let cert_path = dir.path().join("cert.pem");
        let key_path = dir.path().join("key.pem");
        std::fs::write(&ca, ca_cert.pem()).unwrap();
        std::fs::write(&cert_path, format!("{}{}", cert.pem(), ca_cert.pem())).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let spki = ring::digest::digest(&ring::digest::SHA256, &key.subject_public_key_info());
        TestCert {
            dir,
            ca,
            cert: cert_path,
            key: key_path,
            spki_sha256: base64(spki.as_ref()),
        }
    }

    /// The relay's `--tls-cert` value, `CERT:KEY`.
    pub fn arg(&self) -> String {
        format!("{}:{}", path(&self.cert), path(&self.key))
    }
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The admin server's address a relay or connector said at start (its
/// ready line's `admin`; the process runs with `--ready-json` and `--admin`).
pub fn admin_of(proc: &Proc) -> SocketAddr {
    let ready = proc.wait_ready_where("its start", 1, |l| {
        l["ready"] == "relay" || l["ready"] == "connector"
    });
    ready["admin"]
        .as_str()
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("{} has no admin server: {ready}", proc.name))
}
