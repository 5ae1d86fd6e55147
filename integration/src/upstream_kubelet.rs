//! The upstream kubelet (the test bed's build of `k8s.io/kubernetes/cmd/kubelet`) on a test
//! node: the peer strake-kubelet is measured against, and the CRI client strake-runtime is
//! judged by (it talks to whichever runtime endpoint it is given: containerd or strake-runtime,
//! both running in the host's mount namespace). With [`ServingTls`] its 10250 serves a
//! certificate of the cluster CA, so that `kubectl logs` and `exec` reach it.
//!
//! The kubelet is a host agent: left to its defaults it changes the machine it runs on. This
//! launcher keeps every change inside what the test bed owns:
//!
//! - **Network**: it runs in the node's network namespace ([`NodeNs`]), so its ports (10250,
//!   10248) stay there; `makeIPTablesUtilChains: false` (it would add a hint chain there).
//! - **Kernel tunables**: at start it wants `vm.overcommit_memory=1`, `kernel.panic=10`,
//!   `kernel.panic_on_oops=1` (and three more); with `protectKernelDefaults: false` it writes
//!   them, with `true` it refuses to start when they differ. Neither is acceptable on a shared
//!   machine, so it runs in its own mount namespace in which the six files under `/proc/sys` are
//!   bind mounts of files holding the values it expects, and `protectKernelDefaults: true`
//!   guarantees it only reads them.
//! - **Files**: `--root-dir`, `--cert-dir`, `podLogsDir`, `volumePluginDir` and `resolvConf`
//!   are in the guard's directory. Two fixed paths it writes whatever its flags say are masked
//!   by directories of ours inside its mount namespace: `/var/log` (it creates
//!   `/var/log/containers` for log symlinks) and `/var/lib` (the device plugin manager's
//!   socket and checkpoint go to `/var/lib/kubelet/device-plugins`).
//! - **Mounts**: its root directory is a shared bind mount made before it starts, so that the
//!   tmpfs volumes (service-account tokens) it mounts there from its own mount namespace also
//!   appear in the host's, where the runtime bind-mounts them into containers. Everything below
//!   the guard's directory is unmounted on drop.
//! - **cgroups**: `cgroupRoot` is [`KubeletCgroupRoot`], a path below this process's own cgroup
//!   in every hierarchy; the kubelet creates `kubepods` and the QoS and pod cgroups below it
//!   (`cgroupsPerQOS: true`, upstream's default), and nothing elsewhere: no `kubeletCgroups`,
//!   `systemCgroups` or `runtimeCgroups`, `enforceNodeAllocatable: []`.
//! - **Processes**: `oomScoreAdj: 0` (it would lower its own to -999, which this machine
//!   denies); it only talks to the runtime it is given, whose pods are the only ones it can
//!   see or kill.
//! - **cgroup v1**: `failCgroupV1: false`, since this kind of machine still mounts v1
//!   controllers (upstream refuses v1 by default since 1.35).
//! - **Eviction and image GC**: hard eviction thresholds at 1 % / 1 Mi and image GC at 100 %,
//!   so that a busy shared disk cannot make it evict the pods being measured.
//!
//! Left as upstream does it: its cAdvisor reads the machine's cgroups and `/dev/kmsg` (the OOM
//! watcher), read-only.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::cgroup;
use crate::containerd::unmount_below;
use crate::netns::NodeNs;
use crate::pki::CertFiles;
use crate::process::Daemon;
use crate::{Error, Result, paths};

/// The kernel tunables the kubelet checks at start (`setupKernelTunables`) and the values it
/// expects: (path under `/proc/sys`, value).
const KERNEL_TUNABLES: [(&str, &str); 6] = [
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("kernel/keys/root_maxkeys", "1000000"),
    ("kernel/keys/root_maxbytes", "25000000"),
];

/// An absolute cgroup path for the kubelet's `cgroupRoot`, below this process's own cgroup in
/// every mounted hierarchy, created in all of them (the kubelet checks that it exists).
///
/// Unlike [`cgroup::CgroupParent`], which OCI runtimes resolve relative to their own cgroup per
/// hierarchy, the kubelet takes one absolute path for all hierarchies. It is our deepest own
/// cgroup (every other hierarchy has us at an ancestor of that path) plus a fresh name.
/// Dropping the guard removes the tree below it and every directory it had to create on the
/// way, deepest first, and nothing that existed before.
#[derive(Debug)]
pub struct KubeletCgroupRoot {
    path: String,
    /// Directories this guard created, in creation order (parents first).
    created: Vec<PathBuf>,
    /// Where `path` is in each hierarchy.
    locations: Vec<PathBuf>,
}

impl KubeletCgroupRoot {
    /// Picks the path and creates it in every hierarchy.
    pub fn create() -> Result<Self> {
        let own = cgroup::own_cgroups();
        if own.is_empty() {
            return Err(Error::Invalid("no cgroup hierarchy is mounted".into()));
        }
        let deepest = own
            .iter()
            .map(|(_, p)| p.trim_end_matches('/').to_string())
            .max_by_key(|p| p.len())
            .unwrap_or_default();
        for (mount, p) in &own {
            let p = p.trim_end_matches('/');
            if !(deepest == p || deepest.starts_with(&format!("{p}/")) || p.is_empty()) {
                return Err(Error::Invalid(format!(
                    "our cgroups differ per hierarchy ({} has {p:?}, another {deepest:?}): \
                     no single cgroupRoot is below all of them",
                    mount.display()
                )));
            }
        }
        let name = cgroup::CgroupParent::new().name().to_string();
        let path = format!("{deepest}/{name}");
        let mut guard = KubeletCgroupRoot {
            path,
            created: Vec::new(),
            locations: Vec::new(),
        };
        for (mount, p) in &own {
            let base = mount.join(p.trim_start_matches('/'));
            let location = mount.join(guard.path.trim_start_matches('/'));
            let rest = location
                .strip_prefix(&base)
                .map_err(|_| {
                    Error::Invalid(format!("{} outside {}", location.display(), base.display()))
                })?
                .to_path_buf();
            let mut dir = base;
            for component in rest.components() {
                let parent = dir.clone();
                dir.push(component);
                if dir.exists() {
                    continue;
                }
                std::fs::create_dir(&dir).map_err(crate::io_err("create cgroup", &dir))?;
                guard.created.push(dir.clone());
                inherit_cpuset(&parent, &dir);
            }
            guard.locations.push(location);
        }
        Ok(guard)
    }

    /// The absolute cgroupfs path (`/…/strake-tb-<pid>-<n>`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Where the path is in each hierarchy.
    pub fn locations(&self) -> &[PathBuf] {
        &self.locations
    }
}

/// A new cgroup v1 cpuset starts with no CPUs and memory nodes unless told otherwise; give it
/// its parent's, as runc does for the cgroups it creates.
fn inherit_cpuset(parent: &Path, dir: &Path) {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let mine = dir.join(file);
        if !mine.exists() {
            continue;
        }
        if std::fs::read_to_string(&mine).is_ok_and(|s| !s.trim().is_empty()) {
            continue;
        }
        if let Ok(value) = std::fs::read_to_string(parent.join(file))
            && let Err(e) = std::fs::write(&mine, value.trim())
        {
            tracing::warn!(cgroup = %dir.display(), error = %e, "cannot set {file}");
        }
    }
}

impl Drop for KubeletCgroupRoot {
    fn drop(&mut self) {
        for location in &self.locations {
            if location.exists() {
                cgroup::remove_tree(location);
            }
        }
        for dir in self.created.iter().rev() {
            if dir.exists()
                && let Err(e) = std::fs::remove_dir(dir)
            {
                tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove test cgroup");
            }
        }
    }
}

/// What the kubelet needs from its surroundings.
#[derive(Clone, Debug)]
pub struct Options<'a> {
    /// The Node name (`--hostname-override`).
    pub node_name: &'a str,
    /// A kubeconfig for `system:node:<name>` reaching the API server from the node namespace.
    pub kubeconfig: &'a Path,
    /// The CRI endpoint (`unix:///…`).
    pub runtime_endpoint: &'a str,
    /// The cgroup the kubelet puts `kubepods` under.
    pub cgroup_root: &'a KubeletCgroupRoot,
    /// Appended to the KubeletConfiguration YAML (keys not set by this launcher).
    pub extra_config: &'a str,
}

/// The kubelet's 10250 as the API server reaches it for logs, exec and port-forward: a serving
/// certificate of the cluster CA (the API server verifies it, and upstream's self-signed one
/// names no IP address), and the CA whose client certificates (the API server's) it accepts.
#[derive(Clone, Debug)]
pub struct ServingTls<'a> {
    /// The serving certificate and key (from [`crate::pki::Pki::issue_server`]).
    pub serving: &'a CertFiles,
    /// The CA of the client certificates it accepts (`authentication.x509.clientCAFile`).
    pub client_ca: &'a Path,
}

/// The upstream kubelet running in a node namespace. Dropping it stops it (SIGTERM, then
/// SIGKILL) and unmounts everything below its directory. Pods it started stay with the
/// runtime, whose guard removes them.
pub struct UpstreamKubelet {
    daemon: Option<Daemon>,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for UpstreamKubelet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamKubelet")
            .field("pid", &self.daemon.as_ref().map(Daemon::pid))
            .field("dir", &self.dir.path())
            .finish()
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(crate::io_err("create", parent))?;
    }
    std::fs::write(path, text).map_err(crate::io_err("write", path))
}

fn mount(args: &[&str]) -> Result<()> {
    crate::process::run(Command::new("mount").args(args)).map(|_| ())
}

/// Single-quotes `s` for `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl UpstreamKubelet {
    /// Starts the kubelet in `node`. It registers its Node asynchronously; wait for the Node to
    /// be Ready (checking [`UpstreamKubelet::check_running`]) before giving it pods.
    pub fn start(node: &NodeNs, opts: &Options<'_>) -> Result<Self> {
        Self::start_with_tls(node, opts, None)
    }

    /// [`UpstreamKubelet::start`], with `tls` on 10250 so that the API server can reach it
    /// (`kubectl logs`, `exec`, `port-forward`); without it, 10250 serves a self-signed
    /// certificate the API server refuses.
    pub fn start_with_tls(
        node: &NodeNs,
        opts: &Options<'_>,
        tls: Option<&ServingTls<'_>>,
    ) -> Result<Self> {
        let kubelet = paths::kubernetes_bin("kubelet")?;
        let dir = tempfile::Builder::new()
            .prefix("strake-upstream-kubelet-")
            .tempdir()
            .map_err(crate::io_err("create", std::env::temp_dir()))?;
        let d = dir.path().to_path_buf();
        let root = d.join("root");
        std::fs::create_dir_all(&root).map_err(crate::io_err("create", &root))?;
        // The guard exists from here on, so a failure below still unmounts what was mounted.
        let mut guard = UpstreamKubelet { daemon: None, dir };
        let root_s = root.display().to_string();
        mount(&["--bind", &root_s, &root_s])?;
        mount(&["--make-shared", &root_s])?;

        for (file, value) in KERNEL_TUNABLES {
            write(&d.join("sysctl").join(file), &format!("{value}\n"))?;
        }
        for masked in ["var-log", "var-lib"] {
            let dir = d.join(masked);
            std::fs::create_dir_all(&dir).map_err(crate::io_err("create", &dir))?;
        }
        write(&d.join("resolv.conf"), "nameserver 10.213.0.1\n")?;
        let (tls_files, client_ca) = match tls {
            Some(t) => (
                format!(
                    "tlsCertFile: {}\ntlsPrivateKeyFile: {}\n",
                    t.serving.cert.display(),
                    t.serving.key.display()
                ),
                format!("  x509:\n    clientCAFile: {}\n", t.client_ca.display()),
            ),
            None => (String::new(), String::new()),
        };
        let config = d.join("kubelet.yaml");
        write(
            &config,
            &format!(
                "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failCgroupV1: false
cgroupsPerQOS: true
cgroupRoot: {cgroup_root}
enforceNodeAllocatable: []
failSwapOn: false
protectKernelDefaults: true
oomScoreAdj: 0
makeIPTablesUtilChains: false
readOnlyPort: 0
resolvConf: {resolv}
podLogsDir: {pod_logs}
volumePluginDir: {plugins}
{tls_files}authentication:
{client_ca}  anonymous:
    enabled: false
  webhook:
    enabled: true
authorization:
  mode: Webhook
evictionHard:
  memory.available: 1Mi
  nodefs.available: 1%
  nodefs.inodesFree: 1%
  imagefs.available: 1%
  imagefs.inodesFree: 1%
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
{extra}",
                cgroup_root = opts.cgroup_root.path(),
                resolv = d.join("resolv.conf").display(),
                pod_logs = d.join("pod-logs").display(),
                plugins = d.join("volume-plugins").display(),
                extra = opts.extra_config,
            ),
        )?;

        // Inside its own mount namespace (propagation unchanged, so the shared root dir stays
        // shared with the host): keep the masks private, then mask and exec the kubelet.
        let mut script = String::from(
            "set -e\nmount --make-rprivate /proc\n\
             mount --make-private \"$(findmnt -n -o TARGET -T /var/log)\"\n\
             mount --make-private \"$(findmnt -n -o TARGET -T /var/lib)\"\n",
        );
        for (file, _) in KERNEL_TUNABLES {
            script.push_str(&format!(
                "mount --bind {} /proc/sys/{file}\n",
                sh_quote(&d.join("sysctl").join(file).display().to_string())
            ));
        }
        script.push_str(&format!(
            "mount --bind {} /var/log\nmount --bind {} /var/lib\nexec \"$@\"\n",
            sh_quote(&d.join("var-log").display().to_string()),
            sh_quote(&d.join("var-lib").display().to_string())
        ));
        let mut cmd = node.ns().command("unshare");
        cmd.args([
            "--mount",
            "--propagation",
            "unchanged",
            "--",
            "/bin/sh",
            "-c",
        ])
        .arg(&script)
        .arg("upstream-kubelet")
        .arg(&kubelet)
        .args([
            format!("--config={}", config.display()),
            format!("--kubeconfig={}", opts.kubeconfig.display()),
            format!("--container-runtime-endpoint={}", opts.runtime_endpoint),
            format!("--hostname-override={}", opts.node_name),
            format!("--node-ip={}", node.ip()),
            format!("--root-dir={root_s}"),
            format!("--cert-dir={}", d.join("pki").display()),
            "--v=1".to_string(),
        ]);
        guard.daemon = Some(Daemon::spawn("kubelet", cmd, &d.join("kubelet.log"))?);
        Ok(guard)
    }

    /// The kubelet's PID (`nsenter`, `unshare` and `sh` all exec, so this is the kubelet).
    pub fn pid(&self) -> u32 {
        self.daemon.as_ref().map(Daemon::pid).unwrap_or(0)
    }

    /// Fails with the end of its log if the kubelet has exited.
    pub fn check_running(&mut self) -> Result<()> {
        match self.daemon.as_mut() {
            Some(d) => d.check_running(),
            None => Err(Error::Invalid("kubelet not started".into())),
        }
    }

    /// The kubelet's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("kubelet.log")
    }

    /// The guard's directory (config, root dir, pod logs, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for UpstreamKubelet {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.stop(Duration::from_secs(10));
        }
        unmount_below(self.dir.path());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sh_quote_survives_quotes() {
        assert_eq!(sh_quote("/tmp/a b"), "'/tmp/a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }
}
