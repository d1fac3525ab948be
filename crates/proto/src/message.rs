//! Control messages (stream 0) and stream headers (the payload of OPEN).
//!
//! Messages are JSON: they are rare (handshake, registration, notices), easy
//! to read in a trace, and easy to extend with optional fields. Bulk data
//! never goes through here.
//!
//! The handshake, in order:
//!
//! 1. connector -> relay: [`ConnectorMessage::Hello`] (version, role, instance, nonce)
//! 2. relay -> connector: [`RelayMessage::Challenge`] (relay nonce) or [`RelayMessage::Error`]
//! 3. connector -> relay: [`ConnectorMessage::Register`] (kites with proofs)
//! 4. relay -> connector: [`RelayMessage::Registered`] (each kite accepted or refused)
//!
//! After that either side may open streams. The connector may send another
//! `Register` at any time, which may also withdraw kites it served
//! ([`Register::withdraw`]: its config changed). The relay may send [`RelayMessage::Withdrawn`] at
//! any time, when its rules no longer let the link's identity serve a kite.

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::event::EventHeader;
use crate::http_policy::HttpPolicy;
use crate::kite::KiteRef;
use crate::remote::{AgentHello, RemoteOp};

/// Version of the link protocol described here.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest control message or stream header accepted, in bytes. A
/// registration of a few thousand kites fits; anything larger is hostile.
pub const MAX_MESSAGE_LEN: usize = 128 * 1024;

/// Messages a connector sends on stream 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ConnectorMessage {
    /// First message of a link.
    Hello(Hello),
    /// Claims kites (first after the challenge, and again at any time).
    Register(Register),
}

/// Messages a relay sends on stream 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RelayMessage {
    /// Answer to a hello: the relay's nonce for kite proofs.
    Challenge(Challenge),
    /// Outcome of a registration, one entry per claimed kite.
    Registered(Registered),
    /// Kites the relay no longer serves through this link (its rules changed);
    /// the link itself stays up.
    Withdrawn(Withdrawn),
    /// The relay refuses the link or a request; it closes the link after a fatal one.
    Error(ErrorMessage),
}

/// Which end of a link a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Dials out and serves kites.
    Connector,
    /// Accepts links and visitors.
    Relay,
}

/// First message of a link, from the connector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version spoken by the connector.
    pub version: u32,
    /// Always [`Role::Connector`] for now.
    pub role: Role,
    /// Random id of the connector process; a new link with the same instance
    /// replaces the old one at once (see the relay's registry).
    pub instance: String,
    /// Node name of the connector (for logs and, later, addressing events).
    pub node: String,
    /// Software name and version, for logs.
    pub software: String,
    /// Connector's nonce (hex), mixed into every kite proof.
    pub client_nonce: String,
    /// Kinds of remote operations the connector accepts from the relay
    /// (`--allow-remote`); empty: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote: Vec<RemoteClass>,
    /// The connector as an agent of remote operations (who it runs as,
    /// where), sent when `remote` is not empty; the relay hands it to
    /// clients of `/remote/NODE` as the agent's hello.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentHello>,
}

/// A kind of remote operation: what a connector accepts from its relay
/// (`--allow-remote exec,fs`) and what a relay's `[[remote]]` rules grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RemoteClass {
    /// Run commands: exec, spawn, kill.
    Exec,
    /// File operations: read, write, ls, stat, mkdir, rm, mv (and cp).
    Fs,
    /// Port forwarding: connect to an address as seen from the node.
    Forward,
}

impl RemoteClass {
    /// Every class, in order.
    pub const ALL: [RemoteClass; 3] = [RemoteClass::Exec, RemoteClass::Fs, RemoteClass::Forward];

    /// The name used in flags, rules and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            RemoteClass::Exec => "exec",
            RemoteClass::Fs => "fs",
            RemoteClass::Forward => "forward",
        }
    }

    /// Parses a comma-separated list (`exec,fs`; `all` for every class)
    /// into a sorted list without repeats.
    pub fn parse_list(text: &str) -> Result<Vec<RemoteClass>, String> {
        let mut classes = Vec::new();
        for word in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word.to_ascii_lowercase().as_str() {
                "exec" => classes.push(RemoteClass::Exec),
                "fs" => classes.push(RemoteClass::Fs),
                "forward" => classes.push(RemoteClass::Forward),
                "all" => classes.extend(RemoteClass::ALL),
                _ => {
                    return Err(format!(
                        "unknown remote operation kind {word:?}: use exec, fs, forward or all"
                    ));
                }
            }
        }
        if classes.is_empty() {
            return Err("no remote operation kind given: use exec, fs, forward or all".into());
        }
        classes.sort();
        classes.dedup();
        Ok(classes)
    }

    /// `exec, fs` style list for messages; `nothing` when empty.
    pub fn describe(classes: &[RemoteClass]) -> String {
        if classes.is_empty() {
            return "nothing".into();
        }
        classes
            .iter()
            .map(|c| c.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for RemoteClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The relay's answer to a hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// Protocol version the relay will speak on this link.
    pub version: u32,
    /// Relay's nonce (hex), mixed into every kite proof.
    pub server_nonce: String,
}

/// Most node proofs one registration may carry; the relay checks no more.
/// A connector sends one per distinct domain secret it holds.
pub const MAX_NODE_PROOFS: usize = 8;

/// A set of kite claims, and proofs of the hello's node name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    /// Kites claimed.
    pub kites: Vec<KiteClaim>,
    /// Proofs (hex) that the connector may use the node name of its hello:
    /// each the kite proof of protocol `node` and the node name, under one
    /// domain secret the connector holds (at most [`MAX_NODE_PROOFS`]). The
    /// relay accepts the name if one proof matches the secret of a domain
    /// covering it. Ignored on a link with a certificate (the certificate
    /// names the node). Absent (an older connector): the name stays unproven.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_proofs: Vec<String>,
    /// Kites this link no longer serves (the connector's config dropped
    /// them), as they were accepted: the relay stops routing them to this
    /// link, and to this link only. At most [`MAX_WITHDRAW`]; a kite the
    /// link does not hold is ignored. Absent (an older connector): nothing
    /// is withdrawn. An older relay ignores it: it keeps routing the kite,
    /// and the connector resets those visitors (`no_such_kite`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub withdraw: Vec<KiteRef>,
}

/// Most kites one registration may withdraw; a registration with more is
/// answered with an error and its withdrawals ignored (its claims are
/// judged as usual). A connector reloading its config withdraws the kites
/// it dropped, far fewer than this.
pub const MAX_WITHDRAW: usize = 1024;

/// The `protocol` of a node proof's input (kites use their protocol's
/// name, so a kite proof never passes for a node proof).
pub const NODE_PROOF_PROTOCOL: &str = "node";

/// One kite claimed by a connector, with proof that it holds the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KiteClaim {
    /// The kite.
    pub kite: KiteRef,
    /// HMAC proof (hex) over the link's TLS exporter, both nonces, protocol and name.
    pub proof: String,
    /// Visitor addresses allowed (CIDR blocks or bare addresses, see
    /// [`crate::policy`]); empty: every address not denied. The relay
    /// parses and bounds it again (a bad or too long list refuses the claim).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Visitor addresses refused (CIDR blocks or bare addresses); a deny
    /// wins over an allow.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// HTTP-level rules of an http kite (see [`crate::http_policy`]); the
    /// relay checks and bounds them again.
    #[serde(default, skip_serializing_if = "HttpPolicy::is_default")]
    pub http: HttpPolicy,
}

/// Outcome of a registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    /// One entry per claim, in claim order.
    pub kites: Vec<KiteOutcome>,
    /// What the relay made of the node name, on a link without a
    /// certificate, in answer to the first registration (absent from older
    /// relays).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeOutcome>,
}

/// Whether a link's node name is proven: only a proven name routes events
/// (`/client/NODE/`, `/peer/NODE/`) and remote operations (`/remote/NODE`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeOutcome {
    /// The node name, as the relay routes it (lowercase).
    pub name: String,
    /// True if a node proof matched.
    pub proven: bool,
    /// Why not, for humans (empty when proven).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// What the relay made of one claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KiteOutcome {
    /// The kite as claimed.
    pub kite: KiteRef,
    /// Accepted or refused.
    pub result: KiteResult,
}

/// Accepted or refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum KiteResult {
    /// The kite is online through this link.
    Accepted {
        /// Where visitors reach it, e.g. `http://blog.example.net/` or `tcp://relay:15432`.
        public: String,
        /// For TCP kites the public port actually bound (useful when 0 was asked).
        #[serde(default)]
        port: u16,
    },
    /// The kite is not served through this link.
    Refused {
        /// Why, as a code.
        reason: RefuseReason,
        /// Why, for humans.
        message: String,
    },
}

/// Why a kite claim was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefuseReason {
    /// No domain on the relay covers this name and protocol.
    NoDomain,
    /// The proof does not match the domain's secret.
    BadSecret,
    /// The TCP port is outside the relay's allowed range or taken by another kite.
    PortUnavailable,
    /// The relay does not serve this protocol (no listener for it).
    ProtoDisabled,
    /// The claim itself is malformed.
    Invalid,
    /// The link's certificate identity may not claim this kite under the
    /// relay's rules, or the claim carries neither a proof nor a certificate.
    NotAllowed,
}

/// Kites taken away from a link after registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Withdrawn {
    /// The kites, as they were accepted.
    pub kites: Vec<KiteRef>,
    /// Why, for humans.
    pub message: String,
}

/// An error from the relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMessage {
    /// Class of the error.
    pub code: ErrorCode,
    /// Human-readable reason.
    pub message: String,
}

/// Class of a relay error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The protocol versions do not match.
    Version,
    /// A message arrived out of order or malformed.
    Protocol,
    /// The relay is shutting down or overloaded.
    Unavailable,
    /// The link's certificate is no longer accepted (revoked, expired, or
    /// not from the relay's CA any more); the relay closes the link.
    Unauthorized,
}

/// What a stream carries; the payload of its OPEN frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StreamHeader {
    /// A visitor's connection to a kite, opened by the relay.
    Visitor(VisitorHeader),
    /// An event (an HTTP exchange through the gateways), opened by either
    /// side; see [`crate::event`].
    Event(EventHeader),
    /// A remote operation the relay passes on to a connector that accepts
    /// it (`--allow-remote`), with who asked; see [`crate::remote`].
    RemoteRelayed(RelayedOp),
}

/// A remote operation relayed to a connector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayedOp {
    /// Who asked, as the relay knows them (for the connector's log).
    pub caller: String,
    /// The operation.
    pub op: RemoteOp,
}

impl RemoteOp {
    /// The kind of the operation, as rules and `--allow-remote` name it.
    pub fn class(&self) -> RemoteClass {
        match self {
            RemoteOp::Exec(_) | RemoteOp::Spawn(_) | RemoteOp::Kill(_) => RemoteClass::Exec,
            RemoteOp::Read(_)
            | RemoteOp::Write(_)
            | RemoteOp::Ls(_)
            | RemoteOp::Stat(_)
            | RemoteOp::Mkdir(_)
            | RemoteOp::Rm(_)
            | RemoteOp::Mv(_) => RemoteClass::Fs,
            RemoteOp::Connect(_) => RemoteClass::Forward,
        }
    }

    /// One line for logs: the operation and its main argument, e.g.
    /// `exec ["uname", "-a"]`, `read "/etc/hosts"`, `connect db:5432`.
    pub fn summary(&self) -> String {
        match self {
            RemoteOp::Exec(op) => format!("exec {:?}", op.argv),
            RemoteOp::Spawn(op) => format!("spawn {:?}", op.argv),
            RemoteOp::Kill(op) => format!("kill {} signal {}", op.pid, op.signal),
            RemoteOp::Read(op) => format!("read {:?}", op.path),
            RemoteOp::Write(op) => format!("write {:?}", op.path),
            RemoteOp::Ls(op) => format!("ls {:?}", op.path),
            RemoteOp::Stat(op) => format!("stat {:?}", op.path),
            RemoteOp::Mkdir(op) => format!("mkdir {:?}", op.path),
            RemoteOp::Rm(op) => format!("rm {:?}", op.path),
            RemoteOp::Mv(op) => format!("mv {:?} {:?}", op.from, op.to),
            RemoteOp::Connect(op) => format!("connect {}:{}", op.host, op.port),
        }
    }
}

/// A visitor's connection to a kite.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VisitorHeader {
    /// The kite as registered (the pattern, for wildcard kites).
    pub kite: KiteRef,
    /// The name the visitor asked for (Host or SNI), if any.
    #[serde(default)]
    pub host: Option<String>,
    /// The visitor's address as the relay saw it.
    pub peer: String,
    /// The relay's address the visitor connected to, if known (absent
    /// from older relays): the destination of a PROXY protocol header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_addr: Option<String>,
}

/// Why a message could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// Larger than [`MAX_MESSAGE_LEN`].
    #[error("message of {0} bytes exceeds the maximum of {MAX_MESSAGE_LEN}")]
    TooLarge(usize),
    /// Not valid JSON for the expected message type.
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Encodes a message as JSON bytes.
pub fn encode<T: Serialize>(message: &T) -> Bytes {
    // Serializing these plain structs into a Vec cannot fail: no maps with
    // non-string keys, no custom serializers.
    Bytes::from(serde_json::to_vec(message).expect("control messages always serialize"))
}

/// Decodes a message, refusing oversized input before parsing.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, MessageError> {
    if bytes.len() > MAX_MESSAGE_LEN {
        return Err(MessageError::TooLarge(bytes.len()));
    }
    Ok(serde_json::from_slice(bytes)?)
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

/// Bytes of a hex string (either case); `None` if it is not hex.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.as_bytes()
        .chunks(2)
        .map(|pair| {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            Some((hi * 16 + lo) as u8)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kite::KiteProto;

    #[test]
    fn remote_classes_parse_and_refuse_unknown_words() {
        assert_eq!(
            RemoteClass::parse_list("fs, exec,fs").unwrap(),
            [RemoteClass::Exec, RemoteClass::Fs]
        );
        assert_eq!(RemoteClass::parse_list("all").unwrap(), RemoteClass::ALL);
        assert!(
            RemoteClass::parse_list("shell")
                .unwrap_err()
                .contains("\"shell\"")
        );
        assert!(RemoteClass::parse_list(" , ").is_err());
        assert_eq!(RemoteClass::describe(&[]), "nothing");
        assert_eq!(
            RemoteClass::describe(&RemoteClass::ALL),
            "exec, fs, forward"
        );
    }

    #[test]
    fn messages_round_trip() {
        let hello = ConnectorMessage::Hello(Hello {
            version: PROTOCOL_VERSION,
            role: Role::Connector,
            instance: "abc".into(),
            node: "laptop".into(),
            software: "kitepipe/0.1.0".into(),
            client_nonce: hex(&[1, 2, 255]),
            remote: vec![RemoteClass::Exec, RemoteClass::Fs],
            agent: Some(AgentHello {
                version: PROTOCOL_VERSION,
                software: "kitepipe/0.1.0".into(),
                pid: 7,
                uid: 1000,
                platform: "linux x86_64".into(),
            }),
        });
        let back: ConnectorMessage = decode(&encode(&hello)).unwrap();
        assert_eq!(back, hello);
        // An older connector's hello (no `remote`) accepts nothing.
        let old = br#"{"type":"hello","version":1,"role":"connector","instance":"a","node":"n","software":"s","client_nonce":"00"}"#;
        match decode::<ConnectorMessage>(old) {
            Ok(ConnectorMessage::Hello(hello)) => assert!(hello.remote.is_empty()),
            other => panic!("{other:?}"),
        }

        let registered = RelayMessage::Registered(Registered {
            kites: vec![KiteOutcome {
                kite: KiteRef::parse("tcp:db.example.net:0").unwrap(),
                result: KiteResult::Accepted {
                    public: "tcp://relay:40000".into(),
                    port: 40000,
                },
            }],
            node: Some(NodeOutcome {
                name: "laptop.example.net".into(),
                proven: true,
                message: String::new(),
            }),
        });
        let back: RelayMessage = decode(&encode(&registered)).unwrap();
        assert_eq!(back, registered);
        // An older connector's registration proves no node name.
        let old = br#"{"type":"register","kites":[]}"#;
        match decode::<ConnectorMessage>(old) {
            Ok(ConnectorMessage::Register(register)) => {
                assert!(register.node_proofs.is_empty());
                assert!(
                    register.withdraw.is_empty(),
                    "an older connector withdraws nothing"
                );
            }
            other => panic!("{other:?}"),
        }
        let withdraw = ConnectorMessage::Register(Register {
            kites: Vec::new(),
            node_proofs: Vec::new(),
            withdraw: vec![KiteRef::parse("http:blog.example.net").unwrap()],
        });
        let back: ConnectorMessage = decode(&encode(&withdraw)).unwrap();
        assert_eq!(back, withdraw);

        let header = StreamHeader::Visitor(VisitorHeader {
            kite: KiteRef {
                proto: KiteProto::Http,
                name: "*.example.net".into(),
                port: 0,
            },
            host: Some("a.example.net".into()),
            peer: "198.51.100.3:5000".into(),
            relay_addr: Some("203.0.113.1:80".into()),
        });
        let back: StreamHeader = decode(&encode(&header)).unwrap();
        assert_eq!(back, header);
        // An older relay's visitor header names no relay address.
        let old = br#"{"kind":"visitor","kite":{"proto":"tcp","name":"db","port":7000},"peer":"192.0.2.1:1"}"#;
        match decode::<StreamHeader>(old) {
            Ok(StreamHeader::Visitor(visitor)) => assert_eq!(visitor.relay_addr, None),
            other => panic!("{other:?}"),
        }

        let event = StreamHeader::Event(EventHeader {
            name: "get_cat".into(),
            method: "GET".into(),
            path: "/cat//a".into(),
            args: vec!["a".into()],
            query: "x=1".into(),
            headers: vec![("content-type".into(), "text/plain".into())],
            to: Some("laptop".into()),
            caller: Some(crate::event::Caller {
                node: "relay".into(),
                identity: None,
            }),
            wait_ms: 30_000,
        });
        let back: StreamHeader = decode(&encode(&event)).unwrap();
        assert_eq!(back, event);

        let withdrawn = RelayMessage::Withdrawn(Withdrawn {
            kites: vec![KiteRef::parse("http:*.laptop.example.net").unwrap()],
            message: "rules changed".into(),
        });
        let back: RelayMessage = decode(&encode(&withdrawn)).unwrap();
        assert_eq!(back, withdrawn);
        let text = String::from_utf8(encode(&withdrawn).to_vec()).unwrap();
        assert!(
            text.starts_with(r#"{"type":"withdrawn","kites":["#),
            "{text}"
        );
    }

    #[test]
    fn hostile_messages_are_errors() {
        let too_big = vec![b' '; MAX_MESSAGE_LEN + 1];
        assert!(matches!(
            decode::<ConnectorMessage>(&too_big),
            Err(MessageError::TooLarge(_))
        ));
        for bad in [&b""[..], b"{", b"null", b"{\"type\":\"nope\"}", b"\xff\xfe"] {
            assert!(decode::<ConnectorMessage>(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(hex(&[0, 15, 16, 255]), "000f10ff");
        assert_eq!(unhex("000F10ff"), Some(vec![0, 15, 16, 255]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }
}
