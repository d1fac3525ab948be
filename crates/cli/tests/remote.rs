//! End-to-end tests of `kitepipe remote`: a real OpenSSH server on
//! loopback (started per test with its own keys and config), the real ssh
//! client, and the real binary pushed to it as the agent.
#![allow(clippy::disallowed_methods)]

#[path = "support/sshd.rs"]
mod sshd;
mod support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kitepipe::remote::{ErrorKind, RemoteCommand, RemoteError, Session};
use sshd::Sshd;
use support::{Gate, Proc, TempDir, patience, pseudo_random, scaled, sha256_hex};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(mut command: Command, stdin: &[u8]) -> Run {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("run kitepipe");
    let mut pipe = child.stdin.take().unwrap();
    let input = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = pipe.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(command: Command) -> String {
    let out = run(command, b"");
    assert_eq!(
        out.code, 0,
        "stdout: {}\nstderr: {}",
        out.stdout, out.stderr
    );
    out.stdout
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn exec_passes_output_exit_status_stdin_env_and_cwd() {
    if !sshd::required() {
        return;
    }
    let sshd = Sshd::new().start();
    let out = run(
        sshd.kitepipe(&["exec", "--", "sh", "-c", "echo out; echo err >&2; exit 3"]),
        b"",
    );
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert_eq!(out.stdout, "out\n");
    assert!(out.stderr.contains("err\n"), "{}", out.stderr);

    let out = run(
        sshd.kitepipe(&["exec", "--", "sh", "-c", "kill -9 $$"]),
        b"",
    );
    assert_eq!(out.code, 128 + 9, "a signal death is 128+N: {}", out.stderr);

    let out = run(
        sshd.kitepipe(&["exec", "--", "cat"]),
        b"hello through stdin\n",
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout, "hello through stdin\n");

    let tmp = TempDir::new("cwd");
    let cwd = tmp.path().display().to_string();
    let out = ok(sshd.kitepipe(&[
        "exec",
        "--env",
        "GREETING=hi there",
        "--cwd",
        &cwd,
        "--",
        "sh",
        "-c",
        "echo \"$GREETING\"; pwd",
    ]));
    assert_eq!(out, format!("hi there\n{cwd}\n"));

    let out = run(sshd.kitepipe(&["exec", "--", "no-such-command-kp"]), b"");
    assert_eq!(out.code, 127, "{}", out.stderr);
    assert!(out.stderr.contains("no-such-command-kp"), "{}", out.stderr);
}

#[test]
fn exec_on_a_terminal() {
    if !sshd::required() {
        return;
    }
    let sshd = Sshd::new().start();
    let out = run(
        sshd.kitepipe(&[
            "exec",
            "-t",
            "--",
            "sh",
            "-c",
            "test -t 0 && test -t 1 && echo on-a-tty; stty size; exit 5",
        ]),
        b"",
    );
    assert_eq!(out.code, 5, "{}", out.stderr);
    // The terminal turns \n into \r\n; the size is the default 24x80
    // (no terminal here, no COLUMNS/LINES).
    assert_eq!(out.stdout, "on-a-tty\r\n24 80\r\n", "{}", out.stderr);
    // Input reaches the command through the terminal.
    let out = run(
        sshd.kitepipe(&["exec", "-t", "--", "sh", "-c", "read line; echo got=$line"]),
        b"typed\n",
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("got=typed"), "{:?}", out.stdout);

    // A resize reaches the terminal (the library's Exec::input).
    runtime().block_on(async {
        let session = Session::ssh(sshd.options()).await.unwrap();
        let command = RemoteCommand::new("sh")
            .args(["-c", "echo ready; read go; stty size"])
            .tty(24, 80)
            .stdin(true);
        let mut exec = session.exec(&command).await.unwrap();
        let mut seen = Vec::new();
        loop {
            match exec.output.next().await.unwrap() {
                kitepipe::remote::ExecEvent::Stdout(data) => {
                    seen.extend_from_slice(&data);
                    if String::from_utf8_lossy(&seen).contains("ready") {
                        break;
                    }
                }
                other => panic!("{other:?}"),
            }
        }
        exec.input.resize(40, 100).await.unwrap();
        exec.input
            .write(bytes::Bytes::from_static(b"go\n"))
            .await
            .unwrap();
        loop {
            match exec.output.next().await.unwrap() {
                kitepipe::remote::ExecEvent::Stdout(data) => seen.extend_from_slice(&data),
                kitepipe::remote::ExecEvent::Stderr(_) => {}
                kitepipe::remote::ExecEvent::Exit(status) => {
                    assert_eq!(status.code, Some(0));
                    break;
                }
            }
        }
        let text = String::from_utf8_lossy(&seen);
        assert!(text.contains("40 100"), "{text:?}");
        session.close().await;
    });
}

#[test]
fn exec_output_streams_live() {
    if !sshd::required() {
        return;
    }
    let sshd = Sshd::new().start();
    // The command prints its second line only once the test saw the first.
    let gate = Gate::new("live-gate");
    let script = format!("echo first; {}; echo second", gate.script("live"));
    let mut command = sshd.kitepipe(&["exec", "-n", "--", "sh", "-c", &script]);
    command.env_remove("KITEPIPE_LOG");
    let proc = Proc::spawn("remote exec", command);
    proc.wait_for("first");
    assert!(
        proc.exited().is_none(),
        "the first line arrived while the command still ran"
    );
    assert!(!proc.output().contains("second"));
    gate.open();
    proc.wait_for("second");
}

#[test]
fn file_operations_and_typed_errors() {
    if !sshd::required() {
        return;
    }
    let sshd = Sshd::new().start();
    let tmp = TempDir::new("fsops");
    let base = tmp.path().display().to_string();
    let dir = format!("{base}/a/b");
    ok(sshd.kitepipe(&["mkdir", "-p", &dir]));
    assert!(tmp.path().join("a/b").is_dir());
    let file = format!("{dir}/f.txt");
    let out = run(sshd.kitepipe(&["write", &file]), b"contents\n");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        std::fs::read(tmp.path().join("a/b/f.txt")).unwrap(),
        b"contents\n"
    );
    assert_eq!(ok(sshd.kitepipe(&["read", &file])), "contents\n");
    assert_eq!(ok(sshd.kitepipe(&["ls", &dir])), "f.txt\n");
    let stat: serde_json::Value =
        serde_json::from_str(&ok(sshd.kitepipe(&["stat", &file]))).unwrap();
    assert_eq!(stat["kind"], "file");
    assert_eq!(stat["size"], 9);
    let moved = format!("{dir}/g.txt");
    ok(sshd.kitepipe(&["mv", &file, &moved]));
    assert!(tmp.path().join("a/b/g.txt").is_file());
    assert!(!tmp.path().join("a/b/f.txt").exists());
    // A non-empty directory is refused without -r, with its cause.
    let out = run(sshd.kitepipe(&["rm", &format!("{base}/a")]), b"");
    assert_eq!(out.code, 4, "{}", out.stderr);
    assert!(out.stderr.contains("Directory not empty"), "{}", out.stderr);
    ok(sshd.kitepipe(&["rm", "-r", &format!("{base}/a")]));
    assert!(!tmp.path().join("a").exists());

    // A reader that stops early (`| head`) ends the read quietly.
    let big = tmp.path().join("big");
    std::fs::write(&big, vec![b'x'; 4 << 20]).unwrap();
    let script = format!(
        "'{}' remote -F '{}' {} read '{}' | head -c 5 >/dev/null; echo ${{PIPESTATUS[0]}}",
        support::BIN,
        sshd.ssh_config().display(),
        sshd::HOST,
        big.display()
    );
    let out = Command::new("bash").args(["-c", &script]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // No such file: exit 4, the errno, message and path.
    let missing = format!("{base}/missing");
    let out = run(sshd.kitepipe(&["read", &missing]), b"");
    assert_eq!(out.code, 4, "{}", out.stderr);
    assert!(
        out.stderr.contains(&missing)
            && out.stderr.contains("No such file or directory")
            && out.stderr.contains("errno 2"),
        "{}",
        out.stderr
    );

    // The same errors arrive typed through the library.
    let rt = runtime();
    rt.block_on(async {
        let session = Session::ssh(sshd.options()).await.unwrap();
        let err = session.stat(&missing, false).await.unwrap_err();
        let reply = err.reply().expect("a typed remote error");
        assert_eq!(reply.kind, ErrorKind::NotFound);
        assert_eq!(reply.errno, Some(2));
        assert_eq!(reply.path.as_deref(), Some(missing.as_str()));
        let err = session.mkdir(&base, false).await.unwrap_err();
        assert_eq!(err.reply().unwrap().kind, ErrorKind::AlreadyExists);
        let err = session
            .ls(&format!("{base}/nope/deeper"))
            .await
            .unwrap_err();
        assert_eq!(err.reply().unwrap().kind, ErrorKind::NotFound);
        session.close().await;
    });
}

#[test]
fn permission_denied_arrives_typed() {
    if !sshd::required() {
        return;
    }
    let sshd = Sshd::new().start();
    let Some(user) = unprivileged_user() else {
        return;
    };
    // /root is not writable by the unprivileged user.
    let mut options = sshd.options();
    options.ssh_args.extend(["-l".into(), user.clone()]);
    let rt = runtime();
    rt.block_on(async {
        let session = Session::ssh(options)
            .await
            .expect("session as the test user");
        let err = session
            .write("/root/kitepipe-denied", b"x")
            .await
            .unwrap_err();
        let reply = err.reply().unwrap_or_else(|| panic!("typed: {err}"));
        assert_eq!(reply.kind, ErrorKind::PermissionDenied, "{reply:?}");
        assert_eq!(reply.errno, Some(13));
        assert_eq!(reply.path.as_deref(), Some("/root/kitepipe-denied"));
        session.close().await;
    });
    assert!(!std::path::Path::new("/root/kitepipe-denied").exists());
}

#[test]
fn cp_of_100_mb_both_ways_keeps_every_byte() {
    if !sshd::required() {
        return;
    }
    let sshd = Sshd::new().start();
    let tmp = TempDir::new("cp");
    let data = pseudo_random(100 * 1024 * 1024, 7);
    let want = sha256_hex(&data);
    let local = tmp.path().join("big.bin");
    std::fs::write(&local, &data).unwrap();
    drop(data);
    let remote = tmp.path().join("remote.bin");
    let started = Instant::now();
    ok(sshd.kitepipe(&[
        "cp",
        &local.display().to_string(),
        &format!(":{}", remote.display()),
    ]));
    eprintln!("cp to the host: {:?}", started.elapsed());
    assert_eq!(sha256_hex(&std::fs::read(&remote).unwrap()), want);
    let back = tmp.path().join("back.bin");
    let started = Instant::now();
    ok(sshd.kitepipe(&[
        "cp",
        &format!(":{}", remote.display()),
        &back.display().to_string(),
    ]));
    eprintln!("cp from the host: {:?}", started.elapsed());
    assert_eq!(sha256_hex(&std::fs::read(&back).unwrap()), want);
    // No temporary files are left beside them.
    let mut names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["back.bin", "big.bin", "remote.bin"]);
}

#[test]
fn port_forwarding_reaches_an_address_seen_from_the_host() {
    if !sshd::required() {
        return;
    }
    let sshd = Sshd::new().start();
    // An echo server "on the host" (loopback here).
    let echo = TcpListener::bind("127.0.0.1:0").unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in echo.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if conn.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    let spec = format!("0:127.0.0.1:{echo_port}");
    let proc = Proc::spawn("forward", sshd.kitepipe(&["forward", &spec]));
    let out = proc.wait_for("forwarding ");
    let local = out
        .lines()
        .find_map(|l| l.strip_prefix("forwarding "))
        .and_then(|l| l.split_whitespace().next())
        .expect("local address printed")
        .to_string();
    for round in 0..3 {
        let mut conn = std::net::TcpStream::connect(&local).unwrap();
        conn.set_read_timeout(Some(patience())).unwrap();
        let msg = format!("hello {round}\n").repeat(1000);
        conn.write_all(msg.as_bytes()).unwrap();
        conn.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = String::new();
        conn.read_to_string(&mut back).unwrap();
        assert_eq!(back, msg);
    }
    // A target that refuses: the forwarded connection is closed.
    let closed_port = support::free_port();
    let proc2 = Proc::spawn(
        "forward refused",
        sshd.kitepipe(&["forward", &format!("0:127.0.0.1:{closed_port}")]),
    );
    let out = proc2.wait_for("forwarding ");
    let local = out
        .lines()
        .find_map(|l| l.strip_prefix("forwarding "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    let mut conn = std::net::TcpStream::connect(&local).unwrap();
    conn.set_read_timeout(Some(patience())).unwrap();
    let mut buf = [0u8; 16];
    assert!(matches!(conn.read(&mut buf), Ok(0) | Err(_)));
}

#[test]
fn many_operations_run_concurrently_over_one_session() {
    if !sshd::required() {
        return;
    }
    let sshd = Sshd::new().start();
    let tmp = TempDir::new("conc");
    let rt = runtime();
    rt.block_on(async {
        let session = Session::ssh(sshd.options()).await.unwrap();
        // A slow command (held until the others are done) does not hold
        // them up.
        let gate = Gate::new("conc-gate");
        let script = format!("{}; echo slow", gate.script("slow"));
        let slow = {
            let session = session.clone();
            tokio::spawn(async move {
                session
                    .output(&RemoteCommand::new("sh").args(["-c", &script]))
                    .await
            })
        };
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..60u32 {
            let session = session.clone();
            let path = tmp.path().join(format!("f{i}")).display().to_string();
            tasks.spawn(async move {
                let body = format!("file {i}").repeat(i as usize + 1);
                session.write(&path, body.as_bytes()).await?;
                let out = session
                    .output(
                        &RemoteCommand::new("sh")
                            .args(["-c", &format!("echo {i}; exit {}", i % 5)]),
                    )
                    .await?;
                assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{i}\n"));
                assert_eq!(out.status.code, Some((i % 5) as i32));
                let back = session.read(&path).await?;
                assert_eq!(back, body.as_bytes());
                let stat = session.stat(&path, false).await?;
                assert_eq!(stat.size, body.len() as u64);
                Ok::<_, RemoteError>(())
            });
        }
        while let Some(res) = tasks.join_next().await {
            res.unwrap().unwrap();
        }
        assert!(
            !slow.is_finished(),
            "180 operations were not serialized behind the slow one"
        );
        gate.open();
        let slow = slow.await.unwrap().unwrap();
        assert_eq!(slow.stdout, b"slow\n");
        assert_eq!(
            session
                .ls(&tmp.path().display().to_string())
                .await
                .unwrap()
                .len(),
            60
        );
        session.close().await;
    });
}

/// Names of entries in `dir` (empty if it does not exist).
fn listing(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn kitepipe_entries(dir: &str) -> Vec<String> {
    listing(std::path::Path::new(dir))
        .into_iter()
        .filter(|name| name.contains("kitepipe-agent"))
        .collect()
}

#[test]
fn nothing_is_left_on_the_host() {
    if !sshd::required() {
        return;
    }
    // No XDG_RUNTIME_DIR: the agent lands in /dev/shm, as on most hosts.
    let sshd = Sshd::new().no_runtime_dir().start();
    let home_before = listing(&sshd.home);
    let shm_before = kitepipe_entries("/dev/shm");
    let tmp_before = kitepipe_entries("/tmp");
    let work = TempDir::new("left");
    let file = work.path().join("x");
    std::fs::write(&file, b"payload").unwrap();
    // A session with a command held until the checks are done: while it
    // runs, the agent's file is already gone and the process runs from an
    // unlinked executable.
    let gate = Gate::new("left-gate");
    let script = format!("echo agent=$PPID; {}", gate.script("left"));
    let mut command = sshd.kitepipe(&["exec", "-n", "--", "sh", "-c", &script]);
    command.env_remove("KITEPIPE_LOG");
    let proc = Proc::spawn("session", command);
    let out = proc.wait_for("agent=");
    let agent_pid: u32 = out
        .lines()
        .find_map(|l| l.strip_prefix("agent="))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let exe = std::fs::read_link(format!("/proc/{agent_pid}/exe")).unwrap();
    let exe = exe.display().to_string();
    assert!(
        exe.starts_with("/dev/shm/.kitepipe-agent.") && exe.ends_with(" (deleted)"),
        "{exe}"
    );
    assert_eq!(
        kitepipe_entries("/dev/shm"),
        shm_before,
        "the agent file is removed before serving"
    );
    gate.open();
    support::eventually("the session ends", || proc.exited());
    ok(sshd.kitepipe(&[
        "cp",
        &file.display().to_string(),
        &format!(":{}.copy", file.display()),
    ]));
    ok(sshd.kitepipe(&["exec", "--", "true"]));
    ok(sshd.kitepipe(&["ls", "/"]));
    assert_eq!(listing(&sshd.home), home_before, "HOME");
    assert_eq!(kitepipe_entries("/dev/shm"), shm_before, "/dev/shm");
    assert_eq!(kitepipe_entries("/tmp"), tmp_before, "/tmp");
    assert!(
        std::fs::metadata(format!("/proc/{agent_pid}")).is_err(),
        "the agent exited"
    );
}

#[test]
fn runtime_dir_is_used_and_left_empty() {
    if !sshd::required() {
        return;
    }
    let sshd = Sshd::new().start();
    let run_dir = sshd.runtime_dir.clone().unwrap();
    let out = ok(sshd.kitepipe(&["exec", "--", "sh", "-c", "readlink /proc/$PPID/exe"]));
    assert!(
        out.starts_with(&format!("{}/.kitepipe-agent.", run_dir.display())),
        "{out}"
    );
    assert!(listing(&run_dir).is_empty(), "{:?}", listing(&run_dir));
    assert!(listing(&sshd.home).is_empty(), "{:?}", listing(&sshd.home));
}

#[test]
fn cache_keeps_the_agent_by_hash_and_reuses_it() {
    if !sshd::required() {
        return;
    }
    let sshd = Sshd::new().start();
    ok(sshd.kitepipe_with(&["--cache"], &["exec", "--", "true"]));
    let cache = sshd.home.join(".cache/kitepipe");
    let names = listing(&cache);
    assert_eq!(names.len(), 1, "{names:?}");
    let bin = std::fs::read(support::BIN).unwrap();
    assert_eq!(names[0], format!("agent-{}", sha256_hex(&bin)));
    let out = ok(sshd.kitepipe_with(
        &["--cache"],
        &["exec", "--", "sh", "-c", "readlink /proc/$PPID/exe"],
    ));
    assert_eq!(out.trim(), cache.join(&names[0]).display().to_string());
}

#[test]
fn unreachable_host_and_refused_login_fail_clearly() {
    if !sshd::required() {
        return;
    }
    let sshd = Sshd::new().start();
    let closed = support::free_port().to_string();
    let out = run(
        sshd.kitepipe_with(&["-p", &closed], &["exec", "--", "true"]),
        b"",
    );
    assert_eq!(out.code, 255, "{}", out.stderr);
    assert!(
        out.stderr.contains("ssh failed") && out.stderr.contains("Connection refused"),
        "{}",
        out.stderr
    );

    let key = sshd.other_key().display().to_string();
    let mut command = Command::new(support::BIN);
    command.args(["remote", "-F"]).arg(sshd.ssh_config()).args([
        "-o",
        &format!("IdentityFile={key}"),
        "-i",
        &key,
        "-o",
        "IdentitiesOnly=yes",
    ]);
    // The config's own IdentityFile is tried too; point -F at a config
    // without it to make the login fail.
    let bad_config = sshd.dir.path().join("ssh_config_badkey");
    let text = std::fs::read_to_string(sshd.ssh_config()).unwrap();
    std::fs::write(&bad_config, text.replace("id_ed25519", "other_key")).unwrap();
    let mut command = Command::new(support::BIN);
    command
        .args(["remote", "-F"])
        .arg(&bad_config)
        .args([sshd::HOST, "exec", "--", "true"]);
    let out = run(command, b"");
    assert_eq!(out.code, 255, "{}", out.stderr);
    assert!(out.stderr.contains("Permission denied"), "{}", out.stderr);
}

#[test]
fn a_host_that_never_answers_times_out() {
    // A TCP peer that accepts and stays silent (a hung host).
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let _hold = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for conn in silent.incoming().take(2) {
            conns.push(conn);
        }
        // Held (silent) for as long as the test may wait.
        std::thread::park_timeout(patience());
    });
    let started = Instant::now();
    let mut command = Command::new(support::BIN);
    command.args([
        "remote",
        "-F",
        "/dev/null",
        "-p",
        &port.to_string(),
        "--connect-timeout",
        "2s",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "127.0.0.1",
        "exec",
        "--",
        "true",
    ]);
    let out = run(command, b"");
    // The connect timeout (2 s), and the rest scaled like patience.
    assert!(
        started.elapsed() < Duration::from_secs(2) + scaled(Duration::from_secs(8)),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        out.code == 124 || out.code == 255,
        "{} {}",
        out.code,
        out.stderr
    );
    assert!(
        out.stderr.to_lowercase().contains("timed out"),
        "{}",
        out.stderr
    );
}

/// A directory of symlinks to the tools the bootstrap needs, less some.
fn tool_dir(tmp: &TempDir, leave_out: &[&str]) -> String {
    let dir = tmp.path().join("bin");
    std::fs::create_dir_all(&dir).unwrap();
    for tool in [
        "sh", "uname", "head", "mktemp", "chmod", "rm", "readlink", "id",
    ] {
        if leave_out.contains(&tool) {
            continue;
        }
        let out = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .unwrap();
        let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
        std::os::unix::fs::symlink(path, dir.join(tool)).unwrap();
    }
    dir.display().to_string()
}

#[test]
fn bootstrap_refuses_hosts_it_cannot_run_on() {
    if !sshd::required() {
        return;
    }
    // A host without `head`.
    let tools = TempDir::new("tools");
    let path = tool_dir(&tools, &["head"]);
    let sshd = Sshd::new().env("PATH", &path).start();
    let out = run(sshd.kitepipe(&["exec", "--", "true"]), b"");
    assert_eq!(out.code, 255, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("kitepipe bootstrap: the host has no head command"),
        "{}",
        out.stderr
    );

    // Another machine: `uname -m` says aarch64.
    let fake = TempDir::new("arch");
    let path = tool_dir(&fake, &["uname"]);
    let real_uname = String::from_utf8_lossy(
        &Command::new("sh")
            .args(["-c", "command -v uname"])
            .output()
            .unwrap()
            .stdout,
    )
    .trim()
    .to_string();
    let script = format!(
        "#!/bin/sh\nif [ \"$1\" = -m ]; then echo aarch64; else exec {real_uname} \"$@\"; fi\n"
    );
    let uname = std::path::Path::new(&path).join("uname");
    std::fs::write(&uname, script).unwrap();
    Command::new("chmod")
        .arg("755")
        .arg(&uname)
        .status()
        .unwrap();
    let sshd = Sshd::new().env("PATH", &path).start();
    let out = run(sshd.kitepipe(&["exec", "--", "true"]), b"");
    assert_eq!(out.code, 255, "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!(
            "runs on Linux {}; the host is Linux aarch64",
            std::env::consts::ARCH
        )),
        "{}",
        out.stderr
    );
    assert!(listing(sshd.runtime_dir.as_ref().unwrap()).is_empty());
}

#[test]
fn a_session_killed_mid_operation_is_reported() {
    if !sshd::required() {
        return;
    }
    let sshd = Sshd::new().start();
    let mut command = sshd.kitepipe_with(
        &["--heartbeat", "3s"],
        &["exec", "-n", "--", "sh", "-c", "echo agent=$PPID; sleep 60"],
    );
    command.env_remove("KITEPIPE_LOG");
    let mut proc = Proc::spawn("session", command);
    let out = proc.wait_for("agent=");
    let agent_pid = out
        .lines()
        .find_map(|l| l.strip_prefix("agent="))
        .unwrap()
        .trim()
        .to_string();
    let started = Instant::now();
    Command::new("kill")
        .args(["-9", &agent_pid])
        .status()
        .unwrap();
    let status = support::eventually("the client reports the lost session", || proc.exited());
    assert!(
        started.elapsed() < scaled(Duration::from_secs(15)),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(status.code(), Some(255), "{}", proc.output());
    assert!(
        proc.output().contains("the session ended"),
        "{}",
        proc.output()
    );
    proc.kill();
}

#[test]
fn jump_host_and_sudo_chain_in_one_command() {
    if !sshd::required() {
        return;
    }
    let sshd = Sshd::new().start();
    // ProxyJump through the same sshd (to itself on loopback).
    let out = ok(sshd.kitepipe_with(&["-J", sshd::HOST], &["exec", "--", "echo", "jumped"]));
    assert_eq!(out, "jumped\n");
    if !sudo_ready() {
        return;
    }
    let out = ok(sshd.kitepipe_with(&["-J", sshd::HOST, "--sudo"], &["exec", "--", "id", "-u"]));
    assert_eq!(out, "0\n");
}

#[test]
fn sudo_without_a_password_rule_fails_clearly() {
    if !sshd::required() || !sudo_ready() {
        return;
    }
    let sshd = Sshd::new().start();
    let out = ok(sshd.kitepipe_with(&["--sudo"], &["exec", "--", "id", "-u"]));
    assert_eq!(out, "0\n");
    let Some(user) = unprivileged_user() else {
        return;
    };
    let out = run(
        sshd.kitepipe_with(&["--sudo", "-l", &user], &["exec", "--", "id", "-u"]),
        b"",
    );
    assert_eq!(out.code, 255, "{}", out.stderr);
    assert!(
        out.stderr.contains("sudo on the host needs a password"),
        "{}",
        out.stderr
    );
    // Without --sudo the same user works.
    let out = ok(sshd.kitepipe_with(&["-l", &user], &["exec", "--", "id", "-un"]));
    assert_eq!(out.trim(), user);
}

/// Whether sudo and root are here; if not, the test cannot run and says
/// so (or fails under `CI`).
fn sudo_ready() -> bool {
    support::require_root("sudo on the host") && support::require_tool("sudo", "sudo")
}

/// A user without sudo rights for tests (created when running as root).
fn unprivileged_user() -> Option<String> {
    const USER: &str = "kitepipe-test";
    if !support::require_root(&format!("creating the user {USER}")) {
        return None;
    }
    let exists = Command::new("id")
        .arg(USER)
        .output()
        .is_ok_and(|o| o.status.success());
    if !exists {
        let status = Command::new("useradd")
            .args(["--no-create-home", "--shell", "/bin/sh", USER])
            .status()
            .expect("run useradd");
        // A parallel test may have created it first.
        let now = Command::new("id")
            .arg(USER)
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(status.success() || now, "useradd {USER}");
    }
    // useradd locks the account ("!"), and sshd refuses locked accounts
    // for key logins too; "*" means "no password" without the lock.
    let status = Command::new("usermod")
        .args(["-p", "*", USER])
        .status()
        .expect("run usermod");
    assert!(status.success(), "usermod {USER}");
    Some(USER.to_string())
}

#[test]
fn agent_answers_garbage_with_a_clear_error() {
    let cases: &[(&str, &[u8])] = &[
        (
            "random bytes",
            b"\x07\x00\x00\x00\x00\xff\xff\xff\xffGARBAGE",
        ),
        (
            "an oversized frame",
            b"\x00\x00\x00\x00\x01\x7f\xff\xff\xff",
        ),
        (
            "a wrong frame type",
            b"\x63\x00\x00\x00\x01\x00\x00\x00\x00",
        ),
    ];
    for (what, input) in cases {
        let started = Instant::now();
        let mut command = Command::new(support::BIN);
        command.args(["agent", "--stdio"]);
        let out = run(command, input);
        assert!(
            started.elapsed() < scaled(Duration::from_secs(10)),
            "{what}"
        );
        assert_eq!(out.code, 1, "{what}: {}", out.stderr);
        assert!(
            out.stderr.contains("protocol error"),
            "{what}: {}",
            out.stderr
        );
        assert!(!out.stderr.contains("panicked"), "{what}: {}", out.stderr);
    }
    // EOF at once (or mid-frame) is a clean end.
    let mut command = Command::new(support::BIN);
    command.args(["agent", "--stdio"]);
    let out = run(command, b"\x01\x00\x00");
    assert_eq!(out.code, 0, "{}", out.stderr);
}
