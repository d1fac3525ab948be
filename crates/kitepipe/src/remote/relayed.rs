//! Sessions with connectors through a relay: the client side of
//! `/remote/NODE` on the relay's gateway.
//!
//! [`Session::via_gateway`] connects to the gateway (TCP on loopback or a
//! unix socket), asks for `GET /remote/NODE` with `Upgrade:
//! kitepipe-remote`, and after `101 Switching Protocols` runs an ordinary
//! [`Session`] over the connection: the relay speaks for the connector's
//! agent. Any other answer is the relay's refusal, returned with its
//! message.

use std::time::Duration;

use bytes::BytesMut;
use kitepipe_proto::event::TOKEN_HEADER;
use kitepipe_proto::remote::REMOTE_UPGRADE;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::connect::{ConnectError, SessionOptions};
use super::session::Session;
use crate::config::GatewayAddr;

/// Largest answer head (and refusal body) read from the gateway.
const MAX_ANSWER: usize = 64 * 1024;

impl Session {
    /// A session with the agent of connector `node`, through the relay
    /// whose gateway listens at `gateway`. `connect_timeout` bounds
    /// reaching the gateway and its answer (which includes the relay's wait
    /// for an offline node). `token` is the gateway's owner token (the
    /// relay's gateway serves its owner only), sent as
    /// [`TOKEN_HEADER`]; `kitepipe remote` finds it as `kitepipe call` does
    /// (`pipe::client::gateway_token`).
    pub async fn via_gateway(
        gateway: &GatewayAddr,
        node: &str,
        token: Option<&str>,
        options: SessionOptions,
        connect_timeout: Duration,
    ) -> Result<Session, ConnectError> {
        let addr = match gateway {
            GatewayAddr::Tcp(addr) => addr.to_string(),
            GatewayAddr::Unix(path) => format!("unix:{}", path.display()),
        };
        let unreachable = |source| ConnectError::Gateway {
            addr: addr.clone(),
            source,
        };
        let timeout = |stage| ConnectError::Timeout {
            after: connect_timeout,
            stage,
            stderr: String::new(),
        };
        match gateway {
            GatewayAddr::Tcp(sock_addr) => {
                let sock = tokio::time::timeout(
                    connect_timeout,
                    tokio::net::TcpStream::connect(sock_addr),
                )
                .await
                .map_err(|_| timeout("connecting to the relay's gateway"))?
                .map_err(unreachable)?;
                let _ = sock.set_nodelay(true);
                upgrade(sock, node, token, options, connect_timeout).await
            }
            GatewayAddr::Unix(path) => {
                let sock =
                    tokio::time::timeout(connect_timeout, tokio::net::UnixStream::connect(path))
                        .await
                        .map_err(|_| timeout("connecting to the relay's gateway"))?
                        .map_err(unreachable)?;
                upgrade(sock, node, token, options, connect_timeout).await
            }
        }
    }
}

/// Asks for the upgrade on `sock` and starts the session after a 101.
async fn upgrade<S>(
    mut sock: S,
    node: &str,
    token: Option<&str>,
    options: SessionOptions,
    deadline: Duration,
) -> Result<Session, ConnectError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let token = token
        .map(|token| format!("{}: {token}\r\n", TOKEN_HEADER))
        .unwrap_or_default();
    let request = format!(
        "GET /remote/{node} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n\
         Upgrade: {REMOTE_UPGRADE}\r\n{token}\r\n"
    );
    let answer = async {
        sock.write_all(request.as_bytes()).await?;
        let mut buf = BytesMut::with_capacity(4096);
        loop {
            if let Some(end) = find_head_end(&buf) {
                return Ok::<_, std::io::Error>((buf, end));
            }
            if buf.len() >= MAX_ANSWER || sock.read_buf(&mut buf).await? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the gateway closed the connection without a complete answer",
                ));
            }
        }
    };
    let (mut buf, end) = tokio::time::timeout(deadline, answer)
        .await
        .map_err(|_| ConnectError::Timeout {
            after: deadline,
            stage: "waiting for the relay's gateway to answer",
            stderr: String::new(),
        })?
        .map_err(|err| ConnectError::Protocol(format!("the relay's gateway: {err}")))?;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| ConnectError::Protocol(format!("not an HTTP answer: {head:.80}")))?;
    let rest = buf.split_off(end + 4);
    if status == 101 {
        return Session::start(sock, rest, options).await;
    }
    // A refusal: its JSON body says why (read what arrives within a moment).
    let mut body = rest;
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while body.len() < MAX_ANSWER {
            match sock.read_buf(&mut body).await {
                Ok(0) | Err(_) => break,
                Ok(_) if serde_json::from_slice::<serde_json::Value>(&body).is_ok() => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    let message = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|json| json.get("error")?.as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string());
    Err(ConnectError::Refused { status, message })
}

/// Index of the `\r\n\r\n` ending an HTTP head.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}
