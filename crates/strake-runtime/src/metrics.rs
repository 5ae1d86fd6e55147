//! cAdvisor-style metrics for `ListMetricDescriptors` and `ListPodSandboxMetrics`, the RPCs an
//! upstream kubelet with `PodAndContainerStatsFromCRI` reads to serve `/metrics/cadvisor`
//! without cAdvisor.
//!
//! The names, help texts and label keys follow cAdvisor's as containerd 2 serves them: every
//! container metric is labelled `pod`, `namespace`, `container`, `id`, `image`; network metrics
//! add `interface` and filesystem metrics `device`. The pod's network counters are reported
//! once, on the pod, with `container="POD"` (cAdvisor's name for the pod's infra container).
//! Values are the CRI's unsigned integers: seconds are whole seconds, as in containerd.
//!
//! The kubelet turns each [`cri::Metric`] into a Prometheus sample with the descriptor of the
//! same name and drops any whose label values do not match the descriptor's keys in number, so
//! every metric here is built from a [`Def`] in [`DEFS`], whose label set fixes its count;
//! `every_metric_matches_its_descriptor` checks it. Start at [`descriptors`] and
//! [`pod_metrics`].

use strake_types::cri;

use crate::cgroups::ContainerCgroup;
use crate::container::{Container, Containers};
use crate::sandbox::Sandbox;
use crate::stats;

/// The label keys every metric carries.
pub const BASE_LABELS: [&str; 5] = ["pod", "namespace", "container", "id", "image"];

/// Which label keys a metric has beyond [`BASE_LABELS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extra {
    None,
    /// Network metrics, per interface.
    Interface,
    /// Filesystem metrics, per device (here: the writable layer's directory).
    Device,
}

impl Extra {
    fn key(self) -> Option<&'static str> {
        match self {
            Extra::None => None,
            Extra::Interface => Some("interface"),
            Extra::Device => Some("device"),
        }
    }
}

/// One metric's description.
#[derive(Debug)]
pub struct Def {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: cri::MetricType,
    pub extra: Extra,
}

const fn counter(name: &'static str, help: &'static str, extra: Extra) -> Def {
    Def {
        name,
        help,
        kind: cri::MetricType::Counter,
        extra,
    }
}

const fn gauge(name: &'static str, help: &'static str, extra: Extra) -> Def {
    Def {
        name,
        help,
        kind: cri::MetricType::Gauge,
        extra,
    }
}

pub const CPU_USAGE: Def = counter(
    "container_cpu_usage_seconds_total",
    "Cumulative CPU time consumed in seconds.",
    Extra::None,
);
pub const CPU_USER: Def = counter(
    "container_cpu_user_seconds_total",
    "Cumulative user CPU time consumed in seconds.",
    Extra::None,
);
pub const CPU_SYSTEM: Def = counter(
    "container_cpu_system_seconds_total",
    "Cumulative system CPU time consumed in seconds.",
    Extra::None,
);
pub const CPU_PERIODS: Def = counter(
    "container_cpu_cfs_periods_total",
    "Number of elapsed enforcement period intervals.",
    Extra::None,
);
pub const CPU_THROTTLED_PERIODS: Def = counter(
    "container_cpu_cfs_throttled_periods_total",
    "Number of throttled period intervals.",
    Extra::None,
);
pub const CPU_THROTTLED: Def = counter(
    "container_cpu_cfs_throttled_seconds_total",
    "Total time duration the container has been throttled.",
    Extra::None,
);
pub const MEMORY_USAGE: Def = gauge(
    "container_memory_usage_bytes",
    "Current memory usage in bytes, including all memory regardless of when it was accessed.",
    Extra::None,
);
pub const MEMORY_WORKING_SET: Def = gauge(
    "container_memory_working_set_bytes",
    "Current working set in bytes.",
    Extra::None,
);
pub const MEMORY_RSS: Def = gauge("container_memory_rss", "Size of RSS in bytes.", Extra::None);
pub const MEMORY_CACHE: Def = gauge(
    "container_memory_cache",
    "Number of bytes of page cache memory.",
    Extra::None,
);
pub const MEMORY_MAPPED_FILE: Def = gauge(
    "container_memory_mapped_file",
    "Size of memory mapped files in bytes.",
    Extra::None,
);
pub const MEMORY_SWAP: Def = gauge(
    "container_memory_swap",
    "Container swap usage in bytes.",
    Extra::None,
);
pub const MEMORY_MAX_USAGE: Def = gauge(
    "container_memory_max_usage_bytes",
    "Maximum memory usage recorded in bytes.",
    Extra::None,
);
pub const MEMORY_FAILCNT: Def = counter(
    "container_memory_failcnt",
    "Number of memory usage hits limits.",
    Extra::None,
);
pub const OOM_EVENTS: Def = counter(
    "container_oom_events_total",
    "Count of out of memory events observed for the container.",
    Extra::None,
);
pub const PROCESSES: Def = gauge(
    "container_processes",
    "Number of processes running inside the container.",
    Extra::None,
);
pub const THREADS: Def = gauge(
    "container_threads",
    "Number of threads running inside the container.",
    Extra::None,
);
pub const FS_USAGE: Def = gauge(
    "container_fs_usage_bytes",
    "Number of bytes that are consumed by the container on this filesystem.",
    Extra::Device,
);
pub const FS_INODES_USED: Def = gauge(
    "container_fs_inodes_used",
    "Number of inodes the container uses on this filesystem.",
    Extra::Device,
);
pub const START_TIME: Def = gauge(
    "container_start_time_seconds",
    "Start time of the container since unix epoch in seconds.",
    Extra::None,
);
pub const LAST_SEEN: Def = gauge(
    "container_last_seen",
    "Last time a container was seen by the exporter.",
    Extra::None,
);
pub const SPEC_CPU_PERIOD: Def = gauge(
    "container_spec_cpu_period",
    "CPU period of the container.",
    Extra::None,
);
pub const SPEC_CPU_QUOTA: Def = gauge(
    "container_spec_cpu_quota",
    "CPU quota of the container.",
    Extra::None,
);
pub const SPEC_CPU_SHARES: Def = gauge(
    "container_spec_cpu_shares",
    "CPU share of the container.",
    Extra::None,
);
pub const SPEC_MEMORY_LIMIT: Def = gauge(
    "container_spec_memory_limit_bytes",
    "Memory limit for the container.",
    Extra::None,
);
pub const NET_RX_BYTES: Def = counter(
    "container_network_receive_bytes_total",
    "Cumulative count of bytes received.",
    Extra::Interface,
);
pub const NET_RX_PACKETS: Def = counter(
    "container_network_receive_packets_total",
    "Cumulative count of packets received.",
    Extra::Interface,
);
pub const NET_RX_DROPPED: Def = counter(
    "container_network_receive_packets_dropped_total",
    "Cumulative count of packets dropped while receiving.",
    Extra::Interface,
);
pub const NET_RX_ERRORS: Def = counter(
    "container_network_receive_errors_total",
    "Cumulative count of errors encountered while receiving.",
    Extra::Interface,
);
pub const NET_TX_BYTES: Def = counter(
    "container_network_transmit_bytes_total",
    "Cumulative count of bytes transmitted.",
    Extra::Interface,
);
pub const NET_TX_PACKETS: Def = counter(
    "container_network_transmit_packets_total",
    "Cumulative count of packets transmitted.",
    Extra::Interface,
);
pub const NET_TX_DROPPED: Def = counter(
    "container_network_transmit_packets_dropped_total",
    "Cumulative count of packets dropped while transmitting.",
    Extra::Interface,
);
pub const NET_TX_ERRORS: Def = counter(
    "container_network_transmit_errors_total",
    "Cumulative count of errors encountered while transmitting.",
    Extra::Interface,
);

/// Every metric this runtime reports.
pub const DEFS: &[&Def] = &[
    &CPU_USAGE,
    &CPU_USER,
    &CPU_SYSTEM,
    &CPU_PERIODS,
    &CPU_THROTTLED_PERIODS,
    &CPU_THROTTLED,
    &MEMORY_USAGE,
    &MEMORY_WORKING_SET,
    &MEMORY_RSS,
    &MEMORY_CACHE,
    &MEMORY_MAPPED_FILE,
    &MEMORY_SWAP,
    &MEMORY_MAX_USAGE,
    &MEMORY_FAILCNT,
    &OOM_EVENTS,
    &PROCESSES,
    &THREADS,
    &FS_USAGE,
    &FS_INODES_USED,
    &START_TIME,
    &LAST_SEEN,
    &SPEC_CPU_PERIOD,
    &SPEC_CPU_QUOTA,
    &SPEC_CPU_SHARES,
    &SPEC_MEMORY_LIMIT,
    &NET_RX_BYTES,
    &NET_RX_PACKETS,
    &NET_RX_DROPPED,
    &NET_RX_ERRORS,
    &NET_TX_BYTES,
    &NET_TX_PACKETS,
    &NET_TX_DROPPED,
    &NET_TX_ERRORS,
];

/// ListMetricDescriptors: one descriptor per [`DEFS`] entry.
pub fn descriptors() -> Vec<cri::MetricDescriptor> {
    DEFS.iter()
        .map(|d| cri::MetricDescriptor {
            name: d.name.to_string(),
            help: d.help.to_string(),
            label_keys: BASE_LABELS
                .iter()
                .copied()
                .chain(d.extra.key())
                .map(str::to_string)
                .collect(),
        })
        .collect()
}

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// Collects metrics that share the base label values.
struct Samples {
    base: [String; 5],
    timestamp: i64,
    out: Vec<cri::Metric>,
}

impl Samples {
    /// `base` in [`BASE_LABELS`] order.
    fn new(base: [String; 5], timestamp: i64) -> Self {
        Samples {
            base,
            timestamp,
            out: Vec::new(),
        }
    }

    /// A metric without extra labels; a reading the kernel does not offer is left out.
    fn add(&mut self, def: &Def, value: Option<u64>) {
        debug_assert_eq!(def.extra, Extra::None, "{}", def.name);
        self.push(def, None, value);
    }

    /// A metric with its extra label's value.
    fn add_with(&mut self, def: &Def, extra: &str, value: Option<u64>) {
        debug_assert_ne!(def.extra, Extra::None, "{}", def.name);
        self.push(def, Some(extra), value);
    }

    fn push(&mut self, def: &Def, extra: Option<&str>, value: Option<u64>) {
        let Some(value) = value else { return };
        self.out.push(cri::Metric {
            name: def.name.to_string(),
            timestamp: self.timestamp,
            metric_type: def.kind as i32,
            label_values: self
                .base
                .iter()
                .cloned()
                .chain(extra.map(str::to_string))
                .collect(),
            value: Some(cri::UInt64Value { value }),
        });
    }
}

/// What one container's cgroup reads as: the readings [`container_metrics`] reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupReadings {
    pub cpu_ns: Option<u64>,
    pub cpu: crate::cgroups::CpuStat,
    pub memory_usage: Option<u64>,
    pub working_set: Option<u64>,
    pub rss: Option<u64>,
    pub cache: Option<u64>,
    pub mapped_file: Option<u64>,
    pub swap: Option<u64>,
    pub max_usage: Option<u64>,
    pub failcnt: Option<u64>,
    pub oom_kills: Option<u64>,
    pub processes: Option<u64>,
    pub threads: Option<u64>,
}

impl CgroupReadings {
    /// Reads a cgroup; what is missing stays `None`.
    pub fn of(cg: &ContainerCgroup) -> Self {
        let stat = cg.memory_stat().ok().flatten().unwrap_or_default();
        // v1 reports the hierarchy's totals with a `total_` prefix; v2 has only those.
        let key = |v1: &str, v2: &str| match cg {
            ContainerCgroup::V1(_) => stat.get(v1).copied(),
            ContainerCgroup::V2(_) => stat.get(v2).copied(),
        };
        CgroupReadings {
            cpu_ns: cg.cpu_usage_nanos().ok().flatten(),
            cpu: cg.cpu_stat(),
            memory_usage: cg.memory_usage().ok().flatten(),
            working_set: cg.memory_working_set().ok().flatten(),
            rss: key("total_rss", "anon"),
            cache: key("total_cache", "file"),
            mapped_file: key("total_mapped_file", "file_mapped"),
            swap: cg.swap().map(|(used, _)| used),
            max_usage: cg.memory_peak(),
            failcnt: cg.memory_failcnt(),
            oom_kills: cg.oom_kills().ok().flatten(),
            processes: cg.processes(),
            threads: cg.pids(),
        }
    }
}

/// What a container reports besides its cgroup.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ContainerFacts {
    /// Nanoseconds since the epoch; 0 when not started.
    pub started_at_ns: i64,
    /// The writable layer's directory, bytes and inodes.
    pub writable_layer: Option<(String, u64, u64)>,
    pub resources: Option<cri::LinuxContainerResources>,
}

/// The metrics of one container, labelled with `base` (in [`BASE_LABELS`] order). A stopped
/// container has no cgroup: it reports its start time, writable layer and spec only.
pub fn container_metrics(
    base: [String; 5],
    cgroup: Option<&CgroupReadings>,
    facts: &ContainerFacts,
    timestamp: i64,
) -> Vec<cri::Metric> {
    let secs = |ns: Option<u64>| ns.map(|n| n / NANOS_PER_SECOND);
    let mut m = Samples::new(base, timestamp);
    if let Some(r) = cgroup {
        m.add(&CPU_USAGE, secs(r.cpu_ns));
        m.add(&CPU_USER, secs(r.cpu.user_ns));
        m.add(&CPU_SYSTEM, secs(r.cpu.system_ns));
        m.add(&CPU_PERIODS, r.cpu.periods);
        m.add(&CPU_THROTTLED_PERIODS, r.cpu.throttled_periods);
        m.add(&CPU_THROTTLED, secs(r.cpu.throttled_ns));
        m.add(&MEMORY_USAGE, r.memory_usage);
        m.add(&MEMORY_WORKING_SET, r.working_set);
        m.add(&MEMORY_RSS, r.rss);
        m.add(&MEMORY_CACHE, r.cache);
        m.add(&MEMORY_MAPPED_FILE, r.mapped_file);
        m.add(&MEMORY_SWAP, r.swap);
        m.add(&MEMORY_MAX_USAGE, r.max_usage);
        m.add(&MEMORY_FAILCNT, r.failcnt);
        m.add(&OOM_EVENTS, r.oom_kills);
        m.add(&PROCESSES, r.processes);
        m.add(&THREADS, r.threads);
        m.add(
            &LAST_SEEN,
            u64::try_from(timestamp).ok().map(|t| t / NANOS_PER_SECOND),
        );
    }
    if let Some((dir, bytes, inodes)) = &facts.writable_layer {
        m.add_with(&FS_USAGE, dir, Some(*bytes));
        m.add_with(&FS_INODES_USED, dir, Some(*inodes));
    }
    let started = u64::try_from(facts.started_at_ns).ok().filter(|&t| t > 0);
    m.add(&START_TIME, secs(started));
    if let Some(r) = &facts.resources {
        let set = |v: i64| u64::try_from(v).ok().filter(|&v| v > 0);
        m.add(&SPEC_CPU_PERIOD, set(r.cpu_period));
        m.add(&SPEC_CPU_QUOTA, set(r.cpu_quota));
        m.add(&SPEC_CPU_SHARES, set(r.cpu_shares));
        m.add(&SPEC_MEMORY_LIMIT, set(r.memory_limit_in_bytes));
    }
    m.out
}

/// The pod's own metrics: its network namespace's interfaces, labelled `container="POD"`.
pub fn network_metrics(
    base: [String; 5],
    interfaces: &[stats::InterfaceCounters],
    timestamp: i64,
) -> Vec<cri::Metric> {
    let mut m = Samples::new(base, timestamp);
    for i in interfaces {
        let name = i.name.as_str();
        m.add_with(&NET_RX_BYTES, name, Some(i.rx_bytes));
        m.add_with(&NET_RX_PACKETS, name, Some(i.rx_packets));
        m.add_with(&NET_RX_DROPPED, name, Some(i.rx_dropped));
        m.add_with(&NET_RX_ERRORS, name, Some(i.rx_errors));
        m.add_with(&NET_TX_BYTES, name, Some(i.tx_bytes));
        m.add_with(&NET_TX_PACKETS, name, Some(i.tx_packets));
        m.add_with(&NET_TX_DROPPED, name, Some(i.tx_dropped));
        m.add_with(&NET_TX_ERRORS, name, Some(i.tx_errors));
    }
    m.out
}

/// The name the pod's infra container goes by in cAdvisor's labels.
pub const POD_CONTAINER: &str = "POD";

/// The metrics of one pod and its containers (blocking: reads cgroups and walks writable
/// layers).
pub fn pod_metrics(
    containers: &Containers,
    sb: &Sandbox,
    timestamp: i64,
) -> cri::PodSandboxMetrics {
    let meta = sb.config.metadata.clone().unwrap_or_default();
    let pod_base = |container: &str, id: &str, image: &str| {
        [
            meta.name.clone(),
            meta.namespace.clone(),
            container.to_string(),
            id.to_string(),
            image.to_string(),
        ]
    };
    let metrics = stats::network_pid(sb)
        .and_then(stats::interfaces)
        .map(|ifs| network_metrics(pod_base(POD_CONTAINER, &sb.record.id, ""), &ifs, timestamp))
        .unwrap_or_default();
    let container_metrics = containers
        .of_sandbox(&sb.record.id)
        .iter()
        .filter_map(|id| containers.get(id).ok())
        .map(|c| one_container(containers, &c, &pod_base, timestamp))
        .collect();
    cri::PodSandboxMetrics {
        pod_sandbox_id: sb.record.id.clone(),
        metrics,
        container_metrics,
    }
}

fn one_container(
    containers: &Containers,
    c: &Container,
    pod_base: &dyn Fn(&str, &str, &str) -> [String; 5],
    timestamp: i64,
) -> cri::ContainerMetrics {
    let name = c
        .config
        .metadata
        .as_ref()
        .map(|m| m.name.as_str())
        .unwrap_or_default();
    let readings = containers.cgroup(c).map(|cg| CgroupReadings::of(&cg));
    let upper = containers.upper_dir(&c.record.id);
    let (bytes, inodes) = stats::disk_usage(&upper);
    let facts = ContainerFacts {
        started_at_ns: c.record.started_at_ns,
        writable_layer: Some((upper.display().to_string(), bytes, inodes)),
        resources: c.config.linux.as_ref().and_then(|l| l.resources.clone()),
    };
    cri::ContainerMetrics {
        container_id: c.record.id.clone(),
        metrics: container_metrics(
            pod_base(name, &c.record.id, &c.record.image),
            readings.as_ref(),
            &facts,
            timestamp,
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    fn base() -> [String; 5] {
        ["web", "prod", "app", "c1", "registry/app:1"].map(String::from)
    }

    fn full_readings() -> CgroupReadings {
        CgroupReadings {
            cpu_ns: Some(3_700_000_000),
            cpu: crate::cgroups::CpuStat {
                user_ns: Some(2_000_000_000),
                system_ns: Some(1_500_000_000),
                periods: Some(10),
                throttled_periods: Some(4),
                throttled_ns: Some(5_000_000_000),
            },
            memory_usage: Some(1000),
            working_set: Some(800),
            rss: Some(600),
            cache: Some(300),
            mapped_file: Some(50),
            swap: Some(0),
            max_usage: Some(1200),
            failcnt: Some(1),
            oom_kills: Some(2),
            processes: Some(3),
            threads: Some(5),
        }
    }

    fn full_facts() -> ContainerFacts {
        ContainerFacts {
            started_at_ns: 1_700_000_000_500_000_000,
            writable_layer: Some(("/state/c1/upper".into(), 4096, 2)),
            resources: Some(cri::LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: 50_000,
                cpu_shares: 512,
                memory_limit_in_bytes: 64 << 20,
                ..Default::default()
            }),
        }
    }

    fn interfaces() -> Vec<stats::InterfaceCounters> {
        vec![stats::InterfaceCounters {
            name: "eth0".into(),
            rx_bytes: 1,
            rx_packets: 2,
            rx_errors: 3,
            rx_dropped: 4,
            tx_bytes: 5,
            tx_packets: 6,
            tx_errors: 7,
            tx_dropped: 8,
        }]
    }

    #[test]
    fn every_metric_matches_its_descriptor() {
        let descs: HashMap<String, cri::MetricDescriptor> = descriptors()
            .into_iter()
            .map(|d| (d.name.clone(), d))
            .collect();
        assert_eq!(descs.len(), DEFS.len(), "descriptor names are unique");
        let mut metrics = container_metrics(base(), Some(&full_readings()), &full_facts(), 7);
        metrics.extend(network_metrics(base(), &interfaces(), 7));
        let reported: HashSet<&str> = metrics.iter().map(|m| m.name.as_str()).collect();
        // Every descriptor is used, and every metric is described with as many keys as it has
        // label values (the kubelet drops it otherwise).
        assert_eq!(
            reported,
            descs.keys().map(String::as_str).collect::<HashSet<_>>()
        );
        for m in &metrics {
            let d = &descs[&m.name];
            assert_eq!(m.label_values.len(), d.label_keys.len(), "{}", m.name);
            assert_eq!(&m.label_values[..5], &base()[..], "{}", m.name);
            assert_eq!(m.timestamp, 7);
        }
        assert_eq!(
            descs["container_network_receive_bytes_total"].label_keys,
            ["pod", "namespace", "container", "id", "image", "interface"]
        );
        assert_eq!(
            descs["container_fs_usage_bytes"].label_keys,
            ["pod", "namespace", "container", "id", "image", "device"]
        );
    }

    #[test]
    fn values_are_whole_seconds_bytes_and_counts() {
        let metrics = container_metrics(base(), Some(&full_readings()), &full_facts(), 0);
        let get = |name: &str| {
            let m = metrics.iter().find(|m| m.name == name).unwrap();
            (m.value.unwrap().value, m.metric_type)
        };
        let counter = cri::MetricType::Counter as i32;
        let gauge = cri::MetricType::Gauge as i32;
        assert_eq!(get("container_cpu_usage_seconds_total"), (3, counter));
        assert_eq!(get("container_cpu_user_seconds_total"), (2, counter));
        assert_eq!(get("container_cpu_system_seconds_total"), (1, counter));
        assert_eq!(
            get("container_cpu_cfs_throttled_seconds_total"),
            (5, counter)
        );
        assert_eq!(
            get("container_cpu_cfs_throttled_periods_total"),
            (4, counter)
        );
        assert_eq!(get("container_memory_working_set_bytes"), (800, gauge));
        assert_eq!(get("container_memory_cache"), (300, gauge));
        assert_eq!(get("container_oom_events_total"), (2, counter));
        assert_eq!(get("container_threads"), (5, gauge));
        assert_eq!(get("container_start_time_seconds"), (1_700_000_000, gauge));
        assert_eq!(get("container_spec_cpu_shares"), (512, gauge));
        assert_eq!(get("container_spec_memory_limit_bytes"), (64 << 20, gauge));
        assert_eq!(get("container_fs_usage_bytes"), (4096, gauge));
        let fs = metrics
            .iter()
            .find(|m| m.name == "container_fs_usage_bytes")
            .unwrap();
        assert_eq!(fs.label_values[5], "/state/c1/upper");

        let net = network_metrics(base(), &interfaces(), 0);
        let n = |name: &str| {
            net.iter()
                .find(|m| m.name == name)
                .map(|m| (m.value.unwrap().value, m.label_values[5].clone()))
                .unwrap()
        };
        assert_eq!(
            n("container_network_receive_bytes_total"),
            (1, "eth0".into())
        );
        assert_eq!(
            n("container_network_receive_packets_dropped_total"),
            (4, "eth0".into())
        );
        assert_eq!(
            n("container_network_transmit_errors_total"),
            (7, "eth0".into())
        );
        assert_eq!(
            n("container_network_transmit_packets_dropped_total"),
            (8, "eth0".into())
        );
    }

    #[test]
    fn what_is_unknown_or_unset_is_left_out() {
        // A created, never started container without limits: no cgroup, no start time, no
        // spec; its writable layer only.
        let facts = ContainerFacts {
            started_at_ns: 0,
            writable_layer: Some(("/u".into(), 0, 0)),
            resources: Some(cri::LinuxContainerResources::default()),
        };
        let names: Vec<String> = container_metrics(base(), None, &facts, 1)
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(
            names,
            ["container_fs_usage_bytes", "container_fs_inodes_used"]
        );
        // A cgroup without swap accounting or failcnt (v2) reports neither.
        let readings = CgroupReadings {
            swap: None,
            failcnt: None,
            ..full_readings()
        };
        let metrics = container_metrics(base(), Some(&readings), &ContainerFacts::default(), 1);
        assert!(
            metrics
                .iter()
                .all(|m| m.name != "container_memory_swap" && m.name != "container_memory_failcnt")
        );
        assert!(metrics.iter().any(|m| m.name == "container_memory_rss"));
    }
}
