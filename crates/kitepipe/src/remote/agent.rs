//! The agent: serves remote operations over any byte stream.
//!
//! [`serve`] runs a link over a byte stream (the SSH session's stdin and
//! stdout, from [`stdio`]), says [`AgentHello`], and serves every stream the
//! client opens with [`serve_stream`], one task per operation, until the
//! link closes. A connector that accepts remote operations from its relay
//! calls [`serve_stream`] for such streams of its own link.

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

pub use super::fs::Protected;
use super::stream::{OpStream, agent_bytes};
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

/// Processes started by relayed `exec` and `spawn` that may run at once
/// on a connector (all its relays together). A process holds up to four
/// descriptors here (pipes, pidfd) and whatever it uses on the machine;
/// 64 at once is far beyond what one operator's automation runs, and a
/// relay that asks for more is refused at once (processes may run for
/// hours: waiting for a slot would not help).
pub const MAX_RELAYED_PROCESSES: usize = 64;

/// Variables of the connector's environment a relayed command inherits
/// (`TERM` too on a terminal). Nothing else: the connector's environment
/// may hold `KITEPIPE_SECRET` or any secret of the service that runs it.
pub const RELAYED_ENV_INHERITED: &[&str] = &[
    "PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER", "LOGNAME", "SHELL",
];

/// `PATH` of relayed commands when the connector has none.
const DEFAULT_RELAYED_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Who asked for an operation, which decides how it runs.
#[derive(Clone, Default)]
pub enum Origin {
    /// A client of `kitepipe agent --stdio`: the user who logged in (over
    /// SSH) runs it, with that login's environment and reach.
    #[default]
    Agent,
    /// A relay passed it on to this connector: the connector's
    /// [`NodePolicy`] applies.
    Relayed(Arc<NodePolicy>),
}

/// What a connector allows the operations its relays pass on, besides
/// the kinds (`--allow-remote`).
#[derive(Debug)]
pub struct NodePolicy {
    /// File operations that change anything are allowed (`fs`); false:
    /// read, ls and stat only (`fs-read`).
    pub fs_write: bool,
    /// Paths no relayed file operation reaches.
    pub protected: Protected,
    /// The environment relayed commands start from.
    pub env: Vec<(String, String)>,
    /// Slots of running relayed processes ([`MAX_RELAYED_PROCESSES`]).
    processes: Arc<Semaphore>,
}

impl NodePolicy {
    /// A policy; `env` is the connector's environment, looked up by name
    /// (only [`RELAYED_ENV_INHERITED`] is read).
    pub fn new(
        fs_write: bool,
        protected: Protected,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> NodePolicy {
        NodePolicy {
            fs_write,
            protected,
            env: relayed_env(env),
            processes: Arc::new(Semaphore::new(MAX_RELAYED_PROCESSES)),
        }
    }

    /// A slot for one more relayed process, or the typed refusal.
    pub(crate) fn process_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ErrorReply> {
        self.processes
            .clone()
            .try_acquire_owned()
            .map_err(|_| ErrorReply {
                kind: ErrorKind::Other,
                errno: None,
                message: format!(
                    "busy: {MAX_RELAYED_PROCESSES} relayed processes already run on this connector"
                ),
                path: None,
            })
    }

    /// Refuses what this policy does not allow before the operation runs.
    fn admit(&self, op: &RemoteOp) -> Result<(), ErrorReply> {
        if !self.fs_write && super::fs::changes(op) {
            return Err(ErrorReply {
                kind: ErrorKind::PermissionDenied,
                errno: None,
                message: format!(
                    "this connector grants fs-read only (read, ls, stat), not {}",
                    op.summary()
                ),
                path: None,
            });
        }
        super::fs::check_paths(op, &self.protected)
    }
}

/// The environment of relayed commands: the connector's
/// [`RELAYED_ENV_INHERITED`] variables, and a default `PATH` if it has none.
pub fn relayed_env(env: &dyn Fn(&str) -> Option<String>) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = RELAYED_ENV_INHERITED
        .iter()
        .filter_map(|key| env(key).map(|value| (key.to_string(), value)))
        .collect();
    if !vars.iter().any(|(key, _)| key == "PATH") {
        vars.push(("PATH".into(), DEFAULT_RELAYED_PATH.into()));
    }
    vars
}

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
pub fn hello() -> AgentHello {
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
pub async fn serve_stream(incoming: IncomingStream) {
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
pub async fn serve_op(op: RemoteOp, stream: MuxStream, origin: &Origin) {
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

/// How long the agent keeps reading (and discarding) a client's input
/// after it replied, so its reply is not destroyed by a reset.
const DRAIN_AFTER_REPLY: Duration = Duration::from_secs(10);

/// Sends the last record of an operation, FIN, and drains the client's
/// remaining input until its FIN.
pub(crate) async fn finish(stream: &OpStream, last: AgentRecord) {
    if stream.send(agent_bytes(&last)).await.is_err() || stream.finish().await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(DRAIN_AFTER_REPLY, async {
        while let Ok(Some(_)) = stream.recv().await {}
    })
    .await;
}

/// Answers an operation stream with a typed error instead of running it
/// (a relay refusing an operation its rules do not allow).
pub(crate) async fn refuse(stream: MuxStream, reply: ErrorReply) {
    finish(&OpStream::new(stream), AgentRecord::Error(reply)).await;
}

/// Replies with an error built from an I/O error.
pub(crate) async fn fail(stream: &OpStream, err: &io::Error, what: &str, path: Option<&str>) {
    finish(stream, AgentRecord::Error(error_reply(err, what, path))).await;
}

/// The typed reply for a failed system call.
pub(crate) fn error_reply(err: &io::Error, what: &str, path: Option<&str>) -> ErrorReply {
    let kind = match err.kind() {
        io::ErrorKind::NotFound => ErrorKind::NotFound,
        io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
        io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
        io::ErrorKind::NotADirectory => ErrorKind::NotADirectory,
        io::ErrorKind::IsADirectory => ErrorKind::IsADirectory,
        io::ErrorKind::DirectoryNotEmpty => ErrorKind::DirectoryNotEmpty,
        io::ErrorKind::ConnectionRefused => ErrorKind::ConnectionRefused,
        io::ErrorKind::InvalidInput => ErrorKind::InvalidInput,
        io::ErrorKind::Unsupported => ErrorKind::Unsupported,
        _ => ErrorKind::Other,
    };
    ErrorReply {
        kind,
        errno: err.raw_os_error(),
        message: format!("{what}: {}", describe(err)),
        path: path.map(str::to_string),
    }
}

/// The text of an error without std's " (os error N)" suffix (the errno
/// travels in its own field).
fn describe(err: &io::Error) -> String {
    let text = err.to_string();
    match text.rfind(" (os error ") {
        Some(pos) if err.raw_os_error().is_some() => text[..pos].to_string(),
        _ => text,
    }
}

/// A reply for a request that makes no sense.
pub(crate) fn invalid(message: &str) -> AgentRecord {
    AgentRecord::Error(ErrorReply {
        kind: ErrorKind::InvalidInput,
        errno: None,
        message: message.to_string(),
        path: None,
    })
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
