//! The link's framing: every byte on a link travels inside a frame.
//!
//! A frame is a 9-byte header followed by its payload:
//!
//! ```text
//! +--------+----------------+----------------+-----------------+
//! | type:8 | stream id:32BE | length:32BE    | payload (length) |
//! +--------+----------------+----------------+-----------------+
//! ```
//!
//! Stream 0 is the link itself (control messages, pings). Streams opened by
//! the connector have odd ids, streams opened by the relay even ids, so both
//! sides can open streams without coordinating. See `docs/protocol.md`.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 9;

/// Largest payload a peer may send in one frame. Checked before anything is
/// allocated. 256 KiB bounds the buffer a hostile peer can make us hold per
/// frame, while staying well above the data frames we emit.
pub const MAX_PAYLOAD: usize = 256 * 1024;

/// Largest DATA payload we emit. 64 KiB keeps per-frame overhead under 0.02%
/// while letting streams interleave finely enough that one busy stream does
/// not add noticeable latency to others.
pub const MAX_DATA_PAYLOAD: usize = 64 * 1024;

/// Largest reason text carried in RESET and GOAWAY frames.
pub const MAX_REASON_LEN: usize = 1024;

/// The link-level stream id (control messages, pings, goaway).
pub const LINK_STREAM: u32 = 0;

/// Default heartbeat: a link silent this long is dead, and so is one whose
/// peer answers none of our pings ([`Frame::Ping`]) for two of it. Pings go
/// out every third of it, which also keeps NAT mappings alive (home routers
/// and CGNAT forget idle TCP flows after minutes, never seconds).
pub const DEFAULT_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(15);

/// One frame of the link protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Bytes for a stream, counted against the receiver's stream window.
    Data {
        /// Stream the bytes belong to.
        stream: u32,
        /// The bytes.
        payload: Bytes,
    },
    /// Opens a stream; the payload is an encoded [`crate::message::StreamHeader`].
    Open {
        /// Id of the new stream; its parity must match the opener's side.
        stream: u32,
        /// Encoded stream header.
        header: Bytes,
    },
    /// The sender will send no more DATA on this stream (half-close).
    Fin {
        /// Stream being half-closed.
        stream: u32,
    },
    /// The stream is aborted in both directions.
    Reset {
        /// Stream being aborted.
        stream: u32,
        /// Why, as a code the receiver can act on.
        code: ResetCode,
        /// Why, for humans (at most [`MAX_REASON_LEN`] bytes).
        reason: String,
    },
    /// The receiver of this frame may send `increment` more DATA bytes.
    Window {
        /// Stream whose window grows.
        stream: u32,
        /// Bytes added to the window.
        increment: u32,
    },
    /// Liveness probe; the peer answers with [`Frame::Pong`] carrying the same value.
    Ping {
        /// Opaque value echoed back.
        payload: u64,
    },
    /// Answer to a [`Frame::Ping`].
    Pong {
        /// The value from the ping.
        payload: u64,
    },
    /// A control message on the link stream (an encoded message from [`crate::message`]).
    Control {
        /// Encoded message.
        payload: Bytes,
    },
    /// The sender is closing the link.
    GoAway {
        /// Why, as a code.
        code: ResetCode,
        /// Why, for humans.
        reason: String,
    },
}

/// Why a stream was reset or a link closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResetCode {
    /// The owner closed it without finishing (no error).
    Cancel,
    /// The target behind the stream could not be reached (refused, timed out).
    TargetUnreachable,
    /// The stream header named something this side does not serve.
    NoSuchKite,
    /// Too many streams, or the acceptor is overloaded.
    Busy,
    /// The peer broke the protocol on this stream (e.g. overran its window).
    ProtocolError,
    /// The peer is not allowed to do this.
    Refused,
    /// The node is shutting down.
    Shutdown,
    /// A code this version does not know.
    Unknown(u32),
}

/// Why bytes could not be decoded into a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The header names a frame type this version does not know.
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    /// The length field exceeds [`MAX_PAYLOAD`].
    #[error("frame payload of {0} bytes exceeds the maximum of {MAX_PAYLOAD}")]
    TooLarge(u32),
    /// A fixed-size frame has the wrong length.
    #[error("{kind} frame has length {len}, expected {expected}")]
    BadLength {
        /// Frame type name.
        kind: &'static str,
        /// Length found.
        len: u32,
        /// Length required.
        expected: u32,
    },
    /// A frame that belongs to stream 0 names another stream, or the reverse.
    #[error("{kind} frame on stream {stream} is not allowed")]
    BadStream {
        /// Frame type name.
        kind: &'static str,
        /// Stream id found.
        stream: u32,
    },
}

const T_DATA: u8 = 0;
const T_OPEN: u8 = 1;
const T_FIN: u8 = 2;
const T_RESET: u8 = 3;
const T_WINDOW: u8 = 4;
const T_PING: u8 = 5;
const T_PONG: u8 = 6;
const T_CONTROL: u8 = 7;
const T_GOAWAY: u8 = 8;

impl ResetCode {
    /// The code's wire value.
    pub fn to_wire(self) -> u32 {
        match self {
            ResetCode::Cancel => 0,
            ResetCode::TargetUnreachable => 1,
            ResetCode::NoSuchKite => 2,
            ResetCode::Busy => 3,
            ResetCode::ProtocolError => 4,
            ResetCode::Refused => 5,
            ResetCode::Shutdown => 6,
            ResetCode::Unknown(n) => n,
        }
    }

    /// The code for a wire value.
    pub fn from_wire(n: u32) -> ResetCode {
        match n {
            0 => ResetCode::Cancel,
            1 => ResetCode::TargetUnreachable,
            2 => ResetCode::NoSuchKite,
            3 => ResetCode::Busy,
            4 => ResetCode::ProtocolError,
            5 => ResetCode::Refused,
            6 => ResetCode::Shutdown,
            n => ResetCode::Unknown(n),
        }
    }
}

impl std::fmt::Display for ResetCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResetCode::Cancel => f.write_str("cancelled"),
            ResetCode::TargetUnreachable => f.write_str("target unreachable"),
            ResetCode::NoSuchKite => f.write_str("no such kite"),
            ResetCode::Busy => f.write_str("busy"),
            ResetCode::ProtocolError => f.write_str("protocol error"),
            ResetCode::Refused => f.write_str("refused"),
            ResetCode::Shutdown => f.write_str("shutting down"),
            ResetCode::Unknown(n) => write!(f, "code {n}"),
        }
    }
}

impl Frame {
    /// Appends the encoded frame to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        match self {
            Frame::Data { stream, payload } => {
                put_header(dst, T_DATA, *stream, payload.len());
                dst.put_slice(payload);
            }
            Frame::Open { stream, header } => {
                put_header(dst, T_OPEN, *stream, header.len());
                dst.put_slice(header);
            }
            Frame::Fin { stream } => put_header(dst, T_FIN, *stream, 0),
            Frame::Reset {
                stream,
                code,
                reason,
            } => {
                let reason = clip(reason);
                put_header(dst, T_RESET, *stream, 4 + reason.len());
                dst.put_u32(code.to_wire());
                dst.put_slice(reason.as_bytes());
            }
            Frame::Window { stream, increment } => {
                put_header(dst, T_WINDOW, *stream, 4);
                dst.put_u32(*increment);
            }
            Frame::Ping { payload } => {
                put_header(dst, T_PING, LINK_STREAM, 8);
                dst.put_u64(*payload);
            }
            Frame::Pong { payload } => {
                put_header(dst, T_PONG, LINK_STREAM, 8);
                dst.put_u64(*payload);
            }
            Frame::Control { payload } => {
                put_header(dst, T_CONTROL, LINK_STREAM, payload.len());
                dst.put_slice(payload);
            }
            Frame::GoAway { code, reason } => {
                let reason = clip(reason);
                put_header(dst, T_GOAWAY, LINK_STREAM, 4 + reason.len());
                dst.put_u32(code.to_wire());
                dst.put_slice(reason.as_bytes());
            }
        }
    }

    /// Decodes one frame from the front of `src`, consuming its bytes.
    ///
    /// Returns `Ok(None)` while the frame is incomplete; nothing is consumed
    /// then. The length is checked against [`MAX_PAYLOAD`] before waiting for
    /// (or allocating) the payload.
    pub fn decode(src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let Some(header) = Frame::peek_header(src)? else {
            return Ok(None);
        };
        if src.len() < header.frame_len() {
            src.reserve(header.frame_len() - src.len());
            return Ok(None);
        }
        let (kind, stream, len) = (src[0], header.stream, header.len);
        src.advance(HEADER_LEN);
        let mut payload = src.split_to(len).freeze();
        let frame = match kind {
            T_DATA => Frame::Data { stream, payload },
            T_OPEN => Frame::Open {
                stream,
                header: payload,
            },
            T_FIN => Frame::Fin { stream },
            T_RESET => {
                let code = ResetCode::from_wire(payload.get_u32());
                Frame::Reset {
                    stream,
                    code,
                    reason: String::from_utf8_lossy(&payload).into_owned(),
                }
            }
            T_WINDOW => Frame::Window {
                stream,
                increment: payload.get_u32(),
            },
            T_PING => Frame::Ping {
                payload: payload.get_u64(),
            },
            T_PONG => Frame::Pong {
                payload: payload.get_u64(),
            },
            T_CONTROL => Frame::Control { payload },
            T_GOAWAY => {
                let code = ResetCode::from_wire(payload.get_u32());
                Frame::GoAway {
                    code,
                    reason: String::from_utf8_lossy(&payload).into_owned(),
                }
            }
            // check_shape rejected every other type.
            other => return Err(FrameError::UnknownType(other)),
        };
        Ok(Some(frame))
    }

    /// The header at the front of `src` once all [`HEADER_LEN`] bytes of
    /// it have arrived, checked as [`Frame::decode`] checks it (type,
    /// stream, length) before any of the payload is there. A reader uses it
    /// to know how much more a frame needs, and to pass a DATA frame's
    /// payload on in pieces as it arrives: DATA payload is a byte stream.
    pub fn peek_header(src: &[u8]) -> Result<Option<Header>, FrameError> {
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let kind = src[0];
        let stream = u32::from_be_bytes([src[1], src[2], src[3], src[4]]);
        let len = u32::from_be_bytes([src[5], src[6], src[7], src[8]]);
        if len as usize > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(len));
        }
        check_shape(kind, stream, len)?;
        Ok(Some(Header {
            is_data: kind == T_DATA,
            stream,
            len: len as usize,
        }))
    }

    /// The encoded size of a DATA frame header plus `payload_len` bytes.
    pub fn data_len(payload_len: usize) -> usize {
        HEADER_LEN + payload_len
    }
}

/// A checked frame header (see [`Frame::peek_header`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// A DATA frame.
    pub is_data: bool,
    /// The frame's stream.
    pub stream: u32,
    /// Payload length.
    pub len: usize,
}

impl Header {
    /// Header and payload length.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.len
    }
}

/// Writes a frame header for a payload of `len` bytes; the caller writes the payload.
pub fn put_header(dst: &mut BytesMut, kind: u8, stream: u32, len: usize) {
    dst.reserve(HEADER_LEN + len);
    dst.put_u8(kind);
    dst.put_u32(stream);
    // Every payload we build is bounded by MAX_PAYLOAD, far below u32::MAX.
    dst.put_u32(len as u32);
}

/// Writes a DATA frame header; the caller appends `len` payload bytes.
pub fn put_data_header(dst: &mut BytesMut, stream: u32, len: usize) {
    put_header(dst, T_DATA, stream, len);
}

fn clip(reason: &str) -> &str {
    if reason.len() <= MAX_REASON_LEN {
        return reason;
    }
    let mut end = MAX_REASON_LEN;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

fn check_shape(kind: u8, stream: u32, len: u32) -> Result<(), FrameError> {
    let (name, on_link, exact, min) = match kind {
        T_DATA => ("DATA", false, None, 0),
        T_OPEN => ("OPEN", false, None, 0),
        T_FIN => ("FIN", false, Some(0), 0),
        T_RESET => ("RESET", false, None, 4),
        T_WINDOW => ("WINDOW", false, Some(4), 0),
        T_PING => ("PING", true, Some(8), 0),
        T_PONG => ("PONG", true, Some(8), 0),
        T_CONTROL => ("CONTROL", true, None, 0),
        T_GOAWAY => ("GOAWAY", true, None, 4),
        other => return Err(FrameError::UnknownType(other)),
    };
    if on_link != (stream == LINK_STREAM) {
        return Err(FrameError::BadStream { kind: name, stream });
    }
    if let Some(expected) = exact
        && len != expected
    {
        return Err(FrameError::BadLength {
            kind: name,
            len,
            expected,
        });
    }
    if len < min {
        return Err(FrameError::BadLength {
            kind: name,
            len,
            expected: min,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Data {
                stream: 1,
                payload: Bytes::from_static(b"hello"),
            },
            Frame::Data {
                stream: 3,
                payload: Bytes::new(),
            },
            Frame::Open {
                stream: 2,
                header: Bytes::from_static(b"{\"kind\":\"visitor\"}"),
            },
            Frame::Fin { stream: 7 },
            Frame::Reset {
                stream: 9,
                code: ResetCode::TargetUnreachable,
                reason: "connection refused".into(),
            },
            Frame::Window {
                stream: 11,
                increment: 65536,
            },
            Frame::Ping { payload: 42 },
            Frame::Pong { payload: 42 },
            Frame::Control {
                payload: Bytes::from_static(b"{}"),
            },
            Frame::GoAway {
                code: ResetCode::Shutdown,
                reason: "bye".into(),
            },
            Frame::Reset {
                stream: 1,
                code: ResetCode::Unknown(99),
                reason: String::new(),
            },
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        for frame in all_frames() {
            let mut buf = BytesMut::new();
            frame.encode(&mut buf);
            let decoded = Frame::decode(&mut buf).unwrap().unwrap();
            assert_eq!(decoded, frame);
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn peek_header_checks_a_header_before_its_payload_arrives() {
        let mut wire = BytesMut::new();
        Frame::Data {
            stream: 5,
            payload: Bytes::from(vec![7u8; 1000]),
        }
        .encode(&mut wire);
        assert_eq!(Frame::peek_header(&wire[..HEADER_LEN - 1]).unwrap(), None);
        let data = Header {
            is_data: true,
            stream: 5,
            len: 1000,
        };
        assert_eq!(Frame::peek_header(&wire[..HEADER_LEN]).unwrap(), Some(data));
        assert_eq!(data.frame_len(), wire.len());
        let mut control = BytesMut::new();
        Frame::Control {
            payload: Bytes::from(vec![1u8; 100]),
        }
        .encode(&mut control);
        let header = Frame::peek_header(&control[..50]).unwrap().unwrap();
        assert!(!header.is_data && header.stream == LINK_STREAM && header.len == 100);
        // DATA on the link stream, or longer than any frame: refused.
        let mut bad = wire[..20].to_vec();
        bad[1..5].copy_from_slice(&0u32.to_be_bytes());
        assert!(Frame::peek_header(&bad).is_err());
        bad[1..5].copy_from_slice(&5u32.to_be_bytes());
        bad[5..9].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(Frame::peek_header(&bad).is_err());
    }

    #[test]
    fn frames_fed_one_byte_at_a_time_decode_in_order() {
        let mut wire = BytesMut::new();
        for frame in all_frames() {
            frame.encode(&mut wire);
        }
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for byte in wire.iter() {
            buf.put_u8(*byte);
            while let Some(frame) = Frame::decode(&mut buf).unwrap() {
                out.push(frame);
            }
        }
        assert_eq!(out, all_frames());
    }

    #[test]
    fn oversized_length_is_refused_before_the_payload_arrives() {
        let mut buf = BytesMut::new();
        put_header(&mut buf, T_DATA, 1, 0);
        buf[5..9].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_be_bytes());
        assert_eq!(
            Frame::decode(&mut buf),
            Err(FrameError::TooLarge(MAX_PAYLOAD as u32 + 1))
        );
    }

    #[test]
    fn malformed_headers_are_errors() {
        let cases: &[(&[u8], FrameError)] = &[
            (
                &[0x42, 0, 0, 0, 1, 0, 0, 0, 0],
                FrameError::UnknownType(0x42),
            ),
            (
                &[T_PING, 0, 0, 0, 0, 0, 0, 0, 4],
                FrameError::BadLength {
                    kind: "PING",
                    len: 4,
                    expected: 8,
                },
            ),
            (
                &[T_DATA, 0, 0, 0, 0, 0, 0, 0, 0],
                FrameError::BadStream {
                    kind: "DATA",
                    stream: 0,
                },
            ),
            (
                &[T_CONTROL, 0, 0, 0, 5, 0, 0, 0, 0],
                FrameError::BadStream {
                    kind: "CONTROL",
                    stream: 5,
                },
            ),
            (
                &[T_RESET, 0, 0, 0, 1, 0, 0, 0, 2],
                FrameError::BadLength {
                    kind: "RESET",
                    len: 2,
                    expected: 4,
                },
            ),
        ];
        for (bytes, expected) in cases {
            let mut buf = BytesMut::from(*bytes);
            assert_eq!(Frame::decode(&mut buf).as_ref(), Err(expected), "{bytes:?}");
        }
    }

    #[test]
    fn long_reasons_are_clipped_on_a_char_boundary() {
        let reason = "é".repeat(MAX_REASON_LEN);
        let mut buf = BytesMut::new();
        Frame::Reset {
            stream: 1,
            code: ResetCode::Cancel,
            reason,
        }
        .encode(&mut buf);
        match Frame::decode(&mut buf).unwrap().unwrap() {
            Frame::Reset { reason, .. } => {
                assert!(reason.len() <= MAX_REASON_LEN);
                assert!(reason.chars().all(|c| c == 'é'));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn garbage_never_panics() {
        // A cheap deterministic sweep; the fuzz target covers the rest.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let mut buf = BytesMut::new();
            for _ in 0..(seed % 40) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                buf.put_u8(seed as u8);
            }
            while let Ok(Some(_)) = Frame::decode(&mut buf) {}
        }
    }
}
