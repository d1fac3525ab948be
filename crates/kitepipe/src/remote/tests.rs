//! A session and an agent over an in-memory byte stream with a tiny
//! buffer: the agent serves any byte stream, the session works over any.

use std::time::Duration;

use bytes::Bytes;
use kitepipe_proto::remote::ErrorKind;
use tokio_util::sync::CancellationToken;

use super::SessionOptions;
use super::agent::{AgentOptions, serve};
use super::session::{RemoteCommand, RemoteError, Session};

async fn pair() -> (
    Session,
    tokio::task::JoinHandle<crate::link::LinkClosed>,
    CancellationToken,
) {
    let (client_io, agent_io) = tokio::io::duplex(64);
    let shutdown = CancellationToken::new();
    let agent_shutdown = shutdown.clone();
    let agent =
        tokio::spawn(
            async move { serve(agent_io, &AgentOptions::default(), agent_shutdown).await },
        );
    let session = Session::over(client_io, SessionOptions::default())
        .await
        .unwrap();
    (session, agent, shutdown)
}

#[tokio::test]
async fn session_and_agent_over_an_in_memory_stream() {
    let (session, agent, _shutdown) = pair().await;
    assert_eq!(session.agent().pid, std::process::id());
    let out = session
        .output(&RemoteCommand::new("sh").args(["-c", "echo out; echo err >&2; exit 7"]))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.status.code, Some(7));

    // stdin through a 64-byte pipe, in several records.
    let mut exec = session
        .exec(&RemoteCommand::new("cat").stdin(true))
        .await
        .unwrap();
    let body = Bytes::from(vec![b'x'; 300_000]);
    let writer = async {
        exec.input.write(body.clone()).await.unwrap();
        exec.input.finish().await.unwrap();
    };
    let reader = async {
        let mut got = Vec::new();
        loop {
            match exec.output.next().await.unwrap() {
                super::ExecEvent::Stdout(data) => got.extend_from_slice(&data),
                super::ExecEvent::Stderr(_) => {}
                super::ExecEvent::Exit(status) => return (got, status),
            }
        }
    };
    let ((), (got, status)) = tokio::join!(writer, reader);
    assert_eq!(got.len(), body.len());
    assert_eq!(status.code, Some(0));

    let dir = std::env::temp_dir().join(format!("kitepipe-remote-unit-{}", std::process::id()));
    let dir_text = dir.display().to_string();
    session.mkdir(&dir_text, true).await.unwrap();
    let file = format!("{dir_text}/f");
    session.write(&file, b"hello").await.unwrap();
    assert_eq!(session.read(&file).await.unwrap(), b"hello");
    let err = session
        .read(&format!("{dir_text}/missing"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RemoteError::Failed { reply, .. } if reply.kind == ErrorKind::NotFound),
        "{err}"
    );
    session.rm(&dir_text, true).await.unwrap();

    session.close().await;
    let reason = tokio::time::timeout(Duration::from_secs(5), agent)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(reason, crate::link::LinkClosed::PeerClosed(_)),
        "{reason}"
    );
}

#[tokio::test]
async fn a_header_that_is_not_an_operation_resets_only_its_stream() {
    let (session, _agent, _shutdown) = pair().await;
    let mut stream = session
        .mux()
        .open(Bytes::from_static(
            br#"{"kind":"remote","op":"format_disk"}"#,
        ))
        .await
        .unwrap();
    let mut buf = [0u8; 8];
    let err = tokio::io::AsyncReadExt::read(&mut stream, &mut buf)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("bad remote operation header"),
        "{err}"
    );
    // The link and other operations are unaffected.
    let stat = session.stat("/", false).await.unwrap();
    assert_eq!(stat.kind, super::FileKind::Dir);
}

#[tokio::test]
async fn an_agent_that_goes_away_fails_operations_in_flight() {
    let (session, agent, shutdown) = pair().await;
    let running = {
        let session = session.clone();
        tokio::spawn(async move { session.output(&RemoteCommand::new("sleep").arg("30")).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    shutdown.cancel();
    let res = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(res, Err(RemoteError::SessionLost { .. })),
        "{res:?}"
    );
    agent.await.unwrap();
}

/// What the connector's protected paths refuse, by path and by reach: a
/// table of (path, reach, refused), over real directories and symlinks.
#[test]
fn protected_paths_are_refused_however_they_are_named() {
    use super::fs::{Protected, Reach};
    let root = std::env::temp_dir().join(format!("kitepipe-protected-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let handlers = root.join("node/handlers");
    let work = root.join("work");
    std::fs::create_dir_all(&handlers).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    let key = root.join("node/key.pem");
    std::fs::write(&key, "secret").unwrap();
    std::fs::write(handlers.join("time"), "#!/bin/sh\n").unwrap();
    std::os::unix::fs::symlink(&handlers, work.join("to-handlers")).unwrap();
    std::os::unix::fs::symlink(&key, work.join("to-key")).unwrap();
    std::fs::hard_link(&key, work.join("key-link")).unwrap();
    let protected = Protected::new([
        (handlers.clone(), "the handlers directory"),
        (key.clone(), "the private key"),
    ]);
    let at = |path: &str| root.join(path).to_str().unwrap().to_string();
    for (path, reach, refused) in [
        ("node/handlers/new", Reach::Change, true),
        ("node/handlers", Reach::Change, true),
        ("node/handlers/time", Reach::Read, true),
        ("node/handlers", Reach::Read, true),
        ("node/key.pem", Reach::Read, true),
        ("node/key.pem", Reach::Change, true),
        // Symlinks, dot-segments and parts that do not exist yet.
        ("work/to-handlers/new", Reach::Change, true),
        ("work/to-handlers/time", Reach::Read, true),
        ("work/../node/handlers/x", Reach::Change, true),
        ("work/nothing/../../node/handlers/a/b", Reach::Change, true),
        ("work/to-key", Reach::Read, true),
        // A hard link is the same file when read.
        ("work/key-link", Reach::Read, true),
        // A directory holding a protected entry may be read, not changed.
        ("node", Reach::Read, false),
        ("node", Reach::Change, true),
        ("", Reach::Change, true),
        // Changing a symlink itself (rename or remove it) leaves its
        // target alone; replacing a hard link's name too.
        ("work/to-key", Reach::Change, false),
        ("work/key-link", Reach::Change, false),
        ("work/file", Reach::Change, false),
        ("work/nothing/deeper", Reach::Change, false),
        ("work", Reach::Read, false),
    ] {
        let res = protected.check(&at(path), reach);
        assert_eq!(res.is_err(), refused, "{path} {reach:?}: {res:?}");
        if let Err(reply) = res {
            assert_eq!(reply.kind, ErrorKind::PermissionDenied);
            assert!(reply.message.contains("protected"), "{}", reply.message);
        }
    }
    // The file actually opened is checked too.
    let opened = std::fs::File::open(work.join("to-key")).unwrap();
    assert!(protected.check_opened(&opened, "work/to-key").is_err());
    let fine = std::fs::File::open(&work).unwrap();
    assert!(protected.check_opened(&fine, "work").is_ok());
    let _ = std::fs::remove_dir_all(&root);
}

/// An operation beyond the slots waits `OP_SLOT_WAIT`, then gets a typed
/// `busy` refusal instead of queueing for ever; a slot freed in time is
/// taken.
#[tokio::test(start_paused = true)]
async fn an_operation_waits_a_bounded_time_for_a_slot() {
    use std::sync::Arc;

    use super::agent::{OP_SLOT_WAIT, op_slot};
    let slots = Arc::new(tokio::sync::Semaphore::new(1));
    let held = op_slot(&slots).await.expect("a free slot");
    let started = tokio::time::Instant::now();
    let refusal = op_slot(&slots).await.expect_err("no slot came free");
    assert_eq!(started.elapsed(), OP_SLOT_WAIT);
    assert_eq!(refusal.kind, ErrorKind::Other);
    assert!(refusal.message.starts_with("busy"), "{}", refusal.message);
    let waiter = tokio::spawn({
        let slots = slots.clone();
        async move { op_slot(&slots).await.is_ok() }
    });
    tokio::time::sleep(OP_SLOT_WAIT / 2).await;
    drop(held);
    assert!(waiter.await.unwrap(), "a slot freed in time is taken");
}

/// Relayed commands inherit only the listed variables of the connector,
/// and get a `PATH` even when the connector has none.
#[test]
fn relayed_environment_keeps_only_harmless_variables() {
    use super::policy::relayed_env;
    let node = |key: &str| match key {
        "HOME" => Some("/home/node".to_string()),
        "KITEPIPE_SECRET" | "AWS_SECRET_ACCESS_KEY" => Some("leak".to_string()),
        _ => None,
    };
    let env = relayed_env(&node);
    assert_eq!(
        env,
        [
            ("HOME".to_string(), "/home/node".to_string()),
            (
                "PATH".to_string(),
                "/usr/local/bin:/usr/bin:/bin".to_string()
            ),
        ]
    );
}
