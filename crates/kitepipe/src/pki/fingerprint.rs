//! SHA-256 fingerprints of end-entity certificates, as operators read and
//! paste them.

use std::fmt;
use std::str::FromStr;

use rustls_pki_types::CertificateDer;

use super::PkiError;

/// The SHA-256 digest of an end-entity certificate's DER encoding.
///
/// Displays as `SHA256:` followed by 64 lowercase hex digits. Parses that
/// form, and also colon-separated byte pairs, either case, with or without
/// the `SHA256:` prefix (or OpenSSL's `sha256 Fingerprint=` prefix).
///
/// ```
/// use kitepipe::pki::Fingerprint;
///
/// let text = "SHA256:".to_string() + &"ab".repeat(32);
/// let fingerprint: Fingerprint = text.parse().unwrap();
/// assert_eq!(fingerprint.to_string(), text);
/// let colons = vec!["AB"; 32].join(":");
/// assert_eq!(colons.parse::<Fingerprint>().unwrap(), fingerprint);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of `cert`.
    pub fn of(cert: &CertificateDer<'_>) -> Fingerprint {
        let digest = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
        let mut bytes = [0u8; 32];
        // SHA-256 output is always 32 bytes, so the lengths match.
        bytes.copy_from_slice(digest.as_ref());
        Fingerprint(bytes)
    }

    /// Wraps raw digest bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Fingerprint {
        Fingerprint(bytes)
    }

    /// The raw digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SHA256:")?;
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl FromStr for Fingerprint {
    type Err = PkiError;

    fn from_str(text: &str) -> Result<Fingerprint, PkiError> {
        let bad = |reason| PkiError::BadFingerprint {
            text: text.to_string(),
            reason,
        };
        let trimmed = text.trim();
        let digits = strip_prefix_ignore_case(trimmed, "SHA256:")
            .or_else(|| strip_prefix_ignore_case(trimmed, "sha256 Fingerprint="))
            .unwrap_or(trimmed);
        if let Some((algorithm, _)) = digits.split_once(':')
            && !algorithm.is_empty()
            && algorithm.len() != 2
        {
            return Err(bad("only SHA256 fingerprints are supported"));
        }
        let mut bytes = [0u8; 32];
        if digits.contains(':') {
            let pairs: Vec<&str> = digits.split(':').collect();
            if pairs.len() != bytes.len() || pairs.iter().any(|pair| pair.len() != 2) {
                return Err(bad("expected 32 colon-separated pairs of hex digits"));
            }
            for (byte, pair) in bytes.iter_mut().zip(pairs) {
                *byte = parse_hex_pair(pair.as_bytes()).ok_or_else(|| bad("not hex digits"))?;
            }
        } else {
            if digits.len() != 2 * bytes.len() {
                return Err(bad("expected 64 hex digits after SHA256:"));
            }
            for (byte, pair) in bytes.iter_mut().zip(digits.as_bytes().chunks_exact(2)) {
                *byte = parse_hex_pair(pair).ok_or_else(|| bad("not hex digits"))?;
            }
        }
        Ok(Fingerprint(bytes))
    }
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    if head.eq_ignore_ascii_case(prefix) {
        text.get(prefix.len()..)
    } else {
        None
    }
}

fn parse_hex_pair(pair: &[u8]) -> Option<u8> {
    let [high, low] = pair else { return None };
    let digit = |c: u8| char::from(c).to_digit(16);
    let value = digit(*high)? * 16 + digit(*low)?;
    u8::try_from(value).ok()
}
