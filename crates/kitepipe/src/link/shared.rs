//! A [`MuxStream`] shared by the task that sends and the task that
//! receives (event bodies, remote operation records).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use kitepipe_proto::frame::ResetCode;

use super::MuxStream;

/// Most bytes taken from a stream per read: one DATA frame.
const RECV_CHUNK: usize = 64 * 1024;

/// A [`MuxStream`] shared between its sending and receiving halves. The
/// stream keeps separate wakers per direction, so two tasks may wait on it
/// at once; the lock is held only inside one poll. The stream is dropped
/// (and reset, if unfinished) when the last clone goes.
#[derive(Clone)]
pub(crate) struct SharedStream(Arc<Mutex<MuxStream>>);

impl SharedStream {
    pub(crate) fn new(stream: MuxStream) -> SharedStream {
        SharedStream(Arc::new(Mutex::new(stream)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MuxStream> {
        crate::sync::lock(&self.0)
    }

    /// The stream id, for logs.
    pub(crate) fn id(&self) -> u32 {
        self.lock().id()
    }

    pub(crate) fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        self.lock().poll_recv_chunk(cx, RECV_CHUNK)
    }

    /// The next received chunk; `None` at FIN. Cancel-safe.
    pub(crate) async fn recv(&self) -> io::Result<Option<Bytes>> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Sends all of `data`, waiting for window credit. Not cancel-safe
    /// (part of `data` may have been sent).
    pub(crate) async fn send(&self, mut data: Bytes) -> io::Result<()> {
        while !data.is_empty() {
            std::future::poll_fn(|cx| self.lock().poll_send_chunk(cx, &mut data)).await?;
        }
        Ok(())
    }

    /// Sends FIN.
    pub(crate) async fn finish(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| {
            let mut stream = self.lock();
            tokio::io::AsyncWrite::poll_shutdown(Pin::new(&mut *stream), cx)
        })
        .await
    }

    /// Aborts the stream both ways.
    pub(crate) fn reset(&self, code: ResetCode, reason: &str) {
        self.lock().reset(code, reason);
    }

    /// The peer's reset, if it reset the stream.
    pub(crate) fn reset_reason(&self) -> Option<(ResetCode, String)> {
        self.lock().reset_reason()
    }

    /// The stream itself, if this is the last handle on it.
    pub(crate) fn into_inner(self) -> Option<MuxStream> {
        Arc::try_unwrap(self.0)
            .ok()
            .map(|mutex| mutex.into_inner().unwrap_or_else(|p| p.into_inner()))
    }

    /// Reads and discards until FIN, an error, or `idle` without a byte:
    /// after an early reply, so the peer's FIN (not a reset that would
    /// discard the reply) ends the stream.
    pub(crate) async fn drain(&self, idle: Duration) {
        loop {
            match tokio::time::timeout(idle, self.recv()).await {
                Ok(Ok(Some(_))) => {}
                _ => return,
            }
        }
    }
}
