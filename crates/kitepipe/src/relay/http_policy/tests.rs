use std::collections::BTreeMap;

use base64::Engine;
use kitepipe_proto::http_policy::{MAX_HEADER_EDITS, MAX_HEADER_VALUE_LEN, MAX_RATE};

use super::*;

fn ip(text: &str) -> IpAddr {
    text.parse().expect("literal")
}

fn basic(user: &str, password: &str) -> Vec<u8> {
    let encoded =
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}").as_bytes());
    format!("Basic {encoded}").into_bytes()
}

fn with_users(lines: &[String]) -> HttpPolicy {
    HttpPolicy {
        basic_auth: lines.to_vec(),
        ..HttpPolicy::default()
    }
}

fn headers(set: &[(&str, &str)], remove: &[&str]) -> HeaderRules {
    HeaderRules {
        set: set
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect::<BTreeMap<_, _>>(),
        remove: remove.iter().map(|name| name.to_string()).collect(),
    }
}

#[test]
fn hostile_rules_are_refused_with_the_reason() {
    let bcrypt = bcrypt::hash("pw", 4).expect("hash");
    let many: Vec<String> = (0..10_000).map(|n| format!("u{n}:{bcrypt}")).collect();
    let cases: Vec<(HttpPolicy, &str)> = vec![
        (with_users(&many), "more than 1024 users"),
        (with_users(&["u:$apr1$x$y".into()]), "MD5"),
        (with_users(&["u:plain".into()]), "plain-text"),
        (
            HttpPolicy {
                auth_realm: Some("a\"b".into()),
                ..with_users(&[format!("u:{bcrypt}")])
            },
            "auth_realm",
        ),
        (
            HttpPolicy {
                auth_realm: Some("r".repeat(1 << 20)),
                ..with_users(&[format!("u:{bcrypt}")])
            },
            "auth_realm",
        ),
        (
            HttpPolicy {
                auth_realm: Some("r".into()),
                ..HttpPolicy::default()
            },
            "without basic_auth",
        ),
        (
            HttpPolicy {
                rate_limit: Some(0),
                ..HttpPolicy::default()
            },
            "rate_limit 0",
        ),
        (
            HttpPolicy {
                rate_limit: Some(MAX_RATE + 1),
                ..HttpPolicy::default()
            },
            "rate_limit",
        ),
        (
            HttpPolicy {
                rate_burst: Some(5),
                ..HttpPolicy::default()
            },
            "without rate_limit",
        ),
        (
            HttpPolicy {
                max_connections: Some(0),
                ..HttpPolicy::default()
            },
            "max_connections",
        ),
        (
            HttpPolicy {
                request_headers: headers(&[("X-A", "b\r\nX-Evil: 1")], &[]),
                ..HttpPolicy::default()
            },
            "CR, LF or NUL",
        ),
        (
            HttpPolicy {
                response_headers: headers(&[("X-A", "b\0")], &[]),
                ..HttpPolicy::default()
            },
            "CR, LF or NUL",
        ),
        (
            HttpPolicy {
                request_headers: headers(&[("Content-Length", "0")], &[]),
                ..HttpPolicy::default()
            },
            "Content-Length cannot be edited",
        ),
        (
            HttpPolicy {
                response_headers: headers(&[], &["transfer-encoding"]),
                ..HttpPolicy::default()
            },
            "cannot be edited",
        ),
        (
            HttpPolicy {
                request_headers: headers(&[], &["X-Forwarded-For"]),
                ..HttpPolicy::default()
            },
            "cannot be edited",
        ),
        (
            HttpPolicy {
                request_headers: headers(&[], &["Proxy-Authorization"]),
                ..HttpPolicy::default()
            },
            "cannot be edited",
        ),
        (
            HttpPolicy {
                request_headers: headers(&[("Bad Name", "x")], &[]),
                ..HttpPolicy::default()
            },
            "not a valid header name",
        ),
        (
            HttpPolicy {
                request_headers: headers(&[("X-Big", &"v".repeat(MAX_HEADER_VALUE_LEN + 1))], &[]),
                ..HttpPolicy::default()
            },
            "longer than",
        ),
    ];
    for (policy, want) in cases {
        let err = HttpRules::new(policy).expect_err(want);
        assert!(err.contains(want), "want {want:?} in {err:?}");
    }
    let many: Vec<String> = (0..=MAX_HEADER_EDITS).map(|n| format!("X-{n}")).collect();
    let policy = HttpPolicy {
        request_headers: HeaderRules {
            set: BTreeMap::new(),
            remove: many,
        },
        ..HttpPolicy::default()
    };
    assert!(HttpRules::new(policy).is_err());
}

#[tokio::test(start_paused = true)]
async fn rate_limit_per_address_with_retry_after() {
    let rules = HttpRules::new(HttpPolicy {
        rate_limit: Some(5),
        rate_burst: Some(5),
        ..HttpPolicy::default()
    })
    .expect("valid");
    let visitor = ip("192.0.2.1");
    for _ in 0..5 {
        rules
            .request(visitor, None)
            .await
            .expect("within the burst");
    }
    assert_eq!(
        rules.request(visitor, None).await,
        Err(Refusal::TooManyRequests { retry_after: 1 })
    );
    rules
        .request(ip("192.0.2.2"), None)
        .await
        .expect("another address has its own bucket");
    // One IPv6 host is its /64.
    for _ in 0..5 {
        rules.request(ip("2001:db8::1"), None).await.expect("burst");
    }
    assert!(rules.request(ip("2001:db8::2"), None).await.is_err());
    assert!(rules.request(ip("2001:db8:0:1::1"), None).await.is_ok());
    tokio::time::advance(Duration::from_millis(400)).await;
    rules.request(visitor, None).await.expect("two tokens back");
    tokio::time::advance(Duration::from_secs(10)).await;
    for _ in 0..5 {
        rules.request(visitor, None).await.expect("full again");
    }
    let slow = HttpRules::new(HttpPolicy {
        rate_limit: Some(1),
        rate_burst: Some(1),
        ..HttpPolicy::default()
    })
    .expect("valid");
    slow.request(visitor, None).await.expect("first");
    assert_eq!(
        slow.request(visitor, None).await,
        Err(Refusal::TooManyRequests { retry_after: 1 })
    );
}

#[tokio::test(start_paused = true)]
async fn buckets_stay_bounded_under_many_addresses() {
    let rules = HttpRules::new(HttpPolicy {
        rate_limit: Some(1),
        rate_burst: Some(2),
        ..HttpPolicy::default()
    })
    .expect("valid");
    for n in 0..(MAX_BUCKETS as u32 + 500) {
        let addr = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n));
        rules.request(addr, None).await.expect("fresh address");
    }
    assert!(lock(&rules.buckets).len() <= MAX_BUCKETS);
}

#[tokio::test]
async fn basic_auth_bcrypt_and_argon2() {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let bcrypt = bcrypt::hash("b-pass", 4).expect("hash");
    let salt = SaltString::encode_b64(b"0123456789abcdef").expect("salt");
    let params = argon2::Params::new(1024, 1, 1, None).expect("params");
    let argon2 = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(b"a-pass", &salt)
        .expect("hash")
        .to_string();
    let rules = HttpRules::new(HttpPolicy {
        auth_realm: Some("Team".into()),
        ..with_users(&[format!("bob:{bcrypt}"), format!("alice:{argon2}")])
    })
    .expect("valid");
    let visitor = ip("192.0.2.1");
    let unauthorized = Err(Refusal::Unauthorized {
        realm: "Team".into(),
    });
    assert_eq!(rules.request(visitor, None).await, unauthorized);
    assert_eq!(
        rules.request(visitor, Some(b"Bearer x")).await,
        unauthorized
    );
    assert_eq!(
        rules.request(visitor, Some(&basic("bob", "a-pass"))).await,
        unauthorized
    );
    assert_eq!(
        rules
            .request(visitor, Some(&basic("mallory", "b-pass")))
            .await,
        unauthorized
    );
    rules
        .request(visitor, Some(&basic("bob", "b-pass")))
        .await
        .expect("bob");
    rules
        .request(visitor, Some(&basic("alice", "a-pass")))
        .await
        .expect("alice");
    assert_eq!(lock(&rules.auth.as_ref().expect("auth").logins).len(), 2);
    rules
        .request(visitor, Some(b"basic Ym9iOmItcGFzcw=="))
        .await
        .expect("scheme in any case, cached");
}

#[tokio::test]
async fn failed_logins_run_out_before_hashing() {
    let bcrypt = bcrypt::hash("right", 4).expect("hash");
    let rules = HttpRules::new(with_users(&[format!("u:{bcrypt}")])).expect("valid");
    let stranger = ip("198.51.100.9");
    let wrong = basic("u", "wrong");
    for _ in 0..AUTH_FAILURE_BURST as usize {
        assert!(matches!(
            rules.request(stranger, Some(&wrong)).await,
            Err(Refusal::Unauthorized { .. })
        ));
    }
    assert!(matches!(
        rules.request(stranger, Some(&basic("u", "right"))).await,
        Err(Refusal::TooManyRequests { .. })
    ));
    rules
        .request(ip("198.51.100.10"), Some(&basic("u", "right")))
        .await
        .expect("another address logs in");
}

#[test]
fn connection_permits_count_and_release() {
    let rules = HttpRules::new(HttpPolicy {
        max_connections: Some(2),
        ..HttpPolicy::default()
    })
    .expect("valid");
    let first = rules.connection().expect("first");
    let _second = rules.connection().expect("second");
    assert_eq!(
        rules.connection().err(),
        Some(Refusal::TooManyConnections { retry_after: 1 })
    );
    drop(first);
    rules.connection().expect("a permit came back");
    assert!(HttpRules::default().connection().is_ok());
}

#[test]
fn basic_credentials_parse() {
    assert_eq!(
        basic_credentials(b"Basic dTpwOnc="),
        Some(("u".to_string(), b"p:w".to_vec()))
    );
    assert_eq!(basic_credentials(b"Basic !!!"), None);
    assert_eq!(basic_credentials(b"Basic dXNlcg=="), None);
    assert_eq!(basic_credentials(b"Bas"), None);
}
