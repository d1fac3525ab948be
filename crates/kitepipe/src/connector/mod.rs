//! The connector: dials out to relays, registers kites, serves visitor
//! streams by connecting to local targets.
//!
//! Start at [`Connector::run`]: one task per relay keeps a link up forever
//! (`session`: dial, TLS, handshake, serve, then reconnect with capped
//! jittered backoff). Streams the relay opens are served by `serve_stream`:
//! visitors go to kites' local targets, events to the event pipe's
//! handlers. The connector's event gateway sends its events over the
//! first relay link that is up (`EventLinks`).
//!
//! Its kites change while it runs (`reload`: SIGHUP or a changed config
//! file): every link sends the relay the claims that changed and
//! withdraws the kites that went, on the same link.
//!
//! The connector never listens on a public socket: everything from outside
//! reaches it through links it dialed. Its only listener is the event
//! gateway, on loopback or a unix socket.

mod htpasswd;
mod pagekite;
mod reload;
mod session;
mod status;

pub use reload::{ConfigLoader, ReloadTrigger};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kitepipe_proto::event::{Caller, Route};
use kitepipe_proto::frame::ResetCode;
use kitepipe_proto::kite::KiteRef;
use kitepipe_proto::message::{self, RelayedOp, RemoteClass, StreamHeader, VisitorHeader};
use kitepipe_proto::proxy::ProxyProtocol;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::ConnectorConfig;
use crate::link::{IncomingStream, Mux, MuxConfig, MuxStream};
use crate::metrics::Metrics;
use crate::metrics::admin::{self, AdminListener};
use crate::pipe::{
    self, Gateway, GatewayListener, Handlers, PipeError, RELAY_NODE, RouteError, Router,
    run_gateway,
};
use crate::pki::{ConnectorTlsOptions, PkiError, connector_client_config_with};
use crate::remote::agent::{MAX_CONCURRENT_OPS, NodePolicy, Origin};
use crate::shutdown::{self, SHUTDOWN_GRACE};
use crate::sync::lock;
use crate::tunnel;

/// How long connecting to a local target may take. Local services answer
/// in microseconds; a target that takes seconds is down.
pub(crate) const TARGET_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Streams a relay may have open on one link at once: visitors, events and
/// remote operations together. Each may hold a descriptor here (a
/// visitor's socket to its target, an operation's file), a task and the
/// copy buffers of a visitor (about 30 KiB in all, as on the relay), so
/// a full link costs about 4,096 descriptors and 120 MiB. That is well
/// beyond what a service behind one connector sees at once (the hostile
/// suite holds 2,000 TCP visitors), and bounded. A stream beyond it is
/// reset (`busy`) at once. A full link needs more descriptors than the
/// usual soft limit of 1024, so the connector raises its soft limit to
/// `WANTED_FD_LIMIT` (within the hard limit) at start.
pub const MAX_LINK_STREAMS: usize = 4096;

/// The soft descriptor limit a connector asks for at start: room for
/// [`MAX_LINK_STREAMS`] on a few relay links, running processes' pipes and
/// the event gateway's clients.
pub(crate) const WANTED_FD_LIMIT: u64 = 16 * 1024;

/// Raises the soft descriptor limit to [`WANTED_FD_LIMIT`], or the hard
/// limit if that is lower; never lowers it.
fn raise_fd_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let wanted = match limit.maximum {
        Some(hard) => WANTED_FD_LIMIT.min(hard),
        None => WANTED_FD_LIMIT,
    };
    if limit.current.is_some_and(|soft| soft < wanted) {
        let raised = Rlimit {
            current: Some(wanted),
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => debug!(soft = wanted, "raised the descriptor limit"),
            Err(err) => debug!(%err, "cannot raise the descriptor limit"),
        }
    }
}

/// Why a connector could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// The TLS configuration could not be built (e.g. unreadable CA file).
    #[error("cannot set up TLS to the relay")]
    Tls(#[from] PkiError),
    /// The event gateway could not be bound.
    #[error("event gateway")]
    Gateway(#[from] PipeError),
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
    /// TLS settings per relay, in config order (`None`: a PageKite
    /// front-end, spoken to in plaintext).
    tls: Vec<Option<Arc<rustls::ClientConfig>>>,
    instance: String,
    states: Vec<watch::Sender<LinkState>>,
    /// The event gateway's socket, served by `run`.
    gateway: Option<GatewayListener>,
    /// Who answers events sent to this connector.
    handlers: Arc<Handlers>,
    /// The connector's counters.
    metrics: Metrics,
    /// The admin server's socket, served by `run`.
    admin: Option<AdminListener>,
    /// Where a reload reads the config again, and which file to watch.
    loader: Option<(ConfigLoader, Option<std::path::PathBuf>)>,
    /// Woken by [`ReloadTrigger::reload`].
    reload: Arc<Notify>,
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
            .map(|relay| {
                // No trust: a PageKite front-end (plaintext, no TLS).
                relay
                    .trust
                    .as_ref()
                    .map(|trust| connector_client_config_with(trust, &options))
                    .transpose()
            })
            .collect::<Result<Vec<_>, _>>()?;
        let instance = message::hex(&crate::pki::random_nonce()[..16]);
        let states = config
            .relays
            .iter()
            .map(|_| watch::channel(LinkState::Down).0)
            .collect();
        let gateway = match &config.events.gateway {
            Some(addr) => Some(GatewayListener::bind(addr)?.with_access(&config.events)?),
            None => None,
        };
        let handlers = Arc::new(Handlers::new(&config.name, &config.events));
        let metrics = Metrics::new();
        handlers.count_in(metrics.clone());
        Ok(Connector {
            config: Arc::new(config),
            tls,
            instance,
            states,
            gateway,
            handlers,
            metrics,
            admin: None,
            loader: None,
            reload: Arc::new(Notify::new()),
        })
    }

    /// Serves the admin server (`--admin`) on `listener` once running.
    pub fn serve_admin(&mut self, listener: AdminListener) {
        self.admin = Some(listener);
    }

    /// The admin server's address, if one is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
            .as_ref()
            .and_then(|admin| admin.local_addr().ok())
    }

    /// The connector's counters.
    pub fn metrics(&self) -> Metrics {
        self.metrics.clone()
    }

    /// Lets this connector change its kites while it runs: on
    /// [`ReloadTrigger::reload`] and when `file` changes (looked at every
    /// two seconds), `loader` reads the config again. Kites added, removed
    /// or changed take effect on the live links; other settings need a
    /// restart (the log says so); a config that does not load changes
    /// nothing.
    pub fn reload_from(mut self, loader: ConfigLoader, file: Option<std::path::PathBuf>) -> Self {
        self.loader = Some((loader, file));
        self
    }

    /// A handle that asks the running connector to reload its config (see
    /// [`Connector::reload_from`]; without a loader it does nothing).
    pub fn reload_trigger(&self) -> ReloadTrigger {
        ReloadTrigger::new(self.reload.clone())
    }

    /// Where the event gateway listens (`127.0.0.1:PORT` or `unix:PATH`).
    pub fn gateway(&self) -> Option<String> {
        self.gateway.as_ref().map(GatewayListener::describe)
    }

    /// The event gateway's TCP address, if it listens on TCP.
    pub fn gateway_addr(&self) -> Option<std::net::SocketAddr> {
        self.gateway.as_ref().and_then(GatewayListener::tcp_addr)
    }

    /// This connector's event handlers: register closures here (also
    /// while it runs).
    pub fn handlers(&self) -> Arc<Handlers> {
        self.handlers.clone()
    }

    /// Watches the state of the link to relay number `index` (in config order).
    pub fn watch(&self, index: usize) -> Option<watch::Receiver<LinkState>> {
        self.states.get(index).map(|s| s.subscribe())
    }

    /// Keeps a link to every relay until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        raise_fd_limit();
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
        let mut kites = Kites::new(&self.config);
        kites.metrics = self.metrics.clone();
        let kites = Arc::new(kites);
        {
            let (kites, token) = (kites.clone(), token.clone());
            tracker.spawn(async move { kites.watch_files(token).await });
        }
        if let Some((loader, file)) = self.loader {
            let watcher = reload::Watcher {
                loader,
                file,
                running: self.config.clone(),
                kites: kites.clone(),
                notify: self.reload.clone(),
            };
            tracker.spawn(watcher.run(token.clone()).instrument(info_span!("reload")));
        }
        let event_links = Arc::new(EventLinks::new(self.config.relays.len()));
        if let Some(admin) = self.admin {
            let source = Arc::new(status::ConnectorStatus {
                config: self.config.clone(),
                states: self.states.iter().map(watch::Sender::subscribe).collect(),
                links: event_links.clone(),
                metrics: self.metrics.clone(),
                gateway: self.gateway.as_ref().map(GatewayListener::describe),
                up: Mutex::new(Vec::new()),
            });
            tracker.spawn(
                admin::serve(
                    admin,
                    self.metrics.clone(),
                    source,
                    token.clone(),
                    tracker.clone(),
                )
                .instrument(info_span!("admin")),
            );
        }
        if let Some(listener) = self.gateway {
            let gateway = Arc::new(Gateway {
                router: ConnectorRouter {
                    links: event_links.clone(),
                    pagekite: self.config.protocol == crate::config::LinkProtocol::PageKite,
                },
                wait: self.config.events.wait,
                timeout: self.config.events.timeout,
                tracker: tracker.clone(),
                token: token.clone(),
            });
            tracker.spawn(run_gateway(listener, gateway).instrument(info_span!("gateway")));
        }
        let mux = MuxConfig {
            heartbeat: self.config.heartbeat,
            ..MuxConfig::default()
        };
        for (index, ((relay, state), tls)) in self
            .config
            .relays
            .iter()
            .zip(self.states)
            .zip(self.tls)
            .enumerate()
        {
            let Some(tls) = tls else {
                let link = pagekite::PageKiteLink {
                    relay: relay.clone(),
                    config: self.config.clone(),
                    kites: kites.clone(),
                    handlers: self.handlers.clone(),
                    state,
                    session_id: Mutex::new(None),
                    tracker: tracker.clone(),
                    token: token.clone(),
                };
                tracker.spawn(
                    link.run()
                        .instrument(info_span!("frontend", addr = %relay.addr)),
                );
                continue;
            };
            let link = session::RelayLink {
                index,
                event_links: event_links.clone(),
                handlers: self.handlers.clone(),
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
        self.handlers.shut_down();
        token.cancel();
        shutdown::drain(&tracker, SHUTDOWN_GRACE, "streams").await;
    }
}

/// The kites this connector serves, and the TCP ports relays assigned.
pub(crate) struct Kites {
    /// The kites served now: a reload replaces the set, and a changed
    /// htpasswd file marks it changed; each link watches it and tells its
    /// relay what changed. A visitor stream looks its kite up here when it
    /// opens, so open streams keep the target they started with.
    current: watch::Sender<Arc<KiteSet>>,
    /// Kinds of remote operations accepted from relays (`--allow-remote`).
    allow_remote: Vec<RemoteClass>,
    /// How relayed operations run (`fs-read`, protected paths, their
    /// environment, the process cap).
    remote: Origin,
    /// The connector's counters (visitor streams per kite).
    metrics: Metrics,
    /// Public ports relays gave TCP kites registered with port 0, so a
    /// reconnect asks for the same port again. Key: (relay, kite name).
    assigned_ports: Mutex<HashMap<(String, String), u16>>,
}

/// One version of the configured kites.
pub(crate) struct KiteSet {
    pub(crate) targets: Vec<crate::config::KiteTarget>,
    /// The kites' htpasswd files and their current users.
    pub(crate) htpasswd: htpasswd::HtpasswdFiles,
}

impl KiteSet {
    fn new(targets: Vec<crate::config::KiteTarget>) -> KiteSet {
        KiteSet {
            htpasswd: htpasswd::HtpasswdFiles::new(&targets),
            targets,
        }
    }
}

impl Kites {
    fn new(config: &ConnectorConfig) -> Kites {
        Kites {
            current: watch::Sender::new(Arc::new(KiteSet::new(config.kites.clone()))),
            allow_remote: config.allow_remote.clone(),
            remote: Origin::Relayed(Arc::new(node_policy(config))),
            assigned_ports: Mutex::new(HashMap::new()),
            metrics: Metrics::new(),
        }
    }

    /// The kites served now.
    pub(crate) fn current(&self) -> Arc<KiteSet> {
        self.current.borrow().clone()
    }

    /// Tells of every change of the kites (a reload, new htpasswd users).
    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<KiteSet>> {
        self.current.subscribe()
    }

    /// Serves `targets` from now on (a reload).
    fn replace(&self, targets: Vec<crate::config::KiteTarget>) {
        self.current.send_replace(Arc::new(KiteSet::new(targets)));
    }

    /// Looks at the current kites' htpasswd files every
    /// [`htpasswd::HTPASSWD_POLL`] until `token` is cancelled; changed
    /// users mark the kites changed.
    async fn watch_files(&self, token: CancellationToken) {
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(htpasswd::HTPASSWD_POLL) => {}
            }
            if self.current().htpasswd.check() {
                self.current.send_modify(|_| {});
            }
        }
    }

    /// The kite as the relay names it, with its local target and options
    /// (its place in the current set).
    fn target(&self, kite: &KiteRef) -> Option<(Arc<KiteSet>, usize)> {
        let set = self.current();
        let index = set.targets.iter().position(|t| {
            t.kite.proto == kite.proto
                && t.kite.name == kite.name
                && (t.kite.port == kite.port || t.kite.port == 0)
        })?;
        Some((set, index))
    }
}

/// The policy for relayed operations: the config's grant and protected
/// paths, plus this process's own executable and `/proc` entries (its
/// environment and command line may hold secrets).
fn node_policy(config: &ConnectorConfig) -> NodePolicy {
    let mut protected: Vec<(std::path::PathBuf, &str)> = config
        .remote_fs
        .protected
        .iter()
        .map(|(path, what)| (path.clone(), what.as_str()))
        .collect();
    if let Ok(exe) = std::env::current_exe() {
        protected.push((exe, "the connector's executable"));
    }
    protected.push((
        std::path::PathBuf::from("/proc/self"),
        "the connector's process (its environment and command line)",
    ));
    NodePolicy::new(
        config.remote_fs.write,
        crate::remote::agent::Protected::new(protected),
        &|key| std::env::var(key).ok(),
    )
}

/// What bounds the streams of one relay link: how many may be open
/// ([`MAX_LINK_STREAMS`]) and how many remote operations run at once
/// ([`MAX_CONCURRENT_OPS`], the same bound as an agent's).
#[derive(Clone)]
pub(crate) struct LinkBounds {
    streams: Arc<Semaphore>,
    ops: Arc<Semaphore>,
}

impl LinkBounds {
    pub(crate) fn new() -> LinkBounds {
        LinkBounds {
            streams: Arc::new(Semaphore::new(MAX_LINK_STREAMS)),
            ops: Arc::new(Semaphore::new(MAX_CONCURRENT_OPS)),
        }
    }

    /// A slot for one more open stream; `None` when the link is full.
    pub(crate) fn admit(&self) -> Option<OwnedSemaphorePermit> {
        self.streams.clone().try_acquire_owned().ok()
    }
}

/// Resets a stream the link has no room for.
pub(crate) fn refuse_full(incoming: IncomingStream) {
    let mut stream = incoming.stream;
    debug!(stream = stream.id(), "stream refused: the link is full");
    stream.reset(
        ResetCode::Busy,
        &format!("this connector has {MAX_LINK_STREAMS} streams open on this link already"),
    );
}

/// The links events go out on: one slot per relay, `Some` while that
/// relay's link is up and registered.
pub(crate) struct EventLinks {
    links: Mutex<Vec<Option<Mux>>>,
    /// Woken whenever a slot changes.
    changed: Notify,
}

impl EventLinks {
    fn new(relays: usize) -> EventLinks {
        EventLinks {
            links: Mutex::new(vec![None; relays]),
            changed: Notify::new(),
        }
    }

    /// Records the link to relay `index` (or its loss).
    pub(crate) fn set(&self, index: usize, mux: Option<Mux>) {
        if let Some(slot) = lock(&self.links).get_mut(index) {
            *slot = mux;
        }
        self.changed.notify_waiters();
    }

    /// The first live link, in relay order.
    fn first_up(&self) -> Option<Mux> {
        lock(&self.links)
            .iter()
            .flatten()
            .find(|mux| !mux.is_closed())
            .cloned()
    }
}

/// Finds the link for the connector's gateway: `/server/` and `/peer/`
/// both go to the relay (the first relay whose link is up).
struct ConnectorRouter {
    links: Arc<EventLinks>,
    /// The links are PageKite tunnels (`--protocol pagekite`), which
    /// carry no events.
    pagekite: bool,
}

impl Router for ConnectorRouter {
    async fn route(&self, route: &Route, wait: Duration) -> Result<Mux, RouteError> {
        if let Route::Client(_) = route {
            return Err(RouteError::NotHere(
                "this is a connector's gateway: reach the relay with /server/... and other \
                 connectors with /peer/NODE/...; /client/ is the relay's way to connectors",
            ));
        }
        if self.pagekite {
            return Err(RouteError::NotHere(
                "this connector speaks PageKite to its front-ends (--protocol pagekite): \
                 events do not cross a PageKite tunnel",
            ));
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let changed = self.links.changed.notified();
            if let Some(mux) = self.links.first_up() {
                return Ok(mux);
            }
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return self
                        .links
                        .first_up()
                        .ok_or_else(|| RouteError::Offline("the link to the relay".into()));
                }
            }
        }
    }
}

/// Runs a remote operation the relay passed on, if this connector accepts
/// its kind, once one of the link's operation slots is free; logs it with
/// the caller either way.
async fn serve_relayed(
    relayed: RelayedOp,
    mut stream: MuxStream,
    allowed: &[RemoteClass],
    origin: &Origin,
    ops: &Arc<Semaphore>,
) {
    let class = relayed.op.class();
    if !allowed.contains(&class) {
        warn!(caller = %relayed.caller, op = %class, "remote operation refused: not accepted here");
        let why = if allowed.is_empty() {
            "this connector accepts no remote operations (start it with --allow-remote)".to_string()
        } else {
            format!(
                "this connector accepts only {} remote operations, not {class}",
                RemoteClass::describe(allowed)
            )
        };
        stream.reset(ResetCode::Refused, &why);
        return;
    }
    info!(caller = %relayed.caller, op = %relayed.op.summary(), "remote operation");
    match crate::remote::agent::op_slot(ops).await {
        // Boxed: an operation waiting for a slot holds a pointer, not the
        // state of every kind of operation.
        Ok(_slot) => Box::pin(crate::remote::agent::serve_op(relayed.op, stream, origin)).await,
        Err(busy) => {
            warn!(caller = %relayed.caller, op = %relayed.op.summary(), "remote operation refused: busy");
            crate::remote::agent::refuse(stream, busy).await;
        }
    }
}

/// Serves one stream the relay opened: a visitor is connected to the
/// kite's local target with bytes copied both ways; an event goes to the
/// handlers; a remote operation runs within the link's `bounds`.
pub(crate) async fn serve_stream(
    incoming: IncomingStream,
    kites: Arc<Kites>,
    handlers: Arc<Handlers>,
    bounds: LinkBounds,
) {
    let IncomingStream { header, mut stream } = incoming;
    let header = match message::decode::<StreamHeader>(&header) {
        Ok(StreamHeader::Visitor(visitor)) => visitor,
        Ok(StreamHeader::Event(event)) => {
            // Only the relay opens streams here: an event without a caller
            // comes from the relay itself.
            let caller = event.caller.clone().unwrap_or_else(|| Caller {
                node: RELAY_NODE.to_string(),
                identity: None,
            });
            // Boxed, like the visitor below: a stream's task is sized for
            // its largest kind, and relayed operations waiting for a slot
            // should not each hold an event's or a visitor's state.
            Box::pin(pipe::serve_event(stream, event, caller, handlers)).await;
            return;
        }
        Ok(StreamHeader::RemoteRelayed(relayed)) => {
            serve_relayed(
                relayed,
                stream,
                &kites.allow_remote,
                &kites.remote,
                &bounds.ops,
            )
            .await;
            return;
        }
        Err(err) => {
            stream.reset(
                ResetCode::ProtocolError,
                &format!("bad stream header: {err}"),
            );
            return;
        }
    };
    let Some((set, index)) = kites.target(&header.kite) else {
        debug!(kite = %header.kite, "stream for a kite we do not serve");
        stream.reset(
            ResetCode::NoSuchKite,
            &format!("this connector does not serve {}", header.kite),
        );
        return;
    };
    let kite = &set.targets[index];
    let target = kite.target.as_str();
    let counted = kites.metrics.kite(&header.kite.name);
    let _open = counted.connection();
    let span = tracing::debug_span!("visitor", kite = %header.kite, peer = %header.peer);
    let visitor = async {
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
        if let Some(version) = kite.proxy_protocol {
            // Before any visitor byte: the header is the first thing the
            // target reads, so nothing the visitor sends can stand in for it.
            // At most 104 bytes into a fresh socket's empty send buffer:
            // this write does not wait on the target.
            let proxy_header = proxy_header(version, &header, sock.peer_addr().ok());
            if let Err(err) = sock.write_all(&proxy_header).await {
                info!(%target, %err, "local target closed before the PROXY header");
                stream.reset(
                    ResetCode::TargetUnreachable,
                    &format!("write to {target}: {err}"),
                );
                return;
            }
        }
        match tunnel::splice_stream(&mut counted.counting_target(&mut sock), &mut stream).await {
            Ok((up, down)) => debug!(up, down, "visitor done"),
            Err(err) => {
                debug!(%err, "visitor stream ended with error");
                // The visitor or the link failed: the local service sees a
                // reset, never a clean end of a cut request or upload.
                let _ = sock.set_zero_linger();
            }
        }
    };
    Box::pin(visitor.instrument(span)).await;
}

/// The PROXY protocol header for a visitor: the source is the visitor's
/// address as the relay saw it (unknown if it does not parse), the
/// destination the relay's address the visitor connected to, or, from a
/// relay that does not say, the local `target`'s.
fn proxy_header(
    version: ProxyProtocol,
    visitor: &VisitorHeader,
    target: Option<SocketAddr>,
) -> Vec<u8> {
    let source = visitor.peer.parse::<SocketAddr>().ok();
    if source.is_none() {
        debug!(peer = %visitor.peer, "visitor address unknown; PROXY header without it");
    }
    let destination = visitor
        .relay_addr
        .as_deref()
        .and_then(|addr| addr.parse::<SocketAddr>().ok())
        .or(target)
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    version.header(source, destination)
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use kitepipe_proto::remote::{ExecOp, RemoteOp, StatOp};
    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::link::Side;

    /// The header's addresses come from the visitor header: the visitor's
    /// as the source (else UNKNOWN / LOCAL), the relay's as the
    /// destination (else the target's).
    #[test]
    fn proxy_headers_take_their_addresses_from_the_visitor_header() {
        let visitor = |peer: &str, relay_addr: Option<&str>| VisitorHeader {
            kite: KiteRef::parse("tcp:db.example.net:7000").unwrap(),
            host: None,
            peer: peer.into(),
            relay_addr: relay_addr.map(str::to_string),
        };
        let target = Some(SocketAddr::from(([127, 0, 0, 1], 5432)));
        for (peer, relay_addr, line) in [
            (
                "198.51.100.7:4000",
                Some("203.0.113.1:7000"),
                "PROXY TCP4 198.51.100.7 203.0.113.1 4000 7000\r\n",
            ),
            (
                "198.51.100.7:4000",
                None,
                "PROXY TCP4 198.51.100.7 127.0.0.1 4000 5432\r\n",
            ),
            (
                "198.51.100.7:4000",
                Some("not an address"),
                "PROXY TCP4 198.51.100.7 127.0.0.1 4000 5432\r\n",
            ),
            ("somewhere", Some("203.0.113.1:7000"), "PROXY UNKNOWN\r\n"),
        ] {
            let header = proxy_header(ProxyProtocol::V1, &visitor(peer, relay_addr), target);
            assert_eq!(String::from_utf8(header).unwrap(), line);
        }
        let header = proxy_header(ProxyProtocol::V2, &visitor("", None), target);
        assert_eq!(
            &header[12..],
            &[0x20, 0x00, 0, 0],
            "LOCAL without a visitor"
        );
    }

    /// A relayed operation of a kind the connector did not opt in to is
    /// refused by the connector itself, whatever the relay decided.
    #[tokio::test]
    async fn relayed_operations_outside_allow_remote_are_refused_here() {
        let tracker = TaskTracker::new();
        let token = CancellationToken::new();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let config = MuxConfig::default();
        let (relay, _relay_rx) = Mux::start(
            a,
            BytesMut::new(),
            Side::Relay,
            &config,
            &tracker,
            token.child_token(),
        );
        let (_conn, mut conn_rx) = Mux::start(
            b,
            BytesMut::new(),
            Side::Connector,
            &config,
            &tracker,
            token.child_token(),
        );
        let allow = |classes: Vec<RemoteClass>| {
            Arc::new(Kites {
                current: watch::Sender::new(Arc::new(KiteSet::new(Vec::new()))),
                allow_remote: classes,
                remote: Origin::Relayed(Arc::new(NodePolicy::new(
                    false,
                    Default::default(),
                    &|_| None,
                ))),
                assigned_ports: Mutex::new(HashMap::new()),
                metrics: Metrics::new(),
            })
        };
        let exec = RemoteOp::Exec(ExecOp {
            argv: vec!["true".into()],
            ..Default::default()
        });
        let stat = RemoteOp::Stat(StatOp {
            path: "/".into(),
            no_follow: false,
        });
        for (accepts, op, refusal) in [
            (vec![], exec.clone(), Some("accepts no remote operations")),
            (
                vec![RemoteClass::Fs],
                exec,
                Some("accepts only fs remote operations, not exec"),
            ),
            (vec![RemoteClass::Fs], stat, None),
        ] {
            let header = StreamHeader::RemoteRelayed(RelayedOp {
                caller: "test".into(),
                op,
            });
            let mut stream = relay.open(message::encode(&header)).await.unwrap();
            let incoming = conn_rx.incoming.recv().await.unwrap();
            let handlers = Arc::new(Handlers::new(
                "test",
                &crate::config::EventConfig::default(),
            ));
            tracker.spawn(serve_stream(
                incoming,
                allow(accepts),
                handlers,
                LinkBounds::new(),
            ));
            let mut reply = Vec::new();
            let read = stream.read_to_end(&mut reply).await;
            match refusal {
                Some(needle) => {
                    assert!(read.is_err(), "refused streams are reset");
                    let (code, reason) = stream.reset_reason().expect("a reset reason");
                    assert_eq!(code, ResetCode::Refused);
                    assert!(reason.contains(needle), "{reason}");
                }
                None => {
                    read.unwrap();
                    assert!(!reply.is_empty(), "stat answered");
                    let mut reply = BytesMut::from(&reply[..]);
                    let record = kitepipe_proto::remote::AgentRecord::decode(&mut reply)
                        .unwrap()
                        .expect("a whole record");
                    assert!(
                        matches!(record, kitepipe_proto::remote::AgentRecord::Done(_)),
                        "stat succeeded: {record:?}"
                    );
                }
            }
        }
        token.cancel();
    }
}
