//! Chunks: the framing of a tunnel after the handshake, both ways.
//!
//! A chunk is `HEXLEN\r\n` + payload, or, compressed ("ZChunks"),
//! `HEXPLAIN Z HEXCOMPRESSED [R]\r\n` + zlib data: one zlib stream per
//! direction, sync-flushed after every chunk, `R` telling the receiver the
//! sender started a new stream (a plain chunk may carry `R` too). The
//! payload is `Name: value\r\n...\r\n\r\n` + data. A zero-length chunk is
//! an error: the peer gives up on the tunnel.

use bytes::{Buf, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::head::{KiteAnswer, KiteRequest, header, invalid_reasons, parse_header_lines};
use super::{MAX_CHUNK, MAX_CHUNK_HEADERS, MAX_KITE_REQUESTS, PageKiteError, cut};

/// The longest size line we wait for: `40000Z40000R` is 12 characters;
/// leading zeros and whitespace aside, 32 is plenty.
const MAX_SIZE_LINE: usize = 32;

/// Payloads shorter than this go out plain even when compressing, like
/// pagekite.py (deflate would make them bigger).
const MIN_COMPRESS: usize = 65;

/// The compression level: pagekite.py's front-end uses 1 (fast), its
/// back-end 9; a relay serving many tunnels wants the cheap one.
const LEVEL: u32 = 1;

/// `EOF:` of a chunk: which halves of a stream the sender closed.
///
/// `read`: the sender read EOF from its side (it sends no more data: shut
/// down our writer toward our side). `write`: the sender can no longer
/// write to its side (stop sending it data). A bare `EOF: 1` means both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Eof {
    /// `W`: the sender's side stopped taking data.
    pub write: bool,
    /// `R`: the sender's side stopped sending data.
    pub read: bool,
}

/// The headers of one chunk. Unknown headers are kept in `other`, in
/// order; of repeated known headers the first counts (like pagekite.py's
/// `parse.Header(name)[0]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkHeaders {
    /// `SID`: the stream.
    pub sid: Option<u32>,
    /// `Proto`: the new stream's protocol (`http`, `https`, `raw`, ...).
    pub proto: Option<String>,
    /// `Host`: the kite the visitor asked for.
    pub host: Option<String>,
    /// `Port`: the front-end port the visitor reached.
    pub port: Option<String>,
    /// `RIP`: the visitor's address.
    pub rip: Option<String>,
    /// `RPort`: the visitor's port.
    pub rport: Option<String>,
    /// `RTLS`: the visitor reached the front-end over TLS it terminated.
    pub rtls: bool,
    /// `EOF`: half or full close of the stream.
    pub eof: Option<Eof>,
    /// `NOOP`: the chunk carries no stream data (directives only).
    pub noop: bool,
    /// `PING`: the peer asks for a `PONG` with this value.
    pub ping: Option<String>,
    /// `PONG`: the answer to our `PING`.
    pub pong: Option<String>,
    /// `ZRST`: the peer could not inflate our chunks; reset our compressor.
    pub zrst: bool,
    /// `SKB`: the peer wrote this many KiB of the stream out to its side.
    pub skb: Option<u64>,
    /// `X-PageKite:` kite requests (AddKites), at most [`MAX_KITE_REQUESTS`].
    pub requests: Vec<KiteRequest>,
    /// Kite answers (`X-PageKite-OK`, ...), at most [`MAX_KITE_REQUESTS`].
    pub answers: Vec<KiteAnswer>,
    /// Every other header (`SPD`, `Quota`, `X-PageKite-Features`, ...),
    /// names lowercase; bounded by [`MAX_CHUNK_HEADERS`].
    pub other: Vec<(String, String)>,
}

/// One decoded chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Its headers.
    pub headers: ChunkHeaders,
    /// What follows the headers: stream data (or, in a NOOP, filler).
    pub data: Bytes,
}

/// Decodes chunks, inflating compressed ones with the direction's zlib
/// stream.
pub struct ChunkDecoder {
    inflate: Decompress,
}

/// Encodes chunks, compressing (when enabled) with the direction's zlib
/// stream.
pub struct ChunkEncoder {
    deflate: Option<Compress>,
    /// The next chunk carries `R`: we started a new zlib stream.
    reset_pending: bool,
}

impl ChunkHeaders {
    /// Headers of a data chunk of stream `sid`.
    pub fn sid(sid: u32) -> ChunkHeaders {
        ChunkHeaders {
            sid: Some(sid),
            ..ChunkHeaders::default()
        }
    }

    /// Headers of a NOOP chunk.
    pub fn noop() -> ChunkHeaders {
        ChunkHeaders {
            noop: true,
            ..ChunkHeaders::default()
        }
    }

    /// Parses the header block of a chunk (without its blank line).
    pub fn parse(block: &[u8]) -> Result<ChunkHeaders, PageKiteError> {
        let lines = block
            .split(|b| *b == b'\n')
            .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
            .filter(|line| !line.is_empty());
        let pairs = parse_header_lines(lines, MAX_CHUNK_HEADERS)?;
        let why = invalid_reasons(&pairs);
        let mut headers = ChunkHeaders::default();
        for (name, value) in pairs {
            let first = |slot: &mut Option<String>| {
                slot.get_or_insert_with(|| value.clone());
            };
            match name.as_str() {
                "sid" => {
                    if headers.sid.is_none() {
                        headers.sid = Some(parse_number("SID", &value)?);
                    }
                }
                "proto" => first(&mut headers.proto),
                "host" => first(&mut headers.host),
                "port" => first(&mut headers.port),
                "rip" => first(&mut headers.rip),
                "rport" => first(&mut headers.rport),
                "rtls" => headers.rtls = !matches!(value.as_str(), "" | "0"),
                "eof" => {
                    if headers.eof.is_none() {
                        let write = value.contains('W');
                        let read = value.contains('R');
                        headers.eof = Some(if write || read {
                            Eof { write, read }
                        } else {
                            Eof {
                                write: true,
                                read: true,
                            }
                        });
                    }
                }
                "noop" => headers.noop = true,
                "ping" => first(&mut headers.ping),
                "pong" => first(&mut headers.pong),
                "zrst" => headers.zrst = true,
                "skb" => {
                    if headers.skb.is_none() {
                        headers.skb = Some(parse_number("SKB", &value)?);
                    }
                }
                "x-pagekite" => {
                    if headers.requests.len() == MAX_KITE_REQUESTS {
                        return Err(PageKiteError::TooManyKites);
                    }
                    headers.requests.push(KiteRequest::parse(&value)?);
                }
                _ => match KiteAnswer::from_header(&name, &value, &why)? {
                    Some(answer) => {
                        if headers.answers.len() == MAX_KITE_REQUESTS {
                            return Err(PageKiteError::TooManyKites);
                        }
                        headers.answers.push(answer);
                    }
                    None => headers.other.push((name, value)),
                },
            }
        }
        Ok(headers)
    }

    /// The header block, ending with its blank line (an empty block is
    /// the blank line alone, `\r\n\r\n`, so the payload still splits).
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        if *self == ChunkHeaders::default() {
            return "\r\n\r\n".to_string();
        }
        if self.noop {
            out.push_str("NOOP: 1\r\n");
        }
        if let Some(sid) = self.sid {
            header(&mut out, "SID", &sid.to_string());
        }
        let optional = [
            ("Proto", &self.proto),
            ("Host", &self.host),
            ("Port", &self.port),
            ("RIP", &self.rip),
            ("RPort", &self.rport),
        ];
        for (name, value) in optional {
            if let Some(value) = value {
                header(&mut out, name, value);
            }
        }
        if self.rtls {
            out.push_str("RTLS: 1\r\n");
        }
        if let Some(eof) = self.eof {
            let w = if eof.write { "W" } else { "" };
            let r = if eof.read { "R" } else { "" };
            header(&mut out, "EOF", &format!("1{w}{r}"));
        }
        if let Some(ping) = &self.ping {
            header(&mut out, "PING", ping);
        }
        if let Some(pong) = &self.pong {
            header(&mut out, "PONG", pong);
        }
        if self.zrst {
            out.push_str("ZRST: 1\r\n");
        }
        if let Some(skb) = self.skb {
            header(&mut out, "SKB", &skb.to_string());
        }
        for request in &self.requests {
            header(&mut out, "X-PageKite", &request.header_value());
        }
        for answer in &self.answers {
            for (name, value) in answer.header_lines() {
                header(&mut out, name, &value);
            }
        }
        for (name, value) in &self.other {
            header(&mut out, name, value);
        }
        out.push_str("\r\n");
        out
    }
}

impl Default for ChunkDecoder {
    fn default() -> Self {
        ChunkDecoder::new()
    }
}

impl ChunkDecoder {
    /// A decoder with a fresh zlib stream.
    pub fn new() -> ChunkDecoder {
        ChunkDecoder {
            inflate: Decompress::new(true),
        }
    }

    /// Takes one whole chunk off the front of `buf`; `Ok(None)`: need more
    /// bytes (nothing is consumed until the whole chunk is there, at most
    /// [`MAX_CHUNK`] plus its size line).
    ///
    /// Errors in the size line (malformed, oversized, zero) leave `buf` as
    /// it was: the framing is lost and the tunnel must close. Errors inside
    /// a well-framed chunk consume it, so decoding may continue:
    /// [`PageKiteError::Corrupt`] (the caller asks the peer for `ZRST`; the
    /// decoder starts a new zlib stream and expects the peer's next
    /// compressed chunk to carry `R`), or malformed headers.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Chunk>, PageKiteError> {
        let window = &buf[..buf.len().min(MAX_SIZE_LINE)];
        let Some(eol) = window.windows(2).position(|w| w == b"\r\n") else {
            if buf.len() >= MAX_SIZE_LINE {
                return Err(PageKiteError::ChunkSizeTooLong);
            }
            return Ok(None);
        };
        let size = SizeLine::parse(&buf[..eol])?;
        let total = eol + 2 + size.wire_len;
        if buf.len() < total {
            return Ok(None);
        }
        buf.advance(eol + 2);
        let wire = buf.split_to(size.wire_len).freeze();
        if size.reset {
            self.inflate.reset(true);
        }
        let payload = match size.plain_len {
            None => wire,
            Some(declared) => match self.inflate_exact(&wire, declared) {
                Ok(plain) => plain,
                Err(inflated) => {
                    self.inflate.reset(true);
                    return Err(PageKiteError::Corrupt { declared, inflated });
                }
            },
        };
        let Some(end) = payload.windows(4).position(|w| w == b"\r\n\r\n") else {
            return Err(PageKiteError::NoChunkHeaders);
        };
        let headers = ChunkHeaders::parse(&payload[..end])?;
        Ok(Some(Chunk {
            headers,
            data: payload.slice(end + 4..),
        }))
    }

    /// Inflates `input` to exactly `declared` bytes, stopping one byte past
    /// it (a zip bomb inflates no further); `Err(n)`: it inflated to `n`
    /// bytes instead, or was not zlib.
    fn inflate_exact(&mut self, input: &[u8], declared: usize) -> Result<Bytes, usize> {
        let mut out = vec![0u8; declared + 1];
        let (mut read, mut written) = (0usize, 0usize);
        loop {
            let (in_before, out_before) = (self.inflate.total_in(), self.inflate.total_out());
            let status = self
                .inflate
                .decompress(&input[read..], &mut out[written..], FlushDecompress::Sync)
                .map_err(|_| written)?;
            // Progress per call is bounded by the slices' lengths.
            read += usize::try_from(self.inflate.total_in() - in_before).unwrap_or(usize::MAX);
            written += usize::try_from(self.inflate.total_out() - out_before).unwrap_or(usize::MAX);
            let stuck =
                self.inflate.total_in() == in_before && self.inflate.total_out() == out_before;
            if read >= input.len() || written >= out.len() || stuck || status == Status::StreamEnd {
                break;
            }
        }
        if written != declared || read != input.len() {
            return Err(written);
        }
        out.truncate(declared);
        Ok(Bytes::from(out))
    }
}

impl ChunkEncoder {
    /// An encoder; `compress`: send ZChunks (both ends announced
    /// `ZChunks`).
    pub fn new(compress: bool) -> ChunkEncoder {
        ChunkEncoder {
            deflate: compress.then(|| Compress::new(Compression::new(LEVEL), true)),
            reset_pending: false,
        }
    }

    /// Appends one chunk with `headers` and `data` to `out`, compressed if
    /// enabled and worth it. The caller keeps `data` small (the pump sends
    /// at most 16 KiB per chunk); the whole payload must stay within
    /// [`MAX_CHUNK`] for the peer to take it.
    pub fn encode(&mut self, headers: &ChunkHeaders, data: &[u8], out: &mut BytesMut) {
        let head = headers.to_text();
        if head.len() + data.len() >= MIN_COMPRESS
            && let Some(deflate) = &mut self.deflate
        {
            let mut payload = head.into_bytes();
            payload.extend_from_slice(data);
            let compressed = deflate_sync(deflate, &payload);
            let reset = std::mem::take(&mut self.reset_pending);
            let line = format!(
                "{:x}Z{:x}{}\r\n",
                payload.len(),
                compressed.len(),
                if reset { "R" } else { "" }
            );
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(&compressed);
            return;
        }
        self.frame_plain(head.as_bytes(), data, out);
    }

    /// Appends one chunk, never compressed (NOOPs: pings, pongs, SKB,
    /// control), like pagekite.py's `compress=False`.
    pub fn encode_plain(&mut self, headers: &ChunkHeaders, data: &[u8], out: &mut BytesMut) {
        self.frame_plain(headers.to_text().as_bytes(), data, out);
    }

    /// The peer sent `ZRST`: start a new zlib stream; the next chunk says
    /// `R`. Nothing to do when not compressing.
    pub fn reset(&mut self) {
        if let Some(deflate) = &mut self.deflate {
            deflate.reset();
            self.reset_pending = true;
        }
    }

    /// Frames `head` + `data` uncompressed straight into `out` (no
    /// intermediate payload copy: this is the bulk path toward peers
    /// without ZChunks).
    fn frame_plain(&mut self, head: &[u8], data: &[u8], out: &mut BytesMut) {
        let reset = std::mem::take(&mut self.reset_pending);
        let line = format!(
            "{:x}{}\r\n",
            head.len() + data.len(),
            if reset { "R" } else { "" }
        );
        out.reserve(line.len() + head.len() + data.len());
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(head);
        out.extend_from_slice(data);
    }
}

/// Deflates `input` and sync-flushes, so the peer can inflate the chunk
/// on its own.
fn deflate_sync(deflate: &mut Compress, input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len() / 2 + 64);
    let mut read = 0usize;
    loop {
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity().max(256));
        }
        let before = deflate.total_in();
        // Compressing into a Vec with spare room cannot fail: the only
        // errors are for a stream in an impossible state.
        let _ = deflate.compress_vec(&input[read..], &mut out, FlushCompress::Sync);
        read += usize::try_from(deflate.total_in() - before).unwrap_or(usize::MAX);
        // Done when all input is in and the flush fit (room left over).
        if read >= input.len() && out.capacity() > out.len() {
            break;
        }
    }
    out
}

/// A parsed size line.
struct SizeLine {
    /// Bytes of the chunk on the wire (after the size line).
    wire_len: usize,
    /// For a compressed chunk, its declared plain size.
    plain_len: Option<usize>,
    /// `R`: the sender started a new zlib stream.
    reset: bool,
}

impl SizeLine {
    fn parse(line: &[u8]) -> Result<SizeLine, PageKiteError> {
        let bad = || PageKiteError::BadChunkSize(cut(line));
        let text = std::str::from_utf8(line).map_err(|_| bad())?.trim();
        let (text, reset) = match text.strip_suffix('R') {
            Some(rest) => (rest, true),
            None => (text, false),
        };
        let hex = |s: &str| -> Result<usize, PageKiteError> {
            if s.is_empty() || s.len() > 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            let n = u64::from_str_radix(s, 16).map_err(|_| bad())?;
            if n > MAX_CHUNK as u64 {
                return Err(PageKiteError::ChunkTooLarge(n));
            }
            // Bounded by MAX_CHUNK just above.
            Ok(n as usize)
        };
        let (wire_len, plain_len) = match text.split_once('Z') {
            Some((plain, compressed)) => (hex(compressed)?, Some(hex(plain)?)),
            None => (hex(text)?, None),
        };
        if wire_len == 0 {
            return Err(PageKiteError::EmptyChunk);
        }
        Ok(SizeLine {
            wire_len,
            plain_len,
            reset,
        })
    }
}

/// A decimal header value (`SID`, `SKB`), digits only.
fn parse_number<T: std::str::FromStr>(name: &'static str, value: &str) -> Result<T, PageKiteError> {
    let bad = || PageKiteError::BadChunkHeader {
        name,
        value: cut(value.as_bytes()),
    };
    if value.is_empty() || value.len() > 20 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    value.parse().map_err(|_| bad())
}
