//! Kite secrets and the challenge–response proof that shows a connector
//! knows one without the secret crossing the wire.
//!
//! The proof is bound to one TLS session (through its exporter), to fresh
//! nonces from both sides, and to the kite it claims, so it cannot be
//! replayed on another link, in another session, or for another kite.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use ring::hmac;

use super::PkiError;
use super::cert::{IfExposed, check_private_file};

/// Shortest secret accepted, in bytes. Every claim is one online guess at
/// the relay; twelve characters even from lowercase letters and digits
/// (36 symbols) leave about 62 bits, out of reach of online guessing at any
/// rate a relay serves, while six-character words like "s3cret" fall to a
/// dictionary. Shorter secrets are refused at start, on both sides.
pub const MIN_SECRET_LEN: usize = 12;

/// Length below which a secret is accepted with a warning: 16 random bytes
/// (32 hex digits from `openssl rand -hex 16`) is what a new secret should
/// have, as much as a TLS session key.
pub const RECOMMENDED_SECRET_LEN: usize = 16;

/// Fewer distinct bytes than this and a secret is a pattern, not random
/// ("aaaaaaaaaaaa", "abababababab"): accepted with a warning. Random 16
/// hex digits have about 10 distinct ones; 8 leaves room for short ones.
const MIN_DISTINCT_BYTES: usize = 8;

/// A secret refused because it is too short to resist guessing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the secret is too short ({len} bytes): use at least {MIN_SECRET_LEN}, \
     better 32 random hex digits (openssl rand -hex 16)"
)]
pub struct SecretTooShort {
    /// The secret's length in bytes.
    pub len: usize,
}

/// The label the link passes to rustls `export_keying_material` (with no
/// context) to get [`ProofInput::tls_exporter`].
pub(crate) const EXPORTER_LABEL: &[u8] = b"EXPORTER-kitepipe-link";

/// Domain separation for proofs, so the MAC can never be confused with a
/// MAC of the same secret made for another purpose or protocol version.
const PROOF_LABEL: &[u8] = b"kitepipe kite proof v1";

/// A shared secret (kite secret, token, password). Its `Debug` prints a
/// placeholder and it has no `Display`, so it cannot leak into logs.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Secret {
        Secret(secret.into())
    }

    /// The secret itself; use only to compute a proof or to hand it on.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Checks the secret against the minimum strength: an error below
    /// [`MIN_SECRET_LEN`] bytes; `Ok(Some(why))` for a secret accepted with
    /// a warning (shorter than [`RECOMMENDED_SECRET_LEN`], or a pattern of
    /// few distinct bytes); `Ok(None)` for a good one. Never quotes the
    /// secret.
    ///
    /// ```
    /// use kitepipe::pki::Secret;
    ///
    /// assert!(Secret::new("s3cret").check_strength().is_err());
    /// assert!(Secret::new("aaaaaaaaaaaaaaaaaaaa").check_strength().unwrap().is_some());
    /// assert_eq!(Secret::new("9f86d081884c7d659a2feaa0c55ad015").check_strength(), Ok(None));
    /// ```
    pub fn check_strength(&self) -> Result<Option<String>, SecretTooShort> {
        let bytes = self.0.as_bytes();
        if bytes.len() < MIN_SECRET_LEN {
            return Err(SecretTooShort { len: bytes.len() });
        }
        let distinct = bytes.iter().collect::<HashSet<_>>().len();
        if distinct < MIN_DISTINCT_BYTES {
            return Ok(Some(format!(
                "only {distinct} distinct characters: use random ones (openssl rand -hex 16)"
            )));
        }
        if bytes.len() < RECOMMENDED_SECRET_LEN {
            return Ok(Some(format!(
                "{} bytes, less than the {RECOMMENDED_SECRET_LEN} recommended \
                 (openssl rand -hex 16)",
                bytes.len()
            )));
        }
        Ok(None)
    }
}

/// Checks a file that holds secrets (a secret file, or a TOML config file
/// with `secret` or `domain` in it): tightened to 0600 when this user's and
/// open to others, else warned about. Never refuses (see
/// `cert::IfExposed::Warn`).
pub(crate) fn protect_secret_file(path: &Path) -> Result<(), PkiError> {
    check_private_file(path, "file with secrets", IfExposed::Warn)
}

/// Reads a file that holds secrets (`--secret-file`, `--domain-file`),
/// whole, as a [`Secret`]. A file other users can read is tightened to
/// 0600 if it is this user's, and otherwise used with a warning (see
/// `cert::IfExposed::Warn` for why not refused).
pub(crate) fn read_secret_file(path: &Path) -> Result<Secret, PkiError> {
    protect_secret_file(path)?;
    let text = std::fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Secret(text))
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Everything a kite proof is bound to.
#[derive(Debug, Clone, Copy)]
pub struct ProofInput<'a> {
    /// 32 bytes from the link's TLS session: see [`link_exporter`].
    pub tls_exporter: &'a [u8],
    /// The relay's fresh nonce for this registration.
    pub server_nonce: &'a [u8],
    /// The connector's fresh nonce for this registration.
    pub client_nonce: &'a [u8],
    /// The kite's protocol (e.g. `http`, `raw`).
    pub protocol: &'a str,
    /// The kite's name.
    pub name: &'a str,
}

/// The proof that the sender knows `secret`: HMAC-SHA256 keyed with the
/// secret over the proof label, then each field of `input` in declaration
/// order, each field preceded by its length as a big-endian u64.
///
/// ```
/// use kitepipe::pki::{ProofInput, Secret, kite_proof, verify_kite_proof};
///
/// let secret = Secret::new("hunter2");
/// let input = ProofInput {
///     tls_exporter: &[7; 32],
///     server_nonce: &[1; 32],
///     client_nonce: &[2; 32],
///     protocol: "http",
///     name: "blog.example.com",
/// };
/// let proof = kite_proof(&secret, &input);
/// assert!(verify_kite_proof(&secret, &input, &proof));
/// assert!(!verify_kite_proof(&Secret::new("hunter3"), &input, &proof));
/// ```
pub fn kite_proof(secret: &Secret, input: &ProofInput<'_>) -> [u8; 32] {
    let tag = hmac::sign(&proof_key(secret), &proof_message(input));
    let mut proof = [0u8; 32];
    // HMAC-SHA256 tags are always 32 bytes, so the lengths match.
    proof.copy_from_slice(tag.as_ref());
    proof
}

/// Whether `proof` is [`kite_proof`] of `input` under `secret`, compared in
/// constant time.
pub fn verify_kite_proof(secret: &Secret, input: &ProofInput<'_>, proof: &[u8]) -> bool {
    hmac::verify(&proof_key(secret), &proof_message(input), proof).is_ok()
}

/// 32 fresh random bytes for a proof nonce, from the thread-local CSPRNG.
pub(crate) fn random_nonce() -> [u8; 32] {
    rand::random()
}

/// The 32-byte [`ProofInput::tls_exporter`] of a completed handshake: pass
/// `tls_stream.get_ref().1` (client or server side). Both ends of one
/// session get the same bytes.
pub fn link_exporter<Data>(conn: &rustls::ConnectionCommon<Data>) -> Result<[u8; 32], PkiError> {
    conn.export_keying_material([0u8; 32], EXPORTER_LABEL, None)
        .map_err(|source| PkiError::Exporter { source })
}

fn proof_key(secret: &Secret) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes())
}

fn proof_message(input: &ProofInput<'_>) -> Vec<u8> {
    let fields: [&[u8]; 6] = [
        PROOF_LABEL,
        input.tls_exporter,
        input.server_nonce,
        input.client_nonce,
        input.protocol.as_bytes(),
        input.name.as_bytes(),
    ];
    let mut message = Vec::with_capacity(fields.iter().map(|field| 8 + field.len()).sum());
    for field in fields {
        message.extend_from_slice(&(field.len() as u64).to_be_bytes());
        message.extend_from_slice(field);
    }
    message
}
