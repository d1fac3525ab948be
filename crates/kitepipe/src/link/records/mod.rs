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
//! secrets they came from wait in [`secrets`] (rustls's
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

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use bytes::{Buf, BufMut, BytesMut};
use ring::aead;
use rustls::ConnectionTrafficSecrets;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::io::{ChunkSource, PinnedBuffers, ReadAhead, ReadChunks};
use super::secrets::{self, TrafficSecret};

/// Largest plaintext of one record (RFC 8446 §5.1).
pub const MAX_PLAINTEXT: usize = 16 * 1024;

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
pub const REKEY_AFTER: u64 = 1 << 23;

/// Read buffer of a split reader, whose chunks share it: a new one is
/// needed only every few reads.
const SPLIT_CHUNK: usize = 256 * 1024;

/// Small reads in a row after which a split reader that was busy gives its
/// buffers back (a bulk transfer has small reads now and then; an idle
/// link's pings come every few seconds).
const QUIET_READS: u8 = 16;

/// Earlier read buffers a busy split reader keeps for reuse.
const RETIRED_BUFFERS: usize = 4;

/// Read buffers kept alive by plaintext handed out of them (a stream's
/// queued chunk holds its whole buffer) beyond which the reader hands out
/// copies instead, until they are let go: 64 of 256 KiB, 16 MiB per link.
/// A working link pins a few (its streams' consumers keep up); a peer
/// that spaces small DATA frames for a stream nobody reads over many
/// buffers would otherwise pin memory without bound.
pub const MAX_PINNED_BUFFERS: usize = 64;

/// The read buffer is kept after it drains only if the last socket read was
/// at least this large (a busy link); idle links hold no buffer.
const KEEP_AFTER: usize = 8 * 1024;

/// Sealed bytes held before `poll_write` waits for the socket: one mux
/// batch (256 KiB) plus record overhead goes out in one write.
const WRITE_LIMIT: usize = 288 * 1024;

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
    Handover(String),
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
            | RecordError::Handover(_) => return None,
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

/// One direction's keys: the AEAD key, the IV, the next sequence number,
/// and the traffic secret they come from (and the next generation).
struct Keys {
    algorithm: &'static aead::Algorithm,
    key: aead::LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
    secret: TrafficSecret,
    /// Key updates so far.
    generation: u64,
}

impl Keys {
    /// The keys rustls extracted (`extracted`, next sequence number `seq`)
    /// with the traffic secret they were derived from, which rustls's key
    /// log kept (see [`secrets`]): refused unless the secret derives
    /// exactly these keys.
    fn new(extracted: ConnectionTrafficSecrets, seq: u64) -> Result<Keys, RecordError> {
        let (algorithm, key, iv) = match extracted {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(RecordError::UnsupportedSuite),
        };
        let secret = secrets::take(iv.as_ref()).ok_or_else(|| {
            RecordError::Handover("the session's traffic secret was not logged".into())
        })?;
        let keys = Keys::from_secret(algorithm, secret, seq)?;
        let mut derived = [0u8; 32];
        let derived = &mut derived[..algorithm.key_len()];
        keys.secret.expand_label(b"key", derived);
        if derived != key.as_ref() || keys.iv[..] != *iv.as_ref() {
            return Err(RecordError::Handover(
                "the logged traffic secret does not derive the session's keys".into(),
            ));
        }
        Ok(keys)
    }

    /// The keys of `secret` (RFC 8446 §7.3), starting at sequence `seq`.
    fn from_secret(
        algorithm: &'static aead::Algorithm,
        secret: TrafficSecret,
        seq: u64,
    ) -> Result<Keys, RecordError> {
        let mut key = [0u8; 32];
        let key = &mut key[..algorithm.key_len()];
        secret.expand_label(b"key", key);
        let key =
            aead::UnboundKey::new(algorithm, key).map_err(|_| RecordError::UnsupportedSuite)?;
        Ok(Keys {
            algorithm,
            key: aead::LessSafeKey::new(key),
            iv: secret.iv(),
            seq,
            secret,
            generation: 0,
        })
    }

    /// The nonce of the next record (RFC 8446 §5.3); advances the sequence.
    fn next_nonce(&mut self) -> aead::Nonce {
        let mut nonce = self.iv;
        for (byte, seq) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *byte ^= seq;
        }
        self.seq += 1;
        aead::Nonce::assume_unique_for_key(nonce)
    }

    /// Moves to the next generation of the key schedule (RFC 8446 §7.2);
    /// the sequence number starts again at 0.
    fn rekey(&mut self) {
        let generation = self.generation + 1;
        *self = Keys::from_secret(self.algorithm, self.secret.next(), 0)
            .expect("a key of the algorithm's length");
        self.generation = generation;
    }
}

/// A byte stream under the link's own record layer (see the module doc).
pub struct RecordStream<S> {
    /// The transport (shared by both directions) and the sending half.
    w: RecordWriter<S>,
    rx: Opener,
}

/// The receiving half of a record layer: keys and the read buffer.
struct Opener {
    keys: Keys,
    /// Bytes read from the socket: the record at the front may already be
    /// decrypted (then `plain` says where its plaintext is).
    rbuf: BytesMut,
    /// Plaintext of the decrypted front record: start and end offsets in
    /// `rbuf`, and where that record ends.
    plain: (usize, usize),
    record_end: usize,
    /// Plaintext taken out of the stream and not handed out yet: what
    /// rustls had decrypted at the handover, or the rest of a record a read
    /// did not take.
    carried: BytesMut,
    /// Bytes the last socket read returned.
    last_read: usize,
    /// The peer sent close_notify: reads return end of stream.
    read_closed: bool,
    /// Reading failed for good: every later read reports this.
    failed: Option<RecordError>,
    /// Earlier read buffers, empty, kept for reuse once the chunks handed
    /// out of them are dropped.
    retired: Vec<BytesMut>,
    /// Earlier read buffers no longer kept for reuse, while plaintext
    /// handed out of them may still hold them: counted against
    /// [`MAX_PINNED_BUFFERS`], past which plaintext goes out as copies.
    pinned: PinnedBuffers,
    /// Size of `rbuf`'s allocation (a lower bound).
    rbuf_alloc: usize,
    /// Small reads in a row: a busy link that went quiet gives its
    /// buffers back after [`QUIET_READS`].
    quiet_reads: u8,
    /// The start of a handshake message whose rest is in the next record.
    handshake: BytesMut,
    /// This end is the TLS client (it may receive NewSessionTickets).
    is_client: bool,
    signals: Arc<Signals>,
}

/// The sending half of a record layer: keys and the sealed records not
/// yet written.
struct Sealer {
    keys: Keys,
    wbuf: BytesMut,
    close_sent: bool,
    rekey_after: u64,
    signals: Arc<Signals>,
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
    pub fn take_over(
        mut conn: rustls::Connection,
        io: ReadAhead<S>,
    ) -> Result<RecordStream<S>, RecordError> {
        let is_client = matches!(conn, rustls::Connection::Client(_));
        let handover = |err: &dyn std::fmt::Display| RecordError::Handover(err.to_string());
        // Records rustls still wants to send go out first.
        let mut wbuf = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut wbuf).map_err(|e| handover(&e))?;
        }
        // Plaintext rustls decrypted and nobody read yet.
        let mut carried = BytesMut::new();
        let mut chunk = [0u8; 4096];
        loop {
            match io::Read::read(&mut conn.reader(), &mut chunk) {
                Ok(0) => break,
                Ok(n) => carried.extend_from_slice(&chunk[..n]),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) => return Err(handover(&err)),
            }
        }
        let extracted = conn.dangerous_extract_secrets().map_err(|e| handover(&e))?;
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
    pub fn into_split(self) -> (RecordReader, RecordWriter) {
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
pub struct RecordReader {
    sock: tokio::net::tcp::OwnedReadHalf,
    rx: Opener,
}

/// The sending half of a record layer over `W`: the writing half of a
/// split [`RecordStream`], or inside an unsplit one.
pub struct RecordWriter<W = tokio::net::tcp::OwnedWriteHalf> {
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

impl Sealer {
    /// Starts a record at the end of `wbuf` (a key update first when the
    /// key is due); returns where it starts, for [`Self::finish_record`].
    fn begin_record(&mut self) -> usize {
        // A requested update is owed either way: a due one answers it too
        // (checked first, so that it is not answered again a record later).
        let requested = self.signals.answer_update.load(Ordering::Relaxed)
            && self.signals.answer_update.swap(false, Ordering::Relaxed);
        if requested || self.keys.seq >= self.rekey_after {
            // Ours never requests one back: no update ping-pong.
            self.send_key_update(UPDATE_NOT_REQUESTED);
        }
        self.begin_plain_record()
    }

    /// Sends a KeyUpdate under the current key and moves to the next:
    /// everything after it goes under the new one.
    fn send_key_update(&mut self, request_update: u8) {
        let start = self.begin_plain_record();
        self.wbuf
            .put_slice(&[HANDSHAKE_KEY_UPDATE, 0, 0, 1, request_update]);
        self.finish_record(start, CONTENT_HANDSHAKE);
        self.keys.rekey();
    }

    fn begin_plain_record(&mut self) -> usize {
        self.wbuf.reserve(HEADER_LEN + MAX_PLAINTEXT + 1 + TAG_LEN);
        let start = self.wbuf.len();
        self.wbuf.put_slice(&[0; HEADER_LEN]);
        start
    }

    /// Seals the record started at `start`: its plaintext is everything
    /// after the header.
    fn finish_record(&mut self, start: usize, content_type: u8) {
        self.wbuf.put_u8(content_type);
        self.seal_record(start);
    }

    /// Seals the record started at `start` whose inner plaintext (content,
    /// type, padding) is everything after the header.
    fn seal_record(&mut self, start: usize) {
        let body = start + HEADER_LEN;
        let header = record_header(self.wbuf.len() - body + TAG_LEN);
        self.wbuf[start..body].copy_from_slice(&header);
        let nonce = self.keys.next_nonce();
        let tag = self
            .keys
            .key
            .seal_in_place_separate_tag(nonce, aead::Aad::from(header), &mut self.wbuf[body..])
            .expect("record length is within the AEAD limit");
        self.wbuf.put_slice(tag.as_ref());
    }

    /// Seals records holding up to `budget` bytes from `bufs`; returns how
    /// many it took.
    fn seal_from(&mut self, bufs: &[io::IoSlice<'_>], budget: usize) -> usize {
        let mut slices = bufs.iter().map(|b| &b[..]);
        let mut current: &[u8] = &[];
        let mut taken = 0;
        while taken < budget {
            let start = self.begin_record();
            let mut in_record = 0;
            while in_record < MAX_PLAINTEXT && taken < budget {
                if current.is_empty() {
                    match slices.next() {
                        Some(next) => current = next,
                        None => break,
                    }
                    continue;
                }
                let n = current
                    .len()
                    .min(MAX_PLAINTEXT - in_record)
                    .min(budget - taken);
                self.wbuf.put_slice(&current[..n]);
                current = &current[n..];
                in_record += n;
                taken += n;
            }
            self.finish_record(start, CONTENT_APPLICATION_DATA);
        }
        taken
    }

    /// Writes sealed records until none is left.
    fn poll_write_out<S: AsyncWrite + Unpin>(
        &mut self,
        sock: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        let mut written = 0;
        while !self.wbuf.is_empty() {
            let n = ready!(Pin::new(&mut *sock).poll_write(cx, &self.wbuf))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wbuf.advance(n);
            written += n;
        }
        if written < KEEP_AFTER {
            // A small batch: the link is not busy; hold no buffer.
            self.wbuf = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_write_vectored<S: AsyncWrite + Unpin>(
        &mut self,
        sock: &mut S,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.close_sent {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after close_notify",
            )));
        }
        if self.wbuf.len() >= WRITE_LIMIT {
            ready!(self.poll_write_out(sock, cx))?;
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let budget = total.min(
            WRITE_LIMIT
                .saturating_sub(self.wbuf.len())
                .max(MAX_PLAINTEXT),
        );
        Poll::Ready(Ok(self.seal_from(bufs, budget)))
    }

    fn poll_flush<S: AsyncWrite + Unpin>(
        &mut self,
        sock: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        ready!(self.poll_write_out(sock, cx))?;
        Pin::new(sock).poll_flush(cx)
    }

    fn poll_shutdown<S: AsyncWrite + Unpin>(
        &mut self,
        sock: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.close_sent {
            // A fatal alert if the peer broke the record layer, else
            // close_notify.
            let alert = match self.signals.alert.load(Ordering::Relaxed) {
                ALERT_CLOSE_NOTIFY => [1, ALERT_CLOSE_NOTIFY],
                fatal => [2, fatal],
            };
            let start = self.begin_record();
            self.wbuf.put_slice(&alert);
            self.finish_record(start, CONTENT_ALERT);
            self.close_sent = true;
        }
        ready!(self.poll_write_out(sock, cx))?;
        Pin::new(sock).poll_shutdown(cx)
    }
}

impl Opener {
    /// Moves the partial record at the end of the read buffer into a
    /// buffer with room. Chunks handed out share the read buffer, so it can
    /// only be reused once they are all dropped: a few earlier buffers are
    /// kept and reused when they are free again (no page faults for fresh
    /// memory on a busy link), large ones make the partial-record copy rare.
    fn next_buffer(&mut self) {
        let want = if self.last_read >= KEEP_AFTER || !self.retired.is_empty() {
            SPLIT_CHUNK
        } else {
            2 * (MAX_CIPHERTEXT + HEADER_LEN)
        };
        if self.rbuf.try_reclaim(want) {
            return;
        }
        let mut next = match self.retired.iter_mut().position(|b| b.try_reclaim(want)) {
            Some(free) => self.retired.swap_remove(free),
            None => BytesMut::with_capacity(want),
        };
        next.extend_from_slice(&self.rbuf);
        let mut old = std::mem::replace(&mut self.rbuf, next);
        let old_alloc = std::mem::replace(&mut self.rbuf_alloc, want);
        old.clear();
        if want == SPLIT_CHUNK && old_alloc == SPLIT_CHUNK {
            // Oldest out: a buffer pinned for long (a stream's header, a
            // slow stream's data) must not hold a place for good.
            if self.retired.len() == RETIRED_BUFFERS {
                let oldest = self.retired.remove(0);
                self.pinned.push(oldest, SPLIT_CHUNK);
            }
            self.retired.push(old);
        } else {
            self.pinned.push(old, old_alloc);
        }
        self.pinned.sweep();
    }

    /// Lets go of `rbuf` (empty), keeping track of it while it may be
    /// pinned.
    fn drop_rbuf(&mut self) {
        let old = std::mem::take(&mut self.rbuf);
        let alloc = std::mem::replace(&mut self.rbuf_alloc, 0);
        self.pinned.push(old, alloc);
    }

    fn new(
        keys: Keys,
        rbuf: BytesMut,
        carried: BytesMut,
        is_client: bool,
        signals: Arc<Signals>,
    ) -> Opener {
        let rbuf_alloc = rbuf.capacity();
        Opener {
            handshake: BytesMut::new(),
            is_client,
            signals,
            retired: Vec::new(),
            pinned: PinnedBuffers::new(MAX_PINNED_BUFFERS),
            rbuf_alloc,
            quiet_reads: 0,
            keys,
            rbuf,
            plain: (0, 0),
            record_end: 0,
            carried,
            last_read: 0,
            read_closed: false,
            failed: None,
        }
    }

    /// Decrypts the record at the front of `rbuf` if it is complete.
    /// `Ok(true)`: something happened (plaintext ready, or a control
    /// record handled); `Ok(false)`: more bytes are needed.
    fn open_front(&mut self) -> Result<bool, RecordError> {
        if self.rbuf.len() < HEADER_LEN {
            return Ok(false);
        }
        let header: [u8; HEADER_LEN] = self.rbuf[..HEADER_LEN].try_into().expect("5 bytes");
        let version = u16::from_be_bytes([header[1], header[2]]);
        if header[0] == CONTENT_CHANGE_CIPHER_SPEC {
            return Err(RecordError::ChangeCipherSpec);
        }
        if header[0] != CONTENT_APPLICATION_DATA || version != 0x0303 {
            return Err(RecordError::BadHeader(header[0], version));
        }
        let ct_len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if ct_len > MAX_CIPHERTEXT {
            return Err(RecordError::Oversized(ct_len));
        }
        if ct_len < TAG_LEN + 1 {
            return Err(RecordError::Forged);
        }
        if ct_len - TAG_LEN > MAX_INNER_PLAINTEXT {
            // Every suite's tag is 16 bytes: the plaintext is too long
            // whatever it holds.
            return Err(RecordError::Oversized(ct_len - TAG_LEN));
        }
        let end = HEADER_LEN + ct_len;
        if self.rbuf.len() < end {
            // poll_fill leaves room for a whole record before each read.
            return Ok(false);
        }
        let nonce = self.keys.next_nonce();
        let plain = self
            .keys
            .key
            .open_in_place(
                nonce,
                aead::Aad::from(header),
                &mut self.rbuf[HEADER_LEN..end],
            )
            .map_err(|_| RecordError::Forged)?;
        // Strip the zero padding; the last non-zero byte is the type.
        let Some(type_at) = plain.iter().rposition(|&b| b != 0) else {
            return Err(RecordError::NoContentType);
        };
        let content_type = plain[type_at];
        if !self.handshake.is_empty() && content_type != CONTENT_HANDSHAKE {
            return Err(RecordError::Interleaved);
        }
        self.record_end = end;
        match content_type {
            CONTENT_APPLICATION_DATA => {
                self.plain = (HEADER_LEN, HEADER_LEN + type_at);
                if type_at == 0 {
                    // Allowed (traffic analysis padding); nothing to hand out.
                    self.consume_front();
                }
            }
            CONTENT_ALERT => {
                let alert: [u8; 2] = match plain[..type_at] {
                    [] => return Err(RecordError::Empty(CONTENT_ALERT)),
                    [level, description] => [level, description],
                    _ => return Err(RecordError::Malformed(CONTENT_ALERT)),
                };
                match alert[1] {
                    ALERT_CLOSE_NOTIFY => {
                        self.read_closed = true;
                        self.rbuf.clear();
                        self.drop_rbuf();
                        self.pinned.sweep();
                    }
                    // Not an error; a close_notify follows (RFC 8446 §6.1).
                    ALERT_USER_CANCELED => self.consume_front(),
                    // Every other alert is fatal, whatever its level (§6).
                    description => {
                        let description = rustls::AlertDescription::from(description);
                        return Err(RecordError::Alert(rustls::Error::AlertReceived(
                            description,
                        )));
                    }
                }
            }
            CONTENT_HANDSHAKE => {
                if type_at == 0 {
                    return Err(RecordError::Empty(CONTENT_HANDSHAKE));
                }
                // Rare (a key update every few million records): the copy
                // lets a message span records.
                self.handshake.extend_from_slice(&plain[..type_at]);
                let update = self.handshake_messages()?;
                self.consume_front();
                if let Some(requested) = update {
                    self.keys.rekey();
                    if requested {
                        self.signals.answer_update.store(true, Ordering::Relaxed);
                    }
                }
            }
            other => return Err(RecordError::Unexpected(other)),
        }
        Ok(true)
    }

    /// Handles the whole handshake messages in `self.handshake`, leaving
    /// the start of an unfinished one there. `Some(update_requested)` if
    /// one of them was a key update (the last thing in the record).
    fn handshake_messages(&mut self) -> Result<Option<bool>, RecordError> {
        let mut update = None;
        while !self.handshake.is_empty() {
            if update.is_some() {
                return Err(RecordError::KeyUpdateNotAligned);
            }
            let Some(&[kind, a, b, c]) = self.handshake.get(..4) else {
                break;
            };
            let len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
            match kind {
                HANDSHAKE_KEY_UPDATE if len != 1 => {
                    return Err(RecordError::Malformed(CONTENT_HANDSHAKE));
                }
                HANDSHAKE_KEY_UPDATE => {}
                HANDSHAKE_NEW_SESSION_TICKET if !self.is_client => {
                    return Err(RecordError::ClientTicket);
                }
                HANDSHAKE_NEW_SESSION_TICKET if len <= MAX_HANDSHAKE_MESSAGE => {}
                HANDSHAKE_NEW_SESSION_TICKET => {
                    return Err(RecordError::Malformed(CONTENT_HANDSHAKE));
                }
                other => return Err(RecordError::UnexpectedHandshake(other)),
            }
            if self.handshake.len() < 4 + len {
                break;
            }
            let body = &self.handshake[4..4 + len];
            match kind {
                HANDSHAKE_KEY_UPDATE => match body[0] {
                    UPDATE_NOT_REQUESTED => update = Some(false),
                    UPDATE_REQUESTED => update = Some(true),
                    other => return Err(RecordError::BadKeyUpdate(other)),
                },
                // Well-formed, and of no use: links never resume.
                _ => check_ticket(body)?,
            }
            self.handshake.advance(4 + len);
        }
        if update.is_some() && !self.handshake.is_empty() {
            return Err(RecordError::KeyUpdateNotAligned);
        }
        if self.handshake.is_empty() {
            self.handshake = BytesMut::new();
        }
        Ok(update)
    }

    /// Drops the front record (one without plaintext to hand out).
    fn consume_front(&mut self) {
        self.rbuf.advance(self.record_end);
        self.plain = (0, 0);
        self.record_end = 0;
        self.release_if_idle();
    }

    /// Gives the read buffers back when everything read is handed out and
    /// the link is not busy: at once on a link that never was (an idle
    /// link's pings), after [`QUIET_READS`] small reads on one that was.
    fn release_if_idle(&mut self) {
        if !self.rbuf.is_empty() {
            return;
        }
        if self.quiet_reads >= QUIET_READS {
            self.drop_rbuf();
            for old in self.retired.drain(..) {
                self.pinned.push(old, SPLIT_CHUNK);
            }
        } else if self.last_read < KEEP_AFTER && self.retired.is_empty() {
            self.drop_rbuf();
        }
        if !self.pinned.is_empty() {
            self.pinned.sweep();
        }
    }

    /// Reads plaintext into `out` (one copy): the rest of the record a
    /// read did not take, or the next one.
    fn poll_read<S: AsyncRead + Unpin>(
        &mut self,
        sock: &mut S,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if self.carried.is_empty() {
            match ready!(self.poll_chunk(sock, cx))? {
                Some(chunk) => self.carried = chunk,
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.carried.len().min(out.remaining());
        out.put_slice(&self.carried[..n]);
        self.carried.advance(n);
        if self.carried.is_empty() {
            // Let go of the read buffer the chunk came from.
            self.carried = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }

    /// Reads more of the stream into the read buffer.
    fn poll_fill<S: AsyncRead + Unpin>(
        &mut self,
        sock: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        if self.rbuf.capacity() - self.rbuf.len() < MAX_CIPHERTEXT + HEADER_LEN {
            self.next_buffer();
        } else if self.pinned.copy_out() {
            // The read buffer stays; see whether the pinned ones were let go.
            self.pinned.sweep();
        }
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut *sock),
            cx,
            &mut self.rbuf
        ))?;
        if n == 0 {
            self.failed = Some(RecordError::Truncated);
            return Poll::Ready(Err(RecordError::Truncated.into()));
        }
        self.last_read = n;
        self.quiet_reads = if n >= KEEP_AFTER {
            0
        } else {
            self.quiet_reads.saturating_add(1)
        };
        Poll::Ready(Ok(()))
    }

    /// The next piece of plaintext without copying it: the rest of the
    /// front record, split off the read buffer. `None` at close_notify.
    fn poll_chunk<S: AsyncRead + Unpin>(
        &mut self,
        sock: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Option<BytesMut>>> {
        if let Some(err) = &self.failed {
            return Poll::Ready(Err(err.clone().into()));
        }
        if !self.carried.is_empty() {
            return Poll::Ready(Ok(Some(self.carried.split())));
        }
        loop {
            let (from, to) = self.plain;
            if from < to && self.pinned.copy_out() {
                // Too many buffers pinned: this one stays free for reuse.
                let copy = BytesMut::from(&self.rbuf[from..to]);
                self.rbuf.advance(self.record_end);
                self.plain = (0, 0);
                self.record_end = 0;
                self.release_if_idle();
                return Poll::Ready(Ok(Some(copy)));
            }
            if from < to {
                let mut record = self.rbuf.split_to(self.record_end);
                record.truncate(to);
                record.advance(from);
                self.plain = (0, 0);
                self.record_end = 0;
                self.release_if_idle();
                return Poll::Ready(Ok(Some(record)));
            }
            if self.read_closed {
                return Poll::Ready(Ok(None));
            }
            match self.open_front() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(err) => {
                    if let Some(alert) = err.alert() {
                        self.signals.alert.store(alert, Ordering::Relaxed);
                    }
                    self.failed = Some(err.clone());
                    return Poll::Ready(Err(err.into()));
                }
            }
            ready!(self.poll_fill(sock, cx))?;
        }
    }
}

/// Checks that `body` is a NewSessionTicket (RFC 8446 §4.6.1):
/// ticket_lifetime, ticket_age_add, ticket_nonce<0..255>,
/// ticket<1..2^16-1>, extensions<0..2^16-2>, and nothing after.
fn check_ticket(body: &[u8]) -> Result<(), RecordError> {
    let malformed = RecordError::Malformed(CONTENT_HANDSHAKE);
    let mut rest = body.get(8..).ok_or(malformed.clone())?;
    let nonce_len = usize::from(*rest.first().ok_or(malformed.clone())?);
    rest = rest.get(1 + nonce_len..).ok_or(malformed.clone())?;
    for min in [1, 0] {
        let [hi, lo] = *rest.get(..2).ok_or(malformed.clone())? else {
            return Err(malformed);
        };
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        if len < min {
            return Err(malformed);
        }
        rest = rest.get(2 + len..).ok_or(malformed.clone())?;
    }
    if rest.is_empty() {
        Ok(())
    } else {
        Err(malformed)
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
