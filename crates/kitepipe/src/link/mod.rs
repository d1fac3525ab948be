//! The link: one authenticated, encrypted, multiplexed, self-healing
//! connection between a connector and a relay.
//!
//! Start at `mux` (streams over one TLS connection: framing, flow control,
//! heartbeats: [`Mux`], [`MuxStream`]), then `records` (the link's own TLS
//! record layer once rustls has done the handshake, [`LinkIo`], with
//! `secrets`: TLS 1.3's key schedule for its key updates), `io` (the
//! socket under the TLS handshake: large reads, record by record) and
//! `backoff` (the one retry helper). The handshake that
//! runs over a fresh link lives with its two ends: `connector::session` and
//! `relay::session`.
//!
//! Outside the crate, only what is re-exported here is reachable: the
//! multiplexer and why a link closed. [`LinkIo`] and [`ReadAhead`] are
//! there for the attacker tests, which speak the link's TLS by hand.
//!
//! This room never dials or accepts sockets and knows nothing of kites: it is
//! handed an established byte stream.

pub(crate) mod backoff;
pub(crate) mod io;
pub(crate) mod mux;
pub(crate) mod records;
mod shared;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use kitepipe_proto::frame::{FrameError, ResetCode};

#[doc(hidden)]
pub use io::ReadAhead;
pub use mux::{
    IncomingStream, Mux, MuxConfig, MuxReceivers, MuxStats, MuxStream, Side, StreamReset,
};
#[doc(hidden)]
pub use records::LinkIo;
pub(crate) use shared::SharedStream;

pub use kitepipe_proto::frame::DEFAULT_HEARTBEAT;

/// How long a link's handshake may take, on either end: the TLS handshake
/// and each handshake message (the connector's hello until the relay's
/// first answer, then the challenge and registration), and on the relay
/// the time a link has to prove something. Long enough for a slow mobile
/// link, short enough that half-open connections do not pile up.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a link closed.
#[derive(Debug, Clone)]
pub enum LinkClosed {
    /// This side shut the link down.
    Shutdown,
    /// The peer closed the link or said goodbye.
    PeerClosed(PeerGoodbye),
    /// Nothing arrived from the peer for longer than the heartbeat interval.
    HeartbeatTimeout(Duration),
    /// The peer answered none of our pings for this long: it does not read
    /// what this side sends (see `mux::UNANSWERED_HEARTBEATS`).
    Unresponsive(Duration),
    /// More than this many bytes of urgent frames piled up for a peer that
    /// does not read (see `mux::URGENT_BACKLOG`).
    Backlog(usize),
    /// Reading or writing the connection failed (shared: every waiter on
    /// the link gets the same error). A record the peer broke is a
    /// `records::RecordError` inside it.
    Io(Arc<std::io::Error>),
    /// The peer sent bytes that are not a frame.
    BadFrame(FrameError),
    /// The peer broke the link protocol in a way this side describes.
    Protocol(String),
    /// A newer link from the same connector took this one's place.
    Replaced,
}

impl fmt::Display for LinkClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkClosed::Shutdown => f.write_str("shut down"),
            LinkClosed::PeerClosed(goodbye) => write!(f, "peer closed the link ({goodbye})"),
            LinkClosed::HeartbeatTimeout(silent) => write!(
                f,
                "no traffic from the peer for {}s (heartbeat timeout)",
                silent.as_secs()
            ),
            LinkClosed::Unresponsive(unanswered) => write!(
                f,
                "the peer answered no ping for {}s: it does not read this side's writes",
                unanswered.as_secs()
            ),
            LinkClosed::Backlog(bytes) => {
                write!(f, "over {bytes} bytes queued for a peer that does not read")
            }
            LinkClosed::Io(err) => write!(f, "connection error: {err}"),
            LinkClosed::BadFrame(err) => write!(f, "protocol error: {err}"),
            LinkClosed::Protocol(why) => write!(f, "protocol error: {why}"),
            LinkClosed::Replaced => f.write_str("replaced by a newer link from the same connector"),
        }
    }
}

/// Written out rather than derived: the source of [`LinkClosed::Io`] is
/// the `io::Error` itself (not the `Arc` around it), so that walkers of
/// the chain find it and look inside.
impl std::error::Error for LinkClosed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LinkClosed::Io(err) => Some(&**err),
            LinkClosed::BadFrame(err) => Some(err),
            _ => None,
        }
    }
}

/// Two I/O errors are the same if they are one, or of the same kind and
/// text (`io::Error` has no equality of its own).
impl PartialEq for LinkClosed {
    fn eq(&self, other: &LinkClosed) -> bool {
        match (self, other) {
            (LinkClosed::Shutdown, LinkClosed::Shutdown)
            | (LinkClosed::Replaced, LinkClosed::Replaced) => true,
            (LinkClosed::PeerClosed(a), LinkClosed::PeerClosed(b)) => a == b,
            (LinkClosed::HeartbeatTimeout(a), LinkClosed::HeartbeatTimeout(b))
            | (LinkClosed::Unresponsive(a), LinkClosed::Unresponsive(b)) => a == b,
            (LinkClosed::Backlog(a), LinkClosed::Backlog(b)) => a == b,
            (LinkClosed::Io(a), LinkClosed::Io(b)) => {
                Arc::ptr_eq(a, b) || (a.kind() == b.kind() && a.to_string() == b.to_string())
            }
            (LinkClosed::BadFrame(a), LinkClosed::BadFrame(b)) => a == b,
            (LinkClosed::Protocol(a), LinkClosed::Protocol(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for LinkClosed {}

/// How the peer ended a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerGoodbye {
    /// The connection ended without a GOAWAY.
    Eof,
    /// The peer sent a GOAWAY.
    GoAway {
        /// The peer's code.
        code: ResetCode,
        /// The peer's reason (its free text).
        reason: String,
    },
    /// The peer refused the link in a control message (its free text).
    Refused(String),
}

impl fmt::Display for PeerGoodbye {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerGoodbye::Eof => f.write_str("connection closed"),
            PeerGoodbye::GoAway { code, reason } => write!(f, "{code}: {reason}"),
            PeerGoodbye::Refused(reason) => f.write_str(reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;

    #[test]
    fn close_reasons_read_as_before_and_keep_their_cause() {
        let refused = Arc::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset by peer",
        ));
        let cases = [
            (
                LinkClosed::PeerClosed(PeerGoodbye::Eof),
                "peer closed the link (connection closed)",
            ),
            (
                LinkClosed::PeerClosed(PeerGoodbye::GoAway {
                    code: ResetCode::Shutdown,
                    reason: "shut down".into(),
                }),
                "peer closed the link (shutting down: shut down)",
            ),
            (
                LinkClosed::Io(refused.clone()),
                "connection error: reset by peer",
            ),
            (
                LinkClosed::BadFrame(FrameError::UnknownType(0x47)),
                "protocol error: unknown frame type 0x47",
            ),
        ];
        for (reason, text) in cases {
            assert_eq!(reason.to_string(), text);
        }
        let io = LinkClosed::Io(refused);
        let source = io.source().expect("an I/O error has a source");
        let source = source
            .downcast_ref::<std::io::Error>()
            .expect("the io::Error");
        assert_eq!(source.kind(), std::io::ErrorKind::ConnectionReset);
        assert_eq!(io.clone(), io, "a shared error equals itself");
    }
}
