//! The relay's certificate and key: loading them, and creating a
//! self-signed pair on first start.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::Path;
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

use super::{Fingerprint, PkiError};

/// File name of the relay's certificate chain inside its state directory.
const CERT_FILE: &str = "relay-cert.pem";

/// File name of the relay's private key inside its state directory.
const KEY_FILE: &str = "relay-key.pem";

/// Names put in a generated certificate when the operator gives none, so a
/// relay started without configuration can still be dialed locally.
const DEFAULT_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

/// How long a generated certificate is valid. Connectors pin it by
/// fingerprint and ignore validity, so the span only needs to outlast any
/// relay; ten years (with leap days) keeps strict tools quiet.
const GENERATED_VALIDITY: Duration = Duration::from_secs(3653 * 24 * 60 * 60);

/// How far a generated certificate's validity starts in the past, so peers
/// with a slow clock do not see it as not yet valid.
const GENERATED_BACKDATE: Duration = Duration::from_secs(24 * 60 * 60);

/// The relay's TLS identity: a certificate chain (end-entity first) and its
/// private key.
pub struct RelayCert {
    /// End-entity certificate first; never empty (checked by every
    /// constructor).
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl RelayCert {
    /// Wraps a chain (end-entity first) and its key.
    ///
    /// Whether the key matches the certificate is checked when a TLS config
    /// is built from it.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<RelayCert, PkiError> {
        if chain.is_empty() {
            return Err(PkiError::EmptyChain);
        }
        Ok(RelayCert { chain, key })
    }

    /// Loads a PEM certificate chain (end-entity first) and a PEM private key
    /// (PKCS#8, SEC1 or PKCS#1).
    ///
    /// Logs a warning if the key file is readable by group or others.
    pub fn load(cert_pem: &Path, key_pem: &Path) -> Result<RelayCert, PkiError> {
        let chain = load_certificates(cert_pem)?;
        let key_bytes = read(key_pem)?;
        warn_if_exposed(key_pem);
        let key = match PrivateKeyDer::from_pem_slice(&key_bytes) {
            Ok(key) => key,
            Err(rustls_pki_types::pem::Error::NoItemsFound) => {
                return Err(PkiError::NoPrivateKey {
                    path: key_pem.to_path_buf(),
                });
            }
            Err(source) => {
                return Err(PkiError::ParsePem {
                    path: key_pem.to_path_buf(),
                    source,
                });
            }
        };
        RelayCert::new(chain, key)
    }

    /// Loads `relay-cert.pem` and `relay-key.pem` from `state_dir`, or, if
    /// neither exists, creates a self-signed ECDSA P-256 certificate for
    /// `names` and writes both. Returns whether it created them.
    ///
    /// Each name that parses as an IP address becomes an IP SAN, every other
    /// name a DNS SAN; with no names, `localhost` and `127.0.0.1` are used.
    /// The key is written with mode 0600, and both files are written to a
    /// temporary name and renamed, so a crash never leaves a torn file.
    /// Later starts load the same files, so the fingerprint stays stable.
    /// If only one of the two files exists this fails rather than replace
    /// the relay's identity.
    pub fn load_or_create(
        state_dir: &Path,
        names: &[String],
    ) -> Result<(RelayCert, bool), PkiError> {
        let cert_path = state_dir.join(CERT_FILE);
        let key_path = state_dir.join(KEY_FILE);
        match (exists(&cert_path)?, exists(&key_path)?) {
            (true, true) => return Ok((RelayCert::load(&cert_path, &key_path)?, false)),
            (true, false) => {
                return Err(PkiError::IncompleteState {
                    present: cert_path,
                    missing: key_path,
                });
            }
            (false, true) => {
                return Err(PkiError::IncompleteState {
                    present: key_path,
                    missing: cert_path,
                });
            }
            (false, false) => {}
        }
        let names = if names.is_empty() {
            DEFAULT_NAMES.iter().map(|name| name.to_string()).collect()
        } else {
            names.to_vec()
        };
        let (cert_pem, key_pem, relay_cert) = generate(&names)?;
        fs::create_dir_all(state_dir).map_err(|source| PkiError::Write {
            path: state_dir.to_path_buf(),
            source,
        })?;
        // The key goes first: a crash between the two renames leaves only the
        // key, which the next start reports instead of silently replacing.
        write_atomically(&key_path, key_pem.as_bytes(), 0o600)?;
        write_atomically(&cert_path, cert_pem.as_bytes(), 0o644)?;
        tracing::info!(
            cert = %cert_path.display(),
            fingerprint = %relay_cert.fingerprint(),
            "created self-signed relay certificate"
        );
        Ok((relay_cert, true))
    }

    /// The fingerprint of the end-entity certificate.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(self.end_entity())
    }

    /// The certificate chain, end-entity first; never empty.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The private key.
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    fn end_entity(&self) -> &CertificateDer<'static> {
        // Every constructor rejects an empty chain.
        self.chain
            .first()
            .expect("relay certificate chain is never empty")
    }
}

impl Clone for RelayCert {
    fn clone(&self) -> RelayCert {
        RelayCert {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for RelayCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayCert")
            .field("fingerprint", &self.fingerprint())
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// Reads every certificate in a PEM file; fails if there is none.
pub(super) fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| PkiError::ParsePem {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(PkiError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn read(path: &Path) -> Result<Vec<u8>, PkiError> {
    fs::read(path).map_err(|source| PkiError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn exists(path: &Path) -> Result<bool, PkiError> {
    path.try_exists().map_err(|source| PkiError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Generates a self-signed ECDSA P-256 certificate; returns its PEM, its
/// key's PEM and the parsed pair.
fn generate(names: &[String]) -> Result<(String, String, RelayCert), PkiError> {
    let generate_error = |source| PkiError::Generate {
        names: names.to_vec(),
        source,
    };
    // rcgen accepts any IA5 string as a DNS name; a name no client could
    // ever match is an operator mistake worth reporting at start.
    if let Some(name) = names
        .iter()
        .find(|name| ServerName::try_from(name.as_str()).is_err())
    {
        return Err(PkiError::BadName { name: name.clone() });
    }
    let key =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(generate_error)?;
    let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(generate_error)?;
    let common_name = names.first().map_or("kitepipe relay", String::as_str);
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    let now = SystemTime::now();
    // rcgen's time type converts from SystemTime; that conversion is enabled
    // by rcgen's own dependencies, which is why no time crate is named here.
    params.not_before = now
        .checked_sub(GENERATED_BACKDATE)
        .unwrap_or(SystemTime::UNIX_EPOCH)
        .into();
    params.not_after = (now + GENERATED_VALIDITY).into();
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.self_signed(&key).map_err(generate_error)?;
    let relay_cert = RelayCert {
        chain: vec![cert.der().clone()],
        key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
    };
    Ok((cert.pem(), key.serialize_pem(), relay_cert))
}

/// Writes `contents` to a temporary file created with `mode`, syncs it and
/// renames it over `path`.
pub(super) fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let mut temp_name = path.file_name().unwrap_or_default().to_os_string();
    temp_name.push(format!(".tmp-{}", std::process::id()));
    let temp_path = path.with_file_name(temp_name);
    // A temp file left by a crashed run may have other permissions; start over.
    match fs::remove_file(&temp_path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => {
            return Err(write_error(&temp_path)(err));
        }
        _ => {}
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let res = options.open(&temp_path).and_then(|mut file| {
        file.write_all(contents)?;
        file.sync_all()
    });
    if let Err(err) = res {
        let _ = fs::remove_file(&temp_path);
        return Err(write_error(&temp_path)(err));
    }
    fs::rename(&temp_path, path).map_err(write_error(path))
}

/// Warns if a key file is readable by group or others; the relay still
/// starts, since the operator may have reasons.
fn warn_if_exposed(key_path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(metadata) = fs::metadata(key_path) {
            let mode = metadata.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %key_path.display(),
                    mode = format_args!("{mode:o}"),
                    "relay key file is readable by group or others; chmod 600 it"
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = key_path;
}

fn write_error(path: &Path) -> impl FnOnce(io::Error) -> PkiError {
    let path = path.to_path_buf();
    move |source| PkiError::Write { path, source }
}
