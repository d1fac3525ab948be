//! Visitors speaking HTTP/2: on a terminated kite whose visitor chose h2
//! by ALPN, and h2c with prior knowledge on the plain HTTP port.
//!
//! A hyper HTTP/2 server serves the visitor's connection. Each request is
//! routed by its `:authority` (or `Host`) to an http kite; the first routed
//! request fixes the connection's kite, later ones for another kite get
//! 421 (like keep-alive on the HTTP/1 path). The kite's visitor policy (IP
//! lists) and HTTP rules (connections, basic auth, rate, header edits) are
//! answered here, before anything reaches the link. Requests go to the
//! local service over link streams: with `backend = "h2c"` one HTTP/2
//! client connection per visitor connection carries them all (trailers
//! pass, so gRPC works); otherwise each goes as HTTP/1.1 on a small pool of
//! link streams ([`HTTP1_POOL`], 8). HTTP/1.1 visitors of an h2c kite are
//! served here too (hyper's HTTP/1 server, [`serve_http1`]), translated.
//! Bodies stream both ways; a backend failure is a 502 for that request
//! only.
//!
//! Every refusal is a styled page: 400 no host, 403 policy, 404 unknown
//! kite, 405 CONNECT, 421 another kite, 401/429 from the HTTP rules, 502
//! backend failure, 503 offline.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1 as client1, http2 as client2};
use hyper::header::{HOST, HeaderMap, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use kitepipe_proto::frame::ResetCode;
use kitepipe_proto::http_policy::{BackendProtocol, HeaderRules};
use kitepipe_proto::http1;
use kitepipe_proto::kite::KiteProto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug};

use super::RelayCtx;
use super::http_policy::{ConnPermit, HttpRules, Refusal};
use super::registry::{Backend, Lookup};
use super::visitor::{NotOpened, open_visitor_stream};
use super::{HEAD_TIMEOUT, IDLE_TIMEOUT};
use crate::link::{MuxStream, StreamReset};
use crate::metrics::access::AccessRequest;
use crate::metrics::{KiteMetrics, OpenConnection};
use crate::sync;

/// The scheme the visitor used, for `X-Forwarded-Proto` and redirects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scheme {
    /// Plain HTTP (h2c prior knowledge).
    Http,
    /// TLS terminated by the relay.
    Https,
}

impl Scheme {
    /// `http` or `https`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// The HTTP/2 connection preface a client sends first (RFC 9113 3.4).
pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Streams one visitor connection may have open at once (the server's
/// SETTINGS_MAX_CONCURRENT_STREAMS). Browsers open well under 100 to one
/// origin (nginx and hyper's clients assume 100); each open stream can hold
/// a link stream and up to [`STREAM_WINDOW`] of buffered body.
const MAX_CONCURRENT_STREAMS: u32 = 100;

/// The largest header list a visitor may send (decoded names and values,
/// RFC 9113 SETTINGS_MAX_HEADER_LIST_SIZE), and a backend may answer: the
/// HTTP/1 path's head bound, so both paths accept the same requests. A
/// larger block (e.g. endless CONTINUATION frames) is refused while it is
/// decoded, never buffered whole.
const MAX_HEADER_LIST: u32 = http1::MAX_HEAD_LEN as u32;

/// Streams a visitor may reset before the relay got to serve them, at any
/// one time (hyper's default; the rapid-reset defence, CVE-2023-44487):
/// past it the connection ends with GOAWAY ENHANCE_YOUR_CALM.
const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;

/// Streams the relay may reset because the visitor broke the protocol on
/// them, over a connection's life (h2's default): a visitor that makes
/// the relay send RST_STREAM over and over is cut.
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// Flow-control windows offered to the visitor: how much request body one
/// stream, and the whole connection, may send before the relay has
/// forwarded it, so the most request body a visitor can make the relay
/// hold per connection is [`CONNECTION_WINDOW`]. 1 MiB per stream keeps
/// one upload at about 10 MB/s over a 100 ms path (hyper's defaults are
/// 1 MiB and 1 MiB); the connection's 2 MiB lets two share it at that rate.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 2 * 1024 * 1024;

/// Response bytes queued per stream towards a visitor that does not read
/// (hyper's default is 400 KiB): the backend is read no further ahead. With
/// [`MAX_CONCURRENT_STREAMS`] streams a visitor that never reads holds at
/// most 6.25 MiB of responses, so one hostile connection costs the relay
/// under 9 MiB with the request window; the kernel's socket buffer keeps a
/// single fast download flowing past this small queue.
const MAX_SEND_BUF: usize = 64 * 1024;

/// How often an HTTP/2 connection (visitor or backend) is pinged, and how
/// long a ping may go unanswered before the connection is closed: a
/// vanished peer is noticed even while a long response streams.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// HTTP/1.1 connections (link streams) to the local service one visitor
/// connection may use at once when the kite's backend is HTTP/1: requests
/// past it wait for one to be free. A browser's HTTP/1 limit is 6 per
/// host, so an h2 visitor gets a little more than it would over HTTP/1.
/// Each link stream may hold the link's stream window (1 MiB) of response
/// at the relay for a visitor that does not read, so this bounds what one
/// visitor connection costs the relay at 8 MiB, not one link stream per
/// [`MAX_CONCURRENT_STREAMS`].
const HTTP1_POOL: usize = 8;

/// How long a closing connection (relay shutdown, idle visitor) may take
/// to finish its open streams after GOAWAY before it is dropped.
const GOAWAY_GRACE: Duration = Duration::from_secs(10);

/// Serves one HTTP/2 visitor connection until it ends. `io` has not been
/// read from (for h2c, bytes already read are replayed by the caller).
/// `local` is the relay's address the visitor connected to; `sni` the
/// name a terminated connection's TLS was opened for, which every
/// request's authority must be (else 421, as on the HTTP/1 path).
pub(crate) async fn serve<IO>(
    io: IO,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    scheme: Scheme,
    sni: Option<&str>,
    ctx: Arc<RelayCtx>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (conn, idle) = Conn::new(peer, local, scheme, sni, ctx);
    let mut builder = hyper::server::conn::http2::Builder::new(conn.exec.clone());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESET_STREAMS)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_send_buf_size(MAX_SEND_BUF)
        .keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT);
    let token = conn.token.clone();
    // Ends the connection's backend connections with it.
    let _cancel = token.clone().drop_guard();
    let connection = builder.serve_connection(TokioIo::new(io), service(conn));
    tokio::pin!(connection);
    drive(connection, |c| c.graceful_shutdown(), &token, idle).await;
}

/// Whether an HTTP/1 visitor routed to `backends` is served here (by
/// [`serve_http1`]) rather than by the strict HTTP/1 path: when the kite's
/// local service speaks only HTTP/2 (`backend = "h2c"`), so its requests
/// must be translated.
pub(crate) fn wants_translation(backends: &[Backend]) -> bool {
    backends
        .first()
        .is_some_and(|backend| backend.http.backend() == BackendProtocol::H2c)
}

/// Serves one HTTP/1.1 visitor connection of an h2c kite (hyper's HTTP/1
/// server; requests translated to HTTP/2) until it ends; like [`serve`]
/// otherwise. `io` replays the bytes the caller already read.
pub(crate) async fn serve_http1<IO>(
    io: IO,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    scheme: Scheme,
    sni: Option<&str>,
    ctx: Arc<RelayCtx>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (conn, idle) = Conn::new(peer, local, scheme, sni, ctx);
    let token = conn.token.clone();
    // Ends the connection's backend connections with it.
    let _cancel = token.clone().drop_guard();
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        // The strict path's bounds: a head within HEAD_TIMEOUT and
        // MAX_HEAD_LEN (hyper's smallest buffer is 8 KiB).
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(http1::MAX_HEAD_LEN)
        .max_headers(http1::MAX_HEADERS)
        .serve_connection(TokioIo::new(io), service(conn));
    tokio::pin!(connection);
    drive(connection, |c| c.graceful_shutdown(), &token, idle).await;
}

/// Runs a visitor connection until it ends, the relay shuts down or it
/// stays idle too long; then asks it to finish (`graceful`: GOAWAY, or
/// closing after the current response) and waits [`GOAWAY_GRACE`] at most.
async fn drive<F>(
    mut connection: Pin<&mut F>,
    graceful: impl FnOnce(Pin<&mut F>),
    token: &CancellationToken,
    mut idle: watch::Receiver<Activity>,
) where
    F: Future<Output = Result<(), hyper::Error>>,
{
    tokio::select! {
        res = connection.as_mut() => {
            if let Err(err) = res {
                debug!(%err, "visitor connection ended with an error");
            }
            return;
        }
        _ = token.cancelled() => debug!("relay shutting down; closing visitor"),
        _ = idle_for_too_long(&mut idle) => debug!("visitor idle; closing"),
    }
    graceful(connection.as_mut());
    match tokio::time::timeout(GOAWAY_GRACE, connection).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => debug!(%err, "visitor connection ended with an error"),
        Err(_) => debug!("visitor did not finish in time after GOAWAY; dropping it"),
    }
}

/// How much the first read of a plain-TCP visitor asks for.
const FIRST_READ: usize = 4096;

/// Reads from `io` into `buf` until `buf` either starts with the HTTP/2
/// preface (`Some(true)`) or cannot (`Some(false)`: an HTTP/1 head, to be
/// parsed from `buf`); `None` when the visitor left or stalled first.
/// Reads nothing when `buf` already tells (an HTTP/1 method other than
/// `PRI` differs from the preface in its first two bytes).
pub(crate) async fn sniff_preface<IO>(io: &mut IO, buf: &mut BytesMut) -> Option<bool>
where
    IO: AsyncRead + Unpin,
{
    let deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
    while buf.len() < PREFACE.len() && PREFACE.starts_with(buf) {
        // Room for a whole request head in one read (as the HTTP/1 path's
        // first read has): asking for only the preface's 24 bytes would
        // cost every plain HTTP/1 visitor a second read and a reallocation.
        buf.reserve(FIRST_READ);
        match tokio::time::timeout_at(deadline, io.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return None,
        }
    }
    Some(buf.starts_with(PREFACE))
}

/// A stream whose first reads return `prefix` (bytes the caller already
/// read from `inner`), then `inner`'s; writes go to `inner`.
pub(crate) struct Rewind<IO> {
    prefix: Bytes,
    inner: IO,
}

impl<IO> Rewind<IO> {
    /// Replays `prefix` before reading `inner`.
    pub(crate) fn new(prefix: Bytes, inner: IO) -> Rewind<IO> {
        Rewind { prefix, inner }
    }

    /// The stream underneath (its socket options, its address).
    pub(crate) fn inner(&self) -> &IO {
        &self.inner
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Applies header edits: `set` replaces every field of the name, `remove`
/// drops them. Names or values that are not valid HTTP are skipped (the
/// rules are checked when the claim is accepted).
pub(crate) fn apply_header_rules(headers: &mut HeaderMap, rules: &HeaderRules) {
    for name in &rules.remove {
        if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
            headers.remove(name);
        }
    }
    for (name, value) in &rules.set {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(name, value);
        }
    }
}

/// A response body towards the visitor.
type VisitorBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// Spawns hyper's tasks (one per stream, backend connections) on the
/// relay's tracker, in the visitor connection's span.
#[derive(Clone)]
struct TrackerExec(TaskTracker);

impl<F> hyper::rt::Executor<F> for TrackerExec
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.spawn(fut.in_current_span());
    }
}

/// What a visitor connection is doing, for its idle bound.
#[derive(Debug, Clone, Copy, Default)]
struct Activity {
    /// Requests whose response has not ended.
    open: usize,
    /// Requests so far.
    requests: u64,
}

/// Counts one request as open until dropped (with its response body).
struct Active(Arc<watch::Sender<Activity>>);

impl Active {
    fn new(activity: &Arc<watch::Sender<Activity>>) -> Active {
        activity.send_modify(|now| {
            now.open += 1;
            now.requests += 1;
        });
        Active(activity.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.send_modify(|now| now.open -= 1);
    }
}

/// Resolves once the connection has had no open request for too long:
/// [`HEAD_TIMEOUT`] before its first request (a visitor that connects and
/// sends no complete request, e.g. a header frame dripped byte by byte),
/// [`IDLE_TIMEOUT`] after (pings do not count). Cancel-safe.
async fn idle_for_too_long(activity: &mut watch::Receiver<Activity>) {
    loop {
        let now = *activity.borrow_and_update();
        if now.open == 0 {
            let patience = if now.requests == 0 {
                HEAD_TIMEOUT
            } else {
                IDLE_TIMEOUT
            };
            tokio::select! {
                _ = tokio::time::sleep(patience) => return,
                res = activity.changed() => if res.is_err() { std::future::pending::<()>().await },
            }
        } else if activity.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// One visitor connection, shared by its requests.
struct Conn {
    peer: SocketAddr,
    local: Option<SocketAddr>,
    scheme: Scheme,
    /// The name a terminated connection's TLS was opened for.
    sni: Option<String>,
    ctx: Arc<RelayCtx>,
    exec: TrackerExec,
    /// The kite the first routed request chose, then every request's.
    route: tokio::sync::Mutex<Option<Arc<Route>>>,
    /// Open requests, for the idle bound.
    activity: Arc<watch::Sender<Activity>>,
    /// Cancelled when the visitor connection ends: ends its backend
    /// connections.
    token: CancellationToken,
}

impl Conn {
    /// A visitor connection's state, and the receiver of its activity
    /// for [`idle_for_too_long`].
    fn new(
        peer: SocketAddr,
        local: Option<SocketAddr>,
        scheme: Scheme,
        sni: Option<&str>,
        ctx: Arc<RelayCtx>,
    ) -> (Arc<Conn>, watch::Receiver<Activity>) {
        let (activity, idle) = watch::channel(Activity::default());
        let conn = Conn {
            peer,
            local,
            scheme,
            sni: sni.map(str::to_string),
            exec: TrackerExec(ctx.tracker.clone()),
            token: ctx.token.child_token(),
            ctx,
            route: tokio::sync::Mutex::new(None),
            activity: Arc::new(activity),
        };
        (Arc::new(conn), idle)
    }
}

/// The hyper service answering a connection's requests.
fn service(
    conn: Arc<Conn>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Tracked>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Tracked>, Infallible>> + Send,
> + Clone {
    service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(conn, req).await) }
    })
}

/// The kite a connection's requests go to.
struct Route {
    /// The name the first request asked for.
    host: String,
    /// The backends serving it, the one routed to first (its policy and
    /// rules apply); link streams fail over to the others.
    backends: Vec<Backend>,
    /// The kite's connection slot (max_connections), held while the
    /// visitor connection is open.
    _permit: ConnPermit,
    /// Counts the visitor connection open on the kite's series.
    _open: OpenConnection,
    upstream: Upstream,
}

impl Route {
    fn rules(&self) -> &HttpRules {
        &self.backends[0].http
    }
}

/// How requests reach the local service.
enum Upstream {
    /// One HTTP/2 connection over one link stream, opened by the first
    /// request (again if it closed).
    H2c(tokio::sync::Mutex<Option<client2::SendRequest<Incoming>>>),
    /// HTTP/1.1 connections over link streams, reused.
    Http1(Pool),
}

/// A visitor connection's HTTP/1.1 connections to the local service:
/// at most [`HTTP1_POOL`] in use, idle ones reused.
struct Pool {
    idle: Arc<Mutex<Vec<client1::SendRequest<Incoming>>>>,
    slots: Arc<Semaphore>,
}

/// An HTTP/1.1 connection in use by one request; back to the pool when
/// dropped after its response ended cleanly.
struct Checkout {
    sender: Option<client1::SendRequest<Incoming>>,
    idle: Arc<Mutex<Vec<client1::SendRequest<Incoming>>>>,
    _slot: OwnedSemaphorePermit,
    reusable: bool,
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(sender) = self.sender.take()
            && self.reusable
            && !sender.is_closed()
        {
            sync::lock(&self.idle).push(sender);
        }
    }
}

/// A response body towards the visitor, holding the request's resources
/// until it ends: its [`Active`] count, and its HTTP/1 connection (reused
/// only if the body ended).
struct Tracked {
    inner: VisitorBody,
    checkout: Option<Checkout>,
    _active: Active,
    /// The kite's counters and access log line, for a forwarded response.
    account: Option<Account>,
}

/// A forwarded response's bookkeeping: bytes to the visitor counted as
/// they go, the access log line written when the body ends (or is
/// dropped).
struct Account {
    metrics: KiteMetrics,
    access: Option<AccessRequest>,
    status: u16,
    sent: u64,
}

impl Drop for Account {
    fn drop(&mut self) {
        if let Some(line) = self.access.take() {
            line.done(self.status, self.sent);
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let res = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &res
            && let Some(data) = frame.data_ref()
            && let Some(account) = &mut self.account
        {
            let n = data.len() as u64;
            account.sent += n;
            account.metrics.bytes_out(n);
        }
        if let Poll::Ready(None) = res
            && let Some(checkout) = &mut self.checkout
        {
            checkout.reusable = true;
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.inner.is_end_stream()
            && let Some(checkout) = &mut self.checkout
        {
            checkout.reusable = true;
        }
    }
}

/// Answers one request: a page from the relay, or the backend's response.
async fn handle(conn: Arc<Conn>, req: Request<Incoming>) -> Response<Tracked> {
    let active = Active::new(&conn.activity);
    let (response, checkout, account) = match forward(&conn, req).await {
        Ok(answer) => answer,
        Err(page) => (page, None, None),
    };
    response.map(|inner| Tracked {
        inner,
        checkout,
        _active: active,
        account,
    })
}

/// A page from the relay instead of the backend's answer.
type Page = Response<VisitorBody>;

/// Routes, checks and forwards one request; the backend's response (with
/// the HTTP/1 connection it holds), or the page that answers instead.
async fn forward(
    conn: &Conn,
    req: Request<Incoming>,
) -> Result<(Response<VisitorBody>, Option<Checkout>, Option<Account>), Page> {
    if req.method() == Method::CONNECT {
        return Err(page(
            405,
            "Method Not Allowed",
            "CONNECT is not supported over HTTP/2 on this relay.",
            &[],
        ));
    }
    let authority = authority_of(&req).ok_or_else(|| {
        page(
            400,
            "Bad Request",
            "The request has no Host header, so kitepipe cannot tell which site you want.",
            &[],
        )
    })?;
    let host = http1::route_authority(authority.as_bytes()).map_err(|err| {
        page(
            400,
            "Bad Request",
            &format!("kitepipe could not read this request: {err}."),
            &[],
        )
    })?;
    let route = route(conn, &host)
        .await
        .inspect_err(|page| count_refusal(conn, &host, page))?;
    let rules = route.rules();
    if conn.scheme == Scheme::Http && rules.https_redirect() {
        let path = req.uri().path_and_query().map_or("/", |path| path.as_str());
        let location = format!("https://{authority}{path}");
        let detail = format!("{host} is served over HTTPS: {location}");
        return Err(page(
            308,
            "Permanent Redirect",
            &detail,
            &[("Location", location.clone())],
        ));
    }
    let authorization = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .map(|value| value.as_bytes().to_vec());
    if let Err(refusal) = rules
        .request(conn.peer.ip(), authorization.as_deref())
        .await
    {
        let page = refusal_page(&refusal, &host);
        count_refusal(conn, &host, &page);
        return Err(page);
    }
    let access = conn.ctx.access.get().map(|log| {
        let target = req.uri().path_and_query().map_or("/", |path| path.as_str());
        log.request(conn.peer.ip(), &host, req.method().as_str(), target)
    });
    let protocol = match route.upstream {
        Upstream::H2c(_) => BackendProtocol::H2c,
        Upstream::Http1(_) => BackendProtocol::Http1,
    };
    let req = backend_request(req, conn, &authority, rules, protocol);
    debug!(%host, method = %req.method(), path = %req.uri().path(), "h2 request");
    let (response, checkout) = match &route.upstream {
        Upstream::H2c(slot) => (send_h2c(conn, &route, slot, req).await?, None),
        Upstream::Http1(pool) => {
            let (response, checkout) = send_http1(conn, &route, pool, req).await?;
            (response, Some(checkout))
        }
    };
    let (mut parts, body) = response.into_parts();
    apply_header_rules(&mut parts.headers, rules.response_headers());
    let metrics = route.backends[0].metrics.clone();
    metrics.request(parts.status.as_u16());
    let account = Account {
        metrics,
        access,
        status: parts.status.as_u16(),
        sent: 0,
    };
    Ok((
        Response::from_parts(parts, body.boxed_unsync()),
        checkout,
        Some(account),
    ))
}

/// Counts the relay's own refusal `page` of a request for `host` (by its
/// status), as the HTTP/1 path does.
fn count_refusal(conn: &Conn, host: &str, page: &Page) {
    use crate::metrics::Refusal as Why;
    let why = match page.status().as_u16() {
        401 => Why::Unauthorized,
        403 => Why::Forbidden,
        429 => Why::RateLimited,
        404 => Why::Unknown,
        503 => Why::Offline,
        _ => return,
    };
    conn.ctx.registry.metrics.refusal(host, why);
}

/// The authority a request is for: its `:authority`, else its `Host`.
fn authority_of(req: &Request<Incoming>) -> Option<String> {
    if let Some(authority) = req.uri().authority() {
        return Some(authority.as_str().to_string());
    }
    let mut hosts = req.headers().get_all(HOST).iter();
    let host = hosts.next()?;
    if hosts.next().is_some() {
        return None;
    }
    host.to_str().ok().map(str::to_string)
}

/// The connection's route for a request to `host`: the one the first
/// routed request chose (if `host` routes to the same kite on the same
/// link), or a new one if none was chosen yet.
async fn route(conn: &Conn, host: &str) -> Result<Arc<Route>, Page> {
    if let Some(sni) = &conn.sni
        && !sni.eq_ignore_ascii_case(host)
    {
        debug!(%sni, %host, "h2 request for another name than the TLS connection's");
        let detail = format!("This connection was opened for {sni}; open a new one for {host}.");
        return Err(page(421, "Misdirected Request", &detail, &[]));
    }
    let mut slot = conn.route.lock().await;
    if let Some(route) = slot.as_ref() {
        if route.host == host || same_kite(conn, route, host) {
            return Ok(route.clone());
        }
        debug!(first = %route.host, %host, "h2 request for another kite");
        let detail = format!(
            "This connection was opened for {}; open a new connection for {host}.",
            route.host
        );
        return Err(page(421, "Misdirected Request", &detail, &[]));
    }
    let backends = match conn.ctx.registry.lookup_name(KiteProto::Http, host) {
        Lookup::Found(backends) if !backends.is_empty() => backends,
        Lookup::Found(_) | Lookup::Offline => {
            let detail = format!(
                "The site {host} is known to this relay, but no connector is serving it right now. Try again later."
            );
            return Err(page(503, "Kite offline", &detail, &[]));
        }
        Lookup::Unknown => {
            let detail = format!("This relay does not serve {host}. Check the address.");
            return Err(page(404, "Unknown kite", &detail, &[]));
        }
    };
    let first = &backends[0];
    // The same check `open_visitor_stream` makes, here before any rule
    // answers: a refused address learns nothing more about the kite.
    if !first.policy.admits(conn.peer.ip()) {
        debug!(node = %first.node, kite = %first.kite, peer = %conn.peer, "visitor refused by the kite's policy");
        return Err(forbidden(host, conn.peer));
    }
    let permit = first
        .http
        .connection()
        .map_err(|refusal| refusal_page(&refusal, host))?;
    let upstream = match first.http.backend() {
        BackendProtocol::H2c => Upstream::H2c(tokio::sync::Mutex::new(None)),
        BackendProtocol::Http1 => Upstream::Http1(Pool {
            idle: Arc::new(Mutex::new(Vec::new())),
            slots: Arc::new(Semaphore::new(HTTP1_POOL)),
        }),
    };
    debug!(node = %first.node, %host, "h2 visitor routed");
    let route = Arc::new(Route {
        host: host.to_string(),
        _open: first.metrics.connection(),
        backends,
        _permit: permit,
        upstream,
    });
    *slot = Some(route.clone());
    Ok(route)
}

/// Whether `host` routes to the route's kite on the same link (another
/// name under one wildcard, say).
fn same_kite(conn: &Conn, route: &Route, host: &str) -> bool {
    let routed = &route.backends[0];
    match conn.ctx.registry.lookup_name(KiteProto::Http, host) {
        Lookup::Found(backends) => backends
            .iter()
            .any(|b| b.link == routed.link && b.kite == routed.kite),
        Lookup::Offline | Lookup::Unknown => false,
    }
}

/// The request as the local service gets it: the relay's own
/// `X-Forwarded-For` and `X-Forwarded-Proto` (and `X-Forwarded-Host` when
/// asked) instead of the visitor's, the kite's header edits, and the form
/// the backend protocol wants (HTTP/1.1: origin-form target and `Host`;
/// h2c: absolute URI, no `Host`).
fn backend_request(
    req: Request<Incoming>,
    conn: &Conn,
    authority: &str,
    rules: &HttpRules,
    protocol: BackendProtocol,
) -> Request<Incoming> {
    let (mut parts, body) = req.into_parts();
    let headers = &mut parts.headers;
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            http1::is_forwarding_field(name.as_str().as_bytes())
                || http1::is_kitepipe_field(name.as_str().as_bytes())
        })
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
    let client_ip = conn.peer.ip().to_canonical().to_string();
    // An IP address and a scheme literal are valid header values.
    headers.insert(
        "x-forwarded-for",
        HeaderValue::from_str(&client_ip).expect("an IP address is a header value"),
    );
    headers.insert(
        "x-forwarded-proto",
        HeaderValue::from_static(conn.scheme.as_str()),
    );
    let authority_value = HeaderValue::from_str(authority).ok();
    if rules.forwarded_host()
        && let Some(value) = &authority_value
    {
        headers.insert("x-forwarded-host", value.clone());
    }
    apply_header_rules(headers, rules.request_headers());
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |path| path.as_str())
        .to_string();
    match protocol {
        BackendProtocol::Http1 => {
            parts.version = Version::HTTP_11;
            if let Ok(uri) = path.parse::<Uri>() {
                parts.uri = uri;
            }
            if let Some(value) = authority_value {
                parts.headers.insert(HOST, value);
            }
        }
        BackendProtocol::H2c => {
            parts.version = Version::HTTP_2;
            parts.headers.remove(HOST);
            if let Ok(uri) = Uri::builder()
                .scheme(conn.scheme.as_str())
                .authority(authority)
                .path_and_query(path)
                .build()
            {
                parts.uri = uri;
            }
        }
    }
    Request::from_parts(parts, body)
}

/// Opens a link stream to the route's kite.
async fn open_stream(conn: &Conn, route: &Route) -> Result<MuxStream, Page> {
    match open_visitor_stream(&route.backends, Some(&route.host), conn.peer, conn.local).await {
        Ok((stream, _)) => Ok(stream),
        Err(NotOpened::Refused) => Err(forbidden(&route.host, conn.peer)),
        Err(NotOpened::Unreachable) => {
            let detail = format!(
                "No connector serving {} is reachable right now. Try again later.",
                route.host
            );
            Err(page(503, "Kite offline", &detail, &[]))
        }
    }
}

/// Runs a backend connection until it ends or the visitor connection does.
fn spawn_backend_connection<F>(conn: &Conn, connection: F)
where
    F: Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    let token = conn.token.clone();
    conn.exec.0.spawn(
        async move {
            tokio::select! {
                res = connection => if let Err(err) = res {
                    debug!(%err, "backend connection ended with an error");
                },
                _ = token.cancelled() => {}
            }
        }
        .in_current_span(),
    );
}

/// Sends a request on the route's h2c connection, opening it first if
/// there is none (or it closed).
async fn send_h2c(
    conn: &Conn,
    route: &Route,
    slot: &tokio::sync::Mutex<Option<client2::SendRequest<Incoming>>>,
    req: Request<Incoming>,
) -> Result<Response<Incoming>, Page> {
    let sender = {
        let mut slot = slot.lock().await;
        match slot.as_ref() {
            Some(sender) if !sender.is_closed() => sender.clone(),
            _ => {
                let stream = open_stream(conn, route).await?;
                let mut builder = client2::Builder::new(conn.exec.clone());
                builder
                    .timer(TokioTimer::new())
                    .max_header_list_size(MAX_HEADER_LIST)
                    .initial_stream_window_size(STREAM_WINDOW)
                    .initial_connection_window_size(CONNECTION_WINDOW)
                    .max_send_buf_size(MAX_SEND_BUF)
                    .keep_alive_interval(KEEP_ALIVE_INTERVAL)
                    .keep_alive_timeout(KEEP_ALIVE_TIMEOUT);
                let (sender, connection) = builder
                    .handshake(TokioIo::new(stream))
                    .await
                    .map_err(|err| bad_gateway(&route.host, &err))?;
                spawn_backend_connection(conn, connection);
                *slot = Some(sender.clone());
                sender
            }
        }
    };
    let mut sender = sender;
    sender
        .ready()
        .await
        .map_err(|err| bad_gateway(&route.host, &err))?;
    sender
        .send_request(req)
        .await
        .map_err(|err| bad_gateway(&route.host, &err))
}

/// Sends a request on an HTTP/1.1 connection from the pool: an idle one,
/// or a new link stream when none is; a request an idle connection closed
/// under before it was sent goes once more on a new one.
async fn send_http1(
    conn: &Conn,
    route: &Route,
    pool: &Pool,
    req: Request<Incoming>,
) -> Result<(Response<Incoming>, Checkout), Page> {
    // The semaphore is never closed.
    let slot = pool
        .slots
        .clone()
        .acquire_owned()
        .await
        .expect("the pool's semaphore is never closed");
    let mut req = req;
    loop {
        let idle = sync::lock(&pool.idle).pop();
        let Some(mut sender) = idle else { break };
        if sender.ready().await.is_err() {
            continue;
        }
        match sender.try_send_request(req).await {
            Ok(response) => {
                let checkout = Checkout {
                    sender: Some(sender),
                    idle: pool.idle.clone(),
                    _slot: slot,
                    reusable: false,
                };
                return Ok((response, checkout));
            }
            Err(mut err) => match err.take_message() {
                Some(unsent) => req = unsent,
                None => return Err(bad_gateway(&route.host, err.error())),
            },
        }
    }
    let stream = open_stream(conn, route).await?;
    let (mut sender, connection) = client1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|err| bad_gateway(&route.host, &err))?;
    spawn_backend_connection(conn, connection);
    let response = sender
        .send_request(req)
        .await
        .map_err(|err| bad_gateway(&route.host, &err))?;
    let checkout = Checkout {
        sender: Some(sender),
        idle: pool.idle.clone(),
        _slot: slot,
        reusable: false,
    };
    Ok((response, checkout))
}

/// A styled page (the HTTP/1 path's, without its `Connection: close`).
fn page(status: u16, title: &str, detail: &str, extra: &[(&'static str, String)]) -> Page {
    let whole = http1::error_response(status, title, detail);
    let body_at = whole
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .map_or(whole.len(), |at| at + 4);
    let body = Bytes::from(whole).slice(body_at..);
    let mut response = Response::new(
        Full::new(body)
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        hyper::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    headers.insert("x-kitepipe-error", HeaderValue::from(status));
    for (name, value) in extra {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(*name, value);
        }
    }
    response
}

/// The page for a refusal by the kite's HTTP rules.
fn refusal_page(refusal: &Refusal, host: &str) -> Page {
    let (status, title, detail, extra) = refusal.page(host);
    page(status, title, &detail, &extra)
}

/// The 403 page for a visitor the kite's policy refuses.
fn forbidden(site: &str, peer: SocketAddr) -> Page {
    let detail = format!(
        "The owner of {site} does not allow visitors from {} to reach it.",
        peer.ip().to_canonical()
    );
    page(403, "Forbidden", &detail, &[])
}

/// The 502 page for a request the backend failed, saying why.
fn bad_gateway(host: &str, err: &hyper::Error) -> Page {
    let detail = match stream_reset(err) {
        Some(reset) if reset.code == ResetCode::TargetUnreachable => format!(
            "The connector serving {host} could not reach its local service: {}.",
            reset.reason
        ),
        Some(reset) => format!(
            "The connector serving {host} refused the request: {}.",
            reset.reason
        ),
        None => format!("The local service of {host} failed to answer: {err}."),
    };
    debug!(%host, %err, "h2 request failed at the backend");
    page(502, "Bad Gateway", &detail, &[])
}

/// The link's stream reset under `err`, if that is what failed.
fn stream_reset(err: &hyper::Error) -> Option<&StreamReset> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(cause) = source {
        if let Some(reset) = cause.downcast_ref::<StreamReset>() {
            return Some(reset);
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>()
            && let Some(reset) = io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<StreamReset>())
        {
            return Some(reset);
        }
        source = cause.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sniff_preface_tells_h2c_from_http1_and_rewind_replays() {
        let cases: [(&[u8], Option<bool>); 5] = [
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nrest", Some(true)),
            (b"GET / HTTP/1.1\r\n\r\n", Some(false)),
            (b"POST / HTTP/1.1\r\n\r\n", Some(false)),
            (b"PRI * HTTP/1.1\r\n\r\n", Some(false)),
            (b"PRI * HT", None),
        ];
        for (input, want) in cases {
            let (mut client, mut server) = tokio::io::duplex(8);
            let input = input.to_vec();
            let writer = tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let _ = client.write_all(&input).await;
                // Dropping `client` ends the stream.
            });
            let mut buf = BytesMut::new();
            assert_eq!(sniff_preface(&mut server, &mut buf).await, want, "{buf:?}");
            if want == Some(true) {
                let mut rewound = Rewind::new(buf.freeze(), server);
                let mut all = Vec::new();
                rewound.read_to_end(&mut all).await.unwrap();
                assert_eq!(all, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nrest");
            } else {
                // The writer may still be blocked on the rest of its input.
                drop(server);
            }
            writer.await.unwrap();
        }
    }

    #[test]
    fn header_rules_set_replaces_and_remove_drops() {
        let mut headers = HeaderMap::new();
        headers.append("cookie", HeaderValue::from_static("a=1"));
        headers.append("x-a", HeaderValue::from_static("old"));
        headers.append("x-a", HeaderValue::from_static("older"));
        headers.append("keep", HeaderValue::from_static("yes"));
        let rules = HeaderRules {
            set: [("X-A".to_string(), "new".to_string())].into(),
            remove: vec!["Cookie".to_string(), "bad name".to_string()],
        };
        apply_header_rules(&mut headers, &rules);
        assert_eq!(headers.get_all("x-a").iter().collect::<Vec<_>>(), ["new"]);
        assert!(headers.get("cookie").is_none());
        assert_eq!(headers["keep"], "yes");
    }
}
