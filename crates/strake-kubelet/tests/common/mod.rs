//! Shared by the kubelet's integration tests: a node running strake-kubelet on containerd or strake-runtime.

#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use strake_integration::containerd::Containerd;
use strake_integration::control_plane::ControlPlane;
use strake_integration::netns::{ClusterNet, NodeNs};
use strake_integration::strake_runtime::StrakeRuntime;

/// Polls `f` every 250 ms until it yields a value; panics after `secs`.
pub async fn wait_for<T, F, Fut>(what: &str, secs: u64, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("timed out after {secs} s waiting for {what}");
}

/// Which CRI runtime a test node uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuntimeKind {
    Containerd,
    Strake,
}

/// The node's running CRI runtime.
pub enum NodeRuntime {
    Containerd(Containerd),
    Strake(StrakeRuntime),
}

impl NodeRuntime {
    pub fn endpoint(&self) -> String {
        match self {
            NodeRuntime::Containerd(c) => c.endpoint(),
            NodeRuntime::Strake(s) => s.endpoint(),
        }
    }

    pub fn cgroup_parent(&self) -> &str {
        match self {
            NodeRuntime::Containerd(c) => c.cgroup_parent(),
            NodeRuntime::Strake(s) => s.cgroup_parent(),
        }
    }

    pub fn pid(&self) -> u32 {
        match self {
            NodeRuntime::Containerd(c) => c.pid(),
            NodeRuntime::Strake(s) => s.pid(),
        }
    }

    pub fn crictl(&self, args: &[&str]) -> strake_integration::Result<std::process::Output> {
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

/// A test node: its namespace, a CRI runtime, and strake-kubelet. Dropped in that reverse order.
pub struct KubeletNode {
    pub kubelet_pid: u32,
    args: Vec<String>,
    pub dir: tempfile::TempDir,
    pub runtime: NodeRuntime,
    pub ns: NodeNs,
}

impl KubeletNode {
    /// Starts containerd and strake-kubelet (named `name`) on node number `index` of `cp`.
    pub async fn start(cp: &ControlPlane, index: u8, name: &str, extra_config: &str) -> Self {
        Self::start_on(cp, index, name, extra_config, RuntimeKind::Containerd).await
    }

    /// Starts the given runtime and strake-kubelet on node number `index` of `cp`.
    pub async fn start_on(
        cp: &ControlPlane,
        index: u8,
        name: &str,
        extra_config: &str,
        kind: RuntimeKind,
    ) -> Self {
        let ns = cp.net().add_node(index).expect("node namespace");
        let kubeconfig = cp.node_kubeconfig(name).expect("node kubeconfig");
        Self::start_in(ns, index, name, extra_config, kind, Some(&kubeconfig)).await
    }

    /// Starts containerd and a standalone strake-kubelet (no API server) on node `index` of `net`.
    pub async fn start_standalone(
        net: &ClusterNet,
        index: u8,
        name: &str,
        extra_config: &str,
    ) -> Self {
        let ns = net.add_node(index).expect("node namespace");
        Self::start_in(ns, index, name, extra_config, RuntimeKind::Containerd, None).await
    }

    async fn start_in(
        mut ns: NodeNs,
        index: u8,
        name: &str,
        extra_config: &str,
        kind: RuntimeKind,
        kubeconfig: Option<&Path>,
    ) -> Self {
        let runtime = match kind {
            RuntimeKind::Containerd => NodeRuntime::Containerd(
                Containerd::start(&mut ns, index).await.expect("containerd"),
            ),
            RuntimeKind::Strake => NodeRuntime::Strake(
                StrakeRuntime::start(&mut ns, index)
                    .await
                    .expect("strake-runtime"),
            ),
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("kubelet.yaml");
        std::fs::write(
            &config,
            format!(
                "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n\
                 nodeStatusUpdateFrequency: 1s\nnodeLeaseDurationSeconds: 8\n\
                 cgroupRoot: {}\npodLogsDir: {}\n{extra_config}",
                runtime.cgroup_parent(),
                dir.path().join("pod-logs").display()
            ),
        )
        .expect("kubelet config");
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
            args: args.to_vec(),
            dir,
            runtime,
            ns,
        };
        node.spawn_kubelet();
        node
    }

    fn spawn_kubelet(&mut self) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.kubelet_pid = self
            .ns
            .spawn(
                "strake-kubelet",
                Path::new(env!("CARGO_BIN_EXE_strake-kubelet")),
                &args,
                &self.dir.path().join("kubelet.log"),
            )
            .expect("start kubelet");
    }

    /// Kills the kubelet with SIGKILL (no chance to clean up) and starts a new one.
    pub fn restart_kubelet(&mut self) {
        // SAFETY: kill(2) on the kubelet this test started.
        unsafe { libc::kill(self.kubelet_pid as libc::pid_t, libc::SIGKILL) };
        for _ in 0..100 {
            if !strake_integration::process::pid_alive(self.kubelet_pid) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.spawn_kubelet();
    }

    /// The kubelet's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kubelet.log")).unwrap_or_default()
    }
}
