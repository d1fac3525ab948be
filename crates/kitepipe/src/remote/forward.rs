//! Port forwarding: the agent's `connect`, and the client's listener that
//! opens one `connect` stream per accepted connection.

use kitepipe_proto::remote::{AgentRecord, ConnectOp};
use tokio::net::TcpStream;
use tracing::debug;

use super::reply::{error_reply, finish};
use super::stream::{OpStream, agent_bytes};

/// How long the agent waits for a forwarded connection to be accepted.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Connects to the target, says `Done`, then copies raw bytes both ways.
pub(crate) async fn connect(op: ConnectOp, stream: OpStream) {
    let target = format!("{}:{}", op.host, op.port);
    let res = tokio::time::timeout(
        CONNECT_TIMEOUT,
        TcpStream::connect((op.host.as_str(), op.port)),
    )
    .await;
    let mut sock = match res {
        Ok(Ok(sock)) => sock,
        Ok(Err(err)) => {
            let reply = error_reply(&err, &format!("cannot connect to {target}"), None);
            return finish(&stream, AgentRecord::Error(reply)).await;
        }
        Err(_) => {
            let err = std::io::Error::from(std::io::ErrorKind::TimedOut);
            let reply = error_reply(&err, &format!("cannot connect to {target}"), None);
            return finish(&stream, AgentRecord::Error(reply)).await;
        }
    };
    let _ = sock.set_nodelay(true);
    let done = AgentRecord::Done(bytes::Bytes::from_static(b"{}"));
    if stream.send(agent_bytes(&done)).await.is_err() {
        return;
    }
    // The client sends nothing before it has read `Done`, so no record
    // bytes are buffered here: the stream is raw from now on.
    let Some(mut mux_stream) = stream.into_inner() else {
        return;
    };
    match crate::tunnel::splice_stream(&mut sock, &mut mux_stream).await {
        Ok((up, down)) => debug!(%target, up, down, "forwarded connection closed"),
        Err(err) => debug!(%target, %err, "forwarded connection failed"),
    }
}
