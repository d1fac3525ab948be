//! The relay's settings: [`RawRelayConfig`] as written, [`RelayConfig`] validated.

use super::*;

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
