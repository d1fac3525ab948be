//! Measures remote operations over one SSH session (bench/remote.sh runs
//! it): connect to first result, sequential and pipelined small operations
//! per second, exec round trips, and a 100 MiB copy on the open session.
//!
//! ```text
//! remote_ops DESTINATION [ssh args...]     e.g. remote_ops target -F /tmp/x/ssh_config
//! remote_ops local                         the agent as a local child, no ssh
//! ```
//! Prints one `name value unit` line per measurement.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use kitepipe::remote::{RemoteCommand, Session, SshOptions};

const OPS: usize = 2000;
const COPY_BYTES: usize = 100 * 1024 * 1024;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let destination = args
        .next()
        .expect("usage: remote_ops DESTINATION [ssh args...]");
    let mut options = SshOptions::new(destination);
    options.ssh_args = args.collect();
    options.agent_binary = std::env::var_os("KITEPIPE_AGENT").map(Into::into);

    let started = Instant::now();
    let session = if options.destination == "local" {
        // No ssh: the agent as a local child over pipes (isolates ssh's cost).
        let agent = options
            .agent_binary
            .clone()
            .expect("KITEPIPE_AGENT for local");
        let mut child = tokio::process::Command::new(agent)
            .args(["agent", "--stdio"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("agent");
        let io = tokio::io::join(child.stdout.take().unwrap(), child.stdin.take().unwrap());
        std::mem::forget(child);
        Session::over(io, Default::default())
            .await
            .expect("session")
    } else {
        Session::ssh(options).await.expect("session")
    };
    let out = session
        .output(&RemoteCommand::new("true"))
        .await
        .expect("exec");
    assert_eq!(out.status.code, Some(0));
    report(
        "connect_to_first_exec",
        started.elapsed().as_secs_f64() * 1000.0,
        "ms",
    );

    // Warm up.
    for _ in 0..100 {
        session.stat("/", false).await.expect("stat");
    }
    let started = Instant::now();
    for _ in 0..OPS {
        session.stat("/", false).await.expect("stat");
    }
    report(
        "stat_sequential",
        OPS as f64 / started.elapsed().as_secs_f64(),
        "ops/s",
    );

    for window in [8usize, 64] {
        let started = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        let mut issued = 0;
        let mut done = 0;
        while done < OPS {
            while issued < OPS && set.len() < window {
                let session = session.clone();
                set.spawn(async move { session.stat("/", false).await.map(drop) });
                issued += 1;
            }
            set.join_next()
                .await
                .expect("task")
                .expect("join")
                .expect("stat");
            done += 1;
        }
        report(
            &format!("stat_pipelined_{window}"),
            OPS as f64 / started.elapsed().as_secs_f64(),
            "ops/s",
        );
    }

    let n = 300;
    let started = Instant::now();
    for _ in 0..n {
        session
            .output(&RemoteCommand::new("true"))
            .await
            .expect("exec");
    }
    report(
        "exec_true_sequential",
        n as f64 / started.elapsed().as_secs_f64(),
        "ops/s",
    );

    let data: Vec<u8> = (0..COPY_BYTES)
        .map(|i| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes()[7])
        .collect();
    let dir = std::env::var("REMOTE_DIR").unwrap_or_else(|_| "/tmp".into());
    let path = format!("{dir}/kitepipe-bench-copy.bin");
    let started = Instant::now();
    session.write(&path, &data).await.expect("write");
    let secs = started.elapsed().as_secs_f64();
    report("write_100mib_open_session", 100.0 / secs, "MiB/s");
    let started = Instant::now();
    let back = session.read(&path).await.expect("read");
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(back.len(), data.len());
    report("read_100mib_open_session", 100.0 / secs, "MiB/s");
    session.rm(&path, false).await.expect("rm");
    let started = Instant::now();
    session.close().await;
    let _ = started.elapsed() < Duration::from_secs(5);
}

fn report(name: &str, value: f64, unit: &str) {
    println!("{name} {value:.1} {unit}");
}
