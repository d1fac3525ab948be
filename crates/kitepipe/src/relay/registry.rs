//! The kite registry: which links serve which kites, and the balancing
//! between them.
//!
//! Invariant: a kite's backends are exactly the live links that registered
//! it. A link is added once its connector said hello and removed when it
//! closes; a new link with the same connector instance and the same proven
//! identity (certificate name, or proven node name) replaces the old one at
//! once (the old one is closed with [`LinkClosed::Replaced`]); links of
//! other identities presenting the same instance coexist.
//!
//! Only proven node names route (`lookup_node`, `lookup_remote`): a hello's
//! name is a claim until the link's certificate or a node proof backs it.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use kitepipe_proto::kite::{self, KiteProto, KiteRef};
use kitepipe_proto::message::RemoteClass;
use kitepipe_proto::policy::VisitorPolicy;
use kitepipe_proto::remote::AgentHello;

use super::http_policy::HttpRules;
use super::link_identity::LinkIdentity;
use crate::link::{LinkClosed, Mux};
use crate::metrics::{KiteMetrics, Metrics};
use crate::sync::lock;

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
    /// Who may visit through this link, from its claim (each claim's
    /// policy applies to the visitors routed to its link).
    pub(crate) policy: Arc<VisitorPolicy>,
    /// The HTTP-level rules from its claim (http kites), with their state.
    pub(crate) http: Arc<HttpRules>,
    /// The kite's counters (resolved once, at registration).
    pub(crate) metrics: KiteMetrics,
    /// A PageKite raw kite: reached only by `CONNECT name:port` on the
    /// HTTP port, no public port bound (see `relay::pagekite`).
    pub(crate) connect_only: bool,
}

/// What authorized a link to serve a kite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grant {
    /// A proof of a domain's shared secret.
    Secret,
    /// The link's certificate identity, under the relay's rules; checked
    /// again whenever the rules change.
    Identity,
}

/// A link with a certificate identity, as reloads see it.
#[derive(Clone, Debug)]
pub(crate) struct IdentityLink {
    pub(crate) link: LinkId,
    pub(crate) mux: Mux,
    pub(crate) identity: Arc<LinkIdentity>,
    /// The kites it serves by [`Grant::Identity`].
    pub(crate) kites: Vec<KiteRef>,
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
    /// Woken whenever a link is added, for events waiting for a node.
    links_changed: tokio::sync::Notify,
    /// The relay's counters (the admin server shows them).
    pub(crate) metrics: Metrics,
}

/// A kite as the admin server's status shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct KiteView {
    /// Name (or wildcard pattern).
    pub(crate) name: String,
    /// `http`, `https` or `tcp`.
    pub(crate) proto: String,
    /// Public port of a TCP kite.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) port: Option<u16>,
    /// Whether a link serves it now.
    pub(crate) online: bool,
    /// Nodes serving it.
    pub(crate) backends: Vec<String>,
}

/// The caller name handlers see for a link whose node name is not proven.
pub(crate) const UNPROVEN_CALLER: &str = "unproven";

/// Who is behind a link, as events see it.
#[derive(Clone, Debug)]
pub(crate) struct LinkCaller {
    /// The proven node name (the certificate's name when there is one), or
    /// [`UNPROVEN_CALLER`].
    pub(crate) node: String,
    /// The certificate identity, if the connector presented one.
    pub(crate) identity: Option<Arc<LinkIdentity>>,
    /// Whether the link holds a kite proven with a domain secret.
    pub(crate) secret: bool,
}

/// Most node names remembered as "seen" (so an event for a node that left
/// waits for it as "offline" rather than failing as "unknown"). Only proven
/// names are remembered, but a secret holder can prove any name under its
/// domain: past this many the relay stops remembering new ones (they are
/// "unknown" once gone, the only cost). 64 Ki names of up to 253 bytes is
/// at most ~20 MiB, far more nodes than one relay serves.
pub(crate) const MAX_NODES_SEEN: usize = 64 * 1024;

/// Most kites remembered as "known" (visitors of a kite that went away get
/// "offline" rather than "unknown"). A secret holder can register any
/// number of names under its domain, one after the other; past this many
/// new ones are not remembered (they are "unknown" once gone). Same sizing
/// as [`MAX_NODES_SEEN`].
pub(crate) const MAX_KNOWN_KITES: usize = 64 * 1024;

/// Most kites listed in the admin server's status (the counters of all
/// of them are in `/metrics`, bounded by the metrics room).
pub(crate) const MAX_KITE_VIEWS: usize = 4096;

/// Result of looking up a node for an event.
#[derive(Debug)]
pub(crate) enum NodeLookup {
    /// Its most recent live link.
    Found(Mux),
    /// The node linked before but has no link now.
    Offline,
    /// No node of that name ever linked.
    Unknown,
}

#[derive(Default)]
struct Inner {
    next_link: LinkId,
    links: HashMap<LinkId, LinkEntry>,
    /// (proven identity, instance) -> its current link. Only links with a
    /// proven identity are here, so one per link at most.
    instances: HashMap<(ProvenBy, String), LinkId>,
    /// Key: (protocol, name or pattern, port for TCP).
    kites: HashMap<(KiteProto, String, u16), KiteEntry>,
    /// TCP port -> kite name bound to it.
    tcp_ports: HashMap<u16, String>,
    /// Every (protocol, name) ever registered: these are "offline", not "unknown".
    known: HashSet<(KiteProto, String, u16)>,
    /// Every proven node name that ever linked (lowercase): "offline", not
    /// "unknown". At most [`MAX_NODES_SEEN`].
    nodes_seen: HashSet<String>,
}

/// What proved a link's node name: a certificate or a node proof of a
/// domain secret. Only a link proven the same way, with the same name,
/// replaces another of the same instance.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum ProvenBy {
    Certificate(String),
    Secret(String),
}

struct LinkEntry {
    instance: String,
    /// The node name as the hello claimed it (for logs only).
    node: String,
    /// The proven node name (lowercase), the only one that routes.
    proven: Option<ProvenBy>,
    mux: Mux,
    kites: Vec<(KiteProto, String, u16)>,
    /// The connector's verified certificate identity, if it presented one.
    identity: Option<Arc<LinkIdentity>>,
    /// The subset of `kites` granted by the identity rather than a secret.
    identity_kites: HashSet<(KiteProto, String, u16)>,
    /// What the connector offers for remote operations (`--allow-remote`).
    remote: Option<RemoteOffer>,
}

/// What a link holds by a domain secret, as a reload re-judges it.
#[derive(Clone, Debug)]
pub(crate) struct SecretGrants {
    pub(crate) link: LinkId,
    pub(crate) mux: Mux,
    /// Kites granted by a secret.
    pub(crate) kites: Vec<KiteRef>,
    /// The node name proven with a secret.
    pub(crate) node: Option<String>,
}

/// What a connector accepts for remote operations, from its hello.
#[derive(Clone, Debug)]
pub(crate) struct RemoteOffer {
    /// Kinds of operations it accepts.
    pub(crate) classes: Vec<RemoteClass>,
    /// The connector as an agent, handed to remote clients as its hello.
    pub(crate) agent: AgentHello,
}

#[derive(Default)]
struct KiteEntry {
    backends: Vec<Backend>,
    next: usize,
}

/// The kite names that may serve `host`, in routing order: the exact name,
/// then the wildcards from the most specific out (those `host` matches).
fn name_candidates(host: &str) -> Vec<String> {
    let mut candidates = vec![host.to_string()];
    let mut rest = host;
    while let Some((_, parent)) = rest.split_once('.') {
        candidates.push(format!("*.{parent}"));
        rest = parent;
    }
    candidates.retain(|name| kite::name_matches(name, host));
    candidates
}

impl Registry {
    /// Adds a link (its node name `node` only a claim, unless `identity`
    /// proves it); closes and forgets an older link of the same connector
    /// instance with the same certificate identity.
    pub(crate) fn add_link(
        &self,
        instance: &str,
        node: &str,
        mux: Mux,
        peer: SocketAddr,
        identity: Option<Arc<LinkIdentity>>,
        remote: Option<RemoteOffer>,
    ) -> LinkId {
        let proven = identity
            .as_ref()
            .map(|identity| ProvenBy::Certificate(identity.name.to_ascii_lowercase()));
        let (id, replaced) = {
            let mut inner = lock(&self.inner);
            inner.next_link += 1;
            let id = inner.next_link;
            inner.links.insert(
                id,
                LinkEntry {
                    instance: instance.to_string(),
                    node: node.to_string(),
                    proven: None,
                    mux,
                    kites: Vec::new(),
                    identity,
                    identity_kites: HashSet::new(),
                    remote,
                },
            );
            let replaced = proven.and_then(|proven| inner.prove(id, proven));
            (id, replaced)
        };
        if let Some(old) = replaced {
            tracing::info!(node, %peer, "connector came back: replacing its previous link");
            old.close(LinkClosed::Replaced);
        }
        self.links_changed.notify_waiters();
        id
    }

    /// Records that link `id` proved node name `name` with a domain secret;
    /// closes an older link of the same instance that proved the same name.
    /// False if the link is gone.
    pub(crate) fn prove_node(&self, id: LinkId, name: &str) -> bool {
        let replaced = {
            let mut inner = lock(&self.inner);
            if !inner.links.contains_key(&id) {
                return false;
            }
            inner.prove(id, ProvenBy::Secret(name.to_ascii_lowercase()))
        };
        if let Some(old) = replaced {
            tracing::info!(
                node = name,
                "connector came back: replacing its previous link"
            );
            old.close(LinkClosed::Replaced);
        }
        self.links_changed.notify_waiters();
        true
    }

    /// Closes older links of the same connector instance that neither a
    /// certificate nor a node proof identifies, and whose every kite link
    /// `id` (itself unidentified and unproven) now holds by a secret. A
    /// connector whose name cannot be proven still replaces its stale link
    /// at once when it comes back (after a NAT reset the relay has not
    /// noticed), and only a link holding every right the old one had can
    /// do so: its proven kites are its identity.
    pub(crate) fn replace_by_kites(&self, id: LinkId) {
        let replaced: Vec<Mux> = {
            let mut inner = lock(&self.inner);
            let Some(new) = inner.links.get(&id) else {
                return;
            };
            if new.identity.is_some() || new.proven.is_some() || new.kites.is_empty() {
                return;
            }
            let held: HashSet<&(KiteProto, String, u16)> = new.kites.iter().collect();
            let stale: Vec<LinkId> = inner
                .links
                .iter()
                .filter(|(old_id, old)| {
                    **old_id != id
                        && old.instance == new.instance
                        && old.identity.is_none()
                        && old.proven.is_none()
                        && !old.kites.is_empty()
                        && old.kites.iter().all(|kite| held.contains(kite))
                })
                .map(|(old_id, _)| *old_id)
                .collect();
            stale
                .into_iter()
                .filter_map(|old| inner.remove_link(old))
                .collect()
        };
        for old in &replaced {
            tracing::info!(
                "connector came back: replacing its previous link (same instance, same kites)"
            );
            old.close(LinkClosed::Replaced);
        }
        if !replaced.is_empty() {
            self.links_changed.notify_waiters();
        }
    }

    /// Whether `name` is the name of a live link's certificate identity
    /// (case-insensitive): such names are never granted to secret claims.
    pub(crate) fn is_identity_name(&self, name: &str) -> bool {
        lock(&self.inner).links.values().any(|link| {
            link.identity
                .as_ref()
                .is_some_and(|identity| identity.name.eq_ignore_ascii_case(name))
        })
    }

    /// The live link proven as node `node` (case-insensitive): a link whose
    /// certificate names it before one that proved it with a secret, then
    /// the most recent.
    fn find_proven<'a>(inner: &'a Inner, node: &str) -> Option<&'a LinkEntry> {
        inner
            .links
            .iter()
            .filter(|(_, link)| !link.mux.is_closed())
            .filter_map(|(id, link)| {
                let certificate = match &link.proven {
                    Some(ProvenBy::Certificate(name)) if name.eq_ignore_ascii_case(node) => true,
                    Some(ProvenBy::Secret(name)) if name.eq_ignore_ascii_case(node) => false,
                    _ => return None,
                };
                Some(((certificate, *id), link))
            })
            .max_by_key(|(key, _)| *key)
            .map(|(_, link)| link)
    }

    /// The link of node `node`: only a proven name routes (see
    /// [`Registry::find_proven`]).
    pub(crate) fn lookup_node(&self, node: &str) -> NodeLookup {
        let inner = lock(&self.inner);
        match Self::find_proven(&inner, node) {
            Some(link) => NodeLookup::Found(link.mux.clone()),
            None if inner.nodes_seen.contains(&node.to_ascii_lowercase()) => NodeLookup::Offline,
            None => NodeLookup::Unknown,
        }
    }

    /// The link proven as node `node` and what it offers for remote
    /// operations.
    pub(crate) fn lookup_remote(&self, node: &str) -> Option<(Mux, Option<RemoteOffer>)> {
        let inner = lock(&self.inner);
        Self::find_proven(&inner, node).map(|link| (link.mux.clone(), link.remote.clone()))
    }

    /// Resolves after the next link is added. Create it before looking up,
    /// so no link added in between is missed; cancel-safe.
    pub(crate) fn link_added(&self) -> tokio::sync::futures::Notified<'_> {
        self.links_changed.notified()
    }

    /// Who is behind link `id`, if it is live.
    pub(crate) fn caller(&self, id: LinkId) -> Option<LinkCaller> {
        let inner = lock(&self.inner);
        let link = inner.links.get(&id)?;
        Some(LinkCaller {
            node: match &link.proven {
                Some(ProvenBy::Certificate(name) | ProvenBy::Secret(name)) => name.clone(),
                None => UNPROVEN_CALLER.to_string(),
            },
            identity: link.identity.clone(),
            secret: link.kites.len() > link.identity_kites.len(),
        })
    }

    /// Removes a link and its kites (no-op if already replaced).
    pub(crate) fn remove_link(&self, id: LinkId) {
        let mut inner = lock(&self.inner);
        if let Some(entry) = inner.links.get(&id)
            && let Some(proven) = entry.proven.clone()
        {
            let key = (proven, entry.instance.clone());
            if inner.instances.get(&key) == Some(&id) {
                inner.instances.remove(&key);
            }
        }
        inner.remove_link(id);
    }

    /// The kite name bound to a TCP port, if any.
    pub(crate) fn tcp_port_owner(&self, port: u16) -> Option<String> {
        lock(&self.inner).tcp_ports.get(&port).cloned()
    }

    /// Forgets which kite TCP `port` belongs to, if no link serves it any
    /// more (for `tcp.rs`, closing an idle port). True if the port is free.
    pub(crate) fn release_tcp_port(&self, port: u16) -> bool {
        let mut inner = lock(&self.inner);
        let Some(name) = inner.tcp_ports.get(&port).cloned() else {
            return true;
        };
        let key = (KiteProto::Tcp, name, port);
        if inner
            .kites
            .get(&key)
            .is_some_and(|kite| !kite.backends.is_empty())
        {
            return false;
        }
        inner.tcp_ports.remove(&port);
        inner.kites.remove(&key);
        true
    }

    /// Adds `kite` to the backends of link `id`, authorized by `grant`,
    /// admitting visitors by `policy` (a claim made again replaces its
    /// policy). Returns false if the link is gone.
    pub(crate) fn add_kite(
        &self,
        id: LinkId,
        kite: &KiteRef,
        grant: Grant,
        policy: VisitorPolicy,
        http: HttpRules,
    ) -> bool {
        self.add_backend(id, kite, grant, policy, http, false)
    }

    /// Adds a PageKite raw kite (`kite.proto` TCP, `kite.port` the port
    /// its back-end asked for) to link `id`, granted by a secret: visitors
    /// reach it by `CONNECT name:port` on the HTTP port
    /// ([`Registry::lookup_connect_kite`]); no public port is bound and
    /// `tcp_ports` is not touched. False if the link is gone.
    pub(crate) fn add_connect_kite(&self, id: LinkId, kite: &KiteRef) -> bool {
        self.add_backend(
            id,
            kite,
            Grant::Secret,
            VisitorPolicy::default(),
            HttpRules::default(),
            true,
        )
    }

    /// The backends of the PageKite raw kite `host:port` (exact name,
    /// then the most specific wildcard), if one is online.
    pub(crate) fn lookup_connect_kite(&self, host: &str, port: u16) -> Option<Vec<Backend>> {
        let mut inner = lock(&self.inner);
        for name in name_candidates(host) {
            if let Some(entry) = inner.kites.get_mut(&(KiteProto::Tcp, name, port)) {
                let backends: Vec<Backend> = entry
                    .rotate()
                    .into_iter()
                    .filter(|backend| backend.connect_only)
                    .collect();
                if !backends.is_empty() {
                    return Some(backends);
                }
            }
        }
        None
    }

    fn add_backend(
        &self,
        id: LinkId,
        kite: &KiteRef,
        grant: Grant,
        policy: VisitorPolicy,
        http: HttpRules,
        connect_only: bool,
    ) -> bool {
        let mut inner = lock(&self.inner);
        let Some(link) = inner.links.get_mut(&id) else {
            return false;
        };
        let key = (kite.proto, kite.name.clone(), kite.port);
        match grant {
            Grant::Identity => link.identity_kites.insert(key.clone()),
            Grant::Secret => link.identity_kites.remove(&key),
        };
        let policy = Arc::new(policy);
        let http = Arc::new(http);
        if link.kites.contains(&key) {
            if let Some(entry) = inner.kites.get_mut(&key) {
                for backend in entry.backends.iter_mut().filter(|b| b.link == id) {
                    backend.policy = policy.clone();
                    backend.http.replace_with(http.clone());
                    backend.http = http.clone();
                }
            }
            return true;
        }
        link.kites.push(key.clone());
        let backend = Backend {
            link: id,
            mux: link.mux.clone(),
            node: link.node.clone(),
            kite: kite.clone(),
            policy,
            http,
            metrics: self.metrics.kite(&kite.name),
            connect_only,
        };
        if kite.proto == KiteProto::Tcp && !connect_only {
            inner.tcp_ports.insert(kite.port, kite.name.clone());
        }
        if inner.known.len() < MAX_KNOWN_KITES {
            inner.known.insert(key.clone());
        }
        inner.kites.entry(key).or_default().backends.push(backend);
        true
    }

    /// Every live link holding something by a domain secret: its id, mux,
    /// the kites a secret granted and the node name a secret proved.
    pub(crate) fn secret_grants(&self) -> Vec<SecretGrants> {
        let inner = lock(&self.inner);
        inner
            .links
            .iter()
            .filter_map(|(id, link)| {
                let kites: Vec<KiteRef> = link
                    .kites
                    .iter()
                    .filter(|key| !link.identity_kites.contains(*key))
                    .map(|(proto, name, port)| KiteRef {
                        proto: *proto,
                        name: name.clone(),
                        port: *port,
                    })
                    .collect();
                let node = match &link.proven {
                    Some(ProvenBy::Secret(name)) => Some(name.clone()),
                    _ => None,
                };
                (!kites.is_empty() || node.is_some()).then(|| SecretGrants {
                    link: *id,
                    mux: link.mux.clone(),
                    kites,
                    node,
                })
            })
            .collect()
    }

    /// Takes back the node name link `id` proved with a secret: it no
    /// longer routes (the rules now reserve it for certificates).
    pub(crate) fn unprove_node(&self, id: LinkId) {
        let mut inner = lock(&self.inner);
        let Some(link) = inner.links.get_mut(&id) else {
            return;
        };
        let Some(proven) = link
            .proven
            .take_if(|proven| matches!(proven, ProvenBy::Secret(_)))
        else {
            return;
        };
        let key = (proven, link.instance.clone());
        if inner.instances.get(&key) == Some(&id) {
            inner.instances.remove(&key);
        }
    }

    /// Stops serving `kites` through link `id` (they stay known, so visitors
    /// get "offline" until another link serves them). Only kites the link
    /// holds are touched, and only its own backends; returns those.
    pub(crate) fn withdraw(&self, id: LinkId, kites: &[KiteRef]) -> Vec<KiteRef> {
        let mut inner = lock(&self.inner);
        let Some(link) = inner.links.get_mut(&id) else {
            return Vec::new();
        };
        let held: HashSet<&(KiteProto, String, u16)> = link.kites.iter().collect();
        let keys: HashSet<_> = kites
            .iter()
            .map(|kite| (kite.proto, kite.name.clone(), kite.port))
            .filter(|key| held.contains(key))
            .collect();
        link.kites.retain(|key| !keys.contains(key));
        link.identity_kites.retain(|key| !keys.contains(key));
        for key in &keys {
            if let Some(entry) = inner.kites.get_mut(key) {
                entry.backends.retain(|backend| backend.link != id);
                if entry.backends.is_empty() {
                    inner.kites.remove(key);
                }
            }
        }
        keys.into_iter()
            .map(|(proto, name, port)| KiteRef { proto, name, port })
            .collect()
    }

    /// Every live link with a certificate identity.
    pub(crate) fn identity_links(&self) -> Vec<IdentityLink> {
        let inner = lock(&self.inner);
        let mut ids: Vec<LinkId> = inner
            .links
            .iter()
            .filter(|(_, link)| link.identity.is_some())
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids.into_iter()
            .filter_map(|id| inner.identity_link(id))
            .collect()
    }

    /// Link `id`, if it is live and has a certificate identity.
    pub(crate) fn identity_link(&self, id: LinkId) -> Option<IdentityLink> {
        lock(&self.inner).identity_link(id)
    }

    /// Routes a visitor by protocol and host name (exact names first, then
    /// the most specific wildcard).
    pub(crate) fn lookup_name(&self, proto: KiteProto, host: &str) -> Lookup {
        let mut inner = lock(&self.inner);
        let candidates = name_candidates(host);
        for name in &candidates {
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

    /// Every kite served now or before (at most [`MAX_KITE_VIEWS`]), and
    /// every link serving kites (node name and mux), for the status.
    pub(crate) fn snapshot(&self) -> (Vec<KiteView>, Vec<(String, Mux)>) {
        let inner = lock(&self.inner);
        let mut kites: Vec<KiteView> = inner
            .known
            .iter()
            .take(MAX_KITE_VIEWS)
            .map(|key| {
                let backends: Vec<String> = inner
                    .kites
                    .get(key)
                    .map(|entry| entry.backends.iter().map(|b| b.node.clone()).collect())
                    .unwrap_or_default();
                KiteView {
                    name: key.1.clone(),
                    proto: format!("{:?}", key.0).to_lowercase(),
                    port: (key.0 == KiteProto::Tcp).then_some(key.2),
                    online: !backends.is_empty(),
                    backends,
                }
            })
            .collect();
        kites.sort_by(|a, b| (&a.name, &a.proto).cmp(&(&b.name, &b.proto)));
        let links = inner
            .links
            .values()
            .filter(|link| !link.kites.is_empty())
            .map(|link| (link.node.clone(), link.mux.clone()))
            .collect();
        (kites, links)
    }

    /// Number of live links.
    #[cfg(test)]
    pub(crate) fn link_count(&self) -> usize {
        lock(&self.inner).links.len()
    }
}

impl Inner {
    /// Marks link `id` (present) as proven by `proven`; returns the mux of
    /// an older link of the same instance and identity, now forgotten.
    fn prove(&mut self, id: LinkId, proven: ProvenBy) -> Option<Mux> {
        let link = self.links.get_mut(&id)?;
        if link.proven.is_some() {
            return None;
        }
        link.proven = Some(proven.clone());
        let key = (proven.clone(), link.instance.clone());
        let name = match proven {
            ProvenBy::Certificate(name) | ProvenBy::Secret(name) => name,
        };
        if self.nodes_seen.len() < MAX_NODES_SEEN {
            self.nodes_seen.insert(name);
        } else if !self.nodes_seen.contains(&name) {
            tracing::debug!(node = %name, "too many node names seen; not remembering this one");
        }
        let old = self.instances.insert(key, id)?;
        self.remove_link(old)
    }

    fn identity_link(&self, id: LinkId) -> Option<IdentityLink> {
        let link = self.links.get(&id)?;
        let identity = link.identity.clone()?;
        let mut kites: Vec<KiteRef> = link
            .identity_kites
            .iter()
            .map(|(proto, name, port)| KiteRef {
                proto: *proto,
                name: name.clone(),
                port: *port,
            })
            .collect();
        kites.sort_by(|a, b| {
            (a.proto.as_str(), &a.name, a.port).cmp(&(b.proto.as_str(), &b.name, b.port))
        });
        Some(IdentityLink {
            link: id,
            mux: link.mux.clone(),
            identity,
            kites,
        })
    }

    /// Forgets a link and its backends; returns its mux.
    fn remove_link(&mut self, id: LinkId) -> Option<Mux> {
        let entry = self.links.remove(&id)?;
        for key in &entry.kites {
            if let Some(kite) = self.kites.get_mut(key) {
                kite.backends.retain(|b| b.link != id);
                // No entry outlives its last backend: names come and go.
                if kite.backends.is_empty() {
                    self.kites.remove(key);
                }
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

    /// Adds kite `spec` to link `id` with no visitor policy.
    fn add_kite(registry: &Registry, id: LinkId, spec: &str, grant: Grant) -> bool {
        registry.add_kite(
            id,
            &kite(spec),
            grant,
            VisitorPolicy::default(),
            HttpRules::default(),
        )
    }

    #[tokio::test]
    async fn routes_exact_then_most_specific_wildcard() {
        let tracker = TaskTracker::new();
        let registry = Registry::default();
        let a = registry.add_link("a", "a", mux(&tracker), peer(), None, None);
        add_kite(&registry, a, "http:blog.example.net", Grant::Secret);
        add_kite(&registry, a, "http:*.example.net", Grant::Secret);
        add_kite(&registry, a, "http:*.shop.example.net", Grant::Secret);
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
        let a = registry.add_link("a", "node-a", mux(&tracker), peer(), None, None);
        let b = registry.add_link("b", "node-b", mux(&tracker), peer(), None, None);
        add_kite(&registry, a, "http:blog.example.net", Grant::Secret);
        add_kite(&registry, b, "http:blog.example.net", Grant::Secret);
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
        let old = registry.add_link("same", "laptop", old_mux.clone(), peer(), None, None);
        assert!(registry.prove_node(old, "laptop.example.net"));
        add_kite(&registry, old, "tcp:db.example.net:15432", Grant::Secret);
        let new = registry.add_link("same", "laptop", mux(&tracker), peer(), None, None);
        // Not replaced until it proves the same identity.
        assert!(matches!(registry.lookup_port(15432), Lookup::Found(_)));
        assert!(registry.prove_node(new, "LAPTOP.example.net"));
        assert!(matches!(registry.lookup_port(15432), Lookup::Offline));
        add_kite(&registry, new, "tcp:db.example.net:15432", Grant::Secret);
        assert!(
            matches!(registry.lookup_port(15432), Lookup::Found(b) if b.len() == 1 && b[0].link == new)
        );
        assert_eq!(old_mux.closed().await, LinkClosed::Replaced);
        // The stale link's own cleanup must not remove the new one.
        registry.remove_link(old);
        assert_eq!(registry.link_count(), 1);
        assert!(!add_kite(
            &registry,
            old,
            "http:x.example.net",
            Grant::Secret
        ));
    }

    #[tokio::test]
    async fn the_same_instance_from_another_identity_replaces_nothing() {
        let tracker = TaskTracker::new();
        let registry = Registry::default();
        let laptop = Arc::new(LinkIdentity::for_tests("laptop"));
        let real_mux = mux(&tracker);
        let real = registry.add_link(
            "same",
            "laptop",
            real_mux.clone(),
            peer(),
            Some(laptop),
            None,
        );
        // A secret holder proving another name, and a stranger proving
        // nothing, with the same instance.
        let other = registry.add_link("same", "laptop", mux(&tracker), peer(), None, None);
        assert!(registry.prove_node(other, "laptop.example.net"));
        registry.add_link("same", "laptop", mux(&tracker), peer(), None, None);
        assert!(!real_mux.is_closed());
        assert_eq!(registry.link_count(), 3);
        // Only the certificate link is proven as `laptop`.
        assert!(matches!(
            registry.lookup_node("LAPTOP"),
            NodeLookup::Found(_)
        ));
        registry.remove_link(real);
        assert!(matches!(
            registry.lookup_node("laptop"),
            NodeLookup::Offline
        ));
        assert!(matches!(registry.lookup_node("never"), NodeLookup::Unknown));
        assert!(
            registry
                .caller(other)
                .is_some_and(|c| c.node == "laptop.example.net")
        );
    }

    #[tokio::test]
    async fn secret_grants_can_be_taken_back() {
        let tracker = TaskTracker::new();
        let registry = Registry::default();
        let identity = Arc::new(LinkIdentity::for_tests("laptop"));
        let a = registry.add_link("a", "laptop", mux(&tracker), peer(), Some(identity), None);
        add_kite(&registry, a, "http:laptop.example.net", Grant::Identity);
        let b = registry.add_link("b", "box", mux(&tracker), peer(), None, None);
        assert!(registry.prove_node(b, "box.example.net"));
        add_kite(&registry, b, "http:box.example.net", Grant::Secret);
        let grants = registry.secret_grants();
        assert_eq!(grants.len(), 1);
        assert_eq!(grants[0].link, b);
        assert_eq!(grants[0].node.as_deref(), Some("box.example.net"));
        assert_eq!(grants[0].kites, [kite("http:box.example.net")]);
        registry.unprove_node(b);
        assert!(matches!(
            registry.lookup_node("box.example.net"),
            NodeLookup::Offline
        ));
        // A certificate's name is not taken back this way.
        registry.unprove_node(a);
        assert!(matches!(
            registry.lookup_node("laptop"),
            NodeLookup::Found(_)
        ));
    }

    #[tokio::test]
    async fn unproven_names_route_nothing_and_are_not_remembered() {
        let tracker = TaskTracker::new();
        let registry = Registry::default();
        let id = registry.add_link("a", "laptop", mux(&tracker), peer(), None, None);
        assert!(matches!(
            registry.lookup_node("laptop"),
            NodeLookup::Unknown
        ));
        assert!(registry.lookup_remote("laptop").is_none());
        assert!(
            registry
                .caller(id)
                .is_some_and(|c| c.node == UNPROVEN_CALLER)
        );
        registry.remove_link(id);
        assert!(lock(&registry.inner).nodes_seen.is_empty());
    }

    #[test]
    fn nodes_seen_is_bounded() {
        let mut inner = Inner {
            nodes_seen: (0..MAX_NODES_SEEN).map(|i| format!("n{i}")).collect(),
            ..Inner::default()
        };
        let tracker = TaskTracker::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _guard = rt.enter();
        inner.links.insert(
            1,
            LinkEntry {
                instance: "i".into(),
                node: "x".into(),
                proven: None,
                mux: mux(&tracker),
                kites: Vec::new(),
                identity: None,
                identity_kites: HashSet::new(),
                remote: None,
            },
        );
        inner.prove(1, ProvenBy::Secret("one-more.example.net".into()));
        assert_eq!(inner.nodes_seen.len(), MAX_NODES_SEEN);
    }

    #[tokio::test]
    async fn withdrawn_kites_go_offline_and_identity_grants_are_tracked() {
        let tracker = TaskTracker::new();
        let registry = Registry::default();
        let identity = Arc::new(LinkIdentity::for_tests("laptop"));
        let a = registry.add_link("a", "laptop", mux(&tracker), peer(), Some(identity), None);
        let b = registry.add_link("b", "other", mux(&tracker), peer(), None, None);
        add_kite(&registry, a, "http:laptop.example.net", Grant::Identity);
        add_kite(&registry, a, "http:extra.example.net", Grant::Identity);
        add_kite(&registry, a, "http:blog.example.net", Grant::Secret);
        add_kite(&registry, b, "http:blog.example.net", Grant::Secret);
        let links = registry.identity_links();
        assert_eq!(links.len(), 1);
        let names: Vec<_> = links[0].kites.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["extra.example.net", "laptop.example.net"]);

        registry.withdraw(a, &[kite("http:extra.example.net")]);
        assert!(matches!(
            registry.lookup_name(KiteProto::Http, "extra.example.net"),
            Lookup::Offline
        ));
        assert!(matches!(
            registry.lookup_name(KiteProto::Http, "laptop.example.net"),
            Lookup::Found(_)
        ));
        assert_eq!(registry.identity_link(a).unwrap().kites.len(), 1);
        assert!(registry.identity_link(b).is_none());

        // A link withdrawing what it never held (another link's kite, a
        // name nobody serves) changes nothing; its own kite goes, and the
        // other link keeps serving the shared name.
        let withdrawn = registry.withdraw(
            b,
            &[
                kite("http:laptop.example.net"),
                kite("http:nobody.example.net"),
                kite("http:blog.example.net"),
                kite("http:blog.example.net"),
            ],
        );
        assert_eq!(withdrawn, [kite("http:blog.example.net")]);
        match registry.lookup_name(KiteProto::Http, "laptop.example.net") {
            Lookup::Found(backends) => assert_eq!(backends[0].link, a),
            other => panic!("{other:?}"),
        }
        match registry.lookup_name(KiteProto::Http, "blog.example.net") {
            Lookup::Found(backends) => {
                assert_eq!(backends.len(), 1);
                assert_eq!(backends[0].link, a);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            registry.lookup_name(KiteProto::Http, "nobody.example.net"),
            Lookup::Unknown
        ));
    }

    /// Each link's claim keeps its own policy, and a claim made again on
    /// the same link replaces it.
    #[tokio::test]
    async fn each_backend_keeps_its_claims_policy() {
        let tracker = TaskTracker::new();
        let registry = Registry::default();
        let a = registry.add_link("a", "a", mux(&tracker), peer(), None, None);
        let b = registry.add_link("b", "b", mux(&tracker), peer(), None, None);
        let none: [&str; 0] = [];
        let deny = |addr: &str| VisitorPolicy::parse(&none, &[addr]).unwrap();
        let app = kite("http:app.example.net");
        registry.add_kite(
            a,
            &app,
            Grant::Secret,
            deny("127.0.0.2"),
            HttpRules::default(),
        );
        registry.add_kite(
            b,
            &app,
            Grant::Secret,
            VisitorPolicy::default(),
            HttpRules::default(),
        );
        let visitor = "127.0.0.2".parse().unwrap();
        let admits = |link: LinkId| match registry.lookup_name(KiteProto::Http, "app.example.net") {
            Lookup::Found(backends) => backends
                .iter()
                .find(|backend| backend.link == link)
                .unwrap()
                .policy
                .admits(visitor),
            other => panic!("{other:?}"),
        };
        assert!(!admits(a));
        assert!(admits(b));
        registry.add_kite(
            a,
            &app,
            Grant::Secret,
            VisitorPolicy::default(),
            HttpRules::default(),
        );
        registry.add_kite(
            b,
            &app,
            Grant::Secret,
            deny("127.0.0.0/8"),
            HttpRules::default(),
        );
        assert!(admits(a));
        assert!(!admits(b));
    }
}
