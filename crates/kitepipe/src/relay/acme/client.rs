//! The HTTPS client instant-acme talks to the CA through: one connection
//! per request (an issuance makes a dozen), rustls on the `ring` provider
//! trusting the system's roots plus `--acme-ca-root`, every request under
//! [`REQUEST_TIMEOUT`] and every response body under [`MAX_RESPONSE_BODY`],
//! so a CA that hangs or answers a flood cannot stall or bloat the relay.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Request;
use hyper::header::{HOST, HeaderValue};
use hyper_util::rt::TokioIo;
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::warn;

/// The longest one request to the CA may take, connecting included. Let's
/// Encrypt answers in well under a second; 30 s rides out a slow path.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest response body accepted from the CA: a certificate chain is
/// a few KiB, a directory or order under one.
const MAX_RESPONSE_BODY: usize = 1024 * 1024;

/// Why the ACME client cannot be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    /// `--acme-ca-root` could not be read as a PEM certificate.
    #[error("--acme-ca-root {}: {why}", path.display())]
    CaRoot {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// An [`HttpClient`] for instant-acme; cheap to clone.
#[derive(Clone)]
pub(super) struct AcmeHttp {
    tls: TlsConnector,
}

impl AcmeHttp {
    /// A client trusting the system's roots and `extra_root`.
    pub(super) fn new(extra_root: Option<&Path>) -> Result<AcmeHttp, ClientError> {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        let (added, _ignored) = roots.add_parsable_certificates(native.certs);
        if let Some(path) = extra_root {
            let bad = |why: String| ClientError::CaRoot {
                path: path.to_path_buf(),
                why,
            };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|err| bad(err.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|err| bad(err.to_string()))?;
            if certs.is_empty() {
                return Err(bad("no certificate in the file".into()));
            }
            for cert in certs {
                roots.add(cert).map_err(|err| bad(err.to_string()))?;
            }
        } else if added == 0 {
            warn!("no system root certificates found: the ACME CA's HTTPS cannot be verified");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring's default provider supports TLS 1.2 and 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(AcmeHttp {
            tls: TlsConnector::from(Arc::new(config)),
        })
    }
}

impl HttpClient for AcmeHttp {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let tls = self.tls.clone();
        Box::pin(async move {
            match tokio::time::timeout(REQUEST_TIMEOUT, send(tls, req)).await {
                Ok(res) => res,
                Err(_) => Err(other(format!(
                    "no answer from the ACME server within {REQUEST_TIMEOUT:?}"
                ))),
            }
        })
    }
}

fn other(why: String) -> instant_acme::Error {
    instant_acme::Error::Other(why.into())
}

/// Sends `req` over a new TLS connection and reads the whole response.
async fn send(
    tls: TlsConnector,
    mut req: Request<BodyWrapper<Bytes>>,
) -> Result<BytesResponse, instant_acme::Error> {
    let uri = req.uri().clone();
    if uri.scheme_str() != Some("https") {
        return Err(other(format!("refusing a non-https ACME URL: {uri}")));
    }
    let host = uri
        .host()
        .ok_or_else(|| other(format!("ACME URL without a host: {uri}")))?;
    let port = uri.port_u16().unwrap_or(443);
    let bare_host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let server_name = ServerName::try_from(bare_host.clone())
        .map_err(|err| other(format!("ACME URL host {host}: {err}")))?;
    let tcp = TcpStream::connect((bare_host.as_str(), port))
        .await
        .map_err(|err| {
            other(format!(
                "cannot connect to the ACME server {host}:{port}: {err}"
            ))
        })?;
    let _ = tcp.set_nodelay(true);
    let stream = tls
        .connect(server_name, tcp)
        .await
        .map_err(|err| other(format!("TLS with the ACME server {host}:{port}: {err}")))?;
    // hyper's connection-level client sends the target as given and no
    // Host of its own: origin form and an explicit Host, as RFC 9112 asks.
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_string())
        .unwrap_or_default();
    if !req.headers().contains_key(HOST) {
        let value = HeaderValue::from_str(&authority)
            .map_err(|err| other(format!("ACME URL authority {authority}: {err}")))?;
        req.headers_mut().insert(HOST, value);
    }
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .parse()
        .map_err(|err| other(format!("ACME URL path: {err}")))?;
    *req.uri_mut() = path;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|err| other(format!("HTTP with the ACME server: {err}")))?;
    let exchange = async move {
        let rsp = sender
            .send_request(req)
            .await
            .map_err(|err| other(format!("HTTP with the ACME server: {err}")))?;
        let (parts, body) = rsp.into_parts();
        let body = Limited::new(body, MAX_RESPONSE_BODY)
            .collect()
            .await
            .map_err(|err| other(format!("ACME server's response body: {err}")))?
            .to_bytes();
        Ok::<_, instant_acme::Error>(hyper::Response::from_parts(parts, Full::new(body)))
    };
    tokio::pin!(exchange);
    tokio::pin!(conn);
    // The connection future drives the I/O the exchange waits on; it may
    // end cleanly right after the last byte, before the exchange notices.
    let rsp = tokio::select! {
        biased;
        res = &mut exchange => res?,
        res = &mut conn => {
            res.map_err(|err| other(format!("HTTP with the ACME server: {err}")))?;
            exchange.await?
        }
    };
    Ok(BytesResponse::from(rsp))
}
