//! Remote operations on connectors, through the relay's gateway.
//!
//! A client (`kitepipe remote node:NAME ...` on the relay's machine) asks
//! the gateway for `/remote/NAME` with `Upgrade: kitepipe-remote`. The relay
//! checks that a link proved the node name (a certificate, or a node proof
//! of a domain secret: see `session`), that it accepts remote operations
//! (`--allow-remote`) and that the `[[remote]]` rules grant some of them,
//! then speaks the same link protocol a `kitepipe agent` speaks over SSH:
//! it says the connector's hello and takes one stream per operation. Each
//! operation is judged again, against the rules as they are now and the
//! connector's offer, logged with the caller, and passed to the connector
//! on a stream of its link (`StreamHeader::RemoteRelayed`), bytes spliced
//! both ways. A refused operation gets a typed `permission_denied` error,
//! like one the host itself refused.
//!
//! The relay runs nothing itself here; the connector checks the kind of
//! every operation against its own `--allow-remote` once more.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use kitepipe_proto::frame::ResetCode;
use kitepipe_proto::message::{self, RelayedOp, RemoteClass, StreamHeader};
use kitepipe_proto::remote::{ErrorKind, ErrorReply, RemoteHeader};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info};

use super::RelayCtx;
use super::nodes::find_node;
use crate::link::{IncomingStream, LinkClosed, Mux, MuxConfig, MuxStream, Side};
use crate::metrics::Outcome;
use crate::pipe::{RemoteServe, RouteError};

/// How long operations may finish after a session ends.
const SESSION_GRACE: Duration = Duration::from_secs(2);

/// Judges a request for a remote session on `node` and returns what serves
/// it, or the status and message of the refusal.
pub(crate) async fn open_session(
    ctx: &Arc<RelayCtx>,
    node: &str,
    wait: Duration,
) -> Result<RemoteServe, (u16, String)> {
    match find_node(ctx, node, wait).await {
        Ok(_) => {}
        Err(RouteError::Unknown(node)) => {
            return Err((
                404,
                format!("no connector named {node} has linked to this relay"),
            ));
        }
        Err(RouteError::Offline(what)) => {
            return Err((
                503,
                format!("{what} is offline: its connector did not link in time"),
            ));
        }
        Err(RouteError::NotHere(why)) => return Err((404, why.to_string())),
    }
    let Some((link, offer)) = ctx.registry.lookup_remote(node) else {
        return Err((503, format!("node {node} went offline")));
    };
    let Some(offer) = offer else {
        return Err((
            403,
            format!(
                "node {node} accepts no remote operations (start its connector with \
                 --allow-remote exec,fs,forward or a part of that)"
            ),
        ));
    };
    let grants = ctx.identity().rules.remote_grants(node);
    if grants.is_empty() {
        return Err((
            403,
            format!(
                "the relay's rules grant no remote operations on node {node} \
                 (add a [[remote]] rule or --remote '{node}:exec,fs')"
            ),
        ));
    }
    let allowed = common(&grants, &offer.classes);
    if allowed.is_empty() {
        return Err((
            403,
            format!(
                "nothing in common: the relay's rules grant {} on node {node}, the node accepts {}",
                RemoteClass::describe(&grants),
                RemoteClass::describe(&offer.classes)
            ),
        ));
    }
    let ctx = ctx.clone();
    let node = node.to_string();
    Ok(Box::new(move |io, caller| {
        Box::pin(serve_session(io, ctx, node, link, offer, caller))
    }))
}

/// The kinds in both lists.
fn common(a: &[RemoteClass], b: &[RemoteClass]) -> Vec<RemoteClass> {
    a.iter()
        .copied()
        .filter(|class| b.contains(class))
        .collect()
}

/// Serves one client's session until it or the connector's link ends.
async fn serve_session<T>(
    io: T,
    ctx: Arc<RelayCtx>,
    node: String,
    link: Mux,
    offer: super::registry::RemoteOffer,
    caller: String,
) where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    let tracker = TaskTracker::new();
    let token = ctx.token.child_token();
    let config = MuxConfig {
        heartbeat: ctx.config.heartbeat,
        ..MuxConfig::default()
    };
    let span = tracing::info_span!("remote", %node, %caller);
    let (client, mut receivers) = Mux::start(
        io,
        BytesMut::new(),
        Side::Relay,
        &config,
        &tracker,
        token.clone(),
    );
    async {
        if client
            .send_control(message::encode(&offer.agent))
            .await
            .is_err()
        {
            return;
        }
        info!(accepts = %RemoteClass::describe(&offer.classes), "remote session opened");
        let reason = loop {
            tokio::select! {
                incoming = receivers.incoming.recv() => {
                    let Some(incoming) = incoming else { break client.closed().await };
                    let ctx = ctx.clone();
                    let op = relay_op(incoming, ctx, node.clone(), link.clone(), offer.classes.clone(), caller.clone());
                    tracker.spawn(op.in_current_span());
                }
                control = receivers.control.recv() => {
                    if control.is_none() {
                        break client.closed().await;
                    }
                }
                reason = client.closed() => break reason,
                _ = link.closed() => {
                    client.close(LinkClosed::Protocol(format!("node {node} went offline")));
                    break LinkClosed::Protocol(format!("node {node} went offline"));
                }
                _ = ctx.token.cancelled() => {
                    client.close(LinkClosed::Shutdown);
                    break LinkClosed::Shutdown;
                }
            }
        };
        info!(%reason, "remote session closed");
    }
    .instrument(span)
    .await;
    token.cancel();
    tracker.close();
    let _ = tokio::time::timeout(SESSION_GRACE, tracker.wait()).await;
}

/// Judges one operation and passes it to the connector.
async fn relay_op(
    incoming: IncomingStream,
    ctx: Arc<RelayCtx>,
    node: String,
    link: Mux,
    accepts: Vec<RemoteClass>,
    caller: String,
) {
    let IncomingStream { header, mut stream } = incoming;
    let op = match message::decode::<RemoteHeader>(&header) {
        Ok(RemoteHeader::Remote(op)) => op,
        Err(err) => {
            debug!(%err, "bad remote operation header");
            stream.reset(
                ResetCode::ProtocolError,
                &format!("bad remote operation header: {err}"),
            );
            return;
        }
    };
    let class = op.class();
    let started = tokio::time::Instant::now();
    let (who, what) = (format!("{caller} -> {node}"), op.summary().to_string());
    let metrics = &ctx.registry.metrics;
    // The rules as they are now: a reload may have taken rights away.
    let grants = ctx.identity().rules.remote_grants(&node);
    let granted = grants.contains(&class);
    if !granted || !accepts.contains(&class) {
        let message = if !granted {
            format!(
                "the relay's rules do not grant {class} operations on node {node} (they grant {})",
                RemoteClass::describe(&grants)
            )
        } else {
            format!(
                "node {node} does not accept {class} operations (it accepts {})",
                RemoteClass::describe(&accepts)
            )
        };
        info!(op = %op.summary(), %message, "remote operation refused");
        metrics.remote_operation(&who, &what, Outcome::Refused, started.elapsed());
        crate::remote::agent::refuse(
            stream,
            ErrorReply {
                kind: ErrorKind::PermissionDenied,
                errno: None,
                message,
                path: None,
            },
        )
        .await;
        return;
    }
    info!(op = %op.summary(), "remote operation");
    let header = StreamHeader::RemoteRelayed(RelayedOp { caller, op });
    let mut upstream = match link.open(message::encode(&header)).await {
        Ok(upstream) => upstream,
        Err(reason) => {
            stream.reset(
                ResetCode::TargetUnreachable,
                &format!("node {node} went offline: {reason}"),
            );
            metrics.remote_operation(&who, &what, Outcome::Failed, started.elapsed());
            return;
        }
    };
    splice_op(&mut stream, &mut upstream).await;
    metrics.remote_operation(&who, &what, Outcome::Ok, started.elapsed());
}

/// Copies an operation's bytes both ways; a reset on one side is passed to
/// the other with its reason.
async fn splice_op(client: &mut MuxStream, upstream: &mut MuxStream) {
    if let Err(err) = crate::tunnel::splice(client, upstream).await {
        debug!(%err, "relayed remote operation ended with an error");
        if let Some((code, reason)) = upstream.reset_reason() {
            client.reset(code, &reason);
        } else if let Some((code, reason)) = client.reset_reason() {
            upstream.reset(code, &reason);
        } else {
            client.reset(ResetCode::Cancel, &err.to_string());
            upstream.reset(ResetCode::Cancel, &err.to_string());
        }
    }
}
