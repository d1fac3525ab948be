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
//!
//! Files: `head` parses request and response heads, `body` delimits bodies
//! ([`BodyScanner`]), `rewrite` rewrites a request head for forwarding, and
//! `error` holds [`HttpError`] and the relay's error pages.

mod body;
mod error;
mod head;
mod rewrite;

#[cfg(test)]
mod tests;

pub use body::{BodyProgress, BodyScanner};
pub use error::{HttpError, error_response, error_response_with, reason_phrase};
pub use head::route_authority;
pub use head::{
    BodyKind, RequestHead, ResponseBody, ResponseHead, parse_request_head, parse_response_head,
};
pub use rewrite::{
    Forwarded, RequestEdits, edit_response_head, field_value, is_forwarding_field,
    is_kitepipe_field, rewrite_head, rewrite_head_with,
};

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

/// A `tchar` of RFC 9110 section 5.6.2.
fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// A byte allowed inside a field value or chunk extension: visible ASCII,
/// space, tab or obs-text.
fn is_field_byte(byte: u8) -> bool {
    matches!(byte, b'\t' | b' '..=b'~' | 0x80..=0xff)
}
