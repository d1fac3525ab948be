//! `exec` on a pseudo-terminal.
//!
//! The agent opens a pty pair, and starts the command through itself
//! (`/proc/self/exe agent --pty-child SLAVE -- ARGV...`): that child makes
//! a new session, takes the slave as its controlling terminal and as
//! stdin, stdout and stderr, then replaces itself with the command (see
//! [`pty_child`]). So no code runs between fork and exec, and the pid the
//! client sees is the command's. Output (stdout and stderr merged, as on a
//! terminal) comes back as `Stdout` records; input, `Eof` (the terminal's
//! end-of-file character), signals and `Resize` go to the terminal.

use std::io;
use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use kitepipe_proto::remote::{
    AgentRecord, ClientRecord, DATA_CHUNK, ExecHead, ExecOp, TtySize, to_json,
};
use rustix::pty::OpenptFlags;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tracing::debug;

use super::policy::NodePolicy;
use super::process::{exit_report, run_pumps, set_env, signal_process};
use super::reply::fail;
use super::stream::{OpStream, RecordReader, agent_bytes};

/// After the command exited, how long the terminal's remaining output may
/// take to arrive.
const EXIT_DRAIN: Duration = Duration::from_millis(500);

/// The terminal's end-of-file character (Ctrl-D, `VEOF` in canonical mode).
const VEOF: u8 = 0x04;

/// Runs a command on a new pseudo-terminal; a relayed one (`policy`) with
/// the connector's relayed environment.
pub(crate) async fn exec(op: ExecOp, stream: OpStream, policy: Option<&NodePolicy>) {
    let size = op.tty.unwrap_or(TtySize { rows: 24, cols: 80 });
    let (master, slave) = match open_pty(size) {
        Ok(pair) => pair,
        Err(err) => return fail(&stream, &err, "cannot allocate a terminal", None).await,
    };
    let mut command = Command::new("/proc/self/exe");
    command
        .args(["agent", "--pty-child", &slave, "--"])
        .args(&op.argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    set_env(&mut command, &op.env, op.env_clear, policy);
    if !op.env.iter().any(|(k, _)| k == "TERM") {
        command.env("TERM", "xterm-256color");
    }
    if let Some(cwd) = &op.cwd {
        command.current_dir(cwd);
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => {
            return fail(
                &stream,
                &err,
                "cannot run the command",
                op.argv.first().map(String::as_str),
            )
            .await;
        }
    };
    let pid = child.id().unwrap_or(0);
    debug!(pid, argv = ?op.argv, "exec on a terminal");
    let (mut reader_file, mut writer_file) = match master.try_clone() {
        Ok(clone) => (
            tokio::fs::File::from_std(std::fs::File::from(master)),
            tokio::fs::File::from_std(std::fs::File::from(clone)),
        ),
        Err(err) => return fail(&stream, &err, "cannot use the terminal", None).await,
    };
    let resize_fd = match writer_file.try_clone().await {
        Ok(file) => file.into_std().await,
        Err(err) => return fail(&stream, &err, "cannot use the terminal", None).await,
    };
    if stream
        .send(agent_bytes(&AgentRecord::Head(to_json(&ExecHead { pid }))))
        .await
        .is_err()
    {
        return;
    }
    let input = async {
        let mut records = RecordReader::new(stream.clone());
        loop {
            match records.next_client().await {
                Ok(Some(ClientRecord::Data(data))) => {
                    if writer_file.write_all(&data).await.is_err() {
                        return;
                    }
                    let _ = writer_file.flush().await;
                }
                Ok(Some(ClientRecord::Eof)) => {
                    let _ = writer_file.write_all(&[VEOF]).await;
                    let _ = writer_file.flush().await;
                }
                Ok(Some(ClientRecord::Signal(signal))) => signal_process(pid, signal),
                Ok(Some(ClientRecord::Resize(size))) => {
                    let _ = rustix::termios::tcsetwinsize(&resize_fd, winsize(size));
                    signal_process(pid, 28); // SIGWINCH
                }
                Ok(None) => return,
                Err(_) => {
                    signal_process(pid, 9);
                    return;
                }
            }
        }
    };
    let output = async {
        let mut status = None;
        let drain = tokio::time::sleep(Duration::MAX);
        tokio::pin!(drain);
        let mut open = true;
        while open || status.is_none() {
            let mut buf = vec![0u8; DATA_CHUNK];
            tokio::select! {
                res = reader_file.read(&mut buf), if open => match res {
                    // EIO once the last holder of the slave closed it.
                    Ok(0) | Err(_) => open = false,
                    Ok(n) => {
                        buf.truncate(n);
                        stream.send(agent_bytes(&AgentRecord::Stdout(Bytes::from(buf)))).await.ok()?;
                    }
                },
                res = child.wait(), if status.is_none() => {
                    status = Some(res);
                    drain.as_mut().reset(tokio::time::Instant::now() + EXIT_DRAIN);
                }
                _ = &mut drain => break,
            }
        }
        match status {
            Some(Ok(status)) => Some(exit_report(status)),
            _ => None,
        }
    };
    run_pumps(&stream, input, output).await;
}

fn winsize(size: TtySize) -> rustix::termios::Winsize {
    rustix::termios::Winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Opens a pty pair; returns the master and the slave's path.
fn open_pty(size: TtySize) -> io::Result<(OwnedFd, String)> {
    let master =
        rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    let name = rustix::pty::ptsname(&master, Vec::new())?;
    rustix::termios::tcsetwinsize(&master, winsize(size))?;
    let name = name
        .into_string()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "terminal name is not UTF-8"))?;
    Ok((master, name))
}

/// The child side of a terminal `exec` (`kitepipe agent --pty-child SLAVE
/// -- ARGV`): a new session with `slave` as its controlling terminal and
/// standard streams, then the command. Returns only if that failed.
pub fn pty_child(slave: &str, argv: &[String]) -> io::Error {
    use std::os::unix::process::CommandExt;
    let Some(program) = argv.first() else {
        return io::Error::new(io::ErrorKind::InvalidInput, "no command");
    };
    let setup = || -> io::Result<()> {
        rustix::process::setsid()?;
        let tty = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(slave)?;
        rustix::process::ioctl_tiocsctty(&tty)?;
        rustix::stdio::dup2_stdin(&tty)?;
        rustix::stdio::dup2_stdout(&tty)?;
        rustix::stdio::dup2_stderr(&tty)?;
        Ok(())
    };
    if let Err(err) = setup() {
        return err;
    }
    std::process::Command::new(program).args(&argv[1..]).exec()
}
