//! Fuzzes the event decoders: gateway paths and reply heads. A path either
//! fails or yields a handler name of `[a-z0-9_]` only; a reply head either
//! fails, asks for more bytes, or decodes to a head that round-trips.
#![no_main]

use kitepipe_proto::event::{self, ReplyHead};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let (method, path) = text.split_once(' ').unwrap_or(("GET", text));
        if let Ok(parsed) = event::parse_gateway_path(method, path) {
            assert!(event::is_handler_name(&parsed.name), "{parsed:?}");
            assert!(parsed.args.iter().all(|arg| !arg.contains('\0')));
        }
    }
    if let Ok(Some((head, used))) = event::decode_reply_head(data) {
        assert!(used <= data.len() && used <= 4 + event::MAX_REPLY_HEAD);
        let again = event::encode_reply_head(&head);
        let (back, _): (ReplyHead, usize) = event::decode_reply_head(&again).unwrap().unwrap();
        assert_eq!(back, head);
    }
});
