//! Pod volumes and environment through strake-kubelet on containerd: ConfigMap, Secret,
//! downwardAPI, emptyDir
//! and the projected service-account token appear in the container with the right content and
//! modes, and a ConfigMap change reaches the file.

use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use strake_integration::control_plane::{ControlPlane, Options};
use strake_integration::registry::Registry;

mod common;
use common::{KubeletNode, wait_for};

const NODE: &str = "strake-vol-0";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_secret_downward_api_and_token_volumes_appear_and_update() {
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

    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "app-config" }, "data": { "greeting": "hello" }
    }))
    .expect("cm");
    cms.create(&PostParams::default(), &cm)
        .await
        .expect("create configmap");
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "app-secret" }, "stringData": { "password": "s3cr3t" }
    }))
    .expect("secret");
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("create secret");

    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "vols", "labels": { "tier": "web" } },
        "spec": {
            "nodeName": NODE,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "app",
                "image": format!("{}/strake/busybox:1", registry.open_in_cluster()),
                "command": ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"],
                "env": [
                    { "name": "FROM_CM", "valueFrom": { "configMapKeyRef": { "name": "app-config", "key": "greeting" } } },
                    { "name": "FROM_SECRET", "valueFrom": { "secretKeyRef": { "name": "app-secret", "key": "password" } } }
                ],
                "envFrom": [{ "configMapRef": { "name": "app-config" }, "prefix": "CM_" }],
                "volumeMounts": [
                    { "name": "config", "mountPath": "/etc/config" },
                    { "name": "secret", "mountPath": "/etc/secret" },
                    { "name": "info", "mountPath": "/etc/info" },
                    { "name": "scratch", "mountPath": "/scratch" }
                ]
            }],
            "volumes": [
                { "name": "config", "configMap": { "name": "app-config" } },
                { "name": "secret", "secret": { "secretName": "app-secret", "defaultMode": 256 } },
                { "name": "info", "downwardAPI": { "items": [
                    { "path": "labels", "fieldRef": { "fieldPath": "metadata.labels" } },
                    { "path": "name", "fieldRef": { "fieldPath": "metadata.name" } }
                ] } },
                { "name": "scratch", "emptyDir": {} }
            ]
        }
    }))
    .expect("pod");
    wait_for("pod created", 60, || async {
        pods.create(&PostParams::default(), &pod).await.ok()
    })
    .await;
    wait_for("pod running", 90, || async {
        let st = pods.get("vols").await.ok()?.status?;
        (st.phase.as_deref() == Some("Running")).then_some(())
    })
    .await;
    let exec = |cmd: &str| -> String {
        let out = node
            .runtime
            .crictl(&["ps", "-q", "--name", "app", "--state", "running"])
            .expect("crictl ps");
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let out = node
            .runtime
            .crictl(&["exec", "--sync", &id, "/bin/sh", "-c", cmd])
            .expect("crictl exec");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(exec("cat /etc/config/greeting"), "hello");
    assert_eq!(
        exec("echo $FROM_CM $FROM_SECRET $CM_greeting"),
        "hello s3cr3t hello",
        "env from ConfigMap and Secret"
    );
    assert_eq!(exec("cat /etc/secret/password"), "s3cr3t");
    assert_eq!(
        exec("stat -L -c %a /etc/secret/password"),
        "400",
        "secret defaultMode"
    );
    assert_eq!(
        exec("stat -L -c %a /etc/config/greeting"),
        "644",
        "configMap default mode"
    );
    assert_eq!(exec("cat /etc/info/name"), "vols");
    assert_eq!(exec("cat /etc/info/labels"), "tier=\"web\"");
    assert_eq!(
        exec("echo x > /scratch/f && cat /scratch/f"),
        "x",
        "emptyDir is writable"
    );
    assert!(
        exec("touch /etc/config/new 2>&1; echo $?").ends_with('1'),
        "configMap volumes are read-only"
    );
    // The ServiceAccount admission plugin added the kube-api-access projected volume.
    let sa = "/var/run/secrets/kubernetes.io/serviceaccount";
    assert_eq!(exec(&format!("cat {sa}/namespace")), "default");
    let token = exec(&format!("cat {sa}/token"));
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    assert!(exec(&format!("cat {sa}/ca.crt")).contains("BEGIN CERTIFICATE"));

    // A ConfigMap change reaches the file.
    let patch = serde_json::json!({ "data": { "greeting": "bonjour" } });
    cms.patch("app-config", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("update configmap");
    wait_for("configmap update in the file", 60, || async {
        (exec("cat /etc/config/greeting") == "bonjour").then_some(())
    })
    .await;
    drop(node);
}
