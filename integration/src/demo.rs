//! `make demo`: a whole Strake node serving a Deployment behind a Service, on a real control
//! plane, end to end.
//!
//! 1. The test bed's control plane (etcd, kube-apiserver, controller-manager, scheduler) and
//!    local registry, in their "cluster" namespace.
//! 2. A node namespace running strake-runtime, strake-kubelet (which registers the Node) and
//!    strake-proxy (with upstream's `system:kube-proxy` identity).
//! 3. A Deployment of three web servers (busybox httpd from the local registry, each answering
//!    with its pod name, with a readiness probe) and a NodePort Service in front of them.
//! 4. Requests to the ClusterIP from the node, and to the NodePort from a second namespace on
//!    the cluster bridge playing an outside client; the answers show which pods served them.
//!
//! Nothing here reaches beyond the test bed's namespaces; everything is removed on the way out.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{Api, ListParams, PostParams};

use crate::control_plane::{ControlPlane, Options};
use crate::kubelet::{KubeletNode, RuntimeKind};
use crate::netns::{NetNs, NodeNs};
use crate::registry::Registry;
use crate::{containerd, paths};

/// The demo node's name.
pub const NODE: &str = "strake-demo-0";
/// Requests sent to the ClusterIP.
const REQUESTS: usize = 12;

/// What the demo saw.
#[derive(Debug, Default)]
pub struct Report {
    /// Pod name -> pod IP, for the Deployment's pods once Ready.
    pub pods: BTreeMap<String, String>,
    /// The Service's ClusterIP and NodePort.
    pub cluster_ip: String,
    /// The Service's NodePort.
    pub node_port: i32,
    /// Answers to requests sent to the ClusterIP from the node, by answering pod.
    pub cluster_ip_answers: BTreeMap<String, usize>,
    /// The answer to a request sent to the NodePort from outside the node.
    pub node_port_answer: String,
    /// The first pod's log, read through the API server and strake-kubelet's API.
    pub log: String,
}

/// Everything the demo started; dropping it tears the demo down in reverse order.
pub struct Demo {
    /// The outside client's namespace.
    pub outside: NodeNs,
    /// The node: namespace, strake-runtime, strake-kubelet and strake-proxy.
    pub node: KubeletNode,
    /// The local registry.
    pub registry: Registry,
    /// The control plane.
    pub cp: ControlPlane,
}

/// Runs the demo, narrating to `out`; returns what it saw and the running demo (so that a
/// caller can keep it up for a look around).
pub async fn run(out: &mut (dyn Write + Send)) -> anyhow::Result<(Demo, Report)> {
    let started = Instant::now();
    let say = |out: &mut (dyn Write + Send), line: String| {
        let _ = writeln!(out, "[{:5.1}s] {line}", started.elapsed().as_secs_f64());
    };
    say(
        out,
        "starting the control plane (etcd, kube-apiserver, controller-manager, scheduler) ..."
            .into(),
    );
    let cp = ControlPlane::start(Options {
        controllers: true,
        ..Options::default()
    })
    .await?;
    let registry = Registry::start(cp.net(), &cp.dir().join("registry"))?;
    let client = cp.client().await?;

    say(
        out,
        format!("starting node {NODE}: strake-runtime, strake-kubelet, strake-proxy ..."),
    );
    let mut node = KubeletNode::start_on(&cp, 0, NODE, "", RuntimeKind::Strake).await?;
    start_proxy(&cp, &mut node).context("start strake-proxy")?;
    let nodes: Api<Node> = Api::all(client.clone());
    wait("the node to be Ready", 60, || async {
        let n = nodes.get_opt(NODE).await.ok()??;
        let ready = n
            .status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        ready.then_some(())
    })
    .await
    .with_context(|| format!("kubelet log:\n{}", tail(&node.log(), 30)))?;
    let n = nodes.get(NODE).await?;
    let cap = n
        .status
        .clone()
        .unwrap_or_default()
        .capacity
        .unwrap_or_default();
    let info = n.status.unwrap_or_default().node_info.unwrap_or_default();
    say(
        out,
        format!(
            "node {NODE} Ready: cpu {}, memory {}, pods {}; runtime {}, kubelet {}",
            cap.get("cpu").map_or("?", |q| q.0.as_str()),
            cap.get("memory").map_or("?", |q| q.0.as_str()),
            cap.get("pods").map_or("?", |q| q.0.as_str()),
            info.container_runtime_version,
            info.kubelet_version
        ),
    );

    let image = format!("{}/strake/busybox:1", registry.open_in_cluster());
    say(
        out,
        format!(
            "creating Deployment hello (3 replicas of {image}) and Service hello (NodePort) ..."
        ),
    );
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    deployments
        .create(&PostParams::default(), &deployment(&image))
        .await
        .context("create Deployment")?;
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let svc = services
        .create(&PostParams::default(), &service())
        .await
        .context("create Service")?;
    let spec = svc.spec.unwrap_or_default();
    let mut report = Report {
        cluster_ip: spec.cluster_ip.unwrap_or_default(),
        node_port: spec
            .ports
            .unwrap_or_default()
            .first()
            .and_then(|p| p.node_port)
            .unwrap_or_default(),
        ..Report::default()
    };

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    report.pods = wait("3 pods Running and Ready", 120, || async {
        let list = pods
            .list(&ListParams::default().labels("app=hello"))
            .await
            .ok()?;
        let ready: BTreeMap<String, String> = list
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none() && pod_ready(p))
            .filter_map(|p| Some((p.metadata.name.clone()?, p.status.as_ref()?.pod_ip.clone()?)))
            .collect();
        (ready.len() == 3).then_some(ready)
    })
    .await
    .with_context(|| format!("kubelet log:\n{}", tail(&node.log(), 30)))?;
    for (name, ip) in &report.pods {
        say(out, format!("pod {name} Running and Ready at {ip}"));
    }
    // `kubectl logs`: the API server asks strake-kubelet's 10250, which reads the log file
    // strake-runtime's monitor writes.
    if let Some(first) = report.pods.keys().next() {
        let log = pods
            .logs(first, &kube::api::LogParams::default())
            .await
            .context("pod logs through the kubelet API")?;
        report.log = log.trim().to_string();
        say(out, format!("kubectl logs {first}: {}", report.log));
    }

    let url = format!("http://{}/", report.cluster_ip);
    // The EndpointSlice controller adds pods as they become ready, and strake-proxy programs
    // each change (batched by its --min-sync-period): wait until every pod has answered once.
    let mut seen = std::collections::BTreeSet::new();
    wait("every pod to answer through the ClusterIP", 60, || {
        if let Ok(answer) = curl(node.ns.ns(), &url) {
            seen.insert(answer);
        }
        let all = seen.len() == report.pods.len();
        async move { all.then_some(()) }
    })
    .await
    .with_context(|| format!("strake-proxy log:\n{}", tail(&proxy_log(&node), 30)))?;
    for _ in 0..REQUESTS {
        let answer = curl(node.ns.ns(), &url)?;
        *report.cluster_ip_answers.entry(answer).or_default() += 1;
    }
    say(
        out,
        format!("{REQUESTS} requests to ClusterIP {url} from the node were answered by:"),
    );
    for (answer, n) in &report.cluster_ip_answers {
        say(out, format!("    {n:2} x {answer}"));
    }

    let outside = cp.net().add_node(1)?;
    let node_port_url = format!("http://{}:{}/", node.ns.ip(), report.node_port);
    report.node_port_answer = wait("the NodePort to answer", 30, || async {
        curl(outside.ns(), &node_port_url).ok()
    })
    .await?;
    say(
        out,
        format!(
            "a client outside the node ({}) got from NodePort {node_port_url}: {}",
            outside.ip(),
            report.node_port_answer
        ),
    );
    if report.cluster_ip_answers.len() < 2 {
        bail!(
            "all {REQUESTS} ClusterIP requests went to one pod: {:?}",
            report.cluster_ip_answers
        );
    }
    say(out, "demo complete: control plane, strake-kubelet, strake-runtime and strake-proxy served a Deployment behind a Service".into());
    Ok((
        Demo {
            outside,
            node,
            registry,
            cp,
        },
        report,
    ))
}

/// Starts strake-proxy in the node's namespace, authenticated as upstream's kube-proxy user
/// (`system:kube-proxy`, bound to the built-in `system:node-proxier` role).
fn start_proxy(cp: &ControlPlane, node: &mut KubeletNode) -> anyhow::Result<u32> {
    let dir = node.dir.path().join("proxy");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let certs = cp
        .pki()
        .issue_client("kube-proxy", "system:kube-proxy", &[])?;
    let kubeconfig = dir.join("kube-proxy.kubeconfig");
    cp.pki()
        .write_kubeconfig(&kubeconfig, &cp.cluster_server(), &certs)?;
    let config = dir.join("kube-proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
             mode: nftables\nclusterCIDR: {}\n",
            containerd::POD_SUPERNET
        ),
    )
    .with_context(|| format!("write {}", config.display()))?;
    let args = [
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--config={}", config.display()),
        format!("--hostname-override={NODE}"),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let log = dir.join("proxy.log");
    Ok(node.ns.spawn(
        "strake-proxy",
        &paths::workspace_bin("strake-proxy")?,
        &args,
        &log,
    )?)
}

fn proxy_log(node: &KubeletNode) -> String {
    std::fs::read_to_string(node.dir.path().join("proxy/proxy.log")).unwrap_or_default()
}

fn deployment(image: &str) -> Deployment {
    // Each pod writes its own name into its web root and serves it on 8080.
    let script = "mkdir -p /tmp/www && echo \"hello from $(POD_NAME)\" > /tmp/www/index.html \
                  && echo \"$(POD_NAME) serving on :8080\" && exec httpd -f -p 8080 -h /tmp/www";
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": "hello" },
        "spec": {
            "replicas": 3,
            "selector": { "matchLabels": { "app": "hello" } },
            "template": {
                "metadata": { "labels": { "app": "hello" } },
                "spec": {
                    "terminationGracePeriodSeconds": 2,
                    "containers": [{
                        "name": "web",
                        "image": image,
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["/bin/sh", "-c", script],
                        "env": [{ "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } }],
                        "ports": [{ "containerPort": 8080 }],
                        "readinessProbe": { "httpGet": { "path": "/", "port": 8080 }, "periodSeconds": 1 }
                    }]
                }
            }
        }
    }))
    .expect("a valid Deployment literal")
}

fn service() -> Service {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": "hello" },
        "spec": {
            "type": "NodePort",
            "selector": { "app": "hello" },
            "ports": [{ "port": 80, "targetPort": 8080, "protocol": "TCP" }]
        }
    }))
    .expect("a valid Service literal")
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// One HTTP GET from inside `ns`, through the host's curl; the body, trimmed.
fn curl(ns: &NetNs, url: &str) -> anyhow::Result<String> {
    let out = ns.run("curl", &["-sf", "--max-time", "2", url])?;
    let body = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if body.is_empty() {
        bail!("empty answer from {url}");
    }
    Ok(body)
}

/// Polls `f` every 250 ms until it yields a value, for at most `secs`.
async fn wait<T, F, Fut>(what: &str, secs: u64, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {secs} s waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
