//! The status the kubelet reports for a pod: a pure function of the pod, what the runtime says
//! about its sandbox and containers, and why a container is waiting.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus, ResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use strake_types::cri;

/// What the runtime reports for one pod.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// The ready sandbox's addresses, IPv4 first; `None` when no sandbox is ready.
    pub sandbox_ips: Option<Vec<String>>,
    /// The newest CRI container per container name.
    pub containers: BTreeMap<String, cri::ContainerStatus>,
    /// The terminated container before the newest, per name (for `lastState`).
    pub previous: BTreeMap<String, cri::ContainerStatus>,
    /// Why a container has no running instance (ErrImagePull, CrashLoopBackOff, ...).
    pub waiting: BTreeMap<String, (String, String)>,
    /// The runtime's name for container IDs (`containerd`, `strake`).
    pub runtime_name: String,
    /// Running containers whose readiness probe has not (or no longer) succeeded.
    pub unready: std::collections::BTreeSet<String>,
    /// Running containers whose startup probe has not succeeded yet.
    pub not_started: std::collections::BTreeSet<String>,
    /// Set when the kubelet itself ended the pod (active deadline, eviction).
    pub ended: Option<Ending>,
    /// The resources the runtime's current instance of a container was started or last
    /// updated with (by name); missing ones are taken to have their allocation.
    pub resources: BTreeMap<String, ResourceRequirements>,
    /// Where the pod's in-place resize stands, when it is not done.
    pub resize: Option<Resize>,
    /// The pod is deleted and the kubelet has stopped its containers: its last status is
    /// terminal (Succeeded when every container exited 0, else Failed), as upstream's for a
    /// terminated pod, so that controllers waiting on it (the Job controller's finalizer) see
    /// it end before it goes.
    pub terminated: bool,
}

/// A resize that is not done: the `PodResizePending` and `PodResizeInProgress` conditions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resize {
    /// Not admitted (`Infeasible`, `Deferred`).
    Pending { reason: String, message: String },
    /// Admitted, not yet actuated; `error` says why when actuation failed.
    InProgress { error: Option<String> },
}

/// The resize conditions, which the kubelet sets and removes.
pub const RESIZE_CONDITIONS: [&str; 2] = ["PodResizePending", "PodResizeInProgress"];

/// Why the kubelet ended a pod: its phase becomes Failed with this reason and message, as
/// upstream's pod sync handlers and eviction manager report it.
#[derive(Clone, Debug, PartialEq)]
pub struct Ending {
    pub reason: String,
    pub message: String,
    /// A condition to add (`DisruptionTarget` for evictions).
    pub condition: Option<PodCondition>,
}

/// Whether `phase` is one a pod never leaves.
pub fn is_terminal(phase: Option<&str>) -> bool {
    matches!(phase, Some("Succeeded" | "Failed"))
}

fn time_ns(ns: i64) -> Option<Time> {
    (ns > 0)
        .then(|| Time(Timestamp::from_nanosecond(i128::from(ns)).unwrap_or(Timestamp::UNIX_EPOCH)))
}

fn restart_count(c: &cri::ContainerStatus) -> i32 {
    c.metadata.as_ref().map_or(0, |m| m.attempt as i32)
}

fn state_of(c: &cri::ContainerStatus, runtime: &str) -> ContainerState {
    match cri::ContainerState::try_from(c.state) {
        Ok(cri::ContainerState::ContainerRunning) => ContainerState {
            running: Some(ContainerStateRunning {
                started_at: time_ns(c.started_at),
            }),
            ..Default::default()
        },
        Ok(cri::ContainerState::ContainerExited) => ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: c.exit_code,
                reason: Some(if c.reason.is_empty() {
                    if c.exit_code == 0 {
                        "Completed".into()
                    } else {
                        "Error".into()
                    }
                } else {
                    c.reason.clone()
                }),
                message: (!c.message.is_empty()).then(|| c.message.clone()),
                started_at: time_ns(c.started_at),
                finished_at: time_ns(c.finished_at),
                container_id: Some(format!("{runtime}://{}", c.id)),
                ..Default::default()
            }),
            ..Default::default()
        },
        _ => ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some("ContainerCreating".into()),
                message: None,
            }),
            ..Default::default()
        },
    }
}

/// The condition types this kubelet owns; every other condition on a pod (readiness gates,
/// `DisruptionTarget`, ...) belongs to someone else and is never written here.
pub const KUBELET_CONDITIONS: [&str; 5] = [
    "PodReadyToStartContainers",
    "Initialized",
    "Ready",
    "ContainersReady",
    "PodScheduled",
];

/// Makes the kubelet's conditions: `lastTransitionTime` kept while the status holds, and
/// `observedGeneration` the pod generation they were computed from.
struct Conditions<'a> {
    previous: &'a [PodCondition],
    now: &'a Time,
    generation: Option<i64>,
}

impl Conditions<'_> {
    fn make(
        &self,
        kind: &str,
        ok: bool,
        reason: Option<&str>,
        message: Option<String>,
    ) -> PodCondition {
        let status = if ok { "True" } else { "False" };
        let since = self
            .previous
            .iter()
            .find(|c| c.type_ == kind && c.status == status)
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| self.now.clone());
        PodCondition {
            type_: kind.into(),
            status: status.into(),
            reason: reason.map(String::from),
            message,
            last_transition_time: Some(since),
            observed_generation: self.generation,
            ..Default::default()
        }
    }
}

/// Why the pod is not Ready although its containers are: each readiness gate whose condition
/// is missing or not "True", in upstream's words.
fn unmet_readiness_gates(pod: &Pod) -> Option<String> {
    let conditions = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default();
    let gates = pod.spec.as_ref().and_then(|s| s.readiness_gates.as_deref());
    let unmet: Vec<String> = gates
        .unwrap_or_default()
        .iter()
        .filter_map(|g| {
            let kind = &g.condition_type;
            match conditions.iter().find(|c| &c.type_ == kind) {
                None => Some(format!(
                    "corresponding condition of pod readiness gate \"{kind}\" does not exist."
                )),
                Some(c) if c.status != "True" => Some(format!(
                    "the status of pod readiness gate \"{kind}\" is not \"True\", but {}",
                    c.status
                )),
                Some(_) => None,
            }
        })
        .collect();
    (!unmet.is_empty()).then(|| unmet.join(", "))
}

/// `not_created`: the waiting reason of a container with no instance yet: `PodInitializing` in
/// a pod with init containers (for its init and app containers alike), else
/// `ContainerCreating`, as upstream's default waiting state.
fn container_status(
    c: &k8s_openapi::api::core::v1::Container,
    observed: &Observed,
    message_budget: usize,
    not_created: &str,
) -> ContainerStatus {
    let cur = observed.containers.get(&c.name);
    let state_of = |s: &cri::ContainerStatus| {
        let mut state = state_of(s, &observed.runtime_name);
        if let Some(m) = state.terminated.as_mut().and_then(|t| t.message.as_mut()) {
            let cut = crate::termination::truncate(m, message_budget).len();
            m.truncate(cut);
        }
        state
    };
    let mut state = cur.map_or_else(ContainerState::default, state_of);
    if let Some((reason, message)) = observed.waiting.get(&c.name) {
        state = ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.clone()),
                message: Some(message.clone()),
            }),
            ..Default::default()
        };
    } else if cur.is_none() {
        state.waiting = Some(ContainerStateWaiting {
            reason: Some(not_created.into()),
            message: None,
        });
    }
    let running = state.running.is_some();
    let started = running && !observed.not_started.contains(&c.name);
    let ready = started && !observed.unready.contains(&c.name);
    // While waiting to restart, the last run is the newest instance; otherwise the one before.
    let last = if state.waiting.is_some() && cur.is_some() {
        cur
    } else {
        observed.previous.get(&c.name)
    };
    // What was allocated and what is applied, for every container the runtime has: requests
    // and limits as given (an empty list is left out, as the API leaves it out).
    let non_empty = |m: Option<BTreeMap<String, Quantity>>| m.filter(|m| !m.is_empty());
    let allocated = c.resources.clone().unwrap_or_default();
    let (allocated_resources, resources) = match cur {
        None => (None, None),
        Some(_) => {
            let applied = observed
                .resources
                .get(&c.name)
                .cloned()
                .unwrap_or_else(|| allocated.clone());
            (
                non_empty(allocated.requests.clone()),
                Some(ResourceRequirements {
                    requests: non_empty(applied.requests),
                    limits: non_empty(applied.limits),
                    ..Default::default()
                }),
            )
        }
    };
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone().unwrap_or_default(),
        allocated_resources,
        resources,
        image_id: cur.map(|s| s.image_ref.clone()).unwrap_or_default(),
        container_id: cur.map(|s| format!("{}://{}", observed.runtime_name, s.id)),
        ready,
        started: Some(started),
        restart_count: cur.map_or(0, restart_count),
        state: Some(state),
        last_state: Some(last.map_or_else(ContainerState::default, state_of)),
        ..Default::default()
    }
}

/// The pod's status as the kubelet posts it.
pub fn pod_status(pod: &Pod, observed: &Observed, host_ip: &str, now: &Time) -> PodStatus {
    let spec = pod.spec.clone().unwrap_or_default();
    let old = pod.status.clone().unwrap_or_default();
    let prev_conditions = old.conditions.clone().unwrap_or_default();
    // Termination messages share the pod's budget evenly, as upstream's status manager cuts
    // them.
    let budget = crate::termination::per_container_budget(
        spec.containers.len() + spec.init_containers.as_ref().map_or(0, Vec::len),
    );
    let not_created = if spec.init_containers.as_ref().is_some_and(|i| !i.is_empty()) {
        "PodInitializing"
    } else {
        "ContainerCreating"
    };
    let statuses: Vec<ContainerStatus> = spec
        .containers
        .iter()
        .map(|c| container_status(c, observed, budget, not_created))
        .collect();
    let init_statuses: Vec<ContainerStatus> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| {
            let mut st = container_status(c, observed, budget, not_created);
            // A regular init container is ready once it completed, as upstream's prober
            // manager marks it.
            if c.restart_policy.as_deref() != Some("Always") {
                st.ready = st
                    .state
                    .as_ref()
                    .and_then(|s| s.terminated.as_ref())
                    .is_some_and(|t| t.exit_code == 0);
            }
            st
        })
        .collect();
    // Ephemeral containers: reported, sorted by name as upstream's status manager does, but
    // never probed, so neither started nor ready, and never part of the phase.
    let mut ephemeral_statuses: Vec<ContainerStatus> = spec
        .ephemeral_containers
        .iter()
        .flatten()
        .map(|ec| {
            let c = crate::pod_spec::ephemeral_container(ec);
            ContainerStatus {
                ready: false,
                started: None,
                ..container_status(&c, observed, budget, not_created)
            }
        })
        .collect();
    ephemeral_statuses.sort_by(|a, b| a.name.cmp(&b.name));
    // Initialized: every regular init container completed, every sidecar started.
    let initialized = spec
        .init_containers
        .iter()
        .flatten()
        .zip(&init_statuses)
        .all(|(c, st)| {
            let state = st.state.clone().unwrap_or_default();
            if c.restart_policy.as_deref() == Some("Always") {
                st.started == Some(true)
            } else {
                state.terminated.is_some_and(|t| t.exit_code == 0)
            }
        });
    let terminated: Vec<i32> = statuses
        .iter()
        .filter_map(|s| s.state.as_ref()?.terminated.as_ref().map(|t| t.exit_code))
        .collect();
    let restart_policy = spec.restart_policy.as_deref().unwrap_or("Always");
    let init_failed = restart_policy == "Never"
        && init_statuses.iter().any(|st| {
            st.state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .is_some_and(|t| t.exit_code != 0)
        });
    let phase = if observed.ended.is_some() {
        "Failed"
    } else if is_terminal(old.phase.as_deref()) {
        // Pods are not allowed to leave a terminal phase.
        old.phase.as_deref().unwrap_or("Failed")
    } else if observed.terminated && !crate::static_pods::is_static(pod) {
        let all_ok = !statuses.is_empty()
            && terminated.len() == statuses.len()
            && terminated.iter().all(|c| *c == 0);
        if all_ok { "Succeeded" } else { "Failed" }
    } else if init_failed {
        "Failed"
    } else if !initialized {
        "Pending"
    } else if statuses
        .iter()
        .any(|s| s.state.as_ref().is_some_and(|st| st.running.is_some()))
    {
        "Running"
    } else if !statuses.is_empty() && terminated.len() == statuses.len() {
        let all_ok = terminated.iter().all(|c| *c == 0);
        match (restart_policy, all_ok) {
            ("Never", true) | ("OnFailure", true) => "Succeeded",
            ("Never", false) => "Failed",
            _ => "Running",
        }
    } else if old.phase.as_deref() == Some("Running")
        && statuses.iter().any(|s| s.restart_count > 0)
    {
        "Running"
    } else {
        "Pending"
    };
    let sandbox_ready = observed.sandbox_ips.is_some();
    let ips = observed.sandbox_ips.clone().unwrap_or_default();
    let host_network = spec.host_network.unwrap_or(false);
    let pod_ips: Vec<String> = if host_network {
        vec![host_ip.to_string()]
    } else {
        ips
    };
    // ContainersReady: every regular container and every sidecar ready; a finished pod's
    // containers are not ready, whatever they were.
    let unready: Vec<&str> = spec
        .init_containers
        .iter()
        .flatten()
        .zip(&init_statuses)
        .filter(|(c, _)| c.restart_policy.as_deref() == Some("Always"))
        .map(|(_, st)| st)
        .chain(&statuses)
        .filter(|st| !st.ready)
        .map(|st| st.name.as_str())
        .collect();
    let (containers_ready, reason, message) = match phase {
        "Succeeded" => (false, Some("PodCompleted"), None),
        "Failed" => (false, Some("PodFailed"), None),
        _ if !unready.is_empty() => (
            false,
            Some("ContainersNotReady"),
            Some(format!(
                "containers with unready status: [{}]",
                unready.join(" ")
            )),
        ),
        _ => (true, None, None),
    };
    // Ready: ContainersReady and every readiness gate's condition "True".
    let gates = containers_ready
        .then(|| unmet_readiness_gates(pod))
        .flatten();
    let make = Conditions {
        previous: &prev_conditions,
        now,
        generation: pod.metadata.generation,
    };
    let ready = match &gates {
        Some(why) => make.make(
            "Ready",
            false,
            Some("ReadinessGatesNotReady"),
            Some(why.clone()),
        ),
        None => make.make("Ready", containers_ready, reason, message.clone()),
    };
    // Initialized, in upstream's terms: a completed pod was; one whose regular containers
    // started was; else each init container not completed (or sidecar not started) is named.
    let incomplete: Vec<&str> = spec
        .init_containers
        .iter()
        .flatten()
        .zip(&init_statuses)
        .filter(|(c, st)| {
            if c.restart_policy.as_deref() == Some("Always") {
                st.started != Some(true)
            } else {
                !st.ready
            }
        })
        .map(|(c, _)| c.name.as_str())
        .collect();
    let regular_started = statuses.iter().any(|st| {
        st.state
            .as_ref()
            .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
    });
    let initialized_condition = if phase == "Succeeded" {
        make.make("Initialized", true, Some("PodCompleted"), None)
    } else if regular_started || incomplete.is_empty() {
        make.make("Initialized", true, None, None)
    } else {
        make.make(
            "Initialized",
            false,
            Some("ContainersNotInitialized"),
            Some(format!(
                "containers with incomplete status: [{}]",
                incomplete.join(" ")
            )),
        )
    };
    let mut conditions = vec![
        make.make("PodReadyToStartContainers", sandbox_ready, None, None),
        initialized_condition,
        ready,
        make.make("ContainersReady", containers_ready, reason, message),
        make.make("PodScheduled", true, None, None),
    ];
    match &observed.resize {
        Some(Resize::Pending { reason, message }) => conditions.push(make.make(
            "PodResizePending",
            true,
            Some(reason),
            Some(message.clone()),
        )),
        Some(Resize::InProgress { error }) => conditions.push(make.make(
            "PodResizeInProgress",
            true,
            error.as_ref().map(|_| "Error"),
            error.clone(),
        )),
        None => {}
    }
    let ended = observed.ended.as_ref();
    if let Some(c) = ended.and_then(|e| e.condition.clone()) {
        let since = prev_conditions
            .iter()
            .find(|p| p.type_ == c.type_ && p.status == c.status)
            .and_then(|p| p.last_transition_time.clone())
            .unwrap_or_else(|| now.clone());
        conditions.push(PodCondition {
            last_transition_time: Some(since),
            observed_generation: pod.metadata.generation,
            ..c
        });
    }
    PodStatus {
        phase: Some(phase.into()),
        reason: ended.map(|e| e.reason.clone()),
        message: ended.map(|e| e.message.clone()),
        observed_generation: pod.metadata.generation,
        conditions: Some(conditions),
        host_ip: (!host_ip.is_empty()).then(|| host_ip.to_string()),
        host_ips: (!host_ip.is_empty()).then(|| {
            vec![HostIP {
                ip: host_ip.to_string(),
            }]
        }),
        pod_ip: pod_ips.first().cloned(),
        pod_ips: (!pod_ips.is_empty())
            .then(|| pod_ips.iter().map(|ip| PodIP { ip: ip.clone() }).collect()),
        start_time: old.start_time.clone().or_else(|| Some(now.clone())),
        container_statuses: Some(statuses),
        init_container_statuses: (!init_statuses.is_empty()).then_some(init_statuses),
        ephemeral_container_statuses: (!ephemeral_statuses.is_empty())
            .then_some(ephemeral_statuses),
        qos_class: Some(crate::pod_spec::qos_class(pod).into()),
        ..Default::default()
    }
}

/// The strategic-merge patch that writes `status`. Conditions merge by type, so a condition
/// someone else owns (a readiness gate's) is never overwritten by a stale copy; `podIPs` and
/// `hostIPs` (merge lists keyed by `ip`) are replaced whole, since a new sandbox has new
/// addresses and a merge would keep the old ones beside them.
pub fn status_patch(status: &PodStatus) -> serde_json::Value {
    let mut status = serde_json::to_value(status).unwrap_or_default();
    // A resize condition that no longer holds is deleted (conditions merge by type).
    if let Some(serde_json::Value::Array(conditions)) = status.get_mut("conditions") {
        for kind in RESIZE_CONDITIONS {
            if !conditions.iter().any(|c| c["type"] == kind) {
                conditions.push(serde_json::json!({ "type": kind, "$patch": "delete" }));
            }
        }
    }
    for list in ["podIPs", "hostIPs"] {
        if let Some(serde_json::Value::Array(items)) = status.get_mut(list) {
            items.push(serde_json::json!({ "$patch": "replace" }));
        }
    }
    serde_json::json!({ "status": status })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec};

    fn pod(policy: &str) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = Some("p".into());
        p.spec = Some(PodSpec {
            containers: vec![Container {
                name: "app".into(),
                image: Some("busybox".into()),
                ..Default::default()
            }],
            restart_policy: Some(policy.into()),
            ..Default::default()
        });
        p
    }

    fn cs(state: cri::ContainerState, exit: i32, attempt: u32) -> cri::ContainerStatus {
        cri::ContainerStatus {
            id: "abc".into(),
            metadata: Some(cri::ContainerMetadata {
                name: "app".into(),
                attempt,
            }),
            state: state as i32,
            exit_code: exit,
            started_at: 1_000_000_000,
            finished_at: 2_000_000_000,
            image_ref: "sha256:img".into(),
            ..Default::default()
        }
    }

    fn now() -> Time {
        Time(Timestamp::from_second(100).unwrap())
    }

    fn observed(c: Option<cri::ContainerStatus>) -> Observed {
        Observed {
            sandbox_ips: Some(vec!["10.88.0.5".into()]),
            containers: c.into_iter().map(|c| ("app".to_string(), c)).collect(),
            runtime_name: "containerd".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_deleted_pod_whose_containers_were_stopped_ends_terminal() {
        let now = now();
        // Killed (137) under restartPolicy Always: Failed, where a live pod would stay Running.
        let mut o = observed(Some(cs(cri::ContainerState::ContainerExited, 137, 0)));
        assert_eq!(
            pod_status(&pod("Always"), &o, "10.0.0.1", &now)
                .phase
                .as_deref(),
            Some("Running")
        );
        o.terminated = true;
        assert_eq!(
            pod_status(&pod("Always"), &o, "10.0.0.1", &now)
                .phase
                .as_deref(),
            Some("Failed")
        );
        // Every container exited 0: Succeeded.
        let mut ok = observed(Some(cs(cri::ContainerState::ContainerExited, 0, 0)));
        ok.terminated = true;
        assert_eq!(
            pod_status(&pod("Always"), &ok, "10.0.0.1", &now)
                .phase
                .as_deref(),
            Some("Succeeded")
        );
    }

    #[test]
    fn ephemeral_containers_are_reported_by_name_and_leave_phase_and_readiness_alone() {
        let mut p = pod("Never");
        let spec = p.spec.as_mut().unwrap();
        spec.ephemeral_containers = Some(
            ["zz", "debugger"]
                .map(|n| k8s_openapi::api::core::v1::EphemeralContainer {
                    name: n.into(),
                    image: Some("busybox".into()),
                    ..Default::default()
                })
                .to_vec(),
        );
        let mut o = observed(Some(cs(cri::ContainerState::ContainerRunning, 0, 0)));
        let mut done = cs(cri::ContainerState::ContainerExited, 1, 0);
        done.id = "dbg".into();
        o.containers.insert("debugger".into(), done);
        let s = pod_status(&p, &o, "10.213.0.10", &now());
        let eph = s.ephemeral_container_statuses.clone().unwrap();
        let names: Vec<&str> = eph.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["debugger", "zz"]);
        let term = eph[0].state.clone().unwrap().terminated.unwrap();
        assert_eq!(term.exit_code, 1);
        assert_eq!(eph[0].container_id.as_deref(), Some("containerd://dbg"));
        assert_eq!(
            eph[1]
                .state
                .clone()
                .unwrap()
                .waiting
                .unwrap()
                .reason
                .as_deref(),
            Some("ContainerCreating")
        );
        assert!(eph.iter().all(|c| !c.ready && c.started.is_none()));
        // A failed debugger neither fails nor unreadies the pod.
        assert_eq!(s.phase.as_deref(), Some("Running"));
        let ready = s
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready");
        assert_eq!(ready.unwrap().status, "True");
        // Without ephemeral containers the field stays out of the status.
        let s = pod_status(&pod("Never"), &o, "10.213.0.10", &now());
        assert!(s.ephemeral_container_statuses.is_none());
    }

    #[test]
    fn running_pod_is_ready_with_ips() {
        let s = pod_status(
            &pod("Always"),
            &observed(Some(cs(cri::ContainerState::ContainerRunning, 0, 0))),
            "10.213.0.10",
            &now(),
        );
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(s.pod_ip.as_deref(), Some("10.88.0.5"));
        assert_eq!(s.host_ip.as_deref(), Some("10.213.0.10"));
        let c = &s.container_statuses.unwrap()[0];
        assert!(c.ready);
        assert_eq!(c.container_id.as_deref(), Some("containerd://abc"));
        assert_eq!(c.image_id, "sha256:img");
        let ready = s
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "True");
    }

    #[test]
    fn readiness_and_startup_gate_ready() {
        let mut o = observed(Some(cs(cri::ContainerState::ContainerRunning, 0, 0)));
        o.unready.insert("app".into());
        let s = pod_status(&pod("Always"), &o, "", &now());
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert!(!s.container_statuses.unwrap()[0].ready);
        let ready = s
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_deref()),
            ("False", Some("ContainersNotReady"))
        );
        let mut o = observed(Some(cs(cri::ContainerState::ContainerRunning, 0, 0)));
        o.not_started.insert("app".into());
        let c = &pod_status(&pod("Always"), &o, "", &now())
            .container_statuses
            .unwrap()[0];
        assert_eq!((c.started, c.ready), (Some(false), false));
    }

    #[test]
    fn phases_follow_restart_policy() {
        let exited = |code| observed(Some(cs(cri::ContainerState::ContainerExited, code, 0)));
        assert_eq!(
            pod_status(&pod("Never"), &exited(0), "", &now())
                .phase
                .as_deref(),
            Some("Succeeded")
        );
        assert_eq!(
            pod_status(&pod("Never"), &exited(1), "", &now())
                .phase
                .as_deref(),
            Some("Failed")
        );
        assert_eq!(
            pod_status(&pod("OnFailure"), &exited(0), "", &now())
                .phase
                .as_deref(),
            Some("Succeeded")
        );
        let s = pod_status(&pod("Never"), &exited(1), "", &now());
        let t = s.container_statuses.unwrap()[0]
            .state
            .clone()
            .unwrap()
            .terminated
            .unwrap();
        assert_eq!((t.exit_code, t.reason.as_deref()), (1, Some("Error")));
        assert_eq!(
            pod_status(&pod("Always"), &observed(None), "", &now())
                .phase
                .as_deref(),
            Some("Pending")
        );
    }

    #[test]
    fn termination_messages_share_the_pods_12_kib() {
        let mut exited = cs(cri::ContainerState::ContainerExited, 1, 0);
        exited.message = "m".repeat(5000);
        let s = pod_status(&pod("Never"), &observed(Some(exited.clone())), "", &now());
        let t = s.container_statuses.unwrap()[0]
            .state
            .clone()
            .unwrap()
            .terminated
            .unwrap();
        assert_eq!(
            t.message.map(|m| m.len()),
            Some(5000),
            "one container: the whole 12 KiB"
        );
        let mut four = pod("Never");
        let spec = four.spec.as_mut().unwrap();
        spec.init_containers = Some(vec![spec.containers[0].clone(); 3]);
        let s = pod_status(&four, &observed(Some(exited)), "", &now());
        let t = s.container_statuses.unwrap()[0]
            .state
            .clone()
            .unwrap()
            .terminated
            .unwrap();
        assert_eq!(
            t.message.map(|m| m.len()),
            Some(3072),
            "four containers: 3 KiB each"
        );
    }

    #[test]
    fn crash_loop_is_waiting_with_the_last_run_as_last_state() {
        let mut o = observed(Some(cs(cri::ContainerState::ContainerExited, 2, 3)));
        o.waiting.insert(
            "app".into(),
            ("CrashLoopBackOff".into(), "back-off 40s".into()),
        );
        let s = pod_status(&pod("Always"), &o, "", &now());
        let c = &s.container_statuses.unwrap()[0];
        assert_eq!(c.restart_count, 3);
        assert_eq!(
            c.state.clone().unwrap().waiting.unwrap().reason.as_deref(),
            Some("CrashLoopBackOff")
        );
        assert_eq!(
            c.last_state.clone().unwrap().terminated.unwrap().exit_code,
            2
        );
        assert!(!c.ready);
    }

    fn condition_of(s: &PodStatus, kind: &str) -> PodCondition {
        s.conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == kind)
            .cloned()
            .unwrap()
    }

    #[test]
    fn readiness_gates_hold_ready_until_their_conditions_are_true() {
        use k8s_openapi::api::core::v1::PodReadinessGate;
        let running = observed(Some(cs(cri::ContainerState::ContainerRunning, 0, 0)));
        let mut p = pod("Always");
        p.spec.as_mut().unwrap().readiness_gates = Some(vec![PodReadinessGate {
            condition_type: "example.com/lb".into(),
        }]);
        let s = pod_status(&p, &running, "", &now());
        let ready = condition_of(&s, "Ready");
        assert_eq!(
            (
                ready.status.as_str(),
                ready.reason.as_deref(),
                ready.message.as_deref()
            ),
            (
                "False",
                Some("ReadinessGatesNotReady"),
                Some(
                    "corresponding condition of pod readiness gate \"example.com/lb\" does not exist."
                )
            )
        );
        assert_eq!(condition_of(&s, "ContainersReady").status, "True");
        let gate = |status: &str| PodCondition {
            type_: "example.com/lb".into(),
            status: status.into(),
            ..Default::default()
        };
        p.status = Some(PodStatus {
            conditions: Some(vec![gate("False")]),
            ..Default::default()
        });
        let ready = condition_of(&pod_status(&p, &running, "", &now()), "Ready");
        assert_eq!(
            ready.message.as_deref(),
            Some("the status of pod readiness gate \"example.com/lb\" is not \"True\", but False")
        );
        p.status = Some(PodStatus {
            conditions: Some(vec![gate("True")]),
            ..Default::default()
        });
        let s = pod_status(&p, &running, "", &now());
        assert_eq!(condition_of(&s, "Ready").status, "True");
        // The gate's condition is someone else's: the kubelet neither reports nor patches it.
        assert!(
            s.conditions
                .iter()
                .flatten()
                .all(|c| KUBELET_CONDITIONS.contains(&c.type_.as_str()))
        );
    }

    #[test]
    fn status_and_conditions_carry_the_observed_generation() {
        let mut p = pod("Always");
        p.metadata.generation = Some(3);
        let s = pod_status(&p, &observed(None), "", &now());
        assert_eq!(s.observed_generation, Some(3));
        let conditions = s.conditions.unwrap();
        assert_eq!(conditions.len(), KUBELET_CONDITIONS.len());
        assert!(conditions.iter().all(|c| c.observed_generation == Some(3)));
    }

    #[test]
    fn unready_sidecars_and_finished_pods_are_not_containers_ready() {
        let mut p = pod("Always");
        let mut sidecar = p.spec.as_ref().unwrap().containers[0].clone();
        sidecar.name = "proxy".into();
        sidecar.restart_policy = Some("Always".into());
        p.spec.as_mut().unwrap().init_containers = Some(vec![sidecar]);
        let s = pod_status(
            &p,
            &observed(Some(cs(cri::ContainerState::ContainerRunning, 0, 0))),
            "",
            &now(),
        );
        let c = condition_of(&s, "ContainersReady");
        assert_eq!(
            (c.status.as_str(), c.message.as_deref()),
            ("False", Some("containers with unready status: [proxy]"))
        );
        let done = observed(Some(cs(cri::ContainerState::ContainerExited, 0, 0)));
        let s = pod_status(&pod("Never"), &done, "", &now());
        assert_eq!(s.phase.as_deref(), Some("Succeeded"));
        for kind in ["Ready", "ContainersReady"] {
            let c = condition_of(&s, kind);
            assert_eq!(
                (c.status.as_str(), c.reason.as_deref()),
                ("False", Some("PodCompleted"))
            );
        }
    }

    #[test]
    fn the_status_patch_replaces_addresses_and_merges_conditions() {
        let s = pod_status(
            &pod("Always"),
            &observed(Some(cs(cri::ContainerState::ContainerRunning, 0, 0))),
            "10.213.0.10",
            &now(),
        );
        let patch = status_patch(&s);
        let status = &patch["status"];
        for list in ["podIPs", "hostIPs"] {
            let items = status[list].as_array().unwrap();
            assert_eq!(
                items.last().unwrap(),
                &serde_json::json!({ "$patch": "replace" })
            );
            assert_eq!(items.len(), 2, "{list}: one address and the directive");
        }
        // Conditions merge by type, which keeps other owners'; only the resize conditions,
        // the kubelet's to remove once the resize is done, are deleted by name.
        let conditions = status["conditions"].as_array().unwrap();
        let deleted: Vec<&serde_json::Value> = conditions
            .iter()
            .filter(|c| c.get("$patch").is_some())
            .map(|c| &c["type"])
            .collect();
        assert_eq!(deleted, RESIZE_CONDITIONS);
        assert!(conditions.iter().all(|c| c["type"].is_string()));
        // While a resize waits, its condition is written, not deleted.
        let mut o = observed(Some(cs(cri::ContainerState::ContainerRunning, 0, 0)));
        o.resize = Some(Resize::Pending {
            reason: "Deferred".into(),
            message: "no room".into(),
        });
        let patch = status_patch(&pod_status(&pod("Always"), &o, "10.213.0.10", &now()));
        let conditions = patch["status"]["conditions"].as_array().unwrap();
        let pending = conditions
            .iter()
            .find(|c| c["type"] == "PodResizePending")
            .unwrap();
        assert_eq!(
            (&pending["status"], &pending["reason"], &pending["message"]),
            (
                &serde_json::json!("True"),
                &serde_json::json!("Deferred"),
                &serde_json::json!("no room")
            )
        );
        assert!(pending.get("$patch").is_none());
        assert!(
            conditions
                .iter()
                .any(|c| c["type"] == "PodResizeInProgress" && c["$patch"] == "delete")
        );
    }

    #[test]
    fn containers_not_yet_created_wait_pod_initializing_in_a_pod_with_init_containers() {
        let reason =
            |s: &ContainerStatus| s.state.clone().unwrap().waiting.unwrap().reason.unwrap();
        let plain = pod_status(&pod("Always"), &observed(None), "", &now());
        assert_eq!(
            reason(&plain.container_statuses.unwrap()[0]),
            "ContainerCreating"
        );
        let mut with_init = pod("Always");
        let spec = with_init.spec.as_mut().unwrap();
        let mut init = spec.containers[0].clone();
        init.name = "init".into();
        let mut init2 = init.clone();
        init2.name = "init2".into();
        spec.init_containers = Some(vec![init, init2]);
        // The first init container ran and failed; the second and the app wait.
        let mut o = observed(None);
        let mut failed = cs(cri::ContainerState::ContainerExited, 1, 0);
        failed.metadata.as_mut().unwrap().name = "init".into();
        o.containers.insert("init".into(), failed);
        let s = pod_status(&with_init, &o, "", &now());
        assert_eq!(reason(&s.container_statuses.unwrap()[0]), "PodInitializing");
        assert_eq!(
            reason(&s.init_container_statuses.unwrap()[1]),
            "PodInitializing"
        );
    }

    #[test]
    fn a_completed_init_container_is_ready_and_a_failed_one_is_not() {
        let mut p = pod("Always");
        let spec = p.spec.as_mut().unwrap();
        let mut init = spec.containers[0].clone();
        init.name = "init".into();
        spec.init_containers = Some(vec![init]);
        for (exit, ready) in [(0, true), (1, false)] {
            let mut o = observed(Some(cs(cri::ContainerState::ContainerRunning, 0, 0)));
            let mut done = cs(cri::ContainerState::ContainerExited, exit, 0);
            done.metadata.as_mut().unwrap().name = "init".into();
            o.containers.insert("init".into(), done);
            let s = pod_status(&p, &o, "", &now());
            let init = &s.init_container_statuses.unwrap()[0];
            assert_eq!(
                (init.ready, init.started),
                (ready, Some(false)),
                "exit {exit}"
            );
        }
    }

    #[test]
    fn initialized_names_the_incomplete_init_containers_as_upstream() {
        let mut p = pod("Never");
        let spec = p.spec.as_mut().unwrap();
        let mut first = spec.containers[0].clone();
        first.name = "init1".into();
        let mut second = first.clone();
        second.name = "init2".into();
        spec.init_containers = Some(vec![first, second]);
        let exited = |name: &str, exit: i32| {
            let mut c = cs(cri::ContainerState::ContainerExited, exit, 0);
            c.metadata.as_mut().unwrap().name = name.into();
            c
        };
        // init1 completed, init2 failed, the app never ran: init2 is what is incomplete.
        let mut o = observed(None);
        o.containers.insert("init1".into(), exited("init1", 0));
        o.containers.insert("init2".into(), exited("init2", 1));
        let s = pod_status(&p, &o, "", &now());
        assert_eq!(s.phase.as_deref(), Some("Failed"));
        let c = condition_of(&s, "Initialized");
        assert_eq!(
            (c.status.as_str(), c.reason.as_deref(), c.message.as_deref()),
            (
                "False",
                Some("ContainersNotInitialized"),
                Some("containers with incomplete status: [init2]")
            )
        );
        // Neither ran yet: both are named.
        let s = pod_status(&p, &observed(None), "", &now());
        let c = condition_of(&s, "Initialized");
        assert_eq!(
            c.message.as_deref(),
            Some("containers with incomplete status: [init1 init2]")
        );
        // A pod that completed was initialized, with upstream's reason.
        let mut o = observed(Some(exited("app", 0)));
        o.containers.insert("init1".into(), exited("init1", 0));
        o.containers.insert("init2".into(), exited("init2", 0));
        let s = pod_status(&p, &o, "", &now());
        assert_eq!(s.phase.as_deref(), Some("Succeeded"));
        let c = condition_of(&s, "Initialized");
        assert_eq!(
            (c.status.as_str(), c.reason.as_deref()),
            ("True", Some("PodCompleted"))
        );
    }
}
