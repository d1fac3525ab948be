//! PageKite 1 (pagekite.py 1.5, upagekite) on the wire, sans-IO: the
//! handshake heads a back-end and a front-end exchange (`head.rs`), and the
//! chunks that carry every stream of a tunnel afterwards (`chunk.rs`:
//! framing, zlib "ZChunks", chunk headers).
//!
//! Start at [`parse_backend_hello`] (what a front-end reads first), then
//! [`ChunkDecoder`]. Every decoder is bounded before it allocates: a head
//! by [`MAX_HEAD`], its kite requests by [`MAX_KITE_REQUESTS`], a chunk by
//! [`MAX_CHUNK`] (declared plain and compressed size alike, and inflation
//! stops one byte past the declared size), chunk headers by
//! [`MAX_CHUNK_HEADERS`] and [`MAX_HEADER_LINE`]. No crypto here: a kite
//! request's signature is checked by the caller (`kitepipe::pagekite::sign`).
//! docs/pagekite.md maps the protocol and says what kitepipe does with
//! each header.

mod chunk;
mod head;
#[cfg(test)]
mod tests;

pub use chunk::{Chunk, ChunkDecoder, ChunkEncoder, ChunkHeaders, Eof};
pub use head::{
    BackEndHello, FrontEndHello, KiteAnswer, KiteRequest, Transport, build_backend_hello,
    build_frontend_hello, parse_backend_hello, parse_frontend_hello,
};

/// The largest handshake head (request or response, up to and including
/// the blank line). pagekite.py's heads are a few hundred bytes plus ~110
/// per kite; 16 KiB holds [`MAX_KITE_REQUESTS`] kites with room to spare.
pub const MAX_HEAD: usize = 16 * 1024;

/// The most kite requests (`X-PageKite:` lines) or answers one head or
/// NOOP chunk may carry. A back-end names each of its kites once; 64 is
/// far above what one pagekite.py process serves in practice.
pub const MAX_KITE_REQUESTS: usize = 64;

/// The largest chunk payload, plain (declared or inflated) and compressed
/// alike. pagekite.py sends at most its read size (16 KiB + headers) per
/// chunk; 256 KiB leaves room for other implementations and still bounds
/// what one chunk makes us hold.
pub const MAX_CHUNK: usize = 256 * 1024;

/// The most header lines in one chunk. A data chunk has at most seven
/// (SID, Proto, Host, Port, RIP, RPort, RTLS); a NOOP carrying kite
/// requests has one per kite plus a few.
pub const MAX_CHUNK_HEADERS: usize = MAX_KITE_REQUESTS + 16;

/// The longest header line, in a head or a chunk. A kite request is about
/// 110 bytes plus the domain (at most 253).
pub const MAX_HEADER_LINE: usize = 4096;

/// Why PageKite bytes could not be decoded. Offending text is cut to a few
/// dozen characters and printed escaped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageKiteError {
    /// No blank line within [`MAX_HEAD`] bytes.
    #[error("handshake head exceeds the maximum of {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// The first line is not a PageKite request (`CONNECT PageKite:1`,
    /// `GET /~:PageKite:~/...`) or response (`HTTP/1.x 200`, `101`).
    #[error("not a PageKite {expected} line: {line:?}")]
    BadStartLine {
        /// What was expected ("request" or "response").
        expected: &'static str,
        /// The line, cut.
        line: String,
    },
    /// The front-end answered with another status than 200 or 101.
    #[error("front-end answered with status {0:?}")]
    Refused(String),
    /// A header line without a colon, or not UTF-8.
    #[error("malformed header line {0:?}")]
    BadHeaderLine(String),
    /// A header line longer than [`MAX_HEADER_LINE`].
    #[error("header line exceeds the maximum of {MAX_HEADER_LINE} bytes")]
    HeaderLineTooLong,
    /// More header lines than [`MAX_CHUNK_HEADERS`] (a chunk) or than a
    /// head can hold.
    #[error("more than {0} header lines")]
    TooManyHeaders(usize),
    /// More than [`MAX_KITE_REQUESTS`] kite requests or answers.
    #[error("more than {MAX_KITE_REQUESTS} kite requests or answers")]
    TooManyKites,
    /// A kite request or answer that does not split into its fields, or
    /// whose fields hold characters they cannot.
    #[error("malformed kite {what}: {value:?}")]
    BadKite {
        /// Which value ("request", "answer").
        what: &'static str,
        /// The value, cut.
        value: String,
    },
    /// A chunk size line that is not `HEX`, `HEXZHEX`, with optional `R`.
    #[error("malformed chunk size line {0:?}")]
    BadChunkSize(String),
    /// A chunk size line that does not end within a few bytes.
    #[error("chunk size line too long")]
    ChunkSizeTooLong,
    /// A declared chunk size (plain or compressed) above [`MAX_CHUNK`].
    #[error("chunk of {0} bytes exceeds the maximum of {MAX_CHUNK}")]
    ChunkTooLarge(u64),
    /// A zero-length chunk: the peer's way of saying error/close.
    #[error("zero-length chunk (the peer closed the tunnel)")]
    EmptyChunk,
    /// A compressed chunk that did not inflate to its declared size (or
    /// did not inflate at all). Decoding may continue: the caller asks the
    /// peer to reset its compressor (`ZRST`).
    #[error("corrupt compressed chunk: declared {declared} bytes, inflated {inflated}")]
    Corrupt {
        /// The declared plain size.
        declared: usize,
        /// What inflated (at most `declared + 1`).
        inflated: usize,
    },
    /// A chunk without the blank line that ends its headers.
    #[error("chunk without an end of headers")]
    NoChunkHeaders,
    /// A chunk header whose value is not what it must be (SID not a u32,
    /// SKB not a number, EOF not `1[W][R]`).
    #[error("malformed chunk header {name}: {value:?}")]
    BadChunkHeader {
        /// The header's name.
        name: &'static str,
        /// The value, cut.
        value: String,
    },
}

/// What [`sniff`] looks for: a back-end's first line.
const SNIFF_PREFIXES: &[&[u8]] = &[b"CONNECT PageKite:", b"GET /~:PageKite:~/"];

/// Does `buf` start like a PageKite back-end's request?
///
/// `Some(true)`: it starts with `CONNECT PageKite:` or `GET /~:PageKite:~/`;
/// `Some(false)`: it cannot be one (e.g. a TLS ClientHello, another HTTP
/// request); `None`: too few bytes to tell.
pub fn sniff(buf: &[u8]) -> Option<bool> {
    let mut undecided = false;
    for prefix in SNIFF_PREFIXES {
        let n = buf.len().min(prefix.len());
        if buf[..n] == prefix[..n] {
            if n == prefix.len() {
                return Some(true);
            }
            undecided = true;
        }
    }
    if undecided { None } else { Some(false) }
}

/// Cuts peer text for an error message (the Display escapes it).
fn cut(text: &[u8]) -> String {
    const KEEP: usize = 64;
    let end = text.len().min(KEEP);
    String::from_utf8_lossy(&text[..end]).into_owned()
}
