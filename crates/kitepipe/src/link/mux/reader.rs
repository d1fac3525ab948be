//! The reader task: decodes frames out of the chunks the link's reader
//! hands out ([`FrameReader`]) and dispatches them to streams, the accept
//! queue and the control queue.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{Buf, Bytes, BytesMut};
use kitepipe_proto::frame::{self, Frame, ResetCode};
use tokio::sync::mpsc;
use tracing::trace;

use super::{IncomingStream, LinkClosed, MuxStream, Shared, Side, lock};
use crate::link::PeerGoodbye;
use crate::link::io::ChunkSource;

pub(super) async fn run_reader(
    mut source: Box<dyn ChunkSource>,
    first: BytesMut,
    shared: Arc<Shared>,
    out: mpsc::Sender<Frame>,
    incoming: mpsc::Sender<IncomingStream>,
    control: mpsc::Sender<Bytes>,
) {
    let mut frames = FrameReader {
        chunk: first,
        ..FrameReader::default()
    };
    let reason = loop {
        // Decode everything received before reading more.
        let frame = match frames.next_frame() {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                let res = tokio::select! {
                    res = std::future::poll_fn(|cx| source.poll_chunk(cx)) => res,
                    _ = shared.token.cancelled() => return,
                };
                match res {
                    Ok(None) => break LinkClosed::PeerClosed(PeerGoodbye::Eof),
                    Ok(Some(chunk)) => {
                        shared.mark_rx();
                        frames.chunk = chunk;
                        continue;
                    }
                    Err(err) => break LinkClosed::Io(Arc::new(err)),
                }
            }
            Err(err) => break LinkClosed::BadFrame(err),
        };
        trace!(?frame, "frame in");
        match handle_frame(&shared, &out, &incoming, &control, frame).await {
            Ok(()) => {}
            Err(reason) => break reason,
        }
    };
    // The writer shuts the connection down (the record layer's alert if the
    // peer broke it, else close_notify); the watchdog cuts it after
    // CLOSE_GRACE if the writer is stuck.
    shared.set_closed(reason, false);
    shared.close_notify.notify_one();
}

/// Frames out of the chunks a [`ChunkSource`] hands out. DATA payloads are
/// sliced out of the chunks as they are, a frame's piece at a time when a
/// frame spans chunks; other frames that span chunks are put together in a
/// small buffer.
#[derive(Default)]
pub(super) struct FrameReader {
    /// The chunk being decoded.
    pub(super) chunk: BytesMut,
    /// The start of a frame whose rest is in later chunks (never DATA
    /// payload).
    pub(super) pending: BytesMut,
    /// The stream and remaining payload bytes of a DATA frame whose header
    /// was consumed before all of its payload arrived.
    pub(super) data_left: Option<(u32, usize)>,
}

impl FrameReader {
    /// The next frame; `Ok(None)` once `chunk` is used up (its bytes are in
    /// frames or in `pending`).
    pub(super) fn next_frame(&mut self) -> Result<Option<Frame>, frame::FrameError> {
        loop {
            if let Some((stream, left)) = self.data_left {
                if self.chunk.is_empty() {
                    return Ok(None);
                }
                let n = left.min(self.chunk.len());
                self.data_left = (n < left).then_some((stream, left - n));
                return Ok(Some(Frame::Data {
                    stream,
                    payload: self.chunk.split_to(n).freeze(),
                }));
            }
            let from_pending = !self.pending.is_empty();
            let buf = if from_pending {
                &mut self.pending
            } else {
                &mut self.chunk
            };
            // How many bytes the frame at the front of `buf` needs.
            let need = match Frame::peek_header(buf)? {
                Some(header) if header.is_data && buf.len() < header.frame_len() => {
                    // Pass the payload on as it arrives.
                    buf.advance(frame::HEADER_LEN);
                    self.data_left = Some((header.stream, header.len));
                    if from_pending && !self.pending.is_empty() {
                        // Less than the payload: the frame was incomplete.
                        let payload = self.pending.split().freeze();
                        let left = header.len - payload.len();
                        self.data_left = (left > 0).then_some((header.stream, left));
                        return Ok(Some(Frame::Data {
                            stream: header.stream,
                            payload,
                        }));
                    }
                    continue;
                }
                Some(header) if buf.len() >= header.frame_len() => return Frame::decode(buf),
                Some(header) => header.frame_len(),
                None => frame::HEADER_LEN,
            };
            // The frame (or its header) goes on in later chunks: gather it
            // in `pending`, copying from the chunk only what it needs.
            if !from_pending {
                self.pending.extend_from_slice(&self.chunk.split());
                return Ok(None);
            }
            let n = (need - self.pending.len()).min(self.chunk.len());
            if n == 0 {
                return Ok(None);
            }
            self.pending.extend_from_slice(&self.chunk.split_to(n));
        }
    }
}

async fn handle_frame(
    shared: &Arc<Shared>,
    out: &mpsc::Sender<Frame>,
    incoming: &mpsc::Sender<IncomingStream>,
    control: &mpsc::Sender<Bytes>,
    frame: Frame,
) -> Result<(), LinkClosed> {
    match frame {
        Frame::Data { stream, payload } => {
            let Some(state) = lock(&shared.streams).get(&stream).cloned() else {
                // Data racing a reset we sent, or for a stream we dropped.
                return Ok(());
            };
            let len = payload.len();
            let mut recv = lock(&state.recv);
            if recv.reset.is_some() || recv.fin {
                return Ok(());
            }
            if recv.buffered + len > shared.window as usize {
                drop(recv);
                state.reset(
                    ResetCode::ProtocolError,
                    "peer overran the stream window".into(),
                );
                shared.push_urgent(Frame::Reset {
                    stream,
                    code: ResetCode::ProtocolError,
                    reason: "stream window exceeded".into(),
                });
                return Ok(());
            }
            recv.buffered += len;
            recv.queue.push_back(payload);
            shared
                .stats
                .bytes_in
                .fetch_add(len as u64, Ordering::Relaxed);
            if let Some(waker) = recv.waker.take() {
                waker.wake();
            }
        }
        Frame::Open { stream, header } => {
            let theirs = match shared.side {
                Side::Connector => stream % 2 == 0,
                Side::Relay => stream % 2 == 1,
            };
            if !theirs || lock(&shared.streams).contains_key(&stream) {
                return Err(LinkClosed::Protocol(format!(
                    "peer opened stream {stream} with a bad or reused id"
                )));
            }
            let state = shared.insert_stream(stream);
            let mux_stream = MuxStream::new(state, shared.clone(), out.clone());
            if let Err(err) = incoming.try_send(IncomingStream {
                header,
                stream: mux_stream,
            }) {
                let mut rejected = match err {
                    mpsc::error::TrySendError::Full(s) | mpsc::error::TrySendError::Closed(s) => s,
                };
                rejected
                    .stream
                    .reset(ResetCode::Busy, "too many streams waiting");
            }
        }
        Frame::Fin { stream } => {
            if let Some(state) = lock(&shared.streams).get(&stream).cloned() {
                let mut recv = lock(&state.recv);
                recv.fin = true;
                if let Some(waker) = recv.waker.take() {
                    waker.wake();
                }
            }
        }
        Frame::Reset {
            stream,
            code,
            reason,
        } => {
            let state = lock(&shared.streams).get(&stream).cloned();
            if let Some(state) = state {
                state.reset(code, reason);
            }
        }
        Frame::Window { stream, increment } => {
            if let Some(state) = lock(&shared.streams).get(&stream).cloned() {
                let mut send = lock(&state.send);
                send.credit = send.credit.saturating_add(u64::from(increment));
                if send.credit > u64::from(u32::MAX) {
                    return Err(LinkClosed::Protocol("stream window overflow".into()));
                }
                if let Some(waker) = send.waker.take() {
                    waker.wake();
                }
            }
        }
        Frame::Ping { payload } => shared.push_pong(payload),
        Frame::Pong { payload } => {
            // Unknown payloads (made up, or a ping forgotten) prove nothing.
            if let Some(sent_ms) = lock(&shared.pings).answered(payload) {
                let now = shared.started.elapsed().as_millis() as u64;
                shared
                    .stats
                    .rtt_micros
                    .store(now.saturating_sub(sent_ms) * 1000, Ordering::Relaxed);
            }
        }
        Frame::Control { payload } => {
            if control.send(payload).await.is_err() {
                return Err(LinkClosed::Shutdown);
            }
        }
        Frame::GoAway { code, reason } => {
            return Err(LinkClosed::PeerClosed(PeerGoodbye::GoAway { code, reason }));
        }
    }
    Ok(())
}
