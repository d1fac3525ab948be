//! The link: one authenticated, encrypted, multiplexed, self-healing
//! connection between a connector and a relay.
//!
//! Start at [`mux`] (streams over one TLS connection: framing, flow control,
//! heartbeats), then [`records`] (the link's own TLS record layer once
//! rustls has done the handshake, with [`secrets`]: TLS 1.3's key
//! schedule for its key updates), [`io`] (the socket under the TLS
//! handshake: large reads, record by record) and
//! [`backoff`] (the one retry helper). The handshake that
//! runs over a fresh link lives with its two ends: `connector::session` and
//! `relay::session`.
//!
//! This room never dials or accepts sockets and knows nothing of kites: it is
//! handed an established byte stream.

pub mod backoff;
pub mod io;
pub mod mux;
pub mod records;
pub mod secrets;
mod shared;

use std::time::Duration;

pub use mux::{IncomingStream, Mux, MuxConfig, MuxReceivers, MuxStream, Side, StreamReset};
pub use records::LinkIo;
pub(crate) use shared::SharedStream;

pub use kitepipe_proto::frame::DEFAULT_HEARTBEAT;

/// Why a link closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkClosed {
    /// This side shut the link down.
    #[error("shut down")]
    Shutdown,
    /// The peer closed the link or said goodbye.
    #[error("peer closed the link ({0})")]
    PeerClosed(String),
    /// Nothing arrived from the peer for longer than the heartbeat interval.
    #[error("no traffic from the peer for {}s (heartbeat timeout)", .0.as_secs())]
    HeartbeatTimeout(Duration),
    /// The peer answered none of our pings for this long: it does not read
    /// what this side sends (see `mux::UNANSWERED_HEARTBEATS`).
    #[error("the peer answered no ping for {}s: it does not read this side's writes", .0.as_secs())]
    Unresponsive(Duration),
    /// More than this many bytes of urgent frames piled up for a peer that
    /// does not read (see `mux::URGENT_BACKLOG`).
    #[error("over {0} bytes queued for a peer that does not read")]
    Backlog(usize),
    /// Reading or writing the connection failed.
    #[error("connection error: {0}")]
    Io(String),
    /// The peer broke the link protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A newer link from the same connector took this one's place.
    #[error("replaced by a newer link from the same connector")]
    Replaced,
}
