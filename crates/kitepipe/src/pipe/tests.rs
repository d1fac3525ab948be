//! Unit tests of the event pipe: a gateway on a loopback port sending
//! events over real muxes on in-memory duplexes to handlers, driven by the
//! `call` client; and the pure pieces (content-type line, stderr tail).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kitepipe_proto::event::{Caller, Route};
use kitepipe_proto::message::{self, StreamHeader};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::client::{CallRequest, call};
use super::{Gateway, GatewayListener, Handlers, Reply, RouteError, Router, run_gateway};
use crate::config::{EventConfig, GatewayAddr};
use crate::link::{Mux, MuxConfig, Side};

/// How the far side of a test link treats event streams.
#[derive(Clone, Copy)]
enum Far {
    /// Serves them with the handlers.
    Serve,
    /// Drops them unanswered, like a link dying mid-flight.
    Drop,
}

/// A link whose far side handles events as `far` says; returns the near
/// side's mux.
fn link(
    far: Far,
    handlers: Arc<Handlers>,
    tracker: &TaskTracker,
    token: &CancellationToken,
) -> Mux {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let config = MuxConfig::default();
    let (near, _near_rx) = Mux::start(
        a,
        BytesMut::new(),
        Side::Relay,
        &config,
        tracker,
        token.child_token(),
    );
    let (_far, mut far_rx) = Mux::start(
        b,
        BytesMut::new(),
        Side::Connector,
        &config,
        tracker,
        token.child_token(),
    );
    let tracker2 = tracker.clone();
    tracker.spawn(async move {
        // Keeps the far mux handle alive while it serves.
        let _far = _far;
        while let Some(incoming) = far_rx.incoming.recv().await {
            let header = match message::decode::<StreamHeader>(&incoming.header) {
                Ok(StreamHeader::Event(header)) => header,
                _ => continue,
            };
            match far {
                Far::Drop => drop(incoming.stream),
                Far::Serve => {
                    let caller = Caller {
                        node: "relay".into(),
                        identity: None,
                    };
                    tracker2.spawn(super::serve_event(
                        incoming.stream,
                        header,
                        caller,
                        handlers.clone(),
                    ));
                }
            }
        }
    });
    near
}

/// Hands out the given links in turn (the last one forever).
struct Links {
    links: Vec<Mux>,
    calls: AtomicUsize,
}

impl Router for Links {
    async fn route(&self, route: &Route, _wait: Duration) -> Result<Mux, RouteError> {
        if *route != Route::Client("far".into()) {
            return Err(RouteError::Unknown(format!("{route:?}")));
        }
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        Ok(self.links[n.min(self.links.len() - 1)].clone())
    }
}

struct Harness {
    gateway: GatewayAddr,
    tracker: TaskTracker,
    token: CancellationToken,
}

impl Harness {
    fn start(fars: &[Far], handlers: Arc<Handlers>) -> Harness {
        let tracker = TaskTracker::new();
        let token = CancellationToken::new();
        let links = fars
            .iter()
            .map(|far| link(*far, handlers.clone(), &tracker, &token))
            .collect();
        let listener = GatewayListener::bind(&EventConfig::default().gateway.unwrap()).unwrap();
        let gateway = GatewayAddr::Tcp(listener.tcp_addr().unwrap());
        let state = Arc::new(Gateway {
            router: Links {
                links,
                calls: AtomicUsize::new(0),
            },
            wait: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
            tracker: tracker.clone(),
            token: token.clone(),
        });
        tracker.spawn(run_gateway(listener, state));
        Harness {
            gateway,
            tracker,
            token,
        }
    }

    async fn call(&self, method: &str, path: &str, body: &[u8]) -> (u16, Bytes) {
        let mut out = Vec::new();
        let request = CallRequest {
            method: method.into(),
            path: path.into(),
            headers: vec![],
            body: Bytes::copy_from_slice(body),
        };
        let response = call(&self.gateway, request, &mut out).await.unwrap();
        (response.status, Bytes::from(out))
    }

    async fn stop(self) {
        self.token.cancel();
        self.tracker.close();
        tokio::time::timeout(Duration::from_secs(5), self.tracker.wait())
            .await
            .expect("every pipe task stops on cancel");
    }
}

fn handlers() -> Arc<Handlers> {
    let handlers = Arc::new(Handlers::new("far", &EventConfig::default()));
    handlers
        .register("post_sum", |event| async move {
            match event.body.bytes(1 << 20).await {
                Ok(body) => Reply::json(&body.iter().map(|b| u64::from(*b)).sum::<u64>()),
                Err(err) => Reply::error(413, &err.to_string()),
            }
        })
        .unwrap();
    handlers
        .register("get_caller", |event| async move {
            Reply::text(format!("{} {:?}", event.caller.node, event.args))
        })
        .unwrap();
    handlers
}

#[tokio::test]
async fn events_reach_closures_and_builtins_and_bodies_stream() {
    let harness = Harness::start(&[Far::Serve], handlers());
    let (status, body) = harness
        .call("GET", "/client/far/caller//a%20b/c", b"")
        .await;
    assert_eq!((status, &body[..]), (200, &b"relay [\"a b\", \"c\"]"[..]));
    let (status, body) = harness
        .call("POST", "/client/far/sum", &[1, 2, 3, 250])
        .await;
    assert_eq!((status, &body[..]), (200, &b"256"[..]));
    let big: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
    let (status, body) = harness.call("POST", "/client/far/cat", &big).await;
    assert_eq!(status, 200);
    assert!(body == big, "5 MB echoed intact");
    let (status, _) = harness.call("GET", "/client/far/nosuch", b"").await;
    assert_eq!(status, 404);
    let (status, _) = harness.call("GET", "/client/elsewhere/time", b"").await;
    assert_eq!(status, 404);
    let (status, _) = harness.call("GET", "/client/far/../time", b"").await;
    assert_eq!(status, 400);
    harness.stop().await;
}

/// Regression guard for the durability rule: a GET whose stream dies
/// before any reply byte is sent again on the next link; a POST is not.
#[tokio::test]
async fn idempotent_events_are_retried_once_after_a_lost_stream() {
    let harness = Harness::start(&[Far::Drop, Far::Serve], handlers());
    let (status, body) = harness.call("GET", "/client/far/cat//again", b"").await;
    assert_eq!((status, &body[..]), (200, &b"again"[..]));
    harness.stop().await;

    let harness = Harness::start(&[Far::Drop, Far::Serve], handlers());
    let (status, body) = harness.call("POST", "/client/far/cat", b"once").await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("not idempotent"));
    harness.stop().await;

    let harness = Harness::start(&[Far::Drop, Far::Drop, Far::Serve], handlers());
    let (status, _) = harness.call("GET", "/client/far/cat//x", b"").await;
    assert_eq!(status, 503, "retried once, not twice");
    harness.stop().await;
}

#[test]
fn content_type_line_is_taken_only_when_well_formed() {
    let cases: [(&[u8], Option<&str>, &[u8]); 6] = [
        (
            b"Content-Type: text/plain\nhello",
            Some("text/plain"),
            b"hello",
        ),
        (
            b"content-type:text/csv; charset=utf-8\r\na,b",
            Some("text/csv; charset=utf-8"),
            b"a,b",
        ),
        (
            b"hello\nContent-Type: text/plain\n",
            None,
            b"hello\nContent-Type: text/plain\n",
        ),
        (
            b"Content-Type: text/plain",
            None,
            b"Content-Type: text/plain",
        ),
        (
            b"Content-Type: \x01bad\nx",
            None,
            b"Content-Type: \x01bad\nx",
        ),
        (b"", None, b""),
    ];
    for (output, content_type, rest) in cases {
        let mut held = BytesMut::from(output);
        assert_eq!(
            super::exec::take_content_type(&mut held).as_deref(),
            content_type,
            "{output:?}"
        );
        assert_eq!(&held[..], rest);
    }
}
