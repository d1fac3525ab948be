//! The byte stream under a link's TLS: large socket reads, handed out in
//! the small pieces rustls asks for.
//!
//! rustls reads TLS records from its transport at most 4 KiB at a time, so a
//! bulk transfer cost four `recv` calls per 16 KiB record on the receiving
//! end. [`ReadAhead`] reads up to [`READ_AHEAD`] bytes per `recv` and serves
//! rustls from that buffer; writes pass straight through. The buffer is
//! freed when it drains after a small read, so an idle link holds none (the
//! scale target is at most 64 KiB of relay memory per linked connector).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes read from the socket at once: four full TLS records, one
/// largest DATA frame, and what loopback delivers per wakeup under load.
pub(crate) const READ_AHEAD: usize = 64 * 1024;

/// Reads of at least this size go straight to the caller's buffer: the
/// extra copy would buy nothing.
const DIRECT_READ: usize = 16 * 1024;

/// The buffer is kept after it drains only if the last socket read was at
/// least this large (a busy link): allocating fresh pages for every read
/// costs page faults, holding them on idle links costs memory.
const KEEP_AFTER: usize = 8 * 1024;

/// A byte stream whose reads are done in large pieces (see the module doc).
#[derive(Debug)]
pub struct ReadAhead<S> {
    /// Bytes read from `inner` and not yet handed out (first: bytes read
    /// before this wrapper existed, e.g. while sniffing the protocol).
    buf: BytesMut,
    /// Bytes the last socket read returned.
    last_read: usize,
    /// Never hand out bytes past the end of the current TLS record (see
    /// [`ReadAhead::for_handshake`]); bytes of it still to hand out.
    records_only: bool,
    record_left: usize,
    inner: S,
}

/// TLS record header length.
const RECORD_HEADER: usize = 5;

impl<S> ReadAhead<S> {
    /// Wraps `inner`; `prefix` holds bytes already read from it, which are
    /// returned first.
    pub fn new(prefix: BytesMut, inner: S) -> ReadAhead<S> {
        ReadAhead {
            buf: prefix,
            last_read: 0,
            records_only: false,
            record_left: 0,
            inner,
        }
    }

    /// Wraps `inner` for a TLS handshake whose session the link's own
    /// record layer may take over afterwards: each read ends at the end of
    /// the current TLS record at the latest, so rustls never holds part of
    /// a record it has not processed. Everything past it stays here
    /// ([`ReadAhead::into_parts`]).
    pub fn for_handshake(prefix: BytesMut, inner: S) -> ReadAhead<S> {
        ReadAhead {
            records_only: true,
            ..ReadAhead::new(prefix, inner)
        }
    }

    /// Ends the record-by-record mode of [`ReadAhead::for_handshake`].
    pub(crate) fn set_records_only(&mut self, on: bool) {
        self.records_only = on;
    }

    /// The bytes read and not handed out, and the wrapped stream.
    pub(crate) fn into_parts(self) -> (BytesMut, S) {
        (self.buf, self.inner)
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.records_only {
            return this.poll_read_record(cx, out);
        }
        if this.buf.is_empty() {
            if out.remaining() >= DIRECT_READ {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            if std::task::ready!(this.poll_fill(cx))? == 0 {
                this.buf = BytesMut::new();
                return Poll::Ready(Ok(()));
            }
        }
        let n = this.buf.len().min(out.remaining());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        if this.buf.is_empty() && this.last_read < KEEP_AFTER {
            // A small read: the link is not busy. Give the memory back
            // rather than hold it on every idle link.
            this.buf = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> ReadAhead<S> {
    /// One socket read of up to [`READ_AHEAD`] bytes into the buffer
    /// (reusing the drained buffer's space while the link is busy).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.buf.reserve(READ_AHEAD);
        let n = std::task::ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.inner),
            cx,
            &mut self.buf
        ))?;
        if n > 0 {
            self.last_read = n;
        }
        Poll::Ready(Ok(n))
    }

    /// A read that stops at the end of the current TLS record.
    fn poll_read_record(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // At a record boundary, learn the next record's length first.
        let need = if self.record_left == 0 {
            RECORD_HEADER
        } else {
            1
        };
        while self.buf.len() < need {
            if std::task::ready!(self.poll_fill(cx))? == 0 {
                // End of stream: hand out what is left; rustls reports a
                // truncated record itself.
                let n = self.buf.len().min(out.remaining());
                out.put_slice(&self.buf[..n]);
                self.buf.advance(n);
                return Poll::Ready(Ok(()));
            }
        }
        if self.record_left == 0 {
            self.record_left =
                RECORD_HEADER + usize::from(u16::from_be_bytes([self.buf[3], self.buf[4]]));
        }
        let n = self.buf.len().min(out.remaining()).min(self.record_left);
        out.put_slice(&self.buf[..n]);
        self.buf.advance(n);
        self.record_left -= n;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Most slices handed to one vectored write (well under IOV_MAX).
pub(crate) const MAX_SLICES: usize = 64;

/// Writes the front of `segments` with one vectored write (at most
/// [`MAX_SLICES`] of them) and drops what was written; returns how many
/// bytes that was. A write of zero bytes is an error.
pub(crate) fn poll_write_segments<W: AsyncWrite + Unpin + ?Sized>(
    writer: &mut W,
    cx: &mut Context<'_>,
    segments: &mut VecDeque<Bytes>,
) -> Poll<io::Result<usize>> {
    let mut slices = [io::IoSlice::new(&[]); MAX_SLICES];
    let mut count = 0;
    for (slot, segment) in slices.iter_mut().zip(segments.iter()) {
        *slot = io::IoSlice::new(segment);
        count += 1;
    }
    let written = std::task::ready!(Pin::new(writer).poll_write_vectored(cx, &slices[..count]))?;
    if written == 0 {
        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
    }
    let mut left = written;
    while left > 0 {
        let front = segments.front_mut().expect("written bytes were queued");
        if left >= front.len() {
            left -= front.len();
            segments.pop_front();
        } else {
            front.advance(left);
            left = 0;
        }
    }
    Poll::Ready(Ok(written))
}

/// Where the mux reader takes received bytes from: pieces of the byte
/// stream in order, each a buffer of its own, so the reader can slice DATA
/// payloads out of them without copying. The link's record layer hands out
/// each record's plaintext where it was decrypted
/// ([`RecordReader`](super::records::RecordReader)); any other byte stream
/// goes through [`ReadChunks`].
pub trait ChunkSource: Send {
    /// The next piece of the stream; `None` at its end.
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<BytesMut>>>;
}

/// Bytes of the mux reader's chunks read at once from a plain byte stream.
const READ_CHUNK: usize = 128 * 1024;

/// Earlier read buffers of a [`ReadChunks`] kept alive by chunks handed
/// out of them beyond which it hands out copies, until they are let go:
/// 128 of 128 KiB, 16 MiB per link (as the record layer's
/// `MAX_PINNED_BUFFERS`): a stream nobody reads, fed a byte now and then,
/// would otherwise pin a buffer per byte.
pub(crate) const MAX_PINNED_CHUNK_BUFFERS: usize = 128;

/// Earlier read buffers that chunks handed out of them may still hold (a
/// queued chunk keeps its whole buffer alive), counted against a bound
/// past which the reader hands out copies instead: the one mechanism of
/// [`ReadChunks`] and the record layer's reader. Each is forgotten once a
/// sweep finds nothing else holds it.
#[derive(Debug)]
pub(crate) struct PinnedBuffers {
    /// Each buffer with the size of its allocation.
    bufs: Vec<(BytesMut, usize)>,
    /// Buffers pinned at most before chunks go out as copies.
    max: usize,
    /// Too many are pinned: chunks go out as copies.
    copy_out: bool,
}

impl PinnedBuffers {
    pub(crate) fn new(max: usize) -> PinnedBuffers {
        PinnedBuffers {
            bufs: Vec::new(),
            max,
            copy_out: false,
        }
    }

    /// Keeps track of `buf`, an allocation of `alloc` bytes (none: nothing
    /// to track), until nothing else holds it.
    pub(crate) fn push(&mut self, buf: BytesMut, alloc: usize) {
        if alloc > 0 {
            self.bufs.push((buf, alloc));
        }
    }

    /// Forgets the buffers nothing holds any more, and decides whether
    /// chunks go out as copies.
    pub(crate) fn sweep(&mut self) {
        // A buffer whose whole allocation can be reclaimed is held by
        // nobody else (`try_reclaim` beyond the capacity left checks that).
        self.bufs
            .retain_mut(|(buf, alloc)| !buf.try_reclaim(*alloc));
        self.copy_out = self.bufs.len() >= self.max;
    }

    /// Too many buffers were pinned at the last sweep: hand out copies.
    pub(crate) fn copy_out(&self) -> bool {
        self.copy_out
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.bufs.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.bufs.is_empty()
    }
}

/// A plain byte stream as a [`ChunkSource`]: each read is a chunk, taken
/// out of one large buffer.
#[derive(Debug)]
pub(crate) struct ReadChunks<R> {
    inner: R,
    buf: BytesMut,
    /// Earlier buffers that chunks may still hold (see
    /// [`MAX_PINNED_CHUNK_BUFFERS`]).
    pinned: PinnedBuffers,
    /// `buf` is a buffer of [`READ_CHUNK`] allocated here.
    started: bool,
}

impl<R> ReadChunks<R> {
    /// Reads `inner` in chunks.
    pub(crate) fn new(inner: R) -> ReadChunks<R> {
        ReadChunks {
            inner,
            buf: BytesMut::new(),
            pinned: PinnedBuffers::new(MAX_PINNED_CHUNK_BUFFERS),
            started: false,
        }
    }
}

impl<R: AsyncRead + Unpin + Send> ChunkSource for ReadChunks<R> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<BytesMut>>> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4
            && !self.buf.try_reclaim(READ_CHUNK)
        {
            // Chunks still hold this buffer: start another. (Only the
            // first buffer is not one of ours: `BytesMut::new()`.)
            let old = std::mem::replace(&mut self.buf, BytesMut::with_capacity(READ_CHUNK));
            if std::mem::replace(&mut self.started, true) {
                self.pinned.push(old, READ_CHUNK);
            }
            self.pinned.sweep();
        } else if !self.pinned.is_empty() {
            // Let go of buffers freed since: idle links hold none.
            self.pinned.sweep();
        }
        let n = std::task::ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.inner),
            cx,
            &mut self.buf
        ))?;
        if n == 0 {
            return Poll::Ready(Ok(None));
        }
        if self.pinned.copy_out() {
            let copy = BytesMut::from(&self.buf[..]);
            self.buf.clear();
            return Poll::Ready(Ok(Some(copy)));
        }
        Poll::Ready(Ok(Some(self.buf.split())))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn replays_the_prefix_then_reads_in_small_pieces() {
        let (mut far, near) = tokio::io::duplex(64);
        let mut io = ReadAhead::new(BytesMut::from(&b"hello "[..]), near);
        far.write_all(b"world, and more").await.unwrap();
        far.shutdown().await.unwrap();
        let mut got = Vec::new();
        let mut piece = [0u8; 3];
        loop {
            let n = io.read(&mut piece).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&piece[..n]);
        }
        assert_eq!(got, b"hello world, and more");
        assert_eq!(io.buf.capacity(), 0, "a drained buffer is freed");
    }

    #[tokio::test]
    async fn large_reads_go_straight_through() {
        let (mut far, near) = tokio::io::duplex(64 * 1024);
        let mut io = ReadAhead::new(BytesMut::new(), near);
        far.write_all(&[7u8; 1000]).await.unwrap();
        let mut big = vec![0u8; DIRECT_READ];
        let n = io.read(&mut big).await.unwrap();
        assert_eq!(n, 1000);
        assert_eq!(io.buf.capacity(), 0);
    }

    /// A consumer keeping one chunk out of every read (a stream nobody
    /// reads, fed between other traffic) pins a bounded number of buffers:
    /// past the bound the chunks are copies; once let go, the buffers go.
    #[tokio::test]
    async fn chunks_held_by_a_slow_consumer_pin_a_bounded_number_of_buffers() {
        let (mut far, near) = tokio::io::duplex(256 * 1024);
        let mut chunks = ReadChunks::new(near);
        let rounds = MAX_PINNED_CHUNK_BUFFERS + 40;
        let write = async {
            for _ in 0..rounds {
                // One read fills most of a buffer: the next read needs another.
                far.write_all(&[1u8; READ_CHUNK - READ_CHUNK / 8])
                    .await
                    .unwrap();
                far.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
            far.shutdown().await.unwrap();
        };
        let read = async {
            let mut held = Vec::new();
            let mut most = 0;
            let mut copied = false;
            let mut total = 0;
            while let Some(mut chunk) = std::future::poll_fn(|cx| chunks.poll_chunk(cx))
                .await
                .unwrap()
            {
                total += chunk.len();
                held.push(chunk.split_to(1));
                most = most.max(chunks.pinned.len());
                copied |= chunks.pinned.copy_out();
            }
            drop(held);
            (most, copied, total)
        };
        let (_, (most, copied, total)) = tokio::join!(write, read);
        assert_eq!(total, rounds * (READ_CHUNK - READ_CHUNK / 8));
        assert!(most <= MAX_PINNED_CHUNK_BUFFERS, "{most} buffers pinned");
        assert!(
            copied,
            "the reader switched to copies ({most} pinned at most)"
        );
        chunks.pinned.sweep();
        assert!(chunks.pinned.is_empty() && !chunks.pinned.copy_out());
    }
}
