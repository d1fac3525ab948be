//! Accepting connections, shared by the relay's listeners, its TCP kite
//! ports and the event gateway (TCP and unix sockets).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Pause after a failed accept (e.g. out of file descriptors) so the loop
/// does not spin while the condition lasts.
pub(crate) const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The next connection on `listener`, or `None` once `token` is cancelled.
/// A failed accept (out of file descriptors, a connection reset before it
/// was accepted) is logged and retried after [`ACCEPT_ERROR_PAUSE`].
/// Cancel-safe: `TcpListener::accept` is, so dropping this future loses no
/// connection.
pub(crate) async fn accept(
    listener: &TcpListener,
    token: &CancellationToken,
) -> Option<(TcpStream, SocketAddr)> {
    accept_with(|| listener.accept(), token).await
}

/// [`accept`] for any listener: the next value `accept_one` yields, or
/// `None` once `token` is cancelled; errors are logged and retried after
/// [`ACCEPT_ERROR_PAUSE`]. Cancel-safe if `accept_one`'s future is (tokio's
/// `TcpListener::accept` and `UnixListener::accept` are).
pub(crate) async fn accept_with<T, F, Fut>(
    mut accept_one: F,
    token: &CancellationToken,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = io::Result<T>>,
{
    loop {
        let accepted = tokio::select! {
            _ = token.cancelled() => return None,
            res = accept_one() => res,
        };
        match accepted {
            Ok(pair) => return Some(pair),
            Err(err) => {
                warn!(%err, "accept failed");
                tokio::select! {
                    _ = token.cancelled() => return None,
                    _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepts_until_cancelled() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        let client = TcpStream::connect(addr).await.unwrap();
        let (_sock, peer) = accept(&listener, &token).await.unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        token.cancel();
        assert!(accept(&listener, &token).await.is_none());
    }
}
