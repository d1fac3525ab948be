//! The event pipe: a local REST gateway on every node, events carried over
//! the link as streams, and the handlers that answer them.
//!
//! Start at `gateway` (an HTTP request on loopback becomes an event: route,
//! handler name, arguments; waiting for the link, one retry for idempotent
//! requests, the reply head turned into the HTTP response), then
//! `handlers` (the other side: [`Handlers`] picks a closure, an executable
//! in `--handlers DIR`, a built-in or the HTTP upstream, and writes the
//! reply), `request` and `reply` (what every handler kind is given and
//! gives back, and the writer that puts a reply on the stream), `exec` and
//! `upstream` (the two handler kinds that run outside the process), and
//! `stream` (one event stream shared by its reading and writing halves,
//! bodies as hyper bodies). [`client`] is `kitepipe call`.
//!
//! Wire format: the stream opens with `StreamHeader::Event`; the caller
//! sends the request body and FIN; the handler's side sends a reply head
//! (`u32` length + JSON, see [`kitepipe_proto::event`]), the reply body and
//! FIN. Every event is its own stream, so events are independent and
//! ordered only within themselves; bodies stream under the link's
//! per-stream flow control, so a slow reader slows its writer (never the
//! link) and nothing is dropped: a failure is a status or a reset the
//! caller sees.
//!
//! pipe/ never dials a relay or accepts a link: it is handed a `Router`
//! that finds a link for a route, and streams the relay or connector
//! accepted. Its only sockets are the gateway's loopback listener and the
//! connections to a configured HTTP upstream on this machine.

pub mod client;
mod exec;
mod gateway;
mod handlers;
mod reply;
mod request;
mod stream;
mod upstream;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

pub(crate) use gateway::GatewayListener;
pub use gateway::TOKEN_HEADER;
pub(crate) use gateway::{Gateway, run_gateway};
pub use handlers::Handlers;
pub(crate) use handlers::{reply_error, serve_event};
pub use kitepipe_proto::event::Caller;
pub use reply::{Reply, ReplyBody};
pub use request::{EventRequest, RequestBody};

use crate::link::Mux;

/// Headers named like this describe an event and its caller; only the node
/// that runs the handler sets them. Callers' own are dropped at every
/// step (gateway, event on the wire, upstream request, executable env).
/// The same namespace the relay strips from visitors' requests
/// ([`kitepipe_proto::http1::is_kitepipe_field`]).
pub(crate) fn is_own_header(name: &str) -> bool {
    kitepipe_proto::http1::is_kitepipe_field(name.as_bytes())
}

/// Node name the relay uses as the caller of events it sends.
pub(crate) const RELAY_NODE: &str = "relay";

/// Why the event pipe could not do something for a library user.
#[derive(Debug, thiserror::Error)]
pub enum PipeError {
    /// A handler name is not `[a-z0-9_]` (at most 128 bytes).
    #[error("bad handler name {0:?}: use a-z, 0-9 and _ (e.g. get_time_utc)")]
    BadName(String),
    /// The gateway's owner token could not be written.
    #[error("cannot write the gateway token file {}", path.display())]
    Token {
        /// The token file.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The gateway could not listen.
    #[error("cannot listen for the event gateway on {addr}")]
    Bind {
        /// The address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Why a route has no link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RouteError {
    /// This node does not serve the route (e.g. `/client/` on a connector).
    NotHere(&'static str),
    /// No node of that name was ever linked.
    Unknown(String),
    /// The node (or this node's relay) did not come online in time.
    Offline(String),
}

/// Finds the link an event goes out on. The relay looks connectors up in
/// its registry; a connector uses its link to the relay.
pub(crate) trait Router: Send + Sync + 'static {
    /// The link for `route`, waiting up to `wait` for it to come online.
    /// Cancel-safe.
    fn route(
        &self,
        route: &kitepipe_proto::event::Route,
        wait: Duration,
    ) -> impl Future<Output = Result<Mux, RouteError>> + Send;

    /// Remote operations on connector `node` (`/remote/NODE` upgraded to the
    /// remote operation protocol): what serves the upgraded connection, or
    /// the status and message of a refusal. Only the relay's gateway does
    /// this; waits up to `wait` for the node. Cancel-safe.
    fn remote(
        &self,
        node: &str,
        wait: Duration,
    ) -> impl Future<Output = Result<RemoteServe, (u16, String)>> + Send {
        let _ = (node, wait);
        async {
            Err((
                404,
                "remote operations on connectors go through the relay's gateway \
                 (kitepipe remote node:NAME ... on the relay)"
                    .to_string(),
            ))
        }
    }
}

/// Serves an upgraded gateway connection as a remote operation session;
/// the second argument names the caller for logs.
pub(crate) type RemoteServe = Box<
    dyn FnOnce(
            hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>,
            String,
        ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>
        + Send,
>;

/// When something last moved on an event: deadlines count from there, so
/// a large body may take as long as it needs while a stall is cut.
#[derive(Debug)]
pub(crate) struct Progress {
    started: Instant,
    /// Milliseconds after `started` of the last progress.
    last_ms: AtomicU64,
}

impl Progress {
    pub(crate) fn new() -> Progress {
        Progress {
            started: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    /// Records progress now.
    pub(crate) fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// When the event times out unless something moves: `timeout` after
    /// the last progress.
    pub(crate) fn deadline(&self, timeout: Duration) -> Instant {
        self.started + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + timeout
    }
}

/// Waits until `progress` has been still for `timeout`. Cancel-safe.
pub(crate) async fn stalled(progress: &Progress, timeout: Duration) {
    loop {
        let deadline = progress.deadline(timeout);
        if deadline <= Instant::now() {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}
