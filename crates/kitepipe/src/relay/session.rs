//! A connector's link, seen from the relay: TLS, handshake, kite
//! registration (authorized by a domain secret or the link's certificate
//! identity), and cleanup when the link ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kitepipe_proto::frame::ResetCode;
use kitepipe_proto::kite::{self, KiteProto, KiteRef};
use kitepipe_proto::message::{
    self, Challenge, ConnectorMessage, ErrorCode, ErrorMessage, KiteClaim, KiteOutcome, KiteResult,
    PROTOCOL_VERSION, RefuseReason, Registered, RelayMessage, Role, StreamHeader,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info, info_span, warn};

use super::RelayCtx;
use super::identity::{IdentityState, LinkIdentity, enforce};
use super::registry::{Grant, LinkId, RemoteOffer};
use crate::link::LinkIo;
use crate::link::io::ReadAhead;
use crate::link::{IncomingStream, LinkClosed, Mux, MuxReceivers, Side};
use crate::pki::{
    ProofInput, describe_relay_tls_error, link_exporter, pattern_covers, random_nonce,
    verify_kite_proof,
};

/// How long a connector has to finish TLS and say hello. Long enough for a
/// slow mobile link, short enough that half-open connections do not pile up.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a refused TLS connection is kept open after the relay's alert,
/// reading and discarding what the peer still sends. In TLS 1.3 a connector
/// learns that its certificate was refused only after its side of the
/// handshake is done, and it may already have sent its hello; closing a
/// socket with unread bytes sends a TCP reset, which can destroy the alert
/// before the connector reads it.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// Most bytes read and discarded while lingering.
const REFUSAL_LINGER_BYTES: usize = 64 * 1024;

/// Accepts a connector's TLS link (after `prefix`, bytes already read) and
/// serves it until it closes.
pub(crate) async fn accept(
    sock: TcpStream,
    prefix: BytesMut,
    peer: SocketAddr,
    ctx: Arc<RelayCtx>,
) {
    let io = ReadAhead::for_handshake(prefix, sock);
    let state = ctx.identity();
    let accept = state.acceptor.accept(io).into_fallible();
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err((err, io))) => {
            // Garbage, scanners and wrong pins all end here: not an operator
            // problem. Refused certificates are logged with their name by
            // the verifier.
            match describe_relay_tls_error(&err) {
                Some(hint) => info!(%err, %hint, "link TLS handshake failed"),
                None => info!(%err, "link TLS handshake failed"),
            }
            linger(io).await;
            return;
        }
        Err(_) => {
            info!("link TLS handshake timed out");
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
    identity: Option<Arc<LinkIdentity>>,
    /// Generation of the identity state that accepted the link.
    generation: u64,
}

/// Keeps a refused connection open briefly after the TLS alert: shuts down
/// the sending side, then reads and discards until the peer closes, for at
/// most [`REFUSAL_LINGER`].
async fn linger<T: AsyncRead + AsyncWrite + Unpin>(mut io: T) {
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
        identity,
        generation,
    } = link;
    let hello = match recv(&mux, &mut rx).await {
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
            return;
        }
    };
    if hello.version != PROTOCOL_VERSION || hello.role != Role::Connector {
        let why = format!(
            "this relay speaks protocol version {PROTOCOL_VERSION} to connectors; \
             got version {} as {:?}: upgrade the older side",
            hello.version, hello.role
        );
        warn!(node = %hello.node, version = hello.version, "refusing link: version mismatch");
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
    // A certificate names the node; the hello's name is only a claim.
    let node = match &identity {
        Some(identity) => identity.name.clone(),
        None => hello.node.chars().take(64).collect::<String>(),
    };
    let link_id = ctx.registry.add_link(
        &hello.instance,
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
            Some(identity) => info!(software = %hello.software, identity = %identity.name, serial = %identity.serial, "connector linked"),
            None => info!(software = %hello.software, "connector linked"),
        }
        recheck_if_reloaded(ctx, link_id, generation);
        let nonces = Nonces {
            exporter,
            server: server_nonce,
            client: client_nonce,
        };
        let reason = serve(&mux, &mut rx, &nonces, link_id, ctx).await;
        ctx.registry.remove_link(link_id);
        match &reason {
            LinkClosed::Shutdown => info!("link closed: relay shutting down"),
            reason => info!(%reason, "link closed"),
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

async fn serve(
    mux: &Mux,
    rx: &mut MuxReceivers,
    nonces: &Nonces,
    link_id: LinkId,
    ctx: &Arc<RelayCtx>,
) -> LinkClosed {
    loop {
        tokio::select! {
            reason = mux.closed() => return reason,
            _ = ctx.token.cancelled() => {
                mux.close(LinkClosed::Shutdown);
                return LinkClosed::Shutdown;
            }
            incoming = rx.incoming.recv() => {
                if let Some(incoming) = incoming {
                    serve_stream(incoming, link_id, ctx);
                }
            }
            control = rx.control.recv() => {
                let Some(payload) = control else { return mux.closed().await };
                match message::decode::<ConnectorMessage>(&payload) {
                    Ok(ConnectorMessage::Register(register)) => {
                        let state = ctx.identity();
                        let outcomes = register_kites(register.kites, nonces, link_id, &state, ctx).await;
                        recheck_if_reloaded(ctx, link_id, state.generation);
                        let reply = RelayMessage::Registered(Registered { kites: outcomes });
                        if mux.send_control(message::encode(&reply)).await.is_err() {
                            return mux.closed().await;
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
    link_id: LinkId,
    state: &IdentityState,
    ctx: &Arc<RelayCtx>,
) -> Vec<KiteOutcome> {
    let identity = ctx
        .registry
        .identity_link(link_id)
        .map(|link| link.identity);
    let mut outcomes = Vec::with_capacity(claims.len());
    for claim in claims {
        let auth = Authority {
            nonces,
            identity: identity.as_deref(),
            state,
        };
        let result = match register_one(&claim, &auth, link_id, ctx).await {
            Ok((kite, result)) => {
                info!(kite = %kite, "kite online");
                outcomes.push(KiteOutcome { kite, result });
                continue;
            }
            Err((reason, message)) => {
                warn!(kite = %claim.kite, ?reason, %message, "kite refused");
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

/// What a claim can be authorized by on one link.
struct Authority<'a> {
    nonces: &'a Nonces,
    /// The link's certificate identity, if it presented one.
    identity: Option<&'a LinkIdentity>,
    /// The identity rules in force for this registration.
    state: &'a IdentityState,
}

async fn register_one(
    claim: &KiteClaim,
    auth: &Authority<'_>,
    link_id: LinkId,
    ctx: &Arc<RelayCtx>,
) -> Result<(KiteRef, KiteResult), (RefuseReason, String)> {
    let mut kite = claim.kite.clone();
    kite.name =
        kite::normalize_name(&kite.name).map_err(|err| (RefuseReason::Invalid, err.to_string()))?;
    if kite.proto != KiteProto::Tcp && kite.port != 0 {
        return Err((RefuseReason::Invalid, "only TCP kites have a port".into()));
    }
    let grant = authorize(claim, &kite, auth, ctx)?;
    let public = match kite.proto {
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
    if !ctx.registry.add_kite(link_id, &kite, grant) {
        return Err((
            RefuseReason::Invalid,
            "link closed during registration".into(),
        ));
    }
    let port = kite.port;
    Ok((kite, KiteResult::Accepted { public, port }))
}

/// Decides whether a claim may be served, and by what right.
///
/// A claim with a proof is checked against the domain secrets; if that
/// fails, a certificate identity that is allowed the kite still gets it. A
/// claim without a proof is checked against the link's identity only.
fn authorize(
    claim: &KiteClaim,
    kite: &KiteRef,
    auth: &Authority<'_>,
    ctx: &Arc<RelayCtx>,
) -> Result<Grant, (RefuseReason, String)> {
    let identity_allows = auth
        .identity
        .is_some_and(|identity| auth.state.rules.allows(&identity.name, kite));
    if claim.proof.is_empty() {
        return match auth.identity {
            Some(_) if identity_allows => Ok(Grant::Identity),
            Some(identity) => Err((
                RefuseReason::NotAllowed,
                format!(
                    "identity {} may not claim {kite} under this relay's rules (it may claim: {})",
                    identity.name,
                    auth.state.rules.describe_grants(&identity.name)
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
    match check_secret(claim, kite, auth.nonces, ctx) {
        Ok(()) => Ok(Grant::Secret),
        Err(_) if identity_allows => Ok(Grant::Identity),
        Err(refusal) => Err(refusal),
    }
}

/// Checks a claim's proof against the secrets of the domains covering it.
fn check_secret(
    claim: &KiteClaim,
    kite: &KiteRef,
    nonces: &Nonces,
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
    Err((
        RefuseReason::BadSecret,
        format!(
            "wrong secret for {} (domain {})",
            kite.name, domains[0].pattern
        ),
    ))
}

async fn recv(mux: &Mux, rx: &mut MuxReceivers) -> Result<ConnectorMessage, String> {
    let payload: Bytes = tokio::select! {
        payload = rx.control.recv() => payload.ok_or_else(|| "link closed".to_string())?,
        reason = mux.closed() => return Err(reason.to_string()),
        _ = tokio::time::sleep(HANDSHAKE_TIMEOUT) => return Err("handshake timed out".into()),
    };
    message::decode(&payload).map_err(|err| err.to_string())
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
