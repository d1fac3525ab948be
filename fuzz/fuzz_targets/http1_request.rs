//! Fuzzes the relay's HTTP/1 scanning: `parse_request_head`, `rewrite_head`
//! (and `rewrite_head_with` a kite's edits), `field_value` and
//! `BodyScanner`, checking invariants rather than only "no panic".
#![no_main]

use std::collections::BTreeMap;
use std::net::IpAddr;

use kitepipe_proto::http_policy::HeaderRules;
use kitepipe_proto::http1::{
    BodyKind, BodyProgress, BodyScanner, Forwarded, HttpError, MAX_HEAD_LEN, RequestEdits,
    field_value, parse_request_head, rewrite_head, rewrite_head_with,
};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

/// Bytes from a visitor, with how the relay's reads split them.
#[derive(Arbitrary, Debug)]
struct Input<'a> {
    data: &'a [u8],
    piece_len: u8,
    client_ip: [u8; 16],
    https: bool,
    chunked: bool,
}

fuzz_target!(|input: Input<'_>| {
    let data = input.data;
    match parse_request_head(data) {
        Ok(None) => assert!(data.len() < MAX_HEAD_LEN),
        Ok(Some(head)) => {
            assert!(head.head_len <= data.len() && head.head_len <= MAX_HEAD_LEN);
            if let Some(host) = &head.host {
                assert!(!host.is_empty());
                assert_eq!(host, &host.to_ascii_lowercase());
            }
            let raw_head = &data[..head.head_len];
            assert_eq!(parse_request_head(raw_head), Ok(Some(head.clone())));

            // Rewriting keeps everything the relay and the backend decide by.
            let forwarded = Forwarded {
                client_ip: IpAddr::from(input.client_ip),
                proto: if input.https { "https" } else { "http" },
            };
            let rewritten = rewrite_head(raw_head, &forwarded).expect("a parsed head rewrites");
            let again = parse_request_head(&rewritten)
                .expect("a rewritten head parses")
                .expect("a rewritten head is complete");
            assert_eq!(again.head_len, rewritten.len());
            assert_eq!(
                (
                    &again.method,
                    &again.target,
                    again.version_minor,
                    &again.host
                ),
                (&head.method, &head.target, head.version_minor, &head.host)
            );
            assert_eq!(
                (again.body, again.upgrade, again.close),
                (head.body, head.upgrade, head.close)
            );

            // A kite's edits (never framing fields) and X-Forwarded-Host
            // from the visitor's Host keep the same invariants, and the
            // edited fields come out exactly once.
            let rules = HeaderRules {
                set: BTreeMap::from([("X-Team".to_string(), "blue".to_string())]),
                remove: vec!["cookie".to_string()],
            };
            let edits = RequestEdits {
                headers: Some(&rules),
                forwarded_host: field_value(raw_head, b"host"),
            };
            let edited =
                rewrite_head_with(raw_head, &forwarded, &edits).expect("a parsed head rewrites");
            if let Ok(Some(again)) = parse_request_head(&edited) {
                assert_eq!(again.head_len, edited.len());
                assert_eq!(
                    (&again.method, &again.target, &again.host, again.body, again.upgrade),
                    (&head.method, &head.target, &head.host, head.body, head.upgrade)
                );
                assert_eq!(field_value(&edited, b"x-team"), Some(&b"blue"[..]));
                assert_eq!(field_value(&edited, b"cookie"), None);
            } else {
                assert!(edited.len() > MAX_HEAD_LEN, "an edited head does not parse");
            }

            scan_both_ways(head.body, &data[head.head_len..], input.piece_len);
        }
        Err(err) => assert!(matches!(err.status(), 400 | 431 | 505)),
    }
    let kind = if input.chunked {
        BodyKind::Chunked
    } else {
        BodyKind::Length(u64::from(input.piece_len))
    };
    scan_both_ways(kind, data, input.piece_len);
});

/// Scanning in one go and in pieces must agree.
fn scan_both_ways(kind: BodyKind, body: &[u8], piece_len: u8) {
    let whole = BodyScanner::new(kind).scan(body);
    if let Ok(progress) = &whole {
        assert!(progress.consumed <= body.len());
        assert!(progress.done || progress.consumed == body.len());
    }
    let in_pieces = scan_in_pieces(kind, body, usize::from(piece_len.max(1)));
    assert_eq!(whole, in_pieces);
}

fn scan_in_pieces(
    kind: BodyKind,
    body: &[u8],
    piece_len: usize,
) -> Result<BodyProgress, HttpError> {
    let mut scanner = BodyScanner::new(kind);
    let mut consumed = 0;
    for piece in body.chunks(piece_len) {
        let progress = scanner.scan(piece)?;
        consumed += progress.consumed;
        if progress.done {
            return Ok(BodyProgress {
                consumed,
                done: true,
            });
        }
    }
    Ok(BodyProgress {
        consumed,
        done: scanner.is_done(),
    })
}
