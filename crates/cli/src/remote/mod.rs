//! `kitepipe remote HOST ...` (operations on a host over SSH) and the
//! hidden `kitepipe agent` (what runs on the host).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use kitepipe::remote::{
    FileKind, FileStat, RemoteCommand, RemoteError, Session, SshOptions, escape,
};
use tokio_util::sync::CancellationToken;

use crate::exit;

mod ssh_flags;
mod terminal;

use ssh_flags::SshFlags;

/// Files at least this large get a progress bar (when stderr is a terminal).
const PROGRESS_MIN: u64 = 4 * 1024 * 1024;

/// How often the progress bar is redrawn.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// Run commands and file operations on a host you can reach with ssh,
/// with nothing installed there.
///
/// kitepipe starts the system `ssh` client (so ~/.ssh/config, keys, the
/// agent, known_hosts and jump hosts work as usual), pushes its own binary
/// through the session as the agent, runs it from a file it removes before
/// serving, and speaks its link protocol over the session. Nothing stays on
/// the host afterwards (unless --cache).
///
/// Examples:
///
///   kitepipe remote user@host exec -- uname -a
///
///   kitepipe remote host exec --cwd /srv --env MODE=prod -- ./deploy.sh
///
///   tar c dir | kitepipe remote host exec -- tar x -C /tmp
///
///   kitepipe remote host cp ./build.tar :/tmp/build.tar
///
///   kitepipe remote host cp :/var/log/syslog ./syslog
///
///   kitepipe remote host ls -l /etc
///
///   kitepipe remote -J bastion --sudo db1 exec -- systemctl restart postgresql
///
///   kitepipe remote host forward 8080:127.0.0.1:80
///
/// On a relay, the same operations on a connector that opted in
/// (`kitepipe connect --allow-remote exec,fs`), as the relay's
/// `[[remote]]` rules allow; each is logged on both with the caller:
///
///   kitepipe remote node:laptop --gateway 127.0.0.1:8089 exec -- uptime
///
/// What the host says (names, messages, paths, its platform, ssh's lines)
/// is shown with control characters escaped (`\x1b`), so a host cannot
/// drive this terminal; `ls --json` gives scripts the exact names. A
/// command's own output (exec) passes through as it is, as with ssh.
///
/// Exit status: the remote command's for exec (126: it could not be run,
/// not permitted, also when a relay refuses exec; 127: not found); 4 when
/// the host failed an operation (the cause is printed); 124 on a timeout;
/// 130/143 when interrupted (SIGINT/SIGTERM; a download removes its
/// partial file); 255 when the host could not be reached, the relay
/// refused the session, or the session was lost.
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub(crate) struct RemoteArgs {
    /// The host: `[user@]host` or a Host alias from the ssh config; or
    /// `node:NAME` for a connector through the relay (run on the relay's
    /// machine, with --gateway; the connector must run with --allow-remote
    /// and the relay's `[[remote]]` rules must grant the operation).
    #[arg(value_name = "HOST")]
    host: String,
    /// The relay's gateway, for `node:NAME`: 127.0.0.1:PORT, a bare port or
    /// unix:PATH (`kitepipe relay` prints it as "gateway on ...").
    #[arg(long, value_name = "ADDR", env = "KITEPIPE_GATEWAY")]
    gateway: Option<String>,
    /// Run the agent as root with `sudo -n` (fails clearly if sudo wants a password).
    #[arg(long)]
    sudo: bool,
    /// Keep the agent on the host (~/.cache/kitepipe/agent-SHA256) so later
    /// sessions skip the transfer. It is run only when it and its directory
    /// are yours and nobody else may write them, and its SHA-256 matches
    /// (checked on the host); otherwise it is replaced or not used.
    #[arg(long)]
    cache: bool,
    /// Jump host(s), as `ssh -J`.
    #[arg(short = 'J', long = "jump", value_name = "[USER@]HOST[:PORT]")]
    jump: Option<String>,
    #[command(flatten)]
    ssh_flags: SshFlags,
    /// The ssh client to run.
    #[arg(long, value_name = "PROGRAM", default_value = "ssh")]
    ssh: PathBuf,
    /// Deadline for connecting and starting the agent, e.g. 30s.
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    connect_timeout: String,
    /// Deadline of metadata operations (stat, ls, mkdir, rm, mv, kill,
    /// spawn) and of the host's first reply to exec and forward; read,
    /// write and cp fail when the host makes no progress this long. E.g. 60s.
    #[arg(long, value_name = "DURATION", default_value = "60s")]
    timeout: String,
    /// The session is lost when the host is silent this long, e.g. 15s.
    #[arg(long, value_name = "DURATION", default_value = "15s")]
    heartbeat: String,
    #[command(subcommand)]
    op: RemoteOpArgs,
}

#[derive(Debug, Subcommand)]
enum RemoteOpArgs {
    /// Run a command: its output streams live, stdin is forwarded, and its
    /// exit status becomes kitepipe's.
    ///
    /// Example: kitepipe remote host exec --env A=1 -- sh -c 'echo $A'
    Exec(ExecArgs),
    /// Start a command in the background and print its pid (it outlives the session).
    Spawn(SpawnArgs),
    /// Send a signal to a process on the host.
    Kill(KillArgs),
    /// Print a remote file on stdout.
    #[command(alias = "cat")]
    Read {
        /// Remote path.
        path: String,
    },
    /// Write stdin to a remote file (created or replaced whole).
    Write {
        /// Remote path.
        path: String,
    },
    /// List a remote directory (names escaped for the terminal).
    Ls {
        /// Long format: kind, mode, size, modification time.
        #[arg(short = 'l')]
        long: bool,
        /// One JSON object per entry and line, with the exact name (for scripts).
        #[arg(long, conflicts_with = "long")]
        json: bool,
        /// Remote path.
        #[arg(default_value = ".")]
        path: String,
    },
    /// Show a remote path's metadata as JSON.
    Stat {
        /// Remote path.
        path: String,
    },
    /// Create a remote directory.
    Mkdir {
        /// Create parents too, and succeed if it exists.
        #[arg(short = 'p')]
        parents: bool,
        /// Remote path.
        path: String,
    },
    /// Remove a remote file or directory.
    Rm {
        /// Remove a directory and everything in it.
        #[arg(short = 'r')]
        recursive: bool,
        /// Remote path.
        path: String,
    },
    /// Rename a remote path.
    Mv {
        /// Existing remote path.
        from: String,
        /// New remote path.
        to: String,
    },
    /// Copy a file to or from the host: prefix the remote side with `:`.
    ///
    /// Examples: cp ./big.iso :/tmp/big.iso    cp :/etc/hosts ./hosts
    Cp {
        /// Source (`:PATH` on the host).
        src: String,
        /// Destination (`:PATH` on the host).
        dst: String,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Forward a local port to an address seen from the host (like ssh -L)
    /// until interrupted.
    ///
    /// Example: forward 8080:127.0.0.1:80 (local 127.0.0.1:8080 reaches the host's port 80);
    /// forward 0:db.internal:5432 picks a free local port and prints it.
    Forward {
        /// `[BIND:]PORT:HOST:HOSTPORT`.
        #[arg(value_name = "SPEC")]
        spec: String,
    },
}

#[derive(Debug, Args)]
struct ExecArgs {
    /// Do not forward stdin (the command reads /dev/null).
    #[arg(short = 'n')]
    no_stdin: bool,
    /// Set a variable, NAME=VALUE. Repeatable.
    #[arg(long, short = 'e', value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Start from an empty environment (then only --env).
    #[arg(long)]
    clear_env: bool,
    /// Working directory on the host.
    #[arg(long, value_name = "DIR")]
    cwd: Option<String>,
    /// Run on a terminal (stdout and stderr merge).
    #[arg(short = 't', long)]
    tty: bool,
    /// The command and its arguments (no shell; use `sh -c '...'` for one).
    #[arg(last = true, required = true, value_name = "CMD")]
    argv: Vec<String>,
}

#[derive(Debug, Args)]
struct SpawnArgs {
    /// Set a variable, NAME=VALUE. Repeatable.
    #[arg(long, short = 'e', value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Working directory on the host.
    #[arg(long, value_name = "DIR")]
    cwd: Option<String>,
    /// Append its stdout and stderr to this file on the host.
    #[arg(long, value_name = "FILE")]
    log: Option<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    argv: Vec<String>,
}

#[derive(Debug, Args)]
struct KillArgs {
    /// Signal name or number (TERM, KILL, INT, HUP, 9, ...).
    #[arg(short = 's', long, default_value = "TERM")]
    signal: String,
    /// Signal the process group (a spawned command and its children).
    #[arg(long)]
    group: bool,
    /// Process id.
    pid: u32,
}

/// The hidden `kitepipe agent`: what the bootstrap runs on the host.
#[derive(Debug, Args)]
pub(crate) struct AgentArgs {
    /// Serve over stdin and stdout.
    #[arg(long, required_unless_present = "pty_child")]
    stdio: bool,
    /// Internal: become ARGV on the terminal SLAVE (a terminal exec).
    #[arg(long, value_name = "SLAVE", requires = "argv")]
    pty_child: Option<String>,
    /// The command of --pty-child.
    #[arg(last = true, value_name = "ARGV")]
    argv: Vec<String>,
    /// Remove this file (our own executable) before serving.
    #[arg(long, value_name = "FILE")]
    unlink: Option<PathBuf>,
    /// The client is gone when silent this long.
    #[arg(long, value_name = "DURATION", default_value = "15s")]
    heartbeat: String,
}

/// `kitepipe agent --stdio`.
pub(crate) async fn agent(args: AgentArgs) -> i32 {
    if let Some(slave) = &args.pty_child {
        let err = kitepipe::remote::pty_child(slave, &args.argv);
        eprintln!("kitepipe: cannot run {:?} on a terminal: {err}", args.argv);
        return if err.kind() == std::io::ErrorKind::NotFound {
            exit::EXEC_NOT_FOUND
        } else {
            exit::EXEC_NOT_PERMITTED
        };
    }
    if let Some(path) = &args.unlink
        && let Err(err) = kitepipe::remote::agent::unlink_self(path)
    {
        eprintln!("kitepipe agent: cannot remove {}: {err}", path.display());
        return exit::RUNTIME;
    }
    let heartbeat = match humantime::parse_duration(&args.heartbeat) {
        Ok(heartbeat) => heartbeat,
        Err(err) => {
            eprintln!("kitepipe agent: bad --heartbeat: {err}");
            return exit::USAGE;
        }
    };
    let _ = args.stdio;
    let io = match kitepipe::remote::agent::stdio() {
        Ok(io) => io,
        Err(err) => {
            eprintln!("kitepipe agent: cannot use stdin and stdout: {err}");
            return exit::RUNTIME;
        }
    };
    let options = kitepipe::remote::agent::AgentOptions { heartbeat };
    let reason = kitepipe::remote::agent::serve(io, &options, CancellationToken::new()).await;
    use kitepipe::link::LinkClosed;
    match reason {
        LinkClosed::Shutdown | LinkClosed::PeerClosed(_) => exit::OK,
        other => {
            eprintln!("kitepipe agent: {other}");
            exit::RUNTIME
        }
    }
}

/// `kitepipe remote HOST ...`; returns the exit code.
pub(crate) async fn run(args: RemoteArgs) -> i32 {
    match run_inner(args).await {
        Ok(code) => code,
        Err(err) => {
            // The chain holds the host's words: escaped for the terminal.
            eprintln!("kitepipe: {}", escape(&format!("{err:#}")));
            exit::classify(&err)
        }
    }
}

fn duration(flag: &str, text: &str) -> anyhow::Result<Duration> {
    humantime::parse_duration(text)
        .map_err(|err| anyhow::Error::new(exit::UsageText(format!("bad {flag} {text:?}: {err}"))))
}

fn usage(text: String) -> anyhow::Error {
    anyhow::Error::new(exit::UsageText(text))
}

async fn run_inner(args: RemoteArgs) -> anyhow::Result<i32> {
    let mut options = SshOptions::new(&args.host);
    options.ssh_program = args.ssh.clone();
    options.sudo = args.sudo;
    options.cache = args.cache;
    options.jump = args.jump.clone();
    options.connect_timeout = duration("--connect-timeout", &args.connect_timeout)?;
    options.session.op_timeout = duration("--timeout", &args.timeout)?;
    options.session.heartbeat = duration("--heartbeat", &args.heartbeat)?;
    options.ssh_args.extend(args.ssh_flags.ssh_args());
    // Check the operation's arguments before dialing.
    let forward_spec = match &args.op {
        RemoteOpArgs::Forward { spec } => Some(parse_forward(spec)?),
        _ => None,
    };
    let kill_signal = match &args.op {
        RemoteOpArgs::Kill(kill) => Some(parse_signal(&kill.signal)?),
        _ => None,
    };
    let session = match args.host.strip_prefix("node:") {
        Some(node) => {
            let text = args.gateway.as_deref().ok_or_else(|| {
                usage(
                    "node:NAME goes through the relay's gateway: give --gateway ADDR \
                     (kitepipe relay prints it as \"gateway on ...\") or set KITEPIPE_GATEWAY"
                        .into(),
                )
            })?;
            let gateway = kitepipe::config::parse_gateway(text)?;
            // The relay's gateway serves its owner only: its token, found
            // as `kitepipe call` finds it.
            let token = tokio::time::timeout(
                options.connect_timeout,
                kitepipe::pipe::client::gateway_token(&gateway, None),
            )
            .await
            .map_err(|_| kitepipe::remote::ConnectError::Timeout {
                after: options.connect_timeout,
                stage: "asking the relay's gateway for its token",
                stderr: String::new(),
            })?
            .context("cannot find the relay gateway's owner token")?;
            Session::via_gateway(
                &gateway,
                node,
                token.as_deref(),
                options.session,
                options.connect_timeout,
            )
            .await
            .with_context(|| format!("cannot start a session on node {node} through the relay"))?
        }
        None => Session::ssh(options)
            .await
            .with_context(|| format!("cannot start a session on {}", args.host))?,
    };
    let res = match args.op {
        RemoteOpArgs::Exec(exec) => run_exec(&session, exec).await,
        RemoteOpArgs::Spawn(spawn) => {
            let command = command_of(spawn.argv, &spawn.env, spawn.cwd, false)?;
            let pid = session.spawn(&command, spawn.log.as_deref()).await?;
            println!("{pid}");
            Ok(exit::OK)
        }
        RemoteOpArgs::Kill(kill) => {
            // Parsed above.
            let signal = kill_signal.unwrap_or(15);
            session.kill(kill.pid, signal, kill.group).await?;
            Ok(exit::OK)
        }
        RemoteOpArgs::Read { path } => {
            let mut stdout = tokio::io::stdout();
            match session.read_into(&path, &mut stdout, &mut |_, _| {}).await {
                Ok(_) => Ok(exit::OK),
                // A closed stdout (`| head`) ends the read quietly.
                Err(RemoteError::Local { source, .. })
                    if source.kind() == std::io::ErrorKind::BrokenPipe =>
                {
                    Ok(exit::OK)
                }
                Err(err) => Err(err.into()),
            }
        }
        RemoteOpArgs::Write { path } => {
            let mut stdin = tokio::io::stdin();
            session
                .write_from(&path, &mut stdin, 0, None, &mut |_, _| {})
                .await?;
            Ok(exit::OK)
        }
        RemoteOpArgs::Ls { long, json, path } => {
            let entries = session.ls(&path).await?;
            let mut out = String::new();
            for entry in entries {
                if json {
                    // Exact names, every control character escaped.
                    out.push_str(&kitepipe::remote::terminal_json(&entry));
                } else if long {
                    out.push_str(&long_line(&entry.stat, &escape(&entry.name)));
                } else {
                    out.push_str(&escape(&entry.name));
                }
                out.push('\n');
            }
            print!("{out}");
            Ok(exit::OK)
        }
        RemoteOpArgs::Stat { path } => {
            let stat = session.stat(&path, false).await?;
            println!("{}", kitepipe::remote::terminal_json(&stat));
            Ok(exit::OK)
        }
        RemoteOpArgs::Mkdir { parents, path } => {
            session.mkdir(&path, parents).await?;
            Ok(exit::OK)
        }
        RemoteOpArgs::Rm { recursive, path } => {
            session.rm(&path, recursive).await?;
            Ok(exit::OK)
        }
        RemoteOpArgs::Mv { from, to } => {
            session.mv(&from, &to).await?;
            Ok(exit::OK)
        }
        RemoteOpArgs::Cp { src, dst, quiet } => run_cp(&session, &src, &dst, quiet).await,
        RemoteOpArgs::Forward { .. } => {
            // Parsed above.
            let Some((bind, host, port)) = forward_spec else {
                return Ok(exit::USAGE);
            };
            run_forward(&session, &bind, &host, port).await
        }
    };
    session.close().await;
    res
}

fn command_of(
    argv: Vec<String>,
    env: &[String],
    cwd: Option<String>,
    clear_env: bool,
) -> anyhow::Result<RemoteCommand> {
    let mut argv = argv.into_iter();
    let program = argv
        .next()
        .ok_or_else(|| usage("a command is required after --".into()))?;
    let mut command = RemoteCommand::new(program).args(argv);
    for pair in env {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| usage(format!("--env {pair:?} is not NAME=VALUE")))?;
        command = command.env(key, value);
    }
    if clear_env {
        command = command.env_clear();
    }
    if let Some(cwd) = cwd {
        command = command.cwd(cwd);
    }
    Ok(command)
}

async fn run_exec(session: &Session, args: ExecArgs) -> anyhow::Result<i32> {
    let mut command = command_of(args.argv, &args.env, args.cwd, args.clear_env)?;
    command = command.stdin(!args.no_stdin);
    // On a terminal here too, keystrokes go through unprocessed (raw mode,
    // restored when the guard drops).
    let _raw = if args.tty {
        let (cols, rows) = terminal::size();
        command = command.tty(rows, cols);
        terminal::RawMode::enter()
    } else {
        None
    };
    let exec = match session.exec(&command).await {
        Ok(exec) => exec,
        Err(err) => {
            let code = match err.reply().map(|reply| reply.kind) {
                Some(kitepipe::remote::ErrorKind::NotFound) => exit::EXEC_NOT_FOUND,
                Some(kitepipe::remote::ErrorKind::PermissionDenied) => exit::EXEC_NOT_PERMITTED,
                _ => return Err(err.into()),
            };
            eprintln!("kitepipe: {}", escape(&err.to_string()));
            return Ok(code);
        }
    };
    let kitepipe::remote::Exec { input, output, .. } = exec;
    let report = terminal::pump(input, output, !args.no_stdin, args.tty).await?;
    Ok(match (report.code, report.signal) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => exit::RUNTIME,
    })
}

async fn run_cp(session: &Session, src: &str, dst: &str, quiet: bool) -> anyhow::Result<i32> {
    let show = !quiet && std::io::stderr().is_terminal();
    let mut bar = Progress::new(show);
    match (src.strip_prefix(':'), dst.strip_prefix(':')) {
        (None, Some(remote)) => {
            let local = PathBuf::from(src);
            session
                .copy_to(&local, remote, &mut |done, total| bar.update(done, total))
                .await?;
        }
        (Some(remote), None) => {
            let mut local = PathBuf::from(dst);
            if local.is_dir() {
                let name = std::path::Path::new(remote)
                    .file_name()
                    .ok_or_else(|| usage(format!("{remote:?} names no file")))?;
                local.push(name);
            }
            // An interrupted download removes its partial file (dropping
            // the copy does) before kitepipe exits.
            let mut progress = |done, total| bar.update(done, total);
            tokio::select! {
                res = session.copy_from(remote, &local, &mut progress) => {
                    res?;
                }
                signal = interrupted() => {
                    eprintln!("\nkitepipe: interrupted; the partial download was removed");
                    return Ok(128 + signal);
                }
            }
        }
        _ => {
            return Err(usage(
                "cp copies between this machine and the host: prefix exactly one side with ':' (cp ./f :/tmp/f)".into(),
            ));
        }
    }
    bar.finish();
    Ok(exit::OK)
}

/// Resolves with the signal number at the first SIGINT or SIGTERM.
async fn interrupted() -> i32 {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => 2,
        _ = term.recv() => 15,
    }
}

/// A one-line progress bar on stderr.
struct Progress {
    show: bool,
    started: tokio::time::Instant,
    last: Option<tokio::time::Instant>,
    drawn: bool,
}

impl Progress {
    fn new(show: bool) -> Progress {
        Progress {
            show,
            started: tokio::time::Instant::now(),
            last: None,
            drawn: false,
        }
    }

    fn update(&mut self, done: u64, total: u64) {
        if !self.show || total < PROGRESS_MIN {
            return;
        }
        let now = tokio::time::Instant::now();
        if self.last.is_some_and(|last| now - last < PROGRESS_EVERY) && done < total {
            return;
        }
        self.last = Some(now);
        self.drawn = true;
        let mib = |n: u64| n as f64 / (1024.0 * 1024.0);
        let secs = (now - self.started).as_secs_f64().max(0.001);
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        let width = 30usize;
        let filled = (pct as usize * width / 100).min(width);
        eprint!(
            "\r[{}{}] {:>3}% {:.1}/{:.1} MiB {:.0} MiB/s ",
            "#".repeat(filled),
            " ".repeat(width - filled),
            pct,
            mib(done),
            mib(total),
            mib(done) / secs
        );
    }

    fn finish(&self) {
        if self.drawn {
            eprintln!();
        }
    }
}

async fn run_forward(session: &Session, bind: &str, host: &str, port: u16) -> anyhow::Result<i32> {
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .with_context(|| format!("cannot listen on {bind}"))?;
    let local = listener.local_addr().context("local address")?;
    let handle = session.forward(listener, host, port);
    println!(
        "forwarding {local} -> {host}:{port} (through {}); Ctrl-C stops",
        escape(&session.agent().platform)
    );
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    let res = tokio::select! {
        _ = tokio::signal::ctrl_c() => Ok(exit::OK),
        _ = term => Ok(exit::OK),
        reason = session.closed() => Err(anyhow::Error::new(RemoteError::SessionLost { op: "forward", reason })),
    };
    drop(handle);
    res
}

/// `[BIND:]PORT:HOST:HOSTPORT` -> (bind address, host, port). The bind
/// address defaults to 127.0.0.1; IPv6 addresses go in brackets.
fn parse_forward(spec: &str) -> anyhow::Result<(String, String, u16)> {
    let bad = || {
        usage(format!(
            "forward {spec:?}: expected [BIND:]PORT:HOST:HOSTPORT, e.g. 8080:127.0.0.1:80"
        ))
    };
    let parts = split_spec(spec);
    let (bind, port, host, host_port) = match parts.as_slice() {
        [port, host, host_port] => ("127.0.0.1".to_string(), port, host, host_port),
        [bind, port, host, host_port] => (bind.clone(), port, host, host_port),
        _ => return Err(bad()),
    };
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host_port: u16 = host_port.parse().map_err(|_| bad())?;
    let bind_host = bind.trim_start_matches('[').trim_end_matches(']');
    let bind_addr = if bind_host.contains(':') {
        format!("[{bind_host}]:{port}")
    } else {
        format!("{bind_host}:{port}")
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if host.is_empty() {
        return Err(bad());
    }
    Ok((bind_addr, host, host_port))
}

/// Splits on ':' outside brackets.
fn split_spec(spec: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut depth = 0;
    for c in spec.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ':' if depth == 0 => {
                parts.push(String::new());
                continue;
            }
            _ => {}
        }
        if let Some(last) = parts.last_mut() {
            last.push(c);
        }
    }
    parts
}

fn parse_signal(text: &str) -> anyhow::Result<i32> {
    if let Ok(n) = text.parse::<i32>() {
        return Ok(n);
    }
    let name = text.trim_start_matches("SIG").to_ascii_uppercase();
    let n = match name.as_str() {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "TERM" => 15,
        "CONT" => 18,
        "STOP" => 19,
        _ => {
            return Err(usage(format!(
                "unknown signal {text:?} (use a number, or HUP INT QUIT KILL USR1 USR2 TERM CONT STOP)"
            )));
        }
    };
    Ok(n)
}

fn long_line(stat: &FileStat, name: &str) -> String {
    let kind = match stat.kind {
        FileKind::Dir => 'd',
        FileKind::File => '-',
        FileKind::Symlink => 'l',
        FileKind::Other => '?',
    };
    format!(
        "{kind}{:04o} {:>12} {:>11} {name}",
        stat.mode, stat.size, stat.mtime
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_specs() {
        let cases = [
            (
                "8080:127.0.0.1:80",
                Some(("127.0.0.1:8080", "127.0.0.1", 80)),
            ),
            ("0.0.0.0:8080:db:5432", Some(("0.0.0.0:8080", "db", 5432))),
            ("[::1]:0:[::1]:22", Some(("[::1]:0", "::1", 22))),
            ("8080:80", None),
            ("x:h:1", None),
            ("1:h:70000", None),
        ];
        for (spec, want) in cases {
            let got = parse_forward(spec).ok();
            let got = got.as_ref().map(|(b, h, p)| (b.as_str(), h.as_str(), *p));
            assert_eq!(got, want, "{spec}");
        }
    }

    #[test]
    fn signals() {
        assert_eq!(parse_signal("TERM").unwrap(), 15);
        assert_eq!(parse_signal("SIGKILL").unwrap(), 9);
        assert_eq!(parse_signal("2").unwrap(), 2);
        assert!(parse_signal("BOGUS").is_err());
    }
}
