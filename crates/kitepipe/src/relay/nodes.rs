//! Finding a connector's link by its proven node name, waiting for it to
//! come online: shared by the relay's gateway and connector-to-connector
//! events (`events`) and remote sessions (`remote`).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::RelayCtx;
use super::registry::NodeLookup;
use crate::link::Mux;
use crate::pipe::RouteError;

/// The link of connector `node`, waiting up to `wait` for it to come
/// online. A node never seen is unknown at once, except while the relay is
/// younger than `wait`: after a restart every node is unseen until it
/// reconnects, so it is waited for like an offline one. Cancel-safe.
pub(crate) async fn find_node(
    ctx: &Arc<RelayCtx>,
    node: &str,
    wait: Duration,
) -> Result<Mux, RouteError> {
    let deadline = Instant::now() + wait;
    loop {
        let added = ctx.registry.link_added();
        match ctx.registry.lookup_node(node) {
            NodeLookup::Found(mux) => return Ok(mux),
            NodeLookup::Unknown if ctx.started.elapsed() >= wait => {
                return Err(RouteError::Unknown(node.to_string()));
            }
            NodeLookup::Unknown | NodeLookup::Offline => {}
        }
        tokio::select! {
            _ = added => {}
            _ = tokio::time::sleep_until(deadline) => {
                return match ctx.registry.lookup_node(node) {
                    NodeLookup::Found(mux) => Ok(mux),
                    NodeLookup::Unknown if ctx.started.elapsed() >= wait => Err(RouteError::Unknown(node.to_string())),
                    _ => Err(RouteError::Offline(format!("node {node}"))),
                };
            }
            _ = ctx.token.cancelled() => return Err(RouteError::Offline(format!("node {node}"))),
        }
    }
}
