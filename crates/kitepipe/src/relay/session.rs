//! A connector's link, seen from the relay: TLS, handshake, kite
//! registration, and cleanup when the link ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kitepipe_proto::frame::ResetCode;
use kitepipe_proto::kite::{self, KiteProto, KiteRef};
use kitepipe_proto::message::{
    self, Challenge, ConnectorMessage, ErrorCode, ErrorMessage, KiteClaim, KiteOutcome, KiteResult,
    PROTOCOL_VERSION, RefuseReason, Registered, RelayMessage, Role,
};
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info, info_span, warn};

use super::RelayCtx;
use super::registry::LinkId;
use crate::link::{LinkClosed, Mux, MuxReceivers, Side};
use crate::pki::{ProofInput, link_exporter, random_nonce, verify_kite_proof};
use crate::tunnel::Prefixed;

/// How long a connector has to finish TLS and say hello. Long enough for a
/// slow mobile link, short enough that half-open connections do not pile up.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Accepts a connector's TLS link (after `prefix`, bytes already read) and
/// serves it until it closes.
pub(crate) async fn accept(
    sock: TcpStream,
    prefix: BytesMut,
    peer: SocketAddr,
    ctx: Arc<RelayCtx>,
) {
    let io = Prefixed::new(prefix, sock);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, ctx.acceptor.accept(io)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            // Garbage, scanners and wrong pins all end here: not an operator problem.
            info!(%err, "link TLS handshake failed");
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
    let token = ctx.token.child_token();
    let (mux, rx) = Mux::start(
        tls,
        BytesMut::new(),
        Side::Relay,
        &ctx.mux,
        &ctx.tracker,
        token.clone(),
    );
    run(mux, rx, exporter, peer, &ctx).await;
    token.cancel();
}

async fn run(
    mux: Mux,
    mut rx: MuxReceivers,
    exporter: [u8; 32],
    peer: SocketAddr,
    ctx: &Arc<RelayCtx>,
) {
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
    let node = hello.node.chars().take(64).collect::<String>();
    let link_id = ctx
        .registry
        .add_link(&hello.instance, &node, mux.clone(), peer);
    let span = info_span!("link", node = %node, id = link_id);
    async {
        info!(software = %hello.software, "connector linked");
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
                if let Some(mut incoming) = incoming {
                    incoming.stream.reset(ResetCode::Refused, "the relay serves no streams from connectors yet");
                }
            }
            control = rx.control.recv() => {
                let Some(payload) = control else { return mux.closed().await };
                match message::decode::<ConnectorMessage>(&payload) {
                    Ok(ConnectorMessage::Register(register)) => {
                        let outcomes = register_kites(register.kites, nonces, link_id, ctx).await;
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

async fn register_kites(
    claims: Vec<KiteClaim>,
    nonces: &Nonces,
    link_id: LinkId,
    ctx: &Arc<RelayCtx>,
) -> Vec<KiteOutcome> {
    let mut outcomes = Vec::with_capacity(claims.len());
    for claim in claims {
        let result = match register_one(&claim, nonces, link_id, ctx).await {
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

async fn register_one(
    claim: &KiteClaim,
    nonces: &Nonces,
    link_id: LinkId,
    ctx: &Arc<RelayCtx>,
) -> Result<(KiteRef, KiteResult), (RefuseReason, String)> {
    let mut kite = claim.kite.clone();
    kite.name =
        kite::normalize_name(&kite.name).map_err(|err| (RefuseReason::Invalid, err.to_string()))?;
    if kite.proto != KiteProto::Tcp && kite.port != 0 {
        return Err((RefuseReason::Invalid, "only TCP kites have a port".into()));
    }
    let domains: Vec<_> = ctx
        .config
        .domains
        .iter()
        .filter(|d| d.protos.contains(&kite.proto) && covers(&d.pattern, &kite.name))
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
    if !domains
        .iter()
        .any(|d| verify_kite_proof(&d.secret, &input, &proof))
    {
        return Err((
            RefuseReason::BadSecret,
            format!(
                "wrong secret for {} (domain {})",
                kite.name, domains[0].pattern
            ),
        ));
    }
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
            let port = super::tcp::bind_kite_port(&kite, ctx).await?;
            kite.port = port;
            format!("{}:{port}", ctx.config.name)
        }
    };
    if !ctx.registry.add_kite(link_id, &kite) {
        return Err((
            RefuseReason::Invalid,
            "link closed during registration".into(),
        ));
    }
    let port = kite.port;
    Ok((kite, KiteResult::Accepted { public, port }))
}

/// True if a domain pattern lets a connector claim `name` (itself a name or pattern).
fn covers(domain: &str, name: &str) -> bool {
    if domain == name {
        return true;
    }
    match name.strip_prefix("*.") {
        // A wildcard kite needs a wildcard domain above it.
        Some(body) => domain.starts_with("*.") && kite::name_matches(domain, body),
        None => kite::name_matches(domain, name),
    }
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

#[cfg(test)]
mod tests {
    use super::covers;

    #[test]
    fn domain_coverage() {
        let cases = [
            ("*.example.net", "blog.example.net", true),
            ("*.example.net", "*.example.net", true),
            ("*.example.net", "*.shop.example.net", true),
            ("example.net", "*.example.net", false),
            ("blog.example.net", "blog.example.net", true),
            ("blog.example.net", "x.blog.example.net", false),
            ("*.example.net", "example.net", false),
            ("*.example.net", "evil.net", false),
        ];
        for (domain, name, expected) in cases {
            assert_eq!(covers(domain, name), expected, "{domain} covers {name}");
        }
    }
}
