//! Certificates as identities: what a node certificate says (name, serial,
//! validity), a connector's certificate and key, and the client CA and
//! revocation list a relay verifies connectors against.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use super::cert::{check_private_dir, load_certificates};
use super::{Fingerprint, PkiError, RelayCert};

/// File name of a node's certificate inside an identity directory (as
/// `kitepipe ca issue` writes it).
pub const IDENTITY_CERT_FILE: &str = "cert.pem";

/// File name of a node's private key inside an identity directory.
pub const IDENTITY_KEY_FILE: &str = "key.pem";

/// File name of the issuing CA's certificate inside an identity directory;
/// a connector trusts relays whose certificate chains to it.
pub const IDENTITY_CA_FILE: &str = "ca.pem";

/// A certificate serial number, as big-endian bytes without leading zeros.
/// Displays as lowercase hex.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Serial(Vec<u8>);

impl Serial {
    /// Wraps big-endian bytes (leading zero bytes are dropped).
    pub fn from_bytes(bytes: &[u8]) -> Serial {
        let start = bytes
            .iter()
            .position(|byte| *byte != 0)
            .unwrap_or(bytes.len());
        Serial(bytes[start..].to_vec())
    }

    /// The big-endian bytes, without leading zeros.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("00");
        }
        for byte in &self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({self})")
    }
}

/// Where a point in time lies relative to a certificate's validity period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// Inside the period.
    Current,
    /// Before `not_before`.
    NotYetValid,
    /// After `not_after`.
    Expired,
}

/// What a certificate says about its subject, parsed from its DER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The node name: the subject's common name, or else the first DNS
    /// name (as written; identities compare it in lowercase).
    pub name: String,
    /// The serial number.
    pub serial: Serial,
    /// Start of the validity period.
    pub not_before: SystemTime,
    /// End of the validity period.
    pub not_after: SystemTime,
    /// DNS names and IP addresses in the subject alternative names.
    pub alt_names: Vec<String>,
    /// The issuer's distinguished name, as text.
    pub issuer: String,
    /// Whether the certificate is a CA (basic constraints).
    pub is_ca: bool,
    /// SHA-256 of the DER.
    pub fingerprint: Fingerprint,
}

impl CertInfo {
    /// Parses a DER certificate.
    pub fn parse(der: &CertificateDer<'_>) -> Result<CertInfo, PkiError> {
        let (_, cert) =
            X509Certificate::from_der(der.as_ref()).map_err(|err| PkiError::ParseCertificate {
                reason: err.to_string(),
            })?;
        let mut alt_names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(dns) => alt_names.push(dns.to_ascii_lowercase()),
                    GeneralName::IPAddress(bytes) => {
                        if let Some(ip) = ip_from_bytes(bytes) {
                            alt_names.push(ip.to_string());
                        }
                    }
                    _ => {}
                }
            }
        }
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string);
        let name = common_name
            .or_else(|| {
                alt_names
                    .iter()
                    .find(|name| name.parse::<std::net::IpAddr>().is_err())
                    .cloned()
            })
            .ok_or(PkiError::NoNodeName)?;
        let validity = cert.validity();
        Ok(CertInfo {
            name,
            serial: Serial::from_bytes(cert.raw_serial()),
            not_before: system_time(validity.not_before.timestamp()),
            not_after: system_time(validity.not_after.timestamp()),
            alt_names,
            issuer: cert.issuer().to_string(),
            is_ca: cert.is_ca(),
            fingerprint: Fingerprint::of(der),
        })
    }

    /// Where `now` lies relative to the validity period.
    pub fn validity_at(&self, now: SystemTime) -> Validity {
        if now < self.not_before {
            Validity::NotYetValid
        } else if now > self.not_after {
            Validity::Expired
        } else {
            Validity::Current
        }
    }

    /// A sentence for operators if the certificate is outside its validity
    /// period at `now`, e.g. "certificate laptop expired at 2024-01-01T00:00:00Z".
    pub fn validity_problem(&self, now: SystemTime) -> Option<String> {
        match self.validity_at(now) {
            Validity::Current => None,
            Validity::Expired => Some(format!(
                "certificate {} expired at {}",
                self.name,
                humantime::format_rfc3339_seconds(self.not_after)
            )),
            Validity::NotYetValid => Some(format!(
                "certificate {} is not valid until {}",
                self.name,
                humantime::format_rfc3339_seconds(self.not_before)
            )),
        }
    }
}

/// A node's certificate (end-entity first) and private key, with what the
/// certificate says.
#[derive(Clone)]
pub struct NodeIdentity {
    keys: RelayCert,
    info: CertInfo,
}

impl NodeIdentity {
    /// Loads a PEM certificate chain and its PEM private key.
    pub fn load(cert_pem: &Path, key_pem: &Path) -> Result<NodeIdentity, PkiError> {
        let keys = RelayCert::load(cert_pem, key_pem)?;
        let info = CertInfo::parse(&keys.chain()[0])?;
        Ok(NodeIdentity { keys, info })
    }

    /// Loads `cert.pem` and `key.pem` from an identity directory written by
    /// `kitepipe ca issue`. The directory and the key are checked like
    /// every place that holds keys: tightened if this user's, refused if
    /// another user's (see `cert::check_private_dir`).
    pub fn load_dir(dir: &Path) -> Result<NodeIdentity, PkiError> {
        check_private_dir(dir)?;
        NodeIdentity::load(&dir.join(IDENTITY_CERT_FILE), &dir.join(IDENTITY_KEY_FILE))
    }

    /// What the end-entity certificate says.
    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// The certificate chain, end-entity first; never empty.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        self.keys.chain()
    }

    /// The private key.
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        self.keys.key()
    }
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("name", &self.info.name)
            .field("serial", &self.info.serial)
            .finish_non_exhaustive()
    }
}

/// The CA certificates a relay verifies connectors' certificates against,
/// and the revocation list it applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClientCa {
    /// Trust anchors (every certificate in the client CA file).
    pub roots: Vec<CertificateDer<'static>>,
    /// Revocation lists, each signed by one of `roots`.
    pub crls: Vec<CertificateRevocationListDer<'static>>,
    /// Serial numbers revoked by `crls`, for reports.
    pub revoked: HashSet<Serial>,
}

impl ClientCa {
    /// Loads the CA certificates in `ca_pem` and, if given, the PEM CRL in
    /// `crl_pem`, which must be signed by one of them.
    pub(crate) fn load(ca_pem: &Path, crl_pem: Option<&Path>) -> Result<ClientCa, PkiError> {
        let roots = load_certificates(ca_pem)?;
        let mut client_ca = ClientCa {
            roots,
            crls: Vec::new(),
            revoked: HashSet::new(),
        };
        if let Some(path) = crl_pem {
            client_ca.add_crl(path)?;
        }
        Ok(client_ca)
    }

    fn add_crl(&mut self, path: &Path) -> Result<(), PkiError> {
        let bytes = std::fs::read(path).map_err(|source| PkiError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let crls = CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| PkiError::ParsePem {
                path: path.to_path_buf(),
                source,
            })?;
        if crls.is_empty() {
            return Err(PkiError::NoCrl {
                path: path.to_path_buf(),
            });
        }
        for crl_der in crls {
            let bad_crl = |reason: String| PkiError::BadCrl {
                path: path.to_path_buf(),
                reason,
            };
            let (_, crl) = CertificateRevocationList::from_der(crl_der.as_ref())
                .map_err(|err| bad_crl(err.to_string()))?;
            // webpki would also refuse a CRL with a bad signature, but only
            // when a connector shows up; checking here reports it at load.
            let signed_by_root = self.roots.iter().any(|root| {
                X509Certificate::from_der(root.as_ref()).is_ok_and(|(_, ca)| {
                    ca.subject() == crl.issuer() && crl.verify_signature(ca.public_key()).is_ok()
                })
            });
            if !signed_by_root {
                return Err(bad_crl(format!(
                    "not signed by a CA in the client CA file (issuer {})",
                    crl.issuer()
                )));
            }
            for revoked in crl.iter_revoked_certificates() {
                self.revoked
                    .insert(Serial::from_bytes(revoked.raw_serial()));
            }
            self.crls.push(crl_der);
        }
        Ok(())
    }
}

/// The file a relay reads a CRL from, and whether it must exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrlSource {
    /// Given explicitly: missing is an error.
    File(PathBuf),
    /// `crl.pem` beside the client CA file, as `kitepipe ca` keeps it: used
    /// if present.
    BesideCa(PathBuf),
}

impl CrlSource {
    /// The path.
    pub fn path(&self) -> &Path {
        match self {
            CrlSource::File(path) | CrlSource::BesideCa(path) => path,
        }
    }

    /// The path to read now: `None` for a [`CrlSource::BesideCa`] file that
    /// does not exist.
    pub fn resolve(&self) -> Result<Option<&Path>, PkiError> {
        match self {
            CrlSource::File(path) => Ok(Some(path)),
            CrlSource::BesideCa(path) => match path.try_exists() {
                Ok(true) => Ok(Some(path)),
                Ok(false) => Ok(None),
                Err(source) => Err(PkiError::Read {
                    path: path.clone(),
                    source,
                }),
            },
        }
    }
}

/// The time `unix_seconds` after (or, negative, before) the epoch.
pub(super) fn system_time(unix_seconds: i64) -> SystemTime {
    match u64::try_from(unix_seconds) {
        Ok(secs) => SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => SystemTime::UNIX_EPOCH - Duration::from_secs(unix_seconds.unsigned_abs()),
    }
}

fn ip_from_bytes(bytes: &[u8]) -> Option<std::net::IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        _ => None,
    }
}
