//! QoS and pod cgroups on this machine's real (v1) hierarchies, on strake-runtime and on
//! containerd: `kubepods` held to the node's allocatable (capacity less the reservations), one
//! cgroup per pod under its QoS class's with the values upstream's kubelet sets (shares from
//! requests, quota and memory limit where upstream sets them, `podPidsLimit`), the pod's
//! containers below it, and the pod's cgroup gone once the pod is deleted; an in-place resize
//! reaching the container's and the pod's cgroups (and one beyond the node left pending). All
//! of it below the test's own cgroup parent (the kubelet's relative `cgroupRoot`).

use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};

mod common;
use common::{Cluster, RuntimeKind, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_and_pod_cgroups_hold_upstreams_values_on_strake_runtime() {
    scenario("strake-cgroups-0", RuntimeKind::Strake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_and_pod_cgroups_hold_upstreams_values_on_containerd() {
    scenario("strake-cgroups-1", RuntimeKind::Containerd).await;
}

fn dir(root: &str, path: &str, controller: &str) -> PathBuf {
    common::cgroup_dir(root, path, controller)
}

fn read(root: &str, path: &str, controller: &str, file: &str) -> String {
    let p = dir(root, path, controller).join(file);
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
        .trim()
        .to_string()
}

async fn scenario(node: &str, kind: RuntimeKind) {
    // kubeReserved is enforced on a cgroup of the test's own (made before the kubelet starts,
    // as upstream's kubelet wants it to exist), named relative to the kubelet's own cgroup.
    let reserved = strake_integration::cgroup::CgroupParent::new();
    for location in reserved.locations() {
        std::fs::create_dir_all(&location).expect("kube-reserved cgroup");
    }
    let mut config = format!(
        "podPidsLimit: 256\nkubeReserved: {{memory: 100Mi}}\n\
         enforceNodeAllocatable: [pods, kube-reserved]\nkubeReservedCgroup: {}\n",
        reserved.name()
    );
    if kind == RuntimeKind::Strake {
        // The runtime reports cgroupfs in RuntimeConfig; the kubelet follows it over its own
        // configuration, as upstream's (with systemd it would make no pod cgroup here).
        config.push_str("cgroupDriver: systemd\n");
    }
    let cluster = Cluster::start_with(node, kind, &config).await;
    let root = cluster.node.runtime.cgroup_parent().to_string();
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let sleep = serde_json::json!(["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]);
    let resources = |requests: serde_json::Value, limits: serde_json::Value| serde_json::json!({ "requests": requests, "limits": limits });
    let specs = [
        (
            "guaranteed",
            serde_json::json!([{ "name": "app", "image": cluster.busybox(), "command": sleep,
                "resources": resources(
                    serde_json::json!({ "cpu": "500m", "memory": "64Mi" }),
                    serde_json::json!({ "cpu": "500m", "memory": "64Mi" })) }]),
        ),
        (
            "burstable",
            serde_json::json!([
                { "name": "app", "image": cluster.busybox(), "command": sleep,
                  "resources": resources(serde_json::json!({ "cpu": "100m" }),
                                         serde_json::json!({ "memory": "32Mi" })) },
                { "name": "other", "image": cluster.busybox(), "command": sleep,
                  "resizePolicy": [{ "resourceName": "memory", "restartPolicy": "RestartContainer" }] }
            ]),
        ),
        (
            "besteffort",
            serde_json::json!([{ "name": "app", "image": cluster.busybox(), "command": sleep }]),
        ),
    ];
    let mut uids = Vec::new();
    for (name, containers) in &specs {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name },
            "spec": { "nodeName": node, "terminationGracePeriodSeconds": 1,
                      "containers": containers }
        }))
        .expect("pod");
        let created = wait_for("pod created", 60, || async {
            pods.create(&PostParams::default(), &pod).await.ok()
        })
        .await;
        uids.push(created.metadata.uid.expect("uid"));
    }
    for (name, _) in &specs {
        wait_for(&format!("{name} running"), 120, || async {
            let p = pods.get(name).await.ok()?;
            (p.status?.phase.as_deref() == Some("Running")).then_some(())
        })
        .await;
    }

    // kubepods: allocatable before eviction thresholds (capacity less kubeReserved).
    let n = Api::<Node>::all(cluster.client.clone())
        .get(node)
        .await
        .expect("node");
    let capacity_ki: u64 = n.status.and_then(|s| s.capacity).expect("capacity")["memory"]
        .0
        .trim_end_matches("Ki")
        .parse()
        .expect("capacity in Ki");
    let want = capacity_ki * 1024 - (100 << 20);
    let kubepods: u64 = read(&root, "kubepods", "memory", "memory.limit_in_bytes")
        .parse()
        .expect("number");
    assert!(
        kubepods <= want && want - kubepods < 4096,
        "kubepods memory limit {kubepods}, allocatable {want}"
    );
    // The reservation holds its own cgroup to it.
    let reserved_memory = reserved
        .locations()
        .into_iter()
        .find(|l| l.starts_with("/sys/fs/cgroup/memory"))
        .expect("memory hierarchy")
        .join("memory.limit_in_bytes");
    assert_eq!(
        std::fs::read_to_string(&reserved_memory)
            .expect("kube-reserved limit")
            .trim(),
        (100u64 << 20).to_string()
    );
    assert_eq!(read(&root, "kubepods/besteffort", "cpu", "cpu.shares"), "2");
    // The only Burstable pod requests 100m.
    assert_eq!(
        read(&root, "kubepods/burstable", "cpu", "cpu.shares"),
        "102"
    );

    // Guaranteed: shares, quota, memory limit and pids limit.
    let g = format!("kubepods/pod{}", uids[0]);
    assert_eq!(read(&root, &g, "cpu", "cpu.shares"), "512");
    assert_eq!(read(&root, &g, "cpu", "cpu.cfs_quota_us"), "50000");
    assert_eq!(
        read(&root, &g, "memory", "memory.limit_in_bytes"),
        (64u64 << 20).to_string()
    );
    assert_eq!(read(&root, &g, "pids", "pids.max"), "256");
    // Burstable with a container without limits: shares only.
    let b = format!("kubepods/burstable/pod{}", uids[1]);
    assert_eq!(read(&root, &b, "cpu", "cpu.shares"), "102");
    assert_eq!(read(&root, &b, "cpu", "cpu.cfs_quota_us"), "-1");
    let unlimited: u64 = read(&root, &b, "memory", "memory.limit_in_bytes")
        .parse()
        .expect("number");
    assert!(unlimited > 1 << 40, "no pod memory limit: {unlimited}");
    // BestEffort: the minimum shares.
    let e = format!("kubepods/besteffort/pod{}", uids[2]);
    assert_eq!(read(&root, &e, "cpu", "cpu.shares"), "2");
    // The containers' cgroups are below their pod's.
    let children = std::fs::read_dir(dir(&root, &g, "memory"))
        .expect("pod cgroup")
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .count();
    assert!(children >= 1, "no container cgroup below {g}");

    // Everything the pod runs is charged to it: the sandbox's own process too (strake-runtime's
    // pause process, containerd's pause container).
    for (name, uid) in specs.iter().map(|(n, _)| *n).zip(&uids) {
        let id = ready_sandbox(&cluster, name);
        let v: serde_json::Value =
            serde_json::from_str(&crictl_out(&cluster, &["inspectp", &id])).expect("inspectp");
        let info = &v["info"];
        let pid = info["pause_pid"]
            .as_u64()
            .or_else(|| info["pid"].as_u64())
            .unwrap_or_else(|| panic!("no sandbox process for {name}: {info}"));
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
        let memory = cgroups
            .lines()
            .find(|l| {
                l.split(':')
                    .nth(1)
                    .is_some_and(|c| c.split(',').any(|c| c == "memory"))
            })
            .expect("memory line");
        assert!(
            memory.contains(&format!("/pod{uid}")),
            "{name}'s sandbox process is outside its pod cgroup: {memory}"
        );
    }

    resize(&cluster, &pods, &root, &b).await;

    for (name, _) in &specs {
        // The resize scenario deleted the Guaranteed pod already.
        let _ = pods.delete(name, &Default::default()).await;
    }
    for (name, _) in &specs {
        wait_for(&format!("{name} gone"), 120, || async {
            pods.get_opt(name).await.ok()?.is_none().then_some(())
        })
        .await;
    }
    for path in [&g, &b, &e] {
        wait_for(&format!("{path} removed"), 30, || async {
            (!dir(&root, path, "memory").exists()).then_some(())
        })
        .await;
    }
}

/// The first line of `file` as container `container` of pod `pod` reads it.
/// The trimmed standard output of `crictl args` on the cluster's node.
fn crictl_out(cluster: &Cluster, args: &[&str]) -> String {
    let out = cluster.node.runtime.crictl(args).expect("crictl");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The ID of pod `pod`'s ready sandbox.
fn ready_sandbox(cluster: &Cluster, pod: &str) -> String {
    let name = format!("^{pod}$");
    crictl_out(
        cluster,
        &["pods", "-q", "--name", &name, "--state", "ready"],
    )
}

/// The first line of `file` as container `container` of pod `pod` reads it.
fn in_container(cluster: &Cluster, pod: &str, container: &str, file: &str) -> String {
    let crictl = |args: &[&str]| crictl_out(cluster, args);
    let sandbox = ready_sandbox(cluster, pod);
    let id = crictl(&[
        "ps",
        "-q",
        "--pod",
        &sandbox,
        "--name",
        &format!("^{container}$"),
        "--state",
        "running",
    ]);
    assert!(!id.is_empty(), "no running {pod}/{container}");
    crictl(&["exec", "--sync", &id, "head", "-n", "1", file])
}

/// In-place resize of the Burstable pod through the `resize` subresource: `app` grows its
/// CPU request, gains a CPU limit and a larger memory limit, all while it runs; `other` gains
/// a memory request, which its `resizePolicy` says needs a restart. Then a resize the node
/// has no room for beside another pod waits as Deferred until that pod is gone.
async fn resize(cluster: &Cluster, pods: &Api<Pod>, root: &str, pod_cgroup: &str) {
    let patch = |containers: serde_json::Value| {
        let pods = pods.clone();
        async move {
            let patch = serde_json::json!({ "spec": { "containers": containers } });
            pods.patch_subresource(
                "resize",
                "burstable",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Strategic(&patch),
            )
            .await
            .expect("resize")
        }
    };
    let app = serde_json::json!({
        "requests": { "cpu": "300m" }, "limits": { "cpu": "500m", "memory": "48Mi" }
    });
    let other = serde_json::json!({ "requests": { "memory": "16Mi" } });
    let resized = patch(serde_json::json!([
        { "name": "app", "resources": app },
        { "name": "other", "resources": other }
    ]))
    .await;
    let generation = resized.metadata.generation.expect("generation");
    let resource_conditions = |p: &Pod| {
        p.status
            .iter()
            .flat_map(|s| s.conditions.iter().flatten())
            .filter(|c| c.type_.starts_with("PodResize"))
            .map(|c| format!("{}={:?}", c.type_, c.reason))
            .collect::<Vec<_>>()
    };
    let done = wait_for("resize actuated", 90, || async {
        let p = pods.get("burstable").await.ok()?;
        let st = p.status.clone()?;
        let statuses = st.container_statuses.clone()?;
        let actuated = st.observed_generation >= Some(generation)
            && resource_conditions(&p).is_empty()
            && statuses.iter().all(|c| {
                c.state.as_ref().is_some_and(|s| s.running.is_some())
                    && c.resources.as_ref().and_then(|r| r.requests.as_ref())
                        == c.allocated_resources.as_ref()
            })
            && statuses
                .iter()
                .any(|c| c.name == "other" && c.restart_count == 1);
        actuated.then_some(p)
    })
    .await;
    // The status reports what the spec now asks (the API server defaulted app's memory
    // request to its first limit; the merge kept it).
    let spec = done.spec.clone().expect("spec");
    let asked = |name: &str| {
        spec.containers
            .iter()
            .find(|c| c.name == name)
            .and_then(|c| c.resources.clone())
            .expect(name)
    };
    let statuses = done
        .status
        .expect("status")
        .container_statuses
        .expect("statuses");
    let get = |name: &str| {
        statuses
            .iter()
            .find(|c| c.name == name)
            .expect(name)
            .clone()
    };
    let (a, o) = (get("app"), get("other"));
    let want = asked("app");
    assert_eq!(
        want.limits.as_ref().map(|l| l["cpu"].0.as_str()),
        Some("500m"),
        "the resize reached the spec"
    );
    assert_eq!(a.resources.as_ref(), Some(&want), "app's status resources");
    assert_eq!(a.allocated_resources, want.requests);
    assert_eq!(
        a.restart_count, 0,
        "app was restarted for a resize that needs none"
    );
    assert_eq!(
        o.resources.as_ref(),
        Some(&asked("other")),
        "other's status resources"
    );
    // The values reached app's own cgroup (read from inside, as the conformance specs do)
    // and the pod's: shares from 300m, the new quota and memory limit.
    assert_eq!(
        in_container(cluster, "burstable", "app", "/sys/fs/cgroup/cpu/cpu.shares"),
        "307"
    );
    assert_eq!(
        in_container(
            cluster,
            "burstable",
            "app",
            "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"
        ),
        "50000"
    );
    assert_eq!(
        in_container(
            cluster,
            "burstable",
            "app",
            "/sys/fs/cgroup/memory/memory.limit_in_bytes"
        ),
        (48u64 << 20).to_string()
    );
    assert_eq!(read(root, pod_cgroup, "cpu", "cpu.shares"), "307");
    assert_eq!(read(root, "kubepods/burstable", "cpu", "cpu.shares"), "307");

    // More than the node has left beside the Guaranteed pod (its 500m of the node's 2000m;
    // the API server refuses outright only what exceeds the node's allocatable): pending as
    // Deferred, the allocation and the container unchanged. Once the Guaranteed pod is gone,
    // the resize is decided again and actuated.
    let resized = patch(serde_json::json!([
        { "name": "app", "resources": { "requests": { "cpu": "1800m" }, "limits": { "cpu": "2", "memory": "48Mi" } } }
    ]))
    .await;
    let generation = resized.metadata.generation.expect("generation");
    let p = wait_for("resize pending", 60, || async {
        let p = pods.get("burstable").await.ok()?;
        (p.status.as_ref()?.observed_generation >= Some(generation)
            && !resource_conditions(&p).is_empty())
        .then_some(p)
    })
    .await;
    let st = p.status.expect("status");
    let pending = st
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodResizePending")
        .expect("PodResizePending");
    assert_eq!(pending.reason.as_deref(), Some("Deferred"));
    assert_eq!(
        pending.message.as_deref(),
        Some("Node didn't have enough resource: cpu, requested: 1800, used: 500, capacity: 2000")
    );
    let a = st
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == "app")
        .expect("app")
        .clone();
    assert_eq!(
        a.allocated_resources.and_then(|r| r.get("cpu").cloned()),
        Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
            "300m".into()
        ))
    );
    assert_eq!(
        in_container(cluster, "burstable", "app", "/sys/fs/cgroup/cpu/cpu.shares"),
        "307"
    );
    pods.delete("guaranteed", &Default::default())
        .await
        .expect("delete guaranteed");
    wait_for("deferred resize actuated", 90, || async {
        let p = pods.get("burstable").await.ok()?;
        (resource_conditions(&p).is_empty()
            && in_container(cluster, "burstable", "app", "/sys/fs/cgroup/cpu/cpu.shares") == "1843")
            .then_some(())
    })
    .await;
    assert_eq!(
        in_container(
            cluster,
            "burstable",
            "app",
            "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"
        ),
        "200000"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_past_its_memory_limit_is_oom_killed_under_its_pod_cgroup_on_strake_runtime() {
    oom("strake-oom-0", RuntimeKind::Strake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_past_its_memory_limit_is_oom_killed_under_its_pod_cgroup_on_containerd() {
    oom("strake-oom-1", RuntimeKind::Containerd).await;
}

/// A Guaranteed pod limited to 64 MiB (so its pod cgroup is too) that allocates 200 MiB ends
/// `OOMKilled` with exit code 137.
async fn oom(node: &str, kind: RuntimeKind) {
    let cluster = Cluster::start(node, kind).await;
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let limits = serde_json::json!({ "cpu": "200m", "memory": "64Mi" });
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "hungry" },
        "spec": {
            "nodeName": node,
            "restartPolicy": "Never",
            "containers": [{
                "name": "app", "image": cluster.busybox(),
                // dd's 200 MiB block is one buffer, filled (touched) by the read.
                "command": ["dd", "if=/dev/zero", "of=/dev/null", "bs=200M", "count=1"],
                "resources": { "requests": limits, "limits": limits }
            }]
        }
    }))
    .expect("pod");
    wait_for("pod created", 60, || async {
        pods.create(&PostParams::default(), &pod).await.ok()
    })
    .await;
    let terminated = wait_for("the container terminated", 120, || async {
        let p = pods.get("hungry").await.ok()?;
        let c = p.status?.container_statuses?.into_iter().next()?;
        c.state?.terminated
    })
    .await;
    assert_eq!(
        (terminated.reason.as_deref(), terminated.exit_code),
        (Some("OOMKilled"), 137),
        "{terminated:?}"
    );
    let p = pods.get("hungry").await.expect("pod");
    assert_eq!(p.status.and_then(|s| s.phase).as_deref(), Some("Failed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cgroups_per_qos_no_qos_or_pod_cgroups_are_made() {
    let node = "strake-no-qos-0";
    let cluster = Cluster::start_with(node, RuntimeKind::Strake, "cgroupsPerQOS: false\n").await;
    let root = cluster.node.runtime.cgroup_parent().to_string();
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "plain" },
        "spec": { "nodeName": node, "terminationGracePeriodSeconds": 1, "containers": [{
            "name": "app", "image": cluster.busybox(),
            "command": ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"] }] }
    }))
    .expect("pod");
    wait_for("pod created", 60, || async {
        pods.create(&PostParams::default(), &pod).await.ok()
    })
    .await;
    wait_for("pod running", 120, || async {
        let p = pods.get("plain").await.ok()?;
        (p.status?.phase.as_deref() == Some("Running")).then_some(())
    })
    .await;
    assert!(
        !dir(&root, "kubepods", "memory").exists(),
        "no kubepods with cgroupsPerQOS: false"
    );
    // The container's cgroup is directly below the cgroup root.
    let below_root = std::fs::read_dir(dir(&root, ".", "memory"))
        .expect("cgroup root")
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .count();
    assert!(below_root >= 1, "no container cgroup below the root");
}
