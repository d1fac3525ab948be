//! Fuzzes the link's frame decoder: arbitrary bytes, fed in arbitrary
//! pieces, decode to the same frames as fed whole, and every decoded frame
//! re-encodes to exactly the bytes it was decoded from (reasons aside, which
//! are decoded lossily from UTF-8).
#![no_main]

use bytes::BytesMut;
use kitepipe_proto::frame::{Frame, MAX_PAYLOAD};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    data: &'a [u8],
    split: usize,
}

fn decode_all(pieces: &[&[u8]]) -> (Vec<Frame>, bool) {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            match Frame::decode(&mut buf) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(_) => return (frames, true),
            }
        }
        // What stays buffered is one incomplete frame, never more than its bound.
        assert!(buf.len() < 9 + MAX_PAYLOAD);
    }
    (frames, false)
}

fuzz_target!(|input: Input<'_>| {
    let split = input.split % (input.data.len() + 1);
    let whole = decode_all(&[input.data]);
    let pieces = decode_all(&[&input.data[..split], &input.data[split..]]);
    assert_eq!(whole, pieces);
    let mut consumed = 0;
    for frame in &whole.0 {
        let mut encoded = BytesMut::new();
        frame.encode(&mut encoded);
        let lossy = matches!(frame, Frame::Reset { .. } | Frame::GoAway { .. });
        if !lossy {
            assert_eq!(&encoded[..], &input.data[consumed..consumed + encoded.len()]);
        }
        let len = u32::from_be_bytes(input.data[consumed + 5..consumed + 9].try_into().unwrap());
        consumed += 9 + len as usize;
    }
});
