//! The `kitepipe` command: parses arguments, builds the config, installs
//! logging, runs the library and maps the result to an exit code.
#![forbid(unsafe_code)]

mod ca;
mod exit;
mod ready;
mod remote;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use kitepipe::config::{
    ConnectorConfig, IdentitySource, RawConnectorConfig, RawRelayConfig, RawRemoteRule,
    RelayConfig, default_state_dir, handler_env, parse_gateway,
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
    /// Log filter (error, warn, info, debug, trace, or per-module directives).
    #[arg(long, global = true, env = "KITEPIPE_LOG", default_value = "info")]
    log: String,
    /// Print one JSON line on stdout per readiness change (relay: bound
    /// addresses and fingerprint; connector: gateway, each link up/down),
    /// for programs that start kitepipe: see crates/cli/src/ready.rs.
    #[arg(long, global = true, env = "KITEPIPE_READY_JSON",
          value_parser = clap::builder::BoolishValueParser::new())]
    ready_json: bool,
    #[command(subcommand)]
    command: Command,
}

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
    // About and examples: the doc comment of `RemoteArgs`.
    Remote(remote::RemoteArgs),
    /// The agent `kitepipe remote` starts on a host (not for direct use).
    #[command(hide = true)]
    Agent(remote::AgentArgs),
}

/// Event pipe settings, the same for relays and connectors.
#[derive(Debug, Args)]
struct EventArgs {
    /// Where the local event gateway listens: 127.0.0.1:PORT, a bare port,
    /// unix:PATH, or off [default: 127.0.0.1:0, printed at start].
    #[arg(long, value_name = "ADDR")]
    gateway: Option<String>,
    /// Directory of event handler executables: GET /server/time/utc runs
    /// DIR/get_time_utc with the arguments as argv and the body on stdin.
    #[arg(long, value_name = "DIR")]
    handlers: Option<PathBuf>,
    /// Forward events no other handler takes to this local HTTP server,
    /// e.g. http://127.0.0.1:9000.
    #[arg(long, value_name = "URL")]
    handler_upstream: Option<String>,
    /// How long an event waits for an offline node or link before 503, e.g. 30s.
    #[arg(long, value_name = "DURATION")]
    event_wait: Option<String>,
    /// How long a handler may go without progress before 504, e.g. 30s.
    #[arg(long, value_name = "DURATION")]
    event_timeout: Option<String>,
    /// Let web pages of this origin (`scheme://host[:port]`) use the gateway;
    /// requests with any other Origin get 403. Repeatable [default: none].
    #[arg(long, value_name = "ORIGIN")]
    gateway_origin: Vec<String>,
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

#[derive(Debug, Args)]
struct RelayArgs {
    /// TOML file with the same settings as the flags (flags win).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address for connectors' links, IP:PORT [default: 0.0.0.0:8443]. Repeatable.
    #[arg(long, value_name = "ADDR")]
    listen: Vec<String>,
    /// Address for visitors' HTTP, routed by Host [default: 0.0.0.0:8080]. Repeatable.
    /// Giving the same address as --listen or --https serves them all on one port.
    #[arg(long, value_name = "ADDR")]
    http: Vec<String>,
    /// Address for visitors' HTTPS, routed by SNI and passed through undecrypted. Repeatable.
    #[arg(long, value_name = "ADDR")]
    https: Vec<String>,
    /// A domain connectors may claim kites in: PROTOS:NAME:SECRET, e.g.
    /// 'http,tcp:*.example.net:SECRET'. Repeatable. Every local user can read
    /// the command line: prefer --domain-file.
    #[arg(long, value_name = "SPEC")]
    domain: Vec<String>,
    /// File of domains, one PROTOS:NAME:SECRET per line (# comments), mode
    /// 0600: the secrets stay out of the process list. Secrets need at
    /// least 12 bytes; 32 random hex digits (openssl rand -hex 16) are best.
    #[arg(long, value_name = "FILE")]
    domain_file: Option<PathBuf>,
    /// Address TCP kites' public ports bind to [default: 0.0.0.0].
    #[arg(long, value_name = "IP")]
    tcp_bind: Option<String>,
    /// Public ports TCP kites may use, LOW-HIGH [default: 1024-65535].
    #[arg(long, value_name = "RANGE")]
    tcp_ports: Option<String>,
    /// Let `CONNECT name:port` on the HTTP port reach TCP kites (only from
    /// listener addresses the kites' ports are bound to, see --tcp-bind).
    #[arg(long)]
    http_connect: bool,
    /// Directory for the self-signed certificate created on first start
    /// [default: ~/.local/state/kitepipe].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Certificate chain (PEM) to use instead of the self-signed one.
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// Private key (PEM) for --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// The relay's public host name (shown to connectors, put in the self-signed certificate).
    #[arg(long, value_name = "HOST")]
    name: Option<String>,
    /// A link silent this long is dead, e.g. 15s.
    #[arg(long, value_name = "DURATION")]
    heartbeat: Option<String>,
    /// CA certificate (PEM) connectors' certificates must chain to, e.g. the
    /// ca-cert.pem of `kitepipe ca init`. Without --domain secrets every
    /// connector must present a certificate; with them, it may.
    #[arg(long, value_name = "FILE")]
    client_ca: Option<PathBuf>,
    /// Revocation list (PEM X.509 CRL) for connectors' certificates
    /// [default: crl.pem beside --client-ca, if present]. Reread when it changes.
    #[arg(long, value_name = "FILE")]
    crl: Option<PathBuf>,
    /// A domain under which a certificate named NAME may claim NAME.DOMAIN
    /// and *.NAME.DOMAIN, e.g. example.net. Repeatable. More rights: `[[allow]]`
    /// rules in the --config file.
    #[arg(long, value_name = "DOMAIN")]
    cert_domain: Vec<String>,
    /// Let the relay's gateway run remote operations on connectors:
    /// NODES:OPS, e.g. 'ci-*,laptop:exec,fs' (OPS: exec, fs, forward, all).
    /// Repeatable; the same as `[[remote]]` rules in the --config file. The
    /// connector must also opt in with --allow-remote.
    #[arg(long, value_name = "NODES:OPS")]
    remote: Vec<String>,
    /// Threads serving links and visitors [default: half the CPU cores, at
    /// least 1]. The kernel's TCP work for the same sockets needs the rest.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
    #[command(flatten)]
    events: EventArgs,
    /// Where the gateway's owner token is written at start (mode 0600); a
    /// request needs it in X-Kitepipe-Token (kitepipe call and kitepipe
    /// remote find it) [default: STATE_DIR/gateway-token].
    #[arg(long, value_name = "FILE")]
    gateway_token_file: Option<PathBuf>,
    /// Serve /client/ and /remote/ to every local user without the owner
    /// token (the behaviour before tokens; not recommended).
    #[arg(long)]
    insecure_gateway_without_token: bool,
}

#[derive(Debug, Args)]
struct ConnectArgs {
    /// Relays to link to, HOST:PORT. Several relays: one link to each.
    #[arg(value_name = "RELAY")]
    relay: Vec<String>,
    /// TOML file with the same settings as the flags (flags win).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// A kite to serve: `PROTO:NAME[:PORT]=TARGET`, e.g. `http:blog.example.net=127.0.0.1:8000`,
    /// `https:blog.example.net=8443`, `tcp:db.example.net:15432=127.0.0.1:5432`
    /// (port 0: the relay picks). Repeatable.
    #[arg(long, value_name = "SPEC")]
    kite: Vec<String>,
    /// Shared secret of the kites' domain on the relay (never sent: it signs
    /// a challenge). Every local user can read the command line: prefer
    /// --secret-file or the environment variable KITEPIPE_SECRET.
    #[arg(long, value_name = "SECRET", conflicts_with = "secret_file")]
    secret: Option<String>,
    /// File holding the shared secret (mode 0600; surrounding whitespace
    /// ignored). Without --secret and --secret-file, KITEPIPE_SECRET is used.
    #[arg(long, value_name = "FILE")]
    secret_file: Option<PathBuf>,
    /// The relay certificate's fingerprint, as the relay printed it at start.
    /// With several relays: once for all, or once per relay in the same order.
    #[arg(long, value_name = "SHA256:HEX")]
    fingerprint: Vec<String>,
    /// CA certificate (PEM) the relay's certificate must chain to (instead of --fingerprint).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// This connector's node name; it routes events and remote operations
    /// only if proven: a certificate's name, or a name under a domain whose
    /// secret the connector holds [default: the certificate's name, else the
    /// first secret kite's name, else the host name].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// A link silent this long is dead, e.g. 15s.
    #[arg(long, value_name = "DURATION")]
    heartbeat: Option<String>,
    /// Longest wait between reconnect attempts, e.g. 15s.
    #[arg(long, value_name = "DURATION")]
    max_backoff: Option<String>,
    /// Accept remote operations from the relay (off by default): exec, fs,
    /// fs-read, forward or all, comma-separated, e.g. --allow-remote
    /// exec,fs. fs (every file operation) is as good as exec; fs-read
    /// allows read, ls and stat only. The relay's rules decide who may use
    /// them; each is logged.
    #[arg(long, value_name = "OPS")]
    allow_remote: Option<String>,
    /// Certificate identity directory from `kitepipe ca issue` (cert.pem,
    /// key.pem, ca.pem): presented to relays that ask, and its ca.pem
    /// verifies the relay when neither --fingerprint nor --ca is given.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["cert", "key"])]
    identity: Option<PathBuf>,
    /// This connector's certificate chain (PEM), instead of --identity.
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// Private key (PEM) for --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// Threads serving the links and their streams [default: 1: a link's
    /// frames pass through one reader and one writer anyway, and one thread
    /// spares them cross-thread wake-ups].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
    #[command(flatten)]
    events: EventArgs,
}

fn main() {
    let cli = Cli::parse();
    ready::enable(cli.ready_json);
    // `Targets` (level, or `target=level` directives) rather than
    // `EnvFilter`: no regex engine in the binary or compiled at start, which
    // is a good part of the code a freshly started relay or connector maps.
    let filter = cli
        .log
        .parse::<tracing_subscriber::filter::Targets>()
        .unwrap_or_else(|err| {
            eprintln!("kitepipe: ignoring --log {:?} ({err}); using info", cli.log);
            tracing_subscriber::filter::Targets::new()
                .with_default(tracing_subscriber::filter::LevelFilter::INFO)
        });
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(filter)
        .init();
    let mut builder = match runtime_threads(&cli.command) {
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
    let code = runtime.block_on(run(cli.command));
    std::process::exit(code);
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
fn runtime_threads(command: &Command) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match command {
        Command::Remote(_) | Command::Agent(_) => 1,
        Command::Connect(args) => args.threads.map_or(1, usize::from),
        Command::Relay(args) => args.threads.map_or((cores / 2).max(1), usize::from),
        Command::Call(_) | Command::Ca(_) => 1,
        Command::Demo => cores,
    }
}

async fn run(command: Command) -> i32 {
    let res = match command {
        Command::Demo => demo().await,
        Command::Relay(args) => relay(args).await,
        Command::Connect(args) => connect(args).await,
        Command::Ca(command) => ca::run(command, &|key| std::env::var(key).ok()),
        Command::Call(args) => return call(args).await,
        Command::Remote(args) => return remote::run(args).await,
        Command::Agent(args) => return remote::agent(args).await,
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
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
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

async fn relay(args: RelayArgs) -> anyhow::Result<()> {
    if !args.domain.is_empty() {
        tracing::warn!(
            "--domain puts its secret on the command line, where every local user can read it \
             (ps, /proc/PID/cmdline): use --domain-file FILE"
        );
    }
    let flags = RawRelayConfig {
        listen: args.listen,
        http: args.http,
        https: args.https,
        domain: args.domain,
        domain_file: args.domain_file,
        tcp_bind: args.tcp_bind,
        tcp_ports: args.tcp_ports,
        http_connect: args.http_connect.then_some(true),
        state_dir: args.state_dir,
        cert: args.cert,
        key: args.key,
        name: args.name,
        heartbeat: args.heartbeat,
        client_ca: args.client_ca,
        crl: args.crl,
        cert_domain: args.cert_domain,
        allow: Vec::new(),
        remote: args
            .remote
            .iter()
            .map(|text| RawRemoteRule::from_flag(text))
            .collect::<Result<_, _>>()
            .map_err(exit::usage)?,
        gateway: args.events.gateway,
        handlers: args.events.handlers,
        handler_upstream: args.events.handler_upstream,
        event_wait: args.events.event_wait,
        event_timeout: args.events.event_timeout,
        gateway_origin: args.events.gateway_origin,
        gateway_token_file: args.gateway_token_file,
        insecure_gateway_without_token: args.insecure_gateway_without_token.then_some(true),
    };
    let mut raw = match &args.config {
        Some(path) => RawRelayConfig::from_file(path)?.merge(flags.clone()),
        None => flags.clone(),
    };
    if raw.listen.is_empty() {
        raw.listen.push("0.0.0.0:8443".into());
    }
    if raw.http.is_empty() && raw.https.is_empty() {
        raw.http.push("0.0.0.0:8080".into());
    }
    if raw.state_dir.is_none() {
        raw.state_dir = Some(default_state_dir(&|key| std::env::var(key).ok()));
    }
    let mut config = RelayConfig::try_from(raw).map_err(exit::usage)?;
    if config.domains.is_empty() && config.identity.client_ca.is_none() {
        tracing::warn!("no --domain and no --client-ca given: connectors cannot claim any kite");
    }
    config.reload_from = args.config.map(|file| IdentitySource { file, flags });
    config.events.handler_env = handler_env(&|key| std::env::var(key).ok());
    let relay_has_client_ca = config.identity.client_ca.is_some();
    let relay = Relay::bind(config).await?;
    reload_on_sighup(relay.reload_trigger());
    ready::relay(&relay);
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
    relay.run(shutdown_on_signal()).await;
    Ok(())
}

async fn connect(args: ConnectArgs) -> anyhow::Result<()> {
    if args.secret.is_some() {
        tracing::warn!(
            "--secret puts the secret on the command line, where every local user can read it \
             (ps, /proc/PID/cmdline): use --secret-file FILE or KITEPIPE_SECRET"
        );
    }
    // The environment is the fallback of both flags, read here so that
    // only a secret typed on the command line is warned about.
    let secret = match (&args.secret, &args.secret_file) {
        (None, None) => std::env::var("KITEPIPE_SECRET").ok(),
        _ => args.secret,
    };
    let flags = RawConnectorConfig {
        relay: args.relay,
        kite: args.kite,
        secret,
        secret_file: args.secret_file,
        fingerprint: args.fingerprint,
        ca: args.ca,
        name: args.name,
        heartbeat: args.heartbeat,
        max_backoff: args.max_backoff,
        identity: args.identity,
        cert: args.cert,
        key: args.key,
        gateway: args.events.gateway,
        handlers: args.events.handlers,
        handler_upstream: args.events.handler_upstream,
        event_wait: args.events.event_wait,
        event_timeout: args.events.event_timeout,
        allow_remote: args.allow_remote,
        gateway_origin: args.events.gateway_origin,
    };
    let raw = match &args.config {
        Some(path) => RawConnectorConfig::from_file(path)?.merge(flags),
        None => flags,
    };
    let mut config = ConnectorConfig::try_from(raw).map_err(exit::usage)?;
    config.events.handler_env = handler_env(&|key| std::env::var(key).ok());
    if let Some(path) = &args.config {
        // Relayed file operations never reach the config file.
        let file = (path.clone(), "the config file".to_string());
        config.remote_fs.protected.push(file);
    }
    if config.kites.is_empty() && config.events.gateway.is_none() {
        tracing::warn!("no --kite and no gateway: the connector links but serves nothing");
    }
    let relays = config.relays.iter().map(|r| r.addr.clone()).collect();
    let connector = Connector::new(config).context("connector setup")?;
    ready::connector(&connector, relays);
    println!("kitepipe connector starting");
    if let Some(gateway) = connector.gateway() {
        println!("  gateway on {gateway}");
    }
    connector.run(shutdown_on_signal()).await;
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
