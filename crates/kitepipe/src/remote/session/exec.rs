//! Commands on the host: [`Session::exec`] (streaming), `output`
//! (collected), `spawn` (detached) and `kill`, and the halves of a running
//! [`Exec`].

use bytes::Bytes;
use kitepipe_proto::remote::{
    AgentRecord, ClientRecord, DATA_CHUNK, ExecHead, ExecOp, ExitReport, KillOp, RemoteOp, SpawnOp,
    Spawned, TtySize,
};

use super::{MAX_COLLECT_BYTES, RemoteError, Session, decode, protocol, stream_error};
use crate::link::Mux;
use crate::remote::stream::{OpStream, RecordReader, client_bytes};

impl Session {
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
