//! Attacker tests: the event gateways and the handlers behind them.
//!
//! Cases of the trust-model issue played here: 3 (a forged
//! `X-Kitepipe-Caller-Identity` reaching `--handler-upstream`), 4 (gateways
//! trusting anything that reaches them: local users on the relay host,
//! cross-origin web pages and DNS rebinding on connector hosts), 17 (handler
//! rules bypassed through dot-segments reaching the upstream), 22 (queued
//! handler runs outliving their callers; an unbounded wait queue) and 23 (a
//! stalled handler's process group killed by shelling out to `kill`).
// Real processes and real time: waits and durations are wall-clock here.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, SystemTime};

use crate::support::*;

const SECRET: &str = "gateway-attacker-secret";
const DOMAIN: &str = "http:*.example.net:gateway-attacker-secret";

/// Handler executables running at once on a node (pipe's
/// `MAX_RUNNING_EXECUTABLES`).
const SLOTS: usize = 256;
/// Events waiting for a slot (pipe's `MAX_QUEUED_EXECUTABLES`).
const QUEUE: usize = 256;

/// The connector's node name, proven by the secret of `*.example.net`.
const NODE: &str = "test-connector.example.net";

/// The relay's gateway token header.
const TOKEN_HEADER: &str = "X-Kitepipe-Token";

/// A connector holding a kite proven with the secret (which lets a link
/// without a certificate call the relay's handlers).
fn connector(relay: &RelayProc, args: &[&str]) -> Proc {
    Connector::new(relay)
        .secret(SECRET)
        .kite("http:laptop.example.net=127.0.0.1:9")
        .args(&["--name", NODE])
        .args(args)
        .start()
}

/// The relay's gateway token, as its owner reads it from the state dir.
fn token_of(relay: &RelayProc) -> String {
    std::fs::read_to_string(relay.state.path().join("gateway-token"))
        .expect("the relay writes its gateway token into its state dir")
        .trim()
        .to_string()
}

/// A raw HTTP/1.1 exchange: status, lowercase head, body.
fn raw(addr: SocketAddr, request: &str) -> (u16, String, String) {
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(patience())).unwrap();
    sock.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let _ = sock.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// `METHOD path` with `headers` (each `Name: value`), closing after it.
fn request_text(method: &str, target: &str, host: &str, headers: &[&str]) -> String {
    let mut text = format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for header in headers {
        text.push_str(header);
        text.push_str("\r\n");
    }
    text.push_str("Content-Length: 0\r\n\r\n");
    text
}

/// A Python HTTP server standing in for `--handler-upstream`: answers
/// every request with `{"path", "headers"}` as JSON and logs the same as
/// one line `SEEN {...}`.
struct Upstream {
    proc: Proc,
    port: u16,
    _dir: TempDir,
}

const UPSTREAM_PY: &str = r#"
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def answer(self):
        n = int(self.headers.get("content-length") or 0)
        if n:
            self.rfile.read(n)
        seen = {"path": self.path, "headers": [[k.lower(), v] for k, v in self.headers.items()]}
        body = json.dumps(seen).encode()
        print("SEEN " + json.dumps(seen), flush=True)
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_PUT = do_DELETE = answer
    def log_message(self, *args):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print("READY %d" % s.server_address[1], flush=True)
s.serve_forever()
"#;

impl Upstream {
    fn start() -> Upstream {
        let dir = TempDir::new("upstream");
        let script = dir.path().join("upstream.py");
        std::fs::write(&script, UPSTREAM_PY).unwrap();
        let mut command = Command::new("python3");
        command.arg("-u").arg(&script);
        let proc = Proc::spawn("upstream", command);
        let out = proc.wait_for("READY ");
        let port = out
            .lines()
            .find_map(|l| l.strip_prefix("READY "))
            .and_then(|p| p.trim().parse().ok())
            .expect("upstream prints its port");
        Upstream {
            proc,
            port,
            _dir: dir,
        }
    }

    /// Every request the upstream received so far, as JSON.
    /// Waits until the upstream logged `count` requests (its log line
    /// comes before its answer, but is read by another thread, so an answer
    /// can arrive here first); returns them all.
    fn wait_seen(&self, count: usize) -> Vec<serde_json::Value> {
        self.proc.wait_for_count("SEEN ", count);
        self.seen()
    }

    fn seen(&self) -> Vec<serde_json::Value> {
        self.proc
            .output()
            .lines()
            .filter_map(|l| l.strip_prefix("SEEN "))
            .map(|json| serde_json::from_str(json).expect("upstream logs JSON"))
            .collect()
    }
}

/// The values of header `name` in an upstream record.
fn header_values(seen: &serde_json::Value, name: &str) -> Vec<String> {
    seen["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|pair| pair[0] == name)
        .map(|pair| pair[1].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn forged_caller_identity_never_reaches_a_handler() {
    let upstream = Upstream::start();
    let dir = handlers(
        "identity-env",
        &[("get_env", "echo 'Content-Type: text/plain'\nenv")],
    );
    let relay = Relay::new()
        .domain(DOMAIN)
        .args(&[
            "--handler-upstream",
            &format!("http://127.0.0.1:{}", upstream.port),
            "--handlers",
            &path(dir.path()),
        ])
        .start();
    let conn = connector(&relay, &[]);
    let cgw = gateway_of(&conn);
    let forged = [
        "X-Kitepipe-Caller-Identity: admin",
        "X-Kitepipe-Caller: relay",
        "X-Kitepipe-Event: get_admin",
        "x-kitepipe-node: forged-node",
    ];
    let host = cgw.to_string();

    // The HTTP upstream sees the relay's own description of the caller,
    // once, and nothing the caller wrote in X-Kitepipe-*.
    let (status, _, body) = raw(cgw, &request_text("GET", "/server/whoami", &host, &forged));
    assert_eq!(status, 200, "{body}");
    let seen = upstream.wait_seen(1);
    assert_eq!(seen.len(), 1, "{seen:?}");
    let seen = &seen[0];
    assert_eq!(
        header_values(seen, "x-kitepipe-caller-identity"),
        Vec::<String>::new(),
        "{seen}"
    );
    assert_eq!(
        header_values(seen, "x-kitepipe-caller"),
        ["test-connector.example.net"],
        "{seen}"
    );
    assert_eq!(
        header_values(seen, "x-kitepipe-event"),
        ["get_whoami"],
        "{seen}"
    );
    assert!(header_values(seen, "x-kitepipe-node").is_empty(), "{seen}");
    assert!(!seen.to_string().contains("admin"), "{seen}");
    assert!(!seen.to_string().contains("forged"), "{seen}");

    // An executable's environment holds no caller-written X-Kitepipe-*.
    let (status, _, env) = raw(cgw, &request_text("GET", "/server/env", &host, &forged));
    assert_eq!(status, 200, "{env}");
    assert!(
        env.contains("KITEPIPE_CALLER=test-connector.example.net"),
        "{env}"
    );
    for line in env.lines() {
        assert!(
            !line.contains("admin") && !line.contains("forged"),
            "{line}"
        );
        assert!(!line.starts_with("KITEPIPE_HEADER_X_KITEPIPE"), "{line}");
    }
}

#[test]
fn cross_origin_and_rebinding_requests_reach_no_handler() {
    let marks = TempDir::new("origin-marks");
    let script = format!(
        ": > \"{}/mark-$KITEPIPE_NODE-$1\"\necho ok",
        path(marks.path())
    );
    let dir = handlers(
        "origin-handlers",
        &[("post_mark", &script), ("get_mark", &script)],
    );
    let relay = Relay::new()
        .domain(DOMAIN)
        .args(&["--handlers", &path(dir.path())])
        .start();
    let conn = connector(
        &relay,
        &[
            "--handlers",
            &path(dir.path()),
            "--gateway-origin",
            "http://localhost:3000",
        ],
    );
    let cgw = gateway_of(&conn);
    let rgw = relay.gateway.expect("the relay runs a gateway");
    let token = format!("{TOKEN_HEADER}: {}", token_of(&relay));
    let gateways = [
        (cgw, "/server/mark".to_string(), None),
        (
            rgw,
            "/client/test-connector.example.net/mark".to_string(),
            Some(token.as_str()),
        ),
    ];
    for (gw, target, token) in &gateways {
        let with = |extra: &[&str]| -> Vec<String> {
            token
                .iter()
                .map(|t| t.to_string())
                .chain(extra.iter().map(|e| e.to_string()))
                .collect()
        };
        let attacks: Vec<(&str, String, Vec<String>, &str)> = vec![
            // A web page POSTing cross-origin.
            (
                "POST",
                gw.to_string(),
                with(&["Origin: http://attacker.example"]),
                "origin",
            ),
            (
                "POST",
                gw.to_string(),
                with(&["Origin: null"]),
                "null-origin",
            ),
            // A page whose name now resolves to 127.0.0.1 (DNS rebinding).
            (
                "GET",
                format!("attacker.example:{}", gw.port()),
                with(&[]),
                "rebind",
            ),
            (
                "POST",
                format!("attacker.example:{}", gw.port()),
                with(&[]),
                "rebind-post",
            ),
            (
                "GET",
                "127.0.0.1.attacker.example".into(),
                with(&[]),
                "rebind-dotted",
            ),
            // A cross-site GET the browser sends without an Origin (an <img>).
            (
                "GET",
                gw.to_string(),
                with(&["Sec-Fetch-Site: cross-site"]),
                "no-cors",
            ),
        ];
        for (method, host, headers, tag) in attacks {
            let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
            let (status, _, body) = raw(
                *gw,
                &request_text(method, &format!("{target}//{tag}"), &host, &headers),
            );
            assert!(
                status == 403 || status == 421,
                "{method} {target} Host {host} {headers:?}: {status} {body}"
            );
        }
        // The owner's own requests still work.
        let headers: Vec<&str> = token.iter().copied().collect();
        let (status, _, body) = raw(
            *gw,
            &request_text("POST", &format!("{target}//owner"), "localhost", &headers),
        );
        assert_eq!(status, 200, "{body}");
        let host = gw.to_string();
        let (status, _, body) = raw(
            *gw,
            &request_text("GET", &format!("{target}//owner2"), &host, &headers),
        );
        assert_eq!(status, 200, "{body}");
    }
    // An Origin the operator allowed passes, whatever its case; the
    // relay's gateway, which allows none, still refuses it.
    let origin = "Origin: HTTP://Localhost:3000";
    let (status, _, body) = raw(
        cgw,
        &request_text("POST", "/server/mark//allowed", "localhost", &[origin]),
    );
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = raw(
        rgw,
        &request_text(
            "POST",
            "/client/test-connector.example.net/mark//allowed",
            "localhost",
            &[&token, origin],
        ),
    );
    assert_eq!(status, 403, "{body}");
    let mut marked: Vec<String> = std::fs::read_dir(marks.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    marked.sort();
    assert_eq!(
        marked,
        [
            "mark-localhost-allowed",
            "mark-localhost-owner",
            "mark-localhost-owner2",
            "mark-test-connector.example.net-owner",
            "mark-test-connector.example.net-owner2"
        ]
    );
}

#[test]
fn local_caller_without_the_token_gets_nothing_from_the_relay_gateway() {
    let relay = Relay::new()
        .domain(DOMAIN)
        .args(&["--remote", "test-connector.example.net:exec"])
        .start();
    let _conn = connector(&relay, &["--allow-remote", "exec"]);
    let rgw = relay.gateway.expect("the relay runs a gateway");
    let host = rgw.to_string();
    let token_file = relay.state.path().join("gateway-token");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "token file mode {mode:o}");
    }
    let token = token_of(&relay);
    assert_eq!(token.len(), 64, "{token}");

    let time = "/client/test-connector.example.net/time";
    let upgrade = ["Connection: Upgrade", "Upgrade: kitepipe-remote"];
    for headers in [
        vec![],
        vec![format!("{TOKEN_HEADER}: ")],
        vec![format!("{TOKEN_HEADER}: {}", "0".repeat(64))],
        vec![format!("{TOKEN_HEADER}: {}", &token[..63])],
        vec![format!("Authorization: Bearer {token}")],
    ] {
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        let (status, _, body) = raw(rgw, &request_text("GET", time, &host, &headers));
        assert_eq!(status, 401, "{headers:?}: {body}");
        let with_upgrade: Vec<&str> = headers.iter().chain(upgrade.iter()).copied().collect();
        let (status, _, body) = raw(
            rgw,
            &request_text(
                "GET",
                "/remote/test-connector.example.net",
                &host,
                &with_upgrade,
            ),
        );
        assert_eq!(status, 401, "{headers:?}: {body}");
    }
    let with_token = format!("{TOKEN_HEADER}: {token}");
    let (status, _, body) = raw(rgw, &request_text("GET", time, &host, &[&with_token]));
    assert_eq!(status, 200, "{body}");
    let (status, head, _) = raw(
        rgw,
        &request_text(
            "GET",
            "/remote/test-connector.example.net",
            &host,
            &[&with_token, upgrade[0], upgrade[1]],
        ),
    );
    assert_eq!(status, 101, "{head}");

    // The owner's tools find the token on their own.
    let gateway = rgw.to_string();
    let call = [
        "call",
        "GET",
        "client/test-connector.example.net/time",
        "--gateway",
        &gateway,
    ];
    kitepipe_ok(&call);
    let out = kitepipe_ok(&[
        "remote",
        "node:test-connector.example.net",
        "--gateway",
        &gateway,
        "exec",
        "--",
        "echo",
        "owner-ok",
    ]);
    assert_eq!(out.trim(), "owner-ok");
    // And so does an explicit --token-file.
    kitepipe_ok(&[&call[..], &["--token-file", &path(&token_file)]].concat());
}

#[test]
fn dot_segments_never_reach_the_upstream() {
    let upstream = Upstream::start();
    let ca = TempDir::new("dots-ca");
    let ca_dir = ca.path().join("ca");
    kitepipe_ok(&["ca", "init", &path(&ca_dir)]);
    kitepipe_ok(&["ca", "issue", "alpha", "--dir", &path(&ca_dir)]);
    let config = ca.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "client_ca = {:?}\nhandler_upstream = \"http://127.0.0.1:{}/api\"\n\
             [[allow]]\nidentity = \"alpha\"\nhandlers = [\"status\"]\n",
            path(&ca_dir.join("ca-cert.pem")),
            upstream.port
        ),
    )
    .unwrap();
    let relay = Relay::new().args(&["--config", &path(&config)]).start();
    let alpha = Connector::new(&relay)
        .args(&[
            "--identity",
            &path(&ca_dir.join("issued").join("alpha")),
            "--name",
            "alpha",
        ])
        .start();
    let gw = gateway_of(&alpha);
    let host = gw.to_string();
    for target in [
        "/server/status//../../admin/delete",
        "/server/status//%2e%2e/%2e%2e/admin/delete",
        "/server/status//%2E%2E/%2E%2E/admin/delete",
        "/server/status//.%2e/.%2E/admin/delete",
        "/server/status//..%2F..%2Fadmin%2Fdelete",
        "/server/status//x%2F..%2F..%2F..%2Fadmin",
        "/server/status//./admin",
        "/server/status//%2e",
        "/server/status//..;/admin",
        "/server/status//..%5C..%5Cadmin",
        "/server/status//ok/../../../admin/delete",
    ] {
        let (status, _, body) = raw(gw, &request_text("GET", target, &host, &[]));
        assert_eq!(status, 400, "{target}: {body}");
    }
    assert!(upstream.seen().is_empty(), "{:?}", upstream.seen());
    // The rule still refuses other handlers, and the allowed one works,
    // arriving under /api/status only.
    let (status, _, body) = raw(gw, &request_text("GET", "/server/admin/delete", &host, &[]));
    assert_eq!(status, 403, "{body}");
    let (status, _, body) = raw(
        gw,
        &request_text("GET", "/server/status//full/a%20b", &host, &[]),
    );
    assert_eq!(status, 200, "{body}");
    let seen = upstream.wait_seen(1);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["path"], "/api/status//full/a%20b");
    for seen in upstream.seen() {
        let path = seen["path"].as_str().unwrap();
        assert!(
            path.starts_with("/api/status") && !path.contains(".."),
            "{path}"
        );
    }
}

/// What one slow caller saw: its status (0: it hung up first), whether a
/// Retry-After came with it, and when it got it or gave up.
struct Outcome {
    status: u16,
    retry_after: bool,
    at: SystemTime,
}

#[test]
fn queued_handler_runs_never_outlive_their_callers() {
    const CALLERS: usize = 800;
    // Each caller gives up this long after sending: after its event's
    // timeout (2 s), before a queued event could start under the old
    // unbounded wait (a handler runs 6 s).
    let hang_up = Duration::from_secs(5);
    let marks = TempDir::new("queue-marks");
    // A handler that runs 6 s, showing progress every 1.5 s (so it is not
    // a stall): longer than the event timeout, so an event that does not
    // get one of the first slots cannot get one in time.
    let script = format!(
        ": > \"{}/start-$1\"\nfor i in 1 2 3 4; do echo .; sleep 1.5; done",
        path(marks.path())
    );
    let dir = handlers("queue-handlers", &[("post_slow", &script)]);
    let relay = Relay::new()
        .domain(DOMAIN)
        .args(&["--handlers", &path(dir.path()), "--event-timeout", "2s"])
        .start();
    let conn = connector(&relay, &["--event-timeout", "2s"]);
    let gw = gateway_of(&conn);
    let callers: Vec<_> = (0..CALLERS)
        .map(|id| {
            std::thread::spawn(move || {
                let request =
                    request_text("POST", &format!("/server/slow//{id}"), "127.0.0.1", &[]);
                let mut sock = TcpStream::connect(gw).unwrap();
                sock.write_all(request.as_bytes()).unwrap();
                sock.set_read_timeout(Some(hang_up)).unwrap();
                let mut answer = Vec::new();
                let _ = sock.read_to_end(&mut answer);
                // Hanging up (or having been answered) now.
                let at = SystemTime::now();
                drop(sock);
                let text = String::from_utf8_lossy(&answer).to_ascii_lowercase();
                let status = text
                    .split_whitespace()
                    .nth(1)
                    .and_then(|code| code.parse().ok())
                    .unwrap_or(0);
                (
                    id,
                    Outcome {
                        status,
                        retry_after: text.contains("\r\nretry-after:"),
                        at,
                    },
                )
            })
        })
        .collect();
    let outcomes: HashMap<usize, Outcome> =
        callers.into_iter().map(|t| t.join().unwrap()).collect();
    // Handler slots go to waiting events in order: once an event sent after
    // every caller is done has started, none of theirs still waits.
    let last = std::thread::spawn(move || {
        raw(
            gw,
            &request_text("POST", "/server/slow//last", "127.0.0.1", &[]),
        )
    });
    let (last_status, _, last_body) = last.join().unwrap();
    eventually("an event sent after every caller to start", || {
        marks.path().join("start-last").exists().then_some(())
    });
    let starts: HashMap<usize, SystemTime> = std::fs::read_dir(marks.path())
        .unwrap()
        .map(|e| e.unwrap())
        .filter_map(|e| {
            let id = e
                .file_name()
                .to_string_lossy()
                .strip_prefix("start-")?
                .parse()
                .ok()?;
            Some((id, e.metadata().unwrap().modified().unwrap()))
        })
        .collect();
    assert!(!starts.is_empty(), "no handler ran at all");
    // A queued event whose caller got its error or hung up never runs. The
    // node learns of a hang-up when the caller's reset arrives (a caller
    // may even hang up before its request was accepted): a handler may
    // start within this of the hang-up, and is stopped at once. Under an
    // unbounded queue they start rounds of 6 s later.
    let slack = scaled(Duration::from_secs(1));
    let late: Vec<_> = outcomes
        .iter()
        .filter(|(_, o)| o.status != 200)
        .filter_map(|(id, o)| {
            let started = starts.get(id)?;
            (*started > o.at + slack)
                .then(|| (*id, o.status, started.duration_since(o.at).unwrap()))
        })
        .collect();
    assert!(
        late.is_empty(),
        "{} handlers started after their callers gave up: {:?}",
        late.len(),
        &late[..late.len().min(5)]
    );
    let full = outcomes
        .values()
        .filter(|o| o.status == 503 && o.retry_after)
        .count();
    assert!(full > 0, "no caller was told the queue is full");
    assert!(
        starts.len() <= SLOTS + QUEUE,
        "{} handlers ran for {CALLERS} callers: the queue is not bounded",
        starts.len()
    );
    assert_eq!(last_status, 200, "{last_body}");
}

#[test]
fn stalled_handler_grandchild_dies_without_kill_on_path() {
    // A PATH with what the handler needs and no `kill`.
    let bin = TempDir::new("no-kill-bin");
    for tool in ["sh", "sleep"] {
        let found = ["/bin", "/usr/bin"]
            .iter()
            .map(|d| PathBuf::from(d).join(tool))
            .find(|p| p.exists())
            .expect("sh and sleep exist");
        std::os::unix::fs::symlink(found, bin.path().join(tool)).unwrap();
    }
    let pids = TempDir::new("grandchild-pid");
    let pid_file = pids.path().join("pid");
    let script = format!("sleep 61 &\necho $! > '{}'\nsleep 62", path(&pid_file));
    let dir = handlers("stall-handlers", &[("get_stall", &script)]);
    let path_var = format!("PATH={}", path(bin.path()));
    let relay = Relay::new()
        .wrapped(&["env", &path_var])
        .domain(DOMAIN)
        .args(&["--handlers", &path(dir.path()), "--event-timeout", "1s"])
        .start();
    let conn = connector(&relay, &[]);
    let gw = gateway_of(&conn);
    let (status, _, body) = raw(
        gw,
        &request_text("GET", "/server/stall", &gw.to_string(), &[]),
    );
    assert_eq!(status, 504, "{body}");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let alive = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(") ")
                    .map(|(_, rest)| !rest.starts_with('Z'))
            })
            .unwrap_or(false)
    };
    // Do not leave it behind if the assertion fails.
    struct KillOnDrop(i32);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            if let Some(pid) = rustix::process::Pid::from_raw(self.0) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
    let _guard = KillOnDrop(pid);
    eventually("the stalled handler's grandchild to die", || {
        (!alive(pid)).then_some(())
    });
}
