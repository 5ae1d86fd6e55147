//! Lifecycle hooks and termination messages, end to end: a postStart exec hook writes a file
//! the container waits for; a failing postStart hook restarts the container with a
//! FailedPostStartHook event; a preStop hook runs on deletion before the container is told to
//! stop; a termination message reaches `state.terminated.message`, and
//! FallbackToLogsOnError reports the log's tail.

use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};

mod common;
use common::{Cluster, RuntimeKind, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_and_termination_messages_on_strake_runtime() {
    scenario("strake-lifecycle-0", RuntimeKind::Strake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_and_termination_messages_on_containerd() {
    scenario("strake-lifecycle-1", RuntimeKind::Containerd).await;
}

fn pod(v: serde_json::Value) -> Pod {
    serde_json::from_value(v).expect("pod")
}

fn terminated(p: &Pod, name: &str) -> Option<k8s_openapi::api::core::v1::ContainerStateTerminated> {
    p.status
        .clone()?
        .container_statuses?
        .into_iter()
        .find(|c| c.name == name)?
        .state?
        .terminated
}

async fn scenario(node_name: &str, kind: RuntimeKind) {
    let cluster = Cluster::start(node_name, kind).await;
    let image = cluster.busybox();
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    // The preStop hook and the container's TERM trap both append to this host file, so the
    // test sees which ran first.
    let shared = cluster.cp.dir().join("prestop");
    std::fs::create_dir_all(&shared).expect("host dir");
    let hooked = pod(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "hooked" },
        "spec": {
            "nodeName": node_name,
            "terminationGracePeriodSeconds": 20,
            "volumes": [{ "name": "host", "hostPath": { "path": shared.display().to_string(), "type": "Directory" } }],
            "containers": [{
                "name": "app",
                "image": image,
                "volumeMounts": [{ "name": "host", "mountPath": "/host" }],
                "command": ["/bin/sh", "-c",
                    "until [ -f /tmp/post-start ]; do sleep 0.1; done; echo saw $(cat /tmp/post-start); \
                     trap 'echo term >> /host/order; exit 0' TERM; sleep 3600 & wait"],
                "lifecycle": {
                    "postStart": { "exec": { "command": ["/bin/sh", "-c", "echo hook-ran > /tmp/post-start"] } },
                    "preStop": { "exec": { "command": ["/bin/sh", "-c", "echo pre-stop >> /host/order"] } }
                }
            }]
        }
    }));
    let bad_hook = pod(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "bad-hook" },
        "spec": {
            "nodeName": node_name,
            "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": "app",
                "image": image,
                "command": ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"],
                "lifecycle": { "postStart": { "exec": { "command": ["/bin/sh", "-c", "exit 7"] } } }
            }]
        }
    }));
    let messages = pod(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "messages" },
        "spec": {
            "nodeName": node_name,
            "restartPolicy": "Never",
            "containers": [
                { "name": "file", "image": image,
                  "command": ["/bin/sh", "-c", "printf 'goodbye from file' > /dev/termination-log; exit 0"] },
                { "name": "custom", "image": image, "terminationMessagePath": "/tmp/why",
                  "command": ["/bin/sh", "-c", "printf 'custom path' > /tmp/why; exit 1"] },
                { "name": "logs", "image": image, "terminationMessagePolicy": "FallbackToLogsOnError",
                  "command": ["/bin/sh", "-c", "echo first; echo last words; exit 3"] }
            ]
        }
    }));
    for p in [&hooked, &bad_hook, &messages] {
        wait_for("pod created", 60, || async {
            pods.create(&PostParams::default(), p).await.ok()
        })
        .await;
    }

    // postStart ran inside the container, and the container saw what it wrote.
    wait_for("hooked Running and started", 90, || async {
        let p = pods.get("hooked").await.ok()?;
        let c = p.status?.container_statuses?.into_iter().next()?;
        (c.state?.running.is_some() && c.started == Some(true)).then_some(())
    })
    .await;
    let node = &cluster.node;
    let logs = wait_for("the container saw the hook's file", 30, || async {
        let out = node
            .runtime
            .crictl(&["ps", "-q", "--label", "io.kubernetes.pod.name=hooked"])
            .ok()?;
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let out = node.runtime.crictl(&["logs", &id]).ok()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.contains("saw").then_some(text)
    })
    .await;
    assert!(logs.contains("saw hook-ran"), "{logs}");

    // A failing postStart kills the container; restartPolicy Always starts it again.
    wait_for("bad-hook restarted", 90, || async {
        let p = pods.get("bad-hook").await.ok()?;
        let c = p.status?.container_statuses?.into_iter().next()?;
        (c.restart_count >= 1).then_some(())
    })
    .await;
    let events: Api<Event> = Api::namespaced(cluster.client.clone(), "default");
    let event = wait_for("FailedPostStartHook event", 60, || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items.into_iter().find(|e| {
            e.reason.as_deref() == Some("FailedPostStartHook")
                && e.involved_object.name.as_deref() == Some("bad-hook")
        })
    })
    .await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(
        event.involved_object.field_path.as_deref(),
        Some("spec.containers{app}")
    );

    // Termination messages: the default file, a custom path, and the log tail on failure.
    let done = wait_for("messages' containers terminated", 90, || async {
        let p = pods.get("messages").await.ok()?;
        let all = ["file", "custom", "logs"]
            .iter()
            .all(|n| terminated(&p, n).is_some());
        all.then_some(p)
    })
    .await;
    let message = |n: &str| terminated(&done, n).and_then(|t| t.message);
    assert_eq!(message("file").as_deref(), Some("goodbye from file"));
    assert_eq!(message("custom").as_deref(), Some("custom path"));
    assert_eq!(message("logs").as_deref(), Some("first\nlast words\n"));
    assert_eq!(terminated(&done, "logs").map(|t| t.exit_code), Some(3));

    // preStop runs on deletion, before the container gets its TERM.
    pods.delete("hooked", &DeleteParams::default())
        .await
        .expect("delete hooked");
    wait_for("hooked gone", 60, || async {
        pods.get_opt("hooked")
            .await
            .ok()
            .flatten()
            .is_none()
            .then_some(())
    })
    .await;
    let order = std::fs::read_to_string(shared.join("order")).expect("order file");
    assert_eq!(order, "pre-stop\nterm\n");
    drop(cluster);
}
