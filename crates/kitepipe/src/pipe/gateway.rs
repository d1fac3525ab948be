//! The local REST gateway: an HTTP server on loopback (or a unix socket)
//! that turns each request into an event on a link and the event's reply
//! into the HTTP response.
//!
//! Status rules (see docs/protocol.md): the handler's side decides 200,
//! 404 (no handler), 500 (handler failed), 504 (handler stalled); the
//! gateway itself answers 400 (bad event name or arguments), 404 (unknown
//! route or node), 431 (event too large), 503 (node or link offline after
//! waiting, or the link lost mid-flight for a request that may not be
//! retried), 502 (the other side broke the event protocol) and 504 (no
//! reply in time). Errors are JSON: `{"error": "..."}`.

use std::convert::Infallible;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use kitepipe_proto::event::{self, EventHeader, EventPathError, ReplyHead, Route};
use kitepipe_proto::frame::ResetCode;
use kitepipe_proto::message::{self, MAX_MESSAGE_LEN, StreamHeader};
use kitepipe_proto::remote::REMOTE_UPGRADE;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, warn};

use super::stream::{EventBody, HeadError, read_reply_head};
use super::upstream::HOP_BY_HOP;
use super::{PipeError, Progress, RouteError, Router, is_own_header, stalled};
use crate::accept::accept_with;
use crate::config::{EventConfig, GatewayAddr};
use crate::link::SharedStream;
use crate::local_guard::{loopback_host, same_secret};

/// Largest request head the gateway reads. Far above any real request; a
/// larger head gets 431 from hyper before anything is allocated for it.
pub(crate) const MAX_REQUEST_HEAD: usize = 64 * 1024;

/// Largest request body kept in memory so that an idempotent request can
/// be sent again after a link failure. Larger bodies stream and are not
/// retried.
pub(crate) const RETRY_BODY_MAX: usize = 1024 * 1024;

/// Gateway connections served at once; beyond this, new ones are closed.
pub(crate) const MAX_GATEWAY_CONNECTIONS: usize = 4096;

/// How long a client may take to send a request head.
const HEAD_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Extra patience for a reply beyond the event timeout, so that the
/// handler's own 504 (with its stderr tail) arrives before ours.
const REPLY_GRACE: Duration = Duration::from_secs(5);

/// Request headers that travel with an event (besides every `x-` header).
const TRAVELLING_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "content-encoding",
    "accept",
    "accept-encoding",
    "accept-language",
    "authorization",
    "user-agent",
];

/// Marks a request as safe to send twice (GET, HEAD and OPTIONS are).
pub(crate) const IDEMPOTENT_HEADER: &str = "x-kitepipe-idempotent";

/// The body type of gateway responses.
type GatewayBody = UnsyncBoxBody<Bytes, io::Error>;

/// A bound gateway socket (bound at configuration time, served later),
/// with who may use it.
#[derive(Debug)]
pub(crate) struct GatewayListener {
    socket: GatewaySocket,
    access: Access,
}

/// The socket of a [`GatewayListener`].
#[derive(Debug)]
enum GatewaySocket {
    /// TCP on loopback.
    Tcp(std::net::TcpListener),
    /// A unix socket, and its path.
    Unix(std::os::unix::net::UnixListener, PathBuf),
}

impl GatewayListener {
    /// Binds `addr` (synchronously: nodes bind everything before running).
    /// A stale unix socket file at the path is replaced. The gateway
    /// accepts no `Origin` and needs no token until [`Self::with_access`].
    pub(crate) fn bind(addr: &GatewayAddr) -> Result<GatewayListener, PipeError> {
        let socket = match addr {
            GatewayAddr::Tcp(addr) => {
                let bind = || -> io::Result<std::net::TcpListener> {
                    let listener = std::net::TcpListener::bind(addr)?;
                    listener.set_nonblocking(true)?;
                    Ok(listener)
                };
                bind()
                    .map(GatewaySocket::Tcp)
                    .map_err(|source| PipeError::Bind {
                        addr: addr.to_string(),
                        source,
                    })?
            }
            GatewayAddr::Unix(path) => {
                use std::os::unix::fs::FileTypeExt;
                if std::fs::symlink_metadata(path).is_ok_and(|meta| meta.file_type().is_socket()) {
                    let _ = std::fs::remove_file(path);
                }
                let bind = || -> io::Result<std::os::unix::net::UnixListener> {
                    let listener = std::os::unix::net::UnixListener::bind(path)?;
                    listener.set_nonblocking(true)?;
                    Ok(listener)
                };
                bind()
                    .map(|listener| GatewaySocket::Unix(listener, path.clone()))
                    .map_err(|source| PipeError::Bind {
                        addr: format!("unix:{}", path.display()),
                        source,
                    })?
            }
        };
        Ok(GatewayListener {
            socket,
            access: Access::default(),
        })
    }

    /// Applies `events`' access settings: the allowed `Origin`s, and, if
    /// it names a token file, a fresh owner token written there (mode
    /// 0600, replacing any earlier one) that requests must then carry.
    pub(crate) fn with_access(
        mut self,
        events: &EventConfig,
    ) -> Result<GatewayListener, PipeError> {
        self.access.origins = events.gateway_origins.clone();
        if let Some(file) = &events.gateway_token_file {
            let token = write_token(file).map_err(|source| PipeError::Token {
                path: file.clone(),
                source,
            })?;
            self.access.token = Some(OwnerToken {
                value: token,
                file: std::path::absolute(file).unwrap_or_else(|_| file.clone()),
            });
        }
        Ok(self)
    }

    /// Where it listens, as `127.0.0.1:PORT` or `unix:PATH`.
    pub(crate) fn describe(&self) -> String {
        match &self.socket {
            GatewaySocket::Tcp(listener) => listener
                .local_addr()
                .map(|addr| addr.to_string())
                .unwrap_or_else(|_| "?".into()),
            GatewaySocket::Unix(_, path) => format!("unix:{}", path.display()),
        }
    }

    /// The TCP address, if it listens on TCP.
    pub(crate) fn tcp_addr(&self) -> Option<std::net::SocketAddr> {
        match &self.socket {
            GatewaySocket::Tcp(listener) => listener.local_addr().ok(),
            GatewaySocket::Unix(..) => None,
        }
    }
}

pub use kitepipe_proto::event::TOKEN_HEADER;

/// Header of a 401 naming the token file, so the owner's own tools
/// (`kitepipe call`, `kitepipe remote`) find it; only its owner can read it.
pub(crate) const TOKEN_FILE_HEADER: &str = "x-kitepipe-token-file";

/// Bytes of randomness in an owner token (shown as hex): 256 bits, beyond
/// guessing.
pub(super) const TOKEN_BYTES: usize = 32;

/// Who may use a gateway besides reaching its socket.
#[derive(Debug, Default)]
struct Access {
    /// Allowed `Origin`s, lowercase.
    origins: Vec<String>,
    /// The owner token, if requests need one.
    token: Option<OwnerToken>,
}

#[derive(Debug)]
struct OwnerToken {
    /// Lowercase hex.
    value: String,
    /// Where it is written (absolute).
    file: PathBuf,
}

/// Who is on the other end of a gateway connection, as far as the socket
/// tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    /// A TCP client on loopback: any local user (or a browser).
    Tcp,
    /// A unix socket client of the gateway's own uid (checked by
    /// `SO_PEERCRED`): the owner, who needs no token.
    UnixOwner,
    /// A unix socket client of another uid.
    UnixOther,
}

/// Writes a fresh token to `path` (mode 0600, through a temporary file and
/// a rename, so a reader never sees half of it) and returns it.
fn write_token(path: &std::path::Path) -> io::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let mut bytes = [0u8; TOKEN_BYTES];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| io::Error::other("no randomness for the gateway token"))?;
    let token = kitepipe_proto::message::hex(&bytes);
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(format!("{token}\n").as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(token)
}

impl Access {
    /// The refusal of a request that is not for this gateway's intended callers:
    /// a Host other than loopback (DNS rebinding; TCP only: a browser
    /// cannot reach a unix socket), an `Origin` the operator did not allow
    /// or a cross-site fetch without one (web pages), and, where a token is
    /// set, a request without it (other local users).
    fn refusal(&self, req: &Request<Incoming>, peer: Peer) -> Option<Response<GatewayBody>> {
        let headers = req.headers();
        if peer == Peer::Tcp {
            let mut hosts = headers.get_all(hyper::header::HOST).iter();
            let host = hosts.next();
            let authority = req.uri().authority().map(|a| a.as_str());
            let bad = hosts.next().is_some()
                || host.is_some_and(|h| h.to_str().map_or(true, |h| !loopback_host(h)))
                || authority.is_some_and(|a| !loopback_host(a));
            if bad {
                return Some(error_response(
                    StatusCode::MISDIRECTED_REQUEST,
                    "this gateway answers only requests for localhost, 127.0.0.1 or [::1] \
                     (a browser sent this for another name: DNS rebinding?)",
                ));
            }
        }
        let mut origin_allowed = false;
        for origin in headers.get_all(hyper::header::ORIGIN) {
            let allowed = self
                .origins
                .iter()
                .any(|allowed| allowed.as_bytes().eq_ignore_ascii_case(origin.as_bytes()));
            if !allowed {
                return Some(error_response(
                    StatusCode::FORBIDDEN,
                    "requests from web pages are refused: this Origin is not allowed \
                     (the gateway's operator can allow it with --gateway-origin)",
                ));
            }
            origin_allowed = true;
        }
        let cross_site = headers
            .get("sec-fetch-site")
            .is_some_and(|site| !matches!(site.as_bytes(), b"same-origin" | b"none"));
        if cross_site && !origin_allowed {
            return Some(error_response(
                StatusCode::FORBIDDEN,
                "cross-site requests from web pages are refused",
            ));
        }
        if let Some(token) = &self.token
            && peer != Peer::UnixOwner
        {
            let given = headers.get(TOKEN_HEADER).map(|v| v.as_bytes());
            if !given.is_some_and(|given| same_secret(given, token.value.as_bytes())) {
                let mut response = error_response(
                    StatusCode::UNAUTHORIZED,
                    &format!(
                        "this gateway serves its owner only: send the token from {} in \
                         X-Kitepipe-Token (kitepipe call and kitepipe remote do so on their own)",
                        token.file.display()
                    ),
                );
                if let Ok(value) = HeaderValue::from_str(&token.file.to_string_lossy()) {
                    response.headers_mut().insert(TOKEN_FILE_HEADER, value);
                }
                return Some(response);
            }
        }
        None
    }
}

/// A gateway's settings and the way to its links.
pub(crate) struct Gateway<R> {
    /// Finds the link for a route.
    pub(crate) router: R,
    /// How long a request waits for an offline node or link.
    pub(crate) wait: Duration,
    /// How long an event may go without progress.
    pub(crate) timeout: Duration,
    /// Gateway connections and uploads run here.
    pub(crate) tracker: TaskTracker,
    /// Cancelled at shutdown.
    pub(crate) token: CancellationToken,
}

/// Serves the gateway until its token is cancelled.
pub(crate) async fn run_gateway<R: Router>(listener: GatewayListener, gateway: Arc<Gateway<R>>) {
    let where_ = listener.describe();
    let access = Arc::new(listener.access);
    let connections = Arc::new(Semaphore::new(MAX_GATEWAY_CONNECTIONS));
    let cannot = |err: io::Error| warn!(%err, gateway = %where_, "cannot serve the event gateway");
    match listener.socket {
        GatewaySocket::Tcp(listener) => {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => listener,
                Err(err) => return cannot(err),
            };
            info!(gateway = %where_, "event gateway listening");
            let listener = &listener;
            accept_loop(&gateway, &access, &connections, move || async move {
                let (sock, peer) = listener.accept().await?;
                let _ = sock.set_nodelay(true);
                Ok((sock, format!("gateway client {peer}"), Peer::Tcp))
            })
            .await;
        }
        GatewaySocket::Unix(listener, path) => {
            let listener = match tokio::net::UnixListener::from_std(listener) {
                Ok(listener) => listener,
                Err(err) => return cannot(err),
            };
            info!(gateway = %where_, "event gateway listening");
            let listener = &listener;
            let own_uid = rustix::process::geteuid().as_raw();
            accept_loop(&gateway, &access, &connections, move || async move {
                let (sock, _) = listener.accept().await?;
                let (caller, peer) = match sock.peer_cred() {
                    Ok(cred) => (
                        format!("gateway client uid {} pid {:?}", cred.uid(), cred.pid()),
                        if cred.uid() == own_uid {
                            Peer::UnixOwner
                        } else {
                            Peer::UnixOther
                        },
                    ),
                    Err(_) => (
                        "gateway client on the unix socket".to_string(),
                        Peer::UnixOther,
                    ),
                };
                Ok((sock, caller, peer))
            })
            .await;
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Accepts connections (a socket and a description of the caller, for
/// logs) and serves each until the gateway's token is cancelled.
async fn accept_loop<R, S, F, Fut>(
    gateway: &Arc<Gateway<R>>,
    access: &Arc<Access>,
    connections: &Arc<Semaphore>,
    mut accept: F,
) where
    R: Router,
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = io::Result<(S, String, Peer)>>,
{
    while let Some((sock, caller, peer)) = accept_with(&mut accept, &gateway.token).await {
        spawn_connection(sock, caller, peer, gateway, access, connections);
    }
}

fn spawn_connection<R, S>(
    sock: S,
    caller: String,
    peer: Peer,
    gateway: &Arc<Gateway<R>>,
    access: &Arc<Access>,
    connections: &Arc<Semaphore>,
) where
    R: Router,
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let Ok(permit) = connections.clone().try_acquire_owned() else {
        debug!("too many gateway connections; closing one");
        return;
    };
    let gateway = gateway.clone();
    let access = access.clone();
    gateway.tracker.clone().spawn(async move {
        let _permit = permit;
        let service = {
            let gateway = gateway.clone();
            let caller: Arc<str> = caller.into();
            service_fn(move |req: Request<Incoming>| {
                let gateway = gateway.clone();
                let caller = caller.clone();
                let refused = access.refusal(&req, peer);
                async move {
                    if let Some(response) = refused {
                        info!(%caller, path = %req.uri().path(), status = %response.status(), "gateway request refused");
                        return Ok::<_, Infallible>(response);
                    }
                    Ok(handle(gateway, req, caller).await)
                }
            })
        };
        let conn = hyper::server::conn::http1::Builder::new()
            .max_buf_size(MAX_REQUEST_HEAD)
            .timer(TokioTimer::new())
            .header_read_timeout(HEAD_READ_TIMEOUT)
            .serve_connection(TokioIo::new(sock), service)
            .with_upgrades();
        tokio::select! {
            res = conn => if let Err(err) = res { debug!(%err, "gateway connection ended with an error") },
            _ = gateway.token.cancelled() => {}
        }
    });
}

#[derive(Serialize)]
struct ErrorJson<'a> {
    error: &'a str,
}

/// A JSON error response made by the gateway itself.
fn error_response(status: StatusCode, message: &str) -> Response<GatewayBody> {
    // A struct of one string always serializes.
    let json = serde_json::to_vec(&ErrorJson { error: message }).expect("error bodies serialize");
    let mut response = Response::new(full(Bytes::from(json)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn full(bytes: Bytes) -> GatewayBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// The request body as it will be sent: kept whole (so it can be sent
/// again) or streamed once.
enum UploadBody {
    Replayable(Bytes),
    Streaming(Option<Incoming>),
}

impl UploadBody {
    fn replayable(&self) -> bool {
        matches!(self, UploadBody::Replayable(_))
    }

    fn for_attempt(&mut self) -> UploadBody {
        match self {
            UploadBody::Replayable(bytes) => UploadBody::Replayable(bytes.clone()),
            UploadBody::Streaming(body) => UploadBody::Streaming(body.take()),
        }
    }
}

/// `/remote/NODE` with `Upgrade: kitepipe-remote`: after `101 Switching
/// Protocols` the connection carries a remote operation session (a link,
/// as over SSH) served by the router.
async fn remote_upgrade<R: Router>(
    gateway: Arc<Gateway<R>>,
    mut req: Request<Incoming>,
    caller: Arc<str>,
) -> Response<GatewayBody> {
    let node = req
        .uri()
        .path()
        .strip_prefix("/remote/")
        .unwrap_or("")
        .trim_end_matches('/')
        .to_string();
    let upgrade = req
        .headers()
        .get(hyper::header::UPGRADE)
        .is_some_and(|value| {
            value
                .as_bytes()
                .eq_ignore_ascii_case(REMOTE_UPGRADE.as_bytes())
        });
    if !upgrade {
        return error_response(
            StatusCode::BAD_REQUEST,
            "/remote/NODE carries remote operations, not single requests: use \
             `kitepipe remote node:NODE ...` (it asks for Upgrade: kitepipe-remote)",
        );
    }
    let valid = !node.is_empty()
        && node.len() <= 253
        && node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !valid {
        return error_response(
            StatusCode::BAD_REQUEST,
            "expected /remote/NODE with a node name",
        );
    }
    let serve = match gateway.router.remote(&node, gateway.wait).await {
        Ok(serve) => serve,
        Err((status, message)) => {
            info!(%node, %caller, %message, "remote session refused");
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
            return error_response(status, &message);
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    gateway.tracker.spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => serve(TokioIo::new(upgraded), caller.to_string()).await,
            Err(err) => debug!(%err, "remote session upgrade failed"),
        }
    });
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    response.headers_mut().insert(
        hyper::header::CONNECTION,
        HeaderValue::from_static("upgrade"),
    );
    response.headers_mut().insert(
        hyper::header::UPGRADE,
        HeaderValue::from_static(REMOTE_UPGRADE),
    );
    response
}

async fn handle<R: Router>(
    gateway: Arc<Gateway<R>>,
    req: Request<Incoming>,
    caller: Arc<str>,
) -> Response<GatewayBody> {
    if req.uri().path().starts_with("/remote/") {
        return remote_upgrade(gateway, req, caller).await;
    }
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let parsed = match event::parse_gateway_path(parts.method.as_str(), path) {
        Ok(parsed) => parsed,
        Err(err @ EventPathError::UnknownRoute) => {
            return error_response(StatusCode::NOT_FOUND, &err.to_string());
        }
        Err(err) => return error_response(StatusCode::BAD_REQUEST, &err.to_string()),
    };
    let mut headers = Vec::new();
    for (name, value) in &parts.headers {
        let name = name.as_str();
        // The caller's own X-Kitepipe-* never travel: the handler's node
        // describes the event and its caller itself.
        if (TRAVELLING_HEADERS.contains(&name) || name.starts_with("x-"))
            && !is_own_header(name)
            && let Ok(value) = value.to_str()
        {
            headers.push((name.to_string(), value.to_string()));
        }
    }
    let idempotent = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS)
        || parts
            .headers
            .get(IDEMPOTENT_HEADER)
            .is_some_and(|value| value.as_bytes() == b"1");
    let to = match &parsed.route {
        Route::Peer(node) => Some(node.clone()),
        _ => None,
    };
    let header = EventHeader {
        name: parsed.name,
        method: parts.method.as_str().to_string(),
        path: parsed.path,
        args: parsed.args,
        query: parts.uri.query().unwrap_or("").to_string(),
        headers,
        wait_ms: if to.is_some() {
            gateway.wait.as_millis() as u64
        } else {
            0
        },
        to,
        caller: None,
    };
    let encoded = message::encode(&StreamHeader::Event(header));
    if encoded.len() > MAX_MESSAGE_LEN {
        return error_response(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "the event (path, arguments and headers) is too large",
        );
    }
    let body = if idempotent
        && body
            .size_hint()
            .upper()
            .is_some_and(|n| n <= RETRY_BODY_MAX as u64)
    {
        match Limited::new(body, RETRY_BODY_MAX).collect().await {
            Ok(collected) => UploadBody::Replayable(collected.to_bytes()),
            Err(err) => {
                return error_response(StatusCode::BAD_REQUEST, &format!("request body: {err}"));
            }
        }
    } else {
        UploadBody::Streaming(Some(body))
    };
    let span = tracing::debug_span!("event call", path = %path);
    call(&gateway, &parsed.route, encoded, body, idempotent)
        .instrument(span)
        .await
}

/// Sends an event and turns its reply into the response, retrying once
/// after a link failure if the request is idempotent and no reply byte
/// had arrived.
async fn call<R: Router>(
    gateway: &Arc<Gateway<R>>,
    route: &Route,
    encoded: Bytes,
    mut body: UploadBody,
    idempotent: bool,
) -> Response<GatewayBody> {
    let mut attempt = 0;
    loop {
        let can_retry = idempotent && attempt == 0 && body.replayable();
        let mux = match gateway.router.route(route, gateway.wait).await {
            Ok(mux) => mux,
            Err(RouteError::NotHere(hint)) => return error_response(StatusCode::NOT_FOUND, hint),
            Err(RouteError::Unknown(node)) => {
                return error_response(StatusCode::NOT_FOUND, &format!("unknown node {node}"));
            }
            Err(RouteError::Offline(what)) => {
                let message = format!("{what} is offline (waited {:?})", gateway.wait);
                return error_response(StatusCode::SERVICE_UNAVAILABLE, &message);
            }
        };
        let stream = match mux.open(encoded.clone()).await {
            Ok(stream) => SharedStream::new(stream),
            Err(reason) if can_retry => {
                info!(%reason, "link lost as the event was sent; retrying once");
                attempt += 1;
                continue;
            }
            Err(reason) => {
                return error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("link lost: {reason}"),
                );
            }
        };
        let progress = Arc::new(Progress::new());
        progress.touch();
        gateway
            .tracker
            .spawn(upload(stream.clone(), body.for_attempt(), progress.clone()));
        let res = tokio::select! {
            res = read_reply_head(&stream) => res,
            _ = stalled(&progress, gateway.timeout + REPLY_GRACE) => {
                stream.reset(ResetCode::Cancel, "the caller stopped waiting for a reply");
                let message = format!("no reply within {:?}", gateway.timeout + REPLY_GRACE);
                return error_response(StatusCode::GATEWAY_TIMEOUT, &message);
            }
        };
        match res {
            Ok((head, rest)) => return respond(head, rest, stream),
            Err(HeadError::Io { err, any }) => {
                let reset = stream.reset_reason();
                let lost = mux.is_closed()
                    || matches!(
                        reset,
                        Some((ResetCode::Cancel | ResetCode::Shutdown | ResetCode::Busy, _))
                    );
                if lost && !any && can_retry {
                    info!(%err, "link lost while the event was in flight; retrying once");
                    attempt += 1;
                    continue;
                }
                return match reset {
                    Some((ResetCode::Refused, reason)) => {
                        error_response(StatusCode::FORBIDDEN, &reason)
                    }
                    Some((ResetCode::NoSuchKite, reason)) => {
                        error_response(StatusCode::NOT_FOUND, &reason)
                    }
                    _ if lost => {
                        let hint = if idempotent {
                            ""
                        } else {
                            " (not retried: the request is not idempotent; mark it with X-Kitepipe-Idempotent: 1 if it may run twice)"
                        };
                        error_response(
                            StatusCode::SERVICE_UNAVAILABLE,
                            &format!(
                                "the link was lost while the event was in flight: {err}{hint}"
                            ),
                        )
                    }
                    _ => error_response(StatusCode::BAD_GATEWAY, &format!("event failed: {err}")),
                };
            }
            Err(HeadError::Eof) => {
                return error_response(
                    StatusCode::BAD_GATEWAY,
                    "the other side ended the event without a reply",
                );
            }
            Err(HeadError::Malformed(err)) => {
                stream.reset(ResetCode::ProtocolError, "malformed reply head");
                return error_response(StatusCode::BAD_GATEWAY, &err.to_string());
            }
        }
    }
}

/// The HTTP response for a reply head; the body streams from the event.
fn respond(head: ReplyHead, rest: Bytes, stream: SharedStream) -> Response<GatewayBody> {
    let status = StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = Response::new(EventBody::new(rest, stream).boxed_unsync());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if let Some(value) = head
        .content_type
        .and_then(|ct| HeaderValue::from_str(&ct).ok())
    {
        headers.insert(CONTENT_TYPE, value);
    }
    for (name, value) in &head.headers {
        if HOP_BY_HOP.contains(&name.as_str()) || name == "content-type" {
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.append(name, value);
        }
    }
    if let Some(code) = head.code {
        headers.insert("x-kitepipe-code", HeaderValue::from(code));
    }
    response
}

/// Sends the request body on the event stream, then FIN. A failed request
/// body (the client went away) resets the event so the handler stops.
async fn upload(stream: SharedStream, body: UploadBody, progress: Arc<Progress>) {
    let res: io::Result<()> = async {
        match body {
            UploadBody::Replayable(bytes) => {
                if !bytes.is_empty() {
                    stream.send(bytes).await?;
                }
            }
            UploadBody::Streaming(None) => {}
            UploadBody::Streaming(Some(mut incoming)) => {
                while let Some(frame) = incoming.frame().await {
                    let frame = frame.map_err(io::Error::other)?;
                    if let Ok(data) = frame.into_data() {
                        progress.touch();
                        stream.send(data).await?;
                        progress.touch();
                    }
                }
            }
        }
        stream.finish().await
    }
    .await;
    if let Err(err) = res {
        debug!(%err, stream = stream.id(), "event upload ended early");
        stream.reset(ResetCode::Cancel, "the request body was cut");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_pass() {
        for host in [
            "localhost",
            "LOCALHOST:8089",
            "127.0.0.1",
            "127.0.0.1:8089",
            "127.9.8.7:1",
            "[::1]",
            "[::1]:8089",
        ] {
            assert!(loopback_host(host), "{host}");
        }
        for host in [
            "attacker.example",
            "attacker.example:8089",
            "127.0.0.1.attacker.example",
            "localhost.attacker.example",
            "x",
            "",
            "10.0.0.1:8089",
            "[::2]:8089",
            "[::1]x",
            "[::1]8089",
            "127.0.0.1:",
            "127.0.0.1:80:80",
            "localhost:http",
            "0.0.0.0:8089",
        ] {
            assert!(!loopback_host(host), "{host}");
        }
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"ab"));
        assert!(!same_secret(b"", b"a"));
    }

    #[test]
    fn token_files_are_private_and_fresh() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("kitepipe-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let file = dir.join("state").join("gateway-token");
        let first = write_token(&file).unwrap();
        assert_eq!(first.len(), 2 * TOKEN_BYTES);
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(file.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o077, 0);
        // A loose earlier file is replaced by a private one.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let second = write_token(&file).unwrap();
        assert_ne!(first, second);
        assert_eq!(
            std::fs::read_to_string(&file).unwrap().trim(),
            second.as_str()
        );
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
