//! containerd (Debian's, CRI plugin) as a peer runtime on a test node: the reference Strake's
//! runtime is measured against and the runtime strake-kubelet must also drive.
//!
//! Everything is private to one instance: root, state, socket, CNI config, registry hosts, and a
//! relative cgroup parent (see [`CgroupParent`]) that pod configs must use. Images come from the
//! test bed's registry only; the sandbox image is `strake/pause:1` from it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cgroup::CgroupParent;
use crate::netns::NodeNs;
use crate::process;
use crate::registry::{OPEN_PORT, PROTECTED_PORT, SCRATCH_PORT};
use crate::{Error, Result, netns::CLUSTER_GATEWAY, paths};

/// A containerd running inside a node namespace. Dropping it removes every pod it runs (through
/// CRI), stops it, and unmounts and removes its directories.
pub struct Containerd {
    dir: tempfile::TempDir,
    socket: PathBuf,
    cgroup: CgroupParent,
    pid: u32,
}

impl std::fmt::Debug for Containerd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containerd")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

/// The range every test node's pod subnet ([`pod_subnet`]) is carved from (a proxy's
/// `clusterCIDR`).
pub const POD_SUPERNET: &str = "10.88.0.0/16";

/// The pod subnet each test node's CNI bridge hands addresses from.
pub fn pod_subnet(node_index: u8) -> String {
    format!("10.88.{node_index}.0/24")
}

/// A CNI conflist for a test node: a bridge with host-local addresses (kept in `ipam_dir`, so
/// that nodes and suites never share an allocation store) and loopback.
pub fn cni_conflist(node_index: u8, ipam_dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "strake-testbed",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "dataDir": ipam_dir,
                    "ranges": [[{ "subnet": pod_subnet(node_index) }]],
                    "routes": [{ "dst": "0.0.0.0/0" }]
                }
            },
            { "type": "loopback" }
        ]
    })
    .to_string()
}

fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(crate::io_err("create", parent))?;
    }
    std::fs::write(path, text).map_err(crate::io_err("write", path))
}

impl Containerd {
    /// Starts containerd in `node` (node number `node_index`) and waits until its CRI plugin
    /// reports the runtime and the network ready.
    pub async fn start(node: &mut NodeNs, node_index: u8) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("strake-containerd-")
            .tempdir()
            .map_err(crate::io_err("create", std::env::temp_dir()))?;
        let d = dir.path();
        let socket = d.join("containerd.sock");
        let cni_conf = d.join("cni");
        write(
            &cni_conf.join("10-strake-testbed.conflist"),
            &cni_conflist(node_index, &d.join("ipam")),
        )?;
        for port in [OPEN_PORT, PROTECTED_PORT, SCRATCH_PORT] {
            let host = format!("{CLUSTER_GATEWAY}:{port}");
            write(
                &d.join("certs.d").join(&host).join("hosts.toml"),
                &format!(
                    "server = \"http://{host}\"\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
                ),
            )?;
        }
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{gw}:{port}/strake/pause:1"
  enable_cdi = false
  # This machine denies lowering oom_score_adj (no CAP_SYS_RESOURCE): clamp to containerd's own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs}"
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            socket = socket.display(),
            gw = CLUSTER_GATEWAY,
            port = OPEN_PORT,
            cni_bin = paths::cni_bin_dir()?.display(),
            cni_conf = cni_conf.display(),
            certs = d.join("certs.d").display(),
        );
        let config_path = d.join("config.toml");
        write(&config_path, &config)?;
        let pid = node.spawn(
            "containerd",
            Path::new("/usr/bin/containerd"),
            &["--config", &config_path.to_string_lossy()],
            &d.join("containerd.log"),
        )?;
        let ctr = Containerd {
            dir,
            socket,
            cgroup: CgroupParent::new(),
            pid,
        };
        ctr.wait_ready(Duration::from_secs(60)).await?;
        Ok(ctr)
    }

    async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last_error = String::new();
        while tokio::time::Instant::now() < deadline {
            if !process::pid_alive(self.pid) {
                let log = std::fs::read_to_string(self.dir.path().join("containerd.log"))
                    .unwrap_or_default();
                return Err(Error::Invalid(format!(
                    "containerd exited: {}",
                    tail(&log, 20)
                )));
            }
            match self.crictl(&["info"]) {
                Ok(out) => {
                    let info: serde_json::Value =
                        serde_json::from_slice(&out.stdout).unwrap_or_default();
                    let conditions = info["status"]["conditions"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    let ready = |t: &str| {
                        conditions
                            .iter()
                            .any(|c| c["type"] == t && c["status"] == true)
                    };
                    if ready("RuntimeReady") && ready("NetworkReady") {
                        return Ok(());
                    }
                    last_error = format!("conditions: {conditions:?}");
                }
                Err(e) => last_error = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(Error::Timeout {
            what: "containerd CRI".into(),
            secs: timeout.as_secs(),
            last_error,
        })
    }

    /// The CRI endpoint, as `unix://<path>`.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The relative cgroup parent pods on this containerd must use (`linux.cgroup_parent`).
    pub fn cgroup_parent(&self) -> &str {
        self.cgroup.name()
    }

    /// containerd's working directory (root, state, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// containerd's PID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Runs `crictl` against this containerd.
    pub fn crictl(&self, args: &[&str]) -> Result<std::process::Output> {
        crate::cri::crictl(&self.endpoint(), args)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Pods first, through CRI, so that shims and containers end and release their mounts.
        crate::cri::shut_down("containerd", self.pid, &self.endpoint());
        // Debugging aid: STRAKE_KEEP_CONTAINERD_LOG=1 keeps the log of the last instance.
        if std::env::var_os("STRAKE_KEEP_CONTAINERD_LOG").is_some() {
            let _ = std::fs::copy(
                self.dir.path().join("containerd.log"),
                "/tmp/containerd-last.log",
            );
        }
        unmount_below(self.dir.path());
    }
}

/// Unmounts everything mounted at or below `dir`, deepest first (lazily, so a busy mount cannot
/// keep the directory from being removed).
pub fn unmount_below(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut targets: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect();
    targets.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for t in targets {
        if let Err(e) = nix_umount(&t) {
            tracing::warn!(mount = %t.display(), error = %e, "cannot unmount");
        }
    }
}

fn nix_umount(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
