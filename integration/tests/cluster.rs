//! The swap-in matrix on the conformance bed's multi-node cluster: for each node kind (all
//! Strake, all upstream, and the three mixes where one upstream daemon is replaced by its Strake
//! twin) two nodes run one workload as a user would: a Deployment spread over both nodes behind
//! a Service, reached by name through the cluster DNS and across nodes, `kubectl exec`,
//! `kubectl logs`, `kubectl port-forward`, a liveness restart, and a pod reaching a pod on the
//! other node by its address. Nothing is left behind.
//!
//! They need `make conformance-bed` (CoreDNS and agnhost come from the conformance images),
//! which `make test` builds (cached).

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use strake_integration::cluster::{Cluster, NodeKind, Options};

const AGNHOST: &str = "registry.k8s.io/e2e-test-images/agnhost:2.66.1";

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("info,kube_client=off")
        .try_init();
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

/// `kubectl port-forward` to `pod`, one GET of `path`: the response's body.
fn port_forward_get(c: &Cluster, pod: &str, port: u16, path: &str) -> String {
    let response =
        strake_integration::kubectl::port_forward_get(c.cp.kubeconfig(), pod, port, path)
            .expect("kubectl port-forward");
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.trim().to_string())
        .unwrap_or(response)
}

fn object<T: k8s_openapi::serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).expect("object literal")
}

/// The workload of the matrix on a 2-node cluster of `kind`; with `top`, metrics-server too,
/// and `kubectl top` of the nodes and the workload's pods.
async fn two_nodes_run_the_workload(kind: NodeKind, top: bool) {
    init_tracing();
    let mut say = |line: String| eprintln!("{line}");
    let mut c = Cluster::start(&Options { nodes: 2, kind }, &mut say)
        .await
        .expect("cluster starts");
    let ns_names: Vec<String> = c
        .nodes
        .iter()
        .map(|n| n.ns().ns().name().to_string())
        .collect();
    let cluster_ns = c.cp.net().ns().name().to_string();
    let client = c.cp.client().await.expect("client");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let node_names: Vec<String> = c.nodes.iter().map(|n| n.name().to_string()).collect();

    // A Deployment of two netexec servers, one per node (required anti-affinity), behind a
    // Service.
    let web: Deployment = object(serde_json::json!({
        "metadata": { "name": "web" },
        "spec": {
            "replicas": 2,
            "selector": { "matchLabels": { "app": "web" } },
            "template": {
                "metadata": { "labels": { "app": "web" } },
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "affinity": { "podAntiAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": [
                        { "labelSelector": { "matchLabels": { "app": "web" } },
                          "topologyKey": "kubernetes.io/hostname" } ] } },
                    "containers": [{
                        "name": "netexec",
                        "image": AGNHOST,
                        "args": ["netexec", "--http-port=8080"],
                        "ports": [{ "containerPort": 8080 }],
                        "readinessProbe": { "httpGet": { "path": "/healthz", "port": 8080 },
                                            "periodSeconds": 1 }
                    }]
                }
            }
        }
    }));
    retry("deployment created", 60, || async {
        deployments.create(&PostParams::default(), &web).await.ok()
    })
    .await;
    kubectl(
        &c,
        &[
            "expose",
            "deployment",
            "web",
            "--port=80",
            "--target-port=8080",
        ],
    );
    // A client on the first node that says hello in its log, and a pod whose liveness probe
    // always fails.
    let client_pod: Pod = object(serde_json::json!({
        "metadata": { "name": "client" },
        "spec": {
            "nodeName": node_names[0],
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "client",
                "image": AGNHOST,
                "command": ["/bin/sh", "-c", "echo hello-from-client; exec /agnhost pause"]
            }]
        }
    }));
    let unhealthy: Pod = object(serde_json::json!({
        "metadata": { "name": "unhealthy" },
        "spec": {
            "nodeName": node_names[1],
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "app",
                "image": AGNHOST,
                "args": ["pause"],
                "livenessProbe": { "exec": { "command": ["/bin/false"] },
                                   "initialDelaySeconds": 1, "periodSeconds": 1,
                                   "failureThreshold": 1 }
            }]
        }
    }));
    for p in [&client_pod, &unhealthy] {
        pods.create(&PostParams::default(), p)
            .await
            .expect("create pod");
    }
    // Both replicas ready, one on each node.
    let replicas = retry("both web replicas ready", 180, || async {
        let list = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .ok()?;
        let ready: Vec<(String, String, String)> = list
            .items
            .iter()
            .filter_map(|p| {
                let st = p.status.as_ref()?;
                st.conditions
                    .as_ref()?
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
                    .then_some(())?;
                Some((
                    p.metadata.name.clone()?,
                    p.spec.as_ref()?.node_name.clone()?,
                    st.pod_ip.clone()?,
                ))
            })
            .collect();
        (ready.len() == 2).then_some(ready)
    })
    .await;
    let mut on: Vec<&str> = replicas.iter().map(|r| r.1.as_str()).collect();
    on.sort_unstable();
    assert_eq!(on, [node_names[0].as_str(), node_names[1].as_str()]);
    retry("client running", 120, || async {
        let st = pods.get("client").await.ok()?.status?;
        (st.phase.as_deref() == Some("Running")).then_some(())
    })
    .await;

    // `kubectl logs`.
    let logs = retry("client logs", 30, || async {
        let out = c.kubectl(&["logs", "client"]).ok()?;
        Some(String::from_utf8_lossy(&out.stdout).trim().to_string()).filter(|s| !s.is_empty())
    })
    .await;
    // agnhost's pause then says "Paused".
    assert_eq!(logs.lines().next(), Some("hello-from-client"), "{logs}");

    // A pod reaches the replica on the other node by its address (`kubectl exec`).
    let (remote_name, _, remote_ip) = replicas
        .iter()
        .find(|r| r.1 == node_names[1])
        .cloned()
        .expect("a replica on the second node");
    let url = format!("http://{remote_ip}:8080/hostname");
    let answer = retry(
        "client reaches the replica on the other node",
        60,
        || async { exec(&c, "client", &["curl", "-s", "--max-time", "3", &url]) },
    )
    .await;
    assert_eq!(answer, remote_name);

    // The Service by name, through the cluster DNS and the node's proxy: both replicas
    // answer, the one on this node and the one on the other.
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while seen.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the Service reached only {seen:?} of {replicas:?}"
        );
        if let Some(name) = exec(
            &c,
            "client",
            &["curl", "-s", "--max-time", "3", "http://web/hostname"],
        ) {
            seen.insert(name);
        }
    }
    let names: std::collections::BTreeSet<String> = replicas.iter().map(|r| r.0.clone()).collect();
    assert_eq!(seen, names);
    let resolved = exec(
        &c,
        "client",
        &["getent", "hosts", "web.default.svc.cluster.local"],
    )
    .expect("the Service's name resolves");
    assert!(resolved.starts_with("10.96."), "{resolved}");

    // `kubectl exec` reports the command's exit code.
    let failed = c
        .kubectl(&["exec", "client", "--", "/bin/sh", "-c", "exit 3"])
        .expect_err("a failing command fails kubectl exec");
    assert!(failed.to_string().contains("exit code 3"), "{failed}");

    // `kubectl port-forward` to the replica on the other node.
    assert_eq!(
        port_forward_get(&c, &remote_name, 8080, "/hostname"),
        remote_name
    );

    // The liveness probe's restarts are counted.
    retry("a liveness restart of unhealthy", 120, || async {
        let st = pods.get("unhealthy").await.ok()?.status?;
        let restarts: i32 = st.container_statuses?.iter().map(|s| s.restart_count).sum();
        (restarts >= 1).then_some(())
    })
    .await;

    if top {
        kubectl_top_shows_nodes_and_pods(&mut c, &node_names).await;
    }

    drop(pods);
    drop(deployments);
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

/// metrics-server, deployed from its own manifests, scrapes the kubelets' `/metrics/resource`:
/// `kubectl top nodes` gives CPU and memory for every node, `kubectl top pods` for the pods.
async fn kubectl_top_shows_nodes_and_pods(c: &mut Cluster, node_names: &[String]) {
    c.deploy_metrics_server()
        .await
        .expect("metrics-server deployed and its APIService Available");
    // NAME  CPU(cores)  CPU(%)  MEMORY(bytes)  MEMORY(%)
    let nodes = retry("kubectl top nodes lists every node", 120, || async {
        let out = c.kubectl(&["top", "nodes", "--no-headers"]).ok()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        node_names
            .iter()
            .all(|n| text.lines().any(|l| l.starts_with(n.as_str())))
            .then_some(text)
    })
    .await;
    for line in nodes.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(f.len() >= 5, "{nodes}");
        assert!(f[1].ends_with('m') && f[3].ends_with("Mi"), "{nodes}");
        let mem: u64 = f[3].trim_end_matches("Mi").parse().unwrap_or(0);
        assert!(mem > 0, "a node's memory: {nodes}");
    }
    // NAME  CPU(cores)  MEMORY(bytes)
    let pods = retry("kubectl top pods lists the workload", 120, || async {
        let out = c.kubectl(&["top", "pods", "--no-headers"]).ok()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        (text.lines().any(|l| l.starts_with("client "))
            && text.lines().filter(|l| l.starts_with("web-")).count() == 2)
            .then_some(text)
    })
    .await;
    for line in pods.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f.len(), 3, "{pods}");
        assert!(f[1].ends_with('m') && f[2].ends_with("Mi"), "{pods}");
    }
    let mem = |name: &str| -> u64 {
        pods.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|m| m.trim_end_matches("Mi").parse().ok())
            .unwrap_or(0)
    };
    // agnhost holds a few MiB at least.
    assert!(mem("client ") >= 1, "{pods}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_nodes_run_the_workload() {
    two_nodes_run_the_workload(NodeKind::Upstream, false).await;
}

/// (a) The upstream kubelet on strake-runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_runtime_nodes_run_the_workload() {
    two_nodes_run_the_workload(NodeKind::SwapRuntime, false).await;
}

/// (b) strake-kubelet on containerd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_kubelet_nodes_run_the_workload() {
    two_nodes_run_the_workload(NodeKind::SwapKubelet, false).await;
}

/// (c) strake-proxy as a DaemonSet on upstream nodes, in place of kube-proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_proxy_nodes_run_the_workload() {
    two_nodes_run_the_workload(NodeKind::SwapProxy, false).await;
}

/// (d) All three Strake daemons, and `kubectl top` through metrics-server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strake_nodes_run_the_workload_and_kubectl_top() {
    two_nodes_run_the_workload(NodeKind::Strake, true).await;
}
