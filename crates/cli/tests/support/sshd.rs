//! A real OpenSSH server on loopback for remote-operation tests: its own
//! host key, user key, authorized keys, sshd_config and pid file in a temp
//! dir, on a port found by binding port 0, run in the foreground (`-D -e`)
//! and stopped by PID when dropped. An ssh_config beside it lets the real
//! `ssh` client log in non-interactively as host alias `target`.
//!
//! ```ignore
//! let sshd = Sshd::new().start();
//! let out = sshd.kitepipe(&["exec", "--", "uname"]).output();
//! ```
#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::process::Command;

use crate::support::{BIN, Proc, TempDir, free_port, require_tool};

/// The host alias of the server in [`SshdProc::ssh_config`].
pub const HOST: &str = "target";

/// Whether the OpenSSH server and client are here; if not, the test
/// cannot run and [`require_tool`] says so (or fails it under `CI`).
pub fn required() -> bool {
    require_tool("/usr/sbin/sshd", "openssh-server")
        && require_tool("ssh", "openssh-client")
        && require_tool("ssh-keygen", "openssh-client")
}

/// Builder for an sshd.
pub struct Sshd {
    env: Vec<(String, String)>,
    xdg_runtime: bool,
    extra: Vec<String>,
}

/// A running sshd.
pub struct SshdProc {
    pub proc: Proc,
    pub port: u16,
    pub dir: TempDir,
    /// HOME of every user logging in (empty at start: no rc files run).
    pub home: PathBuf,
    /// XDG_RUNTIME_DIR of the sessions, if set.
    pub runtime_dir: Option<PathBuf>,
}

impl Sshd {
    pub fn new() -> Sshd {
        Sshd {
            env: Vec::new(),
            xdg_runtime: true,
            extra: Vec::new(),
        }
    }

    /// Sets an environment variable for sessions (sshd `SetEnv`), e.g. PATH.
    pub fn env(mut self, key: &str, value: &str) -> Sshd {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sessions get no XDG_RUNTIME_DIR (the agent then uses /dev/shm).
    pub fn no_runtime_dir(mut self) -> Sshd {
        self.xdg_runtime = false;
        self
    }

    /// An extra sshd_config line.
    pub fn config(mut self, line: &str) -> Sshd {
        self.extra.push(line.into());
        self
    }

    pub fn start(self) -> SshdProc {
        let dir = TempDir::new("sshd");
        let d = dir.path();
        // Other users (the non-root test user) must read the authorized keys.
        let _ = Command::new("chmod")
            .args(["755", &d.display().to_string()])
            .status();
        for (name, key_type) in [
            ("host_key", "ed25519"),
            ("id_ed25519", "ed25519"),
            ("other_key", "ed25519"),
        ] {
            let status = Command::new("ssh-keygen")
                .args(["-q", "-t", key_type, "-N", "", "-f"])
                .arg(d.join(name))
                .status()
                .expect("run ssh-keygen");
            assert!(status.success(), "ssh-keygen failed");
        }
        std::fs::copy(d.join("id_ed25519.pub"), d.join("authorized_keys")).unwrap();
        let home = d.join("home");
        std::fs::create_dir_all(&home).unwrap();
        let _ = Command::new("chmod")
            .args(["1777", &home.display().to_string()])
            .status();
        let runtime_dir = self.xdg_runtime.then(|| {
            let run = d.join("run");
            std::fs::create_dir_all(&run).unwrap();
            let _ = Command::new("chmod")
                .args(["1777", &run.display().to_string()])
                .status();
            run
        });
        let _ = std::fs::create_dir_all("/run/sshd");
        let port = free_port();
        let mut set_env = vec![format!("HOME={}", home.display())];
        if let Some(run) = &runtime_dir {
            set_env.push(format!("XDG_RUNTIME_DIR={}", run.display()));
        }
        for (key, value) in &self.env {
            set_env.push(format!("{key}={value}"));
        }
        let mut config = format!(
            "ListenAddress 127.0.0.1\n\
             Port {port}\n\
             HostKey {dir}/host_key\n\
             PidFile {dir}/sshd.pid\n\
             AuthorizedKeysFile {dir}/authorized_keys\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\n\
             StrictModes no\n\
             UsePAM no\n\
             UseDNS no\n\
             MaxStartups 100:30:200\n\
             MaxSessions 64\n\
             AllowTcpForwarding yes\n\
             SetEnv {}\n",
            set_env.join(" "),
            dir = d.display(),
        );
        for line in &self.extra {
            config.push_str(line);
            config.push('\n');
        }
        std::fs::write(d.join("sshd_config"), config).unwrap();
        let client = format!(
            "Host {HOST}\n  HostName 127.0.0.1\n  Port {port}\n\
             Host *\n  User {user}\n  IdentityFile {dir}/id_ed25519\n  IdentitiesOnly yes\n  IdentityAgent none\n  \
             StrictHostKeyChecking no\n  UserKnownHostsFile {dir}/known_hosts\n  GlobalKnownHostsFile /dev/null\n  \
             BatchMode yes\n  LogLevel ERROR\n",
            user = current_user(),
            dir = d.display(),
        );
        std::fs::write(d.join("ssh_config"), client).unwrap();
        let mut command = Command::new("/usr/sbin/sshd");
        command.args(["-D", "-e", "-f"]).arg(d.join("sshd_config"));
        let proc = Proc::spawn("sshd", command);
        proc.wait_for("Server listening on");
        SshdProc {
            proc,
            port,
            dir,
            home,
            runtime_dir,
        }
    }
}

impl SshdProc {
    pub fn ssh_config(&self) -> PathBuf {
        self.dir.path().join("ssh_config")
    }

    /// A key sshd does not accept.
    pub fn other_key(&self) -> PathBuf {
        self.dir.path().join("other_key")
    }

    /// `kitepipe remote -F CONFIG target ARGS...` ready to run.
    pub fn kitepipe(&self, args: &[&str]) -> Command {
        self.kitepipe_with(&[], args)
    }

    /// `kitepipe remote -F CONFIG OPTS... target ARGS...`.
    pub fn kitepipe_with(&self, opts: &[&str], args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .arg("remote")
            .arg("-F")
            .arg(self.ssh_config())
            .args(["--connect-timeout", "60s"])
            .args(opts)
            .arg(HOST)
            .args(args);
        command
    }

    /// Library options for a session with this server.
    pub fn options(&self) -> kitepipe::remote::SshOptions {
        let mut options = kitepipe::remote::SshOptions::new(HOST);
        options.ssh_args = vec!["-F".into(), self.ssh_config().display().to_string()];
        options.agent_binary = Some(PathBuf::from(BIN));
        options.connect_timeout = std::time::Duration::from_secs(60);
        options
    }
}

pub fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("run id");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn is_root() -> bool {
    crate::support::is_root()
}
