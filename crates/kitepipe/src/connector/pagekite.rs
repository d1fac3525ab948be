//! The connector as a PageKite back-end (`--protocol pagekite`): one
//! tunnel to a PageKite front-end (pagekite.py `--isfrontend`, or a
//! kitepipe relay with `--pagekite`) per configured relay address.
//!
//! An attempt dials the front-end, sends the back-end head (one signed
//! `X-PageKite` request per kite, our salt fresh per attempt), answers the
//! front-end's `SignThis` challenges on a new connection (never in a NOOP:
//! see `attempt`), and reports each kite's answer. The tunnel itself is `crate::pagekite`'s pump: it
//! turns each new SID into a visitor stream on an in-process [`Mux`],
//! whose streams `serve_stream` serves exactly as a relay link's (targets,
//! PROXY headers, metrics). Which kite a SID reaches is decided here
//! ([`route`]): only configured kites, so a front-end reaches nothing but
//! the configured targets. The reconnect loop is the kitepipe links' own
//! (`session::keep_linked`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use kitepipe_proto::kite::{KiteProto, KiteRef, name_matches, specificity};
use kitepipe_proto::message::VisitorHeader;
use kitepipe_proto::pagekite::{
    BackEndHello, ChunkHeaders, FrontEndHello, KiteAnswer, KiteRequest, PageKiteError, Transport,
    build_backend_hello, parse_frontend_hello,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, warn};

use super::session::{CONNECT_TIMEOUT, Ended, keep_linked};
use super::{KiteSet, Kites, LinkBounds, LinkState, refuse_full, serve_stream};
use crate::config::{ConnectorConfig, RelayTarget};
use crate::link::{HANDSHAKE_TIMEOUT, LinkClosed, Mux, MuxConfig, MuxReceivers, PeerGoodbye};
use crate::pagekite::{ChunkDest, Route, TunnelConfig, TunnelHandle, sign, start_back};
use crate::pipe::Handlers;
use crate::sync::lock;

/// Streams (SIDs) one front-end may have open on a tunnel at once (the
/// pump's default). Fewer than a kitepipe link's
/// ([`super::MAX_LINK_STREAMS`]): a PageKite front-end is not
/// authenticated, and each SID may hold [`STREAM_WINDOW`] in the Mux and
/// the pump's 256 KiB buffer toward a target that does not read, so a
/// tunnel holds at most about 128 MiB of a stranger's data.
const MAX_TUNNEL_STREAMS: usize = crate::pagekite::tunnel::DEFAULT_MAX_STREAMS;

/// Per-stream window of the in-process Mux pair: the two Muxes share
/// memory, so a small window costs no throughput, and it bounds what a
/// SID buffers toward a slow target.
const STREAM_WINDOW: u32 = 256 * 1024;

/// Why one attempt at a tunnel failed (before it was up).
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connecting to {0} timed out")]
    ConnectTimeout(String),
    #[error("talking to the front-end failed: {0}")]
    Io(#[source] std::io::Error),
    #[error("the front-end closed the connection before answering")]
    Closed,
    #[error("the front-end did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the front-end's answer is not a PageKite tunnel: {0}")]
    Head(#[source] PageKiteError),
    #[error("the front-end refused every kite: {0}")]
    Refused(String),
    #[error("the kites changed: registering them again")]
    KitesChanged,
}

/// One kite as offered to the front-end.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Offered {
    /// The kite as configured.
    kite: KiteRef,
    /// Its PageKite protocol: `http`, `https` or `raw-PORT`.
    proto: String,
    /// Its name (a `*.` pattern for a wildcard kite).
    domain: String,
}

/// The kites of `set` as PageKite kites, with their secrets.
fn offered(set: &KiteSet) -> Vec<(Offered, Option<crate::pki::Secret>)> {
    set.targets
        .iter()
        .map(|target| {
            let kite = &target.kite;
            let proto = match kite.proto {
                KiteProto::Http => "http".to_string(),
                KiteProto::Https => "https".to_string(),
                KiteProto::Tcp => format!("raw-{}", kite.port),
            };
            let offered = Offered {
                kite: kite.clone(),
                proto,
                domain: kite.name.clone(),
            };
            (offered, target.secret.clone())
        })
        .collect()
}

/// The signed `X-PageKite` requests for `kites`: `srand` is this attempt's
/// salt, `tokens` the front-end's challenges by `PROTO:DOMAIN`.
fn requests(
    kites: &[(Offered, Option<crate::pki::Secret>)],
    srand: &str,
    tokens: &HashMap<String, String>,
) -> Vec<KiteRequest> {
    kites
        .iter()
        .filter_map(|(kite, secret)| {
            let secret = secret.as_ref()?;
            let token = tokens
                .get(&format!("{}:{}", kite.proto, kite.domain))
                .cloned()
                .unwrap_or_default();
            Some(sign::kite_request(
                &kite.proto,
                &kite.domain,
                secret.expose(),
                srand,
                &token,
            ))
        })
        .collect()
}

/// The front-end's challenges among `answers`, by `PROTO:DOMAIN`.
fn challenges(answers: &[KiteAnswer]) -> HashMap<String, String> {
    answers
        .iter()
        .filter_map(|answer| match answer {
            KiteAnswer::SignThis { what, token } => {
                let (proto_domain, _srand) = what.rsplit_once(':')?;
                Some((proto_domain.to_string(), token.clone()))
            }
            _ => None,
        })
        .collect()
}

/// The offered kite an answer's `PROTO:DOMAIN:SRAND` is about.
fn answered<'a>(offered: &'a [Offered], what: &str) -> Option<&'a Offered> {
    let mut parts = what.splitn(3, ':');
    let (proto, domain) = (parts.next()?, parts.next()?);
    offered.iter().find(|kite| {
        kite.proto.eq_ignore_ascii_case(proto) && kite.domain.eq_ignore_ascii_case(domain)
    })
}

/// The name a visitor asked for, as kites are named: lowercase, without
/// a port or a trailing dot.
fn visitor_name(host: &str) -> String {
    let host = host.trim();
    let host = match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Which configured kite serves a new SID: http (and websocket) chunks go
/// to the http kite of their Host, https to the https kite of their SNI
/// name, raw chunks to the tcp kite of that name and port; the most
/// specific name wins (exact before wildcards). `None`: no kite of ours
/// (the pump refuses the SID; nothing is dialed).
pub(super) fn route(set: &KiteSet, dest: &ChunkDest) -> Option<VisitorHeader> {
    let proto = dest.proto.to_ascii_lowercase();
    let (kind, port) = match proto.as_str() {
        "http" | "websocket" => (KiteProto::Http, None),
        "https" => (KiteProto::Https, None),
        "raw" => (KiteProto::Tcp, Some(dest.port?)),
        _ => return None,
    };
    let name = visitor_name(&dest.host);
    let kite = set
        .targets
        .iter()
        .map(|target| &target.kite)
        .filter(|kite| kite.proto == kind && name_matches(&kite.name, &name))
        .filter(|kite| port.is_none_or(|port| kite.port == port))
        .max_by_key(|kite| specificity(&kite.name))?;
    // pagekite.py writes IPv4 visitors as `::ffff:1.2.3.4`: PROXY
    // headers and logs get them as IPv4.
    let peer = match dest.visitor_addr() {
        Some(addr) => addr.to_string(),
        None => dest.rip.clone().unwrap_or_default(),
    };
    Some(VisitorHeader {
        kite: kite.clone(),
        host: Some(name),
        peer,
        relay_addr: None,
    })
}

/// Everything one front-end's tunnel task needs.
pub(super) struct PageKiteLink {
    pub(super) relay: RelayTarget,
    pub(super) config: Arc<ConnectorConfig>,
    pub(super) kites: Arc<Kites>,
    pub(super) handlers: Arc<Handlers>,
    pub(super) state: watch::Sender<LinkState>,
    /// The front-end's `X-PageKite-SessionID` for our last tunnel: sent
    /// as `X-PageKite-Replace` next time, so the front-end drops the old
    /// tunnel at once instead of calling our kites duplicates.
    pub(super) session_id: Mutex<Option<String>>,
    pub(super) tracker: TaskTracker,
    pub(super) token: CancellationToken,
}

impl PageKiteLink {
    /// Keeps a tunnel to the front-end until shutdown.
    pub(super) async fn run(self) {
        warn!(
            "PageKite tunnels are plaintext: the front-end, and anyone on the path to it, \
             see the traffic of http and tcp kites (https kites stay encrypted to your service)"
        );
        let attempt = || async {
            match self.attempt().await {
                Ok(LinkClosed::Shutdown) if self.token.is_cancelled() => {
                    Ended::Closed(LinkClosed::Shutdown)
                }
                // The pump ended the tunnel (and with it the Mux pair):
                // the front-end closed it, went silent or sent what the
                // pump refuses; its own log line says which.
                Ok(LinkClosed::Shutdown) => {
                    warn!("tunnel to PageKite front-end ended");
                    Ended::Closed(LinkClosed::PeerClosed(PeerGoodbye::Eof))
                }
                Ok(reason) => {
                    warn!(%reason, "tunnel to PageKite front-end lost");
                    Ended::Closed(reason)
                }
                Err(AttemptError::KitesChanged) => {
                    info!("the kites changed: registering them again with the PageKite front-end");
                    Ended::Failed { refused: true }
                }
                Err(err) => {
                    let refused = matches!(&err, AttemptError::Connect { source, .. }
                        if source.kind() == std::io::ErrorKind::ConnectionRefused);
                    if matches!(err, AttemptError::Refused(_)) {
                        // The front-end said no: an operator must act.
                        error!(err = %err, "cannot link to PageKite front-end");
                    } else {
                        warn!(err = %err, "cannot link to PageKite front-end");
                    }
                    Ended::Failed { refused }
                }
            }
        };
        keep_linked(self.config.max_backoff, &self.state, &self.token, attempt).await;
    }

    /// The pump's settings: compressed chunks if the front-end offers
    /// them, pings within the heartbeat.
    fn tunnel_config(&self, hello: &FrontEndHello) -> TunnelConfig {
        let mux = MuxConfig {
            heartbeat: self.config.heartbeat,
            stream_window: STREAM_WINDOW,
        };
        TunnelConfig {
            compress: has_feature(&hello.features, "ZChunks"),
            ping_interval: self.config.heartbeat / 3,
            idle_timeout: self.config.heartbeat,
            max_streams: MAX_TUNNEL_STREAMS,
            mux,
        }
    }

    /// Dials the front-end, sends our head and reads its own (both within
    /// the link handshake timeout). Returns the connection, the head and
    /// the bytes read past it.
    async fn dial(
        &self,
        requests: Vec<KiteRequest>,
    ) -> Result<(TcpStream, FrontEndHello, BytesMut), AttemptError> {
        let addr = &self.relay.addr;
        let mut tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(source)) => {
                return Err(AttemptError::Connect {
                    addr: addr.clone(),
                    source,
                });
            }
            Err(_) => return Err(AttemptError::ConnectTimeout(addr.clone())),
        };
        let _ = tcp.set_nodelay(true);
        let hello = BackEndHello {
            transport: Transport::Chunked,
            features: vec!["AddKites".into(), "ZChunks".into()],
            version: Some(concat!("kitepipe/", env!("CARGO_PKG_VERSION")).into()),
            requests,
            replace: lock(&self.session_id).clone(),
        };
        let head = build_backend_hello(&hello);
        let exchange = async {
            tcp.write_all(&head).await.map_err(AttemptError::Io)?;
            let mut buf = BytesMut::with_capacity(4096);
            loop {
                if let Some((hello, consumed)) =
                    parse_frontend_hello(&buf).map_err(AttemptError::Head)?
                {
                    let _ = buf.split_to(consumed);
                    return Ok((hello, buf));
                }
                if tcp.read_buf(&mut buf).await.map_err(AttemptError::Io)? == 0 {
                    return Err(AttemptError::Closed);
                }
            }
        };
        let (hello, leftover) = tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange)
            .await
            .map_err(|_| AttemptError::Timeout(HANDSHAKE_TIMEOUT))??;
        Ok((tcp, hello, leftover))
    }

    /// One tunnel, from dialing to its end. `Ok` once it was up.
    async fn attempt(&self) -> Result<LinkClosed, AttemptError> {
        let mut watched = self.kites.subscribe();
        let set = watched.borrow_and_update().clone();
        let kites = offered(&set);
        if kites.is_empty() {
            // Nothing to ask for; wait for a reload that adds kites.
            tokio::select! {
                _ = self.token.cancelled() => return Ok(LinkClosed::Shutdown),
                _ = watched.changed() => return Err(AttemptError::KitesChanged),
            }
        }
        let offered_kites: Vec<Offered> = kites.iter().map(|(kite, _)| kite.clone()).collect();
        // Our salt: fresh per attempt, the same in the answers to the
        // front-end's challenges (they sign PROTO:DOMAIN:SRAND).
        let srand = sign::random_salt();
        let no_tokens = HashMap::new();
        let dialed = tokio::select! {
            _ = self.token.cancelled() => return Ok(LinkClosed::Shutdown),
            res = self.dial(requests(&kites, &srand, &no_tokens)) => res?,
        };
        let (mut tcp, mut hello, mut leftover) = dialed;
        self.remember_session(&hello.session_id);
        let mut answers = hello.answers.clone();
        let tokens = challenges(&answers);
        if !tokens.is_empty() {
            // Answered on a new connection, as pagekite.py's back-end does
            // with a front-end without AddKites, even when the front-end
            // offers AddKites: pagekite.py 1.5 under Python 3 authorizes
            // kites added in a NOOP with a quota of None and then crashes
            // answering the first PING on that tunnel (`SendPong`:
            // "'>=' not supported between 'NoneType' and 'int'"), which
            // ends it. The new connection's `X-PageKite-Replace` (the
            // first one's session ID) makes the front-end drop the first.
            let signed = requests(&kites, &srand, &tokens);
            let dialed = tokio::select! {
                _ = self.token.cancelled() => return Ok(LinkClosed::Shutdown),
                res = self.dial(signed) => res?,
            };
            (tcp, hello, leftover) = dialed;
            self.remember_session(&hello.session_id);
            answers = hello.answers.clone();
        }
        let tunnel = self.tunnel_config(&hello);
        let route: Route = {
            let kites = self.kites.clone();
            Arc::new(move |dest: &ChunkDest| route(&kites.current(), dest))
        };
        let token = self.token.child_token();
        let (mux, mut rx, mut handle) =
            start_back(tcp, leftover, &tunnel, route, &self.tracker, token.clone());
        let res = async {
            self.report(&offered_kites, &answers, &hello)?;
            self.serve(
                &mux,
                &mut rx,
                &mut handle,
                &mut watched,
                &offered_kites,
                &hello,
            )
            .await
        }
        .await;
        token.cancel();
        res
    }

    /// Keeps the front-end's session ID for the next attempt's
    /// `X-PageKite-Replace`.
    fn remember_session(&self, session_id: &Option<String>) {
        if let Some(id) = session_id {
            *lock(&self.session_id) = Some(id.clone());
        }
    }

    /// Logs each kite's answer and publishes the kites online; an error
    /// naming every kite and why when none is.
    fn report(
        &self,
        offered: &[Offered],
        answers: &[KiteAnswer],
        hello: &FrontEndHello,
    ) -> Result<(), AttemptError> {
        let mut online = Vec::new();
        let mut refused = Vec::new();
        for answer in answers {
            match answer {
                KiteAnswer::Ok(what) => {
                    if let Some(kite) = answered(offered, what) {
                        let public = public_address(&kite.kite, hello);
                        info!(kite = %kite.kite, pagekite = %kite.proto, %public, "kite online");
                        if !online.iter().any(|(k, _)| *k == kite.kite) {
                            online.push((kite.kite.clone(), public));
                        }
                    }
                }
                KiteAnswer::Invalid { what, why } => {
                    let (kite, why) = (kite_of(what), reason(why));
                    error!(%kite, reason = %why, "PageKite front-end refused kite");
                    refused.push(format!("{kite} ({why})"));
                }
                KiteAnswer::Duplicate(what) => {
                    let kite = kite_of(what);
                    error!(%kite, "PageKite front-end refused kite: another back-end serves it");
                    refused.push(format!("{kite} (duplicate: another back-end serves it)"));
                }
                KiteAnswer::SignThis { what, .. } => {
                    warn!(kite = %what, "PageKite front-end challenged a signed kite again");
                }
                KiteAnswer::SslOk(_) => {}
            }
        }
        if online.is_empty() {
            if refused.is_empty() {
                refused.push("no answer for any kite".into());
            }
            return Err(AttemptError::Refused(refused.join(", ")));
        }
        info!(
            online = online.len(),
            refused = refused.len(),
            "linked to PageKite front-end"
        );
        self.state.send_replace(LinkState::Up(online));
        Ok(())
    }

    /// Serves the tunnel's visitor streams until it ends, the kites change
    /// or shutdown.
    async fn serve(
        &self,
        mux: &Mux,
        rx: &mut MuxReceivers,
        handle: &mut TunnelHandle,
        watched: &mut watch::Receiver<Arc<KiteSet>>,
        offered_kites: &[Offered],
        hello: &FrontEndHello,
    ) -> Result<LinkClosed, AttemptError> {
        let bounds = LinkBounds::new();
        let mut watching = true;
        loop {
            tokio::select! {
                _ = self.token.cancelled() => {
                    mux.close(LinkClosed::Shutdown);
                    return Ok(LinkClosed::Shutdown);
                }
                reason = mux.closed() => return Ok(reason),
                changed = watched.changed(), if watching => {
                    if changed.is_err() {
                        watching = false;
                        continue;
                    }
                    let now: Vec<Offered> = offered(&watched.borrow_and_update())
                        .into_iter()
                        .map(|(kite, _)| kite)
                        .collect();
                    if now != offered_kites {
                        mux.close(LinkClosed::Shutdown);
                        return Err(AttemptError::KitesChanged);
                    }
                }
                incoming = rx.incoming.recv() => {
                    let Some(incoming) = incoming else { return Ok(mux.closed().await) };
                    let Some(slot) = bounds.admit() else {
                        refuse_full(incoming);
                        continue;
                    };
                    let span = tracing::debug_span!("stream", id = incoming.stream.id());
                    let serve = serve_stream(incoming, self.kites.clone(), self.handlers.clone(), bounds.clone());
                    self.tracker.spawn(async move { serve.await; drop(slot) }.instrument(span));
                }
                headers = handle.control.recv() => {
                    let Some(headers) = headers else { return Ok(mux.closed().await) };
                    self.remember_session(&session_in(&headers));
                    if !headers.answers.is_empty() {
                        self.report_later(offered_kites, &headers.answers, hello);
                    }
                }
            }
        }
    }

    /// Answers that come while serving (a front-end that re-checks its
    /// kites): a refused kite goes offline, an accepted one online.
    fn report_later(&self, offered: &[Offered], answers: &[KiteAnswer], hello: &FrontEndHello) {
        let mut online = match &*self.state.borrow() {
            LinkState::Up(online) => online.clone(),
            LinkState::Down => Vec::new(),
        };
        for answer in answers {
            match answer {
                KiteAnswer::Ok(what) => {
                    if let Some(kite) = answered(offered, what)
                        && !online.iter().any(|(k, _)| *k == kite.kite)
                    {
                        info!(kite = %kite.kite, "kite online");
                        online.push((kite.kite.clone(), public_address(&kite.kite, hello)));
                    }
                }
                KiteAnswer::Invalid { what, why } => {
                    error!(kite = %kite_of(what), reason = %reason(why), "PageKite front-end refused kite");
                    if let Some(kite) = answered(offered, what) {
                        online.retain(|(k, _)| *k != kite.kite);
                    }
                }
                KiteAnswer::Duplicate(what) => {
                    error!(kite = %kite_of(what), "PageKite front-end refused kite: another back-end serves it");
                    if let Some(kite) = answered(offered, what) {
                        online.retain(|(k, _)| *k != kite.kite);
                    }
                }
                KiteAnswer::SignThis { .. } | KiteAnswer::SslOk(_) => {}
            }
        }
        self.state.send_replace(LinkState::Up(online));
    }
}

/// `PROTO:DOMAIN` of an answer's `PROTO:DOMAIN:SRAND`, for messages.
fn kite_of(what: &str) -> &str {
    what.rsplit_once(':').map_or(what, |(kite, _srand)| kite)
}

/// A front-end's reason for refusing a kite (pagekite.py's
/// `X-PageKite-Invalid-Why`), said for operators.
fn reason(why: &str) -> String {
    match why {
        "" => "no reason given".into(),
        "signature" => "signature: a wrong secret".into(),
        "proto" => "proto: the front-end does not serve this protocol".into(),
        "port" => "port: the front-end does not serve this port".into(),
        "unauthorized" => "unauthorized: the front-end knows no such kite".into(),
        other => other.into(),
    }
}

/// Whether a head's `X-PageKite-Features` lists `feature`.
fn has_feature(features: &[String], feature: &str) -> bool {
    features
        .iter()
        .any(|f| f.trim().eq_ignore_ascii_case(feature))
}

/// An `X-PageKite-SessionID` among a NOOP chunk's other headers.
fn session_in(headers: &ChunkHeaders) -> Option<String> {
    headers
        .other
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("X-PageKite-SessionID"))
        .map(|(_, value)| value.clone())
}

/// Where visitors find a kite on the front-end: its name, with the
/// front-end's first HTTP port when that is not the default one (what
/// `X-PageKite-Ports` says), and the raw port for a tcp kite.
fn public_address(kite: &KiteRef, hello: &FrontEndHello) -> String {
    let first_port = hello
        .ports
        .iter()
        .filter_map(|port| port.trim().parse::<u16>().ok())
        .next();
    match kite.proto {
        KiteProto::Http => match first_port {
            Some(port) if port != 80 => format!("http://{}:{port}", kite.name),
            _ => format!("http://{}", kite.name),
        },
        KiteProto::Https => format!("https://{}", kite.name),
        KiteProto::Tcp => format!("{}:{}", kite.name, kite.port),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KiteTarget;
    use crate::pki::Secret;

    const SECRET: &str = "a-pagekite-secret-for-tests";

    fn set(kites: &[&str]) -> KiteSet {
        KiteSet::new(
            kites
                .iter()
                .map(|spec| {
                    let (kite, target) = spec.split_once('=').unwrap();
                    KiteTarget {
                        kite: KiteRef::parse(kite).unwrap(),
                        target: target.to_string(),
                        secret: Some(Secret::new(SECRET.to_string())),
                        proxy_protocol: None,
                        policy: Default::default(),
                        http: Default::default(),
                        basic_auth_file: None,
                    }
                })
                .collect(),
        )
    }

    fn dest(proto: &str, host: &str, port: Option<u16>) -> ChunkDest {
        ChunkDest {
            proto: proto.into(),
            host: host.into(),
            port,
            rip: Some("192.0.2.7".into()),
            rport: Some(4000),
            rtls: false,
        }
    }

    /// A SID reaches a configured kite of its protocol and name (the most
    /// specific one), and nothing else: other names, other protocols, raw
    /// chunks for another port, protocols PageKite has but we do not serve.
    #[test]
    fn sids_route_to_configured_kites_only() {
        let kites = set(&[
            "http:app.pk.test=127.0.0.1:1",
            "http:*.pk.test=127.0.0.1:2",
            "https:app.pk.test=127.0.0.1:3",
            "tcp:ssh.pk.test:22=127.0.0.1:4",
        ]);
        let kite = |d: ChunkDest| route(&kites, &d).map(|v| v.kite.to_string());
        assert_eq!(
            kite(dest("http", "app.pk.test", Some(80))).as_deref(),
            Some("http:app.pk.test")
        );
        assert_eq!(
            kite(dest("http", "APP.pk.test.:8080", Some(8080))).as_deref(),
            Some("http:app.pk.test")
        );
        assert_eq!(
            kite(dest("websocket", "app.pk.test", None)).as_deref(),
            Some("http:app.pk.test")
        );
        assert_eq!(
            kite(dest("http", "blog.pk.test", None)).as_deref(),
            Some("http:*.pk.test")
        );
        assert_eq!(
            kite(dest("https", "app.pk.test", Some(443))).as_deref(),
            Some("https:app.pk.test")
        );
        assert_eq!(
            kite(dest("raw", "ssh.pk.test", Some(22))).as_deref(),
            Some("tcp:ssh.pk.test:22")
        );
        for refused in [
            dest("http", "pk.test", None),
            dest("http", "evil.example.net", None),
            dest("http", "app.pk.test.evil.example.net", None),
            dest("https", "blog.pk.test", None),
            dest("raw", "ssh.pk.test", Some(2222)),
            dest("raw", "ssh.pk.test", None),
            dest("raw", "app.pk.test", Some(22)),
            dest("probe", "app.pk.test", None),
            dest("http", "", None),
        ] {
            assert_eq!(route(&kites, &refused), None, "{refused:?}");
        }
        let visitor = route(&kites, &dest("http", "app.pk.test", None)).unwrap();
        assert_eq!(visitor.peer, "192.0.2.7:4000");
        assert_eq!(visitor.host.as_deref(), Some("app.pk.test"));
        let mut v6 = dest("http", "app.pk.test", None);
        v6.rip = Some("2001:db8::1".into());
        assert_eq!(route(&kites, &v6).unwrap().peer, "[2001:db8::1]:4000");
        v6.rip = Some("::ffff:192.0.2.7".into());
        assert_eq!(route(&kites, &v6).unwrap().peer, "192.0.2.7:4000");
    }

    /// Our requests: `raw-PORT` for tcp kites, one salt per attempt, the
    /// front-end's token where it challenged, and a signature pagekite.py's
    /// check accepts (the codec's port of it).
    #[test]
    fn requests_are_signed_like_pagekite_py() {
        let kites = offered(&set(&[
            "http:app.pk.test=1",
            "tcp:ssh.pk.test:22=127.0.0.1:22",
        ]));
        let srand = sign::random_salt();
        let first = requests(&kites, &srand, &HashMap::new());
        assert_eq!(first.len(), 2);
        assert_eq!(first[0].what(), format!("http:app.pk.test:{srand}"));
        assert_eq!(first[1].what(), format!("raw-22:ssh.pk.test:{srand}"));
        assert!(first.iter().all(|r| r.token.is_empty()));
        let challenge = "t59cb39d008db8825943de34e3e6e428c181".to_string();
        let answers = vec![
            KiteAnswer::SignThis {
                what: format!("raw-22:ssh.pk.test:{srand}"),
                token: challenge.clone(),
            },
            KiteAnswer::Ok(format!("http:app.pk.test:{srand}")),
        ];
        let tokens = challenges(&answers);
        assert_eq!(tokens.get("raw-22:ssh.pk.test"), Some(&challenge));
        let signed = requests(&kites, &srand, &tokens);
        assert_eq!(signed[1].token, challenge);
        assert_eq!(signed[0].token, "");
        for request in &signed {
            assert!(sign::check_signature(
                &request.sign,
                SECRET,
                &request.payload(),
                0
            ));
            assert!(!sign::check_signature(
                &request.sign,
                "another-secret",
                &request.payload(),
                0
            ));
        }
        let offered: Vec<Offered> = kites.into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            answered(&offered, &format!("RAW-22:SSH.pk.test:{srand}")).map(|k| k.kite.to_string()),
            Some("tcp:ssh.pk.test:22".to_string())
        );
        assert_eq!(answered(&offered, "http:other.pk.test:x"), None);
        assert_eq!(answered(&offered, "garbage"), None);
    }

    #[test]
    fn public_addresses_follow_the_front_end_ports() {
        let hello = |ports: &[&str]| FrontEndHello {
            features: Vec::new(),
            protos: Vec::new(),
            ports: ports.iter().map(|p| p.to_string()).collect(),
            raw_ports: Vec::new(),
            answers: Vec::new(),
            session_id: None,
        };
        let http = KiteRef::parse("http:app.pk.test").unwrap();
        assert_eq!(
            public_address(&http, &hello(&["80", "443"])),
            "http://app.pk.test"
        );
        assert_eq!(
            public_address(&http, &hello(&["8080"])),
            "http://app.pk.test:8080"
        );
        let tcp = KiteRef::parse("tcp:ssh.pk.test:22").unwrap();
        assert_eq!(public_address(&tcp, &hello(&[])), "ssh.pk.test:22");
    }
}
