//! Node resources on a real node: allocatable leaves out the reservations and the hard
//! eviction thresholds, and container logs are rotated at `containerLogMaxSize`, keeping at
//! most `containerLogMaxFiles` files while `kubectl logs --tail` still reads the newest line.

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};

mod common;
use common::{Cluster, RuntimeKind, wait_for};

const NODE: &str = "strake-node-resources-0";

fn milli(q: &str) -> i128 {
    strake_kubelet::resources::parse_milli(q).expect("quantity")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocatable_is_reserved_and_logs_rotate_within_their_bound() {
    let cluster = Cluster::start_with(
        NODE,
        RuntimeKind::Strake,
        "kubeReserved: {cpu: 100m, memory: 64Mi}\nsystemReserved: {memory: 32Mi}\n\
         evictionHard: {memory.available: 50Mi, nodefs.available: 10%}\n\
         containerLogMaxSize: 1Mi\ncontainerLogMaxFiles: 3\ncontainerLogMonitorInterval: 1s\n",
    )
    .await;
    let (client, node) = (&cluster.client, &cluster.node);

    // Allocatable = capacity - kubeReserved - systemReserved - evictionHard.
    let nodes: Api<Node> = Api::all(client.clone());
    let status = nodes.get(NODE).await.expect("node").status.expect("status");
    let (cap, alloc) = (
        status.capacity.expect("capacity"),
        status.allocatable.expect("allocatable"),
    );
    assert_eq!(milli(&alloc["cpu"].0), milli(&cap["cpu"].0) - 100);
    assert_eq!(
        milli(&alloc["memory"].0),
        milli(&cap["memory"].0) - ((64 + 32 + 50) << 20) * 1000
    );
    let storage = milli(&cap["ephemeral-storage"].0) / 1000;
    let storage_alloc = milli(&alloc["ephemeral-storage"].0) / 1000;
    assert_eq!(storage_alloc, storage - (storage as f64 * 0.1) as i128);

    // A container writing about 2 MB a second, checked every second against 1 MiB.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "chatty" },
        "spec": {
            "nodeName": NODE,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "app",
                "image": cluster.busybox(),
                "command": ["/bin/sh", "-c",
                    "trap 'exit 0' TERM; while true; do \
                     yes 0123456789abcdefghij | head -n 10000; echo last; sleep 0.1; done"],
            }]
        }
    }))
    .expect("pod");
    wait_for("pod created", 60, || async {
        pods.create(&PostParams::default(), &pod).await.ok()
    })
    .await;
    let uid = wait_for("pod uid", 30, || async {
        pods.get("chatty").await.ok().and_then(|p| p.metadata.uid)
    })
    .await;
    let dir = node
        .dir
        .path()
        .join("pod-logs")
        .join(format!("default_chatty_{uid}"))
        .join("app");
    let files = || -> Vec<(String, u64)> {
        std::fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .map(|e| {
                        let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                        (e.file_name().to_string_lossy().into_owned(), len)
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    // While the container keeps writing, rotation goes on and older files are removed: at no
    // time are there more than containerLogMaxFiles logs (a `.tmp` is a compression under way),
    // yet more rotated files come and go than that. Sizes depend on how often the monitor gets
    // to run on a busy machine, so they are not asserted.
    let mut seen = std::collections::BTreeSet::new();
    wait_for("rotated logs to come and go", 180, || {
        let f = files();
        let logs: Vec<&String> = f
            .iter()
            .map(|(n, _)| n)
            .filter(|n| !n.ends_with(".tmp"))
            .collect();
        assert!(
            logs.len() <= 3,
            "more than containerLogMaxFiles files: {f:?}"
        );
        for n in &logs {
            if *n != "0.log" {
                seen.insert(n.trim_end_matches(".gz").to_string());
            }
        }
        let done = seen.len() >= 4 && logs.iter().any(|n| n.ends_with(".gz"));
        async move { done.then_some(()) }
    })
    .await;
    // `kubectl logs --tail=1` through the kubelet reads the newest line of the live file.
    let logs = wait_for("a last line", 30, || async {
        let bin = strake_integration::paths::kubernetes_bin("kubectl").ok()?;
        let out = tokio::process::Command::new(bin)
            .arg(format!(
                "--kubeconfig={}",
                cluster.cp.kubeconfig().display()
            ))
            .args(["logs", "chatty", "--tail=1"])
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success() && !text.is_empty()).then_some(text)
    })
    .await;
    assert_eq!(logs.lines().count(), 1, "{logs:?}");
    let last = logs.trim();
    assert!(last == "0123456789abcdefghij" || last == "last", "{last:?}");
}
