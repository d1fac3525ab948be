//! The admin server's settings (relay and connector) and the relay's
//! access log: [`RawAdminConfig`] as written, [`AdminSettings`] and
//! [`AccessLogSettings`] validated. The server itself is
//! `crate::metrics::admin`.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::pki::{Secret, read_secret_file};

/// Shortest admin token accepted: it is the only lock on an admin port
/// beyond loopback.
pub(crate) const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// The address bare `--admin` asks for (ngrok's, which operators know);
/// if it is taken, a free port on loopback instead.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:4040";

/// The admin server's settings as written (flags, `KITEPIPE_*` variables,
/// TOML keys).
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args, Deserialize, Serialize)]
#[serde(default)]
pub struct RawAdminConfig {
    /// Serve the admin server (dashboard at /, Prometheus /metrics,
    /// /api/status) on ADDR: --admin=ADDR, or bare --admin for
    /// 127.0.0.1:4040 (a free port if that one is taken). Off unless given.
    /// Beyond loopback it needs --admin-token-file.
    #[arg(long, env = "KITEPIPE_ADMIN", value_name = "ADDR", num_args = 0..=1,
          require_equals = true, default_missing_value = DEFAULT_ADMIN_ADDR)]
    pub admin: Option<String>,
    /// File holding the admin server's token (at least 16 characters, e.g.
    /// `openssl rand -hex 16`): requests must send it as `Authorization:
    /// Bearer TOKEN`; a browser opens /?token=TOKEN once.
    #[arg(long, env = "KITEPIPE_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
}

/// The relay's access log as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args, Deserialize, Serialize)]
#[serde(default)]
pub struct RawAccessLogConfig {
    /// Write a line per visitor request (HTTP) or connection (TCP, HTTPS
    /// passed through) to FILE (appended, mode 0640), or `-` for stdout.
    #[arg(long, env = "KITEPIPE_ACCESS_LOG", value_name = "FILE|-")]
    pub access_log: Option<PathBuf>,
    /// The access log's format: common (the common log format plus the
    /// kite and the duration) or json [default: common].
    #[arg(long, env = "KITEPIPE_ACCESS_LOG_FORMAT", value_name = "FORMAT")]
    pub access_log_format: Option<String>,
}

/// A validated `--admin`.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    /// The address asked for.
    pub addr: SocketAddr,
    /// Bare `--admin`: bind a free port if the default one is taken.
    pub fallback: bool,
    /// The token requests must carry (`--admin-token-file`), if any.
    pub token: Option<Secret>,
}

/// The access log's line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLogFormat {
    /// The common log format, plus the kite and the duration.
    Common,
    /// One JSON object per line.
    Json,
}

/// A validated `--access-log`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogSettings {
    /// The file, or `None` for stdout (`-`).
    pub file: Option<PathBuf>,
    /// The line format.
    pub format: AccessLogFormat,
}

impl AdminSettings {
    /// Validates `--admin`; `None` when it is off.
    pub(crate) fn from_raw(raw: &RawAdminConfig) -> Result<Option<AdminSettings>, ConfigError> {
        let Some(text) = raw.admin.as_deref().map(str::trim) else {
            return Ok(None);
        };
        let addr: SocketAddr = text.parse().map_err(|_| ConfigError::Invalid {
            what: "admin",
            value: text.to_string(),
            why: "expected IP:PORT, e.g. 127.0.0.1:4040".into(),
        })?;
        let token = match &raw.admin_token_file {
            Some(path) => {
                let secret = read_secret_file(path).map_err(|source| ConfigError::SecretFile {
                    path: path.clone(),
                    source,
                })?;
                let token = secret.expose().trim();
                if token.len() < MIN_ADMIN_TOKEN_LEN {
                    return Err(ConfigError::Invalid {
                        what: "admin-token-file",
                        value: path.display().to_string(),
                        why: format!(
                            "the admin token needs at least {MIN_ADMIN_TOKEN_LEN} characters"
                        ),
                    });
                }
                Some(Secret::new(token))
            }
            None => None,
        };
        if !addr.ip().is_loopback() && token.is_none() {
            return Err(ConfigError::Invalid {
                what: "admin",
                value: text.to_string(),
                why: "beyond loopback, without a token: give --admin-token-file \
                      (or bind it to 127.0.0.1)"
                    .into(),
            });
        }
        Ok(Some(AdminSettings {
            addr,
            fallback: text == DEFAULT_ADMIN_ADDR,
            token,
        }))
    }
}

impl AccessLogSettings {
    /// Validates `--access-log`; `None` when it is off.
    pub(crate) fn from_raw(
        raw: &RawAccessLogConfig,
    ) -> Result<Option<AccessLogSettings>, ConfigError> {
        let format = match raw.access_log_format.as_deref().map(str::trim) {
            None | Some("common") => AccessLogFormat::Common,
            Some("json") => AccessLogFormat::Json,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    what: "access-log-format",
                    value: other.to_string(),
                    why: "expected common or json".into(),
                });
            }
        };
        Ok(raw.access_log.as_ref().map(|path| AccessLogSettings {
            file: (path.as_os_str() != "-").then(|| path.clone()),
            format,
        }))
    }
}
