//! The pump driven over a duplex by a hand-written PageKite peer.

use std::collections::HashMap;
use std::time::Duration;

use bytes::BytesMut;
use kitepipe_proto::kite::{KiteProto, KiteRef};
use kitepipe_proto::message::{self, StreamHeader, VisitorHeader};
use kitepipe_proto::pagekite::{Chunk, ChunkDecoder, ChunkEncoder, ChunkHeaders, Eof, KiteAnswer};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;

/// How long a test waits for something that must happen.
const PATIENCE: Duration = Duration::from_secs(30);

/// The test's end of the tunnel: a PageKite peer writing and reading
/// chunks by hand.
struct Peer {
    io: DuplexStream,
    buf: BytesMut,
    decoder: ChunkDecoder,
    encoder: ChunkEncoder,
}

impl Peer {
    fn new(io: DuplexStream, compress: bool) -> Peer {
        Peer {
            io,
            buf: BytesMut::new(),
            decoder: ChunkDecoder::new(),
            encoder: ChunkEncoder::new(compress),
        }
    }

    async fn send(&mut self, headers: ChunkHeaders, data: &[u8]) {
        let mut out = BytesMut::new();
        self.encoder.encode(&headers, data, &mut out);
        self.io.write_all(&out).await.unwrap();
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.unwrap();
    }

    /// The next chunk, or None when the tunnel closed.
    async fn next(&mut self) -> Option<Chunk> {
        tokio::time::timeout(PATIENCE, async {
            loop {
                if let Some(chunk) = self.decoder.decode(&mut self.buf).unwrap() {
                    return Some(chunk);
                }
                if self.io.read_buf(&mut self.buf).await.unwrap_or(0) == 0 {
                    return None;
                }
            }
        })
        .await
        .expect("a chunk or the end of the tunnel in time")
    }

    /// The next chunk that is not a PING or SKB progress report.
    async fn next_significant(&mut self) -> Chunk {
        loop {
            let chunk = self.next().await.expect("the tunnel is open");
            let h = &chunk.headers;
            if h.noop && (h.ping.is_some() || h.skb.is_some()) {
                continue;
            }
            return chunk;
        }
    }

    /// Reads raw bytes until `n` are buffered (for looking at size lines).
    async fn fill(&mut self, n: usize) {
        while self.buf.len() < n {
            let read = tokio::time::timeout(PATIENCE, self.io.read_buf(&mut self.buf))
                .await
                .unwrap()
                .unwrap();
            assert_ne!(read, 0, "tunnel closed");
        }
    }
}

fn visitor(proto: KiteProto, name: &str, host: Option<&str>) -> VisitorHeader {
    VisitorHeader {
        kite: KiteRef {
            proto,
            name: name.into(),
            port: if proto == KiteProto::Tcp { 2222 } else { 0 },
        },
        host: host.map(str::to_string),
        peer: "192.0.2.7:40000".into(),
        relay_addr: Some("127.0.0.1:8080".into()),
    }
}

fn config(compress: bool) -> TunnelConfig {
    TunnelConfig {
        compress,
        ..TunnelConfig::default()
    }
}

struct Front {
    mux: Mux,
    handle: TunnelHandle,
    peer: Peer,
    tracker: TaskTracker,
    token: CancellationToken,
}

fn front(config: TunnelConfig) -> Front {
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let tracker = TaskTracker::new();
    let token = CancellationToken::new();
    let (mux, handle) = start_front(ours, BytesMut::new(), &config, &tracker, token.clone());
    Front {
        mux,
        handle,
        peer: Peer::new(theirs, config.compress),
        tracker,
        token,
    }
}

impl Front {
    async fn open(&self, visitor: VisitorHeader) -> MuxStream {
        self.mux
            .open(message::encode(&StreamHeader::Visitor(visitor)))
            .await
            .unwrap()
    }

    /// Ends the tunnel and checks that no task outlives it.
    async fn finish(self) {
        self.token.cancel();
        self.tracker.close();
        tokio::time::timeout(PATIENCE, self.tracker.wait())
            .await
            .expect("every task of the tunnel ends");
    }
}

async fn read_exactly(stream: &mut MuxStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    buf
}

#[tokio::test]
async fn front_visitor_streams_become_sids_both_ways() {
    let mut t = front(config(false));
    let mut stream = t
        .open(visitor(
            KiteProto::Http,
            "a.example.com",
            Some("a.example.com:8080"),
        ))
        .await;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let first = t.peer.next_significant().await;
    let h = &first.headers;
    assert_eq!(h.sid, Some(1));
    assert_eq!(h.proto.as_deref(), Some("http"));
    assert_eq!(h.host.as_deref(), Some("a.example.com"));
    assert_eq!(h.port.as_deref(), Some("8080"));
    assert_eq!(h.rip.as_deref(), Some("192.0.2.7"));
    assert_eq!(h.rport.as_deref(), Some("40000"));
    assert_eq!(&first.data[..], b"GET / HTTP/1.0\r\n\r\n");

    // The answer, 3 KiB: the stream gets it, the peer gets SKB progress.
    let body = vec![b'x'; 3 * 1024];
    t.peer.send(ChunkHeaders::sid(1), &body).await;
    assert_eq!(read_exactly(&mut stream, body.len()).await, body);
    let progress = loop {
        let chunk = t.peer.next().await.unwrap();
        if chunk.headers.skb.is_some() {
            break chunk.headers;
        }
    };
    assert!(progress.noop);
    assert_eq!(progress.sid, Some(1));
    assert_eq!(progress.skb, Some(3));

    // The peer's full close: the stream reads EOF.
    t.peer
        .send(
            ChunkHeaders {
                eof: Some(Eof {
                    write: true,
                    read: true,
                }),
                ..ChunkHeaders::sid(1)
            },
            b"Bye!",
        )
        .await;
    let mut rest = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());
    drop(stream);

    // A second visitor gets SID 2; our half-close reaches the peer as
    // `EOF: 1R` and the peer's data still flows the other way.
    let mut stream = t
        .open(visitor(
            KiteProto::Https,
            "b.example.com",
            Some("b.example.com"),
        ))
        .await;
    stream.write_all(b"\x16\x03\x01hello").await.unwrap();
    let first = t.peer.next_significant().await;
    assert_eq!(first.headers.sid, Some(2));
    assert_eq!(first.headers.proto.as_deref(), Some("https"));
    stream.shutdown().await.unwrap();
    let eof = t.peer.next_significant().await;
    assert_eq!(eof.headers.sid, Some(2));
    assert_eq!(
        eof.headers.eof,
        Some(Eof {
            write: false,
            read: true
        })
    );
    t.peer.send(ChunkHeaders::sid(2), b"late answer").await;
    assert_eq!(read_exactly(&mut stream, 11).await, b"late answer");
    t.finish().await;
}

#[tokio::test]
async fn many_small_writes_are_coalesced_into_few_chunks() {
    // pagekite.py gives a tunnel up when one read of it (~50 KB) holds
    // more than 150 chunks: 400 writes of 10 bytes must not become 400
    // chunks.
    let mut t = front(config(false));
    let mut stream = t
        .open(visitor(KiteProto::Tcp, "ssh.example.com", None))
        .await;
    let opening = t.peer.next_significant().await;
    assert!(opening.headers.proto.is_some());
    for i in 0..400u32 {
        stream
            .write_all(format!("{:09}\n", i).as_bytes())
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    let mut chunks = 0;
    while got.len() < 4000 {
        let chunk = t.peer.next_significant().await;
        got.extend_from_slice(&chunk.data);
        chunks += 1;
    }
    let expected: Vec<u8> = (0..400u32)
        .flat_map(|i| format!("{:09}\n", i).into_bytes())
        .collect();
    assert_eq!(got, expected);
    assert!(chunks <= 40, "{chunks} chunks for 400 small writes");
    t.finish().await;
}

#[tokio::test]
async fn front_raw_streams_open_before_the_visitor_speaks() {
    let mut t = front(config(false));
    let mut stream = t
        .open(visitor(KiteProto::Tcp, "ssh.example.com", None))
        .await;
    let first = t.peer.next_significant().await;
    assert_eq!(first.headers.proto.as_deref(), Some("raw"));
    assert_eq!(first.headers.host.as_deref(), Some("ssh.example.com"));
    assert_eq!(first.headers.port.as_deref(), Some("2222"));
    assert!(first.data.is_empty());
    // The server speaks first.
    t.peer
        .send(ChunkHeaders::sid(1), b"SSH-2.0-OpenSSH_9.6\r\n")
        .await;
    assert_eq!(
        read_exactly(&mut stream, 21).await,
        b"SSH-2.0-OpenSSH_9.6\r\n"
    );
    t.finish().await;
}

#[tokio::test]
async fn front_large_writes_go_out_in_fragments() {
    let mut t = front(config(false));
    let mut stream = t
        .open(visitor(
            KiteProto::Http,
            "a.example.com",
            Some("a.example.com"),
        ))
        .await;
    let upload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let writer = {
        let upload = upload.clone();
        tokio::spawn(async move {
            stream.write_all(&upload).await.unwrap();
            stream
        })
    };
    let mut got = Vec::new();
    while got.len() < upload.len() {
        let chunk = t.peer.next_significant().await;
        assert!(chunk.data.len() <= FRAGMENT);
        got.extend_from_slice(&chunk.data);
    }
    assert_eq!(got, upload);
    drop(writer.await.unwrap());
    t.finish().await;
}

#[tokio::test]
async fn peer_pings_get_pongs_and_control_noops_reach_the_handle() {
    let mut t = front(config(false));
    t.peer
        .send(
            ChunkHeaders {
                ping: Some("1764928800.1234".into()),
                ..ChunkHeaders::noop()
            },
            b"!",
        )
        .await;
    let pong = t.peer.next_significant().await;
    assert!(pong.headers.noop);
    assert_eq!(pong.headers.pong.as_deref(), Some("1764928800.1234"));

    // A kite request in a NOOP (AddKites) goes to the handshake layer.
    let request =
        kitepipe_proto::pagekite::KiteRequest::parse("http:c.example.com:s::sig").unwrap();
    t.peer
        .send(
            ChunkHeaders {
                requests: vec![request.clone()],
                ..ChunkHeaders::noop()
            },
            b"!",
        )
        .await;
    let control = tokio::time::timeout(PATIENCE, t.handle.control.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(control.requests, [request]);

    // And its answer goes out as a NOOP.
    assert!(t.handle.send_control(vec![(
        "X-PageKite-OK".into(),
        "http:c.example.com:s".into()
    )]));
    let answer = t.peer.next_significant().await;
    assert!(answer.headers.noop);
    assert_eq!(
        answer.headers.answers,
        [KiteAnswer::Ok("http:c.example.com:s".into())]
    );
    t.finish().await;
}

#[tokio::test]
async fn zchunks_both_ways_and_corrupt_chunks_ask_for_zrst() {
    let mut t = front(config(true));
    let mut stream = t
        .open(visitor(
            KiteProto::Http,
            "a.example.com",
            Some("a.example.com"),
        ))
        .await;
    let request = b"GET /compressible HTTP/1.1\r\nHost: a.example.com\r\n".repeat(10);
    stream.write_all(&request).await.unwrap();
    // Our chunk is compressed on the wire.
    t.peer.fill(8).await;
    let line_end = t.peer.buf.iter().position(|b| *b == b'\r').unwrap();
    assert!(t.peer.buf[..line_end].contains(&b'Z'));
    let first = t.peer.next_significant().await;
    assert_eq!(&first.data[..], &request[..]);

    // The peer's compressed answer arrives inflated.
    let answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n".repeat(20);
    t.peer.send(ChunkHeaders::sid(1), &answer).await;
    assert_eq!(read_exactly(&mut stream, answer.len()).await, answer);

    // A chunk that does not inflate: the pump asks for ZRST, and the
    // tunnel lives on.
    t.peer
        .send_raw(b"20Z8\r\n\x78\x9c\xff\xff\xff\xff\xff\xff")
        .await;
    let zrst = t.peer.next_significant().await;
    assert!(zrst.headers.noop && zrst.headers.zrst);

    // The peer asks us to reset: our next chunk (here the PONG) says R,
    // and the compressed ones after it start a new zlib stream.
    t.peer
        .send(
            ChunkHeaders {
                zrst: true,
                ..ChunkHeaders::noop()
            },
            b"!",
        )
        .await;
    t.peer
        .send(
            ChunkHeaders {
                ping: Some("1".into()),
                ..ChunkHeaders::noop()
            },
            b"!",
        )
        .await;
    t.peer.fill(8).await;
    let line_end = t.peer.buf.iter().position(|b| *b == b'\r').unwrap();
    assert_eq!(
        t.peer.buf[line_end - 1],
        b'R',
        "{:?}",
        &t.peer.buf[..line_end]
    );
    assert_eq!(
        t.peer.next_significant().await.headers.pong.as_deref(),
        Some("1")
    );
    stream.write_all(&request).await.unwrap();
    let again = t.peer.next_significant().await;
    assert_eq!(&again.data[..], &request[..]);
    t.finish().await;
}

#[tokio::test]
async fn front_refuses_streams_beyond_max_streams() {
    let mut t = front(TunnelConfig {
        max_streams: 2,
        ..config(false)
    });
    let mut streams = Vec::new();
    for i in 0..2 {
        let mut stream = t
            .open(visitor(
                KiteProto::Http,
                "a.example.com",
                Some("a.example.com"),
            ))
            .await;
        stream.write_all(b"x").await.unwrap();
        let first = t.peer.next_significant().await;
        assert_eq!(first.headers.sid, Some(i + 1));
        streams.push(stream);
    }
    let mut third = t
        .open(visitor(
            KiteProto::Http,
            "a.example.com",
            Some("a.example.com"),
        ))
        .await;
    let mut buf = [0u8; 1];
    let res = tokio::time::timeout(PATIENCE, third.read(&mut buf))
        .await
        .unwrap();
    let err = res.expect_err("the third stream is refused");
    assert!(err.to_string().contains("too many streams"), "{err}");
    drop(third);
    // Closing one makes room.
    let mut first = streams.remove(0);
    t.peer
        .send(
            ChunkHeaders {
                eof: Some(Eof {
                    write: true,
                    read: true,
                }),
                ..ChunkHeaders::sid(1)
            },
            b"Bye!",
        )
        .await;
    let mut rest = Vec::new();
    first.read_to_end(&mut rest).await.unwrap();
    drop(first);
    let mut room = false;
    for _ in 0..100 {
        if lock_count(&t) < 2 {
            room = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(room, "the closed SID is forgotten");
    let _fourth = t
        .open(visitor(KiteProto::Tcp, "ssh.example.com", None))
        .await;
    // A raw stream opens at once, before any data.
    let first = t.peer.next_significant().await;
    assert!(first.headers.proto.is_some());
    t.finish().await;
}

/// Open SIDs, as the relay's Mux counts its streams.
fn lock_count(t: &Front) -> usize {
    t.mux.stream_count()
}

#[tokio::test]
async fn data_for_unknown_sids_gets_eof_and_garbage_closes_the_tunnel() {
    let mut t = front(config(false));
    t.peer.send(ChunkHeaders::sid(77), b"hello?").await;
    let eof = t.peer.next_significant().await;
    assert_eq!(eof.headers.sid, Some(77));
    assert_eq!(
        eof.headers.eof,
        Some(Eof {
            write: true,
            read: true
        })
    );
    // Garbage framing: the tunnel ends and the relay's Mux closes.
    t.peer.send_raw(b"this is not a chunk\r\n").await;
    tokio::time::timeout(PATIENCE, t.mux.closed())
        .await
        .unwrap();
    assert!(t.peer.next().await.is_none());
    t.finish().await;
}

#[tokio::test]
async fn zero_length_chunk_and_closed_mux_end_the_tunnel() {
    let mut t = front(config(false));
    t.peer.send_raw(b"0\r\n").await;
    tokio::time::timeout(PATIENCE, t.mux.closed())
        .await
        .unwrap();
    t.finish().await;

    let mut t = front(config(false));
    t.mux.close(crate::link::LinkClosed::Shutdown);
    assert!(
        t.peer.next().await.is_none(),
        "the peer sees the tunnel close"
    );
    t.finish().await;
}

#[tokio::test(start_paused = true)]
async fn silent_peers_are_pinged_then_dropped() {
    let mut t = front(TunnelConfig {
        ping_interval: Duration::from_secs(4),
        idle_timeout: Duration::from_secs(9),
        ..config(false)
    });
    let started = tokio::time::Instant::now();
    let ping = t.peer.next().await.unwrap();
    assert!(ping.headers.noop && ping.headers.ping.is_some());
    assert!(started.elapsed() >= Duration::from_secs(4));
    tokio::time::timeout(Duration::from_secs(60), t.mux.closed())
        .await
        .expect("a silent peer is dropped after idle_timeout");
    assert!(started.elapsed() >= Duration::from_secs(9));
    t.finish().await;
}

#[tokio::test(start_paused = true)]
async fn peers_that_never_read_are_dropped() {
    // A tiny duplex: the pump's writes back up at once.
    let (ours, theirs) = tokio::io::duplex(1024);
    let tracker = TaskTracker::new();
    let token = CancellationToken::new();
    let config = TunnelConfig {
        ping_interval: Duration::from_secs(4),
        idle_timeout: Duration::from_secs(9),
        ..config(false)
    };
    let (mux, _handle) = start_front(ours, BytesMut::new(), &config, &tracker, token.clone());
    let mut peer = Peer::new(theirs, false);
    let mut stream = mux
        .open(message::encode(&StreamHeader::Visitor(visitor(
            KiteProto::Http,
            "a.example.com",
            Some("a.example.com"),
        ))))
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    // The visitor uploads; the peer keeps sending PINGs (so it is not
    // silent) but never reads a byte.
    let upload = tokio::spawn(async move {
        let _ = stream.write_all(&vec![b'u'; 1024 * 1024]).await;
        stream
    });
    let pinging = async {
        loop {
            peer.send(
                ChunkHeaders {
                    ping: Some("1".into()),
                    ..ChunkHeaders::noop()
                },
                b"!",
            )
            .await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    tokio::select! {
        _ = mux.closed() => {}
        _ = pinging => unreachable!(),
        _ = tokio::time::sleep(Duration::from_secs(60)) => panic!("the tunnel outlived a peer that never reads"),
    }
    assert!(started.elapsed() >= Duration::from_secs(9));
    drop(upload.await.unwrap());
    token.cancel();
    tracker.close();
    tokio::time::timeout(PATIENCE, tracker.wait())
        .await
        .unwrap();
}

/// A PageKite back-end that echoes every stream and closes it after our
/// EOF, acknowledging progress like pagekite.py.
async fn echo_peer(mut peer: Peer) {
    let mut received: HashMap<u32, u64> = HashMap::new();
    while let Some(chunk) = peer.next().await {
        let h = chunk.headers;
        let Some(sid) = h.sid else { continue };
        if h.noop {
            continue;
        }
        if let Some(eof) = h.eof {
            if eof.read {
                peer.send(
                    ChunkHeaders {
                        eof: Some(Eof {
                            write: true,
                            read: true,
                        }),
                        ..ChunkHeaders::sid(sid)
                    },
                    b"Bye!",
                )
                .await;
            }
            continue;
        }
        if chunk.data.is_empty() {
            continue;
        }
        peer.send(ChunkHeaders::sid(sid), &chunk.data).await;
        let total = received.entry(sid).or_default();
        *total += chunk.data.len() as u64;
        peer.send(
            ChunkHeaders {
                skb: Some(*total / 1024),
                ..ChunkHeaders {
                    noop: true,
                    ..ChunkHeaders::sid(sid)
                }
            },
            b"",
        )
        .await;
    }
}

#[tokio::test]
async fn many_streams_echo_through_one_tunnel_and_are_forgotten() {
    let t = front(config(true));
    let peer = tokio::spawn(echo_peer(t.peer));
    let mut tasks = Vec::new();
    for i in 0..20u32 {
        let mut stream = t
            .mux
            .open(message::encode(&StreamHeader::Visitor(visitor(
                KiteProto::Http,
                "a.example.com",
                Some("a.example.com"),
            ))))
            .await
            .unwrap();
        tasks.push(tokio::spawn(async move {
            // Distinct per stream, and not too compressible.
            let data: Vec<u8> = (0..600_000u32)
                .map(|n| (n.wrapping_mul(2_654_435_761).wrapping_add(i) >> 13) as u8)
                .collect();
            let (mut reader, mut writer) = tokio::io::split(stream);
            let sent = data.clone();
            let write = tokio::spawn(async move {
                writer.write_all(&sent).await.unwrap();
                writer.shutdown().await.unwrap();
                writer
            });
            let mut echoed = Vec::new();
            tokio::time::timeout(PATIENCE, reader.read_to_end(&mut echoed))
                .await
                .expect("the echo ends in time")
                .unwrap();
            stream = reader.unsplit(write.await.unwrap());
            drop(stream);
            assert!(
                echoed == data,
                "stream {i}: {} of {} bytes",
                echoed.len(),
                data.len()
            );
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut forgotten = false;
    for _ in 0..200 {
        if t.mux.stream_count() == 0 {
            forgotten = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(forgotten, "{} streams left", t.mux.stream_count());
    t.token.cancel();
    t.tracker.close();
    tokio::time::timeout(PATIENCE, t.tracker.wait())
        .await
        .unwrap();
    peer.abort();
}

struct Back {
    mux: Mux,
    receivers: MuxReceivers,
    peer: Peer,
    tracker: TaskTracker,
    token: CancellationToken,
}

/// A back end whose route serves http and raw `a.example.com` only.
fn back(config: TunnelConfig) -> Back {
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let tracker = TaskTracker::new();
    let token = CancellationToken::new();
    let route: Route = Arc::new(|dest: &ChunkDest| {
        let proto = match dest.proto.as_str() {
            "http" => KiteProto::Http,
            "raw" => KiteProto::Tcp,
            _ => return None,
        };
        (dest.host == "a.example.com").then(|| VisitorHeader {
            kite: KiteRef {
                proto,
                name: dest.host.clone(),
                port: dest.port.unwrap_or(0),
            },
            host: Some(dest.host.clone()),
            peer: format!(
                "{}:{}",
                dest.rip.as_deref().unwrap_or("0.0.0.0"),
                dest.rport.unwrap_or(0)
            ),
            relay_addr: None,
        })
    });
    let (mux, receivers, _handle) = start_back(
        ours,
        BytesMut::new(),
        &config,
        route,
        &tracker,
        token.clone(),
    );
    Back {
        mux,
        receivers,
        peer: Peer::new(theirs, config.compress),
        tracker,
        token,
    }
}

impl Back {
    async fn accept(&mut self) -> (VisitorHeader, MuxStream) {
        let incoming = tokio::time::timeout(PATIENCE, self.receivers.incoming.recv())
            .await
            .unwrap()
            .unwrap();
        let Ok(StreamHeader::Visitor(visitor)) = message::decode(&incoming.header) else {
            panic!("a visitor stream");
        };
        (visitor, incoming.stream)
    }

    async fn finish(self) {
        self.token.cancel();
        self.tracker.close();
        tokio::time::timeout(PATIENCE, self.tracker.wait())
            .await
            .expect("every task of the tunnel ends");
    }
}

fn opening(sid: u32, proto: &str, host: &str) -> ChunkHeaders {
    ChunkHeaders {
        proto: Some(proto.into()),
        host: Some(host.into()),
        port: Some("80".into()),
        rip: Some("198.51.100.9".into()),
        rport: Some("5555".into()),
        ..ChunkHeaders::sid(sid)
    }
}

#[test]
fn chunk_dest_visitor_addresses() {
    let dest = |rip: Option<&str>, rport: Option<u16>| ChunkDest {
        proto: "http".into(),
        host: "a.example.com".into(),
        port: Some(80),
        rip: rip.map(str::to_string),
        rport,
        rtls: false,
    };
    let cases = [
        (
            Some("::ffff:127.0.0.1"),
            Some(41034),
            Some("127.0.0.1:41034"),
        ),
        (Some("192.0.2.7"), Some(1), Some("192.0.2.7:1")),
        (Some("2001:db8::1"), Some(443), Some("[2001:db8::1]:443")),
        (Some("not-an-ip"), Some(1), None),
        (Some("192.0.2.7"), None, None),
        (None, Some(1), None),
    ];
    for (rip, rport, expected) in cases {
        let got = dest(rip, rport).visitor_addr().map(|a| a.to_string());
        assert_eq!(got.as_deref(), expected, "{rip:?} {rport:?}");
    }
}

#[tokio::test]
async fn back_new_sids_open_visitor_streams() {
    let mut t = back(config(true));
    t.peer
        .send(
            opening(5, "http", "A.Example.com"),
            b"GET / HTTP/1.1\r\n\r\n",
        )
        .await;
    let (visitor, mut stream) = t.accept().await;
    assert_eq!(visitor.kite.proto, KiteProto::Http);
    assert_eq!(visitor.host.as_deref(), Some("a.example.com"));
    assert_eq!(visitor.peer, "198.51.100.9:5555");
    assert_eq!(
        read_exactly(&mut stream, 18).await,
        b"GET / HTTP/1.1\r\n\r\n"
    );
    let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi".repeat(3);
    stream.write_all(&answer).await.unwrap();
    let chunk = t.peer.next_significant().await;
    assert_eq!(chunk.headers.sid, Some(5));
    assert_eq!(&chunk.data[..], &answer[..]);
    // The target closes: `EOF: 1R`, then the peer's close ends the stream.
    stream.shutdown().await.unwrap();
    let eof = t.peer.next_significant().await;
    assert_eq!(
        eof.headers.eof,
        Some(Eof {
            write: false,
            read: true
        })
    );
    t.peer
        .send(
            ChunkHeaders {
                eof: Some(Eof {
                    write: true,
                    read: true,
                }),
                ..ChunkHeaders::sid(5)
            },
            b"Bye!",
        )
        .await;
    let mut rest = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());
    t.finish().await;
}

#[tokio::test]
async fn back_refuses_unknown_kites_like_pagekite_py() {
    let mut t = back(config(false));
    // http: a 503 page, then EOF.
    t.peer
        .send(
            opening(1, "http", "nobody.example.com"),
            b"GET / HTTP/1.1\r\n\r\n",
        )
        .await;
    let page = t.peer.next_significant().await;
    assert_eq!(page.headers.sid, Some(1));
    assert!(page.data.starts_with(b"HTTP/1.1 503 "), "{:?}", page.data);
    assert!(page.data.ends_with(b"</html>\n"));
    let eof = t.peer.next_significant().await;
    assert_eq!(eof.headers.sid, Some(1));
    assert!(eof.headers.eof.is_some());
    // https: a TLS alert, then EOF.
    t.peer
        .send(opening(2, "https", "a.example.com"), b"\x16\x03\x01")
        .await;
    let alert = t.peer.next_significant().await;
    assert_eq!(&alert.data[..], &[0x15, 3, 3, 0, 2, 2, 49]);
    assert!(t.peer.next_significant().await.headers.eof.is_some());
    // raw: EOF only. No Proto/Host: EOF only.
    t.peer
        .send(opening(3, "raw", "nobody.example.com"), b"")
        .await;
    let eof = t.peer.next_significant().await;
    assert_eq!(
        (eof.headers.sid, eof.headers.eof.is_some()),
        (Some(3), true)
    );
    t.peer.send(ChunkHeaders::sid(4), b"data").await;
    let eof = t.peer.next_significant().await;
    assert_eq!(
        (eof.headers.sid, eof.headers.eof.is_some()),
        (Some(4), true)
    );
    t.finish().await;
}

#[tokio::test]
async fn back_stream_reset_before_answering_gets_a_503() {
    let mut t = back(config(false));
    t.peer
        .send(
            opening(9, "http", "a.example.com"),
            b"GET / HTTP/1.1\r\n\r\n",
        )
        .await;
    let (_, mut stream) = t.accept().await;
    // The connector could not reach the target.
    stream.reset(ResetCode::TargetUnreachable, "connection refused");
    let page = t.peer.next_significant().await;
    assert_eq!(page.headers.sid, Some(9));
    assert!(page.data.starts_with(b"HTTP/1.1 503 "));
    let eof = t.peer.next_significant().await;
    assert_eq!(
        eof.headers.eof,
        Some(Eof {
            write: true,
            read: true
        })
    );
    t.finish().await;
}

#[tokio::test]
async fn back_refuses_sids_beyond_max_streams() {
    let mut t = back(TunnelConfig {
        max_streams: 1,
        ..config(false)
    });
    t.peer.send(opening(1, "raw", "a.example.com"), b"x").await;
    let (_, _stream) = t.accept().await;
    t.peer
        .send(opening(2, "http", "a.example.com"), b"GET /")
        .await;
    let page = t.peer.next_significant().await;
    assert_eq!(page.headers.sid, Some(2));
    assert!(page.data.starts_with(b"HTTP/1.1 503 "));
    assert!(t.peer.next_significant().await.headers.eof.is_some());
    assert!(t.mux.stream_count() <= 1);
    t.finish().await;
}

/// Real pagekite.py on the other end of the pump.
mod pagekite_py {
    use std::process::{Child, Command, Stdio};

    use kitepipe_proto::pagekite::{
        BackEndHello, FrontEndHello, KiteAnswer, Transport, build_backend_hello,
        build_frontend_hello, parse_backend_hello, parse_frontend_hello, sniff,
    };
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::pagekite::sign::{kite_request, random_salt};

    /// pagekite.py, if this machine has it; under CI a missing one fails.
    fn available() -> bool {
        let found = std::path::Path::new("/usr/bin/pagekite").exists();
        if !found {
            not_run("needs pagekite.py, which is not installed: sudo apt-get install pagekite");
        }
        found
    }

    /// Like the end-to-end fixtures' `require_tool`: a failure under CI,
    /// a `NOT RUN` line otherwise.
    fn not_run(why: &str) {
        let thread = std::thread::current();
        let test = thread.name().unwrap_or("a test");
        assert!(
            std::env::var_os("CI").is_none(),
            "{test} {why} (CI installs every tool: .ci/run)"
        );
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "NOT RUN {test}: {why}");
    }

    /// A pagekite.py process with its own HOME, stopped (by PID) and its
    /// directory removed on drop.
    struct PageKite {
        child: Child,
        home: std::path::PathBuf,
    }

    impl PageKite {
        fn start(name: &str, args: &[String]) -> PageKite {
            let home =
                std::env::temp_dir().join(format!("kitepipe-pk-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&home).unwrap();
            let child = Command::new("/usr/bin/pagekite")
                .args(["--clean", "--nullui"])
                .arg(format!("--logfile={}", home.join("log").display()))
                .args(args)
                .env("HOME", &home)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            PageKite { child, home }
        }

        fn log(&self) -> String {
            std::fs::read_to_string(self.home.join("log")).unwrap_or_default()
        }
    }

    impl Drop for PageKite {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.home);
        }
    }

    /// A local HTTP/1.0 server answering every request with `body`.
    async fn http_target(body: Vec<u8>) -> (u16, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let body = body.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if sock.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let answer =
                        format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                    let _ = sock.write_all(answer.as_bytes()).await;
                    let _ = sock.write_all(&body).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        (port, task)
    }

    async fn read_head(sock: &mut TcpStream) -> BytesMut {
        let mut buf = BytesMut::new();
        tokio::time::timeout(PATIENCE, async {
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                assert_ne!(
                    sock.read_buf(&mut buf).await.unwrap(),
                    0,
                    "closed before its head"
                );
            }
        })
        .await
        .unwrap();
        buf
    }

    fn body(len: usize) -> Vec<u8> {
        let words = ["alpha ", "beta ", "kite ", "tunnel ", "relay "];
        words
            .iter()
            .cycle()
            .flat_map(|w| w.bytes())
            .take(len)
            .collect()
    }

    #[tokio::test]
    async fn pagekite_py_back_end_serves_visitors_through_the_front_pump() {
        if !available() {
            return;
        }
        let small = body(100);
        let large = body(300_000);
        let (small_port, small_task) = http_target(small.clone()).await;
        let (large_port, large_task) = http_target(large.clone()).await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let pagekite = PageKite::start(
            "be",
            &[
                format!("--frontend=127.0.0.1:{port}"),
                format!("--service_on=http:small.example.com:127.0.0.1:{small_port}:s3cret"),
                format!("--service_on=http:large.example.com:127.0.0.1:{large_port}:s3cret"),
            ],
        );
        // pagekite.py probes the front-end's latency with plain HEADs
        // first; answer those like pagekite.py does (503), then take the
        // tunnel.
        let (sock, head) = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                let head = read_head(&mut sock).await;
                if sniff(&head) == Some(true) {
                    return (sock, head);
                }
                let _ = sock.write_all(b"HTTP/1.1 503 Unavailable\r\n\r\n").await;
            }
        })
        .await
        .expect("pagekite.py connects");
        let mut sock = sock;
        let (hello, consumed) = parse_backend_hello(&head).unwrap().unwrap();
        assert!(hello.features.iter().any(|f| f == "ZChunks"));
        assert_eq!(hello.requests.len(), 2);
        for request in &hello.requests {
            assert!(crate::pagekite::sign::check_signature(
                &request.sign,
                "s3cret",
                &request.payload(),
                0
            ));
        }
        let answer = FrontEndHello {
            features: vec!["ZChunks".into(), "AddKites".into()],
            protos: vec!["http".into()],
            ports: vec![port.to_string()],
            answers: hello
                .requests
                .iter()
                .map(|r| KiteAnswer::Ok(r.what()))
                .collect(),
            session_id: Some("test-session".into()),
            ..FrontEndHello::default()
        };
        sock.write_all(&build_frontend_hello(&answer))
            .await
            .unwrap();
        let tracker = TaskTracker::new();
        let token = CancellationToken::new();
        let (mux, _handle) = start_front(
            sock,
            BytesMut::from(&head[consumed..]),
            &config(true),
            &tracker,
            token.clone(),
        );
        for (name, expected) in [
            ("small.example.com", &small),
            ("large.example.com", &large),
            ("small.example.com", &small),
        ] {
            let mut stream = mux
                .open(message::encode(&StreamHeader::Visitor(visitor(
                    KiteProto::Http,
                    name,
                    Some(name),
                ))))
                .await
                .unwrap();
            let request = format!("GET / HTTP/1.0\r\nHost: {name}\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            let res = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer)).await;
            assert!(
                res.is_ok_and(|r| r.is_ok()),
                "{name}: {:?}\n{}",
                String::from_utf8_lossy(&answer[..answer.len().min(200)]),
                pagekite.log()
            );
            let text_end = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            assert!(answer.starts_with(b"HTTP/1.0 200 OK\r\n"), "{name}");
            assert!(
                answer[text_end..] == expected[..],
                "{name}: body of {} bytes",
                answer.len() - text_end
            );
        }
        token.cancel();
        tracker.close();
        tokio::time::timeout(PATIENCE, tracker.wait())
            .await
            .unwrap();
        small_task.abort();
        large_task.abort();
        drop(pagekite);
    }

    #[tokio::test]
    async fn pagekite_py_front_end_reaches_kites_through_the_back_pump() {
        if !available() {
            return;
        }
        let fe_port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let pagekite = PageKite::start(
            "fe",
            &[
                "--isfrontend".into(),
                format!("--ports={fe_port}"),
                "--protos=http".into(),
                "--domain=http:foo.example.com:s3cret".into(),
            ],
        );
        let mut sock = tokio::time::timeout(PATIENCE, async {
            loop {
                if let Ok(sock) = TcpStream::connect(("127.0.0.1", fe_port)).await {
                    return sock;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("pagekite.py listens");
        let salt = random_salt();
        let sign = |token: &str| kite_request("http", "foo.example.com", "s3cret", &salt, token);
        let hello = BackEndHello {
            transport: Transport::Chunked,
            features: vec!["AddKites".into(), "ZChunks".into()],
            version: Some("kitepipe-test".into()),
            requests: vec![sign("")],
            replace: None,
        };
        sock.write_all(&build_backend_hello(&hello)).await.unwrap();
        let head = read_head(&mut sock).await;
        let (answer, consumed) = parse_frontend_hello(&head).unwrap().unwrap();
        let Some(KiteAnswer::SignThis {
            token: challenge, ..
        }) = answer.answers.first().cloned()
        else {
            panic!("a challenge: {answer:?}");
        };
        let route: Route = Arc::new(|dest: &ChunkDest| {
            (dest.proto == "http" && dest.host == "foo.example.com").then(|| VisitorHeader {
                kite: KiteRef {
                    proto: KiteProto::Http,
                    name: dest.host.clone(),
                    port: 0,
                },
                host: Some(dest.host.clone()),
                peer: format!(
                    "{}:{}",
                    dest.rip.clone().unwrap_or_default(),
                    dest.rport.unwrap_or(0)
                ),
                relay_addr: None,
            })
        });
        let tracker = TaskTracker::new();
        let token = CancellationToken::new();
        let (_mux, mut receivers, mut handle) = start_back(
            sock,
            BytesMut::from(&head[consumed..]),
            &config(answer.features.iter().any(|f| f == "ZChunks")),
            route,
            &tracker,
            token.clone(),
        );
        // AddKites: the signed request in a NOOP, the OK in one back.
        assert!(handle.send_control(vec![("X-PageKite".into(), sign(&challenge).header_value())]));
        let ok = tokio::time::timeout(PATIENCE, handle.control.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(ok.answers.first(), Some(KiteAnswer::Ok(what)) if what.starts_with("http:foo.example.com:")),
            "{ok:?}\n{}",
            pagekite.log()
        );
        // A visitor at the front-end; the pump opens its stream here.
        let visitor = tokio::spawn(async move {
            let mut sock = TcpStream::connect(("127.0.0.1", fe_port)).await.unwrap();
            sock.write_all(
                b"GET /hello HTTP/1.1\r\nHost: foo.example.com\r\nConnection: close\r\n\r\n",
            )
            .await
            .unwrap();
            let mut answer = Vec::new();
            sock.read_to_end(&mut answer).await.unwrap();
            answer
        });
        let incoming = tokio::time::timeout(PATIENCE, receivers.incoming.recv())
            .await
            .unwrap()
            .unwrap();
        let Ok(StreamHeader::Visitor(header)) = message::decode(&incoming.header) else {
            panic!("a visitor stream");
        };
        assert_eq!(header.host.as_deref(), Some("foo.example.com"));
        let mut stream = incoming.stream;
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while !request.ends_with(b"\r\n\r\n") {
            assert_eq!(stream.read(&mut byte).await.unwrap(), 1);
            request.push(byte[0]);
        }
        assert!(request.starts_with(b"GET /hello HTTP/1.1\r\n"));
        // Large enough to run into our pacing on its SKB reports.
        let page = body(2_000_000);
        stream
            .write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    page.len()
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        stream.write_all(&page).await.unwrap();
        stream.shutdown().await.unwrap();
        let answer = tokio::time::timeout(PATIENCE, visitor)
            .await
            .unwrap()
            .unwrap();
        assert!(
            answer.starts_with(b"HTTP/1.1 200 OK\r\n"),
            "{}",
            String::from_utf8_lossy(&answer[..answer.len().min(300)])
        );
        assert!(answer.ends_with(&page));
        drop(stream);
        token.cancel();
        tracker.close();
        tokio::time::timeout(PATIENCE, tracker.wait())
            .await
            .unwrap();
        drop(pagekite);
    }

    /// upagekite (PyPI) for this machine's `python3`, if installed; under
    /// CI a missing one fails.
    fn upagekite_available() -> bool {
        let found = Command::new("python3")
            .args(["-c", "import upagekite"])
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|out| out.status.success());
        if !found {
            not_run("needs upagekite, which is not installed: python3 -m pip install upagekite");
        }
        found
    }

    #[tokio::test]
    async fn upagekite_back_end_takes_our_chunk_sizes() {
        if !upagekite_available() {
            return;
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../proto/src/pagekite/vectors/run_upagekite.py"
        );
        let mut child = Command::new("python3")
            .args([script, "foo.example.com", "s3cret", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (mut sock, _) = tokio::time::timeout(PATIENCE, listener.accept())
            .await
            .expect("upagekite connects")
            .unwrap();
        let head = read_head(&mut sock).await;
        let (hello, consumed) = parse_backend_hello(&head).unwrap().unwrap();
        assert!(!hello.features.iter().any(|f| f == "ZChunks"));
        let answer = FrontEndHello {
            features: vec!["AddKites".into()],
            protos: vec!["http".into()],
            ports: vec![port.to_string()],
            answers: hello
                .requests
                .iter()
                .map(|r| KiteAnswer::Ok(r.what()))
                .collect(),
            ..FrontEndHello::default()
        };
        sock.write_all(&build_frontend_hello(&answer))
            .await
            .unwrap();
        let tracker = TaskTracker::new();
        let token = CancellationToken::new();
        let (mux, _handle) = start_front(
            sock,
            BytesMut::from(&head[consumed..]),
            &config(false),
            &tracker,
            token.clone(),
        );
        // A request larger than one fragment: several chunks of FRAGMENT.
        let filler = "x".repeat(3 * FRAGMENT);
        let request =
            format!("GET /big HTTP/1.1\r\nHost: foo.example.com\r\nX-Filler: {filler}\r\n\r\n");
        let mut stream = mux
            .open(message::encode(&StreamHeader::Visitor(visitor(
                KiteProto::Http,
                "foo.example.com",
                Some("foo.example.com"),
            ))))
            .await
            .unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let res = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer)).await;
        let _ = child.kill();
        let _ = child.wait();
        assert!(res.is_ok_and(|r| r.is_ok()));
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.0 200 OK"), "{text}");
        assert!(text.contains("hello from upagekite"), "{text}");
        token.cancel();
        tracker.close();
        tokio::time::timeout(PATIENCE, tracker.wait())
            .await
            .unwrap();
    }
}
