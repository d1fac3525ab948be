//! Kites: a public name and protocol on the relay, served by connectors.
//!
//! Names are DNS names, lowercased; a pattern may start with `*.` to match
//! every name below that domain (`*.example.net` matches `a.example.net` and
//! `a.b.example.net`, not `example.net`).

use serde::{Deserialize, Serialize};

/// Longest kite name accepted (the DNS limit).
pub const MAX_NAME_LEN: usize = 253;

/// What a kite carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KiteProto {
    /// HTTP/1.x, routed by the Host header.
    Http,
    /// TLS, routed by SNI and passed through undecrypted.
    Https,
    /// Raw TCP on a dedicated public port of the relay.
    Tcp,
}

/// A kite as named on the wire: protocol, name, and for TCP the public port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KiteRef {
    /// Protocol.
    pub proto: KiteProto,
    /// Name or pattern, lowercase.
    pub name: String,
    /// Public port on the relay for TCP kites (0: any free port); 0 otherwise.
    #[serde(default)]
    pub port: u16,
}

/// Why a kite name or spec is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KiteError {
    /// Protocol is not one of http, https, tcp.
    #[error("unknown kite protocol {0:?} (expected http, https or tcp)")]
    UnknownProto(String),
    /// The name is empty, too long, or has characters a DNS name cannot have.
    #[error("invalid kite name {0:?}: use a DNS name like blog.example.net or *.example.net")]
    BadName(String),
    /// The port is not a number from 0 to 65535.
    #[error("invalid port {0:?}")]
    BadPort(String),
    /// A TCP kite without a port, or a port on a non-TCP kite.
    #[error("{0}")]
    Shape(&'static str),
}

impl KiteProto {
    /// All protocols, in display order.
    pub const ALL: [KiteProto; 3] = [KiteProto::Http, KiteProto::Https, KiteProto::Tcp];

    /// The protocol's lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            KiteProto::Http => "http",
            KiteProto::Https => "https",
            KiteProto::Tcp => "tcp",
        }
    }
}

impl std::fmt::Display for KiteProto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for KiteProto {
    type Err = KiteError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "http" => Ok(KiteProto::Http),
            "https" => Ok(KiteProto::Https),
            "tcp" => Ok(KiteProto::Tcp),
            _ => Err(KiteError::UnknownProto(s.to_string())),
        }
    }
}

impl KiteRef {
    /// Parses `proto:name` or, for TCP, `tcp:name:port`.
    pub fn parse(spec: &str) -> Result<KiteRef, KiteError> {
        let (proto, rest) = spec.split_once(':').ok_or(KiteError::Shape(
            "a kite is written proto:name, e.g. http:blog.example.net",
        ))?;
        let proto: KiteProto = proto.parse()?;
        let (name, port) = match (proto, rest.rsplit_once(':')) {
            (KiteProto::Tcp, Some((name, port))) => (
                name,
                port.parse::<u16>()
                    .map_err(|_| KiteError::BadPort(port.to_string()))?,
            ),
            (KiteProto::Tcp, None) => {
                return Err(KiteError::Shape(
                    "a TCP kite needs its public port: tcp:db.example.net:15432 (0 lets the relay pick)",
                ));
            }
            (_, Some(_)) => {
                return Err(KiteError::Shape(
                    "only TCP kites take a port; HTTP and HTTPS kites are routed by name",
                ));
            }
            (_, None) => (rest, 0),
        };
        Ok(KiteRef {
            proto,
            name: normalize_name(name)?,
            port,
        })
    }
}

impl std::fmt::Display for KiteRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.proto {
            KiteProto::Tcp => write!(f, "tcp:{}:{}", self.name, self.port),
            proto => write!(f, "{proto}:{}", self.name),
        }
    }
}

/// Lowercases and validates a kite name or `*.` pattern.
pub fn normalize_name(name: &str) -> Result<String, KiteError> {
    let lower = name.trim_end_matches('.').to_ascii_lowercase();
    let body = lower.strip_prefix("*.").unwrap_or(&lower);
    let ok = !body.is_empty()
        && lower.len() <= MAX_NAME_LEN
        && body.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(lower)
    } else {
        Err(KiteError::BadName(name.to_string()))
    }
}

/// True if `pattern` (a name or `*.` pattern, lowercase) covers `name` (lowercase).
pub fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            name.len() > suffix.len() + 1
                && name.ends_with(suffix)
                && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
        }
        None => pattern == name,
    }
}

/// How specific a pattern is: exact names beat wildcards, longer suffixes beat shorter.
pub fn specificity(pattern: &str) -> usize {
    match pattern.strip_prefix("*.") {
        Some(suffix) => suffix.len(),
        None => usize::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_matching() {
        let cases = [
            ("blog.example.net", "blog.example.net", true),
            ("blog.example.net", "blog.example.com", false),
            ("*.example.net", "blog.example.net", true),
            ("*.example.net", "a.b.example.net", true),
            ("*.example.net", "example.net", false),
            ("*.example.net", "badexample.net", false),
            ("*.example.net", ".example.net", false),
        ];
        for (pattern, name, expected) in cases {
            assert_eq!(name_matches(pattern, name), expected, "{pattern} vs {name}");
        }
    }

    #[test]
    fn kite_specs() {
        let ok = [
            (
                "http:Blog.Example.NET",
                KiteProto::Http,
                "blog.example.net",
                0,
            ),
            ("https:*.example.net", KiteProto::Https, "*.example.net", 0),
            (
                "tcp:db.example.net:15432",
                KiteProto::Tcp,
                "db.example.net",
                15432,
            ),
            ("tcp:db.example.net:0", KiteProto::Tcp, "db.example.net", 0),
        ];
        for (spec, proto, name, port) in ok {
            let kite = KiteRef::parse(spec).unwrap();
            assert_eq!(
                (kite.proto, kite.name.as_str(), kite.port),
                (proto, name, port)
            );
        }
        let bad = [
            "blog.example.net",
            "ftp:blog.example.net",
            "http:",
            "http:bad name",
            "http:a..b",
            "http:blog.example.net:80",
            "tcp:db.example.net",
            "tcp:db.example.net:99999",
            "http:*",
            "http:a.*.net",
        ];
        for spec in bad {
            assert!(KiteRef::parse(spec).is_err(), "{spec} should be refused");
        }
    }

    #[test]
    fn exact_names_are_more_specific_than_wildcards() {
        assert!(specificity("blog.example.net") > specificity("*.blog.example.net"));
        assert!(specificity("*.blog.example.net") > specificity("*.example.net"));
    }
}
