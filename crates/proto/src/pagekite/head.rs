//! The handshake heads: a back-end's `CONNECT PageKite:1` request (or its
//! WebSocket variant) with one `X-PageKite:` kite request per kite, and the
//! front-end's `HTTP/1.1 200` answer with one answer per kite.
//!
//! Parsed like pagekite.py's `HttpLineParser` accepts them: CRLF or bare LF
//! line ends, header names in any case, one optional space after the
//! colon (we trim all surrounding whitespace), repeated headers kept in
//! order, the old `X-Beanstalk` prefix for `X-PageKite`. Folded lines
//! (starting with a space or tab) continue the previous header's value.

use super::{MAX_HEAD, MAX_HEADER_LINE, MAX_KITE_REQUESTS, PageKiteError, cut};

/// Header lines one head may carry: every kite request plus a few dozen
/// others (features, version, HTTP headers a proxy may add).
const MAX_HEAD_HEADERS: usize = 2 * MAX_KITE_REQUESTS + 32;

/// Longest kite request field (a domain is at most 253 characters; salts,
/// tokens and signatures are 36).
const MAX_KITE_FIELD: usize = 255;

/// What every version of the WebSocket request's path starts with
/// (`/~:PageKite:~/v1`; pagekite.py 1.5 sends `v0.8`).
const WEBSOCKET_PREFIX: &str = "/~:PageKite:~/";

/// One kite a back-end asks for:
/// `X-PageKite: PROTO:DOMAIN:SRAND:TOKEN:SIGN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KiteRequest {
    /// `http`, `https`, `raw`, `websocket`, or `http-PORT` / `raw-PORT`
    /// (lowercased).
    pub proto: String,
    /// The kite's name (lowercased).
    pub domain: String,
    /// The back-end's salt.
    pub srand: String,
    /// The front-end's challenge (from `X-PageKite-SignThis`), or empty.
    pub token: String,
    /// `signToken(secret, payload())`.
    pub sign: String,
}

/// How a back-end's tunnel is framed after the head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// `CONNECT PageKite:1`: chunks straight on the connection.
    Chunked,
    /// `GET /~:PageKite:~/v1` with `Upgrade: websocket`: chunks inside
    /// WebSocket binary frames.
    WebSocket {
        /// The `Sec-WebSocket-Key` (base64, as sent).
        key: String,
    },
}

/// A back-end's request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackEndHello {
    /// Chunked or WebSocket.
    pub transport: Transport,
    /// `X-PageKite-Features` values (`AddKites`, `ZChunks`, `Mobile`,
    /// `TLS`), each header's comma-separated values in order.
    pub features: Vec<String>,
    /// `X-PageKite-Version`, the last one if repeated.
    pub version: Option<String>,
    /// The kite requests, in order, at most [`MAX_KITE_REQUESTS`].
    pub requests: Vec<KiteRequest>,
    /// `X-PageKite-Replace`: the session id of a tunnel this one replaces.
    pub replace: Option<String>,
}

/// A front-end's answer about one kite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KiteAnswer {
    /// `X-PageKite-OK: PROTO:DOMAIN:SRAND`: the kite is live.
    Ok(String),
    /// `X-PageKite-Invalid: PROTO:DOMAIN:SRAND`, with the reason from
    /// `X-PageKite-Invalid-Why: PROTO:DOMAIN:SRAND;REASON` (`unknown` if
    /// none was given).
    Invalid {
        /// `PROTO:DOMAIN:SRAND`.
        what: String,
        /// The reason (e.g. `signature`, `quota`, `unauthorized`).
        why: String,
    },
    /// `X-PageKite-Duplicate: PROTO:DOMAIN:SRAND`: another tunnel serves it.
    Duplicate(String),
    /// `X-PageKite-SignThis: PROTO:DOMAIN:SRAND:TOKEN`: sign again with
    /// this challenge.
    SignThis {
        /// `PROTO:DOMAIN:SRAND`.
        what: String,
        /// The front-end's challenge.
        token: String,
    },
    /// `X-PageKite-SSL-OK: PROTO:DOMAIN:SRAND`: the front-end terminates TLS.
    SslOk(String),
}

/// A front-end's answer head.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FrontEndHello {
    /// `X-PageKite-Features` values (`ZChunks`, `AddKites`, `WebSockets`).
    pub features: Vec<String>,
    /// `X-PageKite-Protos` (comma-separated in the header).
    pub protos: Vec<String>,
    /// `X-PageKite-Ports`.
    pub ports: Vec<String>,
    /// `X-PageKite-Raw-Ports`.
    pub raw_ports: Vec<String>,
    /// One answer per kite (several when challenged and accepted at once).
    pub answers: Vec<KiteAnswer>,
    /// `X-PageKite-SessionID`, for the back-end's `X-PageKite-Replace`.
    pub session_id: Option<String>,
}

impl KiteRequest {
    /// Parses `PROTO:DOMAIN:SRAND:TOKEN:SIGN` (exactly five fields, like
    /// pagekite.py; proto and domain lowercased).
    pub fn parse(value: &str) -> Result<KiteRequest, PageKiteError> {
        let bad = || PageKiteError::BadKite {
            what: "request",
            value: cut(value.as_bytes()),
        };
        let fields: Vec<&str> = value.trim().split(':').collect();
        let [proto, domain, srand, token, sign] = fields[..] else {
            return Err(bad());
        };
        let proto = proto.to_ascii_lowercase();
        let domain = domain.to_ascii_lowercase();
        let name_ok = |s: &str, extra: &[u8]| {
            !s.is_empty()
                && s.len() <= MAX_KITE_FIELD
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
        };
        let word_ok =
            |s: &str| s.len() <= MAX_KITE_FIELD && s.bytes().all(|b| b.is_ascii_alphanumeric());
        if !name_ok(&proto, b"-")
            || !name_ok(&domain, b"-._*")
            || !word_ok(srand)
            || !word_ok(token)
            || !word_ok(sign)
            || sign.is_empty()
        {
            return Err(bad());
        }
        Ok(KiteRequest {
            proto,
            domain,
            srand: srand.to_string(),
            token: token.to_string(),
            sign: sign.to_string(),
        })
    }

    /// `PROTO:DOMAIN:SRAND`: how answers name this request.
    pub fn what(&self) -> String {
        format!("{}:{}:{}", self.proto, self.domain, self.srand)
    }

    /// `PROTO:DOMAIN:SRAND:TOKEN`: what `sign` signs.
    pub fn payload(&self) -> String {
        format!(
            "{}:{}:{}:{}",
            self.proto, self.domain, self.srand, self.token
        )
    }

    /// The `X-PageKite:` header value.
    pub fn header_value(&self) -> String {
        format!("{}:{}", self.payload(), self.sign)
    }
}

impl KiteAnswer {
    /// The answer from one header, if `name` (lowercase) is an answer
    /// header. `why` holds the `X-PageKite-Invalid-Why` values seen so far
    /// in this head or chunk, as `(what, reason)`.
    pub(super) fn from_header(
        name: &str,
        value: &str,
        why: &[(String, String)],
    ) -> Result<Option<KiteAnswer>, PageKiteError> {
        let bad = || PageKiteError::BadKite {
            what: "answer",
            value: cut(value.as_bytes()),
        };
        let what = |v: &str| -> Result<String, PageKiteError> {
            let v = v.trim();
            if v.split(':').count() != 3 || !clean_value(v) {
                return Err(bad());
            }
            Ok(v.to_string())
        };
        Ok(Some(match name {
            "x-pagekite-ok" => KiteAnswer::Ok(what(value)?),
            "x-pagekite-duplicate" => KiteAnswer::Duplicate(what(value)?),
            "x-pagekite-ssl-ok" => KiteAnswer::SslOk(what(value)?),
            "x-pagekite-invalid" => {
                let what = what(value)?;
                let why = why
                    .iter()
                    .rev()
                    .find(|(w, _)| *w == what)
                    .map_or_else(|| "unknown".to_string(), |(_, r)| r.clone());
                KiteAnswer::Invalid { what, why }
            }
            "x-pagekite-signthis" => {
                let value = value.trim();
                let (what_part, token) = value.rsplit_once(':').ok_or_else(bad)?;
                KiteAnswer::SignThis {
                    what: what(what_part)?,
                    token: token.to_string(),
                }
            }
            _ => return Ok(None),
        }))
    }

    /// The header lines of this answer (`Invalid` adds its `-Why`).
    pub(super) fn header_lines(&self) -> Vec<(&'static str, String)> {
        match self {
            KiteAnswer::Ok(what) => vec![("X-PageKite-OK", what.clone())],
            KiteAnswer::Duplicate(what) => vec![("X-PageKite-Duplicate", what.clone())],
            KiteAnswer::SslOk(what) => vec![("X-PageKite-SSL-OK", what.clone())],
            KiteAnswer::Invalid { what, why } => vec![
                ("X-PageKite-Invalid-Why", format!("{what};{why}")),
                ("X-PageKite-Invalid", what.clone()),
            ],
            KiteAnswer::SignThis { what, token } => {
                vec![("X-PageKite-SignThis", format!("{what}:{token}"))]
            }
        }
    }
}

/// Parses a back-end's request head off the front of `buf`.
///
/// `Ok(None)`: the head is not complete yet (and within [`MAX_HEAD`]);
/// `Ok(Some((hello, consumed)))`: the head was the first `consumed`
/// bytes; what follows is the tunnel's first chunks.
pub fn parse_backend_hello(buf: &[u8]) -> Result<Option<(BackEndHello, usize)>, PageKiteError> {
    let Some(RawHead {
        start,
        headers,
        consumed,
    }) = split_head(buf)?
    else {
        return Ok(None);
    };
    let mut words = start.split_ascii_whitespace();
    let (method, target, version) = (words.next(), words.next(), words.next());
    let bad_start = || PageKiteError::BadStartLine {
        expected: "request",
        line: cut(start.as_bytes()),
    };
    let version_ok = version.is_some_and(|v| v.to_ascii_uppercase().starts_with("HTTP/1."));
    let websocket = match (method, target) {
        (Some("CONNECT"), Some(t)) if t.starts_with("PageKite:") && version_ok => false,
        // pagekite.py 1.5 asks for `/~:PageKite:~/v0.8` (its PROTOVER).
        (Some("GET"), Some(t)) if t.starts_with(WEBSOCKET_PREFIX) && version_ok => true,
        _ => return Err(bad_start()),
    };
    let mut hello = BackEndHello {
        transport: Transport::Chunked,
        features: Vec::new(),
        version: None,
        requests: Vec::new(),
        replace: None,
    };
    let mut key = None;
    for (name, value) in &headers {
        match name.as_str() {
            "x-pagekite" => {
                if hello.requests.len() == MAX_KITE_REQUESTS {
                    return Err(PageKiteError::TooManyKites);
                }
                hello.requests.push(KiteRequest::parse(value)?);
            }
            "x-pagekite-features" => push_list(&mut hello.features, value),
            "x-pagekite-version" => hello.version = Some(value.clone()),
            "x-pagekite-replace" => hello.replace = Some(value.clone()),
            "sec-websocket-key" => key = Some(value.clone()),
            _ => {}
        }
    }
    if websocket {
        let key = key.ok_or_else(|| PageKiteError::BadHeaderLine("no Sec-WebSocket-Key".into()))?;
        hello.transport = Transport::WebSocket { key };
    }
    Ok(Some((hello, consumed)))
}

/// Builds a back-end's request head (what pagekite.py's
/// `HTTP_PageKiteRequest` sends).
pub fn build_backend_hello(hello: &BackEndHello) -> Vec<u8> {
    let mut out = String::new();
    match &hello.transport {
        Transport::Chunked => out.push_str("CONNECT PageKite:1 HTTP/1.0\r\n"),
        Transport::WebSocket { key } => {
            out.push_str("GET /~:PageKite:~/v1 HTTP/1.1\r\n");
            out.push_str("Upgrade: websocket\r\nConnection: Upgrade\r\n");
            header(&mut out, "Sec-WebSocket-Key", key);
            out.push_str("Sec-WebSocket-Protocol: v1.pagekite.org\r\n");
            out.push_str("Sec-WebSocket-Version: 13\r\n");
        }
    }
    for feature in &hello.features {
        header(&mut out, "X-PageKite-Features", feature);
    }
    if let Some(version) = &hello.version {
        header(&mut out, "X-PageKite-Version", version);
    }
    if let Some(replace) = &hello.replace {
        header(&mut out, "X-PageKite-Replace", replace);
    }
    for request in &hello.requests {
        header(&mut out, "X-PageKite", &request.header_value());
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// Parses a front-end's answer head off the front of `buf` (`Ok(None)`:
/// not complete yet). A status other than 200 (chunked) or 101
/// (WebSocket) is [`PageKiteError::Refused`].
pub fn parse_frontend_hello(buf: &[u8]) -> Result<Option<(FrontEndHello, usize)>, PageKiteError> {
    let Some(RawHead {
        start,
        headers,
        consumed,
    }) = split_head(buf)?
    else {
        return Ok(None);
    };
    let mut words = start.split_ascii_whitespace();
    let (version, status) = (words.next(), words.next());
    if !version.is_some_and(|v| v.to_ascii_uppercase().starts_with("HTTP/1.")) {
        return Err(PageKiteError::BadStartLine {
            expected: "response",
            line: cut(start.as_bytes()),
        });
    }
    match status {
        Some("200" | "101") => {}
        _ => return Err(PageKiteError::Refused(cut(start.as_bytes()))),
    }
    let mut hello = FrontEndHello::default();
    let why = invalid_reasons(&headers);
    for (name, value) in &headers {
        match name.as_str() {
            "x-pagekite-features" => push_list(&mut hello.features, value),
            "x-pagekite-protos" => push_list(&mut hello.protos, value),
            "x-pagekite-ports" => push_list(&mut hello.ports, value),
            "x-pagekite-raw-ports" => push_list(&mut hello.raw_ports, value),
            "x-pagekite-sessionid" => hello.session_id = Some(value.clone()),
            _ => {
                if let Some(answer) = KiteAnswer::from_header(name, value, &why)? {
                    if hello.answers.len() == MAX_KITE_REQUESTS {
                        return Err(PageKiteError::TooManyKites);
                    }
                    hello.answers.push(answer);
                }
            }
        }
    }
    Ok(Some((hello, consumed)))
}

/// Builds a front-end's answer head (what pagekite.py's `AuthCallback`
/// sends for a chunked tunnel).
pub fn build_frontend_hello(hello: &FrontEndHello) -> Vec<u8> {
    let mut out = String::from(
        "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
         Pragma: no-cache\r\nExpires: 0\r\nCache-Control: no-store\r\n\
         Connection: close\r\nTransfer-Encoding: chunked\r\n",
    );
    for feature in &hello.features {
        header(&mut out, "X-PageKite-Features", feature);
    }
    header(&mut out, "X-PageKite-Protos", &hello.protos.join(", "));
    header(&mut out, "X-PageKite-Ports", &hello.ports.join(", "));
    if !hello.raw_ports.is_empty() {
        header(
            &mut out,
            "X-PageKite-Raw-Ports",
            &hello.raw_ports.join(", "),
        );
    }
    for answer in &hello.answers {
        for (name, value) in answer.header_lines() {
            header(&mut out, name, &value);
        }
    }
    if let Some(session_id) = &hello.session_id {
        header(&mut out, "X-PageKite-SessionID", session_id);
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// Appends one `Name: value` line; CR and LF in the value (which would
/// start a header of their own) become spaces.
pub(super) fn header(out: &mut String, name: &str, value: &str) {
    out.push_str(name);
    out.push_str(": ");
    out.extend(
        value
            .chars()
            .map(|c| if c == '\r' || c == '\n' { ' ' } else { c }),
    );
    out.push_str("\r\n");
}

/// True if a value holds no control characters.
fn clean_value(value: &str) -> bool {
    !value.chars().any(char::is_control)
}

/// The `X-PageKite-Invalid-Why` values of a header list, as `(what, why)`.
pub(super) fn invalid_reasons(headers: &[(String, String)]) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(name, _)| name == "x-pagekite-invalid-why")
        .filter_map(|(_, value)| {
            let (what, why) = value.split_once(';')?;
            Some((what.trim().to_string(), why.trim().to_string()))
        })
        .collect()
}

/// Splits a comma-separated list into `into` (pagekite.py joins with ", ").
fn push_list(into: &mut Vec<String>, value: &str) {
    into.extend(
        value
            .split(',')
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string),
    );
}

/// A head split up: its start line, its headers, its length in bytes.
struct RawHead {
    start: String,
    headers: Vec<(String, String)>,
    consumed: usize,
}

/// Finds the end of a head (a blank line) within [`MAX_HEAD`] and splits
/// it into its start line and its headers. `Ok(None)`: no blank line yet.
fn split_head(buf: &[u8]) -> Result<Option<RawHead>, PageKiteError> {
    let window = &buf[..buf.len().min(MAX_HEAD)];
    let mut lines = Vec::new();
    let mut line_start = 0;
    let mut consumed = None;
    for (i, byte) in window.iter().enumerate() {
        if *byte != b'\n' {
            continue;
        }
        let line = &window[line_start..i];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        line_start = i + 1;
        if line.is_empty() {
            if lines.is_empty() {
                // Blank lines before the start line: pagekite.py's reader
                // would stop here; tolerate them like HTTP servers do.
                continue;
            }
            consumed = Some(i + 1);
            break;
        }
        lines.push(line);
    }
    let Some(consumed) = consumed else {
        if buf.len() >= MAX_HEAD {
            return Err(PageKiteError::HeadTooLarge);
        }
        return Ok(None);
    };
    let mut lines = lines.into_iter();
    // The loop pushed at least one line before it could set `consumed`.
    let start = lines.next().unwrap_or_default();
    let start = std::str::from_utf8(start)
        .map_err(|_| PageKiteError::BadHeaderLine(cut(start)))?
        .trim()
        .to_string();
    let headers = parse_header_lines(lines, MAX_HEAD_HEADERS)?;
    Ok(Some(RawHead {
        start,
        headers,
        consumed,
    }))
}

/// Parses header lines into `(lowercase name, trimmed value)` pairs,
/// `X-Beanstalk*` renamed `x-pagekite*`. A line starting with a space or
/// tab continues the previous value.
pub(super) fn parse_header_lines<'a>(
    lines: impl Iterator<Item = &'a [u8]>,
    max: usize,
) -> Result<Vec<(String, String)>, PageKiteError> {
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in lines {
        if line.len() > MAX_HEADER_LINE {
            return Err(PageKiteError::HeaderLineTooLong);
        }
        let text =
            std::str::from_utf8(line).map_err(|_| PageKiteError::BadHeaderLine(cut(line)))?;
        if text.starts_with([' ', '\t']) {
            let Some((_, value)) = headers.last_mut() else {
                return Err(PageKiteError::BadHeaderLine(cut(line)));
            };
            if value.len() + text.len() > MAX_HEADER_LINE {
                return Err(PageKiteError::HeaderLineTooLong);
            }
            value.push(' ');
            value.push_str(text.trim());
            continue;
        }
        let Some((name, value)) = text.split_once(':') else {
            return Err(PageKiteError::BadHeaderLine(cut(line)));
        };
        let name = name.trim();
        if name.is_empty() || !clean_value(name) || name.contains(' ') {
            return Err(PageKiteError::BadHeaderLine(cut(line)));
        }
        if headers.len() == max {
            return Err(PageKiteError::TooManyHeaders(max));
        }
        let mut name = name.to_ascii_lowercase();
        if let Some(rest) = name.strip_prefix("x-beanstalk") {
            name = format!("x-pagekite{rest}");
        }
        headers.push((name, value.trim().to_string()));
    }
    Ok(headers)
}
