//! The conformance bed's multi-node cluster works: pods on different nodes reach each other over
//! the routed pod CIDRs, the cluster DNS answers, Services reach pods on the other node, and
//! nothing is left behind.
//!
//! These need root, `make testbed` and `make conformance-bed` (the conformance images, which
//! `make testbed` does not build): they are ignored by default; run them with
//! `cargo test -p strake-integration --test cluster -- --ignored --test-threads=1`.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use strake_integration::cluster::{Cluster, NodeKind, Options};

const AGNHOST: &str = "registry.k8s.io/e2e-test-images/agnhost:2.66.1";

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("info,kube_client=off")
        .try_init();
}

fn pod(name: &str, node: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "labels": { "app": "netexec" } },
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "netexec",
                "image": AGNHOST,
                "args": ["netexec", "--http-port=8080"],
                "ports": [{ "containerPort": 8080 }]
            }]
        }
    }))
    .expect("pod literal")
}

fn kubectl(c: &Cluster, args: &[&str]) -> String {
    let out = c
        .kubectl(args)
        .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Retries `f` until it returns `Some`, for at most `secs`.
async fn retry<T, F, Fut>(what: &str, secs: u64, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `kubectl` in pod `pod`: its trimmed stdout when it succeeded and printed something.
fn exec(c: &Cluster, pod: &str, cmd: &[&str]) -> Option<String> {
    let mut args = vec!["exec", pod, "--"];
    args.extend_from_slice(cmd);
    let out = c.kubectl(&args).ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string()).filter(|s| !s.is_empty())
}

async fn two_nodes_route_pods_and_serve_dns(kind: NodeKind) {
    init_tracing();
    let mut say = |line: String| eprintln!("{line}");
    let c = Cluster::start(&Options { nodes: 2, kind }, &mut say)
        .await
        .expect("cluster starts");
    let ns_names: Vec<String> = c
        .nodes
        .iter()
        .map(|n| n.ns().ns().name().to_string())
        .collect();
    let cluster_ns = c.cp.net().ns().name().to_string();
    let client = c.cp.client().await.expect("client");
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let names = ["a", "b"];
    for (name, node) in names.iter().zip(&c.nodes) {
        let p = pod(name, node.name());
        retry("pod created", 60, || async {
            pods.create(&PostParams::default(), &p).await.ok()
        })
        .await;
    }
    let mut ips = Vec::new();
    for name in names {
        let ip = retry(&format!("pod {name} running"), 180, || async {
            let st = pods.get(name).await.ok()?.status?;
            (st.phase.as_deref() == Some("Running")).then_some(())?;
            st.pod_ip
        })
        .await;
        ips.push(ip);
    }
    // Different nodes, different pod CIDRs (the controller-manager's /24s).
    let net = |ip: &str| ip.rsplit_once('.').map(|(n, _)| n.to_string());
    assert_ne!(net(&ips[0]), net(&ips[1]), "{ips:?}");

    // Pod a (node 0) reaches pod b (node 1) directly: routes between the pod CIDRs.
    let url = format!("http://{}:8080/hostname", ips[1]);
    let answer = retry("pod a reaches pod b", 60, || async {
        exec(&c, "a", &["curl", "-s", "--max-time", "3", &url])
    })
    .await;
    assert_eq!(answer, "b");

    // The cluster DNS (CoreDNS at 10.96.0.10, reached through the node's proxy) answers.
    let resolved = retry("cluster DNS answers", 60, || async {
        exec(
            &c,
            "a",
            &["getent", "hosts", "kubernetes.default.svc.cluster.local"],
        )
    })
    .await;
    assert!(resolved.starts_with("10.96.0.1 "), "{resolved:?}");

    // A Service in front of pod b, reached from pod a by name.
    kubectl(
        &c,
        &[
            "expose",
            "pod",
            "b",
            "--name=svc-b",
            "--port=80",
            "--target-port=8080",
        ],
    );
    let answer = retry("pod a reaches svc-b by name", 60, || async {
        exec(
            &c,
            "a",
            &["curl", "-s", "--max-time", "3", "http://svc-b/hostname"],
        )
    })
    .await;
    assert_eq!(answer, "b");

    drop(pods);
    drop(c);
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    for ns in ns_names.iter().chain([&cluster_ns]) {
        assert!(!left.contains(ns), "namespace {ns} left behind");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs make conformance-bed (conformance images)"]
async fn upstream_nodes_route_pods_and_serve_dns() {
    two_nodes_route_pods_and_serve_dns(NodeKind::Upstream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs make conformance-bed (conformance images)"]
async fn strake_nodes_route_pods_and_serve_dns() {
    two_nodes_route_pods_and_serve_dns(NodeKind::Strake).await;
}
