//! The same Guaranteed, Burstable and BestEffort pods on a strake-kubelet node and on an
//! upstream kubelet node (both on containerd, one control plane, `podPidsLimit: 256` on both):
//! every pod cgroup file upstream sets holds the same value on both nodes, and so do the QoS
//! cgroups' shares. Upstream is the specification; this compares against it, not against
//! numbers written down here.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};
use strake_integration::containerd::Containerd;
use strake_integration::control_plane::{ControlPlane, Options};
use strake_integration::registry::Registry;
use strake_integration::upstream_kubelet::{self, KubeletCgroupRoot, UpstreamKubelet};

mod common;
use common::{KubeletNode, RuntimeKind, wait_for};

const STRAKE: &str = "cgroups-strake";
const UPSTREAM: &str = "cgroups-upstream";

/// The files compared, by the v1 controller whose hierarchy holds them.
const FILES: [(&str, &str); 5] = [
    ("cpu", "cpu.shares"),
    ("cpu", "cpu.cfs_quota_us"),
    ("cpu", "cpu.cfs_period_us"),
    ("memory", "memory.limit_in_bytes"),
    ("pids", "pids.max"),
];

/// The upstream kubelet's `path` below its `cgroupRoot`, in the hierarchy holding `file`.
fn upstream_dir(root: &KubeletCgroupRoot, path: &str, file: &str) -> PathBuf {
    root.locations()
        .iter()
        .map(|l| l.join(path))
        .find(|d| d.join(file).exists())
        .unwrap_or_else(|| panic!("no hierarchy of the upstream kubelet has {path}/{file}"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .to_string()
}

fn pod(name: &str, node: &str, image: &str, kind: &str) -> Pod {
    let sleep = serde_json::json!(["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]);
    let r = |req: serde_json::Value, lim: serde_json::Value| serde_json::json!({ "requests": req, "limits": lim });
    let containers = match kind {
        "guaranteed" => serde_json::json!([
            { "name": "a", "image": image, "command": sleep, "resources": r(
                serde_json::json!({ "cpu": "300m", "memory": "48Mi" }),
                serde_json::json!({ "cpu": "300m", "memory": "48Mi" })) },
            { "name": "b", "image": image, "command": sleep, "resources": r(
                serde_json::json!({ "cpu": "200m", "memory": "16Mi" }),
                serde_json::json!({ "cpu": "200m", "memory": "16Mi" })) }
        ]),
        "burstable" => serde_json::json!([
            { "name": "a", "image": image, "command": sleep, "resources": r(
                serde_json::json!({ "cpu": "150m", "memory": "16Mi" }),
                serde_json::json!({ "cpu": "400m", "memory": "64Mi" })) }
        ]),
        "burstable-open" => serde_json::json!([
            { "name": "a", "image": image, "command": sleep, "resources": r(
                serde_json::json!({ "cpu": "50m" }), serde_json::json!({ "memory": "32Mi" })) },
            { "name": "b", "image": image, "command": sleep }
        ]),
        _ => serde_json::json!([{ "name": "a", "image": image, "command": sleep }]),
    };
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name },
        "spec": { "nodeName": node, "terminationGracePeriodSeconds": 1, "containers": containers }
    }))
    .expect("pod")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_and_qos_cgroups_match_the_upstream_kubelets_for_the_same_pods() {
    let cp = ControlPlane::start(Options::default())
        .await
        .expect("control plane");
    let registry = Registry::start(cp.net(), &cp.dir().join("registry")).expect("registry");
    let client = cp.client().await.expect("client");
    let image = format!("{}/strake/busybox:1", registry.open_in_cluster());

    let strake = KubeletNode::start_on(
        &cp,
        0,
        STRAKE,
        "podPidsLimit: 256\n",
        RuntimeKind::Containerd,
    )
    .await
    .expect("strake node");
    // Declared in reverse drop order: the kubelet goes first, then containerd, the namespace
    // and last the upstream kubelet's cgroup root.
    let cgroup_root = KubeletCgroupRoot::create().expect("cgroup root");
    let mut ns = cp.net().add_node(1).expect("node namespace");
    let containerd = Containerd::start(&mut ns, 1).await.expect("containerd");
    for img in [
        image.clone(),
        format!("{}/strake/pause:1", registry.open_in_cluster()),
    ] {
        let out = containerd.crictl(&["pull", &img]).expect("crictl pull");
        assert!(out.status.success(), "pull {img}");
    }
    let kubeconfig = cp.node_kubeconfig(UPSTREAM).expect("kubeconfig");
    let mut upstream = UpstreamKubelet::start(
        &ns,
        &upstream_kubelet::Options {
            node_name: UPSTREAM,
            kubeconfig: &kubeconfig,
            runtime_endpoint: &containerd.endpoint(),
            cgroup_root: &cgroup_root,
            extra_config: "podPidsLimit: 256\n",
        },
    )
    .expect("upstream kubelet");

    let nodes: Api<Node> = Api::all(client.clone());
    for name in [STRAKE, UPSTREAM] {
        wait_for(&format!("{name} Ready"), 180, || async {
            let n = nodes.get_opt(name).await.ok().flatten()?;
            n.status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
                .then_some(())
        })
        .await;
    }
    upstream.check_running().expect("upstream kubelet running");

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let kinds = ["guaranteed", "burstable", "burstable-open", "besteffort"];
    let mut uids = std::collections::BTreeMap::new();
    for kind in kinds {
        for node in [STRAKE, UPSTREAM] {
            let name = format!("{kind}-{node}");
            let p = pod(&name, node, &image, kind);
            let created = wait_for("pod created", 60, || async {
                pods.create(&PostParams::default(), &p).await.ok()
            })
            .await;
            uids.insert(name, created.metadata.uid.expect("uid"));
        }
    }
    for name in uids.keys() {
        wait_for(&format!("{name} running"), 180, || async {
            let p = pods.get(name).await.ok()?;
            (p.status?.phase.as_deref() == Some("Running")).then_some(())
        })
        .await;
    }

    let strake_root = strake.runtime.cgroup_parent().to_string();
    let mut compared = 0;
    for kind in kinds {
        let qos_dir = match kind {
            "guaranteed" => "kubepods".to_string(),
            "besteffort" => "kubepods/besteffort".to_string(),
            _ => "kubepods/burstable".to_string(),
        };
        let s_path = format!("{qos_dir}/pod{}", uids[&format!("{kind}-{STRAKE}")]);
        let u_path = format!("{qos_dir}/pod{}", uids[&format!("{kind}-{UPSTREAM}")]);
        for (controller, file) in FILES {
            let ours = read(&common::cgroup_dir(&strake_root, &s_path, controller).join(file));
            let theirs = read(&upstream_dir(&cgroup_root, &u_path, file).join(file));
            assert_eq!(
                ours, theirs,
                "{kind} pod: {file} (strake-kubelet vs kubelet)"
            );
            compared += 1;
        }
    }
    // The QoS cgroups' shares: BestEffort's floor, Burstable's sum of its pods' requests.
    for qos in ["kubepods/besteffort", "kubepods/burstable"] {
        let ours = read(&common::cgroup_dir(&strake_root, qos, "cpu").join("cpu.shares"));
        let theirs = read(&upstream_dir(&cgroup_root, qos, "cpu.shares").join("cpu.shares"));
        assert_eq!(ours, theirs, "{qos} cpu.shares");
    }
    assert_eq!(compared, kinds.len() * FILES.len());

    drop(upstream);
    drop(containerd);
    drop(ns);
    drop(cgroup_root);
    drop(strake);
}
