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
//!
//! Files: this one holds [`Mux`] (the handle, its settings, the state the
//! tasks share, the watchdog); `stream` holds [`MuxStream`] and its
//! per-stream state; `reader` the reader task and its frame decoder;
//! `writer` the writer task and its batching.

mod reader;
mod stream;
mod writer;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kitepipe_proto::frame::{self, Frame, ResetCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug};

use super::LinkClosed;
use super::io::{ChunkSource, ReadChunks};
use crate::sync::lock;
use reader::run_reader;
pub use stream::{MuxStream, StreamReset};
use stream::{RecvState, SendState, StreamState};
use writer::run_writer;

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

/// Urgent frames (resets, window updates) queued for the writer beyond
/// which the link is closed: the peer does not read what we send. A link
/// that works never holds more than a few per stream (a stream owes at
/// most four window updates before its peer runs out of credit), so 1 MiB
/// (about 80,000 window updates) is far above any working link and bounds
/// what a peer that only sends can make us hold.
pub(crate) const URGENT_BACKLOG: usize = 1024 * 1024;

/// Heartbeats after which a link whose peer has answered none of our pings
/// is closed. A PONG proves the peer read everything we sent before the
/// PING; two heartbeats leave room for a PONG queued behind a full batch on
/// a slow uplink.
pub(crate) const UNANSWERED_HEARTBEATS: u32 = 2;

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
    /// or after `UNANSWERED_HEARTBEATS` of it without a PONG to one of
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
pub(crate) const DEFAULT_STREAM_WINDOW: u32 = 1024 * 1024;

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

#[cfg(test)]
mod tests;
