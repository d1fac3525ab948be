use std::sync::Arc;

use bytes::BytesMut;
use rustls_pki_types::{PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;
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
        rx: Opener::new(server.rx.keys, BytesMut::new(), BytesMut::new()),
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
