//! A kite's visitor policy: the IP allow and deny lists (CIDR blocks,
//! IPv4 and IPv6) its owner sets in a `[[kite]]` table, and the rule the
//! relay applies to each visitor's address before anything reaches the
//! link.
//!
//! The rule: a visitor in a `deny` block is refused; otherwise, with an
//! `allow` list, only a visitor in one of its blocks passes; with neither
//! list everyone passes. IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, an
//! IPv4 visitor on a dual-stack socket) are matched as IPv4, on both sides.
//!
//! Lists are parsed from text both by the connector's config and by the
//! relay from a claim (a connector is not trusted to send well-formed or
//! short lists): [`VisitorPolicy::parse`] refuses a bad entry by name and
//! a list longer than [`MAX_POLICY_ENTRIES`].

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// Most entries in one list (`allow` or `deny`) of one kite. The relay
/// checks every visitor against both lists linearly and keeps them for as
/// long as the kite is online, and a connector may claim many kites: 256
/// blocks is more than a hand-written list needs (a team's offices and
/// VPNs), and keeps a check under a microsecond and a kite's lists under
/// ~10 KiB. Longer lists (country blocks) belong in a firewall.
pub const MAX_POLICY_ENTRIES: usize = 256;

/// One CIDR block: an address and a prefix length (at most 32 for IPv4,
/// 128 for IPv6). The address is kept with its host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why an entry or a list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// An entry that is not `ADDRESS` or `ADDRESS/PREFIX`.
    #[error(
        "{entry:?} is not an IP address or CIDR block (e.g. 192.0.2.0/24, 2001:db8::/32, 127.0.0.2)"
    )]
    Invalid {
        /// The entry as given (cut to 64 characters).
        entry: String,
    },
    /// A prefix longer than the address.
    #[error("{entry:?}: the prefix length is at most {max} for this address family")]
    Prefix {
        /// The entry as given (cut to 64 characters).
        entry: String,
        /// 32 or 128.
        max: u8,
    },
    /// More entries than [`MAX_POLICY_ENTRIES`].
    #[error("{count} entries, at most {MAX_POLICY_ENTRIES} per list")]
    TooMany {
        /// How many were given.
        count: usize,
    },
}

/// A kite's allow and deny lists (both empty: everyone passes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VisitorPolicy {
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
}

impl Cidr {
    /// Whether `addr` is inside this block (IPv4-mapped IPv6 as IPv4).
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.addr, addr.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(addr)) => {
                let mask = mask32(self.prefix);
                u32::from(net) == u32::from(addr) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(addr)) => {
                let mask = mask128(self.prefix);
                u128::from(net) == u128::from(addr) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = PolicyError;

    /// `ADDRESS/PREFIX`, or a bare address (/32 or /128). An IPv4-mapped
    /// IPv6 address is taken as the IPv4 one (its prefix less 96).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let entry = || text.chars().take(64).collect::<String>();
        let invalid = || PolicyError::Invalid { entry: entry() };
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => {
                // Digits only: `u8::from_str` would take a leading `+`.
                if prefix.is_empty()
                    || prefix.len() > 3
                    || !prefix.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(invalid());
                }
                let prefix: u8 = prefix.parse().map_err(|_| invalid())?;
                (addr, Some(prefix))
            }
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| invalid())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(PolicyError::Prefix {
                entry: entry(),
                max,
            });
        }
        let (addr, prefix) = match addr {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) if prefix >= 96 => (IpAddr::V4(v4), prefix - 96),
                _ => (addr, prefix),
            },
            IpAddr::V4(_) => (addr, prefix),
        };
        let addr = match addr {
            IpAddr::V4(v4) => IpAddr::V4((u32::from(v4) & mask32(prefix)).into()),
            IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & mask128(prefix)).into()),
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl VisitorPolicy {
    /// Parses both lists, refusing a bad entry (named) or a list longer
    /// than [`MAX_POLICY_ENTRIES`] (before parsing any of it).
    pub fn parse<S: AsRef<str>>(allow: &[S], deny: &[S]) -> Result<Self, PolicyError> {
        Ok(VisitorPolicy {
            allow: parse_list(allow)?,
            deny: parse_list(deny)?,
        })
    }

    /// True if neither list has an entry (the kite admits everyone).
    pub fn is_open(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    /// Whether a visitor from `addr` may reach the kite: not in a `deny`
    /// block, and in an `allow` block if there is an allow list.
    pub fn admits(&self, addr: IpAddr) -> bool {
        if self.deny.iter().any(|cidr| cidr.contains(addr)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|cidr| cidr.contains(addr))
    }

    /// The allow list, normalized (`ADDRESS/PREFIX`).
    pub fn allow(&self) -> &[Cidr] {
        &self.allow
    }

    /// The deny list, normalized (`ADDRESS/PREFIX`).
    pub fn deny(&self) -> &[Cidr] {
        &self.deny
    }
}

fn parse_list<S: AsRef<str>>(list: &[S]) -> Result<Vec<Cidr>, PolicyError> {
    if list.len() > MAX_POLICY_ENTRIES {
        return Err(PolicyError::TooMany { count: list.len() });
    }
    list.iter().map(|entry| entry.as_ref().parse()).collect()
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn entries_parse_to_normalized_blocks() {
        let cases = [
            ("127.0.0.2", "127.0.0.2/32"),
            ("192.0.2.77/24", "192.0.2.0/24"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("::1", "::1/128"),
            ("2001:db8::1/32", "2001:db8::/32"),
            ("::/0", "::/0"),
            ("::ffff:10.1.2.3", "10.1.2.3/32"),
            ("::ffff:10.1.2.3/104", "10.0.0.0/8"),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<Cidr>().unwrap().to_string(), want, "{text}");
        }
    }

    #[test]
    fn bad_entries_are_refused_by_name() {
        for text in [
            "",
            "/",
            "10.0.0.1/",
            "/24",
            "10.0.0.1/+8",
            "10.0.0.1/0x8",
            "10.0.0.256",
            "10.0.0.1/24/1",
            "example.net",
            "10.0.0.1 ",
            " ::1",
            "[::1]",
            "10.0.0.1/1000",
            "::1/-1",
            "10.0.0.0/08a",
        ] {
            let err = text.parse::<Cidr>().unwrap_err();
            assert!(matches!(err, PolicyError::Invalid { .. }), "{text}: {err}");
        }
        for (text, max) in [("10.0.0.1/33", 32), ("::1/129", 128), ("1.2.3.4/255", 32)] {
            let err = text.parse::<Cidr>().unwrap_err();
            assert_eq!(
                err,
                PolicyError::Prefix {
                    entry: text.into(),
                    max
                }
            );
        }
        let long = "x".repeat(10_000);
        let err = long.parse::<Cidr>().unwrap_err().to_string();
        assert!(err.len() < 200, "{err}");
    }

    #[test]
    fn blocks_contain_their_addresses_and_mapped_ones() {
        let cases = [
            ("10.0.0.0/8", "10.255.1.2", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("10.0.0.0/8", "::ffff:10.0.0.1", true),
            ("0.0.0.0/0", "::1", false),
            ("::/0", "127.0.0.1", false),
            ("::/0", "::1", true),
            ("::1", "::1", true),
            ("::1", "::2", false),
            ("2001:db8::/32", "2001:db8:ffff::1", true),
            ("2001:db8::/32", "2001:db9::1", false),
            ("127.0.0.2", "127.0.0.1", false),
            ("127.0.0.2", "::ffff:127.0.0.2", true),
        ];
        for (block, addr, want) in cases {
            let cidr: Cidr = block.parse().unwrap();
            assert_eq!(cidr.contains(ip(addr)), want, "{block} contains {addr}");
        }
    }

    #[test]
    fn deny_wins_and_an_allow_list_admits_only_its_blocks() {
        let none: [&str; 0] = [];
        let open = VisitorPolicy::parse(&none, &none).unwrap();
        assert!(open.is_open() && open.admits(ip("203.0.113.9")));
        let deny = VisitorPolicy::parse(&none, &["127.0.0.2"]).unwrap();
        assert!(deny.admits(ip("127.0.0.1")) && !deny.admits(ip("127.0.0.2")));
        let allow = VisitorPolicy::parse(&["127.0.0.0/8"], &["127.0.0.2"]).unwrap();
        assert!(allow.admits(ip("127.0.0.1")));
        assert!(!allow.admits(ip("127.0.0.2")), "deny wins over allow");
        assert!(!allow.admits(ip("192.0.2.1")), "not in the allow list");
        assert!(!allow.admits(ip("::1")));
    }

    #[test]
    fn lists_are_bounded() {
        let list = vec!["10.0.0.1"; MAX_POLICY_ENTRIES];
        assert!(VisitorPolicy::parse(&list, &list).is_ok());
        let long = vec!["10.0.0.1"; MAX_POLICY_ENTRIES + 1];
        let err = VisitorPolicy::parse(&long, &list).unwrap_err();
        assert_eq!(
            err,
            PolicyError::TooMany {
                count: MAX_POLICY_ENTRIES + 1
            }
        );
        assert!(VisitorPolicy::parse(&list, &long).is_err());
    }
}
