//! The admin server, end to end: a relay with `--admin` and a connector
//! serving an http kite from a real backend; traffic through the relay is
//! read back from `/metrics` (checked by `promtool`, and scraped by a real
//! Prometheus server answering a PromQL query), `/api/status`, `kitepipe
//! status` and the dashboard in headless Chromium.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

const SECRET: &str = "admin-test-secret";
const HOST: &str = "app.example.net";

struct Scene {
    relay: RelayProc,
    admin: SocketAddr,
    _backend: Backend,
    connector: Proc,
}

impl Scene {
    fn start() -> Scene {
        let relay = Relay::new()
            .domain(&format!("http,tcp:*.example.net:{SECRET}"))
            .args(&["--admin=127.0.0.1:0"])
            .start();
        let admin = admin_of(&relay.proc);
        let backend = Backend::start("http");
        let connector = Connector::new(&relay)
            .secret(SECRET)
            .kite(&format!("http:{HOST}={}", backend.addr()))
            .start();
        Scene {
            relay,
            admin,
            _backend: backend,
            connector,
        }
    }

    /// `n` requests to the kite over one connection (curl reuses it).
    fn requests(&self, n: usize) {
        let url = format!("{}/", self.relay.http_url());
        let mut args = vec!["-H".to_string(), format!("Host: {HOST}")];
        args.extend(std::iter::repeat_n(url, n));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let body = curl_ok(&args);
        assert_eq!(body, "hello from backend\n".repeat(n));
    }

    /// Waits until the kite's chart history holds `n` samples.
    fn wait_samples(&self, n: usize) {
        eventually(&format!("{n} chart samples"), || {
            let history: serde_json::Value =
                serde_json::from_str(&self.get("/api/history")).ok()?;
            (history["kites"][HOST].as_array()?.len() >= n).then_some(())
        });
    }

    fn get(&self, path: &str) -> String {
        curl_ok(&[&format!("http://{}{path}", self.admin)])
    }
}

/// The value of the sample `series` (name and labels, exactly as
/// written) in a metrics text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// HTTP/2 visitors (h2c with prior knowledge) are counted like HTTP/1
/// ones: their connections, responses by class, bytes to them, and the
/// relay's refusals.
#[test]
fn metrics_count_http2_visitors() {
    let scene = Scene::start();
    let url = format!("{}/", scene.relay.http_url());
    for _ in 0..5 {
        let body = curl_ok(&[
            "--http2-prior-knowledge",
            "-H",
            &format!("Host: {HOST}"),
            &url,
        ]);
        assert_eq!(body, "hello from backend\n");
    }
    let (_, out, _) = curl(&[
        "--http2-prior-knowledge",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Host: nobody.example.net",
        &url,
    ]);
    assert_eq!(out, b"404");
    let text = scene.get("/metrics");
    let kite = format!("kite=\"{HOST}\"");
    let value = |series: String| sample(&text, &series);
    assert_eq!(
        value(format!(
            "kitepipe_http_requests_total{{{kite},class=\"2xx\"}}"
        )),
        Some(5.0),
        "{text}"
    );
    assert_eq!(
        value(format!("kitepipe_visitor_connections_total{{{kite}}}")),
        Some(5.0),
        "{text}"
    );
    let bytes_out = value(format!(
        "kitepipe_visitor_bytes_total{{{kite},direction=\"out\"}}"
    ))
    .expect("bytes out");
    assert!(bytes_out >= 5.0 * 19.0, "{text}");
    assert_eq!(
        value("kitepipe_visitor_refusals_total{kite=\"_other\",reason=\"unknown\"}".to_string()),
        Some(1.0),
        "{text}"
    );
}

#[test]
fn metrics_count_the_traffic_sent() {
    let scene = Scene::start();
    scene.requests(20);
    // A refusal: an unknown kite.
    let (_, out, _) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Host: nobody.example.net",
        &format!("{}/", scene.relay.http_url()),
    ]);
    assert_eq!(out, b"404");
    let text = scene.get("/metrics");
    let kite = format!("kite=\"{HOST}\"");
    assert_eq!(
        sample(
            &text,
            &format!("kitepipe_http_requests_total{{{kite},class=\"2xx\"}}")
        ),
        Some(20.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            &format!("kitepipe_http_requests_total{{{kite},class=\"5xx\"}}")
        ),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            &format!("kitepipe_visitor_connections_total{{{kite}}}")
        ),
        Some(1.0),
        "{text}"
    );
    let bytes_out = sample(
        &text,
        &format!("kitepipe_visitor_bytes_total{{{kite},direction=\"out\"}}"),
    )
    .expect("bytes out");
    // 20 bodies of 19 bytes, each with a response head.
    assert!(bytes_out > 20.0 * 19.0, "{text}");
    let bytes_in = sample(
        &text,
        &format!("kitepipe_visitor_bytes_total{{{kite},direction=\"in\"}}"),
    )
    .expect("bytes in");
    assert!(bytes_in > 20.0 * 16.0, "{text}");
    assert_eq!(
        sample(
            &text,
            "kitepipe_visitor_refusals_total{kite=\"_other\",reason=\"unknown\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "kitepipe_link_up{node=\"test-connector\"}"),
        Some(1.0),
        "{text}"
    );
    // Events through the connector's gateway to the relay's handlers.
    let gateway = gateway_of(&scene.connector);
    curl_ok(&[&format!("http://{gateway}/server/time")]);
    let (_, out, _) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://{gateway}/server/no_such_handler"),
    ]);
    assert_eq!(out, b"404");
    let text = eventually("the events counted", || {
        let text = scene.get("/metrics");
        (sample(&text, "kitepipe_events_total{outcome=\"refused\"}") == Some(1.0)).then_some(text)
    });
    assert_eq!(
        sample(&text, "kitepipe_events_total{outcome=\"ok\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "kitepipe_event_duration_seconds_count{outcome=\"ok\"}"
        ),
        Some(1.0),
        "{text}"
    );
    let status: serde_json::Value = serde_json::from_str(&scene.get("/api/status")).unwrap();
    let activity = status["activity"].as_array().unwrap();
    assert_eq!(activity.len(), 2, "{status}");
    assert_eq!(activity[0]["kind"], "event");
    assert_eq!(activity[0]["what"], "get_time");
    assert_eq!(activity[0]["outcome"], "ok");
    assert_eq!(activity[1]["outcome"], "refused");
    // Prometheus asks for OpenMetrics, and gets the same samples.
    let open = curl_ok(&[
        "-H",
        "Accept: application/openmetrics-text; version=1.0.0",
        &format!("http://{}/metrics", scene.admin),
    ]);
    assert!(open.ends_with("# EOF\n"), "{open}");
    assert!(
        open.contains("# TYPE kitepipe_http_requests counter"),
        "{open}"
    );
    // Names a stranger makes up get no series of their own.
    assert!(!text.contains("nobody.example.net"), "{text}");

    if require_tool("promtool", "prometheus") {
        let mut check = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        check
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = check.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics:\n{}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn prometheus_scrapes_the_relay() {
    if !require_tool("prometheus", "prometheus") {
        return;
    }
    let scene = Scene::start();
    scene.requests(7);
    let dir = TempDir::new("prometheus");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: kitepipe\n    scrape_interval: 1s\n    \
             static_configs:\n      - targets: ['{}']\n",
            scene.admin
        ),
    )
    .unwrap();
    let port = free_port();
    let mut command = Command::new("prometheus");
    command
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"));
    let mut prometheus = Proc::spawn("prometheus", command);
    let query = format!(
        "http://127.0.0.1:{port}/api/v1/query?query=kitepipe_http_requests_total%7Bkite%3D%22{HOST}%22%2Cclass%3D%222xx%22%7D"
    );
    let answer = eventually("Prometheus to have scraped 7 requests", || {
        let (code, out, _) = curl(&[&query]);
        let text = String::from_utf8_lossy(&out).into_owned();
        (code == 0 && text.contains("\"7\"")).then_some(text)
    });
    assert!(answer.contains("\"status\":\"success\""), "{answer}");
    prometheus.kill();
}

#[test]
fn status_shows_kites_and_links_as_table_and_json() {
    let scene = Scene::start();
    scene.requests(3);
    let admin = scene.admin.to_string();
    let out = Command::new(BIN)
        .args(["status", "--admin", &admin, "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["role"], "relay");
    let kite = status["kites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == HOST)
        .unwrap_or_else(|| panic!("{status}"));
    assert_eq!(kite["online"], true);
    assert_eq!(kite["backends"][0], "test-connector");
    assert_eq!(kite["totals"]["requests"], 3);
    assert_eq!(status["links"][0]["node"], "test-connector");
    assert_eq!(status["links"][0]["up"], 1);
    let out = Command::new(BIN)
        .args(["status", "--admin", &admin])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("relay "), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with(HOST))
        .unwrap_or_else(|| panic!("{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        &cells[1..7],
        ["http", "online", "test-connector", "1", "0", "3"],
        "{table}"
    );
    assert!(table.contains("test-connector  up"), "{table}");
    // The kite goes offline with its connector: the table says so.
    let mut connector = scene.connector;
    connector.terminate();
    let table = eventually("the kite to show offline", || {
        let out = Command::new(BIN)
            .args(["status", "--admin", &admin])
            .output()
            .unwrap();
        let table = String::from_utf8_lossy(&out.stdout).into_owned();
        table
            .contains(HOST)
            .then_some(table)
            .filter(|t| t.contains("offline"))
    });
    assert!(table.contains("test-connector  down"), "{table}");
    let status: serde_json::Value =
        serde_json::from_str(&curl_ok(&[&format!("http://{admin}/api/status")])).unwrap();
    let errors = status["errors"].as_array().unwrap();
    assert!(
        errors.iter().any(|e| e["who"] == "test-connector"
            && e["what"].as_str().unwrap().starts_with("link closed")),
        "{status}"
    );
    // No admin server there: a clear error, not a hang.
    let out = Command::new(BIN)
        .args(["status", "--admin", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the admin server"));
}

fn chromium(profile: &Path, args: &[&str]) -> String {
    let mut command = Command::new("/usr/bin/chromium");
    command.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        &format!("--user-data-dir={}", profile.display()),
    ]);
    command.args(args);
    let mut browser = Proc::spawn("chromium", command);
    let Some(status) = browser.wait_exit(scaled(Duration::from_secs(90))) else {
        let out = browser.output();
        browser.kill();
        panic!("chromium did not finish in time:\n{out}");
    };
    let out = browser.output();
    assert!(status.success(), "chromium failed ({status}):\n{out}");
    out
}

/// The text of the element with `id` in a dumped DOM.
fn text_of(dom: &str, id: &str) -> String {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the DOM:\n{dom}"));
    let rest = &dom[start..];
    let rest = &rest[rest.find('>').unwrap() + 1..];
    rest[..rest.find('<').unwrap()].to_string()
}

#[test]
fn dashboard_renders_live_charts_in_chromium() {
    if !require_tool("/usr/bin/chromium", "chromium") {
        return;
    }
    let scene = Scene::start();
    // Traffic over a few chart samples (one every 2 s).
    for round in 1..=3 {
        scene.requests(10);
        scene.wait_samples(round + 1);
    }
    let profile = TempDir::new("chromium-admin");
    // Polling rather than the event stream: virtual time waits for the
    // network to go idle, which an open event stream never does (the
    // stream itself is checked by `live_feed_sends_a_snapshot_every_second`).
    let url = format!("http://{}/?refresh=poll", scene.admin);
    let dump =
        |profile: &Path| chromium(profile, &["--virtual-time-budget=5000", "--dump-dom", &url]);
    let first = dump(profile.path());
    assert_eq!(text_of(&first, "role"), "relay", "{first}");
    assert_eq!(text_of(&first, "live-text"), "live", "{first}");
    assert_eq!(text_of(&first, "total-requests"), "30", "{first}");
    assert_eq!(text_of(&first, "kites-online"), "1 / 1", "{first}");
    assert!(first.contains(&format!("data-kite=\"{HOST}\"")), "{first}");
    assert!(first.contains("pill state online"), "{first}");
    // The charts were drawn from the server's history.
    let points: Vec<u64> = first
        .match_indices("data-points=\"")
        .map(|(at, m)| {
            let rest = &first[at + m.len()..];
            rest[..rest.find('"').unwrap()].parse().unwrap()
        })
        .collect();
    assert_eq!(points.len(), 3, "{first}");
    assert!(points.iter().all(|&n| n >= 2), "{points:?}");
    assert!(
        first.contains("<td>test-connector</td><td class=\"ok\">up</td>"),
        "{first}"
    );
    // More traffic: the live numbers change between two reads.
    scene.requests(5);
    scene.wait_samples(5);
    let second = dump(profile.path());
    assert_eq!(text_of(&second, "total-requests"), "35", "{second}");
    // A screenshot of the dashboard, as people see it.
    let shot = profile.path().join("dashboard.png");
    chromium(
        profile.path(),
        &[
            "--virtual-time-budget=5000",
            "--window-size=1280,900",
            &format!("--screenshot={}", shot.display()),
            &url,
        ],
    );
    let png = std::fs::read(&shot).expect("chromium saved the screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
    if let Ok(out) = std::env::var("KITEPIPE_SCREENSHOT_OUT") {
        std::fs::copy(&shot, &out).expect("copy the screenshot to KITEPIPE_SCREENSHOT_OUT");
    }
}

#[test]
fn live_feed_sends_a_snapshot_every_second() {
    let scene = Scene::start();
    scene.requests(2);
    let url = format!("http://{}/api/live", scene.admin);
    let mut feed = Command::new("curl");
    feed.args(["-sSN", "--noproxy", "*", &url]);
    let mut feed = Proc::spawn("curl-live", feed);
    feed.wait_for_count("data: ", 1);
    scene.requests(3);
    let seen = feed.wait_for_count("\"requests\":5", 1);
    // One more event: the one with 5 requests has been read whole.
    let out = feed.wait_for_count("data: ", seen.matches("data: ").count() + 1);
    feed.kill();
    let snapshots: Vec<serde_json::Value> = out
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str(data).ok())
        .collect();
    assert!(snapshots.len() >= 2, "{out}");
    let requests = |s: &serde_json::Value| s["kite_totals"][HOST]["requests"].as_u64();
    assert_eq!(requests(&snapshots[0]), Some(2), "{out}");
    assert!(snapshots.iter().any(|s| requests(s) == Some(5)), "{out}");
}

#[test]
fn status_of_a_connector() {
    let relay = Relay::new()
        .domain(&format!("http,tcp:*.example.net:{SECRET}"))
        .start();
    let backend = Backend::start("http");
    let connector = Connector::new(&relay)
        .secret(SECRET)
        .kite(&format!("http:{HOST}={}", backend.addr()))
        .arg("--admin=127.0.0.1:0")
        .start();
    let admin = admin_of(&connector).to_string();
    let body = curl_ok(&[
        "-H",
        &format!("Host: {HOST}"),
        &format!("{}/", relay.http_url()),
    ]);
    assert_eq!(body, "hello from backend\n");
    let status = eventually("the connector's link in its status", || {
        let out = Command::new(BIN)
            .args(["status", "--admin", &admin, "--json"])
            .output()
            .unwrap();
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (status["links"][0]["up"] == 1).then_some(status)
    });
    assert_eq!(status["role"], "connector");
    assert_eq!(status["node"], "test-connector");
    let kite = &status["kites"][0];
    assert_eq!(kite["name"], HOST);
    assert_eq!(kite["online"], true);
    assert_eq!(kite["target"], backend.addr());
    assert_eq!(kite["backends"][0], relay.link.to_string());
    assert_eq!(kite["totals"]["connections"], 1);
    assert!(
        kite["totals"]["bytes_out"].as_u64().unwrap() > 19,
        "{status}"
    );
    let out = Command::new(BIN)
        .args(["status", "--admin", &admin])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("connector test-connector"), "{table}");
    assert!(table.contains(&format!("{}  up", relay.link)), "{table}");
    let metrics = curl_ok(&[&format!("http://{admin}/metrics")]);
    assert!(
        metrics.contains(&format!(
            "kitepipe_visitor_connections_total{{kite=\"{HOST}\"}} 1"
        )),
        "{metrics}"
    );
}

#[test]
fn access_log_lines_match_the_requests() {
    for format in ["common", "json"] {
        let dir = TempDir::new("access-log");
        let log = dir.path().join("access.log");
        let relay = Relay::new()
            .domain(&format!("http,tcp:*.example.net:{SECRET}"))
            .args(&["--access-log", &log.to_string_lossy()])
            .args(&["--access-log-format", format])
            .start();
        let backend = Backend::start("http");
        let echo = Backend::start("tcp-echo");
        let connector = Connector::new(&relay)
            .secret(SECRET)
            .kite(&format!("http:{HOST}={}", backend.addr()))
            .kite(&format!("tcp:echo.example.net:0={}", echo.addr()))
            .start();
        let url = format!("{}/", relay.http_url());
        curl_ok(&[
            "-H",
            &format!("Host: {HOST}"),
            &url,
            &format!("{url}headers"),
        ]);
        let (_, out, _) = curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &format!("Host: {HOST}"),
            &format!("{url}nothing-here?q=\"x\""),
        ]);
        assert_eq!(out, b"404");
        let port = connector.tcp_kite_port("echo.example.net");
        {
            use std::io::{Read as _, Write as _};
            let mut sock = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            sock.write_all(b"ping!\n").unwrap();
            let mut back = [0u8; 6];
            sock.read_exact(&mut back).unwrap();
            assert_eq!(&back, b"ping!\n");
        }
        let text = eventually("four access log lines", || {
            let text = std::fs::read_to_string(&log).ok()?;
            (text.lines().count() >= 4).then_some(text)
        });
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        if format == "common" {
            assert!(lines[0].starts_with("127.0.0.1 - - ["), "{text}");
            assert!(
                lines[0].contains("\"GET / HTTP/1.1\" 200 ")
                    && lines[0].contains(&format!("\"{HOST}\"")),
                "{text}"
            );
            assert!(
                lines[1].contains("\"GET /headers HTTP/1.1\" 200 "),
                "{text}"
            );
            assert!(
                lines[2].contains("\"GET /nothing-here?q=%22x%22 HTTP/1.1\" 404 "),
                "{text}"
            );
            assert!(lines[3].contains("\"TCP echo.example.net\" - 6 "), "{text}");
            // The byte count is the response's (head and body).
            let bytes: u64 = lines[0]
                .split("\" 200 ")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert!(bytes > 19 && bytes < 1000, "{text}");
        } else {
            let json: Vec<serde_json::Value> = lines
                .iter()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(json[0]["method"], "GET");
            assert_eq!(json[0]["path"], "/");
            assert_eq!(json[0]["status"], 200);
            assert_eq!(json[0]["kite"], HOST);
            assert_eq!(json[0]["peer"], "127.0.0.1");
            assert_eq!(json[1]["path"], "/headers");
            assert_eq!(json[2]["status"], 404);
            assert_eq!(json[3]["proto"], "tcp");
            assert_eq!(json[3]["kite"], "echo.example.net");
            assert_eq!(json[3]["bytes_in"], 6);
            assert_eq!(json[3]["bytes_out"], 6);
        }
    }
}

#[test]
fn remote_operations_are_counted_with_caller_and_outcome() {
    let secret = "s3cret-for-admin-remote";
    let relay = Relay::new()
        .domain(&format!("http:*.example.net:{secret}"))
        .args(&["--remote", "laptop.example.net:exec"])
        .args(&["--admin=127.0.0.1:0"])
        .start();
    let admin = admin_of(&relay.proc);
    let _laptop = Connector::new(&relay)
        .secret(secret)
        .kite("http:laptop.example.net=127.0.0.1:9")
        .args(&["--name", "laptop.example.net", "--allow-remote", "exec"])
        .start();
    let gateway = relay.gateway.expect("the relay runs a gateway").to_string();
    let remote = |args: &[&str]| {
        Command::new(BIN)
            .args(["remote", "node:laptop.example.net", "--gateway", &gateway])
            .args(["--connect-timeout", "10s"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = remote(&["exec", "--", "true"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // fs is not granted: refused by the relay's rules.
    let out = remote(&["ls", "/"]);
    assert!(!out.status.success());
    let text = eventually("the remote operations counted", || {
        let text = curl_ok(&[&format!("http://{admin}/metrics")]);
        (sample(
            &text,
            "kitepipe_remote_operations_total{outcome=\"refused\"}",
        ) == Some(1.0))
        .then_some(text)
    });
    assert_eq!(
        sample(&text, "kitepipe_remote_operations_total{outcome=\"ok\"}"),
        Some(1.0),
        "{text}"
    );
    let status: serde_json::Value =
        serde_json::from_str(&curl_ok(&[&format!("http://{admin}/api/status")])).unwrap();
    let remote_ops: Vec<&serde_json::Value> = status["activity"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|note| note["kind"] == "remote")
        .collect();
    assert_eq!(remote_ops.len(), 2, "{status}");
    assert_eq!(remote_ops[0]["outcome"], "ok");
    assert!(
        remote_ops[0]["who"]
            .as_str()
            .unwrap()
            .ends_with("-> laptop.example.net"),
        "{status}"
    );
    assert_eq!(remote_ops[1]["outcome"], "refused");
}
