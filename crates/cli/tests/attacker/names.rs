//! Attacker tests: names. A node name routes events and remote operations
//! only when proven (a certificate, or a node proof of a domain secret
//! covering it); certificate identities' names are reserved against secret
//! claims; a link is replaced only by the same proven identity; guessing
//! secrets is slowed and cut; unauthenticated links are capped and timed
//! out; a link ends when its certificate does; a claim's visitor policy
//! (allow/deny lists) is parsed and bounded again by the relay; a
//! connector withdraws only its own kites, and only so many at once.
//!
//! Cases of the trust-model issue: 1 (node-name takeover), 9 (online
//! secret guessing), 11 (instance replacement by any identity), 12 (a link
//! outliving its certificate), 13 (secret holders claiming certificate
//! names), 15 (unauthenticated links and `nodes_seen` unbounded).
// Real processes, real sockets and certificates' wall-clock validity.
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use kitepipe::link::{Mux, MuxConfig, MuxReceivers, Side};
use kitepipe::pki::{Fingerprint, ProofInput, RelayTrust, Secret, kite_proof, link_exporter};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::support::*;

/// The relay's `MAX_UNPROVEN_LINKS` (crates/kitepipe/src/relay/session.rs).
const MAX_UNPROVEN_LINKS: usize = 256;
/// The relay's `FREE_WRONG_PROOFS`: wrong proofs per source address before
/// the backoff starts (1 s, doubling).
const FREE_WRONG_PROOFS: usize = 8;

// ---- fixtures ---------------------------------------------------------

/// GET `url` on the relay's gateway, as its owner (with the gateway
/// token), with an `Authorization` header: (status, body).
fn get(relay: &RelayProc, url: &str) -> (u16, String) {
    let token = relay.token_header();
    let (_, out, err) = curl(&[
        "-s",
        "--max-time",
        "30",
        "-H",
        &token,
        "-H",
        "Authorization: Bearer operator-token",
        "-w",
        "\n%{http_code}",
        url,
    ]);
    let out = String::from_utf8_lossy(&out).into_owned();
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
    let status = code.trim().parse().unwrap_or(0);
    assert!(status != 0, "curl {url} failed: {err}");
    (status, body.to_string())
}

/// `kitepipe remote node:NODE --gateway GW ARGS...`: exit code, stdout, stderr.
fn remote(relay: &RelayProc, node: &str, args: &[&str]) -> (i32, String, String) {
    let gateway = relay.gateway.expect("the relay runs a gateway").to_string();
    let child = Command::new(BIN)
        .args(["remote", &format!("node:{node}"), "--gateway", &gateway])
        .args(["--connect-timeout", "10s"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kitepipe runs");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(patience()) {
        Ok(out) => out.expect("kitepipe ran"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("kitepipe remote (pid {pid}) hung past {:?}", patience());
        }
    };
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Lines of `text` containing every one of `needles`.
/// Nothing replaced `real` so far: the relay logged no replacement and the
/// link is open. The registry replaces before it answers, but its log
/// reaches the test later than the answer: each test also counts the
/// replacements once the expected one is seen, which catches a late one.
fn assert_nothing_replaced(relay: &RelayProc, real: &FakeLink) {
    assert!(
        !relay.proc.output().contains("replacing its previous link"),
        "{}",
        relay.proc.output()
    );
    assert!(!real.mux.is_closed());
}

fn lines_with(text: &str, needles: &[&str]) -> usize {
    text.lines()
        .filter(|line| needles.iter().all(|n| line.contains(n)))
        .count()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len() / 2)
        .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The TLS client config a connector uses against `relay` (pinned), with
/// `kitepipe/1` only, so the session stays on rustls (no record layer
/// needed in the test).
fn link_tls(relay: &RelayProc) -> Arc<rustls::ClientConfig> {
    let fingerprint: Fingerprint = relay.fingerprint.parse().expect("relay fingerprint");
    let config = kitepipe::pki::connector_client_config(&RelayTrust::Pinned(fingerprint))
        .expect("client config");
    let mut config = (*config).clone();
    config.alpn_protocols = vec![b"kitepipe/1".to_vec()];
    Arc::new(config)
}

/// A hand-made connector link: says any hello, proves whatever it likes.
struct FakeLink {
    mux: Mux,
    rx: MuxReceivers,
    exporter: [u8; 32],
    client_nonce: [u8; 32],
    server_nonce: Vec<u8>,
    _tracker: TaskTracker,
}

impl FakeLink {
    /// Links to `relay` and says hello as `node` with `instance`.
    async fn open(relay: &RelayProc, instance: &str, node: &str) -> FakeLink {
        let tcp = tokio::net::TcpStream::connect(relay.link).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = tokio_rustls::TlsConnector::from(link_tls(relay))
            .connect(name, tcp)
            .await
            .expect("TLS with the relay");
        let exporter = link_exporter(tls.get_ref().1).unwrap();
        let tracker = TaskTracker::new();
        let (mux, mut rx) = Mux::start(
            tls,
            BytesMut::new(),
            Side::Connector,
            &MuxConfig::default(),
            &tracker,
            CancellationToken::new(),
        );
        let client_nonce = [7u8; 32];
        let hello = json!({
            "type": "hello", "version": 1, "role": "connector", "instance": instance,
            "node": node, "software": "attacker/0", "client_nonce": hex(&client_nonce),
        });
        mux.send_control(Bytes::from(hello.to_string()))
            .await
            .unwrap();
        let challenge = recv_json(&mut rx).await;
        assert_eq!(challenge["type"], "challenge", "{challenge}");
        let server_nonce = unhex(challenge["server_nonce"].as_str().unwrap());
        FakeLink {
            mux,
            rx,
            exporter,
            client_nonce,
            server_nonce,
            _tracker: tracker,
        }
    }

    fn proof(&self, secret: &str, protocol: &str, name: &str) -> String {
        let input = ProofInput {
            tls_exporter: &self.exporter,
            server_nonce: &self.server_nonce,
            client_nonce: &self.client_nonce,
            protocol,
            name,
        };
        hex(&kite_proof(&Secret::new(secret), &input))
    }

    /// Registers HTTP kites `names` and proves node `node`, all with
    /// `secret` (none: no proofs); returns the relay's `registered`.
    async fn register(&mut self, secret: Option<&str>, names: &[&str], node: &str) -> Value {
        let kites: Vec<Value> = names
            .iter()
            .map(|name| {
                let proof = secret.map_or(String::new(), |s| self.proof(s, "http", name));
                json!({"kite": {"proto": "http", "name": name}, "proof": proof})
            })
            .collect();
        let node_proofs: Vec<String> = secret
            .map(|s| self.proof(s, "node", node))
            .into_iter()
            .collect();
        let register = json!({"type": "register", "kites": kites, "node_proofs": node_proofs});
        self.mux
            .send_control(Bytes::from(register.to_string()))
            .await
            .unwrap();
        let registered = recv_json(&mut self.rx).await;
        assert_eq!(registered["type"], "registered", "{registered}");
        registered
    }

    /// Sends a `register` of HTTP kites, each proven with `secret` and
    /// carrying the extra claim fields of its JSON object (e.g. `allow`).
    async fn send_claims(&self, secret: &str, claims: &[(&str, Value)]) {
        let kites: Vec<Value> = claims
            .iter()
            .map(|(name, fields)| {
                let mut claim = json!({
                    "kite": {"proto": "http", "name": name},
                    "proof": self.proof(secret, "http", name),
                });
                for (key, value) in fields.as_object().expect("claim fields are an object") {
                    claim[key] = value.clone();
                }
                claim
            })
            .collect();
        let register = json!({"type": "register", "kites": kites});
        self.mux
            .send_control(Bytes::from(register.to_string()))
            .await
            .unwrap();
    }
}

async fn recv_json(rx: &mut MuxReceivers) -> Value {
    let payload = tokio::time::timeout(patience(), rx.control.recv())
        .await
        .expect("the relay answers in time")
        .expect("the link is up");
    serde_json::from_slice(&payload).unwrap()
}

// ---- case 1: node names are proven ------------------------------------

/// Case 1: a connector with no certificate, no secret and no kite says
/// `--name laptop --allow-remote exec,fs`. Remote operations and events
/// for `laptop` still reach only the real `laptop` (a certificate), and
/// nothing reaches the impersonator once the real one is gone.
#[test]
fn impersonator_gets_no_remote_ops_and_no_events() {
    let ca = Ca::init("names-impersonator");
    let laptop = ca.issue("laptop", &[]);
    let relay = Relay::new()
        .args(&["--client-ca", &ca.cert(), "--cert-domain", "example.net"])
        .args(&["--domain", "http:*.example.org:names-attacker-secret"])
        .args(&["--remote", "laptop:exec,fs", "--event-wait", "1s"])
        .start();
    let rgw = relay.gateway.expect("relay gateway");
    let real_handlers = handlers("names-real", &[("get_whoami", "echo real")]);
    let fake_handlers = handlers("names-fake", &[("get_whoami", "echo fake")]);
    let mut real = Connector::new(&relay)
        .args(&["--identity", &path(&laptop)])
        .args(&["--kite", "http:laptop.example.net=127.0.0.1:9"])
        .args(&["--allow-remote", "exec"])
        .args(&["--handlers", &path(real_handlers.path())])
        .spawn();
    real.wait_links_up(1);
    // The impersonator links last (the newest link used to win).
    let fake = Connector::new(&relay)
        .args(&["--name", "laptop", "--allow-remote", "exec,fs"])
        .args(&["--handlers", &path(fake_handlers.path())])
        .spawn();
    // It proves nothing, so the relay closes its link as soon as it
    // registered: it never shows as up; its log says it registered.
    fake.wait_for("linked to relay");
    let line = eventually("the relay to refuse the impersonator's name", || {
        relay
            .proc
            .output()
            .lines()
            .find(|l| l.contains("node name not proven") && l.contains("laptop"))
            .map(str::to_string)
    });
    assert!(line.contains("no node proof"), "{line}");
    fake.wait_for("relay did not accept this node name");

    // Events (with their Authorization header) go to the real laptop only.
    for _ in 0..3 {
        assert_eq!(
            get(&relay, &format!("http://{rgw}/client/laptop/whoami")),
            (200, "real\n".to_string())
        );
        assert_eq!(
            get(&relay, &format!("http://{rgw}/client/LAPTOP/whoami")),
            (200, "real\n".to_string())
        );
    }
    // Remote operations run on the real laptop, with what it offers.
    let (code, out, err) = remote(&relay, "laptop", &["exec", "--", "sh", "-c", "echo $PPID"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), real.pid().to_string());
    let (code, _, err) = remote(&relay, "laptop", &["ls", "/"]);
    assert_ne!(code, 0, "fs ran although the real laptop accepts exec only");
    assert!(err.contains("does not accept fs operations"), "{err}");

    // Without the real laptop, the impersonator still gets nothing.
    real.kill();
    let (status, body) = get(&relay, &format!("http://{rgw}/client/laptop/whoami"));
    assert_eq!(status, 503, "{body}");
    let (code, _, err) = remote(&relay, "laptop", &["exec", "--", "true"]);
    assert_ne!(code, 0, "{err}");
    let fake_log = fake.output();
    assert!(!fake_log.contains("op=exec"), "{fake_log}");
    assert!(!fake_log.contains("event received"), "{fake_log}");
}

// ---- case 13: certificate names are reserved --------------------------

/// Case 13: where a secret domain overlaps the certificate domain, a
/// secret holder claims neither a certificate identity's kites (exact or
/// wildcard) nor its node name, in any case; names under its own domain
/// it proves.
#[test]
fn secret_holder_cannot_take_certificate_names() {
    let ca = Ca::init("names-reserved");
    let laptop = ca.issue("laptop", &[]);
    let backend = Backend::start("http");
    let relay = Relay::new()
        .args(&["--client-ca", &ca.cert(), "--cert-domain", "example.net"])
        .args(&["--domain", "http:*.example.net:names-attacker-secret"])
        .args(&["--domain", "http:*.example.org:names-attacker-secret"])
        .start();
    let _real = Connector::new(&relay)
        .args(&["--identity", &path(&laptop)])
        .args(&[
            "--kite",
            &format!("http:laptop.example.net={}", backend.addr()),
        ])
        .start();
    let intruder = Connector::new(&relay)
        .secret("names-attacker-secret")
        .kite("http:LAPTOP.example.net=127.0.0.1:9")
        .kite("http:*.example.net=127.0.0.1:9")
        .kite("http:intruder.example.org=127.0.0.1:9")
        .args(&["--name", "LAPTOP"])
        .start();
    for kite in ["laptop.example.net", "*.example.net"] {
        let line = eventually(&format!("{kite} refused"), || {
            intruder
                .output()
                .lines()
                .find(|l| l.contains("relay refused kite") && l.contains(&format!("http:{kite} ")))
                .map(str::to_string)
        });
        assert!(
            line.contains("reserved for certificate identities"),
            "{line}"
        );
    }
    let line = eventually("the intruder's node name refused", || {
        intruder
            .output()
            .lines()
            .find(|l| l.contains("relay did not accept this node name"))
            .map(str::to_string)
    });
    assert!(line.contains("linked certificate identity"), "{line}");
    // A node name under the certificate domain is reserved too.
    let second = Connector::new(&relay)
        .secret("names-attacker-secret")
        .kite("http:second.example.org=127.0.0.1:9")
        .args(&["--name", "laptop.EXAMPLE.net"])
        .start();
    let line = eventually("the second intruder's node name refused", || {
        second
            .output()
            .lines()
            .find(|l| l.contains("relay did not accept this node name"))
            .map(str::to_string)
    });
    assert!(
        line.contains("reserved for certificate identities"),
        "{line}"
    );
    // The certificate's kite still reaches its own backend.
    let (code, out, err) = curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Host: laptop.example.net",
        &relay.http_url(),
    ]);
    assert_eq!(
        (code, String::from_utf8_lossy(&out).into_owned()),
        (0, "200".into()),
        "{err}"
    );
    // A name under the secret's own domain is proven.
    let honest = Connector::new(&relay)
        .secret("names-attacker-secret")
        .kite("http:box.example.org=127.0.0.1:9")
        .args(&["--name", "box.example.org"])
        .spawn();
    honest.wait_for("node name proven");
    assert!(honest.output().contains("box.example.org"));
}

// ---- case 11: replacement needs the same identity ---------------------

/// Case 11: links presenting a proven link's `instance` (learned, say, by
/// another relay's operator) replace it only if they prove the same name:
/// neither an unproven link nor one proving another name kicks it.
#[test]
fn the_same_instance_from_another_identity_does_not_kick_the_real_link() {
    let relay = Relay::new()
        .domain("http:*.example.net:names-attacker-secret")
        .domain("http:*.example.org:other-secret")
        .start();
    let rt = runtime();
    rt.block_on(async {
        let instance = "0123456789abcdef";
        let mut real = FakeLink::open(&relay, instance, "real.example.net").await;
        let registered = real
            .register(
                Some("names-attacker-secret"),
                &["real.example.net"],
                "real.example.net",
            )
            .await;
        assert_eq!(registered["node"]["proven"], true, "{registered}");

        let mut stranger = FakeLink::open(&relay, instance, "real.example.net").await;
        let registered = stranger.register(None, &[], "real.example.net").await;
        assert_eq!(registered["node"]["proven"], false, "{registered}");
        let mut other = FakeLink::open(&relay, instance, "evil.example.org").await;
        let registered = other
            .register(
                Some("other-secret"),
                &["evil.example.org"],
                "evil.example.org",
            )
            .await;
        assert_eq!(registered["node"]["proven"], true, "{registered}");
        assert_nothing_replaced(&relay, &real);

        // The same proven name does replace (a connector coming back).
        let mut again = FakeLink::open(&relay, instance, "real.example.net").await;
        again
            .register(
                Some("names-attacker-secret"),
                &["real.example.net"],
                "real.example.net",
            )
            .await;
        tokio::time::timeout(patience(), real.mux.closed())
            .await
            .expect("the stale link is closed");
        // The relay logs before it closes, but its stderr reaches the test
        // through a reader thread: wait for the line, then count it.
        relay.proc.wait_for("replacing its previous link");
        assert_eq!(
            lines_with(&relay.proc.output(), &["replacing its previous link"]),
            1
        );
        drop(other);
    });
}

// ---- case 9: guessing secrets -----------------------------------------

/// Case 9: a connector guessing the domain secret (20 claims per
/// registration, reconnecting as fast as it is let) gets at most
/// `FREE_WRONG_PROOFS` verdicts plus one per doubling backoff step from
/// its address in a 10 s window; each link is closed after a few wrong
/// proofs. A connector with the right secret, linked before, is untouched.
#[test]
fn wrong_secret_guessing_is_slowed_and_the_link_closed() {
    let relay = Relay::new()
        .domain("http:*.example.net:right-secret")
        .start();
    let honest = Connector::new(&relay)
        .secret("right-secret")
        .kite("http:honest.example.net=127.0.0.1:9")
        .start();
    let mut guesser = Connector::new(&relay)
        .secret("wrong-guess-secret-0")
        .args(&["--name", "guess.example.net", "--max-backoff", "1s"]);
    for i in 0..20 {
        guesser = guesser.kite(&format!("http:g{i}.example.net=127.0.0.1:9"));
    }
    let started = Instant::now();
    let mut guesser = guesser.spawn();
    let window = Duration::from_secs(10);
    std::thread::sleep(window.saturating_sub(started.elapsed()));
    guesser.kill();
    let log = relay.proc.output();
    let verdicts = lines_with(&log, &["wrong secret for"]);
    // 1 + 2 + 4 s of backoff fit in the window after the free ones.
    let bound = FREE_WRONG_PROOFS + 4;
    assert!(
        verdicts >= 4 && verdicts <= bound,
        "{verdicts} wrong proofs checked in {window:?} (bound {bound}):\n{log}"
    );
    assert!(
        lines_with(&log, &["not checked", "retry after"]) > 0,
        "{log}"
    );
    let out = guesser.output();
    assert!(out.contains("too many wrong proofs"), "{out}");
    // The honest connector was never disturbed.
    assert_eq!(honest.links_up(), 1);
    assert_eq!(honest.links_down(), 0);
}

// ---- case 15: unauthenticated links -----------------------------------

/// A TLS ClientHello offering the link ALPN, to replay as many times as
/// wanted (the relay answers each with a full server handshake).
fn link_client_hello(relay: &RelayProc) -> Vec<u8> {
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut conn = rustls::ClientConnection::new(link_tls(relay), name).unwrap();
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).unwrap();
    }
    hello
}

/// Case 15: 10,000 links that never finish their handshake (ClientHellos
/// replayed, held open) and links saying hello with made-up names: the
/// relay keeps at most `MAX_UNPROVEN_LINKS` of them (its open file
/// descriptors show it), its RSS stays under 64 MiB, a real connector
/// links in the middle of the flood, and the made-up names are not
/// remembered (they are "unknown", not "offline").
#[test]
fn ten_thousand_bogus_hellos_stay_bounded_and_a_real_connector_links() {
    const FLOOD: usize = 10_000;
    // Above the cap (so eviction is what bounds the relay), below the
    // listen backlog (so real connectors' SYNs are not dropped by the kernel).
    const IN_FLIGHT: usize = 600;
    const RSS_BOUND_KIB: u64 = 64 * 1024;
    let relay = Relay::new()
        .domain("http:*.example.net:names-attacker-secret")
        .args(&["--event-wait", "1s"])
        .start();
    let baseline_fds = relay.proc.fd_count();
    let hello = link_client_hello(&relay);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // Made-up names, said and gone.
    rt.block_on(async {
        for i in 0..20 {
            let mut link =
                FakeLink::open(&relay, &format!("bogus-{i}"), &format!("bogus-{i}")).await;
            let registered = link.register(None, &[], &format!("bogus-{i}")).await;
            assert_eq!(registered["node"]["proven"], false, "{registered}");
        }
    });

    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let peak_fds = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, peak_fds) = (stop.clone(), peak_fds.clone());
        let pid = relay.proc.pid();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
                    .map(|d| d.count())
                    .unwrap_or(0);
                peak_fds.fetch_max(fds, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let link: SocketAddr = relay.link;
    let flood = {
        let done = done.clone();
        let hello = hello.clone();
        rt.spawn(async move {
            let permits = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..FLOOD {
                let permit = permits.clone().acquire_owned().await.unwrap();
                let hello = hello.clone();
                let done = done.clone();
                tasks.spawn(async move {
                    // From another loopback address than the real connector's.
                    let socket = tokio::net::TcpSocket::new_v4().unwrap();
                    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
                    if let Ok(mut sock) = socket.connect(link).await {
                        let _ = sock.write_all(&hello).await;
                        // Held open, never finished: read until the relay gives up on it.
                        let mut buf = [0u8; 4096];
                        let _ = tokio::time::timeout(Duration::from_secs(20), async {
                            while let Ok(n) = sock.read(&mut buf).await {
                                if n == 0 {
                                    break;
                                }
                            }
                        })
                        .await;
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    drop(permit);
                });
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
        })
    };
    // A real connector links while the flood is on.
    eventually("the flood to be under way", || {
        (done.load(Ordering::Relaxed) >= 2 * MAX_UNPROVEN_LINKS).then_some(())
    });
    let real = Connector::new(&relay)
        .secret("names-attacker-secret")
        .kite("http:real.example.net=127.0.0.1:9")
        .args(&["--name", "real.example.net"])
        .spawn();
    real.wait_for("node name proven");
    eprintln!(
        "real connector linked after {} bogus hellos",
        done.load(Ordering::Relaxed)
    );
    let flood_patience = patience() * 10;
    rt.block_on(async {
        tokio::time::timeout(flood_patience, flood)
            .await
            .expect("the flood ends in time")
            .unwrap();
    });
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak_fds.load(Ordering::Relaxed);
    let rss = relay.proc.rss_kib();
    eprintln!("relay: peak {peak} fds (baseline {baseline_fds}), RSS {rss} KiB");
    // Unproven links, plus sockets accepted but not yet judged while the
    // relay's CPU is saturated by handshakes: far fewer than the flood's
    // IN_FLIGHT, which the relay would all hold for 15 s without the cap.
    assert!(
        peak <= baseline_fds + MAX_UNPROVEN_LINKS + 128,
        "relay held {peak} fds during the flood (baseline {baseline_fds})"
    );
    assert!(
        rss < RSS_BOUND_KIB,
        "relay RSS {rss} KiB after {FLOOD} bogus hellos"
    );
    assert_eq!(real.links_down(), 0, "{}", real.output());
    // The made-up names were never remembered.
    let rgw = relay.gateway.expect("relay gateway");
    let (status, body) = get(&relay, &format!("http://{rgw}/client/bogus-3/time"));
    assert_eq!(status, 404, "{body}");
    let (status, body) = get(
        &relay,
        &format!("http://{rgw}/client/real.example.net/time"),
    );
    assert_eq!(status, 200, "{body}");
}

/// Case 15: a link that says hello and then nothing is told why and closed
/// at the handshake deadline (15 s from its first byte), not kept.
#[test]
fn a_link_that_proves_nothing_is_closed_at_the_deadline() {
    let relay = Relay::new()
        .domain("http:*.example.net:names-attacker-secret")
        .start();
    let rt = runtime();
    rt.block_on(async {
        let started = Instant::now();
        let mut idle = FakeLink::open(&relay, "idle", "idle.example.net").await;
        let error = recv_json(&mut idle.rx).await;
        assert_eq!(error["type"], "error", "{error}");
        assert_eq!(error["code"], "unauthorized", "{error}");
        let message = error["message"].as_str().unwrap();
        assert!(message.contains("proved nothing within 15s"), "{message}");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(14), "closed after {waited:?}");
        tokio::time::timeout(patience(), idle.mux.closed())
            .await
            .expect("the relay closes the link");
    });
}

// ---- case 12: certificate expiry --------------------------------------

/// Case 12: a link whose certificate expires while linked is closed at its
/// notAfter, with the reason on both sides.
#[test]
fn a_link_is_closed_when_its_certificate_expires() {
    let ca = Ca::init("names-expiry");
    let not_after = SystemTime::now() + Duration::from_secs(15);
    let not_after = humantime::format_rfc3339_seconds(not_after).to_string();
    let laptop = ca.issue("laptop", &["--not-after", &not_after]);
    let relay = Relay::new()
        .args(&["--client-ca", &ca.cert(), "--cert-domain", "example.net"])
        .start();
    let connector = Connector::new(&relay)
        .args(&["--identity", &path(&laptop)])
        .args(&["--kite", "http:laptop.example.net=127.0.0.1:9"])
        .start();
    let linked = Instant::now();
    let line = eventually("the connector to be told its certificate expired", || {
        connector
            .output()
            .lines()
            .find(|l| l.contains("cannot link to relay") && l.contains("expired at"))
            .map(str::to_string)
    });
    assert!(line.contains("certificate laptop"), "{line}");
    assert!(linked.elapsed() < Duration::from_secs(15) + patience());
    relay.proc.wait_for("closing link: certificate expired");
    // And it cannot come back with it.
    connector.wait_for("CertificateExpired");
}

/// An unnamed link (no certificate, no provable name) is replaced by a new
/// link of the same instance only once that link holds, by secret, every
/// kite the old one held: a stranger who learned the instance, and holds a
/// secret for some of its kites or for other names, cannot kick it.
#[test]
fn an_unnamed_link_is_replaced_only_by_one_proving_all_its_kites() {
    let relay = Relay::new()
        .domain("http:*.example.net:names-attacker-secret")
        .domain("http:*.example.org:other-secret")
        .start();
    let rt = runtime();
    rt.block_on(async {
        let instance = "fedcba9876543210";
        let kites = ["a.example.net", "b.example.net"];
        let mut real = FakeLink::open(&relay, instance, "laptop").await;
        let registered = real
            .register(Some("names-attacker-secret"), &kites, "laptop")
            .await;
        assert_eq!(registered["node"]["proven"], false, "{registered}");

        // A subset of the kites, and other kites under another secret.
        let mut subset = FakeLink::open(&relay, instance, "laptop").await;
        subset
            .register(Some("names-attacker-secret"), &kites[..1], "laptop")
            .await;
        let mut other = FakeLink::open(&relay, instance, "laptop").await;
        other
            .register(
                Some("other-secret"),
                &["a.example.org", "b.example.org"],
                "laptop",
            )
            .await;
        assert_nothing_replaced(&relay, &real);

        // The connector coming back with every kite does replace it.
        let mut again = FakeLink::open(&relay, instance, "laptop").await;
        again
            .register(Some("names-attacker-secret"), &kites, "laptop")
            .await;
        tokio::time::timeout(patience(), real.mux.closed())
            .await
            .expect("the stale link is closed");
        assert!(!other.mux.is_closed(), "a link holding other kites stays");
        // Every replacement was made by this last link (it holds the
        // subset's kites too, so it replaces that one as well): neither the
        // subset nor the other identity replaced anything earlier (a
        // replacement logged late would show here with another link id).
        relay.proc.wait_for("replacing its previous link");
        let output = relay.proc.output();
        let replacers: std::collections::BTreeSet<&str> = output
            .lines()
            .filter(|line| line.contains("replacing its previous link"))
            .filter_map(|line| line.split(" id=").nth(1)?.split(' ').next())
            .collect();
        assert_eq!(replacers.len(), 1, "{output}");
        drop(subset);
    });
}

// ---- per-kite visitor policy in claims --------------------------------

/// A hostile connector (with the domain's secret) claims kites whose
/// allow/deny lists are too long (257 entries), malformed, or one huge
/// entry: the relay parses and bounds them again, refuses those claims
/// (`invalid`, the message naming the bound or the entry, cut short),
/// keeps the well-formed claim of the same registration with its policy
/// enforced, and goes on serving an honest connector.
#[test]
fn a_hostile_claims_policy_lists_are_bounded_and_refused() {
    let secret = "policy-attacker-secret";
    let relay = Relay::new()
        .domain(&format!("http:*.example.net:{secret}"))
        .start();
    let backend = Backend::start("http");
    let honest = Connector::new(&relay)
        .secret(secret)
        .kite(&format!("http:honest.example.net={}", backend.addr()))
        .start();
    let too_many = vec!["10.0.0.1"; 257];
    let huge = "9".repeat(20_000);
    let hostile = [
        ("long.example.net", json!({"allow": too_many})),
        (
            "junk.example.net",
            json!({"deny": ["10.0.0.0/8", "not an address"]}),
        ),
        ("huge.example.net", json!({"allow": [huge]})),
        ("prefix.example.net", json!({"deny": ["::1/200"]})),
    ];
    let good = ("good.example.net", json!({"allow": ["127.0.0.2"]}));
    let typed = ("typed.example.net", json!({"allow": [17]}));
    let runtime = runtime();

    // A list entry that is not a string fails the message's parse: the
    // relay answers with a protocol error (or just closes the link, when
    // the close overtakes the error) and registers nothing.
    let answer = runtime.block_on(async {
        let mut link = FakeLink::open(&relay, "hostile", "hostile.example.net").await;
        let mut claims = hostile.to_vec();
        claims.extend([typed, good.clone()]);
        link.send_claims(secret, &claims).await;
        tokio::time::timeout(patience(), link.rx.control.recv()).await
    });
    let text = answer
        .expect("the relay answers in time")
        .map(|payload| String::from_utf8_lossy(&payload).into_owned())
        .unwrap_or_default();
    assert!(
        text.is_empty() || text.contains("malformed control message"),
        "{text}"
    );

    let (registered, _link) = runtime.block_on(async {
        let mut link = FakeLink::open(&relay, "hostile-2", "hostile2.example.net").await;
        let mut claims = hostile.to_vec();
        claims.push(good);
        link.send_claims(secret, &claims).await;
        (recv_json(&mut link.rx).await, link)
    });
    assert_eq!(registered["type"], "registered", "{registered}");
    let outcomes = registered["kites"].as_array().unwrap();
    let expect = [
        "at most 256 per list",
        "\"not an address\" is not an IP address",
        "is not an IP address",
        "at most 128",
    ];
    for (outcome, why) in outcomes.iter().zip(expect) {
        assert_eq!(outcome["result"]["status"], "refused", "{outcome}");
        assert_eq!(outcome["result"]["reason"], "invalid", "{outcome}");
        let message = outcome["result"]["message"].as_str().unwrap();
        assert!(message.contains(why), "{message}");
        assert!(
            message.len() < 300,
            "the refusal quotes a huge entry: {message}"
        );
    }
    assert_eq!(outcomes[4]["result"]["status"], "accepted", "{registered}");

    // The accepted claim's policy holds: 127.0.0.1 is not on its list.
    let url = format!("{}/", relay.http_url());
    let (code, out, err) = curl(&["-i", "-H", "Host: good.example.net", &url]);
    assert_eq!(code, 0, "{err}");
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    // The relay stays healthy for others.
    assert_eq!(honest.links_up(), 1);
    let body = curl_ok(&["-H", "Host: honest.example.net", &url]);
    assert_eq!(body, "hello from backend\n");
    assert!(relay.proc.exited().is_none());
}

// ---- per-kite HTTP rules in claims ------------------------------------

/// `u:pw`, bcrypt cost 5 (`htpasswd -nbB u pw`).
const BCRYPT_LINE: &str = "u:$2y$05$i8GgOYQdRdwWE4vd1BtQou38w9yCUMjZ/3KVUmr.o0.Og3EAq2W3y";

/// A hostile connector (with the domain's secret) claims http kites
/// whose HTTP rules are hostile: 10,000 htpasswd lines, a header value
/// with CRLF, an edit of Content-Length, a 30 KB realm, MD5 and unknown
/// hash kinds. The relay checks them again and refuses each of those
/// claims (`invalid`, the message naming the problem, short), keeps the
/// well-formed claim of the same registration (its basic auth enforced:
/// 401), keeps the link up, and goes on serving an honest connector. A
/// 1 MB realm is past the registration message's own bound: the relay
/// refuses the message (or closes that link) and registers nothing.
#[test]
fn a_hostile_claims_http_rules_are_bounded_and_refused() {
    let secret = "http-rules-attacker-secret";
    let relay = Relay::new()
        .domain(&format!("http:*.example.net:{secret}"))
        .start();
    let backend = Backend::start("http");
    let honest = Connector::new(&relay)
        .secret(secret)
        .kite(&format!("http:honest.example.net={}", backend.addr()))
        .start();
    let hostile = [
        (
            "many.example.net",
            json!({"http": {"basic_auth": vec!["u:x"; 10_000]}}),
            "more than 1024 users",
        ),
        (
            "crlf.example.net",
            json!({"http": {"request_headers": {"set": {"X-A": "b\r\nX-Evil: 1"}}}}),
            "CR, LF or NUL",
        ),
        (
            "framing.example.net",
            json!({"http": {"response_headers": {"set": {"Content-Length": "0"}}}}),
            "Content-Length cannot be edited",
        ),
        (
            "realm.example.net",
            json!({"http": {"basic_auth": [BCRYPT_LINE], "auth_realm": "r".repeat(30_000)}}),
            "auth_realm must have 1 to 128",
        ),
        (
            "md5.example.net",
            json!({"http": {"basic_auth": ["u:$apr1$x8fV2$0RLJXDUj4dS9JVz4jVoSq1"]}}),
            "line 1: MD5 ($apr1$) hashes are not accepted",
        ),
        (
            "unknown.example.net",
            json!({"http": {"basic_auth": ["u:$9$abcdef"]}}),
            "unknown hash kind",
        ),
    ];
    let good = (
        "guarded.example.net",
        json!({"http": {"basic_auth": [BCRYPT_LINE]}}),
    );
    let runtime = runtime();

    let answer = runtime.block_on(async {
        let link = FakeLink::open(&relay, "hostile", "hostile.example.net").await;
        let huge = (
            "huge.example.net",
            json!({"http": {"auth_realm": "r".repeat(1 << 20)}}),
        );
        link.send_claims(secret, &[huge]).await;
        let mut link = link;
        tokio::time::timeout(patience(), link.rx.control.recv()).await
    });
    let text = answer
        .expect("the relay answers in time")
        .map(|payload| String::from_utf8_lossy(&payload).into_owned())
        .unwrap_or_default();
    assert!(
        text.is_empty() || text.contains("exceeds the maximum"),
        "{text}"
    );

    let (registered, link) = runtime.block_on(async {
        let mut link = FakeLink::open(&relay, "hostile-2", "hostile2.example.net").await;
        let mut claims: Vec<(&str, Value)> = hostile
            .iter()
            .map(|(name, fields, _)| (*name, fields.clone()))
            .collect();
        claims.push(good);
        link.send_claims(secret, &claims).await;
        (recv_json(&mut link.rx).await, link)
    });
    assert_eq!(registered["type"], "registered", "{registered}");
    let outcomes = registered["kites"].as_array().unwrap();
    assert_eq!(outcomes.len(), hostile.len() + 1, "{registered}");
    for (outcome, (name, _, why)) in outcomes.iter().zip(&hostile) {
        assert_eq!(outcome["result"]["status"], "refused", "{name}: {outcome}");
        assert_eq!(outcome["result"]["reason"], "invalid", "{name}: {outcome}");
        let message = outcome["result"]["message"].as_str().unwrap();
        assert!(message.contains(why), "{name}: {message}");
        assert!(message.len() < 300, "{name}: a huge refusal: {message}");
    }
    assert_eq!(
        outcomes[hostile.len()]["result"]["status"],
        "accepted",
        "{registered}"
    );

    // The accepted claim's rules hold, on the hostile link, which is up.
    let url = format!("{}/", relay.http_url());
    let (code, out, err) = curl(&["-i", "-H", "Host: guarded.example.net", &url]);
    assert_eq!(code, 0, "{err}");
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    assert!(
        out.contains("WWW-Authenticate: Basic realm=\"kitepipe\""),
        "{out}"
    );
    // With the password the visitor is past the relay's door: its (fake)
    // connector answers no streams, so no answer comes at all (a refusal
    // by the rules would have come at once).
    let (_, out, _) = curl(&[
        "-i",
        "--max-time",
        "2",
        "-u",
        "u:pw",
        "-H",
        "Host: guarded.example.net",
        &url,
    ]);
    let out = String::from_utf8_lossy(&out);
    assert!(!out.starts_with("HTTP/1.1 401"), "{out}");
    assert!(!out.starts_with("HTTP/1.1 429"), "{out}");
    // The relay stays healthy for others.
    assert_eq!(honest.links_up(), 1);
    let body = curl_ok(&["-H", "Host: honest.example.net", &url]);
    assert_eq!(body, "hello from backend\n");
    assert!(relay.proc.exited().is_none());
    drop(link);
}

// ---- withdrawals ------------------------------------------------------

/// A hostile connector (with a secret of its own domain) withdraws kites
/// it never had: another link's kite and a name nobody serves. Nothing
/// changes for them: the other link's kite keeps answering, the unknown
/// name stays unknown; only its own kite goes (503 once withdrawn). A
/// withdrawal of more than `MAX_WITHDRAW` kites is refused with an error
/// and changes nothing, and the link stays up.
#[test]
fn a_connector_withdraws_only_its_own_kites() {
    let relay = Relay::new()
        .domain("http:*.example.net:names-attacker-secret")
        .domain("http:*.example.org:other-secret")
        .start();
    let backend = Backend::start("http");
    let _victim = Connector::new(&relay)
        .secret("names-attacker-secret")
        .kite(&format!("http:good.example.net={}", backend.addr()))
        .start();
    let status = |host: &str| {
        let (code, out, err) = curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &format!("Host: {host}"),
            &relay.http_url(),
        ]);
        assert_eq!(code, 0, "curl {host}: {err}");
        String::from_utf8_lossy(&out).into_owned()
    };
    assert_eq!(status("good.example.net"), "200");
    let rt = runtime();
    rt.block_on(async {
        let mut mallory = FakeLink::open(&relay, "mallory-instance", "mallory").await;
        let registered = mallory
            .register(Some("other-secret"), &["m.example.org"], "mallory")
            .await;
        assert_eq!(
            registered["kites"][0]["result"]["status"], "accepted",
            "{registered}"
        );
        let withdraw = |names: &[&str]| {
            let kites: Vec<Value> = names
                .iter()
                .map(|name| json!({"proto": "http", "name": name}))
                .collect();
            Bytes::from(json!({"type": "register", "kites": [], "withdraw": kites}).to_string())
        };
        mallory
            .mux
            .send_control(withdraw(&[
                "good.example.net",
                "never.example.net",
                "m.example.org",
            ]))
            .await
            .unwrap();
        let answer = recv_json(&mut mallory.rx).await;
        assert_eq!(answer["type"], "registered", "{answer}");

        // One more than the bound (1024): an error, nothing withdrawn.
        let many: Vec<String> = (0..1025).map(|i| format!("n{i}.example.net")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        mallory.mux.send_control(withdraw(&many)).await.unwrap();
        let error = recv_json(&mut mallory.rx).await;
        assert_eq!(error["type"], "error", "{error}");
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains("at most 1024 kites"),
            "{error}"
        );
        let answer = recv_json(&mut mallory.rx).await;
        assert_eq!(answer["type"], "registered", "{answer}");
        assert!(!mallory.mux.is_closed(), "the link stays up");
    });
    assert_eq!(
        status("good.example.net"),
        "200",
        "another link's kite stays"
    );
    assert_eq!(status("m.example.org"), "503", "its own kite is withdrawn");
    assert_eq!(status("never.example.net"), "404", "never served: unknown");
    let out = relay.proc.output();
    assert_eq!(
        lines_with(&out, &["kite withdrawn by its connector"]),
        1,
        "{out}"
    );
    assert_eq!(
        lines_with(
            &out,
            &["kite withdrawn by its connector", "kite=http:m.example.org"]
        ),
        1,
        "{out}"
    );
}
