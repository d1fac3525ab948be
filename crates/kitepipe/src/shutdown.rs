//! The end of a shutdown, shared by the relay, the connector and the
//! agent: after they stop accepting and cancel their token, [`drain`]
//! waits a grace period for their tasks and logs what it cut off.

use std::time::Duration;

use tokio_util::task::TaskTracker;
use tracing::warn;

/// How long shutdown waits for in-flight connections and streams before
/// cutting them: long enough for a response or event in flight to finish,
/// short enough that a stop (or a restart by a service manager) stays
/// prompt.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Closes `tracker` and waits up to `grace` for its tasks to end. Returns
/// true if they all did; otherwise logs how many were still running and
/// what they were (`what`, e.g. "connections") and returns false: the
/// caller then exits, which cuts them. Callers cancel their tasks' token
/// first. Cancel-safe (it only waits).
pub(crate) async fn drain(tracker: &TaskTracker, grace: Duration, what: &str) -> bool {
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_ok() {
        return true;
    }
    warn!(
        tasks = tracker.len(),
        cut = what,
        "shutdown grace expired; cutting what is still running"
    );
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_tasks_that_end_within_the_grace() {
        let tracker = TaskTracker::new();
        tracker.spawn(tokio::time::sleep(Duration::from_secs(1)));
        assert!(drain(&tracker, Duration::from_secs(5), "tasks").await);
        assert!(tracker.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn drain_gives_up_on_a_stuck_task_after_the_grace() {
        let tracker = TaskTracker::new();
        tracker.spawn(std::future::pending::<()>());
        let started = tokio::time::Instant::now();
        assert!(!drain(&tracker, Duration::from_secs(5), "tasks").await);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(tracker.len(), 1);
    }
}
