use std::path::{Path, PathBuf};
use std::time::Duration;

use kitepipe_proto::kite::{KiteProto, KiteRef};
use kitepipe_proto::message::RemoteClass;
use kitepipe_proto::proxy::ProxyProtocol;

use super::connector::parse_allow_remote;
use super::events::{parse_origin, parse_upstream};
use super::identity::parse_allow_rule;
use super::parse::parse_kite_target;
use super::relay::parse_domain;
use super::remote::parse_remote_rule;
use super::*;
use crate::pki::{CrlSource, RelayTrust, Secret};

/// A fresh file holding `text`, in a directory removed on drop.
struct TomlFile(PathBuf);

impl TomlFile {
    fn new(text: &str) -> TomlFile {
        use std::sync::atomic::{AtomicU32, Ordering};
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("kitepipe-config-layer-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.toml");
        std::fs::write(&path, text).unwrap();
        TomlFile(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TomlFile {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn relay(raw: RawRelayConfig) -> Result<RelayConfig, ConfigError> {
    RelayConfig::try_from(RawRelayConfig {
        state_dir: Some("/nonexistent".into()),
        ..raw
    })
}

#[test]
fn roles_on_one_address_share_a_listener() {
    let config = relay(RawRelayConfig {
        listen: vec!["127.0.0.1:443".into()],
        http: vec!["127.0.0.1:80".into(), "127.0.0.1:443".into()],
        https: vec!["443".into()],
        ..Default::default()
    })
    .unwrap();
    assert_eq!(config.listeners.len(), 3);
    let shared = &config.listeners[0];
    assert!(shared.link && shared.http && !shared.https);
    assert!(config.listeners[2].https && config.listeners[2].addr.ip().is_unspecified());
}

#[test]
fn port_zero_listeners_stay_separate() {
    let config = relay(RawRelayConfig {
        listen: vec!["127.0.0.1:0".into()],
        http: vec!["127.0.0.1:0".into()],
        ..Default::default()
    })
    .unwrap();
    assert_eq!(config.listeners.len(), 2);
}

#[test]
fn a_relay_without_a_link_listener_is_refused() {
    let err = relay(RawRelayConfig {
        http: vec!["127.0.0.1:80".into()],
        ..Default::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("--listen"), "{err}");
}

#[test]
fn domains() {
    let d = parse_domain("http,tcp:*.Example.net:se:cret").unwrap();
    assert_eq!(d.protos, vec![KiteProto::Http, KiteProto::Tcp]);
    assert_eq!(d.pattern, "*.example.net");
    assert_eq!(d.secret.expose(), "se:cret");
    for bad in [
        "http:*.example.net",
        "ftp:x.net:s3kr1t",
        "http:bad name:s3kr1t",
        "http:x.net:",
    ] {
        let err = parse_domain(bad).unwrap_err().to_string();
        assert!(!err.contains("s3kr1t"), "secret leaked: {err}");
    }
}

#[test]
fn kite_targets() {
    let (kite, target) = parse_kite_target("http:blog.example.net=8000").unwrap();
    assert_eq!(
        (kite.name.as_str(), target.as_str()),
        ("blog.example.net", "127.0.0.1:8000")
    );
    let (kite, target) = parse_kite_target("tcp:db.example.net:15432=db.lan:5432").unwrap();
    assert_eq!((kite.port, target.as_str()), (15432, "db.lan:5432"));
    for bad in [
        "http:blog.example.net",
        "http:blog.example.net=",
        "http:x.net=host",
    ] {
        assert!(parse_kite_target(bad).is_err(), "{bad}");
    }
}

#[test]
fn connector_must_verify_the_relay() {
    let raw = RawConnectorConfig {
        relay: vec!["relay.example.net:8443".into()],
        ..Default::default()
    };
    let err = ConnectorConfig::try_from(raw).unwrap_err().to_string();
    assert!(
        err.contains("--fingerprint") && err.contains("--ca"),
        "{err}"
    );
}

#[test]
fn fingerprints_pin_all_relays_or_each_in_order() {
    let a = "SHA256:".to_string() + &"aa".repeat(32);
    let b = "SHA256:".to_string() + &"bb".repeat(32);
    let raw = |pins: Vec<String>| RawConnectorConfig {
        relay: vec!["r1:1".into(), "r2:2".into()],
        fingerprint: pins,
        ..Default::default()
    };
    let one = ConnectorConfig::try_from(raw(vec![a.clone()])).unwrap();
    assert_eq!(one.relays[0].trust, one.relays[1].trust);
    let each = ConnectorConfig::try_from(raw(vec![a.clone(), b.clone()])).unwrap();
    assert_eq!(
        each.relays[0].trust,
        Some(RelayTrust::Pinned(a.parse().unwrap()))
    );
    assert_eq!(
        each.relays[1].trust,
        Some(RelayTrust::Pinned(b.parse().unwrap()))
    );
    let three = ConnectorConfig::try_from(raw(vec![a.clone(), b, a])).unwrap_err();
    assert!(three.to_string().contains("one per relay"), "{three}");
}

#[test]
fn file_values_are_overridden_by_flags() {
    let file = TomlFile::new(
        "relay = [\"a:1\"]\nkite = [\"http:x.net=80\"]\nsecret = \"s\"\nheartbeat = \"5s\"",
    );
    let merged = RawConnectorConfig::load(
        Some(file.path()),
        &RawConnectorConfig {
            relay: vec!["b:2".into()],
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(merged.relay, vec!["b:2"]);
    assert_eq!(merged.kite, vec![RawKiteSpec::from("http:x.net=80")]);
    assert_eq!(merged.heartbeat.as_deref(), Some("5s"));
    let unknown = TomlFile::new("relays = []");
    let err = RawConnectorConfig::load(Some(unknown.path()), &Default::default()).unwrap_err();
    assert!(
        matches!(&err, ConfigError::UnknownKey { key, .. } if key == "relays"),
        "{err:?}"
    );
}

/// The merge is by key: each setting given in the flags wins, a list
/// given replaces the file's, a flattened event setting and a boolean
/// behave like the rest, and `secret` replaces the file's `secret_file`.
#[test]
fn layering_is_by_key() {
    let file = TomlFile::new(
        "listen = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\nhttp = [\"127.0.0.1:3\"]\n\
         heartbeat = \"5s\"\nhttp_connect = true\nevent_wait = \"7s\"\n\
         gateway_origin = [\"https://a.example\"]\n\
         [[allow]]\nidentity = \"ci-*\"\n",
    );
    let flags = RawRelayConfig {
        listen: vec!["127.0.0.1:9".into()],
        heartbeat: Some("9s".into()),
        http_connect: Some(false),
        events: RawEventConfig {
            gateway: Some("off".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let raw = RawRelayConfig::load(Some(file.path()), &flags).unwrap();
    assert_eq!(
        raw.listen,
        ["127.0.0.1:9"],
        "a list from the flags replaces the file's"
    );
    assert_eq!(
        raw.http,
        ["127.0.0.1:3"],
        "the file's list stays when no flag gives one"
    );
    assert_eq!(raw.heartbeat.as_deref(), Some("9s"));
    assert_eq!(
        raw.http_connect,
        Some(false),
        "an explicit false wins over the file's true"
    );
    assert_eq!(raw.events.event_wait.as_deref(), Some("7s"));
    assert_eq!(raw.events.gateway.as_deref(), Some("off"));
    assert_eq!(raw.events.gateway_origin, ["https://a.example"]);
    assert_eq!(raw.allow.len(), 1, "TOML-only tables pass through");
    let no_file = RawRelayConfig::load(None, &flags).unwrap();
    assert_eq!(no_file.listen, ["127.0.0.1:9"]);
    assert!(no_file.http.is_empty() && no_file.allow.is_empty());

    let secret_file = TomlFile::new("secret_file = \"/etc/kitepipe/secret\"\n");
    let raw = RawConnectorConfig::load(
        Some(secret_file.path()),
        &RawConnectorConfig {
            secret: Some("from-the-environment".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        raw.secret_file, None,
        "secret and secret_file are one setting"
    );
    assert_eq!(raw.secret.as_deref(), Some("from-the-environment"));
}

/// Every key the file may hold is a flag's id or a TOML-only table, and
/// an unknown one (nested ones too) is refused by name.
#[test]
fn unknown_keys_are_refused_by_name() {
    for (text, key) in [
        ("listen = []\nlisten_on = []", "listen_on"),
        ("gateway_origins = []", "gateway_origins"),
    ] {
        let file = TomlFile::new(text);
        let err = RawRelayConfig::load(Some(file.path()), &Default::default()).unwrap_err();
        assert!(err.to_string().contains(key), "{err}");
        assert!(err.to_string().contains("config.toml"), "{err}");
    }
    let file = TomlFile::new(
        "[[kite]]\nname = \"x.net\"\nprotocol = \"http\"\ntarget = \"80\"\ncolour = 1\n",
    );
    let err = RawConnectorConfig::load(Some(file.path()), &Default::default()).unwrap_err();
    let text = format!("{:#}", anyhow_like(&err));
    assert!(
        text.contains("colour") && text.contains("config.toml"),
        "{text}"
    );
    assert!(known_keys::<RawRelayConfig>().contains(&"event_timeout".to_string()));
    assert!(known_keys::<RawConnectorConfig>().contains(&"relay".to_string()));
}

/// The error and its causes, as the CLI prints them.
fn anyhow_like(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[test]
fn kite_tables_and_strings_give_the_same_kites() {
    let file = TomlFile::new(
        "relay = [\"r:1\"]\nfingerprint = [\"SHA256:AAAA\"]\n\
         kite = [\"http:a.example.net=8000\"]\n",
    );
    let strings = RawConnectorConfig::load(Some(file.path()), &Default::default()).unwrap();
    let file = TomlFile::new(
        "[[kite]]\nname = \"a.example.net\"\nprotocol = \"http\"\ntarget = \"8000\"\n\
         [[kite]]\nname = \"db.example.net\"\nprotocol = \"tcp\"\nport = 15432\ntarget = \"db.lan:5432\"\n",
    );
    let tables = RawConnectorConfig::load(Some(file.path()), &Default::default()).unwrap();
    let config = |raw: RawConnectorConfig| {
        ConnectorConfig::try_from(RawConnectorConfig {
            relay: vec!["r:1".into()],
            fingerprint: vec!["SHA256:".to_string() + &"aa".repeat(32)],
            secret: Some("9f86d081884c7d659a2f".into()),
            ..raw
        })
        .unwrap()
    };
    let from_strings = config(strings).kites;
    let from_tables = config(tables).kites;
    assert_eq!(from_strings[0].kite, from_tables[0].kite);
    assert_eq!(from_strings[0].target, from_tables[0].target);
    assert_eq!(from_tables[1].kite.port, 15432);
    assert_eq!(from_tables[1].target, "db.lan:5432");
    let bad = RawKite {
        name: "x.net".into(),
        protocol: "ftp".into(),
        port: None,
        target: "80".into(),
        ..RawKite::default()
    };
    assert!(bad.parse().is_err());
}

/// `allow` and `deny` are `[[kite]]` options: CIDR blocks or bare
/// addresses, IPv4 and IPv6, at most `MAX_POLICY_ENTRIES` each; a bad
/// entry is refused with the list and the entry named.
#[test]
fn kite_policy_is_validated() {
    let config = |lists: &str| {
        let file = TomlFile::new(&format!(
            "[[kite]]\nname = \"a.example.net\"\nprotocol = \"http\"\ntarget = \"8000\"\n{lists}\n"
        ));
        let raw = RawConnectorConfig::load(Some(file.path()), &Default::default()).unwrap();
        ConnectorConfig::try_from(RawConnectorConfig {
            relay: vec!["r:1".into()],
            fingerprint: vec!["SHA256:".to_string() + &"aa".repeat(32)],
            secret: Some("9f86d081884c7d659a2f".into()),
            ..raw
        })
    };
    let kites = config("allow = [\"10.0.0.0/8\", \"::1\"]\ndeny = [\"10.1.2.3\"]")
        .unwrap()
        .kites;
    let policy = &kites[0].policy;
    let shown: Vec<String> = policy.allow().iter().map(ToString::to_string).collect();
    assert_eq!(shown, ["10.0.0.0/8", "::1/128"]);
    assert!(policy.admits("10.9.9.9".parse().unwrap()));
    assert!(!policy.admits("10.1.2.3".parse().unwrap()));
    assert!(config("").unwrap().kites[0].policy.is_open());
    let many = vec!["\"10.0.0.1\""; kitepipe_proto::policy::MAX_POLICY_ENTRIES + 1].join(",");
    for (lists, what, why) in [
        (
            "allow = [\"10.0.0.300\"]",
            "allow",
            "\"10.0.0.300\" is not an IP address",
        ),
        ("deny = [\"::1/129\"]", "deny", "at most 128"),
        ("deny = [\"example.net\"]", "deny", "\"example.net\""),
        (&format!("allow = [{many}]"), "allow", "at most 256"),
    ] {
        let err = config(lists).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(&err, ConfigError::Invalid { what: w, .. } if *w == what),
            "{lists}: {text}"
        );
        assert!(
            text.contains(why) && text.contains("a.example.net"),
            "{text}"
        );
    }
}

/// The HTTP rules of a `[[kite]]` table reach the claim as written; on a
/// kite that is not http they are refused by name, and an unknown backend
/// protocol is refused with the choices.
#[test]
fn kite_http_rules_are_parsed() {
    let config = |protocol: &str, rules: &str| {
        let file = TomlFile::new(&format!(
            "[[kite]]\nname = \"a.example.net\"\nprotocol = \"{protocol}\"\ntarget = \"8000\"\n{rules}\n"
        ));
        let raw = RawConnectorConfig::load(Some(file.path()), &Default::default())?;
        ConnectorConfig::try_from(RawConnectorConfig {
            relay: vec!["r:1".into()],
            fingerprint: vec!["SHA256:".to_string() + &"aa".repeat(32)],
            secret: Some("9f86d081884c7d659a2f".into()),
            ..raw
        })
    };
    let rules = "rate_limit = 5\nrate_burst = 10\nmax_connections = 3\nforwarded_host = true\n\
                 https_redirect = true\nbackend = \"h2c\"\n\
                 request_headers = { set = { \"X-Team\" = \"dev\" }, remove = [\"Cookie\"] }\n\
                 response_headers = { remove = [\"Server\"] }";
    let http = config("http", rules).unwrap().kites[0].http.clone();
    assert_eq!(http.rate_limit, Some(5));
    assert_eq!(http.rate_burst, Some(10));
    assert_eq!(http.max_connections, Some(3));
    assert!(http.forwarded_host && http.https_redirect);
    assert_eq!(
        http.backend,
        kitepipe_proto::http_policy::BackendProtocol::H2c
    );
    assert_eq!(http.request_headers.set["X-Team"], "dev");
    assert_eq!(http.request_headers.remove, ["Cookie"]);
    assert_eq!(http.response_headers.remove, ["Server"]);
    assert!(config("http", "").unwrap().kites[0].http.is_default());
    let err = config("https", "rate_limit = 5").unwrap_err().to_string();
    assert!(err.contains("cannot have HTTP rules"), "{err}");
    let err = config("http", "backend = \"h3\"").unwrap_err().to_string();
    assert!(err.contains("http1 or h2c"), "{err}");
    let err = config("http", "request_headers = { add = {} }").unwrap_err();
    assert!(
        format!("{err:?}").contains("unknown field `add`"),
        "{err:?}"
    );
}

/// `proxy_protocol` is a `[[kite]]` option: `v1` or `v2` on TCP and
/// HTTPS kites, refused by name for another value or an HTTP kite.
#[test]
fn kite_proxy_protocol_is_validated() {
    let config = |protocol: &str, value: &str| {
        let port = if protocol == "tcp" { "port = 0\n" } else { "" };
        let file = TomlFile::new(&format!(
            "[[kite]]\nname = \"a.example.net\"\nprotocol = \"{protocol}\"\n{port}\
             target = \"8000\"\nproxy_protocol = \"{value}\"\n"
        ));
        let raw = RawConnectorConfig::load(Some(file.path()), &Default::default()).unwrap();
        ConnectorConfig::try_from(RawConnectorConfig {
            relay: vec!["r:1".into()],
            fingerprint: vec!["SHA256:".to_string() + &"aa".repeat(32)],
            secret: Some("9f86d081884c7d659a2f".into()),
            ..raw
        })
    };
    for (protocol, value, want) in [
        ("tcp", "v1", ProxyProtocol::V1),
        ("tcp", "v2", ProxyProtocol::V2),
        ("https", "v2", ProxyProtocol::V2),
    ] {
        let kites = config(protocol, value).unwrap().kites;
        assert_eq!(kites[0].proxy_protocol, Some(want), "{protocol} {value}");
    }
    for (protocol, value, why) in [
        ("tcp", "v3", "expected v1 or v2"),
        ("https", "", "expected v1 or v2"),
        ("http", "v1", "X-Forwarded-For"),
    ] {
        let err = config(protocol, value).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    what: "proxy_protocol",
                    ..
                }
            ),
            "{text}"
        );
        assert!(text.contains(why), "{protocol} {value}: {text}");
    }
    // Without the key (and from the short form): no header.
    let file = TomlFile::new("kite = [\"tcp:db.example.net:1=2\"]\n");
    let raw = RawConnectorConfig::load(Some(file.path()), &Default::default()).unwrap();
    let config = ConnectorConfig::try_from(RawConnectorConfig {
        relay: vec!["r:1".into()],
        fingerprint: vec!["SHA256:".to_string() + &"aa".repeat(32)],
        secret: Some("9f86d081884c7d659a2f".into()),
        ..raw
    })
    .unwrap();
    assert_eq!(config.kites[0].proxy_protocol, None);
}

#[test]
fn effective_toml_redacts_secrets_and_names_unset_settings() {
    let raw = RawRelayConfig {
        domain: vec!["http,tcp:*.example.net:hunter2-hunter2".into()],
        ..Default::default()
    }
    .with_defaults(&|_| None, 4);
    let text = raw.effective_toml();
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("http,tcp:*.example.net:<redacted>"), "{text}");
    assert!(text.contains("heartbeat = \"15s\""), "{text}");
    assert!(text.contains("threads = 2"), "{text}");
    assert!(text.contains("# crl: not set"), "{text}");
    let raw = RawConnectorConfig {
        secret: Some("a:b:hunter2".into()),
        ..Default::default()
    }
    .with_defaults();
    let text = raw.effective_toml();
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("secret = \"<redacted>\""), "{text}");
    assert!(text.contains("max_backoff = \"15s\""), "{text}");
}

#[test]
fn remote_rules_from_toml_and_flags_and_connector_opt_in() {
    let raw: RawRelayConfig = toml::from_str(
        r#"
        listen = ["127.0.0.1:0"]
        domain = ["http:*.example.net:s3cret-long-enough"]

        [[remote]]
        nodes = ["ci-*", "Laptop"]
        ops = ["exec", "fs"]
        "#,
    )
    .unwrap();
    let flag = RawRemoteRule::from_flag("build-*:forward").unwrap();
    let mut with_flag = raw.clone();
    with_flag.remote.push(flag);
    let rules = relay(with_flag).unwrap().identity.rules;
    assert_eq!(
        rules.remote_grants("ci-3"),
        [RemoteClass::Exec, RemoteClass::Fs]
    );
    assert_eq!(
        rules.remote_grants("laptop"),
        [RemoteClass::Exec, RemoteClass::Fs]
    );
    assert_eq!(rules.remote_grants("build-1"), [RemoteClass::Forward]);
    assert!(rules.remote_grants("desktop").is_empty(), "no default rule");

    // Bad rules say what is wrong.
    for (nodes, ops, needle) in [
        (vec!["lap top"], vec!["exec"], "bad identity pattern"),
        (
            vec!["laptop"],
            vec!["shell"],
            "unknown remote operation kind",
        ),
        (vec![], vec!["exec"], "at least one node"),
        (vec!["laptop"], vec![], "no remote operation kind"),
    ] {
        let rule = RawRemoteRule {
            nodes: nodes.into_iter().map(String::from).collect(),
            ops: ops.into_iter().map(String::from).collect(),
        };
        let err = parse_remote_rule(&rule).unwrap_err().to_string();
        assert!(err.contains(needle), "{err}");
    }
    assert!(RawRemoteRule::from_flag("laptop").is_err());
    let unknown = toml::from_str::<RawRelayConfig>("[[remote]]\nnodes = [\"x\"]\nop = []");
    assert!(unknown.is_err(), "unknown keys in [[remote]] are refused");

    let connector = |allow: Option<&str>| {
        ConnectorConfig::try_from(RawConnectorConfig {
            relay: vec!["relay.example.net:443".into()],
            fingerprint: vec![format!("sha256:{}", "ab".repeat(32))],
            allow_remote: allow.map(String::from),
            ..Default::default()
        })
    };
    assert!(
        connector(None).unwrap().allow_remote.is_empty(),
        "off by default"
    );
    assert_eq!(
        connector(Some("fs,exec")).unwrap().allow_remote,
        [RemoteClass::Exec, RemoteClass::Fs]
    );
    let err = connector(Some("root")).unwrap_err().to_string();
    assert!(err.contains("allow-remote"), "{err}");
}

/// `fs-read` is offered as `fs` and narrowed on the connector; `fs`
/// (or `all`) grants writing, whatever else is listed.
#[test]
fn allow_remote_fs_read_is_fs_without_writing() {
    use RemoteClass::{Exec, Forward, Fs};
    for (text, classes, write) in [
        ("fs-read", vec![Fs], false),
        ("exec,fs-read", vec![Exec, Fs], false),
        ("fs", vec![Fs], true),
        ("fs-read,fs", vec![Fs], true),
        ("all", vec![Exec, Fs, Forward], true),
        ("FS-READ, forward", vec![Fs, Forward], false),
    ] {
        assert_eq!(
            parse_allow_remote(text).unwrap(),
            (classes, write),
            "{text}"
        );
    }
    let err = parse_allow_remote("fs-write").unwrap_err().to_string();
    assert!(err.contains("allow-remote"), "{err}");
}

#[test]
fn identity_settings_from_toml() {
    let raw: RawRelayConfig = toml::from_str(
        r#"
        listen = ["127.0.0.1:0"]
        client_ca = "/etc/kitepipe/ca/ca-cert.pem"
        cert_domain = ["Example.net"]

        [[allow]]
        identity = "ci-*"
        kites = ["http,https:{name}.ci.example.org", "tcp:db.example.org:15432"]
        handlers = ["time"]
        peers = ["laptop"]
        "#,
    )
    .unwrap();
    let config = relay(raw).unwrap();
    let identity = &config.identity;
    assert_eq!(
        identity.crl,
        Some(CrlSource::BesideCa("/etc/kitepipe/ca/crl.pem".into()))
    );
    assert_eq!(identity.rules.cert_domains(), ["example.net"]);
    let kite = |spec| KiteRef::parse(spec).unwrap();
    assert!(
        identity
            .rules
            .allows("laptop", &kite("http:laptop.example.net"))
    );
    assert!(
        identity
            .rules
            .allows("ci-3", &kite("https:ci-3.ci.example.org"))
    );
    assert!(
        !identity
            .rules
            .allows("ci-3", &kite("https:ci-4.ci.example.org"))
    );
    assert_eq!(identity.rules.allow_rules()[0].handlers, ["time"]);
    let unknown = toml::from_str::<RawRelayConfig>("[[allow]]\nidentity = \"x\"\nkite = []");
    assert!(unknown.is_err(), "unknown keys in [[allow]] are refused");
}

#[test]
fn identity_settings_are_checked() {
    let base = || RawRelayConfig {
        listen: vec!["127.0.0.1:0".into()],
        ..Default::default()
    };
    let rule = |identity: &str, kites: &[&str]| RawAllowRule {
        identity: identity.into(),
        kites: kites.iter().map(|k| k.to_string()).collect(),
        ..Default::default()
    };
    let cases: Vec<(RawRelayConfig, &str)> = vec![
        (
            RawRelayConfig {
                crl: Some("crl.pem".into()),
                ..base()
            },
            "--crl needs --client-ca",
        ),
        (
            RawRelayConfig {
                cert_domain: vec!["example.net".into()],
                ..base()
            },
            "set --client-ca",
        ),
        (
            RawRelayConfig {
                client_ca: Some("ca.pem".into()),
                cert_domain: vec!["*.example.net".into()],
                ..base()
            },
            "no wildcard",
        ),
        (
            RawRelayConfig {
                client_ca: Some("ca.pem".into()),
                allow: vec![rule("lap top", &[])],
                ..base()
            },
            "bad identity pattern",
        ),
        (
            RawRelayConfig {
                client_ca: Some("ca.pem".into()),
                allow: vec![rule("laptop", &["http:x.example.net:80"])],
                ..base()
            },
            "only tcp patterns take a port",
        ),
    ];
    for (raw, needle) in cases {
        let err = relay(raw).unwrap_err().to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
    let explicit = relay(RawRelayConfig {
        client_ca: Some("ca.pem".into()),
        crl: Some("/var/lib/crl.pem".into()),
        ..base()
    })
    .unwrap();
    assert_eq!(
        explicit.identity.crl,
        Some(CrlSource::File("/var/lib/crl.pem".into()))
    );
}

#[test]
fn event_settings() {
    let ok = [
        (
            "127.0.0.1:0",
            GatewayAddr::Tcp("127.0.0.1:0".parse().unwrap()),
        ),
        ("8089", GatewayAddr::Tcp("127.0.0.1:8089".parse().unwrap())),
        (
            "[::1]:8089",
            GatewayAddr::Tcp("[::1]:8089".parse().unwrap()),
        ),
        (
            "unix:/run/kp.sock",
            GatewayAddr::Unix("/run/kp.sock".into()),
        ),
    ];
    for (text, expected) in ok {
        assert_eq!(parse_gateway(text).unwrap(), expected, "{text}");
    }
    for bad in ["0.0.0.0:8089", "192.0.2.1:80", "unix:", "localhost:80", "x"] {
        assert!(parse_gateway(bad).is_err(), "{bad}");
    }
    let url = parse_upstream("http://127.0.0.1:9000/api/").unwrap();
    assert_eq!(
        (url.authority.as_str(), url.base_path.as_str()),
        ("127.0.0.1:9000", "/api")
    );
    assert_eq!(url.to_string(), "http://127.0.0.1:9000/api");
    for bad in [
        "https://127.0.0.1:9000",
        "http://127.0.0.1",
        "http://:80",
        "http://h:1/a?b",
    ] {
        assert!(parse_upstream(bad).is_err(), "{bad}");
    }
    let raw: RawConnectorConfig = toml::from_str(
        "relay = [\"r:1\"]\nfingerprint = [\"SHA256:AAAA\"]\ngateway = \"off\"\n\
         handlers = \"/srv/handlers\"\nevent_wait = \"5s\"\nevent_timeout = \"1m\"\n",
    )
    .unwrap();
    let raw = RawConnectorConfig {
        fingerprint: vec!["SHA256:".to_string() + &"aa".repeat(32)],
        ..raw
    };
    let config = ConnectorConfig::try_from(raw).unwrap();
    assert_eq!(config.events.gateway, None);
    assert_eq!(config.events.handlers_dir, Some("/srv/handlers".into()));
    assert_eq!(config.events.wait, Duration::from_secs(5));
    assert_eq!(config.events.timeout, Duration::from_secs(60));
    let env = handler_env(&|key| (key == "HOME").then(|| "/root".to_string()));
    assert!(env.contains(&("HOME".into(), "/root".into())));
    assert!(env.contains(&("PATH".into(), DEFAULT_HANDLER_PATH.into())));
    let bad_rule = RawAllowRule {
        identity: "x".into(),
        handlers: vec!["../x".into()],
        ..Default::default()
    };
    assert!(parse_allow_rule(&bad_rule).is_err());
}

#[test]
fn secrets_come_from_files_and_short_ones_are_refused() {
    let dir = std::env::temp_dir().join(format!("kitepipe-config-secrets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let domains = dir.join("domains");
    std::fs::write(
        &domains,
        "# the blog\n\nhttp:*.example.net:9f86d081884c7d659a2f\n  tcp:db.example.org:aa:bb:cc:dd:ee:ff:00\n",
    )
    .unwrap();
    let config = relay(RawRelayConfig {
        listen: vec!["127.0.0.1:0".into()],
        domain: vec!["https:x.example.com:https-secret-0123".into()],
        domain_file: Some(domains.clone()),
        ..Default::default()
    })
    .unwrap();
    let patterns: Vec<&str> = config.domains.iter().map(|d| d.pattern.as_str()).collect();
    assert_eq!(
        patterns,
        ["x.example.com", "*.example.net", "db.example.org"]
    );
    assert_eq!(config.domains[2].secret.expose(), "aa:bb:cc:dd:ee:ff:00");

    std::fs::write(&domains, "http:*.example.net:s3cret\n").unwrap();
    let short = relay(RawRelayConfig {
        listen: vec!["127.0.0.1:0".into()],
        domain_file: Some(domains.clone()),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        short.contains("at least 12") && !short.contains("s3cret"),
        "{short}"
    );
    std::fs::write(&domains, "http:*.example.net\n").unwrap();
    let bad = relay(RawRelayConfig {
        listen: vec!["127.0.0.1:0".into()],
        domain_file: Some(domains.clone()),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(bad.contains(":1"), "the error names the line: {bad}");

    let secret = dir.join("secret");
    std::fs::write(&secret, "  9f86d081884c7d659a2f\n").unwrap();
    let raw = RawConnectorConfig {
        relay: vec!["r:1".into()],
        fingerprint: vec!["SHA256:".to_string() + &"aa".repeat(32)],
        kite: vec!["http:x.example.net=80".into()],
        secret_file: Some(secret.clone()),
        ..Default::default()
    };
    let config = ConnectorConfig::try_from(raw.clone()).unwrap();
    assert_eq!(
        config.kites[0].secret.as_ref().map(Secret::expose),
        Some("9f86d081884c7d659a2f")
    );
    let both = ConnectorConfig::try_from(RawConnectorConfig {
        secret: Some("9f86d081884c7d659a2f".into()),
        ..raw.clone()
    })
    .unwrap_err();
    assert!(both.to_string().contains("not both"), "{both}");
    let short = ConnectorConfig::try_from(RawConnectorConfig {
        secret: Some("hunter2".into()),
        secret_file: None,
        ..raw
    })
    .unwrap_err()
    .to_string();
    assert!(
        short.contains("at least 12") && !short.contains("hunter2"),
        "{short}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_secret_connector_is_named_so_its_secret_can_prove_it() {
    let raw = |kite: &str| RawConnectorConfig {
        relay: vec!["r:1".into()],
        fingerprint: vec!["SHA256:".to_string() + &"aa".repeat(32)],
        kite: vec![kite.into()],
        secret: Some("node-name-secret-1".into()),
        ..Default::default()
    };
    let named = |raw| ConnectorConfig::try_from(raw).unwrap().name;
    assert_eq!(named(raw("http:blog.example.net=80")), "blog.example.net");
    let wildcard = named(raw("http:*.example.net=80"));
    assert!(wildcard.ends_with(".example.net"), "{wildcard}");
    assert!(!wildcard.starts_with("*"), "{wildcard}");
    let given = RawConnectorConfig {
        name: Some("laptop".into()),
        ..raw("http:blog.example.net=80")
    };
    assert_eq!(named(given), "laptop");
}

#[test]
fn connector_kites_need_a_secret_or_an_identity() {
    let raw = RawConnectorConfig {
        relay: vec!["r:1".into()],
        fingerprint: vec!["SHA256:".to_string() + &"aa".repeat(32)],
        kite: vec!["http:x.example.net=80".into()],
        ..Default::default()
    };
    let err = ConnectorConfig::try_from(raw.clone())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--secret") && err.contains("--identity"),
        "{err}"
    );
    let missing = ConnectorConfig::try_from(RawConnectorConfig {
        identity: Some("/nonexistent/identity".into()),
        ..raw.clone()
    })
    .unwrap_err();
    assert!(
        matches!(missing, ConfigError::Identity { .. }),
        "{missing:?}"
    );
    let lone_cert = ConnectorConfig::try_from(RawConnectorConfig {
        cert: Some("cert.pem".into()),
        ..raw
    })
    .unwrap_err();
    assert!(lone_cert.to_string().contains("go together"), "{lone_cert}");
}

#[test]
fn gateway_origins_and_the_relay_token_file() {
    assert_eq!(
        parse_origin(" HTTPS://App.Example.net:8443 ").unwrap(),
        "https://app.example.net:8443"
    );
    for bad in ["app.example.net", "https://", "https://a/b", "://a", "*"] {
        assert!(parse_origin(bad).is_err(), "{bad}");
    }
    let relay = |raw: RawRelayConfig| {
        RelayConfig::try_from(RawRelayConfig {
            listen: vec!["127.0.0.1:0".into()],
            state_dir: Some("/state".into()),
            ..raw
        })
        .unwrap()
    };
    let default = relay(RawRelayConfig::default());
    assert_eq!(
        default.events.gateway_token_file,
        Some(PathBuf::from("/state/gateway-token"))
    );
    let open = relay(RawRelayConfig {
        insecure_gateway_without_token: Some(true),
        ..Default::default()
    });
    assert_eq!(open.events.gateway_token_file, None);
    let connector = ConnectorConfig::try_from(RawConnectorConfig {
        relay: vec!["relay.example.net:8443".into()],
        fingerprint: vec!["SHA256:".to_string() + &"aa".repeat(32)],
        events: RawEventConfig {
            gateway_origin: vec!["http://localhost:3000".into()],
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap();
    assert_eq!(connector.events.gateway_token_file, None);
    assert_eq!(connector.events.gateway_origins, ["http://localhost:3000"]);
}

#[test]
fn acme_settings_are_validated() {
    let acme = |more: RawRelayConfig| {
        relay(RawRelayConfig {
            listen: vec!["127.0.0.1:0".into()],
            http: vec!["127.0.0.1:0".into()],
            https: vec!["127.0.0.1:0".into()],
            acme: Some(true),
            ..more
        })
    };
    let config = acme(RawRelayConfig::default()).unwrap();
    let on = config.acme.expect("--acme on");
    assert_eq!(
        on.directory,
        "https://acme-v02.api.letsencrypt.org/directory"
    );
    assert_eq!(on.challenge, crate::config::AcmeChallenge::Auto);
    assert_eq!(on.renew_before, Duration::from_secs(30 * 24 * 3600));
    assert_eq!(on.dir, std::path::Path::new("/nonexistent/acme"));
    let staging = acme(RawRelayConfig {
        acme_staging: Some(true),
        acme_challenge: Some("http-01".into()),
        acme_renew_before: Some("2h".into()),
        ..Default::default()
    })
    .unwrap()
    .acme
    .unwrap();
    assert!(staging.directory.contains("acme-staging-v02"));
    assert_eq!(staging.challenge, crate::config::AcmeChallenge::Http01);
    assert_eq!(staging.renew_before, Duration::from_secs(7200));
    // Off unless asked.
    assert!(
        relay(RawRelayConfig {
            listen: vec!["127.0.0.1:0".into()],
            ..Default::default()
        })
        .unwrap()
        .acme
        .is_none()
    );
    let http_only = || RawRelayConfig {
        listen: vec!["127.0.0.1:0".into()],
        http: vec!["127.0.0.1:0".into()],
        acme: Some(true),
        ..Default::default()
    };
    let https_only = || RawRelayConfig {
        listen: vec!["127.0.0.1:0".into()],
        https: vec!["127.0.0.1:0".into()],
        acme: Some(true),
        ..Default::default()
    };
    let refused: [(RawRelayConfig, &str); 6] = [
        (http_only(), "--https"),
        (
            RawRelayConfig {
                acme_challenge: Some("http-01".into()),
                ..https_only()
            },
            "--http",
        ),
        (
            RawRelayConfig {
                acme_challenge: Some("dns-01".into()),
                ..https_only()
            },
            "tls-alpn-01, http-01 or auto",
        ),
        (
            RawRelayConfig {
                acme_directory: Some("http://ca.example/dir".into()),
                ..https_only()
            },
            "https://",
        ),
        (
            RawRelayConfig {
                acme_directory: Some("https://ca.example/dir".into()),
                acme_staging: Some(true),
                ..https_only()
            },
            "exclude each other",
        ),
        (
            RawRelayConfig {
                acme_email: Some("not an address".into()),
                ..https_only()
            },
            "e-mail",
        ),
    ];
    for (raw, why) in refused {
        let err = relay(raw).expect_err(why).to_string();
        assert!(err.contains(why), "{err} lacks {why}");
    }
    // tls-alpn-01 alone needs no HTTP listener.
    let alpn = relay(RawRelayConfig {
        acme_challenge: Some("tls-alpn-01".into()),
        ..https_only()
    })
    .unwrap();
    assert_eq!(
        alpn.acme.unwrap().challenge,
        crate::config::AcmeChallenge::TlsAlpn01
    );
}

#[test]
fn kite_http_rules_read_the_htpasswd_file_and_are_checked() {
    let config = |extra: &str| {
        let file = TomlFile::new(&format!(
            "[[kite]]\nname = \"a.example.net\"\nprotocol = \"http\"\ntarget = \"8000\"\n{extra}\n"
        ));
        let raw = RawConnectorConfig::load(Some(file.path()), &Default::default()).unwrap();
        ConnectorConfig::try_from(RawConnectorConfig {
            relay: vec!["r:1".into()],
            fingerprint: vec!["SHA256:".to_string() + &"aa".repeat(32)],
            secret: Some("9f86d081884c7d659a2f".into()),
            ..raw
        })
    };
    // `htpasswd -nbB u pw`
    let good = TomlFile::new(
        "# the team\n\nu:$2y$05$i8GgOYQdRdwWE4vd1BtQou38w9yCUMjZ/3KVUmr.o0.Og3EAq2W3y\n",
    );
    let kites = config(&format!(
        "basic_auth = {:?}\nrate_limit = 5\nforwarded_host = true",
        good.path()
    ))
    .unwrap()
    .kites;
    assert_eq!(
        kites[0].http.basic_auth,
        ["u:$2y$05$i8GgOYQdRdwWE4vd1BtQou38w9yCUMjZ/3KVUmr.o0.Og3EAq2W3y"]
    );
    assert_eq!(kites[0].basic_auth_file.as_deref(), Some(good.path()));
    assert_eq!(kites[0].http.rate_limit, Some(5));

    let md5 = TomlFile::new("u:pw-is-fine\nv:$apr1$x8fV2$0RLJXDUj4dS9JVz4jVoSq1\n");
    for (extra, why) in [
        (
            format!("basic_auth = {:?}", md5.path()),
            "line 1: a plain-text or crypt(3) password is not accepted",
        ),
        (
            "basic_auth = \"/nonexistent/htpasswd\"".to_string(),
            "cannot read /nonexistent/htpasswd",
        ),
        ("rate_limit = 0".to_string(), "rate_limit 0 is outside"),
        (
            "request_headers = { set = { \"Content-Length\" = \"1\" } }".to_string(),
            "Content-Length cannot be edited",
        ),
        (
            "auth_realm = \"Team\"".to_string(),
            "auth_realm without basic_auth",
        ),
    ] {
        let text = config(&extra).unwrap_err().to_string();
        assert!(text.contains(why), "{extra}: {text}");
    }
}

#[test]
fn tls_cert_pairs_are_cert_colon_key() {
    let config = relay(RawRelayConfig {
        listen: vec!["127.0.0.1:8443".into()],
        tls_cert: vec!["/etc/a.pem:/etc/a-key.pem".into(), "b.pem:b-key.pem".into()],
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        config.tls_certs,
        [
            super::TlsCertFiles {
                cert: "/etc/a.pem".into(),
                key: "/etc/a-key.pem".into(),
            },
            super::TlsCertFiles {
                cert: "b.pem".into(),
                key: "b-key.pem".into(),
            },
        ]
    );
    for bad in ["a.pem", "a.pem:", ":a-key.pem"] {
        let err = relay(RawRelayConfig {
            listen: vec!["127.0.0.1:8443".into()],
            tls_cert: vec![bad.into()],
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("tls-cert"), "{bad}: {err}");
    }
}

/// The relay's default state dir: systemd's `STATE_DIRECTORY` first (its
/// first entry), then `XDG_STATE_HOME`, then `HOME`.
#[test]
fn default_state_dir_prefers_systemd_state_directory() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[
                ("STATE_DIRECTORY", "/var/lib/kitepipe"),
                ("XDG_STATE_HOME", "/x"),
                ("HOME", "/home/u"),
            ],
            "/var/lib/kitepipe",
        ),
        (
            &[
                ("STATE_DIRECTORY", "/var/lib/a:/var/lib/b"),
                ("HOME", "/home/u"),
            ],
            "/var/lib/a",
        ),
        (
            &[("STATE_DIRECTORY", ""), ("XDG_STATE_HOME", "/x")],
            "/x/kitepipe",
        ),
        (&[("HOME", "/home/u")], "/home/u/.local/state/kitepipe"),
        (&[], ".kitepipe"),
    ];
    for (vars, want) in cases {
        let env = |key: &str| {
            vars.iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.to_string())
        };
        assert_eq!(default_state_dir(&env), PathBuf::from(want), "{vars:?}");
    }
}

/// `--protocol pagekite`: plaintext to a PageKite front-end, so no relay
/// verification, no certificate and no remote operations; a tcp kite
/// needs its port (it is `raw-PORT`), and rules only a kitepipe relay
/// enforces are refused rather than silently dropped.
#[test]
fn the_pagekite_protocol_refuses_what_it_cannot_do() {
    let raw = RawConnectorConfig {
        relay: vec!["fe.example.net:443".into()],
        protocol: Some("PageKite".into()),
        secret: Some("a-pagekite-secret-long-enough".into()),
        kite: vec![
            "http:blog.example.net=8000".into(),
            "tcp:ssh.example.net:22=127.0.0.1:22".into(),
        ],
        ..Default::default()
    };
    let config = ConnectorConfig::try_from(raw.clone()).unwrap();
    assert_eq!(config.protocol, LinkProtocol::PageKite);
    assert_eq!(config.relays[0].trust, None);
    assert_eq!(config.kites.len(), 2);
    let refused = |raw: RawConnectorConfig| ConnectorConfig::try_from(raw).unwrap_err().to_string();
    for (bad, needle) in [
        (
            RawConnectorConfig {
                fingerprint: vec!["SHA256:".to_string() + &"aa".repeat(32)],
                ..raw.clone()
            },
            "--fingerprint cannot be used with --protocol pagekite",
        ),
        (
            RawConnectorConfig {
                ca: Some("/ca.pem".into()),
                ..raw.clone()
            },
            "--ca cannot be used",
        ),
        (
            RawConnectorConfig {
                identity: Some("/id".into()),
                ..raw.clone()
            },
            "--identity/--cert/--key cannot be used",
        ),
        (
            RawConnectorConfig {
                allow_remote: Some("exec".into()),
                ..raw.clone()
            },
            "--allow-remote cannot be used",
        ),
        (
            RawConnectorConfig {
                kite: vec!["tcp:ssh.example.net:0=22".into()],
                ..raw.clone()
            },
            "needs its public port",
        ),
        (
            RawConnectorConfig {
                kite: vec![RawKiteSpec::Table(Box::new(RawKite {
                    name: "blog.example.net".into(),
                    protocol: "http".into(),
                    target: "8000".into(),
                    deny: vec!["192.0.2.0/24".into()],
                    ..Default::default()
                }))],
                ..raw.clone()
            },
            "a PageKite front-end never gets them",
        ),
        (
            RawConnectorConfig {
                kite: vec![RawKiteSpec::Table(Box::new(RawKite {
                    name: "blog.example.net".into(),
                    protocol: "http".into(),
                    target: "8000".into(),
                    rate_limit: Some(5),
                    ..Default::default()
                }))],
                ..raw.clone()
            },
            "a PageKite front-end never gets them",
        ),
        (
            RawConnectorConfig {
                protocol: Some("ngrok".into()),
                ..raw.clone()
            },
            "kitepipe (the default) or pagekite",
        ),
    ] {
        let err = refused(bad);
        assert!(err.contains(needle), "{needle:?} in {err}");
    }
    // The default stays kitepipe, which still needs a way to verify.
    let kitepipe = refused(RawConnectorConfig {
        protocol: None,
        ..raw
    });
    assert!(kitepipe.contains("--fingerprint"), "{kitepipe}");
}
