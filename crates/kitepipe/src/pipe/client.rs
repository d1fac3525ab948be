//! A small client for a gateway, behind `kitepipe call`: one request, the
//! response body streamed to a writer. curl does the same; this saves
//! typing the gateway's URL.

use std::io;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::config::GatewayAddr;

/// One request to a gateway.
#[derive(Debug, Clone)]
pub struct CallRequest {
    /// HTTP method, e.g. `GET`.
    pub method: String,
    /// Path, e.g. `/server/time` (a missing leading `/` is added).
    pub path: String,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
    /// Request body.
    pub body: Bytes,
}

/// What the gateway answered (the body went to the writer).
#[derive(Debug, Clone)]
pub struct CallResponse {
    /// HTTP status.
    pub status: u16,
    /// Response headers (lowercase names).
    pub headers: Vec<(String, String)>,
}

/// Why a call failed before a response arrived.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The gateway could not be reached.
    #[error("cannot reach the gateway at {addr}")]
    Connect {
        /// The gateway.
        addr: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The request could not be built (bad method, path or header).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// HTTP failed.
    #[error("HTTP exchange with the gateway failed")]
    Http(#[from] hyper::Error),
    /// Writing the body out failed.
    #[error("writing the response body")]
    Write(#[source] io::Error),
}

/// Sends `request` to the gateway at `gateway` and streams the response
/// body into `out`.
pub async fn call<W: AsyncWrite + Unpin>(
    gateway: &GatewayAddr,
    request: CallRequest,
    out: &mut W,
) -> Result<CallResponse, CallError> {
    let connect_err = |source| CallError::Connect {
        addr: match gateway {
            GatewayAddr::Tcp(addr) => addr.to_string(),
            GatewayAddr::Unix(path) => format!("unix:{}", path.display()),
        },
        source,
    };
    match gateway {
        GatewayAddr::Tcp(addr) => {
            let sock = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(connect_err)?;
            exchange(sock, &addr.to_string(), request, out).await
        }
        GatewayAddr::Unix(path) => {
            let sock = tokio::net::UnixStream::connect(path)
                .await
                .map_err(connect_err)?;
            exchange(sock, "localhost", request, out).await
        }
    }
}

async fn exchange<S, W>(
    sock: S,
    host: &str,
    request: CallRequest,
    out: &mut W,
) -> Result<CallResponse, CallError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    W: AsyncWrite + Unpin,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(sock)).await?;
    let path = if request.path.starts_with('/') {
        request.path
    } else {
        format!("/{}", request.path)
    };
    let mut builder = Request::builder()
        .method(request.method.as_str())
        .uri(path)
        .header("host", host);
    for (name, value) in &request.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    let req = builder
        .body(Full::new(request.body))
        .map_err(|err| CallError::BadRequest(err.to_string()))?;
    tokio::pin!(conn);
    let response = tokio::select! {
        res = sender.send_request(req) => res?,
        res = &mut conn => {
            res?;
            return Err(CallError::BadRequest("the gateway closed the connection".into()));
        }
    };
    drop(sender);
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_string(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    let mut body = response.into_body();
    let mut conn_done = false;
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            res = &mut conn, if !conn_done => {
                conn_done = true;
                res?;
                continue;
            }
        };
        let Some(frame) = frame else { break };
        if let Ok(data) = frame?.into_data() {
            out.write_all(&data).await.map_err(CallError::Write)?;
        }
    }
    out.flush().await.map_err(CallError::Write)?;
    Ok(CallResponse { status, headers })
}
