//! The certificate identity of a link's connector, as the registry keeps
//! it and `identity` judges it again on reload.

#[cfg(test)]
use std::time::Duration;
use std::time::SystemTime;

use rustls_pki_types::CertificateDer;

use crate::pki::{CertInfo, PkiError, Serial};

/// The certificate identity of a link's connector, taken from the
/// certificate chain it presented and the relay verified.
#[derive(Debug)]
pub(crate) struct LinkIdentity {
    /// Node name from the certificate (common name, else first DNS name),
    /// lowercase.
    pub(crate) name: String,
    /// Serial of the end-entity certificate.
    pub(crate) serial: Serial,
    /// End of the end-entity certificate's validity: the link is closed
    /// then (see `session`).
    pub(crate) not_after: SystemTime,
    /// The chain as presented, end-entity first; verified again on reload.
    pub(super) chain: Vec<CertificateDer<'static>>,
}

impl LinkIdentity {
    /// Reads the identity from a verified chain (end-entity first).
    pub(crate) fn from_chain(chain: &[CertificateDer<'_>]) -> Result<LinkIdentity, PkiError> {
        let end_entity = chain.first().ok_or(PkiError::EmptyChain)?;
        let info = CertInfo::parse(end_entity)?;
        Ok(LinkIdentity {
            // Rules and patterns are lowercase; so are names `ca issue` writes.
            name: info.name.to_ascii_lowercase(),
            serial: info.serial,
            not_after: info.not_after,
            chain: chain.iter().map(|cert| cert.clone().into_owned()).collect(),
        })
    }

    /// An identity with no certificate behind it, for registry tests.
    #[cfg(test)]
    pub(crate) fn for_tests(name: &str) -> LinkIdentity {
        LinkIdentity {
            name: name.to_string(),
            serial: Serial::from_bytes(&[1]),
            not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(4_102_444_800),
            chain: Vec::new(),
        }
    }
}
