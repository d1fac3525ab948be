//! Fuzzes `sniff_client_hello` with arbitrary bytes and checks that its
//! answers are consistent, not just that it does not panic.
#![no_main]

use kitepipe_proto::sniff::{MAX_CLIENT_HELLO, Sniffed, sniff_client_hello};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

/// A buffer as the relay would hold it, and bytes that arrive after it.
#[derive(Arbitrary, Debug)]
struct Input<'a> {
    data: &'a [u8],
    more: &'a [u8],
}

fuzz_target!(|input: Input<'_>| {
    let res = sniff_client_hello(input.data);
    let mut extended = input.data.to_vec();
    extended.extend_from_slice(input.more);
    let extended_res = sniff_client_hello(&extended);
    match &res {
        Ok(Sniffed::NeedMore) => {
            // The caller never has to buffer more than the bound.
            assert!(input.data.len() < MAX_CLIENT_HELLO);
        }
        Ok(Sniffed::Tls(info)) => {
            if let Some(sni) = &info.sni {
                assert!(!sni.is_empty());
                assert!(sni.bytes().all(|byte| {
                    byte.is_ascii_lowercase()
                        || byte.is_ascii_digit()
                        || matches!(byte, b'-' | b'_' | b'.')
                }));
            }
            assert!(info.alpn.iter().all(|protocol| !protocol.is_empty()));
            // Bytes after a complete hello change nothing, and a prefix is
            // either still incomplete or already the same hello.
            assert_eq!(extended_res, res);
            let half = sniff_client_hello(&input.data[..input.data.len() / 2]);
            assert!(half == Ok(Sniffed::NeedMore) || half == res, "{half:?}");
        }
        Err(_) => {
            // More bytes never repair a refused hello.
            assert_eq!(extended_res, res);
        }
    }
});
