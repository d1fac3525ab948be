//! Starting the agent on a host through the system `ssh` client, with
//! nothing installed there.
//!
//! One `ssh` process runs `sh -c SCRIPT` on the host. The script checks the
//! host (the tools it needs, Linux on this machine's architecture, `sudo -n`
//! when asked) and exits with a distinct status and a `kitepipe bootstrap:`
//! line on stderr if anything is missing. It then finds a directory where a
//! file may be written and executed (`$XDG_RUNTIME_DIR`, `/dev/shm`, `/tmp`,
//! `/var/tmp`, `$HOME`, in that order, so memory-backed ones first), takes
//! exactly the agent's size in bytes from stdin with `head -c` (which reads
//! no further, so the link's bytes stay in the pipe), prints a start marker
//! on stdout and runs `kitepipe agent --stdio --unlink FILE`. The agent
//! removes FILE before it serves anything, and the script removes it again
//! after the agent ends, so nothing stays on the disk. The client does not
//! wait for any of this: it sends the script as the ssh command, then the
//! binary, then the link's first frames, all at once (one round trip).
//!
//! With `cache`, the agent is kept as `~/.cache/kitepipe/agent-SHA256` (its
//! hash) and only sent when missing: the script says `NEED` or `HAVE` first,
//! which costs one more round trip and saves the transfer.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::connect::{ConnectError, SshOptions};
use super::text::escape_bytes;

/// `ssh -o ServerAliveInterval`: the ssh client probes a silent server this
/// often and gives up after [`SERVER_ALIVE_COUNT`] misses, so a dead
/// connection ends the ssh process within 15 s (the link's own heartbeat
/// ends the session too).
const SERVER_ALIVE_INTERVAL: u32 = 5;
/// `ssh -o ServerAliveCountMax`.
const SERVER_ALIVE_COUNT: u32 = 3;

/// Bytes of the host's output accepted before the start marker (a login
/// script printing a banner); beyond it the start fails.
const MAX_JUNK: usize = 64 * 1024;

/// Bytes of ssh's stderr kept to explain a failure.
const STDERR_TAIL: usize = 16 * 1024;

/// How long a failed start waits for ssh to exit and tell why.
const EXIT_WAIT: Duration = Duration::from_secs(3);

/// Bytes per read of the agent binary while sending it.
const SEND_CHUNK: usize = 1024 * 1024;

const START_MARKER: &[u8] = b"KITEPIPE-AGENT-START\n";
const NEED_MARKER: &[u8] = b"KITEPIPE-AGENT-NEED\n";
const HAVE_MARKER: &[u8] = b"KITEPIPE-AGENT-HAVE\n";

/// Exit status of the script: sudo would need a password.
const EXIT_SUDO: i32 = 96;
/// Exit status of the script: a tool or a usable directory is missing.
const EXIT_BOOTSTRAP: i32 = 97;
/// Exit status of the script: the host's system or machine cannot run us.
const EXIT_UNSUPPORTED: i32 = 98;
/// ssh's own exit status for its failures (connect, authentication).
const EXIT_SSH: i32 = 255;

/// The ssh process of a session and the collector of its stderr.
pub(crate) struct SshProcess {
    child: Child,
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_done: CancellationToken,
    _tracker: TaskTracker,
    _guard: DropGuard,
}

impl SshProcess {
    /// Waits for ssh to exit after the link closed; kills it after a grace.
    pub(crate) async fn wait_or_kill(&mut self) {
        if tokio::time::timeout(EXIT_WAIT, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }

    /// ssh's stderr (the host's script's and ssh's own lines), each line
    /// escaped: it is shown to a person in the error.
    fn stderr_text(&self) -> String {
        let tail = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        tail.split(|&b| b == b'\n')
            .map(|line| escape_bytes(line).into_owned())
            .collect::<Vec<_>>()
            .join("\n")
            .trim()
            .to_string()
    }

    /// Kills ssh at once (a start that ran out of time).
    pub(crate) async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Why the start failed, from ssh's exit status and stderr.
    pub(crate) async fn failure(&mut self, fallback: ConnectError) -> ConnectError {
        let status = match tokio::time::timeout(EXIT_WAIT, self.child.wait()).await {
            Ok(Ok(status)) => status.code(),
            _ => {
                let _ = self.child.kill().await;
                None
            }
        };
        // Let the stderr collector read to the end.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.stderr_done.cancelled()).await;
        let stderr = self.stderr_text();
        let bootstrap_message = || {
            stderr
                .lines()
                .filter(|line| line.starts_with("kitepipe bootstrap:"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        match status {
            Some(EXIT_SSH) => ConnectError::Ssh { stderr },
            Some(EXIT_SUDO) => ConnectError::SudoPassword {
                message: bootstrap_message(),
            },
            Some(EXIT_BOOTSTRAP) => ConnectError::Bootstrap {
                message: bootstrap_message(),
            },
            Some(EXIT_UNSUPPORTED) => ConnectError::Unsupported {
                message: bootstrap_message(),
            },
            Some(status) => ConnectError::AgentExited { status, stderr },
            None => match fallback {
                ConnectError::Timeout { after, stage, .. } => ConnectError::Timeout {
                    after,
                    stage,
                    stderr,
                },
                other => other,
            },
        }
    }
}

/// An agent started through ssh, not yet spoken to: the pipes of its link
/// and the ssh process that carries it.
pub(crate) struct StartedAgent {
    /// ssh's stdin: the link's bytes to the agent.
    pub(crate) stdin: ChildStdin,
    /// ssh's stdout: the link's bytes from the agent.
    pub(crate) stdout: ChildStdout,
    /// Bytes read after the start marker (the link's first).
    pub(crate) leftover: BytesMut,
    /// The ssh process, to stop it and explain a failure.
    pub(crate) ssh: SshProcess,
}

/// Starts ssh and the agent, by `deadline`; returns the agent's pipes for
/// the session to open its link on.
pub(crate) async fn start(
    options: &SshOptions,
    deadline: Instant,
) -> Result<StartedAgent, ConnectError> {
    let binary = match &options.agent_binary {
        Some(path) => path.clone(),
        None => std::env::current_exe().map_err(|source| ConnectError::AgentBinary {
            path: PathBuf::from("/proc/self/exe"),
            source,
        })?,
    };
    let binary_err = |source| ConnectError::AgentBinary {
        path: binary.clone(),
        source,
    };
    let size = tokio::fs::metadata(&binary)
        .await
        .map_err(binary_err)?
        .len();
    let hash = if options.cache {
        Some(file_hash(&binary).await.map_err(binary_err)?)
    } else {
        None
    };
    let script = script(&ScriptParams {
        size,
        hash: hash.as_deref(),
        sudo: options.sudo,
        log: &options.agent_log,
    });
    let mut command = Command::new(&options.ssh_program);
    let timeout_secs = options.connect_timeout.as_secs().max(1);
    command
        .arg("-T")
        .args(["-e", "none"])
        .args(["-o", &format!("ConnectTimeout={timeout_secs}")])
        .args([
            "-o",
            &format!("ServerAliveInterval={SERVER_ALIVE_INTERVAL}"),
        ])
        .args(["-o", &format!("ServerAliveCountMax={SERVER_ALIVE_COUNT}")]);
    if let Some(jump) = &options.jump {
        command.args(["-J", jump]);
    }
    command
        .args(&options.ssh_args)
        .arg("--")
        .arg(&options.destination)
        .arg(format!("sh -c {}", shell_quote(&script)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    debug!(destination = %options.destination, size, cache = options.cache, sudo = options.sudo, "starting ssh");
    let mut child = command.spawn().map_err(|source| ConnectError::Spawn {
        program: options.ssh_program.clone(),
        source,
    })?;
    let tracker = TaskTracker::new();
    let token = CancellationToken::new();
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let stderr_done = CancellationToken::new();
    if let Some(mut pipe) = child.stderr.take() {
        let tail = stderr.clone();
        let done = stderr_done.clone();
        let stop = token.clone();
        tracker.spawn(async move {
            let _done = done.drop_guard();
            let mut buf = vec![0u8; 4096];
            loop {
                let n = tokio::select! {
                    _ = stop.cancelled() => return,
                    res = pipe.read(&mut buf) => match res {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    },
                };
                debug!(stderr = %escape_bytes(&buf[..n]), "ssh");
                let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > STDERR_TAIL {
                    let cut = tail.len() - STDERR_TAIL;
                    tail.drain(..cut);
                }
            }
        });
    }
    // Both pipes were asked for above.
    let stdin = child.stdin.take().expect("stdin is piped");
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut ssh = SshProcess {
        child,
        stderr,
        stderr_done,
        _tracker: tracker,
        _guard: token.drop_guard(),
    };
    let started = tokio::time::timeout_at(
        deadline,
        push_agent(stdin, stdout, &binary, size, options.cache),
    )
    .await;
    let (stdin, stdout, leftover) = match started {
        Ok(Ok(parts)) => parts,
        Ok(Err(err)) => {
            debug!(%err, "start failed");
            let fallback = ConnectError::Protocol(err);
            return Err(ssh.failure(fallback).await);
        }
        Err(_) => {
            let fallback = ConnectError::Timeout {
                after: options.connect_timeout,
                stage: "connecting with ssh and starting the agent",
                stderr: String::new(),
            };
            let _ = ssh.child.kill().await;
            return Err(ssh.failure(fallback).await);
        }
    };
    Ok(StartedAgent {
        stdin,
        stdout,
        leftover,
        ssh,
    })
}

/// Sends the agent and reads the host's output up to the start marker;
/// returns the pipes and the bytes read after the marker (the link's).
async fn push_agent(
    mut stdin: ChildStdin,
    mut stdout: ChildStdout,
    binary: &Path,
    size: u64,
    cache: bool,
) -> Result<(ChildStdin, ChildStdout, BytesMut), String> {
    let mut buf = BytesMut::new();
    let send = cache_decision(&mut stdout, &mut buf, cache).await?;
    let write = async {
        if send {
            send_binary(&mut stdin, binary, size).await?;
        }
        Ok::<(), String>(())
    };
    let read = read_until_marker(&mut stdout, &mut buf, START_MARKER);
    let (write_res, read_res) = tokio::join!(write, read);
    // A failed read explains more (the host ended); report it first.
    read_res?;
    write_res?;
    Ok((stdin, stdout, buf))
}

/// With a cache, reads the script's `NEED`/`HAVE`; true if the binary must be sent.
async fn cache_decision(
    stdout: &mut ChildStdout,
    buf: &mut BytesMut,
    cache: bool,
) -> Result<bool, String> {
    if !cache {
        return Ok(true);
    }
    loop {
        if let Some(pos) = find(buf, NEED_MARKER) {
            let _ = buf.split_to(pos + NEED_MARKER.len());
            return Ok(true);
        }
        if let Some(pos) = find(buf, HAVE_MARKER) {
            let _ = buf.split_to(pos + HAVE_MARKER.len());
            return Ok(false);
        }
        read_more(stdout, buf).await?;
    }
}

async fn read_until_marker(
    stdout: &mut ChildStdout,
    buf: &mut BytesMut,
    marker: &[u8],
) -> Result<(), String> {
    loop {
        if let Some(pos) = find(buf, marker) {
            let _ = buf.split_to(pos + marker.len());
            return Ok(());
        }
        read_more(stdout, buf).await?;
    }
}

async fn read_more(stdout: &mut ChildStdout, buf: &mut BytesMut) -> Result<(), String> {
    if buf.len() > MAX_JUNK {
        return Err(format!(
            "the host printed over {MAX_JUNK} bytes before the agent started (a login script?)"
        ));
    }
    match stdout.read_buf(buf).await {
        Ok(0) => Err("the host closed the session before the agent started".into()),
        Ok(_) => Ok(()),
        Err(err) => Err(format!("reading from ssh: {err}")),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

async fn send_binary(stdin: &mut ChildStdin, binary: &Path, size: u64) -> Result<(), String> {
    let file = tokio::fs::File::open(binary)
        .await
        .map_err(|err| format!("cannot open {}: {err}", binary.display()))?;
    let mut reader = tokio::io::BufReader::with_capacity(SEND_CHUNK, file.take(size));
    let sent = tokio::io::copy_buf(&mut reader, stdin)
        .await
        .map_err(|err| format!("sending the agent: {err}"))?;
    if sent != size {
        return Err(format!(
            "the agent executable changed size while sending ({sent} of {size} bytes)"
        ));
    }
    stdin
        .flush()
        .await
        .map_err(|err| format!("sending the agent: {err}"))
}

/// SHA-256 (hex) of a file, remembered per path, size and modification time.
async fn file_hash(path: &Path) -> std::io::Result<String> {
    type Memo = Mutex<Option<(PathBuf, u64, std::time::SystemTime, String)>>;
    static MEMO: std::sync::OnceLock<Memo> = std::sync::OnceLock::new();
    let meta = tokio::fs::metadata(path).await?;
    let modified = meta.modified()?;
    let memo = MEMO.get_or_init(|| Mutex::new(None));
    if let Some((p, len, time, hash)) = memo.lock().unwrap_or_else(|p| p.into_inner()).as_ref()
        && p == path
        && *len == meta.len()
        && *time == modified
    {
        return Ok(hash.clone());
    }
    let owned = path.to_path_buf();
    let hash = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        use std::io::Read;
        let mut file = std::fs::File::open(&owned)?;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; SEND_CHUNK];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
        }
        Ok(kitepipe_proto::message::hex(ctx.finish().as_ref()))
    })
    .await
    .map_err(std::io::Error::other)??;
    *memo.lock().unwrap_or_else(|p| p.into_inner()) =
        Some((path.to_path_buf(), meta.len(), modified, hash.clone()));
    Ok(hash)
}

/// What the bootstrap script is made of.
pub(crate) struct ScriptParams<'a> {
    /// Exact size of the agent in bytes.
    pub(crate) size: u64,
    /// Its SHA-256, when it is cached on the host.
    pub(crate) hash: Option<&'a str>,
    /// Run it with `sudo -n`.
    pub(crate) sudo: bool,
    /// The agent's log filter.
    pub(crate) log: &'a str,
}

/// The POSIX sh bootstrap (see the module docs). It holds no single quote,
/// so it travels inside one single-quoted argument.
pub(crate) fn script(params: &ScriptParams<'_>) -> String {
    let size = params.size;
    let arch = std::env::consts::ARCH;
    let log = params.log.replace(
        |c: char| !(c.is_ascii_alphanumeric() || "_=,:.".contains(c)),
        "",
    );
    let mut s = String::new();
    s.push_str("kp_fail() { echo \"kitepipe bootstrap: $2\" >&2; exit \"$1\"; }\n");
    let tools = "uname head mktemp chmod rm";
    s.push_str(&format!(
        "for t in {tools}; do command -v \"$t\" >/dev/null 2>&1 || kp_fail {EXIT_BOOTSTRAP} \"the host has no $t command (needed: {tools})\"; done\n"
    ));
    s.push_str(&format!(
        "s=$(uname -s); m=$(uname -m)\n[ \"$s\" = Linux ] && [ \"$m\" = {arch} ] || kp_fail {EXIT_UNSUPPORTED} \"this kitepipe agent runs on Linux {arch}; the host is $s $m\"\n"
    ));
    let sudo = if params.sudo {
        s.push_str(&format!(
            "command -v sudo >/dev/null 2>&1 || kp_fail {EXIT_BOOTSTRAP} \"the host has no sudo command\"\n\
             sudo -n true 2>/dev/null || kp_fail {EXIT_SUDO} \"sudo on the host needs a password for $(id -un 2>/dev/null) and kitepipe runs sudo -n: allow it NOPASSWD, or log in as a user who needs none\"\n"
        ));
        "sudo -n "
    } else {
        ""
    };
    // Finds a directory where a private temporary file may be written and
    // executed (some are mounted noexec: try one), and sets f to it.
    s.push_str(
        "kp_tempfile() {\nf=\nfor d in \"${XDG_RUNTIME_DIR:-}\" /dev/shm /tmp /var/tmp \"${HOME:-}\"; do\n",
    );
    s.push_str("  [ -n \"$d\" ] && [ -d \"$d\" ] && [ -w \"$d\" ] || continue\n");
    s.push_str("  f=$(mktemp \"$d/.kitepipe-agent.XXXXXX\" 2>/dev/null) || { f=; continue; }\n");
    s.push_str("  echo \"#!/bin/sh\" > \"$f\" && chmod 700 \"$f\" && \"$f\" && break\n");
    s.push_str("  rm -f \"$f\"; f=\ndone\n");
    s.push_str(&format!(
        "[ -n \"$f\" ] || kp_fail {EXIT_BOOTSTRAP} \"no directory on the host where the agent may be written and run (tried XDG_RUNTIME_DIR, /dev/shm, /tmp, /var/tmp, HOME)\"\n}}\n"
    ));
    // Receives the agent into a temporary file, runs it; it removes the
    // file before serving, and the script again after it ends.
    let run_temp = format!(
        "kp_tempfile\n\
         head -c {size} > \"$f\" || {{ rm -f \"$f\"; kp_fail {EXIT_BOOTSTRAP} \"receiving the agent failed\"; }}\n\
         echo KITEPIPE-AGENT-START\n\
         {sudo}\"$f\" agent --stdio --unlink \"$f\" --log {log}\nr=$?; rm -f \"$f\"; exit $r\n"
    );
    match params.hash {
        None => s.push_str(&run_temp),
        Some(hash) => {
            // Only hex reaches the script.
            let hash: String = hash.chars().filter(char::is_ascii_hexdigit).collect();
            s.push_str(&cache_script(&hash));
            s.push_str(&format!(
                "if [ -n \"$c\" ] && [ -f \"$f\" ] && kp_private \"$f\" && kp_hash_ok \"$f\"; then\n\
                 echo KITEPIPE-AGENT-HAVE\nelse\necho KITEPIPE-AGENT-NEED\n\
                 if [ -n \"$c\" ]; then\n\
                 t=$(mktemp \"$c/.agent.XXXXXX\") || kp_fail {EXIT_BOOTSTRAP} \"cannot write the cache directory $c\"\n\
                 head -c {size} > \"$t\" && chmod 700 \"$t\" && kp_hash_ok \"$t\" && mv -f \"$t\" \"$f\" || {{ rm -f \"$t\"; kp_fail {EXIT_BOOTSTRAP} \"receiving the agent failed\"; }}\n\
                 else\n{run_temp}fi\nfi\n\
                 echo KITEPIPE-AGENT-START\n\
                 exec {sudo}\"$f\" agent --stdio --log {log}\n"
            ));
        }
    }
    s
}

/// The part of the bootstrap that decides whether the agent cache may be
/// used; sets `c` (the cache directory, empty when not used) and `f` (the
/// cached agent). The cache is used only when the host can compute a
/// SHA-256 (sha256sum, shasum or openssl), HOME (or XDG_CACHE_HOME) is
/// set (never a shared fallback such as /tmp), and the directory is a real
/// directory owned by the user that neither group nor others may write.
/// The file itself is run only when it is a regular file with the same
/// owner and mode rules and its SHA-256 is the agent's; anything else is
/// replaced by a fresh copy (`kp_hash_ok` checks that too before it moves
/// into place). Whatever is refused is said on stderr
/// ("not using the agent cache: ...").
fn cache_script(hash: &str) -> String {
    let mut s = String::new();
    s.push_str(
        "kp_nocache() { echo \"kitepipe bootstrap: not using the agent cache: $1\" >&2; c=; }\n",
    );
    s.push_str("kp_tool=\nfor t in sha256sum shasum openssl; do command -v $t >/dev/null 2>&1 && { kp_tool=$t; break; }; done\n");
    s.push_str("kp_sum() { case $kp_tool in sha256sum) sha256sum;; shasum) shasum -a 256;; openssl) openssl dgst -sha256 -r;; *) return 1;; esac; }\n");
    s.push_str(&format!(
        "kp_hash_ok() {{ h=$(kp_sum < \"$1\" 2>/dev/null) || return 1; [ \"${{h%% *}}\" = {hash} ]; }}\n"
    ));
    // Owner (numeric, from ls -ln: portable) and the group/other write bits
    // of the mode string; symbolic links refused.
    s.push_str("kp_uid=$(id -u 2>/dev/null)\n");
    s.push_str("kp_private() { [ -h \"$1\" ] && return 1; set -- $(ls -ldn \"$1\" 2>/dev/null); [ -n \"$kp_uid\" ] && [ \"$3\" = \"$kp_uid\" ] || return 1; case $1 in ?????w*|????????w*) return 1;; esac; return 0; }\n");
    s.push_str("c=\nif [ -n \"${XDG_CACHE_HOME:-}\" ]; then c=\"$XDG_CACHE_HOME/kitepipe\"\nelif [ -n \"${HOME:-}\" ]; then c=\"$HOME/.cache/kitepipe\"\nelse kp_nocache \"HOME is not set\"; fi\n");
    s.push_str("if [ -n \"$c\" ]; then\n");
    s.push_str("  for t in mkdir mv ls id; do command -v \"$t\" >/dev/null 2>&1 || { kp_nocache \"the host has no $t command\"; break; }; done\n");
    s.push_str("fi\n");
    s.push_str("[ -z \"$c\" ] || [ -n \"$kp_tool\" ] || kp_nocache \"the host has no sha256sum, shasum or openssl to check it\"\n");
    s.push_str("if [ -n \"$c\" ]; then\n");
    s.push_str("  [ -d \"$c\" ] || (umask 077 && mkdir -p \"$c\") 2>/dev/null\n");
    s.push_str("  [ -d \"$c\" ] && kp_private \"$c\" || kp_nocache \"$c is not a directory that only its owner (you) may write\"\n");
    s.push_str("fi\n");
    s.push_str(&format!("f=\"$c/agent-{hash}\"\n"));
    s
}

/// Quotes `text` as one word for a POSIX shell.
pub(crate) fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}
