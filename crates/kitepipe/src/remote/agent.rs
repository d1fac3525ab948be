//! The agent: serves remote operations over any byte stream.
//!
//! [`serve`] runs a link over a byte stream (the SSH session's stdin and
//! stdout, from [`stdio`]), says [`AgentHello`], and serves every stream the
//! client opens with `serve_stream`, one task per operation, until the
//! link closes. A connector that accepts remote operations from its relay
//! calls `serve_op` for such streams of its own link.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use kitepipe_proto::frame::ResetCode;
use kitepipe_proto::message::{self, PROTOCOL_VERSION};
use kitepipe_proto::remote::{
    AgentHello, AgentRecord, ErrorKind, ErrorReply, RemoteHeader, RemoteOp,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info};

pub(crate) use super::fs::Protected;
pub use super::policy::MAX_RELAYED_PROCESSES;
pub(crate) use super::policy::{NodePolicy, Origin};
use super::reply::finish;
use super::stream::OpStream;
use crate::link::{IncomingStream, LinkClosed, Mux, MuxConfig, MuxStream, Side};

/// Operations served at once per link (an agent's, or a connector's link
/// to one relay); more wait for a slot. Each holds a stream window (1 MiB
/// of credit), a buffer of one chunk and perhaps an open file or a
/// process, so this bounds the memory and descriptors one client (or one
/// relay) can pin: 256 blocked reads hold 32 MiB of chunks and 256 files.
pub const MAX_CONCURRENT_OPS: usize = 256;

/// How long an operation beyond [`MAX_CONCURRENT_OPS`] waits for a slot
/// before it is refused with a typed error. Long enough for a burst of
/// short operations (a recursive copy) to pass, short enough that a
/// client holding every slot is told so instead of queueing for ever.
pub const OP_SLOT_WAIT: Duration = Duration::from_secs(30);

/// Takes one of `slots`, waiting at most [`OP_SLOT_WAIT`]; the typed
/// refusal when none came free.
pub(crate) async fn op_slot(
    slots: &Arc<Semaphore>,
) -> Result<tokio::sync::OwnedSemaphorePermit, ErrorReply> {
    match tokio::time::timeout(OP_SLOT_WAIT, slots.clone().acquire_owned()).await {
        Ok(Ok(permit)) => Ok(permit),
        _ => Err(ErrorReply {
            kind: ErrorKind::Other,
            errno: None,
            message: format!(
                "busy: {MAX_CONCURRENT_OPS} operations already run on this link; none ended \
                 within {}s",
                OP_SLOT_WAIT.as_secs()
            ),
            path: None,
        }),
    }
}

/// How long the agent lets in-flight operations finish after the link
/// closed before it exits anyway. Shorter than the relay's and the
/// connector's grace (`crate::shutdown::SHUTDOWN_GRACE`): the link is gone,
/// so what still runs can no longer reach its client.
const AGENT_SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Settings of an agent.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The link's heartbeat: a client silent this long is gone.
    pub heartbeat: Duration,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            heartbeat: crate::link::DEFAULT_HEARTBEAT,
        }
    }
}

/// A byte stream for the agent made of this process's stdin and stdout.
pub type StdioTransport =
    tokio::io::Join<Box<dyn AsyncRead + Send + Unpin>, Box<dyn AsyncWrite + Send + Unpin>>;

/// This process's stdin and stdout as one byte stream. Pipes (what sshd
/// hands a command) are driven by the reactor directly; anything else goes
/// through tokio's blocking stdio.
pub fn stdio() -> io::Result<StdioTransport> {
    use std::os::fd::AsFd;
    let reader: Box<dyn AsyncRead + Send + Unpin> = {
        let fd = io::stdin().as_fd().try_clone_to_owned()?;
        match tokio::net::unix::pipe::Receiver::from_owned_fd(fd) {
            Ok(pipe) => Box::new(pipe),
            Err(_) => Box::new(tokio::io::stdin()),
        }
    };
    let writer: Box<dyn AsyncWrite + Send + Unpin> = {
        let fd = io::stdout().as_fd().try_clone_to_owned()?;
        match tokio::net::unix::pipe::Sender::from_owned_fd(fd) {
            Ok(pipe) => Box::new(pipe),
            Err(_) => Box::new(tokio::io::stdout()),
        }
    };
    Ok(tokio::io::join(reader, writer))
}

/// Serves remote operations over `io` until the link closes or `shutdown`
/// is cancelled; returns why the link closed.
pub async fn serve<T>(io: T, options: &AgentOptions, shutdown: CancellationToken) -> LinkClosed
where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    let tracker = TaskTracker::new();
    let token = shutdown.child_token();
    let config = MuxConfig {
        heartbeat: options.heartbeat,
        ..MuxConfig::default()
    };
    let (mux, mut receivers) = Mux::start(
        io,
        BytesMut::new(),
        Side::Relay,
        &config,
        &tracker,
        token.clone(),
    );
    let hello = hello();
    if let Err(reason) = mux.send_control(message::encode(&hello)).await {
        return reason;
    }
    info!(pid = hello.pid, "agent serving");
    let slots = Arc::new(Semaphore::new(MAX_CONCURRENT_OPS));
    let reason = loop {
        tokio::select! {
            incoming = receivers.incoming.recv() => {
                let Some(incoming) = incoming else { break mux.closed().await };
                let slots = slots.clone();
                let span = tracing::debug_span!("op", stream = incoming.stream.id());
                tracker.spawn(async move {
                    match op_slot(&slots).await {
                        Ok(_slot) => serve_stream(incoming).await,
                        Err(busy) => refuse(incoming.stream, busy).await,
                    }
                }.instrument(span));
            }
            control = receivers.control.recv() => {
                if control.is_none() {
                    break mux.closed().await;
                }
                // Clients send no control messages; ignore any.
            }
            reason = mux.closed() => break reason,
            _ = shutdown.cancelled() => {
                mux.close(LinkClosed::Shutdown);
                break LinkClosed::Shutdown;
            }
        }
    };
    debug!(%reason, "agent link closed");
    token.cancel();
    crate::shutdown::drain(&tracker, AGENT_SHUTDOWN_GRACE, "operations").await;
    reason
}

/// This process as an agent: version, software, pid, uid, platform.
pub(crate) fn hello() -> AgentHello {
    AgentHello {
        version: PROTOCOL_VERSION,
        software: concat!("kitepipe/", env!("CARGO_PKG_VERSION")).to_string(),
        pid: std::process::id(),
        uid: rustix::process::getuid().as_raw(),
        platform: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
    }
}

/// Serves one stream opened by a client: decodes its header and runs the
/// operation. A header that is not a remote operation resets the stream.
pub(crate) async fn serve_stream(incoming: IncomingStream) {
    let IncomingStream { header, mut stream } = incoming;
    match message::decode::<RemoteHeader>(&header) {
        Ok(RemoteHeader::Remote(op)) => serve_op(op, stream, &Origin::Agent).await,
        Err(err) => {
            debug!(%err, "bad remote operation header");
            stream.reset(
                ResetCode::ProtocolError,
                &format!("bad remote operation header: {err}"),
            );
        }
    }
}

/// Runs one decoded operation on its stream, as `origin` allows.
pub(crate) async fn serve_op(op: RemoteOp, stream: MuxStream, origin: &Origin) {
    let policy = match origin {
        Origin::Agent => None,
        Origin::Relayed(policy) => Some(&**policy),
    };
    if let Some(Err(refusal)) = policy.map(|policy| policy.admit(&op)) {
        info!(op = %op.summary(), why = %refusal.message, "remote operation refused");
        return refuse(stream, refusal).await;
    }
    let protected = policy.map(|policy| &policy.protected);
    let stream = OpStream::new(stream);
    match op {
        RemoteOp::Exec(op) => super::exec::exec(op, stream, policy).await,
        RemoteOp::Spawn(op) => super::exec::spawn(op, stream, policy).await,
        RemoteOp::Kill(op) => super::exec::kill(op, stream).await,
        RemoteOp::Read(op) => super::fs::read(op, stream, protected).await,
        RemoteOp::Write(op) => super::fs::write(op, stream, protected).await,
        RemoteOp::Ls(op) => super::fs::ls(op, stream).await,
        RemoteOp::Stat(op) => super::fs::stat(op, stream).await,
        RemoteOp::Mkdir(op) => super::fs::mkdir(op, stream).await,
        RemoteOp::Rm(op) => super::fs::rm(op, stream).await,
        RemoteOp::Mv(op) => super::fs::mv(op, stream).await,
        RemoteOp::Connect(op) => super::forward::connect(op, stream).await,
    }
}

/// Answers an operation stream with a typed error instead of running it
/// (a relay refusing an operation its rules do not allow).
pub(crate) async fn refuse(stream: MuxStream, reply: ErrorReply) {
    finish(&OpStream::new(stream), AgentRecord::Error(reply)).await;
}

/// Removes the file the bootstrap started us from, if it is this very
/// executable (same device and inode), so nothing of ours stays on disk.
pub fn unlink_self(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let ours = std::fs::metadata("/proc/self/exe")?;
    let theirs = std::fs::symlink_metadata(path)?;
    if ours.dev() != theirs.dev() || ours.ino() != theirs.ino() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is not this agent's executable; not removing it",
                path.display()
            ),
        ));
    }
    std::fs::remove_file(path)
}
