//! htpasswd lines (`user:hash`) for an http kite's basic auth: the
//! connector reads them from the owner's file and the relay checks them
//! again (a connector is not trusted), with the same rules here: bcrypt
//! (`$2a$`, `$2b$`, `$2y$`) and argon2 (PHC strings) only, bounded costs,
//! a bounded number of users and line length.

use std::path::Path;

use argon2::password_hash::PasswordHash;
use argon2::{Argon2, Params, PasswordVerifier};

/// The most users one kite's htpasswd may hold. Teams are tens of people;
/// 1024 leaves room while bounding what a connector makes the relay keep
/// (and a full file still fits one registration message).
pub(crate) const MAX_USERS: usize = 1024;

/// The longest htpasswd line: a 255-byte user and an argon2 hash with a
/// long salt fit with room to spare.
pub(crate) const MAX_LINE_LEN: usize = 512;

/// The longest user name (as in most web servers' basic auth).
pub(crate) const MAX_USER_LEN: usize = 255;

/// The costliest bcrypt hash accepted: 2^12 rounds take ~250 ms on one
/// core; `htpasswd -B` makes cost 5 (~3 ms). A connector must not make the
/// relay spend seconds per password.
pub(crate) const MAX_BCRYPT_COST: u32 = 12;

/// The most memory (KiB) an argon2 hash may ask for per check: 64 MiB,
/// above the recommended 19 MiB (RFC 9106 / OWASP) and low enough that the
/// relay's few concurrent checks stay within a small multiple of it.
pub(crate) const MAX_ARGON2_MEMORY_KIB: u32 = 64 * 1024;

/// The most argon2 passes (`t`) and lanes (`p`) accepted; recommended
/// values are 1 to 5 passes and 1 lane.
pub(crate) const MAX_ARGON2_PASSES: u32 = 8;
/// See [`MAX_ARGON2_PASSES`].
pub(crate) const MAX_ARGON2_LANES: u32 = 8;

/// The largest htpasswd file read (all lines at their longest).
const MAX_FILE_LEN: u64 = (MAX_USERS * (MAX_LINE_LEN + 1)) as u64;

/// What is wrong with an htpasswd file or claim.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HtpasswdError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is larger than any valid one.
    #[error("{path} is larger than {MAX_FILE_LEN} bytes")]
    TooLarge {
        /// The file.
        path: String,
    },
    /// One line is wrong.
    #[error("line {line}: {why}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        why: String,
    },
    /// More users than [`MAX_USERS`].
    #[error("more than {MAX_USERS} users")]
    TooManyUsers,
    /// No user at all.
    #[error("no users (an empty file would lock everyone out)")]
    Empty,
}

/// A password hash of a kind the relay checks.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum StoredHash {
    /// `$2a$`/`$2b$`/`$2y$` bcrypt.
    Bcrypt(String),
    /// `$argon2id$` (or `$argon2i$`, `$argon2d$`) PHC string.
    Argon2(String),
}

impl std::fmt::Debug for StoredHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The hash itself is not printed: logs are no place for it.
        match self {
            StoredHash::Bcrypt(_) => f.write_str("Bcrypt(..)"),
            StoredHash::Argon2(_) => f.write_str("Argon2(..)"),
        }
    }
}

impl StoredHash {
    /// Whether `password` matches. Takes milliseconds of CPU (the point of
    /// these hashes): call it off the async threads.
    pub(crate) fn verify(&self, password: &[u8]) -> bool {
        match self {
            StoredHash::Bcrypt(hash) => bcrypt::verify(password, hash).unwrap_or(false),
            StoredHash::Argon2(hash) => PasswordHash::new(hash)
                .is_ok_and(|hash| Argon2::default().verify_password(password, &hash).is_ok()),
        }
    }
}

/// One user of an htpasswd file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HtpasswdEntry {
    /// The user name.
    pub(crate) user: String,
    /// Their password's hash.
    pub(crate) hash: StoredHash,
}

/// Parses htpasswd lines: blank lines and `#` comments are skipped, every
/// other line must be `user:hash` with a hash kind the relay checks, users
/// unique, at most [`MAX_USERS`]; the error names the (1-based) line.
pub(crate) fn parse_lines<'a>(
    lines: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<HtpasswdEntry>, HtpasswdError> {
    let mut entries: Vec<HtpasswdEntry> = Vec::new();
    for (index, line) in lines.into_iter().enumerate() {
        let line_no = index + 1;
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if entries.len() == MAX_USERS {
            return Err(HtpasswdError::TooManyUsers);
        }
        let entry =
            parse_entry(trimmed).map_err(|why| HtpasswdError::Line { line: line_no, why })?;
        if entries.iter().any(|known| known.user == entry.user) {
            return Err(HtpasswdError::Line {
                line: line_no,
                why: format!("user {:?} appears twice", entry.user),
            });
        }
        entries.push(entry);
    }
    if entries.is_empty() {
        return Err(HtpasswdError::Empty);
    }
    Ok(entries)
}

/// Reads and checks an htpasswd file; the lines to send with the claim
/// (comments and blank lines left out).
pub(crate) fn read_file(path: &Path) -> Result<Vec<String>, HtpasswdError> {
    let shown = || path.display().to_string();
    let read = |source| HtpasswdError::Read {
        path: shown(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read)?.len();
    if len > MAX_FILE_LEN {
        return Err(HtpasswdError::TooLarge { path: shown() });
    }
    let text = std::fs::read_to_string(path).map_err(read)?;
    parse_lines(text.lines())?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_string)
        .collect())
}

/// One `user:hash` line.
fn parse_entry(line: &str) -> Result<HtpasswdEntry, String> {
    if line.len() > MAX_LINE_LEN {
        return Err(format!("longer than {MAX_LINE_LEN} bytes"));
    }
    let Some((user, hash)) = line.split_once(':') else {
        return Err("not user:hash".into());
    };
    if user.is_empty() || user.len() > MAX_USER_LEN {
        return Err(format!("a user name has 1 to {MAX_USER_LEN} bytes"));
    }
    if user.chars().any(char::is_control) {
        return Err("the user name has a control character".into());
    }
    let hash = parse_hash(hash)?;
    Ok(HtpasswdEntry {
        user: user.to_string(),
        hash,
    })
}

/// A hash of a kind the relay checks, within the cost bounds.
fn parse_hash(hash: &str) -> Result<StoredHash, String> {
    const MAKE: &str = "make bcrypt ones with `htpasswd -B` (or argon2 ones)";
    if ["$2a$", "$2b$", "$2y$"].iter().any(|p| hash.starts_with(p)) {
        return parse_bcrypt(hash).map(|()| StoredHash::Bcrypt(hash.to_string()));
    }
    if hash.starts_with("$argon2") {
        return parse_argon2(hash).map(|()| StoredHash::Argon2(hash.to_string()));
    }
    let kind = if hash.starts_with("$apr1$") || hash.starts_with("$1$") {
        "MD5 ($apr1$) hashes are not accepted"
    } else if hash.starts_with("{SHA}") {
        "SHA-1 ({SHA}) hashes are not accepted"
    } else if hash.starts_with("$5$") || hash.starts_with("$6$") {
        "SHA-crypt ($5$, $6$) hashes are not accepted"
    } else if hash.starts_with('$') {
        "an unknown hash kind"
    } else {
        "a plain-text or crypt(3) password is not accepted"
    };
    Err(format!("{kind}: {MAKE}"))
}

/// `$2b$NN$` then 53 characters of bcrypt's base64 (salt and hash).
fn parse_bcrypt(hash: &str) -> Result<(), String> {
    let bad = || "a malformed bcrypt hash".to_string();
    let rest = hash.get(4..).ok_or_else(bad)?;
    let (cost, body) = rest.split_once('$').ok_or_else(bad)?;
    if cost.len() != 2 {
        return Err(bad());
    }
    let cost: u32 = cost.parse().map_err(|_| bad())?;
    if !(4..=MAX_BCRYPT_COST).contains(&cost) {
        return Err(format!(
            "bcrypt cost {cost} is outside 4..={MAX_BCRYPT_COST}"
        ));
    }
    let alphabet = |c: char| c.is_ascii_alphanumeric() || c == '.' || c == '/';
    if body.len() != 53 || !body.chars().all(alphabet) {
        return Err(bad());
    }
    Ok(())
}

/// A PHC string argon2 can verify, within the cost bounds.
fn parse_argon2(hash: &str) -> Result<(), String> {
    let parsed =
        PasswordHash::new(hash).map_err(|err| format!("a malformed argon2 hash: {err}"))?;
    if !matches!(
        parsed.algorithm.as_str(),
        "argon2id" | "argon2i" | "argon2d"
    ) {
        return Err("an unknown hash kind".into());
    }
    if parsed.hash.is_none() || parsed.salt.is_none() {
        return Err("a malformed argon2 hash: no salt or hash".into());
    }
    let params =
        Params::try_from(&parsed).map_err(|err| format!("bad argon2 parameters: {err}"))?;
    if params.m_cost() > MAX_ARGON2_MEMORY_KIB
        || params.t_cost() > MAX_ARGON2_PASSES
        || params.p_cost() > MAX_ARGON2_LANES
    {
        return Err(format!(
            "argon2 cost m={} t={} p={} is above m={MAX_ARGON2_MEMORY_KIB} t={MAX_ARGON2_PASSES} \
             p={MAX_ARGON2_LANES}",
            params.m_cost(),
            params.t_cost(),
            params.p_cost()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use argon2::password_hash::{PasswordHasher, SaltString};

    use super::*;

    fn argon2_hash(password: &str) -> String {
        let salt = SaltString::encode_b64(b"0123456789abcdef").expect("16-byte salt");
        let params = Params::new(1024, 1, 1, None).expect("small params");
        Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
            .hash_password(password.as_bytes(), &salt)
            .expect("hash")
            .to_string()
    }

    #[test]
    fn bcrypt_and_argon2_users_verify() {
        let bcrypt = bcrypt::hash("secret-b", 4).expect("hash");
        let argon2 = argon2_hash("secret-a");
        let text = format!("# team\n\nbob:{bcrypt}\nalice:{argon2}\n");
        let entries = parse_lines(text.lines()).expect("valid");
        assert_eq!(entries.len(), 2);
        assert!(entries[0].hash.verify(b"secret-b"));
        assert!(!entries[0].hash.verify(b"secret-a"));
        assert!(entries[1].hash.verify(b"secret-a"));
        assert!(!entries[1].hash.verify(b"secret-b"));
    }

    #[test]
    fn other_kinds_and_bad_lines_are_refused_with_their_line() {
        let bcrypt = bcrypt::hash("x", 4).expect("hash");
        let cases = [
            ("u:$apr1$abc$def", "MD5"),
            ("u:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "SHA-1"),
            ("u:$6$salt$hash", "SHA-crypt"),
            ("u:$9$what", "unknown hash kind"),
            ("u:password", "plain-text"),
            ("u", "not user:hash"),
            (":$2y$05$abc", "user name"),
            (
                "u:$2y$31$abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0",
                "cost 31",
            ),
            ("u:$2y$05$short", "malformed bcrypt"),
            (
                "u:$argon2id$v=19$m=1048576,t=1,p=1$c29tZXNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
                "argon2 cost",
            ),
            ("u:$argon2id$garbage", "malformed argon2"),
        ];
        for (line, want) in cases {
            let text = format!("ok:{bcrypt}\n{line}\n");
            let err = parse_lines(text.lines()).expect_err(line).to_string();
            assert!(err.starts_with("line 2: "), "{line}: {err}");
            assert!(err.contains(want), "{line}: {err}");
        }
        let long = format!("u:{}", "x".repeat(MAX_LINE_LEN));
        assert!(parse_lines([long.as_str()]).is_err());
        let twice = format!("u:{bcrypt}\nu:{bcrypt}");
        let err = parse_lines(twice.lines()).expect_err("twice").to_string();
        assert!(err.contains("twice"), "{err}");
        assert!(matches!(parse_lines(["# none"]), Err(HtpasswdError::Empty)));
    }

    #[test]
    fn users_are_bounded() {
        let bcrypt = bcrypt::hash("x", 4).expect("hash");
        let lines: Vec<String> = (0..=MAX_USERS).map(|n| format!("u{n}:{bcrypt}")).collect();
        let res = parse_lines(lines.iter().map(String::as_str));
        assert!(matches!(res, Err(HtpasswdError::TooManyUsers)));
        assert!(parse_lines(lines[..MAX_USERS].iter().map(String::as_str)).is_ok());
    }
}
