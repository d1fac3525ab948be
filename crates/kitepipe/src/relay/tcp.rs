//! Visitors that are passed through as raw bytes: HTTPS routed by SNI, and
//! TCP kites on their own public ports (bound inside `--tcp-ports`, capped
//! per link and per identity, closed when their kite has been offline for
//! [`TCP_PORT_GRACE`]). A kite failing in the middle reaches the visitor
//! as a TCP reset.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use kitepipe_proto::kite::{KiteProto, KiteRef};
use kitepipe_proto::message::RefuseReason;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::RelayCtx;
use super::registry::{Backend, Grant, LinkId, Lookup};
use super::visitor::{NotOpened, open_visitor_stream, reset};
use crate::accept::accept;
use crate::link::MuxStream;
use crate::metrics::Refusal;
use crate::metrics::access::ConnectionEntry;
use crate::pki::pattern_covers;
use crate::sync::lock;
use crate::tunnel;

/// A fatal TLS alert `unrecognized_name` (112), sent to HTTPS visitors whose
/// SNI names no online kite, so browsers show a meaningful error.
const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 112];

/// Serves a visitor's TLS connection by passing it through to the kite
/// named by its SNI. `prefix` holds the ClientHello already read.
pub(crate) async fn serve_https(
    mut sock: TcpStream,
    prefix: BytesMut,
    peer: SocketAddr,
    sni: Option<String>,
    ctx: Arc<RelayCtx>,
) {
    let Some(sni) = sni else {
        debug!("HTTPS visitor without SNI; cannot route");
        let _ = sock.write_all(&ALERT_UNRECOGNIZED_NAME).await;
        return;
    };
    let backends = match ctx.registry.lookup_name(KiteProto::Https, &sni) {
        Lookup::Found(backends) => backends,
        other => {
            ctx.registry.metrics.refusal(&sni, refusal_of(&other));
            debug!(%sni, ?other, "no online HTTPS kite for this name");
            let _ = sock.write_all(&ALERT_UNRECOGNIZED_NAME).await;
            return;
        }
    };
    let local = sock.local_addr().ok();
    let (mut stream, backend) = match open_visitor_stream(&backends, Some(&sni), peer, local).await
    {
        Ok(opened) => opened,
        // Refused by the kite's policy: closed with a reset, nothing said
        // (the relay cannot speak TLS for a passed-through kite).
        Err(NotOpened::Refused) => return reset(sock),
        Err(NotOpened::Unreachable) => {
            let _ = sock.write_all(&ALERT_UNRECOGNIZED_NAME).await;
            return;
        }
    };
    if stream.write_all(&prefix).await.is_err() {
        return;
    }
    pass_through(sock, &mut stream, &backend, peer, "https", &ctx).await;
}

/// How long a TCP kite's port stays bound after the last link serving the
/// kite is gone (checked this often, so a port is closed 1 to 2 graces
/// after its kite went offline). A connector that lost its link comes back
/// within a second or two (its first reconnect delay is 250 ms) and asks for
/// the port it had, which is still its own; a kite gone for longer gives
/// the port (a file descriptor and a public port) back to the range.
pub(crate) const TCP_PORT_GRACE: Duration = Duration::from_secs(10);

/// Most TCP kite ports one link may hold. A connector serves a handful of
/// TCP services (ssh, a database, a game server); 16 is generous for that
/// and keeps one link's share of the relay's descriptors small.
pub(crate) const MAX_TCP_PORTS_PER_LINK: usize = 16;

/// Most TCP kite ports one identity may hold across all its links: a
/// certificate identity by name, a secret holder by the domain whose secret
/// covers the kite (every holder of one secret is one party). Bounds what
/// one party can take from `--tcp-ports` and the relay's descriptors by
/// opening many links; 4 links' worth of [`MAX_TCP_PORTS_PER_LINK`].
pub(crate) const MAX_TCP_PORTS_PER_IDENTITY: usize = 64;

/// The TCP kite ports the relay listens on, and who holds them.
#[derive(Default)]
pub(crate) struct TcpPorts {
    ports: Mutex<HashMap<u16, PortEntry>>,
}

struct PortEntry {
    /// The kite name the port serves.
    name: String,
    /// The identity charged for it (see [`MAX_TCP_PORTS_PER_IDENTITY`]).
    owner: String,
    /// Links that claimed it (dead ones are not removed; they count for
    /// nothing once gone).
    links: HashSet<LinkId>,
    /// Claims so far: a claim during the grace keeps the port.
    claims: u64,
    /// Stops the accept loop, which closes the listener.
    stop: CancellationToken,
}

/// Who is charged for a TCP kite port claimed by `link` under `grant`.
fn port_owner(kite: &KiteRef, link: LinkId, grant: Grant, ctx: &RelayCtx) -> String {
    if grant == Grant::Identity
        && let Some(identity) = ctx.registry.identity_link(link)
    {
        return format!("identity {}", identity.identity.name);
    }
    // The most specific domain covering the name: the secret that proved it.
    ctx.config
        .domains
        .iter()
        .filter(|d| d.protos.contains(&KiteProto::Tcp) && pattern_covers(&d.pattern, &kite.name))
        .max_by_key(|d| d.pattern.len())
        .map_or_else(
            || format!("link {link}"),
            |d| format!("domain {}", d.pattern),
        )
}

/// Binds the public port of a TCP kite claimed by `link`, or finds the one
/// its kite already has. The port is always inside `--tcp-ports`: port 0
/// gets a free one from the range (refused when none is left). Caps:
/// [`MAX_TCP_PORTS_PER_LINK`], [`MAX_TCP_PORTS_PER_IDENTITY`]. The port is
/// closed [`TCP_PORT_GRACE`] after no link serves its kite any more.
/// Returns the port.
pub(crate) fn bind_kite_port(
    kite: &KiteRef,
    link: LinkId,
    grant: Grant,
    ctx: &Arc<RelayCtx>,
) -> Result<u16, (RefuseReason, String)> {
    let (low, high) = ctx.config.tcp_ports;
    if kite.port != 0 && (kite.port < low || kite.port > high) {
        return Err((
            RefuseReason::PortUnavailable,
            format!(
                "port {} is outside this relay's TCP kite ports {low}-{high}",
                kite.port
            ),
        ));
    }
    let owner = port_owner(kite, link, grant, ctx);
    // One lock over the checks, the bind and the record, so that caps hold
    // under concurrent claims and a port is never released while claimed.
    let mut ports = lock(&ctx.tcp_listeners.ports);
    let held_by_link = ports.values().filter(|e| e.links.contains(&link)).count();
    if kite.port != 0 {
        if let Some(entry) = ports.get_mut(&kite.port) {
            if entry.name != kite.name {
                return Err((
                    RefuseReason::PortUnavailable,
                    format!("port {} already serves kite {}", kite.port, entry.name),
                ));
            }
            if !entry.links.contains(&link) && held_by_link >= MAX_TCP_PORTS_PER_LINK {
                return Err(per_link_refusal());
            }
            entry.links.insert(link);
            entry.claims += 1;
            return Ok(kite.port);
        }
        if let Some(owner) = ctx.registry.tcp_port_owner(kite.port)
            && owner != kite.name
        {
            return Err((
                RefuseReason::PortUnavailable,
                format!("port {} already serves kite {owner}", kite.port),
            ));
        }
    }
    if held_by_link >= MAX_TCP_PORTS_PER_LINK {
        return Err(per_link_refusal());
    }
    if ports.values().filter(|e| e.owner == owner).count() >= MAX_TCP_PORTS_PER_IDENTITY {
        return Err((
            RefuseReason::PortUnavailable,
            format!(
                "{owner} already holds {MAX_TCP_PORTS_PER_IDENTITY} TCP kite ports, the most \
                 this relay gives one identity"
            ),
        ));
    }
    let listener = if kite.port != 0 {
        let addr = SocketAddr::new(ctx.config.tcp_bind, kite.port);
        super::bind_listener(addr).map_err(|err| {
            (
                RefuseReason::PortUnavailable,
                format!("cannot listen on {addr}: {err}"),
            )
        })?
    } else {
        bind_free_port(ctx, &ports)?
    };
    let port = listener.local_addr().map(|a| a.port()).map_err(|err| {
        (
            RefuseReason::PortUnavailable,
            format!("cannot listen for TCP kite {}: {err}", kite.name),
        )
    })?;
    let stop = ctx.token.child_token();
    ports.insert(
        port,
        PortEntry {
            name: kite.name.clone(),
            owner,
            links: HashSet::from([link]),
            claims: 1,
            stop: stop.clone(),
        },
    );
    drop(ports);
    info!(port, kite = %kite.name, "listening for TCP kite");
    let span = info_span!("tcp_kite", port);
    ctx.tracker
        .spawn(accept_tcp(listener, port, stop.clone(), ctx.clone()).instrument(span.clone()));
    ctx.tracker
        .spawn(release_when_idle(port, stop, ctx.clone()).instrument(span));
    Ok(port)
}

fn per_link_refusal() -> (RefuseReason, String) {
    (
        RefuseReason::PortUnavailable,
        format!(
            "this link already holds {MAX_TCP_PORTS_PER_LINK} TCP kite ports, the most this \
             relay gives one link (TCP kite ports per link)"
        ),
    )
}

/// Binds a free port of `--tcp-ports` on `--tcp-bind`: the kernel's pick
/// if it falls inside the range (always, with the default range), else the
/// lowest port of the range that binds.
fn bind_free_port(
    ctx: &RelayCtx,
    ports: &HashMap<u16, PortEntry>,
) -> Result<TcpListener, (RefuseReason, String)> {
    let (low, high) = ctx.config.tcp_ports;
    let bind = ctx.config.tcp_bind;
    if let Ok(listener) = super::bind_listener(SocketAddr::new(bind, 0))
        && let Ok(addr) = listener.local_addr()
        && (low..=high).contains(&addr.port())
        && !ports.contains_key(&addr.port())
        && ctx.registry.tcp_port_owner(addr.port()).is_none()
    {
        return Ok(listener);
    }
    for port in low..=high {
        if port == 0 || ports.contains_key(&port) || ctx.registry.tcp_port_owner(port).is_some() {
            continue;
        }
        if let Ok(listener) = super::bind_listener(SocketAddr::new(bind, port)) {
            return Ok(listener);
        }
    }
    Err((
        RefuseReason::PortUnavailable,
        format!("no free port in {low}-{high} (this relay's TCP kite ports)"),
    ))
}

/// Closes TCP kite `port` once no link has served its kite for a whole
/// [`TCP_PORT_GRACE`] and no claim came meanwhile.
async fn release_when_idle(port: u16, stop: CancellationToken, ctx: Arc<RelayCtx>) {
    let mut idle_since: Option<u64> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(TCP_PORT_GRACE) => {}
        }
        let served = matches!(ctx.registry.lookup_port(port), Lookup::Found(_));
        let mut ports = lock(&ctx.tcp_listeners.ports);
        let Some(entry) = ports.get(&port) else {
            return;
        };
        let claims = entry.claims;
        if served {
            idle_since = None;
            continue;
        }
        match idle_since {
            Some(seen) if seen == claims && ctx.registry.release_tcp_port(port) => {
                if let Some(entry) = ports.remove(&port) {
                    entry.stop.cancel();
                    info!(port, kite = %entry.name, "no connector serves this TCP kite any more; port closed");
                }
                return;
            }
            _ => idle_since = Some(claims),
        }
    }
}

async fn accept_tcp(listener: TcpListener, port: u16, stop: CancellationToken, ctx: Arc<RelayCtx>) {
    while let Some((sock, peer)) = accept(&listener, &stop).await {
        let Ok(permit) = ctx.connections.clone().try_acquire_owned() else {
            warn!(%peer, "too many connections; closing new one");
            continue;
        };
        let _ = sock.set_nodelay(true);
        let ctx2 = ctx.clone();
        ctx.tracker.spawn(
            async move {
                serve_tcp(sock, peer, port, &ctx2).await;
                drop(permit);
            }
            .instrument(tracing::debug_span!("visitor", %peer)),
        );
    }
}

async fn serve_tcp(sock: TcpStream, peer: SocketAddr, port: u16, ctx: &Arc<RelayCtx>) {
    let backends = match ctx.registry.lookup_port(port) {
        Lookup::Found(backends) => backends,
        other => {
            ctx.registry
                .metrics
                .refusal(&format!("port {port}"), refusal_of(&other));
            debug!(?other, "TCP kite offline; closing visitor");
            return;
        }
    };
    let local = sock.local_addr().ok();
    let (mut stream, backend) = match open_visitor_stream(&backends, None, peer, local).await {
        Ok(opened) => opened,
        // Refused by the kite's policy: a reset, before any stream opened.
        Err(NotOpened::Refused) => return reset(sock),
        Err(NotOpened::Unreachable) => return,
    };
    pass_through(sock, &mut stream, &backend, peer, "tcp", ctx).await;
}

/// The counted reason of a lookup that found no backend.
pub(crate) fn refusal_of(lookup: &Lookup) -> Refusal {
    match lookup {
        Lookup::Unknown => Refusal::Unknown,
        _ => Refusal::Offline,
    }
}

/// Passes a visitor's bytes both ways until both ends finish; if the kite
/// fails first (link lost, stream reset), the visitor gets a TCP reset,
/// never a clean end.
async fn pass_through(
    mut sock: TcpStream,
    stream: &mut MuxStream,
    backend: &Backend,
    peer: SocketAddr,
    proto: &str,
    ctx: &RelayCtx,
) {
    let _open = backend.metrics.connection();
    let started = tokio::time::Instant::now();
    let mut counted = backend.metrics.counting(&mut sock);
    let failed = tokio::select! {
        res = tunnel::splice_stream(&mut counted, stream) => match res {
            Ok((up, down)) => {
                debug!(node = %backend.node, up, down, "visitor done");
                false
            }
            Err(err) => {
                debug!(node = %backend.node, %err, "visitor stream ended with error");
                true
            }
        },
        // The link died: splice sees that as an error on the stream anyway,
        // so nothing else to do here but not outlive a shut-down relay.
        _ = backend.mux.closed() => true,
    };
    let (bytes_in, bytes_out) = (counted.read(), counted.written());
    if let Some(log) = ctx.access.get() {
        log.connection(&ConnectionEntry {
            peer,
            proto,
            kite: &backend.kite.name,
            bytes_in,
            bytes_out,
            seconds: started.elapsed().as_secs_f64(),
            ended: std::time::SystemTime::now(),
        });
    }
    if failed {
        reset(sock);
    }
}
