use bytes::BytesMut;

use super::*;

fn request(proto: &str, domain: &str) -> KiteRequest {
    KiteRequest {
        proto: proto.into(),
        domain: domain.into(),
        srand: "0123abcd".into(),
        token: String::new(),
        sign: "0123abcd5b7d2e1f".into(),
    }
}

#[test]
fn sniff_tells_backends_from_others() {
    let cases: &[(&[u8], Option<bool>)] = &[
        (b"", None),
        (b"C", None),
        (b"CONNECT PageKite", None),
        (b"CONNECT PageKite:1 HTTP/1.0\r\n", Some(true)),
        (b"GET /~:PageKite:~/v1 HTTP/1.1\r\n", Some(true)),
        (b"GET /", None),
        (b"GET /index.html HTTP/1.1\r\n", Some(false)),
        (b"CONNECT example.com:443 HTTP/1.1\r\n", Some(false)),
        (b"\x16\x03\x01\x02\x00", Some(false)),
        (b"SSH-2.0-OpenSSH", Some(false)),
    ];
    for (input, expected) in cases {
        assert_eq!(
            sniff(input),
            *expected,
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn kite_requests_parse_like_pagekite_py() {
    let ok = [
        (
            "http:Foo.Example.COM:abcd1234::abcdef01d17075e1342fd28e724aeabf84f8",
            ("http", "foo.example.com", "abcd1234", ""),
        ),
        (
            "RAW-22:ssh.example.com:s:tbcdef0123:x",
            ("raw-22", "ssh.example.com", "s", "tbcdef0123"),
        ),
        (
            "https:*.example.com:::sig",
            ("https", "*.example.com", "", ""),
        ),
        (" http-8080:a.b:c:d:e ", ("http-8080", "a.b", "c", "d")),
    ];
    for (value, (proto, domain, srand, token)) in ok {
        let req = KiteRequest::parse(value).unwrap_or_else(|e| panic!("{value}: {e}"));
        assert_eq!(
            (
                req.proto.as_str(),
                req.domain.as_str(),
                req.srand.as_str(),
                req.token.as_str()
            ),
            (proto, domain, srand, token)
        );
        assert_eq!(req.what(), format!("{proto}:{domain}:{srand}"));
        assert_eq!(req.payload(), format!("{proto}:{domain}:{srand}:{token}"));
        assert_eq!(KiteRequest::parse(&req.header_value()), Ok(req));
    }
    let long = format!("http:{}:s::x", "a".repeat(300));
    let bad = [
        "",
        "http:a.b:c:d",
        "http:a.b:c:d:e:f",
        "http:a.b:c:d:",
        ":a.b:c:d:e",
        "http::c:d:e",
        "http:a b:c:d:e",
        "http:a.b:c\r\nX: y:d:e",
        "http:a.b:c/d:d:e",
        "ht tp:a.b:c:d:e",
        long.as_str(),
    ];
    for value in bad {
        assert!(
            matches!(
                KiteRequest::parse(value),
                Err(PageKiteError::BadKite { .. })
            ),
            "{value:?}"
        );
    }
}

/// A head as pagekite.py 1.5's `HTTP_PageKiteRequest` writes it.
const PAGEKITE_PY_REQUEST: &str = "CONNECT PageKite:1 HTTP/1.0\r\n\
X-PageKite-Features: AddKites\r\n\
X-PageKite-Version: 1.5.2.201011\r\n\
X-PageKite-Features: ZChunks\r\n\
X-PageKite-Version: 1.5.2.201011\r\n\
X-PageKite: http:foo.example.com:0123456789abcdef0123456789abcdef0123::0123456725745e8661a65012ed5b62dbaad3\r\n\
X-PageKite: raw-22:foo.example.com:0123456789abcdef0123456789abcdef0123::01234567aaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\
\r\n";

#[test]
fn backend_hello_from_pagekite_py() {
    let mut buf = PAGEKITE_PY_REQUEST.as_bytes().to_vec();
    buf.extend_from_slice(b"5\r\nhello");
    let (hello, consumed) = parse_backend_hello(&buf).unwrap().unwrap();
    assert_eq!(consumed, PAGEKITE_PY_REQUEST.len());
    assert_eq!(hello.transport, Transport::Chunked);
    assert_eq!(hello.features, ["AddKites", "ZChunks"]);
    assert_eq!(hello.version.as_deref(), Some("1.5.2.201011"));
    assert_eq!(hello.requests.len(), 2);
    assert_eq!(hello.requests[1].proto, "raw-22");
    assert_eq!(hello.replace, None);
    // Every prefix of the head asks for more.
    for n in 0..PAGEKITE_PY_REQUEST.len() {
        assert_eq!(parse_backend_hello(&buf[..n]), Ok(None), "prefix {n}");
    }
}

#[test]
fn backend_hello_tolerates_what_pagekite_py_tolerates() {
    let head = "CONNECT PageKite:1 HTTP/1.0\n\
x-beanstalk: http:a.example.com:s::sig\n\
X-PAGEKITE-FEATURES:ZChunks, AddKites\n\
X-Beanstalk-Replace:   sess1  \n\
X-Other: folded\n  onto two lines\n\
X-PageKite: https:b.example.com:s:t\n\tok:sig\n\
\n";
    // The folded kite request does not parse as a request (a space inside
    // a field), so it is refused; without it the head parses.
    assert!(matches!(
        parse_backend_hello(head.as_bytes()),
        Err(PageKiteError::BadKite { .. })
    ));
    let head = head.replace("X-PageKite: https:b.example.com:s:t\n\tok:sig\n", "");
    let (hello, consumed) = parse_backend_hello(head.as_bytes()).unwrap().unwrap();
    assert_eq!(consumed, head.len());
    assert_eq!(hello.features, ["ZChunks", "AddKites"]);
    assert_eq!(hello.replace.as_deref(), Some("sess1"));
    assert_eq!(hello.requests[0].domain, "a.example.com");
}

#[test]
fn backend_hello_websocket_variant() {
    let hello = BackEndHello {
        transport: Transport::WebSocket {
            key: "dGhlIHNhbXBsZSBub25jZQ==".into(),
        },
        features: vec!["AddKites".into()],
        version: Some("1.5".into()),
        requests: vec![request("http", "a.example.com")],
        replace: Some("abc".into()),
    };
    let bytes = build_backend_hello(&hello);
    assert!(bytes.starts_with(b"GET /~:PageKite:~/v1 HTTP/1.1\r\n"));
    assert_eq!(sniff(&bytes), Some(true));
    assert_eq!(
        parse_backend_hello(&bytes),
        Ok(Some((hello.clone(), bytes.len())))
    );
    // Without its key it is refused.
    let text = String::from_utf8(bytes).unwrap();
    let keyless = text.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "");
    assert!(parse_backend_hello(keyless.as_bytes()).is_err());
}

#[test]
fn backend_hello_round_trips() {
    let hello = BackEndHello {
        transport: Transport::Chunked,
        features: vec!["AddKites".into(), "ZChunks".into()],
        version: Some("kitepipe-0.1".into()),
        requests: vec![
            request("http", "a.example.com"),
            request("raw-22", "b.example.com"),
        ],
        replace: None,
    };
    let bytes = build_backend_hello(&hello);
    assert!(bytes.starts_with(b"CONNECT PageKite:1 HTTP/1.0\r\n"));
    assert_eq!(parse_backend_hello(&bytes), Ok(Some((hello, bytes.len()))));
}

#[test]
fn backend_hello_refuses_garbage_and_bounds() {
    let bad_starts = [
        "GET / HTTP/1.1\r\n\r\n",
        "CONNECT example.com:443 HTTP/1.1\r\n\r\n",
        "CONNECT PageKite:1\r\n\r\n",
        "CONNECT PageKite:1 SPDY/3\r\n\r\n",
        "\u{0}\u{1}\r\n\r\n",
    ];
    for head in bad_starts {
        assert!(
            matches!(
                parse_backend_hello(head.as_bytes()),
                Err(PageKiteError::BadStartLine { .. })
            ),
            "{head:?}"
        );
    }
    assert!(matches!(
        parse_backend_hello(b"CONNECT PageKite:1 HTTP/1.0\r\nno colon\r\n\r\n"),
        Err(PageKiteError::BadHeaderLine(_))
    ));
    assert!(matches!(
        parse_backend_hello(b"CONNECT PageKite:1 HTTP/1.0\r\nX: \xff\r\n\r\n"),
        Err(PageKiteError::BadHeaderLine(_))
    ));
    // No end within MAX_HEAD.
    let mut endless = b"CONNECT PageKite:1 HTTP/1.0\r\n".to_vec();
    while endless.len() < MAX_HEAD {
        endless.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaa\r\n");
    }
    assert_eq!(
        parse_backend_hello(&endless),
        Err(PageKiteError::HeadTooLarge)
    );
    assert_eq!(
        parse_backend_hello(&endless[..MAX_HEAD - 1]),
        Ok(None),
        "below the bound it waits"
    );
    // One line longer than MAX_HEADER_LINE.
    let long = format!(
        "CONNECT PageKite:1 HTTP/1.0\r\nX: {}\r\n\r\n",
        "a".repeat(MAX_HEADER_LINE)
    );
    assert_eq!(
        parse_backend_hello(long.as_bytes()),
        Err(PageKiteError::HeaderLineTooLong)
    );
    // Too many kites.
    let mut many = String::from("CONNECT PageKite:1 HTTP/1.0\r\n");
    for i in 0..=MAX_KITE_REQUESTS {
        many.push_str(&format!("X-PageKite: http:k{i}.example.com:s::x\r\n"));
    }
    many.push_str("\r\n");
    assert_eq!(
        parse_backend_hello(many.as_bytes()),
        Err(PageKiteError::TooManyKites)
    );
    // Too many header lines of other kinds.
    let mut lines = String::from("CONNECT PageKite:1 HTTP/1.0\r\n");
    for _ in 0..200 {
        lines.push_str("A: b\r\n");
    }
    lines.push_str("\r\n");
    assert!(matches!(
        parse_backend_hello(lines.as_bytes()),
        Err(PageKiteError::TooManyHeaders(_))
    ));
}

/// A head as pagekite.py 1.5's front-end (`AuthCallback`) writes it.
const PAGEKITE_PY_RESPONSE: &str = "HTTP/1.1 200 OK\r\n\
Content-Type: text/html; charset=utf-8\r\n\
Pragma: no-cache\r\nExpires: 0\r\nCache-Control: no-store\r\nConnection: close\r\n\
Transfer-Encoding: chunked\r\n\
X-PageKite-Features: ZChunks\r\n\
X-PageKite-Features: WebSockets\r\n\
X-PageKite-Features: AddKites\r\n\
X-PageKite-Protos: http, http2, http3, https, websocket, irc, finger, httpfinger, raw, minecraft\r\n\
X-PageKite-Ports: 9000\r\n\
X-PageKite-Raw-Ports: virtual\r\n\
X-PageKite-SignThis: http:foo.example.com:0123:t1234567e1f1d1c1b1a191817161514131211\r\n\
X-PageKite-Invalid-Why: raw-22:bar.example.com:0123;port\r\n\
X-PageKite-Invalid: raw-22:bar.example.com:0123\r\n\
X-PageKite-OK: https:foo.example.com:0123\r\n\
X-PageKite-SSL-OK: https:foo.example.com:0123\r\n\
X-PageKite-Duplicate: http:dup.example.com:0123\r\n\
X-PageKite-SessionID: 1a2b3c\r\n\
\r\n";

#[test]
fn frontend_hello_from_pagekite_py() {
    let (hello, consumed) = parse_frontend_hello(PAGEKITE_PY_RESPONSE.as_bytes())
        .unwrap()
        .unwrap();
    assert_eq!(consumed, PAGEKITE_PY_RESPONSE.len());
    assert_eq!(hello.features, ["ZChunks", "WebSockets", "AddKites"]);
    assert_eq!(hello.protos.len(), 10);
    assert_eq!(hello.ports, ["9000"]);
    assert_eq!(hello.raw_ports, ["virtual"]);
    assert_eq!(hello.session_id.as_deref(), Some("1a2b3c"));
    assert_eq!(
        hello.answers,
        [
            KiteAnswer::SignThis {
                what: "http:foo.example.com:0123".into(),
                token: "t1234567e1f1d1c1b1a191817161514131211".into()
            },
            KiteAnswer::Invalid {
                what: "raw-22:bar.example.com:0123".into(),
                why: "port".into()
            },
            KiteAnswer::Ok("https:foo.example.com:0123".into()),
            KiteAnswer::SslOk("https:foo.example.com:0123".into()),
            KiteAnswer::Duplicate("http:dup.example.com:0123".into()),
        ]
    );
    // Rebuilt and parsed again, the same.
    let bytes = build_frontend_hello(&hello);
    assert_eq!(parse_frontend_hello(&bytes), Ok(Some((hello, bytes.len()))));
    for n in 0..PAGEKITE_PY_RESPONSE.len() {
        assert_eq!(
            parse_frontend_hello(&PAGEKITE_PY_RESPONSE.as_bytes()[..n]),
            Ok(None)
        );
    }
}

#[test]
fn frontend_hello_refusals() {
    assert!(matches!(
        parse_frontend_hello(b"HTTP/1.1 503 Unavailable\r\n\r\n"),
        Err(PageKiteError::Refused(_))
    ));
    assert!(matches!(
        parse_frontend_hello(b"SSH-2.0-x\r\n\r\n"),
        Err(PageKiteError::BadStartLine { .. })
    ));
    assert!(matches!(
        parse_frontend_hello(b"HTTP/1.1 200 OK\r\nX-PageKite-OK: a:b\r\n\r\n"),
        Err(PageKiteError::BadKite { .. })
    ));
    // An invalid kite without a reason: "unknown".
    let (hello, _) = parse_frontend_hello(b"HTTP/1.1 200 OK\r\nX-PageKite-Invalid: a:b:c\r\n\r\n")
        .unwrap()
        .unwrap();
    assert_eq!(
        hello.answers,
        [KiteAnswer::Invalid {
            what: "a:b:c".into(),
            why: "unknown".into()
        }]
    );
}

#[test]
fn builders_do_not_let_values_start_headers() {
    let hello = FrontEndHello {
        session_id: Some("x\r\nX-PageKite-OK: http:evil.example.com:s".into()),
        ..FrontEndHello::default()
    };
    let bytes = build_frontend_hello(&hello);
    let (parsed, _) = parse_frontend_hello(&bytes).unwrap().unwrap();
    assert!(parsed.answers.is_empty());
    let headers = ChunkHeaders {
        host: Some("a\r\nSID: 7".into()),
        ..ChunkHeaders::sid(1)
    };
    assert_eq!(
        ChunkHeaders::parse(headers.to_text().trim_end().as_bytes())
            .unwrap()
            .sid,
        Some(1)
    );
}

fn decode_all(decoder: &mut ChunkDecoder, wire: &[u8]) -> Vec<Result<Chunk, PageKiteError>> {
    let mut buf = BytesMut::from(wire);
    let mut out = Vec::new();
    loop {
        match decoder.decode(&mut buf) {
            Ok(Some(chunk)) => out.push(Ok(chunk)),
            Ok(None) => break,
            Err(err @ PageKiteError::Corrupt { .. }) => out.push(Err(err)),
            Err(err) => {
                out.push(Err(err));
                break;
            }
        }
    }
    out
}

#[test]
fn plain_chunks_as_pagekite_py_sends_them() {
    // SendData's first chunk, a PING, an EOF (SendStreamEof), a progress
    // report (SendProgress), a PONG.
    let payloads = [
        "SID: 1\r\nProto: http\r\nHost: a.example.com\r\nPort: 80\r\n\r\nGET / HTTP",
        "NOOP: 1\r\nPING: 1764928800.1234\r\n\r\n!",
        "SID: 1\r\nEOF: 1WR\r\n\r\nBye!",
        "NOOP: 1\r\nSID: 1\r\nSKB: 42\r\n\r\n",
        "NOOP: 1\r\nPONG: 1764928800.1\r\n\r\n!",
    ];
    // pagekite.py's SendChunked: '%x\r\n' % len, then the payload.
    let wire: Vec<u8> = payloads
        .iter()
        .flat_map(|p| format!("{:x}\r\n{p}", p.len()).into_bytes())
        .collect();
    let mut decoder = ChunkDecoder::new();
    let chunks: Vec<Chunk> = decode_all(&mut decoder, &wire)
        .into_iter()
        .map(|c| c.unwrap())
        .collect();
    assert_eq!(chunks.len(), 5, "{chunks:?}");
    let open = &chunks[0].headers;
    assert_eq!(open.sid, Some(1));
    assert_eq!(open.proto.as_deref(), Some("http"));
    assert_eq!(open.host.as_deref(), Some("a.example.com"));
    assert_eq!(open.port.as_deref(), Some("80"));
    assert_eq!(&chunks[0].data[..], b"GET / HTTP");
    assert!(chunks[1].headers.noop);
    assert_eq!(chunks[1].headers.ping.as_deref(), Some("1764928800.1234"));
    assert_eq!(
        chunks[2].headers.eof,
        Some(Eof {
            write: true,
            read: true
        })
    );
    assert_eq!(chunks[3].headers.skb, Some(42));
    assert_eq!(chunks[3].headers.sid, Some(1));
    assert_eq!(chunks[4].headers.pong.as_deref(), Some("1764928800.1"));
}

#[test]
fn chunk_headers_table() {
    let cases: &[(&str, ChunkHeaders)] = &[
        (
            "SID: 4294967295\r\nEOF: 1R",
            ChunkHeaders {
                eof: Some(Eof {
                    write: false,
                    read: true,
                }),
                ..ChunkHeaders::sid(u32::MAX)
            },
        ),
        (
            "sid:7\r\neof: 1W",
            ChunkHeaders {
                eof: Some(Eof {
                    write: true,
                    read: false,
                }),
                ..ChunkHeaders::sid(7)
            },
        ),
        (
            "SID: 7\r\nEOF: 1",
            ChunkHeaders {
                eof: Some(Eof {
                    write: true,
                    read: true,
                }),
                ..ChunkHeaders::sid(7)
            },
        ),
        (
            "NOOP: 1\r\nZRST: 1",
            ChunkHeaders {
                zrst: true,
                ..ChunkHeaders::noop()
            },
        ),
        (
            "SID: 3\r\nProto: raw\r\nHost: h\r\nPort: 22\r\nRIP: ::ffff:1.2.3.4\r\nRPort: 5555\r\nRTLS: 1",
            ChunkHeaders {
                proto: Some("raw".into()),
                host: Some("h".into()),
                port: Some("22".into()),
                rip: Some("::ffff:1.2.3.4".into()),
                rport: Some("5555".into()),
                rtls: true,
                ..ChunkHeaders::sid(3)
            },
        ),
        (
            "NOOP: 1\r\nQuota: 1024\r\nSPD: 5\r\nX-PageKite-Features: AddKites",
            ChunkHeaders {
                other: vec![
                    ("quota".into(), "1024".into()),
                    ("spd".into(), "5".into()),
                    ("x-pagekite-features".into(), "AddKites".into()),
                ],
                ..ChunkHeaders::noop()
            },
        ),
        (
            "NOOP: 1\r\nX-PageKite: http:a.b:s:t:sig\r\nX-PageKite-OK: http:c.d:s",
            ChunkHeaders {
                requests: vec![KiteRequest::parse("http:a.b:s:t:sig").unwrap()],
                answers: vec![KiteAnswer::Ok("http:c.d:s".into())],
                ..ChunkHeaders::noop()
            },
        ),
        // The first of repeated headers counts.
        (
            "SID: 1\r\nSID: 2\r\nHost: a\r\nHost: b",
            ChunkHeaders {
                host: Some("a".into()),
                ..ChunkHeaders::sid(1)
            },
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(
            ChunkHeaders::parse(text.as_bytes()).as_ref(),
            Ok(expected),
            "{text:?}"
        );
        // What we write, we read back.
        let written = expected.to_text();
        assert!(written.ends_with("\r\n\r\n"));
        let reparsed = ChunkHeaders::parse(written.as_bytes()).unwrap();
        assert_eq!(&reparsed, expected, "{written:?}");
    }
    let bad = [
        "SID: 4294967296",
        "SID: -1",
        "SID: 1x",
        "SID: ",
        "SID: 1\r\nSKB: many",
        "no colon",
        "NOOP: 1\r\nX-PageKite: broken",
    ];
    for text in bad {
        assert!(ChunkHeaders::parse(text.as_bytes()).is_err(), "{text:?}");
    }
    let many = "A: b\r\n".repeat(MAX_CHUNK_HEADERS + 1);
    assert_eq!(
        ChunkHeaders::parse(many.as_bytes()),
        Err(PageKiteError::TooManyHeaders(MAX_CHUNK_HEADERS))
    );
    let long = format!("A: {}", "b".repeat(MAX_HEADER_LINE));
    assert_eq!(
        ChunkHeaders::parse(long.as_bytes()),
        Err(PageKiteError::HeaderLineTooLong)
    );
}

#[test]
fn chunk_framing_errors_and_bounds() {
    let cases: &[(&[u8], PageKiteError)] = &[
        (b"0\r\n", PageKiteError::EmptyChunk),
        (b"0R\r\n", PageKiteError::EmptyChunk),
        (b"10Z0\r\n", PageKiteError::EmptyChunk),
        (b"xyz\r\n", PageKiteError::BadChunkSize("xyz".into())),
        (b"-5\r\n", PageKiteError::BadChunkSize("-5".into())),
        (b"\r\n", PageKiteError::BadChunkSize(String::new())),
        (b"5Z\r\n", PageKiteError::BadChunkSize("5Z".into())),
        (b"40001\r\n", PageKiteError::ChunkTooLarge(0x40001)),
        (b"40001Z10\r\n", PageKiteError::ChunkTooLarge(0x40001)),
        (b"10Z40001\r\n", PageKiteError::ChunkTooLarge(0x40001)),
        (
            b"ffffffffffffffff\r\n",
            PageKiteError::ChunkTooLarge(u64::MAX),
        ),
        (
            b"00000000000000000000000000000000001\r\n",
            PageKiteError::ChunkSizeTooLong,
        ),
        (b"5\r\nabcde", PageKiteError::NoChunkHeaders),
    ];
    for (wire, expected) in cases {
        let mut decoder = ChunkDecoder::new();
        let mut buf = BytesMut::from(*wire);
        assert_eq!(
            decoder.decode(&mut buf).as_ref(),
            Err(expected),
            "{:?}",
            String::from_utf8_lossy(wire)
        );
    }
    // MAX_CHUNK itself is fine, declared; the decoder waits for it.
    let mut decoder = ChunkDecoder::new();
    let mut buf = BytesMut::from(&b"40000\r\nSID: 1\r\n\r\n"[..]);
    assert_eq!(decoder.decode(&mut buf), Ok(None));
    // Slow drip: one byte at a time gives the same chunks.
    let mut encoder = ChunkEncoder::new(true);
    let mut wire = BytesMut::new();
    for i in 0..5u32 {
        encoder.encode(&ChunkHeaders::sid(i), &vec![b'a' + i as u8; 300], &mut wire);
    }
    let mut decoder = ChunkDecoder::new();
    let mut buf = BytesMut::new();
    let mut seen = 0;
    for byte in wire.iter() {
        buf.extend_from_slice(&[*byte]);
        while let Some(chunk) = decoder.decode(&mut buf).unwrap() {
            assert_eq!(chunk.headers.sid, Some(seen));
            assert_eq!(chunk.data.len(), 300);
            seen += 1;
        }
    }
    assert_eq!(seen, 5);
    assert!(buf.is_empty());
}

#[test]
fn zchunks_round_trip_with_resets() {
    let mut encoder = ChunkEncoder::new(true);
    let mut decoder = ChunkDecoder::new();
    let mut wire = BytesMut::new();
    let text = b"The quick brown fox jumps over the lazy dog. ".repeat(40);
    encoder.encode(&ChunkHeaders::sid(1), &text, &mut wire);
    // Small payloads go out plain even when compressing.
    encoder.encode(&ChunkHeaders::sid(1), b"hi", &mut wire);
    encoder.encode_plain(&ChunkHeaders::noop(), b"!", &mut wire);
    encoder.encode(&ChunkHeaders::sid(2), &text, &mut wire);
    let line_end = wire.iter().position(|b| *b == b'\r').unwrap();
    assert!(wire[..line_end].contains(&b'Z'), "first chunk compressed");
    let chunks = decode_all(&mut decoder, &wire);
    assert_eq!(chunks.len(), 4);
    let data: Vec<_> = chunks
        .iter()
        .map(|c| c.as_ref().unwrap().data.clone())
        .collect();
    assert_eq!(&data[0][..], &text[..]);
    assert_eq!(&data[1][..], b"hi");
    assert_eq!(&data[3][..], &text[..]);

    // The peer resets its compressor (after our ZRST): its next chunk says
    // R, and a decoder mid-stream follows.
    encoder.reset();
    let mut wire = BytesMut::new();
    encoder.encode(&ChunkHeaders::sid(3), &text, &mut wire);
    let line_end = wire.iter().position(|b| *b == b'\r').unwrap();
    assert_eq!(wire[line_end - 1], b'R');
    let chunks = decode_all(&mut decoder, &wire);
    assert_eq!(&chunks[0].as_ref().unwrap().data[..], &text[..]);
    // A fresh decoder follows too (R starts a new stream).
    let mut fresh = ChunkDecoder::new();
    let chunks = decode_all(&mut fresh, &wire);
    assert_eq!(&chunks[0].as_ref().unwrap().data[..], &text[..]);
}

#[test]
fn corrupt_zchunks_are_reported_and_decoding_continues() {
    let text = b"All work and no play makes Jack a dull boy. ".repeat(20);
    let mut encoder = ChunkEncoder::new(true);
    let mut wire = BytesMut::new();
    encoder.encode(&ChunkHeaders::sid(1), &text, &mut wire);
    // A decoder that missed the start of the stream cannot inflate the
    // second chunk (it refers to the first one's history).
    let mut second = BytesMut::new();
    encoder.encode(&ChunkHeaders::sid(1), &text, &mut second);
    let mut decoder = ChunkDecoder::new();
    let res = decode_all(&mut decoder, &second);
    assert!(
        matches!(res[0], Err(PageKiteError::Corrupt { .. })),
        "{res:?}"
    );

    // Garbage in a compressed chunk, then the sender's reset: the chunk
    // after the garbage decodes.
    let mut wire = BytesMut::from(&b"20Z8\r\n\x78\x9c\xff\xff\xff\xff\xff\xff"[..]);
    let mut encoder = ChunkEncoder::new(true);
    encoder.reset();
    encoder.encode(&ChunkHeaders::sid(9), &text, &mut wire);
    let mut decoder = ChunkDecoder::new();
    let res = decode_all(&mut decoder, &wire);
    assert!(
        matches!(res[0], Err(PageKiteError::Corrupt { .. })),
        "{res:?}"
    );
    assert_eq!(res[1].as_ref().unwrap().headers.sid, Some(9));

    // Declared size wrong either way: Corrupt.
    for declared in [text.len() - 1, text.len() + 1] {
        let mut wire = BytesMut::new();
        let mut encoder = ChunkEncoder::new(true);
        encoder.encode(&ChunkHeaders::sid(1), &text, &mut wire);
        let line_end = wire.iter().position(|b| *b == b'\r').unwrap();
        let line = std::str::from_utf8(&wire[..line_end]).unwrap().to_string();
        let compressed = line.split_once('Z').unwrap().1.to_string();
        let mut forged = BytesMut::from(format!("{declared:x}Z{compressed}").as_bytes());
        forged.extend_from_slice(&wire[line_end..]);
        let res = decode_all(&mut ChunkDecoder::new(), &forged);
        assert!(
            matches!(res[0], Err(PageKiteError::Corrupt { .. })),
            "{declared}"
        );
    }
}

#[test]
fn zip_bombs_stop_at_the_declared_size() {
    // 16 MiB of zeros deflate to ~16 KiB; declared as 100 bytes, the
    // decoder inflates 101 and gives up.
    let zeros = vec![0u8; 16 * 1024 * 1024];
    let mut deflate = flate2::Compress::new(flate2::Compression::best(), true);
    let mut compressed = Vec::with_capacity(64 * 1024);
    deflate
        .compress_vec(&zeros, &mut compressed, flate2::FlushCompress::Sync)
        .unwrap();
    assert!(compressed.len() < MAX_CHUNK);
    let mut wire = BytesMut::from(format!("64Z{:x}\r\n", compressed.len()).as_bytes());
    wire.extend_from_slice(&compressed);
    let res = ChunkDecoder::new().decode(&mut wire);
    assert_eq!(
        res,
        Err(PageKiteError::Corrupt {
            declared: 100,
            inflated: 101
        })
    );
}

/// Captured tunnels (see vectors/README.md): pagekite.py 1.5 as back-end
/// and front-end, and upagekite 0.3.2 as back-end.
const PAGEKITE_BE: &[u8] = include_bytes!("vectors/pagekite-be.bin");
const PAGEKITE_FE: &[u8] = include_bytes!("vectors/pagekite-fe.bin");
const UPAGEKITE_BE: &[u8] = include_bytes!("vectors/upagekite-be.bin");
const UPAGEKITE_FE: &[u8] = include_bytes!("vectors/upagekite-fe.bin");
const PROBE_BE: &[u8] = include_bytes!("vectors/ping-probe-be.bin");

/// Decodes every chunk of a captured direction, checking that plain
/// chunks re-encode byte for byte (headers we keep verbatim).
fn replay(wire: &[u8]) -> Vec<Chunk> {
    let mut decoder = ChunkDecoder::new();
    let mut buf = BytesMut::from(wire);
    let mut chunks = Vec::new();
    while !buf.is_empty() {
        let before = buf.clone();
        let chunk = decoder
            .decode(&mut buf)
            .unwrap_or_else(|e| panic!("chunk {}: {e}", chunks.len()))
            .unwrap_or_else(|| panic!("chunk {} incomplete", chunks.len()));
        let consumed = &before[..before.len() - buf.len()];
        let line_end = consumed.iter().position(|b| *b == b'\r').unwrap();
        let compressed = consumed[..line_end].contains(&b'Z');
        let h = &chunk.headers;
        if !compressed && h.other.is_empty() {
            let mut again = BytesMut::new();
            ChunkEncoder::new(false).encode_plain(h, &chunk.data, &mut again);
            assert_eq!(&again[..], consumed, "re-encoded chunk {}", chunks.len());
        }
        chunks.push(chunk);
    }
    chunks
}

/// The stream data of one SID, in order.
fn stream_data(chunks: &[Chunk], sid: u32) -> Vec<u8> {
    chunks
        .iter()
        .filter(|c| c.headers.sid == Some(sid) && !c.headers.noop && c.headers.eof.is_none())
        .flat_map(|c| c.data.to_vec())
        .collect()
}

#[test]
fn pagekite_py_back_end_capture_replays() {
    let (hello, consumed) = parse_backend_hello(PAGEKITE_BE).unwrap().unwrap();
    assert_eq!(hello.transport, Transport::Chunked);
    assert_eq!(hello.features, ["AddKites", "ZChunks"]);
    let kites: Vec<_> = hello.requests.iter().map(|r| r.proto.as_str()).collect();
    assert_eq!(kites, ["http", "raw-22"]);
    assert!(hello.requests.iter().all(|r| r.token.is_empty()));
    let chunks = replay(&PAGEKITE_BE[consumed..]);
    // AddKites: the signed requests come back in a NOOP, with the
    // front-end's challenge as token.
    let signed = &chunks[0].headers;
    assert!(signed.noop);
    assert_eq!(signed.requests.len(), 2);
    assert!(signed.requests.iter().all(|r| r.token.starts_with('t')));
    // The answers to the visitor requests, inflated from ZChunks.
    let compressed = PAGEKITE_BE[consumed..]
        .windows(3)
        .any(|w| w[0].is_ascii_hexdigit() && w[1] == b'Z');
    assert!(compressed, "the capture holds ZChunks");
    let big = stream_data(&chunks, 7);
    let text = String::from_utf8_lossy(&big);
    assert!(text.starts_with("HTTP/1.0 200 OK\r\n"), "{text:.80}");
    let head_end = text.find("\r\n\r\n").unwrap() + 4;
    assert!(text.contains("Content-Length: 116991\r\n"));
    assert_eq!(big.len() - head_end, 116_991);
    assert!(stream_data(&chunks, 5).ends_with(b"hello from the back-end\n"));
    assert!(stream_data(&chunks, 9).ends_with(b"hello from the back-end\n"));
    // Its closes, and its keepalive PING.
    assert!(chunks.iter().any(|c| c.headers.sid == Some(7)
        && c.headers.eof
            == Some(Eof {
                write: false,
                read: true
            })));
    assert!(
        chunks
            .iter()
            .any(|c| c.headers.noop && c.headers.ping.is_some())
    );
}

#[test]
fn pagekite_py_front_end_capture_replays() {
    let (hello, consumed) = parse_frontend_hello(PAGEKITE_FE).unwrap().unwrap();
    assert_eq!(hello.features, ["ZChunks", "WebSockets", "AddKites"]);
    assert_eq!(hello.protos, ["http", "https", "raw"]);
    assert_eq!(hello.raw_ports, ["virtual"]);
    assert!(hello.session_id.is_some());
    assert_eq!(hello.answers.len(), 2);
    assert!(
        hello
            .answers
            .iter()
            .all(|a| matches!(a, KiteAnswer::SignThis { token, .. } if token.starts_with('t')))
    );
    let chunks = replay(&PAGEKITE_FE[consumed..]);
    assert_eq!(
        chunks[0].headers.answers.len(),
        2,
        "the OKs arrive in a NOOP"
    );
    assert!(
        chunks[0]
            .headers
            .other
            .iter()
            .any(|(name, _)| name == "x-pagekite-sessionid")
    );
    let opening = chunks
        .iter()
        .find(|c| c.headers.sid == Some(7) && c.headers.proto.is_some())
        .unwrap();
    assert_eq!(opening.headers.proto.as_deref(), Some("http"));
    assert_eq!(opening.headers.host.as_deref(), Some("foo.example.com"));
    assert_eq!(opening.headers.rip.as_deref(), Some("::ffff:127.0.0.1"));
    assert!(opening.data.starts_with(b"GET /big.txt HTTP/1.1\r\n"));
    // A raw stream opens without data; its data follows.
    let raw = chunks
        .iter()
        .find(|c| c.headers.proto.as_deref() == Some("raw"))
        .unwrap();
    assert_eq!(raw.headers.port.as_deref(), Some("22"));
    assert!(raw.data.is_empty());
    assert_eq!(
        stream_data(&chunks, raw.headers.sid.unwrap()),
        b"GET /hello.txt HTTP/1.0\r\n\r\n"
    );
    // Progress reports for the download.
    let skbs: Vec<u64> = chunks
        .iter()
        .filter(|c| c.headers.sid == Some(7))
        .filter_map(|c| c.headers.skb)
        .collect();
    assert!(skbs.windows(2).all(|w| w[0] <= w[1]) && skbs.last() == Some(&114));
}

#[test]
fn upagekite_capture_replays() {
    let (hello, consumed) = parse_backend_hello(UPAGEKITE_BE).unwrap().unwrap();
    assert_eq!(hello.features, ["AddKites"], "upagekite speaks no ZChunks");
    assert_eq!(hello.version.as_deref(), Some("0.3.2u"));
    let chunks = replay(&UPAGEKITE_BE[consumed..]);
    assert_eq!(chunks[0].headers.requests.len(), 1);
    assert!(stream_data(&chunks, 9).starts_with(b"HTTP/1.0 200 OK\n"));
    let (fe_hello, fe_consumed) = parse_frontend_hello(UPAGEKITE_FE).unwrap().unwrap();
    assert_eq!(fe_hello.answers.len(), 1);
    let fe_chunks = replay(&UPAGEKITE_FE[fe_consumed..]);
    assert_eq!(fe_chunks[1].headers.proto.as_deref(), Some("http"));
}

#[test]
fn pagekite_py_rejections_replay() {
    let be = include_bytes!("vectors/rejected-be.bin");
    let fe = include_bytes!("vectors/rejected-fe.bin");
    let (hello, consumed) = parse_backend_hello(be).unwrap().unwrap();
    assert_eq!(hello.requests.len(), 2);
    let chunks = replay(&be[consumed..]);
    assert_eq!(chunks[0].headers.requests.len(), 2);
    let (answer, consumed) = parse_frontend_hello(fe).unwrap().unwrap();
    assert!(
        answer
            .answers
            .iter()
            .all(|a| matches!(a, KiteAnswer::SignThis { .. }))
    );
    let chunks = replay(&fe[consumed..]);
    // pagekite.py writes each Invalid before its Invalid-Why.
    let whys: Vec<(&str, &str)> = chunks[0]
        .headers
        .answers
        .iter()
        .map(|a| match a {
            KiteAnswer::Invalid { what, why } => (what.split(':').nth(1).unwrap(), why.as_str()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        whys,
        [
            ("foo.example.com", "signature"),
            ("other.example.com", "unauthorized")
        ]
    );
}

#[test]
fn pagekite_py_ping_probes_are_not_backends() {
    // pagekite.py measures a front-end's latency with a plain HEAD before
    // it connects; the front-end answers it like any unknown host.
    assert!(PROBE_BE.starts_with(b"HEAD /ping HTTP/1.1\r\nHost: ping.pagekite\r\n"));
    assert_eq!(sniff(PROBE_BE), Some(false));
    assert_eq!(sniff(PAGEKITE_BE), Some(true));
    assert_eq!(sniff(UPAGEKITE_BE), Some(true));
}

/// pagekite.py's own decoder, if this machine has it (Debian `pagekite`);
/// under CI a missing one fails the test.
fn pagekite_py_available() -> bool {
    let found = std::process::Command::new("/usr/bin/python3")
        .args(["-c", "import pagekite.proto.selectables"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !found {
        not_run("needs pagekite.py, which is not installed: sudo apt-get install pagekite");
    }
    found
}

/// Like the end-to-end fixtures' `require_tool`: a failure under CI, a
/// `NOT RUN` line otherwise.
fn not_run(why: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} {why} (CI installs every tool: .ci/run)"
    );
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "NOT RUN {test}: {why}");
}

#[test]
fn pagekite_py_decodes_what_we_encode() {
    if !pagekite_py_available() {
        return;
    }
    let mut encoder = ChunkEncoder::new(true);
    let mut wire = BytesMut::new();
    let mut payloads: Vec<Vec<u8>> = Vec::new();
    let mut push = |encoder: &mut ChunkEncoder, headers: ChunkHeaders, data: &[u8], plain: bool| {
        if plain {
            encoder.encode_plain(&headers, data, &mut wire);
        } else {
            encoder.encode(&headers, data, &mut wire);
        }
        let mut payload = headers.to_text().into_bytes();
        payload.extend_from_slice(data);
        payloads.push(payload);
    };
    let text = b"GET /index.html HTTP/1.1\r\nHost: a.example.com\r\n\r\n".repeat(40);
    let binary: Vec<u8> = (0..=255u8).cycle().take(20_000).collect();
    let opening = ChunkHeaders {
        proto: Some("http".into()),
        host: Some("a.example.com".into()),
        port: Some("80".into()),
        rip: Some("192.0.2.1".into()),
        rport: Some("4000".into()),
        ..ChunkHeaders::sid(1)
    };
    push(&mut encoder, opening, &text, false);
    let ping = ChunkHeaders {
        ping: Some("12.5".into()),
        ..ChunkHeaders::noop()
    };
    push(&mut encoder, ping, b"!", true);
    push(&mut encoder, ChunkHeaders::sid(1), &binary, false);
    push(&mut encoder, ChunkHeaders::sid(1), b"short", false);
    encoder.reset();
    push(&mut encoder, ChunkHeaders::sid(1), &text, false);
    push(&mut encoder, ChunkHeaders::sid(1), &text, false);
    let eof = ChunkHeaders {
        eof: Some(Eof {
            write: false,
            read: true,
        }),
        ..ChunkHeaders::sid(1)
    };
    push(&mut encoder, eof, b"Bye!", true);

    let path =
        std::env::temp_dir().join(format!("kitepipe-pagekite-chunks-{}", std::process::id()));
    std::fs::write(&path, &wire).unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/pagekite/vectors/pagekite_decode.py"
    );
    for step in ["0", "7"] {
        let out = std::process::Command::new("/usr/bin/python3")
            .args([script, path.to_str().unwrap(), step])
            .output()
            .unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = stdout.lines().collect();
        let expected: Vec<String> = payloads.iter().map(|p| crate::message::hex(p)).collect();
        assert!(lines.len() >= 2, "{stdout}");
        assert_eq!(
            &lines[lines.len() - 2..],
            ["corrupt 0", "ok True"],
            "step {step}"
        );
        assert_eq!(
            lines.len() - 2,
            expected.len(),
            "step {step}: chunks decoded"
        );
        for (i, (got, want)) in lines.iter().zip(&expected).enumerate() {
            assert!(got == want, "step {step}: chunk {i} differs");
        }
    }
    std::fs::remove_file(&path).unwrap();
}
