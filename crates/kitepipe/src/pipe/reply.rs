//! What a handler gives back: a [`Reply`] (head and body), the JSON error
//! replies every handler kind shares, and the [`ReplyWriter`] that puts a
//! reply on the event's stream.

use std::io;
use std::pin::Pin;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kitepipe_proto::event::{self, ReplyHead};
use kitepipe_proto::frame::ResetCode;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt};
use tracing::debug;

use super::request::RequestBody;
use crate::link::SharedStream;

/// Content type of JSON replies (the default format of events).
pub(crate) const JSON: &str = "application/json";

/// Content type of `cat` replies without a request body.
pub(crate) const TEXT: &str = "text/plain; charset=utf-8";

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
