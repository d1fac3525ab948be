//! What `exec` with pipes and `exec` on a terminal share: the command's
//! environment, the driver of an exec's pumps, exit reports and signals.

use kitepipe_proto::remote::{AgentRecord, ExitReport, to_json};
use tokio::process::Command;

use super::policy::NodePolicy;
use super::reply::finish;
use super::stream::OpStream;

/// The environment of a command: the agent's own plus the operation's;
/// for a relayed one (`policy`), only the connector's few harmless
/// variables plus the operation's.
pub(crate) fn set_env(
    command: &mut Command,
    env: &[(String, String)],
    env_clear: bool,
    policy: Option<&NodePolicy>,
) {
    if env_clear || policy.is_some() {
        command.env_clear();
    }
    if let (Some(policy), false) = (policy, env_clear) {
        command.envs(policy.env.iter().map(|(k, v)| (k, v)));
    }
    command.envs(env.iter().map(|(k, v)| (k, v)));
}

/// Drives an exec's input and output pumps and reports the exit. The input
/// pump ends when the client finished (or is gone); the output pump when
/// the process exited, which ends the operation even if the client still
/// holds stdin open. A client gone mid-way makes the output pump fail (no
/// report), and the child is killed on drop.
pub(crate) async fn run_pumps(
    stream: &OpStream,
    input: impl Future<Output = ()>,
    output: impl Future<Output = Option<ExitReport>>,
) {
    tokio::pin!(input);
    tokio::pin!(output);
    let mut input_done = false;
    let report = loop {
        tokio::select! {
            report = &mut output => break report,
            _ = &mut input, if !input_done => input_done = true,
        }
    };
    if let Some(report) = report {
        finish(stream, AgentRecord::Done(to_json(&report))).await;
    }
}

pub(crate) fn exit_report(status: std::process::ExitStatus) -> ExitReport {
    use std::os::unix::process::ExitStatusExt;
    ExitReport {
        code: status.code(),
        signal: status.signal(),
    }
}

pub(crate) fn signal_process(pid: u32, signal: i32) {
    let (Some(pid), Some(signal)) = (
        rustix::process::Pid::from_raw(pid as i32),
        rustix::process::Signal::from_named_raw(signal),
    ) else {
        return;
    };
    let _ = rustix::process::kill_process(pid, signal);
}
