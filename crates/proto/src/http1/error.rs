//! Why a request cannot be forwarded, and the page the relay answers with
//! instead.

use thiserror::Error;

/// Why a visitor's request cannot be forwarded. Each variant maps to the
/// status the relay answers with, see [`HttpError::status`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HttpError {
    /// The head breaks HTTP/1.1 syntax; the field names what was wrong.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// The head is longer than [`MAX_HEAD_LEN`](super::MAX_HEAD_LEN) or has
    /// more than [`MAX_HEADERS`](super::MAX_HEADERS) fields.
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
    error_response_with(status, title, detail, &[])
}

/// [`error_response`] with `extra_headers` (e.g. `WWW-Authenticate`,
/// `Retry-After`) after the standard ones. Names and values come from the
/// relay, never from a visitor; a pair holding CR, LF or NUL is left out,
/// so a page never carries a field it did not mean to.
///
/// ```
/// use kitepipe_proto::http1::error_response_with;
/// let response = error_response_with(
///     429,
///     "Too Many Requests",
///     "slow down",
///     &[("Retry-After", "3".to_string())],
/// );
/// let text = String::from_utf8(response).unwrap();
/// assert!(text.contains("\r\nRetry-After: 3\r\n\r\n"));
/// ```
pub fn error_response_with(
    status: u16,
    title: &str,
    detail: &str,
    extra_headers: &[(&str, String)],
) -> Vec<u8> {
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
         X-Kitepipe-Error: {status}\r\n",
        reason = reason_phrase(status),
        len = page.len(),
    );
    let clean = |text: &str| !text.bytes().any(|byte| matches!(byte, b'\r' | b'\n' | 0));
    for (name, value) in extra_headers {
        if clean(name) && clean(value) {
            response.push_str(name);
            response.push_str(": ");
            response.push_str(value);
            response.push_str("\r\n");
        }
    }
    response.push_str("\r\n");
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
