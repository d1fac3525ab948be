//! The connector: dials out to relays, registers kites, serves visitor
//! streams by connecting to local targets.
//!
//! Start at [`Connector::run`]: one task per relay keeps a link up forever
//! (`session`: dial, TLS, handshake, serve, then reconnect with capped
//! jittered backoff). Streams the relay opens are served by `serve_stream`.
//!
//! The connector never listens on a socket: everything reaches it through
//! links it dialed.

mod session;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kitepipe_proto::frame::ResetCode;
use kitepipe_proto::kite::KiteRef;
use kitepipe_proto::message::{self, StreamHeader};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span};

use crate::config::ConnectorConfig;
use crate::link::{IncomingStream, MuxConfig};
use crate::pki::{ConnectorTlsOptions, PkiError, connector_client_config_with};
use crate::tunnel;

/// How long connecting to a local target may take. Local services answer
/// in microseconds; a target that takes seconds is down.
pub const TARGET_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long shutdown waits for in-flight streams.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why a connector could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// The TLS configuration could not be built (e.g. unreadable CA file).
    #[error("cannot set up TLS to the relay")]
    Tls(#[from] PkiError),
}

/// State of one relay's link, as the connector sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Not linked yet, or reconnecting.
    Down,
    /// Linked; these kites are online through it (with their public addresses).
    Up(Vec<(KiteRef, String)>),
}

/// A configured connector, ready to run.
pub struct Connector {
    config: Arc<ConnectorConfig>,
    /// TLS settings per relay, in config order.
    tls: Vec<Arc<rustls::ClientConfig>>,
    instance: String,
    states: Vec<watch::Sender<LinkState>>,
}

impl Connector {
    /// Builds the TLS configuration; fails only on local problems.
    pub fn new(config: ConnectorConfig) -> Result<Connector, ConnectorError> {
        let options = ConnectorTlsOptions {
            identity: config.identity.clone(),
        };
        let tls = config
            .relays
            .iter()
            .map(|relay| connector_client_config_with(&relay.trust, &options))
            .collect::<Result<Vec<_>, _>>()?;
        let instance = message::hex(&crate::pki::random_nonce()[..16]);
        let states = config
            .relays
            .iter()
            .map(|_| watch::channel(LinkState::Down).0)
            .collect();
        Ok(Connector {
            config: Arc::new(config),
            tls,
            instance,
            states,
        })
    }

    /// Watches the state of the link to relay number `index` (in config order).
    pub fn watch(&self, index: usize) -> Option<watch::Receiver<LinkState>> {
        self.states.get(index).map(|s| s.subscribe())
    }

    /// Keeps a link to every relay until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        if let Some(identity) = &self.config.identity {
            let info = identity.info();
            match info.validity_problem(std::time::SystemTime::now()) {
                Some(problem) => tracing::warn!(
                    identity = %info.name,
                    serial = %info.serial,
                    "{problem}: relays will refuse it"
                ),
                None => info!(
                    identity = %info.name,
                    serial = %info.serial,
                    not_after = %humantime::format_rfc3339_seconds(info.not_after),
                    "presenting certificate"
                ),
            }
        }
        let tracker = TaskTracker::new();
        let token = shutdown.child_token();
        let kites = Arc::new(Kites::new(&self.config));
        let mux = MuxConfig {
            heartbeat: self.config.heartbeat,
            ..MuxConfig::default()
        };
        for ((relay, state), tls) in self.config.relays.iter().zip(self.states).zip(self.tls) {
            let link = session::RelayLink {
                relay: relay.clone(),
                config: self.config.clone(),
                tls,
                instance: self.instance.clone(),
                kites: kites.clone(),
                mux: mux.clone(),
                state,
                tracker: tracker.clone(),
                token: token.clone(),
            };
            tracker.spawn(
                link.run()
                    .instrument(info_span!("relay", addr = %relay.addr)),
            );
        }
        shutdown.cancelled().await;
        info!("connector shutting down");
        token.cancel();
        tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                tasks = tracker.len(),
                "shutdown grace expired; cutting streams"
            );
        }
    }
}

/// The kites this connector serves, and the TCP ports relays assigned.
pub(crate) struct Kites {
    targets: Vec<crate::config::KiteTarget>,
    /// Public ports relays gave TCP kites registered with port 0, so a
    /// reconnect asks for the same port again. Key: (relay, kite name).
    assigned_ports: Mutex<HashMap<(String, String), u16>>,
}

impl Kites {
    fn new(config: &ConnectorConfig) -> Kites {
        Kites {
            targets: config.kites.clone(),
            assigned_ports: Mutex::new(HashMap::new()),
        }
    }

    /// The local target of a kite as the relay names it.
    fn target(&self, kite: &KiteRef) -> Option<&str> {
        self.targets
            .iter()
            .find(|t| {
                t.kite.proto == kite.proto
                    && t.kite.name == kite.name
                    && (t.kite.port == kite.port || t.kite.port == 0)
            })
            .map(|t| t.target.as_str())
    }
}

/// Serves one stream the relay opened: connects to the kite's local target
/// and copies bytes both ways.
pub(crate) async fn serve_stream(incoming: IncomingStream, kites: Arc<Kites>) {
    let IncomingStream { header, mut stream } = incoming;
    let header = match message::decode::<StreamHeader>(&header) {
        Ok(StreamHeader::Visitor(visitor)) => visitor,
        Err(err) => {
            stream.reset(
                ResetCode::ProtocolError,
                &format!("bad stream header: {err}"),
            );
            return;
        }
    };
    let Some(target) = kites.target(&header.kite) else {
        debug!(kite = %header.kite, "stream for a kite we do not serve");
        stream.reset(
            ResetCode::NoSuchKite,
            &format!("this connector does not serve {}", header.kite),
        );
        return;
    };
    let span = tracing::debug_span!("visitor", kite = %header.kite, peer = %header.peer);
    async {
        let sock =
            match tokio::time::timeout(TARGET_CONNECT_TIMEOUT, TcpStream::connect(target)).await {
                Ok(Ok(sock)) => sock,
                Ok(Err(err)) => {
                    info!(%target, %err, "local target unreachable");
                    stream.reset(
                        ResetCode::TargetUnreachable,
                        &format!("connect {target}: {err}"),
                    );
                    return;
                }
                Err(_) => {
                    info!(%target, "local target did not accept in time");
                    stream.reset(
                        ResetCode::TargetUnreachable,
                        &format!("connect {target}: timed out"),
                    );
                    return;
                }
            };
        let _ = sock.set_nodelay(true);
        let mut sock = sock;
        match tunnel::splice_stream(&mut sock, &mut stream).await {
            Ok((up, down)) => debug!(up, down, "visitor done"),
            Err(err) => debug!(%err, "visitor stream ended with error"),
        }
    }
    .instrument(span)
    .await;
}
