//! The PROXY protocol header (HAProxy's `proxy-protocol.txt`, versions 1
//! and 2) a connector writes to a kite's local target before the visitor's
//! bytes, so a backend behind a TCP or HTTPS kite (nginx, fail2ban) sees
//! the visitor's address instead of the connector's.
//!
//! Only the encoder lives here; the codec is the `proxy-header` crate,
//! wrapped so that callers pick a version and hand over addresses, and
//! mixed address families (an IPv4 visitor on an IPv6 relay socket) are
//! made to match before encoding.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use proxy_header::{ProxiedAddress, ProxyHeader};

/// Which PROXY protocol header a kite's local target gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocol {
    /// Version 1: one text line, `PROXY TCP4 SRC DST SPORT DPORT\r\n`.
    V1,
    /// Version 2: the binary header (12-byte signature, command, family,
    /// addresses).
    V2,
}

impl ProxyProtocol {
    /// The name as written in a `[[kite]]` table: `v1` or `v2`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyProtocol::V1 => "v1",
            ProxyProtocol::V2 => "v2",
        }
    }

    /// The header for a connection from `source` (the visitor; `None` when
    /// unknown) to `destination` (the address the visitor connected to).
    ///
    /// With a source, a PROXY command over TCP4 or TCP6 (both addresses
    /// in one family: IPv4-mapped IPv6 addresses become IPv4, and if the
    /// families still differ the IPv4 one is mapped to IPv6). Without, v1
    /// says `PROXY UNKNOWN` and v2 sends the LOCAL command, after which the
    /// receiver uses the connection's own addresses.
    pub fn header(self, source: Option<SocketAddr>, destination: SocketAddr) -> Vec<u8> {
        let header = match source {
            Some(source) => {
                let (source, destination) = same_family(source, destination);
                ProxyHeader::with_address(ProxiedAddress::stream(source, destination))
            }
            None => ProxyHeader::with_local(),
        };
        let mut buf = Vec::with_capacity(MAX_HEADER_LEN);
        // Encoding into a Vec cannot run out of room, and the only other
        // failures (mismatched families, TLVs in v1, UDP in v1, oversized
        // TLVs) are excluded above: a stream header, no TLVs, one family.
        let res = match self {
            ProxyProtocol::V1 => header.encode_v1(&mut buf),
            ProxyProtocol::V2 => header.encode_v2(&mut buf),
        };
        res.expect("a TCP header without TLVs in one address family always encodes");
        buf
    }
}

impl fmt::Display for ProxyProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown version name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected v1 or v2")]
pub struct UnknownProxyProtocol;

impl FromStr for ProxyProtocol {
    type Err = UnknownProxyProtocol;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "v1" => Ok(ProxyProtocol::V1),
            "v2" => Ok(ProxyProtocol::V2),
            _ => Err(UnknownProxyProtocol),
        }
    }
}

/// The longest header [`ProxyProtocol::header`] makes: a v1 TCP6 line
/// (the spec's worst case, 104 bytes); v2 with IPv6 is 52.
const MAX_HEADER_LEN: usize = 104;

/// Both addresses in one family, as both PROXY versions require.
fn same_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canonical = |addr: SocketAddr| SocketAddr::new(addr.ip().to_canonical(), addr.port());
    let (source, destination) = (canonical(source), canonical(destination));
    let v6 = |addr: SocketAddr| match addr.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), addr.port()),
        IpAddr::V6(_) => addr,
    };
    if source.is_ipv4() == destination.is_ipv4() {
        (source, destination)
    } else {
        (v6(source), v6(destination))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The v2 signature (spec section 2.2).
    const SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn v1_lines_match_the_spec_examples() {
        for (source, destination, line) in [
            (
                Some("192.168.0.1:56324"),
                "192.168.0.11:443",
                "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
            ),
            (
                Some("255.255.255.255:65535"),
                "255.255.255.255:65535",
                "PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
            ),
            (
                Some("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
                "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
                "PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff \
                 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
            ),
            (None, "192.168.0.11:443", "PROXY UNKNOWN\r\n"),
            // An IPv4 visitor seen on a dual-stack socket is still TCP4.
            (
                Some("[::ffff:10.0.0.1]:1000"),
                "10.0.0.2:80",
                "PROXY TCP4 10.0.0.1 10.0.0.2 1000 80\r\n",
            ),
            // Mixed families after that: both as IPv6.
            (
                Some("10.0.0.1:1000"),
                "[2001:db8::1]:80",
                "PROXY TCP6 ::ffff:10.0.0.1 2001:db8::1 1000 80\r\n",
            ),
        ] {
            let header = ProxyProtocol::V1.header(source.map(addr), addr(destination));
            assert_eq!(String::from_utf8(header).unwrap(), line);
        }
        let longest = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535";
        let header = ProxyProtocol::V1.header(Some(addr(longest)), addr(longest));
        assert!(header.len() <= MAX_HEADER_LEN);
    }

    #[test]
    fn v2_headers_match_the_spec_layout() {
        let header =
            ProxyProtocol::V2.header(Some(addr("192.168.0.1:56324")), addr("192.168.0.11:443"));
        let mut want = SIG.to_vec();
        // Version 2, PROXY; TCP over IPv4; 12 bytes of addresses.
        want.extend_from_slice(&[0x21, 0x11, 0, 12]);
        want.extend_from_slice(&[192, 168, 0, 1, 192, 168, 0, 11]);
        want.extend_from_slice(&56324u16.to_be_bytes());
        want.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(header, want);

        let header = ProxyProtocol::V2.header(Some(addr("[2001:db8::1]:1")), addr("[::1]:2"));
        assert_eq!(&header[..12], SIG);
        // Version 2, PROXY; TCP over IPv6; 36 bytes of addresses.
        assert_eq!(&header[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(header.len(), 16 + 36);
        assert_eq!(
            &header[16..32],
            &"2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert_eq!(&header[48..], &[0, 1, 0, 2]);

        // Unknown visitor: LOCAL, family UNSPEC, no addresses.
        let header = ProxyProtocol::V2.header(None, addr("192.168.0.11:443"));
        let mut want = SIG.to_vec();
        want.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(header, want);
    }

    #[test]
    fn headers_parse_back() {
        for version in [ProxyProtocol::V1, ProxyProtocol::V2] {
            let header = version.header(Some(addr("127.0.0.2:4000")), addr("127.0.0.1:80"));
            let (parsed, len) = ProxyHeader::parse(&header, Default::default()).unwrap();
            assert_eq!(len, header.len());
            let parsed = parsed.proxied_address().unwrap();
            assert_eq!(parsed.source, addr("127.0.0.2:4000"));
            assert_eq!(parsed.destination, addr("127.0.0.1:80"));
        }
    }

    #[test]
    fn names_parse_and_print() {
        for (text, want) in [
            ("v1", Ok(ProxyProtocol::V1)),
            ("v2", Ok(ProxyProtocol::V2)),
            ("v3", Err(UnknownProxyProtocol)),
            ("V1", Err(UnknownProxyProtocol)),
            ("", Err(UnknownProxyProtocol)),
        ] {
            assert_eq!(text.parse::<ProxyProtocol>(), want);
            if let Ok(version) = want {
                assert_eq!(version.to_string(), text);
            }
        }
    }
}
