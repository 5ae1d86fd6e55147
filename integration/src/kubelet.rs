//! A Strake node under test: a node namespace, a CRI runtime (containerd or strake-runtime) and
//! strake-kubelet, started together and torn down in reverse order when dropped.
//!
//! Used by strake-kubelet's integration tests, the benchmarks and `strake-testbed demo`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::containerd::Containerd;
use crate::control_plane::ControlPlane;
use crate::netns::{ClusterNet, NodeNs};
use crate::strake_runtime::StrakeRuntime;
use crate::{Result, paths, process};

/// Which CRI runtime a node uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuntimeKind {
    /// Debian's containerd with its CRI plugin (the upstream peer).
    Containerd,
    /// strake-runtime from this workspace.
    Strake,
}

/// The node's running CRI runtime.
#[derive(Debug)]
pub enum NodeRuntime {
    /// containerd.
    Containerd(Containerd),
    /// strake-runtime.
    Strake(StrakeRuntime),
}

impl NodeRuntime {
    /// Starts a runtime of `kind` in `ns`, node number `index`.
    pub async fn start(kind: RuntimeKind, ns: &mut NodeNs, index: u8) -> Result<Self> {
        Ok(match kind {
            RuntimeKind::Containerd => NodeRuntime::Containerd(Containerd::start(ns, index).await?),
            RuntimeKind::Strake => NodeRuntime::Strake(StrakeRuntime::start(ns, index).await?),
        })
    }

    /// The CRI endpoint (`unix:///...`).
    pub fn endpoint(&self) -> String {
        match self {
            NodeRuntime::Containerd(c) => c.endpoint(),
            NodeRuntime::Strake(s) => s.endpoint(),
        }
    }

    /// The cgroup parent (relative to the hierarchy roots) its pods live under.
    pub fn cgroup_parent(&self) -> &str {
        match self {
            NodeRuntime::Containerd(c) => c.cgroup_parent(),
            NodeRuntime::Strake(s) => s.cgroup_parent(),
        }
    }

    /// The daemon's PID.
    pub fn pid(&self) -> u32 {
        match self {
            NodeRuntime::Containerd(c) => c.pid(),
            NodeRuntime::Strake(s) => s.pid(),
        }
    }

    /// Runs crictl against this runtime.
    pub fn crictl(&self, args: &[&str]) -> Result<std::process::Output> {
        match self {
            NodeRuntime::Containerd(c) => c.crictl(args),
            NodeRuntime::Strake(s) => s.crictl(args),
        }
    }

    /// The prefix of container IDs in pod status (`containerd://`, `strake://`).
    pub fn id_scheme(&self) -> &'static str {
        match self {
            NodeRuntime::Containerd(_) => "containerd://",
            NodeRuntime::Strake(_) => "strake://",
        }
    }
}

/// A node: its namespace, a CRI runtime, and strake-kubelet. Dropped in that reverse order:
/// the kubelet is stopped first, then the runtime removes its pods and stops, then the
/// namespace goes.
/// Hard eviction thresholds for kubelets on a shared test machine, absolute as the upstream
/// kubelet launcher sets them: a busy shared disk (often fuller than upstream's 10 %/15 %
/// defaults allow) must not make the node evict pods or refuse them for reasons of the bed.
pub const TEST_EVICTION_HARD: &str = "evictionHard: {memory.available: 1Mi, \
    nodefs.available: 1Mi, nodefs.inodesFree: 1%, imagefs.available: 1Mi, \
    imagefs.inodesFree: 1%}\n";

pub struct KubeletNode {
    /// strake-kubelet's PID.
    pub kubelet_pid: u32,
    args: Vec<String>,
    /// The kubelet's directory: config, root dir, pod logs, its log file.
    pub dir: tempfile::TempDir,
    /// The node's CRI runtime.
    pub runtime: NodeRuntime,
    /// The node's network namespace.
    pub ns: NodeNs,
}

impl Drop for KubeletNode {
    fn drop(&mut self) {
        // The kubelet goes first: while it runs it would recreate the pods the runtime's guard
        // removes, and those would outlive the runtime.
        if self.kubelet_pid != 0 {
            self.stop_kubelet(Duration::from_secs(5));
        }
    }
}

impl std::fmt::Debug for KubeletNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeletNode")
            .field("kubelet_pid", &self.kubelet_pid)
            .field("runtime", &self.runtime)
            .finish_non_exhaustive()
    }
}

impl KubeletNode {
    /// Starts containerd and strake-kubelet (named `name`) on node number `index` of `cp`.
    /// `extra_config` is appended to the KubeletConfiguration YAML.
    pub async fn start(
        cp: &ControlPlane,
        index: u8,
        name: &str,
        extra_config: &str,
    ) -> Result<Self> {
        Self::start_on(cp, index, name, extra_config, RuntimeKind::Containerd).await
    }

    /// Starts the given runtime and strake-kubelet on node number `index` of `cp`, its
    /// 10250 serving a certificate of the cluster CA.
    pub async fn start_on(
        cp: &ControlPlane,
        index: u8,
        name: &str,
        extra_config: &str,
        kind: RuntimeKind,
    ) -> Result<Self> {
        let ns = cp.net().add_node(index)?;
        let kubeconfig = cp.node_kubeconfig(name)?;
        // The API server verifies the kubelet's serving certificate (logs, exec, port-forward
        // go through 10250), and the kubelet accepts client certificates of the cluster CA.
        let serving = cp.pki().issue_server(
            &format!("kubelet-serving-{name}"),
            name,
            &[name.to_string(), ns.ip().to_string()],
        )?;
        let config = format!(
            "tlsCertFile: {}\ntlsPrivateKeyFile: {}\nauthentication:\n  x509:\n    clientCAFile: {}\n\
             {extra_config}",
            serving.cert.display(),
            serving.key.display(),
            cp.pki().ca.cert.display(),
        );
        Self::start_in(ns, index, name, &config, kind, Some(&kubeconfig)).await
    }

    /// Starts containerd and a standalone strake-kubelet (no API server) on node `index` of `net`.
    pub async fn start_standalone(
        net: &ClusterNet,
        index: u8,
        name: &str,
        extra_config: &str,
    ) -> Result<Self> {
        let ns = net.add_node(index)?;
        Self::start_in(ns, index, name, extra_config, RuntimeKind::Containerd, None).await
    }

    async fn start_in(
        mut ns: NodeNs,
        index: u8,
        name: &str,
        extra_config: &str,
        kind: RuntimeKind,
        kubeconfig: Option<&Path>,
    ) -> Result<Self> {
        let runtime = NodeRuntime::start(kind, &mut ns, index).await?;
        let dir = tempfile::Builder::new()
            .prefix("strake-kubelet-")
            .tempdir()
            .map_err(crate::io_err("create", std::env::temp_dir()))?;
        let config = dir.path().join("kubelet.yaml");
        // Absolute thresholds, as the upstream kubelet launcher sets them: a busy shared disk
        // must not taint the test node with DiskPressure (unless a test sets its own).
        let eviction = if extra_config.contains("evictionHard:") {
            ""
        } else {
            TEST_EVICTION_HARD
        };
        std::fs::write(
            &config,
            format!(
                "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n\
                 nodeStatusUpdateFrequency: 1s\nnodeLeaseDurationSeconds: 8\n\
                 cgroupRoot: {}\npodLogsDir: {}\n{eviction}{extra_config}",
                runtime.cgroup_parent(),
                dir.path().join("pod-logs").display()
            ),
        )
        .map_err(crate::io_err("write", &config))?;
        let mut args = vec![
            format!("--config={}", config.display()),
            format!("--hostname-override={name}"),
            format!("--node-ip={}", ns.ip()),
            format!("--container-runtime-endpoint={}", runtime.endpoint()),
            format!("--root-dir={}", dir.path().join("root").display()),
        ];
        if let Some(kc) = kubeconfig {
            args.push(format!("--kubeconfig={}", kc.display()));
        }
        let mut node = KubeletNode {
            kubelet_pid: 0,
            args,
            dir,
            runtime,
            ns,
        };
        node.spawn_kubelet()?;
        Ok(node)
    }

    fn spawn_kubelet(&mut self) -> Result<()> {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let log = self.log_path();
        self.kubelet_pid = self.ns.spawn(
            "strake-kubelet",
            &paths::workspace_bin("strake-kubelet")?,
            &args,
            &log,
        )?;
        Ok(())
    }

    /// Stops the kubelet (SIGTERM, then SIGKILL after `grace`) and waits until it is gone.
    fn stop_kubelet(&self, grace: Duration) {
        // SAFETY: kill(2) on the kubelet this guard started.
        unsafe { libc::kill(self.kubelet_pid as libc::pid_t, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + grace;
        while process::pid_alive(self.kubelet_pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above.
        unsafe { libc::kill(self.kubelet_pid as libc::pid_t, libc::SIGKILL) };
        for _ in 0..100 {
            if !process::pid_alive(self.kubelet_pid) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the kubelet with SIGKILL (no chance to clean up) and starts a new one.
    pub fn restart_kubelet(&mut self) -> Result<()> {
        self.kill_kubelet();
        self.start_kubelet()
    }

    /// Kills the kubelet with SIGKILL (no chance to clean up) and waits until it is gone;
    /// what it ran keeps running. [`KubeletNode::start_kubelet`] starts it again.
    pub fn kill_kubelet(&mut self) {
        // SAFETY: kill(2) on the kubelet this guard started.
        unsafe { libc::kill(self.kubelet_pid as libc::pid_t, libc::SIGKILL) };
        for _ in 0..100 {
            if !process::pid_alive(self.kubelet_pid) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the kubelet again after [`KubeletNode::kill_kubelet`].
    pub fn start_kubelet(&mut self) -> Result<()> {
        self.spawn_kubelet()
    }

    /// Kills the kubelet and starts it again with `env` added to its environment (the
    /// flags stay).
    pub fn restart_kubelet_with_env(&mut self, env: &[(&str, &std::ffi::OsStr)]) -> Result<()> {
        self.kill_kubelet();
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let log = self.log_path();
        self.kubelet_pid = self.ns.spawn_with_env(
            "strake-kubelet",
            &paths::workspace_bin("strake-kubelet")?,
            &args,
            env,
            &log,
        )?;
        Ok(())
    }

    /// Restarts the kubelet (as [`KubeletNode::restart_kubelet`]) with `extra` flags added.
    pub fn restart_kubelet_with(&mut self, extra: &[&str]) -> Result<()> {
        self.args.extend(extra.iter().map(|a| a.to_string()));
        self.restart_kubelet()
    }

    /// Restarts the kubelet (as [`KubeletNode::restart_kubelet`]) without the flags that start
    /// with any of `drop`, and with `extra` added.
    pub fn restart_kubelet_replacing(&mut self, drop: &[&str], extra: &[&str]) -> Result<()> {
        self.args
            .retain(|a| !drop.iter().any(|prefix| a.starts_with(prefix)));
        self.restart_kubelet_with(extra)
    }

    /// The running kubelet's PID.
    pub fn kubelet_pid(&self) -> u32 {
        self.kubelet_pid
    }

    /// Where the kubelet logs.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("kubelet.log")
    }

    /// The kubelet's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}
