//! strake-runtime under systemd's `Type=notify` (its unit): with `NOTIFY_SOCKET` set it sends
//! `READY=1` once its CRI socket answers, and nothing it starts inherits the variable (runc
//! would hand the socket to containers). systemd itself is not PID 1 on the test machine, so
//! the test plays the service manager's part: a datagram socket of its own.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use strake_integration::containerd::cni_conflist;
use strake_integration::netns::ClusterNet;
use strake_integration::{paths, process};

/// Removes every pod of the daemon at `endpoint` when dropped (also when the test fails).
struct RemovePods(String);

impl Drop for RemovePods {
    fn drop(&mut self) {
        if let Ok(crictl) = paths::cri_tools_bin("crictl") {
            let _ = Command::new(crictl)
                .args(["--runtime-endpoint", &self.0, "rmp", "--all", "--force"])
                .output();
        }
    }
}

#[test]
fn ready_is_sent_once_the_cri_socket_answers_and_children_never_see_notify_socket() {
    let net = ClusterNet::create().expect("cluster net");
    let mut node = net.add_node(0).expect("node");
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
    let notify = d.join("notify.sock");
    let manager = UnixDatagram::bind(&notify).expect("bind the notification socket");
    manager
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
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
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    node.spawn_with_env(
        "strake-runtime",
        Path::new(env!("CARGO_BIN_EXE_strake-runtime")),
        &args,
        &[("NOTIFY_SOCKET", notify.as_os_str())],
        &d.join("runtime.log"),
    )
    .expect("start strake-runtime");

    let mut buf = [0u8; 256];
    let n = manager.recv(&mut buf).unwrap_or_else(|e| {
        panic!(
            "no READY=1: {e}\n{}",
            std::fs::read_to_string(d.join("runtime.log")).unwrap_or_default()
        )
    });
    assert_eq!(&buf[..n], b"READY=1\n");
    let endpoint = format!("unix://{}", socket.display());
    let crictl = |args: &[&str]| {
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
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    // Whatever happens below, the pods go before the daemon and its namespace.
    let _pods = RemovePods(endpoint.clone());
    // Ready means serving: the first call after READY=1 answers.
    let version = crictl(&["version"]).expect("the CRI socket answers once READY=1 is sent");
    assert!(version.contains("strake"), "{version}");

    // A pod's sandbox process (started by the daemon) has no NOTIFY_SOCKET.
    let pod = serde_json::json!({
        "metadata": { "name": "notify", "namespace": "default", "uid": "uid-notify", "attempt": 0 },
        "hostname": "notify",
        "log_directory": d.join("logs"),
    });
    std::fs::write(d.join("pod.json"), pod.to_string()).expect("pod file");
    let id = crictl(&["runp", &d.join("pod.json").display().to_string()]).expect("runp");
    let inspect: serde_json::Value =
        serde_json::from_str(&crictl(&["inspectp", &id]).expect("inspectp")).expect("json");
    // crictl prints the verbose `info` entry (the sandbox's record) as `info`.
    let pause = inspect["info"]["pause_pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no pause_pid in {inspect}"));
    let environ = std::fs::read(format!("/proc/{pause}/environ")).expect("the pause's environ");
    assert!(
        !String::from_utf8_lossy(&environ).contains("NOTIFY_SOCKET"),
        "the sandbox inherited NOTIFY_SOCKET"
    );
    crictl(&["stopp", &id]).expect("stopp");
    crictl(&["rmp", &id]).expect("rmp");
    drop(node);
}
