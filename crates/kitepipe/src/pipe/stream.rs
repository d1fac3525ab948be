//! One event stream, shared by the task that sends and the task (or hyper
//! body) that receives, and the bodies built on it.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame};
use kitepipe_proto::event::{self, ReplyHead, ReplyHeadError};

use super::Progress;
use crate::link::SharedStream;

/// A body read from an event stream (after `prefix`, bytes already read):
/// the request body on the handler's side, the reply body on the caller's.
pub(crate) struct EventBody {
    prefix: Bytes,
    stream: Option<SharedStream>,
    progress: Option<Arc<Progress>>,
}

impl EventBody {
    pub(crate) fn new(prefix: Bytes, stream: SharedStream) -> EventBody {
        EventBody {
            prefix,
            stream: Some(stream),
            progress: None,
        }
    }

    /// Yields `prefix` before everything not yet read.
    pub(crate) fn with_prefix(mut self, prefix: Bytes) -> EventBody {
        if self.prefix.is_empty() {
            self.prefix = prefix;
        } else {
            let mut joined = BytesMut::from(&prefix[..]);
            joined.extend_from_slice(&self.prefix);
            self.prefix = joined.freeze();
        }
        self
    }

    /// Records progress on every chunk read.
    pub(crate) fn with_progress(mut self, progress: Arc<Progress>) -> EventBody {
        self.progress = Some(progress);
        self
    }

    /// The next chunk; `None` at the end. Cancel-safe.
    pub(crate) async fn chunk(&mut self) -> io::Result<Option<Bytes>> {
        std::future::poll_fn(|cx| self.poll_chunk(cx)).await
    }

    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !self.prefix.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.prefix))));
        }
        let Some(stream) = &self.stream else {
            return Poll::Ready(Ok(None));
        };
        let res = std::task::ready!(stream.poll_recv(cx));
        match &res {
            Ok(Some(_)) => {
                if let Some(progress) = &self.progress {
                    progress.touch();
                }
            }
            Ok(None) => self.stream = None,
            Err(_) => self.stream = None,
        }
        Poll::Ready(res)
    }
}

impl Body for EventBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        match std::task::ready!(this.poll_chunk(cx)) {
            Ok(Some(data)) => Poll::Ready(Some(Ok(Frame::data(data)))),
            Ok(None) => Poll::Ready(None),
            Err(err) => Poll::Ready(Some(Err(err))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.stream.is_none()
    }
}

/// Why no reply head could be read.
#[derive(Debug)]
pub(crate) enum HeadError {
    /// The stream failed (reset or link lost); `any` tells whether any
    /// reply byte had arrived.
    Io {
        /// The failure.
        err: io::Error,
        /// Whether part of a reply had arrived.
        any: bool,
    },
    /// The stream ended before a whole head.
    Eof,
    /// The head is malformed or too large.
    Malformed(ReplyHeadError),
}

/// Reads a reply head; returns it and the body bytes read after it.
/// Cancel-safe only as a whole (drop it and the stream together).
pub(crate) async fn read_reply_head(
    stream: &SharedStream,
) -> Result<(ReplyHead, Bytes), HeadError> {
    let mut buf = BytesMut::new();
    loop {
        match event::decode_reply_head(&buf) {
            Ok(Some((head, used))) => {
                let _ = buf.split_to(used);
                return Ok((head, buf.freeze()));
            }
            Ok(None) => {}
            Err(err) => return Err(HeadError::Malformed(err)),
        }
        match stream.recv().await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
            Ok(None) => return Err(HeadError::Eof),
            Err(err) => {
                return Err(HeadError::Io {
                    err,
                    any: !buf.is_empty(),
                });
            }
        }
    }
}
