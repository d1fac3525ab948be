//! The relay's access log (`--access-log PATH|-`): one line per visitor
//! request (HTTP) or connection (TCP, HTTPS passed through), in the common
//! log format or JSON.
//!
//! Visitors never wait for the log: lines go through a bounded channel to
//! one writer task, and when it is full (a slow disk) a line is dropped and
//! counted (`kitepipe_access_log_dropped_total`) rather than slowing
//! anyone.

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, mpsc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Metrics;

/// Lines waiting for the writer; past this they are dropped and counted.
/// The writer takes them every 50 ms, so this passes 300,000 lines a
/// second; 16384 lines of at most ~700 bytes is under 12 MiB.
pub const MAX_ACCESS_BACKLOG: usize = 16 * 1024;

/// Longest request target logged (longer ones are cut): visitors choose it.
pub const MAX_LOGGED_TARGET: usize = 512;

/// The line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessFormat {
    /// The common log format with the kite and the duration appended.
    Common,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for AccessFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<AccessFormat, String> {
        match text {
            "common" => Ok(AccessFormat::Common),
            "json" => Ok(AccessFormat::Json),
            other => Err(format!("{other:?}: expected common or json")),
        }
    }
}

/// Where the log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessTarget {
    /// Standard output (`-`).
    Stdout,
    /// A file, appended to.
    File(PathBuf),
}

/// The access log's sending side: cheap to clone.
#[derive(Clone, Debug)]
pub struct AccessLog {
    sender: mpsc::SyncSender<String>,
    format: AccessFormat,
    dropped: Counter,
}

/// Why the access log cannot be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the access log {path}")]
pub struct AccessLogError {
    /// The file.
    pub path: String,
    /// Cause.
    #[source]
    pub source: std::io::Error,
}

impl AccessLog {
    /// Opens `target` (creating the file, mode 0640, appending) and starts
    /// its writer on `tracker`; it ends with `token`, after writing what
    /// is queued.
    pub fn open(
        target: &AccessTarget,
        format: AccessFormat,
        metrics: &Metrics,
        tracker: &TaskTracker,
        token: CancellationToken,
    ) -> Result<AccessLog, AccessLogError> {
        let writer: Box<dyn Write + Send> = match target {
            AccessTarget::Stdout => Box::new(std::io::stdout()),
            AccessTarget::File(path) => {
                use std::os::unix::fs::OpenOptionsExt as _;
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o640)
                    .open(path)
                    .map_err(|source| AccessLogError {
                        path: path.display().to_string(),
                        source,
                    })?;
                Box::new(file)
            }
        };
        let (sender, receiver) = mpsc::sync_channel(MAX_ACCESS_BACKLOG);
        // A blocking thread of its own: the writes never take a turn on the
        // threads serving visitors.
        tracker.spawn_blocking(move || write_lines(&receiver, writer, &token));
        Ok(AccessLog {
            sender,
            format,
            dropped: metrics.access_log_dropped(),
        })
    }

    /// Logs a TCP (or passed-through HTTPS) connection that ended.
    pub fn connection(&self, entry: &ConnectionEntry<'_>) {
        let line = match self.format {
            AccessFormat::Common => format!(
                "{} - - [{}] \"{} {}\" - {} \"{}\" {:.3} in={}\n",
                entry.peer,
                common_time(entry.ended),
                entry.proto.to_uppercase(),
                entry.kite,
                entry.bytes_out,
                entry.kite,
                entry.seconds,
                entry.bytes_in
            ),
            AccessFormat::Json => format!(
                "{}\n",
                json!({
                    "time": rfc3339(entry.ended),
                    "peer": entry.peer.to_string(),
                    "proto": entry.proto,
                    "kite": entry.kite,
                    "bytes_in": entry.bytes_in,
                    "bytes_out": entry.bytes_out,
                    "duration_ms": (entry.seconds * 1000.0).round() as u64,
                })
            ),
        };
        self.send(line);
    }

    /// The start of an HTTP request's line: finished by
    /// [`AccessRequest::done`] when its response went out.
    pub fn request(&self, peer: IpAddr, kite: &str, method: &str, target: &str) -> AccessRequest {
        let mut target: String = target.chars().take(MAX_LOGGED_TARGET).collect();
        // Quotes and control bytes would break the line's fields; the
        // request scanner refuses control bytes already.
        target = target.replace('"', "%22");
        AccessRequest {
            log: self.clone(),
            peer,
            // The Host the visitor sent (a wildcard kite's name is theirs).
            kite: Arc::from(kite.replace('"', "%22").as_str()),
            method: method.chars().take(32).collect(),
            target,
            started: tokio::time::Instant::now(),
        }
    }

    fn send(&self, line: String) {
        if self.sender.try_send(line).is_err() {
            self.dropped.inc();
        }
    }
}

/// A TCP connection's line.
#[derive(Debug)]
pub struct ConnectionEntry<'a> {
    /// The visitor.
    pub peer: std::net::SocketAddr,
    /// `tcp` or `https`.
    pub proto: &'a str,
    /// Kite name (or SNI).
    pub kite: &'a str,
    /// Bytes from the visitor.
    pub bytes_in: u64,
    /// Bytes to the visitor.
    pub bytes_out: u64,
    /// How long it lasted.
    pub seconds: f64,
    /// When it ended.
    pub ended: SystemTime,
}

/// An HTTP request waiting for its response.
#[derive(Debug)]
pub struct AccessRequest {
    log: AccessLog,
    peer: IpAddr,
    kite: Arc<str>,
    method: String,
    target: String,
    started: tokio::time::Instant,
}

impl AccessRequest {
    /// Logs the request: its response's `status` and `bytes` (head and body).
    pub fn done(self, status: u16, bytes: u64) {
        let seconds = self.started.elapsed().as_secs_f64();
        let now = SystemTime::now();
        let line = match self.log.format {
            AccessFormat::Common => format!(
                "{} - - [{}] \"{} {} HTTP/1.1\" {status} {bytes} \"{}\" {seconds:.3}\n",
                self.peer,
                common_time(now),
                self.method,
                self.target,
                self.kite
            ),
            AccessFormat::Json => format!(
                "{}\n",
                json!({
                    "time": rfc3339(now),
                    "peer": self.peer.to_string(),
                    "proto": "http",
                    "kite": &*self.kite,
                    "method": self.method,
                    "path": self.target,
                    "status": status,
                    "bytes": bytes,
                    "duration_ms": (seconds * 1000.0).round() as u64,
                })
            ),
        };
        self.log.send(line);
    }
}

/// How often the writer wakes to write what came. It polls rather than
/// waits on the channel: a waiting receiver would be woken (a futex call
/// and a context switch) by every line, costing visitors more than the
/// line itself; with polling, a send is a lock and a copy. Lines reach
/// the file at most this late.
const WRITER_POLL: Duration = Duration::from_millis(50);

/// Writes what came every [`WRITER_POLL`], until the node shuts down
/// (then what is queued) or every sender is gone.
fn write_lines(
    receiver: &mpsc::Receiver<String>,
    mut writer: Box<dyn Write + Send>,
    token: &CancellationToken,
) {
    let mut batch = Vec::with_capacity(64 * 1024);
    loop {
        let stopping = token.is_cancelled();
        let gone = loop {
            match receiver.try_recv() {
                Ok(line) => batch.extend_from_slice(line.as_bytes()),
                Err(mpsc::TryRecvError::Empty) => break false,
                Err(mpsc::TryRecvError::Disconnected) => break true,
            }
            if batch.len() >= 256 * 1024 {
                write_batch(&mut writer, &mut batch);
            }
        };
        write_batch(&mut writer, &mut batch);
        if stopping || gone {
            return;
        }
        // A thread of its own (not one of the runtime's): sleeping here
        // holds up no task.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(WRITER_POLL);
    }
}

fn write_batch(writer: &mut Box<dyn Write + Send>, batch: &mut Vec<u8>) {
    if batch.is_empty() {
        return;
    }
    if let Err(err) = writer.write_all(batch).and_then(|()| writer.flush()) {
        tracing::warn!(%err, "cannot write the access log");
    }
    batch.clear();
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// `05/Dec/2026:07:45:00 +0000`, the common log format's time (UTC).
fn common_time(time: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rest = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{day:02}/{}/{year}:{:02}:{:02}:{:02} +0000",
        MONTHS[usize::try_from(month - 1).unwrap_or(0)],
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn common_time_is_utc_clf() {
        let time = UNIX_EPOCH + Duration::from_secs(1_796_456_700);
        assert_eq!(common_time(time), "05/Dec/2026:07:45:00 +0000");
        assert_eq!(common_time(UNIX_EPOCH), "01/Jan/1970:00:00:00 +0000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(common_time(leap), "29/Feb/2000:00:00:00 +0000");
    }
}
