//! Reads the SNI and ALPN protocols of a TLS ClientHello without decrypting
//! anything, so one relay port can tell a connector's link (ALPN `kitepipe/1`)
//! from visitors' HTTPS, which is passed through by SNI.
//!
//! The relay peeks at the first bytes of a connection: [`looks_like_tls`] on
//! the first byte, then [`sniff_client_hello`] on everything buffered so far,
//! reading more while it answers [`Sniffed::NeedMore`]. The ClientHello may span
//! several TLS records; they are reassembled here. Nothing is consumed: the
//! caller forwards the buffered bytes unchanged to whoever it picks.

use thiserror::Error;

/// The most bytes a caller buffers while sniffing one ClientHello, records
/// headers included.
///
/// Real ClientHellos are 200 to 600 bytes; a post-quantum hybrid key share
/// (X25519MLKEM768) brings them to about 1.8 KiB and a large resumption ticket
/// adds a few more. 16 KiB is the largest plaintext a single TLS record may
/// carry, leaves ample room for all of that, and caps what one unauthenticated
/// connection can make the relay hold before it has decided anything.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// What a ClientHello says about where its connection should go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// The `host_name` of the server_name extension, lowercased and checked to
    /// be a plain ASCII hostname; `None` when the client sent no SNI.
    pub sni: Option<String>,
    /// The ALPN protocol names in the client's order of preference; empty
    /// when the client sent no ALPN extension.
    pub alpn: Vec<Vec<u8>>,
}

/// The outcome of sniffing a buffer that starts a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// The bytes so far are a valid prefix of a ClientHello; read more and
    /// call again with the whole buffer. Returned only while the buffer is
    /// shorter than [`MAX_CLIENT_HELLO`].
    NeedMore,
    /// A complete ClientHello was read.
    Tls(ClientHelloInfo),
}

/// Why a buffer is not a ClientHello the relay can route.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SniffError {
    /// The first record is not a TLS handshake record (or not TLS at all).
    #[error("not a tls handshake record")]
    NotHandshake,
    /// The first handshake message is something other than a ClientHello.
    #[error("not a tls client hello")]
    NotClientHello,
    /// The bytes break the TLS record or ClientHello syntax; the field names
    /// what was wrong.
    #[error("malformed client hello: {0}")]
    Malformed(&'static str),
    /// Completing the ClientHello would need more than [`MAX_CLIENT_HELLO`]
    /// buffered bytes.
    #[error("client hello larger than {MAX_CLIENT_HELLO} bytes")]
    TooLarge,
}

/// Whether a connection's first byte could start a TLS handshake record
/// (content type 22).
///
/// ```
/// use kitepipe_proto::sniff::looks_like_tls;
/// assert!(looks_like_tls(0x16));
/// assert!(!looks_like_tls(b'G'));
/// ```
pub fn looks_like_tls(first_byte: u8) -> bool {
    first_byte == CONTENT_TYPE_HANDSHAKE
}

/// Reads the SNI and ALPN of the ClientHello at the start of `buf`.
///
/// `buf` holds every byte received so far on the connection. The answer is
/// [`Sniffed::NeedMore`] while the ClientHello is incomplete, and an error as
/// soon as the bytes can no longer be a ClientHello that fits in
/// [`MAX_CLIENT_HELLO`]. Bytes after the ClientHello are ignored.
///
/// ```
/// use kitepipe_proto::sniff::{sniff_client_hello, Sniffed, SniffError};
/// assert_eq!(sniff_client_hello(&[0x16, 0x03, 0x01]), Ok(Sniffed::NeedMore));
/// assert_eq!(sniff_client_hello(b"GET / HTTP/1.1\r\n"), Err(SniffError::NotHandshake));
/// ```
pub fn sniff_client_hello(buf: &[u8]) -> Result<Sniffed, SniffError> {
    match reassemble(buf)? {
        None => Ok(Sniffed::NeedMore),
        Some(body) => parse_client_hello(&body).map(Sniffed::Tls),
    }
}

/// TLS record content type of handshake messages.
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
/// Handshake message type of a ClientHello.
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// A record header: content type, legacy version, fragment length.
const RECORD_HEADER_LEN: usize = 5;
/// A handshake header: message type and a 24-bit length.
const HANDSHAKE_HEADER_LEN: usize = 4;
/// RFC 8446 section 5.1: a plaintext record carries at most 2^14 bytes.
const MAX_RECORD_LEN: usize = 1 << 14;
/// Extension numbers (IANA "TLS ExtensionType Values").
const EXTENSION_SERVER_NAME: u16 = 0;
/// See [`EXTENSION_SERVER_NAME`].
const EXTENSION_ALPN: u16 = 16;
/// RFC 6066 section 3: the only defined server name type.
const NAME_TYPE_HOST_NAME: u8 = 0;
/// The longest DNS name in its dotted text form.
const MAX_HOSTNAME_LEN: usize = 253;
/// The longest DNS label.
const MAX_LABEL_LEN: usize = 63;

/// Gathers the first handshake message from as many records as it spans and
/// returns its body, or `None` when more bytes are needed.
fn reassemble(buf: &[u8]) -> Result<Option<Vec<u8>>, SniffError> {
    let mut handshake: Vec<u8> = Vec::new();
    let mut record_start = 0usize;
    loop {
        let fragment_start = record_start + RECORD_HEADER_LEN;
        if fragment_start > MAX_CLIENT_HELLO {
            return Err(SniffError::TooLarge);
        }
        // The first byte is checked before a whole header is buffered so that
        // plain HTTP is turned away as soon as it arrives.
        match buf.get(record_start) {
            None => return Ok(None),
            Some(&CONTENT_TYPE_HANDSHAKE) => {}
            Some(_) if record_start == 0 => return Err(SniffError::NotHandshake),
            Some(_) => {
                return Err(SniffError::Malformed(
                    "record of another type inside the hello",
                ));
            }
        }
        if let Some(&major) = buf.get(record_start + 1)
            && major != 3
        {
            return Err(SniffError::Malformed("record version"));
        }
        let Some(&[_, _, _, len_high, len_low]) = buf.get(record_start..fragment_start) else {
            return Ok(None);
        };
        let fragment_len = usize::from(u16::from_be_bytes([len_high, len_low]));
        if fragment_len == 0 {
            // RFC 8446 section 5.1 forbids empty handshake fragments; allowing
            // them would only let a peer stall us with headers.
            return Err(SniffError::Malformed("empty handshake record"));
        }
        if fragment_len > MAX_RECORD_LEN {
            return Err(SniffError::Malformed("record length"));
        }
        let fragment_end = fragment_start + fragment_len;
        if fragment_end > MAX_CLIENT_HELLO {
            return Err(SniffError::TooLarge);
        }
        let available_end = fragment_end.min(buf.len());
        let fragment = buf.get(fragment_start..available_end).unwrap_or_default();
        handshake.extend_from_slice(fragment);

        if let Some(&message_type) = handshake.first()
            && message_type != HANDSHAKE_CLIENT_HELLO
        {
            return Err(SniffError::NotClientHello);
        }
        if let Some(&[_, len_high, len_mid, len_low]) = handshake.get(..HANDSHAKE_HEADER_LEN) {
            let body_len =
                usize::from(len_high) << 16 | usize::from(len_mid) << 8 | usize::from(len_low);
            // Every record adds a header, so the buffer needs at least the
            // message plus the header of the record it started in.
            if RECORD_HEADER_LEN + HANDSHAKE_HEADER_LEN + body_len > MAX_CLIENT_HELLO {
                return Err(SniffError::TooLarge);
            }
            if let Some(body) = handshake.get(HANDSHAKE_HEADER_LEN..HANDSHAKE_HEADER_LEN + body_len)
            {
                return Ok(Some(body.to_vec()));
            }
        }
        if available_end < fragment_end {
            return Ok(None);
        }
        record_start = fragment_end;
    }
}

/// Parses a ClientHello body (RFC 8446 section 4.1.2, which also covers the
/// TLS 1.2 layout) down to the two extensions we route by.
fn parse_client_hello(body: &[u8]) -> Result<ClientHelloInfo, SniffError> {
    let mut reader = Reader::new(body);
    let _legacy_version = reader.u16("legacy version")?;
    let _random = reader.bytes(32, "random")?;
    let session_id_len = reader.u8("session id")?;
    if session_id_len > 32 {
        return Err(SniffError::Malformed("session id"));
    }
    reader.bytes(usize::from(session_id_len), "session id")?;
    let cipher_suites = reader.u16_prefixed("cipher suites")?;
    if cipher_suites.is_empty() || cipher_suites.len() % 2 != 0 {
        return Err(SniffError::Malformed("cipher suites"));
    }
    let compression = reader.u8_prefixed("compression methods")?;
    if compression.is_empty() {
        return Err(SniffError::Malformed("compression methods"));
    }

    let mut info = ClientHelloInfo {
        sni: None,
        alpn: Vec::new(),
    };
    // Hellos from before TLS 1.2 may end here, without any extensions.
    if reader.is_empty() {
        return Ok(info);
    }
    let mut extensions = Reader::new(reader.u16_prefixed("extensions")?);
    if !reader.is_empty() {
        return Err(SniffError::Malformed("bytes after extensions"));
    }
    let mut seen_sni = false;
    let mut seen_alpn = false;
    while !extensions.is_empty() {
        let extension_type = extensions.u16("extension type")?;
        let data = extensions.u16_prefixed("extension length")?;
        match extension_type {
            EXTENSION_SERVER_NAME => {
                // Two SNIs would let the relay and the backend route the same
                // connection differently.
                if seen_sni {
                    return Err(SniffError::Malformed("duplicate server name extension"));
                }
                seen_sni = true;
                info.sni = parse_server_name(data)?;
            }
            EXTENSION_ALPN => {
                if seen_alpn {
                    return Err(SniffError::Malformed("duplicate alpn extension"));
                }
                seen_alpn = true;
                info.alpn = parse_alpn(data)?;
            }
            _ => {}
        }
    }
    Ok(info)
}

/// Parses the server_name extension (RFC 6066 section 3).
fn parse_server_name(data: &[u8]) -> Result<Option<String>, SniffError> {
    let mut outer = Reader::new(data);
    let mut names = Reader::new(outer.u16_prefixed("server name list")?);
    if !outer.is_empty() {
        return Err(SniffError::Malformed("bytes after server name list"));
    }
    // Only a server answers with an empty extension; a client must name a host.
    if names.is_empty() {
        return Err(SniffError::Malformed("empty server name list"));
    }
    let mut host = None;
    while !names.is_empty() {
        let name_type = names.u8("server name type")?;
        let name = names.u16_prefixed("server name")?;
        if name_type != NAME_TYPE_HOST_NAME {
            continue;
        }
        if host.is_some() {
            return Err(SniffError::Malformed("more than one host name"));
        }
        host = Some(parse_hostname(name)?);
    }
    Ok(host)
}

/// Checks an SNI host name and returns it lowercased.
fn parse_hostname(name: &[u8]) -> Result<String, SniffError> {
    check_hostname(name).map_err(SniffError::Malformed)?;
    // check_hostname let only ASCII through, so this cannot fail.
    let host = std::str::from_utf8(name).map_err(|_| SniffError::Malformed("hostname"))?;
    Ok(host.to_ascii_lowercase())
}

/// Checks that `name` is a DNS host name as routing expects it: ASCII letters,
/// digits, `-` and `_` in dot-separated labels of 1 to 63 bytes, at most 253
/// bytes in all, no trailing dot. On failure, says what was wrong. Shared with
/// [`crate::http1`] so that SNI and Host route by the same rules.
pub(crate) fn check_hostname(name: &[u8]) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > MAX_HOSTNAME_LEN {
        return Err("hostname length");
    }
    for label in name.split(|&byte| byte == b'.') {
        if label.is_empty() || label.len() > MAX_LABEL_LEN {
            return Err("hostname label");
        }
        let valid = label
            .iter()
            .all(|&byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_');
        if !valid {
            return Err("hostname character");
        }
    }
    Ok(())
}

/// Parses the ALPN extension (RFC 7301 section 3.1).
fn parse_alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, SniffError> {
    let mut outer = Reader::new(data);
    let mut list = Reader::new(outer.u16_prefixed("alpn list")?);
    if !outer.is_empty() {
        return Err(SniffError::Malformed("bytes after alpn list"));
    }
    if list.is_empty() {
        return Err(SniffError::Malformed("empty alpn list"));
    }
    let mut protocols = Vec::new();
    while !list.is_empty() {
        let protocol = list.u8_prefixed("alpn protocol")?;
        if protocol.is_empty() {
            return Err(SniffError::Malformed("empty alpn protocol"));
        }
        protocols.push(protocol.to_vec());
    }
    Ok(protocols)
}

/// A cursor over peer bytes whose reads fail instead of panicking when the
/// bytes run out. Each read names the field it reads for the error.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn bytes(&mut self, len: usize, field: &'static str) -> Result<&'a [u8], SniffError> {
        let Some((head, tail)) = self.rest.split_at_checked(len) else {
            return Err(SniffError::Malformed(field));
        };
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], SniffError> {
        let Some((head, tail)) = self.rest.split_first_chunk::<N>() else {
            return Err(SniffError::Malformed(field));
        };
        self.rest = tail;
        Ok(*head)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, SniffError> {
        let [byte] = self.array(field)?;
        Ok(byte)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, SniffError> {
        self.array(field).map(u16::from_be_bytes)
    }

    fn u8_prefixed(&mut self, field: &'static str) -> Result<&'a [u8], SniffError> {
        let len = self.u8(field)?;
        self.bytes(usize::from(len), field)
    }

    fn u16_prefixed(&mut self, field: &'static str) -> Result<&'a [u8], SniffError> {
        let len = self.u16(field)?;
        self.bytes(usize::from(len), field)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello captured from `openssl s_client -servername
    /// blog.example.net -alpn h2,http/1.1` (OpenSSL 3.0.19) over loopback.
    const OPENSSL_HELLO_HEX: &[&str] = &[
        "160301014f0100014b0303695e129e0ad952b54bfafde92eee62711cd2771304",
        "d5545ba75782dc1425142120afe05a803d2547e88b0631934c46246dcc6470e7",
        "94edd7a6cce518ce960dcb76003e130213031301c02cc030009fcca9cca8ccaa",
        "c02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d",
        "009c003d003c0035002f00ff010000c4000000150013000010626c6f672e6578",
        "616d706c652e6e6574000b000403000102000a00160014001d0017001e001900",
        "1801000101010201030104002300000010000e000c02683208687474702f312e",
        "310016000000170000000d002a0028040305030603080708080809080a080b08",
        "0408050806040105010601030303010302040205020602002b00090803040303",
        "03020301002d00020101003300260024001d002064d43ad7ab112272cbced34b",
        "3fd05a0e12a817aea78ca17168c7a6038eb65830",
    ];

    fn openssl_hello() -> Vec<u8> {
        let hex: String = OPENSSL_HELLO_HEX.concat();
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("test hex is valid"))
            .collect()
    }

    fn info(sni: Option<&str>, alpn: &[&[u8]]) -> ClientHelloInfo {
        ClientHelloInfo {
            sni: sni.map(str::to_owned),
            alpn: alpn.iter().map(|protocol| protocol.to_vec()).collect(),
        }
    }

    fn u16_prefixed(bytes: &[u8]) -> Vec<u8> {
        let mut out = u16::try_from(bytes.len())
            .expect("test data fits u16")
            .to_be_bytes()
            .to_vec();
        out.extend_from_slice(bytes);
        out
    }

    fn extension(extension_type: u16, data: &[u8]) -> Vec<u8> {
        let mut out = extension_type.to_be_bytes().to_vec();
        out.extend(u16_prefixed(data));
        out
    }

    fn sni_extension(host: &[u8]) -> Vec<u8> {
        let mut entry = vec![NAME_TYPE_HOST_NAME];
        entry.extend(u16_prefixed(host));
        extension(EXTENSION_SERVER_NAME, &u16_prefixed(&entry))
    }

    fn alpn_extension(protocols: &[&[u8]]) -> Vec<u8> {
        let mut list = Vec::new();
        for protocol in protocols {
            list.push(u8::try_from(protocol.len()).expect("test protocol fits u8"));
            list.extend_from_slice(protocol);
        }
        extension(EXTENSION_ALPN, &u16_prefixed(&list))
    }

    /// Builds a ClientHello handshake message (header included) the way a
    /// TLS 1.3 client lays it out, with `extensions` already encoded.
    fn hello_message(extensions: &[u8]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend([0xab; 32]);
        body.push(32);
        body.extend([0xcd; 32]);
        body.extend(u16_prefixed(&[0x13, 0x01, 0x13, 0x02]));
        body.extend([1, 0]);
        body.extend(u16_prefixed(extensions));
        handshake_message(HANDSHAKE_CLIENT_HELLO, &body)
    }

    fn handshake_message(message_type: u8, body: &[u8]) -> Vec<u8> {
        let len = u32::try_from(body.len())
            .expect("test body fits u32")
            .to_be_bytes();
        let mut out = vec![message_type, len[1], len[2], len[3]];
        out.extend_from_slice(body);
        out
    }

    /// Wraps a handshake message into records whose fragments have the
    /// given sizes; the last record takes whatever is left.
    fn records(message: &[u8], fragment_sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = message;
        for &size in fragment_sizes {
            let (fragment, tail) = rest.split_at(size);
            out.extend(record(fragment));
            rest = tail;
        }
        if !rest.is_empty() {
            out.extend(record(rest));
        }
        out
    }

    fn record(fragment: &[u8]) -> Vec<u8> {
        let mut out = vec![CONTENT_TYPE_HANDSHAKE, 0x03, 0x01];
        out.extend(u16_prefixed(fragment));
        out
    }

    fn standard_extensions() -> Vec<u8> {
        let mut extensions = extension(0x002b, &[0x02, 0x03, 0x04]);
        extensions.extend(sni_extension(b"Blog.Example.NET"));
        extensions.extend(alpn_extension(&[b"kitepipe/1", b"h2"]));
        extensions
    }

    #[test]
    fn openssl_client_hello() {
        let hello = openssl_hello();
        assert_eq!(
            sniff_client_hello(&hello),
            Ok(Sniffed::Tls(info(
                Some("blog.example.net"),
                &[b"h2", b"http/1.1"]
            )))
        );
    }

    #[test]
    fn openssl_client_hello_at_every_split() {
        let hello = openssl_hello();
        for len in 0..hello.len() {
            assert_eq!(
                sniff_client_hello(&hello[..len]),
                Ok(Sniffed::NeedMore),
                "{len}"
            );
        }
    }

    #[test]
    fn trailing_bytes_are_ignored() {
        let mut hello = openssl_hello();
        hello.extend(b"\x17\x03\x03\x00\x05early");
        let res = sniff_client_hello(&hello);
        assert!(
            matches!(res, Ok(Sniffed::Tls(ref info)) if info.sni.is_some()),
            "{res:?}"
        );
    }

    #[test]
    fn built_client_hellos() {
        let no_extensions = {
            let mut body = vec![0x03, 0x01];
            body.extend([0; 32]);
            body.push(0);
            body.extend(u16_prefixed(&[0x00, 0x2f]));
            body.extend([1, 0]);
            handshake_message(HANDSHAKE_CLIENT_HELLO, &body)
        };
        let cases: Vec<(&str, Vec<u8>, ClientHelloInfo)> = vec![
            (
                "sni and alpn, lowercased",
                records(&hello_message(&standard_extensions()), &[]),
                info(Some("blog.example.net"), &[b"kitepipe/1", b"h2"]),
            ),
            (
                "split across two records",
                records(&hello_message(&standard_extensions()), &[10]),
                info(Some("blog.example.net"), &[b"kitepipe/1", b"h2"]),
            ),
            (
                "one record per byte",
                {
                    let message = hello_message(&standard_extensions());
                    records(&message, &vec![1; message.len()])
                },
                info(Some("blog.example.net"), &[b"kitepipe/1", b"h2"]),
            ),
            (
                "no sni",
                records(&hello_message(&alpn_extension(&[b"kitepipe/1"])), &[]),
                info(None, &[b"kitepipe/1"]),
            ),
            (
                "no alpn",
                records(&hello_message(&sni_extension(b"a_b.example")), &[]),
                info(Some("a_b.example"), &[]),
            ),
            (
                "empty extensions",
                records(&hello_message(&[]), &[]),
                info(None, &[]),
            ),
            (
                "no extensions block",
                records(&no_extensions, &[]),
                info(None, &[]),
            ),
        ];
        for (name, bytes, want) in cases {
            assert_eq!(sniff_client_hello(&bytes), Ok(Sniffed::Tls(want)), "{name}");
            for len in 0..bytes.len() {
                assert_eq!(
                    sniff_client_hello(&bytes[..len]),
                    Ok(Sniffed::NeedMore),
                    "{name} cut at {len}"
                );
            }
        }
    }

    #[test]
    fn rejected_client_hellos() {
        use SniffError::*;
        let hello = |extensions: &[u8]| records(&hello_message(extensions), &[]);
        let mut two_snis = sni_extension(b"a.example");
        two_snis.extend(sni_extension(b"b.example"));
        let mut two_alpns = alpn_extension(&[b"h2"]);
        two_alpns.extend(alpn_extension(&[b"http/1.1"]));
        let two_host_names = {
            let mut list = vec![NAME_TYPE_HOST_NAME];
            list.extend(u16_prefixed(b"a.example"));
            list.push(NAME_TYPE_HOST_NAME);
            list.extend(u16_prefixed(b"b.example"));
            extension(EXTENSION_SERVER_NAME, &u16_prefixed(&list))
        };
        let long_label = [b'a'; 64];
        let long_name = [b"a.".as_slice(); 127].concat();
        let mut wrong_extensions_len = hello_message(&sni_extension(b"a.example"));
        let last = wrong_extensions_len.len() - 1;
        wrong_extensions_len.truncate(last);
        let shrunk_len = u32::try_from(wrong_extensions_len.len() - 4)
            .expect("fits")
            .to_be_bytes();
        wrong_extensions_len[1..4].copy_from_slice(&shrunk_len[1..]);

        let cases: Vec<(&str, Vec<u8>, SniffError)> = vec![
            ("http", b"GET / HTTP/1.1\r\n\r\n".to_vec(), NotHandshake),
            (
                "ssh banner",
                b"SSH-2.0-OpenSSH_9.6\r\n".to_vec(),
                NotHandshake,
            ),
            (
                "sslv2 hello",
                vec![0x80, 0x2e, 0x01, 0x00, 0x02],
                NotHandshake,
            ),
            ("one garbage byte", vec![0xff], NotHandshake),
            (
                "record version",
                vec![0x16, 0x07, 0x01, 0x00, 0x10],
                Malformed("record version"),
            ),
            (
                "empty record",
                vec![0x16, 0x03, 0x01, 0x00, 0x00],
                Malformed("empty handshake record"),
            ),
            (
                "record over 2^14",
                vec![0x16, 0x03, 0x01, 0x40, 0x01],
                Malformed("record length"),
            ),
            (
                "server hello",
                records(&handshake_message(2, &[0; 40]), &[]),
                NotClientHello,
            ),
            (
                "server hello type seen early",
                vec![0x16, 0x03, 0x01, 0x00, 0x40, 0x02],
                NotClientHello,
            ),
            (
                "alert record after first fragment",
                {
                    let mut bytes = records(&hello_message(&standard_extensions())[..10], &[]);
                    bytes.extend([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]);
                    bytes
                },
                Malformed("record of another type inside the hello"),
            ),
            (
                "handshake length beyond the bound",
                vec![0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x00, 0x40, 0x00],
                TooLarge,
            ),
            (
                "handshake length at 2^24",
                vec![0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0xff, 0xff, 0xff],
                TooLarge,
            ),
            (
                "duplicate sni extension",
                hello(&two_snis),
                Malformed("duplicate server name extension"),
            ),
            (
                "duplicate alpn extension",
                hello(&two_alpns),
                Malformed("duplicate alpn extension"),
            ),
            (
                "two host names",
                hello(&two_host_names),
                Malformed("more than one host name"),
            ),
            (
                "non-ascii sni",
                hello(&sni_extension("bl\u{f6}g.example".as_bytes())),
                Malformed("hostname character"),
            ),
            (
                "sni with a nul",
                hello(&sni_extension(b"a\0.example")),
                Malformed("hostname character"),
            ),
            (
                "sni with a slash",
                hello(&sni_extension(b"a/b.example")),
                Malformed("hostname character"),
            ),
            (
                "sni with a port",
                hello(&sni_extension(b"a.example:443")),
                Malformed("hostname character"),
            ),
            (
                "empty sni",
                hello(&sni_extension(b"")),
                Malformed("hostname length"),
            ),
            (
                "empty label",
                hello(&sni_extension(b"a..example")),
                Malformed("hostname label"),
            ),
            (
                "trailing dot",
                hello(&sni_extension(b"a.example.")),
                Malformed("hostname label"),
            ),
            (
                "label over 63",
                hello(&sni_extension(&long_label)),
                Malformed("hostname label"),
            ),
            (
                "name over 253",
                hello(&sni_extension(&long_name)),
                Malformed("hostname length"),
            ),
            (
                "empty server name list",
                hello(&extension(EXTENSION_SERVER_NAME, &u16_prefixed(&[]))),
                Malformed("empty server name list"),
            ),
            (
                "server name list longer than its extension",
                hello(&extension(EXTENSION_SERVER_NAME, &[0x00, 0x09, 0x00])),
                Malformed("server name list"),
            ),
            (
                "empty alpn protocol",
                hello(&alpn_extension(&[b"h2", b""])),
                Malformed("empty alpn protocol"),
            ),
            (
                "empty alpn list",
                hello(&extension(EXTENSION_ALPN, &u16_prefixed(&[]))),
                Malformed("empty alpn list"),
            ),
            (
                "alpn protocol overruns the list",
                hello(&extension(EXTENSION_ALPN, &u16_prefixed(&[5, b'h', b'2']))),
                Malformed("alpn protocol"),
            ),
            (
                "extension overruns the block",
                hello(&[0x00, 0x10, 0x00, 0x20, 0x00]),
                Malformed("extension length"),
            ),
            (
                "extensions length wrong",
                records(&wrong_extensions_len, &[]),
                Malformed("extensions"),
            ),
            (
                "truncated body",
                records(
                    &handshake_message(HANDSHAKE_CLIENT_HELLO, &[0x03, 0x03, 0x00]),
                    &[],
                ),
                Malformed("random"),
            ),
            (
                "session id over 32",
                {
                    let mut body = vec![0x03, 0x03];
                    body.extend([0; 32]);
                    body.push(33);
                    body.extend([0; 33]);
                    records(&handshake_message(HANDSHAKE_CLIENT_HELLO, &body), &[])
                },
                Malformed("session id"),
            ),
            (
                "odd cipher suites",
                {
                    let mut body = vec![0x03, 0x03];
                    body.extend([0; 32]);
                    body.push(0);
                    body.extend(u16_prefixed(&[0x13]));
                    body.extend([1, 0]);
                    records(&handshake_message(HANDSHAKE_CLIENT_HELLO, &body), &[])
                },
                Malformed("cipher suites"),
            ),
            (
                "no compression methods",
                {
                    let mut body = vec![0x03, 0x03];
                    body.extend([0; 32]);
                    body.push(0);
                    body.extend(u16_prefixed(&[0x13, 0x01]));
                    body.push(0);
                    records(&handshake_message(HANDSHAKE_CLIENT_HELLO, &body), &[])
                },
                Malformed("compression methods"),
            ),
            (
                "bytes after extensions",
                {
                    let mut message = hello_message(&[]);
                    message.push(0);
                    let len = u32::try_from(message.len() - 4)
                        .expect("fits")
                        .to_be_bytes();
                    message[1..4].copy_from_slice(&len[1..]);
                    records(&message, &[])
                },
                Malformed("bytes after extensions"),
            ),
        ];
        for (name, bytes, want) in cases {
            assert_eq!(sniff_client_hello(&bytes), Err(want), "{name}");
        }
    }

    #[test]
    fn many_tiny_records_hit_the_bound() {
        // A hello declared at a legal 8 KiB but sent one byte per record would
        // need six times that in buffered record headers.
        let message = hello_message(&extension(0xfafa, &[0; 8 * 1024]));
        let bytes = records(&message, &vec![1; message.len()]);
        assert_eq!(sniff_client_hello(&bytes), Err(SniffError::TooLarge));
        for len in (0..bytes.len()).step_by(61) {
            match sniff_client_hello(&bytes[..len]) {
                Ok(Sniffed::NeedMore) => assert!(len < MAX_CLIENT_HELLO, "{len}"),
                res => assert_eq!(res, Err(SniffError::TooLarge), "{len}"),
            }
        }
    }

    #[test]
    fn largest_hello_that_fits() {
        let overhead = RECORD_HEADER_LEN + hello_message(&extension(0xfafa, &[])).len();
        let padding = MAX_CLIENT_HELLO - overhead;
        let fits = records(&hello_message(&extension(0xfafa, &vec![0; padding])), &[]);
        assert_eq!(fits.len(), MAX_CLIENT_HELLO);
        assert_eq!(sniff_client_hello(&fits), Ok(Sniffed::Tls(info(None, &[]))));
        let too_big = records(
            &hello_message(&extension(0xfafa, &vec![0; padding + 1])),
            &[],
        );
        assert_eq!(
            sniff_client_hello(&too_big[..10]),
            Err(SniffError::TooLarge)
        );
    }

    #[test]
    fn garbage_never_panics() {
        // A cheap deterministic byte soup; the fuzz target goes further.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for round in 0..2000 {
            let len = round % 300;
            let mut bytes = Vec::with_capacity(len);
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                bytes.push(state.to_le_bytes()[0]);
            }
            if let Some(first) = bytes.first_mut() {
                *first = CONTENT_TYPE_HANDSHAKE;
            }
            let _ = sniff_client_hello(&bytes);
        }
    }
}
