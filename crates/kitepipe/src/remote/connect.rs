//! How a session is reached: its settings ([`SessionOptions`]), those of
//! starting it through `ssh` ([`SshOptions`]), and why starting one failed
//! ([`ConnectError`]). Shared by the session, the SSH bootstrap and the
//! relayed session; none of them is needed to read this file.

use std::path::PathBuf;
use std::time::Duration;

use super::text::escape;
use crate::link::LinkClosed;

/// Default deadline for the whole start: SSH connect, authentication, the
/// transfer of the agent and its hello. A healthy loopback start takes
/// about 0.3 s, a distant host a few seconds.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Default deadline of one metadata operation (`stat`, `ls`, `mkdir`, ...):
/// generous for a slow disk, short enough that a hung file system (a dead
/// NFS mount) ends in an error instead of a hang.
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(60);

/// Settings of a session.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// The link's heartbeat: an agent silent this long is gone.
    pub heartbeat: Duration,
    /// How long to wait for the agent's hello.
    pub hello_timeout: Duration,
    /// Deadline of metadata operations (the whole operation), and of the
    /// host's first reply to `exec` and `connect`; a `read`, `write` or
    /// copy fails when the host makes no progress for this long. A running
    /// command's output and a forwarded connection have no deadline (the
    /// heartbeat still ends them if the session dies).
    pub op_timeout: Duration,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            heartbeat: crate::link::DEFAULT_HEARTBEAT,
            hello_timeout: Duration::from_secs(30),
            op_timeout: DEFAULT_OP_TIMEOUT,
        }
    }
}

/// How to reach a host with `ssh` and start the agent there.
#[derive(Debug, Clone)]
pub struct SshOptions {
    /// `[user@]host` or a `Host` alias of the ssh config.
    pub destination: String,
    /// The ssh client to run.
    pub ssh_program: PathBuf,
    /// Extra arguments for ssh before the destination (`-F FILE`, `-p PORT`,
    /// `-i KEY`, `-o Option=value`, ...).
    pub ssh_args: Vec<String>,
    /// Jump host(s), as for `ssh -J`.
    pub jump: Option<String>,
    /// Run the agent as root with `sudo -n` (fails clearly if sudo wants a password).
    pub sudo: bool,
    /// Keep the agent on the host (keyed by its hash) to skip the transfer next time.
    pub cache: bool,
    /// Deadline for the whole start (connect, transfer, hello).
    pub connect_timeout: Duration,
    /// Settings of the session once started.
    pub session: SessionOptions,
    /// The agent executable to push (default: this program).
    pub agent_binary: Option<PathBuf>,
    /// The agent's log filter (its log goes to ssh's stderr).
    pub agent_log: String,
}

impl SshOptions {
    /// Options for `destination` with the defaults.
    pub fn new(destination: impl Into<String>) -> SshOptions {
        SshOptions {
            destination: destination.into(),
            ssh_program: PathBuf::from("ssh"),
            ssh_args: Vec::new(),
            jump: None,
            sudo: false,
            cache: false,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            session: SessionOptions::default(),
            agent_binary: None,
            agent_log: "warn".into(),
        }
    }
}

/// Why a session could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The ssh client could not be started.
    #[error("cannot run {}: {source}", program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The agent executable could not be read.
    #[error("cannot read the agent executable {}: {source}", path.display())]
    AgentBinary {
        /// Its path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// ssh failed: host unreachable, authentication refused, host key
    /// mismatch; ssh's message says which.
    #[error("ssh failed: {}", summary(stderr))]
    Ssh {
        /// ssh's stderr.
        stderr: String,
    },
    /// The host cannot run this agent (another system or machine).
    #[error("{}", escape(message))]
    Unsupported {
        /// The bootstrap's message.
        message: String,
    },
    /// The bootstrap could not run on the host (a tool or a writable
    /// directory is missing).
    #[error("{}", escape(message))]
    Bootstrap {
        /// The bootstrap's message.
        message: String,
    },
    /// `--sudo` was asked and sudo needs a password.
    #[error("{}", escape(message))]
    SudoPassword {
        /// The bootstrap's message.
        message: String,
    },
    /// The agent (or the remote shell) exited before serving.
    #[error(
        "the agent exited with status {status} before serving: {}",
        summary(stderr)
    )]
    AgentExited {
        /// Exit status of ssh (that of the remote command).
        status: i32,
        /// ssh's stderr (the remote command's stderr included).
        stderr: String,
    },
    /// The link to the agent closed before it said hello.
    #[error("the agent's link closed before it was ready: {0}")]
    AgentGone(LinkClosed),
    /// A step did not finish within the deadline.
    #[error("timed out after {}s {stage}{}", after.as_secs_f64(), if stderr.is_empty() { String::new() } else { format!(" (ssh said: {})", summary(stderr)) })]
    Timeout {
        /// The deadline.
        after: Duration,
        /// What was being waited for.
        stage: &'static str,
        /// ssh's stderr so far.
        stderr: String,
    },
    /// The agent broke the protocol.
    #[error("the agent broke the protocol: {}", escape(.0))]
    Protocol(String),
    /// The relay's gateway could not be reached (`node:NAME` sessions).
    #[error("cannot reach the relay's gateway at {addr}: {source}")]
    Gateway {
        /// The gateway's address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The relay refused the session: node unknown or offline, not
    /// accepting remote operations, or not granted by the relay's rules.
    #[error("the relay refused: {} (HTTP {status})", escape(message))]
    Refused {
        /// The gateway's HTTP status.
        status: u16,
        /// The relay's reason.
        message: String,
    },
}

/// The last lines of ssh's stderr, for an error message (escaped: they
/// come from the host and ssh, and are shown to a person).
fn summary(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(3);
    let text = lines[start..]
        .iter()
        .map(|line| escape(line))
        .collect::<Vec<_>>()
        .join("; ");
    if text.is_empty() {
        "(no message)".into()
    } else {
        text
    }
}
