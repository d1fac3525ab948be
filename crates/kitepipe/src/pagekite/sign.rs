//! pagekite.py's signatures (`signToken` / `checkSignature` in
//! `pagekite/proto/proto.py`), bit for bit: a 36-character token made of
//! an 8-character salt and the first 28 hex digits of
//! `sha1(secret + payload + [ts] + salt)`.
//!
//! SHA-1 is what the protocol uses; it is ring's
//! `SHA1_FOR_LEGACY_USE_ONLY` here. The signature is a salted keyed hash
//! of a public payload, where SHA-1's collision weakness does not give a
//! stranger a forgery (that needs a preimage), but it is no MAC by modern
//! standards: docs/security.md says why PageKite is opt-in.

use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};

use crate::local_guard::same_secret;

/// A signature's length: 8 salt characters and 28 hex digits.
pub(crate) const TOKEN_LENGTH: usize = 36;

/// How long one time window of a timestamped signature lasts, in seconds
/// (pagekite.py: `int(timestamp/600)`).
pub(crate) const WINDOW_SECS: u64 = 600;

/// pagekite.py's `signToken(token=salt, secret, payload, timestamp)`:
/// `salt[0..8] + sha1hex(secret + payload + salt[0..8])[..28]`; with
/// `Some(ts)` the salt's first character becomes `t` and `'%x' % (ts/600)`
/// goes between payload and salt.
pub(crate) fn sign_token(
    secret: &str,
    payload: &str,
    salt: &str,
    timestamp: Option<u64>,
) -> String {
    let salt: String = match timestamp {
        Some(_) => std::iter::once('t')
            .chain(salt.chars().skip(1))
            .take(8)
            .collect(),
        None => salt.chars().take(8).collect(),
    };
    let mut input = String::with_capacity(secret.len() + payload.len() + 32);
    input.push_str(secret);
    input.push_str(payload);
    if let Some(ts) = timestamp {
        input.push_str(&format!("{:x}", ts / WINDOW_SECS));
    }
    input.push_str(&salt);
    let hash = digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, input.as_bytes());
    let hex = kitepipe_proto::message::hex(hash.as_ref());
    format!("{salt}{}", &hex[..TOKEN_LENGTH - 8])
}

/// pagekite.py's `checkSignature`: does `sign` sign `payload` with
/// `secret`? A timestamped signature (starting with `t`) is valid in the
/// window of `now` (seconds since the epoch) and the one before it, so a
/// front-end's challenge lives 10 to 20 minutes. Compared in constant
/// time.
pub(crate) fn check_signature(sign: &str, secret: &str, payload: &str, now: u64) -> bool {
    if sign.is_empty() {
        return false;
    }
    if sign.starts_with('t') {
        [0, WINDOW_SECS].iter().any(|back| {
            let valid = sign_token(secret, payload, sign, Some(now.saturating_sub(*back)));
            same_secret(valid.as_bytes(), sign.as_bytes())
        })
    } else {
        let valid = sign_token(secret, payload, sign, None);
        same_secret(valid.as_bytes(), sign.as_bytes())
    }
}

/// A front-end's challenge for a kite request (`X-PageKite-SignThis:
/// WHAT:CHALLENGE`): its own timed signature of `what`
/// (`PROTO:DOMAIN:SRAND`) with a secret only it knows, like pagekite.py's
/// `signToken(payload=what, timestamp=now)`. `check_challenge` takes it
/// back within 10 to 20 minutes.
pub(crate) fn challenge(front_secret: &str, what: &str, now: u64) -> String {
    sign_token(front_secret, what, &random_salt(), Some(now))
}

/// Is `token` (a kite request's TOKEN) a challenge this front-end issued
/// for `what` in the current or previous 10-minute window? Only timed
/// tokens count: an untimed one would never expire.
pub(crate) fn check_challenge(token: &str, front_secret: &str, what: &str, now: u64) -> bool {
    token.starts_with('t') && check_signature(token, front_secret, what, now)
}

/// A back-end's signed kite request (pagekite.py's
/// `PageKiteRequestHeaders`): `srand` is the back-end's salt, `token` the
/// front-end's challenge or empty.
pub(crate) fn kite_request(
    proto: &str,
    domain: &str,
    secret: &str,
    srand: &str,
    token: &str,
) -> kitepipe_proto::pagekite::KiteRequest {
    let mut request = kitepipe_proto::pagekite::KiteRequest {
        proto: proto.to_ascii_lowercase(),
        domain: domain.to_ascii_lowercase(),
        srand: srand.to_string(),
        token: token.to_string(),
        sign: String::new(),
    };
    request.sign = sign_token(secret, &request.payload(), &random_salt(), None);
    request
}

/// A fresh salt: 36 hex characters from the system's CSPRNG (pagekite.py
/// uses a SHA-1 of its secret and `random.randint`).
pub(crate) fn random_salt() -> String {
    let mut bytes = [0u8; TOKEN_LENGTH / 2];
    // The system RNG fails only on a broken OS; a constant salt would be
    // worse than a panic.
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system random number generator works");
    kitepipe_proto::message::hex(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values computed by pagekite.py 1.5 itself:
    /// `/usr/bin/python3 -c 'from pagekite.proto.proto import signToken;
    /// print(signToken(token=SALT, secret=SECRET, payload=PAYLOAD[, timestamp=TS]))'`.
    const PAGEKITE_PY: &[(&str, &str, &str, Option<u64>, &str)] = &[
        (
            "s3cret",
            "http:foo.example.com:abcd1234:",
            "abcdef0123456789",
            None,
            "abcdef01d17075e1342fd28e724aeabf84f8",
        ),
        (
            "s3cret",
            "http:foo.example.com:abcd1234:",
            "abcdef0123456789",
            Some(1_764_928_800),
            "tbcdef018fbf0a4770c75dfa88fbc8d1d5ea",
        ),
        (
            "s3cret",
            "http:foo.example.com:abcd1234:",
            "abcdef0123456789",
            Some(1_764_928_800 + 599),
            "tbcdef018fbf0a4770c75dfa88fbc8d1d5ea",
        ),
        // A short salt is used as it is (pagekite.py slices).
        (
            "x",
            "raw-22:a.b:x:",
            "1234",
            None,
            "1234081c8698b9ab2d9c10e26689017a",
        ),
        (
            "pw",
            "https:x.y.z:0123456789abcdef0123456789abcdef0123:t1234567aaaa",
            "0123456789abcdef0123456789abcdef0123",
            None,
            "0123456725745e8661a65012ed5b62dbaad3",
        ),
    ];

    #[test]
    fn sign_token_matches_pagekite_py() {
        for (secret, payload, salt, ts, expected) in PAGEKITE_PY {
            assert_eq!(
                sign_token(secret, payload, salt, *ts),
                *expected,
                "{payload} {ts:?}"
            );
        }
    }

    #[test]
    fn check_signature_accepts_pagekite_py_signatures() {
        let (secret, payload) = ("s3cret", "http:foo.example.com:abcd1234:");
        assert!(check_signature(PAGEKITE_PY[0].4, secret, payload, 0));
        assert!(!check_signature(PAGEKITE_PY[0].4, "other", payload, 0));
        assert!(!check_signature(
            PAGEKITE_PY[0].4,
            secret,
            "http:bar.example.com:abcd1234:",
            0
        ));
        assert!(!check_signature("", secret, payload, 0));
        // One hex digit changed.
        assert!(!check_signature(
            "abcdef01d17075e1342fd28e724aeabf84f9",
            secret,
            payload,
            0
        ));
    }

    #[test]
    fn timestamped_signatures_live_two_windows() {
        let (secret, payload) = ("s3cret", "http:foo.example.com:abcd1234:");
        let signed_at = 1_764_928_800;
        let sign = PAGEKITE_PY[1].4;
        for now in [
            signed_at,
            signed_at + 599,
            signed_at + 600,
            signed_at + 1199,
        ] {
            assert!(check_signature(sign, secret, payload, now), "now {now}");
        }
        for now in [signed_at + 1200, signed_at - 1, 0] {
            assert!(!check_signature(sign, secret, payload, now), "now {now}");
        }
    }

    #[test]
    fn captured_kite_requests_check_with_their_secret() {
        use kitepipe_proto::pagekite::{ChunkDecoder, parse_backend_hello};
        let captures: [&[u8]; 2] = [
            include_bytes!("../../../proto/src/pagekite/vectors/pagekite-be.bin"),
            include_bytes!("../../../proto/src/pagekite/vectors/upagekite-be.bin"),
        ];
        for wire in captures {
            let (hello, consumed) = parse_backend_hello(wire).unwrap().unwrap();
            // The re-signed requests (with the front-end's challenge) come
            // in the first chunk.
            let mut buf = bytes::BytesMut::from(&wire[consumed..]);
            let chunk = ChunkDecoder::new().decode(&mut buf).unwrap().unwrap();
            let requests = hello.requests.iter().chain(&chunk.headers.requests);
            let mut n = 0;
            for request in requests {
                n += 1;
                let payload = request.payload();
                assert!(
                    check_signature(&request.sign, "s3cret", &payload, 0),
                    "{payload}"
                );
                assert!(!check_signature(&request.sign, "s3cre7", &payload, 0));
            }
            assert!(n >= 2);
        }
    }

    #[test]
    fn challenges_and_requests_round_trip() {
        let now = 1_764_928_800;
        let what = "http:foo.example.com:0123456789abcdef";
        let token = challenge("front", what, now);
        assert!(token.starts_with('t') && token.len() == TOKEN_LENGTH);
        assert!(check_challenge(&token, "front", what, now + 900));
        assert!(!check_challenge(&token, "front", what, now + 1200));
        assert!(!check_challenge(&token, "other", what, now));
        assert!(!check_challenge(
            &token,
            "front",
            "http:bar.example.com:0123456789abcdef",
            now
        ));
        // An untimed signature by the same secret is no challenge.
        let untimed = sign_token("front", what, &random_salt(), None);
        assert!(!check_challenge(&untimed, "front", what, now));

        let request = kite_request(
            "HTTP",
            "Foo.Example.com",
            "s3cret",
            "0123456789abcdef",
            &token,
        );
        assert_eq!(request.what(), what);
        let parsed = kitepipe_proto::pagekite::KiteRequest::parse(&request.header_value()).unwrap();
        assert_eq!(parsed, request);
        assert!(check_signature(
            &parsed.sign,
            "s3cret",
            &parsed.payload(),
            now
        ));
        assert!(!check_signature(
            &parsed.sign,
            "wrong",
            &parsed.payload(),
            now
        ));
    }

    #[test]
    fn random_salts_are_hex_and_differ() {
        let (a, b) = (random_salt(), random_salt());
        assert_eq!(a.len(), TOKEN_LENGTH);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        // A signature made with it has pagekite.py's shape.
        assert_eq!(sign_token("s", "p", &a, None).len(), TOKEN_LENGTH);
    }
}
