//! Fuzzes the PageKite handshake heads: both parsers take arbitrary bytes
//! without panicking, stay within their bounds, answer the same for the
//! head alone as for the head followed by more, and a back-end head we
//! build from what was parsed parses back to the same.
#![no_main]

use kitepipe_proto::pagekite::{
    MAX_HEAD, MAX_KITE_REQUESTS, build_backend_hello, parse_backend_hello, parse_frontend_hello,
    sniff,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sniff(data);
    match parse_backend_hello(data) {
        Ok(Some((hello, consumed))) => {
            assert!(consumed <= data.len() && consumed <= MAX_HEAD);
            assert!(hello.requests.len() <= MAX_KITE_REQUESTS);
            assert_eq!(
                parse_backend_hello(&data[..consumed]),
                Ok(Some((hello.clone(), consumed)))
            );
            let strings = hello
                .features
                .iter()
                .chain(&hello.version)
                .chain(&hello.replace);
            let plain = strings.into_iter().all(|s| !s.contains(['\r', '\n']));
            if plain {
                let built = build_backend_hello(&hello);
                assert_eq!(sniff(&built), Some(true));
                assert_eq!(parse_backend_hello(&built), Ok(Some((hello, built.len()))));
            }
        }
        Ok(None) => assert!(data.len() < MAX_HEAD),
        Err(_) => {}
    }
    match parse_frontend_hello(data) {
        Ok(Some((hello, consumed))) => {
            assert!(consumed <= data.len() && consumed <= MAX_HEAD);
            assert!(hello.answers.len() <= MAX_KITE_REQUESTS);
            assert_eq!(
                parse_frontend_hello(&data[..consumed]),
                Ok(Some((hello, consumed)))
            );
        }
        Ok(None) => assert!(data.len() < MAX_HEAD),
        Err(_) => {}
    }
});
