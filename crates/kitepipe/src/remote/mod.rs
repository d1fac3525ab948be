//! Remote operations: run commands and file operations on a host, through
//! an agent that speaks the link protocol over any byte stream.
//!
//! Start at `session/` (the client's library API, [`Session`]: `mod.rs`
//! opens it [`over`](Session::over) any byte stream or through
//! [`ssh`](Session::ssh) and holds the errors; `exec.rs`, `fs.rs` and
//! `forward.rs` the operations: `exec`, `spawn`, `kill`, file operations,
//! `copy_to`, `copy_from` and `forward`), `connect.rs` (the session's and
//! ssh's options, and why starting one failed) and `relayed.rs`
//! ([`Session::via_gateway`]: the same through a relay's gateway). Then
//! [`agent`] (the other side: serves each operation stream; `exec.rs`,
//! `exec_tty.rs`, `fs.rs` and `forward.rs` hold the operations,
//! `process.rs` what the two kinds of `exec` share, `reply.rs` how an
//! operation ends or fails, `policy.rs` what a connector allows relayed
//! operations), and `bootstrap.rs` (the POSIX sh script and the `ssh`
//! invocation that start the agent with nothing installed on the host; it
//! hands the session the ssh process's pipes). `stream.rs` reads and
//! writes the records of one operation stream, `text.rs` escapes the
//! host's words for a terminal.
//!
//! ```no_run
//! use kitepipe::remote::{RemoteCommand, Session, SshOptions};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let session = Session::ssh(SshOptions::new("user@host")).await?;
//! let out = session.output(&RemoteCommand::new("uptime")).await?;
//! print!("{}", String::from_utf8_lossy(&out.stdout));
//! # Ok(())
//! # }
//! ```
//!
//! Wire format: [`kitepipe_proto::remote`]; one stream per operation, so
//! operations run concurrently and independently over one session.
//!
//! remote/ never listens on a public socket (port forwarding binds where
//! the caller says, loopback by default) and knows nothing of kites or
//! relays: the agent is handed a byte stream or streams of a link, and
//! the session is handed a byte stream or a link.

pub mod agent;
mod bootstrap;
mod connect;
mod exec;
mod exec_tty;
mod forward;
mod fs;
mod policy;
mod process;
mod relayed;
mod reply;
mod session;
mod stream;
mod text;

pub use connect::{
    ConnectError, DEFAULT_CONNECT_TIMEOUT, DEFAULT_OP_TIMEOUT, SessionOptions, SshOptions,
};
pub use exec_tty::pty_child;
pub use kitepipe_proto::remote::{
    AgentHello, DirEntry, ErrorKind, ErrorReply, ExitReport, FileKind, FileStat, TtySize,
};
pub use session::{
    Exec, ExecEvent, ExecInput, ExecOutput, ForwardHandle, MAX_COLLECT_BYTES, MAX_LS_BYTES,
    MAX_LS_ENTRIES, Output, RemoteCommand, RemoteError, Session,
};
pub use text::{escape, escape_bytes, json as terminal_json};

#[cfg(test)]
mod tests;
