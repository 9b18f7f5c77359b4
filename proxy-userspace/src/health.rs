//! `/healthz` and `/livez` with kube-proxy's semantics: healthy once the datapath has
//! been synced, and as long as no change has waited longer than the health timeout
//! without being applied.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{http::StatusCode, response::IntoResponse, routing::get, Router};

/// Sync progress shared between the sync loop and the health server.
#[derive(Debug, Default)]
struct Inner {
    last_synced: Option<SystemTime>,
    oldest_pending: Option<SystemTime>,
}

/// Handle on the sync progress; cheap to clone.
#[derive(Clone, Debug)]
pub struct SyncHealth {
    inner: Arc<Mutex<Inner>>,
    timeout: Duration,
}

impl SyncHealth {
    /// Unhealthy when a change waits longer than `timeout`.
    #[must_use]
    pub fn new(timeout: Duration) -> Self {
        Self {
            inner: Arc::default(),
            timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave it inconsistent (two Options).
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A change arrived and is not applied yet.
    pub fn queued(&self) {
        let mut inner = self.lock();
        inner.oldest_pending.get_or_insert_with(SystemTime::now);
    }

    /// Every change received so far is applied.
    pub fn synced(&self) {
        let mut inner = self.lock();
        inner.last_synced = Some(SystemTime::now());
        inner.oldest_pending = None;
    }

    /// Whether the datapath is in step with the sources, and the last sync time.
    #[must_use]
    pub fn status(&self, now: SystemTime) -> (bool, Option<SystemTime>) {
        let inner = self.lock();
        let pending_too_long = inner
            .oldest_pending
            .is_some_and(|since| now.duration_since(since).unwrap_or_default() > self.timeout);
        (
            inner.last_synced.is_some() && !pending_too_long,
            inner.last_synced,
        )
    }
}

fn rfc3339ish(time: Option<SystemTime>) -> String {
    time.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or_else(String::new, |d| {
            format!("{}.{:09}", d.as_secs(), d.subsec_nanos())
        })
}

async fn healthz(health: SyncHealth) -> impl IntoResponse {
    let now = SystemTime::now();
    let (healthy, last) = health.status(now);
    let body = serde_json::json!({
        "lastUpdated": rfc3339ish(last),
        "currentTime": rfc3339ish(Some(now)),
        "nodeEligible": true,
    })
    .to_string();
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, [("content-type", "application/json")], body)
}

/// Serves `/healthz` and `/livez` until the task is dropped, within
/// [`crate::http::Limits::DEFAULT`]; connections turned away count in `rejected`.
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    health: SyncHealth,
    rejected: prometheus_client::metrics::counter::Counter,
) -> std::io::Result<()> {
    let healthz_state = health.clone();
    let app = Router::new()
        .route("/healthz", get(move || healthz(healthz_state.clone())))
        .route("/livez", get(move || healthz(health.clone())));
    crate::http::bind_and_serve(addr, app, rejected).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unhealthy_until_first_sync_then_until_a_change_waits_too_long() {
        let health = SyncHealth::new(Duration::from_secs(10));
        let start = SystemTime::now();
        assert!(!health.status(start).0, "never synced");
        health.synced();
        assert!(health.status(start).0);
        health.queued();
        assert!(health.status(SystemTime::now()).0, "pending but recent");
        let later = SystemTime::now() + Duration::from_secs(11);
        assert!(
            !health.status(later).0,
            "pending for longer than the timeout"
        );
        health.synced();
        assert!(health.status(later).0);
    }
}
