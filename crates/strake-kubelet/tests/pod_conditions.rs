//! Pod conditions through a real API server, on strake-runtime and on containerd: a pod with a
//! readiness gate stays not Ready (`ReadinessGatesNotReady`) until another party sets the gate's
//! condition, and the kubelet's status patches leave that condition alone; `observedGeneration`
//! on the status and on each kubelet condition follows the pod's generation.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};

mod common;
use common::{Cluster, RuntimeKind, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_gates_and_observed_generation_on_strake_runtime() {
    scenario("strake-conditions-0", RuntimeKind::Strake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_gates_and_observed_generation_on_containerd() {
    scenario("strake-conditions-1", RuntimeKind::Containerd).await;
}

const GATE: &str = "example.com/load-balancer";

fn condition<'a>(pod: &'a Pod, kind: &str) -> Option<&'a k8s_openapi::api::core::v1::PodCondition> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
}

async fn scenario(node: &str, kind: RuntimeKind) {
    let cluster = Cluster::start(node, kind).await;
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "gated" },
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 1,
            "readinessGates": [{ "conditionType": GATE }],
            "containers": [{
                "name": "app", "image": cluster.busybox(),
                "command": ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]
            }]
        }
    }))
    .expect("pod");
    // Until the default service account exists, admission refuses pods.
    wait_for("pod created", 60, || async {
        pods.create(&PostParams::default(), &pod).await.ok()
    })
    .await;

    // Containers ready, the gate's condition absent: not Ready, and upstream's reason.
    let p = wait_for("containers ready", 120, || async {
        let p = pods.get("gated").await.ok()?;
        (condition(&p, "ContainersReady")?.status == "True").then_some(p)
    })
    .await;
    let ready = condition(&p, "Ready").expect("Ready condition");
    assert_eq!(ready.status, "False");
    assert_eq!(ready.reason.as_deref(), Some("ReadinessGatesNotReady"));
    assert!(
        ready.message.as_deref().unwrap_or_default().contains(GATE),
        "{ready:?}"
    );
    let generation = p.metadata.generation.expect("generation");
    let status = p.status.clone().unwrap_or_default();
    assert_eq!(status.observed_generation, Some(generation));
    for c in status.conditions.iter().flatten() {
        assert_eq!(c.observed_generation, Some(generation), "{c:?}");
    }

    // Another party sets the gate's condition: the pod turns Ready, the condition stays.
    let now = k8s_openapi::jiff::Timestamp::now();
    let patch = serde_json::json!({ "status": { "conditions": [{
        "type": GATE, "status": "True", "lastTransitionTime": now.to_string()
    }]}});
    pods.patch_status("gated", &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .expect("set the gate's condition");
    wait_for("Ready after the gate", 60, || async {
        let p = pods.get("gated").await.ok()?;
        (condition(&p, "Ready")?.status == "True").then_some(())
    })
    .await;

    // A spec change (one more toleration) raises the generation; the kubelet observes it,
    // and its status writes have not removed the gate's condition.
    // Read-modify-replace, again on a conflict with the kubelet's own status writes.
    wait_for("a toleration added", 60, || async {
        let mut p = pods.get("gated").await.ok()?;
        let spec = p.spec.as_mut()?;
        spec.tolerations.get_or_insert_with(Vec::new).push(
            serde_json::from_value(serde_json::json!({
                "key": "example.com/anything", "operator": "Exists", "effect": "NoSchedule"
            }))
            .ok()?,
        );
        pods.replace("gated", &PostParams::default(), &p).await.ok()
    })
    .await;
    let p = wait_for("generation observed", 60, || async {
        let p = pods.get("gated").await.ok()?;
        let want = p.metadata.generation?;
        (want > generation && p.status.as_ref()?.observed_generation == Some(want)).then_some(p)
    })
    .await;
    let want = p.metadata.generation;
    assert!(
        condition(&p, "Ready").is_some_and(|c| c.status == "True" && c.observed_generation == want),
        "{:?}",
        condition(&p, "Ready")
    );
    assert_eq!(
        condition(&p, GATE).map(|c| c.status.as_str()),
        Some("True"),
        "the kubelet's status patches keep conditions it does not own"
    );

    pods.delete("gated", &Default::default())
        .await
        .expect("delete");
    wait_for("pod gone", 60, || async {
        pods.get_opt("gated").await.ok()?.is_none().then_some(())
    })
    .await;
}
