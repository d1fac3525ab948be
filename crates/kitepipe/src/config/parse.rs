//! The small parsers and readers the settings share.

use std::net::SocketAddr;
use std::time::Duration;

use kitepipe_proto::kite::KiteRef;

use super::ConfigError;
use crate::pki::{Secret, read_secret_file};

/// Refuses a secret below the minimum strength and warns about a weak
/// one; `masked` names it in messages without quoting it.
pub(super) fn check_secret_strength(
    secret: &Secret,
    masked: impl Fn() -> String,
) -> Result<(), ConfigError> {
    match secret.check_strength() {
        Ok(None) => Ok(()),
        Ok(Some(why)) => {
            tracing::warn!("weak secret {}: {why}", masked());
            Ok(())
        }
        Err(too_short) => Err(ConfigError::Invalid {
            what: "secret",
            value: masked(),
            why: too_short.to_string(),
        }),
    }
}

/// Reads `--secret-file`: the whole file, surrounding whitespace ignored.
pub(super) fn read_connector_secret(path: &std::path::Path) -> Result<Secret, ConfigError> {
    let text = read_secret_file(path).map_err(|source| ConfigError::SecretFile {
        path: path.to_path_buf(),
        source,
    })?;
    let secret = text.expose().trim();
    if secret.is_empty() {
        return Err(ConfigError::Invalid {
            what: "secret-file",
            value: path.display().to_string(),
            why: "the file is empty".to_string(),
        });
    }
    Ok(Secret::new(secret))
}

/// Parses `PROTO:NAME[:PORT]=TARGET`; TARGET is `host:port` or a bare port on 127.0.0.1.
pub(super) fn parse_kite_target(text: &str) -> Result<(KiteRef, String), ConfigError> {
    let invalid = |why: String| ConfigError::Invalid {
        what: "kite",
        value: text.to_string(),
        why,
    };
    let (kite, target) = text.split_once('=').ok_or_else(|| {
        invalid(
            "expected PROTO:NAME[:PORT]=TARGET, e.g. http:blog.example.net=127.0.0.1:8000".into(),
        )
    })?;
    let kite = KiteRef::parse(kite).map_err(|err| invalid(err.to_string()))?;
    let target = if target.parse::<u16>().is_ok() {
        format!("127.0.0.1:{target}")
    } else {
        target.to_string()
    };
    match target.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
        _ => return Err(invalid(format!("target {target:?} is not host:port"))),
    }
    Ok((kite, target))
}

pub(super) fn parse_socket_addr(what: &'static str, text: &str) -> Result<SocketAddr, ConfigError> {
    // A bare port means every interface.
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    text.parse().map_err(|_| ConfigError::Invalid {
        what,
        value: text.to_string(),
        why: "expected IP:PORT, e.g. 0.0.0.0:8080 (or a bare port)".into(),
    })
}

pub(super) fn parse_port_range(text: &str) -> Result<(u16, u16), ConfigError> {
    let invalid = || ConfigError::Invalid {
        what: "tcp-ports",
        value: text.to_string(),
        why: "expected LOW-HIGH, e.g. 15000-16000".into(),
    };
    let (low, high) = match text.split_once('-') {
        Some((low, high)) => (low.trim(), high.trim()),
        None => (text.trim(), text.trim()),
    };
    let low: u16 = low.parse().map_err(|_| invalid())?;
    let high: u16 = high.parse().map_err(|_| invalid())?;
    if low > high {
        return Err(invalid());
    }
    Ok((low, high))
}

/// Parses a duration such as `15s` or `500ms`, or gives `default`.
pub(super) fn parse_duration(
    what: &'static str,
    text: Option<&str>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let Some(text) = text else {
        return Ok(default);
    };
    let value = humantime::parse_duration(text).map_err(|err| ConfigError::Invalid {
        what,
        value: text.to_string(),
        why: err.to_string(),
    })?;
    if value < Duration::from_millis(100) {
        return Err(ConfigError::Invalid {
            what,
            value: text.to_string(),
            why: "must be at least 100ms".into(),
        });
    }
    Ok(value)
}
