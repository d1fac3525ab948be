//! What the connector tells its admin server: its kites (online through
//! which relays), its links (one per relay: up or down, heartbeat round
//! trip) and its event gateway.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::watch;

use super::{EventLinks, LinkState};
use crate::config::ConnectorConfig;
use crate::metrics::admin::StatusSource;
use crate::metrics::{LinkUp, Metrics};
use crate::sync::lock;

/// The connector as a [`StatusSource`].
pub(crate) struct ConnectorStatus {
    pub(crate) config: Arc<ConnectorConfig>,
    pub(crate) states: Vec<watch::Receiver<LinkState>>,
    pub(crate) links: Arc<EventLinks>,
    pub(crate) metrics: Metrics,
    pub(crate) gateway: Option<String>,
    /// Each relay's link counted up while the sampler sees it up.
    pub(crate) up: Mutex<Vec<Option<LinkUp>>>,
}

impl StatusSource for ConnectorStatus {
    fn status(&self) -> Value {
        let kites: Vec<Value> = self
            .config
            .kites
            .iter()
            .map(|target| {
                let relays: Vec<&str> = self
                    .states
                    .iter()
                    .zip(&self.config.relays)
                    .filter(|(state, _)| match &*state.borrow() {
                        LinkState::Up(online) => {
                            online.iter().any(|(kite, _)| *kite == target.kite)
                        }
                        LinkState::Down => false,
                    })
                    .map(|(_, relay)| relay.addr.as_str())
                    .collect();
                json!({
                    "name": target.kite.name,
                    "proto": target.kite.proto,
                    "port": (target.kite.port != 0).then_some(target.kite.port),
                    "target": target.target,
                    "online": !relays.is_empty(),
                    "backends": relays,
                })
            })
            .collect();
        let listeners: Vec<Value> = self
            .gateway
            .iter()
            .map(|gateway| json!({"addr": gateway, "roles": ["gateway"]}))
            .collect();
        json!({
            "role": "connector",
            "node": self.config.name,
            "listeners": listeners,
            "kites": kites,
        })
    }

    fn refresh(&self) {
        let muxes = lock(&self.links.links).clone();
        let mut up = lock(&self.up);
        up.resize_with(self.states.len(), || None);
        for (index, (state, relay)) in self.states.iter().zip(&self.config.relays).enumerate() {
            let is_up = matches!(&*state.borrow(), LinkState::Up(_));
            match (&up[index], is_up) {
                (None, true) => up[index] = Some(self.metrics.link_up(&relay.addr)),
                (Some(_), false) => up[index] = None,
                _ => {}
            }
            let rtt = muxes
                .get(index)
                .and_then(Option::as_ref)
                .map(|mux| mux.stats().rtt_micros.load(Ordering::Relaxed))
                .filter(|&micros| micros > 0);
            if let (Some(micros), true) = (rtt, is_up) {
                self.metrics
                    .heartbeat(&relay.addr, Duration::from_micros(micros));
            }
        }
    }
}
