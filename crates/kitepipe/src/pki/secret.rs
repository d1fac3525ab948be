//! Kite secrets and the challenge–response proof that shows a connector
//! knows one without the secret crossing the wire.
//!
//! The proof is bound to one TLS session (through its exporter), to fresh
//! nonces from both sides, and to the kite it claims, so it cannot be
//! replayed on another link, in another session, or for another kite.

use std::fmt;

use ring::hmac;

use super::PkiError;

/// The label the link passes to rustls `export_keying_material` (with no
/// context) to get [`ProofInput::tls_exporter`].
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-kitepipe-link";

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
pub fn random_nonce() -> [u8; 32] {
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
