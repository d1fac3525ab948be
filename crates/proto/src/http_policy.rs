//! The HTTP-level rules of an http kite, as its owner writes them in a
//! `[[kite]]` table and its connector sends them with the claim: basic
//! auth, rate and connection limits, header edits, `X-Forwarded-Host`, the
//! redirect to HTTPS and how the relay speaks to the local service (HTTP/1
//! or h2c). The relay enforces them before anything reaches the link.
//!
//! This is the wire form: a connector is not trusted to send well-formed or
//! bounded rules, so the relay checks them again when it accepts a claim.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::http1::{is_forwarding_field, is_kitepipe_field};

/// The realm when the owner names none.
pub const DEFAULT_REALM: &str = "kitepipe";

/// The longest realm: browsers show it in a small dialog.
pub const MAX_REALM_LEN: usize = 128;

/// The most header edits (set and remove together) per direction: real
/// configs have a handful.
pub const MAX_HEADER_EDITS: usize = 32;

/// The longest header name in an edit.
pub const MAX_HEADER_NAME_LEN: usize = 64;

/// The longest header value in an edit (a CSP policy fits).
pub const MAX_HEADER_VALUE_LEN: usize = 2048;

/// The highest `rate_limit` (requests per second per address).
pub const MAX_RATE: u32 = 10_000;

/// The highest `rate_burst`.
pub const MAX_BURST: u32 = 100_000;

/// What is wrong with an [`HttpPolicy`] (the message names the rule).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0}")]
pub struct HttpPolicyError(pub String);

/// How the relay speaks to an http kite's local service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendProtocol {
    /// HTTP/1.1 (the default): visitors' HTTP/2 requests are translated.
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (h2c), for gRPC and other h2-only
    /// services.
    H2c,
}

impl BackendProtocol {
    /// The config and wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendProtocol::Http1 => "http1",
            BackendProtocol::H2c => "h2c",
        }
    }
}

impl std::str::FromStr for BackendProtocol {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "http1" => Ok(BackendProtocol::Http1),
            "h2c" => Ok(BackendProtocol::H2c),
            other => Err(format!("{other:?} is not a backend protocol: http1 or h2c")),
        }
    }
}

/// Headers to set (replacing any of the same name) and to remove.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeaderRules {
    /// Header name to value.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    /// Header names.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl HeaderRules {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }
}

/// The HTTP-level rules of one http kite (wire form; every field optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HttpPolicy {
    /// htpasswd lines `user:hash` (bcrypt or argon2): with any, visitors
    /// must authenticate with HTTP basic auth.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub basic_auth: Vec<String>,
    /// The realm browsers show when asking for the password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_realm: Option<String>,
    /// Requests per second allowed per visitor address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<u32>,
    /// Requests a visitor address may send at once above the rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_burst: Option<u32>,
    /// Visitor connections to the kite (through one link) at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Edits of the requests' headers on their way to the local service.
    #[serde(skip_serializing_if = "HeaderRules::is_empty")]
    pub request_headers: HeaderRules,
    /// Edits of the responses' headers on their way to the visitor.
    #[serde(skip_serializing_if = "HeaderRules::is_empty")]
    pub response_headers: HeaderRules,
    /// Add `X-Forwarded-Host` with the Host the visitor asked for.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub forwarded_host: bool,
    /// Answer plain-HTTP visitors with a redirect to the same URL over
    /// HTTPS (when the relay terminates TLS for the kite).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub https_redirect: bool,
    /// How the relay speaks to the local service.
    #[serde(skip_serializing_if = "is_http1")]
    pub backend: BackendProtocol,
}

fn is_http1(backend: &BackendProtocol) -> bool {
    *backend == BackendProtocol::Http1
}

impl HttpPolicy {
    /// Whether every rule is the default (nothing to send).
    pub fn is_default(&self) -> bool {
        *self == HttpPolicy::default()
    }

    /// The realm of the password dialog ([`DEFAULT_REALM`] when unset).
    pub fn realm(&self) -> &str {
        self.auth_realm.as_deref().unwrap_or(DEFAULT_REALM)
    }

    /// Checks the rules' bounds and syntax (everything but the htpasswd
    /// lines, whose hashes the library checks): the realm, the rate and
    /// connection limits, the header edits. The connector runs it on its
    /// config and the relay again on every claim.
    ///
    /// ```
    /// use kitepipe_proto::http_policy::HttpPolicy;
    /// let mut policy = HttpPolicy { rate_limit: Some(5), ..HttpPolicy::default() };
    /// assert!(policy.check().is_ok());
    /// policy.rate_limit = Some(0);
    /// assert!(policy.check().is_err());
    /// ```
    pub fn check(&self) -> Result<(), HttpPolicyError> {
        self.check_inner().map_err(HttpPolicyError)
    }

    fn check_inner(&self) -> Result<(), String> {
        if self.basic_auth.is_empty() && self.auth_realm.is_some() {
            return Err("auth_realm without basic_auth users".into());
        }
        check_realm(self.realm())?;
        match (self.rate_limit, self.rate_burst) {
            (None, None) => {}
            (None, Some(_)) => return Err("rate_burst without rate_limit".into()),
            (Some(rate), burst) => {
                if !(1..=MAX_RATE).contains(&rate) {
                    return Err(format!("rate_limit {rate} is outside 1..={MAX_RATE}"));
                }
                let burst = burst.unwrap_or(rate);
                if !(1..=MAX_BURST).contains(&burst) {
                    return Err(format!("rate_burst {burst} is outside 1..={MAX_BURST}"));
                }
            }
        }
        if self.max_connections == Some(0) {
            return Err("max_connections must be at least 1".into());
        }
        check_header_rules("request_headers", &self.request_headers)?;
        check_header_rules("response_headers", &self.response_headers)
    }
}

/// A realm goes into `WWW-Authenticate: Basic realm="..."`: printable
/// ASCII without quotes or backslashes, bounded.
fn check_realm(realm: &str) -> Result<(), String> {
    if realm.is_empty() || realm.len() > MAX_REALM_LEN {
        return Err(format!(
            "auth_realm must have 1 to {MAX_REALM_LEN} characters"
        ));
    }
    if !realm
        .bytes()
        .all(|byte| (b' '..=b'~').contains(&byte) && byte != b'"' && byte != b'\\')
    {
        return Err("auth_realm must be printable ASCII without quotes or backslashes".into());
    }
    Ok(())
}

/// Header names a kite may not edit: framing and hop-by-hop fields (the
/// relay delimits messages by them), `Host` (routing), and the relay's own
/// (`X-Forwarded-*`, `Forwarded`, `X-Real-IP`, `X-Kitepipe-*`).
fn is_reserved_header(name: &str) -> bool {
    const RESERVED: [&str; 9] = [
        "content-length",
        "transfer-encoding",
        "connection",
        "upgrade",
        "host",
        "te",
        "trailer",
        "keep-alive",
        "http2-settings",
    ];
    let bytes = name.as_bytes();
    RESERVED
        .iter()
        .any(|reserved| name.eq_ignore_ascii_case(reserved))
        || bytes
            .get(..6)
            .is_some_and(|prefix| prefix.eq_ignore_ascii_case(b"proxy-"))
        || is_forwarding_field(bytes)
        || is_kitepipe_field(bytes)
}

/// Checks one direction's header edits: bounded, valid names (RFC 9110
/// tokens) none of them reserved, values without control characters.
fn check_header_rules(what: &str, rules: &HeaderRules) -> Result<(), String> {
    let count = rules.set.len() + rules.remove.len();
    if count > MAX_HEADER_EDITS {
        return Err(format!("{what}: {count} edits, at most {MAX_HEADER_EDITS}"));
    }
    for name in rules.set.keys().chain(&rules.remove) {
        if name.is_empty() || name.len() > MAX_HEADER_NAME_LEN {
            return Err(format!(
                "{what}: a header name has 1 to {MAX_HEADER_NAME_LEN} characters"
            ));
        }
        let token = |byte: u8| byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte);
        if !name.bytes().all(token) {
            return Err(format!("{what}: {name:?} is not a valid header name"));
        }
        if is_reserved_header(name) {
            return Err(format!(
                "{what}: {name} cannot be edited (framing, hop-by-hop or the relay's own)"
            ));
        }
    }
    for (name, value) in &rules.set {
        if value.len() > MAX_HEADER_VALUE_LEN {
            return Err(format!(
                "{what}: the value of {name} is longer than {MAX_HEADER_VALUE_LEN} bytes"
            ));
        }
        if value.bytes().any(|byte| matches!(byte, b'\r' | b'\n' | 0)) {
            return Err(format!("{what}: the value of {name} has CR, LF or NUL"));
        }
        if value
            .bytes()
            .any(|byte| byte.is_ascii_control() && byte != b'\t')
            || value.trim() != value
        {
            return Err(format!(
                "{what}: the value of {name} has a control character or surrounding spaces"
            ));
        }
    }
    Ok(())
}
