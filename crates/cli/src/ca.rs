//! `kitepipe ca ...`: arguments and output of the certificate authority
//! commands; the work is done by `kitepipe::pki::ca`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use kitepipe::config::{ConfigError, default_state_dir};
use kitepipe::pki::CertAuthority;
use kitepipe::pki::ca::{
    BACKDATE, CaInit, CertRole, DEFAULT_CA_VALIDITY, DEFAULT_NODE_VALIDITY, IndexEntry,
    IssueRequest,
};

/// One day, for `--days`.
const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// Longest `--days`: a hundred years, far beyond any sensible certificate
/// and well inside what X.509 dates can hold.
const MAX_DAYS: u64 = 36_525;

#[derive(Debug, Subcommand)]
pub(crate) enum CaCommand {
    /// Create a CA: a key (0600) and certificate, an empty index and an empty
    /// revocation list in DIR.
    Init(InitArgs),
    /// Issue a certificate and key for a node (a connector by default, or a
    /// relay with --role relay --san HOST), written to an identity directory
    /// (cert.pem, key.pem, ca.pem).
    Issue(IssueArgs),
    /// List the certificates this CA issued, with their state.
    List(DirArgs),
    /// Revoke every certificate of NAME (or one, with --serial) and rewrite
    /// the revocation list; relays reading it refuse and disconnect NAME.
    Revoke(RevokeArgs),
}

#[derive(Debug, Args)]
pub(crate) struct DirArgs {
    /// The CA directory [default: ~/.local/state/kitepipe/ca].
    #[arg(long, value_name = "DIR", env = "KITEPIPE_CA_DIR")]
    dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct InitArgs {
    /// Directory to create the CA in [default: ~/.local/state/kitepipe/ca].
    #[arg(value_name = "DIR", env = "KITEPIPE_CA_DIR")]
    dir: Option<PathBuf>,
    /// The CA's common name [default: "kitepipe CA" and a random tag].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// How long the CA certificate is valid, in days [default: 3653].
    #[arg(long, value_name = "N")]
    days: Option<u64>,
    /// Replace an existing CA: every certificate it issued stops working.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
pub(crate) struct IssueArgs {
    /// The node's name, e.g. laptop. Relays use it as the identity in
    /// their rules: by default `laptop` may claim laptop.DOMAIN and
    /// *.laptop.DOMAIN for each --cert-domain.
    #[arg(value_name = "NAME")]
    name: String,
    #[command(flatten)]
    dir: DirArgs,
    /// Where to write cert.pem, key.pem and ca.pem [default: DIR/issued/NAME].
    #[arg(long, value_name = "OUT")]
    out: Option<PathBuf>,
    /// What the certificate is for: a connector's (client authentication
    /// only) or a relay's (server authentication only, needs --san). A
    /// connector's certificate never passes for a relay, whatever its names.
    #[arg(long, value_enum, default_value_t = Role::Connector)]
    role: Role,
    /// A DNS name or IP address a relay's certificate is valid for: the
    /// names connectors dial. Repeatable; required with --role relay.
    #[arg(long, value_name = "HOST")]
    san: Vec<String>,
    /// How long the certificate is valid, in days, from --not-before or
    /// now [default: 365].
    #[arg(long, value_name = "N", conflicts_with = "not_after")]
    days: Option<u64>,
    /// Start of validity, RFC 3339 (e.g. 2030-01-01T00:00:00Z) [default: an hour ago].
    #[arg(long, value_name = "TIME")]
    not_before: Option<String>,
    /// End of validity, RFC 3339 [default: --days after --not-before or now].
    #[arg(long, value_name = "TIME")]
    not_after: Option<String>,
    /// Overwrite files in OUT.
    #[arg(long)]
    force: bool,
}

/// `--role`: what a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Role {
    /// Client authentication: a connector presenting it to relays.
    Connector,
    /// Server authentication: a relay presenting it to connectors.
    Relay,
}

impl From<Role> for CertRole {
    fn from(role: Role) -> CertRole {
        match role {
            Role::Connector => CertRole::Connector,
            Role::Relay => CertRole::Relay,
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct RevokeArgs {
    /// The node name whose certificates to revoke.
    #[arg(value_name = "NAME")]
    name: String,
    #[command(flatten)]
    dir: DirArgs,
    /// Revoke only the certificate with this serial (hex, as `ca list` shows).
    #[arg(long, value_name = "HEX")]
    serial: Option<String>,
}

/// Runs a `ca` command; `env` looks up environment variables.
pub(crate) fn run(command: CaCommand, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<()> {
    let default_dir = || default_state_dir(env).join("ca");
    match command {
        CaCommand::Init(args) => init(args.dir.clone().unwrap_or_else(default_dir), &args),
        CaCommand::Issue(args) => issue(args.dir.dir.clone().unwrap_or_else(default_dir), &args),
        CaCommand::List(args) => list(&args.dir.unwrap_or_else(default_dir)),
        CaCommand::Revoke(args) => revoke(args.dir.dir.clone().unwrap_or_else(default_dir), &args),
    }
}

fn init(dir: PathBuf, args: &InitArgs) -> anyhow::Result<()> {
    let options = CaInit {
        name: args.name.clone(),
        valid_for: match args.days {
            Some(days) => days_long(days)?,
            None => DEFAULT_CA_VALIDITY,
        },
        force: args.force,
    };
    let ca = CertAuthority::init(&dir, &options)
        .with_context(|| format!("cannot create a CA in {}", dir.display()))?;
    let dir = ca.dir().display();
    println!("created CA \"{}\" in {dir}", ca.info().name);
    println!(
        "  certificate      {}   (relays: --client-ca {})",
        ca.cert_path().display(),
        ca.cert_path().display()
    );
    println!(
        "  key              {}   (mode 0600; only `kitepipe ca` needs it)",
        dir_join(ca.dir(), kitepipe::pki::ca::CA_KEY_FILE)
    );
    println!(
        "  revocation list  {}   (relays reread it when it changes)",
        ca.crl_path().display()
    );
    println!("next: kitepipe ca issue NAME --dir {dir}   (a connector's certificate)");
    println!("      kitepipe ca issue NAME --dir {dir} --role relay --san HOST   (a relay's)");
    Ok(())
}

fn issue(dir: PathBuf, args: &IssueArgs) -> anyhow::Result<()> {
    let ca = CertAuthority::open(&dir)?;
    let now = SystemTime::now();
    let start = match &args.not_before {
        Some(text) => Some(parse_time("--not-before", text)?),
        None => None,
    };
    // A default start is backdated for clock skew; --days still counts from now.
    let not_before =
        start.unwrap_or_else(|| now.checked_sub(BACKDATE).unwrap_or(SystemTime::UNIX_EPOCH));
    let counted_from = start.unwrap_or(now);
    let not_after = match (&args.not_after, args.days) {
        (Some(text), _) => parse_time("--not-after", text)?,
        (None, Some(days)) => counted_from
            .checked_add(days_long(days)?)
            .ok_or_else(|| too_many_days(days))?,
        (None, None) => counted_from + DEFAULT_NODE_VALIDITY,
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| dir.join("issued").join(args.name.to_ascii_lowercase()));
    let request = IssueRequest {
        name: args.name.clone(),
        role: args.role.into(),
        alt_names: args.san.clone(),
        not_before,
        not_after,
        out: out.clone(),
        force: args.force,
    };
    let issued = ca
        .issue(&request)
        .with_context(|| format!("cannot issue a certificate for {}", args.name))?;
    let entry = &issued.entry;
    println!(
        "issued {} (serial {}), valid {} to {}",
        entry.name,
        entry.serial,
        time(entry.not_before),
        time(entry.not_after)
    );
    println!("  certificate  {}", issued.cert.display());
    println!("  key          {}   (mode 0600)", issued.key.display());
    println!("  CA           {}", issued.ca.display());
    if args.role == Role::Connector {
        if !args.san.is_empty() {
            eprintln!(
                "note: this is a connector's certificate (client authentication only): \
                 its --san names do not make it a relay's; for a relay, issue with --role relay"
            );
        }
        println!(
            "connector: kitepipe connect RELAY:PORT --identity {} --kite http:{}.DOMAIN=8000",
            out.display(),
            entry.name
        );
    } else {
        println!(
            "relay: kitepipe relay --cert {} --key {} --client-ca {}",
            issued.cert.display(),
            issued.key.display(),
            ca.cert_path().display()
        );
    }
    Ok(())
}

fn list(dir: &Path) -> anyhow::Result<()> {
    let ca = CertAuthority::open(dir)?;
    let entries = ca.list()?;
    println!("CA \"{}\" in {}", ca.info().name, dir.display());
    if entries.is_empty() {
        println!(
            "no certificates issued yet: kitepipe ca issue NAME --dir {}",
            dir.display()
        );
        return Ok(());
    }
    let width = entries
        .iter()
        .map(|entry| entry.name.len())
        .max()
        .unwrap_or(0)
        .max(4);
    println!(
        "{:width$}  {:32}  {:20}  {:20}  STATUS",
        "NAME", "SERIAL", "NOT BEFORE", "NOT AFTER"
    );
    let now = SystemTime::now();
    for entry in &entries {
        println!(
            "{:width$}  {:32}  {:20}  {:20}  {}{}",
            entry.name,
            entry.serial,
            time(entry.not_before),
            time(entry.not_after),
            entry.status(now),
            alt_names(entry)
        );
    }
    Ok(())
}

fn revoke(dir: PathBuf, args: &RevokeArgs) -> anyhow::Result<()> {
    let ca = CertAuthority::open(&dir)?;
    let revoked = ca.revoke(&args.name, args.serial.as_deref())?;
    if revoked.is_empty() {
        println!("{}: already revoked", args.name);
        return Ok(());
    }
    for entry in &revoked {
        println!("revoked {} (serial {})", entry.name, entry.serial);
    }
    println!(
        "revocation list {} updated: relays reading it disconnect and refuse {} within seconds",
        ca.crl_path().display(),
        args.name
    );
    Ok(())
}

fn parse_time(flag: &'static str, text: &str) -> anyhow::Result<SystemTime> {
    humantime::parse_rfc3339_weak(text).map_err(|err| {
        crate::exit::usage(ConfigError::Invalid {
            what: flag,
            value: text.to_string(),
            why: format!("{err}: expected RFC 3339, e.g. 2030-01-01T00:00:00Z"),
        })
    })
}

/// `days` days, refusing spans no certificate can express.
fn days_long(days: u64) -> anyhow::Result<Duration> {
    days.checked_mul(DAY.as_secs())
        .filter(|_| days <= MAX_DAYS)
        .map(Duration::from_secs)
        .ok_or_else(|| too_many_days(days))
}

fn too_many_days(days: u64) -> anyhow::Error {
    crate::exit::usage(ConfigError::Invalid {
        what: "--days",
        value: days.to_string(),
        why: format!("at most {MAX_DAYS}"),
    })
}

fn time(unix_seconds: i64) -> String {
    let time = match u64::try_from(unix_seconds) {
        Ok(secs) => SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => SystemTime::UNIX_EPOCH,
    };
    humantime::format_rfc3339_seconds(time).to_string()
}

/// The entry's names and, unless it is a plain connector's, its role.
fn alt_names(entry: &IndexEntry) -> String {
    let names = if entry.alt_names.is_empty() {
        String::new()
    } else {
        format!("  ({})", entry.alt_names.join(", "))
    };
    let role = match entry.role {
        Some(CertRole::Connector) => "",
        Some(CertRole::Relay) => "  [relay]",
        // Issued before roles: it serves as client and as server.
        None if entry.revoked_at.is_none() => "  [connector+relay: reissue]",
        None => "",
    };
    format!("{names}{role}")
}

fn dir_join(dir: &Path, file: &str) -> String {
    dir.join(file).display().to_string()
}
