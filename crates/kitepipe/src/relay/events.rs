//! Events at the relay: the relay's gateway routing to connectors (their
//! links found by node name in `nodes`), judging events that connectors
//! send against the identity rules, and forwarding connector-to-connector
//! events.
//!
//! Who may do what: a link with a certificate identity may call the
//! relay's handlers its `[[allow]] handlers` patterns allow and reach the
//! connectors its `peers` patterns allow; a link that holds a kite proven
//! with a domain secret may call every relay handler but reach no other
//! connector (rules name identities, and it has none); any other link may
//! do neither. The caller's name is always the link's proven name (its
//! certificate's, or one a node proof backs; `unproven` otherwise), never a
//! claim, and only proven names are routed to.

use std::sync::Arc;
use std::time::Duration;

use kitepipe_proto::event::{Caller, EventHeader, Route};
use kitepipe_proto::message::{self, StreamHeader};
use tracing::{Instrument, debug, info};

use super::RelayCtx;
use super::nodes::find_node;
use super::registry::LinkId;
use crate::link::{Mux, MuxStream};
use crate::pipe::{self, RemoteServe, RouteError, Router};

/// Longest a forwarded event waits for its target connector, whatever the
/// caller asked: the caller's gateway gives up after its own wait anyway.
const MAX_FORWARD_WAIT: Duration = Duration::from_secs(300);

/// Finds connectors' links for the relay's gateway (`/client/NODE/...`).
pub(crate) struct RelayRouter {
    pub(crate) ctx: Arc<RelayCtx>,
}

impl Router for RelayRouter {
    async fn route(&self, route: &Route, wait: Duration) -> Result<Mux, RouteError> {
        match route {
            Route::Client(node) => find_node(&self.ctx, node, wait).await,
            Route::Server => Err(RouteError::NotHere(
                "this is the relay's gateway: reach a connector with /client/NODE/...; \
                 /server/ is how connectors reach the relay",
            )),
            Route::Peer(_) => Err(RouteError::NotHere(
                "this is the relay's gateway: reach a connector with /client/NODE/...; \
                 /peer/ is for connectors",
            )),
        }
    }

    async fn remote(&self, node: &str, wait: Duration) -> Result<RemoteServe, (u16, String)> {
        super::remote::open_session(&self.ctx, node, wait).await
    }
}

/// Serves an event a connector opened on link `link_id`: the relay's own
/// handlers (`to` empty) or another connector (`to` set), if the rules
/// allow it.
pub(crate) async fn serve_from_connector(
    ctx: Arc<RelayCtx>,
    link_id: LinkId,
    stream: MuxStream,
    header: EventHeader,
) {
    let idle = ctx.config.events.timeout;
    let Some(link) = ctx.registry.caller(link_id) else {
        pipe::reply_error(stream, 503, "the link is closing", idle).await;
        return;
    };
    if let Err(err) = header.validate() {
        pipe::reply_error(stream, 400, &err.to_string(), idle).await;
        return;
    }
    let identity = link.identity.as_ref().map(|identity| identity.name.clone());
    let caller = Caller {
        node: link.node.clone(),
        identity: identity.clone(),
    };
    let rules = ctx.identity().rules.clone();
    let Some(target) = header.to.clone() else {
        let allowed = link.secret
            || identity
                .as_deref()
                .is_some_and(|name| rules.allows_handler(name, &header.name));
        if !allowed {
            let message = match &identity {
                Some(name) => format!(
                    "identity {name} may not call handler {} on this relay (no [[allow]] handlers rule covers it)",
                    header.name
                ),
                None => {
                    "this link may not call the relay's handlers: it has neither a kite proven \
                         with a domain secret nor a certificate identity"
                        .to_string()
                }
            };
            info!(node = %link.node, handler = %header.name, "event refused");
            pipe::reply_error(stream, 403, &message, idle).await;
            return;
        }
        pipe::serve_event(stream, header, caller, ctx.handlers.clone()).await;
        return;
    };
    let allowed = identity
        .as_deref()
        .is_some_and(|name| rules.allows_peer(name, &target));
    if !allowed {
        let message = match &identity {
            Some(name) => format!(
                "identity {name} may not send events to {target} (no [[allow]] peers rule covers it)"
            ),
            None => "only links with a certificate identity may send events to other connectors"
                .to_string(),
        };
        info!(node = %link.node, %target, "peer event refused");
        pipe::reply_error(stream, 403, &message, idle).await;
        return;
    }
    let wait = Duration::from_millis(header.wait_ms).min(MAX_FORWARD_WAIT);
    let mux = match find_node(&ctx, &target, wait).await {
        Ok(mux) => mux,
        Err(RouteError::Unknown(node)) => {
            pipe::reply_error(stream, 404, &format!("unknown node {node}"), idle).await;
            return;
        }
        Err(_) => {
            let message = format!("node {target} is offline (waited {wait:?})");
            pipe::reply_error(stream, 503, &message, idle).await;
            return;
        }
    };
    let forwarded = EventHeader {
        to: None,
        caller: Some(caller),
        wait_ms: 0,
        ..header
    };
    let mut outbound = match mux
        .open(message::encode(&StreamHeader::Event(forwarded)))
        .await
    {
        Ok(outbound) => outbound,
        Err(reason) => {
            let message = format!("link to {target} lost: {reason}");
            pipe::reply_error(stream, 503, &message, idle).await;
            return;
        }
    };
    let span =
        tracing::debug_span!("forward", from = %link.node, to = %target, out = outbound.id());
    let mut stream = stream;
    async {
        match crate::tunnel::splice(&mut stream, &mut outbound).await {
            Ok((up, down)) => debug!(up, down, "peer event forwarded"),
            Err(err) => debug!(%err, "peer event ended with an error"),
        }
    }
    .instrument(span)
    .await;
}
