//! strake-kubelet runs a Deployment's pods through containerd and through strake-runtime: Running and Ready with pod IPs,
//! a deleted pod is replaced, scaling to zero stops and removes the containers, and a crashing
//! container restarts with a rising restart count.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use strake_integration::control_plane::{ControlPlane, Options};
use strake_integration::registry::Registry;

mod common;
use common::{KubeletNode, RuntimeKind, wait_for};

const NODE: &str = "strake-pods-0";

fn deployment(replicas: i32, image: &str) -> Deployment {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": "web" },
        "spec": {
            "replicas": replicas,
            "selector": { "matchLabels": { "app": "web" } },
            "template": {
                "metadata": { "labels": { "app": "web" } },
                "spec": {
                    "terminationGracePeriodSeconds": 2,
                    "containers": [{
                        "name": "app",
                        "image": image,
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["/bin/sh", "-c", "echo started $(POD_NAME); trap 'exit 0' TERM; sleep 3600 & wait"],
                        "env": [{ "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } }]
                    }]
                }
            }
        }
    }))
    .expect("deployment")
}

fn running_ready(p: &Pod) -> bool {
    let st = p.status.clone().unwrap_or_default();
    st.phase.as_deref() == Some("Running")
        && st
            .pod_ip
            .as_deref()
            .is_some_and(|ip| ip.starts_with("10.88."))
        && st
            .conditions
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_on_containerd_runs_survives_a_kubelet_restart_is_replaced_and_scales_to_zero() {
    deployment_scenario(RuntimeKind::Containerd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_on_strake_runtime_runs_survives_a_kubelet_restart_is_replaced_and_scales_to_zero()
 {
    deployment_scenario(RuntimeKind::Strake).await;
}

async fn deployment_scenario(kind: RuntimeKind) {
    let cp = ControlPlane::start(Options::default())
        .await
        .expect("control plane");
    let registry = Registry::start(cp.net(), &cp.dir().join("registry")).expect("registry");
    let client = cp.client().await.expect("client");
    let mut node = KubeletNode::start_on(&cp, 0, NODE, "", kind)
        .await
        .expect("start node");
    let nodes: Api<Node> = Api::all(client.clone());
    wait_for("node registered", 60, || async {
        nodes.get_opt(NODE).await.ok().flatten()
    })
    .await;

    let image = format!("{}/strake/busybox:1", registry.open_in_cluster());
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    // The default ServiceAccount appears shortly after the control plane starts.
    wait_for("deployment created", 60, || async {
        deployments
            .create(&PostParams::default(), &deployment(3, &image))
            .await
            .ok()
    })
    .await;
    let lp = ListParams::default().labels("app=web");
    let running = wait_for("3 pods Running and Ready", 120, || async {
        let list = pods.list(&lp).await.ok()?;
        let ok: Vec<Pod> = list.items.into_iter().filter(running_ready).collect();
        (ok.len() == 3).then_some(ok)
    })
    .await;
    let ips: std::collections::BTreeSet<String> = running
        .iter()
        .filter_map(|p| p.status.clone()?.pod_ip)
        .collect();
    assert_eq!(ips.len(), 3, "each pod has its own IP: {ips:?}");
    for p in &running {
        let st = p.status.clone().unwrap_or_default();
        assert_eq!(st.host_ip.as_deref(), Some("10.213.0.10"));
        let c = &st.container_statuses.unwrap_or_default()[0];
        assert!(
            c.container_id
                .as_deref()
                .is_some_and(|id| id.starts_with(node.runtime.id_scheme())),
            "{c:?}"
        );
        assert!(
            c.image_id.starts_with("sha256:") || c.image_id.contains("@sha256:"),
            "{}",
            c.image_id
        );
    }

    // The container saw its own pod name through the downward API.
    let first = running[0].metadata.name.clone().unwrap_or_default();
    let logs = wait_for("container log", 30, || async {
        let out = node
            .runtime
            .crictl(&[
                "ps",
                "-q",
                "--label",
                &format!("io.kubernetes.pod.name={first}"),
            ])
            .ok()?;
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let out = node.runtime.crictl(&["logs", &id]).ok()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.contains("started").then_some(text)
    })
    .await;
    assert!(logs.contains(&format!("started {first}")), "{logs}");

    // A kubelet killed and started again adopts the running pods: no container restarts.
    let ids_before = node
        .runtime
        .crictl(&["ps", "-q"])
        .expect("crictl ps")
        .stdout;
    node.restart_kubelet().expect("restart kubelet");
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    let ids_after = node
        .runtime
        .crictl(&["ps", "-q"])
        .expect("crictl ps")
        .stdout;
    assert_eq!(
        String::from_utf8_lossy(&ids_before),
        String::from_utf8_lossy(&ids_after),
        "containers changed across a kubelet restart"
    );
    let list = pods.list(&lp).await.expect("list");
    assert!(
        list.items.iter().all(running_ready),
        "pods not Running/Ready after kubelet restart"
    );
    for p in &list.items {
        let c = &p
            .status
            .clone()
            .unwrap_or_default()
            .container_statuses
            .unwrap_or_default()[0];
        assert_eq!(
            c.restart_count,
            0,
            "{} restarted",
            p.metadata.name.clone().unwrap_or_default()
        );
    }

    // Delete one pod: it terminates, and the ReplicaSet's replacement runs.
    pods.delete(&first, &DeleteParams::default())
        .await
        .expect("delete pod");
    wait_for("deleted pod gone and replaced", 120, || async {
        let list = pods.list(&lp).await.ok()?;
        let gone = list
            .items
            .iter()
            .all(|p| p.metadata.name.as_deref() != Some(first.as_str()));
        (gone && list.items.iter().filter(|p| running_ready(p)).count() == 3).then_some(())
    })
    .await;

    // Scale to zero: every pod goes, and the runtime has nothing of them left.
    let patch = serde_json::json!({ "spec": { "replicas": 0 } });
    deployments
        .patch("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("scale to 0");
    wait_for("pods gone", 120, || async {
        pods.list(&lp).await.ok()?.items.is_empty().then_some(())
    })
    .await;
    wait_for("runtime empty", 60, || async {
        let out = node.runtime.crictl(&["pods", "-q"]).ok()?;
        let ps = node.runtime.crictl(&["ps", "-a", "-q"]).ok()?;
        (out.stdout.is_empty() && ps.stdout.is_empty()).then_some(())
    })
    .await;
    drop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_container_restarts_with_backoff_and_reports_why() {
    let cp = ControlPlane::start(Options::default())
        .await
        .expect("control plane");
    let registry = Registry::start(cp.net(), &cp.dir().join("registry")).expect("registry");
    let client = cp.client().await.expect("client");
    let node = KubeletNode::start(&cp, 0, NODE, "")
        .await
        .expect("start node");
    let nodes: Api<Node> = Api::all(client.clone());
    wait_for("node registered", 60, || async {
        nodes.get_opt(NODE).await.ok().flatten()
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "crasher" },
        "spec": {
            "nodeName": NODE,
            "containers": [{
                "name": "app",
                "image": format!("{}/strake/busybox:1", registry.open_in_cluster()),
                "command": ["/bin/sh", "-c", "echo boom; exit 3"]
            }]
        }
    }))
    .expect("pod");
    wait_for("pod created", 60, || async {
        pods.create(&PostParams::default(), &pod).await.ok()
    })
    .await;
    let status = wait_for("restartCount >= 1 and CrashLoopBackOff", 90, || async {
        let p = pods.get("crasher").await.ok()?;
        let c = p.status?.container_statuses?.into_iter().next()?;
        let waiting = c.state.clone()?.waiting?.reason?;
        (c.restart_count >= 1 && waiting == "CrashLoopBackOff").then_some(c)
    })
    .await;
    let last = status
        .last_state
        .and_then(|s| s.terminated)
        .expect("last state terminated");
    assert_eq!(last.exit_code, 3);
    assert_eq!(last.reason.as_deref(), Some("Error"));
    assert!(node.log().contains("container started"));

    // Container GC: after the second restart, the runtime keeps one dead instance (the
    // newest, for lastState), and the removed instances' log files are gone with them.
    wait_for("restartCount >= 2", 120, || async {
        let p = pods.get("crasher").await.ok()?;
        let c = p.status?.container_statuses?.into_iter().next()?;
        (c.restart_count >= 2 && c.state?.waiting.is_some()).then_some(())
    })
    .await;
    let (ids, logs) = wait_for("one dead instance and its log left", 30, || async {
        let out = node
            .runtime
            .crictl(&["ps", "-a", "-q", "--name", "^app$"])
            .ok()?;
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(String::from)
            .collect();
        let logs: Vec<String> = walk(&node.dir.path().join("pod-logs"))
            .into_iter()
            .filter(|p| p.contains("/app/"))
            .collect();
        (ids.len() == 1 && logs.len() == 1).then_some((ids, logs))
    })
    .await;
    assert_eq!(ids.len(), 1);
    let p = pods.get("crasher").await.expect("pod");
    let restarts = p.status.unwrap().container_statuses.unwrap()[0].restart_count;
    assert!(
        logs[0].ends_with(&format!("/app/{restarts}.log")),
        "the newest attempt's log is kept: {logs:?} (restartCount {restarts})"
    );
    drop(node);
}

/// Every file under `dir`, recursively.
fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = e.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path.display().to_string());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_flips_ready_and_a_failing_liveness_probe_restarts() {
    let cp = ControlPlane::start(Options::default())
        .await
        .expect("control plane");
    let registry = Registry::start(cp.net(), &cp.dir().join("registry")).expect("registry");
    let client = cp.client().await.expect("client");
    let node = KubeletNode::start(&cp, 0, NODE, "")
        .await
        .expect("start node");
    let nodes: Api<Node> = Api::all(client.clone());
    wait_for("node registered", 60, || async {
        nodes.get_opt(NODE).await.ok().flatten()
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let exec_probe = |cmd: &str| serde_json::json!({ "exec": { "command": ["/bin/sh", "-c", cmd] }, "periodSeconds": 1, "failureThreshold": 1 });
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "probed" },
        "spec": {
            "nodeName": NODE,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "app",
                "image": format!("{}/strake/busybox:1", registry.open_in_cluster()),
                "command": ["/bin/sh", "-c", "touch /tmp/ready; trap 'exit 0' TERM; sleep 3600 & wait"],
                "readinessProbe": exec_probe("test -f /tmp/ready"),
                "livenessProbe": exec_probe("test ! -f /tmp/die")
            }]
        }
    }))
    .expect("pod");
    wait_for("pod created", 60, || async {
        pods.create(&PostParams::default(), &pod).await.ok()
    })
    .await;
    let ready_is = |want: bool| {
        let pods = pods.clone();
        async move {
            let p = pods.get("probed").await.ok()?;
            let c = p.status?.container_statuses?.into_iter().next()?;
            (c.ready == want && c.state?.running.is_some()).then_some(c.restart_count)
        }
    };
    wait_for("Ready", 60, || ready_is(true)).await;
    let in_container = |cmd: &str| {
        let out = node
            .runtime
            .crictl(&["ps", "-q", "--name", "app", "--state", "running"])
            .expect("crictl ps");
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        node.runtime
            .crictl(&["exec", "--sync", &id, "/bin/sh", "-c", cmd])
            .expect("crictl exec");
    };
    in_container("rm /tmp/ready");
    wait_for("not Ready after the readiness probe fails", 30, || {
        ready_is(false)
    })
    .await;
    in_container("touch /tmp/ready");
    let restarts = wait_for("Ready again", 30, || ready_is(true)).await;
    assert_eq!(restarts, 0, "readiness failures must not restart");

    in_container("touch /tmp/die");
    wait_for("restarted by the liveness probe", 60, || async {
        let p = pods.get("probed").await.ok()?;
        let c = p.status?.container_statuses?.into_iter().next()?;
        (c.restart_count >= 1).then_some(())
    })
    .await;
    assert!(node.log().contains("probe failed; restarting container"));
    drop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_containers_run_in_order_and_a_sidecar_starts_first_and_outlives_the_app() {
    let cp = ControlPlane::start(Options::default())
        .await
        .expect("control plane");
    let registry = Registry::start(cp.net(), &cp.dir().join("registry")).expect("registry");
    let client = cp.client().await.expect("client");
    let node = KubeletNode::start(&cp, 0, NODE, "")
        .await
        .expect("start node");
    let nodes: Api<Node> = Api::all(client.clone());
    wait_for("node registered", 60, || async {
        nodes.get_opt(NODE).await.ok().flatten()
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let image = format!("{}/strake/busybox:1", registry.open_in_cluster());
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "staged" },
        "spec": {
            "nodeName": NODE,
            "terminationGracePeriodSeconds": 1,
            "initContainers": [
                { "name": "init-a", "image": image, "command": ["/bin/sh", "-c", "sleep 1"] },
                { "name": "sidecar", "image": image, "restartPolicy": "Always",
                  "command": ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"] },
                { "name": "init-b", "image": image, "command": ["/bin/sh", "-c", "sleep 1"] }
            ],
            "containers": [{ "name": "app", "image": image, "command": ["/bin/sh", "-c", "sleep 1; exit 1"] }]
        }
    }))
    .expect("pod");
    wait_for("pod created", 60, || async {
        pods.create(&PostParams::default(), &pod).await.ok()
    })
    .await;
    let status = wait_for(
        "app restarted while the sidecar keeps running",
        90,
        || async {
            let st = pods.get("staged").await.ok()?.status?;
            let app = st
                .container_statuses
                .clone()?
                .into_iter()
                .find(|c| c.name == "app")?;
            (app.restart_count >= 1).then_some(st)
        },
    )
    .await;
    let init = status
        .init_container_statuses
        .clone()
        .expect("init container statuses");
    let find = |n: &str| {
        init.iter()
            .find(|c| c.name == n)
            .cloned()
            .unwrap_or_else(|| panic!("{n} missing"))
    };
    let (a, side, b) = (find("init-a"), find("sidecar"), find("init-b"));
    let done = |c: &k8s_openapi::api::core::v1::ContainerStatus| {
        c.state
            .clone()
            .and_then(|s| s.terminated)
            .unwrap_or_else(|| panic!("{} not terminated", c.name))
    };
    let (ta, tb) = (done(&a), done(&b));
    assert_eq!((ta.exit_code, tb.exit_code), (0, 0));
    let side_run = side
        .state
        .clone()
        .and_then(|s| s.running)
        .expect("sidecar running");
    assert_eq!(
        side.restart_count, 0,
        "the sidecar outlives the app's restarts"
    );
    // Order: init-a finished before the sidecar started, which started before init-b.
    assert!(
        ta.finished_at.clone().expect("finish").0 <= side_run.started_at.clone().expect("start").0
    );
    assert!(
        side_run.started_at.clone().expect("start").0 <= tb.started_at.clone().expect("start").0
    );
    let initialized = status
        .conditions
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "Initialized");
    assert_eq!(initialized.map(|c| c.status).as_deref(), Some("True"));
    drop(node);
}
