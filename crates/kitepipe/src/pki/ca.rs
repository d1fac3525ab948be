//! The deployment's own certificate authority: a directory holding a CA key
//! and certificate, an index of the certificates it issued, and the
//! revocation list relays read.
//!
//! ```text
//! DIR/ca-cert.pem   the CA certificate: relays trust it (--client-ca), nodes get a copy
//! DIR/ca-key.pem    the CA key (0600): only `kitepipe ca` reads it
//! DIR/index.json    every certificate issued, and which are revoked
//! DIR/crl.pem       an X.509 CRL signed by the CA, rewritten by every revocation
//! ```
//!
//! `issue` writes a node's identity directory: `cert.pem`, `key.pem` (0600)
//! and `ca.pem` (a copy of the CA certificate).
//!
//! The CA directory and every identity directory are created with mode
//! 0700; existing ones that others may enter are tightened (this user's)
//! or refused (another user's, or shared like `/tmp`), and a CA key others
//! can read is tightened or refused, with the path and mode in the message.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use kitepipe_proto::kite;
use rustls_pki_types::ServerName;
use serde::{Deserialize, Serialize};

use super::PkiError;
use super::cert::{
    IfExposed, check_private_dir, check_private_file, ensure_private_dir, load_certificates,
    write_atomically,
};
use super::identity::{
    CertInfo, IDENTITY_CA_FILE, IDENTITY_CERT_FILE, IDENTITY_KEY_FILE, Serial, system_time,
};

/// File name of the CA certificate in a CA directory.
pub const CA_CERT_FILE: &str = "ca-cert.pem";

/// File name of the CA private key in a CA directory.
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// File name of the revocation list in a CA directory. A relay given
/// `--client-ca DIR/ca-cert.pem` reads `DIR/crl.pem` by default.
pub const CRL_FILE: &str = "crl.pem";

/// File name of the index of issued certificates in a CA directory.
const INDEX_FILE: &str = "index.json";

/// Default validity of a CA certificate: ten years, so the CA outlives the
/// node certificates it signs (renewing a CA means reissuing everything).
pub const DEFAULT_CA_VALIDITY: Duration = Duration::from_secs(3653 * 24 * 60 * 60);

/// Default validity of a node certificate: a year, short enough that a lost
/// laptop's certificate dies on its own, long enough to not be a chore.
pub const DEFAULT_NODE_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// How far a default validity period starts in the past, so peers whose
/// clock is a little behind do not see a fresh certificate as not yet valid.
pub const BACKDATE: Duration = Duration::from_secs(60 * 60);

/// How far a revocation list's nextUpdate lies ahead. Relays here do not
/// enforce it (they reread the file when it changes), and every revocation
/// re-signs the list; a long horizon keeps other tools from calling it stale.
const CRL_HORIZON: Duration = Duration::from_secs(3653 * 24 * 60 * 60);

/// The last second X.509 (GeneralizedTime, four-digit years) can express:
/// 9999-12-31T23:59:59Z.
const LATEST_CERT_TIME: Duration = Duration::from_secs(253_402_300_799);

/// Failures of the certificate authority.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file would be overwritten.
    #[error("{} already exists: pass --force to overwrite it", path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// The directory holds no CA.
    #[error("no CA in {}: create one with `kitepipe ca init {}`", dir.display(), dir.display())]
    NoCa {
        /// The directory.
        dir: PathBuf,
    },
    /// A file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying failure.
        #[source]
        source: io::Error,
    },
    /// A directory could not be created.
    #[error("cannot create {}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The underlying failure.
        #[source]
        source: io::Error,
    },
    /// rcgen could not generate a key, certificate or CRL.
    #[error("cannot generate {what}")]
    Generate {
        /// What was being generated.
        what: &'static str,
        /// What rcgen rejected.
        #[source]
        source: rcgen::Error,
    },
    /// A certificate name cannot be used.
    #[error(
        "bad certificate name {name:?}: use letters, digits, '-', '_' and '.', as in a host name"
    )]
    BadName {
        /// The name as given.
        name: String,
    },
    /// A subject alternative name is neither a DNS name nor an IP address.
    #[error("bad --san {name:?}: expected a DNS name or an IP address")]
    BadAltName {
        /// The name as given.
        name: String,
    },
    /// A relay certificate without a name connectors could dial.
    #[error("a relay certificate needs --san HOST: the names (or addresses) connectors dial")]
    RelayWithoutNames,
    /// The validity period is empty or inverted.
    #[error("bad validity period: {why}")]
    BadValidity {
        /// What is wrong.
        why: String,
    },
    /// The index file is not what `kitepipe ca` writes.
    #[error("corrupt certificate index {}", path.display())]
    Index {
        /// The index file.
        path: PathBuf,
        /// What serde rejected.
        #[source]
        source: serde_json::Error,
    },
    /// No certificate of that name (or serial) was issued.
    #[error("this CA issued no certificate named {name:?}{} (see `kitepipe ca list`)",
        serial.as_ref().map(|s| format!(" with serial {s}")).unwrap_or_default())]
    UnknownName {
        /// The name asked for.
        name: String,
        /// The serial asked for, if any.
        serial: Option<String>,
    },
    /// Loading or writing a certificate or key failed.
    #[error(transparent)]
    Pki(#[from] PkiError),
}

impl CaError {
    /// True for mistakes in what was asked (exit code 2 in the CLI), as
    /// opposed to failures while doing it.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            CaError::Exists { .. }
                | CaError::NoCa { .. }
                | CaError::BadName { .. }
                | CaError::BadAltName { .. }
                | CaError::RelayWithoutNames
                | CaError::BadValidity { .. }
                | CaError::UnknownName { .. }
        )
    }
}

/// Settings for [`CertAuthority::init`].
#[derive(Debug, Clone)]
pub struct CaInit {
    /// Common name of the CA; default `kitepipe CA <random>`, unique so
    /// certificates of two CAs are never confused.
    pub name: Option<String>,
    /// How long the CA certificate is valid.
    pub valid_for: Duration,
    /// Overwrite an existing CA (every certificate it issued stops working).
    pub force: bool,
}

impl Default for CaInit {
    fn default() -> CaInit {
        CaInit {
            name: None,
            valid_for: DEFAULT_CA_VALIDITY,
            force: false,
        }
    }
}

/// What a node certificate is for. Each leaf has exactly one purpose
/// (extended key usage), so a connector's certificate can never pass for a
/// relay, whatever names it carries, and a relay's never for a connector.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertRole {
    /// A connector: TLS client authentication only (EKU clientAuth). The
    /// relay's verifier refuses certificates without it.
    #[default]
    Connector,
    /// A relay: TLS server authentication only (EKU serverAuth), for the
    /// names in `alt_names`. A connector verifying relays by CA refuses a
    /// certificate without it.
    Relay,
}

impl std::fmt::Display for CertRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CertRole::Connector => "connector",
            CertRole::Relay => "relay",
        })
    }
}

/// Settings for [`CertAuthority::issue`].
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// The node name, put in the certificate's common name.
    pub name: String,
    /// What the certificate is for.
    pub role: CertRole,
    /// Subject alternative names (DNS names or IP addresses): the names a
    /// relay answers for. Required for [`CertRole::Relay`]; a connector's
    /// certificate may carry them, but they make it no relay.
    pub alt_names: Vec<String>,
    /// Start of the validity period.
    pub not_before: SystemTime,
    /// End of the validity period.
    pub not_after: SystemTime,
    /// Directory to write `cert.pem`, `key.pem` and `ca.pem` to.
    pub out: PathBuf,
    /// Overwrite existing files in `out`.
    pub force: bool,
}

/// What [`CertAuthority::issue`] wrote.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate file.
    pub cert: PathBuf,
    /// The private key file (mode 0600).
    pub key: PathBuf,
    /// The copy of the CA certificate.
    pub ca: PathBuf,
    /// The index entry of the new certificate.
    pub entry: IndexEntry,
}

/// One certificate in a CA's index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexEntry {
    /// The node name.
    pub name: String,
    /// The serial number, lowercase hex.
    pub serial: String,
    /// Start of validity, Unix seconds.
    pub not_before: i64,
    /// End of validity, Unix seconds.
    pub not_after: i64,
    /// Subject alternative names.
    #[serde(default)]
    pub alt_names: Vec<String>,
    /// What it is for; `None` for certificates issued before roles, which
    /// are valid for both client and server authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<CertRole>,
    /// The certificate's SHA-256 fingerprint.
    pub fingerprint: String,
    /// When it was revoked, Unix seconds.
    #[serde(default)]
    pub revoked_at: Option<i64>,
}

/// The state of an issued certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertStatus {
    /// Usable now.
    Valid,
    /// Its validity period has not started.
    NotYetValid,
    /// Its validity period is over.
    Expired,
    /// In the revocation list.
    Revoked,
}

impl std::fmt::Display for CertStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CertStatus::Valid => "valid",
            CertStatus::NotYetValid => "not yet valid",
            CertStatus::Expired => "expired",
            CertStatus::Revoked => "revoked",
        })
    }
}

impl IndexEntry {
    /// The certificate's state at `now`.
    pub fn status(&self, now: SystemTime) -> CertStatus {
        if self.revoked_at.is_some() {
            return CertStatus::Revoked;
        }
        let now = unix_seconds(now);
        if now < self.not_before {
            CertStatus::NotYetValid
        } else if now > self.not_after {
            CertStatus::Expired
        } else {
            CertStatus::Valid
        }
    }
}

/// The index file's contents.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Index {
    /// Number of the last CRL written (CRL numbers must increase).
    crl_number: u64,
    certificates: Vec<IndexEntry>,
}

/// An open CA directory.
pub struct CertAuthority {
    dir: PathBuf,
    cert_pem: String,
    key: rcgen::KeyPair,
    info: CertInfo,
}

impl CertAuthority {
    /// Creates a CA in `dir`: key, self-signed certificate, empty index and
    /// empty revocation list. Refuses to overwrite an existing CA unless
    /// `options.force`.
    pub fn init(dir: &Path, options: &CaInit) -> Result<CertAuthority, CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        ensure_private_dir(dir)?;
        if !options.force {
            for path in [&cert_path, &key_path] {
                if exists(path)? {
                    return Err(CaError::Exists { path: path.clone() });
                }
            }
        }
        let name = match &options.name {
            Some(name) => name.clone(),
            None => {
                let tag = crate::pki::random_nonce();
                format!("kitepipe CA {}", kitepipe_proto::message::hex(&tag[..4]))
            }
        };
        let now = SystemTime::now();
        let not_before = now.checked_sub(BACKDATE).unwrap_or(SystemTime::UNIX_EPOCH);
        let not_after = now
            .checked_add(options.valid_for)
            .filter(|end| check_dates(not_before, *end).is_ok())
            .ok_or_else(|| CaError::BadValidity {
                why: "the CA would outlive year 9999".to_string(),
            })?;
        let key = generate_key()?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name.as_str());
        params.serial_number = Some(random_serial());
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        // Path length 0: this CA signs node certificates only, never another CA.
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params
            .self_signed(&key)
            .map_err(|source| CaError::Generate {
                what: "the CA certificate",
                source,
            })?;
        write_atomically(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_atomically(&cert_path, cert.pem().as_bytes(), 0o644)?;
        let ca = CertAuthority {
            dir: dir.to_path_buf(),
            cert_pem: cert.pem(),
            info: CertInfo::parse(cert.der())?,
            key,
        };
        let mut index = Index::default();
        ca.write_crl(&mut index)?;
        ca.write_index(&index)?;
        Ok(ca)
    }

    /// Opens the CA in `dir`.
    pub fn open(dir: &Path) -> Result<CertAuthority, CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        if !exists(&cert_path)? {
            return Err(CaError::NoCa {
                dir: dir.to_path_buf(),
            });
        }
        check_private_dir(dir)?;
        check_private_file(&key_path, "private key", IfExposed::Refuse)?;
        let cert_pem = read_to_string(&cert_path)?;
        let key_pem = read_to_string(&key_path)?;
        let key = rcgen::KeyPair::from_pem(&key_pem).map_err(|source| CaError::Generate {
            what: "the CA key (cannot parse it)",
            source,
        })?;
        let certs = load_certificates(&cert_path)?;
        let info = CertInfo::parse(&certs[0])?;
        Ok(CertAuthority {
            dir: dir.to_path_buf(),
            cert_pem,
            key,
            info,
        })
    }

    /// The CA directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What the CA certificate says.
    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// The CA certificate file (what relays get as `--client-ca`).
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(CA_CERT_FILE)
    }

    /// The revocation list file.
    pub fn crl_path(&self) -> PathBuf {
        self.dir.join(CRL_FILE)
    }

    /// Issues a certificate for a node and writes its identity directory.
    pub fn issue(&self, request: &IssueRequest) -> Result<Issued, CaError> {
        let name = validate_name(&request.name)?;
        for alt_name in &request.alt_names {
            if ServerName::try_from(alt_name.as_str()).is_err() {
                return Err(CaError::BadAltName {
                    name: alt_name.clone(),
                });
            }
        }
        if request.role == CertRole::Relay && request.alt_names.is_empty() {
            return Err(CaError::RelayWithoutNames);
        }
        check_dates(request.not_before, request.not_after)?;
        let cert_path = request.out.join(IDENTITY_CERT_FILE);
        let key_path = request.out.join(IDENTITY_KEY_FILE);
        let ca_path = request.out.join(IDENTITY_CA_FILE);
        if !request.force {
            for path in [&cert_path, &key_path, &ca_path] {
                if exists(path)? {
                    return Err(CaError::Exists { path: path.clone() });
                }
            }
        }
        let mut index = self.read_index()?;
        let key = generate_key()?;
        let mut params =
            rcgen::CertificateParams::new(request.alt_names.clone()).map_err(|source| {
                CaError::Generate {
                    what: "the certificate parameters",
                    source,
                }
            })?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name.as_str());
        params.serial_number = Some(random_serial());
        params.not_before = request.not_before.into();
        params.not_after = request.not_after.into();
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        // One purpose per leaf: a connector's certificate that names the
        // relay's host must not pass for the relay.
        params.extended_key_usages = vec![match request.role {
            CertRole::Connector => rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            CertRole::Relay => rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        }];
        // "Not a CA", stated (basicConstraints CA:FALSE); with it rcgen also
        // writes the Subject Key Identifier. The Authority Key Identifier
        // names the CA's key, so chains build by key, not only by name.
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer()?)
            .map_err(|source| CaError::Generate {
                what: "the certificate",
                source,
            })?;
        let info = CertInfo::parse(cert.der())?;
        ensure_private_dir(&request.out)?;
        write_atomically(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_atomically(&cert_path, cert.pem().as_bytes(), 0o644)?;
        write_atomically(&ca_path, self.cert_pem.as_bytes(), 0o644)?;
        let entry = IndexEntry {
            name,
            serial: info.serial.to_string(),
            not_before: unix_seconds(info.not_before),
            not_after: unix_seconds(info.not_after),
            alt_names: info.alt_names.clone(),
            role: Some(request.role),
            fingerprint: info.fingerprint.to_string(),
            revoked_at: None,
        };
        index.certificates.push(entry.clone());
        self.write_index(&index)?;
        Ok(Issued {
            cert: cert_path,
            key: key_path,
            ca: ca_path,
            entry,
        })
    }

    /// Every certificate issued, oldest first.
    pub fn list(&self) -> Result<Vec<IndexEntry>, CaError> {
        Ok(self.read_index()?.certificates)
    }

    /// Revokes every certificate named `name` that is not revoked yet (or
    /// only the one with `serial`), and rewrites the revocation list.
    /// Returns the entries revoked now: empty if they all were already.
    pub fn revoke(&self, name: &str, serial: Option<&str>) -> Result<Vec<IndexEntry>, CaError> {
        let lower = name.to_ascii_lowercase();
        let serial = serial.map(|s| s.trim().trim_start_matches("0x").to_ascii_lowercase());
        let mut index = self.read_index()?;
        let now = unix_seconds(SystemTime::now());
        let mut matched = false;
        let mut revoked = Vec::new();
        for entry in &mut index.certificates {
            let serial_matches = serial.as_ref().is_none_or(|s| *s == entry.serial);
            if entry.name != lower || !serial_matches {
                continue;
            }
            matched = true;
            if entry.revoked_at.is_none() {
                entry.revoked_at = Some(now);
                revoked.push(entry.clone());
            }
        }
        if !matched {
            return Err(CaError::UnknownName {
                name: name.to_string(),
                serial,
            });
        }
        if !revoked.is_empty() {
            self.write_crl(&mut index)?;
            self.write_index(&index)?;
        }
        Ok(revoked)
    }

    fn issuer(&self) -> Result<rcgen::Issuer<'static, &rcgen::KeyPair>, CaError> {
        rcgen::Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).map_err(|source| {
            CaError::Generate {
                what: "an issuer from the CA certificate",
                source,
            }
        })
    }

    fn read_index(&self) -> Result<Index, CaError> {
        let path = self.dir.join(INDEX_FILE);
        if !exists(&path)? {
            return Ok(Index::default());
        }
        let text = read_to_string(&path)?;
        serde_json::from_str(&text).map_err(|source| CaError::Index { path, source })
    }

    fn write_index(&self, index: &Index) -> Result<(), CaError> {
        let path = self.dir.join(INDEX_FILE);
        let mut text = serde_json::to_string_pretty(index).map_err(|source| CaError::Index {
            path: path.clone(),
            source,
        })?;
        text.push('\n');
        write_atomically(&path, text.as_bytes(), 0o644)?;
        Ok(())
    }

    /// Signs a CRL listing every revoked certificate in `index` and writes
    /// it; bumps the CRL number.
    fn write_crl(&self, index: &mut Index) -> Result<(), CaError> {
        let now = SystemTime::now();
        index.crl_number += 1;
        let revoked_certs = index
            .certificates
            .iter()
            .filter_map(|entry| {
                let revoked_at = entry.revoked_at?;
                let serial = kitepipe_proto::message::unhex(&entry.serial)?;
                Some(rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(&serial),
                    revocation_time: system_time(revoked_at).into(),
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect();
        let params = rcgen::CertificateRevocationListParams {
            this_update: now.into(),
            next_update: (now + CRL_HORIZON).into(),
            crl_number: rcgen::SerialNumber::from_slice(&index.crl_number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = params
            .signed_by(&self.issuer()?)
            .map_err(|source| CaError::Generate {
                what: "the revocation list",
                source,
            })?;
        let pem = crl.pem().map_err(|source| CaError::Generate {
            what: "the revocation list PEM",
            source,
        })?;
        write_atomically(&self.crl_path(), pem.as_bytes(), 0o644)?;
        Ok(())
    }
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAuthority")
            .field("dir", &self.dir)
            .field("name", &self.info.name)
            .finish_non_exhaustive()
    }
}

/// Checks that a validity period is not empty and fits in X.509 dates.
fn check_dates(not_before: SystemTime, not_after: SystemTime) -> Result<(), CaError> {
    let latest = SystemTime::UNIX_EPOCH + LATEST_CERT_TIME;
    if not_before < SystemTime::UNIX_EPOCH || not_after > latest {
        return Err(CaError::BadValidity {
            why: "dates must lie between 1970 and 9999".to_string(),
        });
    }
    if not_after <= not_before {
        return Err(CaError::BadValidity {
            why: format!(
                "it ends ({}) before it starts ({})",
                humantime::format_rfc3339_seconds(not_after),
                humantime::format_rfc3339_seconds(not_before)
            ),
        });
    }
    Ok(())
}

/// A node name as it goes into a certificate: a host-name-like string,
/// lowercase, no wildcard.
fn validate_name(name: &str) -> Result<String, CaError> {
    let bad = || CaError::BadName {
        name: name.to_string(),
    };
    if name.contains('*') {
        return Err(bad());
    }
    kite::normalize_name(name).map_err(|_| bad())
}

fn generate_key() -> Result<rcgen::KeyPair, CaError> {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| {
        CaError::Generate {
            what: "a key",
            source,
        }
    })
}

/// 16 random bytes, positive and without a leading zero byte, so the DER
/// integer and its hex form are the same bytes.
fn random_serial() -> rcgen::SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f).max(1);
    let serial = Serial::from_bytes(&bytes);
    rcgen::SerialNumber::from_slice(serial.as_bytes())
}

fn exists(path: &Path) -> Result<bool, CaError> {
    path.try_exists().map_err(|source| CaError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_to_string(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn unix_seconds(time: SystemTime) -> i64 {
    match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_secs()).unwrap_or(i64::MAX),
    }
}
