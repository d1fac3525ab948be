//! The sending half of the record layer ([`Sealer`]): seals plaintext
//! into records in place in one buffer, sends key updates when a key is
//! due or the peer asked for one, and ends the link with close_notify or
//! the alert the receiving half chose.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use ring::aead;
use tokio::io::AsyncWrite;

use super::keys::Keys;
use super::{
    ALERT_CLOSE_NOTIFY, CONTENT_ALERT, CONTENT_APPLICATION_DATA, CONTENT_HANDSHAKE,
    HANDSHAKE_KEY_UPDATE, HEADER_LEN, KEEP_AFTER, MAX_PLAINTEXT, Signals, TAG_LEN,
    UPDATE_NOT_REQUESTED, record_header,
};

/// Sealed bytes held before `poll_write` waits for the socket: one mux
/// batch (256 KiB) plus record overhead goes out in one write.
const WRITE_LIMIT: usize = 288 * 1024;

/// The sending half of a record layer: keys and the sealed records not
/// yet written.
pub(super) struct Sealer {
    pub(super) keys: Keys,
    pub(super) wbuf: BytesMut,
    pub(super) close_sent: bool,
    pub(super) rekey_after: u64,
    pub(super) signals: Arc<Signals>,
}

impl Sealer {
    /// Starts a record at the end of `wbuf` (a key update first when the
    /// key is due); returns where it starts, for [`Self::finish_record`].
    pub(super) fn begin_record(&mut self) -> usize {
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
    pub(super) fn send_key_update(&mut self, request_update: u8) {
        let start = self.begin_plain_record();
        self.wbuf
            .put_slice(&[HANDSHAKE_KEY_UPDATE, 0, 0, 1, request_update]);
        self.finish_record(start, CONTENT_HANDSHAKE);
        self.keys.rekey();
    }

    pub(super) fn begin_plain_record(&mut self) -> usize {
        self.wbuf.reserve(HEADER_LEN + MAX_PLAINTEXT + 1 + TAG_LEN);
        let start = self.wbuf.len();
        self.wbuf.put_slice(&[0; HEADER_LEN]);
        start
    }

    /// Seals the record started at `start`: its plaintext is everything
    /// after the header.
    pub(super) fn finish_record(&mut self, start: usize, content_type: u8) {
        self.wbuf.put_u8(content_type);
        self.seal_record(start);
    }

    /// Seals the record started at `start` whose inner plaintext (content,
    /// type, padding) is everything after the header.
    pub(super) fn seal_record(&mut self, start: usize) {
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

    pub(super) fn poll_write_vectored<S: AsyncWrite + Unpin>(
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

    pub(super) fn poll_flush<S: AsyncWrite + Unpin>(
        &mut self,
        sock: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        ready!(self.poll_write_out(sock, cx))?;
        Pin::new(sock).poll_flush(cx)
    }

    pub(super) fn poll_shutdown<S: AsyncWrite + Unpin>(
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
