//! The status the kubelet reports for a pod: a pure function of the pod, what the runtime says
//! about its sandbox and containers, and why a container is waiting.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
};
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

fn condition(
    kind: &str,
    ok: bool,
    reason: Option<&str>,
    previous: &[PodCondition],
    now: &Time,
) -> PodCondition {
    let status = if ok { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|c| c.type_ == kind && c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    PodCondition {
        type_: kind.into(),
        status: status.into(),
        reason: reason.map(String::from),
        last_transition_time: Some(since),
        ..Default::default()
    }
}

fn container_status(
    c: &k8s_openapi::api::core::v1::Container,
    observed: &Observed,
    message_budget: usize,
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
            reason: Some("ContainerCreating".into()),
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
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone().unwrap_or_default(),
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
    let statuses: Vec<ContainerStatus> = spec
        .containers
        .iter()
        .map(|c| container_status(c, observed, budget))
        .collect();
    let init_statuses: Vec<ContainerStatus> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| container_status(c, observed, budget))
        .collect();
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
    let all_ready = !statuses.is_empty() && statuses.iter().all(|s| s.ready);
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
    let phase = if init_failed {
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
    let containers_reason = (!all_ready).then_some("ContainersNotReady");
    PodStatus {
        phase: Some(phase.into()),
        conditions: Some(vec![
            condition(
                "PodReadyToStartContainers",
                sandbox_ready,
                None,
                &prev_conditions,
                now,
            ),
            condition(
                "Initialized",
                initialized,
                (!initialized).then_some("ContainersNotInitialized"),
                &prev_conditions,
                now,
            ),
            condition("Ready", all_ready, containers_reason, &prev_conditions, now),
            condition(
                "ContainersReady",
                all_ready,
                containers_reason,
                &prev_conditions,
                now,
            ),
            condition("PodScheduled", true, None, &prev_conditions, now),
        ]),
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
        qos_class: Some(crate::pod_spec::qos_class(pod).into()),
        ..Default::default()
    }
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
}
