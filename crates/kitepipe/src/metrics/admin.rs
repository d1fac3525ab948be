//! The admin server: `/metrics` (Prometheus text), `/api/status` (JSON),
//! `/api/history` (the charts' hour), `/api/live` (server-sent events: a
//! status snapshot every second) and `/` (the dashboard, bundled).
//!
//! Who may reach it: by default it listens on loopback only, and answers
//! only requests naming loopback in `Host` (a web page that rebinds its
//! name to 127.0.0.1 gets 421) and no foreign `Origin` (403). Bound beyond
//! loopback it needs a token ([`AdminConfig::token`]), sent as
//! `Authorization: Bearer`, `X-Kitepipe-Token`, or the `kitepipe_admin`
//! cookie that `/?token=` sets (the dashboard's way: `EventSource` cannot
//! send headers); without one it refuses to start.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use super::{Metrics, SAMPLE_INTERVAL};
use crate::accept::accept;
use crate::local_guard::{loopback_host, same_secret};

/// Admin connections served at once (dashboards keep one open for the
/// live feed); more are closed at accept.
pub const MAX_ADMIN_CONNECTIONS: usize = 32;

/// Largest request head read (hyper's buffer); more gets 431 and a close.
pub const MAX_ADMIN_REQUEST_HEAD: usize = 16 * 1024;

/// How long a client may take to send a request head.
pub const ADMIN_HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Interval of `/api/live` snapshots.
pub const LIVE_INTERVAL: Duration = Duration::from_secs(1);

/// Shortest token accepted: it is the only lock on a public admin port.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// Name of the dashboard's token cookie.
const TOKEN_COOKIE: &str = "kitepipe_admin";

const DASHBOARD_HTML: &str = include_str!("dashboard/index.html");
const DASHBOARD_JS: &str = include_str!("dashboard/app.js");
const DASHBOARD_CSS: &str = include_str!("dashboard/style.css");

type AdminBody = UnsyncBoxBody<Bytes, Infallible>;

/// Where and for whom the admin server listens.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// The address asked for.
    pub addr: SocketAddr,
    /// Bind a free port on the same IP if `addr`'s port is taken (the
    /// default address only).
    pub fallback: bool,
    /// The token requests must carry; required beyond loopback.
    pub token: Option<String>,
}

/// Why the admin server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Beyond loopback without a token.
    #[error(
        "the admin server would listen on {0}, beyond loopback, without a token: \
         give --admin-token-file (or bind it to 127.0.0.1)"
    )]
    Exposed(SocketAddr),
    /// The token is too short.
    #[error("the admin token needs at least {MIN_ADMIN_TOKEN_LEN} characters")]
    WeakToken,
    /// The socket could not be bound.
    #[error("cannot listen on {addr} for the admin server")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// What the node tells the admin server about itself (listeners, kites,
/// links); the counters come from [`Metrics`].
pub trait StatusSource: Send + Sync + 'static {
    /// The node's own part of `/api/status`: an object with `role`,
    /// `node`, `listeners` and `kites` (each `{name, proto, online,
    /// backends: [{node}]}`).
    fn status(&self) -> Value;
    /// Called every sample interval: refresh what needs polling (links'
    /// round trips).
    fn refresh(&self) {}
}

/// A bound admin socket.
#[derive(Debug)]
pub struct AdminListener {
    listener: std::net::TcpListener,
    token: Option<Arc<str>>,
}

impl AdminListener {
    /// Binds the admin socket, refusing a non-loopback address without a
    /// token. Needs no runtime.
    pub fn bind(config: &AdminConfig) -> Result<AdminListener, AdminError> {
        if let Some(token) = &config.token
            && token.len() < MIN_ADMIN_TOKEN_LEN
        {
            return Err(AdminError::WeakToken);
        }
        if !config.addr.ip().is_loopback() && config.token.is_none() {
            return Err(AdminError::Exposed(config.addr));
        }
        let bind = |addr: SocketAddr| {
            let listener = std::net::TcpListener::bind(addr)?;
            listener.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(listener)
        };
        let listener = match bind(config.addr) {
            Ok(listener) => listener,
            Err(err) if config.fallback && err.kind() == std::io::ErrorKind::AddrInUse => {
                let any = SocketAddr::new(config.addr.ip(), 0);
                info!(addr = %config.addr, "admin port taken; using a free one");
                bind(any).map_err(|source| AdminError::Bind { addr: any, source })?
            }
            Err(source) => {
                return Err(AdminError::Bind {
                    addr: config.addr,
                    source,
                });
            }
        };
        Ok(AdminListener {
            listener,
            token: config.token.as_deref().map(Arc::from),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

struct Admin {
    metrics: Metrics,
    source: Arc<dyn StatusSource>,
    token: Option<Arc<str>>,
    /// Loopback-only: then `Host` must name loopback (DNS rebinding).
    loopback: bool,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

/// Serves the admin server until `shutdown` is cancelled; its connections
/// run on `tracker`. Also samples the charts every [`SAMPLE_INTERVAL`].
pub async fn serve(
    listener: AdminListener,
    metrics: Metrics,
    source: Arc<dyn StatusSource>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let loopback = listener
        .listener
        .local_addr()
        .is_ok_and(|addr| addr.ip().is_loopback());
    let socket = match tokio::net::TcpListener::from_std(listener.listener) {
        Ok(socket) => socket,
        Err(err) => {
            tracing::warn!(%err, "cannot serve the admin server");
            return;
        }
    };
    let admin = Arc::new(Admin {
        metrics,
        source,
        token: listener.token,
        loopback,
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
    });
    tracker.spawn(sample_loop(admin.clone()));
    let connections = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    info!(addr = ?socket.local_addr().ok(), "admin server listening");
    while let Some((sock, peer)) = accept(&socket, &shutdown).await {
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            debug!(%peer, "too many admin connections; closing one");
            continue;
        };
        let admin = admin.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let service = {
                let admin = admin.clone();
                service_fn(move |req: Request<Incoming>| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.handle(&req)) }
                })
            };
            let conn = hyper::server::conn::http1::Builder::new()
                .max_buf_size(MAX_ADMIN_REQUEST_HEAD)
                .timer(TokioTimer::new())
                .header_read_timeout(ADMIN_HEAD_TIMEOUT)
                .serve_connection(TokioIo::new(sock), service);
            tokio::select! {
                res = conn => if let Err(err) = res { debug!(%err, "admin connection ended with an error") },
                _ = admin.shutdown.cancelled() => {}
            }
        });
    }
}

async fn sample_loop(admin: Arc<Admin>) {
    let mut ticks = tokio::time::interval(SAMPLE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = admin.shutdown.cancelled() => return,
        }
        admin.source.refresh();
        let now = tokio::time::Instant::now();
        admin.metrics.sample(now - last);
        last = now;
    }
}

impl Admin {
    fn handle(self: &Arc<Self>, req: &Request<Incoming>) -> Response<AdminBody> {
        if let Some(refusal) = self.refusal(req) {
            return refusal;
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET only\n".into(),
            );
        }
        match req.uri().path() {
            "/" | "/index.html" => {
                let mut response = text(
                    StatusCode::OK,
                    "text/html; charset=utf-8",
                    DASHBOARD_HTML.into(),
                );
                if let Some(token) = self.query_token(req) {
                    // Checked by `refusal`: it is the right token.
                    let cookie =
                        format!("{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict");
                    if let Ok(value) = HeaderValue::from_str(&cookie) {
                        response.headers_mut().insert("set-cookie", value);
                    }
                }
                response
            }
            "/app.js" => text(
                StatusCode::OK,
                "text/javascript; charset=utf-8",
                DASHBOARD_JS.into(),
            ),
            "/style.css" => text(
                StatusCode::OK,
                "text/css; charset=utf-8",
                DASHBOARD_CSS.into(),
            ),
            "/metrics" if wants_openmetrics(req) => text(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.metrics.encode(),
            ),
            "/metrics" => text(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics.encode_prometheus(),
            ),
            "/api/status" => json_response(&self.status()),
            "/api/history" => json_response(&json!({
                "interval_s": SAMPLE_INTERVAL.as_secs(),
                "kites": self.metrics.history(None),
            })),
            "/api/live" => self.live(),
            _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        }
    }

    /// The full status document.
    fn status(&self) -> Value {
        let mut status = self.source.status();
        let totals: serde_json::Map<String, Value> = self
            .metrics
            .kite_totals()
            .into_iter()
            .map(|(name, totals)| (name, json!(totals)))
            .collect();
        if let Some(kites) = status.get_mut("kites").and_then(Value::as_array_mut) {
            for kite in kites {
                let name = kite.get("name").and_then(Value::as_str).unwrap_or_default();
                let counted = totals
                    .get(name)
                    .cloned()
                    .unwrap_or_else(|| json!(super::KiteTotals::default()));
                if let Some(kite) = kite.as_object_mut() {
                    kite.insert("totals".into(), counted);
                }
            }
        }
        if let Some(object) = status.as_object_mut() {
            object.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
            object.insert("uptime_s".into(), json!(self.metrics.uptime().as_secs()));
            object.insert("started".into(), json!(self.metrics.started_unix()));
            object.insert("now".into(), json!(super::unix_now()));
            object.insert("kite_totals".into(), Value::Object(totals));
            object.insert("links".into(), json!(self.metrics.links()));
            object.insert("errors".into(), json!(self.metrics.recent_errors()));
            object.insert("activity".into(), json!(self.metrics.recent_activity()));
            object.insert("latest".into(), json!(self.metrics.history(Some(1))));
        }
        status
    }

    /// `/api/live`: a status snapshot every second until the client goes
    /// or the node stops.
    fn live(self: &Arc<Self>) -> Response<AdminBody> {
        let (sender, receiver) = mpsc::channel::<Bytes>(2);
        let admin = self.clone();
        self.tracker.spawn(async move {
            let mut ticks = tokio::time::interval(LIVE_INTERVAL);
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    _ = admin.shutdown.cancelled() => return,
                    _ = sender.closed() => return,
                }
                let data = format!("data: {}\n\n", admin.status());
                if sender.try_send(Bytes::from(data)).is_err() && sender.is_closed() {
                    return;
                }
            }
        });
        let mut response = Response::new(ChannelBody { receiver }.boxed_unsync());
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }

    /// The refusal of a request not from the admin server's callers.
    fn refusal(&self, req: &Request<Incoming>) -> Option<Response<AdminBody>> {
        let headers = req.headers();
        let mut hosts = headers.get_all(hyper::header::HOST).iter();
        let host = hosts.next().and_then(|h| h.to_str().ok());
        if hosts.next().is_some() || host.is_none() {
            return Some(text(
                StatusCode::BAD_REQUEST,
                "text/plain",
                "one Host header, please\n".into(),
            ));
        }
        let host = host.unwrap_or_default();
        if self.loopback && !loopback_host(host) {
            return Some(text(
                StatusCode::MISDIRECTED_REQUEST,
                "text/plain",
                "this admin server answers only requests for localhost, 127.0.0.1 or [::1] \
                 (a browser sent this for another name: DNS rebinding?)\n"
                    .into(),
            ));
        }
        for origin in headers.get_all(hyper::header::ORIGIN) {
            let same = origin
                .to_str()
                .ok()
                .and_then(|o| {
                    o.strip_prefix("http://")
                        .or_else(|| o.strip_prefix("https://"))
                })
                .is_some_and(|o| o.eq_ignore_ascii_case(host));
            if !same {
                return Some(text(
                    StatusCode::FORBIDDEN,
                    "text/plain",
                    "requests from other sites' pages are refused\n".into(),
                ));
            }
        }
        let cross_site = headers
            .get("sec-fetch-site")
            .is_some_and(|site| !matches!(site.as_bytes(), b"same-origin" | b"none"));
        if cross_site {
            return Some(text(
                StatusCode::FORBIDDEN,
                "text/plain",
                "cross-site requests are refused\n".into(),
            ));
        }
        if let Some(token) = &self.token {
            let given = [
                headers
                    .get(hyper::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer ")),
                headers
                    .get("x-kitepipe-token")
                    .and_then(|v| v.to_str().ok()),
                cookie(req, TOKEN_COOKIE),
                self.query_token(req),
            ];
            let ok = given
                .iter()
                .flatten()
                .any(|given| same_secret(given.as_bytes(), token.as_bytes()));
            if !ok {
                let mut response = text(
                    StatusCode::UNAUTHORIZED,
                    "text/plain",
                    "this admin server needs its token: Authorization: Bearer TOKEN, \
                     or open /?token=TOKEN once in a browser\n"
                        .into(),
                );
                response
                    .headers_mut()
                    .insert("www-authenticate", HeaderValue::from_static("Bearer"));
                return Some(response);
            }
        }
        None
    }

    /// The `token` query parameter, if any.
    fn query_token<'a>(&self, req: &'a Request<Incoming>) -> Option<&'a str> {
        req.uri()
            .query()?
            .split('&')
            .find_map(|pair| pair.strip_prefix("token="))
    }
}

/// Whether the scraper asks for OpenMetrics (Prometheus does).
fn wants_openmetrics(req: &Request<Incoming>) -> bool {
    req.headers()
        .get_all(hyper::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

/// The value of cookie `name`.
fn cookie<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers()
        .get_all(hyper::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (key, value) = pair.trim().split_once('=')?;
            (key == name).then_some(value)
        })
}

/// A body fed by a channel (the live feed).
struct ChannelBody {
    receiver: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.receiver
            .poll_recv(cx)
            .map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<AdminBody> {
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    response
}

fn json_response(value: &Value) -> Response<AdminBody> {
    text(StatusCode::OK, "application/json", value.to_string())
}
