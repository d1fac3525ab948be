//! The relay's settings: [`RawRelayConfig`] as written, [`RelayConfig`] validated.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kitepipe_proto::frame::DEFAULT_HEARTBEAT;
use kitepipe_proto::kite::{self, KiteProto};
use serde::{Deserialize, Serialize};

use super::admin::{AccessLogSettings, AdminSettings, RawAccessLogConfig, RawAdminConfig};
use super::events::{EventConfig, GATEWAY_TOKEN_FILE, RawEventConfig};
use super::identity::{IdentityConfig, RawAllowRule, RawIdentity};
use super::parse::{check_secret_strength, parse_duration, parse_port_range, parse_socket_addr};
use super::remote::RawRemoteRule;
use super::{ConfigError, Layered, effective_toml, load};
use crate::pki::{Secret, read_secret_file};

/// Relay settings as written: one declaration per setting serves the
/// flag (`--tcp-ports`), its environment variable (`KITEPIPE_TCP_PORTS`)
/// and the TOML key (`tcp_ports`); the doc comment of each field is its
/// `--help` text. [`RawRelayConfig::load`] lays flags and environment over
/// the file.
#[derive(Debug, Clone, Default, clap::Args, Deserialize, Serialize)]
#[serde(default)]
pub struct RawRelayConfig {
    /// Address for connectors' links, IP:PORT [default: 0.0.0.0:8443]. Repeatable.
    #[arg(long, env = "KITEPIPE_LISTEN", value_name = "ADDR")]
    pub listen: Vec<String>,
    /// Address for visitors' HTTP, routed by Host [default: 0.0.0.0:8080]. Repeatable.
    /// Giving the same address as --listen or --https serves them all on one port.
    #[arg(long, env = "KITEPIPE_HTTP", value_name = "ADDR")]
    pub http: Vec<String>,
    /// Address for visitors' HTTPS, routed by SNI: passed through undecrypted to https
    /// kites, terminated for http kites with a --tls-cert certificate. Repeatable.
    #[arg(long, env = "KITEPIPE_HTTPS", value_name = "ADDR")]
    pub https: Vec<String>,
    /// A domain connectors may claim kites in: PROTOS:NAME:SECRET, e.g.
    /// 'http,tcp:*.example.net:SECRET'. Repeatable. Every local user can read
    /// the command line: prefer --domain-file.
    #[arg(
        long,
        env = "KITEPIPE_DOMAIN",
        hide_env_values = true,
        value_name = "SPEC"
    )]
    pub domain: Vec<String>,
    /// File of domains, one PROTOS:NAME:SECRET per line (# comments), mode
    /// 0600: the secrets stay out of the process list. Secrets need at
    /// least 12 bytes; 32 random hex digits (openssl rand -hex 16) are best.
    #[arg(long, env = "KITEPIPE_DOMAIN_FILE", value_name = "FILE")]
    pub domain_file: Option<PathBuf>,
    /// Address TCP kites' public ports bind to [default: 0.0.0.0].
    #[arg(long, env = "KITEPIPE_TCP_BIND", value_name = "IP")]
    pub tcp_bind: Option<String>,
    /// Public ports TCP kites may use, LOW-HIGH [default: 1024-65535].
    #[arg(long, env = "KITEPIPE_TCP_PORTS", value_name = "RANGE")]
    pub tcp_ports: Option<String>,
    /// Let `CONNECT name:port` on the HTTP port reach TCP kites (only from
    /// listener addresses the kites' ports are bound to, see --tcp-bind).
    #[arg(long, env = "KITEPIPE_HTTP_CONNECT", value_name = "BOOL", num_args = 0..=1,
          require_equals = true, default_missing_value = "true")]
    pub http_connect: Option<bool>,
    /// Accept pagekite.py back-ends (the PageKite tunnel protocol) on the
    /// --listen addresses, authorized by the --domain secrets. Off by
    /// default: PageKite tunnels are plaintext and signed with SHA-1 (see
    /// docs/pagekite.md); their raw kites are reached by CONNECT.
    #[arg(long, env = "KITEPIPE_PAGEKITE", value_name = "BOOL", num_args = 0..=1,
          require_equals = true, default_missing_value = "true")]
    pub pagekite: Option<bool>,
    /// Directory for the self-signed certificate created on first start
    /// [default: $STATE_DIRECTORY under systemd, else ~/.local/state/kitepipe].
    #[arg(long, env = "KITEPIPE_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Certificate chain (PEM) to use instead of the self-signed one.
    #[arg(long, env = "KITEPIPE_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) for --cert.
    #[arg(long, env = "KITEPIPE_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// The relay's public host name (shown to connectors, put in the self-signed certificate).
    #[arg(long, env = "KITEPIPE_NAME", value_name = "HOST")]
    pub name: Option<String>,
    /// A link silent this long is dead, e.g. 15s.
    #[arg(long, env = "KITEPIPE_HEARTBEAT", value_name = "DURATION")]
    pub heartbeat: Option<String>,
    /// CA certificate (PEM) connectors' certificates must chain to, e.g. the
    /// ca-cert.pem of `kitepipe ca init`. Without --domain secrets every
    /// connector must present a certificate; with them, it may.
    #[arg(long, env = "KITEPIPE_CLIENT_CA", value_name = "FILE")]
    pub client_ca: Option<PathBuf>,
    /// Revocation list (PEM X.509 CRL) for connectors' certificates
    /// [default: crl.pem beside --client-ca, if present]. Reread when it changes.
    #[arg(long, env = "KITEPIPE_CRL", value_name = "FILE")]
    pub crl: Option<PathBuf>,
    /// A domain under which a certificate named NAME may claim NAME.DOMAIN
    /// and *.NAME.DOMAIN, e.g. example.net. Repeatable. More rights: `[[allow]]`
    /// rules in the --config file.
    #[arg(long, env = "KITEPIPE_CERT_DOMAIN", value_name = "DOMAIN")]
    pub cert_domain: Vec<String>,
    /// Further rights of certificate identities (TOML only: `[[allow]]`).
    #[arg(skip)]
    pub allow: Vec<RawAllowRule>,
    /// Let the relay's gateway run remote operations on connectors:
    /// NODES:OPS, e.g. 'ci-*,laptop:exec,fs' (OPS: exec, fs, forward, all).
    /// Repeatable; the same as `[[remote]]` rules in the --config file. The
    /// connector must also opt in with --allow-remote.
    #[arg(long, env = "KITEPIPE_REMOTE", value_name = "NODES:OPS",
          value_parser = RawRemoteRule::from_flag)]
    pub remote: Vec<RawRemoteRule>,
    /// Threads serving links and visitors [default: half the CPU cores, at
    /// least 1]. The kernel's TCP work for the same sockets needs the rest.
    #[arg(long, env = "KITEPIPE_THREADS", value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
    /// The event pipe.
    #[command(flatten)]
    #[serde(flatten)]
    pub events: RawEventConfig,
    /// Where the gateway's owner token is written at start (mode 0600); a
    /// request needs it in X-Kitepipe-Token (kitepipe call and kitepipe
    /// remote find it) [default: STATE_DIR/gateway-token].
    #[arg(long, env = "KITEPIPE_GATEWAY_TOKEN_FILE", value_name = "FILE")]
    pub gateway_token_file: Option<PathBuf>,
    /// Serve /client/ and /remote/ to every local user without the owner
    /// token (the behaviour before tokens; not recommended).
    #[arg(long, env = "KITEPIPE_INSECURE_GATEWAY_WITHOUT_TOKEN", value_name = "BOOL",
          num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub insecure_gateway_without_token: Option<bool>,
    /// Get certificates for http kites from an ACME CA (RFC 8555), e.g.
    /// Let's Encrypt: for each exact name a connector claims and the relay
    /// accepts, kept in STATE_DIR/acme and renewed ahead of expiry. Needs
    /// --https (and --http for the http-01 challenge); the CA must reach
    /// them on ports 443 (tls-alpn-01) or 80 (http-01).
    #[arg(long, env = "KITEPIPE_ACME", value_name = "BOOL", num_args = 0..=1,
          require_equals = true, default_missing_value = "true")]
    pub acme: Option<bool>,
    /// The ACME CA's directory URL [default: Let's Encrypt production,
    /// `https://acme-v02.api.letsencrypt.org/directory`].
    #[arg(long, env = "KITEPIPE_ACME_DIRECTORY", value_name = "URL")]
    pub acme_directory: Option<String>,
    /// Use Let's Encrypt's staging CA (untrusted certificates, generous
    /// rate limits) instead of production.
    #[arg(long, env = "KITEPIPE_ACME_STAGING", value_name = "BOOL", num_args = 0..=1,
          require_equals = true, default_missing_value = "true")]
    pub acme_staging: Option<bool>,
    /// Contact e-mail of the ACME account (the CA's expiry notices).
    #[arg(long, env = "KITEPIPE_ACME_EMAIL", value_name = "EMAIL")]
    pub acme_email: Option<String>,
    /// An extra root certificate (PEM) to trust for the ACME server's own
    /// HTTPS, beside the system's, e.g. a test CA's (pebble's).
    #[arg(long, env = "KITEPIPE_ACME_CA_ROOT", value_name = "FILE")]
    pub acme_ca_root: Option<PathBuf>,
    /// The ACME challenge to answer: tls-alpn-01, http-01 or auto
    /// (tls-alpn-01, then http-01 if that fails) [default: auto].
    #[arg(long, env = "KITEPIPE_ACME_CHALLENGE", value_name = "TYPE")]
    pub acme_challenge: Option<String>,
    /// Renew an ACME certificate this long before it expires [default: 30days].
    #[arg(long, env = "KITEPIPE_ACME_RENEW_BEFORE", value_name = "DURATION")]
    pub acme_renew_before: Option<String>,
    /// A certificate for visitors of http kites, CERT.pem:KEY.pem: the
    /// relay terminates HTTPS for every name among the certificate's DNS
    /// names (wildcards included) that an http kite serves. The chain
    /// follows the certificate in CERT.pem; KEY.pem must be this user's
    /// and mode 0600. Repeatable; reread on SIGHUP.
    #[arg(long, env = "KITEPIPE_TLS_CERT", value_name = "CERT:KEY")]
    pub tls_cert: Vec<String>,
    /// The admin server (dashboard, metrics, status).
    #[command(flatten)]
    #[serde(flatten)]
    pub admin: RawAdminConfig,
    /// The access log.
    #[command(flatten)]
    #[serde(flatten)]
    pub access_log: RawAccessLogConfig,
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
    /// Whether PageKite back-ends (pagekite.py) are accepted on the link
    /// listeners (off by default; see `relay::pagekite`).
    pub pagekite: bool,
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
    /// Certificates from an ACME CA (`--acme`), if on.
    pub acme: Option<AcmeConfig>,
    /// Certificates served to visitors of http kites whose TLS the relay
    /// terminates (`--tls-cert`).
    pub tls_certs: Vec<TlsCertFiles>,
    /// The admin server (`--admin`), if on.
    pub admin: Option<AdminSettings>,
    /// The access log (`--access-log`), if on.
    pub access_log: Option<AccessLogSettings>,
}

/// One `--tls-cert`: a PEM certificate chain and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsCertFiles {
    /// Certificate, then its chain.
    pub cert: PathBuf,
    /// Private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
}

impl std::str::FromStr for TlsCertFiles {
    type Err = ConfigError;

    /// Parses `CERT.pem:KEY.pem` (split at the first `:`).
    fn from_str(text: &str) -> Result<TlsCertFiles, ConfigError> {
        match text.split_once(':') {
            Some((cert, key)) if !cert.is_empty() && !key.is_empty() => Ok(TlsCertFiles {
                cert: PathBuf::from(cert),
                key: PathBuf::from(key),
            }),
            _ => Err(ConfigError::Invalid {
                what: "tls-cert",
                value: text.to_string(),
                why: "expected CERT.pem:KEY.pem".into(),
            }),
        }
    }
}

/// Where and how the relay gets certificates by ACME.
#[derive(Debug, Clone)]
pub struct AcmeConfig {
    /// The CA's directory URL.
    pub directory: String,
    /// Contact e-mail of the account.
    pub email: Option<String>,
    /// An extra root to trust for the CA's HTTPS.
    pub ca_root: Option<PathBuf>,
    /// Which challenge to answer.
    pub challenge: AcmeChallenge,
    /// Renew this long before expiry.
    pub renew_before: Duration,
    /// Where the account and the certificates are kept (`STATE_DIR/acme`).
    pub dir: PathBuf,
}

/// The ACME challenge types the relay answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcmeChallenge {
    /// TLS-ALPN-01 first, HTTP-01 when it fails (or without an HTTPS listener's reach).
    Auto,
    /// Only TLS-ALPN-01 (RFC 8737), on the HTTPS listener.
    TlsAlpn01,
    /// Only HTTP-01, on the HTTP listener.
    Http01,
}

/// Let's Encrypt's production directory, `--acme-directory`'s default.
const LETS_ENCRYPT_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// Let's Encrypt's staging directory (`--acme-staging`).
const LETS_ENCRYPT_STAGING_DIRECTORY: &str =
    "https://acme-staging-v02.api.letsencrypt.org/directory";

/// `--acme-renew-before`'s default: Let's Encrypt's own advice for its
/// 90-day certificates (renew with a third of the lifetime left).
const DEFAULT_ACME_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

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

impl Layered for RawRelayConfig {
    const TOML_ONLY: &'static [&'static str] = &["allow"];
    const SECRET_KEYS: &'static [&'static str] = &["domain"];
    const SECRET_SPECS: &'static [&'static str] = &["domain"];
    const ONE_SETTING: &'static [&'static [&'static str]] = &[];
}

/// Default address TCP kites' public ports bind to.
const DEFAULT_TCP_BIND: IpAddr = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);

/// Default range of TCP kites' public ports: every unprivileged port.
const DEFAULT_TCP_PORTS: (u16, u16) = (1024, 65535);

impl RawRelayConfig {
    /// Lays `flags` (the command line and the environment, as clap read
    /// them) over the TOML `file`, if any, setting by setting. A file
    /// holding domain secrets is checked like a secret file (tightened to
    /// 0600 if this user's, else warned about).
    pub fn load(file: Option<&Path>, flags: &RawRelayConfig) -> Result<Self, ConfigError> {
        load(file, flags)
    }

    /// Fills in the defaults of the `kitepipe relay` command, so that
    /// every setting has its value (what `kitepipe config check` shows):
    /// links on 0.0.0.0:8443, HTTP on 0.0.0.0:8080 unless HTTPS is given,
    /// the state dir from `env` ([`default_state_dir`]), and a thread per
    /// two of `cores`.
    pub fn with_defaults(mut self, env: &dyn Fn(&str) -> Option<String>, cores: usize) -> Self {
        let format = |d| humantime::format_duration(d).to_string();
        if self.listen.is_empty() {
            self.listen.push("0.0.0.0:8443".into());
        }
        if self.http.is_empty() && self.https.is_empty() {
            self.http.push("0.0.0.0:8080".into());
        }
        let state_dir = self
            .state_dir
            .get_or_insert_with(|| default_state_dir(env))
            .clone();
        self.tcp_bind
            .get_or_insert_with(|| DEFAULT_TCP_BIND.to_string());
        let (low, high) = DEFAULT_TCP_PORTS;
        self.tcp_ports
            .get_or_insert_with(|| format!("{low}-{high}"));
        self.http_connect.get_or_insert(false);
        self.pagekite.get_or_insert(false);
        self.name.get_or_insert_with(|| "localhost".into());
        self.heartbeat
            .get_or_insert_with(|| format(DEFAULT_HEARTBEAT));
        let threads = u16::try_from((cores / 2).max(1)).unwrap_or(u16::MAX);
        self.threads.get_or_insert(threads);
        if !*self.insecure_gateway_without_token.get_or_insert(false) {
            self.gateway_token_file
                .get_or_insert_with(|| state_dir.join(GATEWAY_TOKEN_FILE));
        }
        self.events = self.events.with_defaults();
        if *self.acme.get_or_insert(false) {
            if !*self.acme_staging.get_or_insert(false) {
                self.acme_directory
                    .get_or_insert_with(|| LETS_ENCRYPT_DIRECTORY.into());
            }
            self.acme_challenge.get_or_insert_with(|| "auto".into());
            self.acme_renew_before
                .get_or_insert_with(|| format(DEFAULT_ACME_RENEW_BEFORE));
        }
        self
    }

    /// The configuration as TOML, secrets redacted: what `kitepipe config
    /// check relay` prints.
    pub fn effective_toml(&self) -> String {
        effective_toml(self)
    }
}

/// Default state directory of a relay: `$STATE_DIRECTORY` (the one
/// systemd made for the unit's `StateDirectory=`; the first if it lists
/// several), else `$XDG_STATE_HOME/kitepipe` or
/// `$HOME/.local/state/kitepipe`, looked up through `env`.
pub fn default_state_dir(env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    let systemd = env("STATE_DIRECTORY");
    if let Some(dir) = systemd.as_deref().and_then(|d| d.split(':').next())
        && !dir.is_empty()
    {
        return PathBuf::from(dir);
    }
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
        let identity = IdentityConfig::from_raw(raw.identity())?;
        if raw.threads == Some(0) {
            return Err(ConfigError::Invalid {
                what: "threads",
                value: "0".into(),
                why: "at least 1".into(),
            });
        }
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
            None => DEFAULT_TCP_BIND,
        };
        let tcp_ports = match &raw.tcp_ports {
            Some(text) => parse_port_range(text)?,
            None => DEFAULT_TCP_PORTS,
        };
        let mut events = EventConfig::from_raw(&raw.events)?;
        if !raw.insecure_gateway_without_token.unwrap_or(false) {
            events.gateway_token_file = Some(raw.gateway_token_file.clone().unwrap_or_else(|| {
                raw.state_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(".kitepipe"))
                    .join(GATEWAY_TOKEN_FILE)
            }));
        }
        let acme = acme_config(&raw, &listeners)?;
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
            pagekite: raw.pagekite.unwrap_or(false),
            tls,
            name: raw.name.unwrap_or_else(|| "localhost".into()),
            heartbeat: parse_duration("heartbeat", raw.heartbeat.as_deref(), DEFAULT_HEARTBEAT)?,
            identity,
            reload_from: None,
            events,
            acme,
            tls_certs: raw
                .tls_cert
                .iter()
                .map(|text| text.parse())
                .collect::<Result<_, _>>()?,
            admin: AdminSettings::from_raw(&raw.admin)?,
            access_log: AccessLogSettings::from_raw(&raw.access_log)?,
        })
    }
}

/// Validates the `--acme-*` settings: `None` unless `--acme`.
fn acme_config(
    raw: &RawRelayConfig,
    listeners: &[ListenerConfig],
) -> Result<Option<AcmeConfig>, ConfigError> {
    if !raw.acme.unwrap_or(false) {
        return Ok(None);
    }
    let challenge = match raw.acme_challenge.as_deref() {
        None | Some("auto") => AcmeChallenge::Auto,
        Some("tls-alpn-01") => AcmeChallenge::TlsAlpn01,
        Some("http-01") => AcmeChallenge::Http01,
        Some(other) => {
            return Err(ConfigError::Invalid {
                what: "acme-challenge",
                value: other.to_string(),
                why: "expected tls-alpn-01, http-01 or auto".into(),
            });
        }
    };
    if !listeners.iter().any(|l| l.https) {
        return Err(ConfigError::Missing(
            "--acme needs an --https listener: the certificates are served there \
             (and tls-alpn-01 is answered there)",
        ));
    }
    if challenge == AcmeChallenge::Http01 && !listeners.iter().any(|l| l.http) {
        return Err(ConfigError::Missing(
            "--acme-challenge http-01 needs an --http listener: the CA fetches the challenge there",
        ));
    }
    let directory = match (&raw.acme_directory, raw.acme_staging.unwrap_or(false)) {
        (Some(_), true) => {
            return Err(ConfigError::Missing(
                "--acme-directory and --acme-staging exclude each other: give one",
            ));
        }
        (Some(url), false) => url.clone(),
        (None, true) => LETS_ENCRYPT_STAGING_DIRECTORY.to_string(),
        (None, false) => LETS_ENCRYPT_DIRECTORY.to_string(),
    };
    if !directory.starts_with("https://") {
        return Err(ConfigError::Invalid {
            what: "acme-directory",
            value: directory,
            why: "the ACME directory must be an https:// URL (RFC 8555 section 6.1)".into(),
        });
    }
    if let Some(email) = &raw.acme_email
        && (!email.contains('@') || email.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        return Err(ConfigError::Invalid {
            what: "acme-email",
            value: email.clone(),
            why: "expected an e-mail address such as admin@example.net".into(),
        });
    }
    let renew_before = parse_duration(
        "acme-renew-before",
        raw.acme_renew_before.as_deref(),
        DEFAULT_ACME_RENEW_BEFORE,
    )?;
    let dir = raw
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(".kitepipe"))
        .join("acme");
    Ok(Some(AcmeConfig {
        directory,
        email: raw.acme_email.clone(),
        ca_root: raw.acme_ca_root.clone(),
        challenge,
        renew_before,
        dir,
    }))
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
        let raw = RawRelayConfig::load(Some(&self.file), &self.flags)?;
        IdentityConfig::from_raw(raw.identity())
    }
}

impl RawRelayConfig {
    /// The settings that make up the relay's [`IdentityConfig`].
    pub(crate) fn identity(&self) -> RawIdentity<'_> {
        RawIdentity {
            client_ca: &self.client_ca,
            crl: &self.crl,
            cert_domain: &self.cert_domain,
            allow: &self.allow,
            remote: &self.remote,
        }
    }
}

/// Reads `--domain-file`: one `PROTOS:PATTERN:SECRET` per line; blank
/// lines and lines starting with `#` are skipped.
pub(super) fn read_domain_file(path: &std::path::Path) -> Result<Vec<Domain>, ConfigError> {
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

/// Parses `PROTOS:PATTERN:SECRET`, e.g. `http,tcp:*.example.net:s3cret`.
pub(super) fn parse_domain(text: &str) -> Result<Domain, ConfigError> {
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
