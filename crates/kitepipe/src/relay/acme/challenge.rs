//! The challenges the relay answers itself, while one of its own orders
//! waits for the CA: HTTP-01 (RFC 8555 section 8.3) on the plain HTTP path
//! and TLS-ALPN-01 (RFC 8737) on the HTTPS listener.
//!
//! Both maps hold only what the relay's worker put there for a name it
//! ordered, are bounded by [`MAX_PENDING`], and lose the entry when the
//! order is decided (a [`Pending`] guard removes it on drop). A stranger
//! can read a pending key authorization (the CA must be able to, and it is
//! public by design) but can add nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use rcgen::{CertificateParams, CustomExtension, KeyPair};
use rustls::ServerConfig;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use crate::sync::lock;

/// The ALPN protocol of TLS-ALPN-01 (RFC 8737 section 6.2).
pub(crate) const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// The path prefix of HTTP-01 (RFC 8555 section 8.3).
const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

/// Pending challenges of each kind at most. The worker orders one name at
/// a time, each with one authorization, so one suffices; the bound keeps a
/// bug from growing the maps.
const MAX_PENDING: usize = 16;

/// How long the CA may take for a TLS-ALPN-01 handshake once it offered
/// `acme-tls/1`.
const TLS_ALPN_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Pending challenge answers.
#[derive(Default)]
pub(super) struct Challenges {
    /// HTTP-01: token -> (name, key authorization).
    http01: Mutex<HashMap<String, (String, String)>>,
    /// TLS-ALPN-01: name -> the server config presenting its challenge
    /// certificate.
    tls_alpn01: Mutex<HashMap<String, Arc<ServerConfig>>>,
}

/// A pending challenge answer, withdrawn when dropped.
pub(super) struct Pending<'a> {
    challenges: &'a Challenges,
    kind: Kind,
}

enum Kind {
    Http01(String),
    TlsAlpn01(String),
}

impl Challenges {
    /// Answers HTTP-01 for `token` on `name` with `key_authorization`
    /// until the guard is dropped; `None` when the map is full.
    pub(super) fn add_http01(
        &self,
        name: &str,
        token: &str,
        key_authorization: &str,
    ) -> Option<Pending<'_>> {
        let mut map = lock(&self.http01);
        if map.len() >= MAX_PENDING {
            return None;
        }
        map.insert(
            token.to_string(),
            (name.to_string(), key_authorization.to_string()),
        );
        Some(Pending {
            challenges: self,
            kind: Kind::Http01(token.to_string()),
        })
    }

    /// Answers TLS-ALPN-01 for `name` with a certificate carrying
    /// `digest` (SHA-256 of the key authorization) until the guard is
    /// dropped; `None` when the map is full.
    pub(super) fn add_tls_alpn01(
        &self,
        name: &str,
        digest: &[u8],
    ) -> Result<Option<Pending<'_>>, String> {
        let config = challenge_config(name, digest)?;
        let mut map = lock(&self.tls_alpn01);
        if map.len() >= MAX_PENDING && !map.contains_key(name) {
            return Ok(None);
        }
        map.insert(name.to_string(), Arc::new(config));
        Ok(Some(Pending {
            challenges: self,
            kind: Kind::TlsAlpn01(name.to_string()),
        }))
    }

    /// The HTTP-01 answer for a request of `target` with Host `host`, if
    /// the relay has a pending challenge of that token for that name.
    pub(super) fn http01(&self, host: &str, target: &str) -> Option<String> {
        let token = target.strip_prefix(HTTP01_PREFIX)?;
        let map = lock(&self.http01);
        let (name, key_authorization) = map.get(token)?;
        (name == host).then(|| key_authorization.clone())
    }

    /// Whether `name` has a pending TLS-ALPN-01 challenge.
    pub(super) fn has_tls_alpn01(&self, name: &str) -> bool {
        lock(&self.tls_alpn01).contains_key(&name.to_ascii_lowercase())
    }

    fn tls_alpn01(&self, name: &str) -> Option<Arc<ServerConfig>> {
        lock(&self.tls_alpn01).get(name).cloned()
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        match &self.kind {
            Kind::Http01(token) => {
                lock(&self.challenges.http01).remove(token);
            }
            Kind::TlsAlpn01(name) => {
                lock(&self.challenges.tls_alpn01).remove(name);
            }
        }
    }
}

/// Answers a ClientHello offering `acme-tls/1`: the challenge certificate
/// if `sni` has a pending TLS-ALPN-01 challenge, else nothing (the
/// connection is closed unanswered). `buf` holds the ClientHello.
pub(super) async fn serve_tls_alpn(
    challenges: &Challenges,
    sock: TcpStream,
    buf: BytesMut,
    sni: Option<&str>,
) {
    let Some(config) = sni.and_then(|name| challenges.tls_alpn01(&name.to_ascii_lowercase()))
    else {
        debug!(sni = ?sni, "acme-tls/1 without a pending challenge for that name; closing");
        return;
    };
    let (reader, writer) = sock.into_split();
    let replayed = tokio::io::join(
        tokio::io::AsyncReadExt::chain(std::io::Cursor::new(buf), reader),
        writer,
    );
    let handshake = TlsAcceptor::from(config).accept(replayed);
    match tokio::time::timeout(TLS_ALPN_HANDSHAKE_TIMEOUT, handshake).await {
        // RFC 8737 section 3: the CA closes once it has seen the
        // certificate; nothing is sent on the connection.
        Ok(Ok(mut tls)) => {
            debug!(sni = ?sni, "answered a TLS-ALPN-01 challenge");
            let _ = tls.shutdown().await;
        }
        Ok(Err(err)) => debug!(sni = ?sni, %err, "TLS-ALPN-01 handshake failed"),
        Err(_) => debug!(sni = ?sni, "TLS-ALPN-01 handshake too slow"),
    }
}

/// A server config presenting the self-signed challenge certificate for
/// `name` with the acmeIdentifier extension, negotiating only `acme-tls/1`.
fn challenge_config(name: &str, digest: &[u8]) -> Result<ServerConfig, String> {
    let key = KeyPair::generate().map_err(|err| err.to_string())?;
    let mut params = CertificateParams::new(vec![name.to_string()]).map_err(|e| e.to_string())?;
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key).map_err(|err| err.to_string())?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing =
        rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| e.to_string())?;
    let certified = CertifiedKey::new(vec![cert.der().clone()], signing);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // Not `with_single_cert`: it parses the certificate with webpki, which
    // refuses the critical acmeIdentifier extension RFC 8737 requires.
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| err.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http01_answers_only_a_pending_token_on_its_own_name() {
        let challenges = Challenges::default();
        let pending = challenges
            .add_http01("app.example.net", "tok123", "tok123.thumb")
            .unwrap();
        let answer = |host: &str, target: &str| challenges.http01(host, target);
        let path = "/.well-known/acme-challenge/tok123";
        assert_eq!(
            answer("app.example.net", path).as_deref(),
            Some("tok123.thumb")
        );
        let strangers = [
            ("other.example.net", path),
            ("app.example.net", "/.well-known/acme-challenge/tok12"),
            ("app.example.net", "/.well-known/acme-challenge/tok123/x"),
            ("app.example.net", "/.well-known/acme-challenge/"),
            ("app.example.net", "/tok123"),
            (
                "app.example.net",
                "http://app.example.net/.well-known/acme-challenge/tok123",
            ),
        ];
        for (host, target) in strangers {
            assert_eq!(answer(host, target), None, "{host} {target}");
        }
        drop(pending);
        assert_eq!(answer("app.example.net", path), None, "withdrawn on drop");
    }

    #[test]
    fn the_maps_are_bounded() {
        let challenges = Challenges::default();
        let guards: Vec<_> = (0..MAX_PENDING)
            .map(|i| {
                challenges
                    .add_http01("a.example.net", &format!("t{i}"), "k")
                    .unwrap()
            })
            .collect();
        assert!(
            challenges
                .add_http01("a.example.net", "one-more", "k")
                .is_none()
        );
        drop(guards);
        assert!(
            challenges
                .add_http01("a.example.net", "one-more", "k")
                .is_some()
        );
        let alpn: Vec<_> = (0..MAX_PENDING)
            .map(|i| {
                challenges
                    .add_tls_alpn01(&format!("n{i}.example.net"), &[0; 32])
                    .unwrap()
                    .unwrap()
            })
            .collect();
        assert!(
            challenges
                .add_tls_alpn01("more.example.net", &[0; 32])
                .unwrap()
                .is_none()
        );
        drop(alpn);
        assert!(challenges.tls_alpn01("n0.example.net").is_none());
    }
}
