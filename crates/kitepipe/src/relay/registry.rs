//! The kite registry: which links serve which kites, and the balancing
//! between them.
//!
//! Invariant: a kite's backends are exactly the live links that registered
//! it. A link is added once its connector said hello and removed when it
//! closes; a new link with the same connector instance replaces the old one
//! at once (the old one is closed with [`LinkClosed::Replaced`]).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Mutex;

use kitepipe_proto::kite::{self, KiteProto, KiteRef};

use crate::link::{LinkClosed, Mux};

/// Identifies a link within one relay process.
pub(crate) type LinkId = u64;

/// A link able to serve a kite.
#[derive(Clone, Debug)]
pub(crate) struct Backend {
    pub(crate) link: LinkId,
    pub(crate) mux: Mux,
    pub(crate) node: String,
    /// The kite as registered (a pattern for wildcard kites).
    pub(crate) kite: KiteRef,
}

/// Result of routing a visitor.
#[derive(Debug)]
pub(crate) enum Lookup {
    /// Backends to try, in balancing order.
    Found(Vec<Backend>),
    /// The name was served before but no link serves it now.
    Offline,
    /// No kite of that name was ever registered.
    Unknown,
}

#[derive(Default)]
pub(crate) struct Registry {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next_link: LinkId,
    links: HashMap<LinkId, LinkEntry>,
    instances: HashMap<String, LinkId>,
    /// Key: (protocol, name or pattern, port for TCP).
    kites: HashMap<(KiteProto, String, u16), KiteEntry>,
    /// TCP port -> kite name bound to it.
    tcp_ports: HashMap<u16, String>,
    /// Every (protocol, name) ever registered: these are "offline", not "unknown".
    known: HashSet<(KiteProto, String, u16)>,
}

struct LinkEntry {
    instance: String,
    node: String,
    mux: Mux,
    kites: Vec<(KiteProto, String, u16)>,
}

#[derive(Default)]
struct KiteEntry {
    backends: Vec<Backend>,
    next: usize,
}

impl Registry {
    /// Adds a link; closes and forgets an older link of the same connector instance.
    pub(crate) fn add_link(
        &self,
        instance: &str,
        node: &str,
        mux: Mux,
        peer: SocketAddr,
    ) -> LinkId {
        let replaced = {
            let mut inner = lock(&self.inner);
            inner.next_link += 1;
            let id = inner.next_link;
            let old = inner.instances.insert(instance.to_string(), id);
            let old_mux = old.and_then(|old| inner.remove_link(old));
            inner.links.insert(
                id,
                LinkEntry {
                    instance: instance.to_string(),
                    node: node.to_string(),
                    mux,
                    kites: Vec::new(),
                },
            );
            (id, old_mux)
        };
        if let Some(old) = replaced.1 {
            tracing::info!(node, %peer, "connector came back: replacing its previous link");
            old.close(LinkClosed::Replaced);
        }
        replaced.0
    }

    /// Removes a link and its kites (no-op if already replaced).
    pub(crate) fn remove_link(&self, id: LinkId) {
        let mut inner = lock(&self.inner);
        if let Some(entry) = inner.links.get(&id)
            && inner.instances.get(&entry.instance) == Some(&id)
        {
            let instance = entry.instance.clone();
            inner.instances.remove(&instance);
        }
        inner.remove_link(id);
    }

    /// The kite name bound to a TCP port, if any.
    pub(crate) fn tcp_port_owner(&self, port: u16) -> Option<String> {
        lock(&self.inner).tcp_ports.get(&port).cloned()
    }

    /// Adds `kite` to the backends of link `id`. Returns false if the link is gone.
    pub(crate) fn add_kite(&self, id: LinkId, kite: &KiteRef) -> bool {
        let mut inner = lock(&self.inner);
        let Some(link) = inner.links.get_mut(&id) else {
            return false;
        };
        let key = (kite.proto, kite.name.clone(), kite.port);
        if link.kites.contains(&key) {
            return true;
        }
        link.kites.push(key.clone());
        let backend = Backend {
            link: id,
            mux: link.mux.clone(),
            node: link.node.clone(),
            kite: kite.clone(),
        };
        if kite.proto == KiteProto::Tcp {
            inner.tcp_ports.insert(kite.port, kite.name.clone());
        }
        inner.known.insert(key.clone());
        inner.kites.entry(key).or_default().backends.push(backend);
        true
    }

    /// Routes a visitor by protocol and host name (exact names first, then
    /// the most specific wildcard).
    pub(crate) fn lookup_name(&self, proto: KiteProto, host: &str) -> Lookup {
        let mut inner = lock(&self.inner);
        let mut candidates = vec![host.to_string()];
        let mut rest = host;
        while let Some((_, parent)) = rest.split_once('.') {
            candidates.push(format!("*.{parent}"));
            rest = parent;
        }
        for name in &candidates {
            if !kite::name_matches(name, host) {
                continue;
            }
            let key = (proto, name.clone(), 0);
            if let Some(entry) = inner.kites.get_mut(&key)
                && !entry.backends.is_empty()
            {
                return Lookup::Found(entry.rotate());
            }
        }
        let known = candidates
            .iter()
            .any(|name| inner.known.contains(&(proto, name.clone(), 0)));
        if known {
            Lookup::Offline
        } else {
            Lookup::Unknown
        }
    }

    /// Routes a visitor of a TCP kite by public port.
    pub(crate) fn lookup_port(&self, port: u16) -> Lookup {
        let mut inner = lock(&self.inner);
        let Some(name) = inner.tcp_ports.get(&port).cloned() else {
            return Lookup::Unknown;
        };
        match inner.kites.get_mut(&(KiteProto::Tcp, name, port)) {
            Some(entry) if !entry.backends.is_empty() => Lookup::Found(entry.rotate()),
            _ => Lookup::Offline,
        }
    }

    /// Number of live links.
    #[cfg(test)]
    pub(crate) fn link_count(&self) -> usize {
        lock(&self.inner).links.len()
    }
}

impl Inner {
    /// Forgets a link and its backends; returns its mux.
    fn remove_link(&mut self, id: LinkId) -> Option<Mux> {
        let entry = self.links.remove(&id)?;
        for key in &entry.kites {
            if let Some(kite) = self.kites.get_mut(key) {
                kite.backends.retain(|b| b.link != id);
            }
        }
        Some(entry.mux)
    }
}

impl KiteEntry {
    /// Backends starting at the round-robin cursor; advances the cursor.
    fn rotate(&mut self) -> Vec<Backend> {
        let n = self.backends.len();
        let start = self.next % n;
        self.next = self.next.wrapping_add(1);
        (0..n)
            .map(|i| self.backends[(start + i) % n].clone())
            .collect()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::link::{MuxConfig, Side};

    fn mux(tracker: &TaskTracker) -> Mux {
        let (a, _b) = tokio::io::duplex(64);
        std::mem::forget(_b);
        Mux::start(
            a,
            BytesMut::new(),
            Side::Relay,
            &MuxConfig::default(),
            tracker,
            CancellationToken::new(),
        )
        .0
    }

    fn kite(spec: &str) -> KiteRef {
        KiteRef::parse(spec).unwrap()
    }

    fn peer() -> SocketAddr {
        "127.0.0.1:1".parse().unwrap()
    }

    #[tokio::test]
    async fn routes_exact_then_most_specific_wildcard() {
        let tracker = TaskTracker::new();
        let registry = Registry::default();
        let a = registry.add_link("a", "a", mux(&tracker), peer());
        registry.add_kite(a, &kite("http:blog.example.net"));
        registry.add_kite(a, &kite("http:*.example.net"));
        registry.add_kite(a, &kite("http:*.shop.example.net"));
        let routed = |host: &str| match registry.lookup_name(KiteProto::Http, host) {
            Lookup::Found(b) => b[0].kite.name.clone(),
            other => format!("{other:?}"),
        };
        assert_eq!(routed("blog.example.net"), "blog.example.net");
        assert_eq!(routed("x.example.net"), "*.example.net");
        assert_eq!(routed("a.shop.example.net"), "*.shop.example.net");
        assert_eq!(routed("example.net"), "Unknown");
        assert!(matches!(
            registry.lookup_name(KiteProto::Https, "blog.example.net"),
            Lookup::Unknown
        ));
    }

    #[tokio::test]
    async fn balances_and_fails_over_then_reports_offline() {
        let tracker = TaskTracker::new();
        let registry = Registry::default();
        let a = registry.add_link("a", "node-a", mux(&tracker), peer());
        let b = registry.add_link("b", "node-b", mux(&tracker), peer());
        registry.add_kite(a, &kite("http:blog.example.net"));
        registry.add_kite(b, &kite("http:blog.example.net"));
        let first =
            |registry: &Registry| match registry.lookup_name(KiteProto::Http, "blog.example.net") {
                Lookup::Found(b) => b.iter().map(|b| b.node.clone()).collect::<Vec<_>>(),
                other => panic!("{other:?}"),
            };
        let one = first(&registry);
        let two = first(&registry);
        assert_eq!(one.len(), 2);
        assert_ne!(one[0], two[0], "round robin");
        registry.remove_link(a);
        assert_eq!(first(&registry), vec!["node-b".to_string()]);
        registry.remove_link(b);
        assert!(matches!(
            registry.lookup_name(KiteProto::Http, "blog.example.net"),
            Lookup::Offline
        ));
    }

    #[tokio::test]
    async fn a_returning_instance_replaces_its_stale_link() {
        let tracker = TaskTracker::new();
        let registry = Registry::default();
        let old_mux = mux(&tracker);
        let old = registry.add_link("same", "laptop", old_mux.clone(), peer());
        registry.add_kite(old, &kite("tcp:db.example.net:15432"));
        let new = registry.add_link("same", "laptop", mux(&tracker), peer());
        assert!(matches!(registry.lookup_port(15432), Lookup::Offline));
        registry.add_kite(new, &kite("tcp:db.example.net:15432"));
        assert!(
            matches!(registry.lookup_port(15432), Lookup::Found(b) if b.len() == 1 && b[0].link == new)
        );
        assert_eq!(old_mux.closed().await, LinkClosed::Replaced);
        // The stale link's own cleanup must not remove the new one.
        registry.remove_link(old);
        assert_eq!(registry.link_count(), 1);
        assert!(!registry.add_kite(old, &kite("http:x.example.net")));
    }
}
