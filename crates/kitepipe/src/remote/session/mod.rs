//! The client side: a [`Session`] with an agent, and the operations it runs.
//!
//! A session is a link to an agent over any byte stream ([`Session::over`]),
//! usually the stdin and stdout of an `ssh` process that started the agent
//! ([`Session::ssh`]). Every operation opens its own stream, so a session
//! runs any number of them at once; clones of a `Session` share the link.

mod exec;
mod forward;
mod fs;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kitepipe_proto::message;
use kitepipe_proto::remote::{
    AgentHello, AgentRecord, ErrorReply, RemoteHeader, RemoteOp, from_json,
};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::bootstrap::{self, SshProcess, StartedAgent};
use super::connect::{ConnectError, SessionOptions, SshOptions};
use super::stream::{OpStream, RecordReader, RecvError};
use super::text::escape;
use crate::link::{LinkClosed, Mux, MuxConfig, Side, StreamReset};

pub use exec::{Exec, ExecEvent, ExecInput, ExecOutput, Output, RemoteCommand};
pub use forward::ForwardHandle;

/// Entries of one listing the client keeps: a directory this large is
/// rare (a big maildir), and at about 100 bytes each in memory the list
/// stays near 100 MiB. A host sending more gets [`RemoteError::TooLarge`].
pub const MAX_LS_ENTRIES: usize = 1_000_000;

/// Bytes of `Items` payload (JSON) of one listing the client accepts:
/// a million entries with 40-byte names; memory after decoding is about
/// the same. Bounds a host that sends long names instead of many.
pub const MAX_LS_BYTES: usize = 64 * 1024 * 1024;

/// Bytes [`Session::read`] and [`Session::output`] collect in memory; more
/// is an error (stream bigger files with `read_into` or `exec`), so a host
/// cannot grow the client's memory without end.
pub const MAX_COLLECT_BYTES: usize = 256 * 1024 * 1024;

/// A failed remote operation.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The host refused or failed the operation; the reply says why
    /// (kind, errno, message, path).
    #[error("{op} failed on the host: {}", escape(&reply.to_string()))]
    Failed {
        /// The operation.
        op: &'static str,
        /// The host's typed reason.
        reply: ErrorReply,
    },
    /// The session ended (the agent exited, SSH died, the heartbeat
    /// timed out) before the operation finished.
    #[error("the session ended during {op}: {reason}")]
    SessionLost {
        /// The operation.
        op: &'static str,
        /// Why the link closed.
        reason: LinkClosed,
    },
    /// The agent aborted the operation's stream.
    #[error("the agent aborted {op}: {}", escape(reason))]
    Aborted {
        /// The operation.
        op: &'static str,
        /// The agent's reset reason.
        reason: String,
    },
    /// The agent broke the remote operation protocol.
    #[error("the agent broke the protocol during {op}: {}", escape(reason))]
    Protocol {
        /// The operation.
        op: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// The operation did not finish within its deadline.
    #[error("{op} timed out after {}s", after.as_secs_f64())]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The deadline.
        after: Duration,
    },
    /// The host's reply passed a bound of the client (e.g.
    /// [`MAX_LS_ENTRIES`]); the operation stops there.
    #[error("{op}: the host sent {what}; kitepipe stops there")]
    TooLarge {
        /// The operation.
        op: &'static str,
        /// What passed which bound.
        what: String,
    },
    /// A local file could not be read or written.
    #[error("local file {}: {source}", path.display())]
    Local {
        /// The local path.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
}

impl RemoteError {
    /// The host's typed reason, if the host failed the operation.
    pub fn reply(&self) -> Option<&ErrorReply> {
        match self {
            RemoteError::Failed { reply, .. } => Some(reply),
            _ => None,
        }
    }
}

/// A session with an agent. Cheap to clone; the link closes (and an `ssh`
/// process is stopped) when the last clone is dropped or [`Session::close`]
/// is called.
///
/// ```no_run
/// use kitepipe::remote::{RemoteCommand, Session, SshOptions};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// // Pushes the agent through the system ssh (its config, keys and
/// // known_hosts apply); nothing needs to be installed on the host.
/// let mut options = SshOptions::new("user@host");
/// options.ssh_args = vec!["-p".into(), "2222".into()];
/// let session = Session::ssh(options).await?;
/// let out = session
///     .output(&RemoteCommand::new("uname").arg("-a"))
///     .await?;
/// println!("{:?}: {}", out.status, String::from_utf8_lossy(&out.stdout));
/// session.close().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

struct Inner {
    mux: Mux,
    hello: AgentHello,
    options: SessionOptions,
    tracker: TaskTracker,
    token: CancellationToken,
    _guard: DropGuard,
    ssh: tokio::sync::Mutex<Option<SshProcess>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("agent", &self.inner.hello)
            .finish()
    }
}

impl Session {
    /// A session over a byte stream whose other end runs an agent
    /// (`kitepipe agent --stdio`). Waits for the agent's hello.
    pub async fn over<T>(io: T, options: SessionOptions) -> Result<Session, ConnectError>
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        Session::start(io, BytesMut::new(), options).await
    }

    /// Starts the agent on a host through the system `ssh` client and
    /// opens a session with it (the bootstrap: a POSIX sh script as ssh's
    /// command, the agent on its stdin; nothing stays on the host).
    pub async fn ssh(options: SshOptions) -> Result<Session, ConnectError> {
        let deadline = Instant::now() + options.connect_timeout;
        let StartedAgent {
            stdin,
            stdout,
            leftover,
            mut ssh,
        } = bootstrap::start(&options, deadline).await?;
        let mut session_options = options.session.clone();
        session_options.hello_timeout = deadline.saturating_duration_since(Instant::now());
        let io = tokio::io::join(stdout, stdin);
        match Session::start(io, leftover, session_options).await {
            Ok(session) => {
                session.attach_ssh(ssh).await;
                Ok(session)
            }
            Err(err) => {
                if matches!(err, ConnectError::Timeout { .. }) {
                    ssh.kill().await;
                }
                Err(ssh.failure(err).await)
            }
        }
    }

    pub(crate) async fn start<T>(
        io: T,
        read_buf: BytesMut,
        options: SessionOptions,
    ) -> Result<Session, ConnectError>
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        let tracker = TaskTracker::new();
        let token = CancellationToken::new();
        let config = MuxConfig {
            heartbeat: options.heartbeat,
            ..MuxConfig::default()
        };
        let (mux, mut receivers) = Mux::start(
            io,
            read_buf,
            Side::Connector,
            &config,
            &tracker,
            token.child_token(),
        );
        let hello = tokio::select! {
            control = receivers.control.recv() => match control {
                Some(payload) => message::decode::<AgentHello>(&payload)
                    .map_err(|err| ConnectError::Protocol(format!("bad agent hello: {err}")))?,
                None => return Err(ConnectError::AgentGone(mux.closed().await)),
            },
            reason = mux.closed() => return Err(ConnectError::AgentGone(reason)),
            _ = tokio::time::sleep(options.hello_timeout) => {
                mux.close(LinkClosed::Shutdown);
                return Err(ConnectError::Timeout {
                    after: options.hello_timeout,
                    stage: "waiting for the agent's hello",
                    stderr: String::new(),
                });
            }
        };
        if hello.version != message::PROTOCOL_VERSION {
            mux.close(LinkClosed::Protocol("version mismatch".into()));
            return Err(ConnectError::Protocol(format!(
                "the agent speaks protocol version {}, we speak {}",
                hello.version,
                message::PROTOCOL_VERSION
            )));
        }
        debug!(pid = hello.pid, uid = hello.uid, platform = %escape(&hello.platform), "agent ready");
        // The agent opens no streams and sends no further control
        // messages; drain both so a misbehaving agent cannot fill them.
        let drain_token = token.clone();
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = drain_token.cancelled() => return,
                    incoming = receivers.incoming.recv() => match incoming {
                        Some(mut incoming) => incoming.stream.reset(
                            kitepipe_proto::frame::ResetCode::Refused,
                            "clients serve no streams",
                        ),
                        None => return,
                    },
                    control = receivers.control.recv() => if control.is_none() { return },
                }
            }
        });
        Ok(Session {
            inner: Arc::new(Inner {
                mux,
                hello,
                options,
                tracker,
                _guard: token.clone().drop_guard(),
                token,
                ssh: tokio::sync::Mutex::new(None),
            }),
        })
    }

    pub(crate) async fn attach_ssh(&self, ssh: SshProcess) {
        *self.inner.ssh.lock().await = Some(ssh);
    }

    /// What the agent said about itself.
    pub fn agent(&self) -> &AgentHello {
        &self.inner.hello
    }

    /// The link to the agent.
    pub fn mux(&self) -> &Mux {
        &self.inner.mux
    }

    /// Closes the session: the agent exits (it leaves nothing behind), and
    /// an `ssh` process is waited for (or killed after a short grace).
    pub async fn close(&self) {
        self.inner.mux.close(LinkClosed::Shutdown);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.inner.mux.closed()).await;
        if let Some(ssh) = self.inner.ssh.lock().await.as_mut() {
            ssh.wait_or_kill().await;
        }
        self.inner.token.cancel();
        self.inner.tracker.close();
    }

    /// Resolves when the session has ended; returns why. Cancel-safe.
    pub async fn closed(&self) -> LinkClosed {
        self.inner.mux.closed().await
    }

    async fn open(&self, op_name: &'static str, op: RemoteOp) -> Result<OpStream, RemoteError> {
        let header = message::encode(&RemoteHeader::Remote(op));
        match self.inner.mux.open(header).await {
            Ok(stream) => Ok(OpStream::new(stream)),
            Err(reason) => Err(RemoteError::SessionLost {
                op: op_name,
                reason,
            }),
        }
    }

    /// Runs `work` within the operation deadline.
    async fn with_deadline<T>(
        &self,
        op: &'static str,
        work: impl std::future::Future<Output = T>,
    ) -> Result<T, RemoteError> {
        let after = self.inner.options.op_timeout;
        tokio::time::timeout(after, work)
            .await
            .map_err(|_| RemoteError::Timeout { op, after })
    }

    /// The host's next record, within the operation deadline (for a first
    /// reply, or each record of a transfer): an agent that stays alive (its
    /// link answers pings) but never answers cannot hold the operation.
    async fn next_in_time(
        &self,
        op: &'static str,
        reader: &mut RecordReader,
    ) -> Result<Result<Option<AgentRecord>, RecvError>, RemoteError> {
        self.with_deadline(op, reader.next_agent()).await
    }

    fn stream_error(&self, op: &'static str, err: RecvError) -> RemoteError {
        stream_error(&self.inner.mux, op, err)
    }

    /// Runs an operation without input within the operation deadline;
    /// hands each `Items` payload to `on_items` (which bounds what it
    /// keeps) and returns the `Done` payload.
    async fn simple_records(
        &self,
        op_name: &'static str,
        op: RemoteOp,
        on_items: &mut (dyn FnMut(Bytes) -> Result<(), RemoteError> + Send),
    ) -> Result<Bytes, RemoteError> {
        let after = self.inner.options.op_timeout;
        let work = async {
            let stream = self.open(op_name, op).await?;
            let _ = stream.finish().await;
            let mut reader = RecordReader::new(stream);
            loop {
                match reader.next_agent().await {
                    Ok(Some(AgentRecord::Done(json))) => return Ok(json),
                    Ok(Some(AgentRecord::Items(json))) => on_items(json)?,
                    Ok(Some(AgentRecord::Error(reply))) => {
                        return Err(RemoteError::Failed { op: op_name, reply });
                    }
                    Ok(Some(_)) => return Err(protocol(op_name, "unexpected record")),
                    Ok(None) => return Err(protocol(op_name, "no reply")),
                    Err(err) => return Err(self.stream_error(op_name, err)),
                }
            }
        };
        match tokio::time::timeout(after, work).await {
            Ok(res) => res,
            Err(_) => Err(RemoteError::Timeout { op: op_name, after }),
        }
    }

    /// Runs an operation without input whose answer is one `Done` record.
    async fn simple<T: DeserializeOwned>(
        &self,
        op_name: &'static str,
        op: RemoteOp,
    ) -> Result<T, RemoteError> {
        let done = self
            .simple_records(op_name, op, &mut |_| {
                Err(protocol(op_name, "list items where none belong"))
            })
            .await?;
        decode(op_name, &done)
    }
}
fn decode<T: DeserializeOwned>(op: &'static str, json: &[u8]) -> Result<T, RemoteError> {
    from_json(0, json).map_err(|err| RemoteError::Protocol {
        op,
        reason: err.to_string(),
    })
}

fn protocol(op: &'static str, reason: &str) -> RemoteError {
    RemoteError::Protocol {
        op,
        reason: reason.to_string(),
    }
}

fn stream_error(mux: &Mux, op: &'static str, err: RecvError) -> RemoteError {
    if mux.is_closed() {
        // Only a closed link has a reason to read; it is set before the
        // token is cancelled.
        let reason = closed_reason_now(mux);
        return RemoteError::SessionLost { op, reason };
    }
    match err {
        RecvError::Io(err) => {
            if let Some(reset) = err.get_ref().and_then(|e| e.downcast_ref::<StreamReset>()) {
                return RemoteError::Aborted {
                    op,
                    reason: reset.reason.clone(),
                };
            }
            if let Some(reason) = err.get_ref().and_then(|e| e.downcast_ref::<LinkClosed>()) {
                return RemoteError::SessionLost {
                    op,
                    reason: reason.clone(),
                };
            }
            RemoteError::Protocol {
                op,
                reason: err.to_string(),
            }
        }
        other => RemoteError::Protocol {
            op,
            reason: other.to_string(),
        },
    }
}

/// The reason of a closed link, without waiting (it is already closed).
fn closed_reason_now(mux: &Mux) -> LinkClosed {
    let mut closed = std::pin::pin!(mux.closed());
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    match closed.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(reason) => reason,
        std::task::Poll::Pending => LinkClosed::Shutdown,
    }
}
