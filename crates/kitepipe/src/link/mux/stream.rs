//! One multiplexed stream ([`MuxStream`]): its receive queue and send
//! credit, `AsyncRead` + `AsyncWrite` with half-close, and the reset it
//! sends when dropped unfinished.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use kitepipe_proto::frame::{self, Frame, ResetCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;

use super::{Shared, lock};

pub(super) struct StreamState {
    pub(super) id: u32,
    pub(super) recv: Mutex<RecvState>,
    pub(super) send: Mutex<SendState>,
}

#[derive(Default)]
pub(super) struct RecvState {
    pub(super) queue: VecDeque<Bytes>,
    pub(super) buffered: usize,
    pub(super) fin: bool,
    pub(super) reset: Option<(ResetCode, String)>,
    /// Bytes consumed by the reader and not yet granted back to the peer.
    pub(super) unacked: u32,
    pub(super) waker: Option<Waker>,
}

pub(super) struct SendState {
    pub(super) credit: u64,
    pub(super) fin_sent: bool,
    pub(super) reset: Option<(ResetCode, String)>,
    pub(super) waker: Option<Waker>,
}

/// One multiplexed stream: `AsyncRead` + `AsyncWrite` with half-close.
///
/// Dropping a stream that has not finished both ways resets it, so the
/// peer learns at once and nothing leaks.
pub struct MuxStream {
    state: Arc<StreamState>,
    shared: Arc<Shared>,
    sender: PollSender<Frame>,
}

impl StreamState {
    pub(super) fn wake_all(&self) {
        if let Some(waker) = lock(&self.recv).waker.take() {
            waker.wake();
        }
        if let Some(waker) = lock(&self.send).waker.take() {
            waker.wake();
        }
    }

    pub(super) fn reset(&self, code: ResetCode, reason: String) {
        {
            let mut recv = lock(&self.recv);
            recv.reset.get_or_insert_with(|| (code, reason.clone()));
            recv.queue.clear();
            recv.buffered = 0;
        }
        lock(&self.send).reset.get_or_insert((code, reason));
        self.wake_all();
    }
}

impl MuxStream {
    pub(super) fn new(
        state: Arc<StreamState>,
        shared: Arc<Shared>,
        out: mpsc::Sender<Frame>,
    ) -> MuxStream {
        MuxStream {
            state,
            shared,
            sender: PollSender::new(out),
        }
    }

    /// The stream's id on the link.
    pub fn id(&self) -> u32 {
        self.state.id
    }

    /// Aborts the stream in both directions, telling the peer why.
    pub fn reset(&mut self, code: ResetCode, reason: &str) {
        self.state.reset(code, reason.to_string());
        self.shared.push_urgent(Frame::Reset {
            stream: self.state.id,
            code,
            reason: reason.to_string(),
        });
    }

    /// The peer's reset reason, if the peer reset this stream.
    pub fn reset_reason(&self) -> Option<(ResetCode, String)> {
        lock(&self.state.recv).reset.clone()
    }
}

fn reset_error(code: ResetCode, reason: &str) -> io::Error {
    let kind = match code {
        ResetCode::TargetUnreachable => io::ErrorKind::ConnectionRefused,
        _ => io::ErrorKind::ConnectionReset,
    };
    io::Error::new(
        kind,
        StreamReset {
            code,
            reason: reason.to_string(),
        },
    )
}

/// The error inside an `io::Error` when the peer reset a stream.
#[derive(Debug, Clone, thiserror::Error)]
#[error("stream reset by peer ({code}): {reason}")]
pub struct StreamReset {
    /// The peer's code.
    pub code: ResetCode,
    /// The peer's reason.
    pub reason: String,
}

impl MuxStream {
    /// Takes up to `max` received bytes as one chunk, without copying;
    /// `None` at EOF. Grants window credit back to the peer as bytes are taken.
    pub fn poll_recv_chunk(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<io::Result<Option<Bytes>>> {
        let mut chunk = None;
        let open = std::task::ready!(self.poll_recv_with(cx, |queue| {
            let front = queue.front_mut().expect("called with a non-empty queue");
            let taken = if front.len() <= max {
                queue.pop_front().expect("front exists")
            } else {
                front.split_to(max)
            };
            let n = taken.len();
            chunk = Some(taken);
            n
        }))?;
        Poll::Ready(Ok(if open { chunk } else { None }))
    }

    /// Appends received chunks to `out` without copying: up to `count`
    /// chunks and `max` bytes (the first chunk is split to fit). `Ok(false)`
    /// at EOF. Grants window credit back to the peer as bytes are taken.
    pub fn poll_recv_chunks(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
        count: usize,
        out: &mut VecDeque<Bytes>,
    ) -> Poll<io::Result<bool>> {
        self.poll_recv_with(cx, |queue| {
            let mut taken = 0;
            let mut chunks = 0;
            while chunks < count && taken < max {
                let Some(front) = queue.front_mut() else {
                    break;
                };
                let chunk = if front.len() <= max - taken {
                    queue.pop_front().expect("front exists")
                } else if chunks == 0 {
                    front.split_to(max)
                } else {
                    break;
                };
                taken += chunk.len();
                chunks += 1;
                out.push_back(chunk);
            }
            taken
        })
    }

    /// Waits for received bytes, lets `take` remove some from the (non-empty)
    /// queue and return how many, and grants window credit back to the peer
    /// as bytes are taken. `Ok(false)` at EOF.
    fn poll_recv_with(
        &mut self,
        cx: &mut Context<'_>,
        take: impl FnOnce(&mut VecDeque<Bytes>) -> usize,
    ) -> Poll<io::Result<bool>> {
        let mut recv = lock(&self.state.recv);
        if recv.queue.is_empty() {
            if let Some((code, reason)) = &recv.reset {
                return Poll::Ready(Err(reset_error(*code, reason)));
            }
            if recv.fin {
                return Poll::Ready(Ok(false));
            }
            if self.shared.is_closing() {
                return Poll::Ready(Err(self.shared.link_error()));
            }
            recv.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let taken = take(&mut recv.queue);
        recv.buffered -= taken;
        // taken <= window, which is a u32.
        recv.unacked += taken as u32;
        // Grant credit back once a quarter of the window is consumed: fewer
        // WINDOW frames than per-read updates, and the sender still holds
        // three quarters of a window while the update travels (granting at
        // half stalled a single bulk stream often enough to cost ~10% on
        // a busy 2-core box; the buffer bound is the window either way).
        if recv.unacked >= self.shared.window / 4 && !recv.fin {
            let increment = std::mem::take(&mut recv.unacked);
            drop(recv);
            self.shared.push_urgent(Frame::Window {
                stream: self.state.id,
                increment,
            });
        }
        Poll::Ready(Ok(true))
    }

    /// Sends a prefix of `data` (as much as the window allows, at most one
    /// frame) without copying; advances `data` past what was sent.
    pub fn poll_send_chunk(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        let n = std::task::ready!(self.poll_send_ready(cx, data.len()))?;
        let payload = data.split_to(n);
        self.send_data(payload)
    }

    /// Waits for window credit and queue space; returns how many of `len`
    /// bytes may be sent now (reserved: the caller must send them at once).
    fn poll_send_ready(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<usize>> {
        {
            let mut send = lock(&self.state.send);
            if let Some((code, reason)) = &send.reset {
                return Poll::Ready(Err(reset_error(*code, reason)));
            }
            if send.fin_sent {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "write after shutdown",
                )));
            }
            if self.shared.is_closing() {
                return Poll::Ready(Err(self.shared.link_error()));
            }
            if send.credit == 0 {
                send.waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
        }
        match self.sender.poll_reserve(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => return Poll::Ready(Err(self.shared.link_error())),
            Poll::Pending => return Poll::Pending,
        }
        let mut send = lock(&self.state.send);
        let n = len
            .min(frame::MAX_DATA_PAYLOAD)
            .min(usize::try_from(send.credit).unwrap_or(usize::MAX));
        send.credit -= n as u64;
        Poll::Ready(Ok(n))
    }

    fn send_data(&mut self, payload: Bytes) -> Poll<io::Result<()>> {
        let n = payload.len() as u64;
        let frame = Frame::Data {
            stream: self.state.id,
            payload,
        };
        if self.sender.send_item(frame).is_err() {
            return Poll::Ready(Err(self.shared.link_error()));
        }
        self.shared.stats.bytes_out.fetch_add(n, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for MuxStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if let Some(chunk) = std::task::ready!(this.poll_recv_chunk(cx, buf.remaining()))? {
            buf.put_slice(&chunk);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for MuxStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = std::task::ready!(this.poll_send_ready(cx, buf.len()))?;
        std::task::ready!(this.send_data(Bytes::copy_from_slice(&buf[..n])))?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The writer task flushes after every batch; nothing is held here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        {
            let send = lock(&this.state.send);
            if send.fin_sent {
                return Poll::Ready(Ok(()));
            }
            if let Some((code, reason)) = &send.reset {
                return Poll::Ready(Err(reset_error(*code, reason)));
            }
        }
        match this.sender.poll_reserve(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => return Poll::Ready(Err(this.shared.link_error())),
            Poll::Pending => return Poll::Pending,
        }
        if this
            .sender
            .send_item(Frame::Fin {
                stream: this.state.id,
            })
            .is_err()
        {
            return Poll::Ready(Err(this.shared.link_error()));
        }
        lock(&this.state.send).fin_sent = true;
        Poll::Ready(Ok(()))
    }
}

impl Drop for MuxStream {
    fn drop(&mut self) {
        lock(&self.shared.streams).remove(&self.state.id);
        let finished = {
            let recv = lock(&self.state.recv);
            let send = lock(&self.state.send);
            (recv.fin && send.fin_sent) || recv.reset.is_some() || send.reset.is_some()
        };
        if !finished && !self.shared.token.is_cancelled() {
            self.shared.push_urgent(Frame::Reset {
                stream: self.state.id,
                code: ResetCode::Cancel,
                reason: "stream dropped".into(),
            });
        }
    }
}

impl std::fmt::Debug for MuxStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxStream")
            .field("id", &self.state.id)
            .finish()
    }
}
