//! Prometheus metrics with upstream kube-proxy's names, rendered in the text format.
//!
//! A handful of counters, gauges and fixed-bucket histograms behind one mutex: the sync loop
//! records a few values per sync, the metrics server renders them on request.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// A histogram with fixed upper bounds (cumulative on render).
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// A histogram with the given upper bounds (ascending).
    pub fn new(bounds: Vec<f64>) -> Self {
        let counts = vec![0; bounds.len()];
        Histogram {
            bounds,
            counts,
            sum: 0.0,
            count: 0,
        }
    }

    /// Upstream's `ExponentialBuckets(start, factor, n)`.
    pub fn exponential(start: f64, factor: f64, n: usize) -> Self {
        Self::new(
            std::iter::successors(Some(start), |b| Some(b * factor))
                .take(n)
                .collect(),
        )
    }

    /// Records one value.
    pub fn observe(&mut self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.counts[i] += 1;
        }
        self.sum += value;
        self.count += 1;
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, n) in self.bounds.iter().zip(&self.counts) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// Upstream's network programming latency buckets (0.25 s .. 5 min).
fn network_programming_buckets() -> Vec<f64> {
    let mut b = vec![0.25, 0.5];
    b.extend((1..=59).map(f64::from));
    b.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    b.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    b.sort_by(f64::total_cmp);
    b.dedup();
    b
}

/// The values behind `/metrics`.
#[derive(Debug, Clone)]
pub struct Values {
    /// Every sync (`kubeproxy_sync_proxy_rules_duration_seconds`).
    pub sync_duration: Histogram,
    /// Full syncs (`kubeproxy_sync_full_proxy_rules_duration_seconds`).
    pub full_sync_duration: Histogram,
    /// Partial syncs (`kubeproxy_sync_partial_proxy_rules_duration_seconds`).
    pub partial_sync_duration: Histogram,
    /// API change to rules programmed (`kubeproxy_network_programming_duration_seconds`).
    pub network_programming_duration: Histogram,
    /// Unix time of the last successful sync (`kubeproxy_sync_proxy_rules_last_timestamp_seconds`).
    pub last_sync_timestamp: f64,
    /// Unix time of the last queued change (`kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds`).
    pub last_queued_timestamp: f64,
    /// Service changes seen (`kubeproxy_sync_proxy_rules_service_changes_total`).
    pub service_changes: u64,
    /// EndpointSlice changes seen (`kubeproxy_sync_proxy_rules_endpoint_changes_total`).
    pub endpoint_changes: u64,
    /// Failed syncs (`kubeproxy_sync_proxy_rules_nftables_sync_failures_total`).
    pub sync_failures: u64,
}

impl Default for Values {
    fn default() -> Self {
        let sync = || Histogram::exponential(0.001, 2.0, 15);
        Values {
            sync_duration: sync(),
            full_sync_duration: sync(),
            partial_sync_duration: sync(),
            network_programming_duration: Histogram::new(network_programming_buckets()),
            last_sync_timestamp: 0.0,
            last_queued_timestamp: 0.0,
            service_changes: 0,
            endpoint_changes: 0,
            sync_failures: 0,
        }
    }
}

/// Shared metrics: written by the sync loop, read by the metrics server.
#[derive(Debug, Default)]
pub struct Metrics {
    values: Mutex<Values>,
}

impl Metrics {
    /// Runs `f` on the values.
    pub fn update<T>(&self, f: impl FnOnce(&mut Values) -> T) -> T {
        let mut guard = self.values.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    /// A copy of the current values.
    pub fn snapshot(&self) -> Values {
        self.update(|v| v.clone())
    }

    /// Records a finished sync.
    pub fn observe_sync(&self, full: bool, took: Duration, unix_now: f64) {
        self.update(|v| {
            let secs = took.as_secs_f64();
            v.sync_duration.observe(secs);
            if full {
                v.full_sync_duration.observe(secs);
            } else {
                v.partial_sync_duration.observe(secs);
            }
            v.last_sync_timestamp = unix_now;
        });
    }

    /// Renders everything in the Prometheus text format (version 0.0.4).
    pub fn render(&self) -> String {
        let v = self.snapshot();
        let mut out = String::with_capacity(8192);
        v.sync_duration.render(
            &mut out,
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
        );
        v.full_sync_duration.render(
            &mut out,
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
        );
        v.partial_sync_duration.render(
            &mut out,
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
        );
        v.network_programming_duration.render(
            &mut out,
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
        );
        let gauge = |out: &mut String, name: &str, help: &str, value: f64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        gauge(
            &mut out,
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            v.last_sync_timestamp,
        );
        gauge(
            &mut out,
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            v.last_queued_timestamp,
        );
        counter(
            &mut out,
            "kubeproxy_sync_proxy_rules_service_changes_total",
            "Cumulative proxy rules Service changes",
            v.service_changes,
        );
        counter(
            &mut out,
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            "Cumulative proxy rules Endpoint changes",
            v.endpoint_changes,
        );
        counter(
            &mut out,
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
            "Cumulative proxy nftables sync failures",
            v.sync_failures,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_renders_cumulative_buckets() {
        let mut h = Histogram::new(vec![0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(5.0);
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
    }

    #[test]
    fn renders_upstream_names() {
        let m = Metrics::default();
        m.observe_sync(true, Duration::from_millis(20), 1000.0);
        m.update(|v| v.service_changes += 2);
        let text = m.render();
        for name in [
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count 1",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count 0",
            "kubeproxy_network_programming_duration_seconds_bucket",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds 1000",
            "kubeproxy_sync_proxy_rules_service_changes_total 2",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 0",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
        assert_eq!(network_programming_buckets().len(), 2 + 59 + 12 + 7);
    }
}
