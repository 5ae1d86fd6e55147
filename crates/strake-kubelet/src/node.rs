//! The Node object this kubelet registers and keeps up to date: a pure function of the
//! machine's facts, the configuration and the node's health.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeSpec, NodeStatus,
    NodeSystemInfo, Taint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

use crate::config::Config;
use crate::machine::MachineInfo;

/// The Kubernetes release whose kubelet behaviour Strake follows (reported in nodeInfo).
pub const KUBERNETES_COMPAT: &str = "1.37.0";

/// The kubelet version reported in `nodeInfo.kubeletVersion`: the followed release with Strake's
/// own version as pre-release tag, so version-skew logic sees a 1.37 kubelet.
pub fn kubelet_version() -> String {
    format!("v{KUBERNETES_COMPAT}-strake.{}", env!("CARGO_PKG_VERSION"))
}

/// Health inputs of the node's conditions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    /// `Err(message)` when the container runtime cannot be reached or is not ready.
    pub runtime: Result<(), String>,
    /// `Err(message)` when the runtime's network is not ready.
    pub network: Result<(), String>,
    pub memory_pressure: bool,
    pub disk_pressure: bool,
    pub pid_pressure: bool,
}

impl Default for Health {
    /// A healthy node.
    fn default() -> Self {
        Health {
            runtime: Ok(()),
            network: Ok(()),
            memory_pressure: false,
            disk_pressure: false,
            pid_pressure: false,
        }
    }
}

/// The default labels the kubelet owns on its Node.
pub fn default_labels(config: &Config, machine: &MachineInfo) -> BTreeMap<String, String> {
    let mut labels = config.node_labels.clone();
    for (k, v) in [
        ("kubernetes.io/hostname", config.node_name.as_str()),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", machine.architecture.as_str()),
        ("beta.kubernetes.io/os", "linux"),
        ("beta.kubernetes.io/arch", machine.architecture.as_str()),
    ] {
        labels.insert(k.to_string(), v.to_string());
    }
    labels
}

/// The Node to register (metadata and spec; status follows with [`status`]).
pub fn registration(config: &Config, machine: &MachineInfo) -> Node {
    let taints: Vec<Taint> = config
        .register_with_taints
        .iter()
        .map(|t| Taint {
            key: t.key.clone(),
            value: (!t.value.is_empty()).then(|| t.value.clone()),
            effect: t.effect.clone(),
            time_added: None,
        })
        .collect();
    Node {
        metadata: ObjectMeta {
            name: Some(config.node_name.clone()),
            labels: Some(default_labels(config, machine)),
            annotations: Some(
                [(
                    "volumes.kubernetes.io/controller-managed-attach-detach".to_string(),
                    "true".to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            taints: (!taints.is_empty()).then_some(taints),
            ..Default::default()
        }),
        status: None,
    }
}

fn quantity(s: impl Into<String>) -> Quantity {
    Quantity(s.into())
}

/// Capacity: cpu, memory, ephemeral-storage, pods (and zero hugepages as the kubelet reports).
pub fn capacity(config: &Config, machine: &MachineInfo) -> BTreeMap<String, Quantity> {
    BTreeMap::from([
        ("cpu".into(), quantity(machine.cpus.to_string())),
        (
            "memory".into(),
            quantity(format!("{}Ki", machine.memory_bytes / 1024)),
        ),
        (
            "ephemeral-storage".into(),
            quantity(format!("{}Ki", machine.ephemeral_storage_bytes / 1024)),
        ),
        ("pods".into(), quantity(config.max_pods.to_string())),
        ("hugepages-2Mi".into(), quantity("0")),
        ("hugepages-1Gi".into(), quantity("0")),
    ])
}

fn condition(
    kind: &str,
    status: bool,
    reason: &str,
    message: &str,
    previous: &[NodeCondition],
    now: &Time,
) -> NodeCondition {
    let status = if status { "True" } else { "False" };
    // The transition time moves only when the status changes.
    let last_transition = previous
        .iter()
        .find(|c| c.type_ == kind && c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    NodeCondition {
        type_: kind.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: Some(last_transition),
    }
}

/// The node's conditions with upstream's reasons and messages.
pub fn conditions(health: &Health, previous: &[NodeCondition], now: &Time) -> Vec<NodeCondition> {
    let (mem, disk, pid) = (
        health.memory_pressure,
        health.disk_pressure,
        health.pid_pressure,
    );
    let not_ready = match (&health.runtime, &health.network) {
        (Err(m), _) => Some(format!("container runtime is down: {m}")),
        (Ok(()), Err(m)) => Some(format!("container runtime network not ready: {m}")),
        _ => None,
    };
    vec![
        condition(
            "MemoryPressure",
            mem,
            if mem {
                "KubeletHasInsufficientMemory"
            } else {
                "KubeletHasSufficientMemory"
            },
            if mem {
                "kubelet has insufficient memory available"
            } else {
                "kubelet has sufficient memory available"
            },
            previous,
            now,
        ),
        condition(
            "DiskPressure",
            disk,
            if disk {
                "KubeletHasDiskPressure"
            } else {
                "KubeletHasNoDiskPressure"
            },
            if disk {
                "kubelet has disk pressure"
            } else {
                "kubelet has no disk pressure"
            },
            previous,
            now,
        ),
        condition(
            "PIDPressure",
            pid,
            if pid {
                "KubeletHasInsufficientPID"
            } else {
                "KubeletHasSufficientPID"
            },
            if pid {
                "kubelet has insufficient PID available"
            } else {
                "kubelet has sufficient PID available"
            },
            previous,
            now,
        ),
        match &not_ready {
            None => condition(
                "Ready",
                true,
                "KubeletReady",
                "kubelet is posting ready status",
                previous,
                now,
            ),
            Some(m) => condition("Ready", false, "KubeletNotReady", m, previous, now),
        },
    ]
}

/// The full status the kubelet posts.
pub fn status(
    config: &Config,
    machine: &MachineInfo,
    runtime_version: &str,
    health: &Health,
    previous: &[NodeCondition],
    now: &Time,
) -> NodeStatus {
    let cap = capacity(config, machine);
    let mut addresses = Vec::new();
    if let Some(ip) = config.node_ip {
        addresses.push(NodeAddress {
            type_: "InternalIP".into(),
            address: ip.to_string(),
        });
    }
    addresses.push(NodeAddress {
        type_: "Hostname".into(),
        address: config.node_name.clone(),
    });
    NodeStatus {
        allocatable: Some(crate::allocatable::allocatable(&cap, &config.reservation)),
        capacity: Some(cap),
        addresses: Some(addresses),
        conditions: Some(conditions(health, previous, now)),
        daemon_endpoints: Some(NodeDaemonEndpoints {
            kubelet_endpoint: Some(DaemonEndpoint {
                port: i32::from(config.port),
            }),
        }),
        node_info: Some(NodeSystemInfo {
            architecture: machine.architecture.clone(),
            boot_id: machine.boot_id.clone(),
            container_runtime_version: runtime_version.into(),
            kernel_version: machine.kernel_version.clone(),
            kube_proxy_version: String::new(),
            kubelet_version: kubelet_version(),
            machine_id: machine.machine_id.clone(),
            operating_system: "linux".into(),
            os_image: machine.os_image.clone(),
            system_uuid: machine.system_uuid.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Whether `new` differs from `old` in anything but heartbeat times (a change to post now).
pub fn status_changed(old: &NodeStatus, new: &NodeStatus) -> bool {
    let strip = |s: &NodeStatus| {
        let mut s = s.clone();
        for c in s.conditions.iter_mut().flatten() {
            c.last_heartbeat_time = None;
        }
        s
    };
    strip(old) != strip(new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Flags, TaintSpec};

    fn config() -> Config {
        let mut c = Config::load(&Flags {
            hostname_override: Some("n1".into()),
            node_ip: Some("10.213.0.10".parse().unwrap()),
            node_labels: vec!["zone=a".into()],
            ..Default::default()
        })
        .unwrap();
        c.register_with_taints = vec![TaintSpec {
            key: "k".into(),
            value: String::new(),
            effect: "NoSchedule".into(),
        }];
        c
    }

    fn machine() -> MachineInfo {
        MachineInfo {
            cpus: 2,
            memory_bytes: 4 * 1024 * 1024 * 1024,
            ephemeral_storage_bytes: 100 * 1024 * 1024 * 1024,
            architecture: "amd64".into(),
            ..Default::default()
        }
    }

    fn t(s: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(s).unwrap())
    }

    #[test]
    fn registration_has_default_labels_and_taints() {
        let n = registration(&config(), &machine());
        let labels = n.metadata.labels.unwrap();
        assert_eq!(labels["kubernetes.io/hostname"], "n1");
        assert_eq!(labels["kubernetes.io/os"], "linux");
        assert_eq!(labels["kubernetes.io/arch"], "amd64");
        assert_eq!(labels["zone"], "a");
        let taints = n.spec.unwrap().taints.unwrap();
        assert_eq!(
            (
                taints[0].key.as_str(),
                taints[0].effect.as_str(),
                &taints[0].value
            ),
            ("k", "NoSchedule", &None)
        );
    }

    #[test]
    fn status_reports_capacity_addresses_and_versions() {
        let s = status(
            &config(),
            &machine(),
            "strake://0.1.0",
            &Health::default(),
            &[],
            &t(100),
        );
        let cap = s.capacity.unwrap();
        assert_eq!(cap["cpu"].0, "2");
        assert_eq!(cap["memory"].0, "4194304Ki");
        assert_eq!(cap["pods"].0, "110");
        // Upstream's default evictionHard keeps 100Mi of memory and 10 % of nodefs back.
        let alloc = s.allocatable.unwrap();
        assert_eq!(alloc["memory"].0, format!("{}Ki", 4194304 - 100 * 1024));
        assert_eq!(alloc["cpu"].0, "2");
        let addrs = s.addresses.unwrap();
        assert_eq!(
            (addrs[0].type_.as_str(), addrs[0].address.as_str()),
            ("InternalIP", "10.213.0.10")
        );
        assert_eq!(
            (addrs[1].type_.as_str(), addrs[1].address.as_str()),
            ("Hostname", "n1")
        );
        let info = s.node_info.unwrap();
        assert_eq!(info.container_runtime_version, "strake://0.1.0");
        assert!(info.kubelet_version.starts_with("v1.37."));
        assert_eq!(
            s.daemon_endpoints.unwrap().kubelet_endpoint.unwrap().port,
            10250
        );
    }

    #[test]
    fn ready_follows_the_runtime_with_upstream_reasons() {
        let ready = conditions(&Health::default(), &[], &t(1));
        let r = ready.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(
            (r.status.as_str(), r.reason.as_deref()),
            ("True", Some("KubeletReady"))
        );
        let down = Health {
            runtime: Err("connection refused".into()),
            ..Default::default()
        };
        let not_ready = conditions(&down, &ready, &t(2));
        let r = not_ready.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(
            (r.status.as_str(), r.reason.as_deref()),
            ("False", Some("KubeletNotReady"))
        );
        assert!(
            r.message
                .as_deref()
                .unwrap()
                .contains("container runtime is down")
        );
        assert_eq!(
            r.last_transition_time,
            Some(t(2)),
            "status changed: transition time moves"
        );
        let m = not_ready
            .iter()
            .find(|c| c.type_ == "MemoryPressure")
            .unwrap();
        assert_eq!(
            m.last_transition_time,
            Some(t(1)),
            "unchanged: transition time kept"
        );
        assert_eq!(m.reason.as_deref(), Some("KubeletHasSufficientMemory"));
    }

    #[test]
    fn heartbeats_alone_are_not_a_change() {
        let a = status(&config(), &machine(), "x", &Health::default(), &[], &t(1));
        let prev = a.conditions.clone().unwrap();
        let b = status(
            &config(),
            &machine(),
            "x",
            &Health::default(),
            &prev,
            &t(50),
        );
        assert!(!status_changed(&a, &b));
        let c = status(
            &config(),
            &machine(),
            "x",
            &Health {
                disk_pressure: true,
                ..Default::default()
            },
            &prev,
            &t(60),
        );
        assert!(status_changed(&a, &c));
    }
}
