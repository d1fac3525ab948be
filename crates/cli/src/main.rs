//! The `kitepipe` command: parses arguments, builds the config, installs
//! logging, runs the library and maps the result to an exit code.
#![forbid(unsafe_code)]

mod admin;
mod ca;
mod exit;
mod notify;
mod ready;
mod remote;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use kitepipe::config::{
    ConnectorConfig, IdentitySource, RawConnectorConfig, RawRelayConfig, RelayConfig, handler_env,
    parse_gateway,
};
use kitepipe::connector::Connector;
use kitepipe::relay::Relay;
use tokio_util::sync::CancellationToken;

/// Make machines behind NAT and firewalls reachable, securely.
///
/// A connector on the hidden machine dials out to a public relay over one
/// TLS link; visitors reach the machine's local HTTP, HTTPS and TCP services
/// through the relay, by name.
///
/// Start with `kitepipe demo`: it runs a relay, a connector and a sample web
/// page on this machine and prints what to try.
#[derive(Debug, Parser)]
#[command(name = "kitepipe", version, propagate_version = true)]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or per-module
    /// directives such as 'info,kitepipe::relay=debug'). This flag (or
    /// KITEPIPE_LOG) wins over RUST_LOG, which wins over the default
    /// [default: info].
    #[arg(long, global = true, env = "KITEPIPE_LOG", value_name = "FILTER")]
    log: Option<String>,
    /// Log line format on stderr: text for people, json for log collectors
    /// (one object per line with timestamp, level, target, message and the
    /// event's fields).
    #[arg(long, global = true, env = "KITEPIPE_LOG_FORMAT", value_enum,
          default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Print one JSON line on stdout per readiness change (relay: bound
    /// addresses and fingerprint; connector: gateway, each link up/down),
    /// for programs that start kitepipe: see crates/cli/src/ready.rs.
    #[arg(long, global = true, env = "KITEPIPE_READY_JSON",
          value_parser = clap::builder::BoolishValueParser::new())]
    ready_json: bool,
    #[command(subcommand)]
    command: Command,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines (colored on a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

// Parsed once at start: the size of the settings' variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run a relay, a connector and sample services on loopback, and print what to try.
    Demo,
    /// Run a relay: accept connectors' links and route visitors to their kites.
    ///
    /// Example (on a server with a public address):
    ///
    ///   kitepipe relay --listen 0.0.0.0:8443 --http 0.0.0.0:80 --domain-file /etc/kitepipe/domains
    ///
    /// (the file holds 'http,tcp:*.example.net:SECRET' lines, mode 0600).
    /// The relay prints its certificate fingerprint at start; connectors pin it.
    Relay(RelayArgs),
    /// Run a connector: link to relays and serve local services as kites.
    ///
    /// Example (on the laptop behind NAT):
    ///
    ///   kitepipe connect relay.example.net:8443 --fingerprint SHA256:... --secret-file ~/.kitepipe-secret --kite http:blog.example.net=127.0.0.1:8000
    Connect(ConnectArgs),
    /// Run this deployment's own certificate authority: create it, issue
    /// certificates to connectors and relays, list and revoke them.
    ///
    /// Example:
    ///
    ///   kitepipe ca init ./ca && kitepipe ca issue laptop --dir ./ca
    ///
    /// The relay then verifies connectors with --client-ca ./ca/ca-cert.pem,
    /// and the laptop connects with --identity ./ca/issued/laptop.
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Send one event through a local gateway and print the reply body.
    ///
    /// Example (on a connector; the gateway address is printed at start):
    ///
    ///   kitepipe call GET server/time --gateway 127.0.0.1:8089
    ///
    /// curl works just as well: curl http://127.0.0.1:8089/server/time.
    /// Exits 0 for a 2xx reply, 3 for any other status.
    Call(CallArgs),
    /// Check a relay's or connector's configuration: load and validate it
    /// as starting would (without binding or dialing) and print every
    /// setting with its value, secrets redacted.
    ///
    /// Example:
    ///
    ///   kitepipe config check connect --config /etc/kitepipe/connector.toml
    #[command(subcommand)]
    Config(ConfigCommand),
    // About and examples: the doc comment of `RemoteArgs`.
    Remote(remote::RemoteArgs),
    /// Show a running relay's or connector's state (kites, links,
    /// listeners) from its admin server.
    ///
    /// Example (the node runs with --admin):
    ///
    ///   kitepipe status --admin 127.0.0.1:4040
    Status(admin::StatusArgs),
    /// The agent `kitepipe remote` starts on a host (not for direct use).
    #[command(hide = true)]
    Agent(remote::AgentArgs),
    /// Print a shell completion script for bash, zsh or fish.
    ///
    /// Example (bash, for this user):
    ///
    ///   kitepipe completions bash > ~/.local/share/bash-completion/completions/kitepipe
    ///
    /// The Debian package installs all three.
    Completions(CompletionsArgs),
    /// Write the man pages (kitepipe.1 and one per subcommand, such as
    /// kitepipe-relay.1) into a directory.
    ///
    /// Example: kitepipe man /tmp/man && man -l /tmp/man/kitepipe.1
    Man(ManArgs),
}

#[derive(Debug, Args)]
struct CompletionsArgs {
    /// The shell whose completion script to print.
    shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
struct ManArgs {
    /// The directory to write the pages into (created if missing).
    dir: PathBuf,
}

#[derive(Debug, Args)]
struct CallArgs {
    /// HTTP method: the event's verb (GET, POST, ...).
    method: String,
    /// Path: server/NOUN..., peer/NODE/NOUN... (on a connector) or
    /// client/NODE/NOUN... (on the relay); arguments after //.
    path: String,
    /// The gateway: 127.0.0.1:PORT, a bare port, or unix:PATH.
    #[arg(long, env = "KITEPIPE_GATEWAY", value_name = "ADDR")]
    gateway: String,
    /// Request body: text, @FILE, or @- for stdin.
    #[arg(long, short = 'd', value_name = "DATA")]
    data: Option<String>,
    /// Extra request header, 'Name: value'. Repeatable.
    #[arg(long = "header", short = 'H', value_name = "HEADER")]
    headers: Vec<String>,
    /// Print the status line and response headers to stderr.
    #[arg(long, short = 'i')]
    include: bool,
    /// The relay gateway's owner token file [default: the file the gateway
    /// names, if it is the caller's own and private].
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

/// `kitepipe config ...`.
#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Load and validate a configuration as starting would, and print the
    /// effective settings as TOML (secrets redacted). Exits 2 on an
    /// invalid configuration, printing only the error.
    #[command(subcommand)]
    Check(CheckCommand),
}

/// What `kitepipe config check` checks: the same flags, variables and
/// --config file as the command itself.
// Parsed once at start: the size of the settings' variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum CheckCommand {
    /// The settings of `kitepipe relay`.
    Relay(RelayArgs),
    /// The settings of `kitepipe connect`.
    Connect(ConnectArgs),
}

/// `kitepipe relay`: the settings are declared once, in the library's
/// `RawRelayConfig` (flag, `KITEPIPE_*` variable and TOML key alike).
#[derive(Debug, Args)]
struct RelayArgs {
    /// TOML file with the same settings as the flags (`--tcp-ports` is
    /// `tcp_ports`); flags and KITEPIPE_* variables win.
    #[arg(long, short = 'c', env = "KITEPIPE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: RawRelayConfig,
}

/// `kitepipe connect`: the settings are declared once, in the library's
/// `RawConnectorConfig`.
#[derive(Debug, Clone, Args)]
struct ConnectArgs {
    /// TOML file with the same settings as the flags (`--max-backoff` is
    /// `max_backoff`, kites are `[[kite]]` tables); flags and KITEPIPE_*
    /// variables win.
    #[arg(long, short = 'c', env = "KITEPIPE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: RawConnectorConfig,
}

/// A relay's or connector's configuration, loaded and validated before the
/// runtime starts (its thread count sizes the runtime).
enum Loaded {
    /// Neither.
    Nothing,
    /// `kitepipe relay`.
    Relay(Box<RelayConfig>, u16),
    /// `kitepipe connect`.
    Connect(Box<ConnectorConfig>, u16),
}

fn main() {
    let cli = Cli::parse();
    ready::enable(cli.ready_json);
    init_logging(
        cli.log.as_deref(),
        std::env::var("RUST_LOG").ok().as_deref(),
        cli.log_format,
    );
    let loaded = match load(&cli.command) {
        Ok(loaded) => loaded,
        Err(err) => {
            eprintln!("kitepipe: {err:#}");
            std::process::exit(exit::classify(&err));
        }
    };
    let mut builder = match runtime_threads(&cli.command, &loaded) {
        1 => tokio::runtime::Builder::new_current_thread(),
        threads => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(threads);
            builder
        }
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("kitepipe: cannot start the async runtime: {err}");
            std::process::exit(exit::RUNTIME);
        }
    };
    let code = runtime.block_on(run(cli.command, loaded));
    std::process::exit(code);
}

/// Installs the tracing subscriber: stderr, in `format`, filtered by
/// `flag` (--log or KITEPIPE_LOG), else `rust_log` (RUST_LOG), else info.
fn init_logging(flag: Option<&str>, rust_log: Option<&str>, format: LogFormat) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let (source, directives) = match (flag, rust_log.filter(|s| !s.is_empty())) {
        (Some(flag), _) => ("--log", flag),
        (None, Some(rust_log)) => ("RUST_LOG", rust_log),
        (None, None) => ("the default", "info"),
    };
    // `Targets` (level, or `target=level` directives) rather than
    // `EnvFilter`: no regex engine in the binary or compiled at start, which
    // is a good part of the code a freshly started relay or connector maps.
    // RUST_LOG's common forms (`debug`, `info,kitepipe=trace`) parse; its
    // span and field filters do not, and are reported below.
    let (filter, bad) = match directives.parse::<Targets>() {
        Ok(filter) => (filter, None),
        Err(err) => (
            Targets::new().with_default(LevelFilter::INFO),
            Some(err.to_string()),
        ),
    };
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .init(),
        // Flattened: `message` and the event's fields at the top level
        // beside `timestamp`, `level` and `target`, where log collectors
        // look for them.
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
    if let Some(err) = bad {
        // After init, so that it comes out in the chosen format.
        tracing::warn!(%err, "ignoring {source} {directives:?}; using info");
    }
}

/// How many threads the async runtime gets. One thread serves a few
/// streams over one link or pipe with the least latency per round trip: no
/// cross-thread wake-ups, and frames that become ready together leave in
/// one write (`kitepipe remote`, the agent, a connector). A relay serves
/// many links: a thread per two cores, because on a relay most of the work
/// per request is the kernel's TCP (about three quarters of its CPU with
/// small HTTP requests, bench/RESULTS.md), and threads beyond the cores
/// left for it only add wake-ups (on 2 cores: 1 thread 16k req/s, 2
/// threads 14k).
fn runtime_threads(command: &Command, loaded: &Loaded) -> usize {
    match (command, loaded) {
        (Command::Remote(_) | Command::Agent(_), _) => 1,
        // The settings' defaults hold the thread counts said above.
        (_, Loaded::Relay(_, threads) | Loaded::Connect(_, threads)) => usize::from(*threads),
        (Command::Demo, _) => cores(),
        _ => 1,
    }
}

/// The CPU cores this process may use.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Whether `flag` was typed on the command line (rather than coming from
/// its environment variable or the config file), which every local user
/// can read.
fn on_command_line(flag: &str) -> bool {
    let with_value = format!("{flag}=");
    std::env::args().any(|arg| arg == flag || arg.starts_with(&with_value))
}

/// Loads and validates the configuration of `kitepipe relay` and
/// `kitepipe connect`; `kitepipe config check` prints it and is done.
fn load(command: &Command) -> anyhow::Result<Loaded> {
    match command {
        Command::Relay(args) => {
            let (raw, config) = relay_config(args)?;
            Ok(Loaded::Relay(Box::new(config), raw.threads.unwrap_or(1)))
        }
        Command::Connect(args) => {
            let (raw, config) = connector_config(args)?;
            Ok(Loaded::Connect(Box::new(config), raw.threads.unwrap_or(1)))
        }
        Command::Config(ConfigCommand::Check(CheckCommand::Relay(args))) => {
            let (raw, _) = relay_config(args)?;
            print!("{}", raw.effective_toml());
            Ok(Loaded::Nothing)
        }
        Command::Config(ConfigCommand::Check(CheckCommand::Connect(args))) => {
            let (mut raw, config) = connector_config(args)?;
            raw.name = Some(config.name);
            print!("{}", raw.effective_toml());
            Ok(Loaded::Nothing)
        }
        _ => Ok(Loaded::Nothing),
    }
}

/// The relay's settings: flags and `KITEPIPE_*` variables over the
/// --config file over the defaults, validated.
fn relay_config(args: &RelayArgs) -> anyhow::Result<(RawRelayConfig, RelayConfig)> {
    if on_command_line("--domain") {
        tracing::warn!(
            "--domain puts its secret on the command line, where every local user can read it \
             (ps, /proc/PID/cmdline): use --domain-file FILE"
        );
    }
    let env = |key: &str| std::env::var(key).ok();
    let raw = RawRelayConfig::load(args.config.as_deref(), &args.settings)
        .map_err(exit::usage)?
        .with_defaults(&env, cores());
    let mut config = RelayConfig::try_from(raw.clone()).map_err(exit::usage)?;
    if config.domains.is_empty() && config.identity.client_ca.is_none() {
        tracing::warn!("no --domain and no --client-ca given: connectors cannot claim any kite");
    }
    config.reload_from = args.config.clone().map(|file| IdentitySource {
        file,
        flags: args.settings.clone(),
    });
    config.events.handler_env = handler_env(&env);
    Ok((raw, config))
}

/// The connector's settings: flags and `KITEPIPE_*` variables over the
/// --config file over the defaults, validated.
fn connector_config(args: &ConnectArgs) -> anyhow::Result<(RawConnectorConfig, ConnectorConfig)> {
    let mut flags = args.settings.clone();
    if on_command_line("--secret") {
        tracing::warn!(
            "--secret puts the secret on the command line, where every local user can read it \
             (ps, /proc/PID/cmdline): use --secret-file FILE or KITEPIPE_SECRET"
        );
    } else if flags.secret_file.is_some() {
        // KITEPIPE_SECRET is the fallback of both flags: a secret file
        // given as a flag (or variable) wins over it.
        flags.secret = None;
    }
    let raw = RawConnectorConfig::load(args.config.as_deref(), &flags)
        .map_err(exit::usage)?
        .with_defaults();
    let mut config = ConnectorConfig::try_from(raw.clone()).map_err(exit::usage)?;
    config.events.handler_env = handler_env(&|key| std::env::var(key).ok());
    if let Some(path) = &args.config {
        // Relayed file operations never reach the config file.
        let file = (path.clone(), "the config file".to_string());
        config.remote_fs.protected.push(file);
    }
    if config.kites.is_empty() && config.events.gateway.is_none() {
        tracing::warn!("no --kite and no gateway: the connector links but serves nothing");
    }
    Ok((raw, config))
}

async fn run(command: Command, loaded: Loaded) -> i32 {
    let res = match (command, loaded) {
        (Command::Demo, _) => demo().await,
        (Command::Relay(_), Loaded::Relay(config, _)) => relay(*config).await,
        (Command::Connect(args), Loaded::Connect(config, _)) => connect(*config, args).await,
        (Command::Relay(_) | Command::Connect(_), _) => {
            unreachable!("load() gives relays and connectors their config")
        }
        (Command::Config(_), _) => Ok(()),
        (Command::Ca(command), _) => ca::run(command, &|key| std::env::var(key).ok()),
        (Command::Call(args), _) => return call(args).await,
        (Command::Status(args), _) => admin::status(args).await,
        (Command::Remote(args), _) => return remote::run(args).await,
        (Command::Agent(args), _) => return remote::agent(args).await,
        (Command::Completions(args), _) => completions(args.shell),
        (Command::Man(args), _) => man_pages(&args.dir),
    };
    match res {
        Ok(()) => exit::OK,
        Err(err) => {
            eprintln!("kitepipe: {err:#}");
            exit::classify(&err)
        }
    }
}

fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    // Registered now rather than in the task: a supervisor may send
    // SIGTERM as soon as it was told READY=1, before the task first runs.
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    tokio::spawn(async move {
        let mut term = match term {
            Ok(term) => term,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                trigger.cancel();
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        notify::stopping();
        trigger.cancel();
    });
    token
}

/// Makes SIGHUP reload the relay's identity settings (rules, client CA,
/// revocation list) without dropping links.
fn reload_on_sighup(trigger: kitepipe::relay::ReloadTrigger) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hangup) => hangup,
        Err(err) => {
            tracing::warn!(%err, "cannot listen for SIGHUP; reloads happen on file changes only");
            return;
        }
    };
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading identity settings");
            trigger.reload();
        }
    });
}

/// Makes SIGHUP reload the connector's config: its kites change on the
/// live links, other settings need a restart.
fn connector_reload_on_sighup(trigger: kitepipe::connector::ReloadTrigger) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hangup) => hangup,
        Err(err) => {
            tracing::warn!(%err, "cannot listen for SIGHUP; reloads happen on file changes only");
            return;
        }
    };
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the config");
            trigger.reload();
        }
    });
}

async fn relay(config: RelayConfig) -> anyhow::Result<()> {
    let relay_has_client_ca = config.identity.client_ca.is_some();
    let shutdown = shutdown_on_signal();
    let admin = admin::bind(config.admin.as_ref())?;
    let access_log = config.access_log.clone();
    let mut relay = Relay::bind(config).await?;
    if let Some(admin) = admin {
        relay.serve_admin(admin);
    }
    if let Some(settings) = &access_log {
        let (target, format) = admin::access_log(settings);
        relay.access_log(&target, format)?;
    }
    reload_on_sighup(relay.reload_trigger());
    ready::relay(&relay);
    notify::relay_ready(&relay);
    println!("kitepipe relay ready");
    println!("  fingerprint {}", relay.fingerprint());
    for listener in relay.listeners() {
        let mut roles = Vec::new();
        if listener.roles.link {
            roles.push("links");
        }
        if listener.roles.http {
            roles.push("http");
        }
        if listener.roles.https {
            roles.push("https");
        }
        println!("  {} on {}", roles.join("+"), listener.addr);
    }
    if let Some(admin) = relay.admin_addr() {
        println!("  admin on http://{admin}/");
    }
    if let Some(gateway) = relay.gateway() {
        println!("  gateway on {gateway}");
    }
    println!(
        "connectors: kitepipe connect HOST:PORT --fingerprint {} {} --kite ...",
        relay.fingerprint(),
        if relay_has_client_ca {
            "--identity DIR"
        } else {
            "--secret ..."
        }
    );
    relay.run(shutdown).await;
    Ok(())
}

async fn connect(config: ConnectorConfig, args: ConnectArgs) -> anyhow::Result<()> {
    let relays: Vec<String> = config.relays.iter().map(|r| r.addr.clone()).collect();
    let shutdown = shutdown_on_signal();
    let admin = admin::bind(config.admin.as_ref())?;
    let file = args.config.clone();
    let loader: kitepipe::connector::ConfigLoader = std::sync::Arc::new(move || {
        connector_config(&args)
            .map(|(_, config)| config)
            .map_err(|err| format!("{err:#}"))
    });
    let mut connector = Connector::new(config)
        .context("connector setup")?
        .reload_from(loader, file);
    if let Some(admin) = admin {
        connector.serve_admin(admin);
    }
    connector_reload_on_sighup(connector.reload_trigger());
    ready::connector(&connector, relays.clone());
    notify::connector(&connector, relays);
    println!("kitepipe connector starting");
    if let Some(admin) = connector.admin_addr() {
        println!("  admin on http://{admin}/");
    }
    if let Some(gateway) = connector.gateway() {
        println!("  gateway on {gateway}");
    }
    connector.run(shutdown).await;
    Ok(())
}

async fn demo() -> anyhow::Result<()> {
    let state_dir = std::env::temp_dir().join(format!("kitepipe-demo-{}", std::process::id()));
    let shutdown = shutdown_on_signal();
    let state_dir_for_print = state_dir.clone();
    let res = kitepipe::demo::run(state_dir.clone(), shutdown, |info| {
        ready::demo(info);
        let http = info.http_addr;
        let port = http.port();
        println!("kitepipe demo is running: a relay, a connector and two sample services on this machine.");
        println!();
        println!("  relay      links on {}, visitors' HTTP on {http}", info.link_addr);
        println!("             fingerprint {}", info.fingerprint);
        println!("  connector  linked; serving http:{} and tcp:{}:{}", kitepipe::demo::DEMO_HTTP_KITE, kitepipe::demo::DEMO_TCP_KITE, info.tcp_port);
        println!();
        println!("Try:");
        println!("  curl -H 'Host: {}' http://{http}/", kitepipe::demo::DEMO_HTTP_KITE);
        println!("  curl http://{}:{port}/        (or open it in a browser)", kitepipe::demo::DEMO_HTTP_KITE);
        println!("  curl -i -H 'Host: nosuch.example.net' http://{http}/     (unknown kite: 404 page)");
        println!("  printf 'hello\\n' | nc -w1 127.0.0.1 {}     (TCP kite: an echo service)", info.tcp_port);
        if let (Some(relay_gw), Some(connector_gw)) = (info.relay_gateway, info.connector_gateway) {
            println!();
            println!("Events (the event pipe: each node's local REST gateway):");
            // The relay's gateway serves its owner only: the token is in
            // the demo's state dir (mode 0600).
            let token = std::fs::read_to_string(state_dir_for_print.join(kitepipe::config::GATEWAY_TOKEN_FILE)).unwrap_or_default();
            println!("  curl -H '{}: {}' http://{relay_gw}/client/{}/time     (relay -> connector: the connector's clock)", kitepipe::pipe::TOKEN_HEADER, token.trim(), kitepipe::demo::DEMO_NODE);
            println!("  kitepipe call GET client/{}/time --gateway {relay_gw}     (the same; finds the token itself)", kitepipe::demo::DEMO_NODE);
            println!("  curl http://{connector_gw}/server/cat//hello%20/world     (connector -> relay: prints hello world)");
            println!("  kitepipe call GET server/time --gateway {connector_gw}");
        }
        println!();
        println!("Press Ctrl-C to stop.");
    })
    .await;
    let _ = std::fs::remove_dir_all(&state_dir);
    res.context("demo")
}

/// `kitepipe call`: one event through a gateway; the body goes to stdout.
async fn call(args: CallArgs) -> i32 {
    match call_inner(args).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("kitepipe: {err:#}");
            exit::classify(&err)
        }
    }
}

async fn call_inner(args: CallArgs) -> anyhow::Result<i32> {
    use tokio::io::AsyncReadExt;
    let gateway = parse_gateway(&args.gateway).map_err(exit::usage)?;
    let body = match args.data.as_deref() {
        None => bytes::Bytes::new(),
        Some("@-") => {
            let mut all = Vec::new();
            tokio::io::stdin()
                .read_to_end(&mut all)
                .await
                .context("reading the body from stdin")?;
            all.into()
        }
        Some(data) => match data.strip_prefix('@') {
            Some(path) => tokio::fs::read(path)
                .await
                .with_context(|| format!("reading the body from {path}"))?
                .into(),
            None => bytes::Bytes::from(data.to_string()),
        },
    };
    let mut headers = Vec::new();
    for header in &args.headers {
        let (name, value) = header
            .split_once(':')
            .with_context(|| format!("header {header:?} is not 'Name: value'"))
            .map_err(|err| anyhow::Error::new(exit::UsageText(format!("{err:#}"))))?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    let request = kitepipe::pipe::client::CallRequest {
        method: args.method.to_ascii_uppercase(),
        path: args.path,
        headers,
        body,
    };
    let mut request = request;
    if let Some(token) =
        kitepipe::pipe::client::gateway_token(&gateway, args.token_file.as_deref()).await?
    {
        request
            .headers
            .push((kitepipe::pipe::TOKEN_HEADER.to_string(), token));
    }
    let mut stdout = tokio::io::stdout();
    let response = kitepipe::pipe::client::call(&gateway, request, &mut stdout).await?;
    if args.include {
        eprintln!("HTTP {}", response.status);
        for (name, value) in &response.headers {
            eprintln!("{name}: {value}");
        }
    }
    Ok(if (200..300).contains(&response.status) {
        exit::OK
    } else {
        exit::EVENT_FAILED
    })
}

/// `kitepipe completions SHELL`: the script on stdout.
fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    use clap::CommandFactory as _;
    use std::io::Write as _;
    let mut command = Cli::command();
    // Into a buffer first: clap_complete panics on a failed write, and a
    // closed stdout (`| head`) must exit quietly.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "kitepipe", &mut script);
    match std::io::stdout().lock().write_all(&script) {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(err).context("writing the completion script")
        }
        _ => Ok(()),
    }
}

/// `kitepipe man DIR`: kitepipe.1 and a page per visible subcommand
/// (kitepipe-relay.1, kitepipe-ca-issue.1, ...), written into `dir`.
fn man_pages(dir: &std::path::Path) -> anyhow::Result<()> {
    use clap::CommandFactory as _;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("writing man pages into {}", dir.display()))?;
    println!("man pages written to {}", dir.display());
    Ok(())
}
