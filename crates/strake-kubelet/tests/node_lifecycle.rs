//! strake-kubelet against the real control plane, with containerd as its runtime, both inside a
//! test-bed node namespace: the Node registers Ready with real capacity, its Lease renews, a
//! dead runtime turns it NotReady with a reason, and a stopped kubelet lets the node lifecycle
//! controller mark it not ready after the grace period.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use strake_integration::containerd::Containerd;
use strake_integration::control_plane::{ControlPlane, Options};
use strake_integration::process::pid_alive;

mod common;
use common::wait_for;

const NODE: &str = "strake-node-0";

fn ready(node: &Node) -> Option<(String, String, String)> {
    let c = node
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")?;
    Some((
        c.status.clone(),
        c.reason.clone().unwrap_or_default(),
        c.message.clone().unwrap_or_default(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_registers_ready_renews_its_lease_and_goes_not_ready() {
    let cp = ControlPlane::start(Options {
        node_monitor_grace_period: Some(Duration::from_secs(16)),
        ..Options::default()
    })
    .await
    .expect("control plane");
    let client = cp.client().await.expect("client");
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");

    let mut node_ns = cp.net().add_node(0).expect("node namespace");
    let containerd = Containerd::start(&mut node_ns, 0)
        .await
        .expect("containerd");
    let kubeconfig = cp.node_kubeconfig(NODE).expect("node kubeconfig");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("kubelet.yaml");
    std::fs::write(
        &config,
        format!(
            "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n\
             nodeStatusUpdateFrequency: 1s\nnodeLeaseDurationSeconds: 8\n{}",
            strake_integration::kubelet::TEST_EVICTION_HARD
        ),
    )
    .expect("kubelet config");
    let args = [
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--config={}", config.display()),
        format!("--hostname-override={NODE}"),
        format!("--node-ip={}", node_ns.ip()),
        format!("--container-runtime-endpoint={}", containerd.endpoint()),
        format!("--root-dir={}", dir.path().join("root").display()),
        "--node-labels=strake.dev/test=yes".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let kubelet = node_ns
        .spawn(
            "strake-kubelet",
            Path::new(env!("CARGO_BIN_EXE_strake-kubelet")),
            &args,
            &dir.path().join("kubelet.log"),
        )
        .expect("start kubelet");

    let node = wait_for("node Ready", 60, || async {
        let n = nodes.get_opt(NODE).await.ok().flatten()?;
        (ready(&n)?.0 == "True").then_some(n)
    })
    .await;
    let status = node.status.clone().expect("status");
    let cap = status.capacity.expect("capacity");
    let cpus = std::thread::available_parallelism().expect("cpus").get();
    assert_eq!(cap["cpu"].0, cpus.to_string());
    assert_eq!(cap["pods"].0, "110");
    assert!(
        cap["memory"].0.ends_with("Ki") && cap["memory"].0 != "0Ki",
        "{:?}",
        cap["memory"]
    );
    assert!(status.allocatable.is_some());
    let info = status.node_info.expect("nodeInfo");
    assert!(
        info.container_runtime_version.starts_with("containerd://"),
        "{}",
        info.container_runtime_version
    );
    assert!(
        info.kubelet_version.starts_with("v1.37."),
        "{}",
        info.kubelet_version
    );
    assert!(!info.kernel_version.is_empty());
    let addrs = status.addresses.expect("addresses");
    assert!(
        addrs
            .iter()
            .any(|a| a.type_ == "InternalIP" && a.address == "10.213.0.10"),
        "{addrs:?}"
    );
    let labels = node.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("kubernetes.io/hostname").map(String::as_str),
        Some(NODE)
    );
    assert_eq!(
        labels.get("strake.dev/test").map(String::as_str),
        Some("yes")
    );

    // The health endpoint answers on the node's loopback, at upstream's port.
    let out = node_ns
        .ns()
        .run(
            "curl",
            &["-s", "--max-time", "3", "http://127.0.0.1:10248/healthz"],
        )
        .expect("healthz");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok");

    // The Lease exists, is held by the node, and is renewed.
    let first = wait_for("lease", 20, || async {
        leases.get_opt(NODE).await.ok().flatten()
    })
    .await;
    let spec = first.spec.clone().expect("lease spec");
    assert_eq!(spec.holder_identity.as_deref(), Some(NODE));
    assert_eq!(spec.lease_duration_seconds, Some(8));
    let t0 = spec.renew_time.expect("renew time").0;
    wait_for("lease renewal", 20, || async {
        let l = leases.get_opt(NODE).await.ok().flatten()?;
        (l.spec?.renew_time?.0 > t0).then_some(())
    })
    .await;

    // The runtime dies: the node reports NotReady and says why.
    let containerd_pid = containerd.pid();
    // SAFETY: kill(2) on the containerd this test started.
    unsafe { libc::kill(containerd_pid as libc::pid_t, libc::SIGKILL) };
    let (_, reason, message) = wait_for("NotReady for a dead runtime", 30, || async {
        let r = ready(&nodes.get_opt(NODE).await.ok().flatten()?)?;
        (r.0 == "False").then_some(r)
    })
    .await;
    assert_eq!(reason, "KubeletNotReady");
    assert!(message.contains("container runtime is down"), "{message}");

    // The kubelet stops: after the grace period the node lifecycle controller marks it.
    // SAFETY: kill(2) on the kubelet this test started.
    unsafe { libc::kill(kubelet as libc::pid_t, libc::SIGKILL) };
    wait_for("kubelet gone", 10, || async {
        (!pid_alive(kubelet)).then_some(())
    })
    .await;
    let (status, reason, _) = wait_for("node Unknown after the grace period", 60, || async {
        let r = ready(&nodes.get_opt(NODE).await.ok().flatten()?)?;
        (r.0 == "Unknown").then_some(r)
    })
    .await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("Unknown", "NodeStatusUnknown")
    );
    drop(containerd);
    drop(node_ns);
}
