//! Swap-in combinations (issue #10): one upstream component replaced by its Strake twin, the
//! rest upstream, judged by what a user sees through the API.
//!
//! (a) upstream kubelet on strake-runtime: the upstream kubelet is the specification of what a
//! CRI client sends (hugepage limits for every page size the kernel offers, its own
//! `/etc/hosts` and termination-log mounts, exec probes through ExecSync, exec and port-forward
//! through the runtime's streaming URLs), so a pod must run on strake-runtime exactly as it does
//! on containerd.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};
use strake_integration::control_plane::{ControlPlane, Options};
use strake_integration::registry::Registry;
use strake_integration::strake_runtime::StrakeRuntime;
use strake_integration::upstream_kubelet::{self, KubeletCgroupRoot, ServingTls, UpstreamKubelet};
use strake_integration::{paths, process};

const NODE: &str = "upstream-kubelet-strake-runtime-0";

/// Waits for `f` to give a value, failing early (with the kubelet's and the runtime's logs) if
/// the kubelet exits.
async fn wait_for<T, F, Fut>(
    what: &str,
    secs: u64,
    kubelet: &mut UpstreamKubelet,
    runtime: &StrakeRuntime,
    mut f: F,
) -> T
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
    let tail = |path: &Path| {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(40).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    };
    panic!(
        "timed out after {secs} s waiting for {what}\n--- kubelet log:\n{}\n--- strake-runtime log:\n{}",
        tail(&kubelet.log_path()),
        tail(&runtime.dir().join("runtime.log"))
    );
}

/// `kubectl` with the admin kubeconfig (the API server's loopback forward), from this namespace.
fn kubectl(cp: &ControlPlane, args: &[&str]) -> strake_integration::Result<Output> {
    let kubectl = paths::kubernetes_bin("kubectl")?;
    process::run(
        std::process::Command::new(kubectl)
            .arg(format!("--kubeconfig={}", cp.kubeconfig().display()))
            .arg("--request-timeout=30s")
            .args(args),
    )
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn restarts(p: &Pod) -> i32 {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map(|c| c.iter().map(|c| c.restart_count).sum())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_kubelet_on_strake_runtime_runs_probes_logs_exec_and_port_forward() {
    let cp = ControlPlane::start(Options::default())
        .await
        .expect("control plane");
    let registry = Registry::start(cp.net(), &cp.dir().join("registry")).expect("registry");
    let client = cp.client().await.expect("client");

    let cgroup_root = KubeletCgroupRoot::create().expect("cgroup root");
    let locations = cgroup_root.locations().to_vec();
    let mut ns = cp.net().add_node(0).expect("node namespace");
    let runtime = StrakeRuntime::start(&mut ns, 0)
        .await
        .expect("strake-runtime");
    let kubeconfig = cp.node_kubeconfig(NODE).expect("kubeconfig");
    let serving = cp
        .pki()
        .issue_server(
            &format!("kubelet-serving-{NODE}"),
            NODE,
            &[NODE.to_string(), ns.ip().to_string()],
        )
        .expect("serving certificate");
    let mut kubelet = UpstreamKubelet::start_with_tls(
        &ns,
        &upstream_kubelet::Options {
            node_name: NODE,
            kubeconfig: &kubeconfig,
            runtime_endpoint: &runtime.endpoint(),
            cgroup_root: &cgroup_root,
            // Stats and /metrics/cadvisor from the runtime (ListPodSandboxStats,
            // ListMetricDescriptors, ListPodSandboxMetrics), not from cAdvisor.
            extra_config: "featureGates:\n  PodAndContainerStatsFromCRI: true\n",
        },
        Some(&ServingTls {
            serving: &serving,
            client_ca: &cp.pki().ca.cert,
        }),
    )
    .expect("start kubelet");
    let dir = kubelet.dir().to_path_buf();

    let nodes: Api<Node> = Api::all(client.clone());
    wait_for("node Ready", 180, &mut kubelet, &runtime, || async {
        let n = nodes.get_opt(NODE).await.ok().flatten()?;
        n.status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
            .then_some(())
    })
    .await;
    let node = nodes.get(NODE).await.expect("node");
    let runtime_version = node
        .status
        .and_then(|s| s.node_info)
        .map(|i| i.container_runtime_version)
        .unwrap_or_default();
    assert!(
        runtime_version.starts_with("strake"),
        "the kubelet talks to strake-runtime: {runtime_version}"
    );

    let image = format!("{}/strake/busybox:1", registry.open_in_cluster());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let token = "/var/run/secrets/kubernetes.io/serviceaccount";
    let web: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "web" },
        "spec": {
            "nodeName": NODE,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "app",
                "image": image,
                "command": ["/bin/sh", "-c",
                    format!("echo hello-from-strake-runtime; test -s {token}/token || exit 1; \
                             mkdir -p /tmp/www && echo served-by-web > /tmp/www/index.html && \
                             exec httpd -f -p 8080 -h /tmp/www")],
                "readinessProbe": {
                    "exec": { "command": ["cat", format!("{token}/namespace")] },
                    "periodSeconds": 1
                },
                "resources": {
                    "requests": { "cpu": "10m", "memory": "16Mi" },
                    "limits": { "cpu": "100m", "memory": "64Mi" }
                }
            }]
        }
    }))
    .expect("pod");
    // A liveness probe that always fails: the kubelet kills the container and restarts it.
    let unhealthy: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "unhealthy" },
        "spec": {
            "nodeName": NODE,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "app",
                "image": image,
                "command": ["sleep", "3600"],
                "livenessProbe": {
                    "exec": { "command": ["/bin/sh", "-c", "exit 1"] },
                    "initialDelaySeconds": 1,
                    "periodSeconds": 1,
                    "failureThreshold": 1
                }
            }]
        }
    }))
    .expect("pod");
    // The default ServiceAccount appears shortly after the control plane starts.
    for pod in [&web, &unhealthy] {
        wait_for("pod created", 60, &mut kubelet, &runtime, || async {
            pods.create(&PostParams::default(), pod).await.ok()
        })
        .await;
    }

    // Running and Ready, with its service-account token volume (the container only keeps
    // running when it sees the token; the readiness probe reads the namespace file).
    wait_for(
        "web Running and Ready",
        180,
        &mut kubelet,
        &runtime,
        || async {
            let p = pods.get("web").await.ok()?;
            (p.status.as_ref()?.phase.as_deref() == Some("Running") && ready(&p)).then_some(())
        },
    )
    .await;
    assert_eq!(restarts(&pods.get("web").await.expect("web")), 0);

    // `kubectl logs`: the kubelet reads the CRI log file strake-runtime's monitor writes.
    let logs = kubectl(&cp, &["logs", "web"]).expect("kubectl logs");
    assert_eq!(
        String::from_utf8_lossy(&logs.stdout).trim(),
        "hello-from-strake-runtime"
    );

    // The kubelet's /metrics/cadvisor, made of strake-runtime's pod metrics: the container's
    // CPU and memory, and the pod's network as cAdvisor's "POD" container. The kubelet drops a
    // metric whose labels do not match its descriptor, so each line seen here matched.
    let metrics = kubectl(
        &cp,
        &[
            "get",
            "--raw",
            &format!("/api/v1/nodes/{NODE}/proxy/metrics/cadvisor"),
        ],
    )
    .expect("kubectl get /metrics/cadvisor");
    let metrics = String::from_utf8_lossy(&metrics.stdout).to_string();
    let series = |name: &str, labels: &[&str]| {
        metrics.lines().any(|l| {
            l.starts_with(&format!("{name}{{")) && labels.iter().all(|want| l.contains(want))
        })
    };
    for name in [
        "container_cpu_usage_seconds_total",
        "container_memory_working_set_bytes",
        "container_start_time_seconds",
    ] {
        assert!(
            series(
                name,
                &["container=\"app\"", "pod=\"web\"", "namespace=\"default\""]
            ),
            "{name} of web/app missing:\n{metrics}"
        );
    }
    assert!(
        series(
            "container_network_receive_bytes_total",
            &["container=\"POD\"", "pod=\"web\"", "interface=\"eth0\""]
        ),
        "the pod's network missing:\n{metrics}"
    );

    // `kubectl exec` through the API server and the kubelet to strake-runtime's streaming
    // server: stdout, and the exit code of the command.
    let out = kubectl(
        &cp,
        &["exec", "web", "--", "cat", &format!("{token}/namespace")],
    )
    .expect("kubectl exec");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "default");
    let failed = kubectl(&cp, &["exec", "web", "--", "/bin/sh", "-c", "exit 3"])
        .expect_err("a failing command fails kubectl exec");
    assert!(failed.to_string().contains("exit code 3"), "{failed}");

    // `kubectl port-forward` through the kubelet to the runtime's PortForward, into the pod's
    // network namespace: an HTTP request reaches the pod's server.
    let body = strake_integration::kubectl::port_forward_get(cp.kubeconfig(), "web", 8080, "/")
        .expect("kubectl port-forward");
    assert!(body.ends_with("served-by-web\n"), "{body}");

    // The liveness probe's restarts are counted.
    wait_for(
        "a liveness restart of unhealthy",
        180,
        &mut kubelet,
        &runtime,
        || async {
            let p = pods.get("unhealthy").await.ok()?;
            (restarts(&p) >= 1).then_some(())
        },
    )
    .await;

    for name in ["web", "unhealthy"] {
        pods.delete(name, &Default::default())
            .await
            .expect("delete");
    }
    wait_for("pods deleted", 120, &mut kubelet, &runtime, || async {
        let list = pods.list(&Default::default()).await.ok()?;
        list.items.is_empty().then_some(())
    })
    .await;
    let sandboxes = runtime.crictl(&["pods", "-q"]).expect("crictl pods");
    let left = String::from_utf8_lossy(&sandboxes.stdout)
        .trim()
        .to_string();
    // The kubelet removes a deleted pod's sandboxes in its housekeeping; stopped is enough here.
    if !left.is_empty() {
        let ready = runtime
            .crictl(&["pods", "-q", "--state", "ready"])
            .expect("crictl pods");
        assert_eq!(String::from_utf8_lossy(&ready.stdout).trim(), "");
    }

    drop(kubelet);
    drop(runtime);
    drop(ns);
    drop(cgroup_root);
    assert!(!dir.exists(), "kubelet directory removed");
    for l in &locations {
        assert!(!l.exists(), "cgroup left: {}", l.display());
    }
}
