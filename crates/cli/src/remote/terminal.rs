//! This terminal during `kitepipe remote ... exec`: the pump that
//! forwards stdin, window size and Ctrl-C to the remote command and its
//! output to stdout and stderr, raw mode for a terminal exec, and the
//! terminal's size.

use std::io::IsTerminal;

use kitepipe::remote::{ExecEvent, ExecInput, ExecOutput, ExitReport, RemoteError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::exit;

/// Pumps a running command until it exits: stdin (if `forward_stdin`),
/// this terminal's size (if `tty`) and Ctrl-C (as SIGINT) to it, its
/// stdout and stderr here. A closed stdout ends it quietly (as exit 0).
pub(super) async fn pump(
    mut input: ExecInput,
    mut output: ExecOutput,
    forward_stdin: bool,
    tty: bool,
) -> Result<ExitReport, RemoteError> {
    let stop_input = CancellationToken::new();
    let input_stop = stop_input.clone();
    let input_task = async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 64 * 1024];
        let mut stdin_open = forward_stdin;
        // A terminal exec follows this terminal's size.
        let mut winch = if tty {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok()
        } else {
            None
        };
        loop {
            tokio::select! {
                _ = input_stop.cancelled() => return,
                Some(()) = async {
                    match winch.as_mut() {
                        Some(signal) => signal.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let (cols, rows) = size();
                    if input.resize(rows, cols).await.is_err() {
                        return;
                    }
                }
                _ = tokio::signal::ctrl_c() => {
                    // Interrupt the remote command, as a terminal would.
                    if input.signal(2).await.is_err() {
                        return;
                    }
                }
                res = stdin.read(&mut buf), if stdin_open => match res {
                    Ok(0) | Err(_) => {
                        stdin_open = false;
                        if input.close().await.is_err() {
                            return;
                        }
                    }
                    Ok(n) => {
                        if input.write(bytes::Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                            return;
                        }
                    }
                },
            }
        }
    };
    let output_task = async {
        let mut stdout = tokio::io::stdout();
        let mut stderr = tokio::io::stderr();
        let res = loop {
            match output.next().await {
                Ok(ExecEvent::Stdout(data)) => {
                    if stdout.write_all(&data).await.is_err() {
                        // A closed stdout: stop quietly.
                        break Ok(ExitReport {
                            code: Some(exit::OK),
                            signal: None,
                        });
                    }
                    let _ = stdout.flush().await;
                }
                Ok(ExecEvent::Stderr(data)) => {
                    let _ = stderr.write_all(&data).await;
                    let _ = stderr.flush().await;
                }
                Ok(ExecEvent::Exit(report)) => break Ok(report),
                Err(err) => break Err(err),
            }
        };
        stop_input.cancel();
        res
    };
    let (_, res) = tokio::join!(input_task, output_task);
    res
}

/// The local terminal in raw mode; restores its settings on drop.
pub(super) struct RawMode(rustix::termios::Termios);

impl RawMode {
    /// Raw mode on stdin, if it is a terminal.
    pub(super) fn enter() -> Option<RawMode> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        let saved = rustix::termios::tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw).ok()?;
        Some(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.0,
        );
    }
}

/// This terminal's size as (columns, rows); `COLUMNS` and `LINES`, then
/// 80x24, when stdout is no terminal.
pub(super) fn size() -> (u16, u16) {
    if let Ok(size) = rustix::termios::tcgetwinsize(std::io::stdout())
        && size.ws_col > 0
    {
        return (size.ws_col, size.ws_row);
    }
    let cols = std::env::var("COLUMNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(80);
    let rows = std::env::var("LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    (cols, rows)
}
