//! Fuzzes the remote-operation decoders: operation headers and the records
//! of both directions. Arbitrary bytes either fail cleanly, ask for more,
//! or decode to values that round-trip; a decoder never consumes more
//! than it was given.
#![no_main]

use bytes::BytesMut;
use kitepipe_proto::message;
use kitepipe_proto::remote::{AgentHello, AgentRecord, ClientRecord, RemoteHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = message::decode::<RemoteHeader>(data) {
        let back: RemoteHeader = message::decode(&message::encode(&header)).unwrap();
        assert_eq!(back, header);
    }
    if let Ok(hello) = message::decode::<AgentHello>(data) {
        let back: AgentHello = message::decode(&message::encode(&hello)).unwrap();
        assert_eq!(back, hello);
    }
    let mut buf = BytesMut::from(data);
    while let Ok(Some(record)) = ClientRecord::decode(&mut buf) {
        let mut again = BytesMut::new();
        record.encode(&mut again);
        assert_eq!(ClientRecord::decode(&mut again).unwrap(), Some(record));
    }
    let mut buf = BytesMut::from(data);
    while let Ok(Some(record)) = AgentRecord::decode(&mut buf) {
        let mut again = BytesMut::new();
        record.encode(&mut again);
        assert_eq!(AgentRecord::decode(&mut again).unwrap(), Some(record));
    }
});
