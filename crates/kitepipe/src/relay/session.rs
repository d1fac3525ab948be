//! A connector's link, seen from the relay: TLS, handshake, kite
//! registration (authorized by a domain secret or the link's certificate
//! identity), the node name's proof, and cleanup when the link ends.
//!
//! Strangers are bounded here: a link holds a place among the unproven
//! ([`MAX_UNPROVEN_LINKS`], [`MAX_UNPROVEN_PER_SOURCE`]) until it proves
//! something, and is closed if it has not within [`HANDSHAKE_TIMEOUT`] or
//! after its first registration; wrong proofs close the link
//! ([`MAX_WRONG_PROOFS_PER_LINK`]) and make its source address back off
//! ([`ProofThrottle`]); names reserved for certificate identities are never
//! granted to a secret; a link with a certificate ends at its notAfter.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use kitepipe_proto::frame::ResetCode;
use kitepipe_proto::kite::{self, KiteProto, KiteRef};
use kitepipe_proto::message::{
    self, Challenge, ConnectorMessage, ErrorCode, ErrorMessage, KiteClaim, KiteOutcome, KiteResult,
    MAX_NODE_PROOFS, MAX_WITHDRAW, NODE_PROOF_PROTOCOL, NodeOutcome, PROTOCOL_VERSION,
    RefuseReason, Register, Registered, RelayMessage, Role, StreamHeader,
};
use kitepipe_proto::policy::VisitorPolicy;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::RelayCtx;
use super::http_policy::HttpRules;
use super::identity::{
    IdentityState, REFUSE_GRACE, enforce, refuse_link, reserved_for_certificates,
};
use super::link_identity::LinkIdentity;
use super::registry::{Grant, LinkId, RemoteOffer};
use crate::link::LinkIo;
use crate::link::io::ReadAhead;
use crate::link::{IncomingStream, LinkClosed, Mux, MuxReceivers, Side};
use crate::metrics::{HandshakeFailure, LinkUp};
use crate::pki::{
    ProofInput, describe_relay_tls_error, link_exporter, pattern_covers, random_nonce,
    verify_kite_proof,
};
use crate::sync::lock;

use crate::link::HANDSHAKE_TIMEOUT;

/// How long a refused TLS connection is kept open after the relay's alert,
/// reading and discarding what the peer still sends. In TLS 1.3 a connector
/// learns that its certificate was refused only after its side of the
/// handshake is done, and it may already have sent its hello; closing a
/// socket with unread bytes sends a TCP reset, which can destroy the alert
/// before the connector reads it.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// Most bytes read and discarded while lingering.
const REFUSAL_LINGER_BYTES: usize = 64 * 1024;

/// Links that have proven nothing yet (no certificate, no accepted kite, no
/// node proof), from their first TLS byte until they prove something or
/// [`HANDSHAKE_TIMEOUT`] passes. Past this many, the oldest is closed to
/// make room: a connector proves itself within a round trip or two of its
/// TLS handshake, a flood's links sit, so the flood evicts itself. Each
/// costs a TLS handshake's state (~30 KiB), so the bound caps them at
/// ~8 MiB; 256 leaves room for a burst of reconnecting connectors after a
/// relay restart (they come in one by one, each gone from here in ms).
pub(crate) const MAX_UNPROVEN_LINKS: usize = 256;

/// Wrong proofs (kite or node) after which a link is closed (once its
/// registration is answered). Enough for a connector whose few kites share one wrong secret
/// to see every refusal in one registration, few enough that guessing
/// needs a new link (and a new TLS handshake) every few guesses.
pub(crate) const MAX_WRONG_PROOFS_PER_LINK: u32 = 4;

/// Wrong proofs one source address may send before its proofs are refused
/// unchecked for a while (exponential backoff from [`GUESS_BACKOFF_FIRST`]).
/// A misconfigured connector restarting a few times stays under it.
pub(crate) const FREE_WRONG_PROOFS: u32 = 8;

/// First backoff after [`FREE_WRONG_PROOFS`]; each further wrong proof
/// doubles it, up to [`GUESS_BACKOFF_MAX`]. A guesser gets about
/// `FREE_WRONG_PROOFS + log2(window / 1 s)` verdicts per window.
pub(crate) const GUESS_BACKOFF_FIRST: Duration = Duration::from_secs(1);

/// Longest backoff of a source address.
pub(crate) const GUESS_BACKOFF_MAX: Duration = Duration::from_secs(15 * 60);

/// A source address without a wrong proof for this long starts over.
const GUESS_FORGET_AFTER: Duration = Duration::from_secs(60 * 60);

/// Source addresses (IPv6 by /64) whose wrong proofs are remembered. Each
/// entry is ~64 bytes; past the bound the entry with the oldest last
/// failure is forgotten (an attacker with that many networks gains at most
/// a fresh [`FREE_WRONG_PROOFS`] per network).
pub(crate) const MAX_GUESS_SOURCES: usize = 4096;

/// Least time between two registrations on one link: a later `register`
/// waits (the link's control loop is its own backpressure). A connector
/// registers once per link; this bounds what a link can make the relay
/// check (claims, proofs, TCP port binds) to one message's worth a second.
pub(crate) const MIN_REGISTER_INTERVAL: Duration = Duration::from_secs(1);

/// Links that have proven nothing yet from one source address (IPv6: one
/// /64); past this many, that source's oldest is closed. A flood from one
/// address then only ever evicts its own links, never another address's
/// handshake; 64 leaves room for a fleet behind one NAT reconnecting at
/// once (each is here for milliseconds).
pub(crate) const MAX_UNPROVEN_PER_SOURCE: usize = 64;

/// The links that have proven nothing yet (see [`MAX_UNPROVEN_LINKS`]).
#[derive(Default)]
pub(crate) struct UnprovenLinks {
    inner: Arc<Mutex<UnprovenInner>>,
}

#[derive(Default)]
struct UnprovenInner {
    next: u64,
    /// Oldest first; the token is cancelled to evict the link.
    links: BTreeMap<u64, (IpAddr, CancellationToken)>,
    /// Live entries per source (only sources with one are here).
    per_source: HashMap<IpAddr, usize>,
}

impl UnprovenInner {
    fn evict(&mut self, id: u64) {
        if let Some((source, token)) = self.links.remove(&id) {
            token.cancel();
            self.forget(source);
        }
    }

    fn forget(&mut self, source: IpAddr) {
        if let Some(count) = self.per_source.get_mut(&source) {
            *count -= 1;
            if *count == 0 {
                self.per_source.remove(&source);
            }
        }
    }
}

/// A link's place among the unproven; leaves them when dropped.
pub(crate) struct UnprovenSlot {
    id: u64,
    evicted: CancellationToken,
    set: Arc<Mutex<UnprovenInner>>,
}

impl UnprovenLinks {
    /// Takes a place for a new link from `peer`, evicting the oldest
    /// unproven link of the same source if it has
    /// [`MAX_UNPROVEN_PER_SOURCE`], else the oldest of all if all
    /// [`MAX_UNPROVEN_LINKS`] are taken.
    pub(crate) fn enter(&self, peer: IpAddr) -> UnprovenSlot {
        let source = source_key(peer);
        let mut inner = lock(&self.inner);
        if inner.per_source.get(&source).copied().unwrap_or(0) >= MAX_UNPROVEN_PER_SOURCE {
            let oldest = inner
                .links
                .iter()
                .find(|(_, (from, _))| *from == source)
                .map(|(id, _)| *id);
            if let Some(id) = oldest {
                inner.evict(id);
            }
        }
        if inner.links.len() >= MAX_UNPROVEN_LINKS
            && let Some(id) = inner.links.keys().next().copied()
        {
            inner.evict(id);
        }
        inner.next += 1;
        let id = inner.next;
        let evicted = CancellationToken::new();
        inner.links.insert(id, (source, evicted.clone()));
        *inner.per_source.entry(source).or_default() += 1;
        UnprovenSlot {
            id,
            evicted,
            set: self.inner.clone(),
        }
    }

    /// How many links hold a place.
    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.inner).links.len()
    }
}

impl UnprovenSlot {
    /// Cancelled when the slot is evicted (see [`UnprovenLinks::enter`]).
    pub(crate) fn evicted(&self) -> &CancellationToken {
        &self.evicted
    }
}

impl Drop for UnprovenSlot {
    fn drop(&mut self) {
        let mut inner = lock(&self.set);
        if let Some((source, _)) = inner.links.remove(&self.id) {
            inner.forget(source);
        }
    }
}

/// Wrong proofs per source address, for the backoff (see
/// [`FREE_WRONG_PROOFS`]).
#[derive(Default)]
pub(crate) struct ProofThrottle {
    sources: Mutex<HashMap<IpAddr, Guesses>>,
}

#[derive(Clone, Copy)]
struct Guesses {
    wrong: u32,
    last: Instant,
    blocked_until: Instant,
}

impl ProofThrottle {
    /// `Err(retry_after)` while `peer`'s proofs are not checked.
    pub(crate) fn check(&self, peer: IpAddr, now: Instant) -> Result<(), Duration> {
        let sources = lock(&self.sources);
        match sources.get(&source_key(peer)) {
            Some(entry) if entry.blocked_until > now => Err(entry.blocked_until - now),
            _ => Ok(()),
        }
    }

    /// Counts a wrong proof from `peer`.
    pub(crate) fn failed(&self, peer: IpAddr, now: Instant) {
        let key = source_key(peer);
        let mut sources = lock(&self.sources);
        if sources.len() >= MAX_GUESS_SOURCES && !sources.contains_key(&key) {
            sources.retain(|_, entry| now.duration_since(entry.last) < GUESS_FORGET_AFTER);
            if sources.len() >= MAX_GUESS_SOURCES
                && let Some(oldest) = sources
                    .iter()
                    .min_by_key(|(_, entry)| entry.last)
                    .map(|(key, _)| *key)
            {
                sources.remove(&oldest);
            }
        }
        let entry = sources.entry(key).or_insert(Guesses {
            wrong: 0,
            last: now,
            blocked_until: now,
        });
        if now.duration_since(entry.last) >= GUESS_FORGET_AFTER {
            entry.wrong = 0;
        }
        entry.wrong = entry.wrong.saturating_add(1);
        entry.last = now;
        if entry.wrong >= FREE_WRONG_PROOFS {
            let doublings = (entry.wrong - FREE_WRONG_PROOFS).min(20);
            let delay = GUESS_BACKOFF_FIRST
                .saturating_mul(1 << doublings)
                .min(GUESS_BACKOFF_MAX);
            entry.blocked_until = now + delay;
        }
    }

    /// How many source addresses are remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.sources).len()
    }
}

/// The key a source address is throttled by: the address itself for IPv4,
/// its /64 network for IPv6 (one host gets a whole /64).
fn source_key(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V4(_) => peer,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
    }
}

/// Accepts a connector's TLS link (after `prefix`, bytes already read) and
/// serves it until it closes.
pub(crate) async fn accept(
    sock: TcpStream,
    prefix: BytesMut,
    peer: SocketAddr,
    ctx: Arc<RelayCtx>,
) {
    let unproven = ctx.unproven.enter(peer.ip());
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let io = ReadAhead::for_handshake(prefix, sock);
    let state = ctx.identity();
    let accept = state.acceptor.accept(io).into_fallible();
    let accepted = tokio::select! {
        accepted = tokio::time::timeout_at(deadline, accept) => accepted,
        _ = unproven.evicted.cancelled() => {
            debug!("too many unauthenticated links: closing the oldest, this one, during TLS");
            ctx.registry.metrics.handshake_failed(HandshakeFailure::Busy);
            return;
        }
    };
    let tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err((err, io))) => {
            // Garbage, scanners and wrong pins all end here: not an operator
            // problem. Refused certificates are logged with their name by
            // the verifier.
            match describe_relay_tls_error(&err) {
                Some(hint) => info!(%err, %hint, "link TLS handshake failed"),
                None => info!(%err, "link TLS handshake failed"),
            }
            ctx.registry.metrics.handshake_failed(HandshakeFailure::Tls);
            ctx.registry.metrics.error(
                &peer.to_string(),
                &format!("link TLS handshake failed: {err}"),
            );
            linger(io).await;
            return;
        }
        Err(_) => {
            info!("link TLS handshake timed out");
            ctx.registry
                .metrics
                .handshake_failed(HandshakeFailure::Timeout);
            return;
        }
    };
    if !crate::pki::has_link_alpn(tls.get_ref().1) {
        // rustls completes handshakes with clients that offer no ALPN at all.
        info!("TLS client without the kitepipe ALPN on the link port; closing");
        return;
    }
    let exporter = match link_exporter(tls.get_ref().1) {
        Ok(exporter) => exporter,
        Err(err) => {
            warn!(%err, "cannot derive link exporter");
            return;
        }
    };
    let identity = match tls.get_ref().1.peer_certificates() {
        Some(chain) if !chain.is_empty() => match LinkIdentity::from_chain(chain) {
            Ok(identity) => {
                debug!(identity = %identity.name, serial = %identity.serial, "connector certificate verified");
                Some(Arc::new(identity))
            }
            Err(err) => {
                warn!(%err, "verified connector certificate has no usable name; closing");
                return;
            }
        },
        _ => None,
    };
    let tls = match LinkIo::after_handshake(tokio_rustls::TlsStream::Server(tls)) {
        Ok(tls) => tls,
        Err(err) => {
            warn!(%err, "cannot start the link's record layer; closing");
            return;
        }
    };
    let token = ctx.token.child_token();
    let (reader, writer) = tls.into_mux_parts();
    let (mux, rx) = Mux::start_parts(
        reader,
        writer,
        BytesMut::new(),
        Side::Relay,
        &ctx.mux,
        &ctx.tracker,
        token.clone(),
    );
    let link = NewLink {
        exporter,
        peer,
        // A certificate proves the link at once.
        unproven: identity.is_none().then_some(unproven),
        deadline,
        identity,
        generation: state.generation,
    };
    drop(state);
    run(mux, rx, link, &ctx).await;
    token.cancel();
}

/// What the TLS handshake established about a new link.
struct NewLink {
    exporter: [u8; 32],
    peer: SocketAddr,
    /// Its place among the links that have proven nothing yet (none with a
    /// certificate).
    unproven: Option<UnprovenSlot>,
    /// When it must have proven something.
    deadline: Instant,
    identity: Option<Arc<LinkIdentity>>,
    /// Generation of the identity state that accepted the link.
    generation: u64,
}

/// Keeps a refused connection open briefly after its refusal (a TLS
/// alert, or `relay::pagekite`'s HTTP answer), so a reset does not destroy
/// it: shuts down the sending side, then reads and discards until the peer closes, for at
/// most [`REFUSAL_LINGER`].
pub(super) async fn linger<T: AsyncRead + AsyncWrite + Unpin>(mut io: T) {
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        let _ = io.shutdown().await;
        let mut buf = [0u8; 4096];
        let mut total = 0;
        while total < REFUSAL_LINGER_BYTES {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

async fn run(mux: Mux, mut rx: MuxReceivers, link: NewLink, ctx: &Arc<RelayCtx>) {
    let NewLink {
        exporter,
        peer,
        unproven,
        deadline,
        identity,
        generation,
    } = link;
    let evicted = unproven.as_ref().map(|slot| slot.evicted.clone());
    let hello = match recv(&mux, &mut rx, deadline, evicted.as_ref()).await {
        Ok(ConnectorMessage::Hello(hello)) => hello,
        Ok(other) => {
            fail(
                &mux,
                ErrorCode::Protocol,
                format!("expected hello, got {other:?}"),
            )
            .await;
            return;
        }
        Err(why) => {
            info!(%why, "link closed during handshake");
            ctx.registry
                .metrics
                .handshake_failed(HandshakeFailure::Protocol);
            return;
        }
    };
    if hello.version != PROTOCOL_VERSION || hello.role != Role::Connector {
        let why = format!(
            "this relay speaks protocol version {PROTOCOL_VERSION} to connectors; \
             got version {} as {:?}: upgrade the older side",
            hello.version, hello.role
        );
        warn!(node = %printable(&hello.node), version = hello.version, "refusing link: version mismatch");
        ctx.registry
            .metrics
            .handshake_failed(HandshakeFailure::Protocol);
        fail(&mux, ErrorCode::Version, why).await;
        return;
    }
    let Some(client_nonce) = message::unhex(&hello.client_nonce).filter(|n| n.len() == 32) else {
        fail(
            &mux,
            ErrorCode::Protocol,
            "client nonce must be 32 hex bytes".into(),
        )
        .await;
        return;
    };
    let server_nonce = random_nonce();
    let challenge = RelayMessage::Challenge(Challenge {
        version: PROTOCOL_VERSION,
        server_nonce: message::hex(&server_nonce),
    });
    if mux.send_control(message::encode(&challenge)).await.is_err() {
        return;
    }
    // A certificate names the node; the hello's name is only a claim until
    // a node proof backs it.
    let node = match &identity {
        Some(identity) => identity.name.clone(),
        None => printable(&hello.node),
    };
    // A connector's instance is 32 hex digits; a longer one is cut, not kept.
    let instance: String = hello.instance.chars().take(MAX_INSTANCE).collect();
    let link_id = ctx.registry.add_link(
        &instance,
        &node,
        mux.clone(),
        peer,
        identity.clone(),
        match (&hello.agent, hello.remote.is_empty()) {
            (Some(agent), false) => Some(RemoteOffer {
                classes: hello.remote.clone(),
                agent: agent.clone(),
            }),
            _ => None,
        },
    );
    let span = info_span!("link", node = %node, id = link_id, %peer);
    async {
        match &identity {
            Some(identity) => info!(software = %printable(&hello.software), identity = %identity.name, serial = %identity.serial, "connector linked"),
            None => info!(software = %printable(&hello.software), "connector linked"),
        }
        recheck_if_reloaded(ctx, link_id, generation);
        let nonces = Nonces {
            exporter,
            server: server_nonce,
            client: client_nonce,
        };
        let mut state = LinkState {
            link_id,
            peer,
            node,
            unproven,
            deadline,
            node_answered: identity.is_some(),
            wrong_proofs: 0,
            last_register: None,
            expires: identity.as_ref().map(|identity| expiry(identity.not_after)),
            identity,
            up: None,
        };
        let reason = serve(&mux, &mut rx, &nonces, &mut state, ctx).await;
        ctx.registry.remove_link(link_id);
        match &reason {
            LinkClosed::Shutdown => info!("link closed: relay shutting down"),
            reason => {
                info!(%reason, "link closed");
                ctx.registry.metrics.error(&printable(&hello.node), &format!("link closed: {reason}"));
            }
        }
    }
    .instrument(span)
    .await;
}

struct Nonces {
    exporter: [u8; 32],
    server: [u8; 32],
    client: Vec<u8>,
}

/// Longest node name kept from a hello (a DNS name is at most 253 bytes).
const MAX_NODE_NAME: usize = 253;

/// Longest connector instance kept from a hello (connectors send 32 hex
/// digits).
const MAX_INSTANCE: usize = 64;

/// A hello's node name as the relay keeps and logs it: at most
/// [`MAX_NODE_NAME`] characters, anything but printable ASCII replaced by
/// `?` (it reaches logs a person reads; such a name is no host name and
/// can never be proven anyway).
fn printable(name: &str) -> String {
    name.chars()
        .take(MAX_NODE_NAME)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

/// What the relay knows about a live link, as its registrations change it.
struct LinkState {
    link_id: LinkId,
    peer: SocketAddr,
    /// The node name: the certificate's, else the hello's claim.
    node: String,
    /// Held until the link proves something (see [`MAX_UNPROVEN_LINKS`]).
    unproven: Option<UnprovenSlot>,
    /// When an unproven link is closed.
    deadline: Instant,
    /// Whether the node name was judged already (certificate, or the first
    /// registration's node proofs).
    node_answered: bool,
    /// Wrong proofs so far (see [`MAX_WRONG_PROOFS_PER_LINK`]).
    wrong_proofs: u32,
    /// When the last registration was judged (see [`MIN_REGISTER_INTERVAL`]).
    last_register: Option<Instant>,
    /// When the link's certificate expires.
    expires: Option<Instant>,
    identity: Option<Arc<LinkIdentity>>,
    /// Counts the link up once it serves a kite (a stranger's link that
    /// registers nothing makes no series).
    up: Option<LinkUp>,
}

/// The instant `not_after` falls at (now if it has passed).
fn expiry(not_after: SystemTime) -> Instant {
    let left = not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    // A certificate valid for centuries: a far instant that cannot overflow.
    Instant::now() + left.min(Duration::from_secs(100 * 365 * 24 * 60 * 60))
}

async fn serve(
    mux: &Mux,
    rx: &mut MuxReceivers,
    nonces: &Nonces,
    link: &mut LinkState,
    ctx: &Arc<RelayCtx>,
) -> LinkClosed {
    let never = CancellationToken::new();
    loop {
        let evicted = link
            .unproven
            .as_ref()
            .map_or(&never, |slot| &slot.evicted)
            .clone();
        let unproven = link.unproven.is_some();
        let expires = link.expires;
        tokio::select! {
            reason = mux.closed() => return reason,
            _ = ctx.token.cancelled() => {
                mux.close(LinkClosed::Shutdown);
                return LinkClosed::Shutdown;
            }
            _ = evicted.cancelled(), if unproven => {
                let why = "too many unauthenticated links: this one proved nothing and was the oldest";
                info!("closing link: {why}");
                refuse(mux, why.into()).await;
                return LinkClosed::Protocol(why.into());
            }
            _ = tokio::time::sleep_until(link.deadline), if unproven => {
                let why = format!(
                    "the link proved nothing within {HANDSHAKE_TIMEOUT:?}: no client certificate, \
                     no kite accepted, no node proof"
                );
                info!("closing link: {why}");
                refuse(mux, why.clone()).await;
                return LinkClosed::Protocol(why);
            }
            _ = tokio::time::sleep_until(expires.unwrap_or(link.deadline)), if expires.is_some() => {
                close_expired(mux, link, ctx);
                return mux.closed().await;
            }
            incoming = rx.incoming.recv() => {
                if let Some(incoming) = incoming {
                    serve_stream(incoming, link.link_id, ctx);
                }
            }
            control = rx.control.recv() => {
                let Some(payload) = control else { return mux.closed().await };
                match message::decode::<ConnectorMessage>(&payload) {
                    Ok(ConnectorMessage::Register(register)) => {
                        if let Some(last) = link.last_register {
                            tokio::select! {
                                _ = tokio::time::sleep_until(last + MIN_REGISTER_INTERVAL) => {}
                                reason = mux.closed() => return reason,
                            }
                        }
                        link.last_register = Some(Instant::now());
                        if let Some(reason) = registration(mux, register, nonces, link, ctx).await {
                            return reason;
                        }
                    }
                    Ok(ConnectorMessage::Hello(_)) => {
                        fail(mux, ErrorCode::Protocol, "hello sent twice".into()).await;
                        return LinkClosed::Protocol("hello sent twice".into());
                    }
                    Err(err) => {
                        warn!(%err, "malformed control message from connector");
                        fail(mux, ErrorCode::Protocol, format!("malformed control message: {err}")).await;
                        return LinkClosed::Protocol(err.to_string());
                    }
                }
            }
        }
    }
}

/// Judges one registration (kites, then the node name on the first one),
/// answers it, and says why the link ends if it must: too many wrong
/// proofs, or a first registration that proved nothing.
async fn registration(
    mux: &Mux,
    register: Register,
    nonces: &Nonces,
    link: &mut LinkState,
    ctx: &Arc<RelayCtx>,
) -> Option<LinkClosed> {
    let state = ctx.identity();
    if !withdraw(mux, &register.withdraw, link, ctx).await {
        return Some(mux.closed().await);
    }
    let outcomes = register_kites(register.kites, nonces, link, &state, ctx).await;
    let accepted = outcomes
        .iter()
        .any(|outcome| matches!(outcome.result, KiteResult::Accepted { .. }));
    let node = if link.node_answered {
        None
    } else {
        link.node_answered = true;
        Some(prove_node(&register.node_proofs, nonces, link, &state, ctx))
    };
    recheck_if_reloaded(ctx, link.link_id, state.generation);
    let proven = node.as_ref().is_some_and(|node| node.proven);
    if accepted || proven {
        link.unproven = None;
    }
    if accepted && !proven && link.identity.is_none() {
        ctx.registry.replace_by_kites(link.link_id);
    }
    let reply = RelayMessage::Registered(Registered {
        kites: outcomes,
        node,
    });
    if mux.send_control(message::encode(&reply)).await.is_err() {
        return Some(mux.closed().await);
    }
    if link.wrong_proofs >= MAX_WRONG_PROOFS_PER_LINK {
        let why = format!(
            "too many wrong proofs on this link ({}): check the connector's secret",
            link.wrong_proofs
        );
        warn!(peer = %link.peer, "closing link: {why}");
        refuse(mux, why.clone()).await;
        return Some(LinkClosed::Protocol(why));
    }
    if link.unproven.is_some() {
        let why = "the link proved nothing: no client certificate, no kite accepted, no node proof \
                   (see the refusals above)";
        info!("closing link: {why}");
        refuse(mux, why.into()).await;
        return Some(LinkClosed::Protocol(why.into()));
    }
    None
}

/// Stops routing the kites a registration withdraws to this link (only
/// this link's backends go; a kite it never held changes nothing). More
/// than [`MAX_WITHDRAW`] are answered with an error and ignored. False if
/// the link is gone.
async fn withdraw(mux: &Mux, kites: &[KiteRef], link: &LinkState, ctx: &Arc<RelayCtx>) -> bool {
    if kites.is_empty() {
        return true;
    }
    if kites.len() > MAX_WITHDRAW {
        let why = format!(
            "a registration may withdraw at most {MAX_WITHDRAW} kites, not {}: nothing withdrawn",
            kites.len()
        );
        warn!(peer = %link.peer, "{why}");
        let reply = RelayMessage::Error(ErrorMessage {
            code: ErrorCode::Protocol,
            message: why,
        });
        return mux.send_control(message::encode(&reply)).await.is_ok();
    }
    for kite in ctx.registry.withdraw(link.link_id, kites) {
        info!(kite = %kite, "kite withdrawn by its connector");
    }
    true
}

/// Closes a link whose certificate just expired, telling the connector why.
fn close_expired(mux: &Mux, link: &LinkState, ctx: &Arc<RelayCtx>) {
    let Some(identity) = &link.identity else {
        return;
    };
    let message = format!(
        "certificate {} (serial {}) expired at {}: issue a new one (kitepipe ca issue) and restart the connector",
        identity.name,
        identity.serial,
        humantime::format_rfc3339_seconds(identity.not_after)
    );
    warn!(identity = %identity.name, serial = %identity.serial, "closing link: certificate expired");
    refuse_link(ctx, link.link_id, mux.clone(), message);
}

/// Judges the node name of a link without a certificate: proven if one of
/// `proofs` matches the secret of a domain covering the name and no
/// certificate identity reserves it.
fn prove_node(
    proofs: &[String],
    nonces: &Nonces,
    link: &mut LinkState,
    state: &IdentityState,
    ctx: &Arc<RelayCtx>,
) -> NodeOutcome {
    let claimed = link.node.clone();
    let name = claimed.to_ascii_lowercase();
    let refuse = |message: String| {
        warn!(node = %claimed, %message, "node name not proven: events and remote operations will not reach it by name");
        NodeOutcome {
            name: name.clone(),
            proven: false,
            message,
        }
    };
    if proofs.is_empty() {
        return refuse(format!(
            "node name {claimed} is not proven: the connector sent no node proof (it needs a \
             client certificate, or a domain secret and a name under that domain)"
        ));
    }
    if kite::normalize_name(&name).is_err() || name.starts_with("*.") {
        return refuse(format!(
            "node name {claimed} cannot be proven with a secret: it is not a host name"
        ));
    }
    if let Some(why) = reserved_for_certificates(&name, state, ctx) {
        return refuse(format!("node name {claimed} is {why}"));
    }
    let domains: Vec<_> = ctx
        .config
        .domains
        .iter()
        .filter(|d| pattern_covers(&d.pattern, &name))
        .collect();
    if domains.is_empty() {
        return refuse(format!(
            "no domain on this relay covers node name {claimed}: a secret proves only node names \
             under its domain (e.g. {claimed}.<domain>); set --name accordingly"
        ));
    }
    let input = ProofInput {
        tls_exporter: &nonces.exporter,
        server_nonce: &nonces.server,
        client_nonce: &nonces.client,
        protocol: NODE_PROOF_PROTOCOL,
        name: &claimed,
    };
    if let Err(why) = throttle_check(link, ctx) {
        return refuse(why);
    }
    let proven = proofs.iter().take(MAX_NODE_PROOFS).any(|proof| {
        let proof = message::unhex(proof).unwrap_or_default();
        domains
            .iter()
            .any(|d| verify_kite_proof(&d.secret, &input, &proof))
    });
    if !proven {
        wrong_proof(link, ctx);
        return refuse(format!(
            "wrong secret for node name {claimed} (domain {})",
            domains[0].pattern
        ));
    }
    if !ctx.registry.prove_node(link.link_id, &name) {
        return refuse("link closed during registration".into());
    }
    info!(node = %name, "node name proven");
    NodeOutcome {
        name,
        proven: true,
        message: String::new(),
    }
}

/// `Err(why)` while the link's source address is backing off after wrong
/// proofs, or the link itself sent too many.
fn throttle_check(link: &mut LinkState, ctx: &Arc<RelayCtx>) -> Result<(), String> {
    if link.wrong_proofs >= MAX_WRONG_PROOFS_PER_LINK {
        link.wrong_proofs += 1;
        return Err("not checked: this link sent too many wrong proofs".into());
    }
    if let Err(retry) = ctx.proof_throttle.check(link.peer.ip(), Instant::now()) {
        link.wrong_proofs += 1;
        return Err(format!(
            "not checked: too many wrong proofs from {}; retry after {}s",
            link.peer.ip(),
            retry.as_secs().max(1)
        ));
    }
    Ok(())
}

/// Counts a wrong proof against the link and its source address.
fn wrong_proof(link: &mut LinkState, ctx: &Arc<RelayCtx>) {
    ctx.registry
        .metrics
        .handshake_failed(HandshakeFailure::Auth);
    link.wrong_proofs += 1;
    ctx.proof_throttle.failed(link.peer.ip(), Instant::now());
}

/// Serves a stream the connector opened: events go to `events`; anything
/// else is refused.
fn serve_stream(incoming: IncomingStream, link_id: LinkId, ctx: &Arc<RelayCtx>) {
    let IncomingStream { header, mut stream } = incoming;
    match message::decode::<StreamHeader>(&header) {
        Ok(StreamHeader::Event(event)) => {
            let span = tracing::debug_span!("event", stream = stream.id());
            ctx.tracker.spawn(
                super::events::serve_from_connector(ctx.clone(), link_id, stream, event)
                    .instrument(span),
            );
        }
        Ok(StreamHeader::Visitor(_)) => {
            stream.reset(ResetCode::Refused, "connectors cannot open visitor streams");
        }
        Ok(StreamHeader::RemoteRelayed(_)) => {
            stream.reset(
                ResetCode::Refused,
                "remote operations go from the relay to connectors, not back",
            );
        }
        Err(err) => {
            debug!(%err, "bad stream header from connector");
            stream.reset(
                ResetCode::ProtocolError,
                &format!("bad stream header: {err}"),
            );
        }
    }
}

/// If a reload swapped the identity state since `generation`, applies the
/// current one to this link: a registration or handshake that raced the
/// reload was judged by the old rules, and the reload may not have seen it.
fn recheck_if_reloaded(ctx: &Arc<RelayCtx>, link_id: LinkId, generation: u64) {
    let state = ctx.identity();
    if state.generation == generation {
        return;
    }
    if let Some(link) = ctx.registry.identity_link(link_id) {
        enforce(ctx, &state, link);
    }
}

async fn register_kites(
    claims: Vec<KiteClaim>,
    nonces: &Nonces,
    link: &mut LinkState,
    state: &IdentityState,
    ctx: &Arc<RelayCtx>,
) -> Vec<KiteOutcome> {
    let mut outcomes = Vec::with_capacity(claims.len());
    for claim in claims {
        let result = match register_one(&claim, nonces, link, state, ctx).await {
            Ok((kite, result)) => {
                info!(kite = %kite, "kite online");
                if link.up.is_none() {
                    link.up = Some(ctx.registry.metrics.link_up(&link.node));
                }
                outcomes.push(KiteOutcome { kite, result });
                continue;
            }
            Err((reason, message)) => {
                warn!(kite = %claim.kite, ?reason, %message, "kite refused");
                ctx.registry.metrics.error(
                    &link.node,
                    &format!("kite {} refused: {message}", claim.kite),
                );
                KiteResult::Refused { reason, message }
            }
        };
        outcomes.push(KiteOutcome {
            kite: claim.kite,
            result,
        });
    }
    outcomes
}

async fn register_one(
    claim: &KiteClaim,
    nonces: &Nonces,
    link: &mut LinkState,
    state: &IdentityState,
    ctx: &Arc<RelayCtx>,
) -> Result<(KiteRef, KiteResult), (RefuseReason, String)> {
    let mut kite = claim.kite.clone();
    kite.name =
        kite::normalize_name(&kite.name).map_err(|err| (RefuseReason::Invalid, err.to_string()))?;
    if kite.proto != KiteProto::Tcp && kite.port != 0 {
        return Err((RefuseReason::Invalid, "only TCP kites have a port".into()));
    }
    // The connector is not trusted to send well-formed or short lists:
    // they are parsed and bounded again here.
    let policy = VisitorPolicy::parse(&claim.allow, &claim.deny).map_err(|err| {
        (
            RefuseReason::Invalid,
            format!("{kite}: bad visitor policy (allow/deny): {err}"),
        )
    })?;
    let http = HttpRules::new(claim.http.clone()).map_err(|err| {
        (
            RefuseReason::Invalid,
            format!("{kite}: bad HTTP rules: {err}"),
        )
    })?;
    let grant = authorize(claim, &kite, nonces, link, state, ctx)?;
    let link_id = link.link_id;
    let public = match kite.proto {
        KiteProto::Http if let Some(url) = super::terminate::public_url(&kite.name, ctx) => url,
        KiteProto::Http => {
            let port = ctx.http_port.ok_or((
                RefuseReason::ProtoDisabled,
                "this relay has no HTTP listener".to_string(),
            ))?;
            if port == 80 {
                format!("http://{}/", kite.name)
            } else {
                format!("http://{}:{port}/", kite.name)
            }
        }
        KiteProto::Https => {
            let port = ctx.https_port.ok_or((
                RefuseReason::ProtoDisabled,
                "this relay has no HTTPS listener".to_string(),
            ))?;
            if port == 443 {
                format!("https://{}/", kite.name)
            } else {
                format!("https://{}:{port}/", kite.name)
            }
        }
        KiteProto::Tcp => {
            let port = super::tcp::bind_kite_port(&kite, link_id, grant, ctx)?;
            kite.port = port;
            format!("{}:{port}", ctx.config.name)
        }
    };
    if !ctx.registry.add_kite(link_id, &kite, grant, policy, http) {
        return Err((
            RefuseReason::Invalid,
            "link closed during registration".into(),
        ));
    }
    ctx.acme.want(&kite);
    let port = kite.port;
    Ok((kite, KiteResult::Accepted { public, port }))
}

/// Decides whether a claim may be served, and by what right.
///
/// A claim with a proof is checked against the domain secrets, unless the
/// name is reserved for certificate identities; if that fails, a
/// certificate identity that is allowed the kite still gets it. A claim
/// without a proof is checked against the link's identity only.
fn authorize(
    claim: &KiteClaim,
    kite: &KiteRef,
    nonces: &Nonces,
    link: &mut LinkState,
    state: &IdentityState,
    ctx: &Arc<RelayCtx>,
) -> Result<Grant, (RefuseReason, String)> {
    let identity_allows = link
        .identity
        .as_ref()
        .is_some_and(|identity| state.rules.allows(&identity.name, kite));
    if identity_allows {
        return Ok(Grant::Identity);
    }
    if claim.proof.is_empty() {
        return match &link.identity {
            Some(identity) => Err((
                RefuseReason::NotAllowed,
                format!(
                    "identity {} may not claim {kite} under this relay's rules (it may claim: {})",
                    identity.name,
                    state.rules.describe_grants(&identity.name)
                ),
            )),
            None => Err((
                RefuseReason::NotAllowed,
                format!(
                    "{kite}: the claim has no proof and the link no client certificate: \
                     connect with --secret or --identity DIR"
                ),
            )),
        };
    }
    check_secret(claim, kite, nonces, link, state, ctx)?;
    Ok(Grant::Secret)
}

/// Checks a claim's proof against the secrets of the domains covering it
/// (never for a name reserved for certificate identities), counting a
/// wrong one against the link and its source address.
fn check_secret(
    claim: &KiteClaim,
    kite: &KiteRef,
    nonces: &Nonces,
    link: &mut LinkState,
    state: &IdentityState,
    ctx: &Arc<RelayCtx>,
) -> Result<(), (RefuseReason, String)> {
    let domains: Vec<_> = ctx
        .config
        .domains
        .iter()
        .filter(|d| d.protos.contains(&kite.proto) && pattern_covers(&d.pattern, &kite.name))
        .collect();
    if domains.is_empty() {
        return Err((
            RefuseReason::NoDomain,
            format!(
                "no domain on this relay covers {} for {}: the relay operator must add it (--domain)",
                kite.name, kite.proto
            ),
        ));
    }
    if let Some(why) = reserved_for_certificates(&kite.name, state, ctx) {
        return Err((RefuseReason::NotAllowed, format!("{kite} is {why}")));
    }
    throttle_check(link, ctx).map_err(|why| (RefuseReason::BadSecret, why))?;
    let proof = message::unhex(&claim.proof).unwrap_or_default();
    let input = ProofInput {
        tls_exporter: &nonces.exporter,
        server_nonce: &nonces.server,
        client_nonce: &nonces.client,
        protocol: kite.proto.as_str(),
        // The proof covers the name as the connector sent it.
        name: &claim.kite.name,
    };
    if domains
        .iter()
        .any(|d| verify_kite_proof(&d.secret, &input, &proof))
    {
        return Ok(());
    }
    wrong_proof(link, ctx);
    Err((
        RefuseReason::BadSecret,
        format!(
            "wrong secret for {} (domain {})",
            kite.name, domains[0].pattern
        ),
    ))
}

async fn recv(
    mux: &Mux,
    rx: &mut MuxReceivers,
    deadline: Instant,
    evicted: Option<&CancellationToken>,
) -> Result<ConnectorMessage, String> {
    let never = CancellationToken::new();
    let evicted = evicted.unwrap_or(&never);
    let payload: Bytes = tokio::select! {
        payload = rx.control.recv() => payload.ok_or_else(|| "link closed".to_string())?,
        reason = mux.closed() => return Err(reason.to_string()),
        _ = tokio::time::sleep_until(deadline) => return Err("handshake timed out".into()),
        _ = evicted.cancelled() => return Err("too many unauthenticated links; this was the oldest".into()),
    };
    message::decode(&payload).map_err(|err| err.to_string())
}

/// Tells the connector why its link is refused (`unauthorized`), waits up to
/// [`REFUSE_GRACE`] for it to hang up, then closes the link.
async fn refuse(mux: &Mux, message: String) {
    debug!(%message, "refusing link");
    let error = RelayMessage::Error(ErrorMessage {
        code: ErrorCode::Unauthorized,
        message: message.clone(),
    });
    let _ = tokio::time::timeout(REFUSE_GRACE, mux.send_control(message::encode(&error))).await;
    let _ = tokio::time::timeout(REFUSE_GRACE, mux.closed()).await;
    mux.close(LinkClosed::Protocol(message));
}

async fn fail(mux: &Mux, code: ErrorCode, message: String) {
    debug!(?code, %message, "sending error to connector");
    let error = RelayMessage::Error(ErrorMessage {
        code,
        message: message.clone(),
    });
    let _ = mux.send_control(message::encode(&error)).await;
    mux.close(LinkClosed::Protocol(message));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_unproven_link_is_evicted_when_all_places_are_taken() {
        let links = UnprovenLinks::default();
        let source = |i: usize| IpAddr::V4(((i / MAX_UNPROVEN_PER_SOURCE) as u32).into());
        let slots: Vec<_> = (0..MAX_UNPROVEN_LINKS)
            .map(|i| links.enter(source(i)))
            .collect();
        assert!(slots.iter().all(|slot| !slot.evicted.is_cancelled()));
        let newest = links.enter("192.0.2.1".parse().unwrap());
        assert!(slots[0].evicted.is_cancelled());
        assert!(!slots[1].evicted.is_cancelled() && !newest.evicted.is_cancelled());
        assert_eq!(links.len(), MAX_UNPROVEN_LINKS);
        // A source at its own bound evicts its own oldest, nobody else's.
        let last = links.enter(source(MAX_UNPROVEN_LINKS - 1));
        assert!(
            slots[MAX_UNPROVEN_LINKS - MAX_UNPROVEN_PER_SOURCE]
                .evicted
                .is_cancelled()
        );
        assert!(!slots[1].evicted.is_cancelled() && !last.evicted.is_cancelled());
        drop(slots);
        assert_eq!(links.len(), 2);
        assert_eq!(lock(&links.inner).per_source.len(), 2);
    }

    #[test]
    fn wrong_proofs_back_off_per_source_and_are_bounded() {
        let throttle = ProofThrottle::default();
        let guesser: IpAddr = "192.0.2.7".parse().unwrap();
        let honest: IpAddr = "192.0.2.8".parse().unwrap();
        let now = Instant::now();
        for _ in 0..FREE_WRONG_PROOFS - 1 {
            assert!(throttle.check(guesser, now).is_ok());
            throttle.failed(guesser, now);
        }
        assert!(throttle.check(guesser, now).is_ok());
        throttle.failed(guesser, now);
        assert_eq!(throttle.check(guesser, now), Err(GUESS_BACKOFF_FIRST));
        throttle.failed(guesser, now);
        assert_eq!(throttle.check(guesser, now), Err(GUESS_BACKOFF_FIRST * 2));
        assert!(
            throttle
                .check(guesser, now + GUESS_BACKOFF_FIRST * 2)
                .is_ok()
        );
        assert!(throttle.check(honest, now).is_ok());
        // One host's whole /64 is one source.
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::ffff:2".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        for i in 0..(MAX_GUESS_SOURCES as u32 + 10) {
            throttle.failed(IpAddr::V4(i.into()), now);
        }
        assert_eq!(throttle.len(), MAX_GUESS_SOURCES);
    }
}
