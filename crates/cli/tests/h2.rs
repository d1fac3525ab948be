//! HTTP/2 through the relay: h2c with prior knowledge on the plain HTTP
//! port, towards an HTTP/1.1 local service (translated) and towards an h2c
//! one (`backend = "h2c"`), and gRPC end to end (Python grpcio on both
//! sides: unary, server-streaming, client-streaming calls, trailers and a
//! status).

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;

const SECRET: &str = "h2-test-secret";

fn relay() -> RelayProc {
    Relay::new()
        .domain(&format!("http:*.example.net:{SECRET}"))
        .start()
}

/// A connector serving one http `[[kite]]` `name` -> `target` with
/// `extra` lines; returns it and the config's directory.
fn kite(relay: &RelayProc, name: &str, target: &str, extra: &str) -> (Proc, TempDir) {
    let dir = TempDir::new("h2-kite");
    let file = dir.path().join("connector.toml");
    std::fs::write(
        &file,
        format!(
            "secret = {SECRET:?}\n\n[[kite]]\nname = {name:?}\nprotocol = \"http\"\n\
             target = {target:?}\n{extra}\n"
        ),
    )
    .expect("write the connector's config");
    let connector = Connector::new(relay)
        .args(&["--config", &path(&file)])
        .start();
    (connector, dir)
}

/// An HTTP/2 client connection to the relay's HTTP port (hyper, prior
/// knowledge): several requests on one visitor connection. (curl 7.88
/// cannot reuse an h2c prior-knowledge connection: its second request
/// fails with "Error in the HTTP2 framing layer" against any server.)
struct H2Client {
    runtime: tokio::runtime::Runtime,
    sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
}

/// A response read whole.
struct Answer {
    status: u16,
    headers: hyper::HeaderMap,
    body: Bytes,
    trailers: Option<hyper::HeaderMap>,
}

impl H2Client {
    fn connect(relay: &RelayProc) -> H2Client {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let addr = relay.http.expect("relay has an HTTP port");
        let sender = runtime.block_on(async {
            let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(sock))
                    .await
                    .expect("h2c handshake with the relay");
            tokio::spawn(connection);
            sender
        });
        H2Client { runtime, sender }
    }

    /// Sends `requests` at once on the connection; their answers in order.
    fn send(&mut self, requests: Vec<Request<Full<Bytes>>>) -> Vec<Answer> {
        let sender = self.sender.clone();
        self.runtime.block_on(async move {
            let calls: Vec<_> = requests
                .into_iter()
                .map(|req| {
                    let mut sender = sender.clone();
                    tokio::spawn(async move {
                        let response = sender.send_request(req).await.expect("an answer");
                        let status = response.status().as_u16();
                        let headers = response.headers().clone();
                        let collected = response.into_body().collect().await.expect("a body");
                        let trailers = collected.trailers().cloned();
                        Answer {
                            status,
                            headers,
                            body: collected.to_bytes(),
                            trailers,
                        }
                    })
                })
                .collect();
            let mut answers = Vec::new();
            for call in calls {
                answers.push(call.await.unwrap());
            }
            answers
        })
    }

    /// GET `path` from `host`, claiming an earlier hop the relay drops.
    fn get(&mut self, host: &str, path: &str) -> Answer {
        let req = Request::get(format!("http://{host}{path}"))
            .header("x-forwarded-for", "203.0.113.66")
            .body(Full::new(Bytes::new()))
            .unwrap();
        self.send(vec![req]).pop().unwrap()
    }
}

fn text(answer: &Answer) -> String {
    String::from_utf8_lossy(&answer.body).into_owned()
}

/// `curl --http2-prior-knowledge` to `url` with `host`: (HTTP version,
/// body).
fn curl_h2(host: &str, url: &str, extra: &[&str]) -> (String, String) {
    let host = format!("Host: {host}");
    let mut args = vec![
        "--http2-prior-knowledge",
        "-H",
        &host,
        "-w",
        "\n--- end %{http_version}",
    ];
    args.extend_from_slice(extra);
    args.push(url);
    let out = curl_ok(&args);
    let (body, version) = out.rsplit_once("\n--- end ").expect("curl's write-out");
    (version.to_string(), body.to_string())
}

/// curl with HTTP/2 prior knowledge through the relay to an HTTP/1.1
/// local service, and a 1 MiB POST whose checksum the service computes;
/// then several requests on one visitor connection, some at once: the
/// relay's own forwarding headers, one reused HTTP/1.1 connection to the
/// service for consecutive requests, a chunked response.
#[test]
fn h2c_visitors_reach_an_http1_backend() {
    let relay = relay();
    let backend = Backend::start("http");
    let (_connector, _dir) = kite(&relay, "h2.example.net", &backend.addr(), "");
    let url = relay.http_url();
    let (version, body) = curl_h2("h2.example.net", &format!("{url}/"), &[]);
    assert_eq!(
        (version.as_str(), body.as_str()),
        ("2", "hello from backend\n")
    );
    let dir = TempDir::new("h2-upload");
    let upload = pseudo_random(1 << 20, 14);
    let file = dir.path().join("upload.bin");
    std::fs::write(&file, &upload).unwrap();
    let data = format!("@{}", path(&file));
    let (version, body) = curl_h2(
        "h2.example.net",
        &format!("{url}/sha256"),
        &["--data-binary", &data],
    );
    assert_eq!(version, "2");
    let sum: serde_json::Value = serde_json::from_str(&body).expect("sha256 JSON");
    assert_eq!(sum["len"], upload.len(), "{sum}");
    assert_eq!(sum["sha256"], sha256_hex(&upload), "{sum}");

    let mut client = H2Client::connect(&relay);
    let headers = client.get("h2.example.net", "/headers");
    assert_eq!(headers.status, 200);
    let headers: serde_json::Value = serde_json::from_slice(&headers.body).expect("headers JSON");
    assert_eq!(headers["host"], "h2.example.net", "{headers}");
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1", "{headers}");
    assert_eq!(headers["x-forwarded-proto"], "http", "{headers}");
    let first = text(&client.get("h2.example.net", "/conn"));
    let second = text(&client.get("h2.example.net", "/conn"));
    assert_eq!(
        first, second,
        "one HTTP/1.1 connection to the service serves both"
    );
    let chunks: String = (0..10).map(|i| format!("chunk-{i}\n")).collect();
    assert_eq!(text(&client.get("h2.example.net", "/chunked")), chunks);
    let at_once = (0..8)
        .map(|n| {
            Request::get(format!("http://h2.example.net/bytes/{}", 100_000 + n))
                .body(Full::new(Bytes::new()))
                .unwrap()
        })
        .collect();
    for (n, answer) in client.send(at_once).iter().enumerate() {
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body.len(), 100_000 + n, "request {n}");
    }
}

/// Refusals over HTTP/2 are the relay's styled pages: 404 for an unknown
/// kite, 403 for an address the kite's policy denies (the service never
/// sees it), and 421 for a request naming another kite than the
/// connection's first.
#[test]
fn h2c_refusals_are_styled_pages() {
    let relay = relay();
    let backend = Backend::start("http");
    let (_connector, _dir) = kite(&relay, "h2.example.net", &backend.addr(), "");
    let (_other, _other_dir) = kite(&relay, "other.example.net", &backend.addr(), "");
    let (_denied, _denied_dir) = kite(
        &relay,
        "deny.example.net",
        &backend.addr(),
        "deny = [\"127.0.0.1\"]",
    );
    let url = relay.http_url();
    let refused = |host: &str, status: u16, title: &str| {
        let (code, out, err) = curl(&[
            "--http2-prior-knowledge",
            "-i",
            "-H",
            &format!("Host: {host}"),
            &format!("{url}/"),
        ]);
        assert_eq!(code, 0, "{err}");
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with(&format!("HTTP/2 {status}")), "{out}");
        assert!(
            out.contains(&format!("x-kitepipe-error: {status}")),
            "{out}"
        );
        assert!(out.contains(&format!("<h1>{title}</h1>")), "{out}");
    };
    refused("nobody.example.org", 404, "Unknown kite");
    refused("deny.example.net", 403, "Forbidden");

    let mut client = H2Client::connect(&relay);
    assert_eq!(
        text(&client.get("h2.example.net", "/")),
        "hello from backend\n"
    );
    let other = client.get("other.example.net", "/");
    assert_eq!(other.status, 421, "{}", text(&other));
    assert_eq!(other.headers["x-kitepipe-error"], "421");
    assert!(text(&other).contains("open a new connection for other.example.net"));
    assert_eq!(
        text(&client.get("h2.example.net", "/")),
        "hello from backend\n"
    );
}

/// The kite's header edits and `forwarded_host` apply to HTTP/2 requests
/// and responses too: set replaces, remove drops.
#[test]
fn h2c_requests_get_the_kites_header_edits() {
    let relay = relay();
    let backend = Backend::start("http");
    let (_connector, _dir) = kite(
        &relay,
        "h2.example.net",
        &backend.addr(),
        "request_headers = { set = { \"X-Team\" = \"blue\" }, remove = [\"Cookie\"] }\n\
         response_headers = { set = { \"X-Frame-Options\" = \"DENY\" }, remove = [\"Server\"] }\n\
         forwarded_host = true",
    );
    let mut client = H2Client::connect(&relay);
    let req = Request::get("http://h2.example.net/headers")
        .header("cookie", "session=secret")
        .header("x-team", "red")
        .header("x-forwarded-host", "evil.example.org")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let answer = client.send(vec![req]).pop().unwrap();
    assert_eq!(answer.status, 200);
    let headers: serde_json::Value = serde_json::from_slice(&answer.body).expect("headers JSON");
    assert_eq!(headers["x-team"], "blue", "{headers}");
    assert!(headers.get("cookie").is_none(), "{headers}");
    assert_eq!(headers["x-forwarded-host"], "h2.example.net", "{headers}");
    assert_eq!(answer.headers["x-frame-options"], "DENY");
    assert!(
        answer.headers.get("server").is_none(),
        "{:?}",
        answer.headers
    );
}

/// An h2c local service (`backend = "h2c"`): curl's requests reach it as
/// HTTP/2 with the relay's forwarding headers, bodies both ways, from h2c
/// and from HTTP/1.1 visitors (translated); several requests on one
/// visitor connection share one h2c connection, and the service's
/// trailers reach an HTTP/2 visitor.
#[test]
fn h2c_visitors_reach_an_h2c_backend() {
    let relay = relay();
    let backend = H2cBackend::start();
    let (_connector, _dir) = kite(
        &relay,
        "h2c.example.net",
        &backend.addr.to_string(),
        "backend = \"h2c\"",
    );
    let url = relay.http_url();
    let want = |method: &str, path: &str, len: usize| {
        format!(
            "h2c {method} {path} HTTP/2.0 authority=h2c.example.net xff=127.0.0.1 proto=http body={len}"
        )
    };
    let (version, body) = curl_h2("h2c.example.net", &format!("{url}/a?b=c"), &[]);
    assert_eq!(version, "2");
    assert_eq!(body, want("GET", "/a?b=c", 0));
    let (_, body) = curl_h2(
        "h2c.example.net",
        &format!("{url}/post"),
        &["--data-binary", "twelve bytes"],
    );
    assert_eq!(body, want("POST", "/post", 12));
    // HTTP/1.1 visitors too: translated to HTTP/2, two requests on one
    // keep-alive connection sharing one h2c connection.
    let out = curl_ok(&[
        "--http1.1",
        "-H",
        "Host: h2c.example.net",
        &format!("{url}/h1a"),
        &format!("{url}/h1b"),
    ]);
    assert_eq!(out, want("GET", "/h1a", 0) + &want("GET", "/h1b", 0));

    let mut client = H2Client::connect(&relay);
    let requests = (0..4)
        .map(|n| {
            Request::post(format!("http://h2c.example.net/n{n}"))
                .body(Full::new(Bytes::from(vec![b'x'; n])))
                .unwrap()
        })
        .collect();
    for (n, answer) in client.send(requests).iter().enumerate() {
        assert_eq!(answer.status, 200);
        assert_eq!(text(answer), want("POST", &format!("/n{n}"), n));
        let trailers = answer.trailers.as_ref().expect("the service's trailers");
        assert_eq!(trailers["x-h2c-trailer"], "done");
        assert!(answer.headers.get("x-kitepipe-error").is_none());
    }
    assert_eq!(
        backend.connections(),
        4,
        "one connection per curl, then one for all of the client's requests"
    );
}

/// gRPC end to end through a plain http kite with `backend = "h2c"`:
/// grpcio's client calls grpcio's server through the relay: a unary call
/// with trailing metadata, a server-streaming call, a client-streaming
/// call, and a call that fails with its status and details.
#[test]
fn grpc_calls_pass_through_an_h2c_kite() {
    if !require_python_module("grpc", "grpcio") {
        return;
    }
    let relay = relay();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/grpc_echo.py");
    let mut command = Command::new("python3");
    command.arg("-u").arg(&script).arg("server");
    let server = Proc::spawn("grpc-server", command);
    let port: u16 = server
        .wait_for("READY ")
        .lines()
        .find_map(|l| l.strip_prefix("READY "))
        .and_then(|p| p.trim().parse().ok())
        .expect("the gRPC server prints its port");
    let (_connector, _dir) = kite(
        &relay,
        "grpc.example.net",
        &format!("127.0.0.1:{port}"),
        "backend = \"h2c\"",
    );
    let http = relay.http.expect("relay has an HTTP port").to_string();
    check_grpc_calls(&script, &[&http, "grpc.example.net"]);
    drop(server);
}

/// Runs grpc_echo.py's client with `args` (address, authority, and the CA
/// file for TLS) and checks every call's answer, trailers and status.
fn check_grpc_calls(script: &std::path::Path, args: &[&str]) {
    let out = Command::new("python3")
        .arg(script)
        .arg("client")
        .args(args)
        .output()
        .expect("run the gRPC client");
    assert!(
        out.status.success(),
        "gRPC client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("the client prints JSON");
    assert_eq!(got["unary"], "echo:hi", "{got}");
    assert_eq!(got["unary_trailer"], "unary-hi", "{got}");
    assert_eq!(got["unary_code"], "OK", "{got}");
    assert_eq!(
        got["stream"],
        serde_json::json!(["item-0", "item-1", "item-2", "item-3", "item-4"]),
        "{got}"
    );
    assert_eq!(got["stream_trailer"], "5", "{got}");
    assert_eq!(got["stream_code"], "OK", "{got}");
    assert_eq!(got["collect"], "a+b+c", "{got}");
    assert_eq!(got["fail_code"], "PERMISSION_DENIED", "{got}");
    assert_eq!(got["fail_details"], "no entry", "{got}");
}

/// A self-signed certificate for `name` (openssl), as (cert, key) paths
/// in `dir`.
fn self_signed(dir: &TempDir, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-subj", &format!("/CN={name}"), "-addext"])
        .args([
            &format!("subjectAltName=DNS:{name}"),
            "-days",
            "1",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl is installed");
    assert!(status.success(), "openssl req failed");
    (cert, key)
}

/// gRPC through a kite whose TLS the relay terminates: the client
/// verifies the relay's certificate, gets h2 by ALPN, and the relay
/// speaks h2c to the gRPC server; unary, server-streaming,
/// client-streaming calls and an error status all pass.
#[test]
fn grpc_calls_pass_through_a_terminated_kite() {
    if !require_python_module("grpc", "grpcio") {
        return;
    }
    let dir = TempDir::new("grpc-tls");
    let (cert, key) = self_signed(&dir, "grpc.example.net");
    let tls = format!("{}:{}", path(&cert), path(&key));
    let relay = Relay::new()
        .domain(&format!("http:*.example.net:{SECRET}"))
        .args(&["--https", "127.0.0.1:0", "--tls-cert", &tls])
        .start();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/grpc_echo.py");
    let mut command = Command::new("python3");
    command.arg("-u").arg(&script).arg("server");
    let server = Proc::spawn("grpc-server", command);
    let port: u16 = server
        .wait_for("READY ")
        .lines()
        .find_map(|l| l.strip_prefix("READY "))
        .and_then(|p| p.trim().parse().ok())
        .expect("the gRPC server prints its port");
    let (_connector, _dir) = kite(
        &relay,
        "grpc.example.net",
        &format!("127.0.0.1:{port}"),
        "backend = \"h2c\"",
    );
    let https = relay.https.expect("relay has an HTTPS port").to_string();
    check_grpc_calls(&script, &[&https, "grpc.example.net", &path(&cert)]);
    drop(server);
}

/// HTTPS visitors get h2 by ALPN on a terminated kite.
#[test]
fn https_visitors_negotiate_h2_on_a_terminated_kite() {
    let dir = TempDir::new("h2-tls");
    let (cert, key) = self_signed(&dir, "h2.example.net");
    let tls = format!("{}:{}", path(&cert), path(&key));
    let relay = Relay::new()
        .domain(&format!("http:*.example.net:{SECRET}"))
        .args(&["--https", "127.0.0.1:0", "--tls-cert", &tls])
        .start();
    let backend = Backend::start("http");
    let (_connector, _dir) = kite(&relay, "h2.example.net", &backend.addr(), "");
    let https = relay.https.expect("relay has an HTTPS port");
    let resolve = format!("h2.example.net:{}:127.0.0.1", https.port());
    let (code, out, err) = curl(&[
        "--http2",
        "-v",
        "--cacert",
        &path(&cert),
        "--resolve",
        &resolve,
        &format!("https://h2.example.net:{}/", https.port()),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, b"hello from backend\n");
    assert!(err.contains("ALPN: server accepted h2"), "{err}");
    assert!(err.contains("< HTTP/2 200"), "{err}");
    // A request for another name than the one the TLS connection was
    // opened for is misdirected, as on the HTTP/1 path.
    let (code, _, err) = curl(&[
        "--http2",
        "-v",
        "--cacert",
        &path(&cert),
        "--resolve",
        &resolve,
        "-H",
        "Host: other.example.net",
        &format!("https://h2.example.net:{}/", https.port()),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("< HTTP/2 421"), "{err}");
}

/// A small h2c server (hyper, prior knowledge) on 127.0.0.1: answers every
/// request with one line naming what it got, and a trailer
/// `x-h2c-trailer: done`; counts the connections it accepted.
struct H2cBackend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl H2cBackend {
    fn start() -> H2cBackend {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        // The thread lives as long as the test process.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((sock, _)) = listener.accept().await else {
                        continue;
                    };
                    count.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(async move {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(sock), service_fn(answer))
                            .await;
                    });
                }
            });
        });
        H2cBackend { addr, accepted }
    }

    fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

type TrailersBody = http_body_util::combinators::WithTrailers<
    Full<Bytes>,
    std::future::Ready<Option<Result<hyper::HeaderMap, Infallible>>>,
>;

async fn answer(req: Request<Incoming>) -> Result<Response<TrailersBody>, Infallible> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string()
    };
    let head = format!(
        "h2c {} {} {:?} authority={} xff={} proto={}",
        req.method(),
        req.uri().path_and_query().map_or("", |p| p.as_str()),
        req.version(),
        req.uri().authority().map_or("-", |a| a.as_str()),
        header("x-forwarded-for"),
        header("x-forwarded-proto"),
    );
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let len = body.map_or(0, |b| b.len());
    let mut trailers = hyper::HeaderMap::new();
    trailers.insert(
        "x-h2c-trailer",
        hyper::header::HeaderValue::from_static("done"),
    );
    let body = Full::new(Bytes::from(format!("{head} body={len}")))
        .with_trailers(std::future::ready(Some(Ok(trailers))));
    Ok(Response::new(body))
}
