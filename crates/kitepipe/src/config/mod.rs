//! Configuration: raw (flags, `KITEPIPE_*` variables, TOML) -> validated.
//!
//! Each setting is declared once, as a field of a `Raw*Config` struct that
//! derives both `clap::Args` (the flag `--tcp-ports` and its variable
//! `KITEPIPE_TCP_PORTS`) and serde (the TOML key `tcp_ports`). `load`
//! lays the flags (clap already put each flag over its variable) over the
//! file's table key by key, so adding a setting is adding a field.
//! `TryFrom` turns the result into [`RelayConfig`] and [`ConnectorConfig`],
//! whose fields are parsed and checked; only those leave this room.
//! Nothing here binds or dials.
//!
//! Files: `relay.rs`, `connector.rs` (with `[[kite]]`), `events.rs` (the
//! event settings both share), `identity.rs` (client CA, `[[allow]]`,
//! reload), `remote.rs` (`[[remote]]`), `parse.rs` (the small parsers).

mod admin;
mod connector;
mod events;
mod identity;
mod parse;
mod relay;
mod remote;

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::pki::{PkiError, protect_secret_file};

pub use admin::{
    AccessLogFormat, AccessLogSettings, AdminSettings, DEFAULT_ADMIN_ADDR, RawAccessLogConfig,
    RawAdminConfig,
};
pub use connector::{
    ConnectorConfig, KiteTarget, LinkProtocol, RawConnectorConfig, RawKite, RawKiteSpec,
    RelayTarget, RemoteFsConfig,
};
pub use events::{
    DEFAULT_HANDLER_PATH, EventConfig, GATEWAY_TOKEN_FILE, GatewayAddr, HANDLER_ENV_INHERITED,
    RawEventConfig, UpstreamUrl, handler_env, parse_gateway,
};
pub use identity::{IdentityConfig, RawAllowRule};
pub use relay::{AcmeChallenge, AcmeConfig};
pub use relay::{
    Domain, IdentitySource, ListenerConfig, RawRelayConfig, RelayConfig, RelayTlsSource,
    TlsCertFiles, default_state_dir,
};
pub use remote::RawRemoteRule;

/// What a secret looks like in `kitepipe config check` output.
pub(crate) const REDACTED: &str = "<redacted>";

/// Why a configuration is not acceptable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML file could not be read.
    #[error("cannot read config file {}", path.display())]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The TOML file is not valid.
    #[error("invalid config file {}", path.display())]
    Parse {
        /// File.
        path: PathBuf,
        /// Cause: where and what, with the values of secret settings
        /// replaced (toml's own message quotes the offending line).
        #[source]
        source: TomlError,
    },
    /// The TOML file holds a key that is no setting.
    #[error(
        "unknown key {key:?} in config file {}: the keys are the long flags with _ for - \
         (see --help)",
        path.display()
    )]
    UnknownKey {
        /// The key, dotted when nested.
        key: String,
        /// File.
        path: PathBuf,
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

/// A TOML error as shown to people: line, column and message, with the
/// values of secret settings replaced by `<redacted>`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TomlError(String);

impl TomlError {
    /// `text` is the file the error's position is in; `None` when the
    /// text was put together here (positions would mean nothing to anyone).
    fn new(text: Option<&str>, err: &toml::de::Error, secrets: &[String]) -> TomlError {
        let mut message = err.message().trim().to_string();
        for secret in secrets.iter().filter(|s| !s.is_empty()) {
            message = message.replace(secret.as_str(), REDACTED);
        }
        match err.span().zip(text) {
            Some((span, text)) => {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |at| at + 1) + 1;
                TomlError(format!("line {line}, column {column}: {message}"))
            }
            None => TomlError(message),
        }
    }
}

/// A raw config that [`load`] can lay flags over a file for: its fields
/// are the settings (clap arguments and TOML keys alike).
pub(crate) trait Layered: clap::Args + Serialize + DeserializeOwned {
    /// Keys of the file that are no flag (tables such as `[[allow]]`).
    const TOML_ONLY: &'static [&'static str];
    /// Keys whose values are secrets: a file holding one is protected like
    /// a secret file, and their values are redacted in messages and in
    /// `kitepipe config check`.
    const SECRET_KEYS: &'static [&'static str];
    /// Those of [`Layered::SECRET_KEYS`] whose values are
    /// `PROTOS:NAME:SECRET`: only the secret part is redacted.
    const SECRET_SPECS: &'static [&'static str];
    /// Groups of keys that are one setting: any of them given as a flag (or
    /// variable) replaces all of them from the file.
    const ONE_SETTING: &'static [&'static [&'static str]];

    /// Looks at the file's table once it is known to be valid (e.g. to warn
    /// about a deprecated form).
    fn check_file(_table: &toml::Table, _path: &Path) {}
}

/// Every key the file may hold: the ids of the clap arguments (the field
/// names) and the TOML-only tables.
pub(crate) fn known_keys<T: Layered>() -> Vec<String> {
    T::augment_args(clap::Command::new("settings"))
        .get_arguments()
        .map(|arg| arg.get_id().to_string())
        .chain(T::TOML_ONLY.iter().map(|key| key.to_string()))
        .collect()
}

/// The settings of `flags` (flags and environment, as clap resolved them)
/// laid over those of the TOML `file`, then over the defaults of `T`:
/// every setting given as a flag or variable wins over the file's, key by
/// key; a list given as a flag replaces the file's list.
pub(crate) fn load<T: Layered>(file: Option<&Path>, flags: &T) -> Result<T, ConfigError> {
    let mut table = match file {
        Some(path) => read_file::<T>(path)?,
        None => toml::Table::new(),
    };
    let over = settings_table(flags).map_err(|err| ConfigError::Invalid {
        what: "setting",
        value: String::new(),
        why: err.to_string(),
    })?;
    for group in T::ONE_SETTING {
        if group.iter().any(|key| over.contains_key(*key)) {
            for key in *group {
                table.remove(*key);
            }
        }
    }
    table.extend(over);
    let secrets = secret_values(&table, T::SECRET_KEYS);
    // Typed from text, like the file was: one deserializer for every raw
    // config (a second one, from `toml::Value`, cost ~70 KiB of machine
    // code, which an idle process keeps resident).
    let text = toml::to_string(&table).map_err(|err| ConfigError::Invalid {
        what: "setting",
        value: String::new(),
        why: err.to_string(),
    })?;
    toml::from_str(&text).map_err(|err: toml::de::Error| ConfigError::Parse {
        path: file.map_or_else(|| PathBuf::from("(flags)"), Path::to_path_buf),
        source: TomlError::new(None, &err, &secrets),
    })
}

/// The settings given in `raw` as a TOML table: unset options and empty
/// lists are left out (they give nothing to lay over another layer). Fails
/// only on a path that is not UTF-8, which TOML cannot hold either.
pub(crate) fn settings_table<T: Serialize>(raw: &T) -> Result<toml::Table, serde_json::Error> {
    // Through JSON: `None` becomes a null there, which TOML has no word for.
    Ok(match json_to_toml(serde_json::to_value(raw)?) {
        Some(toml::Value::Table(table)) => table
            .into_iter()
            .filter(|(_, value)| value.as_array().is_none_or(|items| !items.is_empty()))
            .collect(),
        _ => toml::Table::new(),
    })
}

fn json_to_toml(value: serde_json::Value) -> Option<toml::Value> {
    use serde_json::Value as Json;
    Some(match value {
        Json::Null => return None,
        Json::Bool(b) => toml::Value::Boolean(b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64()?),
        },
        Json::String(s) => toml::Value::String(s),
        Json::Array(items) => {
            toml::Value::Array(items.into_iter().filter_map(json_to_toml).collect())
        }
        Json::Object(map) => toml::Value::Table(
            map.into_iter()
                .filter_map(|(key, value)| Some((key, json_to_toml(value)?)))
                .collect(),
        ),
    })
}

/// Reads and checks a TOML file: syntax, unknown keys, the type of every
/// value; protects it if it holds a secret.
fn read_file<T: Layered>(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let parse_error = |err: toml::de::Error, secrets: &[String]| ConfigError::Parse {
        path: path.to_path_buf(),
        source: TomlError::new(Some(&text), &err, secrets),
    };
    let table: toml::Table = toml::from_str(&text).map_err(|err| parse_error(err, &[]))?;
    let known = known_keys::<T>();
    if let Some(key) = table.keys().find(|key| !known.contains(key)) {
        return Err(ConfigError::UnknownKey {
            key: key.clone(),
            path: path.to_path_buf(),
        });
    }
    let secrets = secret_values(&table, T::SECRET_KEYS);
    // Typed once from the text, so that a wrong value is reported with its
    // line (and an unknown key inside a table with its name).
    toml::from_str::<T>(&text).map_err(|err| parse_error(err, &secrets))?;
    if T::SECRET_KEYS.iter().any(|key| table.contains_key(*key)) {
        protect_config_file(path)?;
    }
    T::check_file(&table, path);
    Ok(table)
}

/// The strings under `keys` in `table` (and in lists there), and the
/// secret parts of `PROTOS:NAME:SECRET` among them.
fn secret_values(table: &toml::Table, keys: &[&str]) -> Vec<String> {
    let mut secrets = Vec::new();
    for key in keys {
        let values = match table.get(*key) {
            Some(toml::Value::String(text)) => vec![text.clone()],
            Some(toml::Value::Array(items)) => items
                .iter()
                .filter_map(|item| item.as_str().map(String::from))
                .collect(),
            _ => Vec::new(),
        };
        for value in values {
            if let Some(secret) = value.splitn(3, ':').nth(2) {
                secrets.push(secret.to_string());
            }
            secrets.push(value);
        }
    }
    // Longest first, so a whole value is replaced before its secret part.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets
}

/// The effective configuration as TOML, for `kitepipe config check`: every
/// setting of `raw` (defaults already filled in), the secret ones
/// redacted, and a comment for each setting that is not set.
pub(crate) fn effective_toml<T: Layered>(raw: &T) -> String {
    // `raw` came through `load`, which serialized the same values already.
    let mut table = settings_table(raw).unwrap_or_default();
    for key in T::SECRET_KEYS {
        let spec = T::SECRET_SPECS.contains(key);
        let redact = |value: &mut toml::Value| {
            if let toml::Value::String(text) = value {
                *text = match text.splitn(3, ':').collect::<Vec<_>>()[..] {
                    // `PROTOS:NAME:SECRET` keeps what it is for.
                    [protos, name, _] if spec => format!("{protos}:{name}:{REDACTED}"),
                    _ => REDACTED.to_string(),
                };
            }
        };
        match table.get_mut(*key) {
            Some(toml::Value::Array(items)) => items.iter_mut().for_each(redact),
            Some(value) => redact(value),
            None => {}
        }
    }
    // The plain keys, then the unset ones as comments, then the tables
    // (`[[kite]]`, `[[allow]]`, ...), so that no comment lands in a table.
    let (tables, plain): (toml::Table, toml::Table) =
        table.clone().into_iter().partition(|(_, value)| {
            value
                .as_array()
                .is_some_and(|items| items.iter().all(toml::Value::is_table))
        });
    let mut out = toml::to_string(&plain).unwrap_or_default();
    for key in known_keys::<T>() {
        if !table.contains_key(&key) {
            out.push_str(&format!("# {key}: not set\n"));
        }
    }
    if !tables.is_empty() {
        out.push('\n');
        out.push_str(&toml::to_string(&tables).unwrap_or_default());
    }
    out
}

fn protect_config_file(path: &Path) -> Result<(), ConfigError> {
    protect_secret_file(path).map_err(|source| ConfigError::SecretFile {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests;
