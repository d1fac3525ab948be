//! What a connector allows the remote operations its relays pass on:
//! who asked ([`Origin`]), and the [`NodePolicy`] that applies to a relayed
//! operation (kinds of file operation, protected paths, the environment
//! and process slots of relayed commands).

use std::sync::Arc;

use kitepipe_proto::remote::{ErrorKind, ErrorReply, RemoteOp};
use tokio::sync::Semaphore;

use super::fs::Protected;

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
pub(crate) const RELAYED_ENV_INHERITED: &[&str] = &[
    "PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER", "LOGNAME", "SHELL",
];

/// `PATH` of relayed commands when the connector has none.
const DEFAULT_RELAYED_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Who asked for an operation, which decides how it runs.
#[derive(Clone, Default)]
pub(crate) enum Origin {
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
pub(crate) struct NodePolicy {
    /// File operations that change anything are allowed (`fs`); false:
    /// read, ls and stat only (`fs-read`).
    pub(crate) fs_write: bool,
    /// Paths no relayed file operation reaches.
    pub(crate) protected: Protected,
    /// The environment relayed commands start from.
    pub(crate) env: Vec<(String, String)>,
    /// Slots of running relayed processes ([`MAX_RELAYED_PROCESSES`]).
    processes: Arc<Semaphore>,
}

impl NodePolicy {
    /// A policy; `env` is the connector's environment, looked up by name
    /// (only [`RELAYED_ENV_INHERITED`] is read).
    pub(crate) fn new(
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
    pub(crate) fn admit(&self, op: &RemoteOp) -> Result<(), ErrorReply> {
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
pub(crate) fn relayed_env(env: &dyn Fn(&str) -> Option<String>) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = RELAYED_ENV_INHERITED
        .iter()
        .filter_map(|key| env(key).map(|value| (key.to_string(), value)))
        .collect();
    if !vars.iter().any(|(key, _)| key == "PATH") {
        vars.push(("PATH".into(), DEFAULT_RELAYED_PATH.into()));
    }
    vars
}
