//! Visitor streams, shared by `http` and `tcp`: opening one on the first
//! backend whose link is alive (failover) once that backend's visitor
//! policy admits the visitor, and resetting a visitor's connection when
//! its kite fails.

use std::net::SocketAddr;

use kitepipe_proto::message::{self, StreamHeader, VisitorHeader};
use tokio::net::TcpStream;
use tracing::debug;

use super::registry::Backend;
use crate::link::MuxStream;

/// Why no visitor stream was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotOpened {
    /// The visitor's address is refused by the policy (allow/deny lists)
    /// of the backend it was routed to; nothing was sent on the link.
    Refused,
    /// No backend's link could open a stream.
    Unreachable,
}

/// Opens a visitor stream on the first backend whose link is alive,
/// unless the backend the visitor is routed to refuses its address: each
/// claim's policy applies to the visitors routed to its link, and a
/// refused visitor is not retried on another backend (which backend
/// answers never depends on the visitor's address). `local` is the
/// relay's address the visitor connected to, if known.
pub(crate) async fn open_visitor_stream(
    backends: &[Backend],
    host: Option<&str>,
    peer: SocketAddr,
    local: Option<SocketAddr>,
) -> Result<(MuxStream, Backend), NotOpened> {
    for backend in backends {
        if !backend.policy.admits(peer.ip()) {
            debug!(node = %backend.node, kite = %backend.kite, %peer, "visitor refused by the kite's policy");
            return Err(NotOpened::Refused);
        }
        let header = StreamHeader::Visitor(VisitorHeader {
            kite: backend.kite.clone(),
            host: host.map(str::to_string),
            peer: peer.to_string(),
            relay_addr: local.map(|addr| addr.to_string()),
        });
        match backend.mux.open(message::encode(&header)).await {
            Ok(stream) => return Ok((stream, backend.clone())),
            Err(reason) => debug!(node = %backend.node, %reason, "backend link gone; trying next"),
        }
    }
    Err(NotOpened::Unreachable)
}

/// Closes a visitor's connection with a TCP reset (`SO_LINGER` 0, then
/// close): how an upstream failure reaches the visitor, so that a cut
/// response or byte stream never ends like a complete one.
pub(crate) fn reset(sock: TcpStream) {
    if let Err(err) = sock.set_zero_linger() {
        debug!(%err, "cannot set SO_LINGER on a visitor's socket");
    }
    drop(sock);
}
