//! Node resources on a real node: allocatable leaves out the reservations and the hard
//! eviction thresholds, and container logs are rotated at `containerLogMaxSize`, keeping at
//! most `containerLogMaxFiles` files while `kubectl logs --tail` still reads the newest line;
//! pods that do not fit the Node (resources against allocatable less what admitted pods
//! request, node selector, host ports) are refused at admission and never started; image GC
//! removes unused images once the image filesystem passes its threshold, never one in use;
//! the eviction manager evicts a pod past its emptyDir `sizeLimit`, and under memory pressure
//! reports `MemoryPressure`, evicts the BestEffort pod before the Burstable one and refuses new
//! BestEffort pods.

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};

mod common;
use common::{Cluster, RuntimeKind, wait_for};

const NODE: &str = "strake-node-resources-0";

fn milli(q: &str) -> i128 {
    strake_kubelet::resources::parse_milli(q).expect("quantity")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocatable_is_reserved_and_logs_rotate_within_their_bound() {
    let cluster = Cluster::start_with(
        NODE,
        RuntimeKind::Strake,
        "kubeReserved: {cpu: 100m, memory: 64Mi}\nsystemReserved: {memory: 32Mi}\n\
         evictionHard: {memory.available: 50Mi, nodefs.available: 1%}\n\
         containerLogMaxSize: 1Mi\ncontainerLogMaxFiles: 3\ncontainerLogMonitorInterval: 1s\n",
    )
    .await;
    let (client, node) = (&cluster.client, &cluster.node);

    // Allocatable = capacity - kubeReserved - systemReserved - evictionHard.
    let nodes: Api<Node> = Api::all(client.clone());
    let status = nodes.get(NODE).await.expect("node").status.expect("status");
    let (cap, alloc) = (
        status.capacity.expect("capacity"),
        status.allocatable.expect("allocatable"),
    );
    assert_eq!(milli(&alloc["cpu"].0), milli(&cap["cpu"].0) - 100);
    assert_eq!(
        milli(&alloc["memory"].0),
        milli(&cap["memory"].0) - ((64 + 32 + 50) << 20) * 1000
    );
    let storage = milli(&cap["ephemeral-storage"].0) / 1000;
    let storage_alloc = milli(&alloc["ephemeral-storage"].0) / 1000;
    assert_eq!(storage_alloc, storage - (storage as f64 * 0.01) as i128);

    // A container writing about 2 MB a second, checked every second against 1 MiB.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "chatty" },
        "spec": {
            "nodeName": NODE,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "app",
                "image": cluster.busybox(),
                "command": ["/bin/sh", "-c",
                    "trap 'exit 0' TERM; while true; do \
                     yes 0123456789abcdefghij | head -n 10000; echo last; sleep 0.1; done"],
            }]
        }
    }))
    .expect("pod");
    wait_for("pod created", 60, || async {
        pods.create(&PostParams::default(), &pod).await.ok()
    })
    .await;
    let uid = wait_for("pod uid", 30, || async {
        pods.get("chatty").await.ok().and_then(|p| p.metadata.uid)
    })
    .await;
    let dir = node
        .dir
        .path()
        .join("pod-logs")
        .join(format!("default_chatty_{uid}"))
        .join("app");
    let files = || log_files(&dir);
    // While the container keeps writing, rotation goes on and older files are removed: at no
    // time are there more than containerLogMaxFiles logs (a `.tmp` is a compression under way),
    // yet more rotated files come and go than that. Sizes depend on how often the monitor gets
    // to run on a busy machine, so they are not asserted.
    let mut seen = std::collections::BTreeSet::new();
    wait_for("rotated logs to come and go", 180, || {
        let f = files();
        let logs: Vec<&String> = f
            .iter()
            .map(|(n, _)| n)
            .filter(|n| !n.ends_with(".tmp"))
            .collect();
        assert!(
            logs.len() <= 3,
            "more than containerLogMaxFiles files: {f:?}"
        );
        for n in &logs {
            if *n != "0.log" {
                seen.insert(n.trim_end_matches(".gz").to_string());
            }
        }
        let done = seen.len() >= 4 && logs.iter().any(|n| n.ends_with(".gz"));
        async move { done.then_some(()) }
    })
    .await;
    // `kubectl logs --tail=1` through the kubelet reads the newest line of the live file.
    let logs = wait_for("a last line", 30, || async {
        let bin = strake_integration::paths::kubernetes_bin("kubectl").ok()?;
        let out = tokio::process::Command::new(bin)
            .arg(format!(
                "--kubeconfig={}",
                cluster.cp.kubeconfig().display()
            ))
            .args(["logs", "chatty", "--tail=1"])
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success() && !text.is_empty()).then_some(text)
    })
    .await;
    assert_eq!(logs.lines().count(), 1, "{logs:?}");
    let last = logs.trim();
    assert!(last == "0123456789abcdefghij" || last == "last", "{last:?}");
}

/// Starts pod `name` whose container writes `bytes` bytes of 1000-byte log lines as fast as
/// it can, then `done` and sleeps; returns the directory of its container's logs.
async fn writer(cluster: &Cluster, name: &str, bytes: u64) -> std::path::PathBuf {
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let line = "x".repeat(999);
    let lines = bytes / 1000;
    // The pause before `done` lets the log monitor (every second in these tests) rotate what
    // the flood left over its bound: `done` then lands in the live file and stays there, and
    // `--tail=1`, which reads the live file alone as upstream's does, finds it.
    let script = format!(
        "trap 'exit 0' TERM; yes {line} | head -n {lines}; sleep 5; echo done; sleep 3600 & wait"
    );
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name },
        "spec": {
            "nodeName": NODE, "terminationGracePeriodSeconds": 1,
            "containers": [{ "name": "app", "image": cluster.busybox(),
                             "command": ["/bin/sh", "-c", script] }]
        }
    }))
    .expect("pod");
    let created = wait_for("pod created", 60, || async {
        pods.create(&PostParams::default(), &pod).await.ok()
    })
    .await;
    let uid = created.metadata.uid.expect("uid");
    cluster
        .node
        .dir
        .path()
        .join("pod-logs")
        .join(format!("default_{name}_{uid}"))
        .join("app")
}

/// The files of a log directory with their sizes.
fn log_files(dir: &std::path::Path) -> Vec<(String, u64)> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| {
                    let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                    (e.file_name().to_string_lossy().into_owned(), len)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `kubectl logs <pod> --tail=1` through the API server and the kubelet.
async fn tail_one(cluster: &Cluster, pod: &str) -> Option<String> {
    let bin = strake_integration::paths::kubernetes_bin("kubectl").ok()?;
    let out = tokio::process::Command::new(bin)
        .arg(format!(
            "--kubeconfig={}",
            cluster.cp.kubeconfig().display()
        ))
        .args(["logs", pod, "--tail=1"])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether the log file `path` ends with the line `done`.
fn ends_with_done(path: &std::path::Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    let mut end = Vec::new();
    // The last 64 bytes, or the whole file when it is shorter (a live file rotated just
    // before `done` holds that line alone).
    let len = f.metadata().map_or(0, |m| m.len());
    f.seek(SeekFrom::Start(len.saturating_sub(64)))
        .and_then(|_| f.read_to_end(&mut end))
        .is_ok_and(|_| end.ends_with(b" stdout F done\n"))
}

/// A figure of `/proc/<pid>/status`, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix(" kB")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {field} for {pid}"))
}

const TWO_GIB: u64 = 2 << 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_writing_2gib_of_logs_keeps_at_most_max_size_times_max_files() {
    // Upstream's size and count; the monitor every second (upstream: 10 s).
    let cluster = Cluster::start_with(
        NODE,
        RuntimeKind::Strake,
        "containerLogMaxSize: 10Mi\ncontainerLogMaxFiles: 5\ncontainerLogMonitorInterval: 1s\n",
    )
    .await;
    let dir = writer(&cluster, "gigabytes", TWO_GIB).await;
    // Between two checks the live file grows as fast as the container writes, so only once
    // the writing is over is the bound asserted; the largest total seen on the way is told.
    let mut peak = 0u64;
    wait_for("2 GiB written", 600, || {
        let files = log_files(&dir);
        peak = peak.max(files.iter().map(|(_, l)| l).sum());
        let done = ends_with_done(&dir.join("0.log"));
        async move { done.then_some(()) }
    })
    .await;
    eprintln!(
        "largest total of the log files while writing: {} MiB",
        peak >> 20
    );
    let bound = 5 * (10u64 << 20);
    let files = wait_for("the logs within their bound", 60, || {
        let files = log_files(&dir);
        let total: u64 = files.iter().map(|(_, l)| l).sum();
        let logs = files.iter().filter(|(n, _)| !n.ends_with(".tmp")).count();
        async move { (total <= bound && logs <= 5).then_some(files) }
    })
    .await;
    assert!(
        files.iter().any(|(n, _)| n.ends_with(".gz")),
        "2 GiB written and nothing rotated: {files:?}"
    );
    let tail = wait_for("the last line", 30, || tail_one(&cluster, "gigabytes")).await;
    assert_eq!(tail, "done\n");
    // /stats/summary counts the rotated files in the container's logs, not the live one alone.
    let (used, on_disk) = wait_for("the logs' size in /stats/summary", 60, || async {
        let summary = summary(&cluster).await?;
        let used = summary["pods"]
            .as_array()?
            .iter()
            .find(|p| p["podRef"]["name"] == "gigabytes")?["containers"][0]["logs"]["usedBytes"]
            .as_u64()?;
        let on_disk: u64 = log_files(&dir).iter().map(|(_, l)| l).sum();
        (used == on_disk).then_some((used, on_disk))
    })
    .await;
    let live = log_files(&dir)
        .iter()
        .find(|(n, _)| n == "0.log")
        .map_or(0, |(_, l)| *l);
    assert!(
        used > live,
        "logs {used} bytes, the live file alone {live} (all files {on_disk})"
    );
}

/// The node's `/stats/summary`, through the API server's node proxy.
async fn summary(cluster: &Cluster) -> Option<serde_json::Value> {
    let bin = strake_integration::paths::kubernetes_bin("kubectl").ok()?;
    let out = tokio::process::Command::new(bin)
        .arg(format!(
            "--kubeconfig={}",
            cluster.cp.kubeconfig().display()
        ))
        .args([
            "get",
            "--raw",
            &format!("/api/v1/nodes/{NODE}/proxy/stats/summary"),
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tail_of_a_2gib_log_costs_the_kubelet_under_10mib() {
    // No rotation before 3 GiB: the live file itself is over 2 GiB.
    let cluster = Cluster::start_with(
        NODE,
        RuntimeKind::Strake,
        "containerLogMaxSize: 3Gi\ncontainerLogMonitorInterval: 1s\n",
    )
    .await;
    let dir = writer(&cluster, "gigabytes", TWO_GIB).await;
    wait_for("2 GiB written", 600, || {
        let live = dir.join("0.log");
        let done =
            ends_with_done(&live) && std::fs::metadata(&live).map_or(0, |m| m.len()) > TWO_GIB;
        async move { done.then_some(()) }
    })
    .await;
    let pid = cluster.node.kubelet_pid();
    // Reset the kubelet's peak resident size, then serve the tail a few times.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset peak RSS");
    let before = status_kib(pid, "VmRSS:");
    for _ in 0..3 {
        let tail = wait_for("the last line", 60, || tail_one(&cluster, "gigabytes")).await;
        assert_eq!(tail, "done\n");
    }
    let peak = status_kib(pid, "VmHWM:");
    eprintln!("kubelet RSS {before} KiB before, peak {peak} KiB while serving the tails");
    assert!(
        peak.saturating_sub(before) < 10 << 10,
        "serving --tail=1 of a 2 GiB log cost the kubelet {} KiB",
        peak - before
    );
}

/// The phase, reason and message a pod reports once the kubelet has decided on it.
async fn decided(pods: &Api<Pod>, name: &str) -> (String, String, String) {
    wait_for(&format!("{name} decided"), 90, || async {
        let st = pods.get(name).await.ok()?.status?;
        let phase = st.phase.clone()?;
        (phase != "Pending" || st.container_statuses.is_some()).then(|| {
            (
                phase,
                st.reason.unwrap_or_default(),
                st.message.unwrap_or_default(),
            )
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_that_do_not_fit_the_node_are_refused_at_admission() {
    const ADMIT_NODE: &str = "strake-node-admission-0";
    let mut cluster = Cluster::start_with(ADMIT_NODE, RuntimeKind::Strake, "").await;
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let alloc = nodes
        .get(ADMIT_NODE)
        .await
        .expect("node")
        .status
        .and_then(|s| s.allocatable)
        .expect("allocatable");
    let cpu = milli(&alloc["cpu"].0);
    let pod = |name: &str, spec: serde_json::Value| -> Pod {
        let mut spec = spec;
        spec["nodeName"] = ADMIT_NODE.into();
        spec["terminationGracePeriodSeconds"] = 1.into();
        let c = serde_json::json!({
            "name": "app",
            "image": cluster.busybox(),
            "command": ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"],
        });
        let containers = spec["containers"].as_array().cloned().unwrap_or_default();
        spec["containers"] = if containers.is_empty() {
            serde_json::json!([c])
        } else {
            serde_json::Value::Array(
                containers
                    .into_iter()
                    .map(|mut x| {
                        x["name"] = c["name"].clone();
                        x["image"] = c["image"].clone();
                        x["command"] = c["command"].clone();
                        x
                    })
                    .collect(),
            )
        };
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": { "name": name }, "spec": spec,
        }))
        .expect("pod")
    };
    let create = |p: Pod| {
        let pods = pods.clone();
        async move {
            wait_for("pod created", 60, || async {
                pods.create(&PostParams::default(), &p).await.ok()
            })
            .await;
        }
    };
    // Two thirds of the node's CPU fits; another two thirds does not, given the first.
    let two_thirds = format!("{}m", cpu * 2 / 3);
    let requests = |q: &str| serde_json::json!({ "containers": [{ "resources": { "requests": { "cpu": q } } }] });
    create(pod("fits", requests(&two_thirds))).await;
    wait_for("fits running", 120, || async {
        let p = pods.get("fits").await.ok()?;
        (p.status?.phase.as_deref() == Some("Running")).then_some(())
    })
    .await;
    create(pod("too-big", requests(&two_thirds))).await;
    let (phase, reason, message) = decided(&pods, "too-big").await;
    assert_eq!((phase.as_str(), reason.as_str()), ("Failed", "OutOfcpu"));
    assert_eq!(
        message,
        format!(
            "Pod was rejected: Node didn't have enough resource: cpu, requested: {}, used: {}, capacity: {cpu}",
            cpu * 2 / 3,
            cpu * 2 / 3
        )
    );
    // More memory than the node's allocatable holds at all.
    let memory_ki: u64 = alloc["memory"]
        .0
        .trim_end_matches("Ki")
        .parse()
        .expect("allocatable memory in Ki");
    let over = format!("{}Ki", memory_ki + (1 << 20));
    create(pod(
        "too-much-memory",
        serde_json::json!({ "containers": [{ "resources": { "requests": { "memory": over } } }] }),
    ))
    .await;
    let (phase, reason, message) = decided(&pods, "too-much-memory").await;
    assert_eq!((phase.as_str(), reason.as_str()), ("Failed", "OutOfmemory"));
    assert!(
        message
            .starts_with("Pod was rejected: Node didn't have enough resource: memory, requested: "),
        "{message}"
    );
    // A selector no label of the node matches; a host port an admitted pod holds.
    create(pod(
        "elsewhere",
        serde_json::json!({ "nodeSelector": { "disk": "ssd" } }),
    ))
    .await;
    let (phase, reason, _) = decided(&pods, "elsewhere").await;
    assert_eq!(
        (phase.as_str(), reason.as_str()),
        ("Failed", "NodeAffinity")
    );
    let port = |name: &str| {
        pod(
            name,
            serde_json::json!({ "containers": [{ "ports": [{ "containerPort": 80, "hostPort": 18080 }] }] }),
        )
    };
    // (The kubelet sees pods in the order the API stored them: port-a is admitted first.)
    create(port("port-a")).await;
    create(port("port-b")).await;
    let (phase, reason, _) = decided(&pods, "port-b").await;
    assert_eq!((phase.as_str(), reason.as_str()), ("Failed", "NodePorts"));
    // Refused pods never got a sandbox...
    fn sandboxes(node: &common::KubeletNode, name: &str) -> String {
        let out = node
            .runtime
            .crictl(&["pods", "-q", "--name", &format!("^{name}$")])
            .expect("crictl pods");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
    for name in ["too-big", "too-much-memory", "elsewhere", "port-b"] {
        assert_eq!(sandboxes(&cluster.node, name), "", "{name} has a sandbox");
    }
    // ... nor when room is made and the kubelet restarts: a refused pod is not judged again.
    pods.delete("fits", &Default::default())
        .await
        .expect("delete");
    cluster.node.restart_kubelet().expect("restart kubelet");
    wait_for("fits gone", 60, || async {
        pods.get_opt("fits").await.ok()?.is_none().then_some(())
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    let st = pods
        .get("too-big")
        .await
        .expect("pod")
        .status
        .expect("status");
    assert_eq!(st.phase.as_deref(), Some("Failed"));
    assert_eq!(sandboxes(&cluster.node, "too-big"), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_gc_removes_unused_images_past_the_threshold_and_never_one_in_use_on_strake_runtime()
{
    image_gc(RuntimeKind::Strake, "strake-image-gc-0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_gc_removes_unused_images_past_the_threshold_and_never_one_in_use_on_containerd() {
    image_gc(RuntimeKind::Containerd, "strake-image-gc-1").await;
}

/// The node's images, as `crictl images` lists them.
fn images(node: &common::KubeletNode) -> String {
    let out = node.runtime.crictl(&["images"]).expect("crictl images");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Pulls `strake/http:1`, an image no container of these tests runs, onto the node.
fn pull_unused_image(cluster: &Cluster) {
    let unused = format!("{}/strake/http:1", cluster.registry.open_in_cluster());
    let out = cluster
        .node
        .runtime
        .crictl(&["pull", &unused])
        .expect("crictl pull");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(images(&cluster.node).contains("strake/http"));
}

/// Waits up to 60 s for the kubelet to remove the image [`pull_unused_image`] pulled; gives
/// the listing then. Fails with the listing and the kubelet's image, eviction and reclaim
/// lines.
async fn unused_image_gone(cluster: &Cluster) -> String {
    let mut listing = images(&cluster.node);
    for _ in 0..240 {
        if !listing.contains("strake/http") {
            return listing;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        listing = images(&cluster.node);
    }
    let log = cluster.node.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("image") || l.contains("evict") || l.contains("reclaim"))
        .collect();
    panic!(
        "the unused image is still there:\n{listing}\nkubelet's lines:\n{}",
        lines.join("\n")
    );
}

/// Thresholds low enough that the shared disk is always "full": every unused image goes, the
/// image of a running container stays.
async fn image_gc(kind: RuntimeKind, node: &str) {
    let mut cluster = Cluster::start_with(
        node,
        kind,
        "imageGCHighThresholdPercent: 1\nimageGCLowThresholdPercent: 0\nimageMinimumGCAge: 0s\n",
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "user" },
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "app", "image": cluster.busybox(),
                "command": ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]
            }]
        }
    }))
    .expect("pod");
    wait_for("pod created", 60, || async {
        pods.create(&PostParams::default(), &pod).await.ok()
    })
    .await;
    wait_for("pod running", 120, || async {
        let p = pods.get("user").await.ok()?;
        (p.status?.phase.as_deref() == Some("Running")).then_some(())
    })
    .await;
    pull_unused_image(&cluster);
    // Upstream checks every 5 minutes; this node every second.
    cluster
        .node
        .restart_kubelet_with(&["--image-gc-period=1s"])
        .expect("restart kubelet");
    let listing = unused_image_gone(&cluster).await;
    assert!(
        listing.contains("strake/busybox"),
        "the running container's image stays:\n{listing}"
    );
    assert!(cluster.node.log().contains("removed unused image"));
    let p = pods.get("user").await.expect("pod");
    assert_eq!(p.status.and_then(|s| s.phase).as_deref(), Some("Running"));
}

/// The first of `names` that reached phase Failed, with its status, and the others' phases.
async fn first_failed(
    pods: &Api<Pod>,
    names: &[&str],
) -> (String, k8s_openapi::api::core::v1::PodStatus, Vec<String>) {
    wait_for("a pod evicted", 120, || async {
        let mut failed = None;
        let mut others = Vec::new();
        for n in names {
            let st = pods.get(n).await.ok()?.status?;
            if st.phase.as_deref() == Some("Failed") && failed.is_none() {
                failed = Some((n.to_string(), st));
            } else {
                others.push(st.phase.unwrap_or_default());
            }
        }
        failed.map(|(n, st)| (n, st, others))
    })
    .await
}

fn disruption(st: &k8s_openapi::api::core::v1::PodStatus) -> Option<String> {
    st.conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "DisruptionTarget" && c.status == "True")
        .and_then(|c| c.reason.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pressure_evicts_the_best_effort_pod_first_and_an_emptydir_past_its_limit_its_pod() {
    const EVICT_NODE: &str = "strake-node-eviction-0";
    // Image GC by thresholds off (a high threshold of 100 %), so that only disk pressure
    // removes images here.
    let mut cluster = Cluster::start_with(
        EVICT_NODE,
        RuntimeKind::Strake,
        "imageGCHighThresholdPercent: 100\nimageGCLowThresholdPercent: 99\n",
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let sleep = serde_json::json!(["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]);
    let image = cluster.busybox();
    let pod = |name: &str, resources: serde_json::Value, extra: serde_json::Value| -> Pod {
        let mut spec = serde_json::json!({
            "nodeName": EVICT_NODE,
            "terminationGracePeriodSeconds": 30,
            "containers": [{ "name": "app", "image": image,
                             "command": sleep, "resources": resources }]
        });
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": { "name": name }, "spec": spec
        }))
        .expect("pod")
    };
    let best_effort = pod("best-effort", serde_json::json!({}), serde_json::json!({}));
    let burstable = pod(
        "burstable",
        serde_json::json!({ "requests": { "memory": "1Gi", "cpu": "10m" } }),
        serde_json::json!({}),
    );
    // An emptyDir with a 1Mi sizeLimit that its container fills with 4 MiB.
    let mut scratch = pod(
        "scratch",
        serde_json::json!({ "requests": { "memory": "1Gi" } }),
        serde_json::json!({ "volumes": [{ "name": "scratch", "emptyDir": { "sizeLimit": "1Mi" } }] }),
    );
    let c = &mut scratch.spec.as_mut().expect("spec").containers[0];
    c.command = Some(vec![
        "/bin/sh".into(),
        "-c".into(),
        "dd if=/dev/zero of=/scratch/fill bs=1024 count=4096; trap 'exit 0' TERM; sleep 3600 & wait"
            .into(),
    ]);
    c.volume_mounts = Some(vec![k8s_openapi::api::core::v1::VolumeMount {
        name: "scratch".into(),
        mount_path: "/scratch".into(),
        ..Default::default()
    }]);
    for p in [&best_effort, &burstable, &scratch] {
        wait_for("pod created", 60, || async {
            pods.create(&PostParams::default(), p).await.ok()
        })
        .await;
    }

    // No node threshold is crossed: only the pod past its emptyDir limit goes.
    let (name, st, others) = first_failed(&pods, &["best-effort", "burstable", "scratch"]).await;
    assert_eq!(name, "scratch", "{st:?}");
    assert_eq!(st.reason.as_deref(), Some("Evicted"));
    assert_eq!(
        st.message.as_deref(),
        Some("Usage of EmptyDir volume \"scratch\" exceeds the limit \"1Mi\". ")
    );
    assert_eq!(disruption(&st).as_deref(), Some("TerminationByKubelet"));
    assert_eq!(others, ["Running", "Running"]);

    // A soft memory threshold no node can meet, acted on at once: MemoryPressure, and the
    // BestEffort pod (using more than its zero request) is evicted before the Burstable one
    // (using far less than its 1Gi request).
    cluster
        .node
        .restart_kubelet_with(&[
            "--eviction-soft=memory.available<1000Ti",
            "--eviction-soft-grace-period=memory.available=0s",
        ])
        .expect("restart kubelet");
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    wait_for("MemoryPressure", 60, || async {
        let node = nodes.get(EVICT_NODE).await.ok()?;
        node.status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "MemoryPressure" && c.status == "True")
            .then_some(())
    })
    .await;
    // The condition becomes the taint, as on upstream's nodes: the kubelet reports the
    // condition, the controller-manager's node lifecycle controller taints the node from it.
    wait_for("the memory-pressure taint", 60, || async {
        let node = nodes.get(EVICT_NODE).await.ok()?;
        node.spec?
            .taints?
            .iter()
            .any(|t| t.key == "node.kubernetes.io/memory-pressure" && t.effect == "NoSchedule")
            .then_some(())
    })
    .await;
    let (name, st, others) = first_failed(&pods, &["best-effort", "burstable"]).await;
    assert_eq!(name, "best-effort", "{st:?}");
    assert_eq!(st.reason.as_deref(), Some("Evicted"));
    let message = st.message.clone().unwrap_or_default();
    assert!(
        message.starts_with("The node was low on resource: memory. Threshold quantity: 1000Ti"),
        "{message}"
    );
    assert!(message.contains("Container app was using"), "{message}");
    assert_eq!(disruption(&st).as_deref(), Some("TerminationByKubelet"));
    assert_eq!(others, ["Running"]);
    // The evicted pod's container is stopped.
    wait_for("best-effort stopped", 60, || async {
        let out = cluster
            .node
            .runtime
            .crictl(&["ps", "-q", "--name", "^app$", "--state", "running"])
            .ok()?;
        (String::from_utf8_lossy(&out.stdout).lines().count() <= 1).then_some(())
    })
    .await;

    // Under memory pressure a new BestEffort pod is refused at admission.
    let late = pod("late", serde_json::json!({}), serde_json::json!({}));
    pods.create(&PostParams::default(), &late)
        .await
        .expect("create late");
    let (phase, reason, message) = decided(&pods, "late").await;
    assert_eq!(
        (phase.as_str(), reason.as_str(), message.as_str()),
        (
            "Failed",
            "Evicted",
            "Pod was rejected: The node had condition: [MemoryPressure]. "
        )
    );

    // An image no container uses, and a finished pod's dead container, for the node-level
    // reclaim below.
    pull_unused_image(&cluster);
    let mut finished = pod(
        "finished",
        serde_json::json!({ "requests": { "memory": "10Mi" } }),
        serde_json::json!({ "restartPolicy": "Never" }),
    );
    let c = &mut finished.spec.as_mut().expect("spec").containers[0];
    c.name = "finished".into();
    c.command = Some(vec!["true".into()]);
    // Admitted before the disk threshold below, which refuses every new pod.
    pods.create(&PostParams::default(), &finished)
        .await
        .expect("create finished");
    wait_for("finished Succeeded", 90, || async {
        let st = pods.get("finished").await.ok()?.status?;
        (st.phase.as_deref() == Some("Succeeded")).then_some(())
    })
    .await;
    let finished_containers = |cluster: &Cluster| {
        let out = cluster
            .node
            .runtime
            .crictl(&["ps", "-a", "-q", "--name", "^finished$"])
            .expect("crictl ps");
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    assert_eq!(
        finished_containers(&cluster),
        1,
        "the finished pod's container is kept"
    );

    // A soft nodefs threshold no disk can meet, instead of the memory one (memory, reclaimed
    // first, would otherwise always be the threshold acted on): DiskPressure, and then every
    // new pod is refused, whatever its QoS class.
    cluster
        .node
        .restart_kubelet_replacing(
            &["--eviction-soft"],
            &[
                "--eviction-soft=nodefs.available<1000Ti",
                "--eviction-soft-grace-period=nodefs.available=0s",
            ],
        )
        .expect("restart kubelet");
    wait_for("DiskPressure", 60, || async {
        let node = nodes.get(EVICT_NODE).await.ok()?;
        node.status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "DiskPressure" && c.status == "True")
            .then_some(())
    })
    .await;
    wait_for("the disk-pressure taint", 60, || async {
        let node = nodes.get(EVICT_NODE).await.ok()?;
        node.spec?
            .taints?
            .iter()
            .any(|t| t.key == "node.kubernetes.io/disk-pressure" && t.effect == "NoSchedule")
            .then_some(())
    })
    .await;
    let later = pod(
        "later",
        serde_json::json!({ "requests": { "memory": "10Mi" } }),
        serde_json::json!({}),
    );
    pods.create(&PostParams::default(), &later)
        .await
        .expect("create later");
    let (phase, reason, message) = decided(&pods, "later").await;
    assert_eq!((phase.as_str(), reason.as_str()), ("Failed", "Evicted"));
    assert!(message.contains("DiskPressure"), "{message}");
    // Before evicting for disk, the node gives back what no pod needs: the finished pod's
    // dead container and the unused image go (image GC by thresholds is off on this node);
    // the finished pod stays Succeeded, not evicted.
    wait_for("the finished pod's dead container removed", 60, || async {
        (finished_containers(&cluster) == 0).then_some(())
    })
    .await;
    // The eviction manager logs once it has also removed the pod's empty sandbox, a moment
    // after the container is gone.
    wait_for(
        "the eviction manager's reclaim to say it removed it",
        30,
        || async {
            std::fs::read_to_string(cluster.node.log_path())
                .unwrap_or_default()
                .contains("removed dead containers of finished pods")
                .then_some(())
        },
    )
    .await;
    unused_image_gone(&cluster).await;
    let st = pods
        .get("finished")
        .await
        .expect("finished")
        .status
        .unwrap_or_default();
    assert_eq!(st.phase.as_deref(), Some("Succeeded"));
    assert_eq!(st.reason, None);
}
