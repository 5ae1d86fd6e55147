//! QoS and pod cgroups on this machine's real (v1) hierarchies, on strake-runtime and on
//! containerd: `kubepods` held to the node's allocatable (capacity less the reservations), one
//! cgroup per pod under its QoS class's with the values upstream's kubelet sets (shares from
//! requests, quota and memory limit where upstream sets them, `podPidsLimit`), the pod's
//! containers below it, and the pod's cgroup gone once the pod is deleted. All of it below the
//! test's own cgroup parent (the kubelet's relative `cgroupRoot`).

use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};

mod common;
use common::{Cluster, RuntimeKind, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_and_pod_cgroups_hold_upstreams_values_on_strake_runtime() {
    scenario("strake-cgroups-0", RuntimeKind::Strake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_and_pod_cgroups_hold_upstreams_values_on_containerd() {
    scenario("strake-cgroups-1", RuntimeKind::Containerd).await;
}

fn dir(root: &str, path: &str, controller: &str) -> PathBuf {
    common::cgroup_dir(root, path, controller)
}

fn read(root: &str, path: &str, controller: &str, file: &str) -> String {
    let p = dir(root, path, controller).join(file);
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
        .trim()
        .to_string()
}

async fn scenario(node: &str, kind: RuntimeKind) {
    let cluster = Cluster::start_with(
        node,
        kind,
        "podPidsLimit: 256\nkubeReserved: {memory: 100Mi}\n",
    )
    .await;
    let root = cluster.node.runtime.cgroup_parent().to_string();
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let sleep = serde_json::json!(["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]);
    let resources = |requests: serde_json::Value, limits: serde_json::Value| serde_json::json!({ "requests": requests, "limits": limits });
    let specs = [
        (
            "guaranteed",
            serde_json::json!([{ "name": "app", "image": cluster.busybox(), "command": sleep,
                "resources": resources(
                    serde_json::json!({ "cpu": "500m", "memory": "64Mi" }),
                    serde_json::json!({ "cpu": "500m", "memory": "64Mi" })) }]),
        ),
        (
            "burstable",
            serde_json::json!([
                { "name": "app", "image": cluster.busybox(), "command": sleep,
                  "resources": resources(serde_json::json!({ "cpu": "100m" }),
                                         serde_json::json!({ "memory": "32Mi" })) },
                { "name": "other", "image": cluster.busybox(), "command": sleep }
            ]),
        ),
        (
            "besteffort",
            serde_json::json!([{ "name": "app", "image": cluster.busybox(), "command": sleep }]),
        ),
    ];
    let mut uids = Vec::new();
    for (name, containers) in &specs {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name },
            "spec": { "nodeName": node, "terminationGracePeriodSeconds": 1,
                      "containers": containers }
        }))
        .expect("pod");
        let created = wait_for("pod created", 60, || async {
            pods.create(&PostParams::default(), &pod).await.ok()
        })
        .await;
        uids.push(created.metadata.uid.expect("uid"));
    }
    for (name, _) in &specs {
        wait_for(&format!("{name} running"), 120, || async {
            let p = pods.get(name).await.ok()?;
            (p.status?.phase.as_deref() == Some("Running")).then_some(())
        })
        .await;
    }

    // kubepods: allocatable before eviction thresholds (capacity less kubeReserved).
    let n = Api::<Node>::all(cluster.client.clone())
        .get(node)
        .await
        .expect("node");
    let capacity_ki: u64 = n.status.and_then(|s| s.capacity).expect("capacity")["memory"]
        .0
        .trim_end_matches("Ki")
        .parse()
        .expect("capacity in Ki");
    let want = capacity_ki * 1024 - (100 << 20);
    let kubepods: u64 = read(&root, "kubepods", "memory", "memory.limit_in_bytes")
        .parse()
        .expect("number");
    assert!(
        kubepods <= want && want - kubepods < 4096,
        "kubepods memory limit {kubepods}, allocatable {want}"
    );
    assert_eq!(read(&root, "kubepods/besteffort", "cpu", "cpu.shares"), "2");
    // The only Burstable pod requests 100m.
    assert_eq!(
        read(&root, "kubepods/burstable", "cpu", "cpu.shares"),
        "102"
    );

    // Guaranteed: shares, quota, memory limit and pids limit.
    let g = format!("kubepods/pod{}", uids[0]);
    assert_eq!(read(&root, &g, "cpu", "cpu.shares"), "512");
    assert_eq!(read(&root, &g, "cpu", "cpu.cfs_quota_us"), "50000");
    assert_eq!(
        read(&root, &g, "memory", "memory.limit_in_bytes"),
        (64u64 << 20).to_string()
    );
    assert_eq!(read(&root, &g, "pids", "pids.max"), "256");
    // Burstable with a container without limits: shares only.
    let b = format!("kubepods/burstable/pod{}", uids[1]);
    assert_eq!(read(&root, &b, "cpu", "cpu.shares"), "102");
    assert_eq!(read(&root, &b, "cpu", "cpu.cfs_quota_us"), "-1");
    let unlimited: u64 = read(&root, &b, "memory", "memory.limit_in_bytes")
        .parse()
        .expect("number");
    assert!(unlimited > 1 << 40, "no pod memory limit: {unlimited}");
    // BestEffort: the minimum shares.
    let e = format!("kubepods/besteffort/pod{}", uids[2]);
    assert_eq!(read(&root, &e, "cpu", "cpu.shares"), "2");
    // The containers' cgroups are below their pod's.
    let children = std::fs::read_dir(dir(&root, &g, "memory"))
        .expect("pod cgroup")
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .count();
    assert!(children >= 1, "no container cgroup below {g}");

    for (name, _) in &specs {
        pods.delete(name, &Default::default())
            .await
            .expect("delete");
    }
    for (name, _) in &specs {
        wait_for(&format!("{name} gone"), 120, || async {
            pods.get_opt(name).await.ok()?.is_none().then_some(())
        })
        .await;
    }
    for path in [&g, &b, &e] {
        wait_for(&format!("{path} removed"), 30, || async {
            (!dir(&root, path, "memory").exists()).then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_past_its_memory_limit_is_oom_killed_under_its_pod_cgroup_on_strake_runtime() {
    oom("strake-oom-0", RuntimeKind::Strake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_past_its_memory_limit_is_oom_killed_under_its_pod_cgroup_on_containerd() {
    oom("strake-oom-1", RuntimeKind::Containerd).await;
}

/// A Guaranteed pod limited to 64 MiB (so its pod cgroup is too) that allocates 200 MiB ends
/// `OOMKilled` with exit code 137.
async fn oom(node: &str, kind: RuntimeKind) {
    let cluster = Cluster::start(node, kind).await;
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let limits = serde_json::json!({ "cpu": "200m", "memory": "64Mi" });
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "hungry" },
        "spec": {
            "nodeName": node,
            "restartPolicy": "Never",
            "containers": [{
                "name": "app", "image": cluster.busybox(),
                // dd's 200 MiB block is one buffer, filled (touched) by the read.
                "command": ["dd", "if=/dev/zero", "of=/dev/null", "bs=200M", "count=1"],
                "resources": { "requests": limits, "limits": limits }
            }]
        }
    }))
    .expect("pod");
    wait_for("pod created", 60, || async {
        pods.create(&PostParams::default(), &pod).await.ok()
    })
    .await;
    let terminated = wait_for("the container terminated", 120, || async {
        let p = pods.get("hungry").await.ok()?;
        let c = p.status?.container_statuses?.into_iter().next()?;
        c.state?.terminated
    })
    .await;
    assert_eq!(
        (terminated.reason.as_deref(), terminated.exit_code),
        (Some("OOMKilled"), 137),
        "{terminated:?}"
    );
    let p = pods.get("hungry").await.expect("pod");
    assert_eq!(p.status.and_then(|s| s.phase).as_deref(), Some("Failed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cgroups_per_qos_no_qos_or_pod_cgroups_are_made() {
    let node = "strake-no-qos-0";
    let cluster = Cluster::start_with(node, RuntimeKind::Strake, "cgroupsPerQOS: false\n").await;
    let root = cluster.node.runtime.cgroup_parent().to_string();
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "plain" },
        "spec": { "nodeName": node, "terminationGracePeriodSeconds": 1, "containers": [{
            "name": "app", "image": cluster.busybox(),
            "command": ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"] }] }
    }))
    .expect("pod");
    wait_for("pod created", 60, || async {
        pods.create(&PostParams::default(), &pod).await.ok()
    })
    .await;
    wait_for("pod running", 120, || async {
        let p = pods.get("plain").await.ok()?;
        (p.status?.phase.as_deref() == Some("Running")).then_some(())
    })
    .await;
    assert!(
        !dir(&root, "kubepods", "memory").exists(),
        "no kubepods with cgroupsPerQOS: false"
    );
    // The container's cgroup is directly below the cgroup root.
    let below_root = std::fs::read_dir(dir(&root, ".", "memory"))
        .expect("cgroup root")
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .count();
    assert!(below_root >= 1, "no container cgroup below the root");
}
