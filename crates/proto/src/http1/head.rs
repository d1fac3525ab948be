//! Parsing request and response heads: where a head ends, the host to
//! route by, and how the body that follows is delimited. Every ambiguous
//! framing is refused.

use std::net::Ipv6Addr;

use super::error::HttpError;
use super::{MAX_HEAD_LEN, MAX_HEADERS, is_token_byte};
use crate::sniff::check_hostname;

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
    let Some(head_len) = complete_head(window, request.parse(window))? else {
        return Ok(None);
    };

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
    let Some(head_len) = complete_head(window, response.parse(window))? else {
        return Ok(None);
    };
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

/// The host to route by in an authority (`host [ ":" port ]`, e.g. an
/// HTTP/2 `:authority` or a `Host` value), as [`RequestHead::host`] has it
/// for HTTP/1: lowercased, without port or trailing dot, IPv6 literals in
/// brackets; userinfo is refused.
///
/// ```
/// use kitepipe_proto::http1::route_authority;
/// assert_eq!(route_authority(b"Blog.Example.NET.:8080")?, "blog.example.net");
/// assert!(route_authority(b"user@blog.example.net").is_err());
/// # Ok::<(), kitepipe_proto::http1::HttpError>(())
/// ```
pub fn route_authority(authority: &[u8]) -> Result<String, HttpError> {
    if authority.contains(&b'@') {
        return Err(HttpError::Malformed("userinfo in target"));
    }
    parse_authority(authority)
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

/// The step both head parsers share after httparse ran over `window`:
/// the head's length once it is complete (its line endings checked), `None` while more bytes may complete it, an error for a head
/// past `MAX_HEAD_LEN` or one httparse refused.
fn complete_head(
    window: &[u8],
    parsed: Result<httparse::Status<usize>, httparse::Error>,
) -> Result<Option<usize>, HttpError> {
    let head_len = match parsed {
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
    Ok(Some(head_len))
}
