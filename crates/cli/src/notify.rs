//! systemd's readiness protocol (sd_notify): with `Type=notify` in a unit,
//! systemd hands the service `$NOTIFY_SOCKET`, a unix datagram socket, and
//! considers it started when it receives `READY=1` there. kitepipe sends:
//!
//! - `READY=1` and a `STATUS=` line when a relay's listeners are bound (the
//!   moment of its `--ready-json` line, crates/cli/src/ready.rs), or when a
//!   connector's first link is up (its first `"state":"up"` line);
//! - `STATUS=` again each time a connector's link goes up or down (shown by
//!   `systemctl status`);
//! - `STOPPING=1` when a signal starts the shutdown.
//!
//! Without `$NOTIFY_SOCKET` (not started by systemd) nothing is sent. A
//! failed send is logged and otherwise ignored: readiness is a courtesy to
//! the supervisor, never a reason to stop serving. The protocol is one
//! datagram per message, `KEY=value` lines; a socket name starting with `@`
//! is in the abstract namespace (sd_notify(3)).

use std::os::unix::net::UnixDatagram;

use kitepipe::connector::{Connector, LinkState};

/// The variable systemd sets to the socket's path.
const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `message` (newline-separated `KEY=value` lines) to
/// `$NOTIFY_SOCKET`, if set.
pub(crate) fn send(message: &str) {
    let Some(path) = std::env::var_os(NOTIFY_SOCKET) else {
        return;
    };
    if let Err(err) = send_to(&path, message) {
        tracing::warn!(%err, socket = ?path, "cannot tell systemd our state (NOTIFY_SOCKET)");
    }
}

/// Tells systemd the relay serves: its listeners are bound. The status
/// names them and the certificate's fingerprint (what connectors pin), so
/// `systemctl status` shows both.
pub(crate) fn relay_ready(relay: &kitepipe::relay::Relay) {
    let addrs: Vec<String> = relay
        .listeners()
        .iter()
        .map(|l| l.addr.to_string())
        .collect();
    send(&format!(
        "READY=1\nSTATUS=serving on {}; fingerprint {}",
        status_text(&addrs.join(", ")),
        relay.fingerprint()
    ));
}

/// Tells systemd the connector is ready when its first link comes up, and
/// keeps `STATUS=` up to date with each link's state (`relays`: their
/// addresses, in config order). The watchers end with the connector.
pub(crate) fn connector(connector: &Connector, relays: Vec<String>) {
    if std::env::var_os(NOTIFY_SOCKET).is_none() {
        return;
    }
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for (index, relay) in relays.into_iter().enumerate() {
        let Some(mut state) = connector.watch(index) else {
            continue;
        };
        let ready = ready.clone();
        // Detached like ready.rs's watchers: it ends by itself when the
        // connector drops the sender, and holds nothing the shutdown must
        // wait for.
        tokio::spawn(async move {
            let mut last_up = false;
            while state.changed().await.is_ok() {
                let status = match &*state.borrow_and_update() {
                    LinkState::Up(kites) => {
                        last_up = true;
                        format!("link to {relay} up, {} kites", kites.len())
                    }
                    // Every failed attempt says "down" again: not a change.
                    LinkState::Down if !last_up => continue,
                    LinkState::Down => {
                        last_up = false;
                        format!("link to {relay} down, reconnecting")
                    }
                };
                let status = status_text(&status);
                if last_up && !ready.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    send(&format!("READY=1\nSTATUS={status}"));
                } else {
                    send(&format!("STATUS={status}"));
                }
            }
        });
    }
}

/// Tells systemd the shutdown has begun.
pub(crate) fn stopping() {
    send("STOPPING=1\nSTATUS=shutting down");
}

/// `text` made safe for one `STATUS=` line: the protocol separates
/// messages by newlines, so none may appear inside (relay addresses come
/// from the operator's config, but a line break must not forge a
/// `READY=1`).
fn status_text(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Sends one datagram to the socket `path` (`@name` for an abstract one).
fn send_to(path: &std::ffi::OsStr, message: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let socket = UnixDatagram::unbound()?;
    let bytes = path.as_bytes();
    match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(message.as_bytes(), &addr)?;
        }
        None => {
            socket.send_to(message.as_bytes(), path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_text_has_no_line_breaks() {
        assert_eq!(status_text("a\nREADY=1\r"), "a READY=1 ");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("kitepipe-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        send_to(std::ffi::OsStr::new(&format!("@{name}")), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
