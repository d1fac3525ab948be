//! The client side: a [`Session`] with an agent, and the operations it runs.
//!
//! A session is a link to an agent over any byte stream ([`Session::over`]),
//! usually the stdin and stdout of an `ssh` process that started the agent
//! ([`Session::ssh`]). Every operation opens its own stream, so a session
//! runs any number of them at once; clones of a `Session` share the link.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use kitepipe_proto::message;
use kitepipe_proto::remote::{
    AgentHello, AgentRecord, ClientRecord, ConnectOp, DATA_CHUNK, DirEntry, ErrorReply, ExecHead,
    ExecOp, ExitReport, FileStat, KillOp, MkdirOp, MvOp, PathOp, RECORD_HEADER_LEN, ReadHead,
    ReadOp, RemoteHeader, RemoteOp, RmOp, SpawnOp, Spawned, StatOp, TtySize, WriteOp, Written,
    from_json,
};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug};

use super::bootstrap::{self, SshProcess, StartedAgent};
use super::connect::{ConnectError, SessionOptions, SshOptions};
use super::stream::{OpStream, RecordReader, RecvError, client_bytes};
use super::text::escape;
use crate::link::{LinkClosed, Mux, MuxConfig, Side, StreamReset};

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
    /// opens a session with it (see [`super::bootstrap`]).
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

    /// Starts a command; its output and exit arrive on [`Exec::output`].
    pub async fn exec(&self, command: &RemoteCommand) -> Result<Exec, RemoteError> {
        let op = RemoteOp::Exec(ExecOp {
            argv: command.argv.clone(),
            env: command.env.clone(),
            env_clear: command.env_clear,
            cwd: command.cwd.clone(),
            stdin: command.stdin,
            tty: command.tty,
        });
        let stream = self.open("exec", op).await?;
        if !command.stdin {
            let _ = stream.finish().await;
        }
        let mut reader = RecordReader::new(stream.clone());
        let pid = match self.next_in_time("exec", &mut reader).await? {
            Ok(Some(AgentRecord::Head(json))) => decode::<ExecHead>("exec", &json)?.pid,
            Ok(Some(AgentRecord::Error(reply))) => {
                return Err(RemoteError::Failed { op: "exec", reply });
            }
            Ok(Some(_)) => return Err(protocol("exec", "unexpected record before the head")),
            Ok(None) => return Err(protocol("exec", "no reply")),
            Err(err) => return Err(self.stream_error("exec", err)),
        };
        Ok(Exec {
            pid,
            input: ExecInput {
                stream: stream.clone(),
                closed: !command.stdin,
            },
            output: ExecOutput {
                reader,
                mux: self.inner.mux.clone(),
                done: false,
            },
        })
    }

    /// Runs a command to its end and collects its output (stdin empty).
    pub async fn output(&self, command: &RemoteCommand) -> Result<Output, RemoteError> {
        let mut command = command.clone();
        command.stdin = false;
        let mut exec = self.exec(&command).await?;
        let mut output = Output {
            status: ExitReport {
                code: None,
                signal: None,
            },
            stdout: Vec::new(),
            stderr: Vec::new(),
        };
        loop {
            let event = exec.output.next().await?;
            if let ExecEvent::Stdout(data) | ExecEvent::Stderr(data) = &event
                && output.stdout.len() + output.stderr.len() + data.len() > MAX_COLLECT_BYTES
            {
                return Err(RemoteError::TooLarge {
                    op: "exec",
                    what: format!(
                        "more than {MAX_COLLECT_BYTES} bytes of output (MAX_COLLECT_BYTES; stream it with exec)"
                    ),
                });
            }
            match event {
                ExecEvent::Stdout(data) => output.stdout.extend_from_slice(&data),
                ExecEvent::Stderr(data) => output.stderr.extend_from_slice(&data),
                ExecEvent::Exit(status) => {
                    output.status = status;
                    return Ok(output);
                }
            }
        }
    }

    /// Starts a command in the background (its own process group, output
    /// to `log` or nowhere); returns its pid. It outlives the session.
    pub async fn spawn(
        &self,
        command: &RemoteCommand,
        log: Option<&str>,
    ) -> Result<u32, RemoteError> {
        let op = RemoteOp::Spawn(SpawnOp {
            argv: command.argv.clone(),
            env: command.env.clone(),
            cwd: command.cwd.clone(),
            log: log.map(str::to_string),
        });
        let spawned: Spawned = self.simple("spawn", op).await?;
        Ok(spawned.pid)
    }

    /// Sends `signal` to process `pid` (or its process group).
    pub async fn kill(&self, pid: u32, signal: i32, group: bool) -> Result<(), RemoteError> {
        let op = RemoteOp::Kill(KillOp { pid, signal, group });
        self.simple::<serde_json::Value>("kill", op).await.map(drop)
    }

    /// Metadata of a remote path (symbolic links followed unless `no_follow`).
    pub async fn stat(&self, path: &str, no_follow: bool) -> Result<FileStat, RemoteError> {
        let op = RemoteOp::Stat(StatOp {
            path: path.to_string(),
            no_follow,
        });
        self.simple("stat", op).await
    }

    /// The entries of a remote directory, sorted by name.
    pub async fn ls(&self, path: &str) -> Result<Vec<DirEntry>, RemoteError> {
        let op = RemoteOp::Ls(PathOp {
            path: path.to_string(),
        });
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        self.simple_records("ls", op, &mut |batch| {
            bytes += batch.len();
            if bytes > MAX_LS_BYTES {
                return Err(RemoteError::TooLarge {
                    op: "ls",
                    what: format!("more than {MAX_LS_BYTES} bytes of listing (MAX_LS_BYTES)"),
                });
            }
            let batch = decode::<Vec<DirEntry>>("ls", &batch)?;
            if entries.len() + batch.len() > MAX_LS_ENTRIES {
                return Err(RemoteError::TooLarge {
                    op: "ls",
                    what: format!("more than {MAX_LS_ENTRIES} entries (MAX_LS_ENTRIES)"),
                });
            }
            entries.extend(batch);
            Ok(())
        })
        .await?;
        Ok(entries)
    }

    /// Creates a remote directory (with its parents if `parents`).
    pub async fn mkdir(&self, path: &str, parents: bool) -> Result<(), RemoteError> {
        let op = RemoteOp::Mkdir(MkdirOp {
            path: path.to_string(),
            parents,
            mode: None,
        });
        self.simple::<serde_json::Value>("mkdir", op)
            .await
            .map(drop)
    }

    /// Removes a remote file or directory (recursively if asked).
    pub async fn rm(&self, path: &str, recursive: bool) -> Result<(), RemoteError> {
        let op = RemoteOp::Rm(RmOp {
            path: path.to_string(),
            recursive,
        });
        self.simple::<serde_json::Value>("rm", op).await.map(drop)
    }

    /// Renames a remote path.
    pub async fn mv(&self, from: &str, to: &str) -> Result<(), RemoteError> {
        let op = RemoteOp::Mv(MvOp {
            from: from.to_string(),
            to: to.to_string(),
        });
        self.simple::<serde_json::Value>("mv", op).await.map(drop)
    }

    /// Reads a whole remote file into memory.
    pub async fn read(&self, path: &str) -> Result<Vec<u8>, RemoteError> {
        let mut out = Bounded(Vec::new());
        self.read_into(path, &mut out, &mut |_, _| {})
            .await
            .map_err(|err| match err {
                RemoteError::Local { source, .. }
                    if source.kind() == std::io::ErrorKind::FileTooLarge =>
                {
                    RemoteError::TooLarge {
                        op: "read",
                        what: format!(
                            "more than {MAX_COLLECT_BYTES} bytes (MAX_COLLECT_BYTES; stream it with read_into)"
                        ),
                    }
                }
                other => other,
            })?;
        Ok(out.0)
    }

    /// Streams a remote file into `out`; `progress(done, total)` is called
    /// after every chunk. Returns the bytes copied.
    pub async fn read_into<W: AsyncWrite + Unpin>(
        &self,
        path: &str,
        out: &mut W,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<u64, RemoteError> {
        let op = RemoteOp::Read(ReadOp {
            path: path.to_string(),
        });
        let stream = self.open("read", op).await?;
        let _ = stream.finish().await;
        let mut reader = RecordReader::new(stream);
        let mut total = 0;
        let mut done = 0u64;
        loop {
            // The host makes progress within the deadline, or the read ends.
            match self.next_in_time("read", &mut reader).await? {
                Ok(Some(AgentRecord::Head(json))) => {
                    total = decode::<ReadHead>("read", &json)?.size
                }
                Ok(Some(AgentRecord::Data(data))) => {
                    out.write_all(&data)
                        .await
                        .map_err(|source| RemoteError::Local {
                            path: PathBuf::from("-"),
                            source,
                        })?;
                    done += data.len() as u64;
                    progress(done, total.max(done));
                }
                Ok(Some(AgentRecord::Done(_))) => break,
                Ok(Some(AgentRecord::Error(reply))) => {
                    return Err(RemoteError::Failed { op: "read", reply });
                }
                Ok(Some(_)) => return Err(protocol("read", "unexpected record")),
                Ok(None) => return Err(protocol("read", "the file ended without Done")),
                Err(err) => return Err(self.stream_error("read", err)),
            }
        }
        out.flush().await.map_err(|source| RemoteError::Local {
            path: PathBuf::from("-"),
            source,
        })?;
        Ok(done)
    }

    /// Writes `data` to a remote file (created or replaced whole).
    pub async fn write(&self, path: &str, data: &[u8]) -> Result<(), RemoteError> {
        let mut src = data;
        self.write_from(path, &mut src, data.len() as u64, None, &mut |_, _| {})
            .await
            .map(drop)
    }

    /// Streams `src` into a remote file, created or replaced whole (written
    /// beside it and renamed at the end); `total` is for progress only.
    pub async fn write_from<R: AsyncRead + Unpin>(
        &self,
        path: &str,
        src: &mut R,
        total: u64,
        mode: Option<u32>,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<u64, RemoteError> {
        let op = RemoteOp::Write(WriteOp {
            path: path.to_string(),
            mode,
        });
        let stream = self.open("write", op).await?;
        let mut reader = RecordReader::new(stream.clone());
        // Upload while watching for an early error (e.g. permission denied).
        let upload = async {
            let mut done = 0u64;
            loop {
                let mut buf = BytesMut::with_capacity(RECORD_HEADER_LEN + DATA_CHUNK);
                buf.put_bytes(0, RECORD_HEADER_LEN);
                let n = read_up_to(src, &mut buf, DATA_CHUNK)
                    .await
                    .map_err(|source| RemoteError::Local {
                        path: PathBuf::from("-"),
                        source,
                    })?;
                if n == 0 {
                    break;
                }
                buf[..RECORD_HEADER_LEN].copy_from_slice(&ClientRecord::data_header(n));
                // A host that grants no window for the deadline is stuck.
                self.with_deadline("write", stream.send(buf.freeze()))
                    .await?
                    .map_err(|err| self.stream_error("write", RecvError::Io(err)))?;
                done += n as u64;
                progress(done, total.max(done));
            }
            self.with_deadline("write", stream.send(client_bytes(&ClientRecord::Eof)))
                .await?
                .map_err(|err| self.stream_error("write", RecvError::Io(err)))?;
            let _ = stream.finish().await;
            Ok::<u64, RemoteError>(done)
        };
        let reply = async {
            match reader.next_agent().await {
                Ok(Some(AgentRecord::Done(json))) => Ok(decode::<Written>("write", &json)?.bytes),
                Ok(Some(AgentRecord::Error(reply))) => {
                    Err(RemoteError::Failed { op: "write", reply })
                }
                Ok(Some(_)) => Err(protocol("write", "unexpected record")),
                Ok(None) => Err(protocol("write", "no reply")),
                Err(err) => Err(self.stream_error("write", err)),
            }
        };
        tokio::pin!(upload);
        tokio::pin!(reply);
        tokio::select! {
            res = &mut upload => {
                let sent = res?;
                // The host answers within the deadline once all is sent.
                let written = self.with_deadline("write", reply).await??;
                if written != sent {
                    return Err(protocol("write", "the agent wrote a different length"));
                }
                Ok(written)
            }
            res = &mut reply => {
                // The agent answered before the upload ended: an error.
                res.and_then(|_| Err(protocol("write", "reply before the end of the data")))
            }
        }
    }

    /// Copies a local file to the host.
    pub async fn copy_to(
        &self,
        local: &Path,
        remote: &str,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<u64, RemoteError> {
        let local_err = |source| RemoteError::Local {
            path: local.to_path_buf(),
            source,
        };
        let mut file = tokio::fs::File::open(local).await.map_err(local_err)?;
        let meta = file.metadata().await.map_err(local_err)?;
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        self.write_from(remote, &mut file, meta.len(), Some(mode), progress)
            .await
    }

    /// Copies a file from the host to a local path (written beside it and
    /// renamed at the end).
    pub async fn copy_from(
        &self,
        remote: &str,
        local: &Path,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<u64, RemoteError> {
        let local_err = |source| RemoteError::Local {
            path: local.to_path_buf(),
            source,
        };
        let name = local
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = local.with_file_name(format!(".{name}.kitepipe-{:016x}", rand::random::<u64>()));
        let file = tokio::fs::File::create(&temp).await.map_err(local_err)?;
        // Removes the partial file however the copy ends: an error, a
        // timeout, or this future dropped (the user interrupted kitepipe).
        let mut guard = TempFile(Some(temp.clone()));
        let mut out = tokio::io::BufWriter::with_capacity(DATA_CHUNK, file);
        let res = self.read_into(remote, &mut out, progress).await;
        drop(out);
        match res {
            Ok(n) => {
                tokio::fs::rename(&temp, local).await.map_err(local_err)?;
                guard.0 = None;
                Ok(n)
            }
            Err(err) => {
                drop(guard);
                Err(match err {
                    RemoteError::Local { source, .. } => local_err(source),
                    other => other,
                })
            }
        }
    }

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

/// A temporary file removed when dropped, unless taken.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            // Dropping happens off the async path at most once per copy; a
            // blocking unlink is the only way to clean up in Drop.
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A byte sink that refuses to grow past [`MAX_COLLECT_BYTES`].
struct Bounded(Vec<u8>);

impl AsyncWrite for Bounded {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.0.len() + buf.len() > MAX_COLLECT_BYTES {
            return std::task::Poll::Ready(Err(std::io::ErrorKind::FileTooLarge.into()));
        }
        self.0.extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
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

/// A command to run on the host (no shell: the program and its arguments).
#[derive(Debug, Clone, Default)]
pub struct RemoteCommand {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    env_clear: bool,
    cwd: Option<String>,
    stdin: bool,
    tty: Option<TtySize>,
}

impl RemoteCommand {
    /// A command running `program`.
    pub fn new(program: impl Into<String>) -> RemoteCommand {
        RemoteCommand {
            argv: vec![program.into()],
            ..RemoteCommand::default()
        }
    }

    /// Appends an argument.
    pub fn arg(mut self, arg: impl Into<String>) -> RemoteCommand {
        self.argv.push(arg.into());
        self
    }

    /// Appends arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> RemoteCommand {
        self.argv.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> RemoteCommand {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Starts from an empty environment.
    pub fn env_clear(mut self) -> RemoteCommand {
        self.env_clear = true;
        self
    }

    /// Sets the working directory.
    pub fn cwd(mut self, dir: impl Into<String>) -> RemoteCommand {
        self.cwd = Some(dir.into());
        self
    }

    /// Forwards stdin (write it through [`Exec::input`]); otherwise the
    /// command reads `/dev/null`.
    pub fn stdin(mut self, forward: bool) -> RemoteCommand {
        self.stdin = forward;
        self
    }

    /// Runs the command on a pseudo-terminal of this size.
    pub fn tty(mut self, rows: u16, cols: u16) -> RemoteCommand {
        self.tty = Some(TtySize { rows, cols });
        self
    }

    /// The program and its arguments.
    pub fn argv(&self) -> &[String] {
        &self.argv
    }
}

/// A running remote command.
#[derive(Debug)]
pub struct Exec {
    /// Its process id on the host.
    pub pid: u32,
    /// Its stdin, signals and terminal size.
    pub input: ExecInput,
    /// Its output and exit.
    pub output: ExecOutput,
}

/// The sending half of an [`Exec`]. Dropping both halves before the
/// command exits kills it.
pub struct ExecInput {
    stream: OpStream,
    closed: bool,
}

impl std::fmt::Debug for ExecInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecInput")
            .field("closed", &self.closed)
            .finish()
    }
}

impl ExecInput {
    /// Writes to the command's stdin. Not cancel-safe.
    pub async fn write(&mut self, data: Bytes) -> std::io::Result<()> {
        for chunk in data.chunks(DATA_CHUNK) {
            let record = ClientRecord::Data(Bytes::copy_from_slice(chunk));
            self.stream.send(client_bytes(&record)).await?;
        }
        Ok(())
    }

    /// Closes the command's stdin (it reads EOF). Signals may still follow.
    pub async fn close(&mut self) -> std::io::Result<()> {
        if !self.closed {
            self.closed = true;
            self.stream.send(client_bytes(&ClientRecord::Eof)).await?;
        }
        Ok(())
    }

    /// Sends a signal to the command (e.g. 2 for INT).
    pub async fn signal(&mut self, signal: i32) -> std::io::Result<()> {
        self.stream
            .send(client_bytes(&ClientRecord::Signal(signal)))
            .await
    }

    /// Tells a command on a terminal its new size.
    pub async fn resize(&mut self, rows: u16, cols: u16) -> std::io::Result<()> {
        self.stream
            .send(client_bytes(&ClientRecord::Resize(TtySize { rows, cols })))
            .await
    }

    /// Ends the input: stdin EOF and FIN (no more signals).
    pub async fn finish(&mut self) -> std::io::Result<()> {
        self.close().await?;
        self.stream.finish().await
    }
}

/// The receiving half of an [`Exec`].
pub struct ExecOutput {
    reader: RecordReader,
    mux: Mux,
    done: bool,
}

impl std::fmt::Debug for ExecOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecOutput")
            .field("done", &self.done)
            .finish()
    }
}

/// Something a running command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// Bytes it wrote to stdout (or its terminal).
    Stdout(Bytes),
    /// Bytes it wrote to stderr.
    Stderr(Bytes),
    /// It ended; last event.
    Exit(ExitReport),
}

impl ExecOutput {
    /// The next output or the exit. Cancel-safe.
    pub async fn next(&mut self) -> Result<ExecEvent, RemoteError> {
        if self.done {
            return Err(protocol("exec", "output read after the exit"));
        }
        match self.reader.next_agent().await {
            Ok(Some(AgentRecord::Stdout(data))) => Ok(ExecEvent::Stdout(data)),
            Ok(Some(AgentRecord::Stderr(data))) => Ok(ExecEvent::Stderr(data)),
            Ok(Some(AgentRecord::Done(json))) => {
                self.done = true;
                Ok(ExecEvent::Exit(decode("exec", &json)?))
            }
            Ok(Some(AgentRecord::Error(reply))) => Err(RemoteError::Failed { op: "exec", reply }),
            Ok(Some(_)) => Err(protocol("exec", "unexpected record")),
            Ok(None) => Err(protocol("exec", "output ended without an exit")),
            Err(err) => Err(stream_error(&self.mux, "exec", err)),
        }
    }
}

/// What a finished command produced.
#[derive(Debug, Clone)]
pub struct Output {
    /// How it ended.
    pub status: ExitReport,
    /// All its stdout.
    pub stdout: Vec<u8>,
    /// All its stderr.
    pub stderr: Vec<u8>,
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

async fn read_up_to<R: AsyncRead + Unpin>(
    src: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> std::io::Result<usize> {
    let start = buf.len();
    while buf.len() - start < max {
        let n = (&mut *src)
            .take((max - (buf.len() - start)) as u64)
            .read_buf(buf)
            .await?;
        if n == 0 {
            break;
        }
    }
    Ok(buf.len() - start)
}
