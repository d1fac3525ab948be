//! One ACME order for one name: place it, answer its challenge, wait for
//! the CA's verdict, finalize with a fresh key's CSR, fetch and store the
//! chain.

use std::time::Duration;

use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewOrder, OrderStatus, Problem,
    RetryPolicy,
};
use rcgen::{CertificateParams, DistinguishedName, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tracing::{debug, info};

use super::challenge::Challenges;
use super::store::{Issued, Store, StoreError};

/// How long the CA may take to validate a challenge. Let's Encrypt takes
/// seconds; a minute rides out its retries from several vantage points.
const VALIDATION_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the CA may take to issue once the order is finalized.
const ISSUANCE_TIMEOUT: Duration = Duration::from_secs(60);

/// The challenge types the relay answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ChallengeKind {
    /// HTTP-01, on the plain HTTP listener.
    Http01,
    /// TLS-ALPN-01, on the HTTPS listener.
    TlsAlpn01,
}

impl ChallengeKind {
    /// The name RFC 8555 / 8737 give the type.
    pub(super) fn label(self) -> &'static str {
        match self {
            ChallengeKind::Http01 => "http-01",
            ChallengeKind::TlsAlpn01 => "tls-alpn-01",
        }
    }

    fn acme_type(self) -> ChallengeType {
        match self {
            ChallengeKind::Http01 => ChallengeType::Http01,
            ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
        }
    }
}

/// Why an issuance failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum IssueError {
    /// The CA's directory could not be fetched or the account not set up.
    #[error("ACME directory or account: {0}")]
    Directory(#[source] instant_acme::Error),
    /// A request to the CA failed or was refused.
    #[error("ACME request: {0}")]
    Acme(#[from] instant_acme::Error),
    /// The CA did not validate the challenge.
    #[error("the CA rejected the {challenge} challenge")]
    Rejected {
        /// The challenge type tried.
        challenge: &'static str,
        /// The CA's problem document, if it gave one.
        problem: Option<Problem>,
    },
    /// The CA offered no challenge of the type tried.
    #[error("the CA offered no {0} challenge")]
    NotOffered(&'static str),
    /// No challenge type could be tried.
    #[error("no ACME challenge type could be tried")]
    NoChallenge,
    /// The authorization is in a state no challenge can fix.
    #[error("the authorization is {0}")]
    Authorization(String),
    /// Another challenge for this name is pending (never expected: one
    /// order at a time).
    #[error("too many pending challenges")]
    Busy,
    /// The challenge answer could not be prepared.
    #[error("cannot make the challenge certificate: {0}")]
    ChallengeCert(String),
    /// The CA's chain or the key is unusable.
    #[error("unusable certificate from the CA: {0}")]
    BadCertificate(String),
    /// The certificate or account could not be stored.
    #[error("cannot store: {0}")]
    Store(#[from] StoreError),
}

impl IssueError {
    /// The CA's problem type and detail, for the log (escaped: they come
    /// from the CA); `-` when the failure was not the CA's answer.
    pub(super) fn problem(&self) -> (String, String) {
        let problem = match self {
            IssueError::Directory(instant_acme::Error::Api(p))
            | IssueError::Acme(instant_acme::Error::Api(p))
            | IssueError::Rejected {
                problem: Some(p), ..
            } => Some(p),
            _ => None,
        };
        let Some(problem) = problem else {
            let detail = match self {
                IssueError::Directory(err) | IssueError::Acme(err) => clean(&err.to_string()),
                other => clean(&other.to_string()),
            };
            return ("-".into(), detail);
        };
        let mut detail = problem.detail.clone().unwrap_or_default();
        for sub in &problem.subproblems {
            detail.push_str(&format!(
                "; {}: {}",
                sub.r#type.as_deref().unwrap_or("-"),
                sub.detail.as_deref().unwrap_or("-")
            ));
        }
        (
            clean(problem.r#type.as_deref().unwrap_or("-")),
            clean(&detail),
        )
    }

    /// Whether the challenge itself failed (another type may succeed).
    pub(super) fn challenge_failed(&self) -> bool {
        matches!(
            self,
            IssueError::Rejected { .. } | IssueError::NotOffered(_)
        )
    }

    /// Whether the account should be set up again before the next try
    /// (the directory was unreachable, or the CA no longer knows it).
    pub(super) fn account_broken(&self) -> bool {
        match self {
            IssueError::Directory(_) => true,
            IssueError::Acme(instant_acme::Error::Api(p)) => p.r#type.as_deref().is_some_and(|t| {
                t.ends_with(":accountDoesNotExist") || t.ends_with(":unauthorized")
            }),
            _ => false,
        }
    }
}

/// A peer's text made safe for a log line: control characters escaped,
/// at most 500 characters.
fn clean(text: &str) -> String {
    let short: String = text.chars().take(500).collect();
    short.escape_debug().to_string()
}

/// Orders a certificate for `name` answering `kind`, then stores it.
pub(super) async fn issue(
    challenges: &Challenges,
    store: &Store,
    account: &Account,
    name: &str,
    kind: ChallengeKind,
) -> Result<Issued, IssueError> {
    let identifiers = [Identifier::Dns(name.to_string())];
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
    info!(
        challenge = kind.label(),
        order = order.url(),
        "ACME order placed"
    );
    let mut pending = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz?;
        match authz.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => return Err(IssueError::Authorization(format!("{other:?}"))),
        }
        let mut challenge = authz
            .challenge(kind.acme_type())
            .ok_or(IssueError::NotOffered(kind.label()))?;
        let key_authorization = challenge.key_authorization();
        let guard = match kind {
            ChallengeKind::Http01 => {
                challenges.add_http01(name, &challenge.token, key_authorization.as_str())
            }
            ChallengeKind::TlsAlpn01 => challenges
                .add_tls_alpn01(name, key_authorization.digest().as_ref())
                .map_err(IssueError::ChallengeCert)?,
        };
        pending.push(guard.ok_or(IssueError::Busy)?);
        challenge.set_ready().await?;
    }
    let retries = RetryPolicy::new().timeout(VALIDATION_TIMEOUT);
    let status = order.poll_ready(&retries).await;
    // Decided either way: the answers are withdrawn.
    drop(pending);
    match status {
        Ok(OrderStatus::Ready) => {}
        Ok(_) | Err(instant_acme::Error::Api(_)) => {
            let mut problem = match status {
                Err(instant_acme::Error::Api(p)) => Some(p),
                _ => None,
            };
            // The challenge's own error says why (the order's is generic).
            let mut authorizations = order.authorizations();
            while let Some(Ok(mut authz)) = authorizations.next().await {
                if let Ok(state) = authz.refresh().await
                    && let Some(found) = state.challenges.iter().find_map(|c| c.error.clone())
                {
                    problem = Some(found);
                }
            }
            return Err(IssueError::Rejected {
                challenge: kind.label(),
                problem,
            });
        }
        Err(err) => return Err(err.into()),
    }
    debug!("challenge validated; finalizing");
    let key = KeyPair::generate().map_err(|e| IssueError::BadCertificate(e.to_string()))?;
    let mut params = CertificateParams::new(vec![name.to_string()])
        .map_err(|e| IssueError::BadCertificate(e.to_string()))?;
    params.distinguished_name = DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .map_err(|e| IssueError::BadCertificate(e.to_string()))?;
    order.finalize_csr(csr.der()).await?;
    let chain_pem = order
        .poll_certificate(&RetryPolicy::new().timeout(ISSUANCE_TIMEOUT))
        .await?;
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IssueError::BadCertificate(e.to_string()))?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let issued = super::store::certified(key_der, chain).map_err(IssueError::BadCertificate)?;
    store.save_cert(name, &key.serialize_pem(), &chain_pem)?;
    Ok(issued)
}
