//! TLS 1.3 traffic secrets for the link's record layer: caught from
//! rustls's key log during the handshake, handed to
//! [`RecordStream::take_over`](crate::link::records::RecordStream::take_over),
//! and the key schedule's HKDF-Expand-Label (RFC 8446 §7.1) that derives
//! keys, IVs and the next generation of secrets (§7.2) from them.
//!
//! rustls hands a buffered connection's keys and IVs over
//! (`dangerous_extract_secrets`) but not the traffic secrets the next keys
//! come from; its kernel-connection API that would keep deriving them is
//! only offered on unbuffered connections, and the link's handshake runs
//! on tokio-rustls. rustls does report every session's
//! `CLIENT_TRAFFIC_SECRET_0` and `SERVER_TRAFFIC_SECRET_0` to the config's
//! key log ([`LinkKeyLog`], installed by `pki::tls`). They wait here, keyed
//! by the IV derived from them, until the record layer takes the session
//! over and finds each direction's secret by the IV rustls extracted; the
//! key derived from the secret must then equal the extracted key too, so a
//! secret of another session can never be used.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use ring::hkdf;

/// Secrets waiting to be taken over at most. Two per handshake, held from
/// the moment rustls derives them (the server: when it sends its Finished)
/// until the record layer takes the session over, a round trip later. When
/// full, the oldest goes: a flood of handshakes that never finish delays a
/// real one's handover only if 2,048 others complete their first flight
/// within its round trip. About 100 bytes each: 400 KiB at most.
pub(crate) const MAX_PENDING_SECRETS: usize = 4096;

/// How long a secret waits to be taken over: longer than any handshake may
/// take (the handshake timeouts of both ends are shorter). Sessions that
/// keep rustls (`kitepipe/1`) never take theirs; they go after this.
pub(crate) const PENDING_FOR: Duration = Duration::from_secs(60);

/// Largest traffic secret: SHA-384's output.
const MAX_SECRET: usize = 48;

/// AEAD nonce (IV) length of every TLS 1.3 cipher suite.
pub(crate) const IV_LEN: usize = 12;

/// One direction's traffic secret (its length tells the hash of its
/// cipher suite).
#[derive(Clone)]
pub(crate) struct TrafficSecret {
    bytes: [u8; MAX_SECRET],
    len: usize,
}

impl TrafficSecret {
    /// `None` unless `secret` has the length of SHA-256 or SHA-384.
    pub(crate) fn new(secret: &[u8]) -> Option<TrafficSecret> {
        if secret.len() != 32 && secret.len() != 48 {
            return None;
        }
        let mut bytes = [0u8; MAX_SECRET];
        bytes[..secret.len()].copy_from_slice(secret);
        Some(TrafficSecret {
            bytes,
            len: secret.len(),
        })
    }

    /// The HKDF of the cipher suite (its hash has the secret's length).
    fn hkdf(&self) -> hkdf::Algorithm {
        if self.len == 48 {
            hkdf::HKDF_SHA384
        } else {
            hkdf::HKDF_SHA256
        }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// HKDF-Expand-Label(secret, label, "", out.len()) (RFC 8446 §7.1).
    pub(crate) fn expand_label(&self, label: &[u8], out: &mut [u8]) {
        expand_label(self.hkdf(), self.as_bytes(), label, out);
    }

    /// The next generation (RFC 8446 §7.2):
    /// application_traffic_secret_N+1 =
    ///     HKDF-Expand-Label(application_traffic_secret_N, "traffic upd", "", Hash.length)
    pub(crate) fn next(&self) -> TrafficSecret {
        let mut next = TrafficSecret {
            bytes: [0u8; MAX_SECRET],
            len: self.len,
        };
        self.expand_label(b"traffic upd", &mut next.bytes[..self.len]);
        next
    }

    /// The write IV of this secret: HKDF-Expand-Label(secret, "iv", "", 12).
    pub(crate) fn iv(&self) -> [u8; IV_LEN] {
        let mut iv = [0u8; IV_LEN];
        self.expand_label(b"iv", &mut iv);
        iv
    }
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-Expand-Label(secret, label, "", out.len()) with `algorithm`
/// (RFC 8446 §7.1): the info is the HkdfLabel struct, its label prefixed
/// with "tls13 ".
pub(crate) fn expand_label(
    algorithm: hkdf::Algorithm,
    secret: &[u8],
    label: &[u8],
    out: &mut [u8],
) {
    let length = u16::try_from(out.len())
        .expect("labels expand to a few bytes")
        .to_be_bytes();
    let label_len = [u8::try_from(6 + label.len()).expect("short label")];
    let info: [&[u8]; 5] = [&length, &label_len, b"tls13 ", label, &[0]];
    hkdf::Prk::new_less_safe(algorithm, secret)
        .expand(&info, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .expect("HKDF output length is far below its limit");
}

/// The key log of the link's TLS configs: keeps the application traffic
/// secrets until the record layer takes them (see the module doc).
#[derive(Debug, Default)]
pub(crate) struct LinkKeyLog;

const CLIENT_SECRET: &str = "CLIENT_TRAFFIC_SECRET_0";
const SERVER_SECRET: &str = "SERVER_TRAFFIC_SECRET_0";

impl rustls::KeyLog for LinkKeyLog {
    fn will_log(&self, label: &str) -> bool {
        label == CLIENT_SECRET || label == SERVER_SECRET
    }

    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        if !self.will_log(label) {
            return;
        }
        if let Some(secret) = TrafficSecret::new(secret) {
            store().put(secret);
        }
    }
}

struct Pending {
    /// Each secret with how many times it was logged: a process holding
    /// both ends of a link (tests, `kitepipe demo`) logs each secret twice
    /// and takes it twice.
    by_iv: HashMap<[u8; IV_LEN], (TrafficSecret, usize)>,
    /// Insertion order, for expiry: entries already taken are skipped.
    order: VecDeque<([u8; IV_LEN], Instant)>,
}

impl Pending {
    fn new() -> Pending {
        Pending {
            by_iv: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn put(&mut self, secret: TrafficSecret) {
        let now = Instant::now();
        while let Some(&(iv, at)) = self.order.front() {
            if self.order.len() < MAX_PENDING_SECRETS && now.duration_since(at) < PENDING_FOR {
                break;
            }
            self.order.pop_front();
            self.by_iv.remove(&iv);
        }
        let iv = secret.iv();
        self.by_iv.entry(iv).or_insert((secret, 0)).1 += 1;
        self.order.push_back((iv, now));
    }
}

fn store() -> std::sync::MutexGuard<'static, Pending> {
    static STORE: OnceLock<Mutex<Pending>> = OnceLock::new();
    crate::sync::lock(STORE.get_or_init(|| Mutex::new(Pending::new())))
}

/// Takes the traffic secret whose write IV is `iv`, if rustls logged it.
pub(crate) fn take(iv: &[u8]) -> Option<TrafficSecret> {
    let iv: [u8; IV_LEN] = iv.try_into().ok()?;
    let mut store = store();
    let (secret, count) = store.by_iv.get_mut(&iv)?;
    *count -= 1;
    if *count > 0 {
        return Some(secret.clone());
    }
    store.by_iv.remove(&iv).map(|(secret, _)| secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(n: u32) -> TrafficSecret {
        let mut bytes = [0u8; 32];
        bytes[..4].copy_from_slice(&n.to_be_bytes());
        TrafficSecret::new(&bytes).unwrap()
    }

    /// Handshakes that never finish cannot grow the store: the oldest
    /// secrets go first, and all go after `PENDING_FOR`.
    #[tokio::test(start_paused = true)]
    async fn pending_secrets_are_bounded_in_count_and_time() {
        let mut pending = Pending::new();
        for n in 0..3 * MAX_PENDING_SECRETS as u32 {
            pending.put(secret(n));
            assert!(pending.by_iv.len() <= MAX_PENDING_SECRETS);
            assert!(pending.order.len() <= MAX_PENDING_SECRETS);
        }
        let newest = secret(3 * MAX_PENDING_SECRETS as u32 - 1).iv();
        assert!(pending.by_iv.contains_key(&newest));
        assert!(!pending.by_iv.contains_key(&secret(0).iv()));
        tokio::time::advance(PENDING_FOR).await;
        pending.put(secret(u32::MAX));
        assert_eq!(pending.by_iv.len(), 1);
    }

    /// Logged once per end of a link in this process, taken once per end.
    #[test]
    fn a_secret_logged_twice_is_taken_twice() {
        let log = LinkKeyLog;
        let bytes = [0x5au8; 48];
        rustls::KeyLog::log(&log, CLIENT_SECRET, &[], &bytes);
        rustls::KeyLog::log(&log, CLIENT_SECRET, &[], &bytes);
        let iv = TrafficSecret::new(&bytes).unwrap().iv();
        assert!(take(&iv).is_some() && take(&iv).is_some());
        assert!(take(&iv).is_none());
        // Other labels (handshake secrets, exporter) are not kept.
        assert!(!rustls::KeyLog::will_log(&log, "EXPORTER_SECRET"));
    }
}
