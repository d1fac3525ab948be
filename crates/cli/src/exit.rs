//! Exit codes of the `kitepipe` command, in one place.
//!
//! | code | meaning |
//! |------|---------|
//! | 0    | success (a relay or connector stopped by a signal exits 0) |
//! | 1    | runtime failure (cannot bind, cannot read the certificate, ...) |
//! | 2    | usage or configuration error (bad flag, bad config value, a `ca` command refusing to overwrite or naming an unknown certificate) |
//! | 3    | `kitepipe call`: the event's reply was not a 2xx status (the body is printed all the same) |
//! | 4    | `kitepipe remote`: the host failed the operation (no such file, permission denied, ...; or its reply passed a bound of the client, e.g. a listing too long); the remote cause is printed |
//! | 124  | `kitepipe remote`: a deadline passed (connect, bootstrap, an operation) |
//! | 130, 143 | `kitepipe remote HOST cp`: interrupted by SIGINT or SIGTERM (the partial download was removed) |
//! | 126, 127 | `kitepipe remote HOST exec`: the command could not be run (126: not permitted, 127: not found) |
//! | 255  | `kitepipe remote`: the host could not be reached or the agent not started (ssh failed, unsupported host, sudo needs a password), or the session was lost |
//!
//! `kitepipe remote HOST exec` exits with the remote command's own status
//! (128 + N when signal N killed it), as ssh does.

/// Success.
pub(crate) const OK: i32 = 0;
/// A runtime failure.
pub(crate) const RUNTIME: i32 = 1;
/// Bad arguments or configuration (clap uses 2 as well).
pub(crate) const USAGE: i32 = 2;

/// `kitepipe call` got a reply whose status is not 2xx.
pub(crate) const EVENT_FAILED: i32 = 3;

/// `kitepipe remote`: the host failed the operation.
pub(crate) const REMOTE_FAILED: i32 = 4;
/// `kitepipe remote`: a deadline passed.
pub(crate) const TIMEOUT: i32 = 124;
/// `kitepipe remote HOST exec`: the command exists but may not be run.
pub(crate) const EXEC_NOT_PERMITTED: i32 = 126;
/// `kitepipe remote HOST exec`: no such command.
pub(crate) const EXEC_NOT_FOUND: i32 = 127;
/// `kitepipe remote`: no session (ssh failed, the agent could not start,
/// the session was lost).
pub(crate) const UNREACHABLE: i32 = 255;

/// A usage error described by text (no config error behind it).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UsageText(pub(crate) String);

/// Marks an error as a usage/configuration error.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub(crate) struct UsageError(#[from] pub(crate) kitepipe::config::ConfigError);

/// Wraps a config error so [`classify`] maps it to [`USAGE`].
pub(crate) fn usage(err: kitepipe::config::ConfigError) -> anyhow::Error {
    anyhow::Error::new(UsageError(err))
}

/// The exit code for an error, found by walking its chain for a typed cause.
pub(crate) fn classify(err: &anyhow::Error) -> i32 {
    let usage = err.chain().any(|cause| {
        cause.downcast_ref::<UsageError>().is_some()
            || cause.downcast_ref::<UsageText>().is_some()
            || cause
                .downcast_ref::<kitepipe::config::ConfigError>()
                .is_some()
            || cause
                .downcast_ref::<kitepipe::pki::CaError>()
                .is_some_and(kitepipe::pki::CaError::is_usage)
    });
    if usage {
        return USAGE;
    }
    for cause in err.chain() {
        if let Some(err) = cause.downcast_ref::<kitepipe::remote::RemoteError>() {
            return remote_code(err);
        }
        if let Some(err) = cause.downcast_ref::<kitepipe::remote::ConnectError>() {
            return match err {
                kitepipe::remote::ConnectError::Timeout { .. } => TIMEOUT,
                _ => UNREACHABLE,
            };
        }
    }
    RUNTIME
}

fn remote_code(err: &kitepipe::remote::RemoteError) -> i32 {
    use kitepipe::remote::RemoteError;
    match err {
        RemoteError::Failed { .. } | RemoteError::TooLarge { .. } => REMOTE_FAILED,
        RemoteError::Timeout { .. } => TIMEOUT,
        RemoteError::Local { .. } => RUNTIME,
        RemoteError::SessionLost { .. }
        | RemoteError::Aborted { .. }
        | RemoteError::Protocol { .. } => UNREACHABLE,
    }
}
