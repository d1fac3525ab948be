//! Sans-IO core of kitepipe: everything that turns bytes into meaning and back,
//! with no runtime, socket, clock or crypto library.
//!
//! Start at [`frame`] (the link's framing), then [`message`] (the handshake and
//! control messages, and the header that opens every stream), then [`event`]
//! (gateway paths as events, and the reply head of an event stream). [`http1`] scans
//! visitors' HTTP/1 requests for the relay, [`sniff`] reads the SNI and ALPN of
//! a TLS ClientHello so one port can serve several protocols, and [`kite`] holds
//! kite names and their matching rules, and [`proxy`] the PROXY protocol header
//! a connector may send its local targets; [`policy`] is a kite's visitor
//! policy (IP allow and deny lists) the relay applies, [`http_policy`] an http
//! kite's HTTP-level rules (basic auth, limits, header edits, backend protocol);
//! [`pagekite`] is PageKite's wire format (handshake heads, chunks, ZChunks).
//!
//! This crate must not depend on tokio, sockets, clocks or TLS: callers hand it
//! bytes (and `now` where time matters) and get frames, events and deadlines.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod event;
pub mod frame;
pub mod http1;
pub mod http_policy;
pub mod kite;
pub mod message;
pub mod pagekite;
pub mod policy;
pub mod proxy;
pub mod remote;
pub mod sniff;
