//! The certificates the relay serves to visitors of the kites it
//! terminates TLS for: loaded from files (`--tls-cert`) or issued by ACME
//! (`acme`), looked up by the ClientHello's SNI, exact name first, then
//! the wildcard one label up (`*.example.net` covers `app.example.net`,
//! not `a.b.example.net` nor `example.net`, as RFC 6125 says).
//!
//! A certificate is replaced as a whole (a renewal swaps the `Arc`), so a
//! handshake in progress keeps the one it started with and no connection
//! is dropped.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rustls::sign::CertifiedKey;

/// Where a served certificate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CertSource {
    /// A certificate file the operator gave.
    File,
    /// Issued by the ACME CA.
    Acme,
}

/// One served certificate.
#[derive(Debug, Clone)]
pub(crate) struct ServedCert {
    pub(crate) key: Arc<CertifiedKey>,
    pub(crate) source: CertSource,
    /// When it expires (seconds since the Unix epoch).
    pub(crate) not_after: i64,
}

/// Certificates by name (lowercase; `*.parent` for a wildcard).
#[derive(Debug, Default)]
pub(crate) struct CertStore {
    certs: RwLock<HashMap<String, ServedCert>>,
}

impl CertStore {
    /// The certificate to serve for `sni`: the exact name's, else the
    /// wildcard's one label up.
    pub(crate) fn get(&self, sni: &str) -> Option<ServedCert> {
        let sni = sni.to_ascii_lowercase();
        let certs = self.certs.read().unwrap_or_else(|e| e.into_inner());
        if let Some(cert) = certs.get(&sni) {
            return Some(cert.clone());
        }
        let (_, parent) = sni.split_once('.')?;
        certs.get(&format!("*.{parent}")).cloned()
    }

    /// Serves `cert` for `name` from now on (replacing any previous one).
    pub(crate) fn insert(&self, name: &str, cert: ServedCert) {
        let mut certs = self.certs.write().unwrap_or_else(|e| e.into_inner());
        certs.insert(name.to_ascii_lowercase(), cert);
    }

    /// Every name with a certificate, and when each expires.
    pub(crate) fn names(&self) -> Vec<(String, CertSource, i64)> {
        let certs = self.certs.read().unwrap_or_else(|e| e.into_inner());
        certs
            .iter()
            .map(|(name, cert)| (name.clone(), cert.source, cert.not_after))
            .collect()
    }
}
