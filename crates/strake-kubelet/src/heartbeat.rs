//! Node registration, the node Lease and node status: the kubelet's heartbeats.
//!
//! The Lease (`kube-node-lease/<node>`) is renewed every quarter of its duration on its own
//! client and task, so that neither a slow runtime nor status work can delay it. Status is
//! computed every `nodeStatusUpdateFrequency` and posted when it changed or every
//! `nodeStatusReportFrequency`. API errors are logged and retried with backoff, never fatal.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};

use crate::config::Config;
use crate::machine::MachineInfo;
use crate::node::{self, Health};
use crate::runtime::Runtime;

/// The namespace of node leases.
pub const LEASE_NAMESPACE: &str = "kube-node-lease";

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(200u64.saturating_mul(1 << attempt.min(7))).min(Duration::from_secs(7))
}

/// Registers the Node, retrying until it succeeds. An existing Node keeps its spec; its
/// kubelet-owned labels are brought up to date.
pub async fn register(client: kube::Client, config: &Config, machine: &MachineInfo) -> Node {
    let nodes: Api<Node> = Api::all(client);
    let desired = node::registration(config, machine);
    let mut attempt = 0;
    loop {
        let result = match nodes.create(&PostParams::default(), &desired).await {
            Ok(n) => {
                tracing::info!(node = %config.node_name, "registered node");
                Ok(n)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let patch = serde_json::json!({ "metadata": { "labels": node::default_labels(config, machine) } });
                nodes
                    .patch(
                        &config.node_name,
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(n) => return n,
            Err(e) => {
                tracing::warn!(node = %config.node_name, error = %e, "node registration failed; retrying");
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
            }
        }
    }
}

/// Keeps the node's Lease renewed, forever.
pub async fn lease_loop(client: kube::Client, node: Node, duration: Duration) {
    let name = node.metadata.name.clone().unwrap_or_default();
    let leases: Api<Lease> = Api::namespaced(client, LEASE_NAMESPACE);
    let interval = duration / 4;
    let mut attempt = 0;
    loop {
        match renew(&leases, &node, &name, duration).await {
            Ok(()) => {
                attempt = 0;
                tokio::time::sleep(interval).await;
            }
            Err(e) => {
                tracing::warn!(node = %name, error = %e, "lease renewal failed; retrying");
                tokio::time::sleep(backoff(attempt).min(interval)).await;
                attempt += 1;
            }
        }
    }
}

async fn renew(
    leases: &Api<Lease>,
    node: &Node,
    name: &str,
    duration: Duration,
) -> Result<(), kube::Error> {
    let now = MicroTime(Timestamp::now());
    match leases.get_opt(name).await? {
        Some(mut lease) => {
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            spec.holder_identity = Some(name.to_string());
            spec.lease_duration_seconds = Some(duration.as_secs() as i32);
            spec.renew_time = Some(now);
            // Replace carries the resourceVersion: a concurrent writer makes this fail and retry.
            leases.replace(name, &PostParams::default(), &lease).await?;
        }
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    namespace: Some(LEASE_NAMESPACE.into()),
                    // Owned by the Node: deleting the Node deletes its Lease.
                    owner_references: node.metadata.uid.clone().map(|uid| {
                        vec![OwnerReference {
                            api_version: "v1".into(),
                            kind: "Node".into(),
                            name: name.to_string(),
                            uid,
                            ..Default::default()
                        }]
                    }),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(name.to_string()),
                    lease_duration_seconds: Some(duration.as_secs() as i32),
                    renew_time: Some(now),
                    ..Default::default()
                }),
            };
            leases.create(&PostParams::default(), &lease).await?;
        }
    }
    Ok(())
}

/// Computes status every update period and posts it on change or every report period.
pub async fn status_loop(
    client: kube::Client,
    runtime: Runtime,
    config: Config,
    machine: MachineInfo,
    pressure: crate::eviction::Pressure,
) {
    let nodes: Api<Node> = Api::all(client);
    let mut last_posted: Option<(NodeStatus, tokio::time::Instant)> = None;
    let mut runtime_version = String::new();
    loop {
        let health = match runtime.health().await {
            Ok(h) => {
                runtime_version = h.version;
                Health {
                    runtime: h.runtime_ready,
                    network: h.network_ready,
                    ..Default::default()
                }
            }
            Err(e) => Health {
                runtime: Err(e.to_string()),
                ..Default::default()
            },
        };
        let conditions = pressure.borrow().clone();
        let health = Health {
            memory_pressure: conditions.contains("MemoryPressure"),
            disk_pressure: conditions.contains("DiskPressure"),
            pid_pressure: conditions.contains("PIDPressure"),
            ..health
        };
        let previous = last_posted
            .as_ref()
            .and_then(|(s, _)| s.conditions.clone())
            .unwrap_or_default();
        let now = Time(Timestamp::now());
        let status = node::status(
            &config,
            &machine,
            &runtime_version,
            &health,
            &previous,
            &now,
        );
        let due = match &last_posted {
            None => true,
            Some((old, at)) => {
                node::status_changed(old, &status)
                    || at.elapsed() >= config.node_status_report_frequency
            }
        };
        if due {
            let patch = serde_json::json!({ "status": status });
            match nodes
                .patch_status(
                    &config.node_name,
                    &PatchParams::default(),
                    &Patch::Strategic(&patch),
                )
                .await
            {
                Ok(_) => {
                    if let Err(e) = &health.runtime {
                        tracing::warn!(node = %config.node_name, reason = %e, "node not ready");
                    }
                    last_posted = Some((status, tokio::time::Instant::now()));
                }
                Err(e) => {
                    tracing::warn!(node = %config.node_name, error = %e, "node status update failed")
                }
            }
        }
        tokio::time::sleep(config.node_status_update_frequency).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(0), Duration::from_millis(200));
        assert_eq!(backoff(1), Duration::from_millis(400));
        assert_eq!(backoff(30), Duration::from_secs(7));
    }
}
