//! The embedded default: a relay, a connector and two sample services on
//! loopback, in one process, so a new user sees kitepipe work with one
//! command. Both nodes also run their event gateways, so events can be
//! sent each way.
//!
//! Everything binds 127.0.0.1 on free ports; the relay's certificate lives
//! in a directory the caller gives (a temporary one from the CLI).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kitepipe_proto::kite::KiteProto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{
    ConnectorConfig, Domain, KiteTarget, ListenerConfig, RelayConfig, RelayTarget, RelayTlsSource,
};
use crate::connector::{Connector, ConnectorError, LinkState};
use crate::link::DEFAULT_HEARTBEAT;
use crate::pki::{Fingerprint, RelayTrust, Secret};
use crate::relay::{Relay, RelayError};

/// Name of the demo's HTTP kite. `*.localhost` resolves to loopback in curl
/// and browsers, so `http://demo.kitepipe.localhost:PORT/` works as is.
pub const DEMO_HTTP_KITE: &str = "demo.kitepipe.localhost";

/// Name of the demo's TCP kite (an echo service).
pub const DEMO_TCP_KITE: &str = "echo.kitepipe.localhost";

/// Node name of the demo's connector (events reach it as
/// `/client/laptop.kitepipe.localhost/...`): under the demo's domain, so its
/// secret proves the name (an unproven name routes nothing).
pub const DEMO_NODE: &str = "laptop.kitepipe.localhost";

/// How long the demo waits for its connector to link before giving up.
const LINK_WAIT: Duration = Duration::from_secs(10);

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The relay did not start.
    #[error("demo relay")]
    Relay(#[from] RelayError),
    /// The connector did not start.
    #[error("demo connector")]
    Connector(#[from] ConnectorError),
    /// A sample service could not bind.
    #[error("demo sample service")]
    Io(#[from] std::io::Error),
    /// The connector did not link in time.
    #[error("the demo connector did not link to the demo relay within {0:?}")]
    NotLinked(Duration),
}

/// What the demo is serving, for printing instructions.
#[derive(Debug, Clone)]
pub struct DemoInfo {
    /// Where connectors link.
    pub link_addr: SocketAddr,
    /// Where visitors send HTTP.
    pub http_addr: SocketAddr,
    /// Public port of the TCP echo kite.
    pub tcp_port: u16,
    /// Where the sample web page really listens (not reachable except through the relay in a real setup).
    pub web_addr: SocketAddr,
    /// The relay certificate's fingerprint.
    pub fingerprint: Fingerprint,
    /// The relay's event gateway (reaches the connector as `/client/laptop.kitepipe.localhost/...`).
    pub relay_gateway: Option<SocketAddr>,
    /// The connector's event gateway (reaches the relay as `/server/...`).
    pub connector_gateway: Option<SocketAddr>,
}

/// Runs the demo until `shutdown`; calls `ready` once the kites are online.
pub async fn run(
    state_dir: PathBuf,
    shutdown: CancellationToken,
    ready: impl FnOnce(&DemoInfo),
) -> Result<(), DemoError> {
    let loopback = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let secret = Secret::new(crate::link::backoff::random_token());
    // The relay's gateway serves its owner only, as a real relay's does.
    let relay_events = crate::config::EventConfig {
        gateway_token_file: Some(state_dir.join(crate::config::GATEWAY_TOKEN_FILE)),
        ..Default::default()
    };
    let relay = Relay::bind(RelayConfig {
        listeners: vec![
            ListenerConfig {
                addr: loopback(0),
                link: true,
                http: false,
                https: false,
            },
            ListenerConfig {
                addr: loopback(0),
                link: false,
                http: true,
                https: false,
            },
        ],
        domains: vec![Domain {
            protos: vec![KiteProto::Http, KiteProto::Tcp],
            pattern: "*.kitepipe.localhost".into(),
            secret: secret.clone(),
        }],
        tcp_bind: loopback(0).ip(),
        tcp_ports: (1024, 65535),
        http_connect: false,
        pagekite: false,
        tls: RelayTlsSource::StateDir(state_dir),
        name: "127.0.0.1".into(),
        heartbeat: DEFAULT_HEARTBEAT,
        identity: Default::default(),
        reload_from: None,
        events: relay_events,
        acme: None,
        tls_certs: Vec::new(),
        admin: None,
        access_log: None,
    })
    .await?;
    let listeners = relay.listeners();
    let link_addr = listeners[0].addr;
    let http_addr = listeners[1].addr;
    let fingerprint = relay.fingerprint();
    let relay_gateway = relay.gateway_addr();

    let web = TcpListener::bind(loopback(0)).await?;
    let echo = TcpListener::bind(loopback(0)).await?;
    let web_addr = web.local_addr()?;
    let echo_addr = echo.local_addr()?;
    let connector = Connector::new(ConnectorConfig {
        relays: vec![RelayTarget {
            addr: link_addr.to_string(),
            host: "127.0.0.1".into(),
            trust: RelayTrust::Pinned(fingerprint),
        }],
        kites: vec![
            KiteTarget {
                kite: kitepipe_proto::kite::KiteRef::parse(&format!("http:{DEMO_HTTP_KITE}"))
                    .expect("valid literal kite"),
                target: web_addr.to_string(),
                secret: Some(secret.clone()),
                proxy_protocol: None,
                policy: Default::default(),
                http: Default::default(),
                basic_auth_file: None,
            },
            KiteTarget {
                kite: kitepipe_proto::kite::KiteRef::parse(&format!("tcp:{DEMO_TCP_KITE}:0"))
                    .expect("valid literal kite"),
                target: echo_addr.to_string(),
                secret: Some(secret.clone()),
                proxy_protocol: None,
                policy: Default::default(),
                http: Default::default(),
                basic_auth_file: None,
            },
        ],
        name: DEMO_NODE.into(),
        heartbeat: DEFAULT_HEARTBEAT,
        max_backoff: Duration::from_secs(2),
        identity: None,
        events: Default::default(),
        allow_remote: Vec::new(),
        remote_fs: Default::default(),
        node_secret: Some(secret),
        admin: None,
    })?;
    let mut state = connector.watch(0).expect("one relay configured");
    let connector_gateway = connector.gateway_addr();

    let tracker = TaskTracker::new();
    let token = shutdown.child_token();
    tracker.spawn(relay.run(token.clone()));
    tracker.spawn(connector.run(token.clone()));
    tracker.spawn(serve_web(web, tracker.clone(), token.clone()));
    tracker.spawn(serve_echo(echo, tracker.clone(), token.clone()));

    let linked =
        tokio::time::timeout(LINK_WAIT, state.wait_for(|s| matches!(s, LinkState::Up(_)))).await;
    let online = match linked {
        Ok(Ok(state)) => state.clone(),
        _ => {
            token.cancel();
            tracker.close();
            tracker.wait().await;
            return Err(DemoError::NotLinked(LINK_WAIT));
        }
    };
    let tcp_port = match online {
        LinkState::Up(kites) => kites
            .iter()
            .find(|(k, _)| k.proto == KiteProto::Tcp)
            .map(|(k, _)| k.port)
            .unwrap_or(0),
        LinkState::Down => 0,
    };
    ready(&DemoInfo {
        link_addr,
        http_addr,
        tcp_port,
        web_addr,
        fingerprint,
        relay_gateway,
        connector_gateway,
    });
    shutdown.cancelled().await;
    token.cancel();
    tracker.close();
    tracker.wait().await;
    Ok(())
}

async fn serve_web(listener: TcpListener, tracker: TaskTracker, token: CancellationToken) {
    loop {
        let sock = tokio::select! {
            _ = token.cancelled() => return,
            res = listener.accept() => match res { Ok((sock, _)) => sock, Err(_) => continue },
        };
        let token = token.clone();
        tracker.spawn(async move {
            tokio::select! {
                _ = token.cancelled() => {}
                _ = web_connection(sock) => {}
            }
        });
    }
}

/// A tiny keep-alive HTTP/1.1 server that describes the request it got.
async fn web_connection(mut sock: TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    loop {
        let (head_len, method, path, forwarded_for, body_len, close) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let header = |name: &str| {
                        req.headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case(name))
                            .map(|h| String::from_utf8_lossy(h.value).into_owned())
                    };
                    let body_len: usize = header("content-length")
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    let close =
                        header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
                    break (
                        len,
                        req.method.unwrap_or("GET").to_string(),
                        req.path.unwrap_or("/").to_string(),
                        header("x-forwarded-for").unwrap_or_else(|| "-".into()),
                        body_len,
                        close,
                    );
                }
                Ok(httparse::Status::Partial) if buf.len() < 64 * 1024 => {
                    let mut chunk = [0u8; 4096];
                    let n = sock.read(&mut chunk).await?;
                    if n == 0 {
                        return Ok(());
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                _ => return Ok(()),
            }
        };
        // Discard the body, if any.
        let mut remaining = (head_len + body_len).saturating_sub(buf.len());
        buf.drain(..(head_len + body_len).min(buf.len()));
        while remaining > 0 {
            let mut chunk = [0u8; 8192];
            let n = sock.read(&mut chunk[..remaining.min(8192)]).await?;
            if n == 0 {
                return Ok(());
            }
            remaining -= n;
        }
        let page = format!(
            "<!doctype html><title>kitepipe demo</title>\n<h1>Hello through kitepipe!</h1>\n\
             <p>This page is served by a web server on the connector's side, reached through the relay.</p>\n\
             <pre>method: {}\npath: {}\nX-Forwarded-For: {}</pre>\n",
            escape(&method),
            escape(&path),
            escape(&forwarded_for)
        );
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\n{}\r\n{}",
            page.len(),
            if close { "Connection: close\r\n" } else { "" },
            page
        );
        sock.write_all(response.as_bytes()).await?;
        if close {
            return Ok(());
        }
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

async fn serve_echo(listener: TcpListener, tracker: TaskTracker, token: CancellationToken) {
    loop {
        let mut sock = tokio::select! {
            _ = token.cancelled() => return,
            res = listener.accept() => match res { Ok((sock, _)) => sock, Err(_) => continue },
        };
        let token = token.clone();
        tracker.spawn(async move {
            let (mut r, mut w) = sock.split();
            tokio::select! {
                _ = token.cancelled() => {}
                _ = tokio::io::copy(&mut r, &mut w) => {}
            }
        });
    }
}
