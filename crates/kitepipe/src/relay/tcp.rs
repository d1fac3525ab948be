//! Visitors that are passed through as raw bytes: HTTPS routed by SNI, and
//! TCP kites on their own public ports. Also opening a visitor stream on
//! the first live backend (failover), shared with [`super::http`].

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use kitepipe_proto::kite::{KiteProto, KiteRef};
use kitepipe_proto::message::{self, RefuseReason, StreamHeader, VisitorHeader};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, debug, info, info_span, warn};

use super::RelayCtx;
use super::registry::{Backend, Lookup};
use crate::link::MuxStream;
use crate::tunnel;

/// A fatal TLS alert `unrecognized_name` (112), sent to HTTPS visitors whose
/// SNI names no online kite, so browsers show a meaningful error.
const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 112];

/// Opens a visitor stream on the first backend whose link is alive.
pub(crate) async fn open_visitor_stream(
    backends: &[Backend],
    host: Option<&str>,
    peer: SocketAddr,
) -> Option<(MuxStream, Backend)> {
    for backend in backends {
        let header = StreamHeader::Visitor(VisitorHeader {
            kite: backend.kite.clone(),
            host: host.map(str::to_string),
            peer: peer.to_string(),
        });
        match backend.mux.open(message::encode(&header)).await {
            Ok(stream) => return Some((stream, backend.clone())),
            Err(reason) => debug!(node = %backend.node, %reason, "backend link gone; trying next"),
        }
    }
    None
}

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
            debug!(%sni, ?other, "no online HTTPS kite for this name");
            let _ = sock.write_all(&ALERT_UNRECOGNIZED_NAME).await;
            return;
        }
    };
    let Some((mut stream, backend)) = open_visitor_stream(&backends, Some(&sni), peer).await else {
        let _ = sock.write_all(&ALERT_UNRECOGNIZED_NAME).await;
        return;
    };
    if stream.write_all(&prefix).await.is_err() {
        return;
    }
    pass_through(&mut sock, &mut stream, &backend).await;
}

/// Binds the public port of a TCP kite (once; it stays bound until the relay
/// stops, so an offline kite's port refuses nobody's bind and answers by
/// closing). Returns the port actually bound.
pub(crate) async fn bind_kite_port(
    kite: &KiteRef,
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
    if kite.port != 0 {
        if let Some(owner) = ctx.registry.tcp_port_owner(kite.port)
            && owner != kite.name
        {
            return Err((
                RefuseReason::PortUnavailable,
                format!("port {} already serves kite {owner}", kite.port),
            ));
        }
        if lock(&ctx.tcp_listeners).contains_key(&kite.port) {
            return Ok(kite.port);
        }
    }
    let addr = SocketAddr::new(ctx.config.tcp_bind, kite.port);
    let listener = TcpListener::bind(addr).await.map_err(|err| {
        (
            RefuseReason::PortUnavailable,
            format!("cannot listen on {addr}: {err}"),
        )
    })?;
    let bound = listener.local_addr().map_err(|err| {
        (
            RefuseReason::PortUnavailable,
            format!("cannot listen on {addr}: {err}"),
        )
    })?;
    {
        let mut listeners = lock(&ctx.tcp_listeners);
        if listeners.contains_key(&bound.port()) {
            // Another link bound it while we were binding; ours is redundant.
            return Ok(bound.port());
        }
        listeners.insert(bound.port(), bound);
    }
    info!(port = bound.port(), kite = %kite.name, "listening for TCP kite");
    let ctx2 = ctx.clone();
    ctx.tracker.spawn(
        accept_tcp(listener, bound.port(), ctx2)
            .instrument(info_span!("tcp_kite", port = bound.port())),
    );
    Ok(bound.port())
}

async fn accept_tcp(listener: TcpListener, port: u16, ctx: Arc<RelayCtx>) {
    loop {
        let accepted = tokio::select! {
            _ = ctx.token.cancelled() => return,
            res = listener.accept() => res,
        };
        let (sock, peer) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                warn!(%err, "accept failed");
                tokio::select! {
                    _ = ctx.token.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => continue,
                }
            }
        };
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

async fn serve_tcp(mut sock: TcpStream, peer: SocketAddr, port: u16, ctx: &Arc<RelayCtx>) {
    let backends = match ctx.registry.lookup_port(port) {
        Lookup::Found(backends) => backends,
        other => {
            debug!(?other, "TCP kite offline; closing visitor");
            return;
        }
    };
    let Some((mut stream, backend)) = open_visitor_stream(&backends, None, peer).await else {
        return;
    };
    pass_through(&mut sock, &mut stream, &backend).await;
}

async fn pass_through(sock: &mut TcpStream, stream: &mut MuxStream, backend: &Backend) {
    tokio::select! {
        res = tunnel::splice_stream(sock, stream) => match res {
            Ok((up, down)) => debug!(node = %backend.node, up, down, "visitor done"),
            Err(err) => debug!(node = %backend.node, %err, "visitor stream ended with error"),
        },
        // The link died: splice sees that as an error on the stream anyway,
        // so nothing else to do here but not outlive a shut-down relay.
        _ = backend.mux.closed() => {}
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
