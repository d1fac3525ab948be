use std::error::Error;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls::{AlertDescription, CertificateError};
use rustls_pki_types::{PrivatePkcs8KeyDer, ServerName};
use tokio::io::DuplexStream;

use super::*;

type TestResult = Result<(), Box<dyn Error + Send + Sync>>;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        let nonce = random_nonce();
        let suffix = format!(
            "{:02x}{:02x}{:02x}{:02x}",
            nonce[0], nonce[1], nonce[2], nonce[3]
        );
        let path = std::env::temp_dir().join(format!(
            "kitepipe-pki-{test}-{}-{suffix}",
            std::process::id()
        ));
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A CA and a relay certificate it signed for `names`.
struct TestCa {
    pem: String,
    relay: RelayCert,
}

impl TestCa {
    fn new(ca_name: &str, names: &[&str]) -> Result<TestCa, rcgen::Error> {
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.distinguished_name = rcgen::DistinguishedName::new();
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, ca_name);
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);

        let relay_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
        let relay_cert = rcgen::CertificateParams::new(names)?.signed_by(&relay_key, &issuer)?;
        let relay = RelayCert::new(
            vec![relay_cert.der().clone()],
            PrivatePkcs8KeyDer::from(relay_key.serialize_der()).into(),
        )
        .map_err(|_| rcgen::Error::CouldNotParseCertificate)?;
        Ok(TestCa {
            pem: ca_cert.pem(),
            relay,
        })
    }
}

type Handshake = (
    io::Result<tokio_rustls::server::TlsStream<DuplexStream>>,
    io::Result<tokio_rustls::client::TlsStream<DuplexStream>>,
);

/// Runs both ends of a handshake over a tiny in-memory pipe.
async fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    server_name: &str,
) -> Result<Handshake, Box<dyn Error + Send + Sync>> {
    let (client_io, server_io) = tokio::io::duplex(64);
    let server_name = ServerName::try_from(server_name.to_string())?;
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    let connector = tokio_rustls::TlsConnector::from(client);
    Ok(tokio::join!(
        acceptor.accept(server_io),
        connector.connect(server_name, client_io)
    ))
}

fn mode_of(path: &Path) -> io::Result<u32> {
    use std::os::unix::fs::PermissionsExt;
    Ok(fs::metadata(path)?.permissions().mode() & 0o777)
}

#[test]
fn load_or_create_keeps_the_fingerprint() -> TestResult {
    let dir = TempDir::new("create");
    let state_dir = dir.path().join("nested").join("state");

    let (first, created) = RelayCert::load_or_create(&state_dir, &[])?;
    assert!(created);
    assert_eq!(mode_of(&state_dir.join("relay-key.pem"))?, 0o600);

    let (second, created) = RelayCert::load_or_create(&state_dir, &[])?;
    assert!(!created);
    assert_eq!(first.fingerprint(), second.fingerprint());
    assert_eq!(first.chain(), second.chain());
    assert_eq!(mode_of(&state_dir.join("relay-key.pem"))?, 0o600);
    // No temp files are left behind.
    assert_eq!(fs::read_dir(&state_dir)?.count(), 2);
    Ok(())
}

#[test]
fn load_or_create_refuses_a_lone_file() -> TestResult {
    let dir = TempDir::new("lone");
    RelayCert::load_or_create(dir.path(), &[])?;
    fs::remove_file(dir.path().join("relay-key.pem"))?;

    let err = RelayCert::load_or_create(dir.path(), &[])
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, PkiError::IncompleteState { .. }), "{err:?}");
    Ok(())
}

#[test]
fn load_or_create_rejects_a_bad_name() {
    let dir = TempDir::new("badname");
    let names = vec!["not a host name".to_string()];
    let err = RelayCert::load_or_create(dir.path(), &names)
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, PkiError::BadName { .. }), "{err:?}");
}

#[test]
fn load_reports_what_is_missing() -> TestResult {
    let dir = TempDir::new("load");
    fs::create_dir_all(dir.path())?;
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    let garbage_path = dir.path().join("garbage.pem");
    fs::write(&garbage_path, "no PEM here\n")?;
    let (relay, _) = RelayCert::load_or_create(&dir.path().join("state"), &[])?;
    fs::copy(dir.path().join("state/relay-cert.pem"), &cert_path)?;

    let torn_path = dir.path().join("torn.pem");
    fs::write(&torn_path, "-----BEGIN CERTIFICATE-----\nAAAA\n")?;

    type ErrorCheck = fn(&PkiError) -> bool;
    let cases: [(&Path, &Path, ErrorCheck); 5] = [
        (&dir.path().join("absent.pem"), &key_path, |err| {
            matches!(err, PkiError::Read { .. })
        }),
        (&garbage_path, &key_path, |err| {
            matches!(err, PkiError::NoCertificate { .. })
        }),
        (&torn_path, &key_path, |err| {
            matches!(err, PkiError::ParsePem { .. })
        }),
        (&cert_path, &garbage_path, |err| {
            matches!(err, PkiError::NoPrivateKey { .. })
        }),
        (&cert_path, &cert_path, |err| {
            matches!(err, PkiError::NoPrivateKey { .. })
        }),
    ];
    for (cert, key, expected) in cases {
        let err = RelayCert::load(cert, key).map(|_| ()).unwrap_err();
        assert!(expected(&err), "{cert:?} {key:?}: {err:?}");
    }
    assert_eq!(
        RelayCert::load(&cert_path, &dir.path().join("state/relay-key.pem"))?.fingerprint(),
        relay.fingerprint()
    );
    Ok(())
}

#[test]
fn generated_certificate_has_the_names() -> TestResult {
    let dir = TempDir::new("names");
    let names = vec!["relay.test".to_string(), "192.0.2.7".to_string()];
    let (relay, _) = RelayCert::load_or_create(dir.path(), &names)?;
    let der = relay.chain()[0].as_ref();
    let contains = |needle: &[u8]| der.windows(needle.len()).any(|window| window == needle);
    // A dNSName SAN is tag 0x82, an iPAddress SAN tag 0x87, each with a short length.
    assert!(contains(b"\x82\x0arelay.test"));
    assert!(contains(&[0x87, 4, 192, 0, 2, 7]));

    let dir = TempDir::new("defaults");
    let (relay, _) = RelayCert::load_or_create(dir.path(), &[])?;
    let der = relay.chain()[0].as_ref();
    let contains = |needle: &[u8]| der.windows(needle.len()).any(|window| window == needle);
    assert!(contains(b"\x82\x09localhost"));
    assert!(contains(&[0x87, 4, 127, 0, 0, 1]));
    Ok(())
}

#[test]
fn fingerprint_text_round_trips() -> TestResult {
    let bytes: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(5));
    let fingerprint = Fingerprint::from_bytes(bytes);
    let canonical = fingerprint.to_string();
    assert_eq!(canonical.len(), "SHA256:".len() + 64);
    assert!(canonical.starts_with("SHA256:"));
    let hex = &canonical["SHA256:".len()..];
    let colons = bytes
        .iter()
        .map(|byte| format!("{byte:02X}"))
        .collect::<Vec<_>>()
        .join(":");

    let accepted = [
        canonical.clone(),
        canonical.to_uppercase(),
        hex.to_string(),
        hex.to_uppercase(),
        format!("sha256:{hex}"),
        colons.clone(),
        colons.to_lowercase(),
        format!("SHA256:{colons}"),
        format!("sha256 Fingerprint={colons}"),
        format!("  {canonical}\n"),
    ];
    for text in accepted {
        assert_eq!(text.parse::<Fingerprint>()?, fingerprint, "{text:?}");
    }

    let rejected = [
        String::new(),
        "SHA256:".to_string(),
        hex[..62].to_string(),
        format!("{hex}00"),
        format!("SHA1:{}", &hex[..40]),
        hex.replacen(&hex[..1], "g", 1),
        colons[..colons.len() - 3].to_string(),
        colons.replacen(':', "", 1),
        format!("{colons}:"),
        // SSH prints base64 digests, which are not accepted.
        "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s".to_string(),
    ];
    for text in rejected {
        let err = text.parse::<Fingerprint>().unwrap_err();
        assert!(
            matches!(err, PkiError::BadFingerprint { .. }),
            "{text:?}: {err:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn pinned_handshake_succeeds_with_the_right_fingerprint() -> TestResult {
    let dir = TempDir::new("pinned");
    let (relay, _) = RelayCert::load_or_create(dir.path(), &[])?;
    let server = relay_server_config(&relay)?;
    let client = connector_client_config(&RelayTrust::Pinned(relay.fingerprint()))?;

    // The pin ignores names: any server name works.
    let (server_res, client_res) = handshake(server, client, "anything.invalid").await?;
    let (server_stream, client_stream) = (server_res?, client_res?);

    assert_eq!(client_stream.get_ref().1.alpn_protocol(), Some(ALPN_LINK));
    assert!(has_link_alpn(server_stream.get_ref().1));
    assert_eq!(
        client_stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let client_exporter = link_exporter(client_stream.get_ref().1)?;
    let server_exporter = link_exporter(server_stream.get_ref().1)?;
    assert_eq!(client_exporter, server_exporter);
    assert_ne!(client_exporter, [0u8; 32]);
    Ok(())
}

#[tokio::test]
async fn pinned_handshake_fails_with_a_wrong_fingerprint() -> TestResult {
    let dir = TempDir::new("mismatch");
    let (relay, _) = RelayCert::load_or_create(dir.path(), &[])?;
    let wrong = Fingerprint::from_bytes([0xab; 32]);
    let server = relay_server_config(&relay)?;
    let client = connector_client_config(&RelayTrust::Pinned(wrong))?;

    let (server_res, client_res) = handshake(server, client, "localhost").await?;
    let client_err = client_res.map(|_| ()).unwrap_err();
    let expected = format!(
        "relay certificate fingerprint {} does not match the pinned {wrong}",
        relay.fingerprint()
    );
    assert!(client_err.to_string().contains(&expected), "{client_err}");
    let mismatch = FingerprintMismatch::find(&client_err).expect("typed mismatch in chain");
    assert_eq!(mismatch.presented, relay.fingerprint());
    assert_eq!(mismatch.pinned, wrong);
    let hint = describe_tls_error(&client_err).expect("a hint for a mismatch");
    assert!(hint.contains("check the fingerprint"), "{hint}");

    let server_err = server_res.map(|_| ()).unwrap_err();
    assert!(
        matches!(
            find_tls_error(&server_err),
            Some(rustls::Error::AlertReceived(
                AlertDescription::CertificateUnknown
            ))
        ),
        "{server_err:?}"
    );
    assert!(describe_relay_tls_error(&server_err).is_some());
    Ok(())
}

#[tokio::test]
async fn client_without_alpn_is_visible_after_the_handshake() -> TestResult {
    let dir = TempDir::new("alpn");
    let (relay, _) = RelayCert::load_or_create(dir.path(), &[])?;
    let server = relay_server_config(&relay)?;
    let mut client = (*connector_client_config(&RelayTrust::Pinned(relay.fingerprint()))?).clone();
    client.alpn_protocols.clear();

    let (server_res, _) = handshake(server.clone(), Arc::new(client.clone()), "localhost").await?;
    assert!(!has_link_alpn(server_res?.get_ref().1));

    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    let (server_res, client_res) = handshake(server, Arc::new(client), "localhost").await?;
    let server_err = server_res.map(|_| ()).unwrap_err();
    assert!(
        matches!(
            find_tls_error(&server_err),
            Some(rustls::Error::NoApplicationProtocol)
        ),
        "{server_err:?}"
    );
    // The client fails too, but whether the server's last-gasp alert gets
    // through before it hangs up depends on tokio-rustls and tokio's
    // cooperative budget, so only the failure itself is asserted.
    assert!(client_res.is_err());
    Ok(())
}

#[tokio::test]
async fn ca_handshake_checks_issuer_and_name() -> TestResult {
    let dir = TempDir::new("ca");
    fs::create_dir_all(dir.path())?;
    let ca = TestCa::new("test CA", &["relay.test"])?;
    let other_ca = TestCa::new("other test CA", &["relay.test"])?;
    let ca_path = dir.path().join("ca.pem");
    let other_ca_path = dir.path().join("other-ca.pem");
    fs::write(&ca_path, &ca.pem)?;
    fs::write(&other_ca_path, &other_ca.pem)?;
    let server = relay_server_config(&ca.relay)?;

    let client = connector_client_config(&RelayTrust::Ca(ca_path.clone()))?;
    let (server_res, client_res) = handshake(server.clone(), client.clone(), "relay.test").await?;
    let client_stream = client_res?;
    assert_eq!(client_stream.get_ref().1.alpn_protocol(), Some(ALPN_LINK));
    server_res?;

    let (_, client_res) = handshake(server.clone(), client, "other.test").await?;
    let err = client_res.map(|_| ()).unwrap_err();
    assert!(
        matches!(
            find_tls_error(&err),
            Some(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForNameContext { .. }
            ))
        ),
        "{err:?}"
    );
    assert!(describe_tls_error(&err).is_some());

    let other_client = connector_client_config(&RelayTrust::Ca(other_ca_path))?;
    let (_, client_res) = handshake(server, other_client, "relay.test").await?;
    let err = client_res.map(|_| ()).unwrap_err();
    assert!(
        matches!(
            find_tls_error(&err),
            Some(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))
        ),
        "{err:?}"
    );
    assert_eq!(
        describe_tls_error(&err).as_deref(),
        Some("relay certificate not signed by the CA in --ca FILE (or ca.pem in --identity DIR)")
    );
    Ok(())
}

#[test]
fn ca_file_without_certificates_is_refused() -> TestResult {
    let dir = TempDir::new("emptyca");
    fs::create_dir_all(dir.path())?;
    let path = dir.path().join("ca.pem");
    fs::write(&path, "")?;
    let err = connector_client_config(&RelayTrust::Ca(path))
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, PkiError::NoCertificate { .. }), "{err:?}");
    Ok(())
}

#[test]
fn kite_proof_binds_every_field() {
    let secret = Secret::new("correct horse");
    let exporter = [1u8; 32];
    let server_nonce = random_nonce();
    let client_nonce = random_nonce();
    assert_ne!(server_nonce, client_nonce);
    let input = ProofInput {
        tls_exporter: &exporter,
        server_nonce: &server_nonce,
        client_nonce: &client_nonce,
        protocol: "http",
        name: "blog.example.com",
    };
    let proof = kite_proof(&secret, &input);
    assert!(verify_kite_proof(&secret, &input, &proof));
    assert!(!verify_kite_proof(
        &Secret::new("correct horsf"),
        &input,
        &proof
    ));
    assert!(!verify_kite_proof(&secret, &input, &proof[..31]));

    let other_bytes = [2u8; 32];
    let changed = [
        ProofInput {
            tls_exporter: &other_bytes,
            ..input
        },
        ProofInput {
            server_nonce: &other_bytes,
            ..input
        },
        ProofInput {
            client_nonce: &other_bytes,
            ..input
        },
        ProofInput {
            protocol: "raw",
            ..input
        },
        ProofInput {
            name: "blog.example.org",
            ..input
        },
        // Moving bytes across a field boundary changes the proof too.
        ProofInput {
            protocol: "httpblog.example.com",
            name: "",
            ..input
        },
    ];
    for changed_input in changed {
        assert!(
            !verify_kite_proof(&secret, &changed_input, &proof),
            "{changed_input:?}"
        );
    }
}

#[test]
fn secret_debug_hides_the_value() {
    let secret = Secret::new("hunter2");
    assert_eq!(format!("{secret:?}"), "Secret(***)");
    assert_eq!(secret.expose(), "hunter2");
}

#[test]
fn tls_errors_get_hints_through_wrappers() {
    let mismatch = FingerprintMismatch {
        presented: Fingerprint::from_bytes([1; 32]),
        pinned: Fingerprint::from_bytes([2; 32]),
    };
    let mismatch_error = rustls::Error::InvalidCertificate(CertificateError::Other(
        rustls::OtherError(Arc::new(mismatch.clone())),
    ));
    let cases: [(rustls::Error, Option<&str>); 7] = [
        (mismatch_error, Some("check the fingerprint")),
        (
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
            Some("--ca FILE"),
        ),
        (
            rustls::Error::InvalidCertificate(CertificateError::BadSignature),
            Some("--ca FILE"),
        ),
        (
            rustls::Error::InvalidCertificate(CertificateError::Expired),
            Some("validity"),
        ),
        (
            rustls::Error::AlertReceived(AlertDescription::NoApplicationProtocol),
            Some("kitepipe/1"),
        ),
        (
            rustls::Error::AlertReceived(AlertDescription::CertificateUnknown),
            Some("rejected"),
        ),
        (rustls::Error::DecryptError, None),
    ];
    for (tls_error, expected) in cases {
        let wrapped = io::Error::new(io::ErrorKind::InvalidData, tls_error.clone());
        // An outer error whose source is the io::Error, as a link error would be.
        let outer = PkiError::Read {
            path: PathBuf::from("x"),
            source: wrapped,
        };
        for err in [&tls_error as &(dyn Error + 'static), &outer] {
            let hint = describe_tls_error(err);
            match expected {
                Some(needle) => assert!(
                    hint.as_deref().is_some_and(|hint| hint.contains(needle)),
                    "{tls_error:?}: {hint:?}"
                ),
                None => assert_eq!(hint, None, "{tls_error:?}"),
            }
        }
    }
    let err = io::Error::new(
        io::ErrorKind::InvalidData,
        rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
            mismatch.clone(),
        )))),
    );
    assert_eq!(FingerprintMismatch::find(&err), Some(&mismatch));
    assert_eq!(
        FingerprintMismatch::find(&io::Error::other("unrelated")),
        None
    );
}

/// A CA made by [`CertAuthority::init`] in a fresh directory.
fn test_ca(test: &str) -> Result<(TempDir, CertAuthority), Box<dyn Error + Send + Sync>> {
    let dir = TempDir::new(test);
    let ca = CertAuthority::init(&dir.path().join("ca"), &ca::CaInit::default())?;
    Ok((dir, ca))
}

/// Issues `name` into `dir/name`, valid from `not_before` to `not_after`.
fn issue(
    ca: &CertAuthority,
    dir: &Path,
    name: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<NodeIdentity, Box<dyn Error + Send + Sync>> {
    let out = dir.join(name);
    ca.issue(&ca::IssueRequest {
        name: name.to_string(),
        role: ca::CertRole::Connector,
        alt_names: vec![],
        not_before,
        not_after,
        out: out.clone(),
        force: false,
    })?;
    Ok(NodeIdentity::load_dir(&out)?)
}

fn a_year_around_now() -> (SystemTime, SystemTime) {
    let now = SystemTime::now();
    (now - ca::BACKDATE, now + ca::DEFAULT_NODE_VALIDITY)
}

fn verify(
    verifier: &Arc<dyn rustls::server::danger::ClientCertVerifier>,
    identity: &NodeIdentity,
) -> Result<(), rustls::Error> {
    let (end_entity, intermediates) = identity.chain().split_first().expect("a chain");
    verifier
        .verify_client_cert(end_entity, intermediates, rustls_pki_types::UnixTime::now())
        .map(|_| ())
}

#[test]
fn ca_issues_certificates_the_client_verifier_accepts_until_revoked() -> TestResult {
    let (dir, ca) = test_ca("ca-issue")?;
    let (not_before, not_after) = a_year_around_now();
    let laptop = issue(&ca, dir.path(), "Laptop", not_before, not_after)?;
    assert_eq!(laptop.info().name, "laptop");
    assert!(!laptop.info().is_ca);
    assert!(ca.info().is_ca);
    assert_eq!(mode_of(&dir.path().join("Laptop/key.pem"))?, 0o600);
    assert_eq!(mode_of(&ca.dir().join(ca::CA_KEY_FILE))?, 0o600);

    let load = || ClientCa::load(&ca.cert_path(), Some(&ca.crl_path()));
    let verifier = client_cert_verifier(&ClientAuth::Required(load()?))?.expect("a verifier");
    verify(&verifier, &laptop)?;

    let revoked = ca.revoke("laptop", None)?;
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0].serial, laptop.info().serial.to_string());
    assert!(
        ca.revoke("laptop", None)?.is_empty(),
        "revoking twice is a no-op"
    );
    let client_ca = load()?;
    assert!(client_ca.revoked.contains(&laptop.info().serial));
    let verifier = client_cert_verifier(&ClientAuth::Required(client_ca))?.expect("a verifier");
    let err = verify(&verifier, &laptop).unwrap_err();
    assert_eq!(
        err,
        rustls::Error::InvalidCertificate(CertificateError::Revoked)
    );
    let hint = describe_relay_tls_error(&err).expect("a hint");
    assert!(hint.contains("revoked"), "{hint}");
    assert_eq!(
        ca.list()?
            .iter()
            .map(|entry| entry.status(SystemTime::now()))
            .collect::<Vec<_>>(),
        vec![ca::CertStatus::Revoked]
    );
    Ok(())
}

#[test]
fn ca_refuses_to_overwrite_and_checks_what_it_is_asked() -> TestResult {
    let (dir, ca) = test_ca("ca-refuse")?;
    let err = CertAuthority::init(ca.dir(), &ca::CaInit::default()).unwrap_err();
    assert!(
        matches!(err, CaError::Exists { .. }) && err.is_usage(),
        "{err:?}"
    );
    let (not_before, not_after) = a_year_around_now();
    issue(&ca, dir.path(), "laptop", not_before, not_after)?;
    let again = issue(&ca, dir.path(), "laptop", not_before, not_after).unwrap_err();
    assert!(again.to_string().contains("pass --force"), "{again}");
    for bad in ["", "*.laptop", "lap top", "../x"] {
        let err = issue(&ca, dir.path(), bad, not_before, not_after).unwrap_err();
        assert!(
            err.to_string().contains("bad certificate name"),
            "{bad:?}: {err}"
        );
    }
    let inverted = issue(&ca, dir.path(), "inverted", not_after, not_before).unwrap_err();
    assert!(
        inverted.to_string().contains("bad validity period"),
        "{inverted}"
    );
    let err = ca.revoke("nobody", None).unwrap_err();
    assert!(matches!(err, CaError::UnknownName { .. }), "{err:?}");
    let err = CertAuthority::open(dir.path()).unwrap_err();
    assert!(matches!(err, CaError::NoCa { .. }), "{err:?}");
    Ok(())
}

#[test]
fn expired_and_future_certificates_are_refused_with_their_reason() -> TestResult {
    let (dir, ca) = test_ca("ca-dates")?;
    let day = std::time::Duration::from_secs(24 * 60 * 60);
    let now = SystemTime::now();
    let old = issue(&ca, dir.path(), "old", now - 20 * day, now - 10 * day)?;
    let future = issue(&ca, dir.path(), "future", now + 10 * day, now + 20 * day)?;
    assert_eq!(old.info().validity_at(now), Validity::Expired);
    assert!(
        old.info()
            .validity_problem(now)
            .unwrap()
            .contains("certificate old expired at")
    );
    assert_eq!(future.info().validity_at(now), Validity::NotYetValid);
    let client_ca = ClientCa::load(&ca.cert_path(), None)?;
    let verifier = client_cert_verifier(&ClientAuth::Required(client_ca))?.expect("a verifier");
    for (identity, hint) in [(&old, "expired"), (&future, "not valid yet")] {
        let err = verify(&verifier, identity).unwrap_err();
        let described = describe_relay_tls_error(&err).expect("a hint");
        assert!(described.contains(hint), "{err:?}: {described}");
    }
    Ok(())
}

#[test]
fn a_revocation_list_from_another_ca_is_refused_at_load() -> TestResult {
    let (_dir, ca) = test_ca("crl-mine")?;
    let (_other_dir, other) = test_ca("crl-other")?;
    let err = ClientCa::load(&ca.cert_path(), Some(&other.crl_path())).unwrap_err();
    assert!(
        matches!(&err, PkiError::BadCrl { reason, .. } if reason.contains("not signed by a CA")),
        "{err:?}"
    );
    Ok(())
}

#[tokio::test]
async fn mutual_tls_requires_or_accepts_client_certificates() -> TestResult {
    let (dir, ca) = test_ca("mtls")?;
    let (not_before, not_after) = a_year_around_now();
    let laptop = issue(&ca, dir.path(), "laptop", not_before, not_after)?;
    let (relay, _) = RelayCert::load_or_create(&dir.path().join("relay"), &[])?;
    let trust = RelayTrust::Pinned(relay.fingerprint());
    let with_cert = connector_client_config_with(
        &trust,
        &ConnectorTlsOptions {
            identity: Some(laptop.clone()),
        },
    )?;
    let without_cert = connector_client_config(&trust)?;
    let client_ca = ClientCa::load(&ca.cert_path(), Some(&ca.crl_path()))?;
    let server = |client_auth| relay_server_config_with(&relay, &RelayTlsOptions { client_auth });

    let required = server(ClientAuth::Required(client_ca.clone()))?;
    let (server_res, client_res) =
        handshake(required.clone(), with_cert.clone(), "localhost").await?;
    client_res?;
    let server_stream = server_res?;
    let presented = server_stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("a certificate");
    assert_eq!(CertInfo::parse(&presented[0])?.name, "laptop");

    let (server_res, _) = handshake(required, without_cert.clone(), "localhost").await?;
    let err = server_res.map(|_| ()).unwrap_err();
    assert!(
        matches!(
            find_tls_error(&err),
            Some(rustls::Error::NoCertificatesPresented)
        ),
        "{err:?}"
    );
    assert!(describe_relay_tls_error(&err).is_some_and(|hint| hint.contains("no certificate")));

    let optional = server(ClientAuth::Optional(client_ca))?;
    let (server_res, client_res) = handshake(optional.clone(), without_cert, "localhost").await?;
    client_res?;
    assert!(server_res?.get_ref().1.peer_certificates().is_none());
    let (server_res, _) = handshake(optional, with_cert, "localhost").await?;
    assert!(server_res?.get_ref().1.peer_certificates().is_some());
    Ok(())
}

#[test]
fn connector_hints_name_the_relays_verdict_on_its_certificate() {
    let cases = [
        (AlertDescription::CertificateRequired, "--identity DIR"),
        (AlertDescription::CertificateRevoked, "revoked"),
        (
            AlertDescription::CertificateExpired,
            "expired or not yet valid",
        ),
        (AlertDescription::UnknownCA, "does not trust the CA"),
        (
            AlertDescription::BadCertificate,
            "rejected this connector's certificate",
        ),
    ];
    for (alert, needle) in cases {
        let err = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(alert),
        );
        let hint = describe_tls_error(&err);
        assert!(
            hint.as_deref().is_some_and(|h| h.contains(needle)),
            "{alert:?}: {hint:?}"
        );
    }
    let relay_side = rustls::Error::AlertReceived(AlertDescription::CertificateUnknown);
    assert!(
        describe_relay_tls_error(&relay_side)
            .is_some_and(|hint| hint.contains("the connector rejected the relay's certificate"))
    );
}

#[test]
fn secret_strength_refuses_short_and_warns_about_weak_secrets() {
    for (secret, expected) in [
        ("", Err(0)),
        ("s3cret", Err(6)),
        ("hunter2hunt", Err(11)),
        ("abcdefghijkl", Ok(Some("less than the 16"))),
        ("aaaaaaaaaaaaaaaaaaaaaaaa", Ok(Some("distinct"))),
        ("abababababababababababab", Ok(Some("distinct"))),
        ("9f86d081884c7d659a2feaa0c55ad015", Ok(None)),
        ("correct horse battery staple", Ok(None)),
    ] {
        let got = Secret::new(secret).check_strength();
        match (&got, expected) {
            (Err(too_short), Err(len)) => {
                assert_eq!(too_short.len, len, "{secret:?}");
                let message = too_short.to_string();
                assert!(message.contains("at least 12"), "{message}");
            }
            (Ok(None), Ok(None)) => {}
            (Ok(Some(why)), Ok(Some(needle))) => assert!(why.contains(needle), "{secret:?}: {why}"),
            _ => panic!("{secret:?}: {got:?}, expected {expected:?}"),
        }
        if let Ok(Some(why)) = &got {
            assert!(
                !why.contains(secret),
                "the warning quotes the secret: {why}"
            );
        }
    }
}

#[cfg(unix)]
#[test]
fn key_directories_are_created_private_and_loose_ones_tightened() -> TestResult {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("private-dir");
    let nested = dir.path().join("a/b");
    cert::ensure_private_dir(&nested)?;
    assert_eq!(mode_of(&nested)?, 0o700);
    fs::set_permissions(&nested, fs::Permissions::from_mode(0o775))?;
    cert::check_private_dir(&nested)?;
    assert_eq!(mode_of(&nested)?, 0o700);
    fs::set_permissions(&nested, fs::Permissions::from_mode(0o1777))?;
    let err = cert::ensure_private_dir(&nested).unwrap_err();
    assert!(
        matches!(&err, PkiError::Unprotected { why, .. } if why.contains("shared directory")),
        "{err:?}"
    );
    fs::set_permissions(&nested, fs::Permissions::from_mode(0o700))?;
    let file = nested.join("key.pem");
    fs::write(&file, "not really a key")?;
    fs::set_permissions(&file, fs::Permissions::from_mode(0o640))?;
    cert::check_private_file(&file, "private key", cert::IfExposed::Refuse)?;
    assert_eq!(mode_of(&file)?, 0o600);
    // Missing things are left to whoever reads them.
    cert::check_private_dir(&dir.path().join("missing"))?;
    cert::check_private_file(
        &nested.join("missing"),
        "private key",
        cert::IfExposed::Refuse,
    )?;
    Ok(())
}

#[test]
fn secret_files_are_read_whole_and_tightened() -> TestResult {
    let dir = TempDir::new("secret-file");
    cert::ensure_private_dir(dir.path())?;
    let file = dir.path().join("secret");
    fs::write(&file, "9f86d081884c7d659a2feaa0c55ad015\n")?;
    #[cfg(unix)]
    fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    let secret = read_secret_file(&file)?;
    assert_eq!(secret.expose(), "9f86d081884c7d659a2feaa0c55ad015\n");
    #[cfg(unix)]
    assert_eq!(mode_of(&file)?, 0o600);
    assert!(read_secret_file(&dir.path().join("missing")).is_err());
    Ok(())
}

#[test]
fn leaves_serve_only_their_role() -> TestResult {
    let (dir, ca) = test_ca("roles")?;
    let (not_before, not_after) = a_year_around_now();
    let relay_out = dir.path().join("relay");
    let request = ca::IssueRequest {
        name: "relay".to_string(),
        role: ca::CertRole::Relay,
        alt_names: vec!["relay.example.net".to_string()],
        not_before,
        not_after,
        out: relay_out.clone(),
        force: false,
    };
    let entry = ca.issue(&request)?.entry;
    assert_eq!(entry.role, Some(ca::CertRole::Relay));
    let relay = NodeIdentity::load_dir(&relay_out)?;
    let client_ca = ClientCa::load(&ca.cert_path(), None)?;
    let verifier = client_cert_verifier(&ClientAuth::Required(client_ca))?.expect("a verifier");
    let err = verify(&verifier, &relay).unwrap_err();
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(
                CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. }
            )
        ),
        "{err:?}"
    );
    assert!(
        describe_relay_tls_error(&err)
            .unwrap_or_default()
            .contains("not for client authentication")
    );
    let nameless = ca
        .issue(&ca::IssueRequest {
            alt_names: vec![],
            out: dir.path().join("nameless"),
            ..request
        })
        .unwrap_err();
    assert!(
        matches!(nameless, CaError::RelayWithoutNames) && nameless.is_usage(),
        "{nameless:?}"
    );
    Ok(())
}
