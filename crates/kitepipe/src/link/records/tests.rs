use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{BufMut, BytesMut};
use ring::aead;
use rustls_pki_types::{PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;
use crate::pki::keylog::TrafficSecret;
use crate::pki::{
    ALPN_LINK_V1, RelayCert, RelayTrust, connector_client_config, relay_server_config,
};

fn relay_cert() -> RelayCert {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["relay.test".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    RelayCert::new(
        vec![cert.der().clone()],
        PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
    )
    .unwrap()
}

fn configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let relay = relay_cert();
    let server = relay_server_config(&relay).unwrap();
    let client = connector_client_config(&RelayTrust::Pinned(relay.fingerprint())).unwrap();
    (server, client)
}

/// Runs a real rustls handshake over `client_io`/`server_io`, then hands
/// both sessions to [`LinkIo::after_handshake`].
async fn link_pair<S>(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    client_io: S,
    server_io: S,
) -> (LinkIo<S>, LinkIo<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::try_from("relay.test").unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    let connector = tokio_rustls::TlsConnector::from(client);
    let (server_tls, client_tls) = tokio::join!(
        acceptor.accept(ReadAhead::for_handshake(BytesMut::new(), server_io)),
        connector.connect(name, ReadAhead::for_handshake(BytesMut::new(), client_io))
    );
    let client = LinkIo::after_handshake(tokio_rustls::TlsStream::Client(client_tls.unwrap()));
    let server = LinkIo::after_handshake(tokio_rustls::TlsStream::Server(server_tls.unwrap()));
    (client.unwrap(), server.unwrap())
}

fn records(io: &mut LinkIo<DuplexStream>) -> &mut RecordStream<DuplexStream> {
    match io {
        LinkIo::Records(records) => records,
        LinkIo::Tls(_) => panic!("expected the link's own record layer"),
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Writes `data` on `from` in pieces of `piece` bytes (flushing each) while
/// `to` reads it all; returns what `to` read.
async fn transfer(
    from: &mut LinkIo<DuplexStream>,
    to: &mut LinkIo<DuplexStream>,
    data: &[u8],
    piece: usize,
) -> Vec<u8> {
    let write = async {
        for chunk in data.chunks(piece) {
            from.write_all(chunk).await.unwrap();
            from.flush().await.unwrap();
        }
    };
    let read = async {
        let mut got = vec![0u8; data.len()];
        to.read_exact(&mut got).await.unwrap();
        got
    };
    tokio::join!(write, read).1
}

#[tokio::test]
async fn data_crosses_both_ways_in_large_and_small_pieces() {
    let (server, client) = configs();
    let (c, s) = tokio::io::duplex(8 * 1024);
    let (mut client, mut server) = link_pair(server, client, c, s).await;
    // The link prefers AES-128-GCM (see pki::tls::provider).
    assert!(records(&mut client).w.tx.keys.algorithm == &aead::AES_128_GCM);
    assert!(records(&mut server).rx.keys.algorithm == &aead::AES_128_GCM);
    for (piece, len) in [
        (1, 300),
        (100, 10_000),
        (70_000, 1_000_000),
        (MAX_PLAINTEXT, 3 * MAX_PLAINTEXT),
    ] {
        let up = pattern(len, 1);
        assert!(transfer(&mut client, &mut server, &up, piece).await == up);
        let down = pattern(len, 2);
        assert!(transfer(&mut server, &mut client, &down, piece).await == down);
    }
    // Nothing holds the read buffers any more: at most the last one is
    // still counted until the next read sweeps it.
    for side in [&mut client, &mut server] {
        let pinned = records(side).rx.pinned.len();
        assert!(pinned <= 1, "{pinned} buffers still counted as pinned");
    }
}

#[tokio::test]
async fn bytes_sent_right_after_the_handshake_are_not_lost() {
    // The client writes application data as soon as its side of the
    // handshake is done, in the same socket writes as its Finished; the
    // server's rustls must not swallow any of it before the handover.
    let (server_config, client_config) = configs();
    let (c, s) = tokio::io::duplex(256 * 1024);
    let name = ServerName::try_from("relay.test").unwrap();
    let connector = tokio_rustls::TlsConnector::from(client_config);
    let client = async {
        let tls = connector
            .connect(name, ReadAhead::for_handshake(BytesMut::new(), c))
            .await
            .unwrap();
        let mut link = LinkIo::after_handshake(tokio_rustls::TlsStream::Client(tls)).unwrap();
        link.write_all(&pattern(50_000, 9)).await.unwrap();
        link.flush().await.unwrap();
        link
    };
    // The server starts only after the client has written everything.
    let mut client = client_and_server_later(client, s, server_config).await;
    let (link, server) = (&mut client.0, &mut client.1);
    let mut got = vec![0u8; 50_000];
    server.read_exact(&mut got).await.unwrap();
    assert!(got == pattern(50_000, 9));
    let back = transfer(server, link, b"ok", 2).await;
    assert_eq!(back, b"ok");
}

async fn client_and_server_later(
    client: impl std::future::Future<Output = LinkIo<DuplexStream>>,
    server_io: DuplexStream,
    config: Arc<rustls::ServerConfig>,
) -> (LinkIo<DuplexStream>, LinkIo<DuplexStream>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let server = async {
        let tls = acceptor
            .accept(ReadAhead::for_handshake(BytesMut::new(), server_io))
            .await
            .unwrap();
        LinkIo::after_handshake(tokio_rustls::TlsStream::Server(tls)).unwrap()
    };
    tokio::join!(client, server)
}

#[tokio::test]
async fn keys_are_updated_and_data_keeps_flowing() {
    let (server, client) = configs();
    let (c, s) = tokio::io::duplex(64 * 1024);
    let (mut client, mut server) = link_pair(server, client, c, s).await;
    records(&mut client).set_rekey_after(3);
    records(&mut server).set_rekey_after(5);
    let up = pattern(20 * MAX_PLAINTEXT + 17, 3);
    assert!(transfer(&mut client, &mut server, &up, 5000).await == up);
    let down = pattern(20 * MAX_PLAINTEXT + 17, 4);
    assert!(transfer(&mut server, &mut client, &down, 5000).await == down);
    // Several generations went by on both sides, in step.
    let (c, s) = (records(&mut client), records(&mut server));
    let (ct, cr, st, sr) = (&c.w.tx.keys, &c.rx.keys, &s.w.tx.keys, &s.rx.keys);
    assert!(ct.generation >= 5 && st.generation >= 3);
    assert_eq!((ct.generation, ct.seq), (sr.generation, sr.seq));
    assert_eq!((st.generation, st.seq), (cr.generation, cr.seq));
}

#[tokio::test]
async fn shutdown_sends_close_notify_and_the_peer_reads_end_of_stream() {
    let (server, client) = configs();
    let (c, s) = tokio::io::duplex(64 * 1024);
    let (mut client, mut server) = link_pair(server, client, c, s).await;
    client.write_all(b"last words").await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    server.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"last words");
}

/// Sends `data` from a record layer through a tap that may change the raw
/// bytes, and returns the receiving side's read error.
async fn tamper(change: impl FnOnce(&mut Vec<u8>), close: bool) -> io::Error {
    let (server, client) = configs();
    let (c, s) = tokio::io::duplex(1024 * 1024);
    let (mut client, server) = link_pair(server, client, c, s).await;
    client.write_all(&pattern(40_000, 5)).await.unwrap();
    client.flush().await.unwrap();
    // Pull the raw records out of the server's socket, change them, and
    // give them to a fresh record layer with the server's keys.
    let LinkIo::Records(server) = server else {
        panic!("expected records")
    };
    let mut server = *server;
    assert!(server.rx.rbuf.is_empty());
    let (mut tap_in, tap_out) = tokio::io::duplex(1024 * 1024);
    let mut raw = vec![0u8; 40_000 + 3 * (HEADER_LEN + 1 + TAG_LEN)];
    server.w.sock.read_exact(&mut raw).await.unwrap();
    change(&mut raw);
    tap_in.write_all(&raw).await.unwrap();
    if close {
        drop(tap_in);
    }
    let mut reader = RecordStream {
        w: RecordWriter {
            sock: tap_out,
            tx: server.w.tx,
        },
        rx: Opener::new(
            server.rx.keys,
            BytesMut::new(),
            BytesMut::new(),
            false,
            Arc::new(Signals::default()),
        ),
    };
    let mut sink = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        reader.read_to_end(&mut sink),
    )
    .await
    .expect("the reader gives up instead of waiting")
    .expect_err("tampered input must fail")
}

#[tokio::test]
async fn a_flipped_bit_is_refused_as_forged() {
    let err = tamper(|raw| raw[20_000] ^= 0x10, false).await;
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("forged"), "{err}");
}

#[tokio::test]
async fn garbage_headers_and_oversized_records_are_refused() {
    let err = tamper(|raw| raw[0] = 0x16, false).await;
    assert!(err.to_string().contains("malformed record header"), "{err}");
    let err = tamper(
        |raw| raw[3..5].copy_from_slice(&0xffffu16.to_be_bytes()),
        false,
    )
    .await;
    assert!(err.to_string().contains("exceeds"), "{err}");
}

#[tokio::test]
async fn a_cut_in_the_middle_of_a_record_is_reported_as_truncation() {
    let err = tamper(|raw| raw.truncate(30_000), true).await;
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    assert!(err.to_string().contains("close_notify"), "{err}");
}

#[tokio::test]
async fn a_peer_offering_only_kitepipe_1_keeps_rustls() {
    let (server, client) = configs();
    let mut client = (*client).clone();
    client.alpn_protocols = vec![ALPN_LINK_V1.to_vec()];
    let (c, s) = tokio::io::duplex(64 * 1024);
    let (mut client, mut server) = link_pair(server, Arc::new(client), c, s).await;
    assert!(matches!(client, LinkIo::Tls(_)) && matches!(server, LinkIo::Tls(_)));
    let up = pattern(200_000, 6);
    assert!(transfer(&mut client, &mut server, &up, 70_000).await == up);
    let down = pattern(200_000, 7);
    assert!(transfer(&mut server, &mut client, &down, 70_000).await == down);
}

#[tokio::test]
async fn a_fatal_alert_is_reported_as_rustls_reports_it() {
    let (server, client) = configs();
    let (c, s) = tokio::io::duplex(64 * 1024);
    let (mut client, server) = link_pair(server, client, c, s).await;
    let LinkIo::Records(mut server) = server else {
        panic!("expected records")
    };
    // What a relay's rustls sends when it refuses a client certificate.
    let start = server.w.tx.begin_record();
    server.w.tx.wbuf.put_slice(&[2, 45]);
    server.w.tx.finish_record(start, CONTENT_ALERT);
    server.flush().await.unwrap();
    let mut buf = [0u8; 16];
    let err = client.read(&mut buf).await.unwrap_err();
    let tls = crate::pki::find_tls_error(&err).expect("a rustls error in the chain");
    assert_eq!(
        *tls,
        rustls::Error::AlertReceived(rustls::AlertDescription::CertificateExpired)
    );
}

#[tokio::test]
async fn split_halves_over_tcp_hand_out_plaintext_in_order() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (client_tcp, server_tcp) = tokio::join!(tokio::net::TcpStream::connect(addr), async {
        listener.accept().await.unwrap().0
    });
    let (server, client) = configs();
    let (client, server) = link_pair(server, client, client_tcp.unwrap(), server_tcp).await;
    let (_client_reader, mut client_writer) = client.into_mux_parts();
    let (mut server_reader, _server_writer) = server.into_mux_parts();
    let data = pattern(3_000_000, 8);
    let write = async {
        for piece in data.chunks(70_000) {
            client_writer.write_all(piece).await.unwrap();
        }
        client_writer.shutdown().await.unwrap();
    };
    let read = async {
        let mut got = Vec::new();
        let mut chunks = 0;
        while let Some(chunk) = std::future::poll_fn(|cx| server_reader.poll_chunk(cx))
            .await
            .unwrap()
        {
            assert!(chunk.len() <= MAX_PLAINTEXT);
            got.extend_from_slice(&chunk);
            chunks += 1;
        }
        (got, chunks)
    };
    let (_, (got, chunks)) = tokio::join!(write, read);
    assert!(got == data);
    assert!(chunks >= data.len() / MAX_PLAINTEXT);
}

/// A whole link over real TCP: handshake, `into_mux_parts`, and streams
/// through the multiplexer both ways, with our record layer and with a
/// peer that offers only `kitepipe/1` (rustls for the whole link).
#[tokio::test]
async fn a_mux_runs_over_both_link_transports() {
    use crate::link::{Mux, MuxConfig, Side};
    for v1 in [false, true] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client_tcp, server_tcp) = tokio::join!(tokio::net::TcpStream::connect(addr), async {
            listener.accept().await.unwrap().0
        });
        let (server, client) = configs();
        let mut client = (*client).clone();
        if v1 {
            client.alpn_protocols = vec![ALPN_LINK_V1.to_vec()];
        }
        let (client, server) =
            link_pair(server, Arc::new(client), client_tcp.unwrap(), server_tcp).await;
        assert_eq!(matches!(client, LinkIo::Tls(_)), v1);
        let tracker = tokio_util::task::TaskTracker::new();
        let token = tokio_util::sync::CancellationToken::new();
        let config = MuxConfig::default();
        let (reader, writer) = client.into_mux_parts();
        let (connector, _connector_rx) = Mux::start_parts(
            reader,
            writer,
            BytesMut::new(),
            Side::Connector,
            &config,
            &tracker,
            token.clone(),
        );
        let (reader, writer) = server.into_mux_parts();
        let (_relay, mut relay_rx) = Mux::start_parts(
            reader,
            writer,
            BytesMut::new(),
            Side::Relay,
            &config,
            &tracker,
            token.clone(),
        );
        let mut out = connector
            .open(bytes::Bytes::from_static(b"hdr"))
            .await
            .unwrap();
        let incoming = relay_rx.incoming.recv().await.unwrap();
        assert_eq!(&incoming.header[..], b"hdr");
        let mut back = incoming.stream;
        let up = pattern(2_000_000, 10);
        let down = pattern(1_500_000, 11);
        let (got_up, got_down) = tokio::join!(
            async {
                let mut got = Vec::new();
                back.read_to_end(&mut got).await.unwrap();
                back.write_all(&down).await.unwrap();
                back.shutdown().await.unwrap();
                got
            },
            async {
                out.write_all(&up).await.unwrap();
                out.shutdown().await.unwrap();
                let mut got = Vec::new();
                out.read_to_end(&mut got).await.unwrap();
                got
            }
        );
        assert!(got_up == up && got_down == down, "kitepipe/1: {v1}");
        token.cancel();
        tracker.close();
        tracker.wait().await;
    }
}

/// RFC 8448 §3 (a simple 1-RTT handshake, TLS_AES_128_GCM_SHA256): the
/// client's and the server's application traffic secrets and the keys and
/// IVs the RFC derives from them.
#[test]
fn keys_and_ivs_come_from_traffic_secrets_as_in_rfc_8448() {
    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }
    let vectors = [
        (
            "9e40646ce79a7f9dc05af8889bce6552875afa0b06df0087f792ebb7c17504a5",
            "17422dda596ed5d9acd890e3c63f5051",
            "5b78923dee08579033e523d9",
        ),
        (
            "a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643",
            "9f02283b6c9c07efc26bb9f2ac92e356",
            "cf782b88dd83549aadf1e984",
        ),
    ];
    for (secret, key, iv) in vectors {
        let secret = TrafficSecret::new(&hex(secret)).unwrap();
        let mut derived = [0u8; 16];
        secret.expand_label(b"key", &mut derived);
        assert_eq!(derived.to_vec(), hex(key));
        assert_eq!(secret.iv().to_vec(), hex(iv));
    }
}

/// A link where one end runs this record layer and the other keeps rustls
/// (which derives key updates by its own key schedule): `(ours, rustls)`.
async fn mixed_pair(ours_is_client: bool) -> (LinkIo<DuplexStream>, LinkIo<DuplexStream>) {
    let (server, client) = configs();
    let (c, s) = tokio::io::duplex(256 * 1024);
    let name = ServerName::try_from("relay.test").unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    let connector = tokio_rustls::TlsConnector::from(client);
    let (server_tls, client_tls) = tokio::join!(
        acceptor.accept(ReadAhead::for_handshake(BytesMut::new(), s)),
        connector.connect(name, ReadAhead::for_handshake(BytesMut::new(), c))
    );
    let (client, server) = (
        tokio_rustls::TlsStream::Client(client_tls.unwrap()),
        tokio_rustls::TlsStream::Server(server_tls.unwrap()),
    );
    let keep_rustls = |mut tls: tokio_rustls::TlsStream<ReadAhead<DuplexStream>>| {
        tls.get_mut().0.set_records_only(false);
        LinkIo::Tls(Box::new(tls))
    };
    if ours_is_client {
        (
            LinkIo::after_handshake(client).unwrap(),
            keep_rustls(server),
        )
    } else {
        (
            LinkIo::after_handshake(server).unwrap(),
            keep_rustls(client),
        )
    }
}

/// Makes the rustls end send a KeyUpdate with update_requested before its
/// next record (as `refresh_traffic_keys` does).
fn rustls_requests_update(io: &mut LinkIo<DuplexStream>) {
    let LinkIo::Tls(tls) = io else {
        panic!("expected rustls")
    };
    match &mut **tls {
        tokio_rustls::TlsStream::Client(c) => c.get_mut().1.refresh_traffic_keys().unwrap(),
        tokio_rustls::TlsStream::Server(s) => s.get_mut().1.refresh_traffic_keys().unwrap(),
    }
}

/// Under load both ways, our key updates are read by rustls (so the next
/// keys are TLS 1.3's, as rustls's own key schedule derives them), and
/// rustls's update requests are answered: one update of ours per request.
#[tokio::test]
async fn key_updates_interoperate_with_rustls_under_load_both_ways() {
    for ours_is_client in [true, false] {
        let (mut ours, mut theirs) = mixed_pair(ours_is_client).await;
        records(&mut ours).set_rekey_after(7);
        let mut requests = 0;
        for round in 0..6u8 {
            let up = pattern(300_000 + usize::from(round), round);
            assert!(transfer(&mut ours, &mut theirs, &up, 40_000).await == up);
            rustls_requests_update(&mut theirs);
            requests += 1;
            let down = pattern(200_000, round.wrapping_add(100));
            assert!(transfer(&mut theirs, &mut ours, &down, 40_000).await == down);
        }
        // Our own updates went by every 7 records; each request of rustls
        // was read and answered (rustls reads the last answer only now).
        let back = pattern(70_000, 1);
        assert!(transfer(&mut ours, &mut theirs, &back, 70_000).await == back);
        let r = records(&mut ours);
        assert_eq!(
            r.rx.keys.generation, requests,
            "ours_is_client {ours_is_client}"
        );
        assert!(r.w.tx.keys.generation > (6 * 300_000 / MAX_PLAINTEXT / 7) as u64);
        assert!(!r.rx.signals.answer_update.load(Ordering::Relaxed));
    }
}

/// Seals `inner` (content, type byte and padding as they are) as one record
/// on `io`'s sending side, bypassing every check of the sealer.
fn seal_raw(io: &mut LinkIo<DuplexStream>, inner: &[u8]) {
    let tx = &mut records(io).w.tx;
    let start = tx.begin_plain_record();
    tx.wbuf.put_slice(inner);
    tx.seal_record(start);
}

/// `content` followed by its content type: an unpadded inner plaintext.
fn inner(content: &[u8], content_type: u8) -> Vec<u8> {
    let mut inner = content.to_vec();
    inner.push(content_type);
    inner
}

/// Sends what `craft` puts on the client's sending side, and returns the
/// server's read error and the alert the client then receives (the server
/// shuts its side down after the error, as the link's writer does).
async fn refusal(
    from_server: bool,
    craft: impl FnOnce(&mut LinkIo<DuplexStream>),
) -> (io::Error, Option<rustls::AlertDescription>) {
    let (server, client) = configs();
    let (c, s) = tokio::io::duplex(1024 * 1024);
    let (mut client, mut server) = link_pair(server, client, c, s).await;
    let (sender, receiver) = if from_server {
        (&mut server, &mut client)
    } else {
        (&mut client, &mut server)
    };
    sender.write_all(b"before").await.unwrap();
    craft(sender);
    sender.write_all(b"after").await.unwrap();
    sender.flush().await.unwrap();
    let mut got = [0u8; 6];
    receiver.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"before");
    let mut rest = Vec::new();
    let err = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        receiver.read_to_end(&mut rest),
    )
    .await
    .expect("the receiver gives up")
    .expect_err("the crafted record must be refused");
    assert!(
        rest.is_empty(),
        "nothing after the refused record is handed out"
    );
    let _ = receiver.shutdown().await;
    let mut sink = Vec::new();
    let alert = match sender.read_to_end(&mut sink).await {
        Err(err) => match crate::pki::find_tls_error(&err) {
            Some(rustls::Error::AlertReceived(alert)) => Some(*alert),
            _ => None,
        },
        Ok(_) => None,
    };
    (err, alert)
}

#[tokio::test]
async fn inner_plaintext_over_2_14_plus_1_is_refused_with_record_overflow() {
    // Content of 2^14 + 1 bytes: one too many with its type byte.
    let (err, alert) = refusal(false, |io| {
        seal_raw(
            io,
            &inner(&[7u8; MAX_PLAINTEXT + 1], CONTENT_APPLICATION_DATA),
        )
    })
    .await;
    assert!(err.to_string().contains("exceeds"), "{err}");
    assert_eq!(alert, Some(rustls::AlertDescription::RecordOverflow));
    // Padding counts too.
    let mut padded = inner(b"x", CONTENT_APPLICATION_DATA);
    padded.resize(MAX_PLAINTEXT + 2, 0);
    let (err, alert) = refusal(false, |io| seal_raw(io, &padded)).await;
    assert!(err.to_string().contains("exceeds"), "{err}");
    assert_eq!(alert, Some(rustls::AlertDescription::RecordOverflow));
}

#[tokio::test]
async fn the_largest_inner_plaintext_passes() {
    let (server, client) = configs();
    let (c, s) = tokio::io::duplex(1024 * 1024);
    let (mut client, mut server) = link_pair(server, client, c, s).await;
    let mut padded = inner(&[5u8; 100], CONTENT_APPLICATION_DATA);
    padded.resize(MAX_PLAINTEXT + 1, 0);
    seal_raw(&mut client, &padded);
    seal_raw(
        &mut client,
        &inner(&[6u8; MAX_PLAINTEXT], CONTENT_APPLICATION_DATA),
    );
    client.flush().await.unwrap();
    let mut got = vec![0u8; 100 + MAX_PLAINTEXT];
    server.read_exact(&mut got).await.unwrap();
    assert!(got[..100].iter().all(|&b| b == 5) && got[100..].iter().all(|&b| b == 6));
}

#[tokio::test]
async fn ciphertext_over_2_14_plus_256_is_refused_with_record_overflow() {
    let (err, alert) = refusal(false, |io| {
        let tx = &mut records(io).w.tx;
        tx.wbuf.put_slice(&record_header(MAX_CIPHERTEXT + 1));
        tx.wbuf.put_bytes(0, MAX_CIPHERTEXT + 1);
    })
    .await;
    assert!(err.to_string().contains("exceeds"), "{err}");
    assert_eq!(alert, Some(rustls::AlertDescription::RecordOverflow));
}

#[tokio::test]
async fn empty_handshake_and_alert_records_are_refused() {
    for content_type in [CONTENT_HANDSHAKE, CONTENT_ALERT] {
        let (err, alert) = refusal(false, |io| seal_raw(io, &[content_type])).await;
        assert!(err.to_string().contains("empty record"), "{err}");
        assert_eq!(alert, Some(rustls::AlertDescription::UnexpectedMessage));
    }
    // Padding is no content either.
    let (err, alert) = refusal(false, |io| seal_raw(io, &[CONTENT_HANDSHAKE, 0, 0, 0])).await;
    assert!(err.to_string().contains("empty record"), "{err}");
    assert_eq!(alert, Some(rustls::AlertDescription::UnexpectedMessage));
    // Nor is a record of padding only.
    let (err, alert) = refusal(false, |io| seal_raw(io, &[0, 0, 0])).await;
    assert!(err.to_string().contains("without a content type"), "{err}");
    assert_eq!(alert, Some(rustls::AlertDescription::UnexpectedMessage));
}

#[tokio::test]
async fn other_content_types_are_refused() {
    // Inside the encryption: change_cipher_spec, heartbeat, unknown.
    for content_type in [CONTENT_CHANGE_CIPHER_SPEC, 24, 99] {
        let (err, alert) = refusal(false, |io| seal_raw(io, &inner(b"\x01", content_type))).await;
        assert!(err.to_string().contains("unexpected message"), "{err}");
        assert_eq!(alert, Some(rustls::AlertDescription::UnexpectedMessage));
    }
}

#[tokio::test]
async fn change_cipher_spec_after_the_handshake_is_refused() {
    // The middlebox-compatibility record, unencrypted, as it may come
    // during a handshake: not after it.
    let (err, alert) = refusal(false, |io| {
        records(io)
            .w
            .tx
            .wbuf
            .put_slice(&[CONTENT_CHANGE_CIPHER_SPEC, 3, 3, 0, 1, 1]);
    })
    .await;
    assert!(err.to_string().contains("change_cipher_spec"), "{err}");
    assert_eq!(alert, Some(rustls::AlertDescription::UnexpectedMessage));
}

/// A NewSessionTicket body: lifetime, age_add, nonce, ticket, extensions.
fn ticket() -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&3600u32.to_be_bytes());
    body.extend_from_slice(&7u32.to_be_bytes());
    body.extend_from_slice(&[2, 0xaa, 0xbb]);
    body.extend_from_slice(&[0, 3, 1, 2, 3]);
    body.extend_from_slice(&[0, 0]);
    let mut message = vec![HANDSHAKE_NEW_SESSION_TICKET, 0, 0, body.len() as u8];
    message.extend_from_slice(&body);
    message
}

#[tokio::test]
async fn a_new_session_ticket_from_the_client_is_refused() {
    let (err, alert) = refusal(false, |io| {
        seal_raw(io, &inner(&ticket(), CONTENT_HANDSHAKE))
    })
    .await;
    assert!(err.to_string().contains("new_session_ticket"), "{err}");
    assert_eq!(alert, Some(rustls::AlertDescription::UnexpectedMessage));
}

#[tokio::test]
async fn new_session_tickets_from_the_server_are_accepted_and_ignored() {
    let (server, client) = configs();
    let (c, s) = tokio::io::duplex(1024 * 1024);
    let (mut client, mut server) = link_pair(server, client, c, s).await;
    let mut two = ticket();
    two.extend_from_slice(&ticket());
    seal_raw(&mut server, &inner(&two, CONTENT_HANDSHAKE));
    // One split across two records, too.
    let one = ticket();
    seal_raw(&mut server, &inner(&one[..6], CONTENT_HANDSHAKE));
    seal_raw(&mut server, &inner(&one[6..], CONTENT_HANDSHAKE));
    server.write_all(b"still here").await.unwrap();
    server.flush().await.unwrap();
    let mut got = [0u8; 10];
    client.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"still here");
    // A malformed one is not.
    let mut bad = ticket();
    bad[3] += 1;
    bad.push(0);
    bad.push(0);
    let (err, alert) = refusal(true, |io| seal_raw(io, &inner(&bad, CONTENT_HANDSHAKE))).await;
    assert!(err.to_string().contains("malformed"), "{err}");
    assert_eq!(alert, Some(rustls::AlertDescription::DecodeError));
}

#[tokio::test]
async fn other_handshake_messages_are_refused() {
    // ClientHello, Finished, CertificateRequest after the handshake.
    for kind in [1u8, 20, 13] {
        let (err, alert) = refusal(true, |io| {
            seal_raw(io, &inner(&[kind, 0, 0, 1, 0], CONTENT_HANDSHAKE))
        })
        .await;
        assert!(err.to_string().contains("post-handshake"), "{err}");
        assert_eq!(alert, Some(rustls::AlertDescription::UnexpectedMessage));
    }
}

#[tokio::test]
async fn key_updates_with_bad_requests_or_misaligned_are_refused() {
    use rustls::AlertDescription::{DecodeError, IllegalParameter, UnexpectedMessage};
    let update = |request: u8| [HANDSHAKE_KEY_UPDATE, 0, 0, 1, request];
    let mut two = update(0).to_vec();
    two.extend_from_slice(&update(0));
    // Each case: the records the client sends, what the server's error
    // says, and the alert it closes with.
    let cases: [(&str, Vec<Vec<u8>>, &str, _); 4] = [
        (
            "a request_update other than 0 or 1",
            vec![inner(&update(2), CONTENT_HANDSHAKE)],
            "request_update 2",
            IllegalParameter,
        ),
        (
            "another message after a key update in the same record",
            vec![inner(&two, CONTENT_HANDSHAKE)],
            "aligned",
            UnexpectedMessage,
        ),
        (
            "a key update of the wrong length",
            vec![inner(
                &[HANDSHAKE_KEY_UPDATE, 0, 0, 2, 0, 0],
                CONTENT_HANDSHAKE,
            )],
            "malformed",
            DecodeError,
        ),
        (
            "half a message, then application data",
            vec![
                inner(&update(0)[..2], CONTENT_HANDSHAKE),
                inner(b"data", CONTENT_APPLICATION_DATA),
            ],
            "interleaved",
            UnexpectedMessage,
        ),
    ];
    for (what, sent, says, want) in cases {
        let (err, alert) = refusal(false, |io| {
            for record in &sent {
                seal_raw(io, record);
            }
        })
        .await;
        assert!(err.to_string().contains(says), "{what}: {err}");
        assert_eq!(alert, Some(want), "{what}");
    }
}

/// A peer asking for updates over and over while we are silent gets one
/// answer, and our answer asks for nothing: no loop of updates.
#[tokio::test]
async fn update_requests_get_one_answer_that_requests_nothing() {
    let (server, client) = configs();
    let (c, s) = tokio::io::duplex(1024 * 1024);
    let (mut client, mut server) = link_pair(server, client, c, s).await;
    for _ in 0..5 {
        records(&mut server).w.tx.send_key_update(UPDATE_REQUESTED);
    }
    // One split across two records: still one message.
    {
        let tx = &mut records(&mut server).w.tx;
        let start = tx.begin_plain_record();
        tx.wbuf.put_slice(&[HANDSHAKE_KEY_UPDATE, 0]);
        tx.finish_record(start, CONTENT_HANDSHAKE);
        let start = tx.begin_plain_record();
        tx.wbuf.put_slice(&[0, 1, UPDATE_REQUESTED]);
        tx.finish_record(start, CONTENT_HANDSHAKE);
        tx.keys.rekey();
    }
    assert_eq!(transfer(&mut server, &mut client, b"x", 1).await, b"x");
    assert_eq!(records(&mut client).rx.keys.generation, 6);
    assert_eq!(records(&mut client).w.tx.keys.generation, 0);
    assert_eq!(transfer(&mut client, &mut server, b"y", 1).await, b"y");
    assert_eq!(transfer(&mut client, &mut server, b"y", 1).await, b"y");
    assert_eq!(records(&mut client).w.tx.keys.generation, 1);
    let s = records(&mut server);
    assert_eq!(s.rx.keys.generation, 1);
    assert!(!s.rx.signals.answer_update.load(Ordering::Relaxed));
    assert_eq!(transfer(&mut server, &mut client, b"z", 1).await, b"z");
    assert_eq!(records(&mut server).w.tx.keys.generation, 6);
}

/// A link whose multiplexer reads a record the RFC forbids is closed with
/// the RFC's alert: the reader's refusal reaches the peer through the
/// writer's shutdown.
#[tokio::test]
async fn a_mux_link_refusing_a_record_sends_the_alert() {
    use crate::link::{LinkClosed, Mux, MuxConfig, Side};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (client_tcp, server_tcp) = tokio::join!(tokio::net::TcpStream::connect(addr), async {
        listener.accept().await.unwrap().0
    });
    let (server, client) = configs();
    let (mut client, server) = link_pair(server, client, client_tcp.unwrap(), server_tcp).await;
    let tracker = tokio_util::task::TaskTracker::new();
    let (reader, writer) = server.into_mux_parts();
    let (relay, _rx) = Mux::start_parts(
        reader,
        writer,
        BytesMut::new(),
        Side::Relay,
        &MuxConfig::default(),
        &tracker,
        tokio_util::sync::CancellationToken::new(),
    );
    let LinkIo::Records(records) = &mut client else {
        panic!("expected records")
    };
    let tx = &mut records.w.tx;
    let start = tx.begin_plain_record();
    tx.finish_record(start, CONTENT_CHANGE_CIPHER_SPEC);
    client.flush().await.unwrap();
    let reason = tokio::time::timeout(std::time::Duration::from_secs(10), relay.closed())
        .await
        .expect("the link closes");
    assert!(
        matches!(&reason, LinkClosed::Io(err)
            if matches!(err.get_ref().and_then(|e| e.downcast_ref()), Some(RecordError::Unexpected(_)))),
        "{reason:?}"
    );
    let mut sink = Vec::new();
    let err = client.read_to_end(&mut sink).await.unwrap_err();
    assert_eq!(
        crate::pki::find_tls_error(&err),
        Some(&rustls::Error::AlertReceived(
            rustls::AlertDescription::UnexpectedMessage
        ))
    );
    tracker.close();
    tracker.wait().await;
}

/// A consumer that keeps one small chunk out of every read buffer (a
/// stream nobody reads, fed a byte at a time between other traffic) pins
/// at most MAX_PINNED_BUFFERS buffers: past that the reader hands out
/// copies, and goes back to zero copy once the chunks are let go.
#[tokio::test]
async fn chunks_held_by_a_slow_consumer_pin_a_bounded_number_of_buffers() {
    const ROUNDS: usize = MAX_PINNED_BUFFERS + 36;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (client_tcp, server_tcp) = tokio::join!(tokio::net::TcpStream::connect(addr), async {
        listener.accept().await.unwrap().0
    });
    let (server, client) = configs();
    let (client, server) = link_pair(server, client, client_tcp.unwrap(), server_tcp).await;
    let (_client_reader, mut writer) = client.into_mux_parts();
    let LinkIo::Records(server) = server else {
        panic!("expected records")
    };
    let (mut reader, _server_writer) = server.into_split();
    let filler = vec![0u8; SPLIT_CHUNK + 4 * MAX_PLAINTEXT];
    let write = async {
        for _ in 0..ROUNDS + 8 {
            writer.write_all(b"H").await.unwrap();
            writer.flush().await.unwrap();
            writer.write_all(&filler).await.unwrap();
        }
        writer.shutdown().await.unwrap();
    };
    let read = async {
        let mut held = Vec::new();
        let mut most_pinned = 0;
        let mut copied = false;
        while let Some(chunk) = std::future::poll_fn(|cx| reader.poll_chunk(cx))
            .await
            .unwrap()
        {
            if chunk[..] == *b"H" {
                if held.len() < ROUNDS {
                    held.push(chunk);
                } else {
                    // Let go of everything: the pins go, and so does copying.
                    held.clear();
                }
            }
            most_pinned = most_pinned.max(reader.rx.pinned.len());
            copied |= reader.rx.pinned.copy_out();
        }
        (
            most_pinned,
            copied,
            reader.rx.pinned.copy_out(),
            reader.rx.pinned.len(),
        )
    };
    let (_, (most_pinned, copied, copying_at_end, pinned_at_end)) = tokio::join!(write, read);
    eprintln!("{most_pinned} buffers pinned at most, {pinned_at_end} at the end");
    assert!(
        most_pinned <= MAX_PINNED_BUFFERS,
        "{most_pinned} buffers pinned"
    );
    assert!(copied, "the reader switched to copies");
    assert!(!copying_at_end && pinned_at_end < MAX_PINNED_BUFFERS);
}
