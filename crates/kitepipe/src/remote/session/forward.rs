//! Port forwarding: [`Session::forward`] accepts local connections and
//! opens one `connect` stream per connection.

use std::path::PathBuf;

use kitepipe_proto::remote::{AgentRecord, ConnectOp, RemoteOp};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_util::sync::DropGuard;
use tracing::{Instrument, debug};

use super::{RemoteError, Session, protocol};
use crate::remote::stream::{RecordReader, RecvError};

impl Session {
    /// Forwards connections accepted on `listener` to `host:port` as seen
    /// from the agent's host (like `ssh -L`), until the handle is dropped
    /// or the session ends.
    pub fn forward(&self, listener: TcpListener, host: &str, port: u16) -> ForwardHandle {
        let token = self.inner.token.child_token();
        let session = self.clone();
        let target = ConnectOp {
            host: host.to_string(),
            port,
        };
        let local = listener.local_addr().ok();
        let run_token = token.clone();
        let span = tracing::debug_span!("forward", to = %format!("{host}:{port}"));
        self.inner.tracker.spawn(
            async move {
                loop {
                    let (sock, peer) = tokio::select! {
                        _ = run_token.cancelled() => return,
                        reason = session.closed() => {
                            debug!(%reason, "session ended; forward stops");
                            return;
                        }
                        res = listener.accept() => match res {
                            Ok(pair) => pair,
                            Err(err) => {
                                debug!(%err, "accept failed");
                                continue;
                            }
                        },
                    };
                    let session = session.clone();
                    let target = target.clone();
                    let conn_token = run_token.clone();
                    session.inner.tracker.clone().spawn(async move {
                        tokio::select! {
                            _ = conn_token.cancelled() => {}
                            res = session.forward_one(sock, target) => if let Err(err) = res {
                                debug!(%peer, %err, "forwarded connection failed");
                            },
                        }
                    });
                }
            }
            .instrument(span),
        );
        ForwardHandle {
            local,
            _guard: token.drop_guard(),
        }
    }

    async fn forward_one(
        &self,
        mut sock: tokio::net::TcpStream,
        target: ConnectOp,
    ) -> Result<(), RemoteError> {
        let _ = sock.set_nodelay(true);
        let stream = self.open("connect", RemoteOp::Connect(target)).await?;
        let mut reader = RecordReader::new(stream.clone());
        match self.next_in_time("connect", &mut reader).await? {
            Ok(Some(AgentRecord::Done(_))) => {}
            Ok(Some(AgentRecord::Error(reply))) => {
                return Err(RemoteError::Failed {
                    op: "connect",
                    reply,
                });
            }
            Ok(_) => return Err(protocol("connect", "no reply")),
            Err(err) => return Err(self.stream_error("connect", err)),
        }
        let leftover = reader.into_leftover();
        if !leftover.is_empty() {
            sock.write_all(&leftover)
                .await
                .map_err(|source| RemoteError::Local {
                    path: PathBuf::from("forwarded connection"),
                    source,
                })?;
        }
        let Some(mut mux_stream) = stream.into_inner() else {
            return Err(protocol("connect", "stream still shared"));
        };
        crate::tunnel::splice_stream(&mut sock, &mut mux_stream)
            .await
            .map(drop)
            .map_err(|err| self.stream_error("connect", RecvError::Io(err)))
    }
}

/// A running port forward; dropping it stops accepting (connections
/// already forwarded go on until the session ends).
#[derive(Debug)]
pub struct ForwardHandle {
    local: Option<std::net::SocketAddr>,
    _guard: DropGuard,
}

impl ForwardHandle {
    /// The local address connections are accepted on.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.local
    }
}
