//! Certificates from an ACME CA (RFC 8555) for the http kites the relay
//! terminates TLS for, filling `ctx.certs` by itself.
//!
//! Start at [`Acme::want`]: `session` calls it when it has accepted an http
//! kite's claim, the only way a name gets here (never from a visitor's SNI:
//! strangers must not burn the CA's rate limits). [`run`] is the worker: it
//! takes wanted names from a bounded queue, skips those a valid certificate
//! already covers, orders one name at a time under a token bucket
//! ([`RATE_BURST`], [`RATE_REFILL`]), retries failures with capped backoff,
//! and renews certificates `renew_before` their expiry. `issue` is one
//! order; `challenge` answers HTTP-01 (hooked into `http`) and TLS-ALPN-01
//! (hooked into `listener`) for the relay's own orders only; `store` keeps
//! the account and certificates in `STATE_DIR/acme`; `client` is the HTTPS
//! client instant-acme speaks through.
//!
//! acme/ never touches a visitor's connection beyond those two challenge
//! hooks, and never routes: serving the certificates is `certs`' job.

mod challenge;
mod client;
mod issue;
mod store;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use instant_acme::{Account, NewAccount};
use kitepipe_proto::kite::{KiteProto, KiteRef};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

use super::RelayCtx;
use super::certs::{CertSource, CertStore, ServedCert};
use super::registry::Lookup;
use crate::config::{AcmeChallenge, AcmeConfig};
use crate::link::backoff::Backoff;
use crate::sync::lock;
pub(crate) use challenge::ACME_TLS_ALPN;
use challenge::Challenges;
use client::AcmeHttp;
pub(crate) use client::ClientError;
use issue::{ChallengeKind, IssueError};
use store::Store;
pub(crate) use store::StoreError;

/// Names waiting for the worker at most. Each is a kite some connector
/// claimed and the relay accepted, so the queue only fills that far on a
/// relay with that many new http kites at once; past it, names are dropped
/// with a warning and wanted again at their kite's next registration.
const MAX_WANTED: usize = 256;

/// Orders the worker may place at once after a quiet spell. Let's Encrypt
/// allows 300 new orders per 3 hours per account; a relay stays far below.
const RATE_BURST: u32 = 5;

/// One more order allowed per this long (5 a minute sustained).
const RATE_REFILL: Duration = Duration::from_secs(12);

/// First retry delay after a failed issuance, doubling per failure.
const RETRY_FIRST: Duration = Duration::from_secs(4);

/// Retry delay cap: Let's Encrypt allows 5 failed validations per name per
/// hour, so a name that keeps failing is tried about once an hour.
const RETRY_MAX: Duration = Duration::from_secs(3600);

/// The worker looks at its certificates at least this often, even with no
/// renewal due sooner (so a clock jump cannot make it miss one).
const RENEW_CHECK_MAX: Duration = Duration::from_secs(3600);

/// Why ACME cannot start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AcmeError {
    /// The state directory.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The HTTPS client.
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// The relay's ACME state: the queue of wanted names and the pending
/// challenges (`ctx.acme`). Inert when `--acme` is off.
pub(crate) struct Acme {
    enabled: Option<Enabled>,
    /// Names waiting for the worker, oldest first, each once.
    wanted: Mutex<VecDeque<String>>,
    /// Wakes the worker when a name is wanted.
    wake: Notify,
    /// Challenge answers for the relay's own pending orders.
    challenges: Challenges,
}

/// What ACME needs when it is on.
struct Enabled {
    config: AcmeConfig,
    store: Store,
    http: AcmeHttp,
}

impl Acme {
    /// ACME as configured: off for `None`. Opens (creates, 0700) the state
    /// directory and reads `--acme-ca-root`.
    pub(crate) fn new(config: Option<&AcmeConfig>) -> Result<Acme, AcmeError> {
        let enabled = match config {
            None => None,
            Some(config) => Some(Enabled {
                store: Store::open(&config.dir)?,
                http: AcmeHttp::new(config.ca_root.as_deref())?,
                config: config.clone(),
            }),
        };
        Ok(Acme {
            enabled,
            wanted: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            challenges: Challenges::default(),
        })
    }

    /// Serves the stored certificates that have not expired.
    pub(crate) fn load_stored(&self, certs: &CertStore) {
        let Some(enabled) = &self.enabled else {
            return;
        };
        for (name, issued) in enabled.store.load_certs(unix_now()) {
            if certs
                .get(&name)
                .is_some_and(|c| c.source == CertSource::File && c.not_after > unix_now())
            {
                debug!(
                    name,
                    "a --tls-cert certificate serves this name; stored ACME one unused"
                );
                continue;
            }
            info!(name, serial = %issued.serial, not_after = issued.not_after, "serving stored ACME certificate");
            certs.insert(
                &name,
                ServedCert {
                    key: issued.key,
                    source: CertSource::Acme,
                    not_after: issued.not_after,
                },
            );
        }
    }

    /// Asks for a certificate for `kite`, an http kite the relay has just
    /// accepted: queued unless ACME is off, the kite is not http, the name
    /// is a wildcard (which needs DNS-01) or already queued. The worker
    /// skips names a valid certificate covers. Never blocks.
    pub(crate) fn want(&self, kite: &KiteRef) {
        if self.enabled.is_none() || kite.proto != KiteProto::Http {
            return;
        }
        let name = kite.name.as_str();
        if name.starts_with("*.") {
            info!(
                kite = name,
                "ACME cannot issue wildcard certificates without DNS-01, which kitepipe does not \
                 answer: give this kite's certificate with a file"
            );
            return;
        }
        if name.parse::<std::net::IpAddr>().is_ok() {
            debug!(kite = name, "no ACME certificate for an IP address");
            return;
        }
        let mut wanted = lock(&self.wanted);
        if wanted.iter().any(|w| w == name) {
            return;
        }
        if wanted.len() >= MAX_WANTED {
            warn!(
                kite = name,
                "ACME queue full; certificate not requested now"
            );
            return;
        }
        wanted.push_back(name.to_string());
        drop(wanted);
        self.wake.notify_one();
    }

    /// The response to a plain HTTP request for `target` on `host`, if it
    /// is the CA fetching one of the relay's pending HTTP-01 challenges.
    /// Cheap for every other request: a prefix check.
    pub(crate) fn http01_response(&self, host: &str, target: &str) -> Option<Vec<u8>> {
        self.enabled.as_ref()?;
        let key_authorization = self.challenges.http01(host, target)?;
        debug!(host, "answered an HTTP-01 challenge");
        Some(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{key_authorization}",
                key_authorization.len()
            )
            .into_bytes(),
        )
    }

    /// Whether a ClientHello offering `alpn` for `sni` is the CA
    /// validating one of the relay's pending TLS-ALPN-01 challenges: it
    /// offers `acme-tls/1` and names a name with such a challenge. Cheap
    /// for every other ClientHello.
    pub(crate) fn answers_tls_alpn(&self, alpn: &[Vec<u8>], sni: Option<&str>) -> bool {
        self.enabled.is_some()
            && alpn.iter().any(|p| p == ACME_TLS_ALPN)
            && sni.is_some_and(|name| self.challenges.has_tls_alpn01(name))
    }

    /// Answers a ClientHello offering ALPN `acme-tls/1` (`buf` holds it):
    /// the challenge certificate if `sni` has a pending TLS-ALPN-01
    /// challenge of the relay's own, else the connection is closed.
    pub(crate) async fn serve_tls_alpn(&self, sock: TcpStream, buf: BytesMut, sni: Option<&str>) {
        challenge::serve_tls_alpn(&self.challenges, sock, buf, sni).await;
    }

    fn pop_wanted(&self) -> Option<String> {
        lock(&self.wanted).pop_front()
    }
}

/// The worker: issues wanted certificates and renews due ones until the
/// relay shuts down. Returns at once when ACME is off.
pub(crate) async fn run(ctx: Arc<RelayCtx>) {
    let Some(enabled) = &ctx.acme.enabled else {
        return;
    };
    info!(directory = %enabled.config.directory, "ACME on");
    let mut worker = Worker {
        account: None,
        retries: HashMap::new(),
        tokens: RATE_BURST,
        refilled: Instant::now(),
    };
    loop {
        let now = Instant::now();
        worker.refill(now);
        let Some(name) = worker.next_due(&ctx, enabled, now) else {
            let wake_at = worker.next_wake(&ctx, enabled, now);
            tokio::select! {
                _ = ctx.token.cancelled() => return,
                _ = ctx.acme.wake.notified() => {}
                _ = tokio::time::sleep_until(wake_at) => {}
            }
            continue;
        };
        if worker.tokens == 0 {
            let wait = RATE_REFILL.saturating_sub(now - worker.refilled);
            debug!(
                name,
                ?wait,
                "ACME rate limit: waiting for the next order slot"
            );
            // The name waits its turn at the front of the retries.
            worker.retries.entry(name).or_insert_with(Retry::new).due = now + wait;
            continue;
        }
        worker.tokens -= 1;
        let span = info_span!("acme", name = %name);
        tokio::select! {
            _ = ctx.token.cancelled() => return,
            _ = worker.process(&ctx, enabled, &name).instrument(span) => {}
        }
    }
}

/// The worker's own state.
struct Worker {
    /// The CA account, once loaded or created.
    account: Option<Account>,
    /// Names whose last attempt failed (or that wait for an order slot),
    /// with when to try next. Bounded: names enter from the bounded queue
    /// or from served certificates, and leave when issued or unclaimed.
    retries: HashMap<String, Retry>,
    /// Orders that may be placed now (the token bucket).
    tokens: u32,
    /// When the bucket last gained a token.
    refilled: Instant,
}

/// A name's retry schedule.
struct Retry {
    backoff: Backoff,
    due: Instant,
}

impl Retry {
    fn new() -> Retry {
        Retry {
            backoff: Backoff::new(RETRY_FIRST, RETRY_MAX),
            due: Instant::now(),
        }
    }
}

impl Worker {
    fn refill(&mut self, now: Instant) {
        while self.tokens < RATE_BURST && now - self.refilled >= RATE_REFILL {
            self.tokens += 1;
            self.refilled += RATE_REFILL;
        }
        if self.tokens == RATE_BURST {
            self.refilled = now;
        }
    }

    /// The next name to order now: a wanted one, a due retry, or a due
    /// renewal; names a valid certificate covers or no connector claims
    /// any more are dropped on the way.
    fn next_due(&mut self, ctx: &RelayCtx, enabled: &Enabled, now: Instant) -> Option<String> {
        let renew_before = enabled.config.renew_before;
        while let Some(name) = ctx.acme.pop_wanted() {
            if self.retries.contains_key(&name) {
                continue;
            }
            if covered(&ctx.certs, &name, renew_before) {
                debug!(name, "a valid certificate covers this name; no ACME order");
                continue;
            }
            return Some(name);
        }
        let due = self
            .retries
            .iter()
            .filter(|(_, retry)| retry.due <= now)
            .map(|(name, _)| name.clone())
            .next();
        if let Some(name) = due {
            if claimed(ctx, &name) && !covered(&ctx.certs, &name, renew_before) {
                return Some(name);
            }
            debug!(name, "no longer claimed or covered now; retries stop");
            self.retries.remove(&name);
            return None;
        }
        let unix = unix_now();
        ctx.certs
            .names()
            .into_iter()
            .filter(|(name, source, not_after)| {
                *source == CertSource::Acme
                    && renewal_due(*not_after, renew_before) <= unix
                    && !self.retries.contains_key(name)
                    && claimed(ctx, name)
            })
            .map(|(name, _, _)| name)
            .next()
    }

    /// When to look again with nothing due now: the next retry or renewal,
    /// at most [`RENEW_CHECK_MAX`] away.
    fn next_wake(&self, ctx: &RelayCtx, enabled: &Enabled, now: Instant) -> Instant {
        let mut wake = now + RENEW_CHECK_MAX;
        for retry in self.retries.values() {
            wake = wake.min(retry.due);
        }
        let unix = unix_now();
        for (name, source, not_after) in ctx.certs.names() {
            if source != CertSource::Acme || self.retries.contains_key(&name) {
                continue;
            }
            let due = renewal_due(not_after, enabled.config.renew_before);
            if due > unix {
                let wait = Duration::from_secs(u64::try_from(due - unix).unwrap_or(u64::MAX));
                wake = wake.min(now + wait);
            }
        }
        wake
    }

    /// One issuance for `name`: on success the certificate is stored and
    /// served; on failure the CA's reason is logged and a retry scheduled.
    async fn process(&mut self, ctx: &RelayCtx, enabled: &Enabled, name: &str) {
        let res = self.issue(ctx, enabled, name).await;
        match res {
            Ok(issued) => {
                self.retries.remove(name);
                if renewal_due(issued.not_after, enabled.config.renew_before) <= unix_now() {
                    warn!(
                        not_after = issued.not_after,
                        "the CA's certificate lives shorter than --acme-renew-before: it is due \
                         for renewal at once (bounded by the rate limit); lower --acme-renew-before"
                    );
                }
                info!(
                    serial = %issued.serial,
                    not_after = issued.not_after,
                    "ACME certificate issued"
                );
                ctx.certs.insert(
                    name,
                    ServedCert {
                        key: issued.key,
                        source: CertSource::Acme,
                        not_after: issued.not_after,
                    },
                );
            }
            Err(err) => {
                let retry = self
                    .retries
                    .entry(name.to_string())
                    .or_insert_with(Retry::new);
                let delay = retry.backoff.next_delay();
                retry.due = Instant::now() + delay;
                let (problem_type, detail) = err.problem();
                warn!(
                    attempt = retry.backoff.attempt(),
                    retry_in = ?delay,
                    problem_type = %problem_type,
                    detail = %detail,
                    "ACME issuance failed: {err}"
                );
                if err.account_broken() {
                    self.account = None;
                }
            }
        }
    }

    async fn issue(
        &mut self,
        ctx: &RelayCtx,
        enabled: &Enabled,
        name: &str,
    ) -> Result<store::Issued, IssueError> {
        let account = self.account(enabled).await?;
        let kinds: &[ChallengeKind] = match enabled.config.challenge {
            AcmeChallenge::Http01 => &[ChallengeKind::Http01],
            AcmeChallenge::TlsAlpn01 => &[ChallengeKind::TlsAlpn01],
            AcmeChallenge::Auto if ctx.http_port.is_some() => {
                &[ChallengeKind::TlsAlpn01, ChallengeKind::Http01]
            }
            AcmeChallenge::Auto => &[ChallengeKind::TlsAlpn01],
        };
        let mut last = None;
        for kind in kinds {
            match issue::issue(&ctx.acme.challenges, &enabled.store, &account, name, *kind).await {
                Ok(issued) => return Ok(issued),
                Err(err) if err.challenge_failed() && kind != kinds.last().unwrap_or(kind) => {
                    let (problem_type, detail) = err.problem();
                    warn!(
                        challenge = kind.label(),
                        problem_type = %problem_type,
                        detail = %detail,
                        "ACME challenge failed; trying the next type"
                    );
                    last = Some(err);
                }
                Err(err) => return Err(err),
            }
        }
        Err(last.unwrap_or(IssueError::NoChallenge))
    }

    /// The account: cached, else loaded from the state directory, else
    /// created (and stored, 0600).
    async fn account(&mut self, enabled: &Enabled) -> Result<Account, IssueError> {
        if let Some(account) = &self.account {
            return Ok(account.clone());
        }
        let directory = &enabled.config.directory;
        let builder = || Account::builder_with_http(Box::new(enabled.http.clone()));
        let account = match enabled.store.load_account(directory)? {
            Some(credentials) => {
                let account = builder()
                    .from_credentials(credentials)
                    .await
                    .map_err(IssueError::Directory)?;
                info!(account = account.id(), "ACME account loaded");
                account
            }
            None => {
                let contact = enabled.config.email.as_ref().map(|e| format!("mailto:{e}"));
                let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
                let new = NewAccount {
                    contact: &contacts,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                };
                let (account, credentials) = builder()
                    .create(&new, directory.clone(), None)
                    .await
                    .map_err(IssueError::Directory)?;
                enabled.store.save_account(directory, &credentials)?;
                info!(account = account.id(), "ACME account created");
                account
            }
        };
        self.account = Some(account.clone());
        Ok(account)
    }
}

/// Whether a served certificate covers `name` and is not due for renewal
/// (a file certificate: not expired).
fn covered(certs: &CertStore, name: &str, renew_before: Duration) -> bool {
    let Some(cert) = certs.get(name) else {
        return false;
    };
    let unix = unix_now();
    match cert.source {
        CertSource::File => cert.not_after > unix,
        CertSource::Acme => renewal_due(cert.not_after, renew_before) > unix,
    }
}

/// Whether some connector serves `name` as an http kite right now: the
/// worker orders only for those.
fn claimed(ctx: &RelayCtx, name: &str) -> bool {
    matches!(
        ctx.registry.lookup_name(KiteProto::Http, name),
        Lookup::Found(_)
    )
}

/// When a certificate expiring at `not_after` is due for renewal.
fn renewal_due(not_after: i64, renew_before: Duration) -> i64 {
    not_after.saturating_sub(i64::try_from(renew_before.as_secs()).unwrap_or(i64::MAX))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
