//! The tunnel pump: one PageKite tunnel (chunks over a byte stream) on one
//! side, an in-process kitepipe `Mux` pair (over `tokio::io::duplex`) on
//! the other, so everything that serves a kitepipe link serves a PageKite
//! peer unchanged.
//!
//! Tasks, all on the caller's tracker under one tunnel token:
//!
//! - the reader decodes chunks and dispatches them: stream data to the
//!   SID's queue, `EOF` as half or full close, `PING` answered with
//!   `PONG`, `ZRST` to the writer, `SKB` to the SID's sender, NOOPs with
//!   `X-PageKite` lines to [`TunnelHandle::control`]; a corrupt ZChunk is
//!   answered with `NOOP: 1` + `ZRST: 1` (pagekite.py does the same);
//! - the writer owns the encoder (the direction's zlib stream) and sends
//!   every chunk, in queue order;
//! - per SID, an upstream task (peer data -> the MuxStream, then `SKB`
//!   progress back to the peer) and a downstream task (MuxStream -> data
//!   chunks of at most [`FRAGMENT`] bytes, paced by the peer's `SKB`);
//! - the pinger (`PING` every `ping_interval`; the reader closes the
//!   tunnel when nothing arrived for `idle_timeout`);
//! - at the front end, the acceptor turns visitor streams the relay opens
//!   into new SIDs; at the back end the reader opens a stream per new SID
//!   (its `Route` picks the kite).
//!
//! Bounds: [`WRITE_QUEUE`] chunks toward the peer (senders wait),
//! `max_streams` SIDs (beyond: `EOF`, or a `Busy` reset toward the relay),
//! [`SID_BUFFER`] bytes of peer data queued per SID. When a SID's queue is
//! full the reader waits: a peer that ignores its own `SKB` pacing stalls
//! its own tunnel (head-of-line), never our memory. pagekite.py stops
//! reading a stream ~47 KiB ahead of our `SKB`, far below the bound.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kitepipe_proto::frame::ResetCode;
use kitepipe_proto::kite::KiteProto;
use kitepipe_proto::message::{self, StreamHeader, VisitorHeader};
use kitepipe_proto::pagekite::{
    Chunk, ChunkDecoder, ChunkEncoder, ChunkHeaders, Eof, PageKiteError,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, trace, warn};

use crate::link::{IncomingStream, Mux, MuxConfig, MuxReceivers, MuxStream, Side};
use crate::sync::lock;

/// Chunks waiting for the writer; senders (stream copies, the reader's
/// answers) wait when it is full, so the tunnel's socket paces them.
const WRITE_QUEUE: usize = 64;

/// Control NOOPs waiting for the handshake layer; beyond it they are
/// dropped (logged): a peer cannot grow it, and a back-end re-sends a kite
/// request it got no answer to.
const CONTROL_QUEUE: usize = 16;

/// The most stream data per chunk we send: pagekite.py's own read size
/// (16 KiB less 128 bytes) rounded up; upagekite and pagekite.py take it.
pub(crate) const FRAGMENT: usize = 16 * 1024;

/// Bytes of peer data queued per SID toward its MuxStream. pagekite.py
/// stops reading a stream about 47 KiB past what our `SKB` acknowledged;
/// 256 KiB also holds one chunk of the largest size the decoder accepts.
const SID_BUFFER: usize = kitepipe_proto::pagekite::MAX_CHUNK;

/// KiB we send on a stream beyond what the peer's `SKB` acknowledged
/// before we wait. Only once the peer sent an `SKB` for the stream (an
/// implementation that never does is not paced, like pagekite.py's
/// `acked_kb_delta`).
const SEND_WINDOW_KB: u64 = 256;

/// KiB of progress between `SKB` reports while data keeps coming (the
/// last count is always reported once the queue runs dry). pagekite.py
/// pauses a stream ~47 KiB past our last report; 8 keeps it well clear.
const SKB_STEP_KB: u64 = 8;

/// How long a stream whose peer stopped reading (`EOF: W`) may keep its
/// MuxStream open, discarding what it reads, before it is dropped: a clean
/// close lets queued data reach the far side before the stream ends.
const LINGER: Duration = Duration::from_secs(30);

/// Capacity of the in-process duplex between the two Muxes: enough for a
/// batch of frames each way.
const DUPLEX_BUFFER: usize = 256 * 1024;

/// What the writer batches into one write before flushing.
const WRITE_BATCH: usize = 64 * 1024;

/// How much the reader asks the socket for at once.
const READ_CHUNK: usize = 32 * 1024;

/// pagekite.py answers a `PING` with at most 64 characters of it.
const MAX_PONG: usize = 64;

/// Default `PING` interval: well under pagekite.py's own (116 s) so a
/// dead tunnel is noticed within [`DEFAULT_IDLE_TIMEOUT`].
pub(crate) const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(30);

/// Default dead-tunnel timeout: three pings without any answer.
pub(crate) const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(95);

/// Default SIDs open at once per tunnel (each may queue [`SID_BUFFER`]).
pub(crate) const DEFAULT_MAX_STREAMS: usize = 256;

/// Settings of one tunnel.
#[derive(Debug, Clone)]
pub(crate) struct TunnelConfig {
    /// Send compressed chunks (both ends announced `ZChunks`).
    pub(crate) compress: bool,
    /// Send a `PING` this often.
    pub(crate) ping_interval: Duration,
    /// Close the tunnel when nothing arrived for this long.
    pub(crate) idle_timeout: Duration,
    /// Streams (SIDs) open at once; beyond it new ones are refused.
    pub(crate) max_streams: usize,
    /// Settings of the in-process Mux pair. Its `stream_window` is how
    /// far the kitepipe side may run ahead of the pump per stream.
    pub(crate) mux: MuxConfig,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        TunnelConfig {
            compress: false,
            ping_interval: DEFAULT_PING_INTERVAL,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_streams: DEFAULT_MAX_STREAMS,
            mux: MuxConfig::default(),
        }
    }
}

/// Where a new SID wants to go (at our back-end end), from its first
/// chunk's headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChunkDest {
    /// `Proto` (lowercase): `http`, `https`, `raw`, `websocket`, ...
    pub(crate) proto: String,
    /// `Host` (lowercase): the kite the visitor asked for.
    pub(crate) host: String,
    /// `Port`: the front-end's port the visitor reached.
    pub(crate) port: Option<u16>,
    /// `RIP`: the visitor's address.
    pub(crate) rip: Option<String>,
    /// `RPort`: the visitor's port.
    pub(crate) rport: Option<u16>,
    /// `RTLS`: the front-end terminated TLS for the visitor.
    pub(crate) rtls: bool,
}

impl ChunkDest {
    /// The visitor's address from `RIP` and `RPort`, IPv4-mapped IPv6
    /// (pagekite.py's `::ffff:1.2.3.4`) as IPv4; None if either is missing
    /// or malformed. `to_string()` gives `VisitorHeader::peer`'s form.
    pub(crate) fn visitor_addr(&self) -> Option<SocketAddr> {
        let ip: std::net::IpAddr = self.rip.as_deref()?.parse().ok()?;
        Some(SocketAddr::new(ip.to_canonical(), self.rport?))
    }
}

/// Decides which kite serves a new SID at the back-end end (`None`:
/// refused; the pump answers like pagekite.py: an HTTP 503 page for http,
/// EOF otherwise).
pub(crate) type Route = Arc<dyn Fn(&ChunkDest) -> Option<VisitorHeader> + Send + Sync>;

/// The handshake layer's side of a running tunnel. Dropping it does not
/// end the tunnel: closing the Mux (or the caller's token) does.
#[derive(Debug)]
pub(crate) struct TunnelHandle {
    /// NOOP chunks carrying `X-PageKite` requests or answers (AddKites,
    /// SignThis round trips) or quota headers. Bounded ([`CONTROL_QUEUE`]);
    /// when full, newer ones are dropped (logged).
    pub(crate) control: mpsc::Receiver<ChunkHeaders>,
    /// The writer's control queue (served before stream data).
    control_out: mpsc::Sender<ChunkHeaders>,
}

impl TunnelHandle {
    /// Sends a NOOP chunk with these headers (e.g. `X-PageKite-OK`
    /// answers, or signed requests), ahead of queued stream data. False
    /// if the tunnel is gone or [`CONTROL_QUEUE`] of them wait already.
    pub(crate) fn send_control(&self, headers: Vec<(String, String)>) -> bool {
        let chunk = ChunkHeaders {
            other: headers,
            ..ChunkHeaders::noop()
        };
        self.control_out.try_send(chunk).is_ok()
    }
}

/// We are the front-end (relay): returns the relay-side Mux (the link's
/// mux in the registry; visitor streams opened on it become SIDs).
/// Closing the Mux ends the tunnel and the tunnel's end closes the Mux.
pub(crate) fn start_front<T>(
    io: T,
    leftover: BytesMut,
    config: &TunnelConfig,
    tracker: &TaskTracker,
    token: CancellationToken,
) -> (Mux, TunnelHandle)
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let token = token.child_token();
    let (relay_mux, relay_rx, local_mux, local_rx) = mux_pair(config, tracker, &token);
    let (pump, handle) = Pump::new(End::Front, local_mux, config, tracker, &token);
    let span = tracing::Span::current();
    tracker.spawn(run_acceptor(pump.clone(), local_rx).instrument(span.clone()));
    tracker.spawn(drain(relay_rx, token.clone()).instrument(span.clone()));
    pump.start(io, leftover, relay_mux.clone());
    (relay_mux, handle)
}

/// We are the back-end (connector): returns the connector-side Mux and
/// its receivers, served like a relay link's (`connector::serve_stream`
/// per incoming stream). `route` picks the kite for each new SID.
pub(crate) fn start_back<T>(
    io: T,
    leftover: BytesMut,
    config: &TunnelConfig,
    route: Route,
    tracker: &TaskTracker,
    token: CancellationToken,
) -> (Mux, MuxReceivers, TunnelHandle)
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let token = token.child_token();
    let (relay_mux, relay_rx, local_mux, local_rx) = mux_pair(config, tracker, &token);
    let (pump, handle) = Pump::new(
        End::Back {
            route,
            mux: relay_mux.clone(),
        },
        relay_mux,
        config,
        tracker,
        &token,
    );
    let span = tracing::Span::current();
    tracker.spawn(drain(relay_rx, token.clone()).instrument(span));
    pump.start(io, leftover, local_mux.clone());
    (local_mux, local_rx, handle)
}

/// The two Muxes over one duplex: (relay side, its receivers, connector
/// side, its receivers).
fn mux_pair(
    config: &TunnelConfig,
    tracker: &TaskTracker,
    token: &CancellationToken,
) -> (Mux, MuxReceivers, Mux, MuxReceivers) {
    let (relay_io, local_io) = tokio::io::duplex(DUPLEX_BUFFER);
    let (relay_mux, relay_rx) = Mux::start(
        relay_io,
        BytesMut::new(),
        Side::Relay,
        &config.mux,
        tracker,
        token.child_token(),
    );
    let (local_mux, local_rx) = Mux::start(
        local_io,
        BytesMut::new(),
        Side::Connector,
        &config.mux,
        tracker,
        token.child_token(),
    );
    (relay_mux, relay_rx, local_mux, local_rx)
}

/// Which end of the tunnel we are.
enum End {
    /// The relay: SIDs are ours, opened for visitor streams.
    Front,
    /// The connector: SIDs are the peer's; each new one opens a stream on
    /// `mux` (the relay-side Mux) for the kite `route` picks.
    Back { route: Route, mux: Mux },
}

/// What the writer sends.
#[derive(Debug)]
enum Out {
    /// A data chunk (compressed when enabled).
    Data(ChunkHeaders, Bytes),
    /// A chunk never compressed (NOOPs, EOFs), like pagekite.py's.
    Plain(ChunkHeaders, Bytes),
    /// The peer sent `ZRST`: start a new zlib stream.
    ResetCompressor,
}

/// Peer data for a SID's upstream task.
enum Inbound {
    /// Stream data, holding its share of the SID's buffer.
    Data(Bytes, OwnedSemaphorePermit),
    /// The peer sent its last byte (`EOF: R`): shut down our writer.
    Eof,
}

/// One SID, as the reader sees it.
struct SidEntry {
    /// Tells the entry from a later one with the same number.
    generation: u64,
    /// Toward the upstream task; bounded by `buffer` (every `Data` holds
    /// permits for its bytes, one `Eof` at most: `eof_queued`).
    inbound: mpsc::UnboundedSender<Inbound>,
    buffer: Arc<Semaphore>,
    eof_queued: bool,
    /// The peer's `SKB` for this stream, in KiB.
    acked_kb: watch::Sender<Option<u64>>,
    /// Cancelled when the peer sent `EOF: W` (stop sending it data).
    peer_stopped: CancellationToken,
    /// The SID's tasks.
    token: CancellationToken,
}

/// State shared by a tunnel's tasks.
struct Pump {
    end: End,
    /// The Mux whose streams are the SIDs (the connector side at the
    /// front end, the relay side at the back end).
    mux: Mux,
    out: mpsc::Sender<Out>,
    /// The writer's queues (stream data and answers; control NOOPs),
    /// taken by `start`.
    out_rx: Mutex<Option<(mpsc::Receiver<Out>, mpsc::Receiver<ChunkHeaders>)>>,
    control: mpsc::Sender<ChunkHeaders>,
    sids: Mutex<HashMap<u32, SidEntry>>,
    next_sid: AtomicU32,
    generation: AtomicU64,
    config: TunnelConfig,
    tracker: TaskTracker,
    token: CancellationToken,
}

impl Pump {
    fn new(
        end: End,
        mux: Mux,
        config: &TunnelConfig,
        tracker: &TaskTracker,
        token: &CancellationToken,
    ) -> (Arc<Pump>, TunnelHandle) {
        let (out, out_rx) = mpsc::channel(WRITE_QUEUE);
        let (control_out, control_out_rx) = mpsc::channel(CONTROL_QUEUE);
        let (control, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let pump = Arc::new(Pump {
            end,
            mux,
            out: out.clone(),
            out_rx: Mutex::new(Some((out_rx, control_out_rx))),
            control,
            sids: Mutex::new(HashMap::new()),
            next_sid: AtomicU32::new(1),
            generation: AtomicU64::new(0),
            config: config.clone(),
            tracker: tracker.clone(),
            token: token.clone(),
        });
        let handle = TunnelHandle {
            control: control_rx,
            control_out,
        };
        (pump, handle)
    }

    /// Starts the reader, writer, pinger and the watch over both Muxes.
    fn start<T>(self: &Arc<Self>, io: T, leftover: BytesMut, other: Mux)
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (reader, writer) = tokio::io::split(io);
        let span = tracing::Span::current();
        // Taken once, here: `start` runs once per pump.
        let (out_rx, control_rx) = lock(&self.out_rx).take().expect("the pump starts once");
        self.tracker.spawn(
            run_writer(
                writer,
                out_rx,
                control_rx,
                self.config.compress,
                self.config.idle_timeout,
                self.token.clone(),
            )
            .instrument(span.clone()),
        );
        self.tracker
            .spawn(run_reader(self.clone(), reader, leftover).instrument(span.clone()));
        self.tracker
            .spawn(run_pinger(self.clone()).instrument(span.clone()));
        let (mux, token) = (self.mux.clone(), self.token.clone());
        self.tracker.spawn(
            async move {
                tokio::select! {
                    _ = token.cancelled() => {}
                    reason = mux.closed() => debug!(%reason, "pagekite tunnel: mux closed"),
                    reason = other.closed() => debug!(%reason, "pagekite tunnel: mux closed"),
                }
                token.cancel();
            }
            .instrument(span),
        );
    }

    /// Queues a chunk for the writer; false once the tunnel is gone.
    /// Cancel-safe.
    async fn send(&self, out: Out) -> bool {
        tokio::select! {
            res = self.out.send(out) => res.is_ok(),
            _ = self.token.cancelled() => false,
        }
    }

    /// Closes a SID toward the peer: `EOF: 1WR` (pagekite.py's
    /// `SendStreamEof` with data `Bye!`).
    async fn send_eof(&self, sid: u32, eof: Eof) -> bool {
        let headers = ChunkHeaders {
            eof: Some(eof),
            ..ChunkHeaders::sid(sid)
        };
        self.send(Out::Plain(headers, Bytes::from_static(b"Bye!")))
            .await
    }

    /// Handles one chunk from the peer. Err: the tunnel must end.
    async fn on_chunk(self: &Arc<Self>, chunk: Chunk) -> Result<(), &'static str> {
        let Chunk { headers, data } = chunk;
        if let Some(pong) = &headers.pong {
            trace!(?pong, "pagekite tunnel: pong");
        }
        if let Some(ping) = &headers.ping {
            let pong = ChunkHeaders {
                pong: Some(truncate(ping, MAX_PONG).to_string()),
                ..ChunkHeaders::noop()
            };
            if !self.send(Out::Plain(pong, Bytes::from_static(b"!"))).await {
                return Err("tunnel closed");
            }
        }
        if headers.zrst && !self.send(Out::ResetCompressor).await {
            return Err("tunnel closed");
        }
        if let (Some(sid), Some(skb)) = (headers.sid, headers.skb)
            && let Some(entry) = lock(&self.sids).get(&sid)
        {
            entry.acked_kb.send_replace(Some(skb));
        }
        if headers.noop || headers.ping.is_some() || headers.pong.is_some() || headers.zrst {
            if is_control(&headers) {
                match self.control.try_send(headers) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        warn!(
                            "pagekite tunnel: control queue full, kite request or answer dropped"
                        );
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        debug!("pagekite tunnel: nobody reads control chunks; dropped");
                    }
                }
            }
            return Ok(());
        }
        let Some(sid) = headers.sid else {
            warn!("pagekite tunnel: data chunk without SID ignored");
            return Ok(());
        };
        if let Some(eof) = headers.eof {
            self.on_eof(sid, eof);
            return Ok(());
        }
        let known = lock(&self.sids)
            .get(&sid)
            .map(|entry| (entry.inbound.clone(), entry.buffer.clone()));
        if let Some((inbound, buffer)) = known {
            self.push_data(&inbound, &buffer, data).await;
            return Ok(());
        }
        match &self.end {
            End::Front => {
                // pagekite.py answers data for a stream it does not know
                // (e.g. one it just closed) with an EOF.
                debug!(sid, "pagekite tunnel: data for an unknown SID; EOF");
                self.refuse(sid, None).await;
            }
            End::Back { route, mux } => {
                self.open_back(sid, &headers, data, route, mux).await;
            }
        }
        Ok(())
    }

    /// Queues data for a SID's upstream task, waiting while its buffer is
    /// full (head-of-line: only a peer that ignores `SKB` gets here).
    async fn push_data(
        &self,
        inbound: &mpsc::UnboundedSender<Inbound>,
        buffer: &Arc<Semaphore>,
        data: Bytes,
    ) {
        if data.is_empty() {
            return;
        }
        // Bounded: a chunk is at most MAX_CHUNK == SID_BUFFER bytes.
        let permits = u32::try_from(data.len().min(SID_BUFFER)).unwrap_or(u32::MAX);
        let permit = tokio::select! {
            permit = buffer.clone().acquire_many_owned(permits) => permit,
            _ = self.token.cancelled() => return,
        };
        if let Ok(permit) = permit {
            // A send fails only when the SID's upstream task has ended:
            // the data has nowhere to go.
            let _ = inbound.send(Inbound::Data(data, permit));
        }
    }

    /// The peer closed one or both halves of a SID.
    fn on_eof(&self, sid: u32, eof: Eof) {
        let mut sids = lock(&self.sids);
        let Some(entry) = sids.get_mut(&sid) else {
            return;
        };
        if eof.read && !entry.eof_queued {
            entry.eof_queued = true;
            let _ = entry.inbound.send(Inbound::Eof);
        }
        if eof.write {
            entry.peer_stopped.cancel();
        }
    }

    /// A new SID at the back end: route it and open its stream, or refuse
    /// it like pagekite.py (503 page for http, TLS alert for https, then
    /// EOF).
    async fn open_back(
        self: &Arc<Self>,
        sid: u32,
        headers: &ChunkHeaders,
        data: Bytes,
        route: &Route,
        mux: &Mux,
    ) {
        let (Some(proto), Some(host)) = (&headers.proto, &headers.host) else {
            debug!(
                sid,
                "pagekite tunnel: data for an unknown SID without Proto/Host; EOF"
            );
            self.refuse(sid, None).await;
            return;
        };
        let dest = ChunkDest {
            proto: proto.to_ascii_lowercase(),
            host: host.to_ascii_lowercase(),
            port: headers.port.as_deref().and_then(|p| p.parse().ok()),
            rip: headers.rip.clone(),
            rport: headers.rport.as_deref().and_then(|p| p.parse().ok()),
            rtls: headers.rtls,
        };
        if lock(&self.sids).len() >= self.config.max_streams {
            warn!(
                sid,
                max = self.config.max_streams,
                "pagekite tunnel: too many streams; refused"
            );
            self.refuse(sid, refusal_page(&dest)).await;
            return;
        }
        let Some(visitor) = route(&dest) else {
            debug!(sid, proto = ?dest.proto, host = ?dest.host, "pagekite tunnel: no kite for the stream; refused");
            self.refuse(sid, refusal_page(&dest)).await;
            return;
        };
        let header = message::encode(&StreamHeader::Visitor(visitor));
        let stream = tokio::select! {
            stream = mux.open(header) => stream,
            _ = self.token.cancelled() => return,
        };
        let Ok(stream) = stream else {
            return;
        };
        let refusal = refusal_page(&dest);
        let Some((inbound, buffer)) = self.spawn_sid(sid, stream, None, refusal) else {
            return;
        };
        self.push_data(&inbound, &buffer, data).await;
    }

    /// Refuses or ends a SID the way pagekite.py does: `page` first if
    /// there is one (a 503 for http, an alert for https: [`refusal_page`]),
    /// then EOF both ways.
    async fn refuse(&self, sid: u32, page: Option<Bytes>) {
        if let Some(page) = page {
            let _ = self.send(Out::Data(ChunkHeaders::sid(sid), page)).await;
        }
        let _ = self
            .send_eof(
                sid,
                Eof {
                    write: true,
                    read: true,
                },
            )
            .await;
    }

    /// Registers a SID and starts its two tasks. `opening`: the headers of
    /// the first chunk (front end). `refusal`: what to send the peer if
    /// the stream is reset before it sent anything (back end). None if the
    /// SID is taken (the peer reused a live one).
    fn spawn_sid(
        self: &Arc<Self>,
        sid: u32,
        stream: MuxStream,
        opening: Option<ChunkHeaders>,
        refusal: Option<Bytes>,
    ) -> Option<(mpsc::UnboundedSender<Inbound>, Arc<Semaphore>)> {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let (inbound, inbound_rx) = mpsc::unbounded_channel();
        let buffer = Arc::new(Semaphore::new(SID_BUFFER));
        let (acked_kb, acked_rx) = watch::channel(None);
        let peer_stopped = CancellationToken::new();
        let token = self.token.child_token();
        {
            let mut sids = lock(&self.sids);
            if sids.contains_key(&sid) {
                return None;
            }
            sids.insert(
                sid,
                SidEntry {
                    generation,
                    inbound: inbound.clone(),
                    buffer: buffer.clone(),
                    eof_queued: false,
                    acked_kb,
                    peer_stopped: peer_stopped.clone(),
                    token: token.clone(),
                },
            );
        }
        let guard = Arc::new(SidGuard {
            pump: self.clone(),
            sid,
            generation,
        });
        let (reader, writer) = tokio::io::split(stream);
        let span = tracing::debug_span!("sid", sid);
        self.tracker.spawn(
            run_upstream(
                self.clone(),
                sid,
                writer,
                inbound_rx,
                token.clone(),
                guard.clone(),
            )
            .instrument(span.clone()),
        );
        self.tracker.spawn(
            run_downstream(Downstream {
                pump: self.clone(),
                sid,
                reader,
                opening,
                refusal,
                acked: acked_rx,
                peer_stopped,
                token,
                _guard: guard,
            })
            .instrument(span),
        );
        Some((inbound, buffer))
    }

    /// A free SID number (front end), or None when all are taken.
    fn free_sid(&self, sids: &HashMap<u32, SidEntry>) -> Option<u32> {
        for _ in 0..=sids.len() {
            let sid = self.next_sid.fetch_add(1, Ordering::Relaxed);
            if sid != 0 && !sids.contains_key(&sid) {
                return Some(sid);
            }
        }
        None
    }
}

/// Removes a SID's entry when both its tasks have ended.
struct SidGuard {
    pump: Arc<Pump>,
    sid: u32,
    generation: u64,
}

impl Drop for SidGuard {
    fn drop(&mut self) {
        let mut sids = lock(&self.pump.sids);
        if sids
            .get(&self.sid)
            .is_some_and(|entry| entry.generation == self.generation)
            && let Some(entry) = sids.remove(&self.sid)
        {
            entry.token.cancel();
        }
    }
}

/// True if a NOOP carries something for the handshake layer.
fn is_control(headers: &ChunkHeaders) -> bool {
    !headers.requests.is_empty()
        || !headers.answers.is_empty()
        || headers.other.iter().any(|(name, _)| {
            name.starts_with("x-pagekite") || matches!(name.as_str(), "quota" | "qdays" | "qconns")
        })
}

/// At most `max` bytes of `text`, cut at a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Reads chunks until the peer goes away, breaks the framing, or is
/// silent for `idle_timeout`; then ends the tunnel.
async fn run_reader<R>(pump: Arc<Pump>, mut io: R, mut buf: BytesMut)
where
    R: AsyncRead + Unpin,
{
    let mut decoder = ChunkDecoder::new();
    let idle = pump.config.idle_timeout;
    let mut deadline = Instant::now() + idle;
    'tunnel: loop {
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(chunk)) => {
                    if let Err(reason) = pump.on_chunk(chunk).await {
                        debug!(reason, "pagekite tunnel: reader stops");
                        break 'tunnel;
                    }
                }
                Ok(None) => break,
                Err(err @ PageKiteError::Corrupt { .. }) => {
                    // pagekite.py's ProcessCorruptChunk: ask the peer to
                    // reset its compressor; the chunk is lost.
                    warn!(%err, "pagekite tunnel: corrupt chunk; asking the peer for ZRST");
                    let zrst = ChunkHeaders {
                        zrst: true,
                        ..ChunkHeaders::noop()
                    };
                    if !pump.send(Out::Plain(zrst, Bytes::from_static(b"!"))).await {
                        break 'tunnel;
                    }
                }
                Err(PageKiteError::EmptyChunk) => {
                    info!("pagekite tunnel: the peer closed it (zero-length chunk)");
                    break 'tunnel;
                }
                Err(err) => {
                    warn!(%err, "pagekite tunnel: bad chunk from the peer; closing the tunnel");
                    break 'tunnel;
                }
            }
        }
        if buf.capacity() - buf.len() < READ_CHUNK {
            buf.reserve(READ_CHUNK);
        }
        let res = tokio::select! {
            res = io.read_buf(&mut buf) => res,
            _ = tokio::time::sleep_until(deadline) => {
                warn!(?idle, "pagekite tunnel: nothing from the peer; closing the tunnel");
                break 'tunnel;
            }
            _ = pump.token.cancelled() => break 'tunnel,
        };
        match res {
            Ok(0) => {
                info!("pagekite tunnel: the peer closed the connection");
                break;
            }
            Ok(_) => deadline = Instant::now() + idle,
            Err(err) => {
                info!(%err, "pagekite tunnel: reading failed");
                break;
            }
        }
    }
    pump.token.cancel();
}

/// Encodes and writes every chunk, batching what is queued.
async fn run_writer<W>(
    mut io: W,
    mut rx: mpsc::Receiver<Out>,
    mut control: mpsc::Receiver<ChunkHeaders>,
    compress: bool,
    stall: Duration,
    token: CancellationToken,
) where
    W: AsyncWrite + Unpin,
{
    let mut encoder = ChunkEncoder::new(compress);
    let mut buf = BytesMut::new();
    let encode = |encoder: &mut ChunkEncoder, buf: &mut BytesMut, out: Out| match out {
        Out::Data(headers, data) => encoder.encode(&headers, &data, buf),
        Out::Plain(headers, data) => encoder.encode_plain(&headers, &data, buf),
        Out::ResetCompressor => encoder.reset(),
    };
    let noop = |headers| Out::Plain(headers, Bytes::from_static(b"!"));
    let mut control_open = true;
    loop {
        let first = tokio::select! {
            biased;
            _ = token.cancelled() => break,
            headers = control.recv(), if control_open => match headers {
                Some(headers) => Some(noop(headers)),
                None => {
                    control_open = false;
                    continue;
                }
            },
            out = rx.recv() => out,
        };
        let Some(first) = first else { break };
        encode(&mut encoder, &mut buf, first);
        while buf.len() < WRITE_BATCH {
            if let Ok(headers) = control.try_recv() {
                encode(&mut encoder, &mut buf, noop(headers));
                continue;
            }
            match rx.try_recv() {
                Ok(out) => encode(&mut encoder, &mut buf, out),
                Err(_) => break,
            }
        }
        if buf.is_empty() {
            continue;
        }
        // A peer that stops reading cannot hold the tunnel (and its
        // streams) forever: a write that makes no progress for `stall`
        // (the idle timeout) ends it.
        let res = tokio::select! {
            res = tokio::time::timeout(stall, async {
                io.write_all(&buf).await?;
                io.flush().await
            }) => res,
            _ = token.cancelled() => break,
        };
        buf.clear();
        match res {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                info!(%err, "pagekite tunnel: writing failed");
                break;
            }
            Err(_) => {
                warn!(
                    ?stall,
                    "pagekite tunnel: the peer reads nothing; closing the tunnel"
                );
                break;
            }
        }
    }
    token.cancel();
}

/// Sends a `PING` every `ping_interval` (pagekite.py's `NOOP: 1` +
/// `PING: <time>` + `!`).
async fn run_pinger(pump: Arc<Pump>) {
    let started = Instant::now();
    let every = pump.config.ping_interval;
    let mut ticks = tokio::time::interval_at(started + every, every);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = pump.token.cancelled() => break,
        }
        let ping = ChunkHeaders {
            ping: Some(format!("{:.4}", started.elapsed().as_secs_f64())),
            ..ChunkHeaders::noop()
        };
        if !pump.send(Out::Plain(ping, Bytes::from_static(b"!"))).await {
            break;
        }
    }
}

/// Front end: turns each visitor stream the relay opens into a SID.
async fn run_acceptor(pump: Arc<Pump>, mut receivers: MuxReceivers) {
    loop {
        tokio::select! {
            incoming = receivers.incoming.recv() => match incoming {
                Some(incoming) => accept_visitor(&pump, incoming),
                None => break,
            },
            // The relay sends no control messages on a PageKite link.
            control = receivers.control.recv() => if control.is_none() { break },
            _ = pump.token.cancelled() => break,
        }
    }
}

/// Front end: a new visitor stream becomes a SID whose first chunk names
/// it (Proto, Host, Port, RIP, RPort).
fn accept_visitor(pump: &Arc<Pump>, incoming: IncomingStream) {
    let IncomingStream { header, mut stream } = incoming;
    let visitor = match message::decode::<StreamHeader>(&header) {
        Ok(StreamHeader::Visitor(visitor)) => visitor,
        Ok(_) | Err(_) => {
            stream.reset(
                ResetCode::Refused,
                "a PageKite back-end serves visitor streams only",
            );
            return;
        }
    };
    let sid = {
        let sids = lock(&pump.sids);
        if sids.len() >= pump.config.max_streams {
            None
        } else {
            pump.free_sid(&sids)
        }
    };
    let Some(sid) = sid else {
        warn!(
            max = pump.config.max_streams,
            "pagekite tunnel: too many streams; visitor refused"
        );
        stream.reset(ResetCode::Busy, "too many streams on this PageKite tunnel");
        return;
    };
    let opening = opening_headers(sid, &visitor);
    debug!(sid, proto = ?opening.proto, host = ?opening.host, "pagekite tunnel: new stream");
    // The SID was free under the lock and only this task takes SIDs.
    let _ = pump.spawn_sid(sid, stream, Some(opening), None);
}

/// The first chunk's headers for a visitor (front end).
fn opening_headers(sid: u32, visitor: &VisitorHeader) -> ChunkHeaders {
    let proto = match visitor.kite.proto {
        KiteProto::Http => "http",
        KiteProto::Https => "https",
        KiteProto::Tcp => "raw",
    };
    let host = visitor
        .host
        .as_deref()
        .map(strip_port)
        .unwrap_or(&visitor.kite.name)
        .to_string();
    let relay_port = visitor
        .relay_addr
        .as_deref()
        .and_then(|addr| addr.parse::<SocketAddr>().ok())
        .map(|addr| addr.port());
    let port = match visitor.kite.proto {
        KiteProto::Tcp if visitor.kite.port != 0 => Some(visitor.kite.port),
        _ => relay_port,
    };
    let peer = visitor.peer.parse::<SocketAddr>().ok();
    ChunkHeaders {
        proto: Some(proto.to_string()),
        host: Some(host),
        port: port.map(|p| p.to_string()),
        rip: peer.map(|p| p.ip().to_canonical().to_string()),
        rport: peer.map(|p| p.port().to_string()),
        ..ChunkHeaders::sid(sid)
    }
}

/// `name` without a `:port` suffix (a Host header may carry one).
fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    }
}

/// What pagekite.py sends a visitor whose stream the back-end cannot
/// serve: its 503 page for http, a TLS `access_denied` alert for https.
fn refusal_page(dest: &ChunkDest) -> Option<Bytes> {
    match dest.proto.as_str() {
        "http" | "http2" | "http3" | "websocket" => {
            // The host came from the peer: keep it to DNS characters.
            let host: String = dest
                .host
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '*' | '_'))
                .take(253)
                .collect();
            let body = format!(
                "<html><body><h1>Sorry! (be)</h1><p>The {} <i>PageKite</i> for <b>{host}</b> \
                 is unavailable at the moment.</p><p>Please try again later.</p></body></html>\n",
                dest.proto.to_ascii_uppercase()
            );
            Some(Bytes::from(format!(
                "HTTP/1.1 503 Unavailable\r\nContent-Type: text/html; charset=utf-8\r\n\
                 Pragma: no-cache\r\nExpires: 0\r\nCache-Control: no-store\r\nConnection: close\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            )))
        }
        "https" => Some(Bytes::from_static(&[0x15, 3, 3, 0, 2, 2, 49])),
        _ => None,
    }
}

/// Drains a Mux's receivers nobody else serves: streams opened toward the
/// pump's side are refused, control messages ignored.
async fn drain(mut receivers: MuxReceivers, token: CancellationToken) {
    loop {
        tokio::select! {
            incoming = receivers.incoming.recv() => match incoming {
                Some(mut incoming) => incoming.stream.reset(ResetCode::Refused, "not served over a PageKite tunnel"),
                None => break,
            },
            control = receivers.control.recv() => if control.is_none() { break },
            _ = token.cancelled() => break,
        }
    }
}

/// Peer data -> the MuxStream; `SKB` progress back to the peer.
async fn run_upstream(
    pump: Arc<Pump>,
    sid: u32,
    mut writer: WriteHalf<MuxStream>,
    mut inbound: mpsc::UnboundedReceiver<Inbound>,
    token: CancellationToken,
    _guard: Arc<SidGuard>,
) {
    let mut written: u64 = 0;
    let mut reported_kb: u64 = 0;
    let mut broken = false;
    loop {
        let item = tokio::select! {
            biased;
            _ = token.cancelled() => break,
            item = inbound.recv() => item,
        };
        match item {
            None => break,
            Some(Inbound::Data(data, permit)) => {
                if broken {
                    continue;
                }
                let res = tokio::select! {
                    res = writer.write_all(&data) => res,
                    _ = token.cancelled() => break,
                };
                drop(permit);
                if let Err(err) = res {
                    // The kitepipe side reset the stream: the downstream
                    // task sees it too and tells the peer.
                    debug!(sid, %err, "pagekite stream: writing to the stream failed");
                    broken = true;
                    continue;
                }
                written += data.len() as u64;
                // Progress every SKB_STEP_KB, and whenever the queue runs
                // dry (so the peer always learns the final count): fewer
                // tiny chunks for pagekite.py's 150-per-read limit.
                let kb = written / 1024;
                if kb != reported_kb && (kb - reported_kb >= SKB_STEP_KB || inbound.is_empty()) {
                    reported_kb = kb;
                    let progress = ChunkHeaders {
                        skb: Some(kb),
                        ..ChunkHeaders {
                            noop: true,
                            ..ChunkHeaders::sid(sid)
                        }
                    };
                    if !pump.send(Out::Plain(progress, Bytes::new())).await {
                        break;
                    }
                }
            }
            Some(Inbound::Eof) => {
                if !broken {
                    let _ = writer.shutdown().await;
                }
                break;
            }
        }
    }
}

/// A SID's downstream task and what it needs.
struct Downstream {
    pump: Arc<Pump>,
    sid: u32,
    reader: ReadHalf<MuxStream>,
    /// Front end: the first chunk's headers, sent with the first data.
    opening: Option<ChunkHeaders>,
    /// Back end: what the peer gets if the stream is reset before it sent
    /// anything.
    refusal: Option<Bytes>,
    acked: watch::Receiver<Option<u64>>,
    peer_stopped: CancellationToken,
    token: CancellationToken,
    _guard: Arc<SidGuard>,
}

/// MuxStream -> data chunks, paced by the peer's `SKB`.
async fn run_downstream(mut task: Downstream) {
    let pump = task.pump.clone();
    let sid = task.sid;
    // A raw stream's server may speak first: name it to the peer now. An
    // http or https visitor's first bytes follow at once (the relay has
    // read them already) and go out with the opening, like pagekite.py.
    let raw = task
        .opening
        .as_ref()
        .is_some_and(|h| h.proto.as_deref() == Some("raw"));
    if raw
        && let Some(opening) = task.opening.take()
        && !pump.send(Out::Data(opening, Bytes::new())).await
    {
        return;
    }
    let mut sent: u64 = 0;
    let mut buf = vec![0u8; FRAGMENT];
    let mut stopped_at: Option<Instant> = None;
    loop {
        if stopped_at.is_none() && task.peer_stopped.is_cancelled() {
            stopped_at = Some(Instant::now());
        }
        if stopped_at.is_none() && !wait_for_credit(&mut task, sent).await {
            return;
        }
        let linger = async {
            match stopped_at {
                Some(at) => tokio::time::sleep_until(at + LINGER).await,
                None => std::future::pending().await,
            }
        };
        let res = tokio::select! {
            res = task.reader.read(&mut buf) => res,
            _ = task.peer_stopped.cancelled(), if stopped_at.is_none() => continue,
            _ = linger => {
                debug!(sid, "pagekite stream: the far side lingered; dropping it");
                task.token.cancel();
                return;
            }
            _ = task.token.cancelled() => return,
        };
        match res {
            Ok(0) => {
                if stopped_at.is_none() {
                    if task.opening.is_some() {
                        // Nothing was sent yet: the peer never heard of
                        // this SID, and nothing will come for it.
                        task.token.cancel();
                        return;
                    }
                    // pagekite.py's SendStreamEof(read_eof=True).
                    let _ = pump
                        .send_eof(
                            sid,
                            Eof {
                                write: false,
                                read: true,
                            },
                        )
                        .await;
                }
                return;
            }
            Ok(mut n) => {
                if stopped_at.is_some() {
                    continue;
                }
                // Whatever else the stream holds already goes in the same
                // chunk: pagekite.py decodes at most 150 chunks per read of
                // its tunnel (~50 KB) and gives the tunnel up beyond that,
                // so a chatty stream must not become a stream of tiny
                // chunks.
                while n < buf.len() {
                    match read_now(&mut task.reader, &mut buf[n..]) {
                        Some(Ok(more)) if more > 0 => n += more,
                        // EOF, an error or nothing yet: the next read says.
                        _ => break,
                    }
                }
                let headers = task
                    .opening
                    .take()
                    .unwrap_or_else(|| ChunkHeaders::sid(sid));
                task.refusal = None;
                sent += n as u64;
                if !pump
                    .send(Out::Data(headers, Bytes::copy_from_slice(&buf[..n])))
                    .await
                {
                    return;
                }
            }
            Err(err) => {
                debug!(sid, %err, "pagekite stream: reset by the kitepipe side");
                if task.opening.is_none() && stopped_at.is_none() {
                    pump.refuse(sid, task.refusal.take()).await;
                }
                task.token.cancel();
                return;
            }
        }
    }
}

/// Reads what `reader` holds right now, without waiting; None if it has
/// nothing yet (the next `read().await` registers the real waker).
fn read_now(reader: &mut ReadHalf<MuxStream>, buf: &mut [u8]) -> Option<std::io::Result<usize>> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut read_buf = tokio::io::ReadBuf::new(buf);
    match std::pin::Pin::new(reader).poll_read(&mut cx, &mut read_buf) {
        std::task::Poll::Ready(Ok(())) => Some(Ok(read_buf.filled().len())),
        std::task::Poll::Ready(Err(err)) => Some(Err(err)),
        std::task::Poll::Pending => None,
    }
}

/// Waits until the peer's `SKB` lets us send more on this SID (if it ever
/// sent one). False when the SID or tunnel ended. Cancel-safe.
async fn wait_for_credit(task: &mut Downstream, sent: u64) -> bool {
    loop {
        let acked = *task.acked.borrow_and_update();
        let Some(acked_kb) = acked else {
            return true;
        };
        if (sent / 1024).saturating_sub(acked_kb) < SEND_WINDOW_KB {
            return true;
        }
        tokio::select! {
            res = task.acked.changed() => if res.is_err() { return false },
            _ = task.peer_stopped.cancelled() => return true,
            _ = task.token.cancelled() => return false,
        }
    }
}

#[cfg(test)]
mod tests;
