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
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::SystemTime;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tracing::{info, warn};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::config::TlsCertFiles;
use crate::pki::{PkiError, RelayCert};

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
    /// Shared with the TLS config's resolver ([`CertStore::server_config`]).
    certs: Arc<RwLock<HashMap<String, ServedCert>>>,
    /// The TLS config of terminated connections, built on first use.
    server_config: OnceLock<Arc<rustls::ServerConfig>>,
}

impl CertStore {
    /// The certificate to serve for `sni`: the exact name's, else the
    /// wildcard's one label up.
    pub(crate) fn get(&self, sni: &str) -> Option<ServedCert> {
        lookup(&self.certs, sni)
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

/// The certificate for `sni` in `certs` (see [`CertStore::get`]).
fn lookup(certs: &RwLock<HashMap<String, ServedCert>>, sni: &str) -> Option<ServedCert> {
    let sni = sni.to_ascii_lowercase();
    let certs = certs.read().unwrap_or_else(|e| e.into_inner());
    if let Some(cert) = certs.get(&sni) {
        return Some(cert.clone());
    }
    let (_, parent) = sni.split_once('.')?;
    certs.get(&format!("*.{parent}")).cloned()
}

/// ALPN protocols of terminated connections, in the relay's preference:
/// HTTP/2 (`h2::serve`), then HTTP/1.1 (the strict path).
const TERMINATED_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// Why a `--tls-cert` pair cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read or parsed, or the key file is exposed.
    #[error("--tls-cert {}", cert.display())]
    Load {
        /// The certificate file.
        cert: PathBuf,
        /// Cause.
        #[source]
        source: PkiError,
    },
    /// The key is of a kind rustls cannot sign with.
    #[error("--tls-cert {}: unsupported private key: {reason}", key.display())]
    Key {
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        reason: String,
    },
    /// The key is not the certificate's.
    #[error("--tls-cert {}: the key in {} does not match the certificate", cert.display(), key.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The first certificate of the file is not a valid X.509 certificate.
    #[error("--tls-cert {}: cannot parse the certificate: {reason}", cert.display())]
    Parse {
        /// The certificate file.
        cert: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// The certificate has no DNS name to serve it for.
    #[error("--tls-cert {}: the certificate has no DNS name in its subjectAltName, so no visitor's name can match it", cert.display())]
    NoName {
        /// The certificate file.
        cert: PathBuf,
    },
}

/// Loads one `--tls-cert` pair: the chain (certificate first), the key
/// (checked like the relay's own: a key file others may read is tightened
/// if it is this user's, refused if not) and the names it serves, its DNS
/// subjectAltNames (lowercase). An expired or not yet valid certificate
/// loads with a warning: the operator may be about to replace it.
pub(crate) fn load_cert_files(
    files: &TlsCertFiles,
) -> Result<Vec<(String, ServedCert)>, CertError> {
    let load = |source| CertError::Load {
        cert: files.cert.clone(),
        source,
    };
    let pair = RelayCert::load(&files.cert, &files.key).map_err(load)?;
    let signing = rustls::crypto::ring::sign::any_supported_type(pair.key()).map_err(|err| {
        CertError::Key {
            key: files.key.clone(),
            reason: err.to_string(),
        }
    })?;
    let key = CertifiedKey::new(pair.chain().to_vec(), signing);
    if key.keys_match().is_err() {
        return Err(CertError::KeyMismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
        });
    }
    let (names, not_before, not_after) = parse_leaf(&files.cert, pair.chain())?;
    let now = unix_now();
    if not_after < now {
        warn!(cert = %files.cert.display(), "this certificate has expired: visitors' browsers will refuse it");
    } else if not_before > now {
        warn!(cert = %files.cert.display(), "this certificate is not valid yet: visitors' browsers will refuse it");
    }
    let served = ServedCert {
        key: Arc::new(key),
        source: CertSource::File,
        not_after,
    };
    Ok(names
        .into_iter()
        .map(|name| (name, served.clone()))
        .collect())
}

/// The DNS names, not-before and not-after (Unix seconds) of a chain's
/// first certificate.
fn parse_leaf(
    path: &Path,
    chain: &[rustls_pki_types::CertificateDer<'static>],
) -> Result<(Vec<String>, i64, i64), CertError> {
    let parse = |reason: String| CertError::Parse {
        cert: path.to_path_buf(),
        reason,
    };
    let leaf = chain
        .first()
        .ok_or_else(|| parse("no certificate".into()))?;
    let (_, cert) =
        X509Certificate::from_der(leaf.as_ref()).map_err(|err| parse(err.to_string()))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                let dns = dns.trim_end_matches('.').to_ascii_lowercase();
                if !dns.is_empty() && !names.contains(&dns) {
                    names.push(dns);
                }
            }
        }
    }
    if names.is_empty() {
        return Err(CertError::NoName {
            cert: path.to_path_buf(),
        });
    }
    let validity = cert.validity();
    Ok((
        names,
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    ))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl CertStore {
    /// Loads every `--tls-cert` pair and serves them from now on in place
    /// of the file certificates served so far (ACME's stay); on any error
    /// nothing changes. Returns how many names are served from files.
    pub(crate) fn load_files(&self, files: &[TlsCertFiles]) -> Result<usize, CertError> {
        let mut loaded = Vec::new();
        for pair in files {
            loaded.extend(load_cert_files(pair)?);
        }
        let mut certs = self.certs.write().unwrap_or_else(|e| e.into_inner());
        certs.retain(|_, cert| cert.source != CertSource::File);
        let n_names = loaded.len();
        for (name, cert) in loaded {
            info!(%name, "serving a certificate from a file for terminated HTTPS");
            certs.insert(name, cert);
        }
        Ok(n_names)
    }

    /// The TLS config of connections the relay terminates: TLS 1.2 and
    /// 1.3, ALPN [`TERMINATED_ALPN`], the certificate picked by SNI from
    /// this store at each handshake (a replaced certificate serves the
    /// next handshake).
    pub(crate) fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server_config
            .get_or_init(|| {
                let resolver = Arc::new(StoreResolver {
                    certs: self.certs.clone(),
                });
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let mut config = rustls::ServerConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    // ring's provider supports both default versions.
                    .expect("ring supports TLS 1.2 and 1.3")
                    .with_no_client_auth()
                    .with_cert_resolver(resolver);
                config.alpn_protocols = TERMINATED_ALPN.iter().map(|p| p.to_vec()).collect();
                Arc::new(config)
            })
            .clone()
    }
}

/// Picks the served certificate by the ClientHello's SNI.
#[derive(Debug)]
struct StoreResolver {
    certs: Arc<RwLock<HashMap<String, ServedCert>>>,
}

impl ResolvesServerCert for StoreResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let cert = lookup(&self.certs, hello.server_name()?)?;
        Some(cert.key)
    }
}
