//! Fuzzes the PageKite chunk decoder: the first byte picks where the rest
//! is split and whether it is also re-encoded compressed. Arbitrary bytes
//! decode to the same chunks and errors fed whole or in two pieces, never
//! buffer more than one chunk's bound, and every chunk decoded re-encodes
//! (plain or compressed) and decodes back to itself.
#![no_main]

use bytes::BytesMut;
use kitepipe_proto::pagekite::{
    Chunk, ChunkDecoder, ChunkEncoder, MAX_CHUNK, MAX_KITE_REQUESTS, PageKiteError,
};
use libfuzzer_sys::fuzz_target;

/// Decodes everything it can; stops at an error that loses the framing.
fn decode_all(pieces: &[&[u8]]) -> Vec<Result<Chunk, PageKiteError>> {
    let mut decoder = ChunkDecoder::new();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match decoder.decode(&mut buf) {
                Ok(Some(chunk)) => {
                    assert!(chunk.data.len() <= MAX_CHUNK);
                    assert!(chunk.headers.requests.len() <= MAX_KITE_REQUESTS);
                    assert!(chunk.headers.answers.len() <= MAX_KITE_REQUESTS);
                    out.push(Ok(chunk));
                }
                Ok(None) => break,
                Err(err) => {
                    out.push(Err(err));
                    if buf.len() == before {
                        return out;
                    }
                }
            }
        }
        // What stays is one incomplete chunk: its size line and payload.
        assert!(buf.len() < MAX_CHUNK + 64);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, wire)) = data.split_first() else {
        return;
    };
    let split = (usize::from(flags & 0x7f) * wire.len()) / 127;
    let whole = decode_all(&[wire]);
    let pieces = decode_all(&[&wire[..split], &wire[split..]]);
    assert_eq!(whole, pieces);

    let compress = flags & 0x80 != 0;
    let mut encoder = ChunkEncoder::new(compress);
    let mut again = BytesMut::new();
    let chunks: Vec<&Chunk> = whole.iter().filter_map(|c| c.as_ref().ok()).collect();
    for chunk in &chunks {
        encoder.encode(&chunk.headers, &chunk.data, &mut again);
    }
    let mut decoder = ChunkDecoder::new();
    for chunk in chunks {
        let decoded = decoder.decode(&mut again);
        // Headers we cannot write back as they came (a value the builder
        // must escape) may not round-trip; the framing always does.
        match decoded {
            Ok(Some(back)) => {
                if back.headers == chunk.headers {
                    assert_eq!(back.data, chunk.data);
                }
            }
            Ok(None) => panic!("a re-encoded chunk is whole"),
            // Headers written back in full (`EOF: 1WR` for `EOF: 1`) may
            // push a chunk at the bound over it.
            Err(PageKiteError::ChunkTooLarge(_)) => return,
            Err(err) => assert!(!matches!(err, PageKiteError::Corrupt { .. }), "{err}"),
        }
    }
    assert!(again.is_empty());
});
