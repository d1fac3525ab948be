//! The configuration shape: every setting reachable by flag, `KITEPIPE_*`
//! variable and TOML key, in that precedence; `[[kite]]` tables serving a
//! real kite; `kitepipe config check` printing the effective settings with
//! secrets redacted, and refusing bad files by name.

mod support;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};

use support::*;

const SECRET: &str = "config-test-secret-0123";

/// A relay fingerprint for connectors that are only checked, never started.
fn fingerprint() -> String {
    format!("SHA256:{}", "ab".repeat(32))
}

/// Runs `kitepipe ARGS` with `env` (and no other `KITEPIPE_*` variable of
/// the test's environment); returns (exit code, stdout, stderr).
fn kitepipe(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut command = Command::new(BIN);
    for (key, _) in std::env::vars() {
        if key.starts_with("KITEPIPE_") {
            command.env_remove(key);
        }
    }
    let out = command
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run kitepipe");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `kitepipe config check KIND ARGS`, asserted to succeed; its stdout.
fn check_ok(kind: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut all = vec!["config", "check", kind];
    all.extend_from_slice(args);
    let (code, out, err) = kitepipe(&all, env);
    assert_eq!(code, 0, "config check {kind} {args:?} failed:\n{err}");
    out
}

/// `kitepipe config check KIND ARGS`, asserted to fail as a config error
/// (exit 2) printing nothing on stdout; its stderr.
fn check_fails(kind: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut all = vec!["config", "check", kind];
    all.extend_from_slice(args);
    let (code, out, err) = kitepipe(&all, env);
    assert_eq!(code, 2, "config check {kind} {args:?}: {out}\n{err}");
    assert!(
        out.is_empty(),
        "an invalid config prints only the error: {out}"
    );
    err
}

/// The value line `KEY = ...` of `check` output.
fn setting<'a>(out: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key} = ");
    out.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {key} in:\n{out}"))
}

/// Writes `text` to `NAME` in `dir`; returns its path as an argument.
/// A connector's arguments for `config check connect` with a `--config` file.
fn connect_args<'a>(fp: &'a str, file: &'a str) -> [&'a str; 5] {
    ["r.example.net:8443", "--fingerprint", fp, "--config", file]
}

fn write(dir: &TempDir, name: &str, text: &str) -> String {
    let file = dir.path().join(name);
    std::fs::write(&file, text).unwrap();
    path(&file)
}

/// One setting walked through its three sources: the default, then the
/// file over it, the variable over the file, the flag over the variable.
fn walk(kind: &str, base: &[&str], key: &str, values: [&str; 4]) {
    let [default, file_value, env_value, flag_value] = values;
    let dir = TempDir::new("config-walk");
    let flag = format!("--{}", key.replace('_', "-"));
    let var = format!("KITEPIPE_{}", key.to_ascii_uppercase());
    let file_toml = if file_value.starts_with('[') {
        format!("{key} = {file_value}\n")
    } else {
        format!("{key} = {file_value:?}\n")
    };
    let file = write(&dir, "config.toml", &file_toml);
    let quoted = |value: &str| {
        if value.starts_with('[') {
            value.to_string()
        } else {
            format!("{value:?}")
        }
    };
    let unquoted = |value: &str| value.trim_matches(['[', ']', '"']).to_string();

    let out = check_ok(kind, base, &[]);
    assert_eq!(setting(&out, key), quoted(default), "{key}: default");
    let with_file: Vec<&str> = base.iter().copied().chain(["--config", &file]).collect();
    let out = check_ok(kind, &with_file, &[]);
    assert_eq!(setting(&out, key), quoted(file_value), "{key}: file");
    let env_plain = unquoted(env_value);
    let env = [(var.as_str(), env_plain.as_str())];
    let out = check_ok(kind, &with_file, &env);
    assert_eq!(
        setting(&out, key),
        quoted(env_value),
        "{key}: {var} over the file"
    );
    let flag_plain = unquoted(flag_value);
    let with_flag: Vec<&str> = with_file
        .iter()
        .copied()
        .chain([flag.as_str(), flag_plain.as_str()])
        .collect();
    let out = check_ok(kind, &with_flag, &env);
    assert_eq!(
        setting(&out, key),
        quoted(flag_value),
        "{key}: {flag} over {var}"
    );
}

#[test]
fn a_setting_comes_from_its_flag_over_its_variable_over_the_file_over_the_default() {
    walk("relay", &[], "heartbeat", ["15s", "5s", "6s", "7s"]);
    let fp = fingerprint();
    let connector = ["r.example.net:8443", "--fingerprint", &fp];
    walk(
        "connect",
        &connector,
        "max_backoff",
        ["15s", "20s", "30s", "1m"],
    );
    walk(
        "connect",
        &connector,
        "event_timeout",
        ["30s", "40s", "50s", "1m 10s"],
    );
    // A list: the file's, or the variable's, or the flags' (never mixed).
    let dir = TempDir::new("config-list");
    let file = write(
        &dir,
        "relay.toml",
        "gateway_origin = [\"https://file.example\", \"https://file2.example\"]\n",
    );
    let out = check_ok("relay", &["--config", &file], &[]);
    assert_eq!(
        setting(&out, "gateway_origin"),
        r#"["https://file.example", "https://file2.example"]"#
    );
    let env = [("KITEPIPE_GATEWAY_ORIGIN", "https://env.example")];
    let out = check_ok("relay", &["--config", &file], &env);
    assert_eq!(
        setting(&out, "gateway_origin"),
        r#"["https://env.example"]"#
    );
    let flags = [
        "--config",
        &file,
        "--gateway-origin",
        "https://a.example",
        "--gateway-origin",
        "https://b.example",
    ];
    let out = check_ok("relay", &flags, &env);
    assert_eq!(
        setting(&out, "gateway_origin"),
        r#"["https://a.example", "https://b.example"]"#
    );
    // A boolean: from the file, turned off again by the variable or the flag.
    let file = write(&dir, "bool.toml", "http_connect = true\n");
    let out = check_ok("relay", &[], &[]);
    assert_eq!(setting(&out, "http_connect"), "false");
    let out = check_ok("relay", &["--config", &file], &[]);
    assert_eq!(setting(&out, "http_connect"), "true");
    let env = [("KITEPIPE_HTTP_CONNECT", "false")];
    let out = check_ok("relay", &["--config", &file], &env);
    assert_eq!(setting(&out, "http_connect"), "false");
    let out = check_ok("relay", &["--http-connect"], &[]);
    assert_eq!(setting(&out, "http_connect"), "true");
    let out = check_ok("relay", &["--config", &file, "--http-connect=false"], &[]);
    assert_eq!(setting(&out, "http_connect"), "false");
    // PageKite back-ends: off unless the operator says so.
    let out = check_ok("relay", &[], &[]);
    assert_eq!(setting(&out, "pagekite"), "false");
    let file = write(&dir, "pagekite.toml", "pagekite = true\n");
    let out = check_ok("relay", &["--config", &file], &[]);
    assert_eq!(setting(&out, "pagekite"), "true");
    let out = check_ok("relay", &[], &[("KITEPIPE_PAGEKITE", "true")]);
    assert_eq!(setting(&out, "pagekite"), "true");
    let out = check_ok("relay", &["--config", &file, "--pagekite=false"], &[]);
    assert_eq!(setting(&out, "pagekite"), "false");
}

/// The long options of `kitepipe ARGS --help`, each with the variable its
/// help names (`[env: NAME=...]`), and the positional arguments' variables.
fn options(args: &[&str]) -> Vec<(String, Option<String>)> {
    let mut all = args.to_vec();
    all.push("--help");
    let help = kitepipe_ok(&all);
    let mut options: Vec<(String, Option<String>)> = Vec::new();
    for line in help.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        // Options and arguments are indented 2 to 6 spaces, their help 10.
        let name = if !(2..=6).contains(&indent) {
            None
        } else if let Some(rest) = trimmed.strip_prefix("--") {
            Some(format!(
                "--{}",
                rest.split([' ', '[', '=']).next().unwrap_or("")
            ))
        } else if let Some(rest) = trimmed.strip_prefix('-') {
            rest.split_once(", --")
                .map(|(_, long)| format!("--{}", long.split([' ', '[', '=']).next().unwrap_or("")))
        } else if trimmed.starts_with('[') && trimmed.contains("...") {
            // A positional argument, e.g. `[RELAY]...`.
            Some(
                trimmed
                    .split(']')
                    .next()
                    .unwrap_or("")
                    .trim_start_matches('[')
                    .to_string(),
            )
        } else {
            None
        };
        if let Some(name) = name {
            options.push((name, None));
        }
        // `[env: NAME=VALUE]` (or `[env: NAME]` when its value is hidden),
        // on its own line in long help, at the end of the option's in short.
        if let Some((_, env)) = trimmed.split_once("[env: ")
            && let Some(last) = options.last_mut()
        {
            last.1 = Some(env.split(['=', ']']).next().unwrap_or("").to_string());
        }
    }
    options
}

/// Every setting of `kitepipe relay` and `kitepipe connect` has its
/// `KITEPIPE_*` variable, is accepted as a TOML key, and is shown by
/// `config check`: a setting added later cannot skip one of them.
#[test]
fn every_setting_has_a_variable_and_a_toml_key() {
    let global: BTreeSet<String> = options(&[]).into_iter().map(|(name, _)| name).collect();
    let fp = fingerprint();
    for (kind, base) in [
        ("relay", vec![]),
        (
            "connect",
            vec!["r.example.net:8443", "--fingerprint", fp.as_str()],
        ),
    ] {
        let settings: Vec<(String, Option<String>)> = options(&[kind])
            .into_iter()
            .filter(|(name, _)| !global.contains(name) && name != "--help" && name != "--version")
            .collect();
        assert!(
            settings.len() > 10,
            "{kind}: too few settings found: {settings:?}"
        );
        // `config check` takes the same flags as the command.
        let checked: Vec<(String, Option<String>)> = options(&["config", "check", kind])
            .into_iter()
            .filter(|(name, _)| !global.contains(name) && name != "--help" && name != "--version")
            .collect();
        assert_eq!(settings, checked, "{kind}: config check takes other flags");
        let out = check_ok(kind, &base, &[]);
        let dir = TempDir::new("config-keys");
        for (name, env) in &settings {
            let key = name
                .trim_start_matches("--")
                .replace('-', "_")
                .to_ascii_lowercase();
            let expected = format!("KITEPIPE_{}", key.to_ascii_uppercase());
            assert_eq!(env.as_deref(), Some(expected.as_str()), "{kind} {name}");
            if key == "config" {
                continue;
            }
            // Shown by config check, with a value or as not set.
            assert!(
                out.lines()
                    .any(|line| line.starts_with(&format!("{key} = "))
                        || line == format!("# {key}: not set")),
                "{kind}: config check does not show {key}:\n{out}"
            );
            // Accepted in the file: an unknown key is refused before any
            // value is looked at, so a value of the wrong type proves it.
            let file = write(&dir, &format!("{key}.toml"), &format!("{key} = {{}}\n"));
            let mut args = base.clone();
            args.extend(["--config", file.as_str()]);
            let err = check_fails(kind, &args, &[]);
            assert!(
                !err.contains("unknown key"),
                "{kind}: {key} is no TOML key: {err}"
            );
            assert!(err.contains("invalid config file"), "{kind} {key}: {err}");
        }
    }
}

/// `[[kite]]` tables serve kites end to end; the deprecated string form
/// still works, mixed with tables in one list, and is warned about once,
/// saying what to write instead.
#[test]
fn kite_tables_and_the_old_strings_serve_kites_through_the_relay() {
    let relay = Relay::new()
        .domain(&format!("http,tcp:*.example.net:{SECRET}"))
        .start();
    let backend = Backend::start("http");
    let addr = backend.addr();
    let dir = TempDir::new("config-kites");
    let tables = write(
        &dir,
        "tables.toml",
        &format!(
            "secret = {SECRET:?}\n\n\
             [[kite]]\n\
             name = \"blog.example.net\"\n\
             protocol = \"http\"\n\
             target = {addr:?}\n"
        ),
    );
    // Started: the relay confirmed the kites.
    let connector = Connector::new(&relay).args(&["--config", &tables]).start();
    let body = curl_ok(&["-H", "Host: blog.example.net", &relay.http_url()]);
    assert_eq!(body, "hello from backend\n");
    let out = connector.output();
    assert!(
        !out.contains("deprecated") && !out.contains(SECRET),
        "{out}"
    );

    let mixed = write(
        &dir,
        "mixed.toml",
        &format!(
            "secret = {SECRET:?}\n\
             kite = [\"http:old.example.net={addr}\", \"http:old2.example.net={addr}\",\n\
             {{ name = \"new.example.net\", protocol = \"http\", target = {addr:?} }}]\n"
        ),
    );
    let connector = Connector::new(&relay)
        .args(&["--config", &mixed, "--name", "mixed-connector"])
        .start();
    for host in ["old.example.net", "old2.example.net", "new.example.net"] {
        let body = curl_ok(&["-H", &format!("Host: {host}"), &relay.http_url()]);
        assert_eq!(body, "hello from backend\n", "{host}");
    }
    let out = connector.output();
    assert_eq!(out.matches("deprecated").count(), 1, "{out}");
    assert!(
        out.contains("[[kite]]") && out.contains("name = \"old.example.net\""),
        "the warning shows the table to write: {out}"
    );
    assert!(!out.contains(SECRET), "{out}");
}

#[test]
fn unknown_keys_are_refused_with_the_key_and_the_file_named() {
    let dir = TempDir::new("config-unknown");
    let fp = fingerprint();
    let base = ["r.example.net:8443", "--fingerprint", fp.as_str()];
    let top = write(&dir, "top.toml", "heartbeat = \"5s\"\nkites = []\n");
    let mut args = base.to_vec();
    args.extend(["--config", top.as_str()]);
    let err = check_fails("connect", &args, &[]);
    assert!(err.contains("\"kites\"") && err.contains(&top), "{err}");

    let table = write(
        &dir,
        "table.toml",
        "[[kite]]\nname = \"blog.example.net\"\nprotocol = \"http\"\ntarget = \"8000\"\ncolour = \"blue\"\n",
    );
    let mut args = base.to_vec();
    args.extend(["--config", table.as_str()]);
    let err = check_fails("connect", &args, &[]);
    assert!(err.contains("colour") && err.contains(&table), "{err}");

    let relay = write(
        &dir,
        "relay.toml",
        "[[allow]]\nidentity = \"x\"\nkite = []\n",
    );
    let err = check_fails("relay", &["--config", &relay], &[]);
    assert!(err.contains("kite") && err.contains(&relay), "{err}");
    let relay = write(&dir, "relay2.toml", "listen_on = [\"127.0.0.1:0\"]\n");
    let err = check_fails("relay", &["--config", &relay], &[]);
    assert!(
        err.contains("\"listen_on\"") && err.contains(&relay),
        "{err}"
    );
}

/// No secret reaches `config check`'s output, from any source: a domain
/// flag, a domain in the file, KITEPIPE_SECRET, the secret in the file, a
/// secret file's contents; nor its error when a secret's value is wrong.
#[test]
fn config_check_redacts_every_secret() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("config-secrets");
    let flag_secret = "flag-domain-secret-0001";
    let file_secret = "file-domain-secret-0002";
    let relay_file = write(
        &dir,
        "relay.toml",
        &format!("domain = [\"tcp:*.example.org:{file_secret}\"]\n"),
    );
    let domain = format!("http:*.example.net:{flag_secret}");
    let (code, out, err) = kitepipe(
        &[
            "config",
            "check",
            "relay",
            "--config",
            &relay_file,
            "--domain",
            &domain,
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    for secret in [flag_secret, file_secret] {
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "{out}\n{err}"
        );
    }
    assert!(out.contains("http:*.example.net:<redacted>"), "{out}");
    let (code, out, err) = kitepipe(&["config", "check", "relay", "--config", &relay_file], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("tcp:*.example.org:<redacted>"), "{out}");
    assert!(!out.contains(file_secret) && !err.contains(file_secret));

    let fp = fingerprint();
    let base = [
        "r.example.net:8443",
        "--fingerprint",
        fp.as_str(),
        "--kite",
        "http:x.example.net=80",
    ];
    let env_secret = "environment-secret-0003";
    let (code, out, err) = kitepipe(
        &[&["config", "check", "connect"][..], &base].concat(),
        &[("KITEPIPE_SECRET", env_secret)],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.contains(env_secret) && !err.contains(env_secret),
        "{out}\n{err}"
    );
    assert_eq!(setting(&out, "secret"), "\"<redacted>\"");

    let toml_secret = "toml-connector-secret-0004";
    let connector_file = write(
        &dir,
        "connector.toml",
        &format!("secret = {toml_secret:?}\n"),
    );
    let (code, out, err) = kitepipe(
        &[
            &["config", "check", "connect", "--config", &connector_file][..],
            &base,
        ]
        .concat(),
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.contains(toml_secret) && !err.contains(toml_secret),
        "{out}\n{err}"
    );

    let file_contents = "secret-file-contents-0005";
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, file_contents).unwrap();
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, out, err) = kitepipe(
        &[
            &[
                "config",
                "check",
                "connect",
                "--secret-file",
                &path(&secret_file),
            ][..],
            &base,
        ]
        .concat(),
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.contains(file_contents) && !err.contains(file_contents),
        "{out}\n{err}"
    );

    // A secret of the wrong shape: the error names the place, not the value.
    let wrong = write(
        &dir,
        "wrong.toml",
        &format!("domain = \"http:*.example.net:{file_secret}\"\n"),
    );
    let err = check_fails("relay", &["--config", &wrong], &[]);
    assert!(!err.contains(file_secret), "{err}");
    assert!(err.contains(&wrong) && err.contains("line 1"), "{err}");
}

#[test]
fn config_check_fails_clearly_on_a_bad_file() {
    let dir = TempDir::new("config-bad");
    let broken = write(
        &dir,
        "broken.toml",
        "listen = [\"127.0.0.1:0\"\nheartbeat = \"5s\"\n",
    );
    let err = check_fails("relay", &["--config", &broken], &[]);
    assert!(
        err.contains("invalid config file") && err.contains(&broken),
        "{err}"
    );
    assert!(err.contains("line "), "the error says where: {err}");

    let missing = path(&dir.path().join("missing.toml"));
    let err = check_fails("relay", &["--config", &missing], &[]);
    assert!(
        err.contains("cannot read config file") && err.contains(&missing),
        "{err}"
    );

    // A valid file with an invalid value: the validator's message.
    let bad_value = write(&dir, "value.toml", "heartbeat = \"10ms\"\n");
    let err = check_fails("relay", &["--config", &bad_value], &[]);
    assert!(
        err.contains("heartbeat") && err.contains("at least 100ms"),
        "{err}"
    );

    // The connector's check validates like starting does.
    let err = check_fails("connect", &["r.example.net:8443"], &[]);
    assert!(err.contains("--fingerprint"), "{err}");
}

/// `proxy_protocol` in a `[[kite]]` table: shown by `config check
/// connect` as written, refused by name for an http kite (which gets
/// X-Forwarded-For instead) and for a version that does not exist.
#[test]
fn kite_proxy_protocol_is_checked_and_shown() {
    let dir = TempDir::new("config-proxy-protocol");
    let fp = fingerprint();
    let kite = |protocol: &str, value: &str| {
        let port = if protocol == "tcp" {
            "port = 15432\n"
        } else {
            ""
        };
        write(
            &dir,
            &format!("{protocol}-{value}.toml"),
            &format!(
                "secret = {SECRET:?}\n\n\
                 [[kite]]\n\
                 name = \"db.example.net\"\n\
                 protocol = \"{protocol}\"\n\
                 {port}\
                 target = \"127.0.0.1:5432\"\n\
                 proxy_protocol = \"{value}\"\n"
            ),
        )
    };
    for (protocol, value) in [("tcp", "v1"), ("tcp", "v2"), ("https", "v2")] {
        let file = kite(protocol, value);
        let out = check_ok("connect", &connect_args(&fp, &file), &[]);
        assert_eq!(
            setting(&out, "proxy_protocol"),
            format!("{value:?}"),
            "{out}"
        );
    }
    for (protocol, value, why) in [
        ("http", "v1", "X-Forwarded-For"),
        ("tcp", "v3", "expected v1 or v2"),
    ] {
        let file = kite(protocol, value);
        let err = check_fails("connect", &connect_args(&fp, &file), &[]);
        assert!(
            err.contains("proxy_protocol") && err.contains(value) && err.contains(why),
            "{protocol} {value}: {err}"
        );
    }
}

/// `allow` and `deny` in a `[[kite]]` table: accepted lists (IPv4, IPv6,
/// bare addresses) are shown by `config check connect` as written; a bad
/// entry or a list over 256 entries is refused, naming the list, the kite
/// and the entry.
#[test]
fn kite_policy_is_checked_and_shown() {
    let dir = TempDir::new("config-policy");
    let fp = fingerprint();
    let kite = |tag: &str, lists: &str| {
        write(
            &dir,
            &format!("{tag}.toml"),
            &format!(
                "secret = {SECRET:?}\n\n\
                 [[kite]]\n\
                 name = \"app.example.net\"\n\
                 protocol = \"http\"\n\
                 target = \"127.0.0.1:8000\"\n\
                 {lists}\n"
            ),
        )
    };
    let file = kite(
        "good",
        "allow = [\"192.0.2.0/24\", \"2001:db8::/32\", \"::1\"]\ndeny = [\"192.0.2.7\"]",
    );
    let out = check_ok("connect", &connect_args(&fp, &file), &[]);
    assert_eq!(
        setting(&out, "allow"),
        r#"["192.0.2.0/24", "2001:db8::/32", "::1"]"#,
        "{out}"
    );
    assert_eq!(setting(&out, "deny"), r#"["192.0.2.7"]"#, "{out}");

    let many = vec!["\"10.0.0.1\""; 257].join(", ");
    for (tag, lists, why) in [
        ("bad-v4", "allow = [\"10.0.0.300\"]".to_string(), "allow"),
        ("bad-prefix", "deny = [\"10.0.0.0/33\"]".to_string(), "deny"),
        (
            "bad-name",
            "deny = [\"office.example.net\"]".to_string(),
            "deny",
        ),
        ("too-many", format!("allow = [{many}]"), "at most 256"),
    ] {
        let file = kite(tag, &lists);
        let err = check_fails("connect", &connect_args(&fp, &file), &[]);
        assert!(
            err.contains(why) && err.contains("app.example.net"),
            "{tag}: {err}"
        );
        if tag != "too-many" {
            let entry = lists.split('"').nth(1).unwrap();
            assert!(err.contains(entry), "{tag}: {err}");
        }
    }
}
