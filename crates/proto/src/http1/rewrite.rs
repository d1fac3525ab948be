//! Rewriting a request head for forwarding: the relay's own
//! `X-Forwarded-For` and `X-Forwarded-Proto`, and none of the visitor's
//! claims about earlier hops.

use std::net::IpAddr;

use super::error::HttpError;
use super::head::parse_request_head;

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
