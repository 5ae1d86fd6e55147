//! Pods name what the runtime needs: `imagePullSecrets` (a Docker config Secret) let the kubelet
//! pull from the test bed's protected registry, which refuses the same pull without them, and
//! `runtimeClassName` reaches the runtime as the RuntimeClass's handler (a known handler runs,
//! an unknown one is refused by the runtime with the pod told why; RuntimeClass `gvisor` runs
//! its pod on gVisor's kernel). On strake-runtime. (A pod
//! naming a RuntimeClass that does not exist is refused by the API server's admission.) The
//! kubelet's Events tell the same story.

use base64::Engine as _;
use k8s_openapi::api::core::v1::{ContainerStateWaiting, Pod, Secret};
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::api::{Api, PostParams};
use strake_integration::registry;

mod common;
use common::{Cluster, RuntimeKind, wait_for};

const NODE: &str = "strake-pull-0";

fn pod(name: &str, image: &str, extra: serde_json::Value) -> Pod {
    let mut spec = serde_json::json!({
        "nodeName": NODE,
        "terminationGracePeriodSeconds": 1,
        "containers": [{
            "name": "app",
            "image": image,
            "imagePullPolicy": "Always",
            "command": ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]
        }]
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": { "name": name }, "spec": spec
    }))
    .expect("pod")
}

fn waiting(p: &Pod) -> Option<ContainerStateWaiting> {
    p.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .waiting
        .clone()
}

fn running(p: &Pod) -> bool {
    p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_secrets_and_runtime_classes_reach_the_runtime() {
    let cluster = Cluster::start(NODE, RuntimeKind::Strake).await;
    let (client, registry, node) = (&cluster.client, &cluster.registry, &cluster.node);

    let protected = format!("{}/strake/protected:1", registry.protected_in_cluster());
    let open = format!("{}/strake/busybox:1", registry.open_in_cluster());
    let auth = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        registry::USER,
        registry::PASSWORD
    ));
    let config = serde_json::json!({
        "auths": { registry.protected_in_cluster().to_string(): { "auth": auth } }
    });
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "regcred" },
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": { ".dockerconfigjson": config.to_string() }
    }))
    .expect("secret");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("create secret");
    let classes: Api<RuntimeClass> = Api::all(client.clone());
    for (name, handler) in [
        ("plain", "runc"),
        ("bogus", "no-such-handler"),
        ("gvisor", "gvisor"),
    ] {
        let rc: RuntimeClass = serde_json::from_value(serde_json::json!({
            "apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
            "metadata": { "name": name }, "handler": handler
        }))
        .expect("runtime class");
        classes
            .create(&PostParams::default(), &rc)
            .await
            .expect("create runtime class");
    }

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let all = [
        pod(
            "with-secret",
            &protected,
            serde_json::json!({ "imagePullSecrets": [{ "name": "regcred" }] }),
        ),
        pod("without-secret", &protected, serde_json::json!({})),
        pod(
            "plain-class",
            &open,
            serde_json::json!({ "runtimeClassName": "plain" }),
        ),
        pod(
            "bogus-class",
            &open,
            serde_json::json!({ "runtimeClassName": "bogus" }),
        ),
        pod(
            "gvisor-class",
            &open,
            serde_json::json!({
                "runtimeClassName": "gvisor",
                "containers": [{
                    "name": "app",
                    "image": open,
                    "command": ["/bin/sh", "-c", "uname -r; trap 'exit 0' TERM; sleep 3600 & wait"]
                }]
            }),
        ),
    ];
    // The default ServiceAccount appears shortly after the control plane starts.
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(client.clone(), "default");
    wait_for("the default ServiceAccount", 60, || async {
        sas.get_opt("default").await.ok().flatten()
    })
    .await;
    for p in &all {
        pods.create(&PostParams::default(), p)
            .await
            .unwrap_or_else(|e| panic!("create {:?}: {e}", p.metadata.name));
    }
    let get = |name: &'static str| {
        let pods = pods.clone();
        async move { pods.get(name).await.ok() }
    };
    let log = || node.log();

    // Events tell the story, as `kubectl describe pod` shows it.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), "default");
    let reasons = |pod: &'static str| {
        let events = events.clone();
        async move {
            let list = events.list(&Default::default()).await.ok()?;
            Some(
                list.items
                    .into_iter()
                    .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pod))
                    .filter(|e| e.reporting_controller.as_deref() == Some("kubelet"))
                    .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
                    .collect::<Vec<_>>(),
            )
        }
    };

    wait_for("the pod with the pull secret Running", 90, || async {
        get("with-secret").await.filter(running)
    })
    .await;
    wait_for("Pulling, Pulled, Created, Started events", 30, || async {
        let r = reasons("with-secret").await?;
        ["Pulling", "Pulled", "Created", "Started"]
            .iter()
            .all(|want| r.iter().any(|(reason, _)| reason == want))
            .then_some(())
    })
    .await;
    let refused = wait_for("the pod without the secret failing to pull", 90, || async {
        // ErrImagePull right after each attempt, ImagePullBackOff in between.
        waiting(&get("without-secret").await?).filter(|w| {
            matches!(
                w.reason.as_deref(),
                Some("ErrImagePull" | "ImagePullBackOff")
            )
        })
    })
    .await;
    assert!(!refused.message.unwrap_or_default().is_empty());
    // The registry's refusal, in the runtime's words.
    wait_for("a Failed event for the refused pull", 30, || async {
        let r = reasons("without-secret").await?;
        r.iter()
            .any(|(reason, note)| {
                reason == "Failed"
                    && note.starts_with("Failed to pull image")
                    && note.contains("PullImage failed: ")
            })
            .then_some(())
    })
    .await;

    wait_for("the pod of RuntimeClass plain Running", 90, || async {
        get("plain-class").await.filter(running)
    })
    .await;
    let bogus = wait_for("the unknown handler refused", 90, || async {
        waiting(&get("bogus-class").await?).filter(|w| {
            w.message
                .as_deref()
                .is_some_and(|m| m.contains("no-such-handler"))
        })
    })
    .await;
    assert_eq!(
        bogus.reason.as_deref(),
        Some("ContainerCreating"),
        "{}",
        log()
    );
    wait_for("a FailedCreatePodSandBox event", 30, || async {
        let r = reasons("bogus-class").await?;
        r.iter()
            .any(|(reason, note)| {
                reason == "FailedCreatePodSandBox" && note.contains("no-such-handler")
            })
            .then_some(())
    })
    .await;
    // The gVisor pod runs on gVisor's kernel, not the node's.
    wait_for("the pod of RuntimeClass gvisor Running", 90, || async {
        get("gvisor-class").await.filter(running)
    })
    .await;
    let release = wait_for("the gVisor pod's kernel release in its log", 30, || async {
        let text = pods.logs("gvisor-class", &Default::default()).await.ok()?;
        Some(text.lines().next()?.trim().to_string()).filter(|l| !l.is_empty())
    })
    .await;
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    assert_ne!(release, host.trim(), "the gvisor pod saw the node's kernel");

    // The bogus handler's pod never got a sandbox: three pods run (with-secret, plain-class,
    // gvisor-class) and the one without credentials has a sandbox but no container.
    let out = node.runtime.crictl(&["pods", "-q"]).expect("crictl pods");
    let sandboxes = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(sandboxes, 4, "{}", log());

    // Deleting a pod stops its containers, with an event saying so.
    pods.delete("plain-class", &Default::default())
        .await
        .expect("delete pod");
    wait_for("a Killing event", 30, || async {
        let r = reasons("plain-class").await?;
        r.iter()
            .any(|(reason, note)| reason == "Killing" && note == "Stopping container app")
            .then_some(())
    })
    .await;
}
