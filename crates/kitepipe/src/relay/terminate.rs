//! HTTPS the relay terminates, for http kites with a certificate in
//! `ctx.certs`: which ClientHellos it takes ([`terminates`]), the
//! handshake with the ClientHello the listener already read replayed
//! (`h2::Rewind`), then HTTP/2 (`h2`) or the strict HTTP/1 path (`http`)
//! over the decrypted stream, with `X-Forwarded-Proto: https`.
//!
//! It never takes a ClientHello an online `https` kite of the same name
//! would get (passthrough wins), and never one for a name without a
//! certificate (those are answered as before: `tcp::serve_https`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use kitepipe_proto::kite::KiteProto;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tracing::{debug, error, info};

use super::RelayCtx;
use super::h2::{Rewind, Scheme};
use super::http::VisitorConn;
use super::registry::Lookup;

/// How long a visitor has to complete the TLS handshake once its
/// ClientHello is in: a few round trips, generous for slow networks,
/// short enough that half-open handshakes cannot pile up.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the relay terminates TLS for a visitor whose ClientHello names
/// `sni`: not when an online `https` kite or an offline one (and no http
/// kite) has the name (passthrough, as before), else when the store has a
/// certificate for it. A name with a certificate but no kite online is
/// terminated too, so its visitor reads the relay's 404 or 503 page.
pub(crate) fn terminates(sni: &str, ctx: &RelayCtx) -> bool {
    if let Lookup::Found(_) = ctx.registry.lookup_name(KiteProto::Https, sni) {
        return false;
    }
    if ctx.certs.get(sni).is_none() {
        return false;
    }
    match ctx.registry.lookup_name(KiteProto::Http, sni) {
        Lookup::Found(_) | Lookup::Offline => true,
        Lookup::Unknown => !matches!(
            ctx.registry.lookup_name(KiteProto::Https, sni),
            Lookup::Offline
        ),
    }
}

/// The public URL of the http kite `name` (a name or `*.` pattern) when
/// the relay terminates HTTPS for it: it has an HTTPS listener and a
/// certificate for the name. Such a kite needs no HTTP listener.
pub(crate) fn public_url(name: &str, ctx: &RelayCtx) -> Option<String> {
    let port = ctx.https_port?;
    ctx.certs.get(name)?;
    Some(if port == 443 {
        format!("https://{name}/")
    } else {
        format!("https://{name}:{port}/")
    })
}

/// Terminates a visitor's TLS (`prefix`: the ClientHello already read)
/// and serves the HTTP inside: HTTP/2 if the visitor chose `h2` by ALPN,
/// else HTTP/1. `sni` is the name the ClientHello asked for.
pub(crate) async fn serve(
    sock: TcpStream,
    prefix: BytesMut,
    peer: SocketAddr,
    sni: String,
    ctx: Arc<RelayCtx>,
) {
    let local = sock.local_addr().ok();
    let acceptor = tokio_rustls::TlsAcceptor::from(ctx.certs.server_config());
    let io = Rewind::new(prefix.freeze(), sock);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            debug!(%sni, %err, "TLS handshake with a visitor failed");
            return;
        }
        Err(_) => {
            debug!(%sni, "TLS handshake with a visitor timed out");
            return;
        }
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    debug!(%sni, h2, "terminated a visitor's TLS");
    if h2 {
        super::h2::serve(tls, peer, local, Scheme::Https, Some(&sni), ctx).await;
    } else {
        super::http::serve(
            Terminated(tls),
            BytesMut::new(),
            peer,
            Scheme::Https,
            Some(&sni),
            ctx,
        )
        .await;
    }
}

/// Rereads the `--tls-cert` files (on the identity reload: SIGHUP, or a
/// watched identity file changing); on an error the certificates served
/// so far stay.
pub(crate) fn reload_certs(ctx: &RelayCtx, why: &str) {
    if ctx.config.tls_certs.is_empty() {
        return;
    }
    match ctx.certs.load_files(&ctx.config.tls_certs) {
        Ok(names) => info!(%why, names, "certificates for terminated HTTPS reloaded"),
        Err(err) => {
            error!(%why, err = %super::error_chain(&err), "certificate reload failed; keeping the previous certificates")
        }
    }
}

/// A terminated visitor connection, as the HTTP/1 path serves it.
pub(crate) struct Terminated(TlsStream<Rewind<TcpStream>>);

impl VisitorConn for Terminated {
    type Reader = ReadHalf<TlsStream<Rewind<TcpStream>>>;
    type Writer = WriteHalf<TlsStream<Rewind<TcpStream>>>;
    type Io = TlsStream<Rewind<TcpStream>>;

    fn local_addr(&self) -> Option<SocketAddr> {
        self.0.get_ref().0.inner().local_addr().ok()
    }

    fn split(self) -> (Self::Reader, Self::Writer) {
        tokio::io::split(self.0)
    }

    fn reunite(reader: Self::Reader, writer: Self::Writer) -> Option<Self::Io> {
        reader.is_pair_of(&writer).then(|| reader.unsplit(writer))
    }

    fn reset(io: Self::Io) {
        // Dropped without close_notify, over a TCP reset: a cut response
        // never ends like a complete one.
        if let Err(err) = io.get_ref().0.inner().set_zero_linger() {
            debug!(%err, "cannot set SO_LINGER on a visitor's socket");
        }
        drop(io);
    }
}
