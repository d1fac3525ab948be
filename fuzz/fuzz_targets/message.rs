//! Fuzzes the control-message and stream-header decoders: arbitrary bytes
//! either fail cleanly or decode to a message that round-trips.
#![no_main]

use kitepipe_proto::message::{self, ConnectorMessage, RelayMessage, StreamHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = message::decode::<ConnectorMessage>(data) {
        let back: ConnectorMessage = message::decode(&message::encode(&msg)).unwrap();
        assert_eq!(back, msg);
    }
    if let Ok(msg) = message::decode::<RelayMessage>(data) {
        let back: RelayMessage = message::decode(&message::encode(&msg)).unwrap();
        assert_eq!(back, msg);
    }
    if let Ok(header) = message::decode::<StreamHeader>(data) {
        let back: StreamHeader = message::decode(&message::encode(&header)).unwrap();
        assert_eq!(back, header);
    }
});
