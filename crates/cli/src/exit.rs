//! Exit codes of the `kitepipe` command, in one place.
//!
//! | code | meaning |
//! |------|---------|
//! | 0    | success (a relay or connector stopped by a signal exits 0) |
//! | 1    | runtime failure (cannot bind, cannot read the certificate, ...) |
//! | 2    | usage or configuration error (bad flag, bad config value, a `ca` command refusing to overwrite or naming an unknown certificate) |
//! | 3    | `kitepipe call`: the event's reply was not a 2xx status (the body is printed all the same) |

/// Success.
pub(crate) const OK: i32 = 0;
/// A runtime failure.
pub(crate) const RUNTIME: i32 = 1;
/// Bad arguments or configuration (clap uses 2 as well).
pub(crate) const USAGE: i32 = 2;

/// `kitepipe call` got a reply whose status is not 2xx.
pub(crate) const EVENT_FAILED: i32 = 3;

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
    if usage { USAGE } else { RUNTIME }
}
