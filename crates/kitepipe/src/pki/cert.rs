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
    /// A key file other users can read is tightened to 0600 if it is this
    /// user's (with a warning), and refused otherwise.
    pub fn load(cert_pem: &Path, key_pem: &Path) -> Result<RelayCert, PkiError> {
        let chain = load_certificates(cert_pem)?;
        check_private_file(key_pem, "private key", IfExposed::Refuse)?;
        let key_bytes = read(key_pem)?;
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
    /// the relay's identity. `state_dir` is created with mode 0700, or
    /// checked and tightened like every directory that holds keys (see
    /// `ensure_private_dir`).
    pub fn load_or_create(
        state_dir: &Path,
        names: &[String],
    ) -> Result<(RelayCert, bool), PkiError> {
        let cert_path = state_dir.join(CERT_FILE);
        let key_path = state_dir.join(KEY_FILE);
        ensure_private_dir(state_dir)?;
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
pub(crate) fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
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

/// The permission bits that let users other than the owner in: group and
/// others, any access.
#[cfg(unix)]
const OPEN_TO_OTHERS: u32 = 0o077;

/// Bits that let group or others replace what a directory holds.
#[cfg(unix)]
const WRITABLE_BY_OTHERS: u32 = 0o022;

/// The sticky bit: set on directories every user shares, such as `/tmp`.
#[cfg(unix)]
const STICKY: u32 = 0o1000;

/// What to do with a private file that others can read and this user
/// cannot tighten (someone else owns it, or the file system is read-only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IfExposed {
    /// Refuse to use it: keys (OpenSSH refuses such keys as well).
    Refuse,
    /// Use it and warn: secret files, which orchestrators often mount
    /// read-only with mode 0644 into a container with no other users;
    /// refusing them would push the secret back onto the command line.
    Warn,
}

/// Makes `dir` a directory only this user can reach, as a place for keys:
/// creates it (and missing parents) with mode 0700, or checks an existing
/// one like OpenSSH's `StrictModes`. An existing directory of this user
/// that group or others may enter is tightened to 0700, with a warning
/// naming the path and both modes; one owned by another user (root's, if
/// group and others cannot write it, is fine) or shared like `/tmp`
/// (sticky bit) is refused, and left as it is.
pub(crate) fn ensure_private_dir(dir: &Path) -> Result<(), PkiError> {
    match fs::metadata(dir) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            let mut builder = fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            builder.create(dir).map_err(write_error(dir))
        }
        Err(source) => Err(PkiError::Read {
            path: dir.to_path_buf(),
            source,
        }),
        Ok(metadata) => check_dir(dir, &metadata),
    }
}

/// [`ensure_private_dir`] for a directory keys are read from: the same
/// checks, but a missing directory is left to the reader to report.
pub(crate) fn check_private_dir(dir: &Path) -> Result<(), PkiError> {
    match fs::metadata(dir) {
        Err(_) => Ok(()),
        Ok(metadata) => check_dir(dir, &metadata),
    }
}

#[cfg(unix)]
fn check_dir(dir: &Path, metadata: &fs::Metadata) -> Result<(), PkiError> {
    use std::os::unix::fs::MetadataExt;
    let unprotected = |why: String| PkiError::Unprotected {
        path: dir.to_path_buf(),
        why,
    };
    if !metadata.is_dir() {
        return Err(unprotected("is not a directory".to_string()));
    }
    let mode = metadata.mode() & 0o7777;
    let owner = metadata.uid();
    let me = rustix::process::geteuid().as_raw();
    if owner != me {
        // Like OpenSSH's secure_filename: root's directories are trusted as
        // long as only root can change what they hold.
        if owner == 0 && mode & WRITABLE_BY_OTHERS == 0 {
            return Ok(());
        }
        return Err(unprotected(format!(
            "is owned by uid {owner}, not by this user (uid {me}), and has mode {mode:04o}: \
             keys need a directory of your own (mkdir -m 700 a new one)"
        )));
    }
    if mode & OPEN_TO_OTHERS == 0 {
        return Ok(());
    }
    if mode & STICKY != 0 {
        return Err(unprotected(format!(
            "is a shared directory (mode {mode:04o}): keys need a directory of their own \
             (mkdir -m 700 one inside it)"
        )));
    }
    let tightened = mode & 0o700;
    fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(tightened)).map_err(
        |err| {
            unprotected(format!(
                "has mode {mode:04o}, open to other users, and cannot be tightened ({err}): \
                 chmod 700 it"
            ))
        },
    )?;
    tracing::warn!(
        "tightened {} from {mode:04o} to {tightened:04o}: it holds private keys and was open to other users",
        dir.display()
    );
    Ok(())
}

#[cfg(not(unix))]
fn check_dir(_dir: &Path, _metadata: &fs::Metadata) -> Result<(), PkiError> {
    Ok(())
}

/// Checks that only this user can read the private file `path` (`what`
/// says what it holds, e.g. "private key"). A file of this user that group
/// or others may read is tightened to 0600, with a warning naming the path
/// and its old mode; one this user cannot tighten is refused or warned
/// about, as `if_exposed` says. A missing file is left to the reader.
pub(crate) fn check_private_file(
    path: &Path,
    what: &str,
    if_exposed: IfExposed,
) -> Result<(), PkiError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let Ok(metadata) = fs::metadata(path) else {
            return Ok(());
        };
        let mode = metadata.mode() & 0o7777;
        if mode & OPEN_TO_OTHERS == 0 {
            return Ok(());
        }
        let owner = metadata.uid();
        let me = rustix::process::geteuid().as_raw();
        let tightened = mode & 0o700;
        let res = if owner == me {
            fs::set_permissions(
                path,
                std::os::unix::fs::PermissionsExt::from_mode(tightened),
            )
            .map_err(|err| err.to_string())
        } else {
            Err(format!(
                "it is owned by uid {owner}, not by this user (uid {me})"
            ))
        };
        match (res, if_exposed) {
            (Ok(()), _) => tracing::warn!(
                "tightened {} from {mode:04o} to {tightened:04o}: a {what} other users could read \
                 (if others use this machine, consider it exposed and replace it)",
                path.display()
            ),
            (Err(why), IfExposed::Refuse) => {
                return Err(PkiError::Unprotected {
                    path: path.to_path_buf(),
                    why: format!(
                        "is a {what} other users can read (mode {mode:04o}) and cannot be \
                         tightened ({why}): chmod 600 it, or copy it to a file of your own"
                    ),
                });
            }
            (Err(why), IfExposed::Warn) => tracing::warn!(
                "{} is a {what} other users can read (mode {mode:04o}) and cannot be \
                 tightened ({why}); using it anyway",
                path.display()
            ),
        }
    }
    #[cfg(not(unix))]
    let _ = (path, what, if_exposed);
    Ok(())
}

fn write_error(path: &Path) -> impl FnOnce(io::Error) -> PkiError {
    let path = path.to_path_buf();
    move |source| PkiError::Write { path, source }
}
