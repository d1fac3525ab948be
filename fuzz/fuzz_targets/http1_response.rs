//! Fuzzes the relay's delimiting of kites' HTTP/1 responses:
//! `parse_response_head` then `BodyScanner` over the body, and a kite's
//! header edits (`edit_response_head`), checking invariants rather than
//! only "no panic".
#![no_main]

use std::collections::BTreeMap;

use kitepipe_proto::http_policy::HeaderRules;
use kitepipe_proto::http1::{
    BodyKind, BodyScanner, MAX_HEAD_LEN, ResponseBody, edit_response_head, parse_response_head,
};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

/// Bytes from a kite, and what the request was.
#[derive(Arbitrary, Debug)]
struct Input<'a> {
    data: &'a [u8],
    head_request: bool,
    piece_len: u8,
}

fuzz_target!(|input: Input<'_>| {
    let data = input.data;
    let method = if input.head_request { "HEAD" } else { "GET" };
    let head = match parse_response_head(data, method) {
        Ok(None) => {
            assert!(data.len() < MAX_HEAD_LEN);
            return;
        }
        Err(_) => return,
        Ok(Some(head)) => head,
    };
    assert!(head.head_len <= data.len() && head.head_len <= MAX_HEAD_LEN);
    // The head alone parses to the same answer.
    assert_eq!(
        parse_response_head(&data[..head.head_len], method),
        Ok(Some(head.clone()))
    );
    // A kite's edits (which never touch framing fields) keep the status
    // and the framing, and the edited head is one complete head.
    let rules = HeaderRules {
        set: BTreeMap::from([("X-Frame-Options".to_string(), "DENY".to_string())]),
        remove: vec!["server".to_string(), "set-cookie".to_string()],
    };
    let edited = edit_response_head(&data[..head.head_len], &rules);
    if let Ok(Some(again)) = parse_response_head(&edited, method) {
        assert_eq!((again.status, again.body), (head.status, head.body));
        assert_eq!(again.head_len, edited.len());
    } else if edited.len() <= MAX_HEAD_LEN {
        panic!("an edited head does not parse: {edited:?}");
    }
    let no_body = input.head_request
        || (100..200).contains(&head.status)
        || head.status == 204
        || head.status == 304;
    if no_body {
        assert_eq!(head.body, ResponseBody::Framed(BodyKind::Empty));
    }
    let ResponseBody::Framed(kind) = head.body else {
        return;
    };
    // The body is delimited the same whatever the reads' sizes.
    let body = &data[head.head_len..];
    let mut whole = BodyScanner::new(kind);
    let at_once = whole.scan(body);
    let mut pieces = BodyScanner::new(kind);
    let piece = usize::from(input.piece_len.max(1));
    let mut consumed = 0;
    let mut failed = None;
    for chunk in body.chunks(piece) {
        match pieces.scan(chunk) {
            Ok(progress) => {
                consumed += progress.consumed;
                if progress.done {
                    break;
                }
            }
            Err(err) => {
                failed = Some(err);
                break;
            }
        }
    }
    match at_once {
        Ok(progress) => {
            assert_eq!(failed, None);
            assert_eq!(progress.consumed, consumed);
            assert_eq!(progress.done, pieces.is_done());
        }
        Err(err) => assert_eq!(failed, Some(err)),
    }
});
