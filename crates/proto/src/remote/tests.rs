use super::*;
use crate::message;

#[test]
fn headers_round_trip_with_the_stream_header_shape() {
    let header = RemoteHeader::Remote(RemoteOp::Exec(ExecOp {
        argv: vec!["uname".into(), "-a".into()],
        env: vec![("A".into(), "1".into())],
        cwd: Some("/tmp".into()),
        stdin: true,
        ..ExecOp::default()
    }));
    let bytes = message::encode(&header);
    let text = std::str::from_utf8(&bytes).unwrap();
    assert!(
        text.starts_with(r#"{"kind":"remote","op":"exec","argv":["uname","-a"]"#),
        "{text}"
    );
    let back: RemoteHeader = message::decode(&bytes).unwrap();
    assert_eq!(back, header);
    for op in [
        RemoteOp::Stat(StatOp {
            path: "/".into(),
            no_follow: false,
        }),
        RemoteOp::Connect(ConnectOp {
            host: "127.0.0.1".into(),
            port: 80,
        }),
        RemoteOp::Kill(KillOp {
            pid: 3,
            signal: 15,
            group: true,
        }),
    ] {
        let header = RemoteHeader::Remote(op);
        let back: RemoteHeader = message::decode(&message::encode(&header)).unwrap();
        assert_eq!(back, header);
    }
    // Other stream headers are not remote operations.
    assert!(message::decode::<RemoteHeader>(br#"{"kind":"visitor","kite":"x"}"#).is_err());
    assert!(message::decode::<RemoteHeader>(br#"{"kind":"remote","op":"format_disk"}"#).is_err());
}

#[test]
fn records_round_trip_through_a_slow_drip() {
    let client = [
        ClientRecord::Data(Bytes::from_static(b"hello")),
        ClientRecord::Eof,
        ClientRecord::Signal(-2),
        ClientRecord::Resize(TtySize { rows: 24, cols: 80 }),
        ClientRecord::Data(Bytes::new()),
    ];
    let mut wire = BytesMut::new();
    for record in &client {
        record.encode(&mut wire);
    }
    // One byte at a time: partial records wait and consume nothing.
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for byte in wire.iter() {
        buf.put_u8(*byte);
        while let Some(record) = ClientRecord::decode(&mut buf).unwrap() {
            got.push(record);
        }
    }
    assert_eq!(got, client);
    assert!(buf.is_empty());

    let agent = [
        AgentRecord::Head(to_json(&ExecHead { pid: 7 })),
        AgentRecord::Stdout(Bytes::from_static(b"out")),
        AgentRecord::Stderr(Bytes::from_static(b"err")),
        AgentRecord::Data(Bytes::from(vec![0u8; DATA_CHUNK])),
        AgentRecord::Items(to_json(&Vec::<DirEntry>::new())),
        AgentRecord::Error(ErrorReply {
            kind: ErrorKind::NotFound,
            errno: Some(2),
            message: "No such file or directory".into(),
            path: Some("/nope".into()),
        }),
        AgentRecord::Done(to_json(&ExitReport {
            code: Some(3),
            signal: None,
        })),
    ];
    let mut wire = BytesMut::new();
    for record in &agent {
        record.encode(&mut wire);
    }
    let mut got = Vec::new();
    while let Some(record) = AgentRecord::decode(&mut wire).unwrap() {
        got.push(record);
    }
    assert_eq!(got, agent);
}

#[test]
fn hostile_records_are_errors() {
    let cases: &[(&[u8], &str)] = &[
        (&[1, 0xff, 0xff, 0xff, 0xff], "too large"),
        (&[99, 0, 0, 0, 0], "unknown type"),
        (&[2, 0, 0, 0, 1, 0], "eof with payload"),
        (&[3, 0, 0, 0, 2, 0, 1], "short signal"),
        (&[4, 0, 0, 0, 5, 0, 1, 0, 1, 0], "long resize"),
        (&[16, 0, 0, 0, 0], "agent record from a client"),
    ];
    for (bytes, what) in cases {
        let mut buf = BytesMut::from(*bytes);
        assert!(ClientRecord::decode(&mut buf).is_err(), "{what}");
    }
    let cases: &[(&[u8], &str)] = &[
        (&[17, 0x00, 0x10, 0x00, 0x01], "too large"),
        (&[1, 0, 0, 0, 0], "client record from an agent"),
        (&[22, 0, 0, 0, 2, b'{', b'}'], "error without fields"),
        (&[22, 0, 0, 0, 1, 0xff], "error not json"),
    ];
    for (bytes, what) in cases {
        let mut buf = BytesMut::from(*bytes);
        assert!(AgentRecord::decode(&mut buf).is_err(), "{what}");
    }
    // Truncated: waits for more, consumes nothing.
    let mut buf = BytesMut::from(&[17u8, 0, 0, 0, 9, b'a'][..]);
    assert!(AgentRecord::decode(&mut buf).unwrap().is_none());
    assert_eq!(buf.len(), 6);
}

#[test]
fn unknown_error_kinds_are_other() {
    let reply: ErrorReply = from_json(22, br#"{"kind":"quantum_flux","message":"m"}"#).unwrap();
    assert_eq!(reply.kind, ErrorKind::Other);
    assert_eq!(reply.to_string(), "m");
}

#[test]
fn agent_hello_is_tagged() {
    let hello = AgentHello {
        version: 1,
        software: "kitepipe/0".into(),
        pid: 1,
        uid: 0,
        platform: "linux x86_64".into(),
    };
    let bytes = message::encode(&hello);
    assert!(bytes.starts_with(br#"{"type":"agent_hello""#));
    let back: AgentHello = message::decode(&bytes).unwrap();
    assert_eq!(back, hello);
}
