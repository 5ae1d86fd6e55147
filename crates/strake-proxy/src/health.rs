//! Health as upstream kube-proxy reports it on `/healthz` and `/livez`: healthy unless a change
//! has been waiting for a sync longer than the timeout (2 x `--sync-period`) or the last sync
//! failed; the answer carries `lastUpdated` (the last successful sync) and `currentTime`.

use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use tokio::time::Instant;

#[derive(Debug, Default)]
struct State {
    /// When the oldest change not yet programmed arrived.
    pending_since: Option<Instant>,
    /// When the newest change arrived.
    last_queued: Option<Instant>,
    /// Wall-clock time of the last successful sync.
    last_updated: Option<Timestamp>,
    /// Whether the last sync failed.
    failing: bool,
}

/// Shared health: written by the sync loop, read by the health server.
#[derive(Debug)]
pub struct Health {
    timeout: Duration,
    state: Mutex<State>,
}

/// One answer of the health server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Whether to answer 200 (else 503).
    pub healthy: bool,
    /// The JSON body.
    pub body: String,
}

impl Health {
    /// Health that turns bad when a change waits longer than `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Health {
            timeout,
            state: Mutex::default(),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A change arrived that the rules do not reflect yet.
    pub fn queued(&self, now: Instant) {
        self.with(|s| {
            s.pending_since.get_or_insert(now);
            s.last_queued = Some(now);
        });
    }

    /// A sync that started at `started` succeeded: changes queued before it are programmed.
    pub fn synced(&self, started: Instant, wall: Timestamp) {
        self.with(|s| {
            // Changes that arrived while the sync ran may not be in it: they count as
            // pending since the sync started (a conservative bound).
            s.pending_since = match s.last_queued {
                Some(q) if q > started => Some(started),
                _ => None,
            };
            s.last_updated = Some(wall);
            s.failing = false;
        });
    }

    /// A sync failed; the rules are behind until a later one succeeds.
    pub fn failed(&self, now: Instant) {
        self.with(|s| {
            s.failing = true;
            s.pending_since.get_or_insert(now);
        });
    }

    /// The answer at `now`.
    pub fn report(&self, now: Instant, wall: Timestamp) -> Report {
        self.with(|s| {
            let overdue = s
                .pending_since
                .is_some_and(|p| now.saturating_duration_since(p) > self.timeout);
            let healthy = !s.failing && !overdue;
            let last = s
                .last_updated
                .map(|t| t.to_string())
                .unwrap_or_else(|| Timestamp::UNIX_EPOCH.to_string());
            let body = serde_json::json!({
                "lastUpdated": last,
                "currentTime": wall.to_string(),
            })
            .to_string();
            Report { healthy, body }
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn healthy_until_a_change_waits_too_long() {
        let h = Health::new(MIN);
        let wall = Timestamp::from_second(1_700_000_000).unwrap();
        let t0 = Instant::now();
        assert!(h.report(t0, wall).healthy);
        h.queued(t0);
        assert!(h.report(t0 + Duration::from_secs(59), wall).healthy);
        assert!(!h.report(t0 + Duration::from_secs(61), wall).healthy);
        h.synced(t0 + Duration::from_secs(61), wall);
        let r = h.report(t0 + Duration::from_secs(62), wall);
        assert!(r.healthy);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["lastUpdated"], "2023-11-14T22:13:20Z");
        assert!(v["currentTime"].is_string());
    }

    #[test]
    fn a_failed_sync_is_unhealthy_until_one_succeeds() {
        let h = Health::new(MIN);
        let wall = Timestamp::UNIX_EPOCH;
        let t0 = Instant::now();
        h.failed(t0);
        assert!(!h.report(t0, wall).healthy);
        // A change that arrives during a sync stays pending after that sync.
        h.queued(t0 + Duration::from_secs(1));
        h.synced(t0, wall);
        assert!(h.report(t0 + Duration::from_secs(2), wall).healthy);
        assert!(!h.report(t0 + Duration::from_secs(61), wall).healthy);
    }
}
