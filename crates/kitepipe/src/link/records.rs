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
//! ALPN [`ALPN_LINK`](crate::pki::ALPN_LINK) (`kitepipe/2`), rustls runs the
//! whole handshake over a [`ReadAhead`] that never hands rustls bytes past
//! the end of the current record, and then rustls gives up the traffic keys
//! and sequence numbers (`dangerous_extract_secrets`). Nothing it read is
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
//! sends a TLS `KeyUpdate` message and moves to the next key generation.
//! rustls does not expose the traffic secrets TLS 1.3 would derive the next
//! keys from, so both ends derive them from a per-direction secret taken
//! from the session's exporter (label [`REKEY_LABEL`]) with HKDF-SHA256.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use ring::{aead, hkdf};
use rustls::ConnectionTrafficSecrets;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::io::{ChunkSource, ReadAhead, ReadChunks};

/// Largest plaintext of one record (RFC 8446 §5.1).
pub const MAX_PLAINTEXT: usize = 16 * 1024;

/// Record header: content type, legacy version, length.
const HEADER_LEN: usize = 5;

/// AEAD tag length of every TLS 1.3 cipher suite.
const TAG_LEN: usize = 16;

/// Largest ciphertext of one record (RFC 8446 §5.2).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;

const CONTENT_ALERT: u8 = 21;
const CONTENT_HANDSHAKE: u8 = 22;
const CONTENT_APPLICATION_DATA: u8 = 23;

const HANDSHAKE_NEW_SESSION_TICKET: u8 = 4;
const HANDSHAKE_KEY_UPDATE: u8 = 24;

/// Records sealed under one key generation before the sender moves on to
/// the next: far below AES-GCM's limit of 2^24.5 full-size records.
pub const REKEY_AFTER: u64 = 1 << 23;

/// Exporter label of the per-direction rekey secrets.
pub const REKEY_LABEL: &[u8] = b"EXPORTER-kitepipe-link-rekey";

/// Read buffer of a split reader, whose chunks share it: a new one is
/// needed only every few reads.
const SPLIT_CHUNK: usize = 256 * 1024;

/// Small reads in a row after which a split reader that was busy gives its
/// buffers back (a bulk transfer has small reads now and then; an idle
/// link's pings come every few seconds).
const QUIET_READS: u8 = 16;

/// Earlier read buffers a busy split reader keeps for reuse.
const RETIRED_BUFFERS: usize = 4;

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
/// and the secret the next generation is derived from.
struct Keys {
    algorithm: &'static aead::Algorithm,
    key: aead::LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
    rekey_secret: [u8; 32],
    /// Key updates so far.
    generation: u64,
}

impl Keys {
    fn new(
        secrets: ConnectionTrafficSecrets,
        seq: u64,
        rekey_secret: [u8; 32],
    ) -> Result<Keys, RecordError> {
        let (algorithm, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(RecordError::UnsupportedSuite),
        };
        let key = aead::UnboundKey::new(algorithm, key.as_ref())
            .map_err(|_| RecordError::UnsupportedSuite)?;
        let iv = iv
            .as_ref()
            .try_into()
            .map_err(|_| RecordError::UnsupportedSuite)?;
        Ok(Keys {
            algorithm,
            key: aead::LessSafeKey::new(key),
            iv,
            seq,
            rekey_secret,
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

    /// Moves to the next key generation.
    fn rekey(&mut self) {
        let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &self.rekey_secret);
        let mut next = [0u8; 32];
        expand(&prk, b"kitepipe traffic upd", &mut next);
        let next_prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &next);
        let mut key = [0u8; 32];
        let key = &mut key[..self.algorithm.key_len()];
        expand(&next_prk, b"kitepipe key", key);
        expand(&next_prk, b"kitepipe iv", &mut self.iv);
        self.key = aead::LessSafeKey::new(
            aead::UnboundKey::new(self.algorithm, key).expect("key length of the algorithm"),
        );
        self.rekey_secret = next;
        self.seq = 0;
        self.generation += 1;
    }
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn expand(prk: &hkdf::Prk, label: &[u8], out: &mut [u8]) {
    prk.expand(&[label], Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .expect("HKDF output length is far below its limit");
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
    /// Small reads in a row: a busy link that went quiet gives its
    /// buffers back after [`QUIET_READS`].
    quiet_reads: u8,
}

/// The sending half of a record layer: keys and the sealed records not
/// yet written.
struct Sealer {
    keys: Keys,
    wbuf: BytesMut,
    close_sent: bool,
    rekey_after: u64,
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
        let (ours, theirs): (&[u8], &[u8]) = if is_client {
            (b"client", b"server")
        } else {
            (b"server", b"client")
        };
        let tx_rekey = conn
            .export_keying_material([0u8; 32], REKEY_LABEL, Some(ours))
            .map_err(|e| handover(&e))?;
        let rx_rekey = conn
            .export_keying_material([0u8; 32], REKEY_LABEL, Some(theirs))
            .map_err(|e| handover(&e))?;
        let secrets = conn.dangerous_extract_secrets().map_err(|e| handover(&e))?;
        let (rbuf, inner) = io.into_parts();
        Ok(RecordStream {
            w: RecordWriter {
                sock: inner,
                tx: Sealer {
                    keys: Keys::new(secrets.tx.1, secrets.tx.0, tx_rekey)?,
                    wbuf: BytesMut::from(&wbuf[..]),
                    close_sent: false,
                    rekey_after: REKEY_AFTER,
                },
            },
            rx: Opener::new(
                Keys::new(secrets.rx.1, secrets.rx.0, rx_rekey)?,
                rbuf,
                carried,
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
        if self.keys.seq >= self.rekey_after {
            // The key update goes out under the old key; everything after
            // it under the new one.
            let start = self.begin_plain_record();
            self.wbuf.put_slice(&[HANDSHAKE_KEY_UPDATE, 0, 0, 1, 0]);
            self.finish_record(start, CONTENT_HANDSHAKE);
            self.keys.rekey();
        }
        self.begin_plain_record()
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
            let start = self.begin_record();
            self.wbuf.put_slice(&[1, 0]);
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
        old.clear();
        if want == SPLIT_CHUNK {
            // Oldest out: a buffer pinned for long (a stream's header, a
            // slow stream's data) must not hold a place for good.
            if self.retired.len() == RETIRED_BUFFERS {
                self.retired.remove(0);
            }
            self.retired.push(old);
        }
    }

    fn new(keys: Keys, rbuf: BytesMut, carried: BytesMut) -> Opener {
        Opener {
            retired: Vec::new(),
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
        match content_type {
            CONTENT_APPLICATION_DATA => {
                if type_at > MAX_PLAINTEXT {
                    return Err(RecordError::Oversized(type_at));
                }
                self.plain = (HEADER_LEN, HEADER_LEN + type_at);
                self.record_end = end;
                if type_at == 0 {
                    self.consume_front();
                }
            }
            CONTENT_ALERT => {
                let alert = &plain[..type_at];
                if alert.len() != 2 {
                    return Err(RecordError::Unexpected(CONTENT_ALERT));
                }
                if alert[1] == 0 {
                    // close_notify
                    self.read_closed = true;
                    self.rbuf = BytesMut::new();
                    return Ok(true);
                }
                let description = rustls::AlertDescription::from(alert[1]);
                return Err(RecordError::Alert(rustls::Error::AlertReceived(
                    description,
                )));
            }
            CONTENT_HANDSHAKE => {
                let mut messages = &plain[..type_at];
                let mut key_update = false;
                while !messages.is_empty() {
                    if messages.len() < 4 || key_update {
                        return Err(RecordError::UnexpectedHandshake(messages[0]));
                    }
                    let kind = messages[0];
                    let len = usize::from(messages[1]) << 16
                        | usize::from(messages[2]) << 8
                        | usize::from(messages[3]);
                    if messages.len() < 4 + len {
                        return Err(RecordError::UnexpectedHandshake(kind));
                    }
                    match kind {
                        HANDSHAKE_KEY_UPDATE if len == 1 => key_update = true,
                        HANDSHAKE_NEW_SESSION_TICKET => {}
                        other => return Err(RecordError::UnexpectedHandshake(other)),
                    }
                    messages = &messages[4 + len..];
                }
                self.record_end = end;
                self.consume_front();
                if key_update {
                    self.keys.rekey();
                }
            }
            other => return Err(RecordError::Unexpected(other)),
        }
        Ok(true)
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
            self.rbuf = BytesMut::new();
            self.retired.clear();
        } else if self.last_read < KEEP_AFTER && self.retired.is_empty() {
            self.rbuf = BytesMut::new();
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
                    self.failed = Some(err.clone());
                    return Poll::Ready(Err(err.into()));
                }
            }
            ready!(self.poll_fill(sock, cx))?;
        }
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
/// layer when both ends speak `kitepipe/2`, rustls otherwise.
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
