//! What a node counts, and the admin server that shows it: Prometheus
//! families (per kite, per link, handshakes, events, remote operations),
//! bounded rings of recent errors and activity, one hour of per-kite
//! samples for the dashboard's charts, and `admin` (the admin server:
//! `/metrics`, `/api/status`, `/api/live`, the dashboard).
//!
//! Start at [`Metrics`]: a node makes one and hands clones of its handles
//! to its tasks. Hot paths resolve a kite's handles once per visitor
//! connection ([`Metrics::kite`], one short lock) and then only touch
//! atomics. This room imports none of the nodes (`relay`, `connector`,
//! `pipe`, `remote`); they call it, and describe themselves to the admin
//! server through [`admin::StatusSource`].

pub mod access;
pub mod admin;

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::sync::lock;

/// Most kites with series of their own. Kites are bounded by the relay's
/// registry already (64 Ki known names); this keeps `/metrics` and the
/// dashboard readable and their memory small (a kite's series are ~1 KiB):
/// kites past it are counted together under [`OTHER_KITES`].
pub const MAX_KITE_SERIES: usize = 1024;

/// The `kite` label of kites beyond [`MAX_KITE_SERIES`].
pub const OTHER_KITES: &str = "_other";

/// Most links (node names) with series of their own; the rest are counted
/// under [`OTHER_KITES`]'s twin, `_other`. A relay serves thousands of
/// connectors; their names are proven, so a stranger cannot mint them.
pub const MAX_LINK_SERIES: usize = 4096;

/// Recent errors kept for `/api/status` (a ring: the oldest goes).
pub const MAX_RECENT_ERRORS: usize = 100;

/// Recent events and remote operations kept for `/api/status` (a ring).
pub const MAX_RECENT_ACTIVITY: usize = 100;

/// Longest text kept of one error or activity line (longer ones are cut):
/// error texts can quote peer input.
pub const MAX_NOTE_LEN: usize = 300;

/// Interval of the dashboard's chart samples.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(2);

/// Samples kept per kite: one hour at [`SAMPLE_INTERVAL`].
pub const MAX_SAMPLES: usize = 1800;

/// Kites with chart history (the first ones seen; the rest show totals
/// only): 64 x 1800 samples x 32 bytes is under 4 MiB.
pub const MAX_CHARTED_KITES: usize = 64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KiteLabel {
    kite: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    kite: String,
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    kite: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    kite: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabel {
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// Why a visitor was turned away (the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Basic auth missing or wrong (401).
    Unauthorized,
    /// The kite's policy refused the visitor (403).
    Forbidden,
    /// Over the kite's rate limit (429).
    RateLimited,
    /// The kite is known but no connector serves it now.
    Offline,
    /// No such kite.
    Unknown,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::Unauthorized => "401",
            Refusal::Forbidden => "403",
            Refusal::RateLimited => "429",
            Refusal::Offline => "offline",
            Refusal::Unknown => "unknown",
        }
    }
}

/// Why a link's handshake failed (a small fixed set: the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// TLS failed (bad certificate, wrong protocol, cut).
    Tls,
    /// A proof or identity was refused.
    Auth,
    /// The peer was too slow.
    Timeout,
    /// The peer spoke nonsense or an unknown version.
    Protocol,
    /// Too many links at once.
    Busy,
}

impl HandshakeFailure {
    fn label(self) -> &'static str {
        match self {
            HandshakeFailure::Tls => "tls",
            HandshakeFailure::Auth => "auth",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Protocol => "protocol",
            HandshakeFailure::Busy => "busy",
        }
    }
}

/// What became of an event or remote operation (the `outcome` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered.
    Ok,
    /// Refused by the rules.
    Refused,
    /// Failed on the way or at the handler.
    Failed,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
        }
    }
}

/// A kite's handles, resolved once per visitor connection: atomics only.
#[derive(Clone, Debug)]
pub struct KiteMetrics {
    connections: Counter,
    open: Gauge,
    requests: [Counter; 5],
    bytes_in: Counter,
    bytes_out: Counter,
}

impl KiteMetrics {
    /// A visitor connection opened; the guard counts it open until dropped.
    pub fn connection(&self) -> OpenConnection {
        self.connections.inc();
        self.open.inc();
        OpenConnection {
            open: self.open.clone(),
        }
    }

    /// One HTTP response of `status` went to a visitor.
    pub fn request(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.requests[class].inc();
    }

    /// Bytes from visitors to the kite.
    pub fn bytes_in(&self, n: u64) {
        self.bytes_in.inc_by(n);
    }

    /// Bytes from the kite to visitors.
    pub fn bytes_out(&self, n: u64) {
        self.bytes_out.inc_by(n);
    }

    /// `io` with its reads counted as bytes from visitors and its writes
    /// as bytes to visitors (a visitor's socket).
    pub fn counting<T>(&self, io: T) -> Counted<T> {
        Counted {
            io,
            reads: Some(self.bytes_in.clone()),
            writes: Some(self.bytes_out.clone()),
            read: 0,
            written: 0,
        }
    }

    /// `io` with its reads counted as bytes to visitors and its writes as
    /// bytes from visitors (a connector's socket to the local target).
    pub fn counting_target<T>(&self, io: T) -> Counted<T> {
        Counted {
            io,
            reads: Some(self.bytes_out.clone()),
            writes: Some(self.bytes_in.clone()),
            read: 0,
            written: 0,
        }
    }

    /// `io` with its writes counted as bytes from visitors (the kite side
    /// of a visitor's requests).
    pub fn counting_in<T>(&self, io: T) -> Counted<T> {
        Counted {
            io,
            reads: None,
            writes: Some(self.bytes_in.clone()),
            read: 0,
            written: 0,
        }
    }

    /// `io` with its writes counted as bytes to visitors.
    pub fn counting_out<T>(&self, io: T) -> Counted<T> {
        Counted {
            io,
            reads: None,
            writes: Some(self.bytes_out.clone()),
            read: 0,
            written: 0,
        }
    }

    fn totals(&self) -> KiteTotals {
        KiteTotals {
            connections: self.connections.get(),
            open: self.open.get(),
            requests: self.requests.iter().map(Counter::get).sum(),
            requests_by_class: std::array::from_fn(|i| self.requests[i].get()),
            bytes_in: self.bytes_in.get(),
            bytes_out: self.bytes_out.get(),
        }
    }
}

/// A reader/writer whose bytes are counted (one atomic add per read or
/// write).
#[derive(Debug)]
pub struct Counted<T> {
    io: T,
    reads: Option<Counter>,
    writes: Option<Counter>,
    read: u64,
    written: u64,
}

impl<T> Counted<T> {
    /// Bytes read through this wrapper.
    pub fn read(&self) -> u64 {
        self.read
    }

    /// Bytes written through this wrapper.
    pub fn written(&self) -> u64 {
        self.written
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before) as u64;
        if n > 0 {
            self.read += n;
            if let Some(counter) = &self.reads {
                counter.inc_by(n);
            }
        }
        res
    }
}

impl<T> Counted<T> {
    fn count_written(&mut self, n: usize) {
        self.written += n as u64;
        if let Some(counter) = &self.writes {
            counter.inc_by(n as u64);
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let res = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &res {
            self.count_written(*n);
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let res = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &res {
            self.count_written(*n);
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Counts a visitor connection as open while it lives.
#[derive(Debug)]
pub struct OpenConnection {
    open: Gauge,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// A link's handles.
#[derive(Clone, Debug)]
pub struct LinkMetrics {
    reconnects: Counter,
    rtt: Gauge<f64, std::sync::atomic::AtomicU64>,
    up: Gauge,
}

impl LinkMetrics {
    /// Records the latest heartbeat round trip.
    pub fn rtt(&self, rtt: Duration) {
        self.rtt.set(rtt.as_secs_f64());
    }
}

/// A link counted up while it lives.
#[derive(Debug)]
pub struct LinkUp {
    metrics: LinkMetrics,
    node: String,
    board: Arc<Mutex<Board>>,
}

impl LinkUp {
    /// The link's handles.
    pub fn metrics(&self) -> &LinkMetrics {
        &self.metrics
    }
}

impl Drop for LinkUp {
    fn drop(&mut self) {
        self.metrics.up.dec();
        let mut board = lock(&self.board);
        if let Some(link) = board.links.get_mut(&self.node) {
            link.up = link.up.saturating_sub(1);
            link.last_down = Some(unix_now());
        }
    }
}

/// Totals of one kite, as `/api/status` shows them.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct KiteTotals {
    /// Visitor connections ever.
    pub connections: u64,
    /// Visitor connections open now.
    pub open: i64,
    /// HTTP responses ever.
    pub requests: u64,
    /// HTTP responses by class (1xx to 5xx).
    pub requests_by_class: [u64; 5],
    /// Bytes from visitors.
    pub bytes_in: u64,
    /// Bytes to visitors.
    pub bytes_out: u64,
}

/// One chart sample of a kite (rates over the sample's interval).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Sample {
    /// Unix time, seconds.
    pub t: u64,
    /// Requests per second.
    pub rps: f64,
    /// Bytes per second from visitors.
    pub bin: f64,
    /// Bytes per second to visitors.
    pub bout: f64,
    /// Open visitor connections.
    pub open: i64,
}

/// A line of the recent errors or activity rings.
#[derive(Clone, Debug, Serialize)]
pub struct Note {
    /// Unix time, seconds.
    pub t: u64,
    /// What kind (`error`, `event`, `remote`).
    pub kind: &'static str,
    /// Who (node, caller or kite).
    pub who: String,
    /// What happened, cut to [`MAX_NOTE_LEN`].
    pub what: String,
    /// Outcome (`ok`, `refused`, `failed`), for activity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<&'static str>,
    /// How long it took, milliseconds, for activity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ms: Option<u64>,
}

/// A link as `/api/status` shows it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LinkStatus {
    /// Node name.
    pub node: String,
    /// Links up now.
    pub up: u32,
    /// Times this node linked again after its first link.
    pub reconnects: u64,
    /// Latest heartbeat round trip, milliseconds.
    pub rtt_ms: Option<f64>,
    /// Unix time of the latest heartbeat answer seen by the sampler.
    pub last_heartbeat: Option<u64>,
    /// Unix time the link came up.
    pub last_up: Option<u64>,
    /// Unix time the link last went down.
    pub last_down: Option<u64>,
}

#[derive(Debug, Default)]
struct Board {
    errors: VecDeque<Note>,
    activity: VecDeque<Note>,
    links: HashMap<String, LinkStatus>,
    history: HashMap<String, VecDeque<Sample>>,
    /// The totals at the previous sample, per charted kite.
    previous: HashMap<String, KiteTotals>,
}

/// Everything a node counts. Cheap to clone (handles share their atomics).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    connections: Family<KiteLabel, Counter>,
    open: Family<KiteLabel, Gauge>,
    requests: Family<RequestLabels, Counter>,
    bytes: Family<BytesLabels, Counter>,
    refusals: Family<RefusalLabels, Counter>,
    reconnects: Family<NodeLabel, Counter>,
    rtt: Family<NodeLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    up: Family<NodeLabel, Gauge>,
    handshake_failures: Family<ReasonLabel, Counter>,
    events: Family<OutcomeLabel, Counter>,
    event_seconds: Family<OutcomeLabel, Histogram, fn() -> Histogram>,
    remote_ops: Family<OutcomeLabel, Counter>,
    remote_seconds: Family<OutcomeLabel, Histogram, fn() -> Histogram>,
    /// Resolved kite handles, bounded by [`MAX_KITE_SERIES`].
    kites: Mutex<HashMap<String, KiteMetrics>>,
    access_dropped: Counter,
    board: Arc<Mutex<Board>>,
    started: tokio::time::Instant,
    started_unix: u64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

fn latency_histogram() -> Histogram {
    // 1 ms to ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Metrics {
    /// A fresh set of families, all at zero.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("kitepipe");
        let connections = Family::<KiteLabel, Counter>::default();
        let open = Family::<KiteLabel, Gauge>::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let bytes = Family::<BytesLabels, Counter>::default();
        let refusals = Family::<RefusalLabels, Counter>::default();
        let reconnects = Family::<NodeLabel, Counter>::default();
        let rtt = Family::<NodeLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let up = Family::<NodeLabel, Gauge>::default();
        let handshake_failures = Family::<ReasonLabel, Counter>::default();
        let events = Family::<OutcomeLabel, Counter>::default();
        let event_seconds: Family<OutcomeLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        let remote_ops = Family::<OutcomeLabel, Counter>::default();
        let remote_seconds: Family<OutcomeLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "visitor_connections",
            "Visitor connections accepted, per kite",
            connections.clone(),
        );
        registry.register(
            "visitor_connections_open",
            "Visitor connections open now, per kite",
            open.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP responses sent to visitors, per kite and status class",
            requests.clone(),
        );
        registry.register(
            "visitor_bytes",
            "Bytes between visitors and kites (direction in: from visitors)",
            bytes.clone(),
        );
        registry.register(
            "visitor_refusals",
            "Visitors turned away, per kite and reason",
            refusals.clone(),
        );
        registry.register(
            "link_reconnects",
            "Links a node opened again after its first one",
            reconnects.clone(),
        );
        registry.register(
            "link_rtt_seconds",
            "Latest heartbeat round trip of a node's link",
            rtt.clone(),
        );
        registry.register("link_up", "Links of a node up now", up.clone());
        registry.register(
            "link_handshake_failures",
            "Link handshakes that failed, per reason",
            handshake_failures.clone(),
        );
        registry.register("events", "Events handled, per outcome", events.clone());
        let access_dropped = Counter::default();
        registry.register(
            "access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            access_dropped.clone(),
        );
        registry.register(
            "event_duration_seconds",
            "Time to answer an event, per outcome",
            event_seconds.clone(),
        );
        registry.register(
            "remote_operations",
            "Remote operations, per outcome",
            remote_ops.clone(),
        );
        registry.register(
            "remote_operation_duration_seconds",
            "Time to start or run a remote operation, per outcome",
            remote_seconds.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                connections,
                open,
                requests,
                bytes,
                refusals,
                reconnects,
                rtt,
                up,
                handshake_failures,
                events,
                event_seconds,
                remote_ops,
                remote_seconds,
                kites: Mutex::new(HashMap::new()),
                access_dropped,
                board: Arc::new(Mutex::new(Board::default())),
                started: tokio::time::Instant::now(),
                started_unix: unix_now(),
            }),
        }
    }

    /// The handles of kite `name` (as registered): one short lock, then
    /// atomics. Past [`MAX_KITE_SERIES`] kites, new ones share [`OTHER_KITES`].
    pub fn kite(&self, name: &str) -> KiteMetrics {
        let mut kites = lock(&self.inner.kites);
        if let Some(handles) = kites.get(name) {
            return handles.clone();
        }
        let name = if kites.len() >= MAX_KITE_SERIES {
            if let Some(handles) = kites.get(OTHER_KITES) {
                return handles.clone();
            }
            OTHER_KITES
        } else {
            name
        };
        let inner = &self.inner;
        let label = KiteLabel {
            kite: name.to_string(),
        };
        let handles = KiteMetrics {
            connections: inner.connections.get_or_create_owned(&label),
            open: inner.open.get_or_create_owned(&label),
            requests: std::array::from_fn(|i| {
                inner.requests.get_or_create_owned(&RequestLabels {
                    kite: name.to_string(),
                    class: format!("{}xx", i + 1),
                })
            }),
            bytes_in: inner.bytes.get_or_create_owned(&BytesLabels {
                kite: name.to_string(),
                direction: "in",
            }),
            bytes_out: inner.bytes.get_or_create_owned(&BytesLabels {
                kite: name.to_string(),
                direction: "out",
            }),
        };
        kites.insert(name.to_string(), handles.clone());
        handles
    }

    /// The counter of access log lines dropped.
    pub fn access_log_dropped(&self) -> Counter {
        self.inner.access_dropped.clone()
    }

    /// A visitor who asked for `kite` was turned away; counted under that
    /// name if it is a registered kite's, else under [`OTHER_KITES`].
    pub fn refusal(&self, kite: &str, why: Refusal) {
        // Only names registered as kites have series of their own: a
        // visitor can make up any name (under a wildcard kite, too).
        let known = lock(&self.inner.kites).contains_key(kite);
        let kite = if known { kite } else { OTHER_KITES };
        self.inner
            .refusals
            .get_or_create(&RefusalLabels {
                kite: kite.to_string(),
                reason: why.label(),
            })
            .inc();
    }

    /// A visitor of `kite` got the relay's own refusal `page` (an HTTP
    /// response: its status says why).
    pub fn refusal_page(&self, kite: &str, page: &[u8]) {
        let why = match page.get(9..12) {
            Some(b"401") => Refusal::Unauthorized,
            Some(b"429") => Refusal::RateLimited,
            _ => Refusal::Forbidden,
        };
        self.refusal(kite, why);
    }

    /// A link of `node` came up; it counts as up until the guard drops.
    pub fn link_up(&self, node: &str) -> LinkUp {
        let mut board = lock(&self.inner.board);
        let node = if board.links.contains_key(node) || board.links.len() < MAX_LINK_SERIES {
            node
        } else {
            OTHER_KITES
        };
        let label = NodeLabel {
            node: node.to_string(),
        };
        let metrics = LinkMetrics {
            reconnects: self.inner.reconnects.get_or_create_owned(&label),
            rtt: self.inner.rtt.get_or_create_owned(&label),
            up: self.inner.up.get_or_create_owned(&label),
        };
        metrics.up.inc();
        let link = board.links.entry(node.to_string()).or_default();
        if link.last_up.is_some() {
            metrics.reconnects.inc();
        }
        link.node = node.to_string();
        link.up += 1;
        link.reconnects = metrics.reconnects.get();
        link.last_up = Some(unix_now());
        LinkUp {
            metrics,
            node: node.to_string(),
            board: self.inner.board.clone(),
        }
    }

    /// Records a heartbeat answer of `node`'s link: its round trip.
    pub fn heartbeat(&self, node: &str, rtt: Duration) {
        let mut board = lock(&self.inner.board);
        if let Some(link) = board.links.get_mut(node) {
            link.rtt_ms = Some(rtt.as_secs_f64() * 1000.0);
            link.last_heartbeat = Some(unix_now());
        }
        drop(board);
        if let Some(gauge) = self.inner.rtt.get(&NodeLabel {
            node: node.to_string(),
        }) {
            gauge.set(rtt.as_secs_f64());
        }
    }

    /// A link handshake failed.
    pub fn handshake_failed(&self, why: HandshakeFailure) {
        self.inner
            .handshake_failures
            .get_or_create(&ReasonLabel {
                reason: why.label(),
            })
            .inc();
    }

    /// An event was handled: `who` called `what`.
    pub fn event(&self, who: &str, what: &str, outcome: Outcome, took: Duration) {
        let label = OutcomeLabel {
            outcome: outcome.label(),
        };
        self.inner.events.get_or_create(&label).inc();
        self.inner
            .event_seconds
            .get_or_create(&label)
            .observe(took.as_secs_f64());
        self.note_activity("event", who, what, outcome, took);
    }

    /// A remote operation ran: `who` asked for `what`.
    pub fn remote_operation(&self, who: &str, what: &str, outcome: Outcome, took: Duration) {
        let label = OutcomeLabel {
            outcome: outcome.label(),
        };
        self.inner.remote_ops.get_or_create(&label).inc();
        self.inner
            .remote_seconds
            .get_or_create(&label)
            .observe(took.as_secs_f64());
        self.note_activity("remote", who, what, outcome, took);
    }

    /// Keeps an error for the dashboard's "recent errors".
    pub fn error(&self, who: &str, what: &str) {
        let mut board = lock(&self.inner.board);
        if board.errors.len() >= MAX_RECENT_ERRORS {
            board.errors.pop_front();
        }
        board.errors.push_back(Note {
            t: unix_now(),
            kind: "error",
            who: cut(who),
            what: cut(what),
            outcome: None,
            ms: None,
        });
    }

    fn note_activity(
        &self,
        kind: &'static str,
        who: &str,
        what: &str,
        outcome: Outcome,
        took: Duration,
    ) {
        let mut board = lock(&self.inner.board);
        if board.activity.len() >= MAX_RECENT_ACTIVITY {
            board.activity.pop_front();
        }
        board.activity.push_back(Note {
            t: unix_now(),
            kind,
            who: cut(who),
            what: cut(what),
            outcome: Some(outcome.label()),
            ms: Some(u64::try_from(took.as_millis()).unwrap_or(u64::MAX)),
        });
    }

    /// `/metrics`: the Prometheus (OpenMetrics) text.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.inner.registry);
        text
    }

    /// `/metrics` in the Prometheus text format (0.0.4), for scrapers
    /// that do not ask for OpenMetrics (and `promtool check metrics`): a
    /// counter family is named with its `_total` suffix, and there is no
    /// `# EOF`.
    pub fn encode_prometheus(&self) -> String {
        let open = self.encode();
        let mut counters = std::collections::HashSet::new();
        for line in open.lines() {
            if let Some(name) = line
                .strip_prefix("# TYPE ")
                .and_then(|rest| rest.strip_suffix(" counter"))
            {
                counters.insert(name.to_string());
            }
        }
        let mut text = String::with_capacity(open.len() + counters.len() * 16);
        for line in open.lines() {
            if line == "# EOF" || line.starts_with("# UNIT ") {
                continue;
            }
            let meta = line
                .strip_prefix("# HELP ")
                .map(|rest| ("# HELP ", rest))
                .or_else(|| line.strip_prefix("# TYPE ").map(|rest| ("# TYPE ", rest)));
            match meta {
                Some((kind, rest)) => {
                    let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                    if counters.contains(name) {
                        text.push_str(&format!("{kind}{name}_total {tail}\n"));
                    } else {
                        text.push_str(line);
                        text.push('\n');
                    }
                }
                None => {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
        text
    }

    /// Seconds since the node started.
    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }

    /// Unix time the node started.
    pub fn started_unix(&self) -> u64 {
        self.inner.started_unix
    }

    /// Every kite's totals, by name.
    pub fn kite_totals(&self) -> Vec<(String, KiteTotals)> {
        let kites = lock(&self.inner.kites);
        let mut totals: Vec<(String, KiteTotals)> = kites
            .iter()
            .map(|(name, handles)| (name.clone(), handles.totals()))
            .collect();
        totals.sort_by(|a, b| a.0.cmp(&b.0));
        totals
    }

    /// Links as last seen, by node.
    pub fn links(&self) -> Vec<LinkStatus> {
        let board = lock(&self.inner.board);
        let mut links: Vec<LinkStatus> = board.links.values().cloned().collect();
        links.sort_by(|a, b| a.node.cmp(&b.node));
        links
    }

    /// Recent errors, oldest first.
    pub fn recent_errors(&self) -> Vec<Note> {
        lock(&self.inner.board).errors.iter().cloned().collect()
    }

    /// Recent events and remote operations, oldest first.
    pub fn recent_activity(&self) -> Vec<Note> {
        lock(&self.inner.board).activity.iter().cloned().collect()
    }

    /// Takes one chart sample of every charted kite (the admin server does
    /// this every [`SAMPLE_INTERVAL`]).
    pub fn sample(&self, elapsed: Duration) {
        let totals = self.kite_totals();
        let seconds = elapsed.as_secs_f64().max(0.001);
        let now = unix_now();
        let mut board = lock(&self.inner.board);
        for (name, now_totals) in totals {
            if !board.history.contains_key(&name) && board.history.len() >= MAX_CHARTED_KITES {
                continue;
            }
            let before = board
                .previous
                .insert(name.clone(), now_totals)
                .unwrap_or_default();
            let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / seconds;
            let sample = Sample {
                t: now,
                rps: rate(now_totals.requests, before.requests),
                bin: rate(now_totals.bytes_in, before.bytes_in),
                bout: rate(now_totals.bytes_out, before.bytes_out),
                open: now_totals.open,
            };
            let ring = board.history.entry(name).or_default();
            if ring.len() >= MAX_SAMPLES {
                ring.pop_front();
            }
            ring.push_back(sample);
        }
    }

    /// Chart samples of every charted kite, oldest first; `last` keeps only
    /// the newest ones of each.
    pub fn history(&self, last: Option<usize>) -> HashMap<String, Vec<Sample>> {
        let board = lock(&self.inner.board);
        board
            .history
            .iter()
            .map(|(name, ring)| {
                let skip = last.map_or(0, |n| ring.len().saturating_sub(n));
                (name.clone(), ring.iter().skip(skip).copied().collect())
            })
            .collect()
    }
}

fn cut(text: &str) -> String {
    if text.len() <= MAX_NOTE_LEN {
        return text.to_string();
    }
    let mut end = MAX_NOTE_LEN;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Seconds since the Unix epoch (for people; durations use tokio's clock).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests;
