//! One direction's keys ([`Keys`]): the AEAD key and IV rustls handed
//! over, checked against the traffic secret they came from, the record
//! nonces, and the next generation of TLS 1.3's key schedule.

use ring::aead;
use rustls::ConnectionTrafficSecrets;

use super::RecordError;
use crate::pki::keylog::{self, TrafficSecret};

/// One direction's keys: the AEAD key, the IV, the next sequence number,
/// and the traffic secret they come from (and the next generation).
pub(super) struct Keys {
    pub(super) algorithm: &'static aead::Algorithm,
    pub(super) key: aead::LessSafeKey,
    pub(super) iv: [u8; aead::NONCE_LEN],
    pub(super) seq: u64,
    pub(super) secret: TrafficSecret,
    /// Key updates so far.
    pub(super) generation: u64,
}

impl Keys {
    /// The keys rustls extracted (`extracted`, next sequence number `seq`)
    /// with the traffic secret they were derived from, which rustls's key
    /// log kept (see [`secrets`]): refused unless the secret derives
    /// exactly these keys.
    pub(super) fn new(extracted: ConnectionTrafficSecrets, seq: u64) -> Result<Keys, RecordError> {
        let (algorithm, key, iv) = match extracted {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(RecordError::UnsupportedSuite),
        };
        let secret = keylog::take(iv.as_ref()).ok_or(RecordError::SecretNotLogged)?;
        let keys = Keys::from_secret(algorithm, secret, seq)?;
        let mut derived = [0u8; 32];
        let derived = &mut derived[..algorithm.key_len()];
        keys.secret.expand_label(b"key", derived);
        if derived != key.as_ref() || keys.iv[..] != *iv.as_ref() {
            return Err(RecordError::SecretMismatch);
        }
        Ok(keys)
    }

    /// The keys of `secret` (RFC 8446 §7.3), starting at sequence `seq`.
    pub(super) fn from_secret(
        algorithm: &'static aead::Algorithm,
        secret: TrafficSecret,
        seq: u64,
    ) -> Result<Keys, RecordError> {
        let mut key = [0u8; 32];
        let key = &mut key[..algorithm.key_len()];
        secret.expand_label(b"key", key);
        let key =
            aead::UnboundKey::new(algorithm, key).map_err(|_| RecordError::UnsupportedSuite)?;
        Ok(Keys {
            algorithm,
            key: aead::LessSafeKey::new(key),
            iv: secret.iv(),
            seq,
            secret,
            generation: 0,
        })
    }

    /// The nonce of the next record (RFC 8446 §5.3); advances the sequence.
    pub(super) fn next_nonce(&mut self) -> aead::Nonce {
        let mut nonce = self.iv;
        for (byte, seq) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *byte ^= seq;
        }
        self.seq += 1;
        aead::Nonce::assume_unique_for_key(nonce)
    }

    /// Moves to the next generation of the key schedule (RFC 8446 §7.2);
    /// the sequence number starts again at 0.
    pub(super) fn rekey(&mut self) {
        let generation = self.generation + 1;
        *self = Keys::from_secret(self.algorithm, self.secret.next(), 0)
            .expect("a key of the algorithm's length");
        self.generation = generation;
    }
}
