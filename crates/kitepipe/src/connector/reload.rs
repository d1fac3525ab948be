//! Reloading the connector's config while it runs: on request
//! ([`ReloadTrigger`], SIGHUP in the CLI) and when the config file changes
//! (modification time and size, looked at every [`CONFIG_POLL`], like the
//! htpasswd files).
//!
//! Only the kites change live (added, removed, retargeted, their
//! options): the new set replaces the old in `Kites`, and every link tells
//! its relay what changed on the same link (`session`). Everything else
//! (relays, secret, identity, name, events, remote operations) needs a
//! restart: a reload that changes it says so in the log and keeps the
//! running values. A config that does not load or validate changes
//! nothing; the log says why.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Kites;
use crate::config::{ConnectorConfig, KiteTarget};

/// How often the config file is looked at (modification time and size).
pub(crate) const CONFIG_POLL: Duration = Duration::from_secs(2);

/// Reads the connector's config again, as at start (file, flags,
/// environment), validated; the error says why it cannot be used.
pub type ConfigLoader = Arc<dyn Fn() -> Result<ConnectorConfig, String> + Send + Sync>;

/// Asks a running connector to read its config again (see
/// `Connector::reload_from`). Cheap to clone; requests made while a reload
/// runs are merged into one more reload.
#[derive(Debug, Clone)]
pub struct ReloadTrigger {
    notify: Arc<Notify>,
}

impl ReloadTrigger {
    pub(crate) fn new(notify: Arc<Notify>) -> ReloadTrigger {
        ReloadTrigger { notify }
    }

    /// Requests a reload (e.g. on SIGHUP).
    pub fn reload(&self) {
        self.notify.notify_one();
    }
}

/// Reloads on request and when the config file changes.
pub(crate) struct Watcher {
    pub(crate) loader: ConfigLoader,
    pub(crate) file: Option<PathBuf>,
    /// The config the connector started with: what cannot change live.
    pub(crate) running: Arc<ConnectorConfig>,
    pub(crate) kites: Arc<Kites>,
    pub(crate) notify: Arc<Notify>,
}

impl Watcher {
    /// Reloads until `token` is cancelled.
    pub(crate) async fn run(self, token: CancellationToken) {
        let mut seen = self.file.as_deref().and_then(stat);
        let mut serving = self.running.kites.clone();
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = self.notify.notified() => info!("reloading the config on request"),
                _ = tokio::time::sleep(CONFIG_POLL), if self.file.is_some() => {
                    let now = self.file.as_deref().and_then(stat);
                    if now == seen {
                        continue;
                    }
                    info!("config file changed: reloading it");
                }
            }
            seen = self.file.as_deref().and_then(stat);
            let loader = self.loader.clone();
            match tokio::task::spawn_blocking(move || loader()).await {
                Ok(Ok(config)) => self.apply(config, &mut serving),
                Ok(Err(why)) => {
                    warn!(%why, "the config cannot be used: nothing changed, the connector keeps running as it was");
                }
                Err(err) => warn!(%err, "reading the config failed: nothing changed"),
            }
        }
    }

    /// Serves the kites of `config` from now on (`serving` was the last
    /// set); warns about the settings that need a restart.
    fn apply(&self, mut config: ConnectorConfig, serving: &mut Vec<KiteTarget>) {
        for setting in needs_restart(&self.running, &config) {
            warn!(
                setting,
                "changed in the config: restart the connector to apply it; keeping the running value"
            );
        }
        // Kites prove themselves with the connector's secret: a new one
        // waits for the restart like the rest.
        for kite in &mut config.kites {
            kite.secret = self.running.node_secret.clone();
        }
        let added: Vec<String> = config
            .kites
            .iter()
            .filter(|new| !serving.iter().any(|old| old.kite == new.kite))
            .map(|k| k.kite.to_string())
            .collect();
        let removed: Vec<String> = serving
            .iter()
            .filter(|old| !config.kites.iter().any(|new| new.kite == old.kite))
            .map(|k| k.kite.to_string())
            .collect();
        let changed: Vec<String> = config
            .kites
            .iter()
            .filter(|new| {
                serving
                    .iter()
                    .any(|old| old.kite == new.kite && !same_kite(old, new))
            })
            .map(|k| k.kite.to_string())
            .collect();
        if added.is_empty() && removed.is_empty() && changed.is_empty() {
            info!(
                kites = config.kites.len(),
                "config reloaded: kites unchanged"
            );
            return;
        }
        info!(
            added = %added.join(" "),
            removed = %removed.join(" "),
            changed = %changed.join(" "),
            "config reloaded: updating the kites on every link"
        );
        *serving = config.kites.clone();
        self.kites.replace(config.kites);
    }
}

/// Whether two versions of a kite are the same in every option.
fn same_kite(a: &KiteTarget, b: &KiteTarget) -> bool {
    // Debug hides secrets: they are compared apart.
    format!("{a:?}") == format!("{b:?}")
        && a.secret.as_ref().map(|s| s.expose()) == b.secret.as_ref().map(|s| s.expose())
}

/// The settings that differ between `running` and `new` and only a
/// restart applies, by their config names.
fn needs_restart(running: &ConnectorConfig, new: &ConnectorConfig) -> Vec<&'static str> {
    let identity = |config: &ConnectorConfig| {
        config.identity.as_ref().map(|identity| {
            let info = identity.info();
            format!("{} {}", info.name, info.serial)
        })
    };
    let secret = |config: &ConnectorConfig| {
        config
            .node_secret
            .as_ref()
            .map(|secret| secret.expose().to_string())
    };
    let mut changed = Vec::new();
    if running.relays != new.relays {
        changed.push("relays");
    }
    if running.name != new.name {
        changed.push("name");
    }
    if identity(running) != identity(new) {
        changed.push("identity");
    }
    if secret(running) != secret(new) {
        changed.push("secret");
    }
    if running.heartbeat != new.heartbeat {
        changed.push("heartbeat");
    }
    if running.max_backoff != new.max_backoff {
        changed.push("max_backoff");
    }
    if running.allow_remote != new.allow_remote
        || format!("{:?}", running.remote_fs) != format!("{:?}", new.remote_fs)
    {
        changed.push("allow_remote");
    }
    if format!("{:?}", running.events) != format!("{:?}", new.events) {
        changed.push("events");
    }
    changed
}

/// The file's modification time and size (None if it cannot be read).
fn stat(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}
