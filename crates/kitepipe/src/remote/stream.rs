//! One operation stream shared by the task that reads its records and the
//! task that writes them, and the record reader on top.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use kitepipe_proto::remote::{AgentRecord, ClientRecord, RecordError};

use crate::link::MuxStream;

/// Most bytes taken from a stream per read: one DATA frame.
const RECV_CHUNK: usize = 64 * 1024;

/// A [`MuxStream`] shared between its reading and writing halves (the
/// stream keeps a waker per direction, so both may wait at once; the lock
/// is held only inside one poll).
#[derive(Clone)]
pub(crate) struct OpStream(Arc<Mutex<MuxStream>>);

impl OpStream {
    pub(crate) fn new(stream: MuxStream) -> OpStream {
        OpStream(Arc::new(Mutex::new(stream)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MuxStream> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The next received chunk; `None` at FIN. Cancel-safe.
    pub(crate) async fn recv(&self) -> io::Result<Option<Bytes>> {
        std::future::poll_fn(|cx| self.lock().poll_recv_chunk(cx, RECV_CHUNK)).await
    }

    /// Sends all of `data`. Not cancel-safe (a prefix may have been sent).
    pub(crate) async fn send(&self, mut data: Bytes) -> io::Result<()> {
        while !data.is_empty() {
            std::future::poll_fn(|cx| self.lock().poll_send_chunk(cx, &mut data)).await?;
        }
        Ok(())
    }

    /// Sends FIN.
    pub(crate) async fn finish(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| {
            let mut stream = self.lock();
            tokio::io::AsyncWrite::poll_shutdown(Pin::new(&mut *stream), cx)
        })
        .await
    }

    /// The stream itself, if this is the last handle on it.
    pub(crate) fn into_inner(self) -> Option<MuxStream> {
        Arc::try_unwrap(self.0)
            .ok()
            .map(|mutex| mutex.into_inner().unwrap_or_else(|p| p.into_inner()))
    }
}

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
