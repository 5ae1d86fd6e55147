//! strake-runtime's stats and container events, with the daemon in a test-bed node namespace,
//! real runc, the CNI plugins and the local registry: `crictl stats` / `crictl statsp` and the
//! gRPC stats RPCs report CPU, memory, the writable layer and the pod's network; a
//! GetContainerEvents stream sees a container's lifecycle in order.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use strake_integration::cgroup::CgroupParent;
use strake_integration::containerd::cni_conflist;
use strake_integration::netns::{ClusterNet, NodeNs};
use strake_integration::registry::Registry;
use strake_integration::{paths, process};
use strake_types::cri;
use strake_types::cri::runtime_service_client::RuntimeServiceClient;

const BUSYBOX: &str = "10.213.0.1:5000/strake/busybox:1";
/// The bridge's address, the pods' gateway (`cni_conflist(0, ..)`).
const GATEWAY: &str = "10.88.0.1";

/// The daemon in a node namespace; its pods are removed on drop.
struct Runtime {
    dir: tempfile::TempDir,
    socket: PathBuf,
    pid: u32,
}

impl Runtime {
    fn start(node: &mut NodeNs) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let socket = d.join("runtime.sock");
        let cni = d.join("cni");
        std::fs::create_dir_all(&cni).expect("cni dir");
        std::fs::write(
            cni.join("10-pods.conflist"),
            cni_conflist(0, &d.join("ipam")),
        )
        .expect("conflist");
        std::fs::write(d.join("runtime.toml"), "").expect("config");
        let args: Vec<String> = vec![
            format!("--listen={}", socket.display()),
            format!("--state-dir={}", d.join("state").display()),
            format!("--run-dir={}", d.join("run").display()),
            format!("--cni-conf-dir={}", cni.display()),
            format!(
                "--cni-bin-dir={}",
                paths::cni_bin_dir().expect("cni plugins").display()
            ),
            format!("--pause-binary={}", env!("CARGO_BIN_EXE_strake-pause")),
            format!("--config={}", d.join("runtime.toml").display()),
            "--insecure-registry=10.213.0.1:5000".into(),
            "--log-level=debug".into(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let pid = node
            .spawn(
                "strake-runtime",
                Path::new(env!("CARGO_BIN_EXE_strake-runtime")),
                &args,
                &d.join("runtime.log"),
            )
            .expect("start strake-runtime");
        let rt = Runtime { dir, socket, pid };
        for _ in 0..100 {
            if rt.crictl(&["version"]).is_ok() {
                return rt;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("strake-runtime did not serve: {}", rt.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("runtime.log")).unwrap_or_default()
    }

    fn crictl(&self, args: &[&str]) -> strake_integration::Result<std::process::Output> {
        let endpoint = format!("unix://{}", self.socket.display());
        process::run(
            Command::new(paths::cri_tools_bin("crictl").expect("crictl"))
                .args([
                    "--runtime-endpoint",
                    &endpoint,
                    "--image-endpoint",
                    &endpoint,
                    "--timeout",
                    "60s",
                ])
                .args(args),
        )
    }

    fn out(&self, args: &[&str]) -> String {
        let out = self.crictl(args).unwrap_or_else(|e| {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            panic!(
                "crictl {args:?}: {e}\n{}",
                lines[lines.len().saturating_sub(30)..].join("\n")
            )
        });
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let text = self.out(args);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("crictl {args:?}: {e}: {text}"))
    }

    fn pod_file(&self, name: &str, cgroup_parent: &str) -> String {
        let pod = serde_json::json!({
            "metadata": { "name": name, "namespace": "default", "uid": format!("uid-{name}"), "attempt": 0 },
            "hostname": name,
            "labels": { "pod": name },
            "log_directory": self.dir.path().join("logs").join(name),
            "linux": { "cgroup_parent": cgroup_parent },
        });
        let path = self.dir.path().join(format!("{name}.json"));
        std::fs::write(&path, pod.to_string()).expect("pod file");
        path.to_string_lossy().into_owned()
    }

    fn container_file(&self, name: &str, command: &[&str]) -> String {
        let c = serde_json::json!({
            "metadata": { "name": name },
            "image": { "image": BUSYBOX },
            "command": command,
            "labels": { "app": name },
            "log_path": format!("{name}/0.log"),
        });
        let path = self.dir.path().join(format!("c-{name}.json"));
        std::fs::write(&path, c.to_string()).expect("container file");
        path.to_string_lossy().into_owned()
    }

    fn wait_state(&self, id: &str, state: &str) {
        for _ in 0..200 {
            if self.json(&["inspect", id])["status"]["state"] == state {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{id} never reached {state}");
    }
}

impl Runtime {
    /// Pulls busybox and runs pod `name` (below `cgroup`) with container `busy` running
    /// [`BUSY`]; its pod file, pod ID and container ID.
    fn busy_pod(&self, name: &str, cgroup: &CgroupParent) -> (String, String, String) {
        self.out(&["pull", BUSYBOX]);
        let pod = self.pod_file(name, cgroup.name());
        let pod_id = self.out(&["runp", &pod]);
        let busy = self.container_file("busy", &["sh", "-c", BUSY]);
        let id = self.out(&["create", &pod_id, &busy, &pod]);
        self.out(&["start", &id]);
        self.wait_state(&id, "CONTAINER_RUNNING");
        (pod, pod_id, id)
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        let _ = self.crictl(&["rmp", "--all", "--force"]);
    }
}

/// A CRI client on the daemon's socket, for what crictl does not show.
fn client(socket: &Path) -> RuntimeServiceClient<tonic::transport::Channel> {
    let path = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::from_static("http://[::]:50051")
        .connect_with_connector_lazy(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }));
    RuntimeServiceClient::new(channel)
}

/// A protobuf-JSON `UInt64Value` (`{"value": "123"}`: 64-bit numbers are strings) at `path`.
fn u64_at(v: &serde_json::Value, path: &[&str]) -> u64 {
    let mut cur = v;
    for p in path {
        cur = &cur[p];
    }
    match &cur["value"] {
        serde_json::Value::String(s) => s.parse().unwrap_or(0),
        serde_json::Value::Number(n) => n.as_u64().unwrap_or(0),
        _ => 0,
    }
}

fn value(v: Option<cri::UInt64Value>) -> u64 {
    v.map_or(0, |v| v.value)
}

/// A busy CPU loop, 20 MB held in the pod's `/dev/shm` (tmpfs pages are charged to the
/// writer's memory cgroup and are never inactive file cache) and 5 MB written to the writable
/// layer.
const BUSY: &str = "while :; do :; done & \
    head -c 20000000 /dev/zero > /dev/shm/fill; \
    head -c 5000000 /dev/zero > /scratch; sleep 300";

fn rx_tx(pod: &serde_json::Value) -> (u64, u64) {
    let eth0 = &pod["linux"]["network"]["defaultInterface"];
    assert_eq!(eth0["name"], "eth0", "{pod}");
    (u64_at(eth0, &["rxBytes"]), u64_at(eth0, &["txBytes"]))
}

#[test]
fn crictl_stats_and_statsp_report_cpu_memory_writable_layer_and_network() {
    let net = ClusterNet::create().expect("cluster net");
    let regdir = tempfile::tempdir().expect("tempdir");
    let _registry = Registry::start(&net, &regdir.path().join("registry")).expect("registry");
    let mut node = net.add_node(0).expect("node");
    let cgroup = CgroupParent::new();
    let rt = Runtime::start(&mut node);
    let (pod, pod_id, id) = rt.busy_pod("stats", &cgroup);
    let idle = rt.container_file("idle", &["sleep", "300"]);
    let idle = rt.out(&["create", &pod_id, &idle, &pod]);

    // Let the shell fill its variable and the layer.
    let mut stats = serde_json::Value::Null;
    for _ in 0..100 {
        stats = rt.json(&["stats", "-o", "json", "--id", &id]);
        let s = &stats["stats"][0];
        if u64_at(s, &["memory", "workingSetBytes"]) > 20_000_000
            && u64_at(s, &["writableLayer", "usedBytes"]) >= 5_000_000
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = &stats["stats"][0];
    assert_eq!(s["attributes"]["id"], id.as_str(), "{stats}");
    assert_eq!(s["attributes"]["metadata"]["name"], "busy", "{stats}");
    assert_eq!(s["attributes"]["labels"]["app"], "busy", "{stats}");
    assert!(u64_at(s, &["cpu", "usageCoreNanoSeconds"]) > 0, "{stats}");
    assert!(
        u64_at(s, &["memory", "workingSetBytes"]) > 20_000_000,
        "{stats}"
    );
    assert!(
        u64_at(s, &["memory", "usageBytes"]) >= u64_at(s, &["memory", "workingSetBytes"]),
        "{stats}"
    );
    assert!(u64_at(s, &["memory", "rssBytes"]) > 0, "{stats}");
    assert!(u64_at(s, &["memory", "pageFaults"]) > 0, "{stats}");
    assert!(
        u64_at(s, &["writableLayer", "usedBytes"]) >= 5_000_000,
        "{stats}"
    );
    assert!(u64_at(s, &["writableLayer", "inodesUsed"]) >= 1, "{stats}");
    assert!(
        s["writableLayer"]["fsId"]["mountpoint"]
            .as_str()
            .is_some_and(|m| m.ends_with("/upper")),
        "{stats}"
    );

    // The table crictl prints shows a non-zero CPU percentage for the busy container.
    let table = rt.out(&["stats", "--id", &id]);
    let row = table.lines().nth(1).unwrap_or_default().to_string();
    let cpu_percent: f64 = row
        .split_whitespace()
        .nth(2)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0.0);
    assert!(cpu_percent > 1.0, "{table}");

    // Filters: by pod, by label.
    let by_pod = rt.json(&["stats", "-o", "json", "--pod", &pod_id]);
    assert_eq!(
        by_pod["stats"].as_array().map(Vec::len),
        Some(2),
        "{by_pod}"
    );
    let by_label = rt.json(&["stats", "-o", "json", "--label", "app=idle"]);
    assert_eq!(by_label["stats"][0]["attributes"]["id"], idle.as_str());
    assert_eq!(by_label["stats"].as_array().map(Vec::len), Some(1));

    // The pod: its cgroup's CPU, memory and processes, its containers, its network.
    let podstats = rt.json(&["statsp", "-o", "json", "--id", &pod_id]);
    let p = &podstats["stats"][0];
    assert_eq!(p["attributes"]["id"], pod_id.as_str(), "{podstats}");
    assert_eq!(p["attributes"]["labels"]["pod"], "stats", "{podstats}");
    assert!(
        u64_at(p, &["linux", "cpu", "usageCoreNanoSeconds"]) > 0,
        "{podstats}"
    );
    assert!(
        u64_at(p, &["linux", "memory", "workingSetBytes"]) > 20_000_000,
        "{podstats}"
    );
    assert!(
        u64_at(p, &["linux", "process", "processCount"]) >= 3,
        "{podstats}"
    );
    assert_eq!(
        p["linux"]["containers"].as_array().map(Vec::len),
        Some(2),
        "{podstats}"
    );
    let (rx0, tx0) = rx_tx(p);
    let ping = rt.out(&["exec", "-s", &id, "ping", "-c", "3", "-W", "2", GATEWAY]);
    assert!(ping.contains("3 packets received"), "{ping}");
    let after = rt.json(&["statsp", "-o", "json", "--label", "pod=stats"]);
    let (rx1, tx1) = rx_tx(&after["stats"][0]);
    // Three echo requests and replies: at least 3 * 84 bytes each way.
    assert!(rx1 >= rx0 + 252, "rx {rx0} -> {rx1}: {after}");
    assert!(tx1 >= tx0 + 252, "tx {tx0} -> {tx1}: {after}");

    // usage_nano_cores comes from the previous sample: a busy dd uses a good part of a core.
    let tokio = tokio::runtime::Runtime::new().expect("tokio");
    tokio.block_on(async {
        let mut rs = client(&rt.socket);
        let sample = |mut rs: RuntimeServiceClient<_>, id: String| async move {
            rs.container_stats(cri::ContainerStatsRequest { container_id: id })
                .await
                .expect("container stats")
                .into_inner()
                .stats
                .and_then(|s| s.cpu)
                .expect("cpu")
        };
        sample(rs.clone(), id.clone()).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let cpu = sample(rs.clone(), id.clone()).await;
        let cores = value(cpu.usage_nano_cores);
        assert!(cores > 100_000_000, "{cpu:?}");
        // The streaming variant answers the same, filtered by pod.
        let mut stream = rs
            .stream_pod_sandbox_stats(cri::StreamPodSandboxStatsRequest {
                filter: Some(cri::PodSandboxStatsFilter {
                    id: pod_id.clone(),
                    ..Default::default()
                }),
            })
            .await
            .expect("stream pod stats")
            .into_inner();
        let mut pods = Vec::new();
        while let Some(chunk) = stream.message().await.expect("stream") {
            pods.extend(chunk.pod_sandbox_stats);
        }
        assert_eq!(pods.len(), 1);
        let linux = pods[0].linux.as_ref().expect("linux stats");
        assert!(value(linux.memory.and_then(|m| m.working_set_bytes)) > 20_000_000);
        assert_eq!(linux.containers.len(), 2);
        let missing = rs
            .container_stats(cri::ContainerStatsRequest {
                container_id: "no-such-container".into(),
            })
            .await
            .expect_err("stats of a missing container");
        assert_eq!(missing.code(), tonic::Code::NotFound);
        let missing = rs
            .pod_sandbox_stats(cri::PodSandboxStatsRequest {
                pod_sandbox_id: "no-such-pod".into(),
            })
            .await
            .expect_err("stats of a missing pod");
        assert_eq!(missing.code(), tonic::Code::NotFound);
    });

    rt.out(&["stopp", &pod_id]);
    rt.out(&["rmp", &pod_id]);
    drop(rt);
    drop(node);
}

#[test]
fn container_events_stream_the_lifecycle_in_order() {
    let net = ClusterNet::create().expect("cluster net");
    let regdir = tempfile::tempdir().expect("tempdir");
    let _registry = Registry::start(&net, &regdir.path().join("registry")).expect("registry");
    let mut node = net.add_node(0).expect("node");
    let cgroup = CgroupParent::new();
    let rt = Runtime::start(&mut node);
    rt.out(&["pull", BUSYBOX]);
    let pod = rt.pod_file("events", cgroup.name());
    let pod_id = rt.out(&["runp", &pod]);

    let tokio = tokio::runtime::Runtime::new().expect("tokio");
    tokio.block_on(async {
        let mut rs = client(&rt.socket);
        let mut events = rs
            .get_container_events(cri::GetEventsRequest {})
            .await
            .expect("subscribe")
            .into_inner();

        // A container that exits by itself: its STOPPED event comes from the exit watcher,
        // without any status call.
        let short = rt.container_file("short", &["sh", "-c", "sleep 1; exit 3"]);
        let id = rt.out(&["create", &pod_id, &short, &pod]);
        rt.out(&["start", &id]);
        let mut seen = Vec::new();
        while seen.len() < 3 {
            let e = tokio::time::timeout(Duration::from_secs(20), events.message())
                .await
                .expect("an event in time")
                .expect("stream open")
                .expect("stream not ended");
            if e.container_id != id {
                continue;
            }
            let pod_status = e.pod_sandbox_status.as_ref().expect("pod status");
            assert_eq!(pod_status.id, pod_id);
            let mine = e
                .containers_statuses
                .iter()
                .find(|s| s.id == id)
                .expect("the container's status");
            seen.push((e.container_event_type, mine.state, mine.exit_code));
        }
        use cri::ContainerEventType as E;
        use cri::ContainerState as S;
        assert_eq!(
            seen,
            vec![
                (
                    E::ContainerCreatedEvent as i32,
                    S::ContainerCreated as i32,
                    0
                ),
                (
                    E::ContainerStartedEvent as i32,
                    S::ContainerRunning as i32,
                    0
                ),
                (
                    E::ContainerStoppedEvent as i32,
                    S::ContainerExited as i32,
                    3
                ),
            ]
        );

        // PodSandboxStatus carries the containers' statuses (Evented PLEG reads them there).
        let status = rs
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: pod_id.clone(),
                verbose: false,
            })
            .await
            .expect("pod status")
            .into_inner();
        assert_eq!(
            status
                .containers_statuses
                .iter()
                .map(|s| (s.id.as_str(), s.exit_code))
                .collect::<Vec<_>>(),
            vec![(id.as_str(), 3)]
        );

        rt.out(&["rm", &id]);
        loop {
            let e = tokio::time::timeout(Duration::from_secs(20), events.message())
                .await
                .expect("an event in time")
                .expect("stream open")
                .expect("stream not ended");
            if e.container_id == id {
                assert_eq!(e.container_event_type, E::ContainerDeletedEvent as i32);
                assert!(e.containers_statuses.iter().all(|s| s.id != id));
                break;
            }
        }

        // A stopped container: STOPPED after STARTED, then DELETED with the pod.
        let long = rt.container_file("long", &["sleep", "300"]);
        let long = rt.out(&["create", &pod_id, &long, &pod]);
        rt.out(&["start", &long]);
        rt.out(&["stop", "--timeout", "1", &long]);
        rt.out(&["stopp", &pod_id]);
        rt.out(&["rmp", &pod_id]);
        let mut kinds = Vec::new();
        while kinds.len() < 4 {
            let e = tokio::time::timeout(Duration::from_secs(20), events.message())
                .await
                .expect("an event in time")
                .expect("stream open")
                .expect("stream not ended");
            if e.container_id == long {
                kinds.push(e.container_event_type);
            }
        }
        assert_eq!(
            kinds,
            [
                E::ContainerCreatedEvent,
                E::ContainerStartedEvent,
                E::ContainerStoppedEvent,
                E::ContainerDeletedEvent
            ]
            .map(|k| k as i32)
        );

        // A subscriber does not hold the daemon's shutdown open: SIGTERM ends the stream.
        let mut events = rs
            .get_container_events(cri::GetEventsRequest {})
            .await
            .expect("subscribe")
            .into_inner();
        // SAFETY: kill(2) on the daemon this test started.
        unsafe { libc::kill(rt.pid as libc::pid_t, libc::SIGTERM) };
        let end = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("the stream ends at shutdown");
        assert!(!matches!(end, Ok(Some(_))), "{end:?}");
        for _ in 0..100 {
            if !process::pid_alive(rt.pid) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            !process::pid_alive(rt.pid),
            "daemon still running after SIGTERM"
        );
    });
    drop(rt);
    drop(node);
}

/// The metrics of `crictl metricsp -o json` for one pod: `(name, label values, value)` of the
/// pod's own metrics and of each container's, by container ID.
type Sample = (String, Vec<String>, u64);

fn samples(metrics: &serde_json::Value) -> Vec<Sample> {
    metrics
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            let labels = m["labelValues"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| v.as_str().unwrap_or_default().to_string())
                .collect();
            (
                m["name"].as_str().unwrap_or_default().to_string(),
                labels,
                u64_at(m, &["value"]),
            )
        })
        .collect()
}

fn find<'a>(samples: &'a [Sample], name: &str) -> Option<&'a Sample> {
    samples.iter().find(|s| s.0 == name)
}

#[test]
fn pod_metrics_descriptors_container_filesystem_and_pod_resources() {
    let net = ClusterNet::create().expect("cluster net");
    let regdir = tempfile::tempdir().expect("tempdir");
    let _registry = Registry::start(&net, &regdir.path().join("registry")).expect("registry");
    let mut node = net.add_node(0).expect("node");
    let cgroup = CgroupParent::new();
    let rt = Runtime::start(&mut node);
    let (_, pod_id, id) = rt.busy_pod("metrics", &cgroup);
    // A stopped pod reports no metrics (nothing of it is left to read).
    let gone = rt.pod_file("gone", cgroup.name());
    let gone_id = rt.out(&["runp", &gone]);
    rt.out(&["stopp", &gone_id]);

    // Descriptors: cAdvisor's names, with the label keys containerd gives them.
    let descs = rt.json(&["metricdescs", "-o", "json"]);
    let keys: std::collections::HashMap<String, Vec<String>> = descs["descriptors"]
        .as_array()
        .unwrap_or_else(|| panic!("{descs}"))
        .iter()
        .map(|d| {
            let keys = d["labelKeys"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|k| k.as_str().unwrap_or_default().to_string())
                .collect();
            (d["name"].as_str().unwrap_or_default().to_string(), keys)
        })
        .collect();
    let base = ["pod", "namespace", "container", "id", "image"];
    assert_eq!(keys["container_cpu_usage_seconds_total"], base, "{descs}");
    assert_eq!(keys["container_memory_working_set_bytes"], base, "{descs}");
    assert_eq!(
        keys["container_network_receive_bytes_total"],
        [&base[..], &["interface"]].concat(),
        "{descs}"
    );

    // Wait for a second of CPU (total, and user plus system), the 20 MB in /dev/shm and the 5 MB in the writable layer.
    let mut pod_samples = Vec::new();
    let mut busy_samples = Vec::new();
    let mut listed = serde_json::Value::Null;
    for _ in 0..300 {
        listed = rt.json(&["metricsp", "-o", "json"]);
        let pods = listed["podMetrics"].as_array().cloned().unwrap_or_default();
        let Some(p) = pods.iter().find(|p| p["podSandboxId"] == pod_id.as_str()) else {
            panic!("pod {pod_id} not listed: {listed}");
        };
        assert!(
            pods.iter().all(|p| p["podSandboxId"] != gone_id.as_str()),
            "a stopped pod is listed: {listed}"
        );
        pod_samples = samples(&p["metrics"]);
        busy_samples = p["containerMetrics"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["containerId"] == id.as_str())
            .map(|c| samples(&c["metrics"]))
            .unwrap_or_default();
        let at_least = |name: &str, v: u64| find(&busy_samples, name).is_some_and(|s| s.2 >= v);
        // Whole seconds (CRI metric values are integers): user and system time each round
        // down, so their sum reaches a second after the total does.
        let user_and_system = [
            "container_cpu_user_seconds_total",
            "container_cpu_system_seconds_total",
        ]
        .iter()
        .filter_map(|n| find(&busy_samples, n).map(|s| s.2))
        .sum::<u64>();
        if at_least("container_cpu_usage_seconds_total", 1)
            && user_and_system >= 1
            && at_least("container_memory_working_set_bytes", 20_000_000)
            && at_least("container_fs_usage_bytes", 5_000_000)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every metric has a descriptor with as many keys as it has label values: the kubelet
    // drops any other.
    for (name, labels, _) in pod_samples.iter().chain(&busy_samples) {
        let k = keys
            .get(name)
            .unwrap_or_else(|| panic!("{name} has no descriptor"));
        assert_eq!(labels.len(), k.len(), "{name}: {labels:?} for {k:?}");
    }
    let get = |name: &str| {
        find(&busy_samples, name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} missing: {listed}"))
    };
    let cpu = get("container_cpu_usage_seconds_total");
    assert_eq!(
        cpu.1,
        ["metrics", "default", "busy", id.as_str(), BUSYBOX],
        "{listed}"
    );
    assert!(cpu.2 >= 1, "{listed}");
    assert!(
        get("container_cpu_user_seconds_total").2 + get("container_cpu_system_seconds_total").2
            >= 1,
        "{listed}"
    );
    assert!(
        get("container_memory_working_set_bytes").2 > 20_000_000,
        "{listed}"
    );
    assert!(
        get("container_memory_usage_bytes").2 >= get("container_memory_working_set_bytes").2,
        "{listed}"
    );
    // The shell, its busy loop and sleep.
    assert!(get("container_processes").2 >= 2, "{listed}");
    let fs = get("container_fs_usage_bytes");
    assert!(fs.2 >= 5_000_000, "{listed}");
    assert!(fs.1[5].ends_with("/upper"), "{listed}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let started = get("container_start_time_seconds").2;
    assert!(started <= now && started + 300 > now, "{listed}");

    // The pod's network, once, as cAdvisor's "POD" container, per interface.
    let rx = |samples: &[Sample]| {
        let s = find(samples, "container_network_receive_bytes_total")
            .cloned()
            .unwrap_or_else(|| panic!("no network metrics: {samples:?}"));
        assert_eq!(
            s.1,
            ["metrics", "default", "POD", pod_id.as_str(), "", "eth0"]
        );
        s.2
    };
    let rx0 = rx(&pod_samples);
    let ping = rt.out(&["exec", "-s", &id, "ping", "-c", "3", "-W", "2", GATEWAY]);
    assert!(ping.contains("3 packets received"), "{ping}");

    let tokio = tokio::runtime::Runtime::new().expect("tokio");
    tokio.block_on(async {
        let mut rs = client(&rt.socket);
        // The streaming variant answers the same pods.
        let mut stream = rs
            .stream_pod_sandbox_metrics(cri::StreamPodSandboxMetricsRequest {})
            .await
            .expect("stream pod metrics")
            .into_inner();
        let mut pods = Vec::new();
        while let Some(chunk) = stream.message().await.expect("stream") {
            pods.extend(chunk.pod_sandbox_metrics);
        }
        assert_eq!(pods.len(), 1, "{pods:?}");
        let after: Vec<Sample> = pods[0]
            .metrics
            .iter()
            .map(|m| (m.name.clone(), m.label_values.clone(), value(m.value)))
            .collect();
        // Three echo requests and replies: at least 3 * 84 bytes received.
        let rx1 = rx(&after);
        assert!(rx1 >= rx0 + 252, "rx {rx0} -> {rx1}");

        // ImageFsInfo: the image store, and the writable layers as the container filesystem.
        let endpoint = rt.socket.clone();
        let channel = tonic::transport::Endpoint::from_static("http://[::]:50051")
            .connect_with_connector_lazy(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = endpoint.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }));
        let fs = cri::image_service_client::ImageServiceClient::new(channel)
            .image_fs_info(cri::ImageFsInfoRequest {})
            .await
            .expect("image fs info")
            .into_inner();
        assert_eq!(fs.image_filesystems.len(), 1, "{fs:?}");
        assert_eq!(fs.container_filesystems.len(), 1, "{fs:?}");
        let containers_fs = &fs.container_filesystems[0];
        let mountpoint = containers_fs
            .fs_id
            .as_ref()
            .map(|f| f.mountpoint.clone())
            .unwrap_or_default();
        assert!(
            fs.container_filesystems[0].fs_id != fs.image_filesystems[0].fs_id,
            "{fs:?}"
        );
        assert!(
            Path::new(&mountpoint).join(&id).join("upper").is_dir(),
            "{fs:?}"
        );
        assert!(value(containers_fs.used_bytes) >= 5_000_000, "{fs:?}");
        assert!(value(containers_fs.inodes_used) >= 1, "{fs:?}");

        // UpdatePodSandboxResources records the pod-level resources; verbose status shows them.
        let resources = |shares: i64, memory: i64| cri::LinuxContainerResources {
            cpu_shares: shares,
            cpu_quota: 50_000,
            cpu_period: 100_000,
            memory_limit_in_bytes: memory,
            ..Default::default()
        };
        rs.update_pod_sandbox_resources(cri::UpdatePodSandboxResourcesRequest {
            pod_sandbox_id: pod_id.clone(),
            overhead: Some(resources(10, 1 << 20)),
            resources: Some(resources(512, 128 << 20)),
        })
        .await
        .expect("update pod sandbox resources");
        let status = rs
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: pod_id.clone(),
                verbose: true,
            })
            .await
            .expect("pod status")
            .into_inner();
        let recorded: serde_json::Value =
            serde_json::from_str(&status.info["resources"]).expect("resources json");
        assert_eq!(recorded["resources"]["cpuShares"], 512, "{recorded}");
        assert_eq!(
            recorded["resources"]["memoryLimitInBytes"],
            128 << 20,
            "{recorded}"
        );
        assert_eq!(recorded["overhead"]["cpuShares"], 10, "{recorded}");
        let missing = rs
            .update_pod_sandbox_resources(cri::UpdatePodSandboxResourcesRequest {
                pod_sandbox_id: "no-such-pod".into(),
                ..Default::default()
            })
            .await
            .expect_err("update of a missing pod");
        assert_eq!(missing.code(), tonic::Code::NotFound);
    });
    // The record survives on disk: the sandbox's saved configuration carries the update.
    let saved = std::fs::read(
        rt.dir
            .path()
            .join("state/sandboxes")
            .join(&pod_id)
            .join("config.pb"),
    )
    .expect("saved sandbox config");
    let saved =
        <cri::PodSandboxConfig as prost::Message>::decode(saved.as_slice()).expect("decode");
    let linux = saved.linux.unwrap_or_default();
    assert_eq!(linux.resources.map(|r| r.cpu_shares), Some(512));

    rt.out(&["stopp", &pod_id]);
    rt.out(&["rmp", &pod_id]);
    drop(rt);
    drop(node);
}
