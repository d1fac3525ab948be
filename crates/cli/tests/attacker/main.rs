//! The attacker suite: each test plays a stranger (a visitor, a connector
//! with or without a secret or certificate, a local user, a web page, a
//! hostile relay or a hostile remote host) against the real `kitepipe`
//! binary and asserts the refusal or the bound. docs/security.md maps every
//! boundary of the threat model to its test here.
//!
//! One module per boundary; each module's `//!` names the cases of the
//! trust-model issue it plays.

#[path = "../support/mod.rs"]
mod support;

mod acme;
mod admin;
mod gateway;
mod h2;
mod link;
mod logs;
mod names;
mod pagekite;
mod pki;
mod remote_client;
mod remote_node;
mod visitors;
