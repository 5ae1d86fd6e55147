//! Pod volumes and environment through strake-kubelet on containerd: ConfigMap, Secret,
//! downwardAPI, emptyDir
//! and the projected service-account token appear in the container with the right content and
//! modes, and a ConfigMap change reaches the file.

use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use strake_integration::control_plane::{ControlPlane, Options};
use strake_integration::registry::Registry;

mod common;
use common::{Cluster, KubeletNode, RuntimeKind, wait_for};

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

/// Unmounts whatever is still mounted below the node's directory when a test ends (the kubelet
/// should have done so already; a failed test must not leave binds behind).
struct MountGuard(std::path::PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let mut left: Vec<_> = strake_kubelet::subpath::mount_points()
            .into_iter()
            .filter(|m| m.starts_with(&self.0))
            .collect();
        left.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for m in left {
            let _ = strake_kubelet::subpath::unmount_all(&m);
        }
    }
}

/// The waiting state of container `name` of pod `pod`, once its reason is `reason`.
async fn waiting_with(
    pods: &Api<Pod>,
    pod: &str,
    name: &str,
    reason: &str,
) -> k8s_openapi::api::core::v1::ContainerStateWaiting {
    wait_for(
        &format!("{pod}/{name} waiting with {reason}"),
        90,
        || async {
            let st = pods.get(pod).await.ok()?.status?;
            let c = st
                .container_statuses?
                .into_iter()
                .find(|c| c.name == name)?;
            c.state?
                .waiting
                .filter(|w| w.reason.as_deref() == Some(reason))
        },
    )
    .await
}

/// Runs `cmd` in the running container `name` of the node and returns its stdout.
fn exec_in(node: &KubeletNode, name: &str, cmd: &str) -> String {
    let filter = format!("^{name}$");
    let out = node
        .runtime
        .crictl(&["ps", "-q", "--name", &filter, "--state", "running"])
        .expect("crictl ps");
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let out = node
        .runtime
        .crictl(&["exec", "--sync", &id, "/bin/sh", "-c", cmd])
        .expect("crictl exec");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The subPath binds of pod `uid` on the node.
fn subpath_binds(node: &KubeletNode, uid: &str) -> Vec<std::path::PathBuf> {
    let dir = node
        .dir
        .path()
        .join("root/pods")
        .join(uid)
        .join("volume-subpaths");
    strake_kubelet::subpath::mount_points()
        .into_iter()
        .filter(|m| m.starts_with(&dir))
        .collect()
}

/// CVE-2017-1002101's scenario: an init container plants a symlink to a host directory in an
/// emptyDir, the next container mounts it by `subPath`. The container must not start (upstream:
/// CreateContainerConfigError) and nothing may be listed in or written to the host directory.
/// Then `subPathExpr: $(POD_NAME)` mounts only that sub-directory of the volume, and the pod's
/// subPath binds are gone after it is deleted.
async fn subpath_scenario(node_name: &str, kind: RuntimeKind) {
    let mut cluster = Cluster::start(node_name, kind).await;
    let _mounts = MountGuard(cluster.node.dir.path().to_path_buf());
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let host = tempfile::tempdir().expect("host dir");
    std::fs::write(host.path().join("marker"), "host").expect("marker");
    let host_entries = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(host.path())
            .expect("read host dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };

    let escape: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "escape" },
        "spec": {
            "nodeName": node_name,
            "terminationGracePeriodSeconds": 1,
            "initContainers": [{
                "name": "plant",
                "image": cluster.busybox(),
                "command": ["/bin/sh", "-c", format!("ln -s {} /vol/x", host.path().display())],
                "volumeMounts": [{ "name": "scratch", "mountPath": "/vol" }]
            }],
            "containers": [{
                "name": "main",
                "image": cluster.busybox(),
                "command": ["/bin/sh", "-c", "ls -la /mnt; touch /mnt/written-by-pod; sleep 3600"],
                "volumeMounts": [{ "name": "scratch", "mountPath": "/mnt", "subPath": "x" }]
            }],
            "volumes": [{ "name": "scratch", "emptyDir": {} }]
        }
    }))
    .expect("pod");
    wait_for("pod created", 60, || async {
        pods.create(&PostParams::default(), &escape).await.ok()
    })
    .await;
    let waiting = waiting_with(&pods, "escape", "main", "CreateContainerConfigError").await;
    assert_eq!(
        waiting.message.as_deref(),
        Some("failed to prepare subPath for volumeMount \"scratch\" of container \"main\""),
    );
    // The init container did run (so the link was there to be refused).
    let init = pods
        .get("escape")
        .await
        .expect("pod")
        .status
        .expect("status");
    let plant = &init.init_container_statuses.expect("init statuses")[0];
    assert_eq!(
        plant
            .state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .map(|t| t.exit_code),
        Some(0),
        "{plant:?}"
    );
    assert_eq!(host_entries(), ["marker"], "nothing written on the host");
    let containers = cluster
        .node
        .runtime
        .crictl(&["ps", "-a", "-q", "--name", "^main$"])
        .expect("crictl ps");
    assert!(
        String::from_utf8_lossy(&containers.stdout)
            .trim()
            .is_empty(),
        "no container was created for main"
    );

    let expr: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "sp-expr" },
        "spec": {
            "nodeName": node_name,
            "terminationGracePeriodSeconds": 1,
            "initContainers": [{
                "name": "fill",
                "image": cluster.busybox(),
                "command": ["/bin/sh", "-c",
                    "mkdir -p /vol/sp-expr && echo mine > /vol/sp-expr/inside && echo other > /vol/outside"],
                "volumeMounts": [{ "name": "scratch", "mountPath": "/vol" }]
            }],
            "containers": [{
                "name": "app",
                "image": cluster.busybox(),
                "command": ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"],
                "env": [{ "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } }],
                "volumeMounts": [{ "name": "scratch", "mountPath": "/data", "subPathExpr": "$(POD_NAME)" }]
            }],
            "volumes": [{ "name": "scratch", "emptyDir": {} }]
        }
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &expr)
        .await
        .expect("create pod");
    wait_for("sp-expr running", 90, || async {
        let st = pods.get("sp-expr").await.ok()?.status?;
        (st.phase.as_deref() == Some("Running")).then_some(())
    })
    .await;
    assert_eq!(
        exec_in(&cluster.node, "app", "ls /data"),
        "inside",
        "only the pod's sub-directory"
    );
    assert_eq!(exec_in(&cluster.node, "app", "cat /data/inside"), "mine");
    let uid = pods
        .get("sp-expr")
        .await
        .expect("pod")
        .metadata
        .uid
        .expect("uid");
    assert_eq!(
        subpath_binds(&cluster.node, &uid).len(),
        1,
        "one subPath bind for the pod"
    );

    // A kubelet restart leaves the running pod's bind alone; the container restarting after it
    // re-uses the bind (not stacked, still only the sub-directory).
    cluster.node.restart_kubelet().expect("restart kubelet");
    // The exec may die with the container it stops: its status does not matter.
    let running = cluster
        .node
        .runtime
        .crictl(&["ps", "-q", "--name", "^app$", "--state", "running"])
        .expect("crictl ps");
    let id = String::from_utf8_lossy(&running.stdout).trim().to_string();
    let _ = cluster
        .node
        .runtime
        .crictl(&["exec", "--sync", &id, "kill", "1"]);
    // A new app container (on containerd the restarted kubelet currently makes a new sandbox
    // too, so the restart count is not the measure).
    wait_for("a new app container running", 90, || async {
        let st = pods.get("sp-expr").await.ok()?.status?;
        let c = st
            .container_statuses?
            .into_iter()
            .find(|c| c.name == "app")?;
        let new = c
            .container_id
            .as_deref()
            .is_some_and(|cid| !cid.ends_with(&id));
        (new && c.state?.running.is_some()).then_some(())
    })
    .await;
    assert_eq!(exec_in(&cluster.node, "app", "ls /data"), "inside");
    assert_eq!(
        subpath_binds(&cluster.node, &uid).len(),
        1,
        "the bind is re-used"
    );

    // Deleting the pod unmounts its binds and removes its directory.
    pods.delete("sp-expr", &Default::default())
        .await
        .expect("delete pod");
    wait_for("sp-expr gone", 60, || async {
        pods.get_opt("sp-expr")
            .await
            .ok()
            .and_then(|p| p.is_none().then_some(()))
    })
    .await;
    let pod_dir = cluster.node.dir.path().join("root/pods").join(&uid);
    wait_for("sp-expr's directory removed", 30, || async {
        (subpath_binds(&cluster.node, &uid).is_empty() && !pod_dir.exists()).then_some(())
    })
    .await;
    assert_eq!(host_entries(), ["marker"], "nothing written on the host");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subpath_symlink_escape_is_refused_and_subpath_expr_mounts_only_its_directory_on_strake_runtime()
 {
    subpath_scenario("strake-subpath-0", RuntimeKind::Strake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subpath_symlink_escape_is_refused_and_subpath_expr_mounts_only_its_directory_on_containerd()
 {
    subpath_scenario("strake-subpath-1", RuntimeKind::Containerd).await;
}

/// A self-signed CA certificate (DER) named `cn`.
fn ca_der(cn: &str) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .self_signed(&key)
        .expect("self-signed")
        .der()
        .to_vec()
}

fn pem_of(ders: &[&[u8]]) -> String {
    ders.iter()
        .map(|d| pem::encode(&pem::Pem::new("CERTIFICATE", d.to_vec())))
        .collect()
}

/// The DER blocks of a PEM file, as a set.
fn ders_in(text: &str) -> std::collections::BTreeSet<Vec<u8>> {
    pem::parse_many(text)
        .unwrap_or_else(|e| panic!("{e}: {text}"))
        .into_iter()
        .map(pem::Pem::into_contents)
        .collect()
}

/// The message of a FailedMount event of pod `pod` (in `default`) that contains `text`.
async fn failed_mount(client: &kube::Client, pod: &str, text: &str) -> String {
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), "default");
    wait_for(
        &format!("FailedMount of {pod} saying {text:?}"),
        60,
        || async {
            events
                .list(&Default::default())
                .await
                .ok()?
                .items
                .into_iter()
                .filter(|e| {
                    e.reason.as_deref() == Some("FailedMount")
                        && e.involved_object.name.as_deref() == Some(pod)
                })
                .find_map(|e| e.message.filter(|m| m.contains(text)))
        },
    )
    .await
}

/// `clusterTrustBundle` projections: by name, by signer and label selector (bundles merged,
/// duplicates dropped), an optional missing one (an empty file); a pod naming a missing
/// bundle that is not optional waits with FailedMount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_trust_bundle_projections_by_name_and_by_signer() {
    use k8s_openapi::api::certificates::v1::ClusterTrustBundle;
    let cluster = Cluster::start("strake-ctb-0", RuntimeKind::Strake).await;
    let client = cluster.client.clone();
    let (ca1, ca2, ca3) = (ca_der("ca-one"), ca_der("ca-two"), ca_der("ca-three"));
    let bundles: Api<ClusterTrustBundle> = Api::all(client.clone());
    for (name, signer, label, certs) in [
        (
            "example.com:test:one",
            Some("example.com/test"),
            "primary",
            pem_of(&[&ca1, &ca2]),
        ),
        (
            "example.com:test:two",
            Some("example.com/test"),
            "primary",
            pem_of(&[&ca2]),
        ),
        (
            "example.com:test:other",
            Some("example.com/test"),
            "secondary",
            pem_of(&[&ca3]),
        ),
        ("plain", None, "primary", pem_of(&[&ca3])),
    ] {
        let b: ClusterTrustBundle = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "labels": { "bundle": label } },
            "spec": { "signerName": signer, "trustBundle": certs }
        }))
        .expect("bundle");
        bundles
            .create(&PostParams::default(), &b)
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}"));
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod = |name: &str, sources: serde_json::Value| -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": name },
            "spec": {
                "nodeName": "strake-ctb-0",
                "terminationGracePeriodSeconds": 1,
                "containers": [{
                    "name": name,
                    "image": cluster.busybox(),
                    "command": ["sleep", "3600"],
                    "volumeMounts": [{ "name": "anchors", "mountPath": "/anchors" }]
                }],
                "volumes": [{ "name": "anchors", "projected": { "sources": sources } }]
            }
        }))
        .expect("pod")
    };
    let trusting = pod(
        "trusting",
        serde_json::json!([
            { "clusterTrustBundle": { "name": "plain", "path": "by-name.pem" } },
            { "clusterTrustBundle": {
                "signerName": "example.com/test",
                "labelSelector": { "matchLabels": { "bundle": "primary" } },
                "path": "by-signer.pem" } },
            { "clusterTrustBundle": { "name": "absent", "optional": true, "path": "optional.pem" } }
        ]),
    );
    wait_for("pod created", 60, || async {
        pods.create(&PostParams::default(), &trusting).await.ok()
    })
    .await;
    wait_for("trusting running", 90, || async {
        let st = pods.get("trusting").await.ok()?.status?;
        (st.phase.as_deref() == Some("Running")).then_some(())
    })
    .await;
    let by_name = exec_in(&cluster.node, "trusting", "cat /anchors/by-name.pem");
    assert_eq!(ders_in(&by_name), [ca3.clone()].into());
    let by_signer = exec_in(&cluster.node, "trusting", "cat /anchors/by-signer.pem");
    assert_eq!(ders_in(&by_signer), [ca1.clone(), ca2.clone()].into());
    assert_eq!(
        by_signer.matches("BEGIN CERTIFICATE").count(),
        2,
        "{by_signer}"
    );
    assert_eq!(
        exec_in(&cluster.node, "trusting", "wc -c < /anchors/optional.pem"),
        "0"
    );

    let missing = pod(
        "missing",
        serde_json::json!([{ "clusterTrustBundle": { "name": "absent", "path": "a.pem" } }]),
    );
    pods.create(&PostParams::default(), &missing)
        .await
        .expect("create missing");
    let message = failed_mount(&client, "missing", "not found").await;
    assert!(message.contains("\"absent\" not found"), "{message}");
    let st = pods
        .get("missing")
        .await
        .expect("missing")
        .status
        .unwrap_or_default();
    assert_eq!(st.phase.as_deref(), Some("Pending"));
    drop(cluster);
}

/// Acts as the signer `signer` for the PodCertificateRequests of `ns`: issues each pending one
/// with `ca` (a one-hour leaf for the CSR's key, refresh from half an hour), or denies it when
/// `deny` is set. Returns the requests it answered.
async fn sign_requests(
    client: &kube::Client,
    signer: &str,
    ca: &rcgen::CertifiedIssuer<'_, rcgen::KeyPair>,
    deny: bool,
) -> Vec<k8s_openapi::api::certificates::v1::PodCertificateRequest> {
    use k8s_openapi::api::certificates::v1::PodCertificateRequest;
    let api: Api<PodCertificateRequest> = Api::namespaced(client.clone(), "default");
    let mut answered = Vec::new();
    for pcr in api
        .list(&Default::default())
        .await
        .expect("list PCRs")
        .items
    {
        let done = pcr
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| !c.is_empty());
        if done || pcr.spec.signer_name != signer {
            continue;
        }
        let name = pcr.metadata.name.clone().unwrap_or_default();
        let now = time::OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .expect("seconds");
        let rfc3339 = |t: time::OffsetDateTime| {
            t.format(&time::format_description::well_known::Rfc3339)
                .expect("format")
        };
        let status = if deny {
            serde_json::json!({ "conditions": [{
                "type": "Denied", "status": "True", "reason": "NotThisPod",
                "message": "the test signer refuses", "lastTransitionTime": rfc3339(now) }] })
        } else {
            let der = pcr.spec.stub_pkc_s10_request.0.clone();
            let mut csr = rcgen::CertificateSigningRequestParams::from_der(&der.into())
                .expect("the kubelet's CSR parses and its signature verifies");
            csr.params.not_before = now;
            csr.params.not_after = now + time::Duration::hours(1);
            let leaf = csr.signed_by(ca).expect("sign");
            let chain = format!("{}{}", leaf.pem(), ca.pem());
            serde_json::json!({
                "conditions": [{ "type": "Issued", "status": "True", "reason": "Issued",
                    "message": "issued by the test signer", "lastTransitionTime": rfc3339(now) }],
                "certificateChain": chain,
                "notBefore": rfc3339(now),
                "beginRefreshAt": rfc3339(now + time::Duration::minutes(30)),
                "notAfter": rfc3339(now + time::Duration::hours(1)),
            })
        };
        api.patch_status(
            &name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&serde_json::json!({ "status": status })),
        )
        .await
        .unwrap_or_else(|e| panic!("answer {name}: {e}"));
        answered.push(pcr);
    }
    answered
}

/// `podCertificate` projections: the kubelet makes a key, asks for a certificate with a
/// PodCertificateRequest naming the pod, its ServiceAccount and the node; the pod starts once
/// the signer issued it and sees the key, the chain and the bundle. A denied request keeps its
/// pod waiting with the signer's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_certificate_projection_is_requested_issued_and_written() {
    let node_name = "strake-pcr-0";
    let cluster = Cluster::start(node_name, RuntimeKind::Strake).await;
    let client = cluster.client.clone();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test pod signer");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca =
        rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().expect("key"))
            .expect("ca");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod = |name: &str, signer: &str| -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": name },
            "spec": {
                "nodeName": node_name,
                "terminationGracePeriodSeconds": 1,
                "containers": [{
                    "name": name,
                    "image": cluster.busybox(),
                    "command": ["sleep", "3600"],
                    "volumeMounts": [{ "name": "identity", "mountPath": "/identity" }]
                }],
                "volumes": [{ "name": "identity", "projected": { "sources": [
                    { "podCertificate": {
                        "signerName": signer,
                        "keyType": "ED25519",
                        "maxExpirationSeconds": 3600,
                        "credentialBundlePath": "bundle.pem",
                        "keyPath": "key.pem",
                        "certificateChainPath": "chain.pem" } }
                ] } }]
            }
        }))
        .expect("pod")
    };
    let signed = pod("signed", "example.com/pod-signer");
    wait_for("pod created", 60, || async {
        pods.create(&PostParams::default(), &signed).await.ok()
    })
    .await;
    let pcr = wait_for("a PodCertificateRequest, issued", 60, || async {
        sign_requests(&client, "example.com/pod-signer", &ca, false)
            .await
            .into_iter()
            .next()
    })
    .await;
    let created = pods.get("signed").await.expect("pod");
    assert_eq!(pcr.spec.pod_name, "signed");
    assert_eq!(Some(&pcr.spec.pod_uid), created.metadata.uid.as_ref());
    assert_eq!(pcr.spec.node_name, node_name);
    assert_eq!(pcr.spec.service_account_name, "default");
    assert_eq!(pcr.spec.max_expiration_seconds, Some(3600));
    let owner = &pcr.metadata.owner_references.clone().unwrap_or_default()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Pod", "signed")
    );
    wait_for("signed running", 90, || async {
        let st = pods.get("signed").await.ok()?.status?;
        (st.phase.as_deref() == Some("Running")).then_some(())
    })
    .await;

    let key = exec_in(&cluster.node, "signed", "cat /identity/key.pem");
    let chain = exec_in(&cluster.node, "signed", "cat /identity/chain.pem");
    let bundle = exec_in(&cluster.node, "signed", "cat /identity/bundle.pem");
    let key_pair = rcgen::KeyPair::from_pem(&format!("{key}\n")).expect("a PKCS#8 key");
    let certs: Vec<Vec<u8>> = pem::parse_many(&chain)
        .expect("chain")
        .into_iter()
        .map(pem::Pem::into_contents)
        .collect();
    assert_eq!(certs.len(), 2, "{chain}");
    assert_eq!(certs[1], ca.der().to_vec(), "the CA follows the leaf");
    // The leaf is for the key the pod holds.
    use x509_parser::prelude::FromDer;
    let (_, leaf) = x509_parser::certificate::X509Certificate::from_der(&certs[0]).expect("leaf");
    assert_eq!(
        &*leaf.public_key().subject_public_key.data,
        rcgen::PublicKeyData::der_bytes(&key_pair)
    );
    assert_eq!(
        bundle,
        format!("{key}\n{chain}"),
        "the bundle is the key, then the chain"
    );

    // A denied request: the pod waits, and says why.
    let refused = pod("refused", "example.com/denier");
    pods.create(&PostParams::default(), &refused)
        .await
        .expect("create refused");
    wait_for("a PodCertificateRequest, denied", 60, || async {
        sign_requests(&client, "example.com/denier", &ca, true)
            .await
            .into_iter()
            .next()
    })
    .await;
    let message = failed_mount(&client, "refused", "denied").await;
    assert!(
        message.contains("NotThisPod") && message.contains("the test signer refuses"),
        "{message}"
    );
    let st = pods
        .get("refused")
        .await
        .expect("refused")
        .status
        .unwrap_or_default();
    assert_eq!(st.phase.as_deref(), Some("Pending"));
    drop(cluster);
}
