//! The connector's settings: [`RawConnectorConfig`] as written, [`ConnectorConfig`] validated.

use super::*;

/// Default ceiling of the reconnect backoff. Short enough that a connector
/// comes back soon after a long outage, long enough that thousands of
/// connectors do not hammer a relay that is down.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(15);

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
