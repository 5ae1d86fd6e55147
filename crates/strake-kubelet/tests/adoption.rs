//! A restarted strake-kubelet adopts what runs: a pod with a completed init container, a sidecar
//! and an app keeps its sandbox and containers (same IDs, no restart, the init container not run
//! again), on strake-runtime and on containerd; a pod deleted while the kubelet was down is
//! stopped and removed, with its directory and logs, once the kubelet is back.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};

mod common;
use common::{Cluster, KubeletNode, RuntimeKind, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_kubelet_adopts_a_pod_with_init_containers_on_strake_runtime() {
    scenario("strake-adopt-0", RuntimeKind::Strake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_kubelet_adopts_a_pod_with_init_containers_on_containerd() {
    scenario("strake-adopt-1", RuntimeKind::Containerd).await;
}

/// Every sandbox and container the runtime has (any state), sorted.
fn inventory(node: &KubeletNode) -> (Vec<String>, Vec<String>) {
    let ids = |args: &[&str]| {
        let out = node.runtime.crictl(args).expect("crictl");
        let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(String::from)
            .collect();
        v.sort();
        v
    };
    (ids(&["pods", "-q"]), ids(&["ps", "-a", "-q"]))
}

async fn scenario(node: &str, kind: RuntimeKind) {
    let mut cluster = Cluster::start(node, kind).await;
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let sleep = serde_json::json!(["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "adopted" },
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 1,
            "initContainers": [
                { "name": "init", "image": cluster.busybox(), "command": ["/bin/true"] },
                { "name": "side", "image": cluster.busybox(), "command": sleep,
                  "restartPolicy": "Always" }
            ],
            "containers": [{ "name": "app", "image": cluster.busybox(), "command": sleep }]
        }
    }))
    .expect("pod");
    wait_for("pod created", 60, || async {
        pods.create(&PostParams::default(), &pod).await.ok()
    })
    .await;
    wait_for("pod ready", 120, || async {
        let p = pods.get("adopted").await.ok()?;
        let ready = p
            .status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        ready.then_some(())
    })
    .await;
    let before = inventory(&cluster.node);
    assert_eq!(before.0.len(), 1, "one sandbox: {before:?}");
    assert_eq!(before.1.len(), 3, "init, side and app: {before:?}");

    cluster.node.restart_kubelet().expect("restart kubelet");
    // Long enough for the restarted kubelet to register, relist and sync the pod a few times.
    tokio::time::sleep(std::time::Duration::from_secs(8)).await;
    let after = inventory(&cluster.node);
    let log = cluster.node.log();
    assert_eq!(
        before,
        after,
        "the runtime's sandboxes and containers changed across a kubelet restart; kubelet log tail:\n{}",
        log.lines().rev().take(40).collect::<Vec<_>>().join("\n")
    );
    let p = pods.get("adopted").await.expect("pod");
    let status = p.status.expect("status");
    for c in status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten())
    {
        assert_eq!(c.restart_count, 0, "{} restarted", c.name);
    }
    assert!(
        status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
        "still Ready"
    );

    // Deleted while the kubelet was down: once its sources have reported every pod, the
    // restarted kubelet stops and removes what the runtime still runs of the pod, and the
    // pod's directory and logs.
    let uid = p.metadata.uid.clone().expect("uid");
    let pod_dir = cluster.node.dir.path().join("root/pods").join(&uid);
    let log_dir = cluster
        .node
        .dir
        .path()
        .join("pod-logs")
        .join(format!("default_adopted_{uid}"));
    assert!(
        pod_dir.is_dir() && log_dir.is_dir(),
        "{pod_dir:?} {log_dir:?}"
    );
    cluster.node.kill_kubelet();
    pods.delete(
        "adopted",
        &kube::api::DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .expect("delete");
    wait_for("pod gone from the API", 30, || async {
        pods.get_opt("adopted").await.ok()?.is_none().then_some(())
    })
    .await;
    assert_eq!(
        inventory(&cluster.node),
        before,
        "nothing stops without a kubelet"
    );
    cluster.node.start_kubelet().expect("start kubelet");
    wait_for("the orphan removed", 60, || async {
        let (sandboxes, containers) = inventory(&cluster.node);
        (sandboxes.is_empty() && containers.is_empty() && !pod_dir.exists() && !log_dir.exists())
            .then_some(())
    })
    .await;
}
