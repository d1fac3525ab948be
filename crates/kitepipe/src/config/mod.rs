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

use kitepipe_proto::frame::DEFAULT_HEARTBEAT;
use crate::pki::{
    AllowRule, CrlSource, Fingerprint, IDENTITY_CA_FILE, IdentityPattern, IdentityRules,
    KitePattern, NodeIdentity, PkiError, RelayTrust, RemoteRule, Secret, ca, protect_secret_file,
    read_secret_file,
};

/// Default ceiling of the reconnect backoff. Short enough that a connector
/// comes back soon after a long outage, long enough that thousands of
/// connectors do not hammer a relay that is down.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(15);

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

/// Relay settings as written (TOML file and flags).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRelayConfig {
    /// Addresses for connectors' links (TLS).
    #[serde(default)]
    pub listen: Vec<String>,
    /// Addresses for visitors' HTTP, routed by Host.
    #[serde(default)]
    pub http: Vec<String>,
    /// Addresses for visitors' HTTPS, routed by SNI and passed through.
    #[serde(default)]
    pub https: Vec<String>,
    /// Domains connectors may claim: `PROTOS:PATTERN:SECRET`.
    #[serde(default)]
    pub domain: Vec<String>,
    /// File of more domains, one `PROTOS:PATTERN:SECRET` per line (`#`
    /// comments), so their secrets stay out of argv and the TOML file.
    pub domain_file: Option<PathBuf>,
    /// Address TCP kites' public ports bind to.
    pub tcp_bind: Option<String>,
    /// Allowed public ports for TCP kites, `LOW-HIGH`.
    pub tcp_ports: Option<String>,
    /// Whether `CONNECT name:port` on the HTTP port reaches TCP kites.
    pub http_connect: Option<bool>,
    /// Where the relay keeps its self-signed certificate.
    pub state_dir: Option<PathBuf>,
    /// Certificate chain (PEM) instead of the self-signed one.
    pub cert: Option<PathBuf>,
    /// Private key (PEM) for `cert`.
    pub key: Option<PathBuf>,
    /// Public host name of the relay (for URLs shown to connectors, certificate names).
    pub name: Option<String>,
    /// Heartbeat interval, e.g. `15s`.
    pub heartbeat: Option<String>,
    /// CA certificate file (PEM) connectors' certificates must chain to;
    /// makes the relay ask connectors for certificates.
    pub client_ca: Option<PathBuf>,
    /// Revocation list (PEM X.509 CRL) for connectors' certificates;
    /// default: `crl.pem` beside `client_ca`, if it exists.
    pub crl: Option<PathBuf>,
    /// Domains `D` under which a certificate named `NAME` may claim
    /// `NAME.D` and `*.NAME.D`.
    #[serde(default)]
    pub cert_domain: Vec<String>,
    /// Further rights of certificate identities (TOML only: `[[allow]]`).
    #[serde(default)]
    pub allow: Vec<RawAllowRule>,
    /// What the relay's gateway may run on which connectors (`[[remote]]`;
    /// flag: `--remote NODES:OPS`).
    #[serde(default)]
    pub remote: Vec<RawRemoteRule>,
    /// Event gateway address: `IP:PORT` on loopback, `unix:PATH`, or `off`.
    pub gateway: Option<String>,
    /// Directory of event handler executables.
    pub handlers: Option<PathBuf>,
    /// Local HTTP server that handles events, `http://127.0.0.1:PORT[/BASE]`.
    pub handler_upstream: Option<String>,
    /// How long an event waits for an offline node, e.g. `30s`.
    pub event_wait: Option<String>,
    /// How long a handler may go without progress, e.g. `30s`.
    pub event_timeout: Option<String>,
    /// `Origin`s (`scheme://host[:port]`) whose browser requests the
    /// gateway accepts; none by default.
    #[serde(default)]
    pub gateway_origin: Vec<String>,
    /// The gateway's owner token file [default: `STATE_DIR/gateway-token`].
    pub gateway_token_file: Option<PathBuf>,
    /// Serve `/client/` and `/remote/` to every local user without the
    /// owner token (the behaviour before tokens).
    pub insecure_gateway_without_token: Option<bool>,
}

/// Event pipe settings as written; the same fields in [`RawRelayConfig`]
/// and [`RawConnectorConfig`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawEventConfig {
    /// Gateway address: `IP:PORT` on loopback, `unix:PATH`, or `off`.
    pub gateway: Option<String>,
    /// Directory of handler executables.
    pub handlers: Option<PathBuf>,
    /// Local HTTP server that handles events, `http://127.0.0.1:PORT[/BASE]`.
    pub handler_upstream: Option<String>,
    /// How long a request waits for an offline node, e.g. `30s`.
    pub event_wait: Option<String>,
    /// How long a handler may go without progress, e.g. `30s`.
    pub event_timeout: Option<String>,
    /// `Origin`s whose browser requests the gateway accepts.
    pub gateway_origin: Vec<String>,
}

/// One `[[allow]]` table as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
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

/// One `[[remote]]` table as written: `nodes = ["ci-*"]`, `ops = ["exec", "fs"]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRemoteRule {
    /// Node names or patterns.
    pub nodes: Vec<String>,
    /// Kinds of operations: `exec`, `fs`, `forward`, `all`.
    pub ops: Vec<String>,
}

impl RawRemoteRule {
    /// Parses the flag form `NODES:OPS`, e.g. `ci-*,laptop:exec,fs`.
    pub fn from_flag(text: &str) -> Result<RawRemoteRule, ConfigError> {
        let Some((nodes, ops)) = text.split_once(':') else {
            return Err(ConfigError::Invalid {
                what: "remote rule",
                value: text.to_string(),
                why: "expected NODES:OPS, e.g. 'ci-*,laptop:exec,fs'".into(),
            });
        };
        let list = |t: &str| t.split(',').map(|w| w.trim().to_string()).collect();
        Ok(RawRemoteRule {
            nodes: list(nodes),
            ops: list(ops),
        })
    }
}

/// Parses one `[[remote]]` rule.
pub fn parse_remote_rule(raw: &RawRemoteRule) -> Result<RemoteRule, ConfigError> {
    let invalid = |value: &str, why: String| ConfigError::Invalid {
        what: "remote rule",
        value: value.to_string(),
        why,
    };
    if raw.nodes.is_empty() {
        return Err(invalid(
            "nodes = []",
            "name at least one node or pattern".into(),
        ));
    }
    let nodes = raw
        .nodes
        .iter()
        .map(|text| IdentityPattern::parse(text).map_err(|err| invalid(text, err.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let joined = raw.ops.join(",");
    let ops = RemoteClass::parse_list(&joined).map_err(|why| invalid(&joined, why))?;
    Ok(RemoteRule { nodes, ops })
}

/// A validated relay configuration.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Listening sockets and what each serves.
    pub listeners: Vec<ListenerConfig>,
    /// Domains connectors may claim.
    pub domains: Vec<Domain>,
    /// Address TCP kites bind to.
    pub tcp_bind: IpAddr,
    /// Allowed public ports for TCP kites (a claim of port 0 gets a free
    /// port of this range).
    pub tcp_ports: (u16, u16),
    /// Whether `CONNECT name:port` on the HTTP port reaches TCP kites (off
    /// by default; never from a listener address outside `tcp_bind`).
    pub http_connect: bool,
    /// The relay's certificate source.
    pub tls: RelayTlsSource,
    /// Public host name of the relay.
    pub name: String,
    /// Heartbeat interval of links.
    pub heartbeat: Duration,
    /// Certificate identities: client CA, revocation list, rules.
    pub identity: IdentityConfig,
    /// Where a reload re-reads `identity` from. `None`: a reload keeps the
    /// rules and rereads only the CA and revocation list files.
    pub reload_from: Option<IdentitySource>,
    /// The event pipe.
    pub events: EventConfig,
}

/// Default time a gateway request waits for an offline node (or a lost
/// link) before answering 503: long enough to ride out a relay restart or
/// a connector's reconnect backoff, short enough for interactive callers.
pub const DEFAULT_EVENT_WAIT: Duration = Duration::from_secs(30);

/// Default time a handler may go without progress (no byte read or
/// written) before it is stopped with 504.
pub const DEFAULT_EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Validated event pipe settings of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventConfig {
    /// Where the gateway listens; `None`: no gateway.
    pub gateway: Option<GatewayAddr>,
    /// Directory of handler executables.
    pub handlers_dir: Option<PathBuf>,
    /// Local HTTP server events are forwarded to when no other handler takes them.
    pub upstream: Option<UpstreamUrl>,
    /// How long a request waits for an offline node or a lost link.
    pub wait: Duration,
    /// How long a handler may go without progress.
    pub timeout: Duration,
    /// The environment handler executables start with (besides the
    /// `KITEPIPE_*` variables of the event): nothing else of the node's
    /// environment reaches them, so no secret leaks into a handler.
    pub handler_env: Vec<(String, String)>,
    /// `Origin`s (lowercase `scheme://host[:port]`) whose requests the
    /// gateway accepts; any other `Origin` is refused (403), so a web page
    /// cannot drive the gateway. Empty by default.
    pub gateway_origins: Vec<String>,
    /// The owner token file: when set, the gateway writes a fresh token
    /// there (mode 0600) at start and every request must carry it in
    /// `X-Kitepipe-Token` (or come over a unix socket from the same uid).
    /// The relay's CLI sets `STATE_DIR/gateway-token`; `None`: every local
    /// user may use the gateway.
    pub gateway_token_file: Option<PathBuf>,
}

/// Name of the relay gateway's owner token file in its state dir.
pub const GATEWAY_TOKEN_FILE: &str = "gateway-token";

impl Default for EventConfig {
    fn default() -> Self {
        EventConfig {
            gateway: Some(GatewayAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 0)))),
            handlers_dir: None,
            upstream: None,
            wait: DEFAULT_EVENT_WAIT,
            timeout: DEFAULT_EVENT_TIMEOUT,
            handler_env: handler_env(&|_| None),
            gateway_origins: Vec::new(),
            gateway_token_file: None,
        }
    }
}

/// `PATH` of handler executables when the node's own is not passed on.
pub const DEFAULT_HANDLER_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Variables of the node's environment that handler executables inherit
/// (see [`EventConfig::handler_env`]).
pub const HANDLER_ENV_INHERITED: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR"];

/// Where a gateway listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayAddr {
    /// A TCP address on loopback.
    Tcp(SocketAddr),
    /// A unix socket path.
    Unix(PathBuf),
}

/// A local HTTP server that handles events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// `host:port` to connect to.
    pub authority: String,
    /// Path prefix, without a trailing `/` (empty for none).
    pub base_path: String,
}

impl std::fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.authority, self.base_path)
    }
}

impl EventConfig {
    /// Validates event settings. Handler executables get only
    /// [`DEFAULT_HANDLER_PATH`]; see [`handler_env`] to pass on more.
    pub fn from_raw(raw: &RawEventConfig) -> Result<EventConfig, ConfigError> {
        let gateway = match raw.gateway.as_deref().map(str::trim) {
            None => EventConfig::default().gateway,
            Some("off") => None,
            Some(text) => Some(parse_gateway(text)?),
        };
        let upstream = raw
            .handler_upstream
            .as_deref()
            .map(parse_upstream)
            .transpose()?;
        Ok(EventConfig {
            gateway,
            handlers_dir: raw.handlers.clone(),
            upstream,
            wait: parse_duration("event-wait", raw.event_wait.as_deref(), DEFAULT_EVENT_WAIT)?,
            timeout: parse_duration(
                "event-timeout",
                raw.event_timeout.as_deref(),
                DEFAULT_EVENT_TIMEOUT,
            )?,
            handler_env: handler_env(&|_| None),
            gateway_origins: raw
                .gateway_origin
                .iter()
                .map(|origin| parse_origin(origin))
                .collect::<Result<_, _>>()?,
            gateway_token_file: None,
        })
    }
}

/// Parses an allowed `Origin`: `scheme://host[:port]`, as browsers send it
/// (no path), compared lowercase.
pub fn parse_origin(text: &str) -> Result<String, ConfigError> {
    let origin = text.trim().to_ascii_lowercase();
    let valid = origin.split_once("://").is_some_and(|(scheme, host)| {
        !scheme.is_empty()
            && scheme.bytes().all(|b| b.is_ascii_lowercase())
            && !host.is_empty()
            && !host.contains('/')
            && host.bytes().all(|b| b.is_ascii_graphic())
    });
    if !valid {
        return Err(ConfigError::Invalid {
            what: "gateway-origin",
            value: text.to_string(),
            why: "expected scheme://host[:port], e.g. https://app.example.net".into(),
        });
    }
    Ok(origin)
}

/// The environment handler executables start with: the node's
/// [`HANDLER_ENV_INHERITED`] variables, looked up through `env`, and
/// [`DEFAULT_HANDLER_PATH`] when it has no `PATH`.
pub fn handler_env(env: &dyn Fn(&str) -> Option<String>) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = HANDLER_ENV_INHERITED
        .iter()
        .filter_map(|key| env(key).map(|value| (key.to_string(), value)))
        .collect();
    if !vars.iter().any(|(key, _)| key == "PATH") {
        vars.push(("PATH".into(), DEFAULT_HANDLER_PATH.into()));
    }
    vars
}

/// Parses a gateway address: `IP:PORT` (loopback only), a bare port on
/// 127.0.0.1, or `unix:PATH`.
pub fn parse_gateway(text: &str) -> Result<GatewayAddr, ConfigError> {
    if let Some(path) = text.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(ConfigError::Invalid {
                what: "gateway",
                value: text.to_string(),
                why: "unix: needs a path, e.g. unix:/run/kitepipe.sock".into(),
            });
        }
        return Ok(GatewayAddr::Unix(PathBuf::from(path)));
    }
    let addr = match text.parse::<u16>() {
        Ok(port) => SocketAddr::from(([127, 0, 0, 1], port)),
        Err(_) => text
            .parse::<SocketAddr>()
            .map_err(|_| ConfigError::Invalid {
                what: "gateway",
                value: text.to_string(),
                why: "expected 127.0.0.1:PORT, a bare port, unix:PATH or off".into(),
            })?,
    };
    if !addr.ip().is_loopback() {
        return Err(ConfigError::Invalid {
            what: "gateway",
            value: text.to_string(),
            why: "the gateway serves whoever can connect to it, so it only binds loopback \
                  (127.0.0.1 or ::1); use unix:PATH to restrict it further"
                .into(),
        });
    }
    Ok(GatewayAddr::Tcp(addr))
}

/// Parses `http://HOST:PORT[/BASE]`.
pub fn parse_upstream(text: &str) -> Result<UpstreamUrl, ConfigError> {
    let invalid = |why: &str| ConfigError::Invalid {
        what: "handler-upstream",
        value: text.to_string(),
        why: why.to_string(),
    };
    let rest = text
        .strip_prefix("http://")
        .ok_or_else(|| invalid("expected http://HOST:PORT[/BASE], e.g. http://127.0.0.1:9000"))?;
    let (authority, base) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
        _ => return Err(invalid("expected HOST:PORT after http://")),
    }
    if base.contains(['?', '#']) || !base.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            "the base path may not hold a query, fragment or spaces",
        ));
    }
    Ok(UpstreamUrl {
        authority: authority.to_string(),
        base_path: base.trim_end_matches('/').to_string(),
    })
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

/// A relay's config file and the flags laid over it, to re-read the
/// identity settings from on reload.
#[derive(Debug, Clone)]
pub struct IdentitySource {
    /// The TOML file.
    pub file: PathBuf,
    /// The command-line settings, which win over the file.
    pub flags: RawRelayConfig,
}

impl IdentitySource {
    /// Reads the file again and validates its identity settings.
    pub fn load(&self) -> Result<IdentityConfig, ConfigError> {
        let raw = RawRelayConfig::from_file(&self.file)?.merge(self.flags.clone());
        IdentityConfig::from_raw(&raw)
    }
}

impl IdentityConfig {
    /// Validates the identity settings of `raw`.
    pub fn from_raw(raw: &RawRelayConfig) -> Result<IdentityConfig, ConfigError> {
        let crl = match (&raw.crl, &raw.client_ca) {
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
pub fn parse_allow_rule(raw: &RawAllowRule) -> Result<AllowRule, ConfigError> {
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

/// One listening socket and the roles it serves; several roles on one
/// address make a one-port relay (told apart by the first bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Address to bind.
    pub addr: SocketAddr,
    /// Accept connector links (TLS with ALPN `kitepipe/1`).
    pub link: bool,
    /// Accept visitors' HTTP.
    pub http: bool,
    /// Accept visitors' HTTPS (SNI passthrough).
    pub https: bool,
}

/// Where the relay's certificate comes from.
#[derive(Debug, Clone)]
pub enum RelayTlsSource {
    /// Self-signed, created on first start and kept in this directory.
    StateDir(PathBuf),
    /// Given PEM files.
    Files {
        /// Certificate chain.
        cert: PathBuf,
        /// Private key.
        key: PathBuf,
    },
}

/// The default node name of a connector that holds a domain secret and no
/// certificate: one its secret can prove (the relay accepts only node
/// names under a domain whose secret the connector proves), i.e. its first
/// secret kite's name, or `HOST.REST` for a wildcard kite `*.REST`.
fn provable_node_name(kites: &[KiteTarget], host: Option<&str>) -> Option<String> {
    let kite = kites.iter().find(|kite| kite.secret.is_some())?;
    match kite.kite.name.strip_prefix("*.") {
        None => Some(kite.kite.name.clone()),
        Some(rest) => {
            let label: String = host
                .unwrap_or("connector")
                .split('.')
                .next()
                .unwrap_or("connector")
                .to_ascii_lowercase()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            let label = if label.is_empty() {
                "connector".to_string()
            } else {
                label
            };
            Some(format!("{label}.{rest}"))
        }
    }
}

/// A domain connectors may claim kites in, with its shared secret.
#[derive(Debug, Clone)]
pub struct Domain {
    /// Protocols allowed.
    pub protos: Vec<KiteProto>,
    /// Name or `*.` pattern.
    pub pattern: String,
    /// Shared secret proving the right to claim.
    pub secret: Secret,
}

/// Connector settings as written (TOML file and flags).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConnectorConfig {
    /// Relays to link to, `host:port` each.
    #[serde(default)]
    pub relay: Vec<String>,
    /// Kites: `PROTO:NAME[:PORT]=TARGET`.
    #[serde(default)]
    pub kite: Vec<String>,
    /// Shared secret for the kites' domain.
    pub secret: Option<String>,
    /// File holding the shared secret (surrounding whitespace ignored),
    /// instead of `secret`.
    pub secret_file: Option<PathBuf>,
    /// Pinned relay certificate fingerprints: one for all relays, or one
    /// per relay in the same order.
    #[serde(default)]
    pub fingerprint: Vec<String>,
    /// CA certificate (PEM) the relay's certificate must chain to.
    pub ca: Option<PathBuf>,
    /// This connector's node name (default: the certificate's name; with a
    /// secret, the first secret kite's name, which the secret can prove;
    /// else the host name).
    pub name: Option<String>,
    /// Heartbeat interval, e.g. `15s`.
    pub heartbeat: Option<String>,
    /// Ceiling of the reconnect backoff, e.g. `15s`.
    pub max_backoff: Option<String>,
    /// Identity directory written by `kitepipe ca issue` (`cert.pem`,
    /// `key.pem`, `ca.pem`).
    pub identity: Option<PathBuf>,
    /// This connector's certificate chain (PEM), instead of `identity`.
    pub cert: Option<PathBuf>,
    /// Private key (PEM) for `cert`.
    pub key: Option<PathBuf>,
    /// Event gateway address: `IP:PORT` on loopback, `unix:PATH`, or `off`.
    pub gateway: Option<String>,
    /// Directory of event handler executables.
    pub handlers: Option<PathBuf>,
    /// Local HTTP server that handles events, `http://127.0.0.1:PORT[/BASE]`.
    pub handler_upstream: Option<String>,
    /// How long an event waits for an offline node, e.g. `30s`.
    pub event_wait: Option<String>,
    /// How long a handler may go without progress, e.g. `30s`.
    pub event_timeout: Option<String>,
    /// Kinds of remote operations accepted from the relay (`exec,fs,forward`
    /// or `all`); none unless given.
    pub allow_remote: Option<String>,
    /// `Origin`s (`scheme://host[:port]`) whose browser requests the
    /// gateway accepts; none by default.
    #[serde(default)]
    pub gateway_origin: Vec<String>,
}

/// A validated connector configuration.
#[derive(Debug, Clone)]
pub struct ConnectorConfig {
    /// Relays to keep a link to.
    pub relays: Vec<RelayTarget>,
    /// Kites to serve.
    pub kites: Vec<KiteTarget>,
    /// Node name.
    pub name: String,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Ceiling of the reconnect backoff.
    pub max_backoff: Duration,
    /// The certificate and key presented to relays that ask for one.
    pub identity: Option<NodeIdentity>,
    /// The event pipe.
    pub events: EventConfig,
    /// Kinds of remote operations accepted from relays (empty: none).
    pub allow_remote: Vec<RemoteClass>,
    /// The domain secret (`--secret`), kites or not: it also proves the
    /// node name (a connector without kites can still be reached by name).
    pub node_secret: Option<Secret>,
    /// What relayed file operations may do and never reach.
    pub remote_fs: RemoteFsConfig,
}

/// What relayed file operations may do on a connector, besides the kinds
/// in `allow_remote`.
#[derive(Debug, Clone, Default)]
pub struct RemoteFsConfig {
    /// `fs` was granted (every file operation; as good as `exec`, since
    /// writing files as the connector's user runs code through cron,
    /// shell profiles or authorized keys); false with `fs-read` only.
    pub write: bool,
    /// Paths relayed file operations never reach, each with what it is:
    /// the handlers directory, identity files, the config file, and any
    /// file a secret was read from.
    pub protected: Vec<(PathBuf, String)>,
}

/// Parses `--allow-remote`: `exec`, `fs`, `fs-read` (read, ls and stat
/// only), `forward` or `all`, comma-separated. `fs-read` is offered to
/// relays as `fs` and narrowed on the connector.
pub fn parse_allow_remote(text: &str) -> Result<(Vec<RemoteClass>, bool), ConfigError> {
    let invalid = |why: String| ConfigError::Invalid {
        what: "allow-remote",
        value: text.to_string(),
        why,
    };
    let words: Vec<&str> = text
        .split(',')
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .collect();
    let read_only = words.iter().any(|w| w.eq_ignore_ascii_case("fs-read"));
    let rest: Vec<&str> = words
        .iter()
        .copied()
        .filter(|w| !w.eq_ignore_ascii_case("fs-read"))
        .collect();
    let mut classes = if rest.is_empty() && read_only {
        Vec::new()
    } else {
        RemoteClass::parse_list(&rest.join(",")).map_err(|why| {
            invalid(why.replace(
                "exec, fs, forward or all",
                "exec, fs, fs-read, forward or all",
            ))
        })?
    };
    let write = classes.contains(&RemoteClass::Fs);
    if read_only {
        classes.push(RemoteClass::Fs);
        classes.sort();
        classes.dedup();
    }
    Ok((classes, write))
}

/// A relay to link to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTarget {
    /// `host:port` as given.
    pub addr: String,
    /// Host part, used as TLS server name.
    pub host: String,
    /// How to verify this relay.
    pub trust: RelayTrust,
}

/// A kite and the local address that serves it.
#[derive(Debug, Clone)]
pub struct KiteTarget {
    /// The kite.
    pub kite: KiteRef,
    /// Local `host:port` visitors are connected to.
    pub target: String,
    /// Secret proving the right to the kite's name; `None` when the
    /// connector's certificate identity is what authorizes it.
    pub secret: Option<Secret>,
}

impl RawRelayConfig {
    /// Reads a TOML file; one holding domain secrets is checked like a
    /// secret file (tightened to 0600 if this user's, else warned about).
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let raw: RawRelayConfig = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        if !raw.domain.is_empty() {
            protect_config_file(path)?;
        }
        Ok(raw)
    }

    /// Overlays `flags` on `self`: every setting given on the command line wins.
    pub fn merge(mut self, flags: RawRelayConfig) -> RawRelayConfig {
        merge_vec(&mut self.listen, flags.listen);
        merge_vec(&mut self.http, flags.http);
        merge_vec(&mut self.https, flags.https);
        merge_vec(&mut self.domain, flags.domain);
        merge_opt(&mut self.domain_file, flags.domain_file);
        merge_opt(&mut self.tcp_bind, flags.tcp_bind);
        merge_opt(&mut self.tcp_ports, flags.tcp_ports);
        merge_opt(&mut self.http_connect, flags.http_connect);
        merge_opt(&mut self.state_dir, flags.state_dir);
        merge_opt(&mut self.cert, flags.cert);
        merge_opt(&mut self.key, flags.key);
        merge_opt(&mut self.name, flags.name);
        merge_opt(&mut self.heartbeat, flags.heartbeat);
        merge_opt(&mut self.client_ca, flags.client_ca);
        merge_opt(&mut self.crl, flags.crl);
        merge_vec(&mut self.cert_domain, flags.cert_domain);
        merge_vec(&mut self.allow, flags.allow);
        merge_vec(&mut self.remote, flags.remote);
        merge_opt(&mut self.gateway, flags.gateway);
        merge_opt(&mut self.handlers, flags.handlers);
        merge_opt(&mut self.handler_upstream, flags.handler_upstream);
        merge_opt(&mut self.event_wait, flags.event_wait);
        merge_opt(&mut self.event_timeout, flags.event_timeout);
        merge_vec(&mut self.gateway_origin, flags.gateway_origin);
        merge_opt(&mut self.gateway_token_file, flags.gateway_token_file);
        merge_opt(
            &mut self.insecure_gateway_without_token,
            flags.insecure_gateway_without_token,
        );
        self
    }
}

impl RawConnectorConfig {
    /// Reads a TOML file; one holding the secret is checked like a secret
    /// file (tightened to 0600 if this user's, else warned about).
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let raw: RawConnectorConfig =
            toml::from_str(&text).map_err(|source| ConfigError::Parse {
                path: path.to_path_buf(),
                source,
            })?;
        if raw.secret.is_some() {
            protect_config_file(path)?;
        }
        Ok(raw)
    }

    /// Overlays `flags` on `self`: every setting given on the command line wins.
    pub fn merge(mut self, flags: RawConnectorConfig) -> RawConnectorConfig {
        merge_vec(&mut self.relay, flags.relay);
        merge_vec(&mut self.kite, flags.kite);
        // The secret and its file are one setting: either from the flags
        // (or KITEPIPE_SECRET) replaces both from the file.
        if flags.secret.is_some() || flags.secret_file.is_some() {
            self.secret = flags.secret;
            self.secret_file = flags.secret_file;
        }
        merge_vec(&mut self.fingerprint, flags.fingerprint);
        merge_opt(&mut self.ca, flags.ca);
        merge_opt(&mut self.name, flags.name);
        merge_opt(&mut self.heartbeat, flags.heartbeat);
        merge_opt(&mut self.max_backoff, flags.max_backoff);
        merge_opt(&mut self.identity, flags.identity);
        merge_opt(&mut self.cert, flags.cert);
        merge_opt(&mut self.key, flags.key);
        merge_opt(&mut self.gateway, flags.gateway);
        merge_opt(&mut self.handlers, flags.handlers);
        merge_opt(&mut self.handler_upstream, flags.handler_upstream);
        merge_opt(&mut self.event_wait, flags.event_wait);
        merge_opt(&mut self.event_timeout, flags.event_timeout);
        merge_opt(&mut self.allow_remote, flags.allow_remote);
        merge_vec(&mut self.gateway_origin, flags.gateway_origin);
        self
    }
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

/// Default state directory of a relay: `$XDG_STATE_HOME/kitepipe` or
/// `$HOME/.local/state/kitepipe`, looked up through `env`.
pub fn default_state_dir(env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    if let Some(dir) = env("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("kitepipe");
    }
    match env("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/state/kitepipe"),
        None => PathBuf::from(".kitepipe"),
    }
}

impl TryFrom<RawRelayConfig> for RelayConfig {
    type Error = ConfigError;

    fn try_from(raw: RawRelayConfig) -> Result<Self, Self::Error> {
        let identity = IdentityConfig::from_raw(&raw)?;
        let raw_events = RawEventConfig {
            gateway: raw.gateway.clone(),
            handlers: raw.handlers.clone(),
            handler_upstream: raw.handler_upstream.clone(),
            event_wait: raw.event_wait.clone(),
            event_timeout: raw.event_timeout.clone(),
            gateway_origin: raw.gateway_origin.clone(),
        };
        let mut listeners: Vec<ListenerConfig> = Vec::new();
        let roles: [(&Vec<String>, &'static str); 3] = [
            (&raw.listen, "listen"),
            (&raw.http, "http"),
            (&raw.https, "https"),
        ];
        for (addrs, role) in roles {
            for text in addrs {
                let addr = parse_socket_addr(role, text)?;
                // Port 0 asks for a fresh port each time: never merge those.
                let same = |l: &&mut ListenerConfig| l.addr == addr && addr.port() != 0;
                let entry = match listeners.iter_mut().find(same) {
                    Some(entry) => entry,
                    None => {
                        listeners.push(ListenerConfig {
                            addr,
                            link: false,
                            http: false,
                            https: false,
                        });
                        listeners.last_mut().expect("just pushed")
                    }
                };
                match role {
                    "listen" => entry.link = true,
                    "http" => entry.http = true,
                    _ => entry.https = true,
                }
            }
        }
        if !listeners.iter().any(|l| l.link) {
            return Err(ConfigError::Missing(
                "the relay needs a --listen address for connectors' links",
            ));
        }
        let mut domains = raw
            .domain
            .iter()
            .map(|d| parse_domain(d))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(path) = &raw.domain_file {
            domains.extend(read_domain_file(path)?);
        }
        for domain in &domains {
            check_secret_strength(&domain.secret, || format!("{}:***", domain.pattern))?;
        }
        let tcp_bind = match &raw.tcp_bind {
            Some(text) => text.parse().map_err(|_| ConfigError::Invalid {
                what: "tcp-bind",
                value: text.clone(),
                why: "expected an IP address such as 0.0.0.0".into(),
            })?,
            None => IpAddr::from([0, 0, 0, 0]),
        };
        let tcp_ports = match &raw.tcp_ports {
            Some(text) => parse_port_range(text)?,
            None => (1024, 65535),
        };
        let mut events = EventConfig::from_raw(&raw_events)?;
        if !raw.insecure_gateway_without_token.unwrap_or(false) {
            events.gateway_token_file = Some(raw.gateway_token_file.clone().unwrap_or_else(|| {
                raw.state_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(".kitepipe"))
                    .join(GATEWAY_TOKEN_FILE)
            }));
        }
        let tls = match (raw.cert, raw.key) {
            (Some(cert), Some(key)) => RelayTlsSource::Files { cert, key },
            (None, None) => RelayTlsSource::StateDir(
                // The CLI fills in default_state_dir(); a library caller
                // that gives none gets a directory beside the process.
                raw.state_dir.unwrap_or_else(|| PathBuf::from(".kitepipe")),
            ),
            _ => {
                return Err(ConfigError::Missing(
                    "--cert and --key go together: give both, or neither for a self-signed certificate",
                ));
            }
        };
        Ok(RelayConfig {
            listeners,
            domains,
            tcp_bind,
            tcp_ports,
            http_connect: raw.http_connect.unwrap_or(false),
            tls,
            name: raw.name.unwrap_or_else(|| "localhost".into()),
            heartbeat: parse_duration("heartbeat", raw.heartbeat.as_deref(), DEFAULT_HEARTBEAT)?,
            identity,
            reload_from: None,
            events,
        })
    }
}

impl TryFrom<RawConnectorConfig> for ConnectorConfig {
    type Error = ConfigError;

    fn try_from(raw: RawConnectorConfig) -> Result<Self, Self::Error> {
        if raw.relay.is_empty() {
            return Err(ConfigError::Missing(
                "give at least one relay address (host:port)",
            ));
        }
        let (identity, identity_ca) = load_identity(&raw)?;
        let raw_events = RawEventConfig {
            gateway: raw.gateway.clone(),
            handlers: raw.handlers.clone(),
            handler_upstream: raw.handler_upstream.clone(),
            event_wait: raw.event_wait.clone(),
            event_timeout: raw.event_timeout.clone(),
            gateway_origin: raw.gateway_origin.clone(),
        };
        let secret = match (raw.secret, &raw.secret_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Missing(
                    "give either the secret or a secret file (--secret-file), not both",
                ));
            }
            (Some(text), None) => Some(Secret::new(text)),
            (None, Some(path)) => Some(read_connector_secret(path)?),
            (None, None) => None,
        };
        if let Some(secret) = &secret {
            check_secret_strength(secret, || "***".to_string())?;
        }
        let mut kites = Vec::new();
        for spec in &raw.kite {
            let (kite, target) = parse_kite_target(spec)?;
            if secret.is_none() && identity.is_none() {
                return Err(ConfigError::Missing(
                    "kites need the domain's shared secret (--secret-file, KITEPIPE_SECRET or --secret) \
                     or a certificate (--identity DIR)",
                ));
            }
            let secret = secret.clone();
            kites.push(KiteTarget {
                kite,
                target,
                secret,
            });
        }
        let pins = raw
            .fingerprint
            .iter()
            .map(|text| {
                text.parse::<Fingerprint>()
                    .map_err(|err| ConfigError::Invalid {
                        what: "fingerprint",
                        value: text.clone(),
                        why: err.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let trust_for = |index: usize| -> Result<RelayTrust, ConfigError> {
            match (pins.len(), &raw.ca) {
                (0, Some(path)) => Ok(RelayTrust::Ca(path.clone())),
                (0, None) => match &identity_ca {
                    Some(path) => Ok(RelayTrust::Ca(path.clone())),
                    None => Err(ConfigError::Missing(
                        "the connector must verify the relay: pass --fingerprint SHA256:... (the relay prints it at start) or --ca FILE",
                    )),
                },
                (_, Some(_)) => Err(ConfigError::Missing(
                    "give either --fingerprint or --ca to verify the relay, not both",
                )),
                (1, None) => Ok(RelayTrust::Pinned(pins[0])),
                (n, None) if n == raw.relay.len() => Ok(RelayTrust::Pinned(pins[index])),
                _ => Err(ConfigError::Missing(
                    "give one --fingerprint for all relays, or one per relay in the same order",
                )),
            }
        };
        let relays = raw
            .relay
            .iter()
            .enumerate()
            .map(|(index, text)| parse_relay_target(text, trust_for(index)?))
            .collect::<Result<Vec<_>, _>>()?;
        let (allow_remote, fs_write) = match raw.allow_remote.as_deref() {
            None => (Vec::new(), false),
            Some(text) => parse_allow_remote(text)?,
        };
        let remote_fs = RemoteFsConfig {
            write: fs_write,
            protected: [
                (&raw.handlers, "the handlers directory"),
                (&raw.identity, "the identity directory"),
                (&raw.cert, "the certificate"),
                (&raw.key, "the private key"),
                (&raw.ca, "the relay CA file"),
            ]
            .into_iter()
            .filter_map(|(path, what)| Some((path.clone()?, what.to_string())))
            .collect(),
        };
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty());
        let name = raw
            .name
            .or_else(|| identity.as_ref().map(|id| id.info().name.clone()))
            .or_else(|| provable_node_name(&kites, host.as_deref()))
            .or(host)
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "connector".into());
        Ok(ConnectorConfig {
            relays,
            kites,
            name,
            heartbeat: parse_duration("heartbeat", raw.heartbeat.as_deref(), DEFAULT_HEARTBEAT)?,
            max_backoff: parse_duration(
                "max-backoff",
                raw.max_backoff.as_deref(),
                DEFAULT_MAX_BACKOFF,
            )?,
            identity,
            events: EventConfig::from_raw(&raw_events)?,
            allow_remote,
            remote_fs,
            node_secret: secret,
        })
    }
}

/// Loads the connector's certificate and key, from `--identity DIR` or
/// `--cert`/`--key`. Also returns `DIR/ca.pem` if it exists: relays are
/// verified against it when no fingerprint or CA file is given.
fn load_identity(
    raw: &RawConnectorConfig,
) -> Result<(Option<NodeIdentity>, Option<PathBuf>), ConfigError> {
    match (&raw.identity, &raw.cert, &raw.key) {
        (None, None, None) => Ok((None, None)),
        (Some(dir), None, None) => {
            let identity = NodeIdentity::load_dir(dir).map_err(|source| ConfigError::Identity {
                path: dir.clone(),
                source,
            })?;
            let ca = dir.join(IDENTITY_CA_FILE);
            let ca = ca.is_file().then_some(ca);
            Ok((Some(identity), ca))
        }
        (None, Some(cert), Some(key)) => {
            let identity =
                NodeIdentity::load(cert, key).map_err(|source| ConfigError::Identity {
                    path: cert.clone(),
                    source,
                })?;
            Ok((Some(identity), None))
        }
        (Some(_), _, _) => Err(ConfigError::Missing(
            "give either --identity DIR or --cert/--key, not both",
        )),
        _ => Err(ConfigError::Missing(
            "--cert and --key go together: give both (or --identity DIR)",
        )),
    }
}

fn protect_config_file(path: &std::path::Path) -> Result<(), ConfigError> {
    protect_secret_file(path).map_err(|source| ConfigError::SecretFile {
        path: path.to_path_buf(),
        source,
    })
}

/// Refuses a secret below the minimum strength and warns about a weak
/// one; `masked` names it in messages without quoting it.
fn check_secret_strength(secret: &Secret, masked: impl Fn() -> String) -> Result<(), ConfigError> {
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

/// Reads `--domain-file`: one `PROTOS:PATTERN:SECRET` per line; blank
/// lines and lines starting with `#` are skipped.
fn read_domain_file(path: &std::path::Path) -> Result<Vec<Domain>, ConfigError> {
    let text = read_secret_file(path).map_err(|source| ConfigError::SecretFile {
        path: path.to_path_buf(),
        source,
    })?;
    let mut domains = Vec::new();
    for (index, line) in text.expose().lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let domain = parse_domain(line).map_err(|err| ConfigError::Invalid {
            what: "domain-file line",
            value: format!("{}:{}", path.display(), index + 1),
            // parse_domain's message never quotes the secret.
            why: err.to_string(),
        })?;
        domains.push(domain);
    }
    Ok(domains)
}

/// Reads `--secret-file`: the whole file, surrounding whitespace ignored.
fn read_connector_secret(path: &std::path::Path) -> Result<Secret, ConfigError> {
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

/// Parses `PROTOS:PATTERN:SECRET`, e.g. `http,tcp:*.example.net:s3cret`.
pub fn parse_domain(text: &str) -> Result<Domain, ConfigError> {
    let invalid = |why: &str| ConfigError::Invalid {
        what: "domain",
        // Never echo the secret.
        value: text.split(':').take(2).collect::<Vec<_>>().join(":") + ":***",
        why: why.to_string(),
    };
    let mut parts = text.splitn(3, ':');
    let (Some(protos), Some(pattern), Some(secret)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid(
            "expected PROTOS:NAME:SECRET, e.g. http,tcp:*.example.net:SECRET",
        ));
    };
    let protos = protos
        .split(',')
        .map(|p| p.trim().parse::<KiteProto>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| invalid(&err.to_string()))?;
    let pattern = kite::normalize_name(pattern).map_err(|err| invalid(&err.to_string()))?;
    if secret.is_empty() {
        return Err(invalid("the secret is empty"));
    }
    Ok(Domain {
        protos,
        pattern,
        secret: Secret::new(secret),
    })
}

/// Parses `PROTO:NAME[:PORT]=TARGET`; TARGET is `host:port` or a bare port on 127.0.0.1.
pub fn parse_kite_target(text: &str) -> Result<(KiteRef, String), ConfigError> {
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

fn parse_relay_target(text: &str, trust: RelayTrust) -> Result<RelayTarget, ConfigError> {
    let invalid = || ConfigError::Invalid {
        what: "relay address",
        value: text.to_string(),
        why: "expected host:port, e.g. relay.example.net:8443".into(),
    };
    let (host, port) = text.rsplit_once(':').ok_or_else(invalid)?;
    port.parse::<u16>().map_err(|_| invalid())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(invalid());
    }
    Ok(RelayTarget {
        addr: text.to_string(),
        host: host.to_string(),
        trust,
    })
}

fn parse_socket_addr(what: &'static str, text: &str) -> Result<SocketAddr, ConfigError> {
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

fn parse_port_range(text: &str) -> Result<(u16, u16), ConfigError> {
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
pub fn parse_duration(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(raw: RawRelayConfig) -> Result<RelayConfig, ConfigError> {
        RelayConfig::try_from(RawRelayConfig {
            state_dir: Some("/nonexistent".into()),
            ..raw
        })
    }

    #[test]
    fn roles_on_one_address_share_a_listener() {
        let config = relay(RawRelayConfig {
            listen: vec!["127.0.0.1:443".into()],
            http: vec!["127.0.0.1:80".into(), "127.0.0.1:443".into()],
            https: vec!["443".into()],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(config.listeners.len(), 3);
        let shared = &config.listeners[0];
        assert!(shared.link && shared.http && !shared.https);
        assert!(config.listeners[2].https && config.listeners[2].addr.ip().is_unspecified());
    }

    #[test]
    fn port_zero_listeners_stay_separate() {
        let config = relay(RawRelayConfig {
            listen: vec!["127.0.0.1:0".into()],
            http: vec!["127.0.0.1:0".into()],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(config.listeners.len(), 2);
    }

    #[test]
    fn a_relay_without_a_link_listener_is_refused() {
        let err = relay(RawRelayConfig {
            http: vec!["127.0.0.1:80".into()],
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("--listen"), "{err}");
    }

    #[test]
    fn domains() {
        let d = parse_domain("http,tcp:*.Example.net:se:cret").unwrap();
        assert_eq!(d.protos, vec![KiteProto::Http, KiteProto::Tcp]);
        assert_eq!(d.pattern, "*.example.net");
        assert_eq!(d.secret.expose(), "se:cret");
        for bad in [
            "http:*.example.net",
            "ftp:x.net:s3kr1t",
            "http:bad name:s3kr1t",
            "http:x.net:",
        ] {
            let err = parse_domain(bad).unwrap_err().to_string();
            assert!(!err.contains("s3kr1t"), "secret leaked: {err}");
        }
    }

    #[test]
    fn kite_targets() {
        let (kite, target) = parse_kite_target("http:blog.example.net=8000").unwrap();
        assert_eq!(
            (kite.name.as_str(), target.as_str()),
            ("blog.example.net", "127.0.0.1:8000")
        );
        let (kite, target) = parse_kite_target("tcp:db.example.net:15432=db.lan:5432").unwrap();
        assert_eq!((kite.port, target.as_str()), (15432, "db.lan:5432"));
        for bad in [
            "http:blog.example.net",
            "http:blog.example.net=",
            "http:x.net=host",
        ] {
            assert!(parse_kite_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn connector_must_verify_the_relay() {
        let raw = RawConnectorConfig {
            relay: vec!["relay.example.net:8443".into()],
            ..Default::default()
        };
        let err = ConnectorConfig::try_from(raw).unwrap_err().to_string();
        assert!(
            err.contains("--fingerprint") && err.contains("--ca"),
            "{err}"
        );
    }

    #[test]
    fn fingerprints_pin_all_relays_or_each_in_order() {
        let a = "SHA256:".to_string() + &"aa".repeat(32);
        let b = "SHA256:".to_string() + &"bb".repeat(32);
        let raw = |pins: Vec<String>| RawConnectorConfig {
            relay: vec!["r1:1".into(), "r2:2".into()],
            fingerprint: pins,
            ..Default::default()
        };
        let one = ConnectorConfig::try_from(raw(vec![a.clone()])).unwrap();
        assert_eq!(one.relays[0].trust, one.relays[1].trust);
        let each = ConnectorConfig::try_from(raw(vec![a.clone(), b.clone()])).unwrap();
        assert_eq!(each.relays[0].trust, RelayTrust::Pinned(a.parse().unwrap()));
        assert_eq!(each.relays[1].trust, RelayTrust::Pinned(b.parse().unwrap()));
        let three = ConnectorConfig::try_from(raw(vec![a.clone(), b, a])).unwrap_err();
        assert!(three.to_string().contains("one per relay"), "{three}");
    }

    #[test]
    fn file_values_are_overridden_by_flags() {
        let file: RawConnectorConfig = toml::from_str(
            "relay = [\"a:1\"]\nkite = [\"http:x.net=80\"]\nsecret = \"s\"\nheartbeat = \"5s\"",
        )
        .unwrap();
        let merged = file.merge(RawConnectorConfig {
            relay: vec!["b:2".into()],
            ..Default::default()
        });
        assert_eq!(merged.relay, vec!["b:2"]);
        assert_eq!(merged.kite, vec!["http:x.net=80"]);
        assert_eq!(merged.heartbeat.as_deref(), Some("5s"));
        let unknown = toml::from_str::<RawConnectorConfig>("relays = []");
        assert!(unknown.is_err());
    }

    #[test]
    fn remote_rules_from_toml_and_flags_and_connector_opt_in() {
        let raw: RawRelayConfig = toml::from_str(
            r#"
            listen = ["127.0.0.1:0"]
            domain = ["http:*.example.net:s3cret-long-enough"]

            [[remote]]
            nodes = ["ci-*", "Laptop"]
            ops = ["exec", "fs"]
            "#,
        )
        .unwrap();
        let flag = RawRemoteRule::from_flag("build-*:forward").unwrap();
        let raw = raw.merge(RawRelayConfig {
            remote: vec![],
            ..Default::default()
        });
        let mut with_flag = raw.clone();
        with_flag.remote.push(flag);
        let rules = relay(with_flag).unwrap().identity.rules;
        assert_eq!(
            rules.remote_grants("ci-3"),
            [RemoteClass::Exec, RemoteClass::Fs]
        );
        assert_eq!(
            rules.remote_grants("laptop"),
            [RemoteClass::Exec, RemoteClass::Fs]
        );
        assert_eq!(rules.remote_grants("build-1"), [RemoteClass::Forward]);
        assert!(rules.remote_grants("desktop").is_empty(), "no default rule");

        // Bad rules say what is wrong.
        for (nodes, ops, needle) in [
            (vec!["lap top"], vec!["exec"], "bad identity pattern"),
            (
                vec!["laptop"],
                vec!["shell"],
                "unknown remote operation kind",
            ),
            (vec![], vec!["exec"], "at least one node"),
            (vec!["laptop"], vec![], "no remote operation kind"),
        ] {
            let rule = RawRemoteRule {
                nodes: nodes.into_iter().map(String::from).collect(),
                ops: ops.into_iter().map(String::from).collect(),
            };
            let err = parse_remote_rule(&rule).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
        assert!(RawRemoteRule::from_flag("laptop").is_err());
        let unknown = toml::from_str::<RawRelayConfig>("[[remote]]\nnodes = [\"x\"]\nop = []");
        assert!(unknown.is_err(), "unknown keys in [[remote]] are refused");

        let connector = |allow: Option<&str>| {
            ConnectorConfig::try_from(RawConnectorConfig {
                relay: vec!["relay.example.net:443".into()],
                fingerprint: vec![format!("sha256:{}", "ab".repeat(32))],
                allow_remote: allow.map(String::from),
                ..Default::default()
            })
        };
        assert!(
            connector(None).unwrap().allow_remote.is_empty(),
            "off by default"
        );
        assert_eq!(
            connector(Some("fs,exec")).unwrap().allow_remote,
            [RemoteClass::Exec, RemoteClass::Fs]
        );
        let err = connector(Some("root")).unwrap_err().to_string();
        assert!(err.contains("allow-remote"), "{err}");
    }

    /// `fs-read` is offered as `fs` and narrowed on the connector; `fs`
    /// (or `all`) grants writing, whatever else is listed.
    #[test]
    fn allow_remote_fs_read_is_fs_without_writing() {
        use RemoteClass::{Exec, Forward, Fs};
        for (text, classes, write) in [
            ("fs-read", vec![Fs], false),
            ("exec,fs-read", vec![Exec, Fs], false),
            ("fs", vec![Fs], true),
            ("fs-read,fs", vec![Fs], true),
            ("all", vec![Exec, Fs, Forward], true),
            ("FS-READ, forward", vec![Fs, Forward], false),
        ] {
            assert_eq!(
                parse_allow_remote(text).unwrap(),
                (classes, write),
                "{text}"
            );
        }
        let err = parse_allow_remote("fs-write").unwrap_err().to_string();
        assert!(err.contains("allow-remote"), "{err}");
    }

    #[test]
    fn identity_settings_from_toml() {
        let raw: RawRelayConfig = toml::from_str(
            r#"
            listen = ["127.0.0.1:0"]
            client_ca = "/etc/kitepipe/ca/ca-cert.pem"
            cert_domain = ["Example.net"]

            [[allow]]
            identity = "ci-*"
            kites = ["http,https:{name}.ci.example.org", "tcp:db.example.org:15432"]
            handlers = ["time"]
            peers = ["laptop"]
            "#,
        )
        .unwrap();
        let config = relay(raw).unwrap();
        let identity = &config.identity;
        assert_eq!(
            identity.crl,
            Some(CrlSource::BesideCa("/etc/kitepipe/ca/crl.pem".into()))
        );
        assert_eq!(identity.rules.cert_domains(), ["example.net"]);
        let kite = |spec| KiteRef::parse(spec).unwrap();
        assert!(
            identity
                .rules
                .allows("laptop", &kite("http:laptop.example.net"))
        );
        assert!(
            identity
                .rules
                .allows("ci-3", &kite("https:ci-3.ci.example.org"))
        );
        assert!(
            !identity
                .rules
                .allows("ci-3", &kite("https:ci-4.ci.example.org"))
        );
        assert_eq!(identity.rules.allow_rules()[0].handlers, ["time"]);
        let unknown = toml::from_str::<RawRelayConfig>("[[allow]]\nidentity = \"x\"\nkite = []");
        assert!(unknown.is_err(), "unknown keys in [[allow]] are refused");
    }

    #[test]
    fn identity_settings_are_checked() {
        let base = || RawRelayConfig {
            listen: vec!["127.0.0.1:0".into()],
            ..Default::default()
        };
        let rule = |identity: &str, kites: &[&str]| RawAllowRule {
            identity: identity.into(),
            kites: kites.iter().map(|k| k.to_string()).collect(),
            ..Default::default()
        };
        let cases: Vec<(RawRelayConfig, &str)> = vec![
            (
                RawRelayConfig {
                    crl: Some("crl.pem".into()),
                    ..base()
                },
                "--crl needs --client-ca",
            ),
            (
                RawRelayConfig {
                    cert_domain: vec!["example.net".into()],
                    ..base()
                },
                "set --client-ca",
            ),
            (
                RawRelayConfig {
                    client_ca: Some("ca.pem".into()),
                    cert_domain: vec!["*.example.net".into()],
                    ..base()
                },
                "no wildcard",
            ),
            (
                RawRelayConfig {
                    client_ca: Some("ca.pem".into()),
                    allow: vec![rule("lap top", &[])],
                    ..base()
                },
                "bad identity pattern",
            ),
            (
                RawRelayConfig {
                    client_ca: Some("ca.pem".into()),
                    allow: vec![rule("laptop", &["http:x.example.net:80"])],
                    ..base()
                },
                "only tcp patterns take a port",
            ),
        ];
        for (raw, needle) in cases {
            let err = relay(raw).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
        let explicit = relay(RawRelayConfig {
            client_ca: Some("ca.pem".into()),
            crl: Some("/var/lib/crl.pem".into()),
            ..base()
        })
        .unwrap();
        assert_eq!(
            explicit.identity.crl,
            Some(CrlSource::File("/var/lib/crl.pem".into()))
        );
    }

    #[test]
    fn event_settings() {
        let ok = [
            (
                "127.0.0.1:0",
                GatewayAddr::Tcp("127.0.0.1:0".parse().unwrap()),
            ),
            ("8089", GatewayAddr::Tcp("127.0.0.1:8089".parse().unwrap())),
            (
                "[::1]:8089",
                GatewayAddr::Tcp("[::1]:8089".parse().unwrap()),
            ),
            (
                "unix:/run/kp.sock",
                GatewayAddr::Unix("/run/kp.sock".into()),
            ),
        ];
        for (text, expected) in ok {
            assert_eq!(parse_gateway(text).unwrap(), expected, "{text}");
        }
        for bad in ["0.0.0.0:8089", "192.0.2.1:80", "unix:", "localhost:80", "x"] {
            assert!(parse_gateway(bad).is_err(), "{bad}");
        }
        let url = parse_upstream("http://127.0.0.1:9000/api/").unwrap();
        assert_eq!(
            (url.authority.as_str(), url.base_path.as_str()),
            ("127.0.0.1:9000", "/api")
        );
        assert_eq!(url.to_string(), "http://127.0.0.1:9000/api");
        for bad in [
            "https://127.0.0.1:9000",
            "http://127.0.0.1",
            "http://:80",
            "http://h:1/a?b",
        ] {
            assert!(parse_upstream(bad).is_err(), "{bad}");
        }
        let raw: RawConnectorConfig = toml::from_str(
            "relay = [\"r:1\"]\nfingerprint = [\"SHA256:AAAA\"]\ngateway = \"off\"\n\
             handlers = \"/srv/handlers\"\nevent_wait = \"5s\"\nevent_timeout = \"1m\"\n",
        )
        .unwrap();
        let raw = RawConnectorConfig {
            fingerprint: vec!["SHA256:".to_string() + &"aa".repeat(32)],
            ..raw
        };
        let config = ConnectorConfig::try_from(raw).unwrap();
        assert_eq!(config.events.gateway, None);
        assert_eq!(config.events.handlers_dir, Some("/srv/handlers".into()));
        assert_eq!(config.events.wait, Duration::from_secs(5));
        assert_eq!(config.events.timeout, Duration::from_secs(60));
        let env = handler_env(&|key| (key == "HOME").then(|| "/root".to_string()));
        assert!(env.contains(&("HOME".into(), "/root".into())));
        assert!(env.contains(&("PATH".into(), DEFAULT_HANDLER_PATH.into())));
        let bad_rule = RawAllowRule {
            identity: "x".into(),
            handlers: vec!["../x".into()],
            ..Default::default()
        };
        assert!(parse_allow_rule(&bad_rule).is_err());
    }

    #[test]
    fn secrets_come_from_files_and_short_ones_are_refused() {
        let dir =
            std::env::temp_dir().join(format!("kitepipe-config-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let domains = dir.join("domains");
        std::fs::write(
            &domains,
            "# the blog\n\nhttp:*.example.net:9f86d081884c7d659a2f\n  tcp:db.example.org:aa:bb:cc:dd:ee:ff:00\n",
        )
        .unwrap();
        let config = relay(RawRelayConfig {
            listen: vec!["127.0.0.1:0".into()],
            domain: vec!["https:x.example.com:https-secret-0123".into()],
            domain_file: Some(domains.clone()),
            ..Default::default()
        })
        .unwrap();
        let patterns: Vec<&str> = config.domains.iter().map(|d| d.pattern.as_str()).collect();
        assert_eq!(
            patterns,
            ["x.example.com", "*.example.net", "db.example.org"]
        );
        assert_eq!(config.domains[2].secret.expose(), "aa:bb:cc:dd:ee:ff:00");

        std::fs::write(&domains, "http:*.example.net:s3cret\n").unwrap();
        let short = relay(RawRelayConfig {
            listen: vec!["127.0.0.1:0".into()],
            domain_file: Some(domains.clone()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            short.contains("at least 12") && !short.contains("s3cret"),
            "{short}"
        );
        std::fs::write(&domains, "http:*.example.net\n").unwrap();
        let bad = relay(RawRelayConfig {
            listen: vec!["127.0.0.1:0".into()],
            domain_file: Some(domains.clone()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(bad.contains(":1"), "the error names the line: {bad}");

        let secret = dir.join("secret");
        std::fs::write(&secret, "  9f86d081884c7d659a2f\n").unwrap();
        let raw = RawConnectorConfig {
            relay: vec!["r:1".into()],
            fingerprint: vec!["SHA256:".to_string() + &"aa".repeat(32)],
            kite: vec!["http:x.example.net=80".into()],
            secret_file: Some(secret.clone()),
            ..Default::default()
        };
        let config = ConnectorConfig::try_from(raw.clone()).unwrap();
        assert_eq!(
            config.kites[0].secret.as_ref().map(Secret::expose),
            Some("9f86d081884c7d659a2f")
        );
        let both = ConnectorConfig::try_from(RawConnectorConfig {
            secret: Some("9f86d081884c7d659a2f".into()),
            ..raw.clone()
        })
        .unwrap_err();
        assert!(both.to_string().contains("not both"), "{both}");
        // A secret from the flags (or the environment) replaces the file's.
        let merged = raw.clone().merge(RawConnectorConfig {
            secret: Some("from-the-environment".into()),
            ..Default::default()
        });
        assert_eq!(merged.secret_file, None);
        let short = ConnectorConfig::try_from(RawConnectorConfig {
            secret: Some("hunter2".into()),
            secret_file: None,
            ..raw
        })
        .unwrap_err()
        .to_string();
        assert!(
            short.contains("at least 12") && !short.contains("hunter2"),
            "{short}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_secret_connector_is_named_so_its_secret_can_prove_it() {
        let raw = |kite: &str| RawConnectorConfig {
            relay: vec!["r:1".into()],
            fingerprint: vec!["SHA256:".to_string() + &"aa".repeat(32)],
            kite: vec![kite.into()],
            secret: Some("node-name-secret-1".into()),
            ..Default::default()
        };
        let named = |raw| ConnectorConfig::try_from(raw).unwrap().name;
        assert_eq!(named(raw("http:blog.example.net=80")), "blog.example.net");
        let wildcard = named(raw("http:*.example.net=80"));
        assert!(wildcard.ends_with(".example.net"), "{wildcard}");
        assert!(!wildcard.starts_with("*"), "{wildcard}");
        let given = RawConnectorConfig {
            name: Some("laptop".into()),
            ..raw("http:blog.example.net=80")
        };
        assert_eq!(named(given), "laptop");
    }

    #[test]
    fn connector_kites_need_a_secret_or_an_identity() {
        let raw = RawConnectorConfig {
            relay: vec!["r:1".into()],
            fingerprint: vec!["SHA256:".to_string() + &"aa".repeat(32)],
            kite: vec!["http:x.example.net=80".into()],
            ..Default::default()
        };
        let err = ConnectorConfig::try_from(raw.clone())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--secret") && err.contains("--identity"),
            "{err}"
        );
        let missing = ConnectorConfig::try_from(RawConnectorConfig {
            identity: Some("/nonexistent/identity".into()),
            ..raw.clone()
        })
        .unwrap_err();
        assert!(
            matches!(missing, ConfigError::Identity { .. }),
            "{missing:?}"
        );
        let lone_cert = ConnectorConfig::try_from(RawConnectorConfig {
            cert: Some("cert.pem".into()),
            ..raw
        })
        .unwrap_err();
        assert!(lone_cert.to_string().contains("go together"), "{lone_cert}");
    }

    #[test]
    fn gateway_origins_and_the_relay_token_file() {
        assert_eq!(
            parse_origin(" HTTPS://App.Example.net:8443 ").unwrap(),
            "https://app.example.net:8443"
        );
        for bad in ["app.example.net", "https://", "https://a/b", "://a", "*"] {
            assert!(parse_origin(bad).is_err(), "{bad}");
        }
        let relay = |raw: RawRelayConfig| {
            RelayConfig::try_from(RawRelayConfig {
                listen: vec!["127.0.0.1:0".into()],
                state_dir: Some("/state".into()),
                ..raw
            })
            .unwrap()
        };
        let default = relay(RawRelayConfig::default());
        assert_eq!(
            default.events.gateway_token_file,
            Some(PathBuf::from("/state/gateway-token"))
        );
        let open = relay(RawRelayConfig {
            insecure_gateway_without_token: Some(true),
            ..Default::default()
        });
        assert_eq!(open.events.gateway_token_file, None);
        let connector = ConnectorConfig::try_from(RawConnectorConfig {
            relay: vec!["relay.example.net:8443".into()],
            fingerprint: vec!["SHA256:".to_string() + &"aa".repeat(32)],
            gateway_origin: vec!["http://localhost:3000".into()],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(connector.events.gateway_token_file, None);
        assert_eq!(connector.events.gateway_origins, ["http://localhost:3000"]);
    }
}
