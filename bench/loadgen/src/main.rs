//! Load generator for `bench/run`'s scale scenario (issue 5, scenario 5).
//!
//! `kitepipe-loadgen scale` links N connectors to one running relay from this
//! one process (the library's real connector: TCP, TLS 1.3, hello, challenge,
//! proof, registration; one HTTP kite each), then opens V idle visitor
//! connections through the relay's HTTP port (each sends one request, reads
//! the answer, and stays open on keep-alive, so the relay holds a routed
//! visitor and a live stream for each). It reads the relay's `VmRSS` from
//! `/proc/PID/status` before, after linking and after the visitors, and
//! prints one JSON object.
//!
//! File descriptors are the limit on one machine: each link costs one in
//! the relay and one here, each visitor one in the relay, one in the visitor
//! process, two between connector and target. So the target (`target`) and
//! the visitors (`visitors`) run as child processes of this one, each under
//! its own `RLIMIT_NOFILE`; they exit when their stdin closes and are also
//! killed by PID.
//!
//! Everything is on 127.0.0.1; every wait has a deadline.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use kitepipe::config::{ConnectorConfig, RawConnectorConfig, RawEventConfig};
use kitepipe::connector::{Connector, LinkState};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long one connector may take to link (dial, TLS, registration) once
/// it started; far above the milliseconds it takes on loopback.
const LINK_TIMEOUT: Duration = Duration::from_secs(60);

/// How long one visitor may take to connect and get its answer.
const VISIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Pause before reading RSS, so allocations of the last handshakes settle
/// and heartbeats have run once on the newest links.
const SETTLE: Duration = Duration::from_secs(2);

/// The small answer of the target: a complete HTTP/1.1 response.
const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok";

/// Settings of `scale`.
struct ScaleOptions {
    relay_pid: u32,
    link: String,
    http: String,
    fingerprint: String,
    secret: String,
    domain: String,
    connectors: usize,
    visitors: usize,
    concurrency: usize,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((role, rest)) = args.split_first() else {
        bail!("usage: kitepipe-loadgen scale|target|visitors --flag value ...");
    };
    let flags = Flags::parse(rest)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    match role.as_str() {
        "scale" => {
            let options = ScaleOptions {
                relay_pid: flags.value("relay-pid")?.parse()?,
                link: flags.value("link")?,
                http: flags.value("http")?,
                fingerprint: flags.value("fingerprint")?,
                secret: flags.value("secret")?,
                domain: flags.value_or("domain", "scale.test"),
                connectors: flags.value("connectors")?.parse()?,
                visitors: flags.value("visitors")?.parse()?,
                concurrency: flags.value_or("concurrency", "64").parse()?,
            };
            let report = runtime.block_on(scale(options))?;
            println!("{report}");
        }
        "target" => runtime.block_on(target())?,
        "visitors" => runtime.block_on(visitors(
            flags.value("http")?,
            flags.value("domain")?,
            flags.value("count")?.parse()?,
            flags.value("names")?.parse()?,
            flags.value_or("concurrency", "64").parse()?,
        ))?,
        other => bail!("unknown role {other:?}"),
    }
    // Connector tasks may still be finishing; the report is out.
    runtime.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

/// `--name value` pairs.
struct Flags(Vec<(String, String)>);

impl Flags {
    fn parse(args: &[String]) -> anyhow::Result<Flags> {
        let mut pairs = Vec::new();
        let mut iter = args.iter();
        while let Some(flag) = iter.next() {
            let Some(name) = flag.strip_prefix("--") else {
                bail!("expected --flag, got {flag:?}");
            };
            let value = iter
                .next()
                .with_context(|| format!("--{name} needs a value"))?;
            pairs.push((name.to_string(), value.clone()));
        }
        Ok(Flags(pairs))
    }

    fn value(&self, name: &str) -> anyhow::Result<String> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .with_context(|| format!("missing --{name}"))
    }

    fn value_or(&self, name: &str, default: &str) -> String {
        self.value(name).unwrap_or_else(|_| default.to_string())
    }
}

async fn scale(options: ScaleOptions) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("own executable")?;
    let mut target = spawn_child(&exe, &["target"])?;
    let target_port = read_line_after(&mut target, "port ").await?;
    let res = scale_with_target(&options, &exe, &target_port).await;
    stop_child(&mut target).await;
    res
}

async fn scale_with_target(
    options: &ScaleOptions,
    exe: &std::path::Path,
    target_port: &str,
) -> anyhow::Result<String> {
    let rss_before = rss_kib(options.relay_pid)?;
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let res = link_and_visit(options, exe, target_port, rss_before, &tracker, &shutdown).await;
    shutdown.cancel();
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(3), tracker.wait()).await;
    res
}

async fn link_and_visit(
    options: &ScaleOptions,
    exe: &std::path::Path,
    target_port: &str,
    rss_before: u64,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> anyhow::Result<String> {
    let n = options.connectors;
    // Links are dialed `concurrency` at a time: a real fleet does not
    // reconnect in one instant either, and a SYN flood past the relay's
    // accept backlog would measure TCP retransmit timers instead.
    let in_flight = Arc::new(Semaphore::new(options.concurrency.max(1)));
    let started = Instant::now();
    let mut waits = tokio::task::JoinSet::new();
    for index in 0..n {
        let raw = RawConnectorConfig {
            relay: vec![options.link.clone()],
            kite: vec![format!("http:c{index}.{}=127.0.0.1:{target_port}", options.domain).into()],
            secret: Some(options.secret.clone()),
            fingerprint: vec![options.fingerprint.clone()],
            name: Some(format!("scale{index}")),
            events: RawEventConfig {
                gateway: Some("off".into()),
                ..RawEventConfig::default()
            },
            ..RawConnectorConfig::default()
        };
        let config = ConnectorConfig::try_from(raw).context("connector config")?;
        let connector = Connector::new(config).context("connector")?;
        let mut state = connector.watch(0).context("relay 0")?;
        let permit = in_flight.clone().acquire_owned().await?;
        tracker.spawn(connector.run(shutdown.child_token()));
        waits.spawn(async move {
            let up = tokio::time::timeout(
                LINK_TIMEOUT,
                state.wait_for(|s| matches!(s, LinkState::Up(online) if !online.is_empty())),
            )
            .await;
            drop(permit);
            matches!(up, Ok(Ok(_)))
        });
    }
    let mut linked = 0usize;
    while let Some(res) = waits.join_next().await {
        if matches!(res, Ok(true)) {
            linked += 1;
        }
    }
    let link_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(SETTLE).await;
    let rss_linked = rss_kib(options.relay_pid)?;

    let mut visitors_rss = serde_json::Value::Null;
    let mut visit = serde_json::Value::Null;
    if options.visitors > 0 && linked > 0 {
        let count = options.visitors.to_string();
        let names = n.to_string();
        let concurrency = options.concurrency.to_string();
        let mut child = spawn_child(
            exe,
            &[
                "visitors",
                "--http",
                &options.http,
                "--domain",
                &options.domain,
                "--count",
                &count,
                "--names",
                &names,
                "--concurrency",
                &concurrency,
            ],
        )?;
        let line = read_line_after(&mut child, "visitors ").await;
        let res = match line {
            Ok(line) => {
                tokio::time::sleep(SETTLE).await;
                let rss_visitors = rss_kib(options.relay_pid);
                let parsed: serde_json::Value =
                    serde_json::from_str(&line).context("visitors' report")?;
                Ok((parsed, rss_visitors))
            }
            Err(err) => Err(err),
        };
        stop_child(&mut child).await;
        let (parsed, rss_visitors) = res?;
        let rss_visitors = rss_visitors?;
        let open = parsed["open"].as_u64().unwrap_or(0);
        visitors_rss = serde_json::json!({
            "rss_kib": rss_visitors,
            "per_connection_kib": if open > 0 {
                (rss_visitors as f64 - rss_linked as f64) / open as f64
            } else { 0.0 },
        });
        visit = parsed;
    }
    let report = serde_json::json!({
        "connectors": n,
        "linked": linked,
        "link_secs": link_secs,
        "rss_before_kib": rss_before,
        "rss_linked_kib": rss_linked,
        "per_connector_kib": if linked > 0 {
            (rss_linked as f64 - rss_before as f64) / linked as f64
        } else { 0.0 },
        "visitors": visit,
        "visitors_rss": visitors_rss,
    });
    Ok(report.to_string())
}

/// `VmRSS` of a process, in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

fn spawn_child(exe: &std::path::Path, args: &[&str]) -> anyhow::Result<Child> {
    Command::new(exe)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawning {} {}", exe.display(), args[0]))
}

/// Reads the child's stdout until a line starting with `prefix`; returns
/// the rest of that line.
async fn read_line_after(child: &mut Child, prefix: &str) -> anyhow::Result<String> {
    let stdout = child.stdout.as_mut().context("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let wait = async {
        while let Some(line) = lines.next_line().await? {
            if let Some(rest) = line.strip_prefix(prefix) {
                return Ok(rest.to_string());
            }
        }
        bail!("child exited before printing {prefix:?}")
    };
    tokio::time::timeout(Duration::from_secs(600), wait)
        .await
        .context("child did not report in time")?
}

/// Closes the child's stdin (its signal to exit), then kills it by PID.
async fn stop_child(child: &mut Child) {
    drop(child.stdin.take());
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// Resolves when stdin closes: the parent is done with us.
async fn stdin_closed() {
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    while let Ok(n) = stdin.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// Serves `ANSWER` to every request on every connection, until stdin closes.
async fn target() -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("port {}", listener.local_addr()?.port());
    let tracker = TaskTracker::new();
    let accept = async {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            tracker.spawn(async move {
                let mut buf = Vec::with_capacity(1024);
                let mut chunk = [0u8; 1024];
                loop {
                    let Ok(n) = sock.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    // One answer per complete head; request bodies are not sent.
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        if sock.write_all(ANSWER).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = stdin_closed() => {}
    }
    Ok(())
}

/// Opens `count` visitor connections to `http`, one request each (to kite
/// `c{i % names}.DOMAIN`), keeps them open and idle, prints a JSON report
/// line `visitors {...}`, and holds them until stdin closes.
async fn visitors(
    http: String,
    domain: String,
    count: usize,
    names: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let in_flight = Arc::new(Semaphore::new(concurrency.max(1)));
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for index in 0..count {
        let permit = in_flight.clone().acquire_owned().await?;
        let http = http.clone();
        let host = format!("c{}.{domain}", index % names.max(1));
        set.spawn(async move {
            let res = tokio::time::timeout(VISIT_TIMEOUT, visit(&http, &host)).await;
            drop(permit);
            match res {
                Ok(Ok(sock)) => Some(sock),
                _ => None,
            }
        });
    }
    let mut open = Vec::with_capacity(count);
    let mut failed = 0usize;
    while let Some(res) = set.join_next().await {
        match res {
            Ok(Some(sock)) => open.push(sock),
            _ => failed += 1,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let report = serde_json::json!({ "open": open.len(), "failed": failed, "secs": secs });
    println!("visitors {report}");
    stdin_closed().await;
    drop(open);
    Ok(())
}

/// One request on a new connection; returns the connection, still open.
async fn visit(http: &str, host: &str) -> anyhow::Result<TcpStream> {
    let mut sock = TcpStream::connect(http).await?;
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
    sock.write_all(request.as_bytes()).await?;
    let mut got = Vec::new();
    let mut chunk = [0u8; 512];
    while !got.ends_with(b"\r\n\r\nok") {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            bail!("closed before the answer");
        }
        got.extend_from_slice(&chunk[..n]);
        if got.len() > 4096 {
            bail!("unexpected answer");
        }
    }
    if !got.starts_with(b"HTTP/1.1 200") {
        bail!("not a 200 answer");
    }
    Ok(sock)
}
