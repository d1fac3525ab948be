//! Handler executables: a file named like the event in `--handlers DIR`,
//! run with the arguments as argv (never through a shell), the request
//! body on stdin and the event in `KITEPIPE_*` environment variables. Its
//! stdout is the reply body, its exit status the return code.
//!
//! The reply head must go out before the body, but the exit status is
//! known only at the end. So up to [`HOLD_BACK`] bytes of output are held
//! until the handler exits: a handler that fails early gets a clean 500
//! with its exit code and stderr tail. Past that the reply is 200 and
//! streams; a handler that then fails or stalls gets its reply aborted,
//! so the caller never mistakes a cut body for a complete one.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use kitepipe_proto::event::ReplyHead;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;
use tracing::{debug, info};

use super::reply::{JSON, Reply, ReplyWriter, error_reply};
use super::request::{EventRequest, RequestBody};
use super::{Progress, is_own_header, stalled};
use crate::link::SharedStream;

/// Handler executables running at once on one node; further events wait
/// for a slot. Each costs a process and three pipes; the bound keeps a
/// burst of events from exhausting processes or descriptors.
pub(crate) const MAX_RUNNING_EXECUTABLES: usize = 256;

/// Output held back until the handler exits (see the module docs). Small
/// replies, the common case, get an exact status; larger ones stream.
pub(crate) const HOLD_BACK: usize = 64 * 1024;

/// Bytes of stderr kept for the error reply: enough for a traceback's end.
pub(crate) const STDERR_TAIL: usize = 4 * 1024;

/// Longest first line that can set the content type.
const CONTENT_TYPE_LINE_MAX: usize = 1024;

/// How long stderr may keep arriving after the handler exited before the
/// tail is taken as it is (a grandchild may hold stderr open).
const STDERR_SETTLE: Duration = Duration::from_millis(500);

/// Events waiting for an executable slot at once (beyond
/// [`MAX_RUNNING_EXECUTABLES`]): a burst of as many again as can run waits
/// (each waiting event costs a task and a stream, no process); past that
/// the caller gets 503 with `Retry-After` at once instead of a wait that
/// would outlast its own deadline.
pub(crate) const MAX_QUEUED_EXECUTABLES: usize = 256;

/// `Retry-After` (seconds) on a 503 for a full handler queue: handlers
/// are short-lived, a second frees slots.
const RETRY_AFTER_SECS: &str = "1";

/// How often a waiting or running handler's event is checked for a caller
/// that went away: short against any event timeout, and a check is one
/// lock of the stream.
const CALLER_CHECK: Duration = Duration::from_millis(100);

/// The output prefix that sets the reply's content type.
const CONTENT_TYPE_PREFIX: &[u8] = b"content-type:";

/// What running handler executables takes from its node: the environment
/// they start with, the event timeout and the slots that bound them.
pub(crate) struct Executables {
    /// This node's name (handlers see it as `KITEPIPE_NODE`).
    node: String,
    /// The environment executables start with.
    env: Vec<(String, String)>,
    /// How long a handler may go without progress.
    timeout: Duration,
    /// Bounds executables running at once.
    slots: Semaphore,
    /// Events waiting for a slot (bounded by [`MAX_QUEUED_EXECUTABLES`]).
    queued: AtomicUsize,
}

impl Executables {
    /// Executables of node `node`, started with `env`, each given
    /// `timeout` without progress.
    pub(crate) fn new(node: &str, env: Vec<(String, String)>, timeout: Duration) -> Executables {
        Executables {
            node: node.to_string(),
            env,
            timeout,
            slots: Semaphore::new(MAX_RUNNING_EXECUTABLES),
            queued: AtomicUsize::new(0),
        }
    }
}

/// Runs the executable at `path` for `request` and writes its reply.
pub(crate) async fn run(
    path: PathBuf,
    request: EventRequest,
    out: ReplyWriter,
    executables: &Executables,
) {
    let watch = out.stream();
    let _slot = match wait_for_slot(executables, &watch).await {
        Ok(slot) => slot,
        Err(Some(reply)) => {
            out.reply(reply).await;
            return;
        }
        // The caller is gone: nothing runs, nobody to answer.
        Err(None) => return,
    };
    let name = request.name.clone();
    let mut command = Command::new(&path);
    command
        .args(&request.args)
        .env_clear()
        .envs(
            executables
                .env
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        )
        .envs(event_env(&request, &executables.node))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a stalled handler is stopped with
        // everything it started.
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = path.parent() {
        command.current_dir(dir);
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => {
            info!(handler = %name, %err, "cannot run handler executable");
            let message = format!("cannot run handler {name}: {err}");
            out.reply(error_reply(500, &message, None, None)).await;
            return;
        }
    };
    let stdin = child.stdin.take();
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        // Both were asked for as pipes just above.
        out.reply(error_reply(500, "handler pipes missing", None, None))
            .await;
        return;
    };
    let progress = Progress::new();
    progress.touch();
    let tail = Arc::new(Mutex::new(Tail::default()));
    let outcome = {
        let pump = pump_stdin(request.body, stdin, &progress);
        let errs = collect_stderr(stderr, tail.clone());
        let main = drive(
            &mut child,
            stdout,
            out,
            &progress,
            executables.timeout,
            &name,
        );
        tokio::pin!(pump, errs, main);
        let (mut pump_done, mut errs_done) = (false, false);
        let outcome = loop {
            tokio::select! {
                outcome = &mut main => break Some(outcome),
                _ = &mut pump, if !pump_done => pump_done = true,
                _ = &mut errs, if !errs_done => errs_done = true,
                _ = caller_gone(&watch) => break None,
            }
        };
        if outcome.as_ref().is_some_and(Option::is_some) && !errs_done {
            let _ = tokio::time::timeout(STDERR_SETTLE, &mut errs).await;
        }
        outcome
    };
    let Some(outcome) = outcome else {
        debug!(handler = %name, "the caller went away; stopping the handler");
        kill_group(&mut child).await;
        return;
    };
    let Some((out, failure)) = outcome else {
        return;
    };
    let tail = tail.lock().unwrap_or_else(|p| p.into_inner()).text();
    let reply = match failure {
        Failure::Exited(status) => {
            let (code, message) = describe_exit(&name, status);
            error_reply(500, &message, code, Some(&tail))
        }
        Failure::Stalled(timeout) => {
            kill_group(&mut child).await;
            let message = format!("handler {name} made no progress for {timeout:?}; stopped");
            error_reply(504, &message, None, Some(&tail))
        }
    };
    out.reply(reply).await;
}

/// Waits for an executable slot: at once if one is free, else in the
/// queue (at most [`MAX_QUEUED_EXECUTABLES`] events) until one frees, the
/// event timeout passes (503 with `Retry-After`) or the caller goes away
/// (`Err(None)`: the event is dropped, never run). Cancel-safe.
async fn wait_for_slot<'a>(
    executables: &'a Executables,
    watch: &SharedStream,
) -> Result<SemaphorePermit<'a>, Option<Reply>> {
    if stream_reset(watch) {
        return Err(None);
    }
    if let Ok(slot) = executables.slots.try_acquire() {
        return Ok(slot);
    }
    let busy = |why: &str| Reply::error(503, why).with_header("retry-after", RETRY_AFTER_SECS);
    let Some(_queued) = QueueSeat::take(&executables.queued) else {
        debug!("handler queue full; refusing the event");
        return Err(Some(busy(&format!(
            "{MAX_RUNNING_EXECUTABLES} handlers are running and {MAX_QUEUED_EXECUTABLES} \
             events wait for them: try again later"
        ))));
    };
    let deadline = Instant::now() + executables.timeout;
    tokio::select! {
        slot = executables.slots.acquire() => {
            // The semaphore is never closed.
            Ok(slot.expect("executable slots are never closed"))
        }
        _ = tokio::time::sleep_until(deadline) => Err(Some(busy(&format!(
            "no handler slot freed within {:?}: try again later",
            executables.timeout
        )))),
        _ = caller_gone(watch) => {
            debug!("the caller went away while its event waited for a handler slot");
            Err(None)
        }
    }
}

/// A place in the handler queue, given back on drop.
struct QueueSeat<'a>(&'a AtomicUsize);

impl<'a> QueueSeat<'a> {
    /// A seat, unless [`MAX_QUEUED_EXECUTABLES`] are taken.
    fn take(queued: &'a AtomicUsize) -> Option<QueueSeat<'a>> {
        queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_QUEUED_EXECUTABLES).then_some(n + 1)
            })
            .ok()
            .map(|_| QueueSeat(queued))
    }
}

impl Drop for QueueSeat<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Returns once the caller has reset the event (it hung up, or its
/// gateway gave up waiting). The stream cannot signal a reset without
/// reading the request body (which the handler must get), so this looks
/// every [`CALLER_CHECK`]. Cancel-safe.
async fn caller_gone(stream: &SharedStream) {
    loop {
        if stream_reset(stream) {
            return;
        }
        tokio::time::sleep(CALLER_CHECK).await;
    }
}

/// True once the caller has reset the event.
fn stream_reset(stream: &SharedStream) -> bool {
    stream.reset_reason().is_some()
}

/// Why a handler failed before its reply began.
enum Failure {
    Exited(ExitStatus),
    Stalled(Duration),
}

/// Reads stdout and writes the reply. Returns the writer and the failure
/// when the reply has not begun (the caller writes the error with the
/// stderr tail); `None` once the reply is written or aborted.
async fn drive(
    child: &mut Child,
    mut stdout: impl AsyncRead + Unpin,
    mut out: ReplyWriter,
    progress: &Progress,
    timeout: Duration,
    name: &str,
) -> Option<(ReplyWriter, Failure)> {
    let mut held = BytesMut::new();
    let eof = loop {
        if held.len() >= HOLD_BACK {
            break false;
        }
        held.reserve(16 * 1024);
        tokio::select! {
            res = stdout.read_buf(&mut held) => match res {
                Ok(0) | Err(_) => break true,
                Ok(_) => progress.touch(),
            },
            _ = stalled(progress, timeout) => return Some((out, Failure::Stalled(timeout))),
        }
    };
    if eof {
        let status = match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(status)) => status,
            _ => return Some((out, Failure::Stalled(timeout))),
        };
        if !status.success() {
            return Some((out, Failure::Exited(status)));
        }
        let head = ok_head(&mut held);
        let res = async {
            out.head(&head).await?;
            if !held.is_empty() {
                out.data(held.freeze()).await?;
            }
            io::Result::Ok(())
        }
        .await;
        match res {
            Ok(()) => {
                let _ = out.finish().await;
            }
            Err(err) => out.abort(&format!("reply failed: {err}")),
        }
        return None;
    }
    // More output than can be held: the reply is 200 and streams.
    let head = ok_head(&mut held);
    let streamed = async {
        out.head(&head).await?;
        out.data(held.freeze()).await?;
        loop {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            tokio::select! {
                res = stdout.read_buf(&mut buf) => {
                    if res? == 0 {
                        break;
                    }
                    progress.touch();
                    out.data(buf.freeze()).await?;
                }
                _ = stalled(progress, timeout) => {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, format!("handler made no progress for {timeout:?}")));
                }
            }
        }
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(io::Error::other(describe_exit(name, status).1)),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "handler closed its output but did not exit")),
        }
    }
    .await;
    match streamed {
        Ok(()) => {
            let _ = out.finish().await;
        }
        Err(err) => {
            debug!(handler = %name, %err, "handler failed after its reply began");
            kill_group(child).await;
            out.abort(&format!(
                "handler {name} failed after its reply began: {err}"
            ));
        }
    }
    None
}

/// The 200 head, taking a leading `Content-Type: ...` line from `held`.
fn ok_head(held: &mut BytesMut) -> ReplyHead {
    let mut head = ReplyHead::status(200);
    head.content_type = Some(take_content_type(held).unwrap_or_else(|| JSON.to_string()));
    head.code = Some(0);
    head
}

/// If the output starts with a `Content-Type: VALUE` line, removes it and
/// returns the value.
pub(crate) fn take_content_type(held: &mut BytesMut) -> Option<String> {
    let prefix = held.get(..CONTENT_TYPE_PREFIX.len())?;
    if !prefix.eq_ignore_ascii_case(CONTENT_TYPE_PREFIX) {
        return None;
    }
    let end = held
        .iter()
        .take(CONTENT_TYPE_LINE_MAX)
        .position(|b| *b == b'\n')?;
    let value = std::str::from_utf8(&held[CONTENT_TYPE_PREFIX.len()..end])
        .ok()?
        .trim();
    if value.is_empty() || !value.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
        return None;
    }
    let value = value.to_string();
    held.advance(end + 1);
    Some(value)
}

/// Exit code (if any) and a sentence for a failed handler.
fn describe_exit(name: &str, status: ExitStatus) -> (Option<i32>, String) {
    match (status.code(), status.signal()) {
        (Some(code), _) => (
            Some(code),
            format!("handler {name} exited with code {code}"),
        ),
        (None, Some(signal)) => (
            None,
            format!("handler {name} was killed by signal {signal}"),
        ),
        (None, None) => (None, format!("handler {name} failed")),
    }
}

/// Stops a handler and its process group.
async fn kill_group(child: &mut Child) {
    // The group id is the handler's pid (process_group(0) above). The
    // signal goes by syscall: no `kill` executable is needed (slim
    // containers have none), and none on PATH is trusted.
    let group = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = group {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// Feeds the request body to the handler's stdin, then closes it.
async fn pump_stdin(mut body: RequestBody, stdin: Option<ChildStdin>, progress: &Progress) {
    let Some(mut stdin) = stdin else { return };
    while let Ok(Some(chunk)) = body.chunk().await {
        progress.touch();
        if stdin.write_all(&chunk).await.is_err() {
            // The handler closed stdin: it wants no more of the body.
            return;
        }
        progress.touch();
    }
}

/// The last [`STDERR_TAIL`] bytes of stderr.
#[derive(Default)]
struct Tail(Vec<u8>);

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
        if self.0.len() > STDERR_TAIL {
            let cut = self.0.len() - STDERR_TAIL;
            self.0.drain(..cut);
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

async fn collect_stderr(mut stderr: impl AsyncRead + Unpin, tail: Arc<Mutex<Tail>>) {
    let mut buf = [0u8; 4096];
    loop {
        match stderr.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => tail
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(&buf[..n]),
        }
    }
}

/// The `KITEPIPE_*` variables describing an event: the travelling headers
/// as `KITEPIPE_HEADER_*` (never a caller's X-Kitepipe-*), then this
/// node's own description of the event, last.
fn event_env(request: &EventRequest, node: &str) -> Vec<(String, String)> {
    let mut vars = Vec::new();
    for (name, value) in &request.headers {
        if is_own_header(name) {
            continue;
        }
        let key: String = name
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    b.to_ascii_uppercase() as char
                } else {
                    '_'
                }
            })
            .collect();
        vars.push((format!("KITEPIPE_HEADER_{key}"), value.clone()));
    }
    vars.extend([
        ("KITEPIPE_EVENT".to_string(), request.name.clone()),
        ("KITEPIPE_METHOD".to_string(), request.method.clone()),
        ("KITEPIPE_PATH".to_string(), request.path.clone()),
        ("KITEPIPE_QUERY".to_string(), request.query.clone()),
        ("KITEPIPE_CALLER".to_string(), request.caller.node.clone()),
        ("KITEPIPE_NODE".to_string(), node.to_string()),
    ]);
    if let Some(identity) = &request.caller.identity {
        vars.push(("KITEPIPE_CALLER_IDENTITY".to_string(), identity.clone()));
    }
    if let Some(content_type) = request.header("content-type") {
        vars.push((
            "KITEPIPE_CONTENT_TYPE".to_string(),
            content_type.to_string(),
        ));
    }
    vars
}
