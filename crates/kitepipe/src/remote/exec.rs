//! The agent's process operations: `exec`, `spawn`, `kill`.

use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use kitepipe_proto::remote::{
    AgentRecord, ClientRecord, DATA_CHUNK, ExecHead, ExecOp, ExitReport, KillOp, SpawnOp, Spawned,
    to_json,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use tracing::debug;

use super::policy::NodePolicy;
use super::process::{exit_report, run_pumps, set_env, signal_process};
use super::reply::{error_reply, fail, finish, invalid};
use super::stream::{OpStream, RecordReader, agent_bytes};

/// After the process exited, how long its output pipes may stay open (held
/// by a background child it left behind) before the exit is reported
/// anyway. Output already in the pipes arrives well within it.
const EXIT_DRAIN: Duration = Duration::from_millis(500);

/// Runs a command, streaming its stdin, stdout and stderr, and reports how
/// it ended. The process is killed if the client goes away. A relayed one
/// (`policy`) takes a process slot for as long as it runs.
pub(crate) async fn exec(op: ExecOp, stream: OpStream, policy: Option<&NodePolicy>) {
    let Some(program) = op.argv.first() else {
        finish(&stream, invalid("exec needs a command")).await;
        return;
    };
    let _slot = match policy.map(NodePolicy::process_slot) {
        Some(Err(busy)) => return finish(&stream, AgentRecord::Error(busy)).await,
        Some(Ok(slot)) => Some(slot),
        None => None,
    };
    if op.tty.is_some() {
        super::exec_tty::exec(op, stream, policy).await;
        return;
    }
    let mut command = Command::new(program);
    command
        .args(&op.argv[1..])
        .stdin(if op.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    set_env(&mut command, &op.env, op.env_clear, policy);
    if let Some(cwd) = &op.cwd {
        command.current_dir(cwd);
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => {
            let path = match (&op.cwd, err.kind()) {
                (Some(cwd), std::io::ErrorKind::NotFound)
                    if !std::path::Path::new(cwd).is_dir() =>
                {
                    cwd.as_str()
                }
                _ => program.as_str(),
            };
            fail(&stream, &err, "cannot run the command", Some(path)).await;
            return;
        }
    };
    let pid = child.id().unwrap_or(0);
    debug!(pid, argv = ?op.argv, "exec started");
    if stream
        .send(agent_bytes(&AgentRecord::Head(to_json(&ExecHead { pid }))))
        .await
        .is_err()
    {
        return;
    }
    let stdin = child.stdin.take();
    let input = pump_input(stream.clone(), stdin, pid);
    let output = pump_output(&stream, &mut child);
    run_pumps(&stream, input, output).await;
}

/// Feeds the client's records to the process: stdin data, end of stdin,
/// signals. Returns when the client sent FIN or the stream failed (then
/// the process gets SIGKILL: nobody is listening any more).
async fn pump_input(stream: OpStream, mut stdin: Option<ChildStdin>, pid: u32) {
    let mut reader = RecordReader::new(stream);
    loop {
        match reader.next_client().await {
            Ok(Some(ClientRecord::Data(data))) => {
                if let Some(pipe) = stdin.as_mut()
                    && pipe.write_all(&data).await.is_err()
                {
                    // The process closed its stdin; drop the rest.
                    stdin = None;
                }
            }
            Ok(Some(ClientRecord::Eof)) => stdin = None,
            Ok(Some(ClientRecord::Signal(signal))) => signal_process(pid, signal),
            Ok(Some(ClientRecord::Resize(_))) => {}
            Ok(None) => return,
            Err(err) => {
                debug!(%err, pid, "client gone; killing the process");
                signal_process(pid, 9);
                return;
            }
        }
    }
}

/// Streams stdout and stderr until both end, waits for the exit; `None`
/// if the client went away.
async fn pump_output(stream: &OpStream, child: &mut Child) -> Option<ExitReport> {
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut status = None;
    let drain = tokio::time::sleep(Duration::MAX);
    tokio::pin!(drain);
    while stdout.is_some() || stderr.is_some() || status.is_none() {
        tokio::select! {
            chunk = read_some(&mut stdout) => {
                match chunk {
                    Some(data) => stream.send(agent_bytes(&AgentRecord::Stdout(data))).await.ok()?,
                    None => stdout = None,
                }
            }
            chunk = read_some(&mut stderr) => {
                match chunk {
                    Some(data) => stream.send(agent_bytes(&AgentRecord::Stderr(data))).await.ok()?,
                    None => stderr = None,
                }
            }
            res = child.wait(), if status.is_none() => {
                status = Some(res);
                drain.as_mut().reset(tokio::time::Instant::now() + EXIT_DRAIN);
            }
            _ = &mut drain => break,
        }
    }
    let report = match status {
        Some(Ok(status)) => exit_report(status),
        _ => ExitReport {
            code: None,
            signal: None,
        },
    };
    Some(report)
}

/// Reads a chunk from an optional pipe; `None` at EOF or error. Pending
/// forever when the pipe is gone (so `select!` ignores it).
async fn read_some<R: AsyncRead + Unpin>(pipe: &mut Option<R>) -> Option<Bytes> {
    let Some(reader) = pipe.as_mut() else {
        return std::future::pending().await;
    };
    let mut buf = vec![0u8; DATA_CHUNK];
    match reader.read(&mut buf).await {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            buf.truncate(n);
            Some(Bytes::from(buf))
        }
    }
}

/// Starts a command in the background, in its own process group, with
/// stdin from `/dev/null` and output to `/dev/null` or the log file. It
/// outlives the operation and the session. A relayed one (`policy`) holds
/// a process slot until it exits.
pub(crate) async fn spawn(op: SpawnOp, stream: OpStream, policy: Option<&NodePolicy>) {
    use std::os::unix::process::CommandExt;
    let Some(program) = op.argv.first() else {
        finish(&stream, invalid("spawn needs a command")).await;
        return;
    };
    let slot = match policy.map(NodePolicy::process_slot) {
        Some(Err(busy)) => return finish(&stream, AgentRecord::Error(busy)).await,
        Some(Ok(slot)) => Some(slot),
        None => None,
    };
    let (stdout, stderr) = match &op.log {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|file| Ok((file.try_clone()?, file)));
            match file {
                Ok((out, err)) => (Stdio::from(out), Stdio::from(err)),
                Err(err) => {
                    fail(&stream, &err, "cannot open the log file", Some(path)).await;
                    return;
                }
            }
        }
        None => (Stdio::null(), Stdio::null()),
    };
    let mut command = std::process::Command::new(program);
    command
        .args(&op.argv[1..])
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0);
    if let Some(cwd) = &op.cwd {
        command.current_dir(cwd);
    }
    let mut command = Command::from(command);
    set_env(&mut command, &op.env, false, policy);
    // Through tokio so the child is reaped in the background when it
    // exits (tokio reaps dropped children).
    match command.spawn() {
        Ok(mut child) => {
            let pid = child.id().unwrap_or(0);
            debug!(pid, argv = ?op.argv, "spawned");
            if let Some(slot) = slot {
                // The slot is free again once the process has exited.
                tokio::spawn(async move {
                    let _ = child.wait().await;
                    drop(slot);
                });
            }
            finish(&stream, AgentRecord::Done(to_json(&Spawned { pid }))).await;
        }
        Err(err) => fail(&stream, &err, "cannot run the command", Some(program)).await,
    }
}

/// Sends a signal to a process or a process group.
pub(crate) async fn kill(op: KillOp, stream: OpStream) {
    let Some(signal) = rustix::process::Signal::from_named_raw(op.signal) else {
        finish(&stream, invalid(&format!("unknown signal {}", op.signal))).await;
        return;
    };
    let Some(pid) = i32::try_from(op.pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        finish(&stream, invalid(&format!("bad process id {}", op.pid))).await;
        return;
    };
    let res = if op.group {
        rustix::process::kill_process_group(pid, signal)
    } else {
        rustix::process::kill_process(pid, signal)
    };
    match res {
        Ok(()) => finish(&stream, AgentRecord::Done(to_json(&serde_json::json!({})))).await,
        Err(errno) => {
            let err = std::io::Error::from(errno);
            let reply = error_reply(&err, &format!("cannot signal process {}", op.pid), None);
            finish(&stream, AgentRecord::Error(reply)).await;
        }
    }
}
