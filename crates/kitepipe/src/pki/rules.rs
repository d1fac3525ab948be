//! Authorization rules for certificate identities: which identity may claim
//! which kites.
//!
//! Pure logic: the relay hands in an identity name (from a verified
//! certificate) and a kite claim, and gets a yes or no. Two sources of
//! rights add up:
//!
//! - the default rule, one per certificate domain `D`: an identity `NAME`
//!   may claim `NAME.D` and `*.NAME.D` (and names under it), any protocol;
//! - `[[allow]]` rules: identities matching a pattern (`laptop`, `ci-*`,
//!   `*`) may claim kites matching patterns (`http:extra.example.net`,
//!   `http,https:*.{name}.example.org`, `tcp:db.example.net:15432`).
//!
//! Everything else is denied. The same `[[allow]]` rules say which of the
//! relay's event handlers an identity may call (`handlers`) and which other
//! connectors it may send events to (`peers`); there is no default rule for
//! events, so an identity without such a rule may call nothing.

use std::fmt;

use kitepipe_proto::kite::{self, KiteProto, KiteRef};
use kitepipe_proto::message::RemoteClass;

/// The placeholder in kite patterns that stands for the identity's name.
pub(crate) const NAME_PLACEHOLDER: &str = "{name}";

/// Why a rule could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// An identity pattern holds characters no issued name can have.
    #[error("bad identity pattern {text:?}: use a name, or a name with * wildcards (e.g. ci-*)")]
    BadIdentityPattern {
        /// The pattern as written.
        text: String,
    },
    /// A kite pattern is malformed.
    #[error("bad kite pattern {text:?}: {why}")]
    BadKitePattern {
        /// The pattern as written.
        text: String,
        /// What is wrong with it.
        why: String,
    },
    /// A certificate domain is not a plain DNS name.
    #[error("bad certificate domain {text:?}: expected a DNS name such as example.net")]
    BadCertDomain {
        /// The domain as written.
        text: String,
    },
}

/// The rules a relay applies to certificate identities.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityRules {
    cert_domains: Vec<String>,
    allow: Vec<AllowRule>,
    remote: Vec<RemoteRule>,
}

impl IdentityRules {
    /// Rules from certificate domains (each gives the default rule) and
    /// explicit allow rules.
    pub fn new(cert_domains: Vec<String>, allow: Vec<AllowRule>) -> IdentityRules {
        IdentityRules {
            cert_domains,
            allow,
            remote: Vec::new(),
        }
    }

    /// These rules plus `[[remote]]` rules: what the relay's gateway may do
    /// on which connectors.
    pub fn with_remote(mut self, remote: Vec<RemoteRule>) -> IdentityRules {
        self.remote = remote;
        self
    }

    /// The `[[remote]]` rules.
    pub fn remote_rules(&self) -> &[RemoteRule] {
        &self.remote
    }

    /// The kinds of remote operations the relay's gateway may run on the
    /// connector named `node` (sorted, no repeats; empty: none). There is
    /// no default: without a matching `[[remote]]` rule, nothing.
    ///
    /// ```
    /// use kitepipe::pki::{IdentityPattern, IdentityRules, RemoteRule};
    /// use kitepipe_proto::message::RemoteClass;
    ///
    /// let rules = IdentityRules::default().with_remote(vec![
    ///     RemoteRule { nodes: vec![IdentityPattern::parse("ci-*").unwrap()], ops: vec![RemoteClass::Exec] },
    ///     RemoteRule { nodes: vec![IdentityPattern::parse("*").unwrap()], ops: vec![RemoteClass::Fs] },
    /// ]);
    /// assert_eq!(rules.remote_grants("ci-7"), [RemoteClass::Exec, RemoteClass::Fs]);
    /// assert_eq!(rules.remote_grants("laptop"), [RemoteClass::Fs]);
    /// ```
    pub fn remote_grants(&self, node: &str) -> Vec<RemoteClass> {
        let node = node.to_ascii_lowercase();
        let mut grants: Vec<RemoteClass> = self
            .remote
            .iter()
            .filter(|rule| rule.nodes.iter().any(|pattern| pattern.matches(&node)))
            .flat_map(|rule| rule.ops.iter().copied())
            .collect();
        grants.sort();
        grants.dedup();
        grants
    }

    /// True if no identity may claim anything.
    pub fn is_empty(&self) -> bool {
        self.cert_domains.is_empty() && self.allow.iter().all(|rule| rule.kites.is_empty())
    }

    /// The certificate domains of the default rule.
    pub fn cert_domains(&self) -> &[String] {
        &self.cert_domains
    }

    /// The explicit allow rules.
    pub fn allow_rules(&self) -> &[AllowRule] {
        &self.allow
    }

    /// Whether `identity` may claim `kite`.
    ///
    /// ```
    /// use kitepipe::pki::{AllowRule, IdentityPattern, IdentityRules, KitePattern};
    /// use kitepipe_proto::kite::KiteRef;
    ///
    /// let rules = IdentityRules::new(
    ///     vec!["example.net".into()],
    ///     vec![AllowRule {
    ///         identity: IdentityPattern::parse("ci-*").unwrap(),
    ///         kites: vec![KitePattern::parse("http:builds.example.org").unwrap()],
    ///         handlers: vec![],
    ///         peers: vec![],
    ///     }],
    /// );
    /// let kite = |spec| KiteRef::parse(spec).unwrap();
    /// assert!(rules.allows("laptop", &kite("http:laptop.example.net")));
    /// assert!(rules.allows("laptop", &kite("https:*.laptop.example.net")));
    /// assert!(!rules.allows("laptop", &kite("http:desktop.example.net")));
    /// assert!(rules.allows("ci-7", &kite("http:builds.example.org")));
    /// assert!(!rules.allows("laptop", &kite("http:builds.example.org")));
    /// ```
    pub fn allows(&self, identity: &str, kite: &KiteRef) -> bool {
        self.grants(identity)
            .iter()
            .any(|pattern| pattern.covers(kite))
    }

    /// Every kite pattern `identity` holds, with `{name}` filled in (for
    /// messages and for [`IdentityRules::allows`]).
    pub fn grants(&self, identity: &str) -> Vec<KitePattern> {
        let mut grants = Vec::new();
        for domain in &self.cert_domains {
            for template in [format!("{{name}}.{domain}"), format!("*.{{name}}.{domain}")] {
                let pattern = KitePattern {
                    protos: None,
                    name: template,
                    port: None,
                };
                grants.extend(pattern.resolve(identity));
            }
        }
        for rule in self
            .allow
            .iter()
            .filter(|rule| rule.identity.matches(identity))
        {
            grants.extend(
                rule.kites
                    .iter()
                    .filter_map(|pattern| pattern.resolve(identity)),
            );
        }
        grants
    }

    /// Whether `identity` may call the relay's event handler `handler` (a
    /// handler name such as `get_time_utc`).
    ///
    /// A `handlers` pattern matches the whole name or the name without its
    /// verb, and `*` matches any run of characters: `time` allows
    /// `get_time` and `post_time`, `time_*` allows `get_time_utc`, `get_*`
    /// every GET, `*` everything.
    ///
    /// ```
    /// use kitepipe::pki::{AllowRule, IdentityPattern, IdentityRules};
    ///
    /// let rules = IdentityRules::new(vec![], vec![AllowRule {
    ///     identity: IdentityPattern::parse("laptop").unwrap(),
    ///     kites: vec![],
    ///     handlers: vec!["time".into(), "get_cat".into()],
    ///     peers: vec![IdentityPattern::parse("ci-*").unwrap()],
    /// }]);
    /// assert!(rules.allows_handler("laptop", "get_time"));
    /// assert!(rules.allows_handler("laptop", "get_cat"));
    /// assert!(!rules.allows_handler("laptop", "post_cat"));
    /// assert!(!rules.allows_handler("desktop", "get_time"));
    /// assert!(rules.allows_peer("laptop", "ci-7"));
    /// assert!(!rules.allows_peer("laptop", "desktop"));
    /// ```
    pub fn allows_handler(&self, identity: &str, handler: &str) -> bool {
        let without_verb = handler.split_once('_').map(|(_, rest)| rest);
        self.allow
            .iter()
            .filter(|rule| rule.identity.matches(identity))
            .flat_map(|rule| rule.handlers.iter())
            .any(|pattern| {
                let pattern = pattern.as_bytes();
                glob_matches(pattern, handler.as_bytes())
                    || without_verb.is_some_and(|rest| glob_matches(pattern, rest.as_bytes()))
            })
    }

    /// Whether `identity` may send events to the connector named `peer`
    /// through the relay.
    pub fn allows_peer(&self, identity: &str, peer: &str) -> bool {
        let peer = peer.to_ascii_lowercase();
        self.allow
            .iter()
            .filter(|rule| rule.identity.matches(identity))
            .flat_map(|rule| rule.peers.iter())
            .any(|pattern| pattern.matches(&peer))
    }

    /// `grants` as one line, e.g. `*:laptop.example.net, http:x.example.org`,
    /// or `nothing`.
    pub fn describe_grants(&self, identity: &str) -> String {
        let grants = self.grants(identity);
        if grants.is_empty() {
            return "nothing".to_string();
        }
        grants
            .iter()
            .map(KitePattern::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One `[[allow]]` rule: identities matching `identity` may claim `kites`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowRule {
    /// Which identities the rule is for.
    pub identity: IdentityPattern,
    /// Kites they may claim.
    pub kites: Vec<KitePattern>,
    /// Relay event handlers they may call: patterns of `[a-z0-9_*]` (see
    /// [`IdentityRules::allows_handler`]).
    pub handlers: Vec<String>,
    /// Other connectors (by node name) they may send events to through the
    /// relay.
    pub peers: Vec<IdentityPattern>,
}

/// One `[[remote]]` rule: the relay's gateway may run `ops` on connectors
/// whose node name matches one of `nodes` (and which accept them:
/// `kitepipe connect --allow-remote`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteRule {
    /// Node names or patterns: certificate names, or the `--name` of
    /// connectors that log in with a secret.
    pub nodes: Vec<IdentityPattern>,
    /// Kinds of operations granted.
    pub ops: Vec<RemoteClass>,
}

/// An identity name, or a pattern where `*` matches any run of characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityPattern(String);

impl IdentityPattern {
    /// Parses a pattern: letters, digits, `-`, `_`, `.` and `*`; case is
    /// ignored.
    pub fn parse(text: &str) -> Result<IdentityPattern, RuleError> {
        let lower = text.trim().to_ascii_lowercase();
        let ok = !lower.is_empty()
            && lower.len() <= 253
            && lower
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'*'));
        if ok {
            Ok(IdentityPattern(lower))
        } else {
            Err(RuleError::BadIdentityPattern {
                text: text.to_string(),
            })
        }
    }

    /// Whether `identity` (lowercase) matches.
    pub fn matches(&self, identity: &str) -> bool {
        glob_matches(self.0.as_bytes(), identity.as_bytes())
    }
}

impl fmt::Display for IdentityPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Kites an identity may claim: `PROTOS:NAME[:PORT]`.
///
/// `PROTOS` is `*` or a comma-separated list (`http,https`); `NAME` is a
/// name or a `*.` pattern and may contain `{name}`; `PORT` (TCP only) pins
/// the public port, otherwise any port the relay allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KitePattern {
    /// Allowed protocols; `None` for any.
    protos: Option<Vec<KiteProto>>,
    /// Name or `*.` pattern, lowercase, possibly with `{name}`.
    name: String,
    /// Required public port for TCP kites; `None` for any.
    port: Option<u16>,
}

impl KitePattern {
    /// Parses `PROTOS:NAME[:PORT]`.
    pub fn parse(text: &str) -> Result<KitePattern, RuleError> {
        let bad = |why: &str| RuleError::BadKitePattern {
            text: text.to_string(),
            why: why.to_string(),
        };
        let mut parts = text.trim().split(':');
        let (Some(protos), Some(name)) = (parts.next(), parts.next()) else {
            return Err(bad(
                "expected PROTOS:NAME[:PORT], e.g. http,https:{name}.example.net",
            ));
        };
        let port = match parts.next() {
            None => None,
            Some(port) => Some(
                port.parse::<u16>()
                    .map_err(|_| bad("the port is not a number"))?,
            ),
        };
        if parts.next().is_some() {
            return Err(bad("too many ':'"));
        }
        let protos = if protos.trim() == "*" {
            None
        } else {
            let list = protos
                .split(',')
                .map(|proto| proto.trim().parse::<KiteProto>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|err| bad(&err.to_string()))?;
            Some(list)
        };
        if port.is_some() && protos.as_deref() != Some(&[KiteProto::Tcp][..]) {
            return Err(bad("only tcp patterns take a port"));
        }
        // Check the shape with a stand-in name; the real one is checked
        // when it is filled in.
        let sample = name.replace(NAME_PLACEHOLDER, "x");
        let name = kite::normalize_name(&sample)
            .map(|_| name.trim_end_matches('.').to_ascii_lowercase())
            .map_err(|err| bad(&err.to_string()))?;
        Ok(KitePattern { protos, name, port })
    }

    /// The pattern with `{name}` replaced by `identity`; `None` if the
    /// identity cannot be part of a host name (so a certificate named `*`
    /// or `a b` gains nothing from a `{name}` rule).
    fn resolve(&self, identity: &str) -> Option<KitePattern> {
        if !self.name.contains(NAME_PLACEHOLDER) {
            return Some(self.clone());
        }
        if identity.contains('*') || kite::normalize_name(identity).is_err() {
            return None;
        }
        let name = self.name.replace(NAME_PLACEHOLDER, identity);
        let name = kite::normalize_name(&name).ok()?;
        Some(KitePattern {
            protos: self.protos.clone(),
            name,
            port: self.port,
        })
    }

    /// Whether a claim for `kite` falls under this (resolved) pattern.
    fn covers(&self, kite: &KiteRef) -> bool {
        if let Some(protos) = &self.protos
            && !protos.contains(&kite.proto)
        {
            return false;
        }
        if let Some(port) = self.port
            && kite.port != port
        {
            return false;
        }
        pattern_covers(&self.name, &kite.name)
    }
}

impl fmt::Display for KitePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.protos {
            None => f.write_str("*")?,
            Some(protos) => {
                let names: Vec<&str> = protos.iter().map(|proto| proto.as_str()).collect();
                f.write_str(&names.join(","))?;
            }
        }
        write!(f, ":{}", self.name)?;
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

/// True if a name pattern (a name or `*.` pattern) lets a connector claim
/// `name` (itself a name or a `*.` pattern). A wildcard claim needs a
/// wildcard pattern at or above it.
pub(crate) fn pattern_covers(pattern: &str, name: &str) -> bool {
    if pattern == name {
        return true;
    }
    match name.strip_prefix("*.") {
        Some(body) => pattern.starts_with("*.") && kite::name_matches(pattern, body),
        None => kite::name_matches(pattern, name),
    }
}

/// Whether `text` matches `pattern`, where `*` matches any run of bytes.
fn glob_matches(pattern: &[u8], text: &[u8]) -> bool {
    // Iterative matching with one backtrack point: linear in practice, and
    // never exponential on hostile patterns.
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((star_p, star_t)) = star {
            p = star_p + 1;
            t = star_t + 1;
            star = Some((star_p, star_t + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|b| *b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kite(spec: &str) -> KiteRef {
        KiteRef::parse(spec).unwrap()
    }

    #[test]
    fn pattern_coverage() {
        let cases = [
            ("*.example.net", "blog.example.net", true),
            ("*.example.net", "*.example.net", true),
            ("*.example.net", "*.shop.example.net", true),
            ("example.net", "*.example.net", false),
            ("blog.example.net", "blog.example.net", true),
            ("blog.example.net", "x.blog.example.net", false),
            ("*.example.net", "example.net", false),
            ("*.example.net", "evil.net", false),
        ];
        for (pattern, name, expected) in cases {
            assert_eq!(
                pattern_covers(pattern, name),
                expected,
                "{pattern} covers {name}"
            );
        }
    }

    #[test]
    fn identity_globs() {
        let cases = [
            ("laptop", "laptop", true),
            ("laptop", "laptop2", false),
            ("ci-*", "ci-7", true),
            ("ci-*", "ci-", true),
            ("ci-*", "xci-7", false),
            ("*", "anything", true),
            ("*-db-*", "eu-db-1", true),
            ("*-db-*", "eu-web-1", false),
            (
                "a*a*a*a*b",
                "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaac",
                false,
            ),
        ];
        for (pattern, name, expected) in cases {
            let pattern = IdentityPattern::parse(pattern).unwrap();
            assert_eq!(pattern.matches(name), expected, "{pattern} vs {name}");
        }
        for bad in ["", "a b", "laptop/1", "{name}"] {
            assert!(IdentityPattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn default_rule_gives_a_name_and_its_subdomains_only() {
        let rules = IdentityRules::new(vec!["example.net".into()], vec![]);
        let cases = [
            ("http:laptop.example.net", true),
            ("https:laptop.example.net", true),
            ("tcp:laptop.example.net:2222", true),
            ("http:*.laptop.example.net", true),
            ("http:a.b.laptop.example.net", true),
            ("http:desktop.example.net", false),
            ("http:*.example.net", false),
            ("http:laptop.example.org", false),
            ("http:xlaptop.example.net", false),
        ];
        for (spec, expected) in cases {
            assert_eq!(rules.allows("laptop", &kite(spec)), expected, "{spec}");
        }
        // A name that is not a host name gets nothing from {name} rules.
        assert!(!rules.allows("*", &kite("http:*.example.net")));
        assert!(rules.grants("*").is_empty());
        assert_eq!(
            rules.describe_grants("laptop"),
            "*:laptop.example.net, *:*.laptop.example.net"
        );
    }

    #[test]
    fn allow_rules_add_rights_by_pattern() {
        let rule = |identity: &str, kites: &[&str]| AllowRule {
            identity: IdentityPattern::parse(identity).unwrap(),
            kites: kites
                .iter()
                .map(|k| KitePattern::parse(k).unwrap())
                .collect(),
            handlers: vec![],
            peers: vec![],
        };
        let rules = IdentityRules::new(
            vec![],
            vec![
                rule("laptop", &["http:extra.example.net"]),
                rule(
                    "ci-*",
                    &[
                        "http,https:{name}.ci.example.org",
                        "tcp:db.example.org:15432",
                    ],
                ),
            ],
        );
        let cases = [
            ("laptop", "http:extra.example.net", true),
            ("laptop", "https:extra.example.net", false),
            ("laptop", "http:laptop.example.net", false),
            ("ci-7", "https:ci-7.ci.example.org", true),
            ("ci-7", "https:ci-8.ci.example.org", false),
            ("ci-7", "tcp:db.example.org:15432", true),
            ("ci-7", "tcp:db.example.org:0", false),
            ("ci-7", "tcp:db.example.org:15433", false),
            ("other", "http:extra.example.net", false),
        ];
        for (identity, spec, expected) in cases {
            assert_eq!(
                rules.allows(identity, &kite(spec)),
                expected,
                "{identity} {spec}"
            );
        }
    }

    #[test]
    fn kite_patterns_parse_and_print() {
        for (text, printed) in [
            ("http:Blog.Example.net", "http:blog.example.net"),
            ("*:*.{name}.example.net", "*:*.{name}.example.net"),
            ("http, https:x.example.net", "http,https:x.example.net"),
            ("tcp:db.example.net:15432", "tcp:db.example.net:15432"),
        ] {
            assert_eq!(KitePattern::parse(text).unwrap().to_string(), printed);
        }
        for bad in [
            "example.net",
            "ftp:x.example.net",
            "http:x.example.net:80",
            "tcp:x.example.net:port",
            "http:bad name.net",
            "tcp:a:1:2",
        ] {
            assert!(KitePattern::parse(bad).is_err(), "{bad}");
        }
    }
}
