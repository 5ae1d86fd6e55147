//! strake-runtime's pod sandboxes, driven through CRI by upstream's crictl, with the daemon in
//! a test-bed node namespace and the real CNI plugins: one IP per pod, pods reach each other,
//! the daemon survives `kill -9` without losing or disturbing a pod, and removal leaks nothing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use strake_integration::containerd::cni_conflist;
use strake_integration::netns::{ClusterNet, NodeNs};
use strake_integration::{paths, process};

struct Runtime {
    dir: tempfile::TempDir,
    socket: PathBuf,
    pid: Option<u32>,
}

impl Runtime {
    fn start(node: &mut NodeNs, dir: tempfile::TempDir) -> Self {
        let socket = dir.path().join("runtime.sock");
        let mut rt = Runtime {
            dir,
            socket,
            pid: None,
        };
        rt.spawn(node);
        rt
    }

    fn spawn(&mut self, node: &mut NodeNs) {
        let d = self.dir.path();
        let cni = d.join("cni");
        std::fs::create_dir_all(&cni).expect("cni dir");
        std::fs::write(
            cni.join("10-pods.conflist"),
            cni_conflist(0, &d.join("ipam")),
        )
        .expect("conflist");
        let args: Vec<String> = vec![
            format!("--listen={}", self.socket.display()),
            format!("--state-dir={}", d.join("state").display()),
            format!("--run-dir={}", d.join("run").display()),
            format!("--cni-conf-dir={}", cni.display()),
            format!(
                "--cni-bin-dir={}",
                paths::cni_bin_dir().expect("cni plugins").display()
            ),
            format!("--pause-binary={}", env!("CARGO_BIN_EXE_strake-pause")),
            format!("--config={}", d.join("absent-is-fine.toml").display()),
            "--log-level=debug".into(),
        ];
        // An explicit --config must exist: write an empty one.
        std::fs::write(d.join("absent-is-fine.toml"), "").expect("config");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let pid = node
            .spawn(
                "strake-runtime",
                Path::new(env!("CARGO_BIN_EXE_strake-runtime")),
                &args,
                &d.join("runtime.log"),
            )
            .expect("start strake-runtime");
        self.pid = Some(pid);
        for _ in 0..100 {
            if self.crictl(&["version"]).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "strake-runtime did not serve: {}",
            std::fs::read_to_string(d.join("runtime.log")).unwrap_or_default()
        );
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
                    "30s",
                ])
                .args(args),
        )
    }

    fn out(&self, args: &[&str]) -> String {
        let out = self
            .crictl(args)
            .unwrap_or_else(|e| panic!("crictl {args:?}: {e}"));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn pod_file(&self, name: &str) -> String {
        let pod = serde_json::json!({
            "metadata": { "name": name, "namespace": "default", "uid": format!("uid-{name}"), "attempt": 0 },
            "hostname": name,
            "log_directory": self.dir.path().join("logs").join(name),
        });
        let path = self.dir.path().join(format!("{name}.json"));
        std::fs::write(&path, pod.to_string()).expect("pod file");
        path.to_string_lossy().into_owned()
    }

    fn netns(&self, id: &str) -> PathBuf {
        self.dir
            .path()
            .join("run/sandboxes")
            .join(id)
            .join("ns/net")
    }
}

/// A test that fails half-way leaves nothing either: every pod the daemon still has is stopped
/// and removed (its pause process, mounts and network) before the daemon goes with its node.
impl Drop for Runtime {
    fn drop(&mut self) {
        let Ok(out) = self.crictl(&["pods", "-q"]) else {
            return;
        };
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = self.crictl(&["stopp", id]);
            let _ = self.crictl(&["rmp", id]);
        }
    }
}

fn ip_of(rt: &Runtime, id: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&rt.out(&["inspectp", id])).expect("inspectp json");
    assert_eq!(v["status"]["state"], "SANDBOX_READY");
    v["status"]["network"]["ip"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn mounts_below(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| Path::new(m).starts_with(dir))
        .map(String::from)
        .collect()
}

#[test]
fn pod_sandboxes_get_ips_reach_each_other_survive_a_crash_and_leave_nothing() {
    let net = ClusterNet::create().expect("cluster net");
    let mut node = net.add_node(0).expect("node");
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().to_path_buf();
    let mut rt = Runtime::start(&mut node, dir);

    let version = rt.out(&["version"]);
    assert!(version.contains("RuntimeName:  strake"), "{version}");
    let info: serde_json::Value = serde_json::from_str(&rt.out(&["info"])).expect("info json");
    let conditions = info["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for kind in ["RuntimeReady", "NetworkReady"] {
        assert!(
            conditions
                .iter()
                .any(|c| c["type"] == kind && c["status"] == true),
            "{kind}: {conditions:?}"
        );
    }

    // An unknown handler is refused clearly, and nothing is left of the attempt.
    let web = rt.pod_file("web");
    let err = rt
        .crictl(&["runp", "--runtime", "no-such-handler", &web])
        .expect_err("unknown handler refused");
    assert!(err.to_string().contains("unknown runtime handler"), "{err}");

    let web_id = rt.out(&["runp", &web]);
    let db = rt.pod_file("db");
    let db_id = rt.out(&["runp", &db]);
    // The same pod (name, namespace, uid, attempt) cannot be created twice.
    assert!(
        rt.crictl(&["runp", &web]).is_err(),
        "duplicate sandbox name accepted"
    );

    let (web_ip, db_ip) = (ip_of(&rt, &web_id), ip_of(&rt, &db_id));
    assert!(
        web_ip.starts_with("10.88.0.") && db_ip.starts_with("10.88.0."),
        "{web_ip} {db_ip}"
    );
    assert_ne!(web_ip, db_ip);

    // One pod reaches the other over the node's bridge.
    process::run(
        Command::new("nsenter")
            .arg(format!("--net={}", rt.netns(&db_id).display()))
            .args(["/bin/busybox", "ping", "-c", "1", "-W", "2", &web_ip]),
    )
    .expect("db pings web");

    // kill -9 the daemon: pods keep running; a new daemon adopts them with the same IDs.
    let pid = rt.pid.take().expect("pid");
    // SAFETY: kill(2) on the daemon this test started.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    for _ in 0..100 {
        if !process::pid_alive(pid) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    rt.spawn(&mut node);
    let listed = rt.out(&["pods", "-q", "--state", "ready"]);
    for id in [&web_id, &db_id] {
        assert!(listed.contains(id.as_str()), "{id} not adopted: {listed}");
    }
    assert_eq!(ip_of(&rt, &web_id), web_ip, "IP changed across the restart");
    process::run(
        Command::new("nsenter")
            .arg(format!("--net={}", rt.netns(&web_id).display()))
            .args(["/bin/busybox", "ping", "-c", "1", "-W", "2", &db_ip]),
    )
    .expect("pods still reach each other after the restart");

    let pause_pids: Vec<u32> = [&web_id, &db_id]
        .iter()
        .map(|id| {
            let v: serde_json::Value =
                serde_json::from_str(&rt.out(&["inspectp", id])).expect("inspectp json");
            let pid = v["info"]["pause_pid"]
                .as_u64()
                .unwrap_or_else(|| panic!("no pause_pid in {v}"));
            assert!(
                process::pid_alive(pid as u32),
                "pause process of {id} not running after restart"
            );
            pid as u32
        })
        .collect();

    // Stop is idempotent; remove is too, and afterwards nothing of the pods is left.
    for id in [&web_id, &db_id] {
        rt.out(&["stopp", id]);
        rt.out(&["stopp", id]);
        rt.out(&["rmp", id]);
    }
    assert!(rt.out(&["pods", "-q"]).is_empty());
    let gone = rt
        .crictl(&["inspectp", &web_id])
        .expect_err("removed sandbox still has a status");
    assert!(gone.to_string().contains("NotFound"), "{gone}");
    for pid in pause_pids {
        assert!(
            !process::pid_alive(pid),
            "pause process {pid} outlived its sandbox"
        );
    }
    let ipam = base.join("ipam/strake-testbed");
    let leaked: Vec<String> = std::fs::read_dir(&ipam)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        leaked.iter().all(|f| !f.starts_with("10.88.")),
        "IP reservations left: {leaked:?}"
    );
    assert!(
        mounts_below(&base).is_empty(),
        "mounts left: {:?}",
        mounts_below(&base)
    );
    drop(rt);
    drop(node);
}

/// Options strake-runtime cannot honour yet are refused with `InvalidArgument` and a message
/// naming them, instead of a pod that silently differs from its spec (the host's users for
/// `hostUsers: false`), and nothing is left of the attempt; what the kubelet sends for an
/// ordinary pod and for `shareProcessNamespace` is served and leaves nothing either, and a pod's
/// loopback is up without a CNI loopback plugin.
#[test]
fn pod_options_the_runtime_cannot_honour_are_refused_through_cri() {
    let net = ClusterNet::create().expect("cluster net");
    let mut node = net.add_node(0).expect("node");
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().to_path_buf();
    let rt = Runtime::start(&mut node, dir);

    // crictl reads the config as JSON of the CRI types: NamespaceMode POD=0, CONTAINER=1,
    // NODE=2, TARGET=3.
    let pod = |name: &str, extra: serde_json::Value| {
        let mut pod = serde_json::json!({
            "metadata": { "name": name, "namespace": "default", "uid": format!("uid-{name}"), "attempt": 0 },
            "hostname": name,
            "log_directory": base.join("logs").join(name),
        });
        for (k, v) in extra.as_object().expect("object") {
            pod[k] = v.clone();
        }
        let path = base.join(format!("{name}.json"));
        std::fs::write(&path, pod.to_string()).expect("pod file");
        path.to_string_lossy().into_owned()
    };
    let namespaces = |ns: serde_json::Value| serde_json::json!({ "linux": { "security_context": { "namespace_options": ns } } });
    let cases = [
        (
            "target-pid",
            namespaces(serde_json::json!({ "pid": 3, "target_id": "abc" })),
            "pid=TARGET",
        ),
        (
            "user-ns",
            namespaces(serde_json::json!({ "pid": 1, "userns_options": { "mode": 0 } })),
            "hostUsers: false",
        ),
        (
            "container-net",
            namespaces(serde_json::json!({ "network": 1, "pid": 1 })),
            "namespace_options.network",
        ),
        (
            "huge-port",
            serde_json::json!({ "port_mappings": [{ "protocol": 0, "container_port": 80, "host_port": 70000 }] }),
            "port_mappings",
        ),
    ];
    for (name, extra, needle) in cases {
        let err = rt
            .crictl(&["runp", &pod(name, extra)])
            .expect_err("refused");
        let err = err.to_string();
        assert!(
            err.contains("InvalidArgument") && err.contains(needle),
            "{name}: {err}"
        );
    }
    assert_eq!(rt.out(&["pods", "-q"]), "", "nothing left of the refusals");

    // What the kubelet sends for an ordinary pod is still fine.
    let ok = pod(
        "ordinary",
        namespaces(
            serde_json::json!({ "network": 0, "pid": 1, "ipc": 0, "userns_options": { "mode": 2 } }),
        ),
    );
    let id = rt.out(&["runp", &ok]);
    rt.out(&["stopp", &id]);
    rt.out(&["rmp", &id]);
    // shareProcessNamespace: the sandbox pins a PID namespace of its own (whose init is the
    // pause process's child), and leaves nothing behind either.
    let shared = pod(
        "share-pid",
        namespaces(serde_json::json!({ "network": 0, "pid": 0, "ipc": 0 })),
    );
    let id = rt.out(&["runp", &shared]);
    let pinned = base.join("run/sandboxes").join(&id).join("ns/pid");
    // A namespace file (same device as our own PID namespace's), not our namespace.
    use std::os::unix::fs::MetadataExt;
    let ns = std::fs::metadata(&pinned).expect("pinned pid ns");
    let own = std::fs::metadata("/proc/self/ns/pid").expect("own pid ns");
    assert_eq!(ns.dev(), own.dev(), "{pinned:?} is not a namespace");
    assert_ne!(ns.ino(), own.ino(), "the pod's PID namespace is the host's");
    rt.out(&["stopp", &id]);
    rt.out(&["rmp", &id]);
    // The pod's loopback is up even when the CNI configuration has no loopback plugin (as the
    // multi-node bed's ptp configuration has none): a pod reaches itself through it.
    let conflist = base.join("cni/10-pods.conflist");
    let mut conf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&conflist).expect("conflist")).expect("json");
    conf["plugins"]
        .as_array_mut()
        .expect("plugins")
        .retain(|p| p["type"] != "loopback");
    std::fs::write(&conflist, conf.to_string()).expect("rewrite conflist");
    let id = rt.out(&["runp", &pod("no-loopback-plugin", serde_json::json!({}))]);
    let lo = Command::new("nsenter")
        .arg(format!("--net={}", rt.netns(&id).display()))
        .args(["ip", "-o", "link", "show", "lo"])
        .output()
        .expect("ip link");
    let lo = String::from_utf8_lossy(&lo.stdout).into_owned();
    assert!(lo.contains(",UP"), "lo is down in the pod: {lo}");
    rt.out(&["stopp", &id]);
    rt.out(&["rmp", &id]);
    assert!(
        mounts_below(&base).is_empty(),
        "mounts left: {:?}",
        mounts_below(&base)
    );
    drop(rt);
    drop(node);
}
