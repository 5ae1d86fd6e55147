//! The pod API pieces of the pod → CRI translation, end to end on strake-runtime and on
//! containerd: the kubelet-managed `/etc/hosts` (pod IP with hostname and FQDN, `hostAliases`,
//! a container's own `/etc/hosts` mount, host-network pods), `hostname`/`subdomain`/
//! `setHostnameAsFQDN` (and the error for an FQDN over 64 characters), and `sysctls` (the safe
//! set and `allowedUnsafeSysctls` applied, anything else rejected at admission), and
//! `activeDeadlineSeconds` (a running pod past it fails with `DeadlineExceeded` and stops), and
//! ephemeral containers (started in a running pod, targeting a container's processes, never
//! restarted, reported apart), `shareProcessNamespace`, and image volumes (strake-runtime).

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};
use strake_integration::control_plane::{ControlPlane, Options};
use strake_integration::registry::Registry;

mod common;
use common::{KubeletNode, RuntimeKind, wait_for};

const NODE: &str = "strake-pod-api-0";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etc_hosts_hostname_and_sysctls_on_strake_runtime() {
    scenario(RuntimeKind::Strake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etc_hosts_hostname_and_sysctls_on_containerd() {
    scenario(RuntimeKind::Containerd).await;
}

/// Runs `cmd` in the running container named `name` (unique on the node) and returns its
/// standard output.
fn exec(node: &KubeletNode, name: &str, cmd: &str) -> String {
    let out = node
        .runtime
        .crictl(&[
            "ps",
            "-q",
            "--name",
            &format!("^{name}$"),
            "--state",
            "running",
        ])
        .expect("crictl ps");
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(!id.is_empty(), "no running container {name}");
    let out = node
        .runtime
        .crictl(&["exec", "--sync", &id, "/bin/sh", "-c", cmd])
        .expect("crictl exec");
    assert!(
        out.status.success(),
        "{cmd} in {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

async fn create(pods: &Api<Pod>, pod: serde_json::Value) {
    let pod: Pod = serde_json::from_value(pod).expect("pod");
    wait_for("pod created", 60, || async {
        pods.create(&PostParams::default(), &pod).await.ok()
    })
    .await;
}

/// Waits until every container of pod `name` runs; returns the pod.
async fn running(pods: &Api<Pod>, name: &str) -> Pod {
    wait_for(&format!("{name} running"), 120, || async {
        let p = pods.get(name).await.ok()?;
        let st = p.status.clone()?;
        let cs = st.container_statuses.clone()?;
        let all = !cs.is_empty()
            && cs
                .iter()
                .all(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()));
        all.then_some(p)
    })
    .await
}

async fn scenario(kind: RuntimeKind) {
    let cp = ControlPlane::start(Options::default())
        .await
        .expect("control plane");
    let registry = Registry::start(cp.net(), &cp.dir().join("registry")).expect("registry");
    let client = cp.client().await.expect("client");
    let node = KubeletNode::start_on(
        &cp,
        0,
        NODE,
        "clusterDomain: cluster.local\nallowedUnsafeSysctls:\n- \"kernel.msg*\"\n",
        kind,
    )
    .await
    .expect("start node");
    let nodes: Api<Node> = Api::all(client.clone());
    wait_for("node registered", 60, || async {
        nodes.get_opt(NODE).await.ok().flatten()
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let image = format!("{}/strake/busybox:1", registry.open_in_cluster());
    let own_hosts = node.dir.path().join("own-hosts");
    std::fs::write(&own_hosts, "# the container's own hosts file\n").expect("write own hosts");
    let sleep = serde_json::json!(["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]);

    // hostAliases, hostname + subdomain + setHostnameAsFQDN, a safe and an allowed unsafe
    // sysctl (slash-separated), and a container that mounts its own /etc/hosts.
    create(
        &pods,
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "named" },
            "spec": {
                "nodeName": NODE,
                "terminationGracePeriodSeconds": 1,
                "hostname": "web",
                "subdomain": "nginx",
                "setHostnameAsFQDN": true,
                "hostAliases": [
                    { "ip": "123.45.67.89", "hostnames": ["foo.remote", "bar.remote"] },
                    { "ip": "10.1.2.3", "hostnames": ["baz"] }
                ],
                "securityContext": { "sysctls": [
                    { "name": "net.ipv4.ip_local_port_range", "value": "1024 50000" },
                    { "name": "kernel/msgmax", "value": "12345" }
                ]},
                "volumes": [{ "name": "own", "hostPath": {
                    "path": own_hosts.display().to_string(), "type": "File" } }],
                "containers": [
                    { "name": "named-app", "image": image, "command": sleep },
                    { "name": "named-own", "image": image, "command": sleep,
                      "volumeMounts": [{ "name": "own", "mountPath": "/etc/hosts" }] }
                ]
            }
        }),
    )
    .await;
    // A host-network pod with an alias.
    create(
        &pods,
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "hostnet" },
            "spec": {
                "nodeName": NODE,
                "terminationGracePeriodSeconds": 1,
                "hostNetwork": true,
                "hostAliases": [{ "ip": "10.9.9.9", "hostnames": ["on-host"] }],
                "containers": [{ "name": "hostnet-app", "image": image, "command": sleep }]
            }
        }),
    )
    .await;
    // A sysctl neither safe nor allowed: rejected, never started.
    create(
        &pods,
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "forbidden" },
            "spec": {
                "nodeName": NODE,
                "securityContext": { "sysctls": [{ "name": "kernel.sem", "value": "1 1 1 1" }] },
                "containers": [{ "name": "forbidden-app", "image": image, "command": sleep }]
            }
        }),
    )
    .await;
    // An FQDN over the kernel's 64 characters: the sandbox is refused with upstream's error.
    create(
        &pods,
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "longname" },
            "spec": {
                "nodeName": NODE,
                "hostname": "h".repeat(40),
                "subdomain": "nginx",
                "setHostnameAsFQDN": true,
                "containers": [{ "name": "longname-app", "image": image, "command": sleep }]
            }
        }),
    )
    .await;

    let named = running(&pods, "named").await;
    let ip = named
        .status
        .and_then(|s| s.pod_ip)
        .expect("named has a pod IP");
    // `od` shows the exact bytes (an exec's output may gain a line end on the way).
    let hosts = exec(&node, "named-app", "od -An -c /etc/hosts | tr -d ' \\n'");
    let want = format!(
        "# Kubernetes-managed hosts file.\n\
             127.0.0.1\tlocalhost\n\
             ::1\tlocalhost ip6-localhost ip6-loopback\n\
             fe00::0\tip6-localnet\n\
             fe00::0\tip6-mcastprefix\n\
             fe00::1\tip6-allnodes\n\
             fe00::2\tip6-allrouters\n\
             {ip}\tweb.nginx.default.svc.cluster.local\tweb\n\
             \n\
             # Entries added by HostAliases.\n\
             123.45.67.89\tfoo.remote\tbar.remote\n\
             10.1.2.3\tbaz\n"
    );
    let od = |text: &str| {
        text.replace(' ', "")
            .replace('\t', "\\t")
            .replace('\n', "\\n")
    };
    assert_eq!(hosts.trim_end(), od(&want), "{want}");
    assert_eq!(
        exec(&node, "named-own", "cat /etc/hosts").trim_end(),
        "# the container's own hosts file",
        "a container's own /etc/hosts mount wins"
    );
    assert_eq!(
        exec(&node, "named-app", "hostname").trim(),
        "web.nginx.default.svc.cluster.local"
    );
    assert_eq!(
        exec(
            &node,
            "named-app",
            "cat /proc/sys/net/ipv4/ip_local_port_range"
        )
        .trim(),
        "1024\t50000"
    );
    assert_eq!(
        exec(&node, "named-app", "cat /proc/sys/kernel/msgmax").trim(),
        "12345"
    );

    running(&pods, "hostnet").await;
    let hosts = exec(&node, "hostnet-app", "cat /etc/hosts");
    assert!(
        hosts.starts_with("# Kubernetes-managed hosts file (host network).\n")
            && hosts
                .trim_end()
                .ends_with("\n# Entries added by HostAliases.\n10.9.9.9\ton-host"),
        "{hosts}"
    );

    let rejected = wait_for("forbidden rejected", 60, || async {
        let st = pods.get("forbidden").await.ok()?.status?;
        (st.phase.as_deref() == Some("Failed")).then_some(st)
    })
    .await;
    assert_eq!(rejected.reason.as_deref(), Some("SysctlForbidden"));
    assert_eq!(
        rejected.message.as_deref(),
        Some("Pod was rejected: forbidden sysctl: \"kernel.sem\" not allowlisted")
    );
    let sandboxes = node
        .runtime
        .crictl(&["pods", "-q", "--name", "^forbidden$"])
        .expect("crictl pods");
    assert!(
        sandboxes.stdout.is_empty(),
        "a rejected pod gets no sandbox"
    );

    let message = wait_for("longname refused", 60, || async {
        let st = pods.get("longname").await.ok()?.status?;
        let w = st.container_statuses?.first()?.state.clone()?.waiting?;
        w.message.filter(|m| m.contains("too long"))
    })
    .await;
    let fqdn = format!("{}.nginx.default.svc.cluster.local", "h".repeat(40));
    assert_eq!(
        message,
        format!(
            "Failed to create pod sandbox: failed to construct FQDN from pod hostname and \
             cluster domain, FQDN {fqdn} is too long (64 characters is the max, {} characters \
             requested)",
            fqdn.len()
        )
    );

    // Ephemeral containers, added to the running pod through the `ephemeralcontainers`
    // subresource: a debugger that runs and takes execs, and a tracer that targets
    // `named-app` and so sees its processes (its PID 1 is the target's shell). Both are
    // reported in `ephemeralContainerStatuses`, neither is restarted when it exits, and the
    // pod stays Running and Ready throughout.
    let add_ephemeral = |containers: serde_json::Value| {
        let pods = pods.clone();
        async move {
            let patch = serde_json::json!({ "spec": { "ephemeralContainers": containers } });
            pods.patch_subresource(
                "ephemeralcontainers",
                "named",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Strategic(&patch),
            )
            .await
            .expect("add ephemeral containers");
        }
    };
    add_ephemeral(serde_json::json!([{
        "name": "debugger", "image": image, "stdin": true, "tty": true,
        "command": ["/bin/sh", "-c", "echo polo; sleep 3; exit 3"]
    }]))
    .await;
    let ephemeral = |name: &'static str| {
        let pods = pods.clone();
        async move {
            let st = pods.get("named").await.ok()?.status?;
            st.ephemeral_container_statuses?
                .into_iter()
                .find(|c| c.name == name)
        }
    };
    wait_for("debugger running", 60, || async {
        ephemeral("debugger")
            .await
            .filter(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
    })
    .await;
    assert_eq!(exec(&node, "debugger", "echo marco").trim(), "marco");
    add_ephemeral(serde_json::json!([
        { "name": "debugger", "image": image, "stdin": true, "tty": true,
          "command": ["/bin/sh", "-c", "echo polo; sleep 3; exit 3"] },
        { "name": "tracer", "image": image, "targetContainerName": "named-app",
          "terminationMessagePolicy": "File",
          "command": ["/bin/sh", "-c", "tr '\\0' ' ' < /proc/1/cmdline > /dev/termination-log"] }
    ]))
    .await;
    let tracer = wait_for("tracer done", 60, || async {
        ephemeral("tracer").await?.state?.terminated
    })
    .await;
    assert_eq!(tracer.exit_code, 0, "{tracer:?}");
    assert_eq!(
        tracer.message.as_deref().map(str::trim),
        Some("/bin/sh -c trap 'exit 0' TERM; sleep 3600 & wait"),
        "the tracer does not see its target's processes"
    );
    let debugger = wait_for("debugger exited", 60, || async {
        ephemeral("debugger").await?.state?.terminated
    })
    .await;
    assert_eq!(debugger.exit_code, 3);
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let p = pods.get("named").await.expect("named");
    let st = p.status.expect("status");
    let eph = st.ephemeral_container_statuses.expect("ephemeral statuses");
    assert_eq!(
        eph.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["debugger", "tracer"]
    );
    assert!(
        eph.iter().all(|c| c.restart_count == 0
            && !c.ready
            && c.state.as_ref().is_some_and(|s| s.terminated.is_some())),
        "an ephemeral container was restarted or reported ready: {eph:?}"
    );
    let out = node
        .runtime
        .crictl(&["ps", "-a", "-q", "--name", "^debugger$"])
        .expect("crictl ps");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
    assert_eq!(st.phase.as_deref(), Some("Running"));
    let ready = st.conditions.unwrap_or_default();
    assert!(
        ready
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
        "{ready:?}"
    );

    // Image volumes (strake-runtime; the bed's containerd 1.6 predates image mounts): a
    // many-layer image (an overlay, whiteouts applied) and a one-layer image mounted
    // read-only, and a subPath of one; an image a volume shows cannot be removed meanwhile.
    if kind == RuntimeKind::Strake {
        let multilayer = format!("{}/strake/multilayer:1", registry.open_in_cluster());
        create(
            &pods,
            serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": { "name": "imagevol" },
                "spec": {
                    "nodeName": NODE,
                    "terminationGracePeriodSeconds": 1,
                    "volumes": [
                        { "name": "layers", "image": { "reference": multilayer, "pullPolicy": "IfNotPresent" } },
                        { "name": "one", "image": { "reference": image, "pullPolicy": "Always" } }
                    ],
                    "containers": [{
                        "name": "imagevol-app", "image": image, "command": sleep,
                        "volumeMounts": [
                            { "name": "layers", "mountPath": "/layers" },
                            { "name": "layers", "mountPath": "/sub", "subPath": "data/dir" },
                            { "name": "one", "mountPath": "/one" }
                        ]
                    }]
                }
            }),
        )
        .await;
        running(&pods, "imagevol").await;
        let listing = exec(
            &node,
            "imagevol-app",
            "cd /layers/data && ls -A . opaque | tr '\\n' ' '",
        );
        assert_eq!(
            listing.split_whitespace().collect::<Vec<_>>().join(" "),
            ".: dir kept.txt link opaque opaque: new.txt",
            "the image's merged layers"
        );
        let file = exec(&node, "imagevol-app", "cat /sub/file.txt");
        assert!(!file.trim().is_empty(), "the subPath's file");
        assert!(exec(&node, "imagevol-app", "ls /one/bin").contains("busybox"));
        let denied = exec(
            &node,
            "imagevol-app",
            "touch /layers/x 2>&1; touch /one/x 2>&1; touch /sub/x 2>&1; true",
        );
        assert_eq!(
            denied.matches("Read-only file system").count(),
            3,
            "{denied}"
        );
        let rmi = node.runtime.crictl(&["rmi", &multilayer]);
        assert!(rmi.is_err(), "an image shown by a volume was removed");
    }

    // shareProcessNamespace: one PID namespace for the pod, whose PID 1 is the sandbox's
    // pause process; each container sees the others' processes.
    create(
        &pods,
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "shared" },
            "spec": {
                "nodeName": NODE,
                "terminationGracePeriodSeconds": 1,
                "shareProcessNamespace": true,
                "containers": [
                    { "name": "shared-a", "image": image, "command": ["/bin/sh", "-c", "exec sleep 3601"] },
                    { "name": "shared-b", "image": image, "command": sleep }
                ]
            }
        }),
    )
    .await;
    wait_for("shared running", 120, || async {
        let p = pods.get("shared").await.ok()?;
        let st = p.status.clone()?;
        (st.phase.as_deref() == Some("Running")
            && st
                .container_statuses?
                .iter()
                .all(|c| c.state.as_ref().is_some_and(|s| s.running.is_some())))
        .then_some(())
    })
    .await;
    // PID 1 is the sandbox's (strake-pause; on containerd the bed's pause image's shell).
    let init = exec(&node, "shared-b", "tr '\\0' ' ' < /proc/1/cmdline");
    assert!(
        !init.contains("sleep 3601") && !init.contains("TERM; sleep 3600"),
        "PID 1 of a shared pod is one of its containers: {init:?}"
    );
    let all = exec(&node, "shared-b", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '");
    assert!(
        all.contains("sleep 3601"),
        "shared-a's process unseen from shared-b: {all:?}"
    );
    // Without it, a container is its own PID 1 and sees nothing of the others.
    let alone = exec(&node, "named-app", "tr '\\0' ' ' < /proc/1/cmdline");
    assert!(alone.starts_with("/bin/sh -c trap"), "{alone:?}");

    // activeDeadlineSeconds set on a running pod (the spec update upstream allows): once the
    // pod has been active that long it fails with DeadlineExceeded, its container is stopped
    // and its sandbox with it, and nothing starts again.
    create(
        &pods,
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "deadline" },
            "spec": {
                "nodeName": NODE,
                "terminationGracePeriodSeconds": 2,
                "containers": [{ "name": "deadline", "image": image, "command": sleep }]
            }
        }),
    )
    .await;
    running(&pods, "deadline").await;
    let patch = serde_json::json!({ "spec": { "activeDeadlineSeconds": 5 } });
    pods.patch(
        "deadline",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Strategic(&patch),
    )
    .await
    .expect("set activeDeadlineSeconds");
    let st = wait_for("deadline exceeded", 60, || async {
        let st = pods.get("deadline").await.ok()?.status?;
        (st.phase.as_deref() == Some("Failed")).then_some(st)
    })
    .await;
    assert_eq!(st.reason.as_deref(), Some("DeadlineExceeded"));
    assert_eq!(
        st.message.as_deref(),
        Some("Pod was active on the node longer than the specified deadline")
    );
    let stopped = |args: &[&str]| {
        let out = node.runtime.crictl(args).expect("crictl");
        String::from_utf8_lossy(&out.stdout).trim().is_empty()
    };
    wait_for("deadline pod stopped", 30, || async {
        (stopped(&["ps", "-q", "--name", "^deadline$", "--state", "running"])
            && stopped(&["pods", "-q", "--name", "^deadline$", "--state", "ready"]))
        .then_some(())
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let out = node
        .runtime
        .crictl(&["ps", "-a", "-q", "--name", "^deadline$"])
        .expect("crictl ps");
    let instances = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(instances, 1, "the ended pod's container was started again");
    let st = pods
        .get("deadline")
        .await
        .expect("pod")
        .status
        .expect("status");
    assert_eq!(st.phase.as_deref(), Some("Failed"));
    drop(node);
}
