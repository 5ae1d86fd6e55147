//! Requests and limits reach the container: cgroup CPU quota and shares and the memory limit
//! as the kernel enforces them, `resourceFieldRef` environment values and Service links, on
//! strake-runtime.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};

mod common;
use common::{Cluster, RuntimeKind, wait_for};

const NODE: &str = "strake-resources-0";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_become_cgroup_settings_and_resource_field_refs() {
    let cluster = Cluster::start(NODE, RuntimeKind::Strake).await;
    let (client, registry, node) = (&cluster.client, &cluster.registry, &cluster.node);

    // A Service of the pod's namespace, created before the pod: its variables come from the
    // kubelet's Services informer.
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(client.clone(), "default");
    let svc = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": "web-front" },
        "spec": { "ports": [{ "name": "http", "port": 8080 }], "selector": { "app": "none" } }
    }))
    .expect("service");
    let svc = services
        .create(&PostParams::default(), &svc)
        .await
        .expect("create service");
    let web_ip = svc.spec.and_then(|s| s.cluster_ip).expect("cluster IP");

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "limited" },
        "spec": {
            "nodeName": NODE,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "app",
                "image": format!("{}/strake/busybox:1", registry.open_in_cluster()),
                "command": ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"],
                "resources": {
                    "requests": { "cpu": "250m", "memory": "32Mi" },
                    "limits": { "cpu": "500m", "memory": "64Mi" }
                },
                "env": [
                    { "name": "CPU_LIMIT_M", "valueFrom": { "resourceFieldRef": { "resource": "limits.cpu", "divisor": "1m" } } },
                    { "name": "CPU_LIMIT", "valueFrom": { "resourceFieldRef": { "resource": "limits.cpu" } } },
                    { "name": "MEM_REQUEST_MI", "valueFrom": { "resourceFieldRef": { "resource": "requests.memory", "divisor": "1Mi" } } },
                    { "name": "MEM_LIMIT", "valueFrom": { "resourceFieldRef": { "resource": "limits.memory" } } }
                ]
            }]
        }
    }))
    .expect("pod");
    // The default ServiceAccount appears shortly after the control plane starts.
    wait_for("pod created", 60, || async {
        pods.create(&PostParams::default(), &pod).await.ok()
    })
    .await;
    let mut id = String::new();
    for _ in 0..360 {
        let out = node
            .runtime
            .crictl(&["ps", "-q", "--name", "app", "--state", "running"])
            .expect("crictl ps");
        id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !id.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    if id.is_empty() {
        let status = pods.get("limited").await.map(|p| p.status);
        let log = node.log();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        panic!(
            "the container never ran: {status:?}\nkubelet log (last lines first):\n{}",
            tail.join("\n")
        );
    }
    let exec = |cmd: &str| -> String {
        let out = node
            .runtime
            .crictl(&["exec", "--sync", &id, "/bin/sh", "-c", cmd])
            .expect("crictl exec");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(
        exec("echo $CPU_LIMIT_M $CPU_LIMIT $MEM_REQUEST_MI $MEM_LIMIT"),
        format!("500 1 32 {}", 64 << 20),
        "kubelet log:\n{}",
        node.log()
    );
    // Service links: the API server's own Service, as upstream injects it.
    assert_eq!(
        exec("echo $KUBERNETES_SERVICE_HOST $KUBERNETES_SERVICE_PORT $KUBERNETES_PORT"),
        "10.96.0.1 443 tcp://10.96.0.1:443"
    );
    assert_eq!(
        exec("echo $WEB_FRONT_SERVICE_HOST $WEB_FRONT_SERVICE_PORT_HTTP"),
        format!("{web_ip} 8080")
    );
    // The container's own cgroup, as the kernel applies it (v1 and v2 layouts).
    let memory = exec(
        "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max",
    );
    assert_eq!(memory, (64u64 << 20).to_string());
    let quota = exec(
        "cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us 2>/dev/null || cut -d' ' -f1 /sys/fs/cgroup/cpu.max",
    );
    assert_eq!(quota, "50000");
    let weight =
        exec("cat /sys/fs/cgroup/cpu/cpu.shares 2>/dev/null || cat /sys/fs/cgroup/cpu.weight");
    // 250m -> 256 shares (v1), or the same converted to a v2 weight.
    assert!(weight == "256" || weight == "10", "cpu weight {weight}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_context_reaches_the_container() {
    let cluster = Cluster::start(NODE, RuntimeKind::Strake).await;
    let (client, registry, node) = (&cluster.client, &cluster.registry, &cluster.node);
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "secure" },
        "spec": {
            "nodeName": NODE,
            "terminationGracePeriodSeconds": 1,
            "securityContext": { "runAsUser": 1000, "runAsGroup": 3000, "supplementalGroups": [4000] },
            "containers": [{
                "name": "app",
                "image": format!("{}/strake/busybox:1", registry.open_in_cluster()),
                "command": ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"],
                "securityContext": {
                    "runAsUser": 1001,
                    "readOnlyRootFilesystem": true,
                    "allowPrivilegeEscalation": false,
                    "capabilities": { "drop": ["ALL"] }
                }
            }]
        }
    }))
    .expect("pod");
    wait_for("pod created", 60, || async {
        pods.create(&PostParams::default(), &pod).await.ok()
    })
    .await;
    let id = wait_for("the container running", 90, || async {
        let out = node
            .runtime
            .crictl(&["ps", "-q", "--name", "app", "--state", "running"])
            .ok()?;
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (!id.is_empty()).then_some(id)
    })
    .await;
    // strake-runtime offers container events; the kubelet follows them (evented PLEG).
    assert!(
        node.log()
            .contains("following the runtime's container events"),
        "{}",
        node.log()
    );
    // The container's main process, as the kernel sees it.
    let out = node
        .runtime
        .crictl(&[
            "exec",
            "--sync",
            &id,
            "/bin/sh",
            "-c",
            "grep -E '^(Uid|Gid|Groups|NoNewPrivs|CapEff):' /proc/1/status; \
             awk '$5 == \"/\" { print \"root\", substr($6, 1, 2) }' /proc/1/mountinfo",
        ])
        .expect("crictl exec");
    let status = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |name: &str| -> Vec<String> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        field("Uid").first().map(String::as_str),
        Some("1001"),
        "{status}"
    );
    assert_eq!(
        field("Gid").first().map(String::as_str),
        Some("3000"),
        "{status}"
    );
    assert!(field("Groups").contains(&"4000".to_string()), "{status}");
    assert_eq!(field("NoNewPrivs"), ["1"], "{status}");
    assert_eq!(field("CapEff"), ["0000000000000000"], "{status}");
    assert!(
        status.contains("root ro"),
        "read-only root filesystem: {status}"
    );

    // runAsGroup without runAsUser: the user is the image's (root, a UID, a name), as upstream
    // fills it, so the runtime gets a group only with a user (the CRI refuses a group alone).
    let open = registry.open_in_cluster();
    let containers: Vec<serde_json::Value> = [
        ("root", format!("{open}/strake/busybox:1")),
        (
            "uid",
            format!("{open}/k8s-staging-cri-tools/test-image-user-uid:latest"),
        ),
        (
            "name",
            format!("{open}/k8s-staging-cri-tools/test-image-user-username:latest"),
        ),
    ]
    .into_iter()
    .map(|(name, image)| {
        serde_json::json!({
            "name": name,
            "image": image,
            "command": ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]
        })
    })
    .collect();
    let grouped: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "grouped" },
        "spec": {
            "nodeName": NODE,
            "terminationGracePeriodSeconds": 1,
            "securityContext": { "runAsGroup": 1234 },
            "containers": containers
        }
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &grouped)
        .await
        .expect("create pod");
    for (name, uid) in [("root", "0"), ("uid", "1002"), ("name", "33")] {
        let id = wait_for(
            &format!("container {name} of grouped running"),
            90,
            || async {
                let out = node
                    .runtime
                    .crictl(&[
                        "ps",
                        "-q",
                        "--name",
                        &format!("^{name}$"),
                        "--label",
                        "io.kubernetes.pod.name=grouped",
                        "--state",
                        "running",
                    ])
                    .ok()?;
                let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
                (!id.is_empty()).then_some(id)
            },
        )
        .await;
        let out = node
            .runtime
            .crictl(&["exec", "--sync", &id, "/bin/sh", "-c", "id -u; id -g"])
            .expect("crictl exec");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .collect::<Vec<_>>(),
            [uid, "1234"],
            "container {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // runAsNonRoot with an image that runs as root: refused before the container exists.
    let rooted: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "rooted" },
        "spec": {
            "nodeName": NODE,
            "terminationGracePeriodSeconds": 1,
            "securityContext": { "runAsNonRoot": true },
            "containers": [{
                "name": "root",
                "image": format!("{}/strake/busybox:1", registry.open_in_cluster()),
                "command": ["sleep", "3600"]
            }]
        }
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &rooted)
        .await
        .expect("create pod");
    let waiting = wait_for("runAsNonRoot refused", 60, || async {
        let p = pods.get("rooted").await.ok()?;
        let w = p
            .status?
            .container_statuses?
            .first()?
            .state
            .as_ref()?
            .waiting
            .clone()?;
        (w.reason.as_deref() == Some("CreateContainerConfigError")).then_some(w)
    })
    .await;
    let message = waiting.message.unwrap_or_default();
    assert!(
        message.starts_with("container has runAsNonRoot and image will run as root"),
        "{message}"
    );
    // ... with a Warning event saying why.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), "default");
    let has_event = |pod: &'static str, reason: &'static str, note: String| {
        let events = events.clone();
        async move {
            let list = events.list(&Default::default()).await.ok()?;
            list.items
                .iter()
                .any(|e| {
                    e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pod)
                        && e.reason.as_deref() == Some(reason)
                        && e.type_.as_deref() == Some("Warning")
                        && e.note.as_deref().is_some_and(|n| n.contains(&note))
                })
                .then_some(())
        }
    };
    // Bad references: a missing ConfigMap key in the environment, a missing ConfigMap as a
    // volume. Each pod waits with a clear reason and an event; nothing else is held up.
    for (name, extra) in [
        (
            "no-env-source",
            serde_json::json!({ "env": [{ "name": "X", "valueFrom": { "configMapKeyRef": { "name": "absent", "key": "k" } } }] }),
        ),
        (
            "no-volume-source",
            serde_json::json!({ "volumeMounts": [{ "name": "cfg", "mountPath": "/cfg" }] }),
        ),
    ] {
        let mut container = serde_json::json!({
            "name": "app",
            "image": format!("{}/strake/busybox:1", registry.open_in_cluster()),
            "command": ["sleep", "3600"]
        });
        if let (Some(c), Some(e)) = (container.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        let mut spec = serde_json::json!({
            "nodeName": NODE, "terminationGracePeriodSeconds": 1, "containers": [container]
        });
        if name == "no-volume-source" {
            spec["volumes"] =
                serde_json::json!([{ "name": "cfg", "configMap": { "name": "absent" } }]);
        }
        let p: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": { "name": name }, "spec": spec
        }))
        .expect("pod");
        pods.create(&PostParams::default(), &p)
            .await
            .expect("create pod");
    }
    wait_for("the missing env source reported", 60, || async {
        let p = pods.get("no-env-source").await.ok()?;
        let w = p
            .status?
            .container_statuses?
            .first()?
            .state
            .as_ref()?
            .waiting
            .clone()?;
        (w.reason.as_deref() == Some("CreateContainerConfigError")
            && w.message
                .as_deref()
                .is_some_and(|m| m.contains("\"absent\" not found")))
        .then_some(())
    })
    .await;
    wait_for("its Failed event", 30, || {
        has_event("no-env-source", "Failed", "\"absent\" not found".into())
    })
    .await;
    wait_for("the FailedMount event", 60, || {
        has_event("no-volume-source", "FailedMount", "absent".into())
    })
    .await;
    wait_for("the Failed event", 30, || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("rooted")
                    && e.reason.as_deref() == Some("Failed")
                    && e.type_.as_deref() == Some("Warning")
                    && e.note.as_deref() == Some(&*format!("Error: {message}"))
            })
            .then_some(())
    })
    .await;
}
