//! Delimiting a body in a byte stream: by `Content-Length`, or chunked
//! through the last chunk and trailers.

use super::error::HttpError;
use super::head::BodyKind;
use super::{MAX_CHUNK_LINE_LEN, MAX_TRAILERS_LEN, is_field_byte, is_token_byte};

/// Delimits a request body in a byte stream, one buffer at a time.
///
/// Feed it the bytes that follow the head, in order, and forward the
/// `consumed` prefix of each buffer; once `done`, the rest of the buffer
/// belongs to the next request. Chunked bodies are checked as they pass
/// (chunk-size lines, CRLFs, the last chunk and trailers), with bounded line
/// lengths; any split of the input gives the same answer. After an error,
/// every later call returns the same error.
///
/// ```
/// use kitepipe_proto::http1::{BodyKind, BodyProgress, BodyScanner};
/// let mut scanner = BodyScanner::new(BodyKind::Chunked);
/// let progress = scanner.scan(b"5\r\nhello\r\n0\r\n\r\nGET /next")?;
/// assert_eq!(progress, BodyProgress { consumed: 15, done: true });
/// # Ok::<(), kitepipe_proto::http1::HttpError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyScanner {
    state: BodyState,
}

/// How much of one buffer a [`BodyScanner`] claimed for the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyProgress {
    /// How many bytes at the start of the buffer belong to the body.
    pub consumed: usize,
    /// Whether the body ended within them.
    pub done: bool,
}

impl BodyScanner {
    /// A scanner for a body delimited as `kind` says.
    pub fn new(kind: BodyKind) -> Self {
        let state = match kind {
            BodyKind::Empty | BodyKind::Length(0) => BodyState::Done,
            BodyKind::Length(remaining) => BodyState::Length { remaining },
            BodyKind::Chunked => BodyState::chunk_size(),
        };
        Self { state }
    }

    /// Whether the whole body has been seen.
    pub fn is_done(&self) -> bool {
        self.state == BodyState::Done
    }

    /// Claims the prefix of `buf` that belongs to the body.
    pub fn scan(&mut self, buf: &[u8]) -> Result<BodyProgress, HttpError> {
        let mut pos = 0;
        while let Some(rest) = buf.get(pos..).filter(|rest| !rest.is_empty()) {
            match &mut self.state {
                BodyState::Done => break,
                BodyState::Failed(err) => return Err(err.clone()),
                BodyState::Length { remaining } => {
                    let take = bulk_len(*remaining, rest.len());
                    pos += take;
                    *remaining -= take as u64;
                    if *remaining == 0 {
                        self.state = BodyState::Done;
                    }
                }
                BodyState::ChunkData { remaining } => {
                    let take = bulk_len(*remaining, rest.len());
                    pos += take;
                    *remaining -= take as u64;
                    if *remaining == 0 {
                        self.state = BodyState::ChunkDataEnd { saw_cr: false };
                    }
                }
                _ => {
                    let byte = rest.first().copied().unwrap_or_default();
                    if let Err(err) = self.step(byte) {
                        self.state = BodyState::Failed(err.clone());
                        return Err(err);
                    }
                    pos += 1;
                }
            }
        }
        if let BodyState::Failed(err) = &self.state {
            return Err(err.clone());
        }
        Ok(BodyProgress {
            consumed: pos,
            done: self.is_done(),
        })
    }

    /// Advances the chunked-coding state machine by one framing byte.
    fn step(&mut self, byte: u8) -> Result<(), HttpError> {
        let next = match &mut self.state {
            BodyState::ChunkSize {
                size,
                digits,
                line_len,
                phase,
            } => {
                *line_len += 1;
                if *line_len > MAX_CHUNK_LINE_LEN {
                    return Err(HttpError::BadChunk("chunk-size line too long"));
                }
                match (*phase, byte) {
                    (SizePhase::Digits, _) if byte.is_ascii_hexdigit() => {
                        let digit = u64::from(hex_value(byte));
                        *size = size
                            .checked_mul(16)
                            .and_then(|size| size.checked_add(digit))
                            .ok_or(HttpError::BadChunk("chunk size overflows"))?;
                        *digits += 1;
                        return Ok(());
                    }
                    (SizePhase::Digits, _) if *digits == 0 => {
                        return Err(HttpError::BadChunk("missing chunk size"));
                    }
                    (SizePhase::Digits | SizePhase::Space, b' ' | b'\t') => {
                        *phase = SizePhase::Space;
                        return Ok(());
                    }
                    (SizePhase::Digits | SizePhase::Space, b';') => {
                        *phase = SizePhase::Extension;
                        return Ok(());
                    }
                    (SizePhase::Digits | SizePhase::Extension, b'\r') => {
                        *phase = SizePhase::LineFeed;
                        return Ok(());
                    }
                    (SizePhase::Extension, _) if is_field_byte(byte) => return Ok(()),
                    (SizePhase::Extension, _) => {
                        return Err(HttpError::BadChunk("chunk extension character"));
                    }
                    (SizePhase::Digits | SizePhase::Space, _) => {
                        return Err(HttpError::BadChunk("chunk-size character"));
                    }
                    (SizePhase::LineFeed, b'\n') if *size == 0 => BodyState::Trailers {
                        section_len: 0,
                        phase: TrailerPhase::LineStart,
                    },
                    (SizePhase::LineFeed, b'\n') => BodyState::ChunkData { remaining: *size },
                    (SizePhase::LineFeed, _) => {
                        return Err(HttpError::BadChunk("chunk-size line not ended by crlf"));
                    }
                }
            }
            BodyState::ChunkDataEnd { saw_cr } => match (*saw_cr, byte) {
                (false, b'\r') => {
                    *saw_cr = true;
                    return Ok(());
                }
                (true, b'\n') => BodyState::chunk_size(),
                _ => return Err(HttpError::BadChunk("chunk data not followed by crlf")),
            },
            BodyState::Trailers { section_len, phase } => {
                *section_len += 1;
                if *section_len > MAX_TRAILERS_LEN {
                    return Err(HttpError::BadChunk("trailers too long"));
                }
                *phase = match (*phase, byte) {
                    (TrailerPhase::LineStart, b'\r') => TrailerPhase::FinalLineFeed,
                    (TrailerPhase::LineStart | TrailerPhase::Name, _) if is_token_byte(byte) => {
                        TrailerPhase::Name
                    }
                    (TrailerPhase::Name, b':') => TrailerPhase::Value,
                    (TrailerPhase::Value, b'\r') => TrailerPhase::LineFeed,
                    (TrailerPhase::Value, _) if is_field_byte(byte) => TrailerPhase::Value,
                    (TrailerPhase::LineFeed, b'\n') => TrailerPhase::LineStart,
                    (TrailerPhase::FinalLineFeed, b'\n') => {
                        self.state = BodyState::Done;
                        return Ok(());
                    }
                    _ => return Err(HttpError::BadChunk("trailer field")),
                };
                return Ok(());
            }
            // scan handles the other states without calling step.
            BodyState::Length { .. }
            | BodyState::ChunkData { .. }
            | BodyState::Done
            | BodyState::Failed(_) => return Ok(()),
        };
        self.state = next;
        Ok(())
    }
}

/// Where a [`BodyScanner`] is in the body.
#[derive(Debug, Clone, PartialEq, Eq)]
enum BodyState {
    /// Inside a `Content-Length` body.
    Length { remaining: u64 },
    /// Reading a chunk-size line.
    ChunkSize {
        size: u64,
        digits: usize,
        line_len: usize,
        phase: SizePhase,
    },
    /// Inside a chunk's data.
    ChunkData { remaining: u64 },
    /// Expecting the CRLF after a chunk's data.
    ChunkDataEnd { saw_cr: bool },
    /// Reading the trailer section after the last chunk.
    Trailers {
        section_len: usize,
        phase: TrailerPhase,
    },
    /// The body is complete.
    Done,
    /// The body was malformed; the error repeats.
    Failed(HttpError),
}

impl BodyState {
    fn chunk_size() -> Self {
        Self::ChunkSize {
            size: 0,
            digits: 0,
            line_len: 0,
            phase: SizePhase::Digits,
        }
    }
}

/// Where a chunk-size line is: `1*HEXDIG [ BWS ";" ext ] CRLF`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SizePhase {
    Digits,
    /// Whitespace after the digits, which must lead to an extension.
    Space,
    Extension,
    /// Saw the CR, expecting LF.
    LineFeed,
}

/// Where a trailer section is: `*( name ":" value CRLF ) CRLF`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TrailerPhase {
    LineStart,
    Name,
    Value,
    /// Saw the CR ending a field line.
    LineFeed,
    /// Saw the CR of the blank line that ends the body.
    FinalLineFeed,
}

/// How many body bytes to take from a buffer of `available` bytes.
fn bulk_len(remaining: u64, available: usize) -> usize {
    usize::try_from(remaining).map_or(available, |remaining| remaining.min(available))
}

fn hex_value(byte: u8) -> u8 {
    match byte {
        b'0'..=b'9' => byte - b'0',
        b'a'..=b'f' => byte - b'a' + 10,
        b'A'..=b'F' => byte - b'A' + 10,
        _ => 0,
    }
}
