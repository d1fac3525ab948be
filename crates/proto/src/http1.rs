//! Sans-IO scanning of visitors' HTTP/1.x requests for the relay.
//!
//! The relay reads a request head with [`parse_request_head`], routes by
//! [`RequestHead::host`], forwards the head rewritten by [`rewrite_head`], then
//! forwards exactly the body as [`BodyScanner`] delimits it, and parses the next
//! request on the same keep-alive connection. Responses are delimited by
//! [`parse_response_head`] and the same [`BodyScanner`], so that the relay
//! knows which response answers which request: after a head with
//! [`RequestHead::upgrade`] set, both directions are raw bytes only once the
//! backend answered it with `101 Switching Protocols`. [`error_response`] builds what the relay
//! answers when it cannot forward, with the status of [`HttpError::status`].
//!
//! Framing is strict on purpose: the relay forwards the visitor's bytes
//! unchanged, so any message the relay and a backend could delimit differently
//! (request smuggling) is refused instead of guessed at.

use std::net::{IpAddr, Ipv6Addr};

use thiserror::Error;

use crate::sniff::check_hostname;

/// The longest request head the relay buffers; a visitor whose head is not
/// complete within it gets 431.
///
/// Browsers send heads of 0.5 to 2 KiB and cookie-heavy sites reach 8 to
/// 16 KiB. Common servers refuse above 8 KiB (nginx, per line) to 64 KiB
/// (Node's total limit is 16 KiB, Go's 1 MiB), so 64 KiB lets through anything
/// a backend is likely to accept while capping the memory one connection can
/// pin before it has been routed.
pub const MAX_HEAD_LEN: usize = 64 * 1024;

/// The most header fields a request head may carry; more gets 431.
///
/// Real requests carry 10 to 30; 128 leaves room for proxies that add their
/// own while keeping the parser's fixed field table small.
pub const MAX_HEADERS: usize = 128;

/// The longest chunk-size line, extensions included, that [`BodyScanner`]
/// accepts.
///
/// Clients send a few hex digits and practically never an extension; the
/// bound stops a peer from keeping a chunk header open forever and stays
/// below what backends accept (Node refuses extensions over 16 KiB).
pub const MAX_CHUNK_LINE_LEN: usize = 4 * 1024;

/// The longest trailer section after the last chunk; trailers are header
/// fields, so they get the same bound as a head.
pub const MAX_TRAILERS_LEN: usize = MAX_HEAD_LEN;

/// What the relay needs to know about one request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// The request method, e.g. `GET`, exactly as sent.
    pub method: String,
    /// The request target, exactly as sent (origin, absolute, authority or
    /// asterisk form).
    pub target: String,
    /// The minor version: `0` for HTTP/1.0, `1` for HTTP/1.1.
    pub version_minor: u8,
    /// The host to route by, lowercased, without port or trailing dot; from
    /// the target in absolute or authority form, else from `Host`. IPv6
    /// literals keep their brackets. `None` when neither names a host (the
    /// relay decides what that means).
    pub host: Option<String>,
    /// How the body that follows the head is delimited.
    pub body: BodyKind,
    /// Whether the connection turns into raw bytes both ways after this head:
    /// a CONNECT, or an HTTP/1.1 request with `Connection: upgrade` and an
    /// `Upgrade` field (WebSocket).
    pub upgrade: bool,
    /// Whether the visitor asked to close after this exchange:
    /// `Connection: close`, or HTTP/1.0 without `Connection: keep-alive`.
    pub close: bool,
    /// Length of the head in the buffer, final blank line included; the body
    /// starts at this offset.
    pub head_len: usize,
}

/// How a request body is delimited (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// No body: neither `Content-Length` nor `Transfer-Encoding` was sent, or
    /// the request is a CONNECT.
    Empty,
    /// Exactly this many bytes, from `Content-Length` (may be 0).
    Length(u64),
    /// Chunked transfer coding, through the last chunk and trailers.
    Chunked,
}

/// Why a visitor's request cannot be forwarded. Each variant maps to the
/// status the relay answers with, see [`HttpError::status`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HttpError {
    /// The head breaks HTTP/1.1 syntax; the field names what was wrong.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// The head is longer than [`MAX_HEAD_LEN`] or has more than
    /// [`MAX_HEADERS`] fields.
    #[error("request head too large")]
    HeadTooLarge,
    /// Both `Transfer-Encoding` and `Content-Length` were sent.
    #[error("both transfer-encoding and content-length")]
    TransferEncodingWithContentLength,
    /// Several `Content-Length` values that differ.
    #[error("conflicting content-length values")]
    ConflictingContentLength,
    /// A `Content-Length` value that is not a plain decimal `u64`.
    #[error("invalid content-length")]
    InvalidContentLength,
    /// A `Transfer-Encoding` whose last coding is not `chunked`, or that
    /// applies `chunked` twice, or that an HTTP/1.0 request sent.
    #[error("unsupported transfer-encoding")]
    UnsupportedTransferEncoding,
    /// The chunked body breaks its syntax; the field names what was wrong.
    #[error("bad chunk: {0}")]
    BadChunk(&'static str),
    /// The version is not HTTP/1.0 or HTTP/1.1.
    #[error("unsupported http version")]
    UnsupportedVersion,
}

impl HttpError {
    /// The status the relay answers the visitor with.
    pub fn status(&self) -> u16 {
        match self {
            Self::Malformed(_)
            | Self::TransferEncodingWithContentLength
            | Self::ConflictingContentLength
            | Self::InvalidContentLength
            | Self::UnsupportedTransferEncoding
            | Self::BadChunk(_) => 400,
            Self::HeadTooLarge => 431,
            Self::UnsupportedVersion => 505,
        }
    }
}

/// Where a request came from, for the forwarding headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forwarded {
    /// The visitor's address as the relay saw it.
    pub client_ip: IpAddr,
    /// The scheme the visitor used: `"http"` or `"https"`.
    pub proto: &'static str,
}

/// Parses the request head at the start of `buf`.
///
/// Returns `Ok(None)` while the head is incomplete, and
/// [`HttpError::HeadTooLarge`] once `buf` holds [`MAX_HEAD_LEN`] bytes without
/// a complete head. Empty lines before the request line are skipped (RFC 9112
/// section 2.2) and counted in `head_len`. Every line must end in CRLF.
///
/// ```
/// use kitepipe_proto::http1::{parse_request_head, BodyKind};
/// let buf = b"POST /up HTTP/1.1\r\nHost: Blog.Example.net:8080\r\nContent-Length: 2\r\n\r\nhi";
/// let head = parse_request_head(buf)?.expect("complete head");
/// assert_eq!(head.host.as_deref(), Some("blog.example.net"));
/// assert_eq!(head.body, BodyKind::Length(2));
/// assert_eq!(&buf[head.head_len..], b"hi");
/// assert_eq!(parse_request_head(&buf[..10])?, None);
/// # Ok::<(), kitepipe_proto::http1::HttpError>(())
/// ```
pub fn parse_request_head(buf: &[u8]) -> Result<Option<RequestHead>, HttpError> {
    // Parsing never looks past the bound, so a huge buffer costs no more
    // than a full one.
    let (window, _) = buf.split_at(buf.len().min(MAX_HEAD_LEN));
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut fields);
    let head_len = match request.parse(window) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if window.len() >= MAX_HEAD_LEN => {
            return Err(HttpError::HeadTooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(err) => return Err(map_httparse_error(err)),
    };
    let raw_head = window
        .get(..head_len)
        .ok_or(HttpError::Malformed("head length"))?;
    check_line_endings(raw_head)?;

    let (Some(method), Some(target), Some(version_minor)) =
        (request.method, request.path, request.version)
    else {
        // httparse fills all three before it reports a complete head.
        return Err(HttpError::Malformed("request line"));
    };
    let fields = Fields {
        fields: request.headers,
    };
    let is_connect = method == "CONNECT";

    let host = route_host(method, target, &fields)?;
    let mut body = body_kind(version_minor, &fields)?;
    if is_connect {
        // A CONNECT has no content: what follows the head is the tunnel.
        body = BodyKind::Empty;
    }
    let connection = ConnectionOptions::read(&fields);
    let wants_upgrade = version_minor == 1
        && connection.upgrade
        && fields.values(b"upgrade").any(|v| !v.is_empty());
    let close = connection.close || (version_minor == 0 && !connection.keep_alive);

    Ok(Some(RequestHead {
        method: method.to_owned(),
        target: target.to_owned(),
        version_minor,
        host,
        body,
        upgrade: is_connect || wants_upgrade,
        close,
        head_len,
    }))
}

/// What the relay needs to know about one response head: where it ends and
/// how its body is delimited, so that it can tell the response to an
/// upgrade request apart from what follows, and only then pass raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// The status code, e.g. `200`; `1xx` are interim responses (`101`
    /// switches protocols).
    pub status: u16,
    /// How the body that follows the head is delimited.
    pub body: ResponseBody,
    /// Length of the head in the buffer, final blank line included.
    pub head_len: usize,
}

/// How a response body is delimited (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseBody {
    /// Delimited like a request body: empty, by length, or chunked.
    Framed(BodyKind),
    /// Everything until the backend closes the connection.
    UntilClose,
}

/// Parses the response head at the start of `buf`, sent in answer to a
/// request with method `request_method`.
///
/// Returns `Ok(None)` while the head is incomplete, and
/// [`HttpError::HeadTooLarge`] once `buf` holds [`MAX_HEAD_LEN`] bytes without
/// a complete head. Framing is as strict as for requests: both
/// `Transfer-Encoding` and `Content-Length`, or conflicting lengths, are
/// refused; a `Transfer-Encoding` not ending in `chunked` reads until close.
///
/// ```
/// use kitepipe_proto::http1::{parse_response_head, BodyKind, ResponseBody};
/// let buf = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi";
/// let head = parse_response_head(buf, "GET")?.expect("complete head");
/// assert_eq!(head.status, 200);
/// assert_eq!(head.body, ResponseBody::Framed(BodyKind::Length(2)));
/// let head = parse_response_head(buf, "HEAD")?.expect("complete head");
/// assert_eq!(head.body, ResponseBody::Framed(BodyKind::Empty));
/// # Ok::<(), kitepipe_proto::http1::HttpError>(())
/// ```
pub fn parse_response_head(
    buf: &[u8],
    request_method: &str,
) -> Result<Option<ResponseHead>, HttpError> {
    let (window, _) = buf.split_at(buf.len().min(MAX_HEAD_LEN));
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut fields);
    let head_len = match response.parse(window) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if window.len() >= MAX_HEAD_LEN => {
            return Err(HttpError::HeadTooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(err) => return Err(map_httparse_error(err)),
    };
    let raw_head = window
        .get(..head_len)
        .ok_or(HttpError::Malformed("head length"))?;
    check_line_endings(raw_head)?;
    let (Some(status), Some(version_minor)) = (response.code, response.version) else {
        return Err(HttpError::Malformed("status line"));
    };
    let fields = Fields {
        fields: response.headers,
    };
    let no_body =
        request_method == "HEAD" || (100..200).contains(&status) || status == 204 || status == 304;
    let body = if no_body {
        ResponseBody::Framed(BodyKind::Empty)
    } else {
        match body_kind(version_minor, &fields) {
            Ok(kind @ (BodyKind::Length(_) | BodyKind::Chunked)) => ResponseBody::Framed(kind),
            Ok(BodyKind::Empty) => ResponseBody::UntilClose,
            // A coding other than chunked last: the body ends with the
            // connection (RFC 9112 section 6.3, item 4).
            Err(HttpError::UnsupportedTransferEncoding) => ResponseBody::UntilClose,
            Err(err) => return Err(err),
        }
    };
    Ok(Some(ResponseHead {
        status,
        body,
        head_len,
    }))
}

/// Rewrites a request head for forwarding: sets `X-Forwarded-For` to the
/// visitor's address and `X-Forwarded-Proto` to its scheme.
///
/// `raw_head` is `buf[..head_len]` of a head that [`parse_request_head`]
/// accepted. Every other byte of the head keeps its order and case; empty
/// lines before the request line are dropped. The relay is the edge: what a
/// visitor says about earlier hops cannot be checked, so every field a
/// backend could take for the relay's word about the client is removed
/// (`X-Forwarded-*`, `Forwarded`, `X-Real-IP`, see [`is_forwarding_field`];
/// and kitepipe's own `X-Kitepipe-*`, see [`is_kitepipe_field`]) and the
/// relay's own two fields are added last. A backend can then trust
/// `X-Forwarded-For` as exactly one address.
///
/// ```
/// use std::net::IpAddr;
/// use kitepipe_proto::http1::{rewrite_head, Forwarded};
/// let head = b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n";
/// let forwarded = Forwarded { client_ip: IpAddr::from([203, 0, 113, 7]), proto: "https" };
/// assert_eq!(
///     rewrite_head(head, &forwarded)?,
///     b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Forwarded-For: 203.0.113.7\r\n\
///       X-Forwarded-Proto: https\r\n\r\n"
/// );
/// # Ok::<(), kitepipe_proto::http1::HttpError>(())
/// ```
pub fn rewrite_head(raw_head: &[u8], forwarded: &Forwarded) -> Result<Vec<u8>, HttpError> {
    match parse_request_head(raw_head)? {
        Some(head) if head.head_len == raw_head.len() => {}
        _ => return Err(HttpError::Malformed("not exactly one request head")),
    }
    debug_assert!(
        forwarded
            .proto
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric()),
        "proto is a scheme literal chosen by the relay"
    );
    let client_ip = forwarded.client_ip.to_canonical().to_string();

    let mut lines = raw_head
        .split(|&byte| byte == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line));
    let mut out = Vec::with_capacity(raw_head.len() + client_ip.len() + 64);
    // The request line is the first non-empty line; parsing vouched for it.
    for line in lines.by_ref() {
        if !line.is_empty() {
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
            break;
        }
    }
    for line in lines {
        if line.is_empty() {
            // The blank line that ends the head; anything after it is the
            // empty remainder of the split.
            break;
        }
        let name = line.split(|&byte| byte == b':').next().unwrap_or_default();
        if is_forwarding_field(name) || is_kitepipe_field(name) {
            continue;
        }
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"X-Forwarded-For: ");
    out.extend_from_slice(client_ip.as_bytes());
    out.extend_from_slice(b"\r\nX-Forwarded-Proto: ");
    out.extend_from_slice(forwarded.proto.as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    Ok(out)
}

/// Whether a field is in kitepipe's own namespace (`X-Kitepipe-*`, e.g. the
/// caller identity the event pipe gives a handler upstream): only kitepipe
/// sets those, so a visitor's are removed, in case the kite's service is
/// also a node's handler upstream.
pub fn is_kitepipe_field(name: &[u8]) -> bool {
    const PREFIX: &[u8] = b"x-kitepipe-";
    name.get(..PREFIX.len())
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(PREFIX))
}

/// Whether a request field claims something about the client or earlier
/// proxies that only the relay may say: `X-Forwarded-*` (For, Proto, Host,
/// Port, ...), `Forwarded` (RFC 7239) and `X-Real-IP`.
pub fn is_forwarding_field(name: &[u8]) -> bool {
    const PREFIX: &[u8] = b"x-forwarded-";
    name.get(..PREFIX.len())
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(PREFIX))
        || name.eq_ignore_ascii_case(b"forwarded")
        || name.eq_ignore_ascii_case(b"x-real-ip")
}

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

/// Builds a complete HTTP/1.1 response that explains a failure to a visitor:
/// a small HTML page with `title` and `detail` escaped, `Connection: close`,
/// and an `X-Kitepipe-Error: <status>` field so tools can tell the relay's
/// answers from a backend's. A `status` outside 100..=999 is sent as 500.
///
/// ```
/// use kitepipe_proto::http1::error_response;
/// let response = error_response(502, "Bad Gateway", "blog.example.net is offline");
/// assert!(response.starts_with(b"HTTP/1.1 502 Bad Gateway\r\n"));
/// ```
pub fn error_response(status: u16, title: &str, detail: &str) -> Vec<u8> {
    let status = if (100..=999).contains(&status) {
        status
    } else {
        500
    };
    let title = escape_html(title);
    let detail = escape_html(detail);
    let page = format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>{status} {title}</title>\n</head>\n<body>\n<h1>{title}</h1>\n\
         <p>{detail}</p>\n<hr>\n<p><small>kitepipe relay</small></p>\n</body>\n</html>\n"
    );
    let mut response = format!(
        "HTTP/1.1 {status} {reason}\r\n\
         Content-Type: text/html; charset=utf-8\r\n\
         Content-Length: {len}\r\n\
         Connection: close\r\n\
         Cache-Control: no-store\r\n\
         X-Kitepipe-Error: {status}\r\n\
         \r\n",
        reason = reason_phrase(status),
        len = page.len(),
    );
    response.push_str(&page);
    response.into_bytes()
}

/// The standard reason phrase for `status`, or `"Error"` for one this relay
/// has no reason to know.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        421 => "Misdirected Request",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Error",
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

/// The header fields of a parsed head, looked up by case-insensitive name.
struct Fields<'a, 'b> {
    fields: &'a [httparse::Header<'b>],
}

impl<'b> Fields<'_, 'b> {
    /// The values of every field named `name` (lowercase), in order.
    fn values(&self, name: &'static [u8]) -> impl Iterator<Item = &'b [u8]> + '_ {
        self.fields
            .iter()
            .filter(move |field| field.name.as_bytes().eq_ignore_ascii_case(name))
            .map(|field| field.value)
    }

    /// The comma-separated elements of every field named `name`, trimmed,
    /// empty ones skipped (RFC 9110 section 5.6.1).
    fn elements(&self, name: &'static [u8]) -> impl Iterator<Item = &'b [u8]> + '_ {
        self.values(name)
            .flat_map(|value| value.split(|&byte| byte == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|element| !element.is_empty())
    }
}

/// The options of the `Connection` fields that matter to the relay.
struct ConnectionOptions {
    close: bool,
    keep_alive: bool,
    upgrade: bool,
}

impl ConnectionOptions {
    fn read(fields: &Fields<'_, '_>) -> Self {
        let mut options = Self {
            close: false,
            keep_alive: false,
            upgrade: false,
        };
        for option in fields.elements(b"connection") {
            if option.eq_ignore_ascii_case(b"close") {
                options.close = true;
            } else if option.eq_ignore_ascii_case(b"keep-alive") {
                options.keep_alive = true;
            } else if option.eq_ignore_ascii_case(b"upgrade") {
                options.upgrade = true;
            }
        }
        options
    }
}

fn map_httparse_error(err: httparse::Error) -> HttpError {
    match err {
        httparse::Error::Version => HttpError::UnsupportedVersion,
        httparse::Error::TooManyHeaders => HttpError::HeadTooLarge,
        httparse::Error::HeaderName => HttpError::Malformed("header name"),
        httparse::Error::HeaderValue => HttpError::Malformed("header value"),
        httparse::Error::NewLine => HttpError::Malformed("line ending"),
        httparse::Error::Status | httparse::Error::Token => HttpError::Malformed("request line"),
    }
}

/// Refuses a bare LF anywhere in the head. httparse accepts one as a line
/// ending, but a backend that does not would see other field boundaries than
/// the relay did.
fn check_line_endings(raw_head: &[u8]) -> Result<(), HttpError> {
    let mut previous = 0u8;
    for &byte in raw_head {
        if byte == b'\n' && previous != b'\r' {
            return Err(HttpError::Malformed("bare lf"));
        }
        previous = byte;
    }
    Ok(())
}

/// Finds the host a request is for (RFC 9112 section 3.2).
fn route_host(
    method: &str,
    target: &str,
    fields: &Fields<'_, '_>,
) -> Result<Option<String>, HttpError> {
    let mut host_values = fields.values(b"host");
    let host_field = host_values.next();
    if host_values.next().is_some() {
        return Err(HttpError::Malformed("more than one host field"));
    }
    let from_field = match host_field {
        None | Some(b"") => None,
        Some(value) => Some(parse_authority(value)?),
    };

    let from_target = if method == "CONNECT" {
        Some(
            parse_authority(target.as_bytes())
                .map_err(|_| HttpError::Malformed("connect target"))?,
        )
    } else if target.starts_with('/') || (target == "*" && method == "OPTIONS") {
        None
    } else {
        Some(absolute_form_host(target)?)
    };

    match (from_target, from_field) {
        // A proxy must ignore Host when the target names one, but the backend
        // gets the original Host; refusing a mismatch keeps both in agreement.
        (Some(target_host), Some(field_host)) if target_host != field_host => {
            Err(HttpError::Malformed("host field does not match target"))
        }
        (Some(host), _) | (None, Some(host)) => Ok(Some(host)),
        (None, None) => Ok(None),
    }
}

/// The host of an absolute-form target such as `http://a.example:8080/x`.
fn absolute_form_host(target: &str) -> Result<String, HttpError> {
    let (scheme, rest) = target
        .split_once("://")
        .ok_or(HttpError::Malformed("request target"))?;
    let scheme_valid = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'+' | b'-' | b'.'));
    if !scheme_valid {
        return Err(HttpError::Malformed("request target"));
    }
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, _) = rest.split_at(authority_end);
    if authority.contains('@') {
        // Userinfo in http URIs is deprecated (RFC 9110 section 4.2.4) and
        // only serves to disguise the real host.
        return Err(HttpError::Malformed("userinfo in target"));
    }
    parse_authority(authority.as_bytes())
}

/// Parses `host [ ":" port ]` into the host to route by: lowercased, without
/// port or trailing dot, IPv6 literals in brackets.
fn parse_authority(authority: &[u8]) -> Result<String, HttpError> {
    let (host, port) = if let Some(literal) = authority.strip_prefix(b"[") {
        let close = literal
            .iter()
            .position(|&byte| byte == b']')
            .ok_or(HttpError::Malformed("ipv6 literal"))?;
        let (address, after) = literal.split_at(close);
        let address = std::str::from_utf8(address)
            .ok()
            .and_then(|address| address.parse::<Ipv6Addr>().ok())
            .ok_or(HttpError::Malformed("ipv6 literal"))?;
        let port = match after.get(1..).unwrap_or_default() {
            [] => None,
            [b':', port @ ..] => Some(port),
            _ => return Err(HttpError::Malformed("ipv6 literal")),
        };
        (format!("[{address}]"), port)
    } else {
        let (name, port) = match authority.iter().position(|&byte| byte == b':') {
            Some(colon) => {
                let (name, port) = authority.split_at(colon);
                (name, port.get(1..))
            }
            None => (authority, None),
        };
        let name = name.strip_suffix(b".").unwrap_or(name);
        check_hostname(name).map_err(HttpError::Malformed)?;
        let name = String::from_utf8(name.to_ascii_lowercase())
            .map_err(|_| HttpError::Malformed("hostname"))?;
        (name, port)
    };
    // RFC 3986 allows an empty port; a present one must fit a u16.
    if let Some(port) = port.filter(|port| !port.is_empty()) {
        let valid = port.len() <= 5
            && port.iter().all(u8::is_ascii_digit)
            && std::str::from_utf8(port)
                .ok()
                .and_then(|port| port.parse::<u16>().ok())
                .is_some();
        if !valid {
            return Err(HttpError::Malformed("port"));
        }
    }
    Ok(host)
}

/// Works out how the body is delimited, refusing every ambiguous case
/// (RFC 9112 section 6.3 and its smuggling notes in section 11.2).
fn body_kind(version_minor: u8, fields: &Fields<'_, '_>) -> Result<BodyKind, HttpError> {
    let has_transfer_encoding = fields.values(b"transfer-encoding").next().is_some();
    let has_content_length = fields.values(b"content-length").next().is_some();
    if has_transfer_encoding {
        if has_content_length {
            return Err(HttpError::TransferEncodingWithContentLength);
        }
        // RFC 9112 section 6.1: an HTTP/1.0 message with Transfer-Encoding
        // has faulty framing.
        if version_minor == 0 {
            return Err(HttpError::UnsupportedTransferEncoding);
        }
        let codings: Vec<&[u8]> = fields.elements(b"transfer-encoding").collect();
        let Some((last, earlier)) = codings.split_last() else {
            return Err(HttpError::UnsupportedTransferEncoding);
        };
        let is_chunked = |coding: &&[u8]| coding.eq_ignore_ascii_case(b"chunked");
        let all_tokens = codings
            .iter()
            .all(|coding| coding.iter().copied().all(is_token_byte));
        if !is_chunked(last) || earlier.iter().any(is_chunked) || !all_tokens {
            return Err(HttpError::UnsupportedTransferEncoding);
        }
        return Ok(BodyKind::Chunked);
    }
    if !has_content_length {
        return Ok(BodyKind::Empty);
    }
    let mut length = None;
    for element in fields
        .values(b"content-length")
        .flat_map(|value| value.split(|&byte| byte == b','))
    {
        let element = element.trim_ascii();
        let valid = !element.is_empty() && element.iter().all(u8::is_ascii_digit);
        let value = std::str::from_utf8(element)
            .ok()
            .filter(|_| valid)
            .and_then(|element| element.parse::<u64>().ok())
            .ok_or(HttpError::InvalidContentLength)?;
        match length {
            Some(previous) if previous != value => return Err(HttpError::ConflictingContentLength),
            _ => length = Some(value),
        }
    }
    length
        .map(BodyKind::Length)
        .ok_or(HttpError::InvalidContentLength)
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

/// A `tchar` of RFC 9110 section 5.6.2.
fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// A byte allowed inside a field value or chunk extension: visible ASCII,
/// space, tab or obs-text.
fn is_field_byte(byte: u8) -> bool {
    matches!(byte, b'\t' | b' '..=b'~' | 0x80..=0xff)
}

fn escape_html(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            _ => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a test expects of a parsed head; `head_len` is always the whole
    /// input in these tables.
    struct Want {
        method: &'static str,
        host: Option<&'static str>,
        version_minor: u8,
        body: BodyKind,
        upgrade: bool,
        close: bool,
    }

    const GET: Want = Want {
        method: "GET",
        host: Some("blog.example.net"),
        version_minor: 1,
        body: BodyKind::Empty,
        upgrade: false,
        close: false,
    };

    fn parse_complete(input: &[u8]) -> RequestHead {
        match parse_request_head(input) {
            Ok(Some(head)) => head,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(input)),
        }
    }

    #[test]
    fn parses_request_heads() {
        let cases: &[(&str, &[u8], Want)] = &[
            (
                "simple get",
                b"GET /index.html HTTP/1.1\r\nHost: Blog.Example.NET\r\nAccept: */*\r\n\r\n",
                GET,
            ),
            (
                "host with port",
                b"GET / HTTP/1.1\r\nHost: blog.example.net:8080\r\n\r\n",
                GET,
            ),
            (
                "host with empty port",
                b"GET / HTTP/1.1\r\nHost: blog.example.net:\r\n\r\n",
                GET,
            ),
            (
                "host with trailing dot",
                b"GET / HTTP/1.1\r\nHost: blog.example.net.\r\n\r\n",
                GET,
            ),
            (
                "absolute-form target",
                b"GET http://Blog.Example.net:8080/a?b HTTP/1.1\r\nHost: blog.example.net:8080\r\n\r\n",
                GET,
            ),
            (
                "absolute-form without host field",
                b"GET https://blog.example.net HTTP/1.1\r\n\r\n",
                GET,
            ),
            (
                "absolute-form with query only",
                b"GET http://blog.example.net?x=/ HTTP/1.1\r\nHost: blog.example.net\r\n\r\n",
                GET,
            ),
            (
                "ipv6 literal",
                b"GET / HTTP/1.1\r\nHost: [2001:DB8::1]:8080\r\n\r\n",
                Want {
                    host: Some("[2001:db8::1]"),
                    ..GET
                },
            ),
            (
                "missing host",
                b"GET / HTTP/1.1\r\n\r\n",
                Want { host: None, ..GET },
            ),
            (
                "empty host",
                b"GET / HTTP/1.1\r\nHost:\r\n\r\n",
                Want { host: None, ..GET },
            ),
            (
                "options asterisk",
                b"OPTIONS * HTTP/1.1\r\nHost: blog.example.net\r\n\r\n",
                Want {
                    method: "OPTIONS",
                    ..GET
                },
            ),
            (
                "leading empty lines",
                b"\r\n\r\nGET / HTTP/1.1\r\nHost: blog.example.net\r\n\r\n",
                GET,
            ),
            (
                "post with content-length",
                b"POST /form HTTP/1.1\r\nHost: blog.example.net\r\nContent-Length: 27\r\n\r\n",
                Want {
                    method: "POST",
                    body: BodyKind::Length(27),
                    ..GET
                },
            ),
            (
                "content-length zero",
                b"POST / HTTP/1.1\r\nHost: blog.example.net\r\nContent-Length: 0\r\n\r\n",
                Want {
                    method: "POST",
                    body: BodyKind::Length(0),
                    ..GET
                },
            ),
            (
                "repeated equal content-length",
                b"PUT / HTTP/1.1\r\nHost: blog.example.net\r\nContent-Length: 5, 5\r\ncontent-length: 005\r\n\r\n",
                Want {
                    method: "PUT",
                    body: BodyKind::Length(5),
                    ..GET
                },
            ),
            (
                "chunked",
                b"POST / HTTP/1.1\r\nHost: blog.example.net\r\nTransfer-Encoding: Chunked\r\n\r\n",
                Want {
                    method: "POST",
                    body: BodyKind::Chunked,
                    ..GET
                },
            ),
            (
                "gzip then chunked over two fields",
                b"POST / HTTP/1.1\r\nHost: blog.example.net\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
                Want {
                    method: "POST",
                    body: BodyKind::Chunked,
                    ..GET
                },
            ),
            (
                "websocket upgrade",
                b"GET /chat HTTP/1.1\r\nHost: blog.example.net\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n",
                Want {
                    upgrade: true,
                    ..GET
                },
            ),
            (
                "upgrade field without connection option",
                b"GET / HTTP/1.1\r\nHost: blog.example.net\r\nUpgrade: websocket\r\n\r\n",
                GET,
            ),
            (
                "connection upgrade without upgrade field",
                b"GET / HTTP/1.1\r\nHost: blog.example.net\r\nConnection: upgrade\r\n\r\n",
                GET,
            ),
            (
                "upgrade ignored in http/1.0",
                b"GET / HTTP/1.0\r\nHost: blog.example.net\r\nConnection: upgrade, keep-alive\r\nUpgrade: websocket\r\n\r\n",
                Want {
                    version_minor: 0,
                    ..GET
                },
            ),
            (
                "connect",
                b"CONNECT Blog.Example.net:443 HTTP/1.1\r\nHost: blog.example.net:443\r\n\r\n",
                Want {
                    method: "CONNECT",
                    upgrade: true,
                    ..GET
                },
            ),
            (
                "connect ignores content-length",
                b"CONNECT blog.example.net:443 HTTP/1.1\r\nContent-Length: 10\r\n\r\n",
                Want {
                    method: "CONNECT",
                    upgrade: true,
                    ..GET
                },
            ),
            (
                "http/1.0 closes by default",
                b"GET / HTTP/1.0\r\nHost: blog.example.net\r\n\r\n",
                Want {
                    version_minor: 0,
                    close: true,
                    ..GET
                },
            ),
            (
                "http/1.0 keep-alive",
                b"GET / HTTP/1.0\r\nHost: blog.example.net\r\nConnection: Keep-Alive\r\n\r\n",
                Want {
                    version_minor: 0,
                    ..GET
                },
            ),
            (
                "http/1.1 connection close",
                b"GET / HTTP/1.1\r\nHost: blog.example.net\r\nConnection: TE, close\r\n\r\n",
                Want { close: true, ..GET },
            ),
        ];
        for (name, input, want) in cases {
            let head = parse_complete(input);
            assert_eq!(head.method, want.method, "{name}");
            assert_eq!(head.host.as_deref(), want.host, "{name}");
            assert_eq!(head.version_minor, want.version_minor, "{name}");
            assert_eq!(head.body, want.body, "{name}");
            assert_eq!(head.upgrade, want.upgrade, "{name}");
            assert_eq!(head.close, want.close, "{name}");
            assert_eq!(head.head_len, input.len(), "{name}");
            for len in 0..input.len() {
                assert_eq!(
                    parse_request_head(&input[..len]),
                    Ok(None),
                    "{name} cut at {len}"
                );
            }
        }
    }

    #[test]
    fn target_is_kept_as_sent() {
        let head = parse_complete(b"GET http://a.example/%7Euser?q=1 HTTP/1.1\r\n\r\n");
        assert_eq!(head.target, "http://a.example/%7Euser?q=1");
    }

    #[test]
    fn rejects_bad_heads() {
        use HttpError::*;
        let many_fields = {
            let mut head = b"GET / HTTP/1.1\r\n".to_vec();
            for n in 0..=MAX_HEADERS {
                head.extend(format!("X-Field-{n}: {n}\r\n").bytes());
            }
            head.extend(b"\r\n");
            head
        };
        let just_too_long = {
            let mut head = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
            head.resize(MAX_HEAD_LEN, b'a');
            head.extend(b"\r\n\r\n");
            head
        };
        let cases: Vec<(&str, Vec<u8>, HttpError)> = vec![
            ("binary garbage", b"\x00\x01\x02\x03\r\n\r\n".to_vec(), Malformed("request line")),
            ("tls hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc".to_vec(), Malformed("request line")),
            ("no target", b"GET HTTP/1.1\r\n\r\n".to_vec(), Malformed("request line")),
            ("http/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(), UnsupportedVersion),
            ("http/1.2", b"GET / HTTP/1.2\r\n\r\n".to_vec(), UnsupportedVersion),
            ("http/0.9", b"GET /\r\n\r\n".to_vec(), Malformed("request line")),
            ("bare lf", b"GET / HTTP/1.1\nHost: a.example\n\n".to_vec(), Malformed("bare lf")),
            (
                "bare lf hiding a field",
                b"GET / HTTP/1.1\r\nX: a\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
                Malformed("bare lf"),
            ),
            ("space before colon", b"GET / HTTP/1.1\r\nHost : a.example\r\n\r\n".to_vec(), Malformed("header name")),
            ("obs-fold", b"GET / HTTP/1.1\r\nX-A: a\r\n b\r\n\r\n".to_vec(), Malformed("header name")),
            ("nul in value", b"GET / HTTP/1.1\r\nX-A: a\0b\r\n\r\n".to_vec(), Malformed("header value")),
            ("relative target", b"GET index.html HTTP/1.1\r\n\r\n".to_vec(), Malformed("request target")),
            ("asterisk outside options", b"GET * HTTP/1.1\r\n\r\n".to_vec(), Malformed("request target")),
            (
                "two host fields",
                b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n".to_vec(),
                Malformed("more than one host field"),
            ),
            ("host with space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n".to_vec(), Malformed("hostname character")),
            ("host with path", b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n".to_vec(), Malformed("hostname character")),
            ("host with userinfo", b"GET / HTTP/1.1\r\nHost: u@a.example\r\n\r\n".to_vec(), Malformed("hostname character")),
            ("host non-ascii", "GET / HTTP/1.1\r\nHost: bl\u{f6}g.example\r\n\r\n".as_bytes().to_vec(), Malformed("hostname character")),
            ("host bad port", b"GET / HTTP/1.1\r\nHost: a.example:http\r\n\r\n".to_vec(), Malformed("port")),
            ("host port too big", b"GET / HTTP/1.1\r\nHost: a.example:65536\r\n\r\n".to_vec(), Malformed("port")),
            ("host two ports", b"GET / HTTP/1.1\r\nHost: a.example:80:81\r\n\r\n".to_vec(), Malformed("port")),
            ("host empty label", b"GET / HTTP/1.1\r\nHost: a..example\r\n\r\n".to_vec(), Malformed("hostname label")),
            ("host only a dot", b"GET / HTTP/1.1\r\nHost: .\r\n\r\n".to_vec(), Malformed("hostname length")),
            ("bad ipv6 literal", b"GET / HTTP/1.1\r\nHost: [zz::1]\r\n\r\n".to_vec(), Malformed("ipv6 literal")),
            ("unclosed ipv6 literal", b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n".to_vec(), Malformed("ipv6 literal")),
            (
                "absolute-form userinfo",
                b"GET http://a.example@b.example/ HTTP/1.1\r\n\r\n".to_vec(),
                Malformed("userinfo in target"),
            ),
            (
                "absolute-form host mismatch",
                b"GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n".to_vec(),
                Malformed("host field does not match target"),
            ),
            ("absolute-form empty authority", b"GET http:///x HTTP/1.1\r\n\r\n".to_vec(), Malformed("hostname length")),
            ("absolute-form bad scheme", b"GET 1http://a.example/ HTTP/1.1\r\n\r\n".to_vec(), Malformed("request target")),
            ("connect without authority", b"CONNECT / HTTP/1.1\r\n\r\n".to_vec(), Malformed("connect target")),
            ("too many fields", many_fields, HeadTooLarge),
            ("complete but over the bound", just_too_long, HeadTooLarge),
            (
                "transfer-encoding and content-length",
                b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
                TransferEncodingWithContentLength,
            ),
            (
                "two content-lengths",
                b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n".to_vec(),
                ConflictingContentLength,
            ),
            (
                "content-length list",
                b"POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n".to_vec(),
                ConflictingContentLength,
            ),
            ("content-length sign", b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n".to_vec(), InvalidContentLength),
            ("content-length negative", b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n".to_vec(), InvalidContentLength),
            ("content-length hex", b"POST / HTTP/1.1\r\nContent-Length: 0x10\r\n\r\n".to_vec(), InvalidContentLength),
            ("content-length empty", b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n".to_vec(), InvalidContentLength),
            ("content-length inner space", b"POST / HTTP/1.1\r\nContent-Length: 1 2\r\n\r\n".to_vec(), InvalidContentLength),
            ("content-length empty element", b"POST / HTTP/1.1\r\nContent-Length: 5,,5\r\n\r\n".to_vec(), InvalidContentLength),
            (
                "content-length overflow",
                b"POST / HTTP/1.1\r\nContent-Length: 18446744073709551616\r\n\r\n".to_vec(),
                InvalidContentLength,
            ),
            ("transfer-encoding gzip", b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(), UnsupportedTransferEncoding),
            (
                "chunked not last",
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n".to_vec(),
                UnsupportedTransferEncoding,
            ),
            (
                "chunked twice",
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
                UnsupportedTransferEncoding,
            ),
            (
                "identity after chunked",
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n".to_vec(),
                UnsupportedTransferEncoding,
            ),
            ("lookalike coding", b"POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n".to_vec(), UnsupportedTransferEncoding),
            (
                "coding with parameter",
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked;q=1\r\n\r\n".to_vec(),
                UnsupportedTransferEncoding,
            ),
            ("empty transfer-encoding", b"POST / HTTP/1.1\r\nTransfer-Encoding: ,\r\n\r\n".to_vec(), UnsupportedTransferEncoding),
            (
                "transfer-encoding in http/1.0",
                b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
                UnsupportedTransferEncoding,
            ),
        ];
        for (name, input, want) in cases {
            assert_eq!(parse_request_head(&input), Err(want), "{name}");
        }
    }

    #[test]
    fn one_megabyte_of_headers_is_too_large() {
        let mut input = b"GET / HTTP/1.1\r\nHost: a.example\r\n".to_vec();
        while input.len() < 1024 * 1024 {
            input
                .extend(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert_eq!(parse_request_head(&input), Err(HttpError::HeadTooLarge));
        // One endless line is refused the same way, whatever token it is in.
        let endless = [b'a'; MAX_HEAD_LEN];
        assert_eq!(parse_request_head(&endless), Err(HttpError::HeadTooLarge));
        let mut endless_target = b"GET /".to_vec();
        endless_target.resize(MAX_HEAD_LEN, b'a');
        assert_eq!(
            parse_request_head(&endless_target),
            Err(HttpError::HeadTooLarge)
        );
        assert_eq!(
            parse_request_head(&endless_target[..MAX_HEAD_LEN - 1]),
            Ok(None)
        );
    }

    #[test]
    fn errors_map_to_statuses() {
        let cases = [
            (HttpError::Malformed("x"), 400),
            (HttpError::HeadTooLarge, 431),
            (HttpError::TransferEncodingWithContentLength, 400),
            (HttpError::ConflictingContentLength, 400),
            (HttpError::InvalidContentLength, 400),
            (HttpError::UnsupportedTransferEncoding, 400),
            (HttpError::BadChunk("x"), 400),
            (HttpError::UnsupportedVersion, 505),
        ];
        for (err, status) in cases {
            assert_eq!(err.status(), status, "{err}");
        }
    }

    /// Feeds `input` to a fresh scanner in pieces of `piece_len` bytes, the
    /// way a relay would, and returns how many bytes it claimed in all.
    fn scan_in_pieces(
        kind: BodyKind,
        input: &[u8],
        piece_len: usize,
    ) -> Result<BodyProgress, HttpError> {
        let mut scanner = BodyScanner::new(kind);
        let mut consumed = 0;
        for piece in input.chunks(piece_len) {
            let progress = scanner.scan(piece)?;
            assert!(progress.consumed <= piece.len());
            consumed += progress.consumed;
            if progress.done {
                return Ok(BodyProgress {
                    consumed,
                    done: true,
                });
            }
            assert_eq!(
                progress.consumed,
                piece.len(),
                "an unfinished body takes all it is given"
            );
        }
        Ok(BodyProgress {
            consumed,
            done: false,
        })
    }

    #[test]
    fn scans_bodies() {
        let cases: &[(&str, BodyKind, &[u8])] = &[
            ("empty", BodyKind::Empty, b""),
            ("zero length", BodyKind::Length(0), b""),
            ("length", BodyKind::Length(11), b"hello world"),
            ("one chunk", BodyKind::Chunked, b"5\r\nhello\r\n0\r\n\r\n"),
            ("no chunks", BodyKind::Chunked, b"0\r\n\r\n"),
            (
                "uppercase hex, leading zeros",
                BodyKind::Chunked,
                b"00A\r\n0123456789\r\n000\r\n\r\n",
            ),
            (
                "extensions",
                BodyKind::Chunked,
                b"5;name=value;flag\r\nhello\r\n6 ; q=\"a b\"\r\n world\r\n0;last\r\n\r\n",
            ),
            (
                "trailers",
                BodyKind::Chunked,
                b"3\r\nabc\r\n0\r\nExpires: Wed, 21 Oct 2015 07:28:00 GMT\r\nX-Sum:\r\n\r\n",
            ),
            (
                "chunk data holding crlfs",
                BodyKind::Chunked,
                b"4\r\n\r\n\r\n\r\n0\r\n\r\n",
            ),
        ];
        for (name, kind, body) in cases {
            let mut input = body.to_vec();
            input.extend(b"GET /next HTTP/1.1\r\n\r\n");
            for piece_len in [1, 2, 3, 7, input.len()] {
                assert_eq!(
                    scan_in_pieces(*kind, &input, piece_len),
                    Ok(BodyProgress {
                        consumed: body.len(),
                        done: true,
                    }),
                    "{name} in pieces of {piece_len}"
                );
            }
            if let Some(short) = body.len().checked_sub(1) {
                assert_eq!(
                    scan_in_pieces(*kind, &body[..short], 1),
                    Ok(BodyProgress {
                        consumed: short,
                        done: false,
                    }),
                    "{name} without its last byte"
                );
            }
        }
    }

    #[test]
    fn scanner_at_done_claims_nothing() {
        let mut scanner = BodyScanner::new(BodyKind::Length(2));
        assert_eq!(
            scanner.scan(b"ab").map(|p| (p.consumed, p.done)),
            Ok((2, true))
        );
        assert!(scanner.is_done());
        assert_eq!(
            scanner.scan(b"cd").map(|p| (p.consumed, p.done)),
            Ok((0, true))
        );
        assert_eq!(
            scanner.scan(b"").map(|p| (p.consumed, p.done)),
            Ok((0, true))
        );
    }

    #[test]
    fn rejects_bad_chunks() {
        let long_extension = {
            let mut input = b"5;".to_vec();
            input.resize(MAX_CHUNK_LINE_LEN + 10, b'x');
            input
        };
        let long_trailers = {
            let mut input = b"0\r\nX-Pad: ".to_vec();
            input.resize(MAX_TRAILERS_LEN + 10, b'a');
            input
        };
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("not hex", b"z\r\n".to_vec(), "missing chunk size"),
            ("empty size line", b"\r\n".to_vec(), "missing chunk size"),
            ("negative", b"-5\r\n".to_vec(), "missing chunk size"),
            ("0x prefix", b"0x5\r\n".to_vec(), "chunk-size character"),
            (
                "bare lf after size",
                b"5\nhello\r\n".to_vec(),
                "chunk-size character",
            ),
            (
                "space then crlf",
                b"5 \r\nhello\r\n".to_vec(),
                "chunk-size character",
            ),
            (
                "space inside digits",
                b"1 0\r\n".to_vec(),
                "chunk-size character",
            ),
            (
                "bare lf after extension",
                b"5;a\nhello".to_vec(),
                "chunk extension character",
            ),
            (
                "cr without lf",
                b"5\rhello".to_vec(),
                "chunk-size line not ended by crlf",
            ),
            (
                "nul in extension",
                b"5;a\0\r\n".to_vec(),
                "chunk extension character",
            ),
            (
                "overflow",
                b"10000000000000000\r\n".to_vec(),
                "chunk size overflows",
            ),
            ("long extension", long_extension, "chunk-size line too long"),
            (
                "data too long",
                b"5\r\nhello!\r\n".to_vec(),
                "chunk data not followed by crlf",
            ),
            (
                "data then bare lf",
                b"5\r\nhello\n0\r\n\r\n".to_vec(),
                "chunk data not followed by crlf",
            ),
            (
                "trailer without colon",
                b"0\r\nbad line\r\n\r\n".to_vec(),
                "trailer field",
            ),
            (
                "trailer obs-fold",
                b"0\r\nX-A: a\r\n b\r\n\r\n".to_vec(),
                "trailer field",
            ),
            (
                "trailer bare lf",
                b"0\r\nX-A: a\n\r\n".to_vec(),
                "trailer field",
            ),
            ("final bare lf", b"0\r\n\n".to_vec(), "trailer field"),
            (
                "trailer nul",
                b"0\r\nX-A: \0\r\n\r\n".to_vec(),
                "trailer field",
            ),
            ("long trailers", long_trailers, "trailers too long"),
        ];
        for (name, input, want) in cases {
            for piece_len in [1, input.len()] {
                assert_eq!(
                    scan_in_pieces(BodyKind::Chunked, &input, piece_len),
                    Err(HttpError::BadChunk(want)),
                    "{name} in pieces of {piece_len}"
                );
            }
        }
    }

    #[test]
    fn chunk_errors_are_sticky() {
        let mut scanner = BodyScanner::new(BodyKind::Chunked);
        let err = HttpError::BadChunk("missing chunk size");
        assert_eq!(scanner.scan(b"g"), Err(err.clone()));
        assert_eq!(scanner.scan(b"0\r\n\r\n"), Err(err.clone()));
        assert_eq!(scanner.scan(b""), Err(err));
    }

    #[test]
    fn pipelined_requests_line_up() {
        let requests: &[(&[u8], &[u8])] = &[
            (
                b"POST /a HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\n\r\n",
                b"hello",
            ),
            (
                b"POST /b HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"3;x=y\r\nabc\r\n0\r\nX-T: 1\r\n\r\n",
            ),
            (b"GET /c HTTP/1.1\r\nHost: b.example\r\n\r\n", b""),
            (
                b"GET /d HTTP/1.1\r\nHost: c.example\r\nConnection: close\r\n\r\n",
                b"",
            ),
        ];
        let buf: Vec<u8> = requests
            .iter()
            .flat_map(|(head, body)| [*head, *body].concat())
            .collect();
        let mut pos = 0;
        for (head_bytes, body) in requests {
            let head = parse_complete(&buf[pos..]);
            assert_eq!(head.head_len, head_bytes.len());
            pos += head.head_len;
            let progress = BodyScanner::new(head.body).scan(&buf[pos..]);
            assert_eq!(
                progress,
                Ok(BodyProgress {
                    consumed: body.len(),
                    done: true,
                })
            );
            pos += body.len();
        }
        assert_eq!(pos, buf.len());
        assert_eq!(parse_request_head(&buf[pos..]), Ok(None));
    }

    #[test]
    fn delimits_response_bodies() {
        use ResponseBody::{Framed, UntilClose};
        type Want = Result<Option<(u16, ResponseBody)>, HttpError>;
        let cases: &[(&str, &str, &[u8], Want)] = &[
            (
                "length",
                "GET",
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                Ok(Some((200, Framed(BodyKind::Length(5))))),
            ),
            (
                "chunked",
                "GET",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                Ok(Some((200, Framed(BodyKind::Chunked)))),
            ),
            (
                "neither: until close",
                "GET",
                b"HTTP/1.0 200 OK\r\n\r\n",
                Ok(Some((200, UntilClose))),
            ),
            (
                "coding not chunked: until close",
                "GET",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                Ok(Some((200, UntilClose))),
            ),
            (
                "partial",
                "GET",
                b"HTTP/1.1 200 OK\r\nContent-Len",
                Ok(None),
            ),
            (
                "both framings",
                "GET",
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                Err(HttpError::TransferEncodingWithContentLength),
            ),
            (
                "conflicting lengths",
                "GET",
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                Err(HttpError::ConflictingContentLength),
            ),
            (
                "bare lf",
                "GET",
                b"HTTP/1.1 200 OK\nContent-Length: 5\r\n\r\n",
                Err(HttpError::Malformed("bare lf")),
            ),
        ];
        for (name, method, input, want) in cases {
            let got = parse_response_head(input, method)
                .map(|head| head.map(|head| (head.status, head.body)));
            assert_eq!(&got, want, "{name}");
        }
        // No body whatever the head says: the answer to a HEAD request, an
        // interim (1xx, 101 included), 204 and 304.
        for (method, status) in [
            ("HEAD", 200),
            ("GET", 100),
            ("GET", 101),
            ("GET", 204),
            ("GET", 304),
        ] {
            let head = format!(
                "HTTP/1.1 {status} Reason\r\nUpgrade: websocket\r\nContent-Length: 5\r\n\r\n"
            );
            let got = parse_response_head(head.as_bytes(), method)
                .map(|head| head.map(|head| (head.status, head.body)));
            assert_eq!(
                got,
                Ok(Some((status, Framed(BodyKind::Empty)))),
                "{method} {status}"
            );
        }
        let big = [b"HTTP/1.1 200 OK\r\nX: ".as_slice(), &[b'a'; MAX_HEAD_LEN]].concat();
        assert_eq!(
            parse_response_head(&big, "GET"),
            Err(HttpError::HeadTooLarge)
        );
    }

    #[test]
    fn rewrites_heads() {
        let v4 = Forwarded {
            client_ip: IpAddr::from([203, 0, 113, 7]),
            proto: "https",
        };
        let cases: &[(&str, &[u8], Forwarded, &[u8])] = &[
            (
                "adds both fields",
                b"GET / HTTP/1.1\r\nHost: a.example\r\nAccept: */*\r\n\r\n",
                v4,
                b"GET / HTTP/1.1\r\nHost: a.example\r\nAccept: */*\r\nX-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n\r\n",
            ),
            (
                "replaces a visitor's list, whatever its case",
                b"GET / HTTP/1.1\r\nx-forwarded-for: 10.0.0.1,10.0.0.2  \r\nHost: a.example\r\n\r\n",
                v4,
                b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n\r\n",
            ),
            (
                "drops every forwarding field the visitor sent",
                b"GET / HTTP/1.1\r\nX-Forwarded-For: 10.0.0.1\r\nHost: a.example\r\nX-Forwarded-For: 10.0.0.2\r\n\
                  Forwarded: for=10.0.0.3\r\nX-Real-IP: 10.0.0.4\r\nX-Forwarded-Host: admin.local\r\n\
                  X-Forwarded: x\r\nX-Kitepipe-Caller-Identity: admin\r\n\r\n",
                v4,
                b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Forwarded: x\r\n\
                  X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n\r\n",
            ),
            (
                "drops an empty list",
                b"GET / HTTP/1.1\r\nX-Forwarded-For: \r\nHost: a.example\r\n\r\n",
                v4,
                b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n\r\n",
            ),
            (
                "replaces a spoofed proto",
                b"POST /x HTTP/1.1\r\nX-Forwarded-Proto: https\r\nHost: a.example\r\nx-forwarded-proto: wss\r\nContent-Length: 3\r\n\r\n",
                Forwarded {
                    proto: "http",
                    ..v4
                },
                b"POST /x HTTP/1.1\r\nHost: a.example\r\nContent-Length: 3\r\nX-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: http\r\n\r\n",
            ),
            (
                "ipv6 and leading empty lines",
                b"\r\nGET / HTTP/1.1\r\nHost: a.example\r\n\r\n",
                Forwarded {
                    client_ip: "2001:db8::7".parse().expect("literal"),
                    proto: "http",
                },
                b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Forwarded-For: 2001:db8::7\r\nX-Forwarded-Proto: http\r\n\r\n",
            ),
            (
                "ipv4-mapped ipv6 shown as ipv4",
                b"GET / HTTP/1.1\r\n\r\n",
                Forwarded {
                    client_ip: "::ffff:192.0.2.1".parse().expect("literal"),
                    proto: "http",
                },
                b"GET / HTTP/1.1\r\nX-Forwarded-For: 192.0.2.1\r\nX-Forwarded-Proto: http\r\n\r\n",
            ),
        ];
        for (name, input, forwarded, want) in cases {
            let rewritten = rewrite_head(input, forwarded);
            assert_eq!(
                rewritten.as_deref().map(String::from_utf8_lossy),
                Ok(String::from_utf8_lossy(want)),
                "{name}"
            );
            let before = parse_complete(input);
            let after = parse_complete(want);
            assert_eq!(
                (
                    before.method,
                    before.target,
                    before.host,
                    before.body,
                    before.upgrade,
                    before.close
                ),
                (
                    after.method,
                    after.target,
                    after.host,
                    after.body,
                    after.upgrade,
                    after.close
                ),
                "{name}"
            );
        }
    }

    #[test]
    fn rewrite_refuses_what_is_not_one_head() {
        let forwarded = Forwarded {
            client_ip: IpAddr::from([192, 0, 2, 1]),
            proto: "http",
        };
        let cases: &[(&str, &[u8], HttpError)] = &[
            (
                "partial",
                b"GET / HTTP/1.1\r\nHost: a",
                HttpError::Malformed("not exactly one request head"),
            ),
            (
                "head plus body",
                b"GET / HTTP/1.1\r\n\r\nextra",
                HttpError::Malformed("not exactly one request head"),
            ),
            (
                "bare lf",
                b"GET / HTTP/1.1\n\n",
                HttpError::Malformed("bare lf"),
            ),
            (
                "garbage",
                b"\xff\xfe\r\n\r\n",
                HttpError::Malformed("request line"),
            ),
        ];
        for (name, input, want) in cases {
            assert_eq!(rewrite_head(input, &forwarded), Err(want.clone()), "{name}");
        }
    }

    #[test]
    fn error_response_is_a_complete_escaped_page() {
        let response = error_response(
            502,
            "<script>alert('x')</script>",
            "kite \"a&b\" is <offline>\r\nSet-Cookie: x=1",
        );
        let mut fields = [httparse::EMPTY_HEADER; 16];
        let mut parsed = httparse::Response::new(&mut fields);
        let head_len = match parsed.parse(&response) {
            Ok(httparse::Status::Complete(len)) => len,
            other => panic!("{other:?}"),
        };
        assert_eq!(parsed.code, Some(502));
        assert_eq!(parsed.reason, Some("Bad Gateway"));
        let field = |name: &str| {
            parsed
                .headers
                .iter()
                .find(|field| field.name.eq_ignore_ascii_case(name))
                .map(|field| String::from_utf8_lossy(field.value).into_owned())
        };
        let body = String::from_utf8(response[head_len..].to_vec()).expect("utf-8 page");
        assert_eq!(field("content-length"), Some(body.len().to_string()));
        assert_eq!(
            field("content-type").as_deref(),
            Some("text/html; charset=utf-8")
        );
        assert_eq!(field("connection").as_deref(), Some("close"));
        assert_eq!(field("x-kitepipe-error").as_deref(), Some("502"));
        assert_eq!(field("set-cookie"), None);
        assert!(
            body.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"),
            "{body}"
        );
        assert!(
            body.contains("kite &quot;a&amp;b&quot; is &lt;offline&gt;"),
            "{body}"
        );
        assert!(!body.contains("<script>"));
    }

    #[test]
    fn error_response_statuses() {
        let cases: &[(u16, &[u8])] = &[
            (431, b"HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            (404, b"HTTP/1.1 404 Not Found\r\n"),
            (599, b"HTTP/1.1 599 Error\r\n"),
            (0, b"HTTP/1.1 500 Internal Server Error\r\n"),
            (1000, b"HTTP/1.1 500 Internal Server Error\r\n"),
        ];
        for (status, status_line) in cases {
            let response = error_response(*status, "t", "d");
            assert!(response.starts_with(status_line), "{status}");
        }
    }

    #[test]
    fn garbage_never_panics() {
        // A cheap deterministic byte soup over an HTTP-ish alphabet; the fuzz
        // target goes further.
        let alphabet =
            b"GET / HTTP/1.1\r\n:Host;Transfer-Encoding chunked0123456789abcdef,\x00\xff";
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..3000 {
            let len = round % 200;
            let mut bytes = Vec::with_capacity(len);
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let index = usize::try_from(state % alphabet.len() as u64).expect("small");
                bytes.push(alphabet[index]);
            }
            if let Ok(Some(head)) = parse_request_head(&bytes) {
                let forwarded = Forwarded {
                    client_ip: IpAddr::from([192, 0, 2, 1]),
                    proto: "http",
                };
                assert!(rewrite_head(&bytes[..head.head_len], &forwarded).is_ok());
            }
            let _ = BodyScanner::new(BodyKind::Chunked).scan(&bytes);
        }
    }
}
