//! TLS configs for the link: the relay's server side, the connector's client
//! side with its two ways of trusting the relay, and hints for operators when
//! a handshake fails.

use std::error::Error;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::{
    AlertDescription, CertificateError, CommonState, DigitallySignedStruct, OtherError,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};

use super::cert::load_certificates;
use super::{CertInfo, ClientCa, Fingerprint, NodeIdentity, PkiError, RelayCert};

/// The ALPN protocol name of the link. Connectors offer it; the relay's link
/// server selects it and refuses clients that offer only other protocols.
/// After a handshake that chose it, the link's own record layer takes the
/// session over from rustls (`link::records`), with RFC 8446 key updates.
///
/// `kitepipe/2` (the record layer of earlier releases, whose key updates
/// used keys of its own making) is no longer offered nor accepted: such a
/// peer offers `kitepipe/1` too, and the two ends agree on that.
pub const ALPN_LINK: &[u8] = b"kitepipe/3";

/// The link protocol of kitepipe before its own record layer: the same link,
/// with rustls for the whole session. Still accepted from and offered to
/// older peers.
pub const ALPN_LINK_V1: &[u8] = b"kitepipe/1";

/// What connectors offer and the relay accepts, preferred first.
fn link_alpns() -> Vec<Vec<u8>> {
    vec![ALPN_LINK.to_vec(), ALPN_LINK_V1.to_vec()]
}

/// Whether `alpn` names one of the link's protocols.
pub(crate) fn is_link_alpn(alpn: &[u8]) -> bool {
    alpn == ALPN_LINK || alpn == ALPN_LINK_V1
}

/// How a connector decides that the TLS peer is its relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayTrust {
    /// Trust exactly the relay whose end-entity certificate has this
    /// fingerprint, like an SSH host key: names, issuer and validity dates
    /// are ignored, but the peer must still prove it holds the certificate's
    /// key in the TLS 1.3 handshake.
    Pinned(Fingerprint),
    /// Trust relays whose certificate chains to a root in this PEM file and
    /// names the host dialed (standard WebPKI verification).
    Ca(PathBuf),
}

impl fmt::Display for RelayTrust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RelayTrust::Pinned(pin) => write!(f, "pinned {pin}"),
            RelayTrust::Ca(path) => write!(f, "CA {}", path.display()),
        }
    }
}

/// Settings of the relay's link server beyond its certificate.
#[derive(Debug, Clone, Default)]
pub(crate) struct RelayTlsOptions {
    /// Whether connectors must present certificates.
    pub client_auth: ClientAuth,
}

/// Whether the relay asks connectors for client certificates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) enum ClientAuth {
    /// Connectors present no certificate; they authenticate inside the link
    /// with kite secrets.
    #[default]
    NotRequested,
    /// Every connector must present a certificate that chains to the client
    /// CA and is not revoked.
    Required(ClientCa),
    /// A connector may present a certificate (verified as for `Required`)
    /// or none, and then authenticates inside the link with kite secrets.
    Optional(ClientCa),
}

/// Settings of the connector's link client beyond how it trusts the relay.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConnectorTlsOptions {
    /// The certificate and key to present when the relay asks for one.
    pub identity: Option<NodeIdentity>,
}

/// The typed cause inside the rustls error raised when a pinned relay
/// presents a different certificate.
///
/// rustls errors do not expose their cause through `source()`; use
/// [`FingerprintMismatch::find`] to reach it.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
#[error("relay certificate fingerprint {presented} does not match the pinned {pinned}")]
pub struct FingerprintMismatch {
    /// The fingerprint of the certificate the peer presented.
    pub presented: Fingerprint,
    /// The fingerprint the connector was configured with.
    pub pinned: Fingerprint,
}

// rustls displays `CertificateError::Other` with `{:?}`, so this Debug is
// what operators read in "invalid peer certificate: ...": make it the message.
impl fmt::Debug for FingerprintMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FingerprintMismatch {
    /// Finds a fingerprint mismatch anywhere in `err`'s chain, including
    /// inside `io::Error` and rustls errors.
    pub fn find<'a>(err: &'a (dyn Error + 'static)) -> Option<&'a FingerprintMismatch> {
        let mut next = Some(err);
        while let Some(current) = next {
            if let Some(mismatch) = current.downcast_ref::<FingerprintMismatch>() {
                return Some(mismatch);
            }
            if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) =
                current.downcast_ref::<rustls::Error>()
            {
                return other.0.downcast_ref::<FingerprintMismatch>();
            }
            next = next_cause(current);
        }
        None
    }
}

/// Builds the relay's link server config with default options:
/// TLS 1.3 only, ALPN [`ALPN_LINK`], no client certificates.
pub fn relay_server_config(cert: &RelayCert) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    relay_server_config_with(cert, &RelayTlsOptions::default())
}

/// Builds the relay's link server config: TLS 1.3 only, ring provider,
/// ALPN [`ALPN_LINK`].
///
/// rustls completes a handshake with a client that offers no ALPN at all;
/// the link checks [`has_link_alpn`] after the handshake to refuse those.
pub(crate) fn relay_server_config_with(
    cert: &RelayCert,
    options: &RelayTlsOptions,
) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    let build_error = |source| PkiError::BuildTls { source };
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(build_error)?;
    let builder = match client_cert_verifier(&options.client_auth)? {
        None => builder.with_no_client_auth(),
        Some(verifier) => builder.with_client_cert_verifier(verifier),
    };
    let mut config = builder
        .with_single_cert(cert.chain().to_vec(), cert.key().clone_key())
        .map_err(build_error)?;
    config.alpn_protocols = link_alpns();
    // The link's record layer takes the session's keys over, and the
    // traffic secrets its key updates start from.
    config.enable_secret_extraction = true;
    config.key_log = Arc::new(crate::pki::keylog::LinkKeyLog);
    // Links are long-lived, so resumption saves little, and a full handshake
    // makes the relay prove its key on every reconnect. Without tickets the
    // server's handshake also ends when it reads the client's Finished,
    // instead of waiting for the client to read tickets.
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The verifier of connectors' certificates for `auth`, or `None` when the
/// relay asks for none.
///
/// It verifies the chain to the client CA (WebPKI rules: validity dates,
/// key usage for client authentication) and, when the CA came with a
/// revocation list, that the end-entity certificate is not in it. A
/// certificate from a CA without a list has no revocation status to check.
/// Refusals are logged with the certificate's name and serial.
pub(crate) fn client_cert_verifier(
    auth: &ClientAuth,
) -> Result<Option<Arc<dyn ClientCertVerifier>>, PkiError> {
    let (ca, mandatory) = match auth {
        ClientAuth::NotRequested => return Ok(None),
        ClientAuth::Required(ca) => (ca, true),
        ClientAuth::Optional(ca) => (ca, false),
    };
    let mut roots = rustls::RootCertStore::empty();
    for root in &ca.roots {
        roots
            .add(root.clone())
            .map_err(|source| PkiError::BadClientCa { source })?;
    }
    let mut builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .with_crls(ca.crls.iter().cloned())
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status();
    if !mandatory {
        builder = builder.allow_unauthenticated();
    }
    let inner = builder
        .build()
        .map_err(|source| PkiError::ClientVerifier { source })?;
    Ok(Some(Arc::new(ReportingVerifier { inner })))
}

/// Builds the connector's link client config with default
/// options (no client certificate).
pub fn connector_client_config(trust: &RelayTrust) -> Result<Arc<rustls::ClientConfig>, PkiError> {
    connector_client_config_with(trust, &ConnectorTlsOptions::default())
}

/// Builds the connector's link client config: TLS 1.3 only, ring provider,
/// ALPN [`ALPN_LINK`], the relay verified as `trust` says, and the
/// connector's certificate when `options` has one.
///
/// With [`RelayTrust::Ca`] this reads the CA file and fails if it holds no
/// certificate.
pub(crate) fn connector_client_config_with(
    trust: &RelayTrust,
    options: &ConnectorTlsOptions,
) -> Result<Arc<rustls::ClientConfig>, PkiError> {
    let build_error = |source| PkiError::BuildTls { source };
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(build_error)?;
    let builder = match trust {
        RelayTrust::Pinned(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                pin: *pin,
                algorithms: provider.signature_verification_algorithms,
            })),
        RelayTrust::Ca(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in load_certificates(path)? {
                roots
                    .add(cert)
                    .map_err(|source| PkiError::BadCaCertificate {
                        path: path.clone(),
                        source,
                    })?;
            }
            builder.with_root_certificates(roots)
        }
    };
    let mut config = match &options.identity {
        Some(identity) => builder
            .with_client_auth_cert(identity.chain().to_vec(), identity.key().clone_key())
            .map_err(build_error)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = link_alpns();
    config.enable_secret_extraction = true;
    config.key_log = Arc::new(crate::pki::keylog::LinkKeyLog);
    // Every link handshake is a full one: see relay_server_config_with.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Whether the completed handshake on `conn` negotiated a link protocol
/// ([`ALPN_LINK`] or [`ALPN_LINK_V1`]).
///
/// Pass `tls_stream.get_ref().1` (client or server side).
pub(crate) fn has_link_alpn(conn: &CommonState) -> bool {
    conn.alpn_protocol().is_some_and(is_link_alpn)
}

/// Finds the rustls error in `err`'s chain, looking inside `io::Error`s too
/// (tokio-rustls wraps handshake failures in them).
pub(crate) fn find_tls_error<'a>(err: &'a (dyn Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(err);
    while let Some(current) = next {
        if let Some(tls) = current.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        next = next_cause(current);
    }
    None
}

/// A one-line hint for the connector's operator about why a link's TLS
/// handshake (or the relay's verdict on this connector's certificate right
/// after it) failed, or `None` if `err` holds no TLS failure this knows
/// about.
pub(crate) fn describe_tls_error(err: &(dyn Error + 'static)) -> Option<String> {
    if FingerprintMismatch::find(err).is_some() {
        return Some(
            "the relay's certificate changed or this is not your relay: \
             check the fingerprint the relay printed at start"
                .to_string(),
        );
    }
    let hint = match find_tls_error(err)? {
        rustls::Error::InvalidCertificate(cert_err) => match cert_err {
            // BadSignature: the CA file holds a CA of the same name but
            // another key, e.g. one that was regenerated.
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                "relay certificate not signed by the CA in --ca FILE (or ca.pem in --identity DIR)"
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "relay certificate does not name the host dialed: dial a name it lists, \
                 or reissue it with that name"
            }
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => {
                "relay certificate is outside its validity period: check the clocks, or renew it"
            }
            // A connector's certificate (client authentication only) shown
            // by a peer that claims to be the relay.
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "relay certificate is not for server authentication: a relay needs one issued \
                 with `kitepipe ca issue NAME --role relay --san HOST`"
            }
            _ => return None,
        },
        // The alerts below are the relay's verdict on this connector's
        // certificate: a relay verifies nothing else.
        rustls::Error::AlertReceived(AlertDescription::CertificateRequired) => {
            "the relay requires a client certificate: connect with --identity DIR \
             (made by `kitepipe ca issue NAME`)"
        }
        rustls::Error::AlertReceived(AlertDescription::CertificateRevoked) => {
            "the relay's CA revoked this connector's certificate: \
             ask its operator for a new one (`kitepipe ca issue NAME`)"
        }
        rustls::Error::AlertReceived(AlertDescription::CertificateExpired) => {
            "the relay refused this connector's certificate as expired or not yet valid: \
             issue a new one, or check the clocks"
        }
        rustls::Error::AlertReceived(AlertDescription::UnknownCA) => {
            "the relay does not trust the CA that issued this connector's certificate: \
             use a certificate from the CA in the relay's --client-ca"
        }
        rustls::Error::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::DecryptError
            | AlertDescription::AccessDenied,
        ) => "the relay rejected this connector's certificate",
        rustls::Error::NoApplicationProtocol
        | rustls::Error::AlertReceived(AlertDescription::NoApplicationProtocol) => {
            "the peer does not speak kitepipe/1: wrong port, or incompatible versions"
        }
        rustls::Error::InvalidMessage(_) => {
            "the peer does not speak TLS: wrong port, or something in the way"
        }
        _ => return None,
    };
    Some(hint.to_string())
}

/// A one-line hint for the relay's operator about why a connector's link
/// handshake failed (mostly: why its certificate was refused), or `None`
/// if `err` holds no TLS failure this knows about.
pub(crate) fn describe_relay_tls_error(err: &(dyn Error + 'static)) -> Option<String> {
    let hint = match find_tls_error(err)? {
        rustls::Error::InvalidCertificate(cert_err) => match cert_err {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "connector certificate expired: issue a new one (`kitepipe ca issue NAME`)"
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "connector certificate not valid yet: check the clocks, or when it was issued for"
            }
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                "connector certificate not issued by the CA in --client-ca"
            }
            CertificateError::Revoked => {
                "connector certificate revoked (listed in the CA's revocation list)"
            }
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "connector certificate is not for client authentication (a relay's?): \
                 issue one with `kitepipe ca issue NAME`"
            }
            _ => return None,
        },
        rustls::Error::NoCertificatesPresented => {
            "the connector presented no certificate, and this relay requires one \
             (--client-ca without --domain secrets)"
        }
        rustls::Error::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateExpired
            | AlertDescription::DecryptError,
        ) => {
            "the connector rejected the relay's certificate: give the connector the fingerprint \
             the relay printed at start, or the CA that signed the relay's certificate"
        }
        rustls::Error::NoApplicationProtocol
        | rustls::Error::AlertReceived(AlertDescription::NoApplicationProtocol) => {
            "the peer does not speak kitepipe/1: wrong port, or incompatible versions"
        }
        rustls::Error::InvalidMessage(_) => {
            "the peer does not speak TLS: wrong port, or something in the way"
        }
        _ => return None,
    };
    Some(hint.to_string())
}

/// Wraps the WebPKI client verifier to log every refused certificate with
/// the name and serial it carries, so the relay's log says who was refused.
#[derive(Debug)]
struct ReportingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for ReportingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let res = self
            .inner
            .verify_client_cert(end_entity, intermediates, now);
        if let Err(err) = &res {
            let hint = describe_relay_tls_error(err).unwrap_or_default();
            match CertInfo::parse(end_entity) {
                Ok(info) => tracing::warn!(
                    identity = %info.name,
                    serial = %info.serial,
                    %err,
                    %hint,
                    "refused connector certificate"
                ),
                Err(_) => tracing::warn!(%err, %hint, "refused unparsable connector certificate"),
            }
        }
        res
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}

/// Accepts exactly the pinned end-entity certificate; see
/// [`RelayTrust::Pinned`].
#[derive(Debug)]
struct PinnedVerifier {
    pin: Fingerprint,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Like an SSH host key, the pin alone is the trust decision; names
        // and dates carry no meaning for a self-signed relay certificate.
        let presented = Fingerprint::of(end_entity);
        if presented == self.pin {
            return Ok(ServerCertVerified::assertion());
        }
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(FingerprintMismatch {
                presented,
                pinned: self.pin,
            })),
        )))
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The configs here enable TLS 1.3 only, so rustls never asks.
        Err(rustls::Error::General(
            "tls 1.2 is not supported on the link".to_string(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The ring provider, built per config so nothing depends on a process-wide
/// default.
/// ring, with the TLS 1.3 suites in the order the link prefers: AES-128-GCM
/// first. Its 10 rounds against AES-256's 14 make bulk links cheaper per
/// byte (the receiving end of a bulk link spends about a sixth of its CPU
/// in AES-GCM) at a security level TLS 1.3 mandates for every
/// implementation; AES-256-GCM and ChaCha20-Poly1305 remain accepted.
fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| match suite.suite() {
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
            _ => 2,
        });
    Arc::new(provider)
}

/// The next cause after `err`. `io::Error::source` skips the error it wraps
/// and returns that error's source, so look inside `io::Error` explicitly.
fn next_cause<'a>(err: &'a (dyn Error + 'static)) -> Option<&'a (dyn Error + 'static)> {
    if let Some(io_err) = err.downcast_ref::<io::Error>()
        && let Some(inner) = io_err.get_ref()
    {
        return Some(inner as &(dyn Error + 'static));
    }
    err.source()
}
