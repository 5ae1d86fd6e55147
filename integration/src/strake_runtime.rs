//! strake-runtime on a test node: the same role as [`crate::containerd::Containerd`], so that a
//! test can run one scenario on either runtime.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cgroup::CgroupParent;
use crate::containerd::{cni_conflist, unmount_below};
use crate::netns::{CLUSTER_GATEWAY, NodeNs};
use crate::registry::{OPEN_PORT, PROTECTED_PORT};
use crate::{Error, Result, paths, process};

/// A strake-runtime daemon inside a node namespace. Dropping it removes every pod (through
/// CRI), stops the daemon, and unmounts and removes its directories.
pub struct StrakeRuntime {
    dir: tempfile::TempDir,
    socket: PathBuf,
    cgroup: CgroupParent,
    pid: u32,
}

impl std::fmt::Debug for StrakeRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StrakeRuntime")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl StrakeRuntime {
    /// Starts strake-runtime (from this workspace's target directory) in `node`, number
    /// `node_index`, and waits until it answers CRI.
    pub async fn start(node: &mut NodeNs, node_index: u8) -> Result<Self> {
        Self::start_with(node, node_index, &[]).await
    }

    /// [`StrakeRuntime::start`] with `extra_args` appended to the command line (registry
    /// mirrors, for instance).
    pub async fn start_with(
        node: &mut NodeNs,
        node_index: u8,
        extra_args: &[String],
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("strake-runtime-")
            .tempdir()
            .map_err(crate::io_err("create", std::env::temp_dir()))?;
        let d = dir.path();
        let socket = d.join("runtime.sock");
        let cni = d.join("cni");
        std::fs::create_dir_all(&cni).map_err(crate::io_err("create", &cni))?;
        let conflist = cni.join("10-strake-testbed.conflist");
        std::fs::write(&conflist, cni_conflist(node_index, &d.join("ipam")))
            .map_err(crate::io_err("write", &conflist))?;
        let mut args = vec![
            format!("--listen={}", socket.display()),
            format!("--state-dir={}", d.join("state").display()),
            format!("--run-dir={}", d.join("run").display()),
            format!("--cni-conf-dir={}", cni.display()),
            format!("--cni-bin-dir={}", paths::cni_bin_dir()?.display()),
            format!(
                "--pause-binary={}",
                paths::workspace_bin("strake-pause")?.display()
            ),
            format!("--config={}", d.join("runtime.toml").display()),
        ];
        for port in [OPEN_PORT, PROTECTED_PORT] {
            args.push(format!("--insecure-registry={CLUSTER_GATEWAY}:{port}"));
        }
        // RuntimeClass handler "gvisor", as an operator adds it: gVisor's runsc on its systrap
        // platform (no KVM or ptrace needed), each pod in one sandbox started by an infra
        // container of the test bed's pause image.
        args.extend([
            format!("--runtime-handler=gvisor={}", paths::runsc_bin()?.display()),
            "--runtime-handler-option=gvisor=--platform=systrap".into(),
            "--infra-container-handler=gvisor".into(),
            format!("--sandbox-image={CLUSTER_GATEWAY}:{OPEN_PORT}/strake/pause:1"),
        ]);
        args.extend(extra_args.iter().cloned());
        let config = d.join("runtime.toml");
        std::fs::write(&config, "").map_err(crate::io_err("write", &config))?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let pid = node.spawn(
            "strake-runtime",
            &paths::workspace_bin("strake-runtime")?,
            &args,
            &d.join("runtime.log"),
        )?;
        let rt = StrakeRuntime {
            dir,
            socket,
            cgroup: CgroupParent::new(),
            pid,
        };
        let mut last_error = String::new();
        for _ in 0..150 {
            if !process::pid_alive(pid) {
                let log =
                    std::fs::read_to_string(rt.dir.path().join("runtime.log")).unwrap_or_default();
                return Err(Error::Invalid(format!("strake-runtime exited: {log}")));
            }
            match rt.crictl(&["version"]) {
                Ok(_) => return Ok(rt),
                Err(e) => last_error = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(Error::Timeout {
            what: "strake-runtime CRI".into(),
            secs: 15,
            last_error,
        })
    }

    /// The CRI endpoint, as `unix://<path>`.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The relative cgroup parent pods on this runtime must use.
    pub fn cgroup_parent(&self) -> &str {
        self.cgroup.name()
    }

    /// The daemon's PID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The daemon's working directory (state, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `crictl` against this runtime.
    pub fn crictl(&self, args: &[&str]) -> Result<std::process::Output> {
        crate::cri::crictl(&self.endpoint(), args)
    }
}

impl Drop for StrakeRuntime {
    fn drop(&mut self) {
        crate::cri::shut_down("strake-runtime", self.pid, &self.endpoint());
        unmount_below(self.dir.path());
    }
}
