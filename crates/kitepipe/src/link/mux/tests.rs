use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kitepipe_proto::frame::{Frame, ResetCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use std::pin::Pin;
use std::task::{Context, Poll};

use super::reader::FrameReader;
use super::*;
use crate::link::LinkClosed;

struct Pair {
    connector: Mux,
    connector_rx: MuxReceivers,
    relay: Mux,
    relay_rx: MuxReceivers,
    tracker: TaskTracker,
    token: CancellationToken,
}

fn pair_with(buffer: usize, config: MuxConfig) -> Pair {
    let (a, b) = tokio::io::duplex(buffer);
    let tracker = TaskTracker::new();
    let token = CancellationToken::new();
    let (connector, connector_rx) = Mux::start(
        a,
        BytesMut::new(),
        Side::Connector,
        &config,
        &tracker,
        token.child_token(),
    );
    let (relay, relay_rx) = Mux::start(
        b,
        BytesMut::new(),
        Side::Relay,
        &config,
        &tracker,
        token.child_token(),
    );
    Pair {
        connector,
        connector_rx,
        relay,
        relay_rx,
        tracker,
        token,
    }
}

fn pair() -> Pair {
    pair_with(64, MuxConfig::default())
}

impl Pair {
    async fn shutdown(self) {
        self.token.cancel();
        self.tracker.close();
        tokio::time::timeout(Duration::from_secs(5), self.tracker.wait())
            .await
            .expect("link tasks stop after cancel");
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test]
async fn streams_carry_bytes_both_ways_with_half_close() {
    let mut p = pair();
    let mut opened = p.relay.open(Bytes::from_static(b"hdr")).await.unwrap();
    let incoming = p.connector_rx.incoming.recv().await.unwrap();
    assert_eq!(&incoming.header[..], b"hdr");
    let mut accepted = incoming.stream;

    let up = pattern(300_000, 1);
    let down = pattern(200_000, 2);
    let up_clone = up.clone();
    let writer = tokio::spawn(async move {
        opened.write_all(&up_clone).await.unwrap();
        opened.shutdown().await.unwrap();
        let mut back = Vec::new();
        opened.read_to_end(&mut back).await.unwrap();
        back
    });
    let mut got = Vec::new();
    accepted.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, up, "half-closed direction delivers everything");
    accepted.write_all(&down).await.unwrap();
    accepted.shutdown().await.unwrap();
    assert_eq!(writer.await.unwrap(), down);
    drop(accepted);
    p.shutdown().await;
}

#[tokio::test]
async fn a_stalled_stream_does_not_block_others() {
    let config = MuxConfig {
        stream_window: 64 * 1024,
        ..MuxConfig::default()
    };
    let mut p = pair_with(4096, config);
    let mut stalled = p.relay.open(Bytes::from_static(b"stalled")).await.unwrap();
    let _stalled_peer = p.connector_rx.incoming.recv().await.unwrap();
    // Fill the stalled stream's window; nobody reads it.
    let filler = vec![7u8; 64 * 1024];
    stalled.write_all(&filler).await.unwrap();
    let blocked =
        tokio::time::timeout(Duration::from_millis(200), stalled.write_all(b"more")).await;
    assert!(blocked.is_err(), "writer waits when the window is used up");

    let mut busy = p.relay.open(Bytes::from_static(b"busy")).await.unwrap();
    let mut busy_peer = p.connector_rx.incoming.recv().await.unwrap().stream;
    let data = pattern(1_000_000, 3);
    let data_clone = data.clone();
    let send = tokio::spawn(async move {
        busy.write_all(&data_clone).await.unwrap();
        busy.shutdown().await.unwrap();
        busy
    });
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), busy_peer.read_to_end(&mut got))
        .await
        .expect("other stream keeps flowing")
        .unwrap();
    assert_eq!(got, data);
    drop(send.await.unwrap());
    drop(stalled);
    p.shutdown().await;
}

#[tokio::test]
async fn dropping_a_stream_resets_it_on_the_peer() {
    let mut p = pair();
    let opened = p.connector.open(Bytes::from_static(b"x")).await.unwrap();
    let mut accepted = p.relay_rx.incoming.recv().await.unwrap().stream;
    drop(opened);
    let mut buf = [0u8; 16];
    let err = accepted.read(&mut buf).await.unwrap_err();
    let reset = err
        .get_ref()
        .unwrap()
        .downcast_ref::<StreamReset>()
        .unwrap();
    assert_eq!(reset.code, ResetCode::Cancel);
    drop(accepted);
    tokio::time::timeout(Duration::from_secs(5), async {
        while p.relay.stream_count() + p.connector.stream_count() > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("both sides forget the stream");
    p.shutdown().await;
}

#[tokio::test]
async fn explicit_reset_reason_reaches_the_peer() {
    let mut p = pair();
    let mut opened = p.relay.open(Bytes::from_static(b"x")).await.unwrap();
    let mut accepted = p.connector_rx.incoming.recv().await.unwrap().stream;
    accepted.reset(ResetCode::TargetUnreachable, "connect 127.0.0.1:1: refused");
    let mut buf = [0u8; 4];
    let err = opened.read(&mut buf).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(err.to_string().contains("127.0.0.1:1: refused"), "{err}");
    p.shutdown().await;
}

#[tokio::test]
async fn control_messages_arrive_in_order() {
    let mut p = pair();
    for i in 0..10u8 {
        p.connector
            .send_control(Bytes::from(vec![i; 3]))
            .await
            .unwrap();
    }
    for i in 0..10u8 {
        assert_eq!(p.relay_rx.control.recv().await.unwrap(), vec![i; 3]);
    }
    p.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_silent_peer_is_declared_dead_after_the_heartbeat() {
    let (a, mut b) = tokio::io::duplex(1024);
    let tracker = TaskTracker::new();
    let token = CancellationToken::new();
    let config = MuxConfig {
        heartbeat: Duration::from_secs(15),
        ..MuxConfig::default()
    };
    let (mux, _rx) = Mux::start(
        a,
        BytesMut::new(),
        Side::Connector,
        &config,
        &tracker,
        token.clone(),
    );
    // The peer reads (so writes don't block) but never answers.
    let drain = tokio::spawn(async move {
        let mut sink = [0u8; 1024];
        while let Ok(n) = b.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    });
    let reason = tokio::time::timeout(Duration::from_secs(30), mux.closed())
        .await
        .expect("link declared dead");
    assert!(
        matches!(reason, LinkClosed::HeartbeatTimeout(d) if d >= Duration::from_secs(15) && d <= Duration::from_secs(21)),
        "{reason:?}"
    );
    tracker.close();
    tracker.wait().await;
    drain.abort();
}

#[tokio::test(start_paused = true)]
async fn pings_keep_an_idle_link_alive() {
    let config = MuxConfig {
        heartbeat: Duration::from_secs(3),
        ..MuxConfig::default()
    };
    let p = pair_with(64, config);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(!p.connector.is_closed() && !p.relay.is_closed());
    p.shutdown().await;
}

#[tokio::test]
async fn garbage_from_the_peer_closes_the_link_with_a_protocol_error() {
    let (a, mut b) = tokio::io::duplex(64);
    let tracker = TaskTracker::new();
    let (mux, _rx) = Mux::start(
        a,
        BytesMut::new(),
        Side::Relay,
        &MuxConfig::default(),
        &tracker,
        CancellationToken::new(),
    );
    b.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(5), mux.closed())
        .await
        .unwrap();
    assert!(matches!(reason, LinkClosed::BadFrame(_)), "{reason:?}");
    tracker.close();
    tokio::time::timeout(Duration::from_secs(5), tracker.wait())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_peer_overrunning_its_window_gets_the_stream_reset() {
    let (a, mut b) = tokio::io::duplex(1 << 20);
    let tracker = TaskTracker::new();
    let config = MuxConfig {
        stream_window: 1024,
        ..MuxConfig::default()
    };
    let (_mux, mut rx) = Mux::start(
        a,
        BytesMut::new(),
        Side::Relay,
        &config,
        &tracker,
        CancellationToken::new(),
    );
    let mut wire = BytesMut::new();
    Frame::Open {
        stream: 1,
        header: Bytes::from_static(b"h"),
    }
    .encode(&mut wire);
    Frame::Data {
        stream: 1,
        payload: Bytes::from(vec![0u8; 2048]),
    }
    .encode(&mut wire);
    b.write_all(&wire).await.unwrap();
    let mut stream = rx.incoming.recv().await.unwrap().stream;
    let mut buf = [0u8; 16];
    let err = stream.read(&mut buf).await.unwrap_err();
    assert!(err.to_string().contains("window"), "{err}");
    // The peer is told with a RESET frame.
    let mut seen = BytesMut::new();
    let reset = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            b.read_buf(&mut seen).await.unwrap();
            while let Some(frame) = Frame::decode(&mut seen).unwrap() {
                if let Frame::Reset {
                    stream: 1, code, ..
                } = frame
                {
                    return code;
                }
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(reset, ResetCode::ProtocolError);
}

/// Frames split into chunks of every size: DATA payloads arrive in order
/// and whole per stream, other frames exactly as sent.
#[test]
fn frames_come_out_whole_however_the_chunks_fall() {
    let frames = vec![
        Frame::Open {
            stream: 1,
            header: Bytes::from(vec![b'h'; 300]),
        },
        Frame::Data {
            stream: 1,
            payload: Bytes::from(pattern(70_000, 1)),
        },
        Frame::Window {
            stream: 1,
            increment: 4096,
        },
        Frame::Data {
            stream: 3,
            payload: Bytes::from(pattern(5, 2)),
        },
        Frame::Data {
            stream: 3,
            payload: Bytes::new(),
        },
        Frame::Control {
            payload: Bytes::from(vec![b'c'; 20_000]),
        },
        Frame::Data {
            stream: 1,
            payload: Bytes::from(pattern(9, 3)),
        },
        Frame::Fin { stream: 1 },
        Frame::Ping { payload: 7 },
    ];
    let mut wire = BytesMut::new();
    for frame in &frames {
        frame.encode(&mut wire);
    }
    for size in [
        1,
        2,
        5,
        8,
        9,
        10,
        17,
        100,
        4096,
        16 * 1024,
        100_000,
        wire.len(),
    ] {
        let mut reader = FrameReader::default();
        let mut data: std::collections::HashMap<u32, Vec<u8>> = Default::default();
        let mut others = Vec::new();
        for piece in wire.chunks(size) {
            reader.chunk = BytesMut::from(piece);
            while let Some(frame) = reader.next_frame().unwrap() {
                match frame {
                    Frame::Data { stream, payload } => {
                        data.entry(stream).or_default().extend_from_slice(&payload)
                    }
                    other => others.push(other),
                }
            }
            assert!(reader.chunk.is_empty());
        }
        let mut want = frames.clone();
        want.retain(|f| !matches!(f, Frame::Data { .. }));
        assert_eq!(others, want, "chunk size {size}");
        let mut one = pattern(70_000, 1);
        one.extend_from_slice(&pattern(9, 3));
        assert!(data[&1] == one, "chunk size {size}");
        assert_eq!(data[&3], pattern(5, 2), "chunk size {size}");
        assert!(reader.pending.is_empty() && reader.data_left.is_none());
    }
}

#[test]
fn a_bad_header_split_across_chunks_is_still_refused() {
    let mut reader = FrameReader::default();
    // DATA on the link stream (0) is a protocol error.
    let wire = [0u8, 0, 0, 0, 0, 0, 0, 0, 5, 1, 2, 3, 4, 5];
    reader.chunk = BytesMut::from(&wire[..4]);
    assert!(reader.next_frame().unwrap().is_none());
    reader.chunk = BytesMut::from(&wire[4..]);
    assert!(reader.next_frame().is_err());
}

/// Counts the writes the mux makes to the link.
struct CountingWriter<W> {
    inner: W,
    writes: Arc<std::sync::atomic::AtomicUsize>,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for CountingWriter<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// On a multi-thread runtime a woken writer runs right after the task that
// woke it (tokio's LIFO slot): without the writer's one pass of waiting,
// every stream's small frame went out in a write of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn small_frames_of_streams_ready_together_share_a_write() {
    const STREAMS: usize = 32;
    let (a, b) = tokio::io::duplex(1 << 20);
    let tracker = TaskTracker::new();
    let token = CancellationToken::new();
    let config = MuxConfig::default();
    let writes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (a_read, a_write) = tokio::io::split(a);
    let (relay, _relay_rx) = Mux::start_parts(
        Box::new(ReadChunks::new(a_read)),
        Box::new(CountingWriter {
            inner: a_write,
            writes: writes.clone(),
        }),
        BytesMut::new(),
        Side::Relay,
        &config,
        &tracker,
        token.child_token(),
    );
    let (_connector, mut connector_rx) = Mux::start(
        b,
        BytesMut::new(),
        Side::Connector,
        &config,
        &tracker,
        token.child_token(),
    );
    let mut senders = Vec::new();
    let mut peers = Vec::new();
    for i in 0..STREAMS {
        let stream = relay.open(Bytes::from(format!("s{i}"))).await.unwrap();
        peers.push(connector_rx.incoming.recv().await.unwrap().stream);
        senders.push(stream);
    }
    let before = writes.load(Ordering::Relaxed);
    // The senders are woken from outside the runtime, as readiness of their
    // sockets would wake them, and each is parked before the wake.
    let go = Arc::new(tokio::sync::Notify::new());
    let tasks: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(i, mut stream)| {
            let mut notified = Box::pin(go.clone().notified_owned());
            notified.as_mut().enable();
            tokio::spawn(async move {
                notified.await;
                stream.write_all(&pattern(100, i as u8)).await.unwrap();
                stream
            })
        })
        .collect();
    std::thread::spawn(move || go.notify_waiters())
        .join()
        .unwrap();
    let mut kept = Vec::new();
    for task in tasks {
        kept.push(task.await.unwrap());
    }
    for (i, peer) in peers.iter_mut().enumerate() {
        let mut got = vec![0u8; 100];
        tokio::time::timeout(Duration::from_secs(5), peer.read_exact(&mut got))
            .await
            .expect("every stream's bytes arrive")
            .unwrap();
        assert_eq!(got, pattern(100, i as u8));
    }
    let used = writes.load(Ordering::Relaxed) - before;
    assert!(
        used <= STREAMS / 4,
        "{STREAMS} small frames ready together took {used} writes"
    );
    drop(kept);
    token.cancel();
    tracker.close();
    tracker.wait().await;
}

/// A mux on one end of a duplex whose other end the test drives by hand.
fn lone(
    buffer: usize,
    config: MuxConfig,
) -> (Mux, MuxReceivers, tokio::io::DuplexStream, TaskTracker) {
    let (a, b) = tokio::io::duplex(buffer);
    let tracker = TaskTracker::new();
    let (mux, rx) = Mux::start(
        a,
        BytesMut::new(),
        Side::Relay,
        &config,
        &tracker,
        CancellationToken::new(),
    );
    (mux, rx, b, tracker)
}

#[tokio::test(start_paused = true)]
async fn a_ping_flood_from_a_peer_that_never_reads_owes_one_pong_and_is_cut() {
    let heartbeat = Duration::from_secs(3);
    let config = MuxConfig {
        heartbeat,
        ..MuxConfig::default()
    };
    let (mux, _rx, mut peer, tracker) = lone(64 * 1024, config);
    let mut wire = BytesMut::new();
    for payload in 0..10_000u64 {
        Frame::Ping { payload }.encode(&mut wire);
    }
    // Keep sending (the link sees traffic all along) and never read.
    let flood = async {
        for _ in 0..40 {
            if peer.write_all(&wire).await.is_err() {
                // The link is gone: its reason is what counts.
                std::future::pending::<()>().await;
            }
            {
                let urgent = lock(&mux.shared.urgent);
                assert!(urgent.frames.is_empty() && urgent.bytes == 0);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    tokio::select! {
        _ = flood => panic!("the link outlived 10s of pings from a peer that never reads"),
        reason = mux.closed() => assert!(
            matches!(reason, LinkClosed::Unresponsive(d) if d > 2 * heartbeat && d <= 3 * heartbeat),
            "{reason:?}"
        ),
    }
    tracker.close();
    tracker.wait().await;
}

#[tokio::test]
async fn refused_streams_from_a_peer_that_never_reads_close_the_link_at_the_backlog_bound() {
    let (mux, _rx, mut peer, tracker) = lone(64 * 1024, MuxConfig::default());
    // Nobody accepts: past ACCEPT_QUEUE, every OPEN is answered with a
    // RESET that the peer never reads.
    let flood = async {
        let mut wire = BytesMut::new();
        for stream in (1..200_000u32).step_by(2) {
            Frame::Open {
                stream,
                header: Bytes::from_static(b"h"),
            }
            .encode(&mut wire);
            if wire.len() > 16 * 1024 {
                if peer.write_all(&wire).await.is_err() {
                    return;
                }
                wire.clear();
            }
            assert!(lock(&mux.shared.urgent).bytes <= URGENT_BACKLOG);
        }
    };
    let reason = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(flood, mux.closed()).1
    })
    .await
    .expect("the link is closed");
    assert_eq!(reason, LinkClosed::Backlog(URGENT_BACKLOG));
    tracker.close();
    tracker.wait().await;
}

#[tokio::test(start_paused = true)]
async fn made_up_pongs_do_not_keep_a_link_alive() {
    let heartbeat = Duration::from_secs(3);
    let config = MuxConfig {
        heartbeat,
        ..MuxConfig::default()
    };
    let (mux, _rx, mut peer, tracker) = lone(1 << 20, config);
    // PONGs with the payloads an earlier version used (microseconds since
    // the link started) and a few guesses: none echoes a ping.
    let guesses = async {
        for i in 0..40u64 {
            let mut wire = BytesMut::new();
            for payload in [i * 250_000, i, u64::MAX - i, 0] {
                Frame::Pong { payload }.encode(&mut wire);
            }
            peer.write_all(&wire).await.unwrap();
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    tokio::select! {
        _ = guesses => panic!("made-up pongs kept the link alive"),
        reason = mux.closed() => assert!(matches!(reason, LinkClosed::Unresponsive(_)), "{reason:?}"),
    }
    tracker.close();
    tracker.wait().await;
}
