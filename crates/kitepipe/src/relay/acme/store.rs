//! The ACME state on disk, under `STATE_DIR/acme` (mode 0700): one account
//! file per CA directory (`account-HASH.json`, the account's private key
//! and URL) and one file per certificate (`certs/NAME.pem`, the private key
//! then the chain, so that a key and its certificate are replaced together
//! by one rename). Every file is mode 0600 and written atomically (temp
//! file, then rename).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use instant_acme::AccountCredentials;
use kitepipe_proto::kite;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tracing::warn;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::pki::{IfExposed, PkiError, check_private_file, ensure_private_dir, write_atomically};

/// A certificate file larger than this is not one of ours: a chain of a
/// few certificates and a key is a few KiB.
const MAX_CERT_FILE: u64 = 256 * 1024;

/// An issued certificate with its key, ready to serve.
#[derive(Debug, Clone)]
pub(super) struct Issued {
    /// What rustls serves.
    pub(super) key: Arc<CertifiedKey>,
    /// When the leaf expires (seconds since the Unix epoch).
    pub(super) not_after: i64,
    /// The leaf's serial number in hex, for the log.
    pub(super) serial: String,
}

/// Why stored ACME state cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    /// The directory or a file could not be made private or written.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// A file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A file holds no usable key and certificate chain.
    #[error("{}: {why}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// The ACME state directory.
#[derive(Debug, Clone)]
pub(super) struct Store {
    dir: PathBuf,
}

impl Store {
    /// The store in `dir`, created (0700) if missing, checked if present.
    pub(super) fn open(dir: &Path) -> Result<Store, StoreError> {
        ensure_private_dir(dir)?;
        ensure_private_dir(&dir.join("certs"))?;
        Ok(Store {
            dir: dir.to_path_buf(),
        })
    }

    /// The account file of the CA at `directory`: one per directory URL,
    /// so switching between staging and production keeps both accounts.
    fn account_path(&self, directory: &str) -> PathBuf {
        let digest = ring::digest::digest(&ring::digest::SHA256, directory.as_bytes());
        let short = kitepipe_proto::message::hex(&digest.as_ref()[..6]);
        self.dir.join(format!("account-{short}.json"))
    }

    /// The stored account for `directory`, if any.
    pub(super) fn load_account(
        &self,
        directory: &str,
    ) -> Result<Option<AccountCredentials>, StoreError> {
        let path = self.account_path(directory);
        if !path.exists() {
            return Ok(None);
        }
        check_private_file(&path, "ACME account key", IfExposed::Refuse)?;
        let text = fs::read(&path).map_err(|source| StoreError::Read {
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|err| StoreError::Invalid {
                path,
                why: format!("not an ACME account file: {err}"),
            })
    }

    /// Keeps the account for `directory` (0600).
    pub(super) fn save_account(
        &self,
        directory: &str,
        credentials: &AccountCredentials,
    ) -> Result<(), StoreError> {
        let path = self.account_path(directory);
        let json = serde_json::to_vec_pretty(credentials).map_err(|err| StoreError::Invalid {
            path: path.clone(),
            why: err.to_string(),
        })?;
        write_atomically(&path, &json, 0o600)?;
        Ok(())
    }

    /// Keeps the certificate of `name`: `key_pem` then `chain_pem` in one
    /// file (0600), replacing the previous one in one rename.
    pub(super) fn save_cert(
        &self,
        name: &str,
        key_pem: &str,
        chain_pem: &str,
    ) -> Result<(), StoreError> {
        let path = self.cert_path(name);
        let contents = format!("{}\n{}", key_pem.trim_end(), chain_pem);
        write_atomically(&path, contents.as_bytes(), 0o600)?;
        Ok(())
    }

    /// Every stored certificate that can be served: unreadable, invalid or
    /// expired files are skipped with a warning (a renewal replaces them).
    pub(super) fn load_certs(&self, now: i64) -> Vec<(String, Issued)> {
        let dir = self.dir.join("certs");
        let Ok(entries) = fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut certs = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".pem"))
            else {
                continue;
            };
            // Only names the relay itself would have written.
            if kite::normalize_name(name).ok().as_deref() != Some(name) || name.starts_with("*.") {
                warn!(file = %path.display(), "not an ACME certificate file name; skipped");
                continue;
            }
            match load_cert_file(&path) {
                Ok(issued) if issued.not_after <= now => {
                    warn!(file = %path.display(), "stored ACME certificate has expired; skipped");
                }
                Ok(issued) => certs.push((name.to_string(), issued)),
                Err(err) => warn!(%err, "stored ACME certificate unusable; skipped"),
            }
        }
        certs
    }

    fn cert_path(&self, name: &str) -> PathBuf {
        self.dir.join("certs").join(format!("{name}.pem"))
    }
}

/// Reads one `certs/NAME.pem`.
fn load_cert_file(path: &Path) -> Result<Issued, StoreError> {
    check_private_file(path, "ACME certificate key", IfExposed::Refuse)?;
    let read_error = |source| StoreError::Read {
        path: path.to_path_buf(),
        source,
    };
    let len = fs::metadata(path).map_err(read_error)?.len();
    if len > MAX_CERT_FILE {
        return Err(StoreError::Invalid {
            path: path.to_path_buf(),
            why: format!("{len} bytes, more than a certificate file holds"),
        });
    }
    let pem = fs::read(path).map_err(read_error)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|err| StoreError::Invalid {
        path: path.to_path_buf(),
        why: format!("no private key: {err}"),
    })?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| StoreError::Invalid {
            path: path.to_path_buf(),
            why: format!("bad certificate: {err}"),
        })?;
    certified(key, chain).map_err(|why| StoreError::Invalid {
        path: path.to_path_buf(),
        why,
    })
}

/// Builds what rustls serves from a key and a chain (leaf first), checking
/// that they match.
pub(super) fn certified(
    key: PrivateKeyDer<'static>,
    chain: Vec<CertificateDer<'static>>,
) -> Result<Issued, String> {
    let leaf = chain.first().ok_or("no certificate")?;
    let (_, parsed) =
        X509Certificate::from_der(leaf).map_err(|err| format!("bad certificate: {err}"))?;
    let not_after = parsed.validity().not_after.timestamp();
    let serial = parsed.raw_serial_as_string();
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|err| format!("unusable private key: {err}"))?;
    let key = CertifiedKey::new(chain, signing);
    key.keys_match()
        .map_err(|err| format!("key does not match the certificate: {err}"))?;
    Ok(Issued {
        key: Arc::new(key),
        not_after,
        serial,
    })
}
