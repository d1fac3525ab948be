//! Visitor streams and the byte-copy loop, shared by relay and connector.
//!
//! Start at [`splice_stream`] (a socket and a link stream, zero-copy) and
//! [`splice`] (any two byte streams). This room never dials or accepts: it is handed two
//! open byte streams and moves bytes between them, keeping half-close (EOF
//! one way shuts down that writer while the other way keeps flowing).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::link::MuxStream;

/// Copy buffer per direction. 64 KiB matches the largest DATA frame, so one
/// read from a socket becomes one frame on the link.
pub const COPY_BUF: usize = 64 * 1024;

/// Smallest read buffer: enough for the requests and answers of an
/// interactive or request/response connection.
pub const SMALL_READ: usize = 4 * 1024;

/// How much to read next from a socket: [`SMALL_READ`] while reads are
/// small, growing to [`COPY_BUF`] while they fill the buffer. Idle and
/// request/response connections then hold a few KiB instead of 64 KiB per
/// direction (peak memory with many visitors), bulk ones still move 64 KiB
/// per read.
#[derive(Debug, Clone, Copy)]
pub struct ReadSize(usize);

impl Default for ReadSize {
    fn default() -> Self {
        ReadSize(SMALL_READ)
    }
}

impl ReadSize {
    /// The size of the next read.
    pub fn get(self) -> usize {
        self.0
    }

    /// Learns from a read of `n` bytes into a buffer of [`Self::get`] bytes.
    pub fn update(&mut self, n: usize) {
        if n >= self.0 {
            self.0 = (self.0 * 4).min(COPY_BUF);
        } else if n < self.0 / 8 {
            self.0 = (self.0 / 2).max(SMALL_READ);
        }
    }
}

/// Copies both ways between `a` and `b` until both directions reach EOF;
/// returns the bytes moved a->b and b->a.
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, COPY_BUF, COPY_BUF).await
}

/// How long a half-closed connection (one direction finished) may go
/// without a byte in the other direction before it is cut. Fully open
/// connections may idle forever (SSH sessions do); a half-closed one whose
/// other end stopped reading would otherwise hold its sockets until the
/// kernel gives up, about 15 minutes.
pub const HALF_CLOSED_LINGER: Duration = Duration::from_secs(120);

/// Copies both ways between a socket and a link stream until both
/// directions reach EOF, without copying through an intermediate buffer:
/// bytes read from the socket become DATA frames as they are, and received
/// frames are written to the socket as they are. Returns the bytes moved
/// socket->stream and stream->socket.
pub async fn splice_stream<S>(sock: &mut S, stream: &mut MuxStream) -> io::Result<(u64, u64)>
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
            return Poll::Ready(Ok((up.moved, down.moved)));
        }
        if up_done.is_ready() || down_done.is_ready() {
            // Half-closed: the other direction must keep making progress.
            let moved = up.moved + down.moved;
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

/// Socket -> stream.
#[derive(Default)]
struct Up {
    buf: BytesMut,
    size: ReadSize,
    pending: Bytes,
    eof: bool,
    done: bool,
    moved: u64,
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
        loop {
            if self.done {
                return Ok(Poll::Ready(()));
            }
            if !self.pending.is_empty() {
                match stream.poll_send_chunk(cx, &mut self.pending) {
                    Poll::Ready(res) => res?,
                    Poll::Pending => return Ok(Poll::Pending),
                }
                continue;
            }
            if self.eof {
                match Pin::new(&mut *stream).poll_shutdown(cx) {
                    Poll::Ready(res) => res?,
                    Poll::Pending => return Ok(Poll::Pending),
                }
                self.done = true;
                continue;
            }
            let want = self.size.get();
            if self.buf.capacity() < want / 2 {
                // A fresh buffer: the previous one may still be held by
                // payloads in flight.
                self.buf = BytesMut::with_capacity(want);
            }
            let room = self.buf.capacity();
            match tokio_util::io::poll_read_buf(Pin::new(&mut *sock), cx, &mut self.buf) {
                Poll::Ready(Ok(0)) => self.eof = true,
                Poll::Ready(Ok(n)) => {
                    self.size.update(if n >= room { want } else { n });
                    self.moved += n as u64;
                    self.pending = self.buf.split().freeze();
                }
                Poll::Ready(Err(err)) => return Err(err),
                Poll::Pending => return Ok(Poll::Pending),
            }
        }
    }
}

/// Most bytes and chunks gathered into one socket write.
const WRITE_GATHER: usize = 256 * 1024;
const GATHER_CHUNKS: usize = 32;

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
                let slices: Vec<io::IoSlice<'_>> =
                    self.pending.iter().map(|c| io::IoSlice::new(c)).collect();
                match Pin::new(&mut *sock).poll_write_vectored(cx, &slices) {
                    Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                    Poll::Ready(Ok(mut n)) => {
                        self.moved += n as u64;
                        while n > 0 {
                            let front =
                                self.pending.front_mut().expect("written bytes were queued");
                            if n >= front.len() {
                                n -= front.len();
                                self.pending.pop_front();
                            } else {
                                front.advance(n);
                                n = 0;
                            }
                        }
                    }
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
            match stream.poll_recv_chunks(cx, WRITE_GATHER, GATHER_CHUNKS, &mut self.pending) {
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
        let (mut client, mut near) = tokio::io::duplex(16);
        let (mut far, mut server) = tokio::io::duplex(16);
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
    }
}
