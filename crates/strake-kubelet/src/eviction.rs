//! The eviction manager: watches the node's memory, disk and PIDs and, when a threshold is
//! crossed, reports the pressure as a node condition and evicts pods one at a time until it
//! is relieved, as upstream's eviction manager does (`pkg/kubelet/eviction`).
//!
//! The decisions are pure ([`Tracker`], [`rank`], [`local_storage_violations`]); [`run`] feeds
//! them the node's summary every ten seconds and hands the chosen pod to its worker through
//! [`crate::pod_worker::EndRequests`]: phase Failed, reason `Evicted`, a `DisruptionTarget`
//! condition, and the grace period upstream gives (none for a hard threshold, the pod's own up
//! to `evictionMaxPodGracePeriod` for a soft one).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, PodCondition};
use tokio::time::Instant;

use crate::allocatable::{Signal, Threshold};
use crate::pod_status::Ending;
use crate::server::stats::{PodStats, Summary};

/// The reason of an evicted pod.
pub const REASON: &str = "Evicted";

/// How often upstream's eviction manager looks (`evictionMonitoringPeriod`).
pub const MONITORING_PERIOD: Duration = Duration::from_secs(10);

/// Upstream's grace period for a pod evicted on a hard threshold.
const IMMEDIATE_GRACE_SECONDS: i64 = 1;

/// How long an eviction waits for the evicted pod's containers to go before looking again.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Priority at and above which a pod is critical and never evicted (`SystemCriticalPriority`).
const SYSTEM_CRITICAL_PRIORITY: i32 = 2_000_000_000;

/// A threshold as the eviction manager applies it: hard (acted on at once) or soft (acted on
/// once crossed for its grace period).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvictionThreshold {
    pub threshold: Threshold,
    /// `None` for a hard threshold.
    pub grace: Option<Duration>,
}

/// `evictionHard`, `evictionSoft` with `evictionSoftGracePeriod`,
/// `evictionPressureTransitionPeriod` and `evictionMaxPodGracePeriod`.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub thresholds: Vec<EvictionThreshold>,
    /// How long a pressure condition stays after its threshold was last crossed (5m).
    pub pressure_transition: Duration,
    /// The longest grace period a pod evicted on a soft threshold gets (0: none).
    pub max_pod_grace_seconds: i64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            thresholds: Vec::new(),
            pressure_transition: Duration::from_secs(300),
            max_pod_grace_seconds: 0,
        }
    }
}

/// Parses `evictionSoftGracePeriod` (`memory.available=1m30s`): a known signal and a
/// non-negative Go duration each.
pub fn parse_grace_periods(
    field: &str,
    periods: &BTreeMap<String, String>,
) -> Result<BTreeMap<Signal, Duration>, String> {
    periods
        .iter()
        .map(|(k, v)| {
            let signal = Signal::parse(k)
                .ok_or_else(|| format!("{field}: unsupported eviction signal {k:?}"))?;
            let d = strake_types::duration::parse(v)
                .map_err(|e| format!("{field}[{k}]: invalid eviction grace period: {e}"))?;
            Ok((signal, d))
        })
        .collect()
}

/// Joins hard and soft thresholds; every soft threshold needs a grace period, as upstream.
pub fn thresholds(
    hard: &[Threshold],
    soft: &[Threshold],
    grace: &BTreeMap<Signal, Duration>,
) -> Result<Vec<EvictionThreshold>, String> {
    let mut out: Vec<EvictionThreshold> = hard
        .iter()
        .map(|t| EvictionThreshold {
            threshold: *t,
            grace: None,
        })
        .collect();
    for t in soft {
        let g = grace.get(&t.signal).ok_or_else(|| {
            format!(
                "grace period must be specified for the soft eviction threshold {}",
                t.signal.name()
            )
        })?;
        out.push(EvictionThreshold {
            threshold: *t,
            grace: Some(*g),
        });
    }
    Ok(out)
}

/// One signal's observed value: `available` units of a resource of `capacity` units.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Observation {
    pub available: i128,
    pub capacity: i128,
}

/// The signals' values from the node's summary (upstream's `makeSignalObservations`). The
/// image filesystem is the runtime's, or the node's when the runtime reports none.
pub fn observe(summary: &Summary) -> BTreeMap<Signal, Observation> {
    let mut out = BTreeMap::new();
    let node = &summary.node;
    if let Some(m) = &node.memory
        && let (Some(avail), Some(ws)) = (m.available_bytes, m.working_set_bytes)
    {
        out.insert(
            Signal::MemoryAvailable,
            Observation {
                available: avail.into(),
                capacity: i128::from(avail) + i128::from(ws),
            },
        );
    }
    let fs = |out: &mut BTreeMap<Signal, Observation>,
              fs: &crate::server::stats::FsStats,
              bytes: Signal,
              inodes: Signal| {
        if let (Some(a), Some(c)) = (fs.available_bytes, fs.capacity_bytes) {
            out.insert(
                bytes,
                Observation {
                    available: a.into(),
                    capacity: c.into(),
                },
            );
        }
        if let (Some(a), Some(c)) = (fs.inodes_free, fs.inodes) {
            out.insert(
                inodes,
                Observation {
                    available: a.into(),
                    capacity: c.into(),
                },
            );
        }
    };
    if let Some(n) = &node.fs {
        fs(
            &mut out,
            n,
            Signal::NodeFsAvailable,
            Signal::NodeFsInodesFree,
        );
    }
    let image_fs = node
        .runtime
        .as_ref()
        .and_then(|r| r.image_fs.as_ref())
        .or(node.fs.as_ref());
    if let Some(i) = image_fs {
        fs(
            &mut out,
            i,
            Signal::ImageFsAvailable,
            Signal::ImageFsInodesFree,
        );
    }
    if let Some(r) = &node.rlimit
        && let (Some(max), Some(cur)) = (r.maxpid, r.curproc)
    {
        out.insert(
            Signal::PidAvailable,
            Observation {
                available: i128::from(max) - i128::from(cur),
                capacity: max.into(),
            },
        );
    }
    out
}

/// Whether `t` is crossed by what was observed of its signal (unobserved: not crossed).
fn crossed(t: &Threshold, obs: &BTreeMap<Signal, Observation>) -> bool {
    obs.get(&t.signal)
        .is_some_and(|o| o.available < t.value.units_of(o.capacity))
}

/// The node condition a signal's pressure shows as.
pub fn condition_of(signal: Signal) -> &'static str {
    match signal {
        Signal::MemoryAvailable | Signal::AllocatableMemoryAvailable => "MemoryPressure",
        Signal::PidAvailable => "PIDPressure",
        _ => "DiskPressure",
    }
}

/// The resource a signal's pressure is relieved of, as upstream names it in messages.
pub fn resource_of(signal: Signal) -> &'static str {
    match signal {
        Signal::MemoryAvailable | Signal::AllocatableMemoryAvailable => "memory",
        Signal::PidAvailable => "pids",
        Signal::NodeFsInodesFree | Signal::ImageFsInodesFree | Signal::ContainerFsInodesFree => {
            "inodes"
        }
        _ => "ephemeral-storage",
    }
}

/// What one look at the node decided.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decision {
    /// The pressure conditions the node reports now.
    pub conditions: BTreeSet<&'static str>,
    /// The thresholds crossed for their whole grace period: the ones to act on, memory first.
    pub act_on: Vec<EvictionThreshold>,
}

/// The eviction manager's memory between looks: when each threshold was first seen crossed,
/// and when each condition was last.
#[derive(Debug, Default)]
pub struct Tracker {
    first_crossed: Vec<(EvictionThreshold, Instant)>,
    last_pressure: BTreeMap<&'static str, Instant>,
}

impl Tracker {
    /// Takes a new observation at `now` (upstream's `synchronize`, without memcg notifiers).
    pub fn update(
        &mut self,
        policy: &Policy,
        obs: &BTreeMap<Signal, Observation>,
        now: Instant,
    ) -> Decision {
        let crossed_now: Vec<EvictionThreshold> = policy
            .thresholds
            .iter()
            .filter(|t| crossed(&t.threshold, obs))
            .copied()
            .collect();
        // A threshold's first crossing is kept while it stays crossed.
        let mut first = Vec::new();
        for t in &crossed_now {
            let since = self
                .first_crossed
                .iter()
                .find(|(p, _)| p == t)
                .map_or(now, |(_, at)| *at);
            first.push((*t, since));
        }
        self.first_crossed = first;
        for t in &crossed_now {
            self.last_pressure
                .insert(condition_of(t.threshold.signal), now);
        }
        self.last_pressure
            .retain(|_, at| now.duration_since(*at) < policy.pressure_transition);
        let mut act_on: Vec<EvictionThreshold> = self
            .first_crossed
            .iter()
            .filter(|(t, since)| now.duration_since(*since) >= t.grace.unwrap_or_default())
            .map(|(t, _)| *t)
            .collect();
        // Memory is reclaimed first (upstream's `byEvictionPriority`).
        act_on.sort_by_key(|t| match condition_of(t.threshold.signal) {
            "MemoryPressure" => 0,
            "DiskPressure" => 1,
            _ => 2,
        });
        Decision {
            conditions: self.last_pressure.keys().copied().collect(),
            act_on,
        }
    }
}

/// Whether the kubelet never evicts `pod`: static and mirror pods, and pods of system-critical
/// priority (upstream's `IsCriticalPod`).
pub fn is_critical(pod: &Pod) -> bool {
    crate::static_pods::is_static(pod)
        || pod
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"))
        || priority(pod) >= SYSTEM_CRITICAL_PRIORITY
}

fn priority(pod: &Pod) -> i32 {
    pod.spec.as_ref().and_then(|s| s.priority).unwrap_or(0)
}

fn request_bytes(pod: &Pod, resource: &str) -> i128 {
    crate::predicates::pod_requests(pod)
        .get(resource)
        .copied()
        .unwrap_or(0)
        / 1000
}

/// A pod's usage of the resource `signal` watches, from its stats: memory working set, local
/// ephemeral storage (rootfs, logs and local volumes), inodes, or processes.
pub fn usage(stats: &PodStats, signal: Signal) -> i128 {
    match resource_of(signal) {
        "memory" => stats
            .memory
            .as_ref()
            .and_then(|m| m.working_set_bytes)
            .map_or(0, i128::from),
        "inodes" => stats
            .ephemeral_storage
            .as_ref()
            .and_then(|f| f.inodes_used)
            .map_or(0, i128::from),
        "pids" => 0,
        _ => stats
            .ephemeral_storage
            .as_ref()
            .and_then(|f| f.used_bytes)
            .map_or(0, i128::from),
    }
}

/// Orders candidate pods for eviction on `signal`, first to go first (upstream's rank
/// functions): pods using more than they requested, then lower priority, then the larger
/// usage above request. PIDs rank by priority only. Pods without stats use nothing.
pub fn rank(pods: &mut [&Pod], stats: &BTreeMap<String, &PodStats>, signal: Signal) {
    let resource = match resource_of(signal) {
        "memory" => Some("memory"),
        "ephemeral-storage" => Some("ephemeral-storage"),
        _ => None,
    };
    let key = |p: &Pod| {
        let uid = p.metadata.uid.clone().unwrap_or_default();
        let used = stats.get(&uid).map_or(0, |s| usage(s, signal));
        let (exceeds, above) = match resource {
            Some(r) => {
                let req = request_bytes(p, r);
                (used > req, used - req)
            }
            None => (false, used),
        };
        // Sorts ascending: exceeding first, low priority first, large excess first.
        (!exceeds, priority(p), std::cmp::Reverse(above))
    };
    pods.sort_by_cached_key(|p| key(p));
}

/// The message of a pod evicted to reclaim `signal`'s resource (upstream's `evictionMessage`):
/// the starved resource, the threshold and what was available, and each container using more
/// than it requested.
pub fn message(
    signal: Signal,
    threshold: &Threshold,
    obs: Option<&Observation>,
    pod: &Pod,
    stats: Option<&PodStats>,
) -> String {
    let resource = resource_of(signal);
    let mut m = format!("The node was low on resource: {resource}. ");
    if let Some(o) = obs {
        let quantity = threshold.value.units_of(o.capacity);
        m += &format!(
            "Threshold quantity: {}, available: {}. ",
            quantity_string(quantity, resource),
            quantity_string(o.available, resource)
        );
    }
    let Some(stats) = stats else {
        return m;
    };
    let spec = pod.spec.clone().unwrap_or_default();
    for cs in &stats.containers {
        let Some(c) = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .find(|c| c.name == cs.name)
        else {
            continue;
        };
        let req_q = c
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref()?.get(resource).cloned());
        let req = req_q
            .as_ref()
            .and_then(|q| crate::resources::parse_milli(&q.0).ok())
            .map_or(0, |m| m / 1000);
        let used = match resource {
            "memory" => cs.memory.as_ref().and_then(|m| m.working_set_bytes),
            "ephemeral-storage" => match (&cs.rootfs, &cs.logs) {
                (Some(r), Some(l)) => Some(r.used_bytes.unwrap_or(0) + l.used_bytes.unwrap_or(0)),
                _ => None,
            },
            _ => None,
        };
        if let Some(u) = used
            && i128::from(u) > req
        {
            m += &format!(
                "Container {} was using {}, request is {}, has larger consumption of {resource}. ",
                c.name,
                quantity_string(u.into(), resource),
                req_q.map_or_else(|| "0".to_string(), |q| q.0)
            );
        }
    }
    m
}

/// A byte count as a Kubernetes quantity prints it (`1Gi`, `1500Ki`, `123`); counts of other
/// units plainly.
fn quantity_string(n: i128, resource: &str) -> String {
    if resource != "memory" && resource != "ephemeral-storage" {
        return n.to_string();
    }
    let mut n = n;
    for suffix in ["", "Ki", "Mi", "Gi", "Ti", "Pi"] {
        if n == 0 || n % 1024 != 0 || suffix == "Pi" {
            return format!("{n}{suffix}");
        }
        n /= 1024;
    }
    n.to_string()
}

/// The condition an evicted pod carries.
pub fn disruption_condition(message: &str) -> PodCondition {
    PodCondition {
        type_: "DisruptionTarget".into(),
        status: "True".into(),
        reason: Some("TerminationByKubelet".into()),
        message: Some(message.into()),
        ..Default::default()
    }
}

/// How the kubelet ends an evicted pod.
pub fn ending(message: String) -> Ending {
    Ending {
        condition: Some(disruption_condition(&message)),
        reason: REASON.into(),
        message,
    }
}

/// The grace period of a pod evicted on `t`: upstream's immediate one for a hard threshold,
/// the pod's own up to `max` for a soft one.
pub fn grace_seconds(t: &EvictionThreshold, pod: &Pod, max: i64) -> i64 {
    match t.grace {
        None => IMMEDIATE_GRACE_SECONDS,
        Some(_) => pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .map_or(max, |g| g.min(max)),
    }
}

/// Pods using more local storage than their spec allows, with upstream's message each:
/// an emptyDir past its `sizeLimit`, the pod past the sum of its containers'
/// `ephemeral-storage` limits, or a container past its own. These are evicted whatever the
/// node's thresholds say.
pub fn local_storage_violations(
    pods: &[&Pod],
    stats: &BTreeMap<String, &PodStats>,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for pod in pods {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let Some(st) = stats.get(&uid) else {
            continue;
        };
        if let Some(m) = violation(pod, st) {
            out.push((uid, m));
        }
    }
    out
}

fn violation(pod: &Pod, st: &PodStats) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let bytes = |q: &k8s_openapi::apimachinery::pkg::api::resource::Quantity| {
        crate::resources::parse_milli(&q.0).ok().map(|m| m / 1000)
    };
    for v in spec.volumes.iter().flatten() {
        let Some(limit) = v.empty_dir.as_ref().and_then(|e| e.size_limit.as_ref()) else {
            continue;
        };
        let used = st
            .volumes
            .iter()
            .find(|s| s.name == v.name)
            .and_then(|s| s.fs.used_bytes);
        if let (Some(used), Some(max)) = (used, bytes(limit))
            && max > 0
            && i128::from(used) > max
        {
            return Some(format!(
                "Usage of EmptyDir volume {:?} exceeds the limit {:?}. ",
                v.name, limit.0
            ));
        }
    }
    let limits = crate::predicates::pod_limits(pod);
    let all_limited = spec.containers.iter().all(|c| {
        c.resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .is_some_and(|l| l.contains_key("ephemeral-storage"))
    });
    if all_limited
        && let Some(limit) = limits.get("ephemeral-storage")
        && let Some(used) = st.ephemeral_storage.as_ref().and_then(|f| f.used_bytes)
        && i128::from(used) > limit / 1000
    {
        return Some(format!(
            "Pod ephemeral local storage usage exceeds the total limit of containers {}. ",
            quantity_string(limit / 1000, "ephemeral-storage")
        ));
    }
    for cs in &st.containers {
        let Some(c) = spec.containers.iter().find(|c| c.name == cs.name) else {
            continue;
        };
        let Some(limit) = c
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref()?.get("ephemeral-storage"))
        else {
            continue;
        };
        let used = cs.rootfs.as_ref().and_then(|f| f.used_bytes).unwrap_or(0)
            + cs.logs.as_ref().and_then(|f| f.used_bytes).unwrap_or(0);
        if bytes(limit).is_some_and(|max| i128::from(used) > max) {
            return Some(format!(
                "Container {} exceeded its local ephemeral storage limit {:?}. ",
                c.name, limit.0
            ));
        }
    }
    None
}

/// The node's current pressure conditions, shared with the node status loop and admission.
pub type Pressure = tokio::sync::watch::Receiver<BTreeSet<&'static str>>;

/// Why a pod arriving under pressure is refused (upstream's eviction admission handler):
/// under memory pressure alone only BestEffort pods that do not tolerate it; under any other
/// pressure every pod; critical pods never.
pub fn admit(pod: &Pod, conditions: &BTreeSet<&'static str>) -> Result<(), String> {
    if conditions.is_empty() || is_critical(pod) {
        return Ok(());
    }
    let memory_only = conditions.len() == 1 && conditions.contains("MemoryPressure");
    if memory_only {
        let tolerates = pod
            .spec
            .as_ref()
            .and_then(|s| s.tolerations.as_ref())
            .is_some_and(|ts| {
                ts.iter().any(|t| {
                    (t.key.as_deref() == Some("node.kubernetes.io/memory-pressure")
                        || (t.key.is_none() && t.operator.as_deref() == Some("Exists")))
                        && t.effect.as_deref().is_none_or(|e| e == "NoSchedule")
                })
            });
        if crate::pod_spec::qos_class(pod) != "BestEffort" || tolerates {
            return Ok(());
        }
    }
    let names: Vec<&str> = conditions.iter().copied().collect();
    Err(format!("The node had condition: [{}]. ", names.join(" ")))
}

/// What the eviction loop needs besides the policy.
pub struct Inputs {
    pub runtime: crate::runtime::Runtime,
    pub client: kube::Client,
    pub pods: kube::runtime::reflector::Store<Pod>,
    pub config: crate::config::Config,
    pub end_requests: crate::pod_worker::EndRequests,
    pub nudges: crate::pleg::Nudges,
    pub pressure: tokio::sync::watch::Sender<BTreeSet<&'static str>>,
}

/// Looks at the node every [`MONITORING_PERIOD`], reports pressure and evicts at most one pod
/// per look (all pods past their local storage limits).
pub async fn run(inputs: Inputs, policy: Policy) {
    let rates = crate::server::stats::CpuRates::default();
    let events = crate::events::Events::new(Some(inputs.client.clone()), &inputs.config.node_name);
    let mut tracker = Tracker::default();
    loop {
        tokio::time::sleep(MONITORING_PERIOD).await;
        let summary = match node_summary(&inputs, &rates).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "eviction manager: no summary");
                continue;
            }
        };
        let obs = observe(&summary);
        let decision = tracker.update(&policy, &obs, Instant::now());
        inputs.pressure.send_if_modified(|c| {
            let changed = *c != decision.conditions;
            *c = decision.conditions.clone();
            changed
        });
        let all = inputs.pods.state();
        let active: Vec<&Pod> = all
            .iter()
            .map(|p| p.as_ref())
            .filter(|p| {
                p.spec.as_ref().and_then(|s| s.node_name.as_deref())
                    == Some(inputs.config.node_name.as_str())
                    && p.metadata.deletion_timestamp.is_none()
                    && !crate::pod_status::is_terminal(
                        p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    )
            })
            .collect();
        let stats: BTreeMap<String, &PodStats> = summary
            .pods
            .iter()
            .map(|p| (p.pod_ref.uid.clone(), p))
            .collect();
        let violators = local_storage_violations(&active, &stats);
        if !violators.is_empty() {
            for (uid, message) in violators {
                if let Some(pod) = active
                    .iter()
                    .find(|p| p.metadata.uid.as_deref() == Some(&uid))
                    && !is_critical(pod)
                {
                    evict(&inputs, &events, pod, message, 0);
                }
            }
            continue;
        }
        let Some(t) = decision.act_on.first().copied() else {
            continue;
        };
        let signal = t.threshold.signal;
        tracing::info!(
            resource = resource_of(signal),
            "eviction manager: attempting to reclaim"
        );
        events.emit_node(
            crate::events::Kind::Warning,
            "EvictionThresholdMet",
            format!("Attempting to reclaim {}", resource_of(signal)),
        );
        // Disk first gives back what no pod needs (upstream's node-level reclaim): the dead
        // containers of finished pods, then unused images (the containers' images may be
        // among them). Enough of it, and no pod goes.
        if resource_of(signal) != "memory" && resource_of(signal) != "pids" {
            let containers = remove_dead_containers_of_finished_pods(&inputs, &all).await;
            let images = crate::image_gc::remove_all_unused(&inputs.runtime)
                .await
                .unwrap_or(0);
            if containers + images > 0
                && let Ok(after) = node_summary(&inputs, &rates).await
                && !crossed(&t.threshold, &observe(&after))
            {
                tracing::info!(
                    containers,
                    images,
                    "eviction manager: reclaimed enough without evicting pods"
                );
                continue;
            }
        }
        let mut ranked: Vec<&Pod> = active.iter().copied().filter(|p| !is_critical(p)).collect();
        rank(&mut ranked, &stats, signal);
        let Some(pod) = ranked.first() else {
            tracing::warn!("eviction manager: thresholds met but no pod can be evicted");
            continue;
        };
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let m = message(
            signal,
            &t.threshold,
            obs.get(&signal),
            pod,
            stats.get(&uid).copied(),
        );
        let grace = grace_seconds(&t, pod, policy.max_pod_grace_seconds);
        evict(&inputs, &events, pod, m, grace);
        wait_for_cleanup(&inputs.runtime, &uid).await;
    }
}

/// The node's summary, as `/stats/summary` serves it.
async fn node_summary(
    inputs: &Inputs,
    rates: &crate::server::stats::CpuRates,
) -> Result<Summary, crate::runtime::RuntimeError> {
    crate::server::stats::summary(
        &inputs.runtime,
        rates,
        &inputs.config.node_name,
        &inputs.config.root_dir,
        &inputs.config.pod_logs_dir,
    )
    .await
}

fn evict(inputs: &Inputs, events: &crate::events::Events, pod: &Pod, message: String, grace: i64) {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    tracing::info!(
        pod = %format!("{}/{}", pod.metadata.namespace.as_deref().unwrap_or(""), pod.metadata.name.as_deref().unwrap_or("")),
        %message, "eviction manager: evicting pod"
    );
    events.emit(
        pod,
        None,
        crate::events::Kind::Warning,
        REASON,
        message.clone(),
    );
    inputs.end_requests.request(
        &uid,
        crate::pod_worker::EndRequest {
            ending: ending(message),
            grace_seconds: Some(grace),
        },
    );
    inputs.nudges.nudge(&uid);
}

/// The pod UID label the kubelet puts on every container and sandbox.
const POD_UID_LABEL: &str = "io.kubernetes.pod.uid";

/// Which pods are over on this node: their UIDs, from the pods bound here whose phase is
/// Succeeded or Failed. A pod being deleted is its worker's to clean up, and a container of a
/// UID the API does not know (a static pod's) is left alone.
pub fn finished_pods<'a>(pods: impl IntoIterator<Item = &'a Pod>, node: &str) -> BTreeSet<String> {
    pods.into_iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            crate::pod_status::is_terminal(p.status.as_ref().and_then(|s| s.phase.as_deref()))
        })
        .filter_map(|p| p.metadata.uid.clone())
        .collect()
}

/// Upstream's `DeleteAllUnusedContainers` under disk pressure, for the pods that are over: the
/// IDs of their containers that are not running and of their sandboxes that are not ready.
/// Dead instances of pods still running are kept: the newest one of each container is what
/// tells a `restartPolicy: Never` container from one never started (upstream removes those
/// too, and restarts such a container when its last instance is gone).
pub fn dead_of_finished(
    finished: &BTreeSet<String>,
    containers: &[strake_types::cri::Container],
    sandboxes: &[strake_types::cri::PodSandbox],
) -> (Vec<String>, Vec<String>) {
    use strake_types::cri::{ContainerState, PodSandboxState};
    let of_finished = |labels: &std::collections::HashMap<String, String>| {
        labels
            .get(POD_UID_LABEL)
            .is_some_and(|uid| finished.contains(uid))
    };
    let containers = containers
        .iter()
        .filter(|c| c.state != ContainerState::ContainerRunning as i32 && of_finished(&c.labels))
        .map(|c| c.id.clone())
        .collect();
    let sandboxes = sandboxes
        .iter()
        .filter(|s| s.state != PodSandboxState::SandboxReady as i32 && of_finished(&s.labels))
        .map(|s| s.id.clone())
        .collect();
    (containers, sandboxes)
}

/// Removes the dead containers (with their log files) and sandboxes of finished pods; returns
/// how many containers went.
async fn remove_dead_containers_of_finished_pods(
    inputs: &Inputs,
    pods: &[std::sync::Arc<Pod>],
) -> usize {
    use crate::runtime::Cri;
    let finished = finished_pods(pods.iter().map(|p| p.as_ref()), &inputs.config.node_name);
    if finished.is_empty() {
        return 0;
    }
    let (Ok(containers), Ok(sandboxes)) = (
        inputs.runtime.list_containers(None).await,
        inputs.runtime.list_sandboxes(None).await,
    ) else {
        return 0;
    };
    let (dead, empty) = dead_of_finished(&finished, &containers, &sandboxes);
    let mut removed = 0;
    for id in dead {
        let log = inputs
            .runtime
            .container_status(&id)
            .await
            .ok()
            .flatten()
            .map(|s| s.log_path)
            .filter(|l| !l.is_empty());
        if let Err(e) = inputs.runtime.remove_container(&id).await {
            tracing::debug!(container = %id, error = %e, "eviction manager: remove dead container");
            continue;
        }
        removed += 1;
        if let Some(log) = log {
            let dir = inputs.config.pod_logs_dir.clone();
            let _ = tokio::task::spawn_blocking(move || {
                crate::log_rotation::remove_container_log(&dir, std::path::Path::new(&log))
            })
            .await;
        }
    }
    for id in empty {
        if let Err(e) = inputs.runtime.remove_sandbox(&id).await {
            tracing::debug!(sandbox = %id, error = %e, "eviction manager: remove sandbox");
        }
    }
    if removed > 0 {
        tracing::info!(
            removed,
            "eviction manager: removed dead containers of finished pods"
        );
    }
    removed
}

/// Waits until nothing of pod `uid` runs any more, or [`CLEANUP_TIMEOUT`].
async fn wait_for_cleanup(runtime: &crate::runtime::Runtime, uid: &str) {
    use crate::runtime::Cri;
    let until = Instant::now() + CLEANUP_TIMEOUT;
    while Instant::now() < until {
        let running = runtime
            .list_containers(Some(uid))
            .await
            .map(|cs| {
                cs.iter()
                    .any(|c| c.state == strake_types::cri::ContainerState::ContainerRunning as i32)
            })
            .unwrap_or(false);
        if !running {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocatable::parse_thresholds;
    use crate::server::stats::{ContainerStats, FsStats, MemoryStats, PodReference, VolumeStats};

    fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn hard(kv: &[(&str, &str)]) -> Vec<Threshold> {
        parse_thresholds("evictionHard", &map(kv)).unwrap()
    }

    fn memory(available: i128) -> BTreeMap<Signal, Observation> {
        [(
            Signal::MemoryAvailable,
            Observation {
                available,
                capacity: 1 << 30,
            },
        )]
        .into()
    }

    #[test]
    fn soft_thresholds_need_a_grace_period_and_grace_periods_a_known_signal() {
        let soft = hard(&[("memory.available", "1Gi")]);
        let e = thresholds(&[], &soft, &BTreeMap::new()).unwrap_err();
        assert_eq!(
            e,
            "grace period must be specified for the soft eviction threshold memory.available"
        );
        let g = parse_grace_periods(
            "evictionSoftGracePeriod",
            &map(&[("memory.available", "1m30s")]),
        )
        .unwrap();
        assert_eq!(g[&Signal::MemoryAvailable], Duration::from_secs(90));
        let t = thresholds(&[], &soft, &g).unwrap();
        assert_eq!(t[0].grace, Some(Duration::from_secs(90)));
        for (k, v, want) in [
            ("memory.free", "1m", "unsupported eviction signal"),
            ("memory.available", "soon", "invalid eviction grace period"),
        ] {
            let e = parse_grace_periods("evictionSoftGracePeriod", &map(&[(k, v)])).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn a_hard_threshold_acts_at_once_and_the_condition_outlives_it_by_the_transition_period() {
        let policy = Policy {
            thresholds: thresholds(
                &hard(&[("memory.available", "100Mi")]),
                &[],
                &BTreeMap::new(),
            )
            .unwrap(),
            pressure_transition: Duration::from_secs(300),
            max_pod_grace_seconds: 0,
        };
        let mut t = Tracker::default();
        let t0 = Instant::now();
        let d = t.update(&policy, &memory(500 << 20), t0);
        assert!(d.conditions.is_empty() && d.act_on.is_empty());
        let d = t.update(&policy, &memory(50 << 20), t0 + Duration::from_secs(10));
        assert_eq!(d.conditions, BTreeSet::from(["MemoryPressure"]));
        assert_eq!(d.act_on.len(), 1);
        // Relieved: nothing to act on, but the condition holds for the transition period.
        let d = t.update(&policy, &memory(500 << 20), t0 + Duration::from_secs(20));
        assert!(d.act_on.is_empty());
        assert_eq!(d.conditions, BTreeSet::from(["MemoryPressure"]));
        let d = t.update(&policy, &memory(500 << 20), t0 + Duration::from_secs(311));
        assert!(d.conditions.is_empty());
    }

    #[test]
    fn a_soft_threshold_acts_only_once_crossed_for_its_grace_period() {
        let soft = hard(&[("memory.available", "1Gi")]);
        let grace = [(Signal::MemoryAvailable, Duration::from_secs(30))].into();
        let policy = Policy {
            thresholds: thresholds(&[], &soft, &grace).unwrap(),
            ..Default::default()
        };
        let mut t = Tracker::default();
        let t0 = Instant::now();
        let d = t.update(&policy, &memory(1 << 20), t0);
        assert_eq!(d.conditions, BTreeSet::from(["MemoryPressure"]));
        assert!(d.act_on.is_empty());
        assert!(
            t.update(&policy, &memory(1 << 20), t0 + Duration::from_secs(20))
                .act_on
                .is_empty()
        );
        assert_eq!(
            t.update(&policy, &memory(1 << 20), t0 + Duration::from_secs(30))
                .act_on
                .len(),
            1
        );
        // Crossed again after relief: the grace period starts over.
        t.update(&policy, &memory(2 << 30), t0 + Duration::from_secs(40));
        assert!(
            t.update(&policy, &memory(1 << 20), t0 + Duration::from_secs(50))
                .act_on
                .is_empty()
        );
    }

    #[test]
    fn percentages_apply_to_capacity_and_disk_and_pid_signals_map_to_their_conditions() {
        let policy = Policy {
            thresholds: thresholds(
                &hard(&[("nodefs.available", "10%"), ("pid.available", "100")]),
                &[],
                &BTreeMap::new(),
            )
            .unwrap(),
            ..Default::default()
        };
        let obs: BTreeMap<Signal, Observation> = [
            (
                Signal::NodeFsAvailable,
                Observation {
                    available: 9,
                    capacity: 100,
                },
            ),
            (
                Signal::PidAvailable,
                Observation {
                    available: 50,
                    capacity: 4096,
                },
            ),
            (
                Signal::MemoryAvailable,
                Observation {
                    available: 1,
                    capacity: 1 << 30,
                },
            ),
        ]
        .into();
        let d = Tracker::default().update(&policy, &obs, Instant::now());
        assert_eq!(
            d.conditions,
            BTreeSet::from(["DiskPressure", "PIDPressure"])
        );
        assert_eq!(d.act_on[0].threshold.signal, Signal::NodeFsAvailable);
        assert_eq!(resource_of(Signal::NodeFsAvailable), "ephemeral-storage");
        assert_eq!(resource_of(Signal::NodeFsInodesFree), "inodes");
    }

    #[test]
    fn observations_come_from_the_summary() {
        let mut s = Summary::default();
        s.node.memory = Some(MemoryStats {
            available_bytes: Some(300),
            working_set_bytes: Some(700),
            ..Default::default()
        });
        s.node.fs = Some(FsStats {
            available_bytes: Some(10),
            capacity_bytes: Some(100),
            inodes_free: Some(5),
            inodes: Some(50),
            ..Default::default()
        });
        let o = observe(&s);
        assert_eq!(
            o[&Signal::MemoryAvailable],
            Observation {
                available: 300,
                capacity: 1000
            }
        );
        assert_eq!(
            o[&Signal::NodeFsInodesFree],
            Observation {
                available: 5,
                capacity: 50
            }
        );
        // No image filesystem of the runtime's: the node's stands in.
        assert_eq!(o[&Signal::ImageFsAvailable], o[&Signal::NodeFsAvailable]);
        assert!(!o.contains_key(&Signal::PidAvailable));
        // The runtime's image filesystem (ImageFsInfo) when it reports one; the processes
        // from the node's rlimit figures (pid_max and the processes counted).
        s.node.runtime = Some(crate::server::stats::RuntimeStats {
            image_fs: Some(FsStats {
                available_bytes: Some(40),
                capacity_bytes: Some(400),
                inodes_free: Some(7),
                inodes: Some(70),
                ..Default::default()
            }),
        });
        s.node.rlimit = Some(crate::server::stats::RlimitStats {
            maxpid: Some(4_194_304),
            curproc: Some(1_304),
            ..Default::default()
        });
        let o = observe(&s);
        assert_eq!(
            o[&Signal::ImageFsAvailable],
            Observation {
                available: 40,
                capacity: 400
            }
        );
        assert_eq!(
            o[&Signal::ImageFsInodesFree],
            Observation {
                available: 7,
                capacity: 70
            }
        );
        assert_eq!(
            o[&Signal::PidAvailable],
            Observation {
                available: 4_194_304 - 1_304,
                capacity: 4_194_304
            }
        );
    }

    fn pod(name: &str, spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "namespace": "default", "uid": name },
            "spec": spec
        }))
        .unwrap()
    }

    fn container(requests: serde_json::Value) -> serde_json::Value {
        serde_json::json!({ "containers": [{ "name": "c", "image": "i",
            "resources": { "requests": requests, "limits": requests } }] })
    }

    fn stats(uid: &str, memory: u64, disk: u64) -> PodStats {
        PodStats {
            pod_ref: PodReference {
                uid: uid.into(),
                ..Default::default()
            },
            memory: Some(MemoryStats {
                working_set_bytes: Some(memory),
                ..Default::default()
            }),
            ephemeral_storage: Some(FsStats {
                used_bytes: Some(disk),
                ..Default::default()
            }),
            containers: vec![ContainerStats {
                name: "c".into(),
                memory: Some(MemoryStats {
                    working_set_bytes: Some(memory),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn ranking_puts_pods_over_their_requests_first_then_low_priority_then_large_excess() {
        let best_effort = pod(
            "be",
            serde_json::json!({ "containers": [{ "name": "c", "image": "i" }] }),
        );
        let guaranteed = pod(
            "g",
            container(serde_json::json!({ "memory": "1Gi", "cpu": "1" })),
        );
        let mut low = pod("low", container(serde_json::json!({ "memory": "10Mi" })));
        low.spec.as_mut().unwrap().priority = Some(-5);
        let big = pod("big", container(serde_json::json!({ "memory": "10Mi" })));
        let all = [
            stats("be", 5 << 20, 0),
            stats("g", 900 << 20, 0),
            stats("low", 20 << 20, 0),
            stats("big", 200 << 20, 0),
        ];
        let by_uid: BTreeMap<String, &PodStats> =
            all.iter().map(|s| (s.pod_ref.uid.clone(), s)).collect();
        let mut pods = vec![&guaranteed, &big, &best_effort, &low];
        rank(&mut pods, &by_uid, Signal::MemoryAvailable);
        let names: Vec<&str> = pods
            .iter()
            .map(|p| p.metadata.name.as_deref().unwrap())
            .collect();
        // Over their requests: low (priority -5), then big and be by excess; g within.
        assert_eq!(names, ["low", "big", "be", "g"]);
    }

    #[test]
    fn the_message_names_the_resource_threshold_and_offending_containers() {
        let p = pod(
            "be",
            serde_json::json!({ "containers": [{ "name": "c", "image": "i" }] }),
        );
        let t = hard(&[("memory.available", "100Mi")])[0];
        let m = message(
            Signal::MemoryAvailable,
            &t,
            Some(&Observation {
                available: 50 << 20,
                capacity: 1 << 30,
            }),
            &p,
            Some(&stats("be", 3 << 20, 0)),
        );
        assert_eq!(
            m,
            "The node was low on resource: memory. Threshold quantity: 100Mi, available: 50Mi. \
             Container c was using 3Mi, request is 0, has larger consumption of memory. "
        );
        let e = ending(m.clone());
        assert_eq!(
            (e.reason.as_str(), e.condition.unwrap().reason.as_deref()),
            ("Evicted", Some("TerminationByKubelet"))
        );
    }

    #[test]
    fn hard_evictions_are_immediate_and_soft_ones_get_the_pods_grace_up_to_the_max() {
        let t = hard(&[("memory.available", "1Gi")])[0];
        let p = pod(
            "p",
            serde_json::json!({ "terminationGracePeriodSeconds": 60, "containers": [] }),
        );
        let h = EvictionThreshold {
            threshold: t,
            grace: None,
        };
        let s = EvictionThreshold {
            threshold: t,
            grace: Some(Duration::from_secs(5)),
        };
        assert_eq!(grace_seconds(&h, &p, 30), 1);
        assert_eq!(grace_seconds(&s, &p, 30), 30);
        assert_eq!(grace_seconds(&s, &p, 90), 60);
    }

    #[test]
    fn local_storage_limits_evict_whatever_the_thresholds() {
        let empty_dir = pod(
            "ed",
            serde_json::json!({ "containers": [{ "name": "c", "image": "i" }],
                "volumes": [{ "name": "scratch", "emptyDir": { "sizeLimit": "1Mi" } }] }),
        );
        let limited = pod(
            "lim",
            serde_json::json!({ "containers": [{ "name": "c", "image": "i",
            "resources": { "limits": { "ephemeral-storage": "2Mi" } } }] }),
        );
        let fine = pod(
            "fine",
            serde_json::json!({ "containers": [{ "name": "c", "image": "i" }],
            "volumes": [{ "name": "scratch", "emptyDir": { "sizeLimit": "1Gi" } }] }),
        );
        let mut ed = stats("ed", 0, 5 << 20);
        ed.volumes = vec![VolumeStats {
            name: "scratch".into(),
            fs: FsStats {
                used_bytes: Some(4 << 20),
                ..Default::default()
            },
        }];
        let lim = stats("lim", 0, 3 << 20);
        let mut ok = stats("fine", 0, 5 << 20);
        ok.volumes = ed.volumes.clone();
        let by_uid: BTreeMap<String, &PodStats> = [
            ("ed".to_string(), &ed),
            ("lim".to_string(), &lim),
            ("fine".to_string(), &ok),
        ]
        .into();
        let v = local_storage_violations(&[&empty_dir, &limited, &fine], &by_uid);
        assert_eq!(
            v,
            [
                (
                    "ed".to_string(),
                    "Usage of EmptyDir volume \"scratch\" exceeds the limit \"1Mi\". ".to_string()
                ),
                (
                    "lim".to_string(),
                    "Pod ephemeral local storage usage exceeds the total limit of containers 2Mi. "
                        .to_string()
                ),
            ]
        );
    }

    #[test]
    fn admission_under_pressure_refuses_best_effort_pods_then_all() {
        let be = pod(
            "be",
            serde_json::json!({ "containers": [{ "name": "c", "image": "i" }] }),
        );
        let burst = pod("b", container(serde_json::json!({ "memory": "10Mi" })));
        let mut critical = be.clone();
        critical.spec.as_mut().unwrap().priority = Some(2_000_001_000);
        let memory = BTreeSet::from(["MemoryPressure"]);
        assert_eq!(
            admit(&be, &memory).unwrap_err(),
            "The node had condition: [MemoryPressure]. "
        );
        assert!(admit(&burst, &memory).is_ok());
        assert!(admit(&critical, &memory).is_ok());
        let both = BTreeSet::from(["DiskPressure", "MemoryPressure"]);
        assert_eq!(
            admit(&burst, &both).unwrap_err(),
            "The node had condition: [DiskPressure MemoryPressure]. "
        );
        assert!(admit(&be, &BTreeSet::new()).is_ok());
    }

    #[test]
    fn only_dead_containers_and_sandboxes_of_finished_pods_are_reclaimed() {
        use strake_types::cri;
        let p = |uid: &str, node: &str, phase: &str, deleting: bool| -> Pod {
            let mut v = serde_json::json!({
                "metadata": { "name": uid, "namespace": "ns", "uid": uid },
                "spec": { "nodeName": node, "containers": [{ "name": "app" }] },
                "status": { "phase": phase }
            });
            if deleting {
                v["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z".into();
            }
            serde_json::from_value(v).unwrap()
        };
        let pods = [
            p("done", "n", "Succeeded", false),
            p("failed", "n", "Failed", false),
            p("running", "n", "Running", false),
            p("going", "n", "Failed", true),
            p("elsewhere", "m", "Succeeded", false),
        ];
        let finished = finished_pods(&pods, "n");
        assert_eq!(
            finished,
            ["done", "failed"].map(String::from).into_iter().collect()
        );
        let labels = |uid: &str| {
            std::collections::HashMap::from([(POD_UID_LABEL.to_string(), uid.to_string())])
        };
        let c = |id: &str, uid: &str, state: cri::ContainerState| cri::Container {
            id: id.into(),
            labels: labels(uid),
            state: state as i32,
            ..Default::default()
        };
        let containers = [
            c("done-exited", "done", cri::ContainerState::ContainerExited),
            c(
                "failed-exited",
                "failed",
                cri::ContainerState::ContainerExited,
            ),
            c(
                "failed-created",
                "failed",
                cri::ContainerState::ContainerCreated,
            ),
            // Still running (its pod just turned Failed): left to the pod's worker.
            c(
                "failed-running",
                "failed",
                cri::ContainerState::ContainerRunning,
            ),
            c(
                "running-exited",
                "running",
                cri::ContainerState::ContainerExited,
            ),
            c(
                "going-exited",
                "going",
                cri::ContainerState::ContainerExited,
            ),
            c(
                "static-exited",
                "static-uid",
                cri::ContainerState::ContainerExited,
            ),
        ];
        let sb = |id: &str, uid: &str, state: cri::PodSandboxState| cri::PodSandbox {
            id: id.into(),
            labels: labels(uid),
            state: state as i32,
            ..Default::default()
        };
        let sandboxes = [
            sb("done-sb", "done", cri::PodSandboxState::SandboxNotready),
            sb("failed-sb", "failed", cri::PodSandboxState::SandboxReady),
            sb(
                "running-sb",
                "running",
                cri::PodSandboxState::SandboxNotready,
            ),
        ];
        let (dead, empty) = dead_of_finished(&finished, &containers, &sandboxes);
        assert_eq!(dead, ["done-exited", "failed-exited", "failed-created"]);
        assert_eq!(empty, ["done-sb"]);
    }
}
