//! A small client for a gateway, behind `kitepipe call`: one request, the
//! response body streamed to a writer. curl does the same; this saves
//! typing the gateway's URL.

use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::gateway::{TOKEN_BYTES, TOKEN_FILE_HEADER};
use crate::config::{GATEWAY_TOKEN_FILE, GatewayAddr};

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
    /// The gateway's owner token could not be read.
    #[error("gateway token file {}: {why}", path.display())]
    Token {
        /// The token file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
}

/// Largest token file read (a token is 64 hex digits and a newline).
const MAX_TOKEN_FILE: u64 = 1024;

/// The owner token to send to the gateway at `gateway`: read from `file`
/// if given; else, if the gateway answers a token-less request with 401
/// and names its token file, read from there (the owner's tools thus find
/// it wherever the relay keeps its state). `None`: the gateway needs none.
///
/// A file is used only if it is a regular file (not a symlink) of the
/// caller's own uid, unreadable by group and others, holding 64 hex
/// digits; a named one must also be called `gateway-token`. So a process
/// squatting the gateway's address cannot make the caller read and send
/// another file.
pub async fn gateway_token(
    gateway: &GatewayAddr,
    file: Option<&Path>,
) -> Result<Option<String>, CallError> {
    if let Some(file) = file {
        return read_token_file(file).map(Some);
    }
    let probe = CallRequest {
        method: "GET".into(),
        path: "/".into(),
        headers: Vec::new(),
        body: Bytes::new(),
    };
    let response = call(gateway, probe, &mut tokio::io::sink()).await?;
    if response.status != 401 {
        return Ok(None);
    }
    let Some((_, named)) = response
        .headers
        .iter()
        .find(|(name, _)| name == TOKEN_FILE_HEADER)
    else {
        return Ok(None);
    };
    let named = PathBuf::from(named);
    if named.file_name() != Some(std::ffi::OsStr::new(GATEWAY_TOKEN_FILE)) {
        return Err(CallError::Token {
            path: named,
            why: format!("the gateway named a file not called {GATEWAY_TOKEN_FILE}; not read"),
        });
    }
    read_token_file(&named).map(Some)
}

/// Reads a token file, refusing one that is not the caller's own and
/// private (see [`gateway_token`]).
fn read_token_file(path: &Path) -> Result<String, CallError> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let bad = |why: String| CallError::Token {
        path: path.to_path_buf(),
        why,
    };
    let meta = std::fs::symlink_metadata(path).map_err(|err| bad(err.to_string()))?;
    if !meta.file_type().is_file() {
        return Err(bad("not a regular file".into()));
    }
    if meta.uid() != rustix::process::geteuid().as_raw() {
        return Err(bad("owned by another user".into()));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(bad(format!(
            "mode {:o} lets others read it: chmod 600",
            meta.mode() & 0o777
        )));
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_TOKEN_FILE).read_to_string(&mut text))
        .map_err(|err| bad(err.to_string()))?;
    let token = text.trim();
    if token.len() != 2 * TOKEN_BYTES || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("not a gateway token (64 hex digits)".into()));
    }
    Ok(token.to_ascii_lowercase())
}

/// Sends `request` to the gateway at `gateway` and streams the response
/// body into `out`.
///
/// ```no_run
/// use kitepipe::config::GatewayAddr;
/// use kitepipe::pipe::TOKEN_HEADER;
/// use kitepipe::pipe::client::{CallRequest, call, gateway_token};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// // The relay's gateway: the event goes to connector `laptop`'s `time`.
/// let gateway = GatewayAddr::Tcp("127.0.0.1:8089".parse()?);
/// let mut request = CallRequest {
///     method: "GET".into(),
///     path: "/client/laptop/time".into(),
///     headers: Vec::new(),
///     body: Default::default(),
/// };
/// if let Some(token) = gateway_token(&gateway, None).await? {
///     request.headers.push((TOKEN_HEADER.to_string(), token));
/// }
/// let mut body = Vec::new();
/// let response = call(&gateway, request, &mut body).await?;
/// println!("{} {}", response.status, String::from_utf8_lossy(&body));
/// # Ok(())
/// # }
/// ```
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
