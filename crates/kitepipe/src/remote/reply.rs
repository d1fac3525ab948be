//! How the agent ends an operation: the last record and FIN, the typed
//! error replies built from I/O errors, and the reply to a request that
//! makes no sense. Shared by every operation (`exec`, `fs`, `forward`)
//! and the agent itself.

use std::io;
use std::time::Duration;

use kitepipe_proto::remote::{AgentRecord, ErrorKind, ErrorReply};

use super::stream::{OpStream, agent_bytes};

/// How long the agent keeps reading (and discarding) a client's input
/// after it replied, so its reply is not destroyed by a reset.
const DRAIN_AFTER_REPLY: Duration = Duration::from_secs(10);

/// Sends the last record of an operation, FIN, and drains the client's
/// remaining input until its FIN.
pub(crate) async fn finish(stream: &OpStream, last: AgentRecord) {
    if stream.send(agent_bytes(&last)).await.is_err() || stream.finish().await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(DRAIN_AFTER_REPLY, async {
        while let Ok(Some(_)) = stream.recv().await {}
    })
    .await;
}

/// Replies with an error built from an I/O error.
pub(crate) async fn fail(stream: &OpStream, err: &io::Error, what: &str, path: Option<&str>) {
    finish(stream, AgentRecord::Error(error_reply(err, what, path))).await;
}

/// The typed reply for a failed system call.
pub(crate) fn error_reply(err: &io::Error, what: &str, path: Option<&str>) -> ErrorReply {
    let kind = match err.kind() {
        io::ErrorKind::NotFound => ErrorKind::NotFound,
        io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
        io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
        io::ErrorKind::NotADirectory => ErrorKind::NotADirectory,
        io::ErrorKind::IsADirectory => ErrorKind::IsADirectory,
        io::ErrorKind::DirectoryNotEmpty => ErrorKind::DirectoryNotEmpty,
        io::ErrorKind::ConnectionRefused => ErrorKind::ConnectionRefused,
        io::ErrorKind::InvalidInput => ErrorKind::InvalidInput,
        io::ErrorKind::Unsupported => ErrorKind::Unsupported,
        _ => ErrorKind::Other,
    };
    ErrorReply {
        kind,
        errno: err.raw_os_error(),
        message: format!("{what}: {}", describe(err)),
        path: path.map(str::to_string),
    }
}

/// The text of an error without std's " (os error N)" suffix (the errno
/// travels in its own field).
fn describe(err: &io::Error) -> String {
    let text = err.to_string();
    match text.rfind(" (os error ") {
        Some(pos) if err.raw_os_error().is_some() => text[..pos].to_string(),
        _ => text,
    }
}

/// A reply for a request that makes no sense.
pub(crate) fn invalid(message: &str) -> AgentRecord {
    AgentRecord::Error(ErrorReply {
        kind: ErrorKind::InvalidInput,
        errno: None,
        message: message.to_string(),
        path: None,
    })
}
