//! The event pipe's settings, the same for relays and connectors.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;
use super::parse::parse_duration;

/// Event pipe settings as written, the same for relays and connectors:
/// flattened into [`RawRelayConfig`](super::RawRelayConfig) and
/// [`RawConnectorConfig`](super::RawConnectorConfig) (flags,
/// `KITEPIPE_*` variables and top-level TOML keys alike). The doc comment
/// of each field is its `--help` text.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args, Deserialize, Serialize)]
#[serde(default)]
pub struct RawEventConfig {
    /// Where the local event gateway listens: 127.0.0.1:PORT, a bare port,
    /// unix:PATH, or off [default: 127.0.0.1:0, printed at start].
    #[arg(long, env = "KITEPIPE_GATEWAY", value_name = "ADDR")]
    pub gateway: Option<String>,
    /// Directory of event handler executables: GET /server/time/utc runs
    /// DIR/get_time_utc with the arguments as argv and the body on stdin.
    #[arg(long, env = "KITEPIPE_HANDLERS", value_name = "DIR")]
    pub handlers: Option<PathBuf>,
    /// Forward events no other handler takes to this local HTTP server,
    /// e.g. http://127.0.0.1:9000.
    #[arg(long, env = "KITEPIPE_HANDLER_UPSTREAM", value_name = "URL")]
    pub handler_upstream: Option<String>,
    /// How long an event waits for an offline node or link before 503, e.g. 30s.
    #[arg(long, env = "KITEPIPE_EVENT_WAIT", value_name = "DURATION")]
    pub event_wait: Option<String>,
    /// How long a handler may go without progress before 504, e.g. 30s.
    #[arg(long, env = "KITEPIPE_EVENT_TIMEOUT", value_name = "DURATION")]
    pub event_timeout: Option<String>,
    /// Let web pages of this origin (`scheme://host[:port]`) use the gateway;
    /// requests with any other Origin get 403. Repeatable [default: none].
    #[arg(long, env = "KITEPIPE_GATEWAY_ORIGIN", value_name = "ORIGIN")]
    pub gateway_origin: Vec<String>,
}

/// Default time a gateway request waits for an offline node (or a lost
/// link) before answering 503: long enough to ride out a relay restart or
/// a connector's reconnect backoff, short enough for interactive callers.
pub(crate) const DEFAULT_EVENT_WAIT: Duration = Duration::from_secs(30);

/// Default time a handler may go without progress (no byte read or
/// written) before it is stopped with 504.
pub(crate) const DEFAULT_EVENT_TIMEOUT: Duration = Duration::from_secs(30);

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

impl RawEventConfig {
    /// Fills in the defaults: a gateway on 127.0.0.1:0 and the default
    /// event wait and timeout.
    pub fn with_defaults(mut self) -> Self {
        let format = |d| humantime::format_duration(d).to_string();
        self.gateway.get_or_insert_with(|| "127.0.0.1:0".into());
        self.event_wait
            .get_or_insert_with(|| format(DEFAULT_EVENT_WAIT));
        self.event_timeout
            .get_or_insert_with(|| format(DEFAULT_EVENT_TIMEOUT));
        self
    }
}

impl EventConfig {
    /// Validates event settings. Handler executables get only
    /// [`DEFAULT_HANDLER_PATH`]; see [`handler_env`] to pass on more.
    pub(crate) fn from_raw(raw: &RawEventConfig) -> Result<EventConfig, ConfigError> {
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
pub(crate) fn parse_origin(text: &str) -> Result<String, ConfigError> {
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
pub(crate) fn parse_upstream(text: &str) -> Result<UpstreamUrl, ConfigError> {
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
