//! containerd, the peer runtime, works on a test node: pulls from the local registry, gives a
//! pod an IP from the node's CNI bridge, runs a container and returns its logs, all driven by
//! upstream's crictl. This is the reference behaviour strake-runtime is held to.

use strake_integration::containerd::Containerd;
use strake_integration::netns::ClusterNet;
use strake_integration::registry::Registry;

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("info")
        .try_init();
}

fn stdout(out: std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_runs_a_pod_from_the_local_registry() {
    init_tracing();
    let net = ClusterNet::create().expect("cluster net");
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(&net, dir.path()).expect("registry");
    let mut node = net.add_node(0).expect("node");
    let ctr = Containerd::start(&mut node, 0)
        .await
        .expect("containerd starts");

    let image = format!("{}/strake/busybox:1", registry.open_in_cluster());
    ctr.crictl(&["pull", &image]).expect("pull busybox");

    let logs = dir.path().join("pod-logs");
    std::fs::create_dir_all(&logs).expect("log dir");
    let pod = serde_json::json!({
        "metadata": { "name": "web", "namespace": "default", "uid": "uid-web", "attempt": 0 },
        "hostname": "web",
        "log_directory": logs,
        "linux": { "cgroup_parent": ctr.cgroup_parent() }
    });
    let container = serde_json::json!({
        "metadata": { "name": "hello" },
        "image": { "image": image },
        "command": ["/bin/sh", "-c", "echo hello from $(hostname); sleep 300"],
        "log_path": "hello.log",
        "linux": {}
    });
    let pod_file = dir.path().join("pod.json");
    let ctr_file = dir.path().join("ctr.json");
    std::fs::write(&pod_file, pod.to_string()).expect("write pod");
    std::fs::write(&ctr_file, container.to_string()).expect("write container");
    let pod_file = pod_file.to_str().expect("utf-8");
    let ctr_file = ctr_file.to_str().expect("utf-8");

    let pod_id = stdout(ctr.crictl(&["runp", pod_file]).expect("run pod"));
    let cid = stdout(
        ctr.crictl(&["create", &pod_id, ctr_file, pod_file])
            .expect("create"),
    );
    ctr.crictl(&["start", &cid]).expect("start");

    let inspect: serde_json::Value = serde_json::from_str(&stdout(
        ctr.crictl(&["inspectp", &pod_id]).expect("inspectp"),
    ))
    .expect("inspectp json");
    let ip = inspect["status"]["network"]["ip"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        ip.starts_with("10.88.0."),
        "pod IP {ip:?} not from the node's bridge"
    );

    let mut text = String::new();
    for _ in 0..50 {
        let out = ctr.crictl(&["logs", &cid]).expect("logs");
        text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if text.contains("hello from web") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(text.contains("hello from web"), "logs: {text:?}");

    // The node reaches the pod over the bridge, as a kubelet probe would.
    node.ns()
        .run("/bin/busybox", &["ping", "-c", "1", "-W", "2", &ip])
        .expect("node pings its pod");

    ctr.crictl(&["stopp", &pod_id]).expect("stop pod");
    ctr.crictl(&["rmp", &pod_id]).expect("remove pod");
    let left = stdout(ctr.crictl(&["pods", "-q"]).expect("list pods"));
    assert!(left.is_empty(), "pods left: {left}");
}
