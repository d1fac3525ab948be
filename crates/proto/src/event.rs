//! Events: what an HTTP request to a gateway becomes on the link.
//!
//! A gateway turns `METHOD /ROUTE/NOUN.../NOUN//ARG/ARG?QUERY` into an
//! [`EventHeader`] (the OPEN payload of an event stream): the method is the
//! verb and the nouns name the handler, RestPipe style, so
//! `GET /server/time/utc` calls handler `get_time_utc` and
//! `GET /server/cat//hello%20/world` calls `get_cat` with the arguments
//! `hello ` and `world`. [`parse_gateway_path`] does that, refusing every
//! name a file system or shell could misread: handler names are only
//! `[a-z0-9_]`.
//!
//! On the stream the caller sends the request body and FIN; the handler's
//! side answers with a [`ReplyHead`] (a big-endian `u32` length, then JSON,
//! see [`encode_reply_head`]) followed by the reply body and FIN.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// Header carrying the relay gateway's owner token (`X-Kitepipe-Token`),
/// sent by the owner's tools with events and `/remote/` upgrades. Not
/// `Authorization`: that one travels with events to handlers. Stripped like
/// every `X-Kitepipe-*` header before an event leaves.
pub const TOKEN_HEADER: &str = "x-kitepipe-token";

/// Longest handler name, in bytes. Names are file names in a handlers
/// directory; 128 is far below any file system's limit.
pub const MAX_NAME_LEN: usize = 128;

/// Longest encoded reply head, in bytes. A head holds a status, a content
/// type, a few headers and an error text (a stderr tail of a few KiB).
pub const MAX_REPLY_HEAD: usize = 64 * 1024;

/// Longest node name in a route, in bytes (node names are host-name like).
pub const MAX_NODE_LEN: usize = 64;

/// An event: the OPEN payload of an event stream (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventHeader {
    /// The handler name, e.g. `get_time_utc` (`[a-z0-9_]`, at most [`MAX_NAME_LEN`]).
    pub name: String,
    /// The HTTP method as the caller sent it, e.g. `GET`.
    pub method: String,
    /// The request path after the route (still percent-encoded), e.g.
    /// `/cat//hello%20/world`; an HTTP upstream handler receives it as is.
    pub path: String,
    /// Arguments (the percent-decoded segments after `//`).
    #[serde(default)]
    pub args: Vec<String>,
    /// The query string without `?`, or empty.
    #[serde(default)]
    pub query: String,
    /// Request headers that travel with the event (content type, accept,
    /// and the caller's own `X-` headers), names lowercase.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// Connector to relay only: forward the event to this connector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Relay to connector only: who called. The relay fills it in from the
    /// calling link (never from what a connector claims).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller: Option<Caller>,
    /// How long (ms) the relay may wait for the `to` connector to come
    /// online before answering 503; 0 for not at all.
    #[serde(default)]
    pub wait_ms: u64,
}

/// Who sent an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    /// Node name: `relay` for the relay itself, else the connector's name.
    pub node: String,
    /// The certificate identity of the calling connector, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// The first bytes of an event's reply: how the caller's gateway answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyHead {
    /// The HTTP status the caller sees (200 ok, 404 no handler, 500 handler
    /// failed, 504 handler timed out, or an upstream handler's own status).
    pub status: u16,
    /// Content type of the body, if the handler set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// Further response headers (from HTTP upstream handlers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
    /// The handler's return code (an executable's exit status), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// Why the event failed, for humans (e.g. a stderr tail).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Where a gateway request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/server/...` on a connector: the relay's handlers.
    Server,
    /// `/client/NODE/...` on the relay: that connector's handlers.
    Client(String),
    /// `/peer/NODE/...` on a connector: another connector, through the relay.
    Peer(String),
}

/// A gateway request path, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventPath {
    /// Where it goes.
    pub route: Route,
    /// The handler name.
    pub name: String,
    /// The path after the route (percent-encoded, starting with `/`).
    pub path: String,
    /// Decoded arguments.
    pub args: Vec<String>,
}

/// Why a gateway path is not an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventPathError {
    /// The first segment is not `server`, `client` or `peer`.
    #[error("unknown route: paths start with /server/, /client/NODE/ or /peer/NODE/")]
    UnknownRoute,
    /// The node name in a route is empty or not a node name.
    #[error("bad node name {0:?}")]
    BadNode(String),
    /// No noun after the route.
    #[error("no event name: give a noun, e.g. /server/time")]
    NoName,
    /// A noun holds something other than `[a-z0-9_]`.
    #[error("bad event name segment {0:?}: only a-z, 0-9 and _ are allowed")]
    BadNoun(String),
    /// The method is not an HTTP token of letters.
    #[error("bad method {0:?}")]
    BadMethod(String),
    /// The handler name is longer than [`MAX_NAME_LEN`].
    #[error("event name longer than {MAX_NAME_LEN} bytes")]
    NameTooLong,
    /// A segment is not valid percent-encoded UTF-8, or holds a NUL.
    #[error("bad percent-encoding or invalid UTF-8 in {0:?}")]
    BadEncoding(String),
    /// An argument is or holds a dot-segment (`.` or `..`, also encoded,
    /// between `/` or `\`): an upstream that normalizes paths would
    /// climb out of the handler's path with it.
    #[error("argument {0:?} holds a dot-segment (. or ..): not allowed in event arguments")]
    DotSegment(String),
    /// The path does not name the event's handler and arguments.
    #[error("the event path {0:?} does not match its handler name and arguments")]
    PathMismatch(String),
}

/// Parses a gateway request (`method`, and the path without the query).
///
/// ```
/// use kitepipe_proto::event::{parse_gateway_path, Route};
///
/// let event = parse_gateway_path("GET", "/server/cat//hello%20/world").unwrap();
/// assert_eq!(event.route, Route::Server);
/// assert_eq!(event.name, "get_cat");
/// assert_eq!(event.args, ["hello ", "world"]);
/// let event = parse_gateway_path("POST", "/client/laptop/time/utc").unwrap();
/// assert_eq!((event.route, event.name.as_str()), (Route::Client("laptop".into()), "post_time_utc"));
/// assert!(parse_gateway_path("GET", "/server/../etc/passwd").is_err());
/// ```
pub fn parse_gateway_path(method: &str, path: &str) -> Result<EventPath, EventPathError> {
    let rest = path.strip_prefix('/').ok_or(EventPathError::UnknownRoute)?;
    let (first, rest) = rest.split_once('/').unwrap_or((rest, ""));
    let (route, rest) = match first {
        "server" => (Route::Server, rest),
        "client" | "peer" => {
            let (node, rest) = rest.split_once('/').unwrap_or((rest, ""));
            let node = decode_segment(node)?;
            if !is_node_name(&node) {
                return Err(EventPathError::BadNode(node));
            }
            let route = if first == "client" {
                Route::Client(node)
            } else {
                Route::Peer(node)
            };
            (route, rest)
        }
        _ => return Err(EventPathError::UnknownRoute),
    };
    let (name, path, args) = parse_event_path(method, &format!("/{rest}"))?;
    Ok(EventPath {
        route,
        name,
        path,
        args,
    })
}

/// Parses the path after the route (`/NOUN.../NOUN//ARG/ARG`): the handler
/// name, the canonical path (nouns, then the arguments percent-encoded
/// anew, so what an upstream receives is exactly what was checked) and the
/// decoded arguments. Refuses dot-segments in arguments.
///
/// ```
/// use kitepipe_proto::event::parse_event_path;
///
/// let (name, path, args) = parse_event_path("GET", "/status/").unwrap();
/// assert_eq!((name.as_str(), path.as_str(), args.len()), ("get_status", "/status", 0));
/// let (_, path, args) = parse_event_path("GET", "/cat//a%2fb/c%7E").unwrap();
/// assert_eq!((path.as_str(), args), ("/cat//a%2Fb/c~", vec!["a/b".to_string(), "c~".into()]));
/// assert!(parse_event_path("GET", "/status//../../admin").is_err());
/// assert!(parse_event_path("GET", "/status//%2e%2E/admin").is_err());
/// ```
pub fn parse_event_path(
    method: &str,
    path: &str,
) -> Result<(String, String, Vec<String>), EventPathError> {
    let rest = path
        .strip_prefix('/')
        .ok_or_else(|| EventPathError::BadEncoding(path.to_string()))?;
    let (nouns, args) = match rest.split_once("//") {
        Some((nouns, args)) => (nouns, Some(args)),
        None => (rest, None),
    };
    let verb = method_verb(method)?;
    let mut name = verb;
    let mut canonical = String::with_capacity(path.len());
    let mut n_nouns = 0;
    for noun in nouns.split('/') {
        let noun = decode_segment(noun)?;
        if noun.is_empty() && n_nouns > 0 {
            // A trailing slash: `/server/time/` is `/server/time`.
            continue;
        }
        if !is_noun(&noun) {
            if noun.is_empty() {
                return Err(EventPathError::NoName);
            }
            return Err(EventPathError::BadNoun(noun));
        }
        name.push('_');
        name.push_str(&noun);
        canonical.push('/');
        canonical.push_str(&noun);
        n_nouns += 1;
    }
    if n_nouns == 0 {
        return Err(EventPathError::NoName);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(EventPathError::NameTooLong);
    }
    let args = match args {
        None | Some("") => Vec::new(),
        Some(args) => args
            .split('/')
            .map(decode_segment)
            .collect::<Result<Vec<_>, _>>()?,
    };
    check_args(&args)?;
    if !args.is_empty() {
        canonical.push('/');
        for arg in &args {
            canonical.push('/');
            encode_segment(arg, &mut canonical);
        }
    }
    Ok((name, canonical, args))
}

/// Refuses arguments that are or hold a dot-segment: split at `/` and `\`
/// (which some servers also take as a separator), a part that is `.` or
/// `..`, also before a `;` (path parameters, as in `..;/`).
fn check_args(args: &[String]) -> Result<(), EventPathError> {
    for arg in args {
        let dotted = arg.split(['/', '\\']).any(|part| {
            let part = part.split(';').next().unwrap_or(part);
            part == "." || part == ".."
        });
        if dotted {
            return Err(EventPathError::DotSegment(arg.clone()));
        }
    }
    Ok(())
}

/// Percent-encodes `text` for a path segment: everything but RFC 3986's
/// unreserved characters.
fn encode_segment(text: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 15) as usize] as char);
        }
    }
}

/// True if `name` is a valid handler name: 1 to [`MAX_NAME_LEN`] bytes of
/// `[a-z0-9_]`. Such a name is a plain file name: no `.`, `/` or shell
/// metacharacter can appear in it.
pub fn is_handler_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME_LEN && is_noun(name)
}

/// True if `name` can be a node name in a route: 1 to [`MAX_NODE_LEN`]
/// bytes of letters, digits, `-`, `_` and `.` (not starting with `.`).
pub fn is_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NODE_LEN
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl EventHeader {
    /// Checks what a peer sent: the name is a handler name, the arguments
    /// hold no NUL (they become argv) and no dot-segment, the path is
    /// printable ASCII and names exactly this handler and these arguments.
    /// Returns the path as it was checked, in canonical form (see
    /// [`parse_event_path`]): what a handler's upstream should receive.
    pub fn validate(&self) -> Result<String, EventPathError> {
        if !is_handler_name(&self.name) {
            return Err(EventPathError::BadNoun(self.name.clone()));
        }
        if let Some(bad) = self.args.iter().find(|arg| arg.contains('\0')) {
            return Err(EventPathError::BadEncoding(bad.clone()));
        }
        check_args(&self.args)?;
        let printable = |text: &str| text.bytes().all(|b| b.is_ascii_graphic());
        if !printable(&self.path) || !self.path.starts_with('/') {
            return Err(EventPathError::BadEncoding(self.path.clone()));
        }
        // What handler rules were checked against (the name) is what the
        // handler gets: the path must name the same handler and arguments.
        let (name, canonical, args) = parse_event_path(&self.method, &self.path)?;
        if name != self.name || args != self.args {
            return Err(EventPathError::PathMismatch(self.path.clone()));
        }
        if !printable(&self.query) {
            return Err(EventPathError::BadEncoding(self.query.clone()));
        }
        if !self.method.bytes().all(|b| b.is_ascii_alphabetic()) || self.method.is_empty() {
            return Err(EventPathError::BadMethod(self.method.clone()));
        }
        Ok(canonical)
    }
}

impl ReplyHead {
    /// A head with `status` and nothing else.
    pub fn status(status: u16) -> ReplyHead {
        ReplyHead {
            status,
            content_type: None,
            headers: Vec::new(),
            code: None,
            error: None,
        }
    }
}

/// Why a reply head could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum ReplyHeadError {
    /// The length prefix exceeds [`MAX_REPLY_HEAD`].
    #[error("reply head of {0} bytes exceeds the maximum of {MAX_REPLY_HEAD}")]
    TooLarge(usize),
    /// The head is not valid JSON for a [`ReplyHead`].
    #[error("malformed reply head: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Encodes a reply head: `u32` big-endian length, then JSON.
pub fn encode_reply_head(head: &ReplyHead) -> Bytes {
    // Plain struct into a Vec: cannot fail (see message::encode).
    let json = serde_json::to_vec(head).expect("reply heads always serialize");
    let mut out = BytesMut::with_capacity(4 + json.len());
    // Heads are far below 4 GiB: MAX_REPLY_HEAD bounds what we accept, and
    // what we write is a few fields.
    out.put_u32(json.len() as u32);
    out.put_slice(&json);
    out.freeze()
}

/// Decodes a reply head from the front of `buf`: `Ok(None)` while more
/// bytes are needed, else the head and how many bytes it took. Checks the
/// length before waiting for (or allocating) the rest.
pub fn decode_reply_head(buf: &[u8]) -> Result<Option<(ReplyHead, usize)>, ReplyHeadError> {
    let Some(prefix) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if len > MAX_REPLY_HEAD {
        return Err(ReplyHeadError::TooLarge(len));
    }
    let Some(json) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    Ok(Some((serde_json::from_slice(json)?, 4 + len)))
}

/// The lowercase verb of `method`.
fn method_verb(method: &str) -> Result<String, EventPathError> {
    if method.is_empty() || method.len() > 16 || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(EventPathError::BadMethod(method.to_string()));
    }
    Ok(method.to_ascii_lowercase())
}

fn is_noun(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Percent-decodes one path segment into UTF-8 without NUL.
fn decode_segment(segment: &str) -> Result<String, EventPathError> {
    let bad = || EventPathError::BadEncoding(segment.to_string());
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or_else(bad)?;
            let hi = (hex[0] as char).to_digit(16).ok_or_else(bad)?;
            let lo = (hex[1] as char).to_digit(16).ok_or_else(bad)?;
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    if out.contains(&0) {
        return Err(bad());
    }
    String::from_utf8(out).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_paths() {
        let ok = |method: &str, path: &str| parse_gateway_path(method, path).unwrap();
        let event = ok("GET", "/server/time/utc");
        assert_eq!(
            (event.route, event.name.as_str()),
            (Route::Server, "get_time_utc")
        );
        assert_eq!(event.path, "/time/utc");
        assert!(event.args.is_empty());
        let event = ok("GET", "/server/cat//hello%20/world");
        assert_eq!(event.args, ["hello ", "world"]);
        assert_eq!(event.path, "/cat//hello%20/world");
        assert_eq!(ok("GET", "/server/time/").name, "get_time");
        assert_eq!(ok("GET", "/server/cat//").args, Vec::<String>::new());
        assert_eq!(ok("GET", "/server/cat//a/").args, ["a", ""]);
        assert_eq!(ok("GET", "/server/cat//a%2Fb").args, ["a/b"]);
        let event = ok("delete", "/peer/ci-7.lan/jobs/old");
        assert_eq!(
            (event.route, event.name.as_str()),
            (Route::Peer("ci-7.lan".into()), "delete_jobs_old")
        );
    }

    #[test]
    fn hostile_gateway_paths() {
        let cases = [
            "/server/../etc",
            "/server/..",
            "/server/a/../b",
            "/server/%2e%2e/x",
            "/server/a%2Fb",
            "/server/Time",
            "/server/a.b",
            "/server/a;rm -rf",
            "/server/a%3Brm",
            "/server/$(id)",
            "/server/`id`",
            "/server/a b",
            "/server/",
            "/server",
            "/server//args",
            "/client//time",
            "/client/../time",
            "/client/a%2Fb/time",
            "/client/.hidden/time",
            "/other/time",
            "time",
            "",
            "/server/cat//%ff",
            "/server/cat//%00",
            "/server/cat//%zz",
            "/server/cat//%4",
            "/server/status//../../admin/delete",
            "/server/status//%2e%2e/%2E%2E/admin",
            "/server/status//.%2e/x",
            "/server/status//..%2F..%2Fadmin",
            "/server/status//x%2F..%2Fadmin",
            "/server/status//.",
            "/server/status//..;/admin",
            "/server/status//..%5Cadmin",
            "/server/status//ok/../../admin",
        ];
        for path in cases {
            assert!(parse_gateway_path("GET", path).is_err(), "{path:?}");
        }
        assert!(parse_gateway_path("G E", "/server/time").is_err());
        assert!(parse_gateway_path("", "/server/time").is_err());
        let long = format!("/server/{}", "a".repeat(MAX_NAME_LEN));
        assert_eq!(
            parse_gateway_path("GET", &long),
            Err(EventPathError::NameTooLong)
        );
    }

    #[test]
    fn reply_heads_round_trip_and_wait_for_bytes() {
        let head = ReplyHead {
            status: 500,
            content_type: Some("application/json".into()),
            headers: vec![("x-a".into(), "b".into())],
            code: Some(3),
            error: Some("boom".into()),
        };
        let bytes = encode_reply_head(&head);
        for cut in 0..bytes.len() {
            assert!(decode_reply_head(&bytes[..cut]).unwrap().is_none(), "{cut}");
        }
        let mut more = bytes.to_vec();
        more.extend_from_slice(b"body");
        let (back, used) = decode_reply_head(&more).unwrap().unwrap();
        assert_eq!((back, used), (head, bytes.len()));
        let huge = ((MAX_REPLY_HEAD + 1) as u32).to_be_bytes();
        assert!(matches!(
            decode_reply_head(&huge),
            Err(ReplyHeadError::TooLarge(_))
        ));
        assert!(decode_reply_head(b"\0\0\0\x02{x").is_err());
    }

    #[test]
    fn peer_headers_are_validated() {
        let header = EventHeader {
            name: "get_time".into(),
            method: "GET".into(),
            path: "/time".into(),
            args: vec![],
            query: String::new(),
            headers: vec![],
            to: None,
            caller: None,
            wait_ms: 0,
        };
        assert_eq!(header.validate(), Ok("/time".to_string()));
        for bad in [
            EventHeader {
                name: "../x".into(),
                ..header.clone()
            },
            EventHeader {
                name: "".into(),
                ..header.clone()
            },
            EventHeader {
                args: vec!["a\0b".into()],
                ..header.clone()
            },
            EventHeader {
                path: "/a b".into(),
                ..header.clone()
            },
            EventHeader {
                method: "G;T".into(),
                ..header.clone()
            },
            // Checked as get_time, sent to an upstream as /admin.
            EventHeader {
                path: "/admin".into(),
                ..header.clone()
            },
            EventHeader {
                path: "/time//..".into(),
                args: vec!["..".into()],
                ..header.clone()
            },
            EventHeader {
                path: "/time//a".into(),
                args: vec!["b".into()],
                ..header.clone()
            },
            EventHeader {
                method: "POST".into(),
                ..header.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
