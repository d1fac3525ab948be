//! The writer task: drains the urgent and ordered queues into batches
//! and writes each batch with one vectored write.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kitepipe_proto::frame::{self, Frame};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::trace;

use super::{LinkClosed, Shared, lock};
use crate::link::io::poll_write_segments;

/// How many bytes the writer gathers into one write. Large writes let TLS
/// fill full 16 KiB records and keep syscalls per byte low.
const WRITE_BATCH: usize = 256 * 1024;

/// A batch of ordered frames smaller than this waits for one pass of the
/// scheduler before it is written: the tasks of other streams that are
/// ready to run (visitors whose requests arrived in the same poll of the
/// sockets) add their frames first, so small frames share one TLS record
/// and one write instead of one each (with wrk -c64 through an HTTP kite,
/// link writes per request fell from 1.0 to 0.3-0.5 and req/s rose 10%).
/// Urgent frames never wait: a window update held back stalls the peer's
/// sender (an earlier version that let them wait cost bulk streams 15-25%),
/// and a batch this large already fills a TLS record.
const COALESCE_BELOW: usize = 16 * 1024;

pub(super) async fn run_writer(
    mut writer: Box<dyn AsyncWrite + Send + Unpin>,
    shared: Arc<Shared>,
    mut out: mpsc::Receiver<Frame>,
) {
    let mut batch = Batch::default();
    loop {
        let mut closing = false;
        tokio::select! {
            biased;
            _ = shared.token.cancelled() => break,
            _ = shared.urgent_notify.notified() => {}
            frame = out.recv() => match frame {
                Some(frame) => batch.push(&shared, frame),
                // Every sender is gone: the Mux handle and all streams dropped.
                None => closing = true,
            },
        }
        drain_urgent(&shared, &mut batch);
        drain_out(&shared, &mut out, &mut batch);
        if !closing && !batch.urgent && !batch.is_empty() && batch.len < COALESCE_BELOW {
            // Not cancel-sensitive: the next select! sees a cancellation.
            tokio::task::yield_now().await;
            drain_out(&shared, &mut out, &mut batch);
        }
        drain_urgent(&shared, &mut batch);
        if lock(&shared.closed).is_some() {
            closing = true;
        }
        if !batch.is_empty() {
            let res = tokio::select! {
                res = batch.write_to(&mut writer) => res,
                _ = shared.token.cancelled() => break,
            };
            if let Err(err) = res {
                shared.set_closed(LinkClosed::Io(Arc::new(err)), true);
                break;
            }
        }
        if closing {
            // Best effort: let TLS send its close_notify.
            let _ = tokio::time::timeout(Duration::from_secs(1), writer.shutdown()).await;
            shared.set_closed(LinkClosed::Shutdown, true);
            break;
        }
    }
}

/// Frames gathered for one vectored write. DATA payloads are not copied:
/// headers and small frames go into one buffer, large payloads are queued
/// as they are, and TLS reads them all through one `write_vectored`.
#[derive(Default)]
struct Batch {
    small: BytesMut,
    segments: VecDeque<Bytes>,
    len: usize,
    /// Holds an urgent frame (window update, ping, reset): write at once.
    urgent: bool,
}

/// Payloads smaller than this are copied next to their header: cheaper
/// than an extra I/O slice.
const COPY_BELOW: usize = 2048;

impl Batch {
    fn push(&mut self, shared: &Shared, frame: Frame) {
        trace!(?frame, "frame out");
        match frame {
            Frame::Data { stream, payload } if payload.len() >= COPY_BELOW => {
                self.len += frame::HEADER_LEN + payload.len();
                frame::put_data_header(&mut self.small, stream, payload.len());
                self.segments.push_back(self.small.split().freeze());
                self.segments.push_back(payload);
            }
            frame => {
                if let Frame::Reset { stream, .. } = &frame {
                    // A reset we send ends the stream on our side too.
                    lock(&shared.streams).remove(stream);
                }
                let before = self.small.len();
                frame.encode(&mut self.small);
                self.len += self.small.len() - before;
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes everything and flushes. Not cancel-safe (the link dies on cancel).
    async fn write_to<W: AsyncWrite + Unpin>(&mut self, writer: &mut W) -> io::Result<()> {
        if !self.small.is_empty() {
            self.segments.push_back(self.small.split().freeze());
        }
        while !self.segments.is_empty() {
            std::future::poll_fn(|cx| poll_write_segments(&mut *writer, cx, &mut self.segments))
                .await?;
        }
        self.len = 0;
        self.urgent = false;
        writer.flush().await
    }
}

fn drain_urgent(shared: &Shared, batch: &mut Batch) {
    let (frames, pong, ping) = {
        let mut urgent = lock(&shared.urgent);
        urgent.bytes = 0;
        (
            std::mem::take(&mut urgent.frames),
            urgent.pong.take(),
            urgent.ping.take(),
        )
    };
    let pings = pong
        .map(|payload| Frame::Pong { payload })
        .into_iter()
        .chain(ping.map(|payload| Frame::Ping { payload }));
    for frame in frames.into_iter().chain(pings) {
        batch.urgent = true;
        batch.push(shared, frame);
    }
}

/// Moves queued ordered frames into the batch, up to [`WRITE_BATCH`] bytes.
fn drain_out(shared: &Shared, out: &mut mpsc::Receiver<Frame>, batch: &mut Batch) {
    while batch.len < WRITE_BATCH {
        match out.try_recv() {
            Ok(frame) => batch.push(shared, frame),
            Err(_) => break,
        }
    }
}
