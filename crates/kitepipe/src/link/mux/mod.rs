//! The stream multiplexer: many [`MuxStream`]s over one byte stream.
//!
//! One reader task decodes frames and hands DATA to per-stream queues; one
//! writer task batches outgoing frames into large writes; one watchdog task
//! sends pings and declares the link dead when nothing arrives for the
//! heartbeat interval. Every stream has a receive window: a peer may only
//! send as many bytes as the window allows, so the reader never blocks on a
//! slow stream and one slow visitor cannot stall the others.
//!
//! Frames that must keep their order relative to a stream's data (OPEN,
//! DATA, FIN, CONTROL) go through one bounded queue. Window updates, pings
//! and resets are urgent: they go through a side queue the writer drains
//! first.
//!
//! Every queue the peer can make grow has a bound and a policy:
//!
//! | queue | bound | when full |
//! |---|---|---|
//! | PONGs owed | one (`Urgent::pong`) | the newest PING's PONG replaces an older one |
//! | our PINGs unsent | one (`Urgent::ping`) | the newest replaces an older one |
//! | urgent frames (resets, window updates) | [`URGENT_BACKLOG`] bytes | the link is closed ([`LinkClosed::Backlog`]) |
//! | ordered frames | `OUT_QUEUE` frames | stream writers wait |
//! | streams waiting to be accepted | `ACCEPT_QUEUE` | the stream is reset `Busy` |
//! | control messages | `CONTROL_QUEUE` | the reader waits (the peer's writes back up) |
//! | a stream's received bytes | its window | the stream is reset |
//! | read buffers kept alive by queued chunks | `records::MAX_PINNED_BUFFERS`, `io::MAX_PINNED_CHUNK_BUFFERS` | chunks go out as copies |
//!
//! A peer that never reads what we send cannot keep a link alive by
//! sending: pings carry unpredictable payloads, and a link whose peer has
//! echoed none of them for [`UNANSWERED_HEARTBEATS`] heartbeats is closed
//! ([`LinkClosed::Unresponsive`]).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use kitepipe_proto::frame::{self, Frame, ResetCode};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, PollSender};
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, trace};

use super::LinkClosed;
use super::io::{ChunkSource, ReadChunks, poll_write_segments};

/// Frames queued for the writer before stream writers wait. 256 frames of
/// at most 64 KiB bound the queue at 16 MiB in the worst case, and in
/// practice it holds a few frames: the writer drains it in batches.
const OUT_QUEUE: usize = 256;

/// New streams waiting for the owner to accept them. Beyond this the peer
/// gets a `Busy` reset instead of the reader waiting.
const ACCEPT_QUEUE: usize = 1024;

/// Control messages waiting for the owner. The owner always drains them;
/// the bound only matters against a peer flooding control frames.
const CONTROL_QUEUE: usize = 64;

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

/// Urgent frames (resets, window updates) queued for the writer beyond
/// which the link is closed: the peer does not read what we send. A link
/// that works never holds more than a few per stream (a stream owes at
/// most four window updates before its peer runs out of credit), so 1 MiB
/// (about 80,000 window updates) is far above any working link and bounds
/// what a peer that only sends can make us hold.
pub const URGENT_BACKLOG: usize = 1024 * 1024;

/// Heartbeats after which a link whose peer has answered none of our pings
/// is closed. A PONG proves the peer read everything we sent before the
/// PING; two heartbeats leave room for a PONG queued behind a full batch on
/// a slow uplink.
pub const UNANSWERED_HEARTBEATS: u32 = 2;

/// Pings remembered for matching PONGs (pings go out every third of a
/// heartbeat, so this covers more than a heartbeat of them).
const PINGS_REMEMBERED: usize = 4;

/// How long a closing link may take to flush its GOAWAY before it is cut.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Which end of the link we are; decides stream id parity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The dialing end (odd stream ids).
    Connector,
    /// The accepting end (even stream ids).
    Relay,
}

/// Settings of a multiplexed link.
#[derive(Debug, Clone)]
pub struct MuxConfig {
    /// Declare the link dead after this long without receiving any frame,
    /// or after [`UNANSWERED_HEARTBEATS`] of it without a PONG to one of
    /// our pings. Pings go out every third of it.
    pub heartbeat: Duration,
    /// Per-stream receive window in bytes.
    pub stream_window: u32,
}

impl Default for MuxConfig {
    fn default() -> Self {
        MuxConfig {
            heartbeat: super::DEFAULT_HEARTBEAT,
            stream_window: DEFAULT_STREAM_WINDOW,
        }
    }
}

/// Default per-stream receive window. 1 MiB lets one stream run at full
/// speed over loopback and LAN latencies (bandwidth x delay), while idle
/// streams hold no memory at all: the window is credit, not a buffer.
pub const DEFAULT_STREAM_WINDOW: u32 = 1024 * 1024;

/// A stream opened by the peer, waiting to be accepted.
#[derive(Debug)]
pub struct IncomingStream {
    /// The raw stream header from the OPEN frame (decoded by the owner).
    pub header: Bytes,
    /// The stream.
    pub stream: MuxStream,
}

/// Handle to a running multiplexed link. Cheap to clone.
#[derive(Clone)]
pub struct Mux {
    shared: Arc<Shared>,
    out: mpsc::Sender<Frame>,
}

/// Receivers the owner of a link drains.
#[derive(Debug)]
pub struct MuxReceivers {
    /// Streams opened by the peer.
    pub incoming: mpsc::Receiver<IncomingStream>,
    /// Control messages (payloads of CONTROL frames) from the peer.
    pub control: mpsc::Receiver<Bytes>,
}

/// Counters of a link, for logs and status.
#[derive(Debug, Default)]
pub struct MuxStats {
    /// Payload bytes received on streams.
    pub bytes_in: AtomicU64,
    /// Payload bytes sent on streams.
    pub bytes_out: AtomicU64,
    /// Latest ping round trip, in microseconds (0 before the first pong).
    pub rtt_micros: AtomicU64,
}

struct Shared {
    side: Side,
    window: u32,
    streams: Mutex<HashMap<u32, Arc<StreamState>>>,
    next_id: AtomicU32,
    urgent: Mutex<Urgent>,
    urgent_notify: Notify,
    /// Our pings, to tell a real PONG from a made-up one.
    pings: Mutex<Pings>,
    /// Wakes the watchdog to force the close if the writer cannot flush.
    close_notify: Notify,
    /// Cancelled when the link is closed, for any reason.
    token: CancellationToken,
    closed: Mutex<Option<LinkClosed>>,
    started: Instant,
    /// Milliseconds since `started` at which the last frame arrived.
    last_rx_ms: AtomicU64,
    stats: MuxStats,
}

/// Frames the writer sends before anything else.
#[derive(Default)]
struct Urgent {
    frames: VecDeque<Frame>,
    /// Encoded bytes of `frames`, bounded by [`URGENT_BACKLOG`].
    bytes: usize,
    /// The PONG owed: one answers the newest PING (older ones are moot).
    pong: Option<u64>,
    /// Our PING not yet written: one at most.
    ping: Option<u64>,
}

/// Our recent pings and when the peer last proved it reads.
struct Pings {
    /// Payload and send time (ms since start) of recent pings, newest at
    /// `next - 1`.
    sent: [Option<(u64, u64)>; PINGS_REMEMBERED],
    next: usize,
    counter: u64,
    /// Keys the payloads: a peer cannot echo a ping it did not read.
    keys: std::collections::hash_map::RandomState,
    /// Send time (ms since start) of the newest ping the peer answered.
    answered_ms: u64,
}

impl Pings {
    fn new() -> Pings {
        Pings {
            sent: [None; PINGS_REMEMBERED],
            next: 0,
            counter: 0,
            keys: std::collections::hash_map::RandomState::new(),
            answered_ms: 0,
        }
    }

    /// A fresh unpredictable payload, remembered with its send time.
    fn next_payload(&mut self, now_ms: u64) -> u64 {
        use std::hash::BuildHasher;
        self.counter += 1;
        let payload = self.keys.hash_one(self.counter);
        self.sent[self.next % PINGS_REMEMBERED] = Some((payload, now_ms));
        self.next += 1;
        payload
    }

    /// The send time of the ping `payload` answers, if it is one of ours.
    fn answered(&mut self, payload: u64) -> Option<u64> {
        let (_, sent_ms) = self
            .sent
            .iter()
            .flatten()
            .find(|(p, _)| *p == payload)
            .copied()?;
        self.answered_ms = self.answered_ms.max(sent_ms);
        Some(sent_ms)
    }
}

/// The encoded size of an urgent frame.
fn urgent_len(frame: &Frame) -> usize {
    frame::HEADER_LEN
        + match frame {
            Frame::Reset { reason, .. } | Frame::GoAway { reason, .. } => 4 + reason.len(),
            Frame::Window { .. } => 4,
            _ => 8,
        }
}

struct StreamState {
    id: u32,
    recv: Mutex<RecvState>,
    send: Mutex<SendState>,
}

#[derive(Default)]
struct RecvState {
    queue: VecDeque<Bytes>,
    buffered: usize,
    fin: bool,
    reset: Option<(ResetCode, String)>,
    /// Bytes consumed by the reader and not yet granted back to the peer.
    unacked: u32,
    waker: Option<Waker>,
}

struct SendState {
    credit: u64,
    fin_sent: bool,
    reset: Option<(ResetCode, String)>,
    waker: Option<Waker>,
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

impl Mux {
    /// Starts the reader, writer and watchdog tasks of a link over `io`.
    ///
    /// `read_buf` holds bytes already read from `io` (e.g. during the
    /// handshake) that belong to the framed stream. The tasks run on
    /// `tracker` and stop when `token` (or the link) is cancelled.
    pub fn start<T>(
        io: T,
        read_buf: BytesMut,
        side: Side,
        config: &MuxConfig,
        tracker: &TaskTracker,
        token: CancellationToken,
    ) -> (Mux, MuxReceivers)
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (reader, writer) = tokio::io::split(io);
        Mux::start_parts(
            Box::new(ReadChunks::new(reader)),
            Box::new(writer),
            read_buf,
            side,
            config,
            tracker,
            token,
        )
    }

    /// Starts a link over a reader and a writer of their own (the link's
    /// record layer splits into two halves that need no lock between them,
    /// and its reader hands out plaintext without a copy). `read_buf` holds
    /// bytes already received.
    pub fn start_parts(
        reader: Box<dyn ChunkSource>,
        writer: Box<dyn AsyncWrite + Send + Unpin>,
        read_buf: BytesMut,
        side: Side,
        config: &MuxConfig,
        tracker: &TaskTracker,
        token: CancellationToken,
    ) -> (Mux, MuxReceivers) {
        let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
        let (incoming_tx, incoming_rx) = mpsc::channel(ACCEPT_QUEUE);
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let started = Instant::now();
        let shared = Arc::new(Shared {
            side,
            window: config.stream_window,
            streams: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(match side {
                Side::Connector => 1,
                Side::Relay => 2,
            }),
            urgent: Mutex::new(Urgent::default()),
            urgent_notify: Notify::new(),
            pings: Mutex::new(Pings::new()),
            close_notify: Notify::new(),
            token,
            closed: Mutex::new(None),
            started,
            last_rx_ms: AtomicU64::new(0),
            stats: MuxStats::default(),
        });
        let mux = Mux {
            shared: shared.clone(),
            out: out_tx,
        };
        let span = tracing::Span::current();
        tracker.spawn(
            run_reader(
                reader,
                read_buf,
                shared.clone(),
                mux.out.clone(),
                incoming_tx,
                control_tx,
            )
            .instrument(span.clone()),
        );
        tracker.spawn(run_writer(writer, shared.clone(), out_rx).instrument(span.clone()));
        tracker.spawn(run_watchdog(shared, config.heartbeat).instrument(span));
        (
            mux,
            MuxReceivers {
                incoming: incoming_rx,
                control: control_rx,
            },
        )
    }

    /// Opens a stream carrying `header` (an encoded stream header).
    ///
    /// Data may be written at once; if the peer refuses the stream, reads
    /// and writes fail with the peer's reason. Cancel-safe: dropping the
    /// future before it completes opens nothing.
    pub async fn open(&self, header: Bytes) -> Result<MuxStream, LinkClosed> {
        let permit = tokio::select! {
            permit = self.out.reserve() => permit.map_err(|_| self.closed_reason())?,
            _ = self.shared.token.cancelled() => return Err(self.closed_reason()),
        };
        let id = self.shared.next_id.fetch_add(2, Ordering::Relaxed);
        let state = self.shared.insert_stream(id);
        permit.send(Frame::Open { stream: id, header });
        Ok(MuxStream::new(state, self.shared.clone(), self.out.clone()))
    }

    /// Sends a control message (the payload of a CONTROL frame).
    pub async fn send_control(&self, payload: Bytes) -> Result<(), LinkClosed> {
        tokio::select! {
            res = self.out.send(Frame::Control { payload }) => res.map_err(|_| self.closed_reason()),
            _ = self.shared.token.cancelled() => Err(self.closed_reason()),
        }
    }

    /// Closes the link: tells the peer why (best effort) and stops the tasks.
    pub fn close(&self, reason: LinkClosed) {
        let (code, text) = match &reason {
            LinkClosed::Shutdown => (ResetCode::Shutdown, reason.to_string()),
            _ => (ResetCode::Cancel, reason.to_string()),
        };
        self.shared
            .push_urgent(Frame::GoAway { code, reason: text });
        // The writer sends the GOAWAY and stops; the watchdog forces the
        // stop if the writer is stuck on a dead connection.
        self.shared.set_closed(reason, false);
        self.shared.close_notify.notify_one();
    }

    /// Resolves when the link has closed; returns why. Cancel-safe.
    pub async fn closed(&self) -> LinkClosed {
        self.shared.token.cancelled().await;
        self.closed_reason()
    }

    /// True once the link has closed.
    pub fn is_closed(&self) -> bool {
        self.shared.token.is_cancelled()
    }

    /// The link's counters.
    pub fn stats(&self) -> &MuxStats {
        &self.shared.stats
    }

    /// Number of open streams.
    pub fn stream_count(&self) -> usize {
        lock(&self.shared.streams).len()
    }

    fn closed_reason(&self) -> LinkClosed {
        lock(&self.shared.closed)
            .clone()
            .unwrap_or(LinkClosed::Shutdown)
    }
}

impl std::fmt::Debug for Mux {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mux")
            .field("side", &self.shared.side)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Shared {
    fn insert_stream(&self, id: u32) -> Arc<StreamState> {
        let state = Arc::new(StreamState {
            id,
            recv: Mutex::new(RecvState::default()),
            send: Mutex::new(SendState {
                credit: u64::from(self.window),
                fin_sent: false,
                reset: None,
                waker: None,
            }),
        });
        lock(&self.streams).insert(id, state.clone());
        state
    }

    /// Queues an urgent frame; closes the link instead if the peer has let
    /// [`URGENT_BACKLOG`] bytes of them pile up.
    fn push_urgent(&self, frame: Frame) {
        let len = urgent_len(&frame);
        {
            let mut urgent = lock(&self.urgent);
            if urgent.bytes + len <= URGENT_BACKLOG {
                urgent.bytes += len;
                urgent.frames.push_back(frame);
                drop(urgent);
                self.urgent_notify.notify_one();
                return;
            }
        }
        self.set_closed(LinkClosed::Backlog(URGENT_BACKLOG), true);
    }

    /// Owes the peer a PONG for `payload`, replacing an older one not sent.
    fn push_pong(&self, payload: u64) {
        lock(&self.urgent).pong = Some(payload);
        self.urgent_notify.notify_one();
    }

    /// Records why the link closed (first reason wins) and wakes everything.
    fn set_closed(&self, reason: LinkClosed, immediate: bool) {
        {
            let mut closed = lock(&self.closed);
            if closed.is_none() {
                debug!(%reason, "link closing");
                *closed = Some(reason);
            }
        }
        if immediate {
            self.token.cancel();
        } else {
            // The writer sees the closed reason, flushes the GOAWAY, then cancels.
            self.urgent_notify.notify_one();
        }
        let streams: Vec<_> = lock(&self.streams).values().cloned().collect();
        for stream in streams {
            stream.wake_all();
        }
    }

    fn is_closing(&self) -> bool {
        self.token.is_cancelled() || lock(&self.closed).is_some()
    }

    fn link_error(&self) -> io::Error {
        let reason = lock(&self.closed).clone().unwrap_or(LinkClosed::Shutdown);
        io::Error::new(io::ErrorKind::ConnectionAborted, reason)
    }

    fn mark_rx(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_rx_ms.store(ms, Ordering::Relaxed);
    }
}

impl StreamState {
    fn wake_all(&self) {
        if let Some(waker) = lock(&self.recv).waker.take() {
            waker.wake();
        }
        if let Some(waker) = lock(&self.send).waker.take() {
            waker.wake();
        }
    }

    fn reset(&self, code: ResetCode, reason: String) {
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
    fn new(state: Arc<StreamState>, shared: Arc<Shared>, out: mpsc::Sender<Frame>) -> MuxStream {
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

async fn run_reader(
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
                    Ok(None) => break LinkClosed::PeerClosed("connection closed".into()),
                    Ok(Some(chunk)) => {
                        shared.mark_rx();
                        frames.chunk = chunk;
                        continue;
                    }
                    Err(err) => break LinkClosed::Io(err.to_string()),
                }
            }
            Err(err) => break LinkClosed::Protocol(err.to_string()),
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
struct FrameReader {
    /// The chunk being decoded.
    chunk: BytesMut,
    /// The start of a frame whose rest is in later chunks (never DATA
    /// payload).
    pending: BytesMut,
    /// The stream and remaining payload bytes of a DATA frame whose header
    /// was consumed before all of its payload arrived.
    data_left: Option<(u32, usize)>,
}

impl FrameReader {
    /// The next frame; `Ok(None)` once `chunk` is used up (its bytes are in
    /// frames or in `pending`).
    fn next_frame(&mut self) -> Result<Option<Frame>, frame::FrameError> {
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
            return Err(LinkClosed::PeerClosed(format!("{code}: {reason}")));
        }
    }
    Ok(())
}

async fn run_writer(
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
                shared.set_closed(LinkClosed::Io(err.to_string()), true);
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

async fn run_watchdog(shared: Arc<Shared>, heartbeat: Duration) {
    let period = heartbeat / 3;
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.token.cancelled() => return,
            _ = shared.close_notify.notified() => {
                tokio::select! {
                    _ = shared.token.cancelled() => {}
                    _ = tokio::time::sleep(CLOSE_GRACE) => shared.token.cancel(),
                }
                return;
            }
            _ = ticker.tick() => {}
        }
        let now_ms = shared.started.elapsed().as_millis() as u64;
        let last = shared.last_rx_ms.load(Ordering::Relaxed);
        let silent = Duration::from_millis(now_ms.saturating_sub(last));
        if silent > heartbeat {
            shared.set_closed(LinkClosed::HeartbeatTimeout(silent), true);
            return;
        }
        let payload = {
            let mut pings = lock(&shared.pings);
            let unanswered = Duration::from_millis(now_ms.saturating_sub(pings.answered_ms));
            if unanswered > heartbeat * UNANSWERED_HEARTBEATS {
                drop(pings);
                shared.set_closed(LinkClosed::Unresponsive(unanswered), true);
                return;
            }
            pings.next_payload(now_ms)
        };
        lock(&shared.urgent).ping = Some(payload);
        shared.urgent_notify.notify_one();
    }
}

/// Locks a mutex, ignoring poisoning: every critical section here leaves the
/// data consistent, so a panic elsewhere does not make it unusable.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests;
