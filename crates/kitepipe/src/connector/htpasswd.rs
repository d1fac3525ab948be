//! Kites' htpasswd files (`basic_auth`), watched while the connector runs:
//! a changed file is read and checked like at start (`pki::htpasswd`, the
//! relay's own checks of the lines), and every link sends those kites' claims again, so
//! the relay replaces their users without dropping the link (the links
//! watch the connector's kites, see `Kites::watch_files`). A file that
//! turns bad (or vanishes) keeps the last good users, and the log says why.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use crate::config::KiteTarget;
use crate::pki::htpasswd::read_file;
use crate::sync::lock;

/// How often the files are looked at (modification time and size): a
/// changed password takes effect within a few seconds, and a stat every
/// two seconds costs nothing.
pub(crate) const HTPASSWD_POLL: Duration = Duration::from_secs(2);

/// The htpasswd users of every kite that has a file, by the kite's place in
/// the config.
pub(crate) struct HtpasswdFiles {
    files: Vec<Option<Watched>>,
}

/// One kite's file and its last good users.
struct Watched {
    path: PathBuf,
    /// The kite, for the log.
    kite: kitepipe_proto::kite::KiteRef,
    lines: Mutex<Arc<Vec<String>>>,
    /// Modification time and size last seen (None: not readable).
    seen: Mutex<Option<(SystemTime, u64)>>,
}

impl HtpasswdFiles {
    /// The files of `targets`, with the users read at start (the config).
    pub(crate) fn new(targets: &[KiteTarget]) -> HtpasswdFiles {
        let files = targets
            .iter()
            .map(|target| {
                let path = target.basic_auth_file.clone()?;
                let seen = stat(&path);
                Some(Watched {
                    path,
                    kite: target.kite.clone(),
                    lines: Mutex::new(Arc::new(target.http.basic_auth.clone())),
                    seen: Mutex::new(seen),
                })
            })
            .collect();
        HtpasswdFiles { files }
    }

    /// The current users of the kite at `index`, if it has a file.
    pub(crate) fn lines(&self, index: usize) -> Option<Arc<Vec<String>>> {
        let watched = self.files.get(index)?.as_ref()?;
        Some(lock(&watched.lines).clone())
    }

    /// Looks at every file once (modification time and size, read again
    /// if changed); whether any kite's users changed.
    pub(crate) fn check(&self) -> bool {
        let mut any = false;
        for watched in self.files.iter().flatten() {
            any |= watched.check();
        }
        any
    }
}

impl Watched {
    /// Reads the file again if it changed; whether its users did.
    fn check(&self) -> bool {
        let now = stat(&self.path);
        {
            let mut seen = lock(&self.seen);
            if *seen == now {
                return false;
            }
            *seen = now;
        }
        let kite = &self.kite;
        let file = self.path.display();
        let lines = match read_file(&self.path) {
            Ok(lines) => lines,
            Err(err) => {
                warn!(%kite, %file, %err, "htpasswd file changed but cannot be used: keeping the last good users");
                return false;
            }
        };
        let mut current = lock(&self.lines);
        if **current == lines {
            return false;
        }
        info!(%kite, %file, users = lines.len(), "htpasswd file changed: sending the new users");
        *current = Arc::new(lines);
        true
    }
}

/// The file's modification time and size (None if it cannot be read).
fn stat(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}
