//! pki: the relay's certificate, how connectors decide to trust it, the
//! shared-secret proofs that authorize kites, and certificate identities:
//! the deployment's own CA, node certificates, revocation, and the rules
//! saying which identity may claim which kites.
//!
//! Start at [`RelayCert::load_or_create`] (the relay's identity on disk), then
//! [`relay_server_config`] and [`connector_client_config`] (the two TLS
//! configs the link is built on), then [`kite_proof`] (how a connector proves
//! it knows a kite's secret without sending it). For identities: [`ca`]
//! (`kitepipe ca ...`), [`NodeIdentity`] and `ClientCa` (what each side
//! loads), `client_cert_verifier` (how the relay checks connectors), and
//! [`IdentityRules`] (what a verified identity may claim). pki/ never opens
//! a socket: it hands ready-made `rustls` configs to link/, and it reads and
//! writes files only under the paths it is given.
//!
//! Every TLS config here is TLS 1.3 only and is built on the `ring` provider
//! explicitly; nothing installs a process-wide default provider.

pub mod ca;
mod cert;
mod fingerprint;
pub(crate) mod htpasswd;
mod identity;
pub(crate) mod keylog;
mod rules;
mod secret;
mod tls;

#[cfg(test)]
mod tests;

use std::io;
use std::path::PathBuf;

pub use ca::{CaError, CertAuthority};
pub use cert::RelayCert;
pub use fingerprint::Fingerprint;
pub use identity::{
    CertInfo, CrlSource, IDENTITY_CA_FILE, IDENTITY_CERT_FILE, IDENTITY_KEY_FILE, NodeIdentity,
    Serial, Validity,
};
pub use rules::{AllowRule, IdentityPattern, IdentityRules, KitePattern, RemoteRule, RuleError};
pub use secret::{
    MIN_SECRET_LEN, ProofInput, RECOMMENDED_SECRET_LEN, Secret, SecretTooShort, kite_proof,
    link_exporter, verify_kite_proof,
};
pub use tls::{
    ALPN_LINK, ALPN_LINK_V1, FingerprintMismatch, RelayTrust, connector_client_config,
    relay_server_config,
};

pub(crate) use cert::{IfExposed, check_private_file, ensure_private_dir, write_atomically};
pub(crate) use identity::ClientCa;
pub(crate) use rules::pattern_covers;
pub(crate) use secret::{protect_secret_file, random_nonce, read_secret_file};
pub(crate) use tls::{
    ClientAuth, ConnectorTlsOptions, RelayTlsOptions, client_cert_verifier,
    connector_client_config_with, describe_relay_tls_error, describe_tls_error, find_tls_error,
    has_link_alpn, is_link_alpn, relay_server_config_with,
};

/// Failures of pki/: loading or creating certificates and keys, parsing
/// fingerprints, and building TLS configs.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A certificate, key or CA file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file that could not be read.
        path: PathBuf,
        /// The underlying I/O failure.
        #[source]
        source: io::Error,
    },
    /// A file holds malformed PEM.
    #[error("cannot parse PEM in {}", path.display())]
    ParsePem {
        /// The file with the malformed PEM.
        path: PathBuf,
        /// What the PEM parser rejected.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A file that should hold certificates holds none.
    #[error("no certificate found in {}", path.display())]
    NoCertificate {
        /// The file without certificates.
        path: PathBuf,
    },
    /// A file that should hold a private key holds none.
    #[error(
        "no private key found in {} (expected PKCS#8, SEC1 or PKCS#1 PEM)",
        path.display()
    )]
    NoPrivateKey {
        /// The file without a key.
        path: PathBuf,
    },
    /// A certificate chain was handed over empty.
    #[error("relay certificate chain is empty")]
    EmptyChain,
    /// Only one of the relay's certificate and key files exists, so creating
    /// a fresh pair would silently change the relay's fingerprint.
    #[error(
        "found {} but not {}: restore the missing file, or remove both to generate a new relay certificate",
        present.display(),
        missing.display()
    )]
    IncompleteState {
        /// The file that exists.
        present: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
    },
    /// A state directory or file could not be written.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file or directory that could not be written.
        path: PathBuf,
        /// The underlying I/O failure.
        #[source]
        source: io::Error,
    },
    /// A name asked for in the relay certificate is neither a DNS name nor
    /// an IP address.
    #[error("{name:?} is neither a DNS name nor an IP address")]
    BadName {
        /// The name as given.
        name: String,
    },
    /// Generating the self-signed relay certificate failed.
    #[error("cannot generate a relay certificate for {names:?}")]
    Generate {
        /// The subject alternative names requested.
        names: Vec<String>,
        /// What rcgen rejected.
        #[source]
        source: rcgen::Error,
    },
    /// Text given as a certificate fingerprint is not one.
    #[error("bad fingerprint {text:?}: {reason}")]
    BadFingerprint {
        /// The text as given.
        text: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A certificate in a CA file is not usable as a trust anchor.
    #[error("bad CA certificate in {}", path.display())]
    BadCaCertificate {
        /// The CA file.
        path: PathBuf,
        /// Why rustls rejected the certificate.
        #[source]
        source: rustls::Error,
    },
    /// rustls refused the configuration (for example a key that does not
    /// match its certificate).
    #[error("cannot build the TLS config")]
    BuildTls {
        /// Why rustls refused.
        #[source]
        source: rustls::Error,
    },
    /// A client CA certificate is not usable as a trust anchor.
    #[error("bad certificate in the client CA file")]
    BadClientCa {
        /// Why rustls rejected it.
        #[source]
        source: rustls::Error,
    },
    /// The verifier of connectors' certificates could not be built.
    #[error("cannot build the client certificate verifier")]
    ClientVerifier {
        /// Why rustls refused.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// A certificate could not be parsed as X.509.
    #[error("cannot parse certificate: {reason}")]
    ParseCertificate {
        /// What the parser rejected.
        reason: String,
    },
    /// A node certificate has neither a common name nor a DNS name.
    #[error("certificate has no common name or DNS name to use as the node name")]
    NoNodeName,
    /// A file that should hold a revocation list holds none.
    #[error("no X509 CRL found in {}", path.display())]
    NoCrl {
        /// The file.
        path: PathBuf,
    },
    /// A revocation list is malformed or not from the client CA.
    #[error("bad revocation list {}: {reason}", path.display())]
    BadCrl {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The link's keying material could not be exported from the TLS session
    /// (the handshake has not completed).
    #[error("cannot export keying material from the TLS session")]
    Exporter {
        /// Why rustls refused.
        #[source]
        source: rustls::Error,
    },
    /// A directory or file that holds keys or secrets is open to other
    /// users and cannot be made private (see `cert::ensure_private_dir`).
    #[error("{} {why}", path.display())]
    Unprotected {
        /// The directory or file.
        path: PathBuf,
        /// What is wrong and what to do, e.g. "is owned by uid 1001 ...".
        why: String,
    },
}
