//! Rewriting a request head for forwarding: the relay's own
//! `X-Forwarded-For` and `X-Forwarded-Proto`, and none of the visitor's
//! claims about earlier hops; plus a kite's own header edits
//! ([`RequestEdits`], [`edit_response_head`]) and reading one field
//! ([`field_value`]).

use std::net::IpAddr;

use super::error::HttpError;
use super::head::parse_request_head;
use crate::http_policy::HeaderRules;

/// Where a request came from, for the forwarding headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forwarded {
    /// The visitor's address as the relay saw it.
    pub client_ip: IpAddr,
    /// The scheme the visitor used: `"http"` or `"https"`.
    pub proto: &'static str,
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
    rewrite_head_with(raw_head, forwarded, &RequestEdits::NONE)
}

/// A kite's edits of its requests' heads, on top of the forwarding fields.
#[derive(Debug, Clone, Copy)]
pub struct RequestEdits<'a> {
    /// Fields to remove, and to set (replacing the visitor's); the relay
    /// checked that none is a framing, hop-by-hop or forwarding field.
    pub headers: Option<&'a HeaderRules>,
    /// `X-Forwarded-Host` with this value (the visitor's `Host`, which the
    /// head parser checked as a field value).
    pub forwarded_host: Option<&'a [u8]>,
}

impl RequestEdits<'_> {
    /// No edits: [`rewrite_head`].
    pub const NONE: RequestEdits<'static> = RequestEdits {
        headers: None,
        forwarded_host: None,
    };
}

/// [`rewrite_head`] with a kite's [`RequestEdits`]: fields named in the
/// rules' `remove` or `set` are dropped, the `set` ones and
/// `X-Forwarded-Host` added before the relay's two forwarding fields.
///
/// ```
/// use std::collections::BTreeMap;
/// use std::net::IpAddr;
/// use kitepipe_proto::http1::{rewrite_head_with, Forwarded, RequestEdits};
/// use kitepipe_proto::http_policy::HeaderRules;
/// let head = b"GET / HTTP/1.1\r\nHost: a.example\r\nCookie: c=1\r\n\r\n";
/// let forwarded = Forwarded { client_ip: IpAddr::from([203, 0, 113, 7]), proto: "http" };
/// let rules = HeaderRules {
///     set: BTreeMap::from([("X-Team".to_string(), "blue".to_string())]),
///     remove: vec!["cookie".to_string()],
/// };
/// let edits = RequestEdits { headers: Some(&rules), forwarded_host: Some(b"a.example") };
/// assert_eq!(
///     rewrite_head_with(head, &forwarded, &edits)?,
///     b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Team: blue\r\n\
///       X-Forwarded-Host: a.example\r\nX-Forwarded-For: 203.0.113.7\r\n\
///       X-Forwarded-Proto: http\r\n\r\n"
/// );
/// # Ok::<(), kitepipe_proto::http1::HttpError>(())
/// ```
pub fn rewrite_head_with(
    raw_head: &[u8],
    forwarded: &Forwarded,
    edits: &RequestEdits<'_>,
) -> Result<Vec<u8>, HttpError> {
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
        if is_forwarding_field(name)
            || is_kitepipe_field(name)
            || edits.headers.is_some_and(|rules| is_edited(rules, name))
        {
            continue;
        }
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(rules) = edits.headers {
        append_set(&mut out, rules);
    }
    if let Some(host) = edits.forwarded_host {
        debug_assert!(
            host.iter().all(|&byte| byte != b'\r' && byte != b'\n'),
            "the head parser checked Host as a field value"
        );
        out.extend_from_slice(b"X-Forwarded-Host: ");
        out.extend_from_slice(host);
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

/// A kite's edits of a response head (`raw_head`: `buf[..head_len]` of a
/// head that [`parse_response_head`](super::parse_response_head)
/// accepted): the status line and the other fields keep their bytes and
/// order, fields named in `remove` or `set` are dropped and the `set` ones
/// added last. The relay checked that no rule touches a framing or
/// hop-by-hop field, so the response is delimited as before.
///
/// ```
/// use std::collections::BTreeMap;
/// use kitepipe_proto::http1::edit_response_head;
/// use kitepipe_proto::http_policy::HeaderRules;
/// let head = b"HTTP/1.1 200 OK\r\nServer: x/1.0\r\nContent-Length: 0\r\n\r\n";
/// let rules = HeaderRules {
///     set: BTreeMap::from([("X-Frame-Options".to_string(), "DENY".to_string())]),
///     remove: vec!["Server".to_string()],
/// };
/// assert_eq!(
///     edit_response_head(head, &rules),
///     b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Frame-Options: DENY\r\n\r\n"
/// );
/// ```
pub fn edit_response_head(raw_head: &[u8], rules: &HeaderRules) -> Vec<u8> {
    let mut lines = raw_head
        .split(|&byte| byte == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line));
    let mut out = Vec::with_capacity(raw_head.len() + 128);
    // The parser skips empty lines before the status line (as it does
    // before a request line); so does the edit.
    if let Some(status) = lines.by_ref().find(|line| !line.is_empty()) {
        out.extend_from_slice(status);
        out.extend_from_slice(b"\r\n");
    }
    for line in lines {
        if line.is_empty() {
            break;
        }
        let name = line.split(|&byte| byte == b':').next().unwrap_or_default();
        if is_edited(rules, name) {
            continue;
        }
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    append_set(&mut out, rules);
    out.extend_from_slice(b"\r\n");
    out
}

/// The value of the first field named `name` (any case) in a head that a
/// head parser accepted, without surrounding whitespace.
///
/// ```
/// use kitepipe_proto::http1::field_value;
/// let head = b"GET / HTTP/1.1\r\nHost: a\r\nAuthorization:  Basic eDp5\r\n\r\n";
/// assert_eq!(field_value(head, b"authorization"), Some(&b"Basic eDp5"[..]));
/// assert_eq!(field_value(head, b"cookie"), None);
/// ```
pub fn field_value<'a>(raw_head: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    raw_head
        .split(|&byte| byte == b'\n')
        .skip(1)
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .take_while(|line| !line.is_empty())
        .find_map(|line| {
            let colon = line.iter().position(|&byte| byte == b':')?;
            let (field, value) = line.split_at(colon);
            field
                .eq_ignore_ascii_case(name)
                .then(|| value.strip_prefix(b":").unwrap_or(value).trim_ascii())
        })
}

/// Whether a field is dropped by `rules`: named in `remove` or `set`.
fn is_edited(rules: &HeaderRules, name: &[u8]) -> bool {
    rules
        .remove
        .iter()
        .chain(rules.set.keys())
        .any(|edited| edited.as_bytes().eq_ignore_ascii_case(name))
}

/// Appends `rules.set` as field lines.
fn append_set(out: &mut Vec<u8>, rules: &HeaderRules) {
    for (name, value) in &rules.set {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}
