//! End to end on loopback: real relay and connector processes, a real
//! backend, real curl.

mod support;

use support::*;

const SECRET: &str = "loopback-secret";

fn setup() -> (RelayProc, Backend, Proc) {
    let relay = Relay::new().domain(&format!("http,tcp:*.example.net:{SECRET}")).start();
    let backend = Backend::start("http");
    let connector = Connector::new(&relay)
        .secret(SECRET)
        .kite(&format!("http:blog.example.net={}", backend.addr()))
        .start();
    (relay, backend, connector)
}

#[test]
fn get_through_the_relay_reaches_the_backend_with_forwarding_headers() {
    let (relay, _backend, _connector) = setup();
    let body = curl_ok(&["-H", "Host: blog.example.net", &format!("{}/", relay.http_url())]);
    assert_eq!(body, "hello from backend\n");
    let headers = curl_ok(&["-H", "Host: blog.example.net", &format!("{}/headers", relay.http_url())]);
    let headers: serde_json::Value = serde_json::from_str(&headers).unwrap();
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(headers["host"], "blog.example.net");
}
