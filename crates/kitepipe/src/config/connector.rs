//! The connector's settings: [`RawConnectorConfig`] as written, [`ConnectorConfig`] validated.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kitepipe_proto::frame::DEFAULT_HEARTBEAT;
use kitepipe_proto::http_policy::{BackendProtocol, HeaderRules, HttpPolicy};
use kitepipe_proto::kite::{KiteProto, KiteRef};
use kitepipe_proto::message::RemoteClass;
use kitepipe_proto::policy::VisitorPolicy;
use kitepipe_proto::proxy::ProxyProtocol;
use serde::{Deserialize, Serialize};

use super::admin::{AdminSettings, RawAdminConfig};
use super::events::{EventConfig, RawEventConfig};
use super::parse::{
    check_secret_strength, parse_duration, parse_kite_target, read_connector_secret,
};
use super::{ConfigError, Layered, effective_toml, load};
use crate::pki::{Fingerprint, IDENTITY_CA_FILE, NodeIdentity, RelayTrust, Secret};

/// Default ceiling of the reconnect backoff. Short enough that a connector
/// comes back soon after a long outage, long enough that thousands of
/// connectors do not hammer a relay that is down.
pub(crate) const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(15);

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

/// Connector settings as written: one declaration per setting serves the
/// flag (`--max-backoff`), its environment variable
/// (`KITEPIPE_MAX_BACKOFF`) and the TOML key (`max_backoff`); the doc
/// comment of each field is its `--help` text. [`RawConnectorConfig::load`]
/// lays flags and environment over the file.
#[derive(Debug, Clone, Default, clap::Args, Deserialize, Serialize)]
#[serde(default)]
pub struct RawConnectorConfig {
    /// Relays to link to, HOST:PORT. Several relays: one link to each.
    #[arg(env = "KITEPIPE_RELAY", value_name = "RELAY")]
    pub relay: Vec<String>,
    /// A kite to serve: `PROTO:NAME[:PORT]=TARGET`, e.g. `http:blog.example.net=127.0.0.1:8000`,
    /// `https:blog.example.net=8443`, `tcp:db.example.net:15432=127.0.0.1:5432`
    /// (port 0: the relay picks). Repeatable. In the --config file: `[[kite]]`
    /// tables with name, protocol, port and target.
    #[arg(long, env = "KITEPIPE_KITE", value_name = "SPEC")]
    pub kite: Vec<RawKiteSpec>,
    /// Shared secret of the kites' domain on the relay (never sent: it signs
    /// a challenge). Every local user can read the command line: prefer
    /// --secret-file or the environment variable KITEPIPE_SECRET.
    #[arg(
        long,
        env = "KITEPIPE_SECRET",
        hide_env_values = true,
        value_name = "SECRET"
    )]
    pub secret: Option<String>,
    /// File holding the shared secret (mode 0600; surrounding whitespace
    /// ignored). Without --secret and --secret-file, KITEPIPE_SECRET is used.
    #[arg(long, env = "KITEPIPE_SECRET_FILE", value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// The relay certificate's fingerprint, as the relay printed it at start.
    /// With several relays: once for all, or once per relay in the same order.
    #[arg(long, env = "KITEPIPE_FINGERPRINT", value_name = "SHA256:HEX")]
    pub fingerprint: Vec<String>,
    /// CA certificate (PEM) the relay's certificate must chain to (instead of --fingerprint).
    #[arg(long, env = "KITEPIPE_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// This connector's node name; it routes events and remote operations
    /// only if proven: a certificate's name, or a name under a domain whose
    /// secret the connector holds [default: the certificate's name, else the
    /// first secret kite's name, else the host name].
    #[arg(long, env = "KITEPIPE_NAME", value_name = "NAME")]
    pub name: Option<String>,
    /// A link silent this long is dead, e.g. 15s.
    #[arg(long, env = "KITEPIPE_HEARTBEAT", value_name = "DURATION")]
    pub heartbeat: Option<String>,
    /// Longest wait between reconnect attempts, e.g. 15s.
    #[arg(long, env = "KITEPIPE_MAX_BACKOFF", value_name = "DURATION")]
    pub max_backoff: Option<String>,
    /// Accept remote operations from the relay (off by default): exec, fs,
    /// fs-read, forward or all, comma-separated, e.g. --allow-remote
    /// exec,fs. fs (every file operation) is as good as exec; fs-read
    /// allows read, ls and stat only. The relay's rules decide who may use
    /// them; each is logged.
    #[arg(long, env = "KITEPIPE_ALLOW_REMOTE", value_name = "OPS")]
    pub allow_remote: Option<String>,
    /// Certificate identity directory from `kitepipe ca issue` (cert.pem,
    /// key.pem, ca.pem): presented to relays that ask, and its ca.pem
    /// verifies the relay when neither --fingerprint nor --ca is given.
    #[arg(long, env = "KITEPIPE_IDENTITY", value_name = "DIR")]
    pub identity: Option<PathBuf>,
    /// This connector's certificate chain (PEM), instead of --identity.
    #[arg(long, env = "KITEPIPE_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) for --cert.
    #[arg(long, env = "KITEPIPE_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// The tunnel protocol spoken to the relays: `kitepipe` (TLS links to
    /// kitepipe relays) or `pagekite` (a PageKite front-end such as
    /// `pagekite.py --isfrontend`: plaintext, SHA-1 signed kite requests,
    /// no events or remote operations; see docs/pagekite.md). With
    /// `pagekite`, --secret is the kites' PageKite secret and a tcp kite
    /// `tcp:NAME:PORT` is the raw kite `raw-PORT:NAME`.
    #[arg(long, env = "KITEPIPE_PROTOCOL", value_name = "PROTOCOL")]
    pub protocol: Option<String>,
    /// Threads serving the links and their streams [default: 1: a link's
    /// frames pass through one reader and one writer anyway, and one thread
    /// spares them cross-thread wake-ups].
    #[arg(long, env = "KITEPIPE_THREADS", value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
    /// The event pipe.
    #[command(flatten)]
    #[serde(flatten)]
    pub events: RawEventConfig,
    /// The admin server (dashboard, metrics, status).
    #[command(flatten)]
    #[serde(flatten)]
    pub admin: RawAdminConfig,
}

/// One kite as written: the short form `PROTO:NAME[:PORT]=TARGET` (the
/// `--kite` flag; in a TOML file deprecated) or a `[[kite]]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum RawKiteSpec {
    /// `PROTO:NAME[:PORT]=TARGET`.
    Short(String),
    /// A `[[kite]]` table (boxed: it has many optional settings, the
    /// short form is one string).
    Table(Box<RawKite>),
}

impl From<String> for RawKiteSpec {
    fn from(text: String) -> Self {
        RawKiteSpec::Short(text)
    }
}

impl From<&str> for RawKiteSpec {
    fn from(text: &str) -> Self {
        RawKiteSpec::Short(text.to_string())
    }
}

impl<'de> Deserialize<'de> for RawKiteSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // By hand rather than `untagged`, so that an unknown key in a
        // `[[kite]]` table is reported by name.
        match toml::Value::deserialize(deserializer)? {
            toml::Value::String(text) => Ok(RawKiteSpec::Short(text)),
            toml::Value::Table(table) => RawKite::deserialize(table)
                .map(|table| RawKiteSpec::Table(Box::new(table)))
                .map_err(|err| serde::de::Error::custom(err.message())),
            other => Err(serde::de::Error::custom(format!(
                "a kite is a [[kite]] table (name, protocol, port, target), not {}",
                other.type_str()
            ))),
        }
    }
}

/// One `[[kite]]` table as written:
///
/// ```toml
/// [[kite]]
/// name = "db.example.net"
/// protocol = "tcp"
/// port = 15432
/// target = "127.0.0.1:5432"
/// proxy_protocol = "v2"
/// ```
///
/// Per-kite options go here (and, validated, into [`KiteTarget`]); see
/// ARCHITECTURE.md, "Where to add a per-kite option".
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawKite {
    /// The kite's name, e.g. `blog.example.net` (`*.` for a wildcard).
    pub name: String,
    /// `http`, `https` or `tcp`.
    pub protocol: String,
    /// Public port of a TCP kite (0 or none: the relay picks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Local `host:port` (or a bare port on 127.0.0.1) visitors reach.
    pub target: String,
    /// Send the local target a PROXY protocol header with the visitor's
    /// address before the visitor's bytes: `v1` (text) or `v2` (binary).
    /// TCP and HTTPS kites only; absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<String>,
    /// Visitor addresses allowed (CIDR blocks such as `192.0.2.0/24`,
    /// `2001:db8::/32`, or bare addresses); with a list, only those reach
    /// the kite. Enforced by the relay; at most 256 entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Visitor addresses refused (CIDR blocks or bare addresses); a deny
    /// wins over an allow. Enforced by the relay; at most 256 entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// HTTP basic auth: an htpasswd file (`htpasswd -B`: bcrypt, or argon2
    /// hashes; at most 1024 users), read and sent to the relay, which asks
    /// visitors for a password; sent again when the file changes (a bad
    /// change keeps the last good users). HTTP kites only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic_auth: Option<PathBuf>,
    /// The realm browsers show when asking for the password (printable
    /// ASCII without quotes, at most 128; default `kitepipe`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_realm: Option<String>,
    /// Requests per second allowed per visitor address (IPv6: per /64), 1
    /// to 10000 (429 with `Retry-After` beyond).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<u32>,
    /// Requests a visitor address may send at once (default: `rate_limit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_burst: Option<u32>,
    /// Visitor connections to the kite at once, at least 1 (429 beyond).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Request headers to set and remove on the way to the local service
    /// (at most 32 edits; framing and hop-by-hop fields, `Host` and the
    /// relay's `X-Forwarded-*` cannot be edited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderRules>,
    /// Response headers to set and remove on the way to the visitor (the
    /// same limits as `request_headers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderRules>,
    /// Add `X-Forwarded-Host` with the Host the visitor asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwarded_host: Option<bool>,
    /// Redirect plain-HTTP visitors to HTTPS (the relay must terminate TLS
    /// for the kite).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https_redirect: Option<bool>,
    /// How the relay speaks to the local service: `http1` (default) or
    /// `h2c` (HTTP/2 prior knowledge, for gRPC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
}

impl RawKite {
    /// Validates the table: the same rules as the short form.
    pub(super) fn parse(&self) -> Result<(KiteRef, String), ConfigError> {
        let kite = match self.port {
            Some(port) => format!("{}:{}:{port}", self.protocol, self.name),
            None => format!("{}:{}", self.protocol, self.name),
        };
        parse_kite_target(&format!("{kite}={}", self.target))
    }

    /// Validates `proxy_protocol` for the parsed `kite`: `v1` or `v2`, and
    /// only where the local target gets raw bytes (TCP, HTTPS).
    pub(super) fn proxy_protocol(
        &self,
        kite: &KiteRef,
    ) -> Result<Option<ProxyProtocol>, ConfigError> {
        let Some(text) = &self.proxy_protocol else {
            return Ok(None);
        };
        let invalid = |why: String| ConfigError::Invalid {
            what: "proxy_protocol",
            value: text.clone(),
            why,
        };
        let version = text
            .parse::<ProxyProtocol>()
            .map_err(|err| invalid(format!("{err} (or leave it out: no header)")))?;
        if kite.proto == KiteProto::Http {
            return Err(invalid(format!(
                "the http kite {} cannot have it: the relay already gives its local target \
                 the visitor's address in X-Forwarded-For; proxy_protocol is for tcp and https kites",
                kite.name
            )));
        }
        Ok(Some(version))
    }

    /// The HTTP-level rules, for an http kite only (any of them on another
    /// kind is an error). The htpasswd file is read here, and the rules get
    /// the relay's own checks (`HttpPolicy::check`, `pki::htpasswd`), so a
    /// mistake shows at start rather than as a refused kite.
    pub(super) fn http_policy(&self, kite: &KiteRef) -> Result<HttpPolicy, ConfigError> {
        let invalid = |what: &'static str, why: String| ConfigError::Invalid {
            what,
            value: format!("kite {}", self.name),
            why,
        };
        let backend = match &self.backend {
            Some(text) => text
                .parse::<BackendProtocol>()
                .map_err(|why| invalid("backend", why))?,
            None => BackendProtocol::default(),
        };
        let basic_auth = match &self.basic_auth {
            Some(path) if kite.proto == KiteProto::Http => crate::pki::htpasswd::read_file(path)
                .map_err(|err| invalid("basic_auth", err.to_string()))?,
            _ => Vec::new(),
        };
        let http = HttpPolicy {
            basic_auth,
            auth_realm: self.auth_realm.clone(),
            rate_limit: self.rate_limit,
            rate_burst: self.rate_burst,
            max_connections: self.max_connections,
            request_headers: self.request_headers.clone().unwrap_or_default(),
            response_headers: self.response_headers.clone().unwrap_or_default(),
            forwarded_host: self.forwarded_host.unwrap_or(false),
            https_redirect: self.https_redirect.unwrap_or(false),
            backend,
        };
        if kite.proto != KiteProto::Http && (!http.is_default() || self.basic_auth.is_some()) {
            return Err(invalid(
                "kite",
                format!(
                    "the {} kite {} cannot have HTTP rules (basic_auth, auth_realm, rate_limit, \
                     rate_burst, max_connections, request_headers, response_headers, \
                     forwarded_host, https_redirect, backend): they are for http kites",
                    kite.proto.as_str(),
                    kite.name
                ),
            ));
        }
        http.check()
            .map_err(|err| invalid("kite", err.to_string()))?;
        Ok(http)
    }

    /// Validates `allow` and `deny` into the kite's visitor policy,
    /// naming the first bad entry.
    pub(super) fn policy(&self) -> Result<VisitorPolicy, ConfigError> {
        for (what, list) in [("allow", &self.allow), ("deny", &self.deny)] {
            if let Err(err) = VisitorPolicy::parse(list, &[]) {
                return Err(ConfigError::Invalid {
                    what,
                    value: format!("kite {}", self.name),
                    why: err.to_string(),
                });
            }
        }
        VisitorPolicy::parse(&self.allow, &self.deny).map_err(|err| ConfigError::Invalid {
            what: "allow",
            value: format!("kite {}", self.name),
            why: err.to_string(),
        })
    }
}

/// A validated connector configuration.
#[derive(Debug, Clone)]
pub struct ConnectorConfig {
    /// The tunnel protocol spoken to the relays (`--protocol`).
    pub protocol: LinkProtocol,
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
    /// The admin server (`--admin`), if on.
    pub admin: Option<AdminSettings>,
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
pub(crate) fn parse_allow_remote(text: &str) -> Result<(Vec<RemoteClass>, bool), ConfigError> {
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
    /// How to verify this relay; `None` for a PageKite front-end
    /// ([`LinkProtocol::PageKite`]: plaintext, nothing to verify).
    pub trust: Option<RelayTrust>,
}

/// The tunnel protocol a connector speaks to its relays (`--protocol`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LinkProtocol {
    /// kitepipe's own links: TLS 1.3, multiplexed, events and remote
    /// operations.
    #[default]
    Kitepipe,
    /// The PageKite tunnel protocol, to a PageKite front-end
    /// (`pagekite.py --isfrontend`, or a kitepipe relay with `--pagekite`):
    /// plaintext chunks, kites signed with the PageKite secret, visitors
    /// only (no events, no remote operations).
    PageKite,
}

impl LinkProtocol {
    /// The name `--protocol` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkProtocol::Kitepipe => "kitepipe",
            LinkProtocol::PageKite => "pagekite",
        }
    }

    fn parse(text: &str) -> Result<LinkProtocol, ConfigError> {
        match text.trim().to_ascii_lowercase().as_str() {
            "kitepipe" => Ok(LinkProtocol::Kitepipe),
            "pagekite" => Ok(LinkProtocol::PageKite),
            _ => Err(ConfigError::Invalid {
                what: "protocol",
                value: text.to_string(),
                why: "kitepipe (the default) or pagekite".into(),
            }),
        }
    }
}

/// A kite and the local address that serves it, validated from a
/// `--kite` spec or a `[[kite]]` table ([`RawKite`]). Per-kite options go
/// here, typed, next to the target (see ARCHITECTURE.md, "Where to add a
/// per-kite option").
#[derive(Debug, Clone)]
pub struct KiteTarget {
    /// The kite.
    pub kite: KiteRef,
    /// Local `host:port` visitors are connected to.
    pub target: String,
    /// Secret proving the right to the kite's name; `None` when the
    /// connector's certificate identity is what authorizes it.
    pub secret: Option<Secret>,
    /// The PROXY protocol header the local target gets before the
    /// visitor's bytes (`None`: none). Never set on an HTTP kite.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Who may visit (allow and deny lists), sent to the relay with the
    /// claim and enforced there; empty for short-form kites.
    pub policy: VisitorPolicy,
    /// HTTP-level rules, sent with the claim and enforced by the relay
    /// (`basic_auth` holds the htpasswd lines read from
    /// [`KiteTarget::basic_auth_file`]).
    pub http: HttpPolicy,
    /// The htpasswd file `http.basic_auth` was read from, watched for
    /// changes.
    pub basic_auth_file: Option<PathBuf>,
}

impl Layered for RawConnectorConfig {
    const TOML_ONLY: &'static [&'static str] = &[];
    const SECRET_KEYS: &'static [&'static str] = &["secret"];
    const SECRET_SPECS: &'static [&'static str] = &[];
    // The secret and its file are one setting: either from the flags (or
    // KITEPIPE_SECRET) replaces both from the file.
    const ONE_SETTING: &'static [&'static [&'static str]] = &[&["secret", "secret_file"]];

    fn check_file(table: &toml::Table, path: &Path) {
        let Some(toml::Value::Array(kites)) = table.get("kite") else {
            return;
        };
        let Some(first) = kites.iter().find_map(toml::Value::as_str) else {
            return;
        };
        let example = match parse_kite_target(first) {
            Ok((kite, target)) => {
                let port = match kite.port {
                    0 if kite.proto != KiteProto::Tcp => String::new(),
                    port => format!("port = {port}\n"),
                };
                format!(
                    "[[kite]]\nname = {:?}\nprotocol = \"{}\"\n{port}target = {target:?}",
                    kite.name, kite.proto
                )
            }
            Err(_) => {
                "[[kite]]\nname = \"NAME\"\nprotocol = \"http\"\ntarget = \"127.0.0.1:8000\"".into()
            }
        };
        tracing::warn!(
            "{}: kite = [\"PROTO:NAME=TARGET\", ...] strings are deprecated; write a [[kite]] \
             table for each instead, e.g. for {first:?}:\n{example}",
            path.display()
        );
    }
}

impl RawConnectorConfig {
    /// Lays `flags` (the command line and the environment, as clap read
    /// them) over the TOML `file`, if any, setting by setting. A file
    /// holding the secret is checked like a secret file (tightened to 0600
    /// if this user's, else warned about).
    pub fn load(file: Option<&Path>, flags: &RawConnectorConfig) -> Result<Self, ConfigError> {
        load(file, flags)
    }

    /// Fills in the defaults of the `kitepipe connect` command, so that
    /// every setting has its value (what `kitepipe config check` shows).
    pub fn with_defaults(mut self) -> Self {
        let format = |d| humantime::format_duration(d).to_string();
        self.heartbeat
            .get_or_insert_with(|| format(DEFAULT_HEARTBEAT));
        self.max_backoff
            .get_or_insert_with(|| format(DEFAULT_MAX_BACKOFF));
        self.threads.get_or_insert(1);
        self.protocol
            .get_or_insert_with(|| LinkProtocol::Kitepipe.as_str().to_string());
        self.events = self.events.with_defaults();
        self
    }

    /// The configuration as TOML, secrets redacted: what `kitepipe config
    /// check connect` prints.
    pub fn effective_toml(&self) -> String {
        // Kites are shown as `[[kite]]` tables, the form a file should use.
        let kite = self
            .kite
            .iter()
            .map(|spec| match spec {
                RawKiteSpec::Short(text) => match parse_kite_target(text) {
                    Ok((kite, target)) => RawKiteSpec::Table(Box::new(RawKite {
                        name: kite.name,
                        protocol: kite.proto.to_string(),
                        port: (kite.proto == KiteProto::Tcp).then_some(kite.port),
                        target,
                        ..RawKite::default()
                    })),
                    Err(_) => spec.clone(),
                },
                RawKiteSpec::Table(_) => spec.clone(),
            })
            .collect();
        effective_toml(&RawConnectorConfig {
            kite,
            ..self.clone()
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
        let protocol = match raw.protocol.as_deref() {
            Some(text) => LinkProtocol::parse(text)?,
            None => LinkProtocol::Kitepipe,
        };
        if protocol == LinkProtocol::PageKite {
            check_pagekite(&raw)?;
        }
        let (identity, identity_ca) = load_identity(&raw)?;
        if raw.threads == Some(0) {
            return Err(ConfigError::Invalid {
                what: "threads",
                value: "0".into(),
                why: "at least 1".into(),
            });
        }
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
            let (kite, target, proxy_protocol, policy, http, basic_auth_file) = match spec {
                RawKiteSpec::Short(text) => {
                    let (kite, target) = parse_kite_target(text)?;
                    (
                        kite,
                        target,
                        None,
                        VisitorPolicy::default(),
                        HttpPolicy::default(),
                        None,
                    )
                }
                RawKiteSpec::Table(table) => {
                    let (kite, target) = table.parse()?;
                    let proxy_protocol = table.proxy_protocol(&kite)?;
                    let http = table.http_policy(&kite)?;
                    (
                        kite,
                        target,
                        proxy_protocol,
                        table.policy()?,
                        http,
                        table.basic_auth.clone(),
                    )
                }
            };
            if secret.is_none() && identity.is_none() {
                return Err(ConfigError::Missing(
                    "kites need the domain's shared secret (--secret-file, KITEPIPE_SECRET or --secret) \
                     or a certificate (--identity DIR)",
                ));
            }
            if protocol == LinkProtocol::PageKite {
                check_pagekite_kite(&kite, &policy, &http)?;
            }
            let secret = secret.clone();
            kites.push(KiteTarget {
                kite,
                target,
                secret,
                proxy_protocol,
                policy,
                http,
                basic_auth_file,
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
        let trust_for = |index: usize| -> Result<Option<RelayTrust>, ConfigError> {
            if protocol == LinkProtocol::PageKite {
                // Plaintext: check_pagekite refused --fingerprint and --ca.
                return Ok(None);
            }
            match (pins.len(), &raw.ca) {
                (0, Some(path)) => Ok(Some(RelayTrust::Ca(path.clone()))),
                (0, None) => match &identity_ca {
                    Some(path) => Ok(Some(RelayTrust::Ca(path.clone()))),
                    None => Err(ConfigError::Missing(
                        "the connector must verify the relay: pass --fingerprint SHA256:... (the relay prints it at start) or --ca FILE",
                    )),
                },
                (_, Some(_)) => Err(ConfigError::Missing(
                    "give either --fingerprint or --ca to verify the relay, not both",
                )),
                (1, None) => Ok(Some(RelayTrust::Pinned(pins[0]))),
                (n, None) if n == raw.relay.len() => Ok(Some(RelayTrust::Pinned(pins[index]))),
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
                (&raw.events.handlers, "the handlers directory"),
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
            protocol,
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
            events: EventConfig::from_raw(&raw.events)?,
            admin: AdminSettings::from_raw(&raw.admin)?,
            allow_remote,
            remote_fs,
            node_secret: secret,
        })
    }
}

/// What `--protocol pagekite` cannot do: verify the front-end (PageKite
/// tunnels are plaintext here), present a certificate, or carry remote
/// operations. Refused rather than ignored, so nobody believes a setting
/// protects them when it does nothing.
fn check_pagekite(raw: &RawConnectorConfig) -> Result<(), ConfigError> {
    let refuse = |flag: &str, why: &str| {
        Err(ConfigError::Invalid {
            what: "protocol",
            value: LinkProtocol::PageKite.as_str().into(),
            why: format!("{flag} cannot be used with --protocol pagekite: {why}"),
        })
    };
    if !raw.fingerprint.is_empty() || raw.ca.is_some() {
        let flag = if raw.ca.is_some() {
            "--ca"
        } else {
            "--fingerprint"
        };
        return refuse(
            flag,
            "a PageKite tunnel is plaintext here, there is no relay certificate to verify \
             (see docs/pagekite.md)",
        );
    }
    if raw.identity.is_some() || raw.cert.is_some() || raw.key.is_some() {
        return refuse(
            "--identity/--cert/--key",
            "a PageKite front-end knows kites by their secret (--secret-file), not by certificate",
        );
    }
    if raw.allow_remote.is_some() {
        return refuse(
            "--allow-remote",
            "remote operations (and events) do not cross a PageKite tunnel",
        );
    }
    Ok(())
}

/// What a kite cannot have over PageKite: a tcp kite without a port (a
/// raw kite is `raw-PORT`; the front-end assigns none), and rules a
/// kitepipe relay enforces (visitor allow/deny lists, HTTP rules): a
/// PageKite front-end never receives them, so they would protect nothing.
fn check_pagekite_kite(
    kite: &KiteRef,
    policy: &VisitorPolicy,
    http: &HttpPolicy,
) -> Result<(), ConfigError> {
    let invalid = |why: String| {
        Err(ConfigError::Invalid {
            what: "kite",
            value: kite.to_string(),
            why,
        })
    };
    if kite.proto == KiteProto::Tcp && kite.port == 0 {
        return invalid(
            "a tcp kite over --protocol pagekite needs its public port \
             (tcp:NAME:PORT becomes the raw kite raw-PORT:NAME)"
                .into(),
        );
    }
    if !policy.allow().is_empty() || !policy.deny().is_empty() || !http.is_default() {
        return invalid(
            "allow/deny lists and HTTP rules are enforced by a kitepipe relay; \
             a PageKite front-end never gets them (--protocol pagekite)"
                .into(),
        );
    }
    Ok(())
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

pub(super) fn parse_relay_target(
    text: &str,
    trust: Option<RelayTrust>,
) -> Result<RelayTarget, ConfigError> {
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
