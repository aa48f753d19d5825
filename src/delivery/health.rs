//! The app's reachability as the client's connects find it: [`AppState`] and
//! [`AppStatus`] for `/readyz`, and the shared record every clone of one client updates
//! (with `txn_sidecar_app_up` and `txn_sidecar_app_connect_failures_total`).

use std::sync::Mutex;
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

/// Whether the app accepts connections, as the client's last connect found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppState {
    /// No connect attempted yet.
    Unknown,
    /// The last connect succeeded.
    Up,
    /// The last connect failed: refused, unreachable, name not resolved, timed out.
    Down,
}

/// What the client knows about the app, for `/readyz`.
#[derive(Debug, Clone)]
pub struct AppStatus {
    /// The state after the last connect.
    pub state: AppState,
    /// While down: since when (the first failed connect after the last success) and the
    /// last connect error.
    pub down: Option<(Instant, String)>,
}

/// Reachability shared by every clone of one [`AppClient`]: set by each connect, watched
/// by deliveries waiting for the app to come back.
pub(super) struct Health {
    pub(super) state: watch::Sender<AppState>,
    pub(super) down: Mutex<Option<(Instant, String)>>,
    /// `txn_sidecar_app_up` (unregistered unless the client reports to `Metrics`).
    up: Gauge,
    /// `txn_sidecar_app_connect_failures_total`.
    failures: Counter,
}

impl Health {
    pub(super) fn new(up: Gauge, failures: Counter) -> Health {
        Health {
            state: watch::Sender::new(AppState::Unknown),
            down: Mutex::new(None),
            up,
            failures,
        }
    }

    pub(super) fn connected(&self, url: &str) {
        self.up.set(1);
        let was_down = self.down.lock().map(|mut d| d.take()).unwrap_or_default();
        self.state
            .send_if_modified(|s| std::mem::replace(s, AppState::Up) != AppState::Up);
        if let Some((since, _)) = was_down {
            tracing::info!(
                app = url,
                down_ms = since.elapsed().as_millis() as u64,
                "app accepts connections again; waiting deliveries resume"
            );
        }
    }

    pub(super) fn failed(&self, url: &str, error: &str) {
        self.up.set(0);
        self.failures.inc();
        if let Ok(mut d) = self.down.lock() {
            let since = d.as_ref().map_or_else(Instant::now, |(s, _)| *s);
            *d = Some((since, error.to_string()));
        }
        let mut was = AppState::Down;
        self.state.send_if_modified(|s| {
            was = std::mem::replace(s, AppState::Down);
            was != AppState::Down
        });
        match was {
            AppState::Up => tracing::warn!(app = url, error, "app stopped accepting connections; deliveries wait for it without spending their retry budgets"),
            // A native sidecar starts before its app: not yet there is no fault.
            AppState::Unknown => tracing::info!(app = url, error, "app does not accept connections yet; deliveries wait for it"),
            AppState::Down => {}
        }
    }
}
