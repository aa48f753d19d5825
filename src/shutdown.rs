//! Graceful shutdown: the OS signals that start it and the deadline-bounded wait that ends it.
//!
//! One `CancellationToken` tells every part to stop; one `TaskTracker` knows what is
//! still running. The entry point takes the shutdown future as a parameter, so tests
//! drive it without signals.

use std::time::Duration;

use tokio_util::task::TaskTracker;

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("interrupt received, shutting down");
    }
}

/// Closes `tracker` and waits for its tasks up to `deadline`; returns whether all ended.
pub async fn wait_tasks(tracker: &TaskTracker, stage: &str, deadline: Duration) -> bool {
    tracker.close();
    match tokio::time::timeout(deadline, tracker.wait()).await {
        Ok(()) => true,
        Err(_) => {
            tracing::warn!(
                stage,
                remaining = tracker.len(),
                deadline_ms = deadline.as_millis() as u64,
                "tasks still running at the drain deadline, abandoning them"
            );
            false
        }
    }
}

/// How long dropping the runtime may wait for blocking work still running after the drain.
pub const RUNTIME_RELEASE: Duration = Duration::from_millis(500);

/// Drops `rt` after the drain without waiting more than [`RUNTIME_RELEASE`] for blocking
/// tasks that outlive it (a metadata lookup against a broker that went away can take
/// its full timeout): the drain has committed what it could, and the exit must keep
/// `shutdown_grace`.
pub fn release_runtime(rt: tokio::runtime::Runtime) {
    rt.shutdown_timeout(RUNTIME_RELEASE);
}
