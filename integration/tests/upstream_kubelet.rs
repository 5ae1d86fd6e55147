//! The upstream kubelet launcher: the kubelet registers a Ready node and runs a pod (with its
//! service-account token volume) on containerd, while the host keeps its kernel tunables, its
//! `/var/log` and its cgroups; dropping the guards leaves no mount and no cgroup behind.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};
use strake_integration::containerd::Containerd;
use strake_integration::control_plane::{ControlPlane, Options};
use strake_integration::registry::Registry;
use strake_integration::upstream_kubelet::{self, KubeletCgroupRoot, UpstreamKubelet};

const NODE: &str = "upstream-kubelet-0";

fn sysctls() -> Vec<(String, String)> {
    [
        "vm/overcommit_memory",
        "vm/panic_on_oom",
        "kernel/panic",
        "kernel/panic_on_oops",
        "kernel/keys/root_maxkeys",
        "kernel/keys/root_maxbytes",
    ]
    .iter()
    .map(|f| {
        let v = std::fs::read_to_string(format!("/proc/sys/{f}")).unwrap_or_default();
        (f.to_string(), v.trim().to_string())
    })
    .collect()
}

fn mounts_below(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| std::path::Path::new(m).starts_with(dir))
        .map(str::to_string)
        .collect()
}

async fn wait_for<T, F, Fut>(what: &str, secs: u64, kubelet: &mut UpstreamKubelet, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if let Err(e) = kubelet.check_running() {
            panic!("kubelet exited while waiting for {what}: {e}");
        }
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let log = std::fs::read_to_string(kubelet.log_path()).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    panic!(
        "timed out after {secs} s waiting for {what}; kubelet log:\n{}",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_kubelet_runs_a_pod_without_touching_the_host() {
    let before = sysctls();
    let fixed_paths = ["/var/log/containers", "/var/lib/kubelet"];
    let existed: Vec<bool> = fixed_paths
        .iter()
        .map(|p| std::path::Path::new(p).exists())
        .collect();
    let cp = ControlPlane::start(Options::default())
        .await
        .expect("control plane");
    let registry = Registry::start(cp.net(), &cp.dir().join("registry")).expect("registry");
    let client = cp.client().await.expect("client");

    let cgroup_root = KubeletCgroupRoot::create().expect("cgroup root");
    let locations = cgroup_root.locations().to_vec();
    assert!(
        locations.iter().all(|l| l.exists()),
        "cgroup root created in every hierarchy: {locations:?}"
    );
    let mut ns = cp.net().add_node(0).expect("node namespace");
    let containerd = Containerd::start(&mut ns, 0).await.expect("containerd");
    let kubeconfig = cp.node_kubeconfig(NODE).expect("kubeconfig");
    let mut kubelet = UpstreamKubelet::start(
        &ns,
        &upstream_kubelet::Options {
            node_name: NODE,
            kubeconfig: &kubeconfig,
            runtime_endpoint: &containerd.endpoint(),
            cgroup_root: &cgroup_root,
            extra_config: "",
        },
    )
    .expect("start kubelet");
    let dir = kubelet.dir().to_path_buf();

    let nodes: Api<Node> = Api::all(client.clone());
    wait_for("node Ready", 180, &mut kubelet, || async {
        let n = nodes.get_opt(NODE).await.ok().flatten()?;
        n.status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
            .then_some(())
    })
    .await;

    let image = format!("{}/strake/busybox:1", registry.open_in_cluster());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "sleeper" },
        "spec": {
            "nodeName": NODE,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "app",
                "image": image,
                "command": ["/bin/sh", "-c", "test -s /var/run/secrets/kubernetes.io/serviceaccount/token && exec sleep 3600"]
            }]
        }
    }))
    .expect("pod");
    // The default ServiceAccount appears shortly after the control plane starts.
    wait_for("pod created", 60, &mut kubelet, || async {
        pods.create(&PostParams::default(), &pod).await.ok()
    })
    .await;
    wait_for("pod Running", 180, &mut kubelet, || async {
        let p = pods.get("sleeper").await.ok()?;
        (p.status?.phase.as_deref() == Some("Running")).then_some(())
    })
    .await;
    // The token volume the kubelet mounted in its own mount namespace reached the host's,
    // where containerd bind-mounts it (the container only keeps running when it sees it).
    let projected: Vec<String> = mounts_below(&dir)
        .into_iter()
        .filter(|m| m.contains("kubernetes.io~projected"))
        .collect();
    assert_eq!(projected.len(), 1, "{:?}", mounts_below(&dir));
    let p = pods.get("sleeper").await.expect("pod");
    let restarts: i32 = p
        .status
        .and_then(|s| s.container_statuses)
        .unwrap_or_default()
        .iter()
        .map(|c| c.restart_count)
        .sum();
    assert_eq!(restarts, 0);
    let pid = kubelet.pid();
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("kubelet cgroup");
    assert_eq!(
        cgroup,
        std::fs::read_to_string("/proc/self/cgroup").expect("own cgroup"),
        "the kubelet did not move itself"
    );
    let kubepods: Vec<_> = locations
        .iter()
        .filter(|l| l.join("kubepods").is_dir())
        .collect();
    assert!(
        !kubepods.is_empty(),
        "kubepods below the cgroup root: {locations:?}"
    );
    assert_eq!(sysctls(), before, "kernel tunables unchanged");
    let exist: Vec<bool> = fixed_paths
        .iter()
        .map(|p| std::path::Path::new(p).exists())
        .collect();
    assert_eq!(exist, existed, "host paths untouched: {fixed_paths:?}");

    drop(kubelet);
    drop(containerd);
    drop(ns);
    drop(cgroup_root);
    assert_eq!(mounts_below(&dir), Vec::<String>::new(), "mounts left");
    assert!(!dir.exists(), "kubelet directory removed");
    for l in &locations {
        assert!(!l.exists(), "cgroup left: {}", l.display());
    }
}
