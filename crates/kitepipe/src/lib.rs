//! The kitepipe library: drives [`kitepipe_proto`] over real I/O.
//!
//! Rooms: [`link`] (the secure multiplexed self-healing link), [`relay`]
//! (public listeners, routing, kite registry), [`connector`] (dialing out,
//! registering kites, serving streams), [`tunnel`] (the byte-copy loop shared
//! by both), [`pipe`] (the event pipe: local REST gateway, events,
//! handlers), [`pki`] (certificates, fingerprints, secrets), [`config`]
//! (raw config -> validated config), [`demo`] (the embedded default).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod connector;
pub mod demo;
pub mod link;
pub mod pipe;
pub mod pki;
pub mod relay;
pub mod remote;
pub mod tunnel;

mod accept;
mod shutdown;
mod sync;
