//! `--ready-json` (env `KITEPIPE_READY_JSON`): one JSON object per line on
//! stdout each time a node's readiness changes, for programs that start
//! kitepipe and must know when (and where) it serves: tests, supervisors,
//! scripts. Log lines are for people and change wording; these lines are a
//! contract. Every line is an object whose `"ready"` field names its kind:
//!
//! ```text
//! {"ready":"relay","fingerprint":"SHA256:...","listen":["127.0.0.1:8443"],"http":["127.0.0.1:8080"],"https":[],"gateway":"127.0.0.1:7070","admin":"127.0.0.1:4040"}
//! {"ready":"connector","gateway":"127.0.0.1:7071","admin":null}
//! {"ready":"link","index":0,"relay":"relay.example.net:8443","state":"up","kites":[{"kite":"http:blog.example.net","public":"http://blog.example.net"}]}
//! {"ready":"link","index":0,"relay":"relay.example.net:8443","state":"withdrawn","kites":[]}
//! {"ready":"link","index":0,"relay":"relay.example.net:8443","state":"down"}
//! {"ready":"demo","link":"127.0.0.1:8443","http":"127.0.0.1:8080","tcp_port":9000,"fingerprint":"SHA256:...","relay_gateway":null,"connector_gateway":null}
//! ```
//!
//! A relay prints its line once its listeners are bound (a listener serving
//! several roles appears under each). A connector prints its line at start,
//! then one `link` line per change of each relay's link (`index` in the
//! order relays were given): `up` each time the relay confirms a
//! registration (a new link, or a link that dropped and came back faster
//! than this watcher woke up, or kites a reload changed or added),
//! `withdrawn` when the relay takes kites back or a reload removed some,
//! on a link that stays up, `down` when the link is lost. The lines follow
//! the link's state as a watcher sees it, not every event: a link the
//! relay closes as soon as it registered (every kite refused) may show as
//! nothing at all; the log says why. Addresses are the bound ones (port 0
//! filled in); `gateway` is `"unix:PATH"` for a unix socket and `null` when
//! there is none; `admin` is the admin server's address (`--admin`), or
//! `null`.

use std::sync::atomic::{AtomicBool, Ordering};

use kitepipe::connector::{Connector, LinkState};
use kitepipe::relay::Relay;
use serde_json::{Value, json};

/// Whether `--ready-json` was given; set once in `main`.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns the ready lines on (`--ready-json`); they are off by default.
pub(crate) fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Prints the relay's line: its bound listeners, gateway and fingerprint.
pub(crate) fn relay(relay: &Relay) {
    if !enabled() {
        return;
    }
    let listeners = relay.listeners();
    let addrs = |role: fn(&kitepipe::relay::BoundListener) -> bool| -> Vec<String> {
        listeners
            .iter()
            .filter(|l| role(l))
            .map(|l| l.addr.to_string())
            .collect()
    };
    print(json!({
        "ready": "relay",
        "fingerprint": relay.fingerprint().to_string(),
        "listen": addrs(|l| l.roles.link),
        "http": addrs(|l| l.roles.http),
        "https": addrs(|l| l.roles.https),
        "gateway": relay.gateway(),
        "admin": relay.admin_addr().map(|addr| addr.to_string()),
    }));
}

/// Prints the connector's line, and starts watching each relay's link
/// (`relays`: their addresses, in config order) to print its changes.
/// The watchers end with the connector (when its link states drop).
pub(crate) fn connector(connector: &Connector, relays: Vec<String>) {
    if !enabled() {
        return;
    }
    print(json!({
        "ready": "connector",
        "gateway": connector.gateway(),
        "admin": connector.admin_addr().map(|addr| addr.to_string()),
    }));
    for (index, relay) in relays.into_iter().enumerate() {
        let Some(mut state) = connector.watch(index) else {
            continue;
        };
        // Detached: it ends by itself when the connector drops the sender,
        // and holds nothing the shutdown must wait for.
        tokio::spawn(async move {
            let mut last = LinkState::Down;
            while state.changed().await.is_ok() {
                let now = state.borrow_and_update().clone();
                // Every failed attempt says "down" again: not a change.
                if !(now == LinkState::Down && last == LinkState::Down) {
                    print(link_line(index, &relay, &last, &now));
                }
                last = now;
            }
        });
    }
}

/// Prints the demo's line once its relay and connector are up.
pub(crate) fn demo(info: &kitepipe::demo::DemoInfo) {
    if !enabled() {
        return;
    }
    print(json!({
        "ready": "demo",
        "link": info.link_addr.to_string(),
        "http": info.http_addr.to_string(),
        "tcp_port": info.tcp_port,
        "fingerprint": info.fingerprint.to_string(),
        "relay_gateway": info.relay_gateway.map(|a| a.to_string()),
        "connector_gateway": info.connector_gateway.map(|a| a.to_string()),
    }));
}

/// The line for a change of one link's state from `last` to `now`.
fn link_line(index: usize, relay: &str, last: &LinkState, now: &LinkState) -> Value {
    let mut line = json!({"ready": "link", "index": index, "relay": relay});
    match now {
        LinkState::Down => line["state"] = "down".into(),
        LinkState::Up(kites) => {
            // Fewer kites on a link that was up, and no new ones: the relay
            // withdrew some. Anything else is a (re)registration.
            let withdrawn = match last {
                LinkState::Up(before) => {
                    kites.len() < before.len() && kites.iter().all(|k| before.contains(k))
                }
                LinkState::Down => false,
            };
            line["state"] = if withdrawn { "withdrawn" } else { "up" }.into();
            line["kites"] = kites
                .iter()
                .map(|(kite, public)| json!({"kite": kite.to_string(), "public": public}))
                .collect();
        }
    }
    line
}

/// One line on stdout (line-buffered, so it leaves at once), with
/// `"ready"` first whatever the order of `line`'s other fields.
fn print(line: Value) {
    let Value::Object(mut fields) = line else {
        unreachable!("every ready line is built as an object above");
    };
    let kind = fields.remove("ready").unwrap_or(Value::Null);
    let rest = Value::Object(fields).to_string();
    match rest.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
        Some("") | None => println!("{{\"ready\":{kind}}}"),
        Some(rest) => println!("{{\"ready\":{kind},{rest}}}"),
    }
}
