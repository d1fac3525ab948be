//! An http kite's HTTP-level rules at the relay ([`HttpRules`], built from
//! the claim's [`HttpPolicy`]): basic auth, requests per second per visitor
//! address, connections per kite, header edits, `X-Forwarded-Host`, the
//! redirect to HTTPS and the backend protocol. Both visitor paths (the
//! strict HTTP/1 one in `http`, HTTP/2 in `h2`) ask it the same questions.
//!
//! STUB (foundation commit): the API is fixed, the bodies admit
//! everything; the policy work fills them in.

use std::net::IpAddr;

use kitepipe_proto::http_policy::{BackendProtocol, HeaderRules, HttpPolicy};

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
pub(crate) struct ConnPermit(());

/// One kite's rules on one link, with their running state (rate buckets,
/// open connections), shared by every visitor routed there.
#[derive(Debug, Default)]
pub(crate) struct HttpRules {
    policy: HttpPolicy,
}

impl HttpRules {
    /// Checks and bounds the claim's rules (a connector is not trusted to
    /// send well-formed or short ones); the error names what is wrong.
    pub(crate) fn new(policy: HttpPolicy) -> Result<HttpRules, String> {
        Ok(HttpRules { policy })
    }

    /// A new visitor connection to the kite: a permit to hold while it is
    /// open, or a refusal (max_connections).
    pub(crate) fn connection(&self) -> Result<ConnPermit, Refusal> {
        Ok(ConnPermit(()))
    }

    /// One request from `peer` with its `Authorization` header value, if
    /// any: admitted, or refused (basic auth, rate limit). May take a few
    /// milliseconds (a password hash), off the async threads.
    pub(crate) async fn request(
        &self,
        peer: IpAddr,
        authorization: Option<&[u8]>,
    ) -> Result<(), Refusal> {
        let _ = (peer, authorization);
        Ok(())
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
