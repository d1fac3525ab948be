//! The handler's side of an event: [`Handlers`] picks who answers
//! (closures registered by library users, executables in the handlers
//! directory, the built-ins `time` and `cat`, then the HTTP upstream) and
//! writes the reply head and body on the stream.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use kitepipe_proto::event::{self, Caller, EventHeader, ReplyHead};
use kitepipe_proto::frame::ResetCode;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug};

use super::stream::EventBody;
use super::{PipeError, exec, upstream};
use crate::config::{EventConfig, UpstreamUrl};
use crate::link::MuxStream;
use crate::link::SharedStream;

/// Content type of JSON replies (the default format of events).
pub(crate) const JSON: &str = "application/json";

/// Content type of `cat` replies without a request body.
const TEXT: &str = "text/plain; charset=utf-8";

/// Handler executables running at once on one node; further events wait
/// for a slot. Each costs a process and three pipes; the bound keeps a
/// burst of events from exhausting processes or descriptors.
pub(crate) const MAX_RUNNING_EXECUTABLES: usize = 256;

/// Who answers events on this node. Cheap to share; closures may be
/// registered at any time, also while the node runs.
///
/// ```
/// use kitepipe::config::EventConfig;
/// use kitepipe::pipe::{Handlers, Reply};
///
/// let handlers = Handlers::new("laptop", &EventConfig::default());
/// handlers
///     .register("get_hello", |event| async move {
///         Reply::json(&format!("hello {}", event.caller.node))
///     })
///     .unwrap();
/// assert!(handlers.register("../etc", |_| async { Reply::text("no") }).is_err());
/// ```
pub struct Handlers {
    /// This node's name (handlers see it as `KITEPIPE_NODE`).
    node: String,
    /// Directory of handler executables.
    dir: Option<PathBuf>,
    /// Local HTTP server for events nothing else handles.
    upstream: Option<UpstreamUrl>,
    /// How long a handler may go without progress.
    pub(crate) timeout: Duration,
    /// The environment executables start with.
    pub(crate) env: Vec<(String, String)>,
    closures: RwLock<HashMap<String, Closure>>,
    /// Bounds executables running at once.
    pub(crate) exec_slots: Semaphore,
    /// Events waiting for a slot (bounded by `exec::MAX_QUEUED_EXECUTABLES`).
    pub(crate) exec_queued: std::sync::atomic::AtomicUsize,
    /// Cancelled when the node shuts down: running handlers are stopped
    /// (executables killed) and their events reset.
    shutdown: CancellationToken,
}

type Closure =
    Arc<dyn Fn(EventRequest) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync>;

/// An event as a handler sees it.
pub struct EventRequest {
    /// Handler name, e.g. `get_time_utc`.
    pub name: String,
    /// HTTP method, e.g. `GET`.
    pub method: String,
    /// Path after the route, percent-encoded, e.g. `/cat//hello%20/world`.
    pub path: String,
    /// Arguments (after `//` in the path).
    pub args: Vec<String>,
    /// Query string without `?`.
    pub query: String,
    /// Request headers that travelled with the event (lowercase names).
    pub headers: Vec<(String, String)>,
    /// Who called.
    pub caller: Caller,
    /// The request body, streamed from the caller.
    pub body: RequestBody,
}

impl EventRequest {
    /// The first header named `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// A request body arriving over the link. Reading it grants the caller
/// window to send more, so a handler that reads slowly slows the caller.
pub struct RequestBody(pub(crate) EventBody);

impl RequestBody {
    /// The next chunk, `None` at the end. Cancel-safe.
    pub async fn chunk(&mut self) -> io::Result<Option<Bytes>> {
        self.0.chunk().await
    }

    /// The whole body, refusing more than `limit` bytes.
    pub async fn bytes(mut self, limit: usize) -> io::Result<Bytes> {
        let mut all = BytesMut::new();
        while let Some(chunk) = self.chunk().await? {
            if all.len() + chunk.len() > limit {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("request body larger than {limit} bytes"),
                ));
            }
            all.extend_from_slice(&chunk);
        }
        Ok(all.freeze())
    }
}

/// A handler's answer: status, content type, headers, return code, body.
pub struct Reply {
    pub(crate) head: ReplyHead,
    pub(crate) body: ReplyBody,
}

/// The body of a [`Reply`].
pub enum ReplyBody {
    /// No body.
    Empty,
    /// These bytes.
    Bytes(Bytes),
    /// The request body, streamed back (an echo).
    Request(RequestBody),
    /// Whatever this reader yields, streamed.
    Reader(Pin<Box<dyn AsyncRead + Send>>),
}

impl Reply {
    /// A reply with `status`, `content_type` and `body`.
    pub fn new(status: u16, content_type: &str, body: ReplyBody) -> Reply {
        let mut head = ReplyHead::status(status);
        head.content_type = Some(content_type.to_string());
        Reply { head, body }
    }

    /// 200 with `value` as JSON.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Reply {
        match serde_json::to_vec(value) {
            Ok(json) => Reply::new(200, JSON, ReplyBody::Bytes(Bytes::from(json))),
            Err(err) => Reply::error(500, &format!("reply is not JSON: {err}")),
        }
    }

    /// 200 with `text` as `text/plain`.
    pub fn text(text: impl Into<String>) -> Reply {
        Reply::new(200, TEXT, ReplyBody::Bytes(Bytes::from(text.into())))
    }

    /// An error reply: `status` with `{"error": message}`.
    pub fn error(status: u16, message: &str) -> Reply {
        error_reply(status, message, None, None)
    }

    /// Sets the return code (`X-Kitepipe-Code` for the caller).
    pub fn with_code(mut self, code: i32) -> Reply {
        self.head.code = Some(code);
        self
    }

    /// Adds a response header.
    pub fn with_header(mut self, name: &str, value: &str) -> Reply {
        self.head
            .headers
            .push((name.to_ascii_lowercase(), value.to_string()));
        self
    }
}

/// What a handler executable or upstream failure looks like to the caller.
#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stderr: Option<&'a str>,
}

/// `status` with a JSON body `{"error", "code", "stderr"}`; the head
/// carries the same text.
pub(crate) fn error_reply(
    status: u16,
    message: &str,
    code: Option<i32>,
    stderr: Option<&str>,
) -> Reply {
    let body = ErrorBody {
        error: message,
        code,
        stderr,
    };
    // A struct of strings and numbers always serializes.
    let json = serde_json::to_vec(&body).expect("error bodies serialize");
    let mut head = ReplyHead::status(status);
    head.content_type = Some(JSON.to_string());
    head.code = code;
    head.error = Some(match stderr {
        Some(tail) if !tail.is_empty() => format!("{message}: {}", tail.trim_end()),
        _ => message.to_string(),
    });
    Reply {
        head,
        body: ReplyBody::Bytes(Bytes::from(json)),
    }
}

/// Which kind of handler answers an event.
enum Handler {
    Closure(Closure),
    Exec(PathBuf),
    Builtin(Builtin),
    Upstream(UpstreamUrl),
}

#[derive(Debug, Clone, Copy)]
enum Builtin {
    /// `get_time`, `get_time_utc`: the node's clock as JSON.
    Time,
    /// `get_cat`, `post_cat`, `put_cat`: the arguments concatenated, then
    /// the request body (an echo).
    Cat,
}

impl Handlers {
    /// Handlers of node `node` as `config` sets them up (directory,
    /// upstream, timeout), plus the built-ins.
    pub fn new(node: &str, config: &EventConfig) -> Handlers {
        Handlers {
            node: node.to_string(),
            // Absolute, because executables run with the directory as their
            // working directory.
            dir: config
                .handlers_dir
                .as_ref()
                .map(|dir| std::path::absolute(dir).unwrap_or_else(|_| dir.clone())),
            upstream: config.upstream.clone(),
            timeout: config.timeout,
            env: config.handler_env.clone(),
            closures: RwLock::new(HashMap::new()),
            exec_slots: Semaphore::new(MAX_RUNNING_EXECUTABLES),
            exec_queued: std::sync::atomic::AtomicUsize::new(0),
            shutdown: CancellationToken::new(),
        }
    }

    /// Stops every running handler (the node is shutting down).
    pub(crate) fn shut_down(&self) {
        self.shutdown.cancel();
    }

    /// Registers `handler` for events named `name` (e.g. `get_hello` for
    /// `GET .../hello`); it takes precedence over every other kind.
    pub fn register<F, Fut>(&self, name: &str, handler: F) -> Result<(), PipeError>
    where
        F: Fn(EventRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Reply> + Send + 'static,
    {
        if !event::is_handler_name(name) {
            return Err(PipeError::BadName(name.to_string()));
        }
        let closure: Closure = Arc::new(move |request| Box::pin(handler(request)));
        self.closures
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(name.to_string(), closure);
        Ok(())
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Who answers `name` (already validated as a handler name, so it is
    /// a plain file name: the join below cannot leave the directory).
    async fn resolve(&self, name: &str) -> Option<Handler> {
        let closure = self
            .closures
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(name)
            .cloned();
        if let Some(closure) = closure {
            return Some(Handler::Closure(closure));
        }
        if let Some(dir) = &self.dir {
            let path = dir.join(name);
            if let Ok(meta) = tokio::fs::metadata(&path).await {
                use std::os::unix::fs::PermissionsExt;
                if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                    return Some(Handler::Exec(path));
                }
            }
        }
        let builtin = match name {
            "get_time" | "get_time_utc" => Some(Builtin::Time),
            "get_cat" | "post_cat" | "put_cat" => Some(Builtin::Cat),
            _ => None,
        };
        if let Some(builtin) = builtin {
            return Some(Handler::Builtin(builtin));
        }
        self.upstream.clone().map(Handler::Upstream)
    }
}

impl std::fmt::Debug for Handlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handlers")
            .field("node", &self.node)
            .field("dir", &self.dir)
            .field("upstream", &self.upstream)
            .finish()
    }
}

/// Writes one event's reply on its stream.
pub(crate) struct ReplyWriter {
    stream: SharedStream,
    head_sent: bool,
    /// Longest wait for the caller to take a chunk.
    timeout: Duration,
}

impl ReplyWriter {
    pub(crate) fn new(stream: SharedStream, timeout: Duration) -> ReplyWriter {
        ReplyWriter {
            stream,
            head_sent: false,
            timeout,
        }
    }

    /// The event's stream (to watch for the caller going away).
    pub(crate) fn stream(&self) -> SharedStream {
        self.stream.clone()
    }

    /// Sends the reply head.
    pub(crate) async fn head(&mut self, head: &ReplyHead) -> io::Result<()> {
        self.head_sent = true;
        self.data(event::encode_reply_head(head)).await
    }

    /// Sends body bytes, waiting (up to the timeout) for the caller to
    /// take them: this is where backpressure reaches a handler.
    pub(crate) async fn data(&mut self, data: Bytes) -> io::Result<()> {
        match tokio::time::timeout(self.timeout, self.stream.send(data)).await {
            Ok(res) => res,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the caller took no reply bytes for the event timeout",
            )),
        }
    }

    /// Ends the reply (FIN).
    pub(crate) async fn finish(self) -> io::Result<()> {
        self.stream.finish().await
    }

    /// Aborts the reply: the caller sees a cut response, never a complete
    /// looking one.
    pub(crate) fn abort(self, reason: &str) {
        debug!(%reason, "event reply aborted");
        self.stream.reset(ResetCode::Cancel, reason);
    }

    /// Sends a whole reply; aborts if its body fails midway.
    pub(crate) async fn reply(mut self, reply: Reply) {
        if self.head_sent {
            self.abort("handler replied twice");
            return;
        }
        let res = async {
            self.head(&reply.head).await?;
            match reply.body {
                ReplyBody::Empty => {}
                ReplyBody::Bytes(bytes) => {
                    if !bytes.is_empty() {
                        self.data(bytes).await?;
                    }
                }
                ReplyBody::Request(mut body) => {
                    while let Some(chunk) = body.chunk().await? {
                        self.data(chunk).await?;
                    }
                }
                ReplyBody::Reader(mut reader) => loop {
                    let mut buf = BytesMut::with_capacity(64 * 1024);
                    if reader.read_buf(&mut buf).await? == 0 {
                        break;
                    }
                    self.data(buf.freeze()).await?;
                },
            }
            io::Result::Ok(())
        }
        .await;
        match res {
            Ok(()) => {
                let _ = self.finish().await;
            }
            Err(err) => self.abort(&format!("reply body failed: {err}")),
        }
    }
}

/// Answers one event that arrived on `stream`: validates it, runs its
/// handler, writes the reply, then reads what is left of the request.
pub(crate) async fn serve_event(
    stream: MuxStream,
    header: EventHeader,
    caller: Caller,
    handlers: Arc<Handlers>,
) {
    let span = tracing::debug_span!("event", name = %header.name, caller = %caller.node, stream = stream.id());
    let stream = SharedStream::new(stream);
    let shutdown = handlers.shutdown.clone();
    let work = async {
        debug!("event received");
        let timeout = handlers.timeout;
        let out = ReplyWriter::new(stream.clone(), timeout);
        // The path as it was checked (validate() parsed it to this very
        // name and these arguments), rebuilt from them: an upstream gets
        // exactly that, never a peer's spelling of it.
        let path = match header.validate() {
            Ok(canonical) => canonical,
            Err(err) => {
                out.reply(Reply::error(400, &err.to_string())).await;
                stream.drain(timeout).await;
                return;
            }
        };
        let request = EventRequest {
            name: header.name,
            method: header.method,
            path,
            args: header.args,
            query: header.query,
            // Whatever a peer put in X-Kitepipe-* is dropped: only this
            // node describes the event (from `caller`, which the relay
            // fills in from the calling link).
            headers: header
                .headers
                .into_iter()
                .filter(|(name, _)| !super::is_own_header(name))
                .collect(),
            caller,
            body: RequestBody(EventBody::new(Bytes::new(), stream.clone())),
        };
        match handlers.resolve(&request.name).await {
            None => {
                let message = format!("no handler {} on node {}", request.name, handlers.node);
                out.reply(Reply::error(404, &message)).await;
            }
            Some(Handler::Closure(closure)) => {
                let name = request.name.clone();
                match tokio::time::timeout(timeout, closure(request)).await {
                    Ok(reply) => out.reply(reply).await,
                    Err(_) => {
                        let message = format!("handler {name} did not answer within {timeout:?}");
                        out.reply(Reply::error(504, &message)).await;
                    }
                }
            }
            Some(Handler::Builtin(builtin)) => {
                out.reply(run_builtin(builtin, request, &handlers)).await
            }
            Some(Handler::Exec(path)) => exec::run(path, request, out, &handlers).await,
            Some(Handler::Upstream(url)) => upstream::run(&url, request, out, &handlers).await,
        }
        stream.drain(timeout).await;
        debug!("event done");
    };
    let stopped = async {
        tokio::select! {
            _ = work => {}
            _ = shutdown.cancelled() => {
                stream.reset(ResetCode::Shutdown, "the node is shutting down");
            }
        }
    };
    stopped.instrument(span).await;
}

/// Answers an event that will not reach a handler (refused, unknown or
/// offline node) with `status` and a JSON error, then reads what is left
/// of the request.
pub(crate) async fn reply_error(stream: MuxStream, status: u16, message: &str, idle: Duration) {
    let stream = SharedStream::new(stream);
    ReplyWriter::new(stream.clone(), idle)
        .reply(Reply::error(status, message))
        .await;
    stream.drain(idle).await;
}

/// The node's clock, as `time` answers it.
#[derive(Serialize)]
struct TimeReply<'a> {
    /// RFC 3339, UTC, milliseconds.
    time: String,
    /// Seconds since the Unix epoch.
    unix: f64,
    /// The answering node.
    node: &'a str,
}

fn run_builtin(builtin: Builtin, request: EventRequest, handlers: &Handlers) -> Reply {
    match builtin {
        Builtin::Time => {
            let now = SystemTime::now();
            let unix = now
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            Reply::json(&TimeReply {
                time: humantime::format_rfc3339_millis(now).to_string(),
                unix,
                node: &handlers.node,
            })
        }
        Builtin::Cat => {
            let joined: String = request.args.concat();
            let content_type = request
                .header("content-type")
                .map(str::to_string)
                .unwrap_or_else(|| TEXT.to_string());
            if joined.is_empty() {
                Reply::new(200, &content_type, ReplyBody::Request(request.body))
            } else {
                let prefix = Bytes::from(joined);
                let body = request.body.0;
                Reply::new(
                    200,
                    &content_type,
                    ReplyBody::Request(RequestBody(body.with_prefix(prefix))),
                )
            }
        }
    }
}
