//! The handler's side of an event: [`Handlers`] picks who answers
//! (closures registered by library users, executables in the handlers
//! directory, the built-ins `time` and `cat`, then the HTTP upstream) and
//! writes the reply head and body on the stream.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use kitepipe_proto::event::{self, Caller, EventHeader};
use kitepipe_proto::frame::ResetCode;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug};

use super::exec::{self, Executables};
use super::reply::{Reply, ReplyBody, ReplyWriter, TEXT};
use super::request::{EventRequest, RequestBody};
use super::stream::EventBody;
use super::{PipeError, upstream};
use crate::config::{EventConfig, UpstreamUrl};
use crate::link::MuxStream;
use crate::link::SharedStream;
use crate::metrics::{Metrics, Outcome};

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
    timeout: Duration,
    closures: RwLock<HashMap<String, Closure>>,
    /// Runs the executables of the handlers directory (their environment
    /// and the slots that bound them).
    executables: Executables,
    /// Cancelled when the node shuts down: running handlers are stopped
    /// (executables killed) and their events reset.
    shutdown: CancellationToken,
    /// The node's counters, once it hands them over ([`Handlers::count_in`]).
    metrics: std::sync::OnceLock<Metrics>,
}

type Closure =
    Arc<dyn Fn(EventRequest) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync>;

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
            closures: RwLock::new(HashMap::new()),
            executables: Executables::new(node, config.handler_env.clone(), config.timeout),
            shutdown: CancellationToken::new(),
            metrics: std::sync::OnceLock::new(),
        }
    }

    /// Counts the events these handlers answer in `metrics` (the node's).
    pub fn count_in(&self, metrics: Metrics) {
        let _ = self.metrics.set(metrics);
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

/// Answers one event that arrived on `stream`: validates it, runs its
/// handler, writes the reply, then reads what is left of the request.
pub(crate) async fn serve_event(
    stream: MuxStream,
    header: EventHeader,
    caller: Caller,
    handlers: Arc<Handlers>,
) {
    let span = tracing::debug_span!("event", name = %header.name, caller = %caller.node, stream = stream.id());
    let started = tokio::time::Instant::now();
    let (who, what) = (caller.node.clone(), header.name.clone());
    let mut outcome = Outcome::Ok;
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
                outcome = Outcome::Refused;
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
                outcome = Outcome::Refused;
                let message = format!("no handler {} on node {}", request.name, handlers.node);
                out.reply(Reply::error(404, &message)).await;
            }
            Some(Handler::Closure(closure)) => {
                let name = request.name.clone();
                match tokio::time::timeout(timeout, closure(request)).await {
                    Ok(reply) => out.reply(reply).await,
                    Err(_) => {
                        outcome = Outcome::Failed;
                        let message = format!("handler {name} did not answer within {timeout:?}");
                        out.reply(Reply::error(504, &message)).await;
                    }
                }
            }
            Some(Handler::Builtin(builtin)) => {
                out.reply(run_builtin(builtin, request, &handlers)).await
            }
            Some(Handler::Exec(path)) => exec::run(path, request, out, &handlers.executables).await,
            Some(Handler::Upstream(url)) => upstream::run(&url, request, out, timeout).await,
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
    if let Some(metrics) = handlers.metrics.get() {
        metrics.event(&who, &what, outcome, started.elapsed());
    }
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
