//! Configuration: raw (serde, from TOML and flags) -> validated.
//!
//! `Raw*Config` mirror the TOML files and the command-line flags (same
//! names, `-` in flags is `_` in TOML). `TryFrom` turns them into
//! [`RelayConfig`] and [`ConnectorConfig`], whose fields are parsed and
//! checked; only those leave this room. Nothing here binds or dials.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use kitepipe_proto::kite::{self, KiteProto, KiteRef};
use kitepipe_proto::message::RemoteClass;
use serde::Deserialize;

use crate::pki::{
    AllowRule, CrlSource, Fingerprint, IDENTITY_CA_FILE, IdentityPattern, IdentityRules,
    KitePattern, NodeIdentity, PkiError, RelayTrust, RemoteRule, Secret, ca, protect_secret_file,
    read_secret_file,
};
use kitepipe_proto::frame::DEFAULT_HEARTBEAT;

mod connector;
mod events;
mod identity;
mod parse;
mod relay;
mod remote;
#[cfg(test)]
mod tests;

pub use connector::*;
pub use events::*;
pub use identity::*;
use parse::*;
pub use relay::*;
pub use remote::*;

/// Why a configuration is not acceptable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The TOML file is not valid.
    #[error("invalid config file {path}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: toml::de::Error,
    },
    /// A value is invalid.
    #[error("invalid {what} {value:?}: {why}")]
    Invalid {
        /// Which setting.
        what: &'static str,
        /// The value given.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// A required setting is missing.
    #[error("{0}")]
    Missing(&'static str),
    /// A file of secrets (`--secret-file`, `--domain-file`) could not be read.
    #[error("cannot read the secret file {}", path.display())]
    SecretFile {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: PkiError,
    },
    /// The connector's certificate and key could not be loaded.
    #[error("cannot load the connector identity ({})", path.display())]
    Identity {
        /// The identity directory or certificate file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: PkiError,
    },
}

fn merge_vec<T>(base: &mut Vec<T>, over: Vec<T>) {
    if !over.is_empty() {
        *base = over;
    }
}

fn merge_opt<T>(base: &mut Option<T>, over: Option<T>) {
    if over.is_some() {
        *base = over;
    }
}

fn protect_config_file(path: &std::path::Path) -> Result<(), ConfigError> {
    protect_secret_file(path).map_err(|source| ConfigError::SecretFile {
        path: path.to_path_buf(),
        source,
    })
}
