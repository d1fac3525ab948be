//! Visitors speaking HTTP/2: on a terminated kite whose visitor chose h2
//! by ALPN, and h2c with prior knowledge on the plain HTTP port.
//!
//! STUB (foundation commit): the signature is fixed; the h2 work fills it.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::RelayCtx;

/// The scheme the visitor used, for `X-Forwarded-Proto` and redirects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scheme {
    /// Plain HTTP (h2c prior knowledge).
    Http,
    /// TLS terminated by the relay.
    Https,
}

impl Scheme {
    /// `http` or `https`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// Serves one HTTP/2 visitor connection until it ends. `io` has not been
/// read from (for h2c, bytes already read are replayed by the caller).
/// `local` is the relay's address the visitor connected to.
pub(crate) async fn serve<IO>(
    io: IO,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    scheme: Scheme,
    ctx: Arc<RelayCtx>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _ = (io, peer, local, scheme, ctx);
}
