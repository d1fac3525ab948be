//! PageKite peers for the relay and the connector: pagekite.py's
//! signatures ([`sign`]) and the tunnel pump ([`tunnel`]), which bridges
//! one PageKite tunnel to an in-process kitepipe [`Mux`](crate::link::Mux)
//! pair, so the relay's visitor path and the connector's `serve_stream`
//! serve PageKite peers unchanged.
//!
//! Start at [`tunnel::start_front`] (we are the front-end: the relay) and
//! [`tunnel::start_back`] (we are the back-end: the connector). The
//! handshake (heads, kite authorization) is the caller's: this room gets a
//! tunnel after it, and the wire codec is `kitepipe_proto::pagekite`.
//! It depends on `link` only; it never dials nor listens.

// The relay and connector parts of issue 16 call into this room; until
// they land on this branch some items have no caller outside tests.

pub(crate) mod sign;
pub(crate) mod tunnel;

#[allow(unused_imports)] // Until the relay and connector parts call them.
pub(crate) use tunnel::{ChunkDest, Route, TunnelConfig, TunnelHandle, start_back, start_front};
