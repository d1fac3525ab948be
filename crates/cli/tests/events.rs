//! The event pipe end to end: real relay and connector processes, their
//! gateways reached with curl (and raw sockets for what curl will not
//! send), every handler kind on both sides, rules for connector-to-
//! connector events, a gigabyte each way with memory checked, 500 events
//! at once past a slow handler, a relay restart while requests wait, and
//! hostile input.
// Real processes and real time: waits and durations are wall-clock here.
#![allow(clippy::disallowed_methods)]

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

const SECRET: &str = "s3cret-for-tests-1";
const DOMAIN: &str = "http:*.example.net:s3cret-for-tests-1";

fn relay(args: &[&str]) -> RelayProc {
    remember(Relay::new().domain(DOMAIN).args(args).start())
}

/// Owner tokens of the relays started here, by their gateway's base URL:
/// the relay's gateway serves its owner only, so requests to it carry the
/// token (see [`with_token`]).
static TOKENS: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());

/// Notes `relay`'s gateway token.
fn remember(relay: RelayProc) -> RelayProc {
    if let Some(gateway) = relay.gateway {
        TOKENS
            .lock()
            .unwrap()
            .push((format!("http://{gateway}/"), relay.token_header()));
    }
    relay
}

/// `args` with the token header of the relay gateway a URL among them
/// goes to, if any.
fn with_token(args: &[&str]) -> Vec<String> {
    let tokens = TOKENS.lock().unwrap();
    let token = args.iter().find_map(|arg| {
        tokens
            .iter()
            .rev()
            .find(|(base, _)| arg.starts_with(base.as_str()))
            .map(|(_, header)| header.clone())
    });
    let mut all: Vec<String> = token
        .into_iter()
        .flat_map(|t| ["-H".to_string(), t])
        .collect();
    all.extend(args.iter().map(|a| a.to_string()));
    all
}

/// curl with the relay gateway's token where the URL needs it.
fn tcurl(args: &[&str]) -> (i32, Vec<u8>, String) {
    let args = with_token(args);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    curl(&args)
}

/// A connector holding a kite proven with the secret (which is what lets a
/// link without a certificate call the relay's handlers), named under the
/// secret's domain (so the secret proves the name, which then routes).
fn connector(relay: &RelayProc, args: &[&str]) -> Proc {
    Connector::new(relay)
        .secret(SECRET)
        .kite("http:laptop.example.net=127.0.0.1:9")
        .args(&["--name", "test-connector.example.net"])
        .args(args)
        .start()
}

/// A response as curl saw it.
struct Reply {
    status: u16,
    body: String,
    headers: String,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|err| panic!("not JSON ({err}): {:?}", self.body))
    }
}

/// curl `args` (plus a URL among them); status, headers and body.
fn request(args: &[&str]) -> Reply {
    let (code, out, err) = tcurl(&[&["-D", "/dev/stderr", "-w", "\n%{http_code}"], args].concat());
    assert_eq!(code, 0, "curl {args:?} failed: {err}");
    let text = String::from_utf8_lossy(&out).into_owned();
    let (body, status) = text.rsplit_once('\n').expect("curl printed the status");
    Reply {
        status: status.trim().parse().expect("a status code"),
        body: body.to_string(),
        headers: err.to_ascii_lowercase(),
    }
}

fn get(url: &str) -> Reply {
    request(&[url])
}

/// A relay on a fixed port and state directory, so that it can be killed
/// and started again where its connectors look for it.
struct RestartableRelay {
    listen: String,
    state: TempDir,
    args: Vec<String>,
}

impl RestartableRelay {
    fn new(tag: &str, args: &[&str]) -> RestartableRelay {
        RestartableRelay {
            listen: format!("127.0.0.1:{}", free_port()),
            state: TempDir::new(tag),
            args: args.iter().map(|a| a.to_string()).collect(),
        }
    }

    fn start(&self) -> RelayProc {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        remember(
            Relay::new()
                .domain(DOMAIN)
                .args(&["--listen", &self.listen])
                .args(&args)
                .state_dir(self.state.path())
                .start(),
        )
    }
}

/// Runs each curl argument list on its own thread; join for (status, body).
fn in_parallel(requests: Vec<Vec<String>>) -> Vec<std::thread::JoinHandle<(u16, String)>> {
    requests
        .into_iter()
        .map(|args| {
            std::thread::spawn(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let reply = request(&args);
                (reply.status, reply.body)
            })
        })
        .collect()
}

/// Peak resident memory of a process, in KiB.
fn peak_rss_kib(proc: &Proc) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", proc.pid())).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// True if some process's command line contains `needle`.
fn process_running(needle: &str) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|entry| {
        std::fs::read(entry.path().join("cmdline"))
            .map(|cmd| {
                String::from_utf8_lossy(&cmd)
                    .replace('\0', " ")
                    .contains(needle)
            })
            .unwrap_or(false)
    })
}

/// Sends raw bytes as a request and returns the status of the answer
/// (0 if none could be read).
fn raw_status(addr: SocketAddr, request: &[u8]) -> u16 {
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(patience())).unwrap();
    let mut writer = sock.try_clone().unwrap();
    let request = request.to_vec();
    // The server may answer and close before reading it all.
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(&request);
    });
    let mut head = Vec::new();
    let _ = sock.read_to_end(&mut head);
    let _ = sender.join();
    let text = String::from_utf8_lossy(&head);
    text.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

#[test]
fn builtins_answer_both_ways_as_restpipe_did() {
    let relay = relay(&[]);
    let conn = connector(&relay, &[]);
    let cgw = gateway_of(&conn);
    let rgw = relay.gateway.expect("the relay prints its gateway");

    // time, from both sides.
    let time = get(&format!("http://{cgw}/server/time"));
    assert_eq!(time.status, 200, "{}", time.body);
    assert!(
        time.headers.contains("content-type: application/json"),
        "{}",
        time.headers
    );
    let json = time.json();
    assert_eq!(json["node"], "localhost", "{json}");
    assert!(json["time"].as_str().unwrap().ends_with('Z'), "{json}");
    let time = get(&format!(
        "http://{rgw}/client/test-connector.example.net/time/utc"
    ));
    assert_eq!(time.status, 200, "{}", time.body);
    assert_eq!(time.json()["node"], "test-connector.example.net");

    // cat//hello%20/world is "hello world", both ways.
    for url in [
        format!("http://{cgw}/server/cat//hello%20/world"),
        format!("http://{rgw}/client/test-connector.example.net/cat//hello%20/world"),
    ] {
        let cat = get(&url);
        assert_eq!(
            (cat.status, cat.body.as_str()),
            (200, "hello world"),
            "{url}"
        );
    }
    // cat with a body echoes it after the arguments.
    let echo = request(&[
        "--data-binary",
        "payload",
        &format!("http://{rgw}/client/test-connector.example.net/cat//head:"),
    ]);
    assert_eq!(echo.body, "head:payload");

    // No such handler: 404 with a JSON reason.
    let missing = get(&format!("http://{cgw}/server/nosuch/thing"));
    assert_eq!(missing.status, 404);
    assert!(
        missing.json()["error"]
            .as_str()
            .unwrap()
            .contains("get_nosuch_thing")
    );

    // The convenience client.
    let out = Command::new(BIN)
        .args([
            "call",
            "GET",
            "server/cat//hello%20/world",
            "--gateway",
            &cgw.to_string(),
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello world");
    let out = Command::new(BIN)
        .args([
            "call",
            "post",
            "client/test-connector.example.net/cat",
            "-d",
            "x",
            "--gateway",
            &rgw.to_string(),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "x");
    let out = Command::new(BIN)
        .args([
            "call",
            "GET",
            "server/nosuch",
            "--gateway",
            &cgw.to_string(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "a non-2xx reply exits 3");
}

#[test]
fn executable_handlers_both_ways() {
    let scripts: &[(&str, &str)] = &[
        ("get_args", r#"for a in "$@"; do printf '%s\n' "$a"; done"#),
        ("get_env", "env"),
        ("post_upper", "echo 'Content-Type: text/plain'\ntr a-z A-Z"),
        (
            "get_fail",
            "echo 'partial output'\necho 'something broke' >&2\nexit 3",
        ),
    ];
    let relay_dir = handlers("relay-handlers", scripts);
    let conn_dir = handlers("conn-handlers", scripts);
    let relay = relay(&["--handlers", &path(relay_dir.path())]);
    let conn = connector(&relay, &["--handlers", &path(conn_dir.path())]);
    let cgw = gateway_of(&conn);
    let rgw = relay.gateway.unwrap();
    let sides = [
        (
            format!("http://{cgw}/server"),
            "test-connector.example.net",
            relay_dir.path(),
        ),
        (
            format!("http://{rgw}/client/test-connector.example.net"),
            "relay",
            conn_dir.path(),
        ),
    ];
    for (base, caller, dir) in &sides {
        // Arguments are argv, never a shell: metacharacters arrive as text.
        let args = get(&format!(
            "{base}/args//$(touch%20pwned)%3Becho%20hi/a%20b/%60id%60"
        ));
        assert_eq!(args.status, 200, "{}", args.body);
        assert_eq!(args.body, "$(touch pwned);echo hi\na b\n`id`\n");
        assert!(!dir.join("pwned").exists());

        // The event in the environment, and nothing of the node's own.
        let env = get(&format!("{base}/env?x=1"));
        assert_eq!(env.status, 200);
        let vars: Vec<(&str, &str)> = env.body.lines().filter_map(|l| l.split_once('=')).collect();
        let var = |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        assert_eq!(var("KITEPIPE_CALLER"), Some(*caller), "{}", env.body);
        assert_eq!(var("KITEPIPE_EVENT"), Some("get_env"));
        assert_eq!(var("KITEPIPE_QUERY"), Some("x=1"));
        assert_eq!(
            var("KITEPIPE_LOG"),
            None,
            "the node's environment leaked:\n{}",
            env.body
        );
        let allowed = [
            "PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "PWD", "SHLVL", "OLDPWD", "_",
        ];
        for (name, _) in &vars {
            assert!(
                name.starts_with("KITEPIPE_") || allowed.contains(name),
                "unexpected variable {name} in a handler's environment"
            );
        }

        // Body on stdin, stdout back, content type from the first line.
        let upper = request(&["--data-binary", "shout", &format!("{base}/upper")]);
        assert_eq!((upper.status, upper.body.as_str()), (200, "SHOUT"));
        assert!(
            upper.headers.contains("content-type: text/plain"),
            "{}",
            upper.headers
        );

        // A failing handler: 500, its exit code and stderr tail.
        let fail = get(&format!("{base}/fail"));
        assert_eq!(fail.status, 500);
        assert!(
            fail.headers.contains("x-kitepipe-code: 3"),
            "{}",
            fail.headers
        );
        let json = fail.json();
        assert_eq!(json["code"], 3);
        assert!(
            json["stderr"].as_str().unwrap().contains("something broke"),
            "{json}"
        );
    }
}

#[test]
fn upstream_handlers_both_ways() {
    let relay_backend = Backend::start("http");
    let conn_backend = Backend::start("http");
    let relay = relay(&[
        "--handler-upstream",
        &format!("http://{}", relay_backend.addr()),
    ]);
    let conn = connector(
        &relay,
        &[
            "--handler-upstream",
            &format!("http://{}", conn_backend.addr()),
        ],
    );
    let cgw = gateway_of(&conn);
    let rgw = relay.gateway.unwrap();
    for (base, caller) in [
        (format!("http://{cgw}/server"), "test-connector.example.net"),
        (
            format!("http://{rgw}/client/test-connector.example.net"),
            "relay",
        ),
    ] {
        let headers = get(&format!("{base}/headers"));
        assert_eq!(headers.status, 200, "{}", headers.body);
        let json = headers.json();
        assert_eq!(json["x-kitepipe-event"], "get_headers", "{json}");
        assert_eq!(json["x-kitepipe-caller"], caller, "{json}");

        let data = pseudo_random(3_000_000, 9);
        let file = TempDir::new("upstream-body");
        let body_path = file.path().join("body");
        std::fs::write(&body_path, &data).unwrap();
        let digest = request(&[
            "--data-binary",
            &format!("@{}", path(&body_path)),
            &format!("{base}/sha256"),
        ]);
        assert_eq!(digest.status, 200, "{}", digest.body);
        let json = digest.json();
        assert_eq!(json["len"], data.len());
        assert_eq!(json["sha256"], sha256_hex(&data));

        // The upstream's own status passes through.
        let missing = get(&format!("{base}/nosuch"));
        assert_eq!(
            (missing.status, missing.body.as_str()),
            (404, "no such path\n")
        );
    }
    // Built-ins still answer before the upstream.
    assert_eq!(get(&format!("http://{cgw}/server/cat//a")).body, "a");
}

#[test]
fn unix_socket_gateway_and_unknown_and_offline_nodes() {
    let dir = TempDir::new("unix-gateway");
    let socket = dir.path().join("gw.sock");
    // How long the relay waits for an offline node to come back.
    let wait = Duration::from_secs(2);
    let relay = relay(&["--event-wait", &format!("{}s", wait.as_secs())]);
    let mut conn = connector(&relay, &["--gateway", &format!("unix:{}", path(&socket))]);
    let (code, out, err) = curl(&[
        "--unix-socket",
        &path(&socket),
        "http://gateway/server/cat//unix",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(String::from_utf8_lossy(&out), "unix");

    let rgw = relay.gateway.unwrap();
    // A node never seen is unknown. A relay younger than its wait first
    // waits for it (after a restart every node is unseen until it
    // reconnects), then answers the same: no need to let it age.
    let unknown = get(&format!("http://{rgw}/client/nobody/time"));
    assert_eq!(unknown.status, 404, "{}", unknown.body);
    assert!(unknown.body.contains("unknown node nobody"));

    conn.kill();
    let t0 = Instant::now();
    let offline = get(&format!(
        "http://{rgw}/client/test-connector.example.net/time"
    ));
    assert_eq!(offline.status, 503, "{}", offline.body);
    // It waited out the wait for the node to come back (less a little
    // for the relay having noticed the kill before our clock started).
    assert!(
        t0.elapsed() >= wait - Duration::from_millis(100),
        "answered after {:?}",
        t0.elapsed()
    );
    assert!(offline.body.contains("offline"), "{}", offline.body);
}

#[test]
fn connector_to_connector_follows_the_rules() {
    let ca = TempDir::new("events-ca");
    let ca_dir = ca.path().join("ca");
    kitepipe_ok(&["ca", "init", &path(&ca_dir)]);
    for name in ["alpha", "beta", "gamma"] {
        kitepipe_ok(&["ca", "issue", name, "--dir", &path(&ca_dir)]);
    }
    let config = ca.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "client_ca = {:?}\n\
             [[allow]]\nidentity = \"alpha\"\nhandlers = [\"time\"]\npeers = [\"beta\", \"ghost\"]\n\
             [[allow]]\nidentity = \"beta\"\nhandlers = [\"*\"]\n",
            path(&ca_dir.join("ca-cert.pem"))
        ),
    )
    .unwrap();
    let beta_handlers = handlers("beta-handlers", &[("get_env", "env")]);
    let relay = remember(Relay::new().args(&["--config", &path(&config)]).start());
    let node = |name: &str, extra: &[&str]| {
        let identity = ca_dir.join("issued").join(name);
        let proc = Connector::new(&relay)
            .args(&[
                "--identity",
                &path(&identity),
                "--name",
                name,
                "--event-wait",
                "2s",
            ])
            .args(extra)
            .start();
        let gateway = gateway_of(&proc);
        (proc, gateway)
    };
    let (_alpha, alpha) = node("alpha", &[]);
    let (_beta, beta) = node("beta", &["--handlers", &path(beta_handlers.path())]);
    let (_gamma, gamma) = node("gamma", &[]);

    // alpha may reach beta; beta sees who called, by certificate.
    let time = get(&format!("http://{alpha}/peer/beta/time"));
    assert_eq!(time.status, 200, "{}", time.body);
    assert_eq!(time.json()["node"], "beta");
    let env = get(&format!("http://{alpha}/peer/beta/env"));
    assert!(env.body.contains("KITEPIPE_CALLER=alpha\n"), "{}", env.body);
    assert!(
        env.body.contains("KITEPIPE_CALLER_IDENTITY=alpha\n"),
        "{}",
        env.body
    );
    let echo = request(&[
        "--data-binary",
        "to beta",
        &format!("http://{alpha}/peer/beta/cat"),
    ]);
    assert_eq!(echo.body, "to beta");

    // Refused: beta has no peers rule, gamma has no rule at all.
    for (from, to) in [(beta, "alpha"), (gamma, "alpha"), (gamma, "beta")] {
        let refused = get(&format!("http://{from}/peer/{to}/time"));
        assert_eq!(refused.status, 403, "{from} -> {to}: {}", refused.body);
        assert!(
            refused.body.contains("may not send events"),
            "{}",
            refused.body
        );
    }
    // Relay handlers by rule: alpha only time, beta everything, gamma nothing.
    assert_eq!(get(&format!("http://{alpha}/server/time")).status, 200);
    assert_eq!(get(&format!("http://{alpha}/server/cat//x")).status, 403);
    assert_eq!(get(&format!("http://{beta}/server/cat//x")).body, "x");
    assert_eq!(get(&format!("http://{gamma}/server/time")).status, 403);

    // alpha's rules allow only beta and ghost: other names are refused
    // before they are looked up; ghost never linked, so it is unknown (a
    // relay younger than the wait, 2 s here, first waits for it).
    assert_eq!(get(&format!("http://{alpha}/peer/nobody/time")).status, 403);
    let ghost = get(&format!("http://{alpha}/peer/ghost/time"));
    assert_eq!(ghost.status, 404, "{}", ghost.body);
}

#[test]
fn a_gigabyte_each_way_with_bounded_memory() {
    let relay_dir = handlers("big-relay", &[("post_count", "exec wc -c")]);
    let conn_dir = handlers(
        "big-conn",
        &[("get_zeros", r#"exec head -c "$1" /dev/zero"#)],
    );
    let relay = relay(&["--handlers", &path(relay_dir.path())]);
    let conn = connector(&relay, &["--handlers", &path(conn_dir.path())]);
    let cgw = gateway_of(&conn);
    let rgw = relay.gateway.unwrap();
    const GIB: u64 = 1 << 30;

    // Up: 1 GiB generated on the fly, counted by the relay's handler.
    let up = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c {GIB} /dev/zero | curl -sS --noproxy '*' --max-time 300 -T - -X POST http://{cgw}/server/count"
        ))
        .output()
        .unwrap();
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&up.stdout).trim(), GIB.to_string());

    // Down: 1 GiB printed by the connector's handler, counted here.
    let down = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "curl -sS --noproxy '*' --max-time 300 -H '{}' http://{rgw}/client/test-connector.example.net/zeros//{GIB} | wc -c",
            relay.token_header()
        ))
        .output()
        .unwrap();
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&down.stdout).trim(),
        GIB.to_string()
    );

    for (name, proc) in [("relay", &relay.proc), ("connector", &conn)] {
        let peak = peak_rss_kib(proc);
        assert!(peak > 0 && peak < 100 * 1024, "{name} peaked at {peak} KiB");
    }
}

#[test]
fn five_hundred_events_at_once_pass_a_slow_handler() {
    // The slow handler runs until the 500 are through.
    let gate = Gate::new("slow-gate");
    let slow_script = format!("{}\necho slow", gate.script("slow"));
    let relay_dir = handlers("slow-relay", &[("get_slow", &slow_script)]);
    let relay = relay(&["--handlers", &path(relay_dir.path())]);
    let conn = connector(&relay, &[]);
    let cgw = gateway_of(&conn);
    let slow = std::thread::spawn(move || {
        let reply = get(&format!("http://{cgw}/server/slow"));
        (reply.status, reply.body)
    });
    gate.wait_started("slow", 1);
    let threads: Vec<_> = (0..500)
        .map(|i| {
            std::thread::spawn(move || {
                let request = format!(
                    "GET /server/cat//event-{i} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                );
                let mut sock = TcpStream::connect(cgw).unwrap();
                sock.set_read_timeout(Some(patience())).unwrap();
                sock.write_all(request.as_bytes()).unwrap();
                let mut response = String::new();
                sock.read_to_string(&mut response).unwrap();
                response
            })
        })
        .collect();
    for (i, thread) in threads.into_iter().enumerate() {
        let response = thread.join().unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains(&format!("event-{i}")), "{response}");
    }
    assert!(
        !slow.is_finished(),
        "the slow event ended before the 500 passed it"
    );
    gate.open();
    let (status, body) = slow.join().unwrap();
    assert_eq!((status, body.as_str()), (200, "slow\n"));
}

#[test]
fn requests_wait_for_a_restarted_relay_then_give_up() {
    let relays = RestartableRelay::new("restart-state", &[]);
    let mut relay = relays.start();
    // Long enough for a relay restart on a loaded machine.
    let wait = scaled(Duration::from_secs(8));
    let conn = connector(
        &relay,
        &[
            "--max-backoff",
            "500ms",
            "--event-wait",
            &format!("{}ms", wait.as_millis()),
        ],
    );
    let cgw = gateway_of(&conn);
    assert_eq!(
        get(&format!("http://{cgw}/server/cat//before")).body,
        "before"
    );

    relay.proc.kill();
    conn.wait_links_down(1);
    let t0 = Instant::now();
    let waiting = in_parallel(vec![
        vec![format!("http://{cgw}/server/cat//get")],
        vec![
            "--data-binary".into(),
            "post".into(),
            format!("http://{cgw}/server/cat"),
        ],
    ]);
    // Both requests are held by the gateway before the relay comes back.
    eventually("both requests to reach the gateway", || {
        (connections_to(cgw.port()) >= 2).then_some(())
    });
    let mut relay = relays.start();
    for thread in waiting {
        let (status, body) = thread.join().unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body == "get" || body == "post", "{body}");
    }
    assert!(t0.elapsed() < wait, "took {:?}", t0.elapsed());

    // Down for longer than the wait: 503 after it.
    relay.proc.kill();
    let t0 = Instant::now();
    let gone = get(&format!("http://{cgw}/server/time"));
    assert_eq!(gone.status, 503, "{}", gone.body);
    let waited = t0.elapsed();
    assert!(
        waited >= wait - Duration::from_millis(100)
            && waited < wait + scaled(Duration::from_secs(12)),
        "{waited:?}"
    );
}

#[test]
fn hostile_input_is_refused_and_nothing_escapes() {
    const EVENT_TIMEOUT: Duration = Duration::from_secs(2);
    let outside = TempDir::new("outside");
    let escape = outside.path().join("get_escape");
    std::fs::write(&escape, "#!/bin/sh\necho escaped\n").unwrap();
    let dir = handlers(
        "hostile-handlers",
        &[
            ("get_hang", "sleep 617.25"),
            ("get_partial", "head -c 300000 /dev/zero\nexit 1"),
            ("get_early", "echo some\nexit 2"),
            ("get_flood", "exec yes flood-61723"),
        ],
    );
    let relay = relay(&[]);
    let conn = connector(
        &relay,
        &[
            "--handlers",
            &path(dir.path()),
            "--event-timeout",
            &format!("{}s", EVENT_TIMEOUT.as_secs()),
        ],
    );
    let rgw = relay.gateway.unwrap();
    let base = format!("http://{rgw}/client/test-connector.example.net");

    // Names that could escape the directory or reach a shell.
    for bad in [
        "/../get_escape",
        "/%2e%2e/get_escape",
        "/..%2Foutside%2Fget_escape",
        "/a%2Fb",
        "/hang;id",
        "/$(id)",
        "/%60id%60",
        "/Hang",
        "/hang.sh",
        "/cat//%ff",
        "/cat//%00",
    ] {
        let reply = request(&["--path-as-is", &format!("{base}{bad}")]);
        assert_eq!(reply.status, 400, "{bad}: {}", reply.body);
    }
    let up = request(&[
        "--path-as-is",
        &format!("http://{rgw}/client/../server/time"),
    ]);
    assert_eq!(up.status, 400, "{}", up.body);

    // Invalid UTF-8 and 1 MB of headers, raw.
    let token = relay.token_header();
    let mut bad_utf8 =
        b"GET /client/test-connector.example.net/\xff\xfe HTTP/1.1\r\nHost: 127.0.0.1\r\n".to_vec();
    bad_utf8.extend_from_slice(format!("{token}\r\n\r\n").as_bytes());
    let status = raw_status(rgw, &bad_utf8);
    assert_eq!(status, 400);
    let mut big = format!(
        "GET /client/test-connector.example.net/time HTTP/1.1\r\nHost: 127.0.0.1\r\n{token}\r\n"
    )
    .into_bytes();
    for i in 0..1024 {
        big.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "a".repeat(1000)).as_bytes());
    }
    big.extend_from_slice(b"\r\n");
    assert_eq!(raw_status(rgw, &big), 431);

    // A handler that hangs: 504 after the timeout, and it is gone.
    let t0 = Instant::now();
    let hang = get(&format!("{base}/hang"));
    assert_eq!(hang.status, 504, "{}", hang.body);
    assert!(
        t0.elapsed() < EVENT_TIMEOUT + scaled(Duration::from_secs(8)),
        "{:?}",
        t0.elapsed()
    );
    eventually("the hung handler to be killed", || {
        (!process_running("617.25")).then_some(())
    });

    // Exits early: a clean 500. Exits mid-reply: the response is cut,
    // never complete-looking.
    let early = get(&format!("{base}/early"));
    assert_eq!(
        (early.status, early.json()["code"].as_i64()),
        (500, Some(2))
    );
    let (code, out, _) = tcurl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
        &format!("{base}/partial"),
    ]);
    assert_ne!(code, 0, "a cut reply must fail in curl");
    let size: u64 = String::from_utf8_lossy(&out).trim().parse().unwrap_or(0);
    assert!(size <= 300_000, "{size}");

    // A handler that prints forever: streamed with bounded memory; the
    // caller hanging up stops it.
    let (code, out, _) = tcurl(&[
        "-o",
        "/dev/null",
        "--max-time",
        "3",
        "-w",
        "%{size_download}",
        &format!("{base}/flood"),
    ]);
    assert_eq!(code, 28, "curl stops at its own time limit");
    let size: u64 = String::from_utf8_lossy(&out).trim().parse().unwrap_or(0);
    assert!(size > 10_000_000, "only {size} bytes streamed");
    let peak = peak_rss_kib(&conn);
    assert!(peak < 100 * 1024, "connector peaked at {peak} KiB");
    eventually("the flooding handler to be stopped", || {
        (!process_running("flood-61723")).then_some(())
    });

    // And everything still works.
    assert_eq!(get(&format!("{base}/cat//still%20fine")).body, "still fine");
}

#[test]
fn demo_prints_event_commands_that_work() {
    let mut command = Command::new(BIN);
    command.arg("demo");
    let mut demo = Proc::spawn("demo", command);
    let out = demo.wait_for("Press Ctrl-C");
    // `curl [-H 'NAME: VALUE'] URL   (comment)`, as a shell would split it.
    let commands: Vec<Vec<String>> = out
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("curl ") && (l.contains("/client/") || l.contains("/server/")))
        .map(|l| {
            let l = l.strip_prefix("curl ").unwrap();
            let (args, url) = match l.strip_prefix("-H '") {
                Some(rest) => {
                    let (header, rest) = rest.split_once('\'').unwrap();
                    (
                        vec!["-H".to_string(), header.to_string()],
                        rest.trim_start(),
                    )
                }
                None => (Vec::new(), l),
            };
            let url = url.split_whitespace().next().unwrap().to_string();
            args.into_iter().chain([url]).collect()
        })
        .collect();
    assert_eq!(commands.len(), 2, "{out}");
    let run = |args: &Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        request(&args)
    };
    let to_connector = run(&commands[0]);
    assert_eq!(to_connector.json()["node"], "laptop.kitepipe.localhost");
    assert_eq!(run(&commands[1]).body, "hello world");
    assert!(demo.terminate().success());
}

#[test]
fn a_get_in_flight_when_the_relay_dies_is_retried_a_post_is_not() {
    // The handlers hold their events until the relay has been killed.
    let gate = Gate::new("retry-gate");
    let get_slow = format!("{}\necho done", gate.script("get"));
    let post_slow = format!("{}\necho done", gate.script("post"));
    let dir = handlers(
        "retry-handlers",
        &[("get_slow", &get_slow), ("post_slow", &post_slow)],
    );
    let relays = RestartableRelay::new("retry-state", &["--handlers", &path(dir.path())]);
    let mut relay = relays.start();
    let conn = connector(&relay, &["--max-backoff", "500ms", "--event-wait", "15s"]);
    let cgw = gateway_of(&conn);
    let in_flight = in_parallel(vec![
        vec![format!("http://{cgw}/server/slow")],
        vec![
            "-X".into(),
            "POST".into(),
            format!("http://{cgw}/server/slow"),
        ],
        vec![
            "-X".into(),
            "POST".into(),
            "-H".into(),
            "X-Kitepipe-Idempotent: 1".into(),
            format!("http://{cgw}/server/slow"),
        ],
    ]);
    // All three events reached the relay's handlers: cut the link.
    gate.wait_started("get", 1);
    gate.wait_started("post", 2);
    relay.proc.kill();
    gate.open();
    let _relay = relays.start();
    let results: Vec<(u16, String)> = in_flight.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(results[0], (200, "done\n".to_string()), "GET is retried");
    assert_eq!(results[1].0, 503, "POST is not: {}", results[1].1);
    assert!(results[1].1.contains("not idempotent"), "{}", results[1].1);
    assert_eq!(results[2], (200, "done\n".to_string()), "marked idempotent");
}
