use std::net::IpAddr;

use super::*;

/// What a test expects of a parsed head; `head_len` is always the whole
/// input in these tables.
struct Want {
    method: &'static str,
    host: Option<&'static str>,
    version_minor: u8,
    body: BodyKind,
    upgrade: bool,
    close: bool,
}

const GET: Want = Want {
    method: "GET",
    host: Some("blog.example.net"),
    version_minor: 1,
    body: BodyKind::Empty,
    upgrade: false,
    close: false,
};

fn parse_complete(input: &[u8]) -> RequestHead {
    match parse_request_head(input) {
        Ok(Some(head)) => head,
        other => panic!("{:?}: {other:?}", String::from_utf8_lossy(input)),
    }
}

#[test]
fn parses_request_heads() {
    let cases: &[(&str, &[u8], Want)] = &[
        (
            "simple get",
            b"GET /index.html HTTP/1.1\r\nHost: Blog.Example.NET\r\nAccept: */*\r\n\r\n",
            GET,
        ),
        (
            "host with port",
            b"GET / HTTP/1.1\r\nHost: blog.example.net:8080\r\n\r\n",
            GET,
        ),
        (
            "host with empty port",
            b"GET / HTTP/1.1\r\nHost: blog.example.net:\r\n\r\n",
            GET,
        ),
        (
            "host with trailing dot",
            b"GET / HTTP/1.1\r\nHost: blog.example.net.\r\n\r\n",
            GET,
        ),
        (
            "absolute-form target",
            b"GET http://Blog.Example.net:8080/a?b HTTP/1.1\r\nHost: blog.example.net:8080\r\n\r\n",
            GET,
        ),
        (
            "absolute-form without host field",
            b"GET https://blog.example.net HTTP/1.1\r\n\r\n",
            GET,
        ),
        (
            "absolute-form with query only",
            b"GET http://blog.example.net?x=/ HTTP/1.1\r\nHost: blog.example.net\r\n\r\n",
            GET,
        ),
        (
            "ipv6 literal",
            b"GET / HTTP/1.1\r\nHost: [2001:DB8::1]:8080\r\n\r\n",
            Want {
                host: Some("[2001:db8::1]"),
                ..GET
            },
        ),
        (
            "missing host",
            b"GET / HTTP/1.1\r\n\r\n",
            Want { host: None, ..GET },
        ),
        (
            "empty host",
            b"GET / HTTP/1.1\r\nHost:\r\n\r\n",
            Want { host: None, ..GET },
        ),
        (
            "options asterisk",
            b"OPTIONS * HTTP/1.1\r\nHost: blog.example.net\r\n\r\n",
            Want {
                method: "OPTIONS",
                ..GET
            },
        ),
        (
            "leading empty lines",
            b"\r\n\r\nGET / HTTP/1.1\r\nHost: blog.example.net\r\n\r\n",
            GET,
        ),
        (
            "post with content-length",
            b"POST /form HTTP/1.1\r\nHost: blog.example.net\r\nContent-Length: 27\r\n\r\n",
            Want {
                method: "POST",
                body: BodyKind::Length(27),
                ..GET
            },
        ),
        (
            "content-length zero",
            b"POST / HTTP/1.1\r\nHost: blog.example.net\r\nContent-Length: 0\r\n\r\n",
            Want {
                method: "POST",
                body: BodyKind::Length(0),
                ..GET
            },
        ),
        (
            "repeated equal content-length",
            b"PUT / HTTP/1.1\r\nHost: blog.example.net\r\nContent-Length: 5, 5\r\ncontent-length: 005\r\n\r\n",
            Want {
                method: "PUT",
                body: BodyKind::Length(5),
                ..GET
            },
        ),
        (
            "chunked",
            b"POST / HTTP/1.1\r\nHost: blog.example.net\r\nTransfer-Encoding: Chunked\r\n\r\n",
            Want {
                method: "POST",
                body: BodyKind::Chunked,
                ..GET
            },
        ),
        (
            "gzip then chunked over two fields",
            b"POST / HTTP/1.1\r\nHost: blog.example.net\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
            Want {
                method: "POST",
                body: BodyKind::Chunked,
                ..GET
            },
        ),
        (
            "websocket upgrade",
            b"GET /chat HTTP/1.1\r\nHost: blog.example.net\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n",
            Want {
                upgrade: true,
                ..GET
            },
        ),
        (
            "upgrade field without connection option",
            b"GET / HTTP/1.1\r\nHost: blog.example.net\r\nUpgrade: websocket\r\n\r\n",
            GET,
        ),
        (
            "connection upgrade without upgrade field",
            b"GET / HTTP/1.1\r\nHost: blog.example.net\r\nConnection: upgrade\r\n\r\n",
            GET,
        ),
        (
            "upgrade ignored in http/1.0",
            b"GET / HTTP/1.0\r\nHost: blog.example.net\r\nConnection: upgrade, keep-alive\r\nUpgrade: websocket\r\n\r\n",
            Want {
                version_minor: 0,
                ..GET
            },
        ),
        (
            "connect",
            b"CONNECT Blog.Example.net:443 HTTP/1.1\r\nHost: blog.example.net:443\r\n\r\n",
            Want {
                method: "CONNECT",
                upgrade: true,
                ..GET
            },
        ),
        (
            "connect ignores content-length",
            b"CONNECT blog.example.net:443 HTTP/1.1\r\nContent-Length: 10\r\n\r\n",
            Want {
                method: "CONNECT",
                upgrade: true,
                ..GET
            },
        ),
        (
            "http/1.0 closes by default",
            b"GET / HTTP/1.0\r\nHost: blog.example.net\r\n\r\n",
            Want {
                version_minor: 0,
                close: true,
                ..GET
            },
        ),
        (
            "http/1.0 keep-alive",
            b"GET / HTTP/1.0\r\nHost: blog.example.net\r\nConnection: Keep-Alive\r\n\r\n",
            Want {
                version_minor: 0,
                ..GET
            },
        ),
        (
            "http/1.1 connection close",
            b"GET / HTTP/1.1\r\nHost: blog.example.net\r\nConnection: TE, close\r\n\r\n",
            Want { close: true, ..GET },
        ),
    ];
    for (name, input, want) in cases {
        let head = parse_complete(input);
        assert_eq!(head.method, want.method, "{name}");
        assert_eq!(head.host.as_deref(), want.host, "{name}");
        assert_eq!(head.version_minor, want.version_minor, "{name}");
        assert_eq!(head.body, want.body, "{name}");
        assert_eq!(head.upgrade, want.upgrade, "{name}");
        assert_eq!(head.close, want.close, "{name}");
        assert_eq!(head.head_len, input.len(), "{name}");
        for len in 0..input.len() {
            assert_eq!(
                parse_request_head(&input[..len]),
                Ok(None),
                "{name} cut at {len}"
            );
        }
    }
}

#[test]
fn target_is_kept_as_sent() {
    let head = parse_complete(b"GET http://a.example/%7Euser?q=1 HTTP/1.1\r\n\r\n");
    assert_eq!(head.target, "http://a.example/%7Euser?q=1");
}

#[test]
fn rejects_bad_heads() {
    use HttpError::*;
    let many_fields = {
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        for n in 0..=MAX_HEADERS {
            head.extend(format!("X-Field-{n}: {n}\r\n").bytes());
        }
        head.extend(b"\r\n");
        head
    };
    let just_too_long = {
        let mut head = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
        head.resize(MAX_HEAD_LEN, b'a');
        head.extend(b"\r\n\r\n");
        head
    };
    let cases: Vec<(&str, Vec<u8>, HttpError)> = vec![
        (
            "binary garbage",
            b"\x00\x01\x02\x03\r\n\r\n".to_vec(),
            Malformed("request line"),
        ),
        (
            "tls hello",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc".to_vec(),
            Malformed("request line"),
        ),
        (
            "no target",
            b"GET HTTP/1.1\r\n\r\n".to_vec(),
            Malformed("request line"),
        ),
        (
            "http/2 preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            UnsupportedVersion,
        ),
        (
            "http/1.2",
            b"GET / HTTP/1.2\r\n\r\n".to_vec(),
            UnsupportedVersion,
        ),
        (
            "http/0.9",
            b"GET /\r\n\r\n".to_vec(),
            Malformed("request line"),
        ),
        (
            "bare lf",
            b"GET / HTTP/1.1\nHost: a.example\n\n".to_vec(),
            Malformed("bare lf"),
        ),
        (
            "bare lf hiding a field",
            b"GET / HTTP/1.1\r\nX: a\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
            Malformed("bare lf"),
        ),
        (
            "space before colon",
            b"GET / HTTP/1.1\r\nHost : a.example\r\n\r\n".to_vec(),
            Malformed("header name"),
        ),
        (
            "obs-fold",
            b"GET / HTTP/1.1\r\nX-A: a\r\n b\r\n\r\n".to_vec(),
            Malformed("header name"),
        ),
        (
            "nul in value",
            b"GET / HTTP/1.1\r\nX-A: a\0b\r\n\r\n".to_vec(),
            Malformed("header value"),
        ),
        (
            "relative target",
            b"GET index.html HTTP/1.1\r\n\r\n".to_vec(),
            Malformed("request target"),
        ),
        (
            "asterisk outside options",
            b"GET * HTTP/1.1\r\n\r\n".to_vec(),
            Malformed("request target"),
        ),
        (
            "two host fields",
            b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n".to_vec(),
            Malformed("more than one host field"),
        ),
        (
            "host with space",
            b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n".to_vec(),
            Malformed("hostname character"),
        ),
        (
            "host with path",
            b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n".to_vec(),
            Malformed("hostname character"),
        ),
        (
            "host with userinfo",
            b"GET / HTTP/1.1\r\nHost: u@a.example\r\n\r\n".to_vec(),
            Malformed("hostname character"),
        ),
        (
            "host non-ascii",
            "GET / HTTP/1.1\r\nHost: bl\u{f6}g.example\r\n\r\n"
                .as_bytes()
                .to_vec(),
            Malformed("hostname character"),
        ),
        (
            "host bad port",
            b"GET / HTTP/1.1\r\nHost: a.example:http\r\n\r\n".to_vec(),
            Malformed("port"),
        ),
        (
            "host port too big",
            b"GET / HTTP/1.1\r\nHost: a.example:65536\r\n\r\n".to_vec(),
            Malformed("port"),
        ),
        (
            "host two ports",
            b"GET / HTTP/1.1\r\nHost: a.example:80:81\r\n\r\n".to_vec(),
            Malformed("port"),
        ),
        (
            "host empty label",
            b"GET / HTTP/1.1\r\nHost: a..example\r\n\r\n".to_vec(),
            Malformed("hostname label"),
        ),
        (
            "host only a dot",
            b"GET / HTTP/1.1\r\nHost: .\r\n\r\n".to_vec(),
            Malformed("hostname length"),
        ),
        (
            "bad ipv6 literal",
            b"GET / HTTP/1.1\r\nHost: [zz::1]\r\n\r\n".to_vec(),
            Malformed("ipv6 literal"),
        ),
        (
            "unclosed ipv6 literal",
            b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n".to_vec(),
            Malformed("ipv6 literal"),
        ),
        (
            "absolute-form userinfo",
            b"GET http://a.example@b.example/ HTTP/1.1\r\n\r\n".to_vec(),
            Malformed("userinfo in target"),
        ),
        (
            "absolute-form host mismatch",
            b"GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n".to_vec(),
            Malformed("host field does not match target"),
        ),
        (
            "absolute-form empty authority",
            b"GET http:///x HTTP/1.1\r\n\r\n".to_vec(),
            Malformed("hostname length"),
        ),
        (
            "absolute-form bad scheme",
            b"GET 1http://a.example/ HTTP/1.1\r\n\r\n".to_vec(),
            Malformed("request target"),
        ),
        (
            "connect without authority",
            b"CONNECT / HTTP/1.1\r\n\r\n".to_vec(),
            Malformed("connect target"),
        ),
        ("too many fields", many_fields, HeadTooLarge),
        ("complete but over the bound", just_too_long, HeadTooLarge),
        (
            "transfer-encoding and content-length",
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
            TransferEncodingWithContentLength,
        ),
        (
            "two content-lengths",
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n".to_vec(),
            ConflictingContentLength,
        ),
        (
            "content-length list",
            b"POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n".to_vec(),
            ConflictingContentLength,
        ),
        (
            "content-length sign",
            b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n".to_vec(),
            InvalidContentLength,
        ),
        (
            "content-length negative",
            b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n".to_vec(),
            InvalidContentLength,
        ),
        (
            "content-length hex",
            b"POST / HTTP/1.1\r\nContent-Length: 0x10\r\n\r\n".to_vec(),
            InvalidContentLength,
        ),
        (
            "content-length empty",
            b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n".to_vec(),
            InvalidContentLength,
        ),
        (
            "content-length inner space",
            b"POST / HTTP/1.1\r\nContent-Length: 1 2\r\n\r\n".to_vec(),
            InvalidContentLength,
        ),
        (
            "content-length empty element",
            b"POST / HTTP/1.1\r\nContent-Length: 5,,5\r\n\r\n".to_vec(),
            InvalidContentLength,
        ),
        (
            "content-length overflow",
            b"POST / HTTP/1.1\r\nContent-Length: 18446744073709551616\r\n\r\n".to_vec(),
            InvalidContentLength,
        ),
        (
            "transfer-encoding gzip",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(),
            UnsupportedTransferEncoding,
        ),
        (
            "chunked not last",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n".to_vec(),
            UnsupportedTransferEncoding,
        ),
        (
            "chunked twice",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
                .to_vec(),
            UnsupportedTransferEncoding,
        ),
        (
            "identity after chunked",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n"
                .to_vec(),
            UnsupportedTransferEncoding,
        ),
        (
            "lookalike coding",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n".to_vec(),
            UnsupportedTransferEncoding,
        ),
        (
            "coding with parameter",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked;q=1\r\n\r\n".to_vec(),
            UnsupportedTransferEncoding,
        ),
        (
            "empty transfer-encoding",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: ,\r\n\r\n".to_vec(),
            UnsupportedTransferEncoding,
        ),
        (
            "transfer-encoding in http/1.0",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
            UnsupportedTransferEncoding,
        ),
    ];
    for (name, input, want) in cases {
        assert_eq!(parse_request_head(&input), Err(want), "{name}");
    }
}

#[test]
fn one_megabyte_of_headers_is_too_large() {
    let mut input = b"GET / HTTP/1.1\r\nHost: a.example\r\n".to_vec();
    while input.len() < 1024 * 1024 {
        input.extend(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    assert_eq!(parse_request_head(&input), Err(HttpError::HeadTooLarge));
    // One endless line is refused the same way, whatever token it is in.
    let endless = [b'a'; MAX_HEAD_LEN];
    assert_eq!(parse_request_head(&endless), Err(HttpError::HeadTooLarge));
    let mut endless_target = b"GET /".to_vec();
    endless_target.resize(MAX_HEAD_LEN, b'a');
    assert_eq!(
        parse_request_head(&endless_target),
        Err(HttpError::HeadTooLarge)
    );
    assert_eq!(
        parse_request_head(&endless_target[..MAX_HEAD_LEN - 1]),
        Ok(None)
    );
}

#[test]
fn errors_map_to_statuses() {
    let cases = [
        (HttpError::Malformed("x"), 400),
        (HttpError::HeadTooLarge, 431),
        (HttpError::TransferEncodingWithContentLength, 400),
        (HttpError::ConflictingContentLength, 400),
        (HttpError::InvalidContentLength, 400),
        (HttpError::UnsupportedTransferEncoding, 400),
        (HttpError::BadChunk("x"), 400),
        (HttpError::UnsupportedVersion, 505),
    ];
    for (err, status) in cases {
        assert_eq!(err.status(), status, "{err}");
    }
}

/// Feeds `input` to a fresh scanner in pieces of `piece_len` bytes, the
/// way a relay would, and returns how many bytes it claimed in all.
fn scan_in_pieces(
    kind: BodyKind,
    input: &[u8],
    piece_len: usize,
) -> Result<BodyProgress, HttpError> {
    let mut scanner = BodyScanner::new(kind);
    let mut consumed = 0;
    for piece in input.chunks(piece_len) {
        let progress = scanner.scan(piece)?;
        assert!(progress.consumed <= piece.len());
        consumed += progress.consumed;
        if progress.done {
            return Ok(BodyProgress {
                consumed,
                done: true,
            });
        }
        assert_eq!(
            progress.consumed,
            piece.len(),
            "an unfinished body takes all it is given"
        );
    }
    Ok(BodyProgress {
        consumed,
        done: false,
    })
}

#[test]
fn scans_bodies() {
    let cases: &[(&str, BodyKind, &[u8])] = &[
        ("empty", BodyKind::Empty, b""),
        ("zero length", BodyKind::Length(0), b""),
        ("length", BodyKind::Length(11), b"hello world"),
        ("one chunk", BodyKind::Chunked, b"5\r\nhello\r\n0\r\n\r\n"),
        ("no chunks", BodyKind::Chunked, b"0\r\n\r\n"),
        (
            "uppercase hex, leading zeros",
            BodyKind::Chunked,
            b"00A\r\n0123456789\r\n000\r\n\r\n",
        ),
        (
            "extensions",
            BodyKind::Chunked,
            b"5;name=value;flag\r\nhello\r\n6 ; q=\"a b\"\r\n world\r\n0;last\r\n\r\n",
        ),
        (
            "trailers",
            BodyKind::Chunked,
            b"3\r\nabc\r\n0\r\nExpires: Wed, 21 Oct 2015 07:28:00 GMT\r\nX-Sum:\r\n\r\n",
        ),
        (
            "chunk data holding crlfs",
            BodyKind::Chunked,
            b"4\r\n\r\n\r\n\r\n0\r\n\r\n",
        ),
    ];
    for (name, kind, body) in cases {
        let mut input = body.to_vec();
        input.extend(b"GET /next HTTP/1.1\r\n\r\n");
        for piece_len in [1, 2, 3, 7, input.len()] {
            assert_eq!(
                scan_in_pieces(*kind, &input, piece_len),
                Ok(BodyProgress {
                    consumed: body.len(),
                    done: true,
                }),
                "{name} in pieces of {piece_len}"
            );
        }
        if let Some(short) = body.len().checked_sub(1) {
            assert_eq!(
                scan_in_pieces(*kind, &body[..short], 1),
                Ok(BodyProgress {
                    consumed: short,
                    done: false,
                }),
                "{name} without its last byte"
            );
        }
    }
}

#[test]
fn scanner_at_done_claims_nothing() {
    let mut scanner = BodyScanner::new(BodyKind::Length(2));
    assert_eq!(
        scanner.scan(b"ab").map(|p| (p.consumed, p.done)),
        Ok((2, true))
    );
    assert!(scanner.is_done());
    assert_eq!(
        scanner.scan(b"cd").map(|p| (p.consumed, p.done)),
        Ok((0, true))
    );
    assert_eq!(
        scanner.scan(b"").map(|p| (p.consumed, p.done)),
        Ok((0, true))
    );
}

#[test]
fn rejects_bad_chunks() {
    let long_extension = {
        let mut input = b"5;".to_vec();
        input.resize(MAX_CHUNK_LINE_LEN + 10, b'x');
        input
    };
    let long_trailers = {
        let mut input = b"0\r\nX-Pad: ".to_vec();
        input.resize(MAX_TRAILERS_LEN + 10, b'a');
        input
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not hex", b"z\r\n".to_vec(), "missing chunk size"),
        ("empty size line", b"\r\n".to_vec(), "missing chunk size"),
        ("negative", b"-5\r\n".to_vec(), "missing chunk size"),
        ("0x prefix", b"0x5\r\n".to_vec(), "chunk-size character"),
        (
            "bare lf after size",
            b"5\nhello\r\n".to_vec(),
            "chunk-size character",
        ),
        (
            "space then crlf",
            b"5 \r\nhello\r\n".to_vec(),
            "chunk-size character",
        ),
        (
            "space inside digits",
            b"1 0\r\n".to_vec(),
            "chunk-size character",
        ),
        (
            "bare lf after extension",
            b"5;a\nhello".to_vec(),
            "chunk extension character",
        ),
        (
            "cr without lf",
            b"5\rhello".to_vec(),
            "chunk-size line not ended by crlf",
        ),
        (
            "nul in extension",
            b"5;a\0\r\n".to_vec(),
            "chunk extension character",
        ),
        (
            "overflow",
            b"10000000000000000\r\n".to_vec(),
            "chunk size overflows",
        ),
        ("long extension", long_extension, "chunk-size line too long"),
        (
            "data too long",
            b"5\r\nhello!\r\n".to_vec(),
            "chunk data not followed by crlf",
        ),
        (
            "data then bare lf",
            b"5\r\nhello\n0\r\n\r\n".to_vec(),
            "chunk data not followed by crlf",
        ),
        (
            "trailer without colon",
            b"0\r\nbad line\r\n\r\n".to_vec(),
            "trailer field",
        ),
        (
            "trailer obs-fold",
            b"0\r\nX-A: a\r\n b\r\n\r\n".to_vec(),
            "trailer field",
        ),
        (
            "trailer bare lf",
            b"0\r\nX-A: a\n\r\n".to_vec(),
            "trailer field",
        ),
        ("final bare lf", b"0\r\n\n".to_vec(), "trailer field"),
        (
            "trailer nul",
            b"0\r\nX-A: \0\r\n\r\n".to_vec(),
            "trailer field",
        ),
        ("long trailers", long_trailers, "trailers too long"),
    ];
    for (name, input, want) in cases {
        for piece_len in [1, input.len()] {
            assert_eq!(
                scan_in_pieces(BodyKind::Chunked, &input, piece_len),
                Err(HttpError::BadChunk(want)),
                "{name} in pieces of {piece_len}"
            );
        }
    }
}

#[test]
fn chunk_errors_are_sticky() {
    let mut scanner = BodyScanner::new(BodyKind::Chunked);
    let err = HttpError::BadChunk("missing chunk size");
    assert_eq!(scanner.scan(b"g"), Err(err.clone()));
    assert_eq!(scanner.scan(b"0\r\n\r\n"), Err(err.clone()));
    assert_eq!(scanner.scan(b""), Err(err));
}

#[test]
fn pipelined_requests_line_up() {
    let requests: &[(&[u8], &[u8])] = &[
        (
            b"POST /a HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\n\r\n",
            b"hello",
        ),
        (
            b"POST /b HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"3;x=y\r\nabc\r\n0\r\nX-T: 1\r\n\r\n",
        ),
        (b"GET /c HTTP/1.1\r\nHost: b.example\r\n\r\n", b""),
        (
            b"GET /d HTTP/1.1\r\nHost: c.example\r\nConnection: close\r\n\r\n",
            b"",
        ),
    ];
    let buf: Vec<u8> = requests
        .iter()
        .flat_map(|(head, body)| [*head, *body].concat())
        .collect();
    let mut pos = 0;
    for (head_bytes, body) in requests {
        let head = parse_complete(&buf[pos..]);
        assert_eq!(head.head_len, head_bytes.len());
        pos += head.head_len;
        let progress = BodyScanner::new(head.body).scan(&buf[pos..]);
        assert_eq!(
            progress,
            Ok(BodyProgress {
                consumed: body.len(),
                done: true,
            })
        );
        pos += body.len();
    }
    assert_eq!(pos, buf.len());
    assert_eq!(parse_request_head(&buf[pos..]), Ok(None));
}

#[test]
fn delimits_response_bodies() {
    use ResponseBody::{Framed, UntilClose};
    type Want = Result<Option<(u16, ResponseBody)>, HttpError>;
    let cases: &[(&str, &str, &[u8], Want)] = &[
        (
            "length",
            "GET",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            Ok(Some((200, Framed(BodyKind::Length(5))))),
        ),
        (
            "chunked",
            "GET",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            Ok(Some((200, Framed(BodyKind::Chunked)))),
        ),
        (
            "neither: until close",
            "GET",
            b"HTTP/1.0 200 OK\r\n\r\n",
            Ok(Some((200, UntilClose))),
        ),
        (
            "coding not chunked: until close",
            "GET",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            Ok(Some((200, UntilClose))),
        ),
        (
            "partial",
            "GET",
            b"HTTP/1.1 200 OK\r\nContent-Len",
            Ok(None),
        ),
        (
            "both framings",
            "GET",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            Err(HttpError::TransferEncodingWithContentLength),
        ),
        (
            "conflicting lengths",
            "GET",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            Err(HttpError::ConflictingContentLength),
        ),
        (
            "bare lf",
            "GET",
            b"HTTP/1.1 200 OK\nContent-Length: 5\r\n\r\n",
            Err(HttpError::Malformed("bare lf")),
        ),
    ];
    for (name, method, input, want) in cases {
        let got = parse_response_head(input, method)
            .map(|head| head.map(|head| (head.status, head.body)));
        assert_eq!(&got, want, "{name}");
    }
    // No body whatever the head says: the answer to a HEAD request, an
    // interim (1xx, 101 included), 204 and 304.
    for (method, status) in [
        ("HEAD", 200),
        ("GET", 100),
        ("GET", 101),
        ("GET", 204),
        ("GET", 304),
    ] {
        let head =
            format!("HTTP/1.1 {status} Reason\r\nUpgrade: websocket\r\nContent-Length: 5\r\n\r\n");
        let got = parse_response_head(head.as_bytes(), method)
            .map(|head| head.map(|head| (head.status, head.body)));
        assert_eq!(
            got,
            Ok(Some((status, Framed(BodyKind::Empty)))),
            "{method} {status}"
        );
    }
    let big = [b"HTTP/1.1 200 OK\r\nX: ".as_slice(), &[b'a'; MAX_HEAD_LEN]].concat();
    assert_eq!(
        parse_response_head(&big, "GET"),
        Err(HttpError::HeadTooLarge)
    );
}

#[test]
fn rewrites_heads() {
    let v4 = Forwarded {
        client_ip: IpAddr::from([203, 0, 113, 7]),
        proto: "https",
    };
    let cases: &[(&str, &[u8], Forwarded, &[u8])] = &[
        (
            "adds both fields",
            b"GET / HTTP/1.1\r\nHost: a.example\r\nAccept: */*\r\n\r\n",
            v4,
            b"GET / HTTP/1.1\r\nHost: a.example\r\nAccept: */*\r\nX-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n\r\n",
        ),
        (
            "replaces a visitor's list, whatever its case",
            b"GET / HTTP/1.1\r\nx-forwarded-for: 10.0.0.1,10.0.0.2  \r\nHost: a.example\r\n\r\n",
            v4,
            b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n\r\n",
        ),
        (
            "drops every forwarding field the visitor sent",
            b"GET / HTTP/1.1\r\nX-Forwarded-For: 10.0.0.1\r\nHost: a.example\r\nX-Forwarded-For: 10.0.0.2\r\n\
              Forwarded: for=10.0.0.3\r\nX-Real-IP: 10.0.0.4\r\nX-Forwarded-Host: admin.local\r\n\
              X-Forwarded: x\r\nX-Kitepipe-Caller-Identity: admin\r\n\r\n",
            v4,
            b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Forwarded: x\r\n\
              X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n\r\n",
        ),
        (
            "drops an empty list",
            b"GET / HTTP/1.1\r\nX-Forwarded-For: \r\nHost: a.example\r\n\r\n",
            v4,
            b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n\r\n",
        ),
        (
            "replaces a spoofed proto",
            b"POST /x HTTP/1.1\r\nX-Forwarded-Proto: https\r\nHost: a.example\r\nx-forwarded-proto: wss\r\nContent-Length: 3\r\n\r\n",
            Forwarded {
                proto: "http",
                ..v4
            },
            b"POST /x HTTP/1.1\r\nHost: a.example\r\nContent-Length: 3\r\nX-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: http\r\n\r\n",
        ),
        (
            "ipv6 and leading empty lines",
            b"\r\nGET / HTTP/1.1\r\nHost: a.example\r\n\r\n",
            Forwarded {
                client_ip: "2001:db8::7".parse().expect("literal"),
                proto: "http",
            },
            b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Forwarded-For: 2001:db8::7\r\nX-Forwarded-Proto: http\r\n\r\n",
        ),
        (
            "ipv4-mapped ipv6 shown as ipv4",
            b"GET / HTTP/1.1\r\n\r\n",
            Forwarded {
                client_ip: "::ffff:192.0.2.1".parse().expect("literal"),
                proto: "http",
            },
            b"GET / HTTP/1.1\r\nX-Forwarded-For: 192.0.2.1\r\nX-Forwarded-Proto: http\r\n\r\n",
        ),
    ];
    for (name, input, forwarded, want) in cases {
        let rewritten = rewrite_head(input, forwarded);
        assert_eq!(
            rewritten.as_deref().map(String::from_utf8_lossy),
            Ok(String::from_utf8_lossy(want)),
            "{name}"
        );
        let before = parse_complete(input);
        let after = parse_complete(want);
        assert_eq!(
            (
                before.method,
                before.target,
                before.host,
                before.body,
                before.upgrade,
                before.close
            ),
            (
                after.method,
                after.target,
                after.host,
                after.body,
                after.upgrade,
                after.close
            ),
            "{name}"
        );
    }
}

#[test]
fn rewrite_refuses_what_is_not_one_head() {
    let forwarded = Forwarded {
        client_ip: IpAddr::from([192, 0, 2, 1]),
        proto: "http",
    };
    let cases: &[(&str, &[u8], HttpError)] = &[
        (
            "partial",
            b"GET / HTTP/1.1\r\nHost: a",
            HttpError::Malformed("not exactly one request head"),
        ),
        (
            "head plus body",
            b"GET / HTTP/1.1\r\n\r\nextra",
            HttpError::Malformed("not exactly one request head"),
        ),
        (
            "bare lf",
            b"GET / HTTP/1.1\n\n",
            HttpError::Malformed("bare lf"),
        ),
        (
            "garbage",
            b"\xff\xfe\r\n\r\n",
            HttpError::Malformed("request line"),
        ),
    ];
    for (name, input, want) in cases {
        assert_eq!(rewrite_head(input, &forwarded), Err(want.clone()), "{name}");
    }
}

#[test]
fn error_response_is_a_complete_escaped_page() {
    let response = error_response(
        502,
        "<script>alert('x')</script>",
        "kite \"a&b\" is <offline>\r\nSet-Cookie: x=1",
    );
    let mut fields = [httparse::EMPTY_HEADER; 16];
    let mut parsed = httparse::Response::new(&mut fields);
    let head_len = match parsed.parse(&response) {
        Ok(httparse::Status::Complete(len)) => len,
        other => panic!("{other:?}"),
    };
    assert_eq!(parsed.code, Some(502));
    assert_eq!(parsed.reason, Some("Bad Gateway"));
    let field = |name: &str| {
        parsed
            .headers
            .iter()
            .find(|field| field.name.eq_ignore_ascii_case(name))
            .map(|field| String::from_utf8_lossy(field.value).into_owned())
    };
    let body = String::from_utf8(response[head_len..].to_vec()).expect("utf-8 page");
    assert_eq!(field("content-length"), Some(body.len().to_string()));
    assert_eq!(
        field("content-type").as_deref(),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(field("connection").as_deref(), Some("close"));
    assert_eq!(field("x-kitepipe-error").as_deref(), Some("502"));
    assert_eq!(field("set-cookie"), None);
    assert!(
        body.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"),
        "{body}"
    );
    assert!(
        body.contains("kite &quot;a&amp;b&quot; is &lt;offline&gt;"),
        "{body}"
    );
    assert!(!body.contains("<script>"));
}

#[test]
fn error_response_statuses() {
    let cases: &[(u16, &[u8])] = &[
        (431, b"HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        (404, b"HTTP/1.1 404 Not Found\r\n"),
        (599, b"HTTP/1.1 599 Error\r\n"),
        (0, b"HTTP/1.1 500 Internal Server Error\r\n"),
        (1000, b"HTTP/1.1 500 Internal Server Error\r\n"),
    ];
    for (status, status_line) in cases {
        let response = error_response(*status, "t", "d");
        assert!(response.starts_with(status_line), "{status}");
    }
}

#[test]
fn garbage_never_panics() {
    // A cheap deterministic byte soup over an HTTP-ish alphabet; the fuzz
    // target goes further.
    let alphabet = b"GET / HTTP/1.1\r\n:Host;Transfer-Encoding chunked0123456789abcdef,\x00\xff";
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..3000 {
        let len = round % 200;
        let mut bytes = Vec::with_capacity(len);
        for _ in 0..len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let index = usize::try_from(state % alphabet.len() as u64).expect("small");
            bytes.push(alphabet[index]);
        }
        if let Ok(Some(head)) = parse_request_head(&bytes) {
            let forwarded = Forwarded {
                client_ip: IpAddr::from([192, 0, 2, 1]),
                proto: "http",
            };
            assert!(rewrite_head(&bytes[..head.head_len], &forwarded).is_ok());
        }
        let _ = BodyScanner::new(BodyKind::Chunked).scan(&bytes);
    }
}

#[test]
fn a_kites_edits_replace_fields_in_any_case_and_add_forwarded_host() {
    use std::collections::BTreeMap;

    use crate::http_policy::HeaderRules;

    let rules = HeaderRules {
        set: BTreeMap::from([("X-Team".to_string(), "blue".to_string())]),
        remove: vec!["cookie".to_string(), "X-Gone".to_string()],
    };
    let forwarded = Forwarded {
        client_ip: IpAddr::from([192, 0, 2, 1]),
        proto: "http",
    };
    /// (visitor's head, X-Forwarded-Host, forwarded head)
    type Case = (&'static [u8], Option<&'static [u8]>, &'static [u8]);
    let cases: [Case; 3] = [
        (
            b"GET / HTTP/1.1\r\nHost: a.example:8080\r\nCOOKIE: a=1\r\nx-team: red\r\n\
              X-TEAM: red2\r\nx-gone: 1\r\nAccept: */*\r\n\r\n",
            Some(b"a.example:8080"),
            b"GET / HTTP/1.1\r\nHost: a.example:8080\r\nAccept: */*\r\nX-Team: blue\r\n\
              X-Forwarded-Host: a.example:8080\r\nX-Forwarded-For: 192.0.2.1\r\n\
              X-Forwarded-Proto: http\r\n\r\n",
        ),
        // The visitor's own X-Forwarded-Host never passes; without the
        // option none is added.
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-Host: evil\r\n\r\n",
            None,
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Team: blue\r\nX-Forwarded-For: 192.0.2.1\r\n\
              X-Forwarded-Proto: http\r\n\r\n",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-Host: evil\r\n\r\n",
            Some(b"a"),
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Team: blue\r\nX-Forwarded-Host: a\r\n\
              X-Forwarded-For: 192.0.2.1\r\nX-Forwarded-Proto: http\r\n\r\n",
        ),
    ];
    for (head, forwarded_host, want) in cases {
        let edits = RequestEdits {
            headers: Some(&rules),
            forwarded_host,
        };
        let got = rewrite_head_with(head, &forwarded, &edits).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(want),
            "{}",
            String::from_utf8_lossy(head)
        );
        // And the result is one head with the same routing and framing.
        let again = parse_complete(&got);
        assert_eq!(again.host, parse_complete(head).host);
    }
    // Without edits: exactly `rewrite_head`.
    let head = b"GET / HTTP/1.1\r\nHost: a\r\nCookie: c\r\n\r\n";
    assert_eq!(
        rewrite_head_with(head, &forwarded, &RequestEdits::NONE).unwrap(),
        rewrite_head(head, &forwarded).unwrap()
    );

    let response = b"HTTP/1.1 200 OK\r\nserver: x\r\nX-Team: old\r\nContent-Length: 2\r\n\r\n";
    let edited = edit_response_head(response, &rules);
    assert_eq!(
        edited,
        b"HTTP/1.1 200 OK\r\nserver: x\r\nContent-Length: 2\r\nX-Team: blue\r\n\r\n"
    );
    let again = parse_response_head(&edited, "GET").unwrap().unwrap();
    assert_eq!(again.body, ResponseBody::Framed(BodyKind::Length(2)));
    assert_eq!(
        field_value(response, b"SERVER"),
        Some(&b"x"[..]),
        "names match in any case"
    );
}

/// Empty lines before a response's status line (which the parser skips)
/// do not become an empty status line when the head is edited (found by
/// the `http1_response` fuzz target).
#[test]
fn edited_response_heads_skip_leading_empty_lines() {
    let rules = crate::http_policy::HeaderRules {
        set: std::collections::BTreeMap::from([("X-A".to_string(), "b".to_string())]),
        remove: Vec::new(),
    };
    let raw = b"\r\nHTTP/1.1 204 No Content\r\n\r\n";
    let head = parse_response_head(raw, "GET").unwrap().unwrap();
    let edited = edit_response_head(&raw[..head.head_len], &rules);
    assert_eq!(edited, b"HTTP/1.1 204 No Content\r\nX-A: b\r\n\r\n");
    let again = parse_response_head(&edited, "GET").unwrap().unwrap();
    assert_eq!((again.status, again.head_len), (204, edited.len()));
}
