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
}
