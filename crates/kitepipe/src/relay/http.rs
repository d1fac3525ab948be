//! Visitor HTTP: read a request head, route by Host, forward.
//!
//! Requests are scanned (head rewritten with `X-Forwarded-For` and
//! `X-Forwarded-Proto`, body forwarded by its exact length or chunking, then
//! the next head); responses flow back as raw bytes. After an upgrade
//! (WebSocket) or CONNECT, bytes flow raw both ways. A keep-alive connection
//! stays on the kite its first request was routed to.
//!
//! Every refusal is an HTTP error page: 400 malformed, 404 unknown kite, 408
//! head too slow, 431 head too large, 502 target unreachable, 503 offline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use kitepipe_proto::frame::ResetCode;
use kitepipe_proto::http1::{self, BodyScanner, Forwarded, HttpError, RequestHead};
use kitepipe_proto::kite::KiteProto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;
use tracing::debug;

use super::RelayCtx;
use super::registry::Lookup;
use crate::link::{MuxStream, StreamReset};
use crate::tunnel::{ReadSize, SMALL_READ};

/// Time a visitor has to send a complete request head once it has started
/// one (and, for the first request, from connecting). Defeats slowloris
/// clients that drip a header every few seconds.
pub(crate) const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a keep-alive connection may sit idle between requests, or a
/// body or upgraded stream may go without a byte from the visitor.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Serves one visitor connection; `buf` holds bytes already read.
pub(crate) async fn serve(
    sock: TcpStream,
    mut buf: BytesMut,
    peer: SocketAddr,
    ctx: Arc<RelayCtx>,
) {
    let (mut reader, mut writer) = sock.into_split();
    let head = match read_first_head(&mut reader, &mut buf).await {
        Ok(Some(head)) => head,
        Ok(None) => return,
        Err(refusal) => {
            debug!(status = refusal.0, detail = %refusal.2, "refusing visitor");
            let _ = writer
                .write_all(&http1::error_response(refusal.0, refusal.1, &refusal.2))
                .await;
            let _ = writer.shutdown().await;
            return;
        }
    };
    let Some(host) = head.host.clone() else {
        let page = http1::error_response(
            400,
            "Bad Request",
            "The request has no Host header, so kitepipe cannot tell which site you want.",
        );
        let _ = writer.write_all(&page).await;
        return;
    };
    if head.method.eq_ignore_ascii_case("CONNECT") {
        connect_tcp_kite(reader, writer, buf, &head, &host, peer, &ctx).await;
        return;
    }
    let backends = match ctx.registry.lookup_name(KiteProto::Http, &host) {
        Lookup::Found(backends) => backends,
        Lookup::Offline => {
            let detail = format!(
                "The site {host} is known to this relay, but no connector is serving it right now. Try again later."
            );
            let _ = writer
                .write_all(&http1::error_response(503, "Kite offline", &detail))
                .await;
            return;
        }
        Lookup::Unknown => {
            let detail = format!("This relay does not serve {host}. Check the address.");
            let _ = writer
                .write_all(&http1::error_response(404, "Unknown kite", &detail))
                .await;
            return;
        }
    };
    let Some((stream, backend)) =
        super::tcp::open_visitor_stream(&backends, Some(&host), peer).await
    else {
        let detail =
            format!("No connector serving {host} is reachable right now. Try again later.");
        let _ = writer
            .write_all(&http1::error_response(503, "Kite offline", &detail))
            .await;
        return;
    };
    debug!(node = %backend.node, %host, "visitor routed");
    let forwarded = Forwarded {
        client_ip: peer.ip(),
        proto: "http",
    };
    let (stream_reader, mut stream_writer) = tokio::io::split(stream);
    let (done_tx, done_rx) = watch::channel(false);
    let requests = async {
        let res = forward_requests(reader, buf, head, &mut stream_writer, forwarded, done_rx).await;
        // Whatever ended the requests (EOF, a bad request, an idle visitor),
        // the kite sees EOF and finishes its response.
        let _ = stream_writer.shutdown().await;
        res
    };
    let responses = async {
        let res = forward_responses(stream_reader, &mut writer, &host).await;
        let _ = writer.shutdown().await;
        let _ = done_tx.send(true);
        res
    };
    let (req, resp) = tokio::join!(requests, responses);
    debug!(?req, ?resp, "visitor done");
}

/// `CONNECT name:port` on the HTTP port reaches the TCP kite of that name
/// and port (PageKite-style, e.g. `ssh -o ProxyCommand` through a proxy-aware
/// helper), then bytes flow raw both ways.
async fn connect_tcp_kite(
    reader: OwnedReadHalf,
    mut writer: OwnedWriteHalf,
    mut buf: BytesMut,
    head: &RequestHead,
    host: &str,
    peer: SocketAddr,
    ctx: &Arc<RelayCtx>,
) {
    let port = head
        .target
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse::<u16>().ok());
    let found = match port.map(|port| ctx.registry.lookup_port(port)) {
        Some(Lookup::Found(backends))
            if backends
                .iter()
                .all(|b| kitepipe_proto::kite::name_matches(&b.kite.name, host)) =>
        {
            Some(backends)
        }
        Some(Lookup::Offline) => {
            let detail = format!("The TCP kite {} is offline.", head.target);
            let _ = writer
                .write_all(&http1::error_response(503, "Kite offline", &detail))
                .await;
            return;
        }
        _ => None,
    };
    let Some(backends) = found else {
        let detail = format!("This relay has no TCP kite {}.", head.target);
        let _ = writer
            .write_all(&http1::error_response(404, "Unknown kite", &detail))
            .await;
        return;
    };
    let Some((mut stream, backend)) =
        super::tcp::open_visitor_stream(&backends, Some(host), peer).await
    else {
        let detail = format!("No connector serving {} is reachable.", head.target);
        let _ = writer
            .write_all(&http1::error_response(503, "Kite offline", &detail))
            .await;
        return;
    };
    let _ = buf.split_to(head.head_len);
    if writer
        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await
        .is_err()
        || stream.write_all(&buf).await.is_err()
    {
        return;
    }
    let Ok(mut sock) = reader.reunite(writer) else {
        return;
    };
    match crate::tunnel::splice_stream(&mut sock, &mut stream).await {
        Ok((up, down)) => debug!(node = %backend.node, up, down, "CONNECT visitor done"),
        Err(err) => debug!(node = %backend.node, %err, "CONNECT visitor ended with error"),
    }
}

type Refusal = (u16, &'static str, String);

fn refusal(err: &HttpError) -> Refusal {
    let title = match err.status() {
        431 => "Request Header Fields Too Large",
        505 => "HTTP Version Not Supported",
        _ => "Bad Request",
    };
    (
        err.status(),
        title,
        format!("kitepipe could not read this request: {err}."),
    )
}

/// Reads the first head; `Ok(None)` when the visitor left without sending one.
async fn read_first_head(
    reader: &mut OwnedReadHalf,
    buf: &mut BytesMut,
) -> Result<Option<RequestHead>, Refusal> {
    let deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
    loop {
        match http1::parse_request_head(buf) {
            Ok(Some(head)) => return Ok(Some(head)),
            Ok(None) => {}
            Err(err) => return Err(refusal(&err)),
        }
        buf.reserve(4096);
        match tokio::time::timeout_at(deadline, reader.read_buf(buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
            Ok(Ok(_)) => {}
            Err(_) if buf.is_empty() => return Ok(None),
            Err(_) => {
                return Err((
                    408,
                    "Request Timeout",
                    "The request head did not arrive in time.".into(),
                ));
            }
        }
    }
}

/// Visitor -> kite: heads rewritten, bodies forwarded exactly, until EOF,
/// an upgrade (then raw), or the response side ending between requests.
async fn forward_requests<W: AsyncWrite + Unpin>(
    mut reader: OwnedReadHalf,
    mut buf: BytesMut,
    first: RequestHead,
    writer: &mut W,
    forwarded: Forwarded,
    mut response_done: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut head = first;
    loop {
        let raw = buf.split_to(head.head_len);
        let rewritten = http1::rewrite_head(&raw, &forwarded).map_err(invalid)?;
        writer.write_all(&rewritten).await?;
        if head.upgrade {
            writer.write_all(&buf).await?;
            buf.clear();
            return copy_raw(&mut reader, writer).await;
        }
        let mut scanner = BodyScanner::new(head.body);
        while !scanner.is_done() {
            if buf.is_empty() && !read_more(&mut reader, &mut buf, IDLE_TIMEOUT).await? {
                return Ok(());
            }
            let progress = scanner.scan(&buf).map_err(invalid)?;
            let chunk = buf.split_to(progress.consumed);
            writer.write_all(&chunk).await?;
        }
        // Between requests: wait for the next head, unless the kite closed.
        head = loop {
            match http1::parse_request_head(&buf) {
                Ok(Some(head)) => break head,
                Ok(None) => {}
                Err(err) => return Err(invalid(err)),
            }
            let patience = if buf.is_empty() {
                IDLE_TIMEOUT
            } else {
                HEAD_TIMEOUT
            };
            let more = tokio::select! {
                more = read_more(&mut reader, &mut buf, patience) => more?,
                _ = response_done.wait_for(|done| *done) => false,
            };
            if !more {
                return Ok(());
            }
        };
    }
}

/// Reads more bytes into `buf`; false at EOF. Times out after `patience`.
async fn read_more(
    reader: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    patience: Duration,
) -> std::io::Result<bool> {
    buf.reserve(SMALL_READ);
    match tokio::time::timeout(patience, reader.read_buf(buf)).await {
        Ok(Ok(n)) => Ok(n > 0),
        Ok(Err(err)) => Err(err),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "visitor idle too long",
        )),
    }
}

async fn copy_raw<R, W>(reader: &mut R, writer: &mut W) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut size = ReadSize::default();
    let mut chunk = vec![0u8; size.get()];
    loop {
        if chunk.len() != size.get() {
            chunk.resize(size.get(), 0);
        }
        let n = match tokio::time::timeout(IDLE_TIMEOUT, reader.read(&mut chunk)).await {
            Ok(res) => res?,
            Err(_) => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        size.update(n);
        writer.write_all(&chunk[..n]).await?;
    }
}

/// Kite -> visitor, raw. If the kite fails before sending anything, the
/// visitor gets a 502 page saying why.
async fn forward_responses(
    mut reader: tokio::io::ReadHalf<MuxStream>,
    writer: &mut OwnedWriteHalf,
    host: &str,
) -> std::io::Result<u64> {
    let mut size = ReadSize::default();
    let mut chunk = vec![0u8; size.get()];
    let mut sent = 0u64;
    loop {
        if chunk.len() != size.get() {
            chunk.resize(size.get(), 0);
        }
        match reader.read(&mut chunk).await {
            Ok(0) => return Ok(sent),
            Ok(n) => {
                size.update(n);
                writer.write_all(&chunk[..n]).await?;
                sent += n as u64;
            }
            Err(err) if sent == 0 => {
                let reset = err
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<StreamReset>());
                let detail = match reset {
                    Some(reset) if reset.code == ResetCode::TargetUnreachable => format!(
                        "The connector serving {host} could not reach its local service: {}.",
                        reset.reason
                    ),
                    Some(reset) => format!(
                        "The connector serving {host} refused the request: {}.",
                        reset.reason
                    ),
                    None => format!("The link to the connector serving {host} failed: {err}."),
                };
                writer
                    .write_all(&http1::error_response(502, "Bad Gateway", &detail))
                    .await?;
                return Err(err);
            }
            Err(err) => return Err(err),
        }
    }
}

fn invalid(err: HttpError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, err)
}
