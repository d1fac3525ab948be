//! The receiving half of the record layer ([`Opener`]): reads records,
//! decrypts them in place, handles alerts and post-handshake messages
//! (key updates, tickets), and manages the read buffers whose plaintext it
//! hands out without a copy.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use ring::aead;
use tokio::io::{AsyncRead, ReadBuf};

use super::keys::Keys;
use super::{
    ALERT_CLOSE_NOTIFY, ALERT_USER_CANCELED, CONTENT_ALERT, CONTENT_APPLICATION_DATA,
    CONTENT_CHANGE_CIPHER_SPEC, CONTENT_HANDSHAKE, HANDSHAKE_KEY_UPDATE,
    HANDSHAKE_NEW_SESSION_TICKET, HEADER_LEN, KEEP_AFTER, MAX_CIPHERTEXT, MAX_HANDSHAKE_MESSAGE,
    MAX_INNER_PLAINTEXT, MAX_PINNED_BUFFERS, RecordError, SPLIT_CHUNK, Signals, TAG_LEN,
    UPDATE_NOT_REQUESTED, UPDATE_REQUESTED,
};
use crate::link::io::PinnedBuffers;

/// Small reads in a row after which a split reader that was busy gives its
/// buffers back (a bulk transfer has small reads now and then; an idle
/// link's pings come every few seconds).
const QUIET_READS: u8 = 16;

/// Earlier read buffers a busy split reader keeps for reuse.
const RETIRED_BUFFERS: usize = 4;

/// The receiving half of a record layer: keys and the read buffer.
pub(super) struct Opener {
    pub(super) keys: Keys,
    /// Bytes read from the socket: the record at the front may already be
    /// decrypted (then `plain` says where its plaintext is).
    pub(super) rbuf: BytesMut,
    /// Plaintext of the decrypted front record: start and end offsets in
    /// `rbuf`, and where that record ends.
    pub(super) plain: (usize, usize),
    pub(super) record_end: usize,
    /// Plaintext taken out of the stream and not handed out yet: what
    /// rustls had decrypted at the handover, or the rest of a record a read
    /// did not take.
    pub(super) carried: BytesMut,
    /// Bytes the last socket read returned.
    pub(super) last_read: usize,
    /// The peer sent close_notify: reads return end of stream.
    pub(super) read_closed: bool,
    /// Reading failed for good: every later read reports this.
    pub(super) failed: Option<RecordError>,
    /// Earlier read buffers, empty, kept for reuse once the chunks handed
    /// out of them are dropped.
    pub(super) retired: Vec<BytesMut>,
    /// Earlier read buffers no longer kept for reuse, while plaintext
    /// handed out of them may still hold them: counted against
    /// [`MAX_PINNED_BUFFERS`], past which plaintext goes out as copies.
    pub(super) pinned: PinnedBuffers,
    /// Size of `rbuf`'s allocation (a lower bound).
    pub(super) rbuf_alloc: usize,
    /// Small reads in a row: a busy link that went quiet gives its
    /// buffers back after [`QUIET_READS`].
    pub(super) quiet_reads: u8,
    /// The start of a handshake message whose rest is in the next record.
    pub(super) handshake: BytesMut,
    /// This end is the TLS client (it may receive NewSessionTickets).
    pub(super) is_client: bool,
    pub(super) signals: Arc<Signals>,
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

    pub(super) fn new(
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
    pub(super) fn poll_read<S: AsyncRead + Unpin>(
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
    pub(super) fn poll_chunk<S: AsyncRead + Unpin>(
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
