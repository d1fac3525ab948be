//! Attacker tests: the link (cases 2 and 14 of the trust-model issue).
//!
//! A fake connector completes the TLS handshake and the link's own record
//! layer with the relay, says hello, and then only writes: a flood of PINGs
//! it never reads the answers to. The relay must hold its memory (one PONG
//! owed at most) and close the link (a peer that echoes none of its pings
//! does not read), while a real connector keeps serving its kite. The
//! record layer's RFC 8446 checks are unit tests (`link::records::tests`).

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use kitepipe::link::LinkIo;
use kitepipe::link::ReadAhead;
use kitepipe::pki::{ALPN_LINK_V1, Fingerprint, RelayTrust, connector_client_config};
use kitepipe_proto::frame::Frame;
use kitepipe_proto::message::{self, ConnectorMessage, Hello, PROTOCOL_VERSION, Role};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;

use crate::support::*;

const SECRET: &str = "link-attacker-secret";
const KITE: &str = "good.example.net";

/// The relay's heartbeat in these tests: short, so that a link whose peer
/// never reads is closed within seconds (`mux::UNANSWERED_HEARTBEATS`
/// heartbeats, checked every third of one).
const HEARTBEAT: &str = "3s";

/// The attacker's pace: 64 KiB every this often, 8 MiB/s. Of PINGs, the
/// relay before the fix held a queued PONG (~48 bytes) for each: ~23 MiB
/// more per second.
const FLOOD_PACE: Duration = Duration::from_millis(8);

/// Most PING bytes the attacker sends: 24 s at its pace, where the relay
/// closes the link after about 7 s.
const FLOOD_BYTES: usize = 192 << 20;

/// Growth of the relay's resident memory allowed during the flood: its
/// read buffers and one batch of writes, with room for the allocator.
const RSS_GROWTH_KIB: u64 = 32 * 1024;

/// A relay with one domain, a backend and a real connector serving it.
fn scene() -> (RelayProc, Backend, Proc) {
    let relay = Relay::new()
        .domain(&format!("http:*.example.net:{SECRET}"))
        .args(&["--heartbeat", HEARTBEAT])
        .start();
    let backend = Backend::start("http");
    let connector = Connector::new(&relay)
        .secret(SECRET)
        .kite(&format!("http:{KITE}={}", backend.addr()))
        .start();
    (relay, backend, connector)
}

/// The kite answers through the relay.
fn kite_answers(relay: &RelayProc) {
    let url = format!("{}/", relay.http_url());
    curl_ok(&[
        "-sS",
        "--max-time",
        "20",
        "-H",
        &format!("Host: {KITE}"),
        &url,
    ]);
}

/// A TLS link to the relay, as a connector opens it (our record layer
/// after the handshake, or rustls for the whole session with `kitepipe/1`),
/// and a hello naming `node`: the relay has registered the link.
async fn fake_connector(relay: &RelayProc, node: &str, v1: bool) -> LinkIo<TcpStream> {
    let pin: Fingerprint = relay.fingerprint.parse().expect("relay fingerprint");
    let mut config = connector_client_config(&RelayTrust::Pinned(pin)).unwrap();
    if v1 {
        let mut v1_only = (*config).clone();
        v1_only.alpn_protocols = vec![ALPN_LINK_V1.to_vec()];
        config = Arc::new(v1_only);
    }
    let tcp = TcpStream::connect(relay.link).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(
            ServerName::try_from("relay.invalid").unwrap(),
            ReadAhead::for_handshake(BytesMut::new(), tcp),
        )
        .await
        .expect("TLS handshake with the relay");
    let mut link = LinkIo::after_handshake(tokio_rustls::TlsStream::Client(tls)).unwrap();
    assert_eq!(
        matches!(link, LinkIo::Tls(_)),
        v1,
        "the transport asked for"
    );
    let hello = ConnectorMessage::Hello(Hello {
        version: PROTOCOL_VERSION,
        role: Role::Connector,
        instance: format!("attacker-{node}"),
        node: node.into(),
        software: "attacker".into(),
        client_nonce: "00".repeat(32),
        remote: Vec::new(),
        agent: None,
    });
    let mut wire = BytesMut::new();
    Frame::Control {
        payload: message::encode(&hello),
    }
    .encode(&mut wire);
    link.write_all(&wire).await.unwrap();
    link.flush().await.unwrap();
    link
}

/// Plays a fake connector named `node` that writes the batches `next`
/// makes at [`FLOOD_PACE`] and never reads, until the relay cuts it off
/// (or [`FLOOD_BYTES`]); asserts the relay's memory stayed within
/// [`RSS_GROWTH_KIB`] and that it closed the link as one whose peer does
/// not read, and that the real kite still answers.
fn flood_is_bounded_and_cut(node: &str, v1: bool, mut next: impl FnMut(&mut BytesMut)) {
    let (relay, _backend, _connector) = scene();
    kite_answers(&relay);
    let baseline = relay.proc.rss_kib();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (sent, peak, took) = runtime.block_on(async {
        let mut link = fake_connector(&relay, node, v1).await;
        relay.proc.wait_for(&format!("node={node}"));
        let start = tokio::time::Instant::now();
        let mut sent = 0usize;
        let mut peak = baseline;
        let mut pace = tokio::time::interval(FLOOD_PACE);
        let mut batch = BytesMut::new();
        while sent < FLOOD_BYTES {
            pace.tick().await;
            batch.clear();
            next(&mut batch);
            // The relay closes the link: writes fail (or stall once the
            // socket buffers are full and nobody reads on the other end).
            let write = tokio::time::timeout(Duration::from_secs(5), async {
                link.write_all(&batch).await?;
                link.flush().await
            });
            match write.await {
                Ok(Ok(())) => sent += batch.len(),
                Ok(Err(err)) => {
                    eprintln!("{node}: write failed after {sent} bytes: {err}");
                    break;
                }
                Err(_) => {
                    eprintln!("{node}: write stalled after {sent} bytes");
                    break;
                }
            }
            if sent % (1 << 20) < batch.len() {
                peak = peak.max(relay.proc.rss_kib());
            }
        }
        (sent, peak.max(relay.proc.rss_kib()), start.elapsed())
    });
    let out = eventually("the relay closes the flooding link", || {
        let out = relay.proc.output();
        out.lines()
            .any(|l| {
                l.contains(&format!("node={node}"))
                    && l.contains("link closed")
                    && (l.contains("answered no ping") || l.contains("does not read"))
            })
            .then_some(out)
    });
    eprintln!("{node}: {sent} bytes in {took:?}: relay RSS {baseline} KiB, at most {peak} KiB");
    assert!(
        peak <= baseline + RSS_GROWTH_KIB,
        "relay RSS went from {baseline} KiB to {peak} KiB after {sent} bytes from {node}"
    );
    assert!(
        sent < FLOOD_BYTES,
        "the relay kept reading {sent} bytes from {node}, a peer that never reads:\n{out}"
    );
    // The real connector was not disturbed.
    kite_answers(&relay);
}

/// 64 KiB of PINGs (3,855 of them).
fn pings(batch: &mut BytesMut) {
    let mut payload = 0u64;
    while batch.len() < 64 * 1024 {
        payload += 1;
        Frame::Ping { payload }.encode(batch);
    }
}

#[test]
fn a_ping_flood_that_never_reads_is_bounded_and_cut() {
    flood_is_bounded_and_cut("ping-flooder", false, pings);
}

#[test]
fn a_ping_flood_over_kitepipe_1_is_bounded_and_cut() {
    flood_is_bounded_and_cut("ping-flooder-v1", true, pings);
}

/// Every OPEN is refused with a RESET (a bad stream header): resets the
/// attacker never reads pile up on the relay's side of the link.
#[test]
fn an_open_flood_that_never_reads_is_bounded_and_cut() {
    let mut stream = 1u32;
    flood_is_bounded_and_cut("open-flooder", false, move |batch| {
        while batch.len() < 64 * 1024 {
            Frame::Open {
                stream,
                header: bytes::Bytes::from_static(b"not a stream header"),
            }
            .encode(batch);
            stream += 2;
        }
    });
}
