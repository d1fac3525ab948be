//! Visitor streams, shared by `http` and `tcp`: opening one on the first
//! backend whose link is alive (failover), and resetting a visitor's
//! connection when its kite fails.

use std::net::SocketAddr;

use kitepipe_proto::message::{self, StreamHeader, VisitorHeader};
use tokio::net::TcpStream;
use tracing::debug;

use super::registry::Backend;
use crate::link::MuxStream;

/// Opens a visitor stream on the first backend whose link is alive.
/// `local` is the relay's address the visitor connected to, if known.
pub(crate) async fn open_visitor_stream(
    backends: &[Backend],
    host: Option<&str>,
    peer: SocketAddr,
    local: Option<SocketAddr>,
) -> Option<(MuxStream, Backend)> {
    for backend in backends {
        let header = StreamHeader::Visitor(VisitorHeader {
            kite: backend.kite.clone(),
            host: host.map(str::to_string),
            peer: peer.to_string(),
            relay_addr: local.map(|addr| addr.to_string()),
        });
        match backend.mux.open(message::encode(&header)).await {
            Ok(stream) => return Some((stream, backend.clone())),
            Err(reason) => debug!(node = %backend.node, %reason, "backend link gone; trying next"),
        }
    }
    None
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
