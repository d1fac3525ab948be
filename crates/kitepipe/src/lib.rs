//! The kitepipe library: drives [`kitepipe_proto`] over real I/O.
//!
//! Rooms: [`link`] (the secure multiplexed self-healing link), [`relay`]
//! (public listeners, routing, kite registry), [`connector`] (dialing out,
//! registering kites, serving streams), `tunnel` (the byte-copy loop shared
//! by both), [`pipe`] (the event pipe: local REST gateway, events,
//! handlers), [`remote`] (remote operations: the agent and its client
//! session), [`pki`] (certificates, fingerprints, secrets, the CA),
//! [`config`] (raw config -> validated config), [`demo`] (the embedded
//! default).
//!
//! # Entry points
//!
//! A relay: [`relay::Relay::bind`] with a validated [`config::RelayConfig`],
//! then [`relay::Relay::run`] until the token is cancelled.
//!
//! ```no_run
//! use kitepipe::config::RelayConfig;
//! use kitepipe::relay::{Relay, RelayError};
//! use tokio_util::sync::CancellationToken;
//!
//! async fn serve(config: RelayConfig, shutdown: CancellationToken) -> Result<(), RelayError> {
//!     let relay = Relay::bind(config).await?;
//!     // Connectors pin this (or trust the deployment's CA).
//!     println!("relay fingerprint {}", relay.fingerprint());
//!     relay.run(shutdown).await;
//!     Ok(())
//! }
//! ```
//!
//! A connector: [`connector::Connector::new`], then
//! [`connector::Connector::run`]; it dials every configured relay and keeps
//! the links up until the token is cancelled.
//!
//! ```no_run
//! use kitepipe::config::ConnectorConfig;
//! use kitepipe::connector::{Connector, ConnectorError};
//! use tokio_util::sync::CancellationToken;
//!
//! async fn connect(config: ConnectorConfig, shutdown: CancellationToken) -> Result<(), ConnectorError> {
//!     Connector::new(config)?.run(shutdown).await;
//!     Ok(())
//! }
//! ```
//!
//! Handlers: events arriving at a node are answered by its
//! [`pipe::Handlers`] ([`relay::Relay::handlers`],
//! [`connector::Connector::handlers`]); a closure registered by name takes
//! precedence over configured executables and upstreams.
//!
//! ```no_run
//! use kitepipe::pipe::{Handlers, PipeError, Reply};
//!
//! fn register(handlers: &Handlers) -> Result<(), PipeError> {
//!     // Answers `GET .../hello` on the other side's gateway.
//!     handlers.register("get_hello", |request| async move {
//!         Reply::text(format!("hello, {} args", request.args.len()))
//!     })
//! }
//! ```
//!
//! A remote session: [`remote::Session`] runs commands and file operations
//! on a host through its agent (`kitepipe agent --stdio`), reached over any
//! byte stream ([`remote::Session::over`]) or started through ssh
//! ([`remote::Session::ssh`]).
//!
//! ```no_run
//! use kitepipe::remote::{RemoteCommand, Session, SessionOptions};
//! use tokio::io::{AsyncRead, AsyncWrite};
//!
//! async fn uptime<T>(io: T) -> Result<Vec<u8>, Box<dyn std::error::Error>>
//! where
//!     T: AsyncRead + AsyncWrite + Send + 'static,
//! {
//!     let session = Session::over(io, SessionOptions::default()).await?;
//!     let output = session.output(&RemoteCommand::new("uptime")).await?;
//!     session.close().await;
//!     Ok(output.stdout)
//! }
//! ```
//!
//! The CA: [`pki::CertAuthority`] creates the deployment's CA and issues
//! node certificates (what `kitepipe ca` does).
//!
//! ```no_run
//! use std::path::Path;
//! use std::time::SystemTime;
//!
//! use kitepipe::pki::ca::{BACKDATE, CaInit, CertRole, DEFAULT_NODE_VALIDITY, IssueRequest};
//! use kitepipe::pki::{CaError, CertAuthority};
//!
//! fn issue(dir: &Path) -> Result<(), CaError> {
//!     let ca = CertAuthority::init(&dir.join("ca"), &CaInit::default())?;
//!     let now = SystemTime::now();
//!     let issued = ca.issue(&IssueRequest {
//!         name: "laptop".to_string(),
//!         role: CertRole::Connector,
//!         alt_names: Vec::new(),
//!         not_before: now - BACKDATE,
//!         not_after: now + DEFAULT_NODE_VALIDITY,
//!         out: dir.join("laptop"),
//!         force: false,
//!     })?;
//!     println!("certificate for laptop in {}", issued.cert.display());
//!     Ok(())
//! }
//! ```
//!
//! [`demo::run`] starts all of it on loopback (`kitepipe demo`).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod connector;
pub mod demo;
pub mod link;
pub mod metrics;
pub(crate) mod pagekite;
pub mod pipe;
pub mod pki;
pub mod relay;
pub mod remote;
pub(crate) mod tunnel;

// Shared helpers (see ARCHITECTURE.md, "Shared helpers").
mod accept;
mod local_guard;
mod shutdown;
mod sync;
