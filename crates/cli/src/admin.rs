//! The admin server's flags (`--admin`, `--admin-token-file`) shared by
//! `kitepipe relay` and `kitepipe connect`, and `kitepipe status`, which
//! reads a node's `/api/status` and prints it as tables.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use kitepipe::config::{AccessLogFormat, AccessLogSettings, AdminSettings, DEFAULT_ADMIN_ADDR};
use kitepipe::metrics::access::{AccessFormat, AccessTarget};
use kitepipe::metrics::admin::{AdminConfig, AdminError, AdminListener};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::exit::UsageText;

/// Binds the admin socket if `--admin` asked for one; refuses an address
/// beyond loopback without a token.
pub(crate) fn bind(settings: Option<&AdminSettings>) -> anyhow::Result<Option<AdminListener>> {
    let Some(settings) = settings else {
        return Ok(None);
    };
    let config = AdminConfig {
        addr: settings.addr,
        fallback: settings.fallback,
        token: settings
            .token
            .as_ref()
            .map(|token| token.expose().to_string()),
    };
    match AdminListener::bind(&config) {
        Ok(listener) => Ok(Some(listener)),
        Err(err @ (AdminError::Exposed(_) | AdminError::WeakToken)) => {
            Err(UsageText(err.to_string()).into())
        }
        Err(err) => Err(err.into()),
    }
}

/// Where and how the access log is written.
pub(crate) fn access_log(settings: &AccessLogSettings) -> (AccessTarget, AccessFormat) {
    let target = match &settings.file {
        Some(file) => AccessTarget::File(file.clone()),
        None => AccessTarget::Stdout,
    };
    let format = match settings.format {
        AccessLogFormat::Common => AccessFormat::Common,
        AccessLogFormat::Json => AccessFormat::Json,
    };
    (target, format)
}

fn read_token(file: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the admin token file {}", file.display()))?;
    Ok(text.trim().to_string())
}

/// `kitepipe status`.
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// The node's admin server.
    #[arg(long, env = "KITEPIPE_ADMIN", value_name = "ADDR", default_value = DEFAULT_ADMIN_ADDR)]
    admin: String,
    /// The admin token file, if the server needs one.
    #[arg(long, env = "KITEPIPE_ADMIN_TOKEN_FILE", value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// Print the JSON as the server sent it.
    #[arg(long)]
    json: bool,
}

/// How long `kitepipe status` waits for the admin server.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest status document read.
const MAX_STATUS_BYTES: u64 = 16 * 1024 * 1024;

/// Runs `kitepipe status`.
pub(crate) async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let token = match &args.admin_token_file {
        Some(file) => Some(read_token(file)?),
        None => None,
    };
    let body = tokio::time::timeout(STATUS_TIMEOUT, fetch(&args.admin, token.as_deref()))
        .await
        .with_context(|| format!("no answer from the admin server {} in time", args.admin))??;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{body}")?;
        return Ok(());
    }
    let status: Value = serde_json::from_str(&body).context("the admin server sent no JSON")?;
    write!(out, "{}", render(&status))?;
    Ok(())
}

async fn fetch(admin: &str, token: Option<&str>) -> anyhow::Result<String> {
    let mut sock = tokio::net::TcpStream::connect(admin)
        .await
        .with_context(|| format!("cannot reach the admin server at {admin} (is --admin on?)"))?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request =
        format!("GET /api/status HTTP/1.1\r\nHost: {admin}\r\n{auth}Connection: close\r\n\r\n");
    sock.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    sock.take(MAX_STATUS_BYTES).read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("the admin server's answer was cut short");
    };
    let status_line = head.lines().next().unwrap_or_default();
    if !status_line.contains(" 200 ") {
        bail!("the admin server answered {status_line}: {}", body.trim());
    }
    // `Connection: close` with a Content-Length: the body is the rest.
    Ok(body.to_string())
}

/// The status as tables: node, listeners, kites, links.
fn render(status: &Value) -> String {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let mut out = String::new();
    out.push_str(&format!(
        "{} {} (kitepipe {}), up {}\n",
        text(&status["role"]),
        text(&status["node"]),
        text(&status["version"]),
        humantime::format_duration(Duration::from_secs(
            status["uptime_s"].as_u64().unwrap_or(0)
        )),
    ));
    if let Some(listeners) = status["listeners"].as_array() {
        out.push_str("\nLISTENER               ROLES\n");
        for listener in listeners {
            let roles: Vec<String> = listener["roles"]
                .as_array()
                .map(|r| r.iter().map(text).collect())
                .unwrap_or_default();
            out.push_str(&format!(
                "{:<22} {}\n",
                text(&listener["addr"]),
                roles.join("+")
            ));
        }
    }
    let mut rows = vec![[
        "KITE".to_string(),
        "PROTO".into(),
        "STATE".into(),
        "BACKENDS".into(),
        "CONNS".into(),
        "OPEN".into(),
        "REQUESTS".into(),
        "IN".into(),
        "OUT".into(),
    ]];
    for kite in status["kites"].as_array().into_iter().flatten() {
        let totals = &kite["totals"];
        let backends: Vec<String> = kite["backends"]
            .as_array()
            .map(|b| b.iter().map(text).collect())
            .unwrap_or_default();
        let name = match kite["port"].as_u64() {
            Some(port) => format!("{}:{port}", text(&kite["name"])),
            None => text(&kite["name"]),
        };
        rows.push([
            name,
            text(&kite["proto"]),
            if kite["online"].as_bool() == Some(true) {
                "online"
            } else {
                "offline"
            }
            .into(),
            if backends.is_empty() {
                "-".into()
            } else {
                backends.join(",")
            },
            text(&totals["connections"]),
            text(&totals["open"]),
            text(&totals["requests"]),
            bytes(totals["bytes_in"].as_u64()),
            bytes(totals["bytes_out"].as_u64()),
        ]);
    }
    out.push('\n');
    out.push_str(&table(&rows));
    let mut links = vec![[
        "LINK".to_string(),
        "STATE".into(),
        "RTT".into(),
        "RECONNECTS".into(),
        "LAST HEARTBEAT".into(),
    ]];
    let now = status["now"].as_u64().unwrap_or(0);
    for link in status["links"].as_array().into_iter().flatten() {
        links.push([
            text(&link["node"]),
            match link["up"].as_u64() {
                Some(0) | None => "down".into(),
                Some(_) => "up".into(),
            },
            link["rtt_ms"]
                .as_f64()
                .map_or("-".into(), |ms| format!("{ms:.1} ms")),
            text(&link["reconnects"]),
            link["last_heartbeat"]
                .as_u64()
                .map_or("-".into(), |t| format!("{}s ago", now.saturating_sub(t))),
        ]);
    }
    out.push('\n');
    out.push_str(&table(&links));
    out
}

fn bytes(n: Option<u64>) -> String {
    let Some(n) = n else { return "-".into() };
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, cell)| format!("{cell:<width$}", width = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
