//! Accept loops, and telling protocols apart on ports that serve several.
//!
//! A TLS ClientHello offering ALPN `kitepipe/1` is a connector's link; any
//! other ClientHello is a visitor's HTTPS (routed by SNI: terminated by
//! `terminate` for an http kite with a certificate, else passed through);
//! anything else is HTTP, unless it is a PageKite back-end's head (or its
//! ping) on a link port (`pagekite`). A port that serves only links looks
//! at the first byte only (TLS or PageKite).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use kitepipe_proto::sniff::{self, Sniffed};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, debug, warn};

use super::RelayCtx;
use crate::accept::accept;
use crate::config::ListenerConfig;
use crate::pki::is_link_alpn;

/// How long a new connection may take to show what it is (its first bytes,
/// or a whole ClientHello). Generous for slow networks, short enough that
/// idle connections cannot pile up.
pub(crate) const SNIFF_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections until the relay shuts down.
pub(crate) async fn run(listener: TcpListener, roles: ListenerConfig, ctx: Arc<RelayCtx>) {
    let roles = Arc::new(roles);
    while let Some((sock, peer)) = accept(&listener, &ctx.token).await {
        let Ok(permit) = ctx.connections.clone().try_acquire_owned() else {
            warn!(%peer, "too many connections; closing new one");
            continue;
        };
        let _ = sock.set_nodelay(true);
        let ctx2 = ctx.clone();
        let roles = roles.clone();
        ctx.tracker.spawn(
            async move {
                serve(sock, peer, &roles, ctx2).await;
                drop(permit);
            }
            .instrument(tracing::debug_span!("conn", %peer)),
        );
    }
}

async fn serve(sock: TcpStream, peer: SocketAddr, roles: &ListenerConfig, ctx: Arc<RelayCtx>) {
    if roles.link && !roles.http && !roles.https {
        // One read tells a link's TLS from a PageKite back-end's head.
        let mut sock = sock;
        let mut buf = BytesMut::with_capacity(2048);
        match tokio::time::timeout(SNIFF_TIMEOUT, sock.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => {
                debug!("no first bytes in time; dropping connection");
                return;
            }
        }
        if sniff::looks_like_tls(buf[0]) {
            super::session::accept(sock, buf, peer, ctx).await;
        } else {
            super::pagekite::serve_plain(sock, buf, peer, false, ctx).await;
        }
        return;
    }
    if roles.http && !roles.link && !roles.https {
        super::http::serve_plain(sock, BytesMut::new(), peer, ctx).await;
        return;
    }
    let mut sock = sock;
    let mut buf = BytesMut::with_capacity(2048);
    let sniffed = tokio::time::timeout(SNIFF_TIMEOUT, async {
        loop {
            if buf.len() >= sniff::MAX_CLIENT_HELLO {
                return Err("first bytes too large to classify".to_string());
            }
            let n = sock
                .read_buf(&mut buf)
                .await
                .map_err(|err| err.to_string())?;
            if n == 0 {
                return Err("closed before sending anything useful".to_string());
            }
            if !sniff::looks_like_tls(buf[0]) {
                return Ok(None);
            }
            match sniff::sniff_client_hello(&buf) {
                Ok(Sniffed::NeedMore) => continue,
                Ok(Sniffed::Tls(hello)) => return Ok(Some(hello)),
                Err(err) => return Err(err.to_string()),
            }
        }
    })
    .await;
    let hello = match sniffed {
        Ok(Ok(hello)) => hello,
        Ok(Err(why)) => {
            debug!(%why, "dropping connection");
            return;
        }
        Err(_) => {
            debug!("no recognizable first bytes in time; dropping connection");
            return;
        }
    };
    match hello {
        Some(hello) if roles.link && hello.alpn.iter().any(|p| is_link_alpn(p)) => {
            super::session::accept(sock, buf, peer, ctx).await;
        }
        // ACME TLS-ALPN-01 for one of the relay's own pending orders; any
        // other `acme-tls/1` ClientHello routes as usual (e.g. to an https
        // kite whose own ACME client is being validated).
        Some(hello)
            if roles.https && ctx.acme.answers_tls_alpn(&hello.alpn, hello.sni.as_deref()) =>
        {
            ctx.acme
                .serve_tls_alpn(sock, buf, hello.sni.as_deref())
                .await;
        }
        Some(hello) if roles.https => match hello.sni {
            Some(sni) if super::terminate::terminates(&sni, &ctx) => {
                super::terminate::serve(sock, buf, peer, sni, ctx).await;
            }
            sni => super::tcp::serve_https(sock, buf, peer, sni, ctx).await,
        },
        Some(_) => debug!("TLS client without the kitepipe ALPN on a link-only port"),
        // Plain bytes on a link port: a PageKite back-end (or its ping),
        // else the HTTP visitor it may also serve.
        None if roles.link => {
            super::pagekite::serve_plain(sock, buf, peer, roles.http, ctx).await;
        }
        None if roles.http => {
            super::http::serve_plain(sock, buf, peer, ctx).await;
        }
        None => debug!("plain bytes on a TLS-only port; dropping connection"),
    }
}
