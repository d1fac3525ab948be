//! An http kite's HTTP-level rules at the relay ([`HttpRules`], built from
//! the claim's [`HttpPolicy`]): basic auth, requests per second per visitor
//! address, connections per kite, header edits, `X-Forwarded-Host`, the
//! redirect to HTTPS and the backend protocol. Both visitor paths (the
//! strict HTTP/1 one in `http`, HTTP/2 in `h2`) ask it the same questions.
//!
//! Every map here is keyed by something a stranger controls (their
//! address, the credentials they send) and bounded, with a named policy
//! when full; password hashes run off the async threads under a
//! relay-wide bound ([`MAX_HASH_CHECKS`]), and a visitor's failed
//! attempts are rate limited before any hash runs.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::Engine;
use kitepipe_proto::http_policy::{BackendProtocol, HeaderRules, HttpPolicy};
use ring::digest;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::local_guard::same_secret;
use crate::pki::htpasswd::{self, HtpasswdEntry};
use crate::sync::lock;

/// Visitor addresses (IPv6: /64 networks) whose rate buckets a kite keeps.
/// When full, buckets back at their full burst (idle visitors) are
/// dropped, then the least recently used: 4096 × ~64 bytes per kite.
pub(crate) const MAX_BUCKETS: usize = 4096;

/// Recent successful logins remembered per kite (by user and the SHA-256
/// of the password), so a logged-in browser does not cost a hash per
/// request. When full, expired ones go, then the oldest.
pub(crate) const MAX_CACHED_LOGINS: usize = 256;

/// How long a successful login is remembered without a new hash.
pub(crate) const LOGIN_CACHE_TTL: Duration = Duration::from_secs(300);

/// Password hash checks running at once, relay-wide: each takes one core
/// for ~3 to 250 ms, and up to 64 MiB for argon2 (see `pki::htpasswd`).
pub(crate) const MAX_HASH_CHECKS: usize = 2;

/// How long a request waits for a hash slot before it gets 429: under a
/// flood of logins, a quick answer beats a queue.
pub(crate) const HASH_WAIT: Duration = Duration::from_secs(2);

/// Failed logins per second a visitor address may make (after
/// [`AUTH_FAILURE_BURST`]); past that it gets 429 without a hash, so a
/// stranger cannot burn the relay's CPU guessing.
pub(crate) const AUTH_FAILURE_RATE: f64 = 1.0;

/// Failed logins a visitor address may make at once (typos happen).
pub(crate) const AUTH_FAILURE_BURST: f64 = 10.0;

/// Relay-wide bound on password hash checks ([`MAX_HASH_CHECKS`]).
static HASH_CHECKS: Semaphore = Semaphore::const_new(MAX_HASH_CHECKS);

/// Why a visitor's request or connection is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// 401: no or wrong credentials; the page asks for them in `realm`.
    Unauthorized {
        /// The realm of the `WWW-Authenticate` challenge.
        realm: String,
    },
    /// 429: the visitor's address sent more than the rate allows.
    TooManyRequests {
        /// Seconds until a request would pass (`Retry-After`).
        retry_after: u64,
    },
    /// 429: the kite has as many visitor connections as it allows.
    TooManyConnections {
        /// Seconds to wait (`Retry-After`).
        retry_after: u64,
    },
}

impl Refusal {
    /// Status, reason phrase, the page's explanation for `host`, and the
    /// extra headers (`WWW-Authenticate`, `Retry-After`).
    pub(crate) fn page(
        &self,
        host: &str,
    ) -> (u16, &'static str, String, Vec<(&'static str, String)>) {
        match self {
            Refusal::Unauthorized { realm } => (
                401,
                "Unauthorized",
                format!("{host} asks for a user name and password."),
                vec![(
                    "WWW-Authenticate",
                    format!("Basic realm=\"{realm}\", charset=\"UTF-8\""),
                )],
            ),
            Refusal::TooManyRequests { retry_after } => (
                429,
                "Too Many Requests",
                format!(
                    "Too many requests to {host} from your address. Try again in {retry_after} s."
                ),
                vec![("Retry-After", retry_after.to_string())],
            ),
            Refusal::TooManyConnections { retry_after } => (
                429,
                "Too Many Requests",
                format!(
                    "{host} is serving as many visitors as it allows. Try again in {retry_after} s."
                ),
                vec![("Retry-After", retry_after.to_string())],
            ),
        }
    }
}

/// Held for as long as a visitor connection to the kite is open.
#[derive(Debug)]
pub(crate) struct ConnPermit(Option<Arc<AtomicU32>>);

impl Drop for ConnPermit {
    fn drop(&mut self) {
        if let Some(open) = &self.0 {
            open.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// One kite's rules on one link, with their running state (rate buckets,
/// open connections), shared by every visitor routed there.
#[derive(Debug, Default)]
pub(crate) struct HttpRules {
    policy: HttpPolicy,
    /// Basic auth, if the kite has users.
    auth: Option<Auth>,
    /// Requests per address, if the kite limits them.
    rate: Option<Limit>,
    /// Per visitor address (see [`MAX_BUCKETS`]): used by `rate` and by
    /// `auth`'s failure limit.
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
    /// `max_connections`, if set.
    max_connections: Option<u32>,
    /// Visitor connections open now (each holds a [`ConnPermit`]).
    open: Arc<AtomicU32>,
    /// The rules a new claim of the kite on the same link put in place of
    /// these (a changed htpasswd file): requests on connections opened
    /// before are judged by those.
    replaced: OnceLock<Arc<HttpRules>>,
}

/// Basic auth: the users and the logins remembered.
#[derive(Debug)]
struct Auth {
    realm: String,
    users: Vec<HtpasswdEntry>,
    /// (user, SHA-256 of the password) -> when it was checked
    /// ([`MAX_CACHED_LOGINS`], [`LOGIN_CACHE_TTL`]).
    logins: Mutex<HashMap<(String, [u8; 32]), Instant>>,
}

/// A token bucket's refill rate and size.
#[derive(Debug, Clone, Copy)]
struct Limit {
    per_second: f64,
    burst: f64,
}

impl Limit {
    const AUTH_FAILURES: Limit = Limit {
        per_second: AUTH_FAILURE_RATE,
        burst: AUTH_FAILURE_BURST,
    };

    /// Seconds until `tokens` reach one token (at least 1).
    fn retry_after(&self, tokens: f64) -> u64 {
        let wait = ((1.0 - tokens) / self.per_second).ceil();
        // A float in 0..=1e5 (burst bound): the cast cannot overflow.
        (wait as u64).max(1)
    }
}

/// One visitor address's tokens.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    requests: f64,
    failures: f64,
    last: Instant,
}

impl HttpRules {
    /// Checks and bounds the claim's rules (a connector is not trusted to
    /// send well-formed or short ones); the error names what is wrong.
    pub(crate) fn new(policy: HttpPolicy) -> Result<HttpRules, String> {
        policy.check().map_err(|err| err.to_string())?;
        let auth = if policy.basic_auth.is_empty() {
            None
        } else {
            // The wire form has no comments or blank lines (the connector
            // leaves them out): more lines than users is refused unread.
            if policy.basic_auth.len() > htpasswd::MAX_USERS {
                return Err(format!(
                    "basic_auth: {} lines, more than {} users",
                    policy.basic_auth.len(),
                    htpasswd::MAX_USERS
                ));
            }
            let users = htpasswd::parse_lines(policy.basic_auth.iter().map(String::as_str))
                .map_err(|err| format!("basic_auth: {err}"))?;
            Some(Auth {
                realm: policy.realm().to_string(),
                users,
                logins: Mutex::default(),
            })
        };
        let rate = policy.rate_limit.map(|rate| Limit {
            per_second: f64::from(rate),
            burst: f64::from(policy.rate_burst.unwrap_or(rate)),
        });
        Ok(HttpRules {
            max_connections: policy.max_connections,
            policy,
            auth,
            rate,
            buckets: Mutex::default(),
            open: Arc::default(),
            replaced: OnceLock::new(),
        })
    }

    /// Marks these rules replaced by `newer` (the registry, when a link
    /// claims the kite again).
    pub(crate) fn replace_with(&self, newer: Arc<HttpRules>) {
        let _ = self.replaced.set(newer);
    }

    /// The rules in force now: these, or the newest that replaced them.
    pub(crate) fn current(self: &Arc<HttpRules>) -> Arc<HttpRules> {
        let mut rules = self.clone();
        while let Some(newer) = rules.replaced.get().cloned() {
            rules = newer;
        }
        rules
    }

    /// A new visitor connection to the kite: a permit to hold while it is
    /// open, or a refusal (max_connections).
    pub(crate) fn connection(&self) -> Result<ConnPermit, Refusal> {
        let Some(max) = self.max_connections else {
            return Ok(ConnPermit(None));
        };
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            })
            .map(|_| ConnPermit(Some(self.open.clone())))
            .map_err(|_| Refusal::TooManyConnections { retry_after: 1 })
    }

    /// Whether [`HttpRules::request`] admits every request (no basic auth,
    /// no rate limit): the caller may skip it.
    pub(crate) fn admits_all(&self) -> bool {
        self.auth.is_none() && self.rate.is_none()
    }

    /// Whether requests need their `Authorization` value for
    /// [`HttpRules::request`].
    pub(crate) fn asks_credentials(&self) -> bool {
        self.auth.is_some()
    }

    /// One request from `peer` with its `Authorization` header value, if
    /// any: admitted, or refused (basic auth, rate limit). May take a few
    /// milliseconds (a password hash), off the async threads.
    ///
    /// The rate limit comes first (a refused request costs nothing more);
    /// a failed login costs the address one of its few failure tokens, and
    /// an address out of them gets 429 before any hash runs. A request
    /// without credentials is answered 401 at no cost (browsers ask first).
    pub(crate) async fn request(
        &self,
        peer: IpAddr,
        authorization: Option<&[u8]>,
    ) -> Result<(), Refusal> {
        if self.admits_all() {
            return Ok(());
        }
        let key = visitor_key(peer);
        self.take_tokens(key)?;
        let Some(auth) = &self.auth else {
            return Ok(());
        };
        let unauthorized = || Refusal::Unauthorized {
            realm: auth.realm.clone(),
        };
        let Some((user, password)) = authorization.and_then(basic_credentials) else {
            return Err(unauthorized());
        };
        let login = (user, sha256(&password));
        let now = Instant::now();
        if lock(&auth.logins)
            .get(&login)
            .is_some_and(|checked| now.duration_since(*checked) < LOGIN_CACHE_TTL)
        {
            return Ok(());
        }
        if check_password(&auth.users, &login.0, password).await? {
            remember(&mut lock(&auth.logins), login, now);
            return Ok(());
        }
        self.failed(key);
        Err(unauthorized())
    }
    /// Header edits for requests on their way to the local service.
    pub(crate) fn request_headers(&self) -> &HeaderRules {
        &self.policy.request_headers
    }

    /// Header edits for responses on their way to the visitor.
    pub(crate) fn response_headers(&self) -> &HeaderRules {
        &self.policy.response_headers
    }

    /// Whether requests get `X-Forwarded-Host`.
    pub(crate) fn forwarded_host(&self) -> bool {
        self.policy.forwarded_host
    }

    /// Whether plain-HTTP visitors are redirected to HTTPS.
    pub(crate) fn https_redirect(&self) -> bool {
        self.policy.https_redirect
    }

    /// How the relay speaks to the local service.
    pub(crate) fn backend(&self) -> BackendProtocol {
        self.policy.backend
    }
}

impl HttpRules {
    /// Takes a request token (rate limit) and checks the address has
    /// failure tokens left (basic auth).
    fn take_tokens(&self, key: IpAddr) -> Result<(), Refusal> {
        let now = Instant::now();
        let mut buckets = lock(&self.buckets);
        let bucket = bucket(&mut buckets, key, now, self.rate);
        if let Some(rate) = self.rate {
            bucket.requests = refill(bucket.requests, rate, bucket.last, now);
        }
        bucket.failures = refill(bucket.failures, Limit::AUTH_FAILURES, bucket.last, now);
        bucket.last = now;
        if self.auth.is_some() && bucket.failures < 1.0 {
            return Err(Refusal::TooManyRequests {
                retry_after: Limit::AUTH_FAILURES.retry_after(bucket.failures),
            });
        }
        if let Some(rate) = self.rate {
            if bucket.requests < 1.0 {
                return Err(Refusal::TooManyRequests {
                    retry_after: rate.retry_after(bucket.requests),
                });
            }
            bucket.requests -= 1.0;
        }
        Ok(())
    }

    /// A failed login from `key` costs one failure token.
    fn failed(&self, key: IpAddr) {
        let now = Instant::now();
        let mut buckets = lock(&self.buckets);
        let bucket = bucket(&mut buckets, key, now, self.rate);
        bucket.failures = (bucket.failures - 1.0).max(0.0);
    }
}

/// The bucket of `key`, made full if new; makes room when the map is full
/// ([`MAX_BUCKETS`]).
fn bucket(
    buckets: &mut HashMap<IpAddr, Bucket>,
    key: IpAddr,
    now: Instant,
    rate: Option<Limit>,
) -> &mut Bucket {
    if !buckets.contains_key(&key) && buckets.len() >= MAX_BUCKETS {
        // Idle visitors first: a bucket that has refilled is the same as
        // none.
        buckets.retain(|_, bucket| {
            let full_requests = rate
                .is_none_or(|rate| refill(bucket.requests, rate, bucket.last, now) >= rate.burst);
            let full_failures = refill(bucket.failures, Limit::AUTH_FAILURES, bucket.last, now)
                >= AUTH_FAILURE_BURST;
            !(full_requests && full_failures)
        });
        if buckets.len() >= MAX_BUCKETS {
            let oldest = buckets
                .iter()
                .min_by_key(|(_, bucket)| bucket.last)
                .map(|(key, _)| *key);
            if let Some(oldest) = oldest {
                buckets.remove(&oldest);
            }
        }
    }
    buckets.entry(key).or_insert(Bucket {
        requests: rate.map_or(0.0, |rate| rate.burst),
        failures: AUTH_FAILURE_BURST,
        last: now,
    })
}

/// The key a visitor's tokens are kept by: the address for IPv4 (and
/// IPv4-mapped IPv6), its /64 network for IPv6 (one host gets a whole /64).
fn visitor_key(peer: IpAddr) -> IpAddr {
    match peer.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

/// `tokens` refilled at `limit`'s rate from `last` to `now`.
fn refill(tokens: f64, limit: Limit, last: Instant, now: Instant) -> f64 {
    let elapsed = now.saturating_duration_since(last).as_secs_f64();
    (tokens + elapsed * limit.per_second).min(limit.burst)
}

/// Remembers a successful login, making room when full
/// ([`MAX_CACHED_LOGINS`]).
fn remember(
    logins: &mut HashMap<(String, [u8; 32]), Instant>,
    login: (String, [u8; 32]),
    now: Instant,
) {
    if !logins.contains_key(&login) && logins.len() >= MAX_CACHED_LOGINS {
        logins.retain(|_, checked| now.duration_since(*checked) < LOGIN_CACHE_TTL);
        if logins.len() >= MAX_CACHED_LOGINS {
            let oldest = logins
                .iter()
                .min_by_key(|(_, checked)| **checked)
                .map(|(login, _)| login.clone());
            if let Some(oldest) = oldest {
                logins.remove(&oldest);
            }
        }
    }
    logins.insert(login, now);
}

/// Whether `password` is `user`'s. The user is found without an early
/// exit on the name; an unknown user costs a hash like a known one (of the
/// first user's hash, result ignored), so timing tells nobody which names
/// exist. Waits at most [`HASH_WAIT`] for one of the relay's
/// [`MAX_HASH_CHECKS`] slots, else 429.
async fn check_password(
    users: &[HtpasswdEntry],
    user: &str,
    password: Vec<u8>,
) -> Result<bool, Refusal> {
    let mut found = None;
    for entry in users {
        if same_secret(entry.user.as_bytes(), user.as_bytes()) && found.is_none() {
            found = Some(entry);
        }
    }
    let Some(decoy) = users.first() else {
        return Ok(false);
    };
    let (hash, known) = match found {
        Some(entry) => (entry.hash.clone(), true),
        None => (decoy.hash.clone(), false),
    };
    let busy = Refusal::TooManyRequests { retry_after: 1 };
    let Ok(Ok(slot)) = tokio::time::timeout(HASH_WAIT, HASH_CHECKS.acquire()).await else {
        return Err(busy);
    };
    let matched = tokio::task::spawn_blocking(move || hash.verify(&password))
        .await
        .unwrap_or(false);
    drop(slot);
    Ok(known && matched)
}

/// `(user, password)` from `Basic <base64 of user:password>`.
fn basic_credentials(value: &[u8]) -> Option<(String, Vec<u8>)> {
    let (scheme, encoded) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"basic ") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim_ascii())
        .ok()?;
    let colon = decoded.iter().position(|&byte| byte == b':')?;
    let (user, password) = decoded.split_at(colon);
    let user = String::from_utf8(user.to_vec()).ok()?;
    Some((user, password.get(1..)?.to_vec()))
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, data).as_ref());
    out
}

#[cfg(test)]
mod tests;
