//! Certificate identities on the relay: the client CA, its revocation
//! list, `--cert-domain` and `[[allow]]` rules, and reloading them.

use std::path::PathBuf;

use kitepipe_proto::kite;
use serde::{Deserialize, Serialize};

use super::ConfigError;
use super::remote::{RawRemoteRule, parse_remote_rule};
use crate::pki::{AllowRule, CrlSource, IdentityPattern, IdentityRules, KitePattern, ca};

/// One `[[allow]]` table as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAllowRule {
    /// Identity name or pattern (`laptop`, `ci-*`, `*`).
    pub identity: String,
    /// Kite patterns, `PROTOS:NAME[:PORT]` (`{name}` is the identity).
    #[serde(default)]
    pub kites: Vec<String>,
    /// Relay event handlers the identity may call (patterns, see
    /// [`IdentityRules::allows_handler`]).
    #[serde(default)]
    pub handlers: Vec<String>,
    /// Connectors the identity may send events to, through the relay.
    #[serde(default)]
    pub peers: Vec<String>,
}

/// How the relay treats connectors' certificates.
#[derive(Debug, Clone, Default)]
pub struct IdentityConfig {
    /// CA file connectors' certificates must chain to; `None` asks for no
    /// certificates.
    pub client_ca: Option<PathBuf>,
    /// Where the revocation list is read from.
    pub crl: Option<CrlSource>,
    /// What each identity may claim.
    pub rules: IdentityRules,
}

/// The relay settings that make up its [`IdentityConfig`], as written.
pub(crate) struct RawIdentity<'a> {
    /// `client_ca`.
    pub(crate) client_ca: &'a Option<PathBuf>,
    /// `crl`.
    pub(crate) crl: &'a Option<PathBuf>,
    /// `cert_domain`.
    pub(crate) cert_domain: &'a [String],
    /// `[[allow]]`.
    pub(crate) allow: &'a [RawAllowRule],
    /// `[[remote]]`.
    pub(crate) remote: &'a [RawRemoteRule],
}

impl IdentityConfig {
    /// Validates the identity settings of `raw`.
    pub(crate) fn from_raw(raw: RawIdentity<'_>) -> Result<IdentityConfig, ConfigError> {
        let crl = match (raw.crl, raw.client_ca) {
            (Some(crl), Some(_)) => Some(CrlSource::File(crl.clone())),
            (None, Some(client_ca)) => {
                let dir = client_ca.parent().unwrap_or(std::path::Path::new(""));
                Some(CrlSource::BesideCa(dir.join(ca::CRL_FILE)))
            }
            (Some(_), None) => {
                return Err(ConfigError::Missing(
                    "--crl needs --client-ca: the list revokes certificates of that CA",
                ));
            }
            (None, None) => None,
        };
        if raw.client_ca.is_none() && (!raw.cert_domain.is_empty() || !raw.allow.is_empty()) {
            return Err(ConfigError::Missing(
                "cert-domain and [[allow]] rules apply to connectors' certificates: set --client-ca too",
            ));
        }
        let cert_domains = raw
            .cert_domain
            .iter()
            .map(|text| {
                let invalid = || ConfigError::Invalid {
                    what: "cert-domain",
                    value: text.clone(),
                    why: "expected a DNS name such as example.net (no wildcard)".into(),
                };
                if text.contains('*') {
                    return Err(invalid());
                }
                kite::normalize_name(text).map_err(|_| invalid())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let allow = raw
            .allow
            .iter()
            .map(parse_allow_rule)
            .collect::<Result<Vec<_>, _>>()?;
        let remote = raw
            .remote
            .iter()
            .map(parse_remote_rule)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(IdentityConfig {
            client_ca: raw.client_ca.clone(),
            crl,
            rules: IdentityRules::new(cert_domains, allow).with_remote(remote),
        })
    }
}

/// Parses one `[[allow]]` rule.
pub(crate) fn parse_allow_rule(raw: &RawAllowRule) -> Result<AllowRule, ConfigError> {
    let invalid = |value: &str, err: crate::pki::RuleError| ConfigError::Invalid {
        what: "allow rule",
        value: value.to_string(),
        why: err.to_string(),
    };
    let identity =
        IdentityPattern::parse(&raw.identity).map_err(|err| invalid(&raw.identity, err))?;
    let kites = raw
        .kites
        .iter()
        .map(|text| KitePattern::parse(text).map_err(|err| invalid(text, err)))
        .collect::<Result<Vec<_>, _>>()?;
    let peers = raw
        .peers
        .iter()
        .map(|text| IdentityPattern::parse(text).map_err(|err| invalid(text, err)))
        .collect::<Result<Vec<_>, _>>()?;
    let handler_pattern = |h: &str| {
        !h.is_empty()
            && h.len() <= kitepipe_proto::event::MAX_NAME_LEN
            && h.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'*')
    };
    if let Some(bad) = raw.handlers.iter().find(|h| !handler_pattern(h)) {
        return Err(ConfigError::Invalid {
            what: "allow rule handler",
            value: bad.clone(),
            why: "a handler pattern is a name of a-z, 0-9 and _, with * wildcards \
                  (e.g. time, get_time_*, *)"
                .into(),
        });
    }
    Ok(AllowRule {
        identity,
        kites,
        handlers: raw.handlers.clone(),
        peers,
    })
}
