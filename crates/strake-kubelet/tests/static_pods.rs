//! Static pods: from the manifest directory, with no API server at all (standalone), and
//! mirrored to the API server when there is one; removing the manifest removes the pod.

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use strake_integration::control_plane::{ControlPlane, Options};
use strake_integration::netns::ClusterNet;
use strake_integration::registry::Registry;

mod common;
use common::{KubeletNode, wait_for};

fn manifest(image: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: static-web\n  namespace: kube-system\nspec:\n  \
         terminationGracePeriodSeconds: 1\n  containers:\n  - name: web\n    image: {image}\n    \
         command: [\"/bin/sh\", \"-c\", \"echo static; trap 'exit 0' TERM; sleep 3600 & wait\"]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_pod_runs_with_no_api_server_and_goes_with_its_manifest() {
    let net = ClusterNet::create().expect("cluster net");
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(&net, &dir.path().join("registry")).expect("registry");
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).expect("manifest dir");
    let image = format!("{}/strake/busybox:1", registry.open_in_cluster());
    std::fs::write(manifests.join("web.yaml"), manifest(&image)).expect("manifest");
    let extra = format!(
        "staticPodPath: {}\nfileCheckFrequency: 1s\n",
        manifests.display()
    );
    let node = KubeletNode::start_standalone(&net, 0, "lonely", &extra)
        .await
        .expect("start node");
    wait_for("static pod container running", 90, || async {
        let out = node
            .runtime
            .crictl(&["ps", "-q", "--name", "web", "--state", "running"])
            .ok()?;
        (!out.stdout.is_empty()).then_some(())
    })
    .await;
    let pods = node
        .runtime
        .crictl(&["pods", "--name", "static-web-lonely", "-q"])
        .expect("crictl pods");
    assert!(!pods.stdout.is_empty(), "sandbox named <pod>-<node>");
    std::fs::remove_file(manifests.join("web.yaml")).expect("remove manifest");
    wait_for("static pod removed", 60, || async {
        let out = node.runtime.crictl(&["pods", "-q"]).ok()?;
        out.stdout.is_empty().then_some(())
    })
    .await;
    drop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_pod_is_mirrored_to_the_api_server() {
    let cp = ControlPlane::start(Options::default())
        .await
        .expect("control plane");
    let registry = Registry::start(cp.net(), &cp.dir().join("registry")).expect("registry");
    let client = cp.client().await.expect("client");
    let dir = tempfile::tempdir().expect("tempdir");
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).expect("manifest dir");
    let image = format!("{}/strake/busybox:1", registry.open_in_cluster());
    std::fs::write(manifests.join("web.yaml"), manifest(&image)).expect("manifest");
    let extra = format!(
        "staticPodPath: {}\nfileCheckFrequency: 1s\n",
        manifests.display()
    );
    let node = KubeletNode::start(&cp, 0, "mirrored", &extra)
        .await
        .expect("start node");
    let nodes: Api<Node> = Api::all(client.clone());
    wait_for("node registered", 60, || async {
        nodes.get_opt("mirrored").await.ok().flatten()
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
    let mirror = wait_for("mirror pod Running", 90, || async {
        let p = pods.get_opt("static-web-mirrored").await.ok().flatten()?;
        (p.status.as_ref()?.phase.as_deref() == Some("Running")).then_some(p)
    })
    .await;
    let ann = mirror.metadata.annotations.clone().unwrap_or_default();
    assert!(ann.contains_key("kubernetes.io/config.mirror"), "{ann:?}");
    assert_eq!(
        ann.get("kubernetes.io/config.source").map(String::as_str),
        Some("file")
    );
    let owner = mirror.metadata.owner_references.clone().unwrap_or_default();
    assert!(
        owner
            .iter()
            .any(|o| o.kind == "Node" && o.name == "mirrored"),
        "{owner:?}"
    );
    // The kubelet runs the pod once, from its manifest, not again for the mirror.
    let out = node.runtime.crictl(&["pods", "-q"]).expect("crictl pods");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);

    std::fs::remove_file(manifests.join("web.yaml")).expect("remove manifest");
    wait_for("mirror pod deleted", 60, || async {
        pods.get_opt("static-web-mirrored")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    drop(node);
}

/// Under systemd's `Type=notify` (its unit), the kubelet sends `READY=1` once its API and
/// healthz serve. systemd is not PID 1 here: the test plays the service manager's part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubelet_tells_the_service_manager_it_is_ready() {
    let net = ClusterNet::create().expect("cluster net");
    let dir = tempfile::tempdir().expect("tempdir");
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).expect("manifest dir");
    let extra = format!("staticPodPath: {}\n", manifests.display());
    let mut node = KubeletNode::start_standalone(&net, 0, "notified", &extra)
        .await
        .expect("start node");
    let notify = dir.path().join("notify.sock");
    let manager =
        std::os::unix::net::UnixDatagram::bind(&notify).expect("bind the notification socket");
    manager
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .expect("timeout");
    node.restart_kubelet_with_env(&[("NOTIFY_SOCKET", notify.as_os_str())])
        .expect("restart the kubelet under a notification socket");
    let mut buf = [0u8; 256];
    let n = manager.recv(&mut buf).unwrap_or_else(|e| {
        panic!(
            "no READY=1: {e}\n{}",
            std::fs::read_to_string(node.log_path()).unwrap_or_default()
        )
    });
    assert_eq!(&buf[..n], b"READY=1\n");
    assert!(
        strake_integration::process::pid_alive(node.kubelet_pid),
        "the kubelet keeps running"
    );
    drop(node);
}
