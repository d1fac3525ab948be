//! One operation stream shared by the task that reads its records and the
//! task that writes them, and the record reader on top.

use std::io;

use bytes::{Bytes, BytesMut};
use kitepipe_proto::remote::{AgentRecord, ClientRecord, RecordError};

/// An operation stream shared by its reading and writing halves.
pub(crate) type OpStream = crate::link::SharedStream;

/// Why reading records failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecvError {
    /// The stream failed (reset, or the link closed).
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The peer sent a bad record.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// FIN arrived in the middle of a record.
    #[error("stream ended in the middle of a record")]
    Truncated,
}

/// Reads records of one direction from an [`OpStream`].
pub(crate) struct RecordReader {
    stream: OpStream,
    buf: BytesMut,
}

impl RecordReader {
    pub(crate) fn new(stream: OpStream) -> RecordReader {
        RecordReader {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// The next record from a client; `None` at a clean FIN. Cancel-safe.
    pub(crate) async fn next_client(&mut self) -> Result<Option<ClientRecord>, RecvError> {
        loop {
            if let Some(record) = ClientRecord::decode(&mut self.buf)? {
                return Ok(Some(record));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// The next record from an agent; `None` at a clean FIN. Cancel-safe.
    pub(crate) async fn next_agent(&mut self) -> Result<Option<AgentRecord>, RecvError> {
        loop {
            if let Some(record) = AgentRecord::decode(&mut self.buf)? {
                return Ok(Some(record));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// Bytes received beyond the last record (a stream that switches to raw
    /// bytes hands them on first).
    pub(crate) fn into_leftover(self) -> BytesMut {
        self.buf
    }

    /// Reads more; false at FIN with nothing pending.
    async fn fill(&mut self) -> Result<bool, RecvError> {
        match self.stream.recv().await? {
            Some(chunk) => {
                if self.buf.is_empty() {
                    self.buf = BytesMut::from(chunk);
                } else {
                    self.buf.extend_from_slice(&chunk);
                }
                Ok(true)
            }
            None if self.buf.is_empty() => Ok(false),
            None => Err(RecvError::Truncated),
        }
    }
}

/// Encodes one record into a buffer ready to send.
pub(crate) fn agent_bytes(record: &AgentRecord) -> Bytes {
    let mut buf = BytesMut::new();
    record.encode(&mut buf);
    buf.freeze()
}

/// Encodes one record into a buffer ready to send.
pub(crate) fn client_bytes(record: &ClientRecord) -> Bytes {
    let mut buf = BytesMut::new();
    record.encode(&mut buf);
    buf.freeze()
}
