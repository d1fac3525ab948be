//! What the relay tells its admin server: its listeners, kites (online or
//! offline, served by which nodes) and links' heartbeat round trips.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Value, json};

use super::{BoundListener, RelayCtx};
use crate::metrics::admin::StatusSource;

/// The relay as a [`StatusSource`].
pub(crate) struct RelayStatus {
    pub(crate) ctx: Arc<RelayCtx>,
    pub(crate) listeners: Vec<BoundListener>,
}

impl StatusSource for RelayStatus {
    fn status(&self) -> Value {
        let (kites, _) = self.ctx.registry.snapshot();
        let listeners: Vec<Value> = self
            .listeners
            .iter()
            .map(|listener| {
                let mut roles = Vec::new();
                if listener.roles.link {
                    roles.push("links");
                }
                if listener.roles.http {
                    roles.push("http");
                }
                if listener.roles.https {
                    roles.push("https");
                }
                json!({"addr": listener.addr.to_string(), "roles": roles})
            })
            .collect();
        json!({
            "role": "relay",
            "node": self.ctx.config.name,
            "listeners": listeners,
            "kites": kites,
        })
    }

    fn refresh(&self) {
        let (_, links) = self.ctx.registry.snapshot();
        for (node, mux) in links {
            let micros = mux.stats().rtt_micros.load(Ordering::Relaxed);
            if micros > 0 {
                self.ctx
                    .registry
                    .metrics
                    .heartbeat(&node, Duration::from_micros(micros));
            }
        }
    }
}
