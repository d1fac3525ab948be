//! The HTTP upstream handler: an event becomes an HTTP/1.1 request to a
//! local server (`--handler-upstream http://127.0.0.1:9000`), so any web
//! framework can handle events. The path after the route is kept
//! (`/server/time/utc` arrives as `GET /time/utc`), the event is described
//! in `X-Kitepipe-*` headers, and the response (status, headers, body)
//! comes back as the reply, streamed both ways.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use kitepipe_proto::event::ReplyHead;
use tokio::net::TcpStream;
use tracing::info;

use super::reply::{ReplyWriter, error_reply};
use super::request::EventRequest;
use super::{Progress, is_own_header, stalled};
use crate::config::UpstreamUrl;

/// How long connecting to the upstream may take; it is on this machine.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Headers that describe one hop, never forwarded.
pub(crate) const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// Forwards `request` to `url` and writes the upstream's response as the reply.
pub(crate) async fn run(
    url: &UpstreamUrl,
    request: EventRequest,
    mut out: ReplyWriter,
    timeout: Duration,
) {
    let fail = |message: String| error_reply(500, &message, None, None);
    let sock = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&url.authority)).await
    {
        Ok(Ok(sock)) => sock,
        Ok(Err(err)) => {
            info!(upstream = %url, %err, "handler upstream unreachable");
            out.reply(fail(format!("handler upstream {url} unreachable: {err}")))
                .await;
            return;
        }
        Err(_) => {
            out.reply(fail(format!(
                "handler upstream {url} did not accept in time"
            )))
            .await;
            return;
        }
    };
    let _ = sock.set_nodelay(true);
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(sock)).await {
        Ok(pair) => pair,
        Err(err) => {
            out.reply(fail(format!("handler upstream {url}: {err}")))
                .await;
            return;
        }
    };
    let uri = if request.query.is_empty() {
        format!("{}{}", url.base_path, request.path)
    } else {
        format!("{}{}?{}", url.base_path, request.path, request.query)
    };
    let mut builder = Request::builder()
        .method(request.method.as_str())
        .uri(uri)
        .header("host", url.authority.as_str());
    for (name, value) in &request.headers {
        if !HOP_BY_HOP.contains(&name.as_str()) && !is_own_header(name) {
            builder = builder.header(name.as_str(), value.as_str());
        }
    }
    // This node's description of the event, last and alone of its kind.
    builder = builder
        .header("x-kitepipe-event", request.name.as_str())
        .header("x-kitepipe-caller", request.caller.node.as_str());
    if let Some(identity) = &request.caller.identity {
        builder = builder.header("x-kitepipe-caller-identity", identity.as_str());
    }
    let progress = std::sync::Arc::new(Progress::new());
    progress.touch();
    // Without a length, a body would go out chunked, which many servers
    // do not expect on a GET; methods that carry no body send none.
    let bodiless = request.header("content-length").is_none()
        && matches!(
            request.method.as_str(),
            "GET" | "HEAD" | "DELETE" | "OPTIONS"
        );
    let body = if bodiless {
        Either::Left(Empty::<Bytes>::new())
    } else {
        Either::Right(request.body.0.with_progress(progress.clone()))
    };
    let upstream_request = match builder.body(body) {
        Ok(req) => req,
        Err(err) => {
            out.reply(fail(format!("cannot forward the event: {err}")))
                .await;
            return;
        }
    };
    tokio::pin!(conn);
    let mut conn_done = false;
    let send = sender.send_request(upstream_request);
    tokio::pin!(send);
    let response = loop {
        tokio::select! {
            res = &mut send => break res,
            // A server that answers and closes (HTTP/1.0 style) ends the
            // connection as the response arrives: the response still
            // counts; without one, `send` fails next.
            res = &mut conn, if !conn_done => {
                conn_done = true;
                if let Err(err) = res {
                    out.reply(fail(format!("handler upstream {url}: {err}"))).await;
                    return;
                }
            }
            _ = stalled(&progress, timeout) => {
                let message = format!("handler upstream {url} did not answer within {timeout:?}");
                out.reply(error_reply(504, &message, None, None)).await;
                return;
            }
        }
    };
    drop(sender);
    let response = match response {
        Ok(response) => response,
        Err(err) => {
            out.reply(fail(format!("handler upstream {url}: {err}")))
                .await;
            return;
        }
    };
    let mut head = ReplyHead::status(response.status().as_u16());
    for (name, value) in response.headers() {
        let Ok(value) = value.to_str() else { continue };
        match name.as_str() {
            "content-type" => head.content_type = Some(value.to_string()),
            name if HOP_BY_HOP.contains(&name) => {}
            name => head.headers.push((name.to_string(), value.to_string())),
        }
    }
    let mut body = response.into_body();
    let res = async {
        out.head(&head).await?;
        loop {
            let frame = tokio::select! {
                frame = body.frame() => frame,
                res = &mut conn, if !conn_done => {
                    conn_done = true;
                    res.map_err(std::io::Error::other)?;
                    continue;
                }
                _ = stalled(&progress, timeout) => {
                    return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "upstream stalled"));
                }
            };
            let Some(frame) = frame else { break };
            let frame = frame.map_err(std::io::Error::other)?;
            progress.touch();
            if let Ok(data) = frame.into_data() {
                out.data(data).await?;
            }
        }
        std::io::Result::Ok(())
    }
    .await;
    match res {
        Ok(()) => {
            let _ = out.finish().await;
        }
        Err(err) => out.abort(&format!("handler upstream {url} failed midway: {err}")),
    }
}
