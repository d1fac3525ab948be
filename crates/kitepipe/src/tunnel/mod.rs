//! Visitor streams and the byte-copy loop, shared by relay and connector.
//!
//! Start at [`splice_stream`] (a socket and a link stream, zero-copy) and
//! [`splice`] (two link streams, zero-copy). This room never dials or accepts: it is handed two
//! open byte streams and moves bytes between them, keeping half-close (EOF
//! one way shuts down that writer while the other way keeps flowing).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::link::MuxStream;
use crate::link::io::{MAX_SLICES, poll_write_segments};

/// Copy buffer per direction. 64 KiB matches the largest DATA frame, so one
/// read from a socket becomes one frame on the link.
pub(crate) const COPY_BUF: usize = 64 * 1024;

/// Smallest read buffer: enough for the requests and answers of an
/// interactive or request/response connection.
pub(crate) const SMALL_READ: usize = 4 * 1024;

/// How much to read next from a socket: [`SMALL_READ`] while reads are
/// small, growing to [`COPY_BUF`] while they fill the buffer. Idle and
/// request/response connections then hold a few KiB instead of 64 KiB per
/// direction (peak memory with many visitors), bulk ones still move 64 KiB
/// per read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadSize(usize);

impl Default for ReadSize {
    fn default() -> Self {
        ReadSize(SMALL_READ)
    }
}

impl ReadSize {
    /// The size of the next read.
    pub(crate) fn get(self) -> usize {
        self.0
    }

    /// Learns from a read of `n` bytes into a buffer of [`Self::get`] bytes.
    pub(crate) fn update(&mut self, n: usize) {
        if n >= self.0 {
            self.0 = (self.0 * 4).min(COPY_BUF);
        } else if n < self.0 / 8 {
            self.0 = (self.0 / 2).max(SMALL_READ);
        }
    }
}

/// Passes bytes both ways between two link streams (the relay joining a
/// client's stream to a node's) until both directions reach EOF, without a
/// copy: received chunks are sent on as they are. Returns the bytes moved
/// a->b and b->a.
pub(crate) async fn splice(a: &mut MuxStream, b: &mut MuxStream) -> io::Result<(u64, u64)> {
    let mut forth = ToStream::default();
    let mut back = ToStream::default();
    std::future::poll_fn(|cx| {
        let forth_done = forth.poll(cx, b, |cx| a.poll_recv_chunk(cx, usize::MAX))?;
        let back_done = back.poll(cx, a, |cx| b.poll_recv_chunk(cx, usize::MAX))?;
        if forth_done.is_ready() && back_done.is_ready() {
            return Poll::Ready(Ok((forth.moved, back.moved)));
        }
        Poll::Pending
    })
    .await
}

/// One direction into a link stream: bytes from a source (another link
/// stream, or a socket) sent on as DATA without a copy, then FIN.
#[derive(Default)]
struct ToStream {
    pending: Bytes,
    eof: bool,
    done: bool,
    moved: u64,
}

impl ToStream {
    /// Moves bytes from `next` (the source's next piece; `None` at EOF)
    /// into `to` until the source is finished or something must wait.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        to: &mut MuxStream,
        mut next: impl FnMut(&mut Context<'_>) -> Poll<io::Result<Option<Bytes>>>,
    ) -> io::Result<Poll<()>> {
        loop {
            if self.done {
                return Ok(Poll::Ready(()));
            }
            if !self.pending.is_empty() {
                match to.poll_send_chunk(cx, &mut self.pending) {
                    Poll::Ready(res) => res?,
                    Poll::Pending => return Ok(Poll::Pending),
                }
                continue;
            }
            if self.eof {
                match Pin::new(&mut *to).poll_shutdown(cx) {
                    Poll::Ready(res) => res?,
                    Poll::Pending => return Ok(Poll::Pending),
                }
                self.done = true;
                continue;
            }
            match next(cx) {
                Poll::Ready(Ok(Some(chunk))) => {
                    self.moved += chunk.len() as u64;
                    self.pending = chunk;
                }
                Poll::Ready(Ok(None)) => self.eof = true,
                Poll::Ready(Err(err)) => return Err(err),
                Poll::Pending => return Ok(Poll::Pending),
            }
        }
    }
}

/// How long a half-closed connection (one direction finished) may go
/// without a byte in the other direction before it is cut. Fully open
/// connections may idle forever (SSH sessions do); a half-closed one whose
/// other end stopped reading would otherwise hold its sockets until the
/// kernel gives up, about 15 minutes.
pub(crate) const HALF_CLOSED_LINGER: Duration = Duration::from_secs(120);

/// Copies both ways between a socket and a link stream until both
/// directions reach EOF, without copying through an intermediate buffer:
/// bytes read from the socket become DATA frames as they are, and received
/// frames are written to the socket as they are. Returns the bytes moved
/// socket->stream and stream->socket.
pub(crate) async fn splice_stream<S>(sock: &mut S, stream: &mut MuxStream) -> io::Result<(u64, u64)>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut up = Up::default();
    let mut down = Down::default();
    let mut linger: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let mut last_moved = 0u64;
    std::future::poll_fn(|cx| {
        let up_done = up.poll(cx, sock, stream)?;
        let down_done = down.poll(cx, sock, stream)?;
        if up_done.is_ready() && down_done.is_ready() {
            return Poll::Ready(Ok((up.into.moved, down.moved)));
        }
        if up_done.is_ready() || down_done.is_ready() {
            // Half-closed: the other direction must keep making progress.
            let moved = up.into.moved + down.moved;
            let sleep =
                linger.get_or_insert_with(|| Box::pin(tokio::time::sleep(HALF_CLOSED_LINGER)));
            if moved != last_moved {
                last_moved = moved;
                sleep
                    .as_mut()
                    .reset(tokio::time::Instant::now() + HALF_CLOSED_LINGER);
            }
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "half-closed connection idle too long",
                )));
            }
        }
        Poll::Pending
    })
    .await
}

/// Socket -> stream: reads sized by [`ReadSize`], each read sent as it is.
#[derive(Default)]
struct Up {
    buf: BytesMut,
    size: ReadSize,
    into: ToStream,
}

impl Up {
    fn poll<S>(
        &mut self,
        cx: &mut Context<'_>,
        sock: &mut S,
        stream: &mut MuxStream,
    ) -> io::Result<Poll<()>>
    where
        S: AsyncRead + Unpin + ?Sized,
    {
        let (buf, size) = (&mut self.buf, &mut self.size);
        self.into.poll(cx, stream, |cx| {
            let want = size.get();
            if buf.capacity() < want / 2 {
                // A fresh buffer: the previous one may still be held by
                // payloads in flight.
                *buf = BytesMut::with_capacity(want);
            }
            let room = buf.capacity();
            let n =
                std::task::ready!(tokio_util::io::poll_read_buf(Pin::new(&mut *sock), cx, buf))?;
            if n == 0 {
                return Poll::Ready(Ok(None));
            }
            size.update(if n >= room { want } else { n });
            Poll::Ready(Ok(Some(buf.split().freeze())))
        })
    }
}

/// Most bytes gathered into one socket write.
const WRITE_GATHER: usize = 256 * 1024;

/// Stream -> socket.
#[derive(Default)]
struct Down {
    pending: VecDeque<Bytes>,
    eof: bool,
    done: bool,
    moved: u64,
}

impl Down {
    fn poll<S>(
        &mut self,
        cx: &mut Context<'_>,
        sock: &mut S,
        stream: &mut MuxStream,
    ) -> io::Result<Poll<()>>
    where
        S: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            if self.done {
                return Ok(Poll::Ready(()));
            }
            if !self.pending.is_empty() {
                // Several chunks (a bulk stream's records) in one writev.
                match poll_write_segments(&mut *sock, cx, &mut self.pending) {
                    Poll::Ready(Ok(n)) => self.moved += n as u64,
                    Poll::Ready(Err(err)) => return Err(err),
                    Poll::Pending => return Ok(Poll::Pending),
                }
                continue;
            }
            if self.eof {
                match Pin::new(&mut *sock).poll_shutdown(cx) {
                    Poll::Ready(res) => res?,
                    Poll::Pending => return Ok(Poll::Pending),
                }
                self.done = true;
                continue;
            }
            match stream.poll_recv_chunks(cx, WRITE_GATHER, MAX_SLICES, &mut self.pending) {
                Poll::Ready(Ok(true)) => {}
                Poll::Ready(Ok(false)) => self.eof = true,
                Poll::Ready(Err(err)) => return Err(err),
                Poll::Pending => return Ok(Poll::Pending),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_half_closed_stream_that_stalls_is_cut_after_the_linger() {
        let (a, b) = tokio::io::duplex(64);
        let tracker = tokio_util::task::TaskTracker::new();
        let token = tokio_util::sync::CancellationToken::new();
        let config = crate::link::MuxConfig::default();
        let (relay, _relay_rx) = crate::link::Mux::start(
            a,
            BytesMut::new(),
            crate::link::Side::Relay,
            &config,
            &tracker,
            token.clone(),
        );
        let (_connector, mut connector_rx) = crate::link::Mux::start(
            b,
            BytesMut::new(),
            crate::link::Side::Connector,
            &config,
            &tracker,
            token.clone(),
        );
        let mut stream = relay.open(Bytes::from_static(b"h")).await.unwrap();
        // The peer accepts the stream but never answers or finishes.
        let _peer = connector_rx.incoming.recv().await.unwrap();
        let (mut visitor, mut near) = tokio::io::duplex(64);
        visitor.write_all(b"request").await.unwrap();
        visitor.shutdown().await.unwrap();
        let started = tokio::time::Instant::now();
        let err = splice_stream(&mut near, &mut stream).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= HALF_CLOSED_LINGER);
        token.cancel();
    }

    #[test]
    fn read_size_grows_with_full_reads_and_shrinks_with_small_ones() {
        let mut size = ReadSize::default();
        assert_eq!(size.get(), SMALL_READ);
        size.update(100);
        assert_eq!(size.get(), SMALL_READ, "never below the smallest size");
        size.update(SMALL_READ);
        assert_eq!(size.get(), 4 * SMALL_READ);
        size.update(4 * SMALL_READ);
        assert_eq!(size.get(), COPY_BUF);
        size.update(COPY_BUF);
        assert_eq!(size.get(), COPY_BUF, "never above the copy buffer");
        size.update(COPY_BUF / 4);
        assert_eq!(size.get(), COPY_BUF, "moderate reads keep the size");
        size.update(100);
        assert_eq!(size.get(), COPY_BUF / 2);
    }

    #[tokio::test]
    async fn splice_keeps_half_close() {
        // Two streams of one link, joined on the relay's side: what the
        // connector writes on one comes out of the other.
        let (a, b) = tokio::io::duplex(64 * 1024);
        let tracker = tokio_util::task::TaskTracker::new();
        let token = tokio_util::sync::CancellationToken::new();
        let config = crate::link::MuxConfig::default();
        let (_relay, mut relay_rx) = crate::link::Mux::start(
            a,
            BytesMut::new(),
            crate::link::Side::Relay,
            &config,
            &tracker,
            token.clone(),
        );
        let (connector, _connector_rx) = crate::link::Mux::start(
            b,
            BytesMut::new(),
            crate::link::Side::Connector,
            &config,
            &tracker,
            token.clone(),
        );
        let mut client = connector.open(Bytes::from_static(b"c")).await.unwrap();
        let mut near = relay_rx.incoming.recv().await.unwrap().stream;
        let mut server = connector.open(Bytes::from_static(b"s")).await.unwrap();
        let mut far = relay_rx.incoming.recv().await.unwrap().stream;
        let task = tokio::spawn(async move { splice(&mut near, &mut far).await });
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request");
        // The other direction still flows after the first one ended.
        server.write_all(b"late reply").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"late reply");
        assert_eq!(task.await.unwrap().unwrap(), (7, 10));
        token.cancel();
    }
}
