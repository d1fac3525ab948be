//! PageKite back-ends for the relay's PageKite tests: the real pagekite.py
//! (Debian `pagekite`) and upagekite (PyPI), each in its own temp HOME,
//! logging to stdout (collected by [`Proc`]), stopped by PID when dropped.
//!
//! ```ignore
//! let be = PageKiteBackEnd::start(relay.link, &[format!("http:web.pk.test:{}:{SECRET}", backend.addr())]);
//! be.wait_kite("web.pk.test");
//! ```
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{Proc, TempDir, require_python_module, require_tool};

/// Whether pagekite.py is here (else the test returns; a failure under CI).
pub fn pagekite_required() -> bool {
    require_tool("pagekite", "pagekite")
}

/// Whether upagekite is importable by `python3`.
pub fn upagekite_required() -> bool {
    require_python_module("upagekite", "python3-pip (pip install upagekite)")
}

/// A running pagekite.py back-end.
pub struct PageKiteBackEnd {
    pub proc: Proc,
    _home: TempDir,
}

impl PageKiteBackEnd {
    /// Starts `pagekite --clean` flying `services` (`--service_on` specs,
    /// e.g. `http:NAME:HOST:PORT:SECRET`, `raw-22:NAME:HOST:PORT:SECRET`)
    /// through the front-end at `frontend`, with `extra` arguments.
    pub fn start(frontend: SocketAddr, services: &[String], extra: &[&str]) -> PageKiteBackEnd {
        let home = TempDir::new("pagekite-be");
        let mut command = Command::new("pagekite");
        command
            .env("HOME", home.path())
            .current_dir(home.path())
            .arg("--clean")
            .arg("--nullui")
            .arg("--logfile=stdio")
            .arg(format!("--frontend={frontend}"));
        for service in services {
            command.arg(format!("--service_on={service}"));
        }
        command.args(extra);
        PageKiteBackEnd {
            proc: Proc::spawn("pagekite.py", command),
            _home: home,
        }
    }

    /// Waits until the front-end accepted the kite `name` (pagekite.py
    /// logs `proto=...; domain=NAME; ssl=...` for each X-PageKite-OK).
    pub fn wait_kite(&self, name: &str) {
        self.wait_kite_count(name, 1);
    }

    /// Waits until the front-end accepted `name` `count` times (once per
    /// tunnel it opened).
    pub fn wait_kite_count(&self, name: &str, count: usize) {
        self.proc
            .wait_for_count(&format!("domain={name}; ssl="), count);
    }

    /// Waits until the front-end rejected `name` with `reason` (pagekite.py
    /// logs `err=Rejected; proto=...; reason=REASON; domain=NAME`).
    pub fn wait_rejected(&self, name: &str, reason: &str) -> String {
        self.proc
            .wait_for(&format!("reason={reason}; domain={name}"))
    }
}

/// Path of the upagekite back-end script.
pub fn upagekite_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/upagekite_backend.py")
}

/// A running upagekite back-end serving one http kite (its own tiny web
/// app answering `hello from upagekite NAME`).
pub struct UPageKiteBackEnd {
    pub proc: Proc,
}

impl UPageKiteBackEnd {
    pub fn start(frontend: SocketAddr, name: &str, secret: &str) -> UPageKiteBackEnd {
        let mut command = Command::new("python3");
        command
            .arg("-u")
            .arg(upagekite_script())
            .arg(frontend.ip().to_string())
            .arg(frontend.port().to_string())
            .arg(name)
            .arg(secret);
        UPageKiteBackEnd {
            proc: Proc::spawn("upagekite", command),
        }
    }
}
