//! `exec` on a pseudo-terminal.

use kitepipe_proto::remote::{AgentRecord, ErrorKind, ErrorReply, ExecOp};

use super::agent::finish;
use super::stream::OpStream;

/// Runs a command on a new pseudo-terminal.
pub(crate) async fn exec(_op: ExecOp, stream: OpStream) {
    let reply = ErrorReply {
        kind: ErrorKind::Unsupported,
        errno: None,
        message: "this agent cannot allocate a terminal yet".into(),
        path: None,
    };
    finish(&stream, AgentRecord::Error(reply)).await;
}
