//! The link's own TLS 1.3 record layer, used once rustls has finished the
//! handshake.
//!
//! rustls copies every record's plaintext twice on the receiving side (into
//! its deframer buffer, then out of its plaintext queue) and once more on
//! the sending side, and writes each record with its own slice. On a bulk
//! link those copies were 15–20% of the receiving end's CPU. Here the
//! ciphertext is decrypted in place in the buffer it was read into, copied
//! once into the reader's buffer, and the sending side encrypts in place in
//! one buffer that goes out in one `write`.
//!
//! How a link gets here ([`LinkIo::after_handshake`]): both ends offer the
//! ALPN [`ALPN_LINK`](crate::pki::ALPN_LINK) (`kitepipe/3`), rustls runs the
//! whole handshake over a [`ReadAhead`] that never hands rustls bytes past
//! the end of the current record, and then rustls gives up the traffic keys
//! and sequence numbers (`dangerous_extract_secrets`), and the traffic
//! secrets they came from wait in [`secrets`](super::secrets) (rustls's
//! key log). Nothing it read is
//! lost: rustls has consumed whole records only, the rest is still in the
//! `ReadAhead` buffer, and plaintext or records rustls still held are
//! carried over. The records on the wire stay genuine TLS 1.3 records under
//! the negotiated keys, so an alert the peer's rustls sends after the
//! handshake (a refused client certificate) is read here as the same typed
//! error rustls would report. A peer offering only `kitepipe/1` keeps rustls
//! for the whole link.
//!
//! Keys wear out: AES-GCM must not seal more than about 2^24.5 full records
//! under one key (RFC 8446 §5.5). Every [`REKEY_AFTER`] records a sender
//! sends a TLS `KeyUpdate` message (update_not_requested) and moves to the
//! next generation of TLS 1.3's own key schedule (§7.2): the next traffic
//! secret is HKDF-Expand-Label(secret, "traffic upd", "", Hash.length), its
//! key and IV come from it by the labels "key" and "iv". A peer's
//! `KeyUpdate` with update_requested is answered with one of ours before
//! our next record (several requests while we are silent get one answer;
//! our answers never request, so two ends cannot ping-pong updates).
//!
//! What a peer may send after the handshake, as RFC 8446 §4.6 and §5 say:
//! records of outer type application_data only (change_cipher_spec and
//! anything else is refused), ciphertext up to 2^14 + 256 bytes and inner
//! plaintext (content, type, padding) up to 2^14 + 1, a content type in
//! every record, alerts of exactly two bytes, no empty handshake or alert
//! records, handshake messages that may span records but not interleave
//! with other types and not cross a key change, and only `KeyUpdate` (and
//! `NewSessionTicket` to a client: a server never receives one). A refusal
//! ends the link with the RFC's alert (when the link's writer shuts down).
//!
//! Files: this one holds the constants of RFC 8446, [`RecordError`],
//! [`RecordStream`] and its split halves, and [`LinkIo`]; `keys` holds one
//! direction's keys and their key schedule; `opener` the receiving half
//! (reading, decrypting, post-handshake messages, read buffers); `sealer`
//! the sending half (encrypting in place, key updates, alerts).

mod keys;
mod opener;
mod sealer;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8};
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::io::{ChunkSource, ReadAhead, ReadChunks};
use keys::Keys;
use opener::Opener;
use sealer::Sealer;

/// Largest plaintext of one record (RFC 8446 §5.1).
pub(crate) const MAX_PLAINTEXT: usize = 16 * 1024;

/// Record header: content type, legacy version, length.
const HEADER_LEN: usize = 5;

/// AEAD tag length of every TLS 1.3 cipher suite.
const TAG_LEN: usize = 16;

/// Largest ciphertext of one record (RFC 8446 §5.2).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;

/// Largest inner plaintext of one record: content, content type and
/// padding together (RFC 8446 §5.4).
const MAX_INNER_PLAINTEXT: usize = MAX_PLAINTEXT + 1;

/// Largest post-handshake message accepted, as rustls does: a
/// NewSessionTicket's ticket and extensions fit easily.
const MAX_HANDSHAKE_MESSAGE: usize = 0xffff;

const CONTENT_CHANGE_CIPHER_SPEC: u8 = 20;
const CONTENT_ALERT: u8 = 21;
const CONTENT_HANDSHAKE: u8 = 22;
const CONTENT_APPLICATION_DATA: u8 = 23;

const HANDSHAKE_NEW_SESSION_TICKET: u8 = 4;
const HANDSHAKE_KEY_UPDATE: u8 = 24;

/// KeyUpdate's request_update values (RFC 8446 §4.6.3).
const UPDATE_NOT_REQUESTED: u8 = 0;
const UPDATE_REQUESTED: u8 = 1;

/// Alert descriptions sent when a peer breaks the record layer.
const ALERT_CLOSE_NOTIFY: u8 = 0;
const ALERT_UNEXPECTED_MESSAGE: u8 = 10;
const ALERT_BAD_RECORD_MAC: u8 = 20;
const ALERT_RECORD_OVERFLOW: u8 = 22;
const ALERT_ILLEGAL_PARAMETER: u8 = 47;
const ALERT_DECODE_ERROR: u8 = 50;
const ALERT_USER_CANCELED: u8 = 90;

/// Records sealed under one key generation before the sender moves on to
/// the next: far below AES-GCM's limit of 2^24.5 full-size records.
pub(crate) const REKEY_AFTER: u64 = 1 << 23;

/// Read buffer of a split reader, whose chunks share it: a new one is
/// needed only every few reads.
const SPLIT_CHUNK: usize = 256 * 1024;

/// Read buffers kept alive by plaintext handed out of them (a stream's
/// queued chunk holds its whole buffer) beyond which the reader hands out
/// copies instead, until they are let go: 64 of 256 KiB, 16 MiB per link.
/// A working link pins a few (its streams' consumers keep up); a peer
/// that spaces small DATA frames for a stream nobody reads over many
/// buffers would otherwise pin memory without bound.
pub(crate) const MAX_PINNED_BUFFERS: usize = 64;

/// The read buffer is kept after it drains only if the last socket read was
/// at least this large (a busy link); idle links hold no buffer.
const KEEP_AFTER: usize = 8 * 1024;

/// Why the record layer gave up on a link.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RecordError {
    /// A record's header is not a TLS 1.3 application-data record header.
    #[error("malformed record header (type {0}, version {1:#06x})")]
    BadHeader(u8, u16),
    /// A change_cipher_spec record after the handshake (RFC 8446 §5).
    #[error("change_cipher_spec record after the handshake")]
    ChangeCipherSpec,
    /// An empty record of a type that must carry something (handshake,
    /// alert).
    #[error("empty record of content type {0}")]
    Empty(u8),
    /// An alert or handshake message that does not parse.
    #[error("malformed message (content type {0})")]
    Malformed(u8),
    /// A handshake message split across records was interrupted by a
    /// record of another type.
    #[error("handshake message interleaved with another record type")]
    Interleaved,
    /// A key update not at the end of its record (RFC 8446 §5.1).
    #[error("key update not aligned with the end of its record")]
    KeyUpdateNotAligned,
    /// A key update with a request_update other than 0 or 1.
    #[error("key update with request_update {0}")]
    BadKeyUpdate(u8),
    /// A NewSessionTicket from the client (only servers send them).
    #[error("new_session_ticket from the client")]
    ClientTicket,
    /// A record is larger than TLS allows.
    #[error("record of {0} bytes exceeds the TLS limit")]
    Oversized(usize),
    /// A record failed authentication: corrupted or forged on the way.
    #[error("record failed authentication (corrupted or forged)")]
    Forged,
    /// A decrypted record has no content type.
    #[error("record without a content type")]
    NoContentType,
    /// The peer sent a message the link does not accept after the handshake.
    #[error("unexpected message after the handshake (content type {0})")]
    Unexpected(u8),
    /// A handshake message after the handshake that is not a key update.
    #[error("unexpected post-handshake message (type {0})")]
    UnexpectedHandshake(u8),
    /// The connection ended without the peer's close_notify.
    #[error("peer closed the connection without close_notify")]
    Truncated,
    /// The negotiated cipher suite is not one this layer implements.
    #[error("unsupported cipher suite for the link record layer")]
    UnsupportedSuite,
    /// The peer sent a fatal alert (as rustls reports it, so the
    /// connector's hints about refused certificates still apply).
    #[error("{0}")]
    Alert(#[source] rustls::Error),
    /// rustls refused to hand the session over.
    #[error("cannot take the session over from rustls: {0}")]
    Handover(#[source] rustls::Error),
    /// Taking over what rustls still held (records to send, plaintext not
    /// read yet) failed.
    #[error("cannot take the session over from rustls: {0}")]
    HandoverIo(#[source] Arc<io::Error>),
    /// rustls's key log holds no traffic secret for the session.
    #[error(
        "cannot take the session over from rustls: the session's traffic secret was not logged"
    )]
    SecretNotLogged,
    /// The logged traffic secret does not derive the keys rustls handed over.
    #[error(
        "cannot take the session over from rustls: \
         the logged traffic secret does not derive the session's keys"
    )]
    SecretMismatch,
}

impl RecordError {
    /// The alert RFC 8446 says to end the connection with, if any.
    fn alert(&self) -> Option<u8> {
        Some(match self {
            RecordError::Oversized(_) => ALERT_RECORD_OVERFLOW,
            RecordError::Forged => ALERT_BAD_RECORD_MAC,
            RecordError::Malformed(_) => ALERT_DECODE_ERROR,
            RecordError::BadKeyUpdate(_) => ALERT_ILLEGAL_PARAMETER,
            RecordError::BadHeader(..)
            | RecordError::ChangeCipherSpec
            | RecordError::Empty(_)
            | RecordError::NoContentType
            | RecordError::Unexpected(_)
            | RecordError::UnexpectedHandshake(_)
            | RecordError::Interleaved
            | RecordError::KeyUpdateNotAligned
            | RecordError::ClientTicket => ALERT_UNEXPECTED_MESSAGE,
            RecordError::Truncated
            | RecordError::UnsupportedSuite
            | RecordError::Alert(_)
            | RecordError::Handover(_)
            | RecordError::HandoverIo(_)
            | RecordError::SecretNotLogged
            | RecordError::SecretMismatch => return None,
        })
    }
}

/// What the receiving half tells the sending half.
#[derive(Debug, Default)]
struct Signals {
    /// The peer asked for a key update: send ours before the next record.
    answer_update: AtomicBool,
    /// The peer broke the record layer: the alert to close with (0: none).
    alert: AtomicU8,
}

impl From<RecordError> for io::Error {
    fn from(err: RecordError) -> io::Error {
        let kind = match err {
            RecordError::Truncated => io::ErrorKind::UnexpectedEof,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, err)
    }
}

/// A byte stream under the link's own record layer (see the module doc).
pub struct RecordStream<S> {
    /// The transport (shared by both directions) and the sending half.
    w: RecordWriter<S>,
    rx: Opener,
}

impl<S> std::fmt::Debug for RecordStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordStream")
            .field("rx", &(self.rx.keys.generation, self.rx.keys.seq))
            .field("tx", &(self.w.tx.keys.generation, self.w.tx.keys.seq))
            .finish()
    }
}

impl<S> RecordStream<S> {
    /// Takes a finished rustls session over from its connection `conn` and
    /// the transport it ran on.
    pub(crate) fn take_over(
        mut conn: rustls::Connection,
        io: ReadAhead<S>,
    ) -> Result<RecordStream<S>, RecordError> {
        let is_client = matches!(conn, rustls::Connection::Client(_));
        // Records rustls still wants to send go out first.
        let mut wbuf = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut wbuf)
                .map_err(|err| RecordError::HandoverIo(Arc::new(err)))?;
        }
        // Plaintext rustls decrypted and nobody read yet.
        let mut carried = BytesMut::new();
        let mut chunk = [0u8; 4096];
        loop {
            match io::Read::read(&mut conn.reader(), &mut chunk) {
                Ok(0) => break,
                Ok(n) => carried.extend_from_slice(&chunk[..n]),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) => return Err(RecordError::HandoverIo(Arc::new(err))),
            }
        }
        let extracted = conn
            .dangerous_extract_secrets()
            .map_err(RecordError::Handover)?;
        let (rbuf, inner) = io.into_parts();
        let signals = Arc::new(Signals::default());
        Ok(RecordStream {
            w: RecordWriter {
                sock: inner,
                tx: Sealer {
                    keys: Keys::new(extracted.tx.1, extracted.tx.0)?,
                    wbuf: BytesMut::from(&wbuf[..]),
                    close_sent: false,
                    rekey_after: REKEY_AFTER,
                    signals: signals.clone(),
                },
            },
            rx: Opener::new(
                Keys::new(extracted.rx.1, extracted.rx.0)?,
                rbuf,
                carried,
                is_client,
                signals,
            ),
        })
    }

    #[cfg(test)]
    fn set_rekey_after(&mut self, records: u64) {
        self.w.tx.rekey_after = records;
    }
}

impl RecordStream<tokio::net::TcpStream> {
    /// Splits the stream into a reader and a writer that work on their own,
    /// with no lock between them.
    pub(crate) fn into_split(self) -> (RecordReader, RecordWriter) {
        let (read, write) = self.w.sock.into_split();
        (
            RecordReader {
                sock: read,
                rx: self.rx,
            },
            RecordWriter {
                sock: write,
                tx: self.w.tx,
            },
        )
    }
}

/// The reading half of a split [`RecordStream`]: a [`ChunkSource`] handing
/// out each record's plaintext where it was decrypted.
pub(crate) struct RecordReader {
    sock: tokio::net::tcp::OwnedReadHalf,
    rx: Opener,
}

/// The sending half of a record layer over `W`: the writing half of a
/// split [`RecordStream`], or inside an unsplit one.
pub(crate) struct RecordWriter<W = tokio::net::tcp::OwnedWriteHalf> {
    sock: W,
    tx: Sealer,
}

impl ChunkSource for RecordReader {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<BytesMut>>> {
        self.rx.poll_chunk(&mut self.sock, cx)
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for RecordWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.tx
            .poll_write_vectored(&mut this.sock, cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.tx.poll_write_vectored(&mut this.sock, cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.tx.poll_flush(&mut this.sock, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.tx.poll_shutdown(&mut this.sock, cx)
    }
}

fn record_header(ct_len: usize) -> [u8; HEADER_LEN] {
    let len = u16::try_from(ct_len).expect("record length fits in 16 bits");
    let [hi, lo] = len.to_be_bytes();
    [CONTENT_APPLICATION_DATA, 3, 3, hi, lo]
}

impl<S: AsyncRead + Unpin> AsyncRead for RecordStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.rx.poll_read(&mut this.w.sock, cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RecordStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().w).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().w).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().w).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().w).poll_shutdown(cx)
    }
}

/// The transport of a TLS link after its handshake: this module's record
/// layer when both ends speak `kitepipe/3`, rustls otherwise.
#[derive(Debug)]
pub enum LinkIo<S> {
    /// The link's own record layer.
    Records(Box<RecordStream<S>>),
    /// rustls for the whole link (a peer offering only `kitepipe/1`).
    Tls(Box<tokio_rustls::TlsStream<ReadAhead<S>>>),
}

impl LinkIo<tokio::net::TcpStream> {
    /// The reader and writer the link's multiplexer runs on
    /// ([`Mux::start_parts`](super::Mux::start_parts)).
    pub fn into_mux_parts(self) -> (Box<dyn ChunkSource>, Box<dyn AsyncWrite + Send + Unpin>) {
        match self {
            LinkIo::Records(records) => {
                let (reader, writer) = records.into_split();
                (Box::new(reader), Box::new(writer))
            }
            LinkIo::Tls(tls) => {
                let (reader, writer) = tokio::io::split(*tls);
                (Box::new(ReadChunks::new(reader)), Box::new(writer))
            }
        }
    }
}

impl<S> LinkIo<S> {
    /// Picks the transport for a finished handshake: takes the session over
    /// from rustls if both ends chose [`ALPN_LINK`](crate::pki::ALPN_LINK).
    pub fn after_handshake(
        tls: tokio_rustls::TlsStream<ReadAhead<S>>,
    ) -> Result<LinkIo<S>, RecordError> {
        if tls.get_ref().1.alpn_protocol() != Some(crate::pki::ALPN_LINK) {
            let mut tls = tls;
            tls.get_mut().0.set_records_only(false);
            return Ok(LinkIo::Tls(Box::new(tls)));
        }
        let (io, conn) = match tls {
            tokio_rustls::TlsStream::Client(tls) => {
                let (io, conn) = tls.into_inner();
                (io, rustls::Connection::Client(conn))
            }
            tokio_rustls::TlsStream::Server(tls) => {
                let (io, conn) = tls.into_inner();
                (io, rustls::Connection::Server(conn))
            }
        };
        Ok(LinkIo::Records(Box::new(RecordStream::take_over(
            conn, io,
        )?)))
    }
}

macro_rules! delegate {
    ($self:ident, $io:ident => $call:expr) => {
        match $self.get_mut() {
            LinkIo::Records($io) => {
                let $io = Pin::new(&mut **$io);
                $call
            }
            LinkIo::Tls($io) => {
                let $io = Pin::new(&mut **$io);
                $call
            }
        }
    };
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for LinkIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_read(cx, buf))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for LinkIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            LinkIo::Records(io) => io.is_write_vectored(),
            LinkIo::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests;
