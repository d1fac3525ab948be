//! Debian's `pebble` ACME test server on loopback, with
//! `pebble-challtestsrv` as its only DNS server (every name resolves to
//! 127.0.0.1), for the relay's ACME tests. Both are stopped by PID when
//! the fixture drops.
//!
//! The relay must be started between [`PebblePlan::new`] (which picks
//! pebble's ports and makes its TLS certificate, so the relay can be given
//! `--acme-directory` and `--acme-ca-root`) and [`PebblePlan::start`]
//! (which tells pebble the relay's HTTP and HTTPS ports, where it sends
//! its HTTP-01 and TLS-ALPN-01 validations).

use std::path::PathBuf;
use std::process::Command;

use super::{Proc, TempDir, TestCert, curl, eventually, free_port};

/// Pebble's ports and TLS certificate, chosen before the relay starts.
pub struct PebblePlan {
    /// The ACME directory URL (`--acme-directory`).
    pub directory: String,
    /// The CA of pebble's own HTTPS certificate (`--acme-ca-root`).
    pub tls: TestCert,
    listen: u16,
    management: u16,
}

/// A running pebble and its DNS server.
pub struct Pebble {
    pub proc: Proc,
    pub dns: Proc,
    pub plan: PebblePlan,
    dir: TempDir,
    root: PathBuf,
}

impl PebblePlan {
    pub fn new() -> PebblePlan {
        let listen = free_port();
        PebblePlan {
            directory: format!("https://127.0.0.1:{listen}/dir"),
            tls: TestCert::new(&["127.0.0.1", "localhost"]),
            listen,
            management: free_port(),
        }
    }

    /// The `--acme*` arguments of a relay using this pebble with `challenge`.
    pub fn relay_args(&self, challenge: &str) -> Vec<String> {
        [
            "--acme",
            "--acme-directory",
            &self.directory,
            "--acme-ca-root",
            self.tls.ca.to_str().unwrap(),
            "--acme-challenge",
            challenge,
            "--acme-email",
            "admin@example.test",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Starts pebble validating on `http_port` (HTTP-01) and `tls_port`
    /// (TLS-ALPN-01); its certificates live `validity_secs` (pebble 2.4's
    /// `certificateValidityPeriod`; 0 for its default of 5 years).
    pub fn start(self, http_port: u16, tls_port: u16, validity_secs: u64) -> Pebble {
        let dir = TempDir::new("pebble");
        let dns_port = free_udp_port();
        let mut dns = Command::new("pebble-challtestsrv");
        dns.args(["-dns01", &format!("127.0.0.1:{dns_port}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{}", free_port())])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""]);
        let dns = Proc::spawn("pebble-challtestsrv", dns);
        dns.wait_for("Starting challenge servers");
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{}", self.listen),
            "managementListenAddress": format!("127.0.0.1:{}", self.management),
            "certificate": self.tls.cert,
            "privateKey": self.tls.key,
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "certificateValidityPeriod": validity_secs,
        }});
        let config_path = dir.path().join("pebble.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let mut command = Command::new("pebble");
        command
            .arg("-config")
            .arg(&config_path)
            .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0");
        let proc = Proc::spawn("pebble", command);
        proc.wait_for("ACME directory available at");
        let ca = self.tls.ca.to_str().unwrap().to_string();
        // Pebble logs the line just before it listens: wait for the answer.
        eventually("pebble to serve its directory", || {
            let (code, _, _) = curl(&["--cacert", &ca, &self.directory]);
            (code == 0).then_some(())
        });
        let root = dir.path().join("pebble-root.pem");
        let url = format!("https://127.0.0.1:{}/roots/0", self.management);
        let (code, body, err) = curl(&["--cacert", &ca, &url]);
        assert_eq!(code, 0, "pebble's root from {url}: {err}");
        std::fs::write(&root, body).unwrap();
        Pebble {
            proc,
            dns,
            plan: self,
            dir,
            root,
        }
    }
}

impl Pebble {
    /// Pebble's root certificate: what the certificates it issues chain to.
    pub fn root(&self) -> &std::path::Path {
        &self.root
    }

    /// Orders placed with pebble so far.
    pub fn orders(&self) -> usize {
        self.proc.count("POST /order-plz")
    }

    /// Accounts pebble was asked to create so far.
    pub fn new_accounts(&self) -> usize {
        self.proc.count("POST /sign-me-up")
    }
}

/// A free UDP port on 127.0.0.1 (bound then released), for the DNS server.
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
