//! One relay's link, seen from the connector: dial, TLS, handshake,
//! registration, serving streams, and reconnecting forever.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use kitepipe_proto::frame::Frame;
use kitepipe_proto::kite::{KiteProto, KiteRef};
use kitepipe_proto::message::{
    self, ConnectorMessage, ErrorCode, Hello, KiteClaim, KiteResult, MessageError,
    PROTOCOL_VERSION, RefuseReason, Register, Registered, RelayMessage, Role, Withdrawn,
};
use rustls::AlertDescription;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, warn};

use super::{EventLinks, KiteSet, Kites, LinkBounds, LinkState, refuse_full, serve_stream};
use crate::config::{ConnectorConfig, RelayTarget};
use crate::link::backoff::Backoff;
use crate::link::io::ReadAhead;
use crate::link::records::RecordError;
use crate::link::{
    HANDSHAKE_TIMEOUT, LinkClosed, LinkIo, Mux, MuxConfig, MuxReceivers, PeerGoodbye, Side,
};
use crate::pipe::Handlers;
use crate::pki::{
    PkiError, ProofInput, describe_tls_error, find_tls_error, kite_proof, link_exporter,
    random_nonce,
};
use crate::sync::lock;

/// How long dialing the relay may take (TCP connect). A relay behind a cut
/// network never answers; this bounds each attempt.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// First reconnect delay. Short, so a relay restart costs well under a second.
const BACKOFF_INITIAL: Duration = Duration::from_millis(250);

/// Ceiling of the reconnect delay while the relay's address refuses TCP
/// connections: its host is up and nothing listens, which is what a relay
/// restart looks like. A refused connect costs the relay nothing, so the
/// connector keeps trying about every second (jittered) instead of backing
/// off to `max_backoff`, and a restarted relay sees its connectors within a
/// second or so.
const REFUSED_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A link that stayed up this long counts as healthy: the backoff starts over.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);

/// Why one attempt at a link failed (before it was up).
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connecting to {0} timed out")]
    ConnectTimeout(String),
    #[error("TLS handshake with the relay failed: {source}")]
    Tls {
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with the relay timed out")]
    TlsTimeout,
    /// The relay's first answer could not be read: in TLS 1.3 this is where
    /// a refusal of this connector's certificate arrives.
    #[error("relay closed the link before answering: {source}")]
    FirstRead {
        #[source]
        source: std::io::Error,
    },
    #[error("relay refused the link: {0}")]
    Refused(String),
    #[error("link handshake failed: {0}")]
    Handshake(#[source] HandshakeError),
}

/// Why the link handshake failed once TLS was up.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    /// The TLS exporter the proofs are bound to could not be derived.
    #[error("{0}")]
    Exporter(#[source] PkiError),
    /// The link's record layer could not take the session over from rustls.
    #[error("{0}")]
    Records(#[source] RecordError),
    /// The relay closed the connection before its first answer.
    #[error("relay closed the link before answering")]
    ClosedBeforeAnswer,
    /// The relay's answer did not come within [`HANDSHAKE_TIMEOUT`].
    #[error("relay did not answer in time")]
    Timeout,
    /// The link closed during the handshake.
    #[error("{0}")]
    Link(#[source] LinkClosed),
    /// The link's control queue ended.
    #[error("link closed")]
    ControlClosed,
    /// A control message from the relay did not decode.
    #[error("{0}")]
    Message(#[source] MessageError),
    /// The relay's challenge nonce is not hex.
    #[error("bad relay nonce")]
    BadNonce,
    /// The relay sent a message that does not belong at this step.
    #[error("unexpected message from relay: {0:?}")]
    Unexpected(Box<RelayMessage>),
}

impl From<HandshakeError> for AttemptError {
    fn from(err: HandshakeError) -> AttemptError {
        AttemptError::Handshake(err)
    }
}

/// How one attempt at a link ended (logged by the attempt), for
/// [`keep_linked`].
pub(super) enum Ended {
    /// The link was up, then closed for this reason.
    Closed(LinkClosed),
    /// The link never came up; `refused`: the relay's address refused
    /// the TCP connection (a relay restarting).
    Failed { refused: bool },
}

/// The reconnect loop of every link, whatever its protocol: runs
/// `attempt` until shutdown, marks the link down after each, and waits a
/// capped, jittered backoff between attempts (about a second while the
/// relay's address refuses connections; the backoff starts over after a
/// link that stayed up [`HEALTHY_AFTER`]).
pub(super) async fn keep_linked<F, Fut>(
    max_backoff: Duration,
    state: &watch::Sender<LinkState>,
    token: &CancellationToken,
    mut attempt: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Ended>,
{
    let mut backoff = Backoff::new(BACKOFF_INITIAL, max_backoff);
    let mut refused_backoff = Backoff::new(BACKOFF_INITIAL, REFUSED_BACKOFF_MAX.min(max_backoff));
    loop {
        let started = tokio::time::Instant::now();
        let refused = match attempt().await {
            Ended::Closed(LinkClosed::Shutdown) => return,
            Ended::Closed(_) => false,
            Ended::Failed { refused } => refused,
        };
        state.send_replace(LinkState::Down);
        if token.is_cancelled() {
            return;
        }
        if started.elapsed() > HEALTHY_AFTER {
            backoff.reset();
            refused_backoff.reset();
        }
        let used = if refused {
            &mut refused_backoff
        } else {
            &mut backoff
        };
        let delay = used.next_delay();
        info!(
            delay_ms = delay.as_millis() as u64,
            attempt = used.attempt(),
            "reconnecting"
        );
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Everything one relay's link task needs.
pub(crate) struct RelayLink {
    /// This relay's place in the config (its slot in `event_links`).
    pub(crate) index: usize,
    /// Where the link is published for the event gateway.
    pub(crate) event_links: Arc<EventLinks>,
    /// Who answers events the relay sends.
    pub(crate) handlers: Arc<Handlers>,
    pub(crate) relay: RelayTarget,
    pub(crate) config: Arc<ConnectorConfig>,
    pub(crate) tls: Arc<rustls::ClientConfig>,
    pub(crate) instance: String,
    pub(crate) kites: Arc<Kites>,
    pub(crate) mux: MuxConfig,
    pub(crate) state: watch::Sender<LinkState>,
    pub(crate) tracker: TaskTracker,
    pub(crate) token: CancellationToken,
}

impl RelayLink {
    /// Keeps the link up until shutdown.
    pub(crate) async fn run(self) {
        let attempt = || async {
            match self.attempt().await {
                Ok(LinkClosed::Shutdown) => Ended::Closed(LinkClosed::Shutdown),
                Ok(reason) => {
                    warn!(%reason, "link to relay lost");
                    Ended::Closed(reason)
                }
                Err(err) => {
                    let refused = matches!(&err, AttemptError::Connect { source, .. }
                        if source.kind() == std::io::ErrorKind::ConnectionRefused);
                    let hint = self.hint(&err);
                    match hint {
                        Some(hint) => error!(err = %err, %hint, "cannot link to relay"),
                        // The relay said why: an operator must act.
                        None if matches!(err, AttemptError::Refused(_)) => {
                            error!(err = %err, "cannot link to relay")
                        }
                        None => warn!(err = %err, "cannot link to relay"),
                    }
                    Ended::Failed { refused }
                }
            }
        };
        keep_linked(self.config.max_backoff, &self.state, &self.token, attempt).await;
    }

    /// One link, from dialing to its end. `Ok` once the link was up.
    async fn attempt(&self) -> Result<LinkClosed, AttemptError> {
        let addr = &self.relay.addr;
        let tcp = tokio::select! {
            _ = self.token.cancelled() => return Ok(LinkClosed::Shutdown),
            res = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)) => match res {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(source)) => return Err(AttemptError::Connect { addr: addr.clone(), source }),
                Err(_) => return Err(AttemptError::ConnectTimeout(addr.clone())),
            },
        };
        let _ = tcp.set_nodelay(true);
        let server_name = ServerName::try_from(self.relay.host.clone())
            .unwrap_or_else(|_| ServerName::try_from("relay.invalid").expect("valid literal name"));
        let tls = tokio::select! {
            _ = self.token.cancelled() => return Ok(LinkClosed::Shutdown),
            res = tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsConnector::from(self.tls.clone()).connect(server_name, ReadAhead::for_handshake(BytesMut::new(), tcp))) => match res {
                Ok(Ok(tls)) => tls,
                Ok(Err(source)) => return Err(AttemptError::Tls { source }),
                Err(_) => return Err(AttemptError::TlsTimeout),
            },
        };
        let exporter = link_exporter(tls.get_ref().1).map_err(HandshakeError::Exporter)?;
        // Say hello on the TLS stream itself and wait for the first bytes
        // of the answer before the multiplexer takes over: in TLS 1.3 the
        // relay judges this connector's certificate after the handshake is
        // complete on this side, so a refusal arrives as an alert on this
        // first read, where it is still a typed rustls error.
        let client_nonce = random_nonce();
        let hello = ConnectorMessage::Hello(Hello {
            version: PROTOCOL_VERSION,
            role: Role::Connector,
            instance: self.instance.clone(),
            node: self.config.name.clone(),
            software: concat!("kitepipe/", env!("CARGO_PKG_VERSION")).into(),
            client_nonce: message::hex(&client_nonce),
            remote: self.config.allow_remote.clone(),
            agent: (!self.config.allow_remote.is_empty()).then(crate::remote::agent::hello),
        });
        let mut tls = LinkIo::after_handshake(tokio_rustls::TlsStream::Client(tls))
            .map_err(HandshakeError::Records)?;
        let mut first = BytesMut::new();
        Frame::Control {
            payload: message::encode(&hello),
        }
        .encode(&mut first);
        let answer = async {
            tls.write_all(&first).await?;
            tls.flush().await?;
            first.clear();
            tls.read_buf(&mut first).await
        };
        tokio::select! {
            _ = self.token.cancelled() => return Ok(LinkClosed::Shutdown),
            res = tokio::time::timeout(HANDSHAKE_TIMEOUT, answer) => match res {
                Ok(Ok(0)) => return Err(HandshakeError::ClosedBeforeAnswer.into()),
                Ok(Ok(_)) => {}
                Ok(Err(source)) => return Err(AttemptError::FirstRead { source }),
                Err(_) => return Err(HandshakeError::Timeout.into()),
            },
        }
        let token = self.token.child_token();
        let (reader, writer) = tls.into_mux_parts();
        let (mux, mut rx) = Mux::start_parts(
            reader,
            writer,
            first,
            Side::Connector,
            &self.mux,
            &self.tracker,
            token.clone(),
        );
        let res = self
            .handshake_and_serve(&mux, &mut rx, &exporter, &client_nonce)
            .await;
        self.event_links.set(self.index, None);
        token.cancel();
        res
    }

    /// The operator's hint for a failed attempt: the TLS hint, with this
    /// connector's own certificate dates when the relay found them wrong.
    fn hint(&self, err: &AttemptError) -> Option<String> {
        let hint = describe_tls_error(err)?;
        let refused_dates = matches!(
            find_tls_error(err),
            Some(rustls::Error::AlertReceived(
                AlertDescription::CertificateExpired
            ))
        );
        let problem = self
            .config
            .identity
            .as_ref()
            .filter(|_| refused_dates)
            .and_then(|identity| {
                identity
                    .info()
                    .validity_problem(std::time::SystemTime::now())
            });
        match problem {
            Some(problem) => Some(format!("{problem}: {hint}")),
            None => Some(hint),
        }
    }

    async fn handshake_and_serve(
        &self,
        mux: &Mux,
        rx: &mut MuxReceivers,
        exporter: &[u8; 32],
        client_nonce: &[u8; 32],
    ) -> Result<LinkClosed, AttemptError> {
        let server_nonce = match recv(mux, rx).await? {
            RelayMessage::Challenge(challenge) => {
                message::unhex(&challenge.server_nonce).ok_or(HandshakeError::BadNonce)?
            }
            other => return Err(unexpected(other)),
        };
        // Subscribed before the claims are built: kites changing meanwhile
        // (a reload, an htpasswd file) are sent again once serving.
        let mut watched = self.kites.subscribe();
        let set = watched.borrow_and_update().clone();
        // What the relay is told now, to tell later what changed.
        let sent = self.claims(&set, exporter, &server_nonce, client_nonce);
        let claims = sent
            .iter()
            .map(|(kite, claim)| KiteClaim {
                // Only TCP kites have ports; an HTTP kite may share the name.
                kite: self.on_relay(kite),
                ..claim.clone()
            })
            .collect();
        let node_proofs = self.node_proofs(&set, exporter, &server_nonce, client_nonce);
        let register = Register {
            kites: claims,
            node_proofs,
            withdraw: Vec::new(),
        };
        send(mux, &ConnectorMessage::Register(register)).await?;
        let registered = match recv(mux, rx).await? {
            RelayMessage::Registered(registered) => registered,
            other => return Err(unexpected(other)),
        };
        self.report(&registered);
        // A TCP kite that asked for the port it had before and was refused
        // (the relay closed it while the kite was offline and gave it to
        // another, or it is outside the relay's range now) asks for any
        // port instead; the relay's answer comes while serving.
        let retry: Vec<KiteClaim> = set
            .targets
            .iter()
            .enumerate()
            .filter(|(_, target)| target.kite.proto == KiteProto::Tcp && target.kite.port == 0)
            .filter(|(_, target)| {
                registered.kites.iter().any(|outcome| {
                    outcome.kite.proto == KiteProto::Tcp
                        && outcome.kite.name == target.kite.name
                        && outcome.kite.port != 0
                        && matches!(
                            outcome.result,
                            KiteResult::Refused {
                                reason: RefuseReason::PortUnavailable,
                                ..
                            }
                        )
                })
            })
            .map(|(index, target)| {
                self.claim(
                    &set,
                    index,
                    target.kite.clone(),
                    exporter,
                    &server_nonce,
                    client_nonce,
                )
            })
            .collect();
        let retried = !retry.is_empty();
        if retried {
            info!(
                kites = retry.len(),
                "asking for any port for TCP kites whose previous port is gone"
            );
            // The node name was judged with the first registration.
            let register = Register {
                kites: retry,
                node_proofs: Vec::new(),
                withdraw: Vec::new(),
            };
            send(mux, &ConnectorMessage::Register(register)).await?;
        }
        self.event_links.set(self.index, Some(mux.clone()));
        let refresh = Refresh {
            watched,
            sent,
            exporter,
            server_nonce: &server_nonce,
            client_nonce,
            retried,
        };
        self.serve(mux, rx, refresh).await
    }

    /// The claim of the kite at `index` in `set` as `kite`, with its
    /// htpasswd file's current users.
    fn claim(
        &self,
        set: &KiteSet,
        index: usize,
        kite: kitepipe_proto::kite::KiteRef,
        exporter: &[u8; 32],
        server_nonce: &[u8],
        client_nonce: &[u8; 32],
    ) -> KiteClaim {
        let target = &set.targets[index];
        let mut claim = claim(target, kite, exporter, server_nonce, client_nonce);
        if let Some(lines) = set.htpasswd.lines(index) {
            claim.http.basic_auth = lines.to_vec();
        }
        claim
    }

    /// Every kite of `set` with its claim as configured (a TCP kite with
    /// port 0 claims port 0), to tell later which claims changed.
    fn claims(
        &self,
        set: &KiteSet,
        exporter: &[u8; 32],
        server_nonce: &[u8],
        client_nonce: &[u8; 32],
    ) -> Vec<(KiteRef, KiteClaim)> {
        set.targets
            .iter()
            .enumerate()
            .map(|(index, target)| {
                let claim = self.claim(
                    set,
                    index,
                    target.kite.clone(),
                    exporter,
                    server_nonce,
                    client_nonce,
                );
                (target.kite.clone(), claim)
            })
            .collect()
    }

    /// `kite` as this relay knows it: a TCP kite configured with port 0
    /// has the port the relay gave it (port 0 if none yet).
    fn on_relay(&self, kite: &KiteRef) -> KiteRef {
        let mut kite = kite.clone();
        if kite.proto == KiteProto::Tcp && kite.port == 0 {
            let key = (self.relay.addr.clone(), kite.name.clone());
            if let Some(port) = lock(&self.kites.assigned_ports).get(&key) {
                kite.port = *port;
            }
        }
        kite
    }

    /// Tells the relay how the kites changed since the claims it has (a
    /// reload, new htpasswd users): the claims that are new or differ,
    /// and the kites that went, in one registration on this link. True if
    /// something was sent (its answer comes while serving).
    async fn send_changes(
        &self,
        mux: &Mux,
        refresh: &mut Refresh<'_>,
    ) -> Result<bool, AttemptError> {
        let set = refresh.watched.borrow_and_update().clone();
        let now = self.claims(
            &set,
            refresh.exporter,
            refresh.server_nonce,
            refresh.client_nonce,
        );
        let kites: Vec<KiteClaim> = now
            .iter()
            .filter(|(kite, claim)| !refresh.sent.iter().any(|(k, c)| k == kite && c == claim))
            .map(|(kite, claim)| KiteClaim {
                kite: self.on_relay(kite),
                ..claim.clone()
            })
            .collect();
        let withdraw: Vec<KiteRef> = refresh
            .sent
            .iter()
            .filter(|(kite, _)| !now.iter().any(|(k, _)| k == kite))
            .map(|(kite, _)| self.on_relay(kite))
            // A TCP kite the relay never gave a port was never online here.
            .filter(|kite| !(kite.proto == KiteProto::Tcp && kite.port == 0))
            .collect();
        refresh.sent = now;
        if kites.is_empty() && withdraw.is_empty() {
            return Ok(false);
        }
        for kite in &withdraw {
            info!(kite = %kite, "kite removed from the config: withdrawing it");
        }
        info!(
            claims = kites.len(),
            withdrawn = withdraw.len(),
            "sending the changed kites to the relay"
        );
        self.state.send_modify(|state| {
            if let LinkState::Up(online) = state {
                online.retain(|(kite, _)| !withdraw.contains(kite));
            }
        });
        let register = Register {
            kites,
            node_proofs: Vec::new(),
            withdraw,
        };
        send(mux, &ConnectorMessage::Register(register)).await?;
        Ok(true)
    }

    /// The answer to [`RelayLink::send_changes`]: said like a
    /// registration, but the link's other kites stay online.
    fn report_changes(&self, registered: &Registered) {
        let mut online = match &*self.state.borrow() {
            LinkState::Up(online) => online.clone(),
            LinkState::Down => Vec::new(),
        };
        for outcome in &registered.kites {
            online.retain(|(kite, _)| *kite != outcome.kite);
            match &outcome.result {
                KiteResult::Accepted { public, port } => {
                    info!(kite = %outcome.kite, %public, "kite online (updated)");
                    if outcome.kite.proto == KiteProto::Tcp {
                        lock(&self.kites.assigned_ports)
                            .insert((self.relay.addr.clone(), outcome.kite.name.clone()), *port);
                    }
                    online.push((outcome.kite.clone(), public.clone()));
                }
                KiteResult::Refused { reason, message } => {
                    error!(kite = %outcome.kite, ?reason, %message, "relay refused kite");
                }
            }
        }
        self.state.send_replace(LinkState::Up(online));
    }

    /// Proofs of this connector's node name, one per distinct secret it
    /// holds (none with a certificate: the certificate names the node).
    fn node_proofs(
        &self,
        set: &KiteSet,
        exporter: &[u8; 32],
        server_nonce: &[u8],
        client_nonce: &[u8; 32],
    ) -> Vec<String> {
        if self.config.identity.is_some() {
            return Vec::new();
        }
        let input = ProofInput {
            tls_exporter: exporter,
            server_nonce,
            client_nonce,
            protocol: message::NODE_PROOF_PROTOCOL,
            name: &self.config.name,
        };
        let mut secrets: Vec<&crate::pki::Secret> = Vec::new();
        let kite_secrets = set.targets.iter().filter_map(|k| k.secret.as_ref());
        for secret in self.config.node_secret.iter().chain(kite_secrets) {
            if secrets.len() < message::MAX_NODE_PROOFS
                && !secrets.iter().any(|s| s.expose() == secret.expose())
            {
                secrets.push(secret);
            }
        }
        secrets
            .into_iter()
            .map(|secret| message::hex(&kite_proof(secret, &input)))
            .collect()
    }

    fn report(&self, registered: &Registered) {
        if let Some(node) = &registered.node {
            if node.proven {
                info!(node = %node.name, "node name proven");
            } else {
                warn!(node = %node.name, message = %node.message, "relay did not accept this node name: events and remote operations cannot reach this node by name");
            }
        }
        let mut online = Vec::new();
        for outcome in &registered.kites {
            match &outcome.result {
                KiteResult::Accepted { public, port } => {
                    info!(kite = %outcome.kite, %public, "kite online");
                    if outcome.kite.proto == KiteProto::Tcp {
                        lock(&self.kites.assigned_ports)
                            .insert((self.relay.addr.clone(), outcome.kite.name.clone()), *port);
                    }
                    online.push((outcome.kite.clone(), public.clone()));
                }
                KiteResult::Refused { reason, message } => {
                    if outcome.kite.proto == KiteProto::Tcp
                        && *reason == RefuseReason::PortUnavailable
                    {
                        // Not ours any more: the next link asks for any port.
                        lock(&self.kites.assigned_ports)
                            .remove(&(self.relay.addr.clone(), outcome.kite.name.clone()));
                    }
                    error!(kite = %outcome.kite, ?reason, %message, "relay refused kite");
                }
            }
        }
        info!(
            online = online.len(),
            refused = registered.kites.len() - online.len(),
            "linked to relay"
        );
        self.state.send_replace(LinkState::Up(online));
    }

    fn withdrawn(&self, withdrawn: &Withdrawn) {
        for kite in &withdrawn.kites {
            error!(kite = %kite, message = %withdrawn.message, "relay withdrew kite");
        }
        self.state.send_modify(|state| {
            if let LinkState::Up(online) = state {
                online.retain(|(kite, _)| !withdrawn.kites.contains(kite));
            }
        });
    }

    async fn serve(
        &self,
        mux: &Mux,
        rx: &mut MuxReceivers,
        mut refresh: Refresh<'_>,
    ) -> Result<LinkClosed, AttemptError> {
        let bounds = LinkBounds::new();
        let mut watching = true;
        // Answers to registrations sent while serving, in order: true for
        // changed kites, false for the TCP port retry.
        let mut pending: std::collections::VecDeque<bool> =
            refresh.retried.then_some(false).into_iter().collect();
        loop {
            tokio::select! {
                changed = refresh.watched.changed(), if watching => {
                    if changed.is_err() {
                        watching = false;
                        continue;
                    }
                    if self.send_changes(mux, &mut refresh).await? {
                        pending.push_back(true);
                    }
                }
                _ = self.token.cancelled() => {
                    mux.close(LinkClosed::Shutdown);
                    return Ok(LinkClosed::Shutdown);
                }
                reason = mux.closed() => return Ok(reason),
                incoming = rx.incoming.recv() => {
                    let Some(incoming) = incoming else { return Ok(mux.closed().await) };
                    // Every stream counts against the link's cap until it ends.
                    let Some(slot) = bounds.admit() else {
                        refuse_full(incoming);
                        continue;
                    };
                    let kites = self.kites.clone();
                    let span = tracing::debug_span!("stream", id = incoming.stream.id());
                    let serve = serve_stream(incoming, kites, self.handlers.clone(), bounds.clone());
                    self.tracker.spawn(async move { serve.await; drop(slot) }.instrument(span));
                }
                control = rx.control.recv() => {
                    let Some(payload) = control else { return Ok(mux.closed().await) };
                    match message::decode::<RelayMessage>(&payload) {
                        Ok(RelayMessage::Registered(registered)) => {
                            if pending.pop_front() == Some(true) {
                                self.report_changes(&registered);
                            } else {
                                self.report(&registered);
                            }
                        }
                        Ok(RelayMessage::Withdrawn(withdrawn)) => self.withdrawn(&withdrawn),
                        Ok(RelayMessage::Error(err)) if err.code == ErrorCode::Unauthorized => {
                            mux.close(LinkClosed::PeerClosed(PeerGoodbye::Refused(err.message.clone())));
                            return Err(AttemptError::Refused(err.message));
                        }
                        Ok(RelayMessage::Error(err)) => error!(code = ?err.code, message = %err.message, "relay reported an error"),
                        Ok(RelayMessage::Challenge(_)) => warn!("unexpected challenge from relay"),
                        Err(err) => warn!(%err, "malformed control message from relay"),
                    }
                }
            }
        }
    }
}

/// What a link needs to send claims again while serving.
struct Refresh<'a> {
    /// Tells of changed kites (a reload, new htpasswd users).
    watched: watch::Receiver<Arc<KiteSet>>,
    /// The claims the relay has, by the kite as configured.
    sent: Vec<(KiteRef, KiteClaim)>,
    exporter: &'a [u8; 32],
    server_nonce: &'a [u8],
    client_nonce: &'a [u8; 32],
    /// Whether a TCP port retry was sent before serving (its answer comes
    /// first).
    retried: bool,
}

/// The claim of `target` as `kite`: its proof of the target's secret, or
/// an empty proof (the claim rests on this connector's certificate).
fn claim(
    target: &crate::config::KiteTarget,
    kite: kitepipe_proto::kite::KiteRef,
    exporter: &[u8; 32],
    server_nonce: &[u8],
    client_nonce: &[u8; 32],
) -> KiteClaim {
    let input = ProofInput {
        tls_exporter: exporter,
        server_nonce,
        client_nonce,
        protocol: kite.proto.as_str(),
        name: &kite.name,
    };
    let proof = match &target.secret {
        Some(secret) => message::hex(&kite_proof(secret, &input)),
        None => String::new(),
    };
    let blocks =
        |list: &[kitepipe_proto::policy::Cidr]| list.iter().map(ToString::to_string).collect();
    KiteClaim {
        proof,
        kite,
        allow: blocks(target.policy.allow()),
        deny: blocks(target.policy.deny()),
        http: target.http.clone(),
    }
}

async fn send(mux: &Mux, message: &ConnectorMessage) -> Result<(), AttemptError> {
    mux.send_control(message::encode(message))
        .await
        .map_err(|reason| HandshakeError::Link(reason).into())
}

async fn recv(mux: &Mux, rx: &mut MuxReceivers) -> Result<RelayMessage, AttemptError> {
    let payload = tokio::select! {
        // Control first: a relay that refuses says why, then closes.
        biased;
        payload = rx.control.recv() => payload,
        reason = mux.closed() => return Err(HandshakeError::Link(reason).into()),
        _ = tokio::time::sleep(HANDSHAKE_TIMEOUT) => return Err(HandshakeError::Timeout.into()),
    };
    let payload = payload.ok_or(HandshakeError::ControlClosed)?;
    match message::decode::<RelayMessage>(&payload) {
        Ok(RelayMessage::Error(err)) => Err(AttemptError::Refused(err.message)),
        Ok(message) => Ok(message),
        Err(err) => Err(HandshakeError::Message(err).into()),
    }
}

fn unexpected(message: RelayMessage) -> AttemptError {
    HandshakeError::Unexpected(Box::new(message)).into()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::AlertDescription;

    use super::*;

    /// A refusal of this connector's certificate that arrives after the
    /// first read (the link already up) used to reach the log as text only,
    /// without the operator's hint.
    #[test]
    fn a_refusal_during_the_handshake_keeps_its_tls_cause() {
        let alert = RecordError::Alert(rustls::Error::AlertReceived(
            AlertDescription::CertificateExpired,
        ));
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, alert);
        let err = AttemptError::from(HandshakeError::Link(LinkClosed::Io(Arc::new(io))));
        assert_eq!(
            err.to_string(),
            "link handshake failed: connection error: received fatal alert: CertificateExpired"
        );
        assert_eq!(
            find_tls_error(&err),
            Some(&rustls::Error::AlertReceived(
                AlertDescription::CertificateExpired
            ))
        );
        assert!(describe_tls_error(&err).is_some_and(|hint| hint.contains("expired")));
    }
}
