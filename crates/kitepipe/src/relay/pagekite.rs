//! PageKite back-ends (pagekite.py, upagekite) at the relay: the relay as
//! a PageKite front-end (`--pagekite`, off by default).
//!
//! `listener` hands over connections whose first bytes are not TLS on a
//! link port ([`serve_plain`]): a back-end's head (`CONNECT PageKite:1`),
//! its front-end ping (`HEAD /ping` for `ping.pagekite`), or, on a port
//! that also serves HTTP, a visitor. A back-end's kite requests are judged
//! against the `--domain` secrets ([`Judge`]): an empty token gets a
//! `SignThis` challenge signed with the relay's own secret (time-stamped:
//! valid in the current and previous 10-minute window, so the relay keeps
//! no state), a signed request is checked against the secret of a domain
//! covering the name and the kite's protocol. Accepted kites are
//! registered like a connector's secret-granted kites on a registry link
//! whose mux is the relay side of `crate::pagekite`'s pump, so visitors,
//! policy, metrics, status and the access log work unchanged. Raw kites
//! (`raw-PORT`) bind no public port: visitors reach them by
//! `CONNECT name:PORT` on the HTTP port (`http.rs`,
//! `Registry::lookup_connect_kite`).
//!
//! Bounds: the first bytes within [`HEAD_TIMEOUT`], the head within [`HANDSHAKE_TIMEOUT`] and
//! [`pagekite::MAX_HEAD`] bytes, a place among the unproven links
//! (`session::UnprovenLinks`, per source and overall) until a kite is
//! accepted, at most [`MAX_KITES_PER_TUNNEL`] kites,
//! [`MAX_WRONG_PROOFS_PER_LINK`] wrong signatures or bad challenges per
//! tunnel and the relay's per-address guessing backoff, the relay's
//! connection bound; the pump bounds chunks, streams and decompression.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use kitepipe_proto::http1::error_response;
use kitepipe_proto::kite::{self, KiteProto, KiteRef};
use kitepipe_proto::pagekite::{
    self, BackEndHello, FrontEndHello, KiteAnswer, KiteRequest, Transport,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

use super::identity::reserved_for_certificates;
use super::registry::LinkId;
use super::session::{MAX_WRONG_PROOFS_PER_LINK, UnprovenSlot};
use super::{HEAD_TIMEOUT, RelayCtx};
use crate::link::{HANDSHAKE_TIMEOUT, LinkClosed};
use crate::metrics::{HandshakeFailure, LinkUp};
use crate::pagekite::{TunnelConfig, sign};
use crate::pki::pattern_covers;
use crate::sync::lock;

/// Kites one tunnel may hold (its head's and its later `AddKites`
/// requests together): as many as one head may ask for.
pub(crate) const MAX_KITES_PER_TUNNEL: usize = pagekite::MAX_KITE_REQUESTS;

/// Visitor streams (SIDs) one tunnel carries at once; past it a visitor
/// gets the kite's "unreachable" answer. Each may queue up to
/// `pagekite::MAX_CHUNK` (256 KiB) of the back-end's data: 64 MiB at most
/// per tunnel, and only for streams visitors opened.
pub(crate) const MAX_STREAMS_PER_TUNNEL: usize = crate::pagekite::tunnel::DEFAULT_MAX_STREAMS;

/// Longest a `HEAD /ping` (pagekite.py's front-end ping) may be.
const MAX_PING: usize = 1024;

/// How long a tunnel that holds no kite yet (it was sent `SignThis`
/// challenges and answers them in a NOOP chunk, PageKite's `AddKites`) may
/// take: the same as a link's handshake.
const UNPROVEN_TUNNEL: Duration = HANDSHAKE_TIMEOUT;

/// What pagekite.py expects from a front-end it pings (`Ping` in pk.py
/// wants `HTTP/1.1 503 Unavailable`).
const PING_REPLY: &[u8] = b"HTTP/1.1 503 Unavailable\r\nContent-Type: text/plain\r\n\
Content-Length: 0\r\nConnection: close\r\nX-PageKite-Front-End: kitepipe\r\n\r\n";

/// Challenges answered with a valid signature, remembered until they
/// expire so that none is accepted twice (a signed request seen on the
/// plaintext wire cannot be replayed). Only a secret holder adds entries
/// (~100 bytes each); past the bound the soonest to expire is forgotten.
pub(crate) const MAX_USED_CHALLENGES: usize = 64 * 1024;

/// How long a challenge stays valid: the current and the previous
/// 10-minute window of pagekite.py's time-stamped tokens.
const CHALLENGE_LIFE: u64 = 2 * 600;

/// The relay's PageKite state: its own challenge secret (made at start, so
/// a restart invalidates every challenge) and the challenges used.
pub(crate) struct FrontEnd {
    secret: String,
    used: Mutex<HashMap<String, u64>>,
    /// The TLS config of pagekite.py's TLS hop, built at first use.
    tls: OnceLock<Arc<rustls::ServerConfig>>,
}

impl Default for FrontEnd {
    fn default() -> FrontEnd {
        FrontEnd {
            secret: format!("{}{}", sign::random_salt(), sign::random_salt()),
            used: Mutex::default(),
            tls: OnceLock::new(),
        }
    }
}

impl FrontEnd {
    /// The TLS config of the TLS hop: the relay's certificate, TLS 1.2 and
    /// 1.3 (pagekite.py's Python ssl), no ALPN, no client certificates.
    fn tls_config(&self, ctx: &RelayCtx) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        if let Some(config) = self.tls.get() {
            return Ok(config.clone());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                ctx.relay_cert.chain().to_vec(),
                ctx.relay_cert.key().clone_key(),
            )?;
        Ok(self.tls.get_or_init(|| Arc::new(config)).clone())
    }

    /// Marks challenge `token` used at `now`; false if it was already.
    fn consume(&self, token: &str, now: u64) -> bool {
        let mut used = lock(&self.used);
        if let Some(expires) = used.get(token)
            && *expires > now
        {
            return false;
        }
        if used.len() >= MAX_USED_CHALLENGES {
            used.retain(|_, expires| *expires > now);
            if used.len() >= MAX_USED_CHALLENGES
                && let Some(soonest) = used
                    .iter()
                    .min_by_key(|(_, expires)| **expires)
                    .map(|(token, _)| token.clone())
            {
                used.remove(&soonest);
            }
        }
        used.insert(token.to_string(), now + CHALLENGE_LIFE);
        true
    }
}

/// What a non-TLS connection on a link port turned out to be.
enum Plain {
    BackEnd,
    Ping,
    /// `CONNECT RELAY-NAME:443` (pagekite.py's `--fe_certname`): TLS to
    /// the relay itself follows, with the back-end's head inside. The
    /// CONNECT head is this many bytes.
    TlsHop(usize),
    Other,
}

/// The first line of pagekite.py's front-end ping.
const PING: &[u8] = b"HEAD /ping ";

/// The first bytes of pagekite.py's proxy hop before TLS.
const CONNECT: &[u8] = b"CONNECT ";

/// Serves a connection whose first bytes (`buf`) are not TLS on a link
/// port: a PageKite back-end (plain, or in TLS after a CONNECT to the
/// relay's own name) or its ping, else (`http`: the port serves HTTP
/// too) an HTTP visitor.
pub(crate) async fn serve_plain(
    mut sock: TcpStream,
    mut buf: BytesMut,
    peer: SocketAddr,
    http: bool,
    ctx: Arc<RelayCtx>,
) {
    let kind = tokio::time::timeout(HEAD_TIMEOUT, classify(&mut sock, &mut buf, &ctx)).await;
    let kind = match kind {
        Ok(Ok(kind)) => kind,
        Ok(Err(why)) => {
            debug!(%why, "dropping connection");
            return;
        }
        Err(_) => {
            debug!("no recognizable first bytes in time; dropping connection");
            return;
        }
    };
    match kind {
        Plain::BackEnd if !ctx.config.pagekite => {
            info!(%peer, "PageKite back-end refused: PageKite support is off on this relay (--pagekite)");
            ctx.registry
                .metrics
                .handshake_failed(HandshakeFailure::Protocol);
            let body = "PageKite back-ends are not accepted by this relay: its operator has not \
                        turned PageKite support on (--pagekite).\n";
            let _ = sock
                .write_all(&error_response(403, "Forbidden", body))
                .await;
            super::session::linger(sock).await;
        }
        Plain::BackEnd => {
            let span = info_span!("pagekite", %peer);
            let unproven = ctx.unproven.enter(peer.ip());
            accept(sock, buf, peer, unproven, ctx)
                .instrument(span)
                .await;
        }
        Plain::Ping if ctx.config.pagekite => {
            let _ = sock.write_all(PING_REPLY).await;
            let _ = sock.shutdown().await;
        }
        Plain::TlsHop(head) if ctx.config.pagekite => {
            let _ = buf.split_to(head);
            let span = info_span!("pagekite", %peer, tls = true);
            tls_hop(sock, buf, peer, ctx).instrument(span).await;
        }
        _ if http => super::http::serve_plain(sock, buf, peer, ctx).await,
        // Neither PageKite nor HTTP: the link's TLS handshake fails on
        // these bytes and says so (with its "does not speak TLS" hint for
        // a connector pointed at the wrong port), as before PageKite.
        _ => super::session::accept(sock, buf, peer, ctx).await,
    }
}

/// Whether a CONNECT's `target` (`HOST:PORT`, lowercase) opens a TLS hop
/// to the relay itself: its name, or a name its self-signed certificate
/// holds, on port 443. Only asked of a CONNECT: no work per connection.
fn is_own_target(ctx: &RelayCtx, target: &str) -> bool {
    target.strip_suffix(":443").is_some_and(|host| {
        host.eq_ignore_ascii_case(&ctx.config.name) || host == "localhost" || host == "127.0.0.1"
    })
}

/// Reads until the first bytes tell a PageKite head, a PageKite ping, a
/// CONNECT to the relay itself or anything else apart (pings and CONNECTs
/// are read whole, at most [`MAX_PING`] bytes).
async fn classify(
    sock: &mut TcpStream,
    buf: &mut BytesMut,
    ctx: &RelayCtx,
) -> Result<Plain, String> {
    loop {
        match pagekite::sniff(buf) {
            Some(true) => return Ok(Plain::BackEnd),
            Some(false) => {
                let starts = |prefix: &[u8]| {
                    let n = buf.len().min(prefix.len());
                    buf[..n] == prefix[..n]
                };
                let Some(prefix) = [PING, CONNECT].into_iter().find(|p| starts(p)) else {
                    return Ok(Plain::Other);
                };
                if buf.len() >= prefix.len()
                    && let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n")
                {
                    let head = &buf[..end + 4];
                    if prefix == PING {
                        let ping = head.windows(20).any(|w| w == b"\nHost: ping.pagekite");
                        return Ok(if ping { Plain::Ping } else { Plain::Other });
                    }
                    let target = head[CONNECT.len()..]
                        .split(|b| *b == b' ')
                        .next()
                        .map(|t| String::from_utf8_lossy(t).to_ascii_lowercase())
                        .unwrap_or_default();
                    if is_own_target(ctx, &target) {
                        return Ok(Plain::TlsHop(end + 4));
                    }
                    return Ok(Plain::Other);
                }
                if buf.len() >= MAX_PING {
                    return Ok(Plain::Other);
                }
            }
            None => {}
        }
        let n = sock.read_buf(buf).await.map_err(|err| err.to_string())?;
        if n == 0 {
            return Err("closed before sending anything useful".into());
        }
    }
}

/// pagekite.py's TLS hop (`--fe_certname`): answers its CONNECT, takes
/// the TLS handshake with the relay's certificate (`buf`: bytes already
/// read past the CONNECT head), then expects a back-end's head inside.
async fn tls_hop(mut sock: TcpStream, buf: BytesMut, peer: SocketAddr, ctx: Arc<RelayCtx>) {
    let config = match ctx.pagekite.tls_config(&ctx) {
        Ok(config) => config,
        Err(err) => {
            warn!(%err, "cannot serve PageKite over TLS");
            return;
        }
    };
    if sock
        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    // A place among the unproven links from the first TLS byte, as a
    // link's; the head inside must come within the same deadline.
    let unproven = ctx.unproven.enter(peer.ip());
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let io = super::h2::Rewind::new(buf.freeze(), sock);
    let accepted = tokio::select! {
        accepted = tokio::time::timeout_at(
            deadline,
            tokio_rustls::TlsAcceptor::from(config).accept(io),
        ) => accepted,
        _ = unproven.evicted().cancelled() => {
            debug!("too many unauthenticated links: closing the oldest, this PageKite TLS hop");
            ctx.registry.metrics.handshake_failed(HandshakeFailure::Busy);
            return;
        }
    };
    let mut tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            info!(%err, "PageKite TLS handshake failed");
            ctx.registry.metrics.handshake_failed(HandshakeFailure::Tls);
            return;
        }
        Err(_) => {
            info!("PageKite TLS handshake timed out");
            ctx.registry
                .metrics
                .handshake_failed(HandshakeFailure::Timeout);
            return;
        }
    };
    let mut buf = BytesMut::with_capacity(2048);
    let first = tokio::time::timeout_at(deadline, async {
        loop {
            match pagekite::sniff(&buf) {
                Some(verdict) => return Ok(verdict),
                None => match tls.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return Err(()),
                    Ok(_) => {}
                },
            }
        }
    })
    .await;
    match first {
        Ok(Ok(true)) => accept(tls, buf, peer, unproven, ctx).await,
        _ => debug!("no PageKite head inside the TLS hop; closing"),
    }
}

/// Seconds since the Unix epoch (for the challenge windows).
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// A back-end's connection after its first bytes said `CONNECT PageKite:`
/// (or the websocket variant): reads its head, judges its kites, answers,
/// and serves the tunnel until it ends.
/// `unproven`: its place among the links that proved nothing yet.
async fn accept<S>(
    mut sock: S,
    mut buf: BytesMut,
    peer: SocketAddr,
    unproven: UnprovenSlot,
    ctx: Arc<RelayCtx>,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let hello = loop {
        match pagekite::parse_backend_hello(&buf) {
            Ok(Some((hello, used))) => {
                let _ = buf.split_to(used);
                break hello;
            }
            Ok(None) => {}
            Err(err) => {
                info!(%err, "bad PageKite head; closing");
                ctx.registry
                    .metrics
                    .handshake_failed(HandshakeFailure::Protocol);
                let body = format!("Bad PageKite request: {err}.\n");
                let _ = sock
                    .write_all(&error_response(400, "Bad Request", &body))
                    .await;
                super::session::linger(sock).await;
                return;
            }
        }
        let read = tokio::select! {
            read = tokio::time::timeout_at(deadline, sock.read_buf(&mut buf)) => read,
            _ = unproven.evicted().cancelled() => {
                debug!("too many unauthenticated links: closing the oldest, this PageKite head");
                ctx.registry.metrics.handshake_failed(HandshakeFailure::Busy);
                return;
            }
        };
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => {
                debug!("PageKite back-end left during its head");
                return;
            }
            Ok(Ok(_)) => {}
            Err(_) => {
                info!("PageKite head not complete within {HANDSHAKE_TIMEOUT:?}; closing");
                ctx.registry
                    .metrics
                    .handshake_failed(HandshakeFailure::Timeout);
                return;
            }
        }
    };
    if let Transport::WebSocket { .. } = hello.transport {
        info!("PageKite websocket transport refused: not implemented");
        let body = "This relay speaks PageKite over CONNECT only; the websocket transport is not \
                    implemented (see kitepipe's docs/pagekite.md).\n";
        let _ = sock
            .write_all(&error_response(501, "Not Implemented", body))
            .await;
        super::session::linger(sock).await;
        return;
    }
    let mut judge = Judge {
        ctx: &ctx,
        peer,
        wrong: 0,
        kites: Vec::new(),
    };
    let now = unix_now();
    let mut answers = Vec::new();
    let mut accepted = Vec::new();
    for request in &hello.requests {
        judge.judge(request, now, &mut answers, &mut accepted);
    }
    let add_kites = offers(&hello, "AddKites");
    let challenged = answers
        .iter()
        .any(|answer| matches!(answer, KiteAnswer::SignThis { .. }));
    let instance = session_id(&hello);
    let reply = FrontEndHello {
        features: features(&hello),
        protos: protos(&ctx),
        ports: ports(&ctx),
        raw_ports: if ctx.http_port.is_some() {
            vec!["virtual".to_string()]
        } else {
            Vec::new()
        },
        answers,
        session_id: Some(instance.clone()),
    };
    if sock
        .write_all(&pagekite::build_frontend_hello(&reply))
        .await
        .is_err()
    {
        return;
    }
    if accepted.is_empty() && !(challenged && add_kites) {
        // Nothing to serve and nothing to wait for: pagekite.py without
        // AddKites reconnects with its challenges signed.
        debug!("no kite accepted on this PageKite tunnel; closing after the answers");
        if judge.wrong > 0 || !challenged {
            ctx.registry
                .metrics
                .handshake_failed(HandshakeFailure::Auth);
        }
        super::session::linger(sock).await;
        return;
    }
    let config = TunnelConfig {
        compress: offers(&hello, "ZChunks"),
        // The relay's heartbeat, as on its links; a tunnel silent for
        // three of them (and a little) is dead.
        ping_interval: ctx.config.heartbeat,
        idle_timeout: ctx.config.heartbeat * 3 + Duration::from_secs(5),
        max_streams: MAX_STREAMS_PER_TUNNEL,
        mux: ctx.mux.clone(),
    };
    let token = ctx.token.child_token();
    let (mux, mut handle) =
        crate::pagekite::start_front(sock, buf, &config, &ctx.tracker, token.clone());
    let mut tunnel = Tunnel {
        mux,
        peer,
        instance,
        link: None,
        up: None,
        unproven: Some(unproven),
        deadline: Instant::now() + UNPROVEN_TUNNEL,
    };
    tunnel.register(&accepted, &ctx);
    let reason = loop {
        let unproven = tunnel.unproven.is_some();
        let evicted = tunnel
            .unproven
            .as_ref()
            .map(|slot| slot.evicted().clone())
            .unwrap_or_default();
        tokio::select! {
            reason = tunnel.mux.closed() => break reason,
            _ = ctx.token.cancelled() => {
                tunnel.mux.close(LinkClosed::Shutdown);
                break LinkClosed::Shutdown;
            }
            _ = evicted.cancelled(), if unproven => {
                let why = "too many unauthenticated links: this PageKite tunnel holds no kite and was the oldest";
                tunnel.mux.close(LinkClosed::Protocol(why.into()));
                break LinkClosed::Protocol(why.into());
            }
            _ = tokio::time::sleep_until(tunnel.deadline), if unproven => {
                let why = format!("the PageKite tunnel got no kite within {UNPROVEN_TUNNEL:?}");
                tunnel.mux.close(LinkClosed::Protocol(why.clone()));
                break LinkClosed::Protocol(why);
            }
            control = handle.control.recv() => {
                let Some(headers) = control else { break tunnel.mux.closed().await };
                if headers.requests.is_empty() {
                    continue;
                }
                let now = unix_now();
                let mut answers = Vec::new();
                let mut accepted = Vec::new();
                for request in headers.requests.iter().take(pagekite::MAX_KITE_REQUESTS) {
                    judge.judge(request, now, &mut answers, &mut accepted);
                }
                handle.send_control(answer_headers(&answers));
                tunnel.register(&accepted, &ctx);
                if judge.wrong >= MAX_WRONG_PROOFS_PER_LINK && tunnel.link.is_none() {
                    let why = format!("too many wrong PageKite signatures ({})", judge.wrong);
                    warn!(%peer, "closing PageKite tunnel: {why}");
                    tunnel.mux.close(LinkClosed::Protocol(why.clone()));
                    break LinkClosed::Protocol(why);
                }
            }
        }
    };
    token.cancel();
    if let Some(link) = tunnel.link {
        ctx.registry.remove_link(link);
        match &reason {
            LinkClosed::Shutdown => info!("PageKite tunnel closed: relay shutting down"),
            reason => info!(%reason, "PageKite tunnel closed"),
        }
    } else {
        debug!(%reason, "PageKite tunnel closed before serving a kite");
    }
}

/// A live tunnel as the relay keeps it.
struct Tunnel {
    mux: crate::link::Mux,
    peer: SocketAddr,
    /// The session ID given to the back-end; the registry's instance.
    instance: String,
    /// Its registry link, once it serves a kite.
    link: Option<LinkId>,
    up: Option<LinkUp>,
    /// Held until a kite is accepted.
    unproven: Option<UnprovenSlot>,
    deadline: Instant,
}

impl Tunnel {
    /// Registers accepted kites (the link at the first one), and replaces
    /// a stale tunnel of the same session that held no other kites.
    fn register(&mut self, kites: &[KiteRef], ctx: &Arc<RelayCtx>) {
        let Some(first) = kites.first() else {
            return;
        };
        let link = match self.link {
            Some(link) => link,
            None => {
                let node = format!("pagekite:{}", first.name);
                let link = ctx.registry.add_link(
                    &self.instance,
                    &node,
                    self.mux.clone(),
                    self.peer,
                    None,
                    None,
                );
                self.up = Some(ctx.registry.metrics.link_up(&node));
                self.link = Some(link);
                link
            }
        };
        for kite in kites {
            let added = if kite.proto == KiteProto::Tcp {
                ctx.registry.add_connect_kite(link, kite)
            } else {
                ctx.registry.add_kite(
                    link,
                    kite,
                    super::registry::Grant::Secret,
                    Default::default(),
                    Default::default(),
                )
            };
            if added {
                ctx.acme.want(kite);
                info!(kite = %kite, "PageKite kite online");
            }
        }
        self.unproven = None;
        ctx.registry.replace_by_kites(link);
    }
}

/// Whether the back-end's head offered `feature`.
fn offers(hello: &BackEndHello, feature: &str) -> bool {
    hello
        .features
        .iter()
        .any(|offered| offered.eq_ignore_ascii_case(feature))
}

/// The features the relay answers with.
fn features(hello: &BackEndHello) -> Vec<String> {
    let mut features = vec!["AddKites".to_string()];
    if offers(hello, "ZChunks") {
        features.insert(0, "ZChunks".to_string());
    }
    features
}

/// The kite protocols the relay serves (an HTTP listener for http and raw,
/// an HTTPS listener for https).
fn protos(ctx: &RelayCtx) -> Vec<String> {
    let mut protos = Vec::new();
    if ctx.http_port.is_some() {
        protos.extend(["http", "websocket", "raw"].map(String::from));
    }
    if ctx.https_port.is_some() {
        protos.push("https".into());
    }
    protos
}

/// The relay's public HTTP and HTTPS ports.
fn ports(ctx: &RelayCtx) -> Vec<String> {
    [ctx.http_port, ctx.https_port]
        .into_iter()
        .flatten()
        .map(|port| port.to_string())
        .collect()
}

/// Longest session ID taken from `X-PageKite-Replace`.
const MAX_SESSION_ID: usize = 64;

/// The tunnel's session ID: the one it asks to replace (a back-end coming
/// back; it only replaces a tunnel whose every kite it proves again), else
/// a new random one.
fn session_id(hello: &BackEndHello) -> String {
    match &hello.replace {
        Some(id)
            if !id.is_empty()
                && id.len() <= MAX_SESSION_ID
                && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b':') =>
        {
            id.clone()
        }
        _ => format!("kp{}", &sign::random_salt()[..24]),
    }
}

/// The headers that carry `answers` in a NOOP chunk (AddKites; the pump
/// adds `NOOP: 1`).
fn answer_headers(answers: &[KiteAnswer]) -> Vec<(String, String)> {
    let mut headers = Vec::new();
    for answer in answers {
        match answer {
            KiteAnswer::Ok(what) => headers.push(("X-PageKite-OK".into(), what.clone())),
            KiteAnswer::Invalid { what, why } => {
                headers.push(("X-PageKite-Invalid".into(), what.clone()));
                headers.push(("X-PageKite-Invalid-Why".into(), format!("{what};{why}")));
            }
            KiteAnswer::Duplicate(what) => {
                headers.push(("X-PageKite-Duplicate".into(), what.clone()));
            }
            KiteAnswer::SignThis { what, token } => {
                headers.push(("X-PageKite-SignThis".into(), format!("{what}:{token}")));
            }
            KiteAnswer::SslOk(what) => headers.push(("X-PageKite-SSL-OK".into(), what.clone())),
        }
    }
    headers
}

/// Judges a tunnel's kite requests.
struct Judge<'a> {
    ctx: &'a Arc<RelayCtx>,
    peer: SocketAddr,
    /// Wrong signatures and bad challenges so far.
    wrong: u32,
    /// Kites accepted so far (bounded by [`MAX_KITES_PER_TUNNEL`]).
    kites: Vec<KiteRef>,
}

/// pagekite.py's reason words (`X-PageKite-Invalid-Why`), as its
/// back-end logs them.
mod why {
    /// The front-end does not serve the protocol (or the domain does not
    /// list it).
    pub(super) const PROTO: &str = "proto";
    /// The port is not one the front-end serves.
    pub(super) const PORT: &str = "port";
    /// The signature does not match the domain's secret.
    pub(super) const SIGNATURE: &str = "signature";
    /// No domain covers the name (or it is reserved, or not a name).
    pub(super) const UNAUTHORIZED: &str = "unauthorized";
    /// Too many kites or wrong signatures on this tunnel.
    pub(super) const QUOTA: &str = "quota";
}

impl Judge<'_> {
    /// Judges one request, adding its answer (and the kite, if accepted).
    fn judge(
        &mut self,
        request: &KiteRequest,
        now: u64,
        answers: &mut Vec<KiteAnswer>,
        accepted: &mut Vec<KiteRef>,
    ) {
        let what = request.what();
        match self.verdict(request, now) {
            Ok(Some(kite)) => {
                answers.push(KiteAnswer::Ok(what));
                if !self.kites.contains(&kite) {
                    self.kites.push(kite.clone());
                }
                accepted.push(kite);
            }
            Ok(None) => {
                let token = sign::challenge(&self.ctx.pagekite.secret, &what, now);
                answers.push(KiteAnswer::SignThis { what, token });
            }
            Err(why) => {
                warn!(kite = %what, reason = why, "PageKite kite refused");
                self.ctx.registry.metrics.error(
                    &self.peer.to_string(),
                    &format!("PageKite kite {what} refused: {why}"),
                );
                answers.push(KiteAnswer::Invalid {
                    what,
                    why: why.to_string(),
                });
            }
        }
    }

    /// `Ok(Some(kite))`: accepted; `Ok(None)`: to be challenged; `Err`:
    /// refused, with pagekite.py's reason word.
    fn verdict(
        &mut self,
        request: &KiteRequest,
        now: u64,
    ) -> Result<Option<KiteRef>, &'static str> {
        let ctx = self.ctx;
        let kite = kite_of(request, ctx.http_port, ctx.https_port)?;
        if !self.kites.contains(&kite) && self.kites.len() >= MAX_KITES_PER_TUNNEL {
            return Err(why::QUOTA);
        }
        let domains: Vec<_> = ctx
            .config
            .domains
            .iter()
            .filter(|d| pattern_covers(&d.pattern, &kite.name))
            .collect();
        if domains.is_empty() {
            return Err(why::UNAUTHORIZED);
        }
        let domains: Vec<_> = domains
            .into_iter()
            .filter(|d| d.protos.contains(&kite.proto))
            .collect();
        if domains.is_empty() {
            return Err(why::PROTO);
        }
        if reserved_for_certificates(&kite.name, &ctx.identity(), ctx).is_some() {
            return Err(why::UNAUTHORIZED);
        }
        if self.wrong >= MAX_WRONG_PROOFS_PER_LINK
            || ctx
                .proof_throttle
                .check(self.peer.ip(), Instant::now())
                .is_err()
        {
            self.wrong += 1;
            return Err(why::QUOTA);
        }
        if request.token.is_empty() {
            return Ok(None);
        }
        if !sign::check_challenge(&request.token, &ctx.pagekite.secret, &request.what(), now) {
            // Not our challenge, or an expired one: a new one, counted
            // (a back-end that took too long signs again).
            debug!(kite = %request.what(), "PageKite challenge not ours or expired");
            self.strike();
            return Ok(None);
        }
        let payload = request.payload();
        if domains
            .iter()
            .any(|d| sign::check_signature(&request.sign, d.secret.expose(), &payload, now))
        {
            if !ctx.pagekite.consume(&request.token, now) {
                // A replay: the back-end that signed it got its kite.
                debug!(kite = %request.what(), "PageKite challenge used twice");
                self.strike();
                return Ok(None);
            }
            return Ok(Some(kite));
        }
        self.strike();
        Err(why::SIGNATURE)
    }

    /// Counts a wrong signature against the tunnel and its source address.
    fn strike(&mut self) {
        self.wrong += 1;
        self.ctx
            .registry
            .metrics
            .handshake_failed(HandshakeFailure::Auth);
        self.ctx
            .proof_throttle
            .failed(self.peer.ip(), Instant::now());
    }
}

/// The kite a request asks for: `http`, `http-PORT` and `websocket` are
/// http kites, `https` (`https-PORT`) https kites, `raw-PORT` a TCP kite
/// reached by CONNECT on that port.
fn kite_of(
    request: &KiteRequest,
    http_port: Option<u16>,
    https_port: Option<u16>,
) -> Result<KiteRef, &'static str> {
    let name = kite::normalize_name(&request.domain).map_err(|_| why::UNAUTHORIZED)?;
    let (proto, port) = match request.proto.split_once('-') {
        Some((proto, port)) => (proto, Some(port.parse::<u16>().map_err(|_| why::PORT)?)),
        None => (request.proto.as_str(), None),
    };
    let (proto, port) = match (proto, port) {
        ("http" | "websocket", None) if http_port.is_some() => (KiteProto::Http, 0),
        ("http" | "websocket", Some(port)) if Some(port) == http_port => (KiteProto::Http, 0),
        ("https", None) if https_port.is_some() => (KiteProto::Https, 0),
        ("https", Some(port)) if Some(port) == https_port => (KiteProto::Https, 0),
        ("raw", Some(port)) if port != 0 && http_port.is_some() => (KiteProto::Tcp, port),
        ("http" | "websocket" | "https", Some(_)) | ("raw", _) => return Err(why::PORT),
        _ => return Err(why::PROTO),
    };
    Ok(KiteRef { proto, name, port })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(proto: &str, domain: &str) -> KiteRequest {
        KiteRequest::parse(&format!("{proto}:{domain}:salt::sign")).unwrap()
    }

    #[test]
    fn protocols_map_to_kites_on_the_relays_ports() {
        let kite = |proto: &str| kite_of(&request(proto, "A.pk.test"), Some(80), Some(443));
        let http = KiteRef {
            proto: KiteProto::Http,
            name: "a.pk.test".into(),
            port: 0,
        };
        assert_eq!(kite("http"), Ok(http.clone()));
        assert_eq!(kite("websocket"), Ok(http.clone()));
        assert_eq!(kite("http-80"), Ok(http));
        assert_eq!(kite("http-8080"), Err(why::PORT));
        assert_eq!(kite("https").unwrap().proto, KiteProto::Https);
        assert_eq!(kite("https-8443"), Err(why::PORT));
        let raw = kite("raw-22").unwrap();
        assert_eq!((raw.proto, raw.port), (KiteProto::Tcp, 22));
        assert_eq!(kite("raw"), Err(why::PORT));
        assert_eq!(kite("raw-0"), Err(why::PORT));
        assert_eq!(kite("raw-x"), Err(why::PORT));
        assert_eq!(kite("finger"), Err(why::PROTO));
        // No HTTPS listener: no https kites; no HTTP listener: no raw ones.
        let none = |proto: &str| kite_of(&request(proto, "a.pk.test"), None, None);
        assert_eq!(none("https"), Err(why::PROTO));
        assert_eq!(none("http"), Err(why::PROTO));
        assert_eq!(none("raw-22"), Err(why::PORT));
        assert!(kite_of(&request("http", "a..pk.test"), Some(80), None).is_err());
    }

    #[test]
    fn challenges_are_used_once_and_the_set_is_bounded() {
        let front = FrontEnd::default();
        assert!(front.consume("t1", 1000));
        assert!(!front.consume("t1", 1000));
        assert!(!front.consume("t1", 1000 + CHALLENGE_LIFE - 1));
        // Expired, it is no longer valid anyway: remembering it ends.
        assert!(front.consume("t1", 1000 + CHALLENGE_LIFE));
        for i in 0..MAX_USED_CHALLENGES + 10 {
            assert!(front.consume(&format!("x{i}"), 5000));
        }
        assert_eq!(lock(&front.used).len(), MAX_USED_CHALLENGES);
        // Expired entries go first when it is full.
        assert!(front.consume("late", 5000 + CHALLENGE_LIFE));
        assert_eq!(lock(&front.used).len(), 1);
    }

    #[test]
    fn a_session_to_replace_is_kept_only_if_it_looks_like_one() {
        let hello = |replace: Option<&str>| BackEndHello {
            transport: Transport::Chunked,
            features: Vec::new(),
            version: None,
            requests: Vec::new(),
            replace: replace.map(String::from),
        };
        assert_eq!(session_id(&hello(Some("kpabc:12"))), "kpabc:12");
        for bad in [None, Some(""), Some("a b"), Some(&"x".repeat(65)[..])] {
            let id = session_id(&hello(bad));
            assert!(id.starts_with("kp") && id.len() == 26, "{id}");
        }
    }

    #[test]
    fn answers_become_noop_headers() {
        let headers = answer_headers(&[
            KiteAnswer::Ok("http:a:s".into()),
            KiteAnswer::Invalid {
                what: "http:b:s".into(),
                why: "signature".into(),
            },
            KiteAnswer::SignThis {
                what: "http:c:s".into(),
                token: "t123".into(),
            },
        ]);
        let text: Vec<String> = headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        assert!(text.contains(&"X-PageKite-OK: http:a:s".to_string()));
        assert!(text.contains(&"X-PageKite-Invalid-Why: http:b:s;signature".to_string()));
        assert!(text.contains(&"X-PageKite-SignThis: http:c:s:t123".to_string()));
    }
}
