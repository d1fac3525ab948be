//! The tunnel pump: one PageKite tunnel (chunks over a byte stream) on one
//! side, an in-process kitepipe `Mux` pair (over `tokio::io::duplex`) on
//! the other.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use kitepipe_proto::message::VisitorHeader;
use kitepipe_proto::pagekite::ChunkHeaders;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::link::{Mux, MuxConfig, MuxReceivers};

/// Settings of one tunnel.
#[derive(Debug, Clone)]
pub(crate) struct TunnelConfig {
    /// Send compressed chunks (both ends announced `ZChunks`).
    pub(crate) compress: bool,
    /// Send a `PING` this often.
    pub(crate) ping_interval: Duration,
    /// Close the tunnel when nothing arrived for this long.
    pub(crate) idle_timeout: Duration,
    /// Streams (SIDs) open at once; beyond it new ones are refused.
    pub(crate) max_streams: usize,
    /// Settings of the in-process Mux pair.
    pub(crate) mux: MuxConfig,
}

/// Where a new SID wants to go (at our back-end end), from its first
/// chunk's headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChunkDest {
    /// `Proto` (lowercase): `http`, `https`, `raw`, `websocket`, ...
    pub(crate) proto: String,
    /// `Host` (lowercase): the kite the visitor asked for.
    pub(crate) host: String,
    /// `Port`: the front-end's port the visitor reached.
    pub(crate) port: Option<u16>,
    /// `RIP`: the visitor's address.
    pub(crate) rip: Option<String>,
    /// `RPort`: the visitor's port.
    pub(crate) rport: Option<u16>,
    /// `RTLS`: the front-end terminated TLS for the visitor.
    pub(crate) rtls: bool,
}

/// Decides which kite serves a new SID at the back-end end (`None`:
/// refused; the pump answers like pagekite.py: an HTTP 503 page for http,
/// EOF otherwise).
pub(crate) type Route = Arc<dyn Fn(&ChunkDest) -> Option<VisitorHeader> + Send + Sync>;

/// The handshake layer's side of a running tunnel.
#[derive(Debug)]
pub(crate) struct TunnelHandle {
    /// NOOP chunks carrying `X-PageKite` requests or answers (AddKites,
    /// SignThis round trips), or quota headers. Bounded; when full, newer
    /// ones are dropped (logged).
    pub(crate) control: mpsc::Receiver<ChunkHeaders>,
    out: mpsc::Sender<Out>,
    token: CancellationToken,
}

/// What the writer task sends.
#[derive(Debug)]
enum Out {}

impl TunnelHandle {
    /// Sends a NOOP chunk with these headers (e.g. `X-PageKite-OK`
    /// answers, or signed requests). False if the tunnel is gone or its
    /// queue is full.
    pub(crate) fn send_control(&self, headers: Vec<(String, String)>) -> bool {
        let _ = headers;
        todo!()
    }

    /// Ends the tunnel (and with it the Mux pair).
    pub(crate) fn close(&self) {
        self.token.cancel();
    }
}

/// We are the front-end (relay): returns the relay-side Mux (the link's
/// mux in the registry; visitor streams opened on it become SIDs).
/// Closing the Mux ends the tunnel and the tunnel's end closes the Mux.
pub(crate) fn start_front<T>(
    io: T,
    leftover: BytesMut,
    config: &TunnelConfig,
    tracker: &TaskTracker,
    token: CancellationToken,
) -> (Mux, TunnelHandle)
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let _ = (io, leftover, config, tracker, token);
    todo!()
}

/// We are the back-end (connector): returns the connector-side Mux and
/// its receivers, served like a relay link's (`connector::serve_stream`
/// per incoming stream). `route` picks the kite for each new SID.
pub(crate) fn start_back<T>(
    io: T,
    leftover: BytesMut,
    config: &TunnelConfig,
    route: Route,
    tracker: &TaskTracker,
    token: CancellationToken,
) -> (Mux, MuxReceivers, TunnelHandle)
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let _ = (io, leftover, config, route, tracker, token);
    todo!()
}
