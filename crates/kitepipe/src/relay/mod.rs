//! The relay: public listeners, routing by Host/SNI/port, the kite registry
//! and balancing.
//!
//! Start at [`Relay::bind`] then [`Relay::run`]. Every accepted connection
//! goes through `listener`, which tells connectors' links, visitors' HTTP
//! and visitors' HTTPS apart (by their first bytes when one port serves
//! several), then to `session` (a connector's link: handshake, kite
//! registration), `http` (visitor HTTP routed by Host) or `tcp` (HTTPS by
//! SNI, and raw TCP kites on their own ports), the last two opening visitor
//! streams through `visitor`. `terminate` takes the HTTPS of http kites
//! with a certificate in `certs` (`--tls-cert`) and hands the decrypted
//! stream to `http` (or `h2`).
//!
//! Connectors' certificates and the rules for their identities live in
//! `identity`, which also reloads them (see [`Relay::reload_trigger`]).
//! A link's certificate identity is `link_identity`, kept by `registry`.
//! Events (the relay's gateway, events connectors send to the relay or to
//! each other) are judged and routed in `events`, remote sessions in
//! `remote`, both finding connectors by node name through `nodes`; the pipe
//! itself is `crate::pipe`.
//!
//! The relay never dials anything but a configured event handler upstream
//! on its own machine (and, with `--acme`, the ACME CA, from `acme`): every
//! byte it moves for visitors arrives on a socket it accepted, and goes out
//! on a link a connector opened.

mod acme;
mod certs;
mod events;
mod h2;
mod http;
mod http_policy;
mod identity;
mod link_identity;
mod listener;
mod nodes;
mod pagekite;
mod registry;
mod remote;
mod session;
mod status;
mod tcp;
mod terminate;
mod visitor;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span};

use crate::config::{ListenerConfig, RelayConfig, RelayTlsSource};
use crate::link::MuxConfig;
use crate::metrics::Metrics;
use crate::metrics::access::{AccessFormat, AccessLog, AccessLogError, AccessTarget};
use crate::metrics::admin::{self, AdminListener};
use crate::pipe::{Gateway, GatewayListener, Handlers, PipeError, run_gateway};
use crate::pki::{Fingerprint, PkiError, RelayCert};
use crate::shutdown::{self, SHUTDOWN_GRACE};
use crate::sync;
pub use certs::CertError;
pub use identity::ReloadTrigger;
use identity::{IdentityInputs, IdentityState};
use registry::Registry;

// Visitors' HTTP bounds, shared by the HTTP/1 (`http`) and HTTP/2 (`h2`)
// paths.

/// Time a visitor has to send a complete request head once it has started
/// one (and, for the first request, from connecting). Defeats slowloris
/// clients that drip a header every few seconds.
pub(crate) const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a keep-alive connection may sit idle between requests, or a
/// body or upgraded stream may go without a byte from the visitor.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Visitor and link connections served at once; beyond this, new
/// connections are closed at accept. Each costs one file descriptor and
/// 25-30 KiB (bench/run's scale scenario), so the bound caps a flood at
/// about 1 GiB. It must leave room for 10,000 linked connectors and as many
/// visitors (issue 5's scale target), which 16 Ki did not.
pub(crate) const MAX_CONNECTIONS: usize = 32 * 1024;

/// Pending connections the kernel queues for each public listener before
/// the relay accepts them. A burst of visitors or reconnecting connectors
/// (after a relay restart, thousands within a second) overflows tokio's
/// default of 1024: the kernel then drops the handshake's last ACK and a
/// client that sends nothing first (a TCP kite's visitor) hangs on a
/// connection the relay never sees. The kernel caps it at
/// `net.core.somaxconn` (4096 by default since Linux 5.4).
const LISTEN_BACKLOG: u32 = 4096;

/// Binds a public listener (the relay's ports and TCP kite ports; address
/// reuse as `TcpListener::bind`, with [`LISTEN_BACKLOG`]). Needs a runtime.
pub(crate) fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The certificate could not be loaded or created.
    #[error("relay certificate")]
    Pki(#[from] PkiError),
    /// The event gateway could not be bound.
    #[error("event gateway")]
    Gateway(#[from] PipeError),
    /// ACME could not start (its state directory or `--acme-ca-root`):
    /// what is wrong, causes included.
    #[error("ACME: {0}")]
    Acme(String),
    /// A `--tls-cert` pair cannot be served.
    #[error("certificate for terminated HTTPS")]
    TlsCert(#[from] CertError),
    /// A listening socket could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A bound relay, ready to run.
pub struct Relay {
    ctx: Arc<RelayCtx>,
    listeners: Vec<(TcpListener, ListenerConfig)>,
    fingerprint: Fingerprint,
    cert_created: bool,
    /// Wakes the identity watcher for a reload.
    reload: Arc<Notify>,
    /// The event gateway's socket, served by `run`.
    gateway: Option<GatewayListener>,
    /// The admin server's socket, served by `run`.
    admin: Option<AdminListener>,
}

/// One bound listener, as reported to the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundListener {
    /// Actual address (port filled in when 0 was asked).
    pub addr: SocketAddr,
    /// Roles served.
    pub roles: ListenerConfig,
}

/// State shared by every task of a relay.
pub(crate) struct RelayCtx {
    pub(crate) config: RelayConfig,
    pub(crate) registry: Registry,
    /// The relay's own certificate, to rebuild the link acceptor on reload.
    pub(crate) relay_cert: RelayCert,
    /// The link acceptor and identity rules; replaced as a whole on reload.
    identity: RwLock<Arc<IdentityState>>,
    pub(crate) mux: MuxConfig,
    /// Every task of the relay runs here.
    pub(crate) tracker: TaskTracker,
    /// Cancelled at shutdown.
    pub(crate) token: CancellationToken,
    /// Bounds connections served at once.
    pub(crate) connections: Arc<Semaphore>,
    /// TCP kite ports bound, and who holds them (`tcp::TcpPorts`).
    pub(crate) tcp_listeners: tcp::TcpPorts,
    /// Port of the first HTTP listener, for the URLs shown to connectors.
    pub(crate) http_port: Option<u16>,
    /// Port of the first HTTPS listener.
    pub(crate) https_port: Option<u16>,
    /// Who answers events sent to the relay.
    pub(crate) handlers: Arc<Handlers>,
    /// When the relay started (nodes not seen yet are waited for while it
    /// is young: they are reconnecting after a restart).
    pub(crate) started: tokio::time::Instant,
    /// Links that have proven nothing yet, bounded on their own.
    pub(crate) unproven: session::UnprovenLinks,
    /// Wrong proofs per source address, for the guessing backoff.
    pub(crate) proof_throttle: session::ProofThrottle,
    /// Certificates served to visitors of kites whose TLS the relay
    /// terminates (files and ACME).
    pub(crate) certs: certs::CertStore,
    /// Certificates from an ACME CA: wanted names, pending challenges.
    pub(crate) acme: acme::Acme,
    /// The access log (`--access-log`), if any.
    pub(crate) access: std::sync::OnceLock<AccessLog>,
    /// PageKite back-ends' challenges (`--pagekite`).
    pub(crate) pagekite: pagekite::FrontEnd,
}

impl Relay {
    /// Loads (or creates) the certificate and binds every listener.
    pub async fn bind(config: RelayConfig) -> Result<Relay, RelayError> {
        let (cert, cert_created) = match &config.tls {
            RelayTlsSource::StateDir(dir) => {
                let mut names = vec![config.name.clone()];
                for default in ["localhost", "127.0.0.1"] {
                    if !names.iter().any(|n| n == default) {
                        names.push(default.to_string());
                    }
                }
                RelayCert::load_or_create(dir, &names)?
            }
            RelayTlsSource::Files { cert, key } => (RelayCert::load(cert, key)?, false),
        };
        let fingerprint = cert.fingerprint();
        let inputs = IdentityInputs {
            cert: &cert,
            secrets: !config.domains.is_empty(),
            config_file: config.reload_from.as_ref().map(|source| &source.file),
        };
        let identity = IdentityState::load(config.identity.clone(), &inputs, 0)?;
        let acme = acme::Acme::new(config.acme.as_ref()).map_err(|err| {
            let mut why = err.to_string();
            let mut cause = std::error::Error::source(&err);
            while let Some(err) = cause {
                why.push_str(&format!(": {err}"));
                cause = err.source();
            }
            RelayError::Acme(why)
        })?;
        let served_certs = certs::CertStore::default();
        served_certs.load_files(&config.tls_certs)?;
        let mut listeners = Vec::new();
        let mut http_port = None;
        let mut https_port = None;
        for roles in &config.listeners {
            let listener = bind_listener(roles.addr).map_err(|source| RelayError::Bind {
                addr: roles.addr,
                source,
            })?;
            let addr = listener.local_addr().map_err(|source| RelayError::Bind {
                addr: roles.addr,
                source,
            })?;
            if roles.http && http_port.is_none() {
                http_port = Some(addr.port());
            }
            if roles.https && https_port.is_none() {
                https_port = Some(addr.port());
            }
            listeners.push((listener, roles.clone()));
        }
        let gateway = match &config.events.gateway {
            Some(addr) => Some(GatewayListener::bind(addr)?.with_access(&config.events)?),
            None => None,
        };
        let handlers = Arc::new(Handlers::new(&config.name, &config.events));
        let mux = MuxConfig {
            heartbeat: config.heartbeat,
            ..MuxConfig::default()
        };
        let ctx = Arc::new(RelayCtx {
            config,
            registry: Registry::default(),
            relay_cert: cert,
            identity: RwLock::new(Arc::new(identity)),
            mux,
            tracker: TaskTracker::new(),
            token: CancellationToken::new(),
            connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            tcp_listeners: tcp::TcpPorts::default(),
            http_port,
            https_port,
            handlers,
            started: tokio::time::Instant::now(),
            unproven: session::UnprovenLinks::default(),
            proof_throttle: session::ProofThrottle::default(),
            certs: served_certs,
            acme,
            access: std::sync::OnceLock::new(),
            pagekite: pagekite::FrontEnd::default(),
        });
        ctx.acme.load_stored(&ctx.certs);
        ctx.handlers.count_in(ctx.registry.metrics.clone());
        Ok(Relay {
            ctx,
            listeners,
            fingerprint,
            cert_created,
            reload: Arc::new(Notify::new()),
            gateway,
            admin: None,
        })
    }

    /// A handle that makes the running relay reload its identity settings
    /// (client CA, revocation list, certificate rules) without dropping
    /// links. The relay also reloads by itself when those files change.
    pub fn reload_trigger(&self) -> ReloadTrigger {
        ReloadTrigger::new(self.reload.clone())
    }

    /// The bound listeners.
    pub fn listeners(&self) -> Vec<BoundListener> {
        self.listeners
            .iter()
            .map(|(listener, roles)| BoundListener {
                addr: listener.local_addr().unwrap_or(roles.addr),
                roles: roles.clone(),
            })
            .collect()
    }

    /// Fingerprint of the relay's certificate, for connectors to pin.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// Where the event gateway listens (`127.0.0.1:PORT` or `unix:PATH`).
    pub fn gateway(&self) -> Option<String> {
        self.gateway.as_ref().map(GatewayListener::describe)
    }

    /// The event gateway's TCP address, if it listens on TCP.
    pub fn gateway_addr(&self) -> Option<SocketAddr> {
        self.gateway.as_ref().and_then(GatewayListener::tcp_addr)
    }

    /// The relay's event handlers: register closures here (also while it runs).
    pub fn handlers(&self) -> Arc<Handlers> {
        self.ctx.handlers.clone()
    }

    /// Serves the admin server (`--admin`) on `listener` once running.
    pub fn serve_admin(&mut self, listener: AdminListener) {
        self.admin = Some(listener);
    }

    /// Writes an access log line per visitor request or connection
    /// (`--access-log`).
    pub fn access_log(
        &self,
        target: &AccessTarget,
        format: AccessFormat,
    ) -> Result<(), AccessLogError> {
        let log = AccessLog::open(
            target,
            format,
            &self.ctx.registry.metrics,
            &self.ctx.tracker,
            self.ctx.token.clone(),
        )?;
        let _ = self.ctx.access.set(log);
        Ok(())
    }

    /// The admin server's address, if one is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
            .as_ref()
            .and_then(|admin| admin.local_addr().ok())
    }

    /// The relay's counters.
    pub fn metrics(&self) -> Metrics {
        self.ctx.registry.metrics.clone()
    }

    /// True if the self-signed certificate was created by this start.
    pub fn cert_created(&self) -> bool {
        self.cert_created
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, closes
    /// links and waits (up to 5 s, the crate's shutdown grace) for
    /// connections to end.
    pub async fn run(self, shutdown: CancellationToken) {
        let ctx = self.ctx.clone();
        let bound = self.listeners();
        if let Some(admin) = self.admin {
            let source = Arc::new(status::RelayStatus {
                ctx: ctx.clone(),
                listeners: bound,
            });
            ctx.tracker.spawn(
                admin::serve(
                    admin,
                    ctx.registry.metrics.clone(),
                    source,
                    ctx.token.clone(),
                    ctx.tracker.clone(),
                )
                .instrument(info_span!("admin")),
            );
        }
        for (listener, roles) in self.listeners {
            let addr = listener.local_addr().ok();
            let span = info_span!("listener", addr = ?addr);
            ctx.tracker
                .spawn(listener::run(listener, roles, ctx.clone()).instrument(span));
        }
        ctx.tracker.spawn(
            identity::watch(ctx.clone(), self.reload.clone()).instrument(info_span!("identity")),
        );
        ctx.tracker
            .spawn(acme::run(ctx.clone()).instrument(info_span!("acme")));
        if let Some(listener) = self.gateway {
            let gateway = Arc::new(Gateway {
                router: events::RelayRouter { ctx: ctx.clone() },
                wait: ctx.config.events.wait,
                timeout: ctx.config.events.timeout,
                tracker: ctx.tracker.clone(),
                token: ctx.token.clone(),
            });
            ctx.tracker
                .spawn(run_gateway(listener, gateway).instrument(info_span!("gateway")));
        }
        info!(fingerprint = %self.fingerprint, "relay running");
        shutdown.cancelled().await;
        info!("relay shutting down");
        ctx.handlers.shut_down();
        ctx.token.cancel();
        shutdown::drain(&ctx.tracker, SHUTDOWN_GRACE, "connections").await;
    }
}

impl RelayCtx {
    /// The current identity state (acceptor and rules).
    pub(crate) fn identity(&self) -> Arc<IdentityState> {
        sync::read(&self.identity).clone()
    }

    /// Replaces the identity state (on reload).
    fn set_identity(&self, state: Arc<IdentityState>) {
        *sync::write(&self.identity) = state;
    }
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("fingerprint", &self.fingerprint)
            .field("listeners", &self.listeners())
            .finish()
    }
}

/// `err` and its sources, joined with `: `.
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
