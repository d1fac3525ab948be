//! Visitor HTTP: read a request head, route by Host, forward.
//!
//! Requests are scanned (every head routed by its own Host and rewritten
//! with the relay's own `X-Forwarded-For` and `X-Forwarded-Proto`, body
//! forwarded by its exact length or chunking, then the next head);
//! responses are delimited the same way and matched to their requests in
//! order. Only a backend's 101 answering an upgrade request turns the
//! connection into raw bytes both ways; CONNECT (where enabled) does so for
//! TCP kites. A keep-alive request for another kite than the connection's
//! first gets 421. A kite failing mid-response resets the visitor's
//! connection.
//!
//! Every refusal is an HTTP error page: 400 malformed, 401 the kite's basic
//! auth, 403 CONNECT from where the TCP kites are not reachable (or the
//! kite's allow/deny lists), 404 unknown kite, 405 CONNECT not enabled, 408
//! head too slow, 421 another kite, 429 the kite's rate or connection
//! limit, 431 head too large, 502 target unreachable, 503 offline.
//!
//! A kite's HTTP rules (`http_policy`) are asked before its stream is
//! opened for the first request and before each later one is forwarded;
//! their header edits go into the heads both ways. A kite without rules
//! takes none of those steps (no allocation per request).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use kitepipe_proto::frame::ResetCode;
use kitepipe_proto::http_policy::HeaderRules;
use kitepipe_proto::http1::{
    self, BodyScanner, Forwarded, HttpError, RequestEdits, RequestHead, ResponseBody,
};
use kitepipe_proto::kite::KiteProto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::debug;

use super::h2::Scheme;
use super::http_policy::{ConnPermit, HttpRules};
use super::registry::{Backend, Lookup};
use super::visitor::{NotOpened, open_visitor_stream, reset};
use super::{HEAD_TIMEOUT, IDLE_TIMEOUT, RelayCtx};
use crate::link::{MuxStream, StreamReset};
use crate::tunnel::{ReadSize, SMALL_READ};

/// How many requests of one connection may be forwarded ahead of their
/// responses (pipelining). Browsers do not pipeline and tools send a few;
/// past this the relay stops reading the visitor until responses catch up,
/// so a visitor cannot queue unbounded work for one backend.
const MAX_PIPELINED: usize = 16;

/// What the response side expects next, in request order.
enum Expect {
    /// The response to a forwarded request.
    Response {
        /// The request was a HEAD: its response has no body.
        head: bool,
        /// The request asked for an upgrade: told whether the backend
        /// switched protocols (101), or left the connection HTTP.
        upgrade: Option<oneshot::Sender<bool>>,
        /// Its access log line, when there is an access log.
        access: Option<crate::metrics::access::AccessRequest>,
    },
    /// A refusal of a request that was not forwarded, sent once every
    /// earlier response is through; the connection then ends.
    Refusal(Vec<u8>),
}

/// How the response side ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The exchange is over (or the backend closed between responses): the
    /// visitor gets a FIN.
    Clean,
    /// The kite failed in the middle of a response (link lost, stream
    /// reset, malformed response): the visitor gets a TCP reset, so that a
    /// cut response never looks complete.
    Cut,
}

/// The kite a connection was routed to by its first request.
struct Route {
    host: String,
    backend: Backend,
    /// Counts the connection against the kite's `max_connections`.
    _permit: ConnPermit,
}

/// A visitor's connection as the HTTP/1 path serves it: plain TCP, or
/// TLS the relay terminated (`terminate::Terminated`). Each kind splits
/// its own way (TCP into lock-free owned halves).
pub(crate) trait VisitorConn: Send + 'static {
    /// The receiving half.
    type Reader: AsyncRead + Unpin + Send;
    /// The sending half.
    type Writer: AsyncWrite + Unpin + Send;
    /// The connection whole again (CONNECT's raw bytes, a reset).
    type Io: AsyncRead + AsyncWrite + Unpin + Send;

    /// The relay's address the visitor connected to.
    fn local_addr(&self) -> Option<SocketAddr>;
    /// Splits into halves for the two directions.
    fn split(self) -> (Self::Reader, Self::Writer);
    /// Puts the halves of one connection back together.
    fn reunite(reader: Self::Reader, writer: Self::Writer) -> Option<Self::Io>;
    /// Closes with a TCP reset (see `visitor::reset`).
    fn reset(io: Self::Io);
}

impl VisitorConn for TcpStream {
    type Reader = OwnedReadHalf;
    type Writer = OwnedWriteHalf;
    type Io = TcpStream;

    fn local_addr(&self) -> Option<SocketAddr> {
        TcpStream::local_addr(self).ok()
    }

    fn split(self) -> (OwnedReadHalf, OwnedWriteHalf) {
        self.into_split()
    }

    fn reunite(reader: OwnedReadHalf, writer: OwnedWriteHalf) -> Option<TcpStream> {
        reader.reunite(writer).ok()
    }

    fn reset(io: TcpStream) {
        reset(io);
    }
}

/// Serves a visitor on plain TCP (`buf`: bytes already read): a
/// connection that opens with the HTTP/2 preface (h2c with prior
/// knowledge) goes to `h2`, anything else is HTTP/1.
pub(crate) async fn serve_plain(
    mut sock: TcpStream,
    mut buf: BytesMut,
    peer: SocketAddr,
    ctx: Arc<RelayCtx>,
) {
    match super::h2::sniff_preface(&mut sock, &mut buf).await {
        Some(true) => {
            let local = sock.local_addr().ok();
            let io = super::h2::Rewind::new(buf.freeze(), sock);
            super::h2::serve(io, peer, local, Scheme::Http, None, ctx).await;
        }
        Some(false) => serve(sock, buf, peer, Scheme::Http, None, ctx).await,
        None => {}
    }
}

/// Serves one visitor connection; `buf` holds bytes already read.
/// `scheme`: how the visitor reached the relay (`X-Forwarded-Proto`, the
/// redirect to HTTPS); `sni`: the name a terminated connection's TLS was
/// for, which the first request's Host must be (else 421).
pub(crate) async fn serve<S: VisitorConn>(
    sock: S,
    mut buf: BytesMut,
    peer: SocketAddr,
    scheme: Scheme,
    sni: Option<&str>,
    ctx: Arc<RelayCtx>,
) {
    let local = sock.local_addr();
    let (mut reader, mut writer) = sock.split();
    let head = match read_first_head(&mut reader, &mut buf).await {
        Ok(Some(head)) => head,
        Ok(None) => return,
        Err(refusal) => {
            debug!(status = refusal.0, detail = %refusal.2, "refusing visitor");
            let _ = writer
                .write_all(&http1::error_response(refusal.0, refusal.1, &refusal.2))
                .await;
            let _ = writer.shutdown().await;
            return;
        }
    };
    let Some(host) = head.host.clone() else {
        let page = http1::error_response(
            400,
            "Bad Request",
            "The request has no Host header, so kitepipe cannot tell which site you want.",
        );
        let _ = writer.write_all(&page).await;
        return;
    };
    // ACME HTTP-01: the CA fetching one of the relay's own pending
    // challenges is answered before routing.
    if let Some(answer) = ctx.acme.http01_response(&host, &head.target) {
        let _ = writer.write_all(&answer).await;
        let _ = writer.shutdown().await;
        return;
    }
    if let Some(sni) = sni
        && !sni.eq_ignore_ascii_case(&host)
    {
        let detail = format!("This connection was opened for {sni}; open a new one for {host}.");
        let _ = writer
            .write_all(&http1::error_response(421, "Misdirected Request", &detail))
            .await;
        let _ = writer.shutdown().await;
        return;
    }
    if head.method.eq_ignore_ascii_case("CONNECT") {
        connect_tcp_kite::<S>(reader, writer, buf, &head, &host, peer, local, &ctx).await;
        return;
    }
    let backends = match ctx.registry.lookup_name(KiteProto::Http, &host) {
        Lookup::Found(backends) => backends,
        Lookup::Offline => {
            ctx.registry
                .metrics
                .refusal(&host, crate::metrics::Refusal::Offline);
            let detail = format!(
                "The site {host} is known to this relay, but no connector is serving it right now. Try again later."
            );
            let _ = writer
                .write_all(&http1::error_response(503, "Kite offline", &detail))
                .await;
            return;
        }
        Lookup::Unknown => {
            ctx.registry
                .metrics
                .refusal(&host, crate::metrics::Refusal::Unknown);
            let detail = format!("This relay does not serve {host}. Check the address.");
            let _ = writer
                .write_all(&http1::error_response(404, "Unknown kite", &detail))
                .await;
            return;
        }
    };
    if let Some(page) = https_redirect(&head, &host, &backends, scheme, &ctx) {
        let _ = writer.write_all(&page).await;
        let _ = writer.shutdown().await;
        return;
    }
    // A kite whose local service speaks only HTTP/2: hyper translates
    // (and applies the kite's rules per request, as for h2 visitors).
    if super::h2::wants_translation(&backends) {
        if let Some(io) = S::reunite(reader, writer) {
            let io = super::h2::Rewind::new(buf.freeze(), io);
            super::h2::serve_http1(io, peer, local, scheme, sni, ctx).await;
        }
        return;
    }
    // The kite's HTTP rules answer before anything reaches the link: those
    // of the backend the visitor is routed to (the first; another only on
    // failover, below). Its allow/deny lists come first, so a denied
    // address never costs a password hash.
    if backends
        .first()
        .is_some_and(|first| !first.policy.admits(peer.ip()))
    {
        ctx.registry
            .metrics
            .refusal(&host, crate::metrics::Refusal::Forbidden);
        let _ = writer.write_all(&forbidden(&host, peer)).await;
        let _ = writer.shutdown().await;
        return;
    }
    let routed = backends
        .first()
        .map(|first| (first.link, first.http.clone()));
    let mut permit = None;
    if let Some((_, rules)) = &routed {
        match admit(rules, &head, &buf, peer, &host).await {
            Ok(admitted) => permit = Some(admitted),
            Err(page) => {
                ctx.registry.metrics.refusal_page(&host, &page);
                let _ = writer.write_all(&page).await;
                let _ = writer.shutdown().await;
                return;
            }
        }
    }
    let (stream, backend) = match open_visitor_stream(&backends, Some(&host), peer, local).await {
        Ok(opened) => opened,
        Err(NotOpened::Refused) => {
            let _ = writer.write_all(&forbidden(&host, peer)).await;
            let _ = writer.shutdown().await;
            return;
        }
        Err(NotOpened::Unreachable) => {
            let detail =
                format!("No connector serving {host} is reachable right now. Try again later.");
            let _ = writer
                .write_all(&http1::error_response(503, "Kite offline", &detail))
                .await;
            return;
        }
    };
    let permit = match permit {
        Some(permit)
            if routed
                .as_ref()
                .is_some_and(|(link, _)| *link == backend.link) =>
        {
            permit
        }
        // Failed over to another link: its claim's rules apply (the stream
        // is reset if they refuse).
        _ => {
            drop(permit);
            match admit(&backend.http, &head, &buf, peer, &host).await {
                Ok(permit) => permit,
                Err(page) => {
                    drop(stream);
                    let _ = writer.write_all(&page).await;
                    let _ = writer.shutdown().await;
                    return;
                }
            }
        }
    };
    debug!(node = %backend.node, %host, "visitor routed");
    let _open = backend.metrics.connection();
    let route = Route {
        host,
        backend,
        _permit: permit,
    };
    let forwarded = Forwarded {
        client_ip: peer.ip(),
        proto: scheme.as_str(),
    };
    let (stream_reader, mut stream_writer) = tokio::io::split(stream);
    let mut stream_writer = route.backend.metrics.counting_in(&mut stream_writer);
    let (done_tx, mut done_rx) = watch::channel(None::<Ended>);
    let (expect_tx, expect_rx) = mpsc::channel(MAX_PIPELINED);
    let requests = async {
        let mut cut = done_rx.clone();
        let res = tokio::select! {
            res = forward_requests(
                &mut reader,
                buf,
                head,
                &mut stream_writer,
                forwarded,
                &route,
                &ctx,
                expect_tx,
                &mut done_rx,
            ) => res,
            _ = cut.wait_for(|ended| *ended == Some(Ended::Cut)) => Ok(()),
        };
        // Whatever ended the requests (EOF, a bad request, an idle visitor),
        // the kite sees EOF and finishes its response.
        let _ = stream_writer.shutdown().await;
        res
    };
    let response_edits =
        Some(route.backend.http.response_headers()).filter(|rules| !rules.is_empty());
    let responses = async {
        let ended = forward_responses(
            stream_reader,
            &mut route.backend.metrics.counting_out(&mut writer),
            &route.backend.metrics,
            expect_rx,
            &route.host,
            response_edits,
        )
        .await;
        if ended == Ended::Clean {
            let _ = writer.shutdown().await;
        }
        let _ = done_tx.send(Some(ended));
        ended
    };
    let (req, ended) = tokio::join!(requests, responses);
    debug!(?req, ?ended, "visitor done");
    if ended == Ended::Cut
        && let Some(sock) = S::reunite(reader, writer)
    {
        S::reset(sock);
    }
}

/// Whether CONNECT on a listener reached at `local` may go to TCP kites
/// bound to `tcp_bind`: only if a visitor who reached `local` could also
/// have reached the kite's own port, i.e. the kites listen on every address
/// (`0.0.0.0` or `::`) or on exactly `local`. A visitor who came in on a
/// public address never reaches a kite kept on 127.0.0.1.
fn connect_reaches(tcp_bind: IpAddr, local: Option<SocketAddr>) -> bool {
    let Some(local) = local.map(|local| local.ip().to_canonical()) else {
        return false;
    };
    match tcp_bind {
        // `::` listens on IPv6 and (dual stack) IPv4; `0.0.0.0` on IPv4 only.
        IpAddr::V6(any) if any.is_unspecified() => true,
        IpAddr::V4(any) if any.is_unspecified() => local.is_ipv4(),
        bind => local == bind.to_canonical(),
    }
}

/// `CONNECT name:port` on the HTTP port reaches the TCP kite of that name
/// and port (PageKite-style, e.g. `ssh -o ProxyCommand` through a proxy-aware
/// helper), then bytes flow raw both ways. Only where the operator enabled it
/// (`--http-connect`) and never past `--tcp-bind` ([`connect_reaches`]).
/// A PageKite back-end's raw kite (`--pagekite`) is reached here too, from
/// any HTTP listener: it has no port of its own.
#[allow(clippy::too_many_arguments)]
async fn connect_tcp_kite<S: VisitorConn>(
    reader: S::Reader,
    mut writer: S::Writer,
    mut buf: BytesMut,
    head: &RequestHead,
    host: &str,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    ctx: &Arc<RelayCtx>,
) {
    let port = head
        .target
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse::<u16>().ok());
    // PageKite raw kites are reached this way only (no public port of
    // their own): with --pagekite on, whatever --http-connect says.
    let pagekite = match port {
        Some(port) if ctx.config.pagekite => ctx.registry.lookup_connect_kite(host, port),
        _ => None,
    };
    if pagekite.is_none() && !ctx.config.http_connect {
        let detail = "CONNECT to TCP kites is not enabled on this relay (--http-connect).";
        let _ = writer
            .write_all(&http1::error_response(405, "Method Not Allowed", detail))
            .await;
        return;
    }
    if pagekite.is_none() && !connect_reaches(ctx.config.tcp_bind, local) {
        let detail = "TCP kites on this relay are not reachable from this address.";
        let _ = writer
            .write_all(&http1::error_response(403, "Forbidden", detail))
            .await;
        return;
    }
    let found = match pagekite
        .map(Lookup::Found)
        .or(port.map(|port| ctx.registry.lookup_port(port)))
    {
        Some(Lookup::Found(backends))
            if backends
                .iter()
                .all(|b| kitepipe_proto::kite::name_matches(&b.kite.name, host)) =>
        {
            Some(backends)
        }
        Some(Lookup::Offline) => {
            let detail = format!("The TCP kite {} is offline.", head.target);
            let _ = writer
                .write_all(&http1::error_response(503, "Kite offline", &detail))
                .await;
            return;
        }
        _ => None,
    };
    let Some(backends) = found else {
        let detail = format!("This relay has no TCP kite {}.", head.target);
        let _ = writer
            .write_all(&http1::error_response(404, "Unknown kite", &detail))
            .await;
        return;
    };
    let (mut stream, backend) = match open_visitor_stream(&backends, Some(host), peer, local).await
    {
        Ok(opened) => opened,
        Err(NotOpened::Refused) => {
            let _ = writer.write_all(&forbidden(&head.target, peer)).await;
            let _ = writer.shutdown().await;
            return;
        }
        Err(NotOpened::Unreachable) => {
            let detail = format!("No connector serving {} is reachable.", head.target);
            let _ = writer
                .write_all(&http1::error_response(503, "Kite offline", &detail))
                .await;
            return;
        }
    };
    let _ = buf.split_to(head.head_len);
    if writer
        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await
        .is_err()
        || stream.write_all(&buf).await.is_err()
    {
        return;
    }
    let Some(mut sock) = S::reunite(reader, writer) else {
        return;
    };
    match crate::tunnel::splice_stream(&mut sock, &mut stream).await {
        Ok((up, down)) => debug!(node = %backend.node, up, down, "CONNECT visitor done"),
        Err(err) => {
            debug!(node = %backend.node, %err, "CONNECT visitor ended with error");
            S::reset(sock);
        }
    }
}

type Refusal = (u16, &'static str, String);

/// Asks a kite's rules about a visitor's connection and its first request
/// (`head`, at the start of `buf`): the connection's permit, or the page
/// refusing it.
async fn admit(
    rules: &HttpRules,
    head: &RequestHead,
    buf: &[u8],
    peer: SocketAddr,
    host: &str,
) -> Result<ConnPermit, Vec<u8>> {
    let permit = rules
        .connection()
        .map_err(|refusal| refusal_page(&refusal, host))?;
    admit_request(rules, head, buf, peer.ip(), host).await?;
    Ok(permit)
}

/// Asks a kite's rules about one request (`head`, at the start of `buf`):
/// `Err` holds the page refusing it. Returns at once for a kite without
/// basic auth or rate limit.
async fn admit_request(
    rules: &HttpRules,
    head: &RequestHead,
    buf: &[u8],
    peer: IpAddr,
    host: &str,
) -> Result<(), Vec<u8>> {
    if rules.admits_all() {
        return Ok(());
    }
    let authorization = match buf.get(..head.head_len) {
        Some(raw) if rules.asks_credentials() => http1::field_value(raw, b"authorization"),
        _ => None,
    };
    rules
        .request(peer, authorization)
        .await
        .map_err(|refusal| refusal_page(&refusal, host))
}

/// The page for a refusal by a kite's rules (401, 429), styled like the
/// relay's other pages, with its `WWW-Authenticate` or `Retry-After`.
fn refusal_page(refusal: &super::http_policy::Refusal, host: &str) -> Vec<u8> {
    debug!(?refusal, %host, "refused by the kite's HTTP rules");
    let (status, title, detail, extra) = refusal.page(host);
    http1::error_response_with(status, title, &detail, &extra)
}

fn refusal(err: &HttpError) -> Refusal {
    let title = match err.status() {
        431 => "Request Header Fields Too Large",
        505 => "HTTP Version Not Supported",
        _ => "Bad Request",
    };
    (
        err.status(),
        title,
        format!("kitepipe could not read this request: {err}."),
    )
}

/// Reads the first head; `Ok(None)` when the visitor left without sending one.
async fn read_first_head<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
) -> Result<Option<RequestHead>, Refusal> {
    let deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
    loop {
        match http1::parse_request_head(buf) {
            Ok(Some(head)) => return Ok(Some(head)),
            Ok(None) => {}
            Err(err) => return Err(refusal(&err)),
        }
        buf.reserve(4096);
        match tokio::time::timeout_at(deadline, reader.read_buf(buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
            Ok(Ok(_)) => {}
            Err(_) if buf.is_empty() => return Ok(None),
            Err(_) => {
                return Err((
                    408,
                    "Request Timeout",
                    "The request head did not arrive in time.".into(),
                ));
            }
        }
    }
}

/// Why a request after the first is not forwarded down the connection's
/// stream, as the page to answer it with; `None` if it goes on.
///
/// Every request is routed by its own Host: one for the kite the connection
/// was routed to (the same name, or another name that routes to the same
/// kite on the same link, e.g. under one wildcard) goes on; anything else is
/// answered 421 Misdirected Request, and the visitor opens a new connection
/// for the other site (browsers and curl do so by themselves).
fn misdirected(head: &RequestHead, route: &Route, ctx: &RelayCtx) -> Option<Vec<u8>> {
    if head.method.eq_ignore_ascii_case("CONNECT") {
        return Some(http1::error_response(
            405,
            "Method Not Allowed",
            "CONNECT must be the first request on a connection.",
        ));
    }
    let Some(host) = &head.host else {
        return Some(http1::error_response(
            400,
            "Bad Request",
            "The request has no Host header, so kitepipe cannot tell which site you want.",
        ));
    };
    if *host == route.host {
        return None;
    }
    let same_kite = match ctx.registry.lookup_name(KiteProto::Http, host) {
        Lookup::Found(backends) => backends
            .iter()
            .any(|b| b.link == route.backend.link && b.kite == route.backend.kite),
        Lookup::Offline | Lookup::Unknown => false,
    };
    if same_kite {
        return None;
    }
    debug!(first = %route.host, %host, "keep-alive request for another kite");
    let detail = format!(
        "This connection was opened for {}; open a new connection for {host}.",
        route.host
    );
    Some(http1::error_response(421, "Misdirected Request", &detail))
}

/// Visitor -> kite: heads routed and rewritten, bodies forwarded exactly,
/// until EOF, a refusal, an upgrade the backend accepted (then raw), or the
/// response side ending between requests.
#[allow(clippy::too_many_arguments)]
async fn forward_requests<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    reader: &mut R,
    mut buf: BytesMut,
    first: RequestHead,
    writer: &mut W,
    forwarded: Forwarded,
    route: &Route,
    ctx: &RelayCtx,
    expect: mpsc::Sender<Expect>,
    response_done: &mut watch::Receiver<Option<Ended>>,
) -> std::io::Result<()> {
    let mut head = first;
    // The first request was admitted by the kite's rules before its stream
    // was opened (`serve`).
    let mut admitted = true;
    let rules = &route.backend.http;
    loop {
        if let Some(page) = misdirected(&head, route, ctx) {
            let _ = expect.send(Expect::Refusal(page)).await;
            return Ok(());
        }
        // A kite with rules may have had them replaced (a changed htpasswd
        // file) since the connection opened: the newest judge.
        if !std::mem::take(&mut admitted)
            && !rules.admits_all()
            && let Err(page) = admit_request(
                &rules.current(),
                &head,
                &buf,
                forwarded.client_ip,
                &route.host,
            )
            .await
        {
            let _ = expect.send(Expect::Refusal(page)).await;
            return Ok(());
        }
        let raw = buf.split_to(head.head_len);
        let rewritten =
            http1::rewrite_head_with(&raw, &forwarded, &request_edits(rules, &raw, &head))
                .map_err(invalid)?;
        // The response side learns of the request before the backend can
        // answer it.
        let (upgrade_tx, upgraded) = if head.upgrade {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let is_head = head.method.eq_ignore_ascii_case("HEAD");
        if expect
            .send(Expect::Response {
                head: is_head,
                upgrade: upgrade_tx,
                access: ctx.access.get().map(|log| {
                    log.request(forwarded.client_ip, &route.host, &head.method, &head.target)
                }),
            })
            .await
            .is_err()
        {
            return Ok(());
        }
        writer.write_all(&rewritten).await?;
        let mut scanner = BodyScanner::new(head.body);
        while !scanner.is_done() {
            if buf.is_empty() && !read_more(reader, &mut buf, IDLE_TIMEOUT).await? {
                return Ok(());
            }
            let progress = scanner.scan(&buf).map_err(invalid)?;
            let chunk = buf.split_to(progress.consumed);
            writer.write_all(&chunk).await?;
        }
        if let Some(upgraded) = upgraded {
            // Nothing more is read from the visitor until the backend has
            // answered: raw bytes only after a 101; after anything else the
            // next bytes are the next request, parsed like the first.
            match upgraded.await {
                Ok(true) => {
                    writer.write_all(&buf).await?;
                    buf.clear();
                    return copy_raw(reader, writer).await;
                }
                Ok(false) => {}
                Err(_) => return Ok(()),
            }
        }
        // Between requests: wait for the next head, unless the kite closed.
        head = loop {
            match http1::parse_request_head(&buf) {
                Ok(Some(head)) => break head,
                Ok(None) => {}
                Err(err) => {
                    let (status, title, detail) = refusal(&err);
                    let page = http1::error_response(status, title, &detail);
                    let _ = expect.send(Expect::Refusal(page)).await;
                    return Err(invalid(err));
                }
            }
            let patience = if buf.is_empty() {
                IDLE_TIMEOUT
            } else {
                HEAD_TIMEOUT
            };
            let more = tokio::select! {
                more = read_more(reader, &mut buf, patience) => more?,
                _ = response_done.wait_for(Option::is_some) => false,
            };
            if !more {
                return Ok(());
            }
        };
    }
}

/// The kite's edits of a request head (`raw`): none for a kite without
/// header rules or `forwarded_host`.
fn request_edits<'a>(
    rules: &'a HttpRules,
    raw: &'a [u8],
    head: &'a RequestHead,
) -> RequestEdits<'a> {
    let headers = Some(rules.request_headers()).filter(|rules| !rules.is_empty());
    let forwarded_host = rules.forwarded_host().then(|| {
        http1::field_value(raw, b"host")
            .filter(|value| !value.is_empty())
            .or(head.host.as_deref().map(str::as_bytes))
    });
    RequestEdits {
        headers,
        forwarded_host: forwarded_host.flatten(),
    }
}

/// Reads more bytes into `buf`; false at EOF. Times out after `patience`.
async fn read_more<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    patience: Duration,
) -> std::io::Result<bool> {
    buf.reserve(SMALL_READ);
    match tokio::time::timeout(patience, reader.read_buf(buf)).await {
        Ok(Ok(n)) => Ok(n > 0),
        Ok(Err(err)) => Err(err),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "visitor idle too long",
        )),
    }
}

/// Visitor -> kite after the kite's 101: raw bytes until EOF, or until the
/// visitor has sent nothing for [`IDLE_TIMEOUT`].
///
/// Not `tunnel::splice_stream`: by the time a connection is upgraded, its
/// two directions are two HTTP state machines on split halves, each
/// switching to raw bytes on its own; each direction keeps its own idle
/// bound here, and the caller decides between a clean end and a reset from
/// how the response side ended (`Ended`). The read sizes are the tunnel's
/// ([`ReadSize`]).
async fn copy_raw<R, W>(reader: &mut R, writer: &mut W) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    copy_raw_idle(reader, writer, Some(IDLE_TIMEOUT)).await
}

/// Copies until EOF; `idle`: how long the source may send nothing before
/// the copy ends (`None`: forever; the kite's side of an upgraded
/// connection or a response delimited by the connection's end may be quiet
/// for as long as the visitor keeps the connection).
async fn copy_raw_idle<R, W>(
    reader: &mut R,
    writer: &mut W,
    idle: Option<Duration>,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut size = ReadSize::default();
    let mut chunk = vec![0u8; size.get()];
    loop {
        if chunk.len() != size.get() {
            chunk.resize(size.get(), 0);
        }
        let n = match idle {
            Some(idle) => match tokio::time::timeout(idle, reader.read(&mut chunk)).await {
                Ok(res) => res?,
                Err(_) => return Ok(()),
            },
            None => reader.read(&mut chunk).await?,
        };
        if n == 0 {
            return Ok(());
        }
        size.update(n);
        writer.write_all(&chunk[..n]).await?;
    }
}

/// Kite -> visitor: each response delimited (head, then body by its
/// framing) and matched to its request in order, so that only the answer to
/// an upgrade request can switch the connection to raw bytes, and a refusal
/// goes out after the responses before it. If the kite fails before a
/// response began, the visitor gets a 502 page saying why; after, a reset.
async fn forward_responses<W: AsyncWrite + Unpin>(
    mut reader: tokio::io::ReadHalf<MuxStream>,
    writer: &mut crate::metrics::Counted<W>,
    metrics: &crate::metrics::KiteMetrics,
    mut expect: mpsc::Receiver<Expect>,
    host: &str,
    edits: Option<&HeaderRules>,
) -> Ended {
    let mut buf = BytesMut::new();
    let mut size = ReadSize::default();
    loop {
        // Between responses: wait for the next request, noticing the
        // backend closing (or failing) meanwhile.
        let next = loop {
            // A request is announced before it is written to the kite, so
            // bytes of its response never come before its announcement.
            match expect.try_recv() {
                Ok(next) => break Some(next),
                Err(mpsc::error::TryRecvError::Disconnected) => break None,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            if !buf.is_empty() {
                debug!("kite sent bytes no request asked for; closing");
                let _ = writer.write_all(&buf).await;
                return Ended::Cut;
            }
            tokio::select! {
                biased;
                next = expect.recv() => break next,
                read = read_response(&mut reader, &mut buf, &mut size) => match read {
                    Ok(0) => return Ended::Clean,
                    Ok(_) => {}
                    Err(err) => {
                        debug!(%err, "kite failed between responses");
                        return Ended::Clean;
                    }
                },
            }
        };
        let (is_head, mut upgrade, mut access) = match next {
            None => return Ended::Clean,
            Some(Expect::Refusal(page)) => {
                let _ = writer.write_all(&page).await;
                return Ended::Clean;
            }
            Some(Expect::Response {
                head,
                upgrade,
                access,
            }) => (head, upgrade, access),
        };
        let mut begun = false;
        let start = writer.written();
        // Only whether it was HEAD matters for how the response is framed.
        let method = if is_head { "HEAD" } else { "GET" };
        // Interim (1xx) responses come before the final one.
        loop {
            let mut response = loop {
                match http1::parse_response_head(&buf, method) {
                    Ok(Some(response)) => break response,
                    Ok(None) => {}
                    Err(err) => {
                        debug!(%err, "malformed response from the kite");
                        return Ended::Cut;
                    }
                }
                match read_response(&mut reader, &mut buf, &mut size).await {
                    Ok(0) if !begun && buf.is_empty() => return Ended::Clean,
                    Ok(0) => return Ended::Cut,
                    Ok(_) => {}
                    Err(err) if !begun && buf.is_empty() => {
                        let _ = writer.write_all(&bad_gateway(host, &err)).await;
                        return Ended::Clean;
                    }
                    Err(err) => {
                        debug!(%err, "kite failed inside a response head");
                        return Ended::Cut;
                    }
                }
            };
            begun = true;
            if response.status >= 200 || response.status == 101 {
                metrics.request(response.status);
            }
            if let Some(rules) = edits
                && response.status >= 200
                && response.status != 101
            {
                response.head_len = edit_response(&mut buf, response.head_len, rules);
            }
            if response.status >= 200 && response.status != 101 {
                // The head goes out in one write with the body bytes that
                // came with it (a small response: one write, one packet).
                match forward_body(
                    &mut reader,
                    writer,
                    &mut buf,
                    &mut size,
                    response.head_len,
                    response.body,
                )
                .await
                {
                    Ok(true) => {
                        if let Some(line) = access.take() {
                            line.done(response.status, writer.written() - start)
                        }
                        break;
                    }
                    // Delimited by the end of the connection, which came.
                    Ok(false) => {
                        if let Some(line) = access.take() {
                            line.done(response.status, writer.written() - start)
                        }
                        return Ended::Clean;
                    }
                    Err(err) => {
                        debug!(%err, "response cut short");
                        return Ended::Cut;
                    }
                }
            }
            let head = buf.split_to(response.head_len);
            if writer.write_all(&head).await.is_err() {
                return Ended::Cut;
            }
            if response.status == 101 {
                let Some(upgrade) = upgrade.take() else {
                    debug!("kite switched protocols unasked");
                    return Ended::Cut;
                };
                let _ = upgrade.send(true);
                if writer.write_all(&buf).await.is_err() {
                    return Ended::Cut;
                }
                buf.clear();
                return match copy_raw_idle(&mut reader, writer, None).await {
                    Ok(()) => Ended::Clean,
                    Err(_) => Ended::Cut,
                };
            }
        }
        if let Some(upgrade) = upgrade {
            let _ = upgrade.send(false);
        }
    }
}

/// Forwards one response, its head (the first `head_len` bytes of `buf`)
/// and its body from `buf` and `reader`, writing the head with the body
/// bytes already read; `Ok(true)` when the body ended by its framing (the
/// connection may carry another response), `Ok(false)` when it ended with
/// the connection. An EOF inside a framed body is an error: the response
/// was cut short.
async fn forward_body<W: AsyncWrite + Unpin>(
    reader: &mut tokio::io::ReadHalf<MuxStream>,
    writer: &mut W,
    buf: &mut BytesMut,
    size: &mut ReadSize,
    head_len: usize,
    body: ResponseBody,
) -> std::io::Result<bool> {
    let ResponseBody::Framed(kind) = body else {
        writer.write_all(buf).await?;
        buf.clear();
        copy_raw_idle(reader, writer, None).await?;
        return Ok(false);
    };
    let mut scanner = BodyScanner::new(kind);
    // Bytes at the front of `buf` that belong to this response and are
    // not written yet.
    let mut pending = head_len;
    while !scanner.is_done() {
        if buf.len() == pending {
            if pending > 0 {
                let out = buf.split_to(pending);
                pending = 0;
                writer.write_all(&out).await?;
            }
            if read_response(reader, buf, size).await? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "response body cut short",
                ));
            }
        }
        let progress = scanner.scan(&buf[pending..]).map_err(invalid)?;
        pending += progress.consumed;
    }
    if pending > 0 {
        let out = buf.split_to(pending);
        writer.write_all(&out).await?;
    }
    Ok(true)
}

/// Replaces the response head at the front of `buf` (`head_len` bytes) with
/// the kite's edits of it; the new head's length.
fn edit_response(buf: &mut BytesMut, head_len: usize, rules: &HeaderRules) -> usize {
    let edited = http1::edit_response_head(&buf[..head_len], rules);
    let rest = buf.split_off(head_len);
    buf.clear();
    buf.extend_from_slice(&edited);
    buf.unsplit(rest);
    edited.len()
}

/// Reads the kite's next bytes into `buf`, sized by `size`; 0 at EOF.
async fn read_response(
    reader: &mut tokio::io::ReadHalf<MuxStream>,
    buf: &mut BytesMut,
    size: &mut ReadSize,
) -> std::io::Result<usize> {
    buf.reserve(size.get());
    let room = buf.capacity() - buf.len();
    let n = reader.read_buf(buf).await?;
    size.update(if n >= room { size.get() } else { n });
    Ok(n)
}

/// The page for a kite that failed before its response began.
fn bad_gateway(host: &str, err: &std::io::Error) -> Vec<u8> {
    let reset = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<StreamReset>());
    let detail = match reset {
        Some(reset) if reset.code == ResetCode::TargetUnreachable => format!(
            "The connector serving {host} could not reach its local service: {}.",
            reset.reason
        ),
        Some(reset) => format!(
            "The connector serving {host} refused the request: {}.",
            reset.reason
        ),
        None => format!("The link to the connector serving {host} failed: {err}."),
    };
    http1::error_response(502, "Bad Gateway", &detail)
}

/// The 403 page for a visitor the kite's policy refuses (`Connection:
/// close`, like every error page of the relay).
fn forbidden(site: &str, peer: SocketAddr) -> Vec<u8> {
    let detail = format!(
        "The owner of {site} does not allow visitors from {} to reach it.",
        peer.ip().to_canonical()
    );
    http1::error_response(403, "Forbidden", &detail)
}

/// Where ACME's HTTP-01 challenges are asked: never redirected, the CA
/// fetches them over plain HTTP.
const ACME_CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

/// The 308 to `https://HOST[:PORT]/PATH` for a plain-HTTP request to a kite
/// that asks for it (`https_redirect`), if the relay has an HTTPS listener
/// (`PORT`: its port, left out when 443); `None` to serve the request.
fn https_redirect(
    head: &RequestHead,
    host: &str,
    backends: &[Backend],
    scheme: Scheme,
    ctx: &RelayCtx,
) -> Option<Vec<u8>> {
    if scheme != Scheme::Http || !backends.first()?.http.https_redirect() {
        return None;
    }
    let port = ctx.https_port?;
    let path = redirect_path(&head.target);
    if path.starts_with(ACME_CHALLENGE_PATH) {
        return None;
    }
    // An absolute-form target with a query but no path gets its `/`.
    let slash = if path.starts_with('?') { "/" } else { "" };
    let location = if port == 443 {
        format!("https://{host}{slash}{path}")
    } else {
        format!("https://{host}:{port}{slash}{path}")
    };
    let page = format!(
        "HTTP/1.1 308 Permanent Redirect\r\n\
         Location: {location}\r\n\
         Content-Length: 0\r\n\
         Connection: close\r\n\
         \r\n"
    );
    Some(page.into_bytes())
}

/// The path and query of a request target for the redirect: origin form
/// as it is, absolute form's part after the authority (which may start
/// with `?`), else `/` (the scanner has already refused control bytes in
/// targets).
fn redirect_path(target: &str) -> &str {
    if target.starts_with('/') {
        return target;
    }
    match target.split_once("://") {
        Some((_, rest)) => rest.find(['/', '?']).map_or("/", |at| &rest[at..]),
        None => "/",
    }
}

fn invalid(err: HttpError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_path_keeps_path_and_query_of_every_target_form() {
        let cases = [
            ("/x?y", "/x?y"),
            ("/", "/"),
            ("http://app.example.net/a/b?c=d", "/a/b?c=d"),
            ("http://app.example.net:8080", "/"),
            ("http://app.example.net?q", "?q"),
            ("app.example.net:443", "/"),
            ("*", "/"),
        ];
        for (target, want) in cases {
            assert_eq!(redirect_path(target), want, "{target}");
        }
    }

    #[test]
    fn connect_reaches_only_what_the_kites_ports_would_accept() {
        let at = |addr: &str| Some(addr.parse::<SocketAddr>().expect("literal"));
        let ip = |text: &str| text.parse::<IpAddr>().expect("literal");
        let cases = [
            ("0.0.0.0", at("203.0.113.1:80"), true),
            ("0.0.0.0", at("127.0.0.1:80"), true),
            ("0.0.0.0", at("[2001:db8::1]:80"), false),
            ("0.0.0.0", at("[::ffff:203.0.113.1]:80"), true),
            ("::", at("[2001:db8::1]:80"), true),
            ("::", at("203.0.113.1:80"), true),
            ("127.0.0.1", at("127.0.0.1:80"), true),
            ("127.0.0.1", at("203.0.113.1:80"), false),
            ("127.0.0.1", at("127.0.0.2:80"), false),
            ("203.0.113.1", at("[::ffff:203.0.113.1]:80"), true),
            ("::1", at("127.0.0.1:80"), false),
            ("0.0.0.0", None, false),
        ];
        for (bind, local, want) in cases {
            assert_eq!(
                connect_reaches(ip(bind), local),
                want,
                "{bind} from {local:?}"
            );
        }
    }
}
