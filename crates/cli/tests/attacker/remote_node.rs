//! Attacker tests: remote_node — a hostile relay against a real connector
//! that accepts remote operations (cases 16, 18 and the relayed-exec half
//! of case 4 of the trust-model issue).
//!
//! [`FakeRelay`] accepts the connector's link with its own self-signed
//! certificate (the connector pins it with `--fingerprint`), answers
//! hello/challenge/registered as the real relay does, and then opens
//! `RemoteRelayed` streams and events as a relay whose operator is the
//! attacker: whatever the relay's rules say, the connector's own grant
//! (`--allow-remote`) and bounds are all that stand.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Bytes, BytesMut};
use kitepipe::connector::MAX_LINK_STREAMS;
use kitepipe::link::ReadAhead;
use kitepipe::link::{LinkIo, Mux, MuxConfig, MuxStream, Side};
use kitepipe::pki::{RelayCert, relay_server_config};
use kitepipe::remote::agent::{MAX_CONCURRENT_OPS, MAX_RELAYED_PROCESSES};
use kitepipe_proto::event::EventHeader;
use kitepipe_proto::frame::ResetCode;
use kitepipe_proto::message::{
    self, Challenge, ConnectorMessage, PROTOCOL_VERSION, Registered, RelayMessage, RelayedOp,
    StreamHeader,
};
use kitepipe_proto::remote::{
    AgentRecord, ClientRecord, ErrorKind, ErrorReply, ExecOp, MkdirOp, MvOp, PathOp, ReadOp,
    RemoteOp, RmOp, StatOp, WriteOp,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::support::path as p;
use crate::support::*;

/// A relay played by the attacker: accepts the connector's links and
/// keeps the newest one to open streams on.
struct FakeRelay {
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
    fingerprint: String,
    link: watch::Receiver<Option<Mux>>,
    token: CancellationToken,
    _dir: TempDir,
}

impl FakeRelay {
    fn start() -> FakeRelay {
        let dir = TempDir::new("fake-relay");
        let (cert, _) = RelayCert::load_or_create(dir.path(), &[]).expect("relay certificate");
        let fingerprint = cert.fingerprint().to_string();
        let tls = relay_server_config(&cert).expect("relay TLS config");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let token = CancellationToken::new();
        let (tx, link) = watch::channel(None);
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accept_token = token.clone();
        rt.spawn(async move {
            let tracker = TaskTracker::new();
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            loop {
                let sock = tokio::select! {
                    _ = accept_token.cancelled() => return,
                    res = listener.accept() => match res {
                        Ok((sock, _)) => sock,
                        Err(_) => continue,
                    },
                };
                if let Some(mux) =
                    accept_link(sock, &acceptor, &tracker, accept_token.child_token()).await
                {
                    tx.send_replace(Some(mux));
                }
            }
        });
        FakeRelay {
            rt,
            addr,
            fingerprint,
            link,
            token,
            _dir: dir,
        }
    }

    /// A connector linking to this relay.
    fn connector(&self) -> Connector {
        Connector::to(&self.addr.to_string(), &self.fingerprint)
    }

    /// The connector's live link.
    fn link(&self) -> Mux {
        eventually("the connector to link to the fake relay", || {
            self.link
                .borrow()
                .as_ref()
                .filter(|mux| !mux.is_closed())
                .cloned()
        })
    }

    /// Opens a relayed operation's stream.
    fn open(&self, op: RemoteOp) -> MuxStream {
        let header = StreamHeader::RemoteRelayed(RelayedOp {
            caller: "attacker".into(),
            op,
        });
        let link = self.link();
        self.rt
            .block_on(link.open(message::encode(&header)))
            .expect("open a stream")
    }

    /// Runs one relayed operation: sends `input` records and FIN, reads
    /// the reply to its end.
    fn run(&self, op: RemoteOp, input: &[ClientRecord]) -> Outcome {
        let mut stream = self.open(op);
        self.rt.block_on(async {
            for record in input {
                let mut buf = BytesMut::new();
                record.encode(&mut buf);
                if stream.write_all(&buf).await.is_err() {
                    break;
                }
            }
            let _ = stream.shutdown().await;
            let mut reply = Vec::new();
            let read = tokio::time::timeout(patience(), stream.read_to_end(&mut reply))
                .await
                .expect("the connector answers in time");
            if read.is_err() {
                let (code, reason) = stream.reset_reason().expect("a reset with a reason");
                return Outcome::Reset(code, reason);
            }
            let mut buf = BytesMut::from(&reply[..]);
            let mut records = Vec::new();
            while let Some(record) = AgentRecord::decode(&mut buf).expect("well-formed records") {
                records.push(record);
            }
            Outcome::Records(records)
        })
    }

    /// Sends an event (a GET of `/NOUN` with no body, so to handler
    /// `get_NOUN`); returns the reply's bytes.
    fn event(&self, noun: &str) -> String {
        let header = StreamHeader::Event(EventHeader {
            name: format!("get_{noun}"),
            method: "GET".into(),
            path: format!("/{noun}"),
            args: Vec::new(),
            query: String::new(),
            headers: Vec::new(),
            to: None,
            caller: None,
            wait_ms: 0,
        });
        let link = self.link();
        self.rt.block_on(async {
            let mut stream = link.open(message::encode(&header)).await.expect("open");
            let _ = stream.shutdown().await;
            let mut reply = Vec::new();
            let _ = tokio::time::timeout(patience(), stream.read_to_end(&mut reply))
                .await
                .expect("the event is answered in time");
            String::from_utf8_lossy(&reply).into_owned()
        })
    }
}

impl Drop for FakeRelay {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// The relay's side of a link: TLS, hello, challenge, registered. Then
/// control messages and streams from the connector are drained.
async fn accept_link(
    sock: tokio::net::TcpStream,
    acceptor: &tokio_rustls::TlsAcceptor,
    tracker: &TaskTracker,
    token: CancellationToken,
) -> Option<Mux> {
    let tls = acceptor
        .accept(ReadAhead::for_handshake(BytesMut::new(), sock))
        .await
        .ok()?;
    let io = LinkIo::after_handshake(tokio_rustls::TlsStream::Server(tls)).ok()?;
    let (reader, writer) = io.into_mux_parts();
    let (mux, mut rx) = Mux::start_parts(
        reader,
        writer,
        BytesMut::new(),
        Side::Relay,
        &MuxConfig::default(),
        tracker,
        token,
    );
    let hello = rx.control.recv().await?;
    let Ok(ConnectorMessage::Hello(_)) = message::decode::<ConnectorMessage>(&hello) else {
        return None;
    };
    let challenge = RelayMessage::Challenge(Challenge {
        version: PROTOCOL_VERSION,
        server_nonce: message::hex(&[7u8; 32]),
    });
    mux.send_control(message::encode(&challenge)).await.ok()?;
    let register = rx.control.recv().await?;
    let Ok(ConnectorMessage::Register(_)) = message::decode::<ConnectorMessage>(&register) else {
        return None;
    };
    let registered = RelayMessage::Registered(Registered {
        kites: Vec::new(),
        node: None,
    });
    mux.send_control(message::encode(&registered)).await.ok()?;
    tracker.spawn(async move {
        loop {
            tokio::select! {
                control = rx.control.recv() => if control.is_none() { return },
                incoming = rx.incoming.recv() => if incoming.is_none() { return },
            }
        }
    });
    Some(mux)
}

/// How a relayed operation ended.
#[derive(Debug)]
enum Outcome {
    Records(Vec<AgentRecord>),
    Reset(ResetCode, String),
}

impl Outcome {
    /// The typed error the connector answered with.
    fn error(&self) -> Option<&ErrorReply> {
        match self {
            Outcome::Records(records) => records.iter().find_map(|record| match record {
                AgentRecord::Error(reply) => Some(reply),
                _ => None,
            }),
            Outcome::Reset(..) => None,
        }
    }

    fn succeeded(&self) -> bool {
        matches!(self, Outcome::Records(records)
            if matches!(records.last(), Some(AgentRecord::Done(_))))
    }

    fn stdout(&self) -> String {
        let Outcome::Records(records) = self else {
            return String::new();
        };
        let mut out = Vec::new();
        for record in records {
            if let AgentRecord::Stdout(data) | AgentRecord::Data(data) = record {
                out.extend_from_slice(data);
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Asserts a typed `permission_denied` refusal whose message says why.
#[track_caller]
fn assert_refused(outcome: &Outcome, what: &str, why: &str) {
    let Some(reply) = outcome.error() else {
        panic!("{what}: expected a typed refusal, got {outcome:?}");
    };
    assert_eq!(reply.kind, ErrorKind::PermissionDenied, "{what}: {reply:?}");
    assert!(
        reply.message.contains(why),
        "{what}: the refusal says {:?}, expected it to mention {why:?}",
        reply.message
    );
}

fn write_op(path: &Path, mode: u32) -> RemoteOp {
    RemoteOp::Write(WriteOp {
        path: p(path),
        mode: Some(mode),
    })
}

fn read_op(path: &Path) -> RemoteOp {
    RemoteOp::Read(ReadOp { path: p(path) })
}

/// A handler script that leaves a marker when it runs.
fn payload(marker: &Path) -> [ClientRecord; 2] {
    let script = format!("#!/bin/sh\nid > {}\necho pwned\n", p(marker));
    [
        ClientRecord::Data(Bytes::from(script.into_bytes())),
        ClientRecord::Eof,
    ]
}

/// A connector's files: handlers directory, identity directory (issued by
/// a CA), config file, and a working directory the relay may use.
struct NodeFiles {
    _dir: TempDir,
    _ca: Ca,
    handlers: PathBuf,
    identity: PathBuf,
    config: PathBuf,
    work: PathBuf,
    marker: PathBuf,
}

impl NodeFiles {
    fn new() -> NodeFiles {
        let dir = TempDir::new("remote-node");
        let root = dir.path().to_path_buf();
        let handlers = root.join("handlers");
        let work = root.join("work");
        std::fs::create_dir_all(&handlers).unwrap();
        std::fs::create_dir_all(&work).unwrap();
        let ca = Ca::init("remote-node-ca");
        let identity = ca.issue("victim", &[]);
        let config = root.join("connector.toml");
        std::fs::write(&config, "name = \"victim\"\n").unwrap();
        NodeFiles {
            marker: root.join("pwned"),
            _dir: dir,
            _ca: ca,
            handlers,
            identity,
            config,
            work,
        }
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--handlers".into(),
            p(&self.handlers),
            "--identity".into(),
            p(&self.identity),
            "--config".into(),
            p(&self.config),
        ]
    }
}

/// Case 16: with only `fs` granted, a relay could write an executable into
/// the connector's handlers directory and call it as an event. Now every
/// relayed file operation that resolves into the handlers directory, the
/// identity directory or the config file is refused with a typed error,
/// symlinks included, and an event to the would-be handler runs nothing.
#[test]
fn fs_grant_cannot_plant_a_handler_or_touch_keys_and_config() {
    let relay = FakeRelay::start();
    let files = NodeFiles::new();
    let args = files.args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _connector = relay
        .connector()
        .args(&args)
        .args(&["--allow-remote", "fs"])
        .start();
    let why = "protected";

    // The plain attack of the issue: an executable handler.
    let planted = files.handlers.join("get_pwn");
    let outcome = relay.run(write_op(&planted, 0o755), &payload(&files.marker));
    assert_refused(&outcome, "write into the handlers directory", why);
    assert!(!planted.exists(), "no handler was planted");
    let reply = relay.event("pwn");
    assert!(reply.contains("no handler"), "event reply: {reply}");
    assert!(!files.marker.exists(), "the planted handler never ran");

    // Through a symlink the test (a local user) made beforehand.
    let link = files.work.join("link-to-handlers");
    std::os::unix::fs::symlink(&files.handlers, &link).unwrap();
    let outcome = relay.run(write_op(&link.join("pwn"), 0o755), &payload(&files.marker));
    assert_refused(&outcome, "write through a symlink", why);
    // A path with dot-segments that lands in the handlers directory.
    let dotted = files.work.join("..").join("handlers").join("pwn");
    let outcome = relay.run(write_op(&dotted, 0o755), &payload(&files.marker));
    assert_refused(&outcome, "write through ..", why);
    assert!(!planted.exists(), "no handler was planted");

    // Replacing or moving the handlers directory itself.
    let elsewhere = files.work.join("fake-handlers");
    std::fs::create_dir_all(&elsewhere).unwrap();
    for (what, op) in [
        (
            "mkdir in the handlers directory",
            RemoteOp::Mkdir(MkdirOp {
                path: p(&files.handlers.join("sub")),
                parents: true,
                mode: None,
            }),
        ),
        (
            "mv over the handlers directory",
            RemoteOp::Mv(MvOp {
                from: p(&elsewhere),
                to: p(&files.handlers),
            }),
        ),
        (
            "mv of the handlers directory's parent",
            RemoteOp::Mv(MvOp {
                from: p(files.handlers.parent().unwrap()),
                to: p(&files.work.join("moved")),
            }),
        ),
        (
            "rm of the handlers directory",
            RemoteOp::Rm(RmOp {
                path: p(&files.handlers),
                recursive: true,
            }),
        ),
        (
            "ls of the handlers directory",
            RemoteOp::Ls(PathOp {
                path: p(&files.handlers),
            }),
        ),
    ] {
        assert_refused(&relay.run(op, &[]), what, why);
    }
    assert!(files.handlers.is_dir(), "the handlers directory is intact");

    // Keys and config: neither read nor written.
    let key = files.identity.join("key.pem");
    let key_before = std::fs::read(&key).unwrap();
    assert_refused(&relay.run(read_op(&key), &[]), "read the key", why);
    let outcome = relay.run(
        write_op(&key, 0o600),
        &[
            ClientRecord::Data(Bytes::from_static(b"x")),
            ClientRecord::Eof,
        ],
    );
    assert_refused(&outcome, "write the key", why);
    assert_eq!(std::fs::read(&key).unwrap(), key_before, "key untouched");
    assert_refused(
        &relay.run(read_op(&files.config), &[]),
        "read the config",
        why,
    );
    let outcome = relay.run(
        write_op(&files.config, 0o644),
        &[
            ClientRecord::Data(Bytes::from_static(b"handlers = \"/tmp\"\n")),
            ClientRecord::Eof,
        ],
    );
    assert_refused(&outcome, "write the config", why);
    assert_eq!(
        std::fs::read_to_string(&files.config).unwrap(),
        "name = \"victim\"\n"
    );

    // What `fs` grants still works elsewhere.
    let ok = files.work.join("ok.txt");
    let outcome = relay.run(
        write_op(&ok, 0o644),
        &[
            ClientRecord::Data(Bytes::from_static(b"fine")),
            ClientRecord::Eof,
        ],
    );
    assert!(outcome.succeeded(), "an ordinary write works: {outcome:?}");
    assert_eq!(std::fs::read_to_string(&ok).unwrap(), "fine");
    assert_eq!(relay.run(read_op(&ok), &[]).stdout(), "fine");
}

/// `fs-read` grants reading only: every writing operation is refused with
/// a typed error before anything changes, reads and listings work.
#[test]
fn fs_read_grant_refuses_every_write() {
    let relay = FakeRelay::start();
    let files = NodeFiles::new();
    let _connector = relay
        .connector()
        .args(&["--handlers", &p(&files.handlers)])
        .args(&["--allow-remote", "fs-read"])
        .start();
    let existing = files.work.join("existing.txt");
    std::fs::write(&existing, "hello").unwrap();
    let why = "fs-read";
    let outcome = relay.run(
        write_op(&files.work.join("new.txt"), 0o644),
        &[
            ClientRecord::Data(Bytes::from_static(b"x")),
            ClientRecord::Eof,
        ],
    );
    assert_refused(&outcome, "write", why);
    assert!(!files.work.join("new.txt").exists());
    for (what, op) in [
        (
            "mkdir",
            RemoteOp::Mkdir(MkdirOp {
                path: p(&files.work.join("dir")),
                parents: false,
                mode: None,
            }),
        ),
        (
            "rm",
            RemoteOp::Rm(RmOp {
                path: p(&existing),
                recursive: false,
            }),
        ),
        (
            "mv",
            RemoteOp::Mv(MvOp {
                from: p(&existing),
                to: p(&files.work.join("moved.txt")),
            }),
        ),
    ] {
        assert_refused(&relay.run(op, &[]), what, why);
    }
    assert_eq!(std::fs::read_to_string(&existing).unwrap(), "hello");
    assert!(!files.work.join("dir").exists());
    assert_eq!(relay.run(read_op(&existing), &[]).stdout(), "hello");
    let stat = relay.run(
        RemoteOp::Stat(StatOp {
            path: p(&existing),
            no_follow: false,
        }),
        &[],
    );
    assert!(stat.succeeded(), "{stat:?}");
    let ls = relay.run(
        RemoteOp::Ls(PathOp {
            path: p(&files.work),
        }),
        &[],
    );
    assert!(ls.succeeded(), "{ls:?}");
    // And no exec rides on fs-read.
    let exec = relay.run(
        RemoteOp::Exec(ExecOp {
            argv: vec!["id".into()],
            ..Default::default()
        }),
        &[],
    );
    let Outcome::Reset(ResetCode::Refused, reason) = &exec else {
        panic!("exec on an fs-read connector: {exec:?}");
    };
    assert!(reason.contains("not exec"), "{reason}");
}

/// Case 4 (connector half): relayed `exec` inherited the connector's
/// environment, `KITEPIPE_SECRET` included. Now it starts from a clean
/// environment: a few harmless variables of the node, plus what the
/// operator passed with the operation.
#[test]
fn relayed_exec_gets_a_clean_environment() {
    let relay = FakeRelay::start();
    let _connector = relay
        .connector()
        .wrapped(&[
            "env",
            "KITEPIPE_SECRET=connector-domain-secret",
            "DATABASE_PASSWORD=hunter2",
            "LANG=C.UTF-8",
        ])
        .args(&["--allow-remote", "exec"])
        .start();
    for tty in [
        None,
        Some(kitepipe_proto::remote::TtySize { rows: 24, cols: 80 }),
    ] {
        let outcome = relay.run(
            RemoteOp::Exec(ExecOp {
                argv: vec!["env".into()],
                env: vec![("ASKED_FOR".into(), "yes".into())],
                tty,
                ..Default::default()
            }),
            &[],
        );
        assert!(outcome.succeeded(), "{outcome:?}");
        let env = outcome.stdout();
        for secret in [
            "KITEPIPE_",
            "connector-domain-secret",
            "hunter2",
            "DATABASE_",
        ] {
            assert!(
                !env.contains(secret),
                "{secret} reached a relayed command (tty {tty:?}):\n{env}"
            );
        }
        for kept in ["PATH=", "LANG=C.UTF-8", "ASKED_FOR=yes"] {
            assert!(env.contains(kept), "{kept} missing (tty {tty:?}):\n{env}");
        }
    }
}

/// Relayed reads opened at once by the fake relay, which never grants
/// window (the issue's repro: 1,500 took a connector to 1,512 fds and
/// 625 MB).
const FLOOD_STREAMS: usize = 1_500;

/// A file larger than a stream's window (1 MiB), so every read blocks.
const FLOOD_FILE_LEN: usize = 3 * 1024 * 1024;

/// File descriptors the connector may hold above its baseline during the
/// flood: one open file per running operation ([`MAX_CONCURRENT_OPS`])
/// and some slack for the runtime.
const FLOOD_FD_BOUND: usize = MAX_CONCURRENT_OPS + 40;

/// Resident memory the connector may add during the flood: each running
/// read holds one 128 KiB chunk waiting for window (256 x 128 KiB = 32
/// MiB), plus the link's bounded write queue (16 MiB), the small tasks of
/// the streams waiting for a slot, blocking-pool threads and what the
/// allocator keeps of the 256 MiB that went through. Measured 60 to 75
/// MiB in a debug build (625 MB before the caps, for these 1,500 reads).
const FLOOD_RSS_BOUND_KIB: u64 = 128 * 1024;

/// Case 18: relayed operations skipped the agent's semaphore, so a relay
/// that opens reads and never grants window pinned one file and one chunk
/// per stream. Now at most `MAX_CONCURRENT_OPS` run per link (the rest
/// wait for a slot, holding no file), streams beyond `MAX_LINK_STREAMS`
/// would be reset (`busy`), and once the relay lets go the connector
/// serves it again.
#[test]
fn unread_relayed_reads_leave_the_connector_bounded() {
    let relay = FakeRelay::start();
    let files = NodeFiles::new();
    let big = files.work.join("big.bin");
    std::fs::write(&big, pseudo_random(FLOOD_FILE_LEN, 18)).unwrap();
    let connector = relay
        .connector()
        .args(&["--allow-remote", "fs"])
        .args(&["--handlers", &p(&files.handlers)])
        .start();
    let link = relay.link();
    // Settle, then the baseline.
    let reply = relay.event("nothing");
    assert!(reply.contains("no handler"), "event reply: {reply}");
    let fds_before = connector.fd_count();
    let rss_before = connector.rss_kib();

    let head_type = {
        let mut buf = BytesMut::new();
        AgentRecord::Head(Bytes::new()).encode(&mut buf);
        buf[0]
    };
    let running = Arc::new(AtomicUsize::new(0));
    let busy = Arc::new(AtomicUsize::new(0));
    let mut streams = Vec::new();
    for _ in 0..FLOOD_STREAMS {
        let header = StreamHeader::RemoteRelayed(RelayedOp {
            caller: "attacker".into(),
            op: read_op(&big),
        });
        let stream = relay
            .rt
            .block_on(link.open(message::encode(&header)))
            .expect("open");
        // Reads the first byte of each reply (far below a quarter window:
        // no credit is granted back), then holds the stream.
        let (running, busy) = (running.clone(), busy.clone());
        streams.push(relay.rt.spawn(async move {
            let mut stream = stream;
            let mut first = [0u8; 1];
            match stream.read(&mut first).await {
                Ok(1) if first[0] == head_type => {
                    running.fetch_add(1, Ordering::SeqCst);
                }
                Err(_) if matches!(stream.reset_reason(), Some((ResetCode::Busy, _))) => {
                    busy.fetch_add(1, Ordering::SeqCst);
                }
                _ => {}
            }
            std::future::pending::<()>().await;
            drop(stream);
        }));
    }
    eventually("the connector to start the reads it runs", || {
        (running.load(Ordering::SeqCst) >= MAX_CONCURRENT_OPS).then_some(())
    });
    // An event opened after the flood is answered once the connector has
    // taken every stream before it off the link (streams are accepted in
    // order): the flood is all in, and the link still serves.
    eventually("an event during the flood to be answered", || {
        relay.event("nothing").contains("no handler").then_some(())
    });
    // Whatever got through is running and pinned now: measure.
    let fds = connector.fd_count();
    let rss = connector.rss_kib();
    let running_now = running.load(Ordering::SeqCst);
    eprintln!(
        "flood: {running_now} running, {} reset busy; fds {fds_before} -> {fds}, rss {rss_before} -> {rss} KiB",
        busy.load(Ordering::SeqCst)
    );
    assert_eq!(
        running_now, MAX_CONCURRENT_OPS,
        "relayed operations running at once on one link"
    );
    assert!(
        fds <= fds_before + FLOOD_FD_BOUND,
        "the connector holds {fds} fds (baseline {fds_before})"
    );
    assert!(
        rss <= rss_before + FLOOD_RSS_BOUND_KIB,
        "the connector's RSS grew from {rss_before} KiB to {rss} KiB"
    );
    assert!(connector.exited().is_none(), "the connector is alive");
    // The relay lets go: its link is served again.
    for task in &streams {
        task.abort();
    }
    eventually("a relayed stat to run again", || {
        let stat = relay.run(
            RemoteOp::Stat(StatOp {
                path: p(&big),
                no_follow: false,
            }),
            &[],
        );
        stat.succeeded().then_some(())
    });
    eventually("the connector's fds to come back", || {
        (connector.fd_count() <= fds_before + 8).then_some(())
    });
}

/// Case 18 (processes): a relay with `exec` could start processes without
/// bound. Now at most `MAX_RELAYED_PROCESSES` relayed processes run at
/// once; one more is refused at once with a typed error, and the slots
/// come back when the relay lets its commands go.
#[test]
fn relayed_processes_are_capped() {
    let relay = FakeRelay::start();
    let connector = relay.connector().args(&["--allow-remote", "exec"]).start();
    let link = relay.link();
    let head_type = {
        let mut buf = BytesMut::new();
        AgentRecord::Head(Bytes::new()).encode(&mut buf);
        buf[0]
    };
    let sleep = || {
        RemoteOp::Exec(ExecOp {
            argv: vec!["sleep".into(), "120".into()],
            stdin: true,
            ..Default::default()
        })
    };
    // Fill every slot: each command runs until its stream goes away.
    let mut held = Vec::new();
    for _ in 0..MAX_RELAYED_PROCESSES {
        let header = StreamHeader::RemoteRelayed(RelayedOp {
            caller: "attacker".into(),
            op: sleep(),
        });
        let mut stream = relay
            .rt
            .block_on(link.open(message::encode(&header)))
            .expect("open");
        let mut first = [0u8; 1];
        let read = relay.rt.block_on(async {
            tokio::time::timeout(patience(), stream.read_exact(&mut first)).await
        });
        assert!(
            matches!(read, Ok(Ok(_))) && first[0] == head_type,
            "a command within the cap starts"
        );
        held.push(stream);
    }
    // The connector's child processes, over all its threads.
    let children = || -> usize {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", connector.pid()));
        tasks
            .into_iter()
            .flatten()
            .flatten()
            .map(|task| {
                std::fs::read_to_string(task.path().join("children"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .count()
            })
            .sum()
    };
    assert_eq!(children(), MAX_RELAYED_PROCESSES, "the commands run");
    let outcome = relay.run(sleep(), &[]);
    let Some(reply) = outcome.error() else {
        panic!("one process over the cap: {outcome:?}");
    };
    assert!(reply.message.contains("busy"), "{reply:?}");
    // Letting go kills the commands and frees the slots.
    {
        let _runtime = relay.rt.enter();
        drop(held);
    }
    eventually("the relayed commands to be gone", || {
        (children() == 0).then_some(())
    });
    let outcome = relay.run(
        RemoteOp::Exec(ExecOp {
            argv: vec!["true".into()],
            ..Default::default()
        }),
        &[],
    );
    assert!(outcome.succeeded(), "{outcome:?}");
}

/// Visitor streams opened over the cap in the flood below: enough to see
/// the resets, few enough to stay quick.
const VISITORS_OVER: usize = 100;

/// Visitor streams opened at once: far below the link's accept queue
/// (1024 streams not yet taken by the connector, reset `busy` beyond).
const VISITOR_BATCH: usize = 256;

/// Case 18 (visitors): every visitor stream holds a socket to the kite's
/// target, and nothing capped them. Now a link holds at most
/// `MAX_LINK_STREAMS` streams; the rest are reset `busy`, and the
/// connector's descriptors stay within the cap.
#[test]
fn visitor_streams_are_capped_per_link() {
    use std::sync::Mutex;
    let relay = FakeRelay::start();
    // A target that accepts and holds every connection.
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target_addr = target.local_addr().unwrap();
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let holder = accepted.clone();
    std::thread::spawn(move || {
        for sock in target.incoming() {
            let Ok(sock) = sock else { break };
            let mut held = holder.lock().unwrap();
            held.push(sock);
            if held.len() >= MAX_LINK_STREAMS {
                break;
            }
        }
    });
    let kite = "held.example.net";
    let connector = relay
        .connector()
        .args(&["--secret", "remote-node-attacker-secret-5f0c2e9a7b"])
        .args(&["--kite", &format!("tcp:{kite}:7000={target_addr}")])
        .start();
    let link = relay.link();
    let fds_before = connector.fd_count();
    let busy = Arc::new(AtomicUsize::new(0));
    let mut streams = Vec::new();
    // In batches the link's accept queue takes whole, each held by the
    // target before the next: the link fills up to its cap, no further.
    for n in 0..MAX_LINK_STREAMS + VISITORS_OVER {
        if n % VISITOR_BATCH == 0 && n > 0 && n <= MAX_LINK_STREAMS {
            eventually("the target to hold the visitors so far", || {
                (accepted.lock().unwrap().len() >= n).then_some(())
            });
        }
        let header = StreamHeader::Visitor(kitepipe_proto::message::VisitorHeader {
            kite: kitepipe_proto::kite::KiteRef {
                proto: kitepipe_proto::kite::KiteProto::Tcp,
                name: kite.into(),
                port: 7000,
            },
            host: None,
            peer: format!("192.0.2.1:{}", 1024 + n),
            relay_addr: None,
        });
        let stream = relay
            .rt
            .block_on(link.open(message::encode(&header)))
            .expect("open");
        let busy = busy.clone();
        streams.push(relay.rt.spawn(async move {
            let mut stream = stream;
            let mut first = [0u8; 1];
            if stream.read(&mut first).await.is_err()
                && matches!(stream.reset_reason(), Some((ResetCode::Busy, _)))
            {
                busy.fetch_add(1, Ordering::SeqCst);
            }
            std::future::pending::<()>().await;
            drop(stream);
        }));
    }
    eventually("the target to hold a full link of visitors", || {
        (accepted.lock().unwrap().len() >= MAX_LINK_STREAMS).then_some(())
    });
    eventually("the visitors over the cap to be reset as busy", || {
        (busy.load(Ordering::SeqCst) >= VISITORS_OVER).then_some(())
    });
    let fds = connector.fd_count();
    assert_eq!(busy.load(Ordering::SeqCst), VISITORS_OVER);
    assert_eq!(accepted.lock().unwrap().len(), MAX_LINK_STREAMS);
    assert!(
        fds <= fds_before + MAX_LINK_STREAMS + 40,
        "the connector holds {fds} fds (baseline {fds_before})"
    );
    for task in &streams {
        task.abort();
    }
    eventually("the connector's fds to come back", || {
        (connector.fd_count() <= fds_before + 8).then_some(())
    });
}
