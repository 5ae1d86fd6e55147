//! Network namespaces of the test bed: the cluster network and the nodes on it.
//!
//! Namespaces are made with iproute2 (`ip netns add`, which pins them under `/run/netns`) and
//! entered with `nsenter --net` only, so that processes inside still see the host's mounts
//! (`ip netns exec` would give them a private mount namespace and hide a runtime's mounts).

use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::process::{self, Daemon};
use crate::{Error, Result};

/// Prefix of every namespace the test bed creates; the owner's PID follows, so namespaces
/// left by a test process that was killed can be recognised and swept.
const PREFIX: &str = "strake-tb";

/// The cluster network: 10.213.0.0/24 on bridge `tb0` inside the cluster namespace.
pub const CLUSTER_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
const CLUSTER_PREFIX_LEN: u8 = 24;
const BRIDGE: &str = "tb0";

/// A network namespace pinned at `/run/netns/<name>`, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates a namespace named `strake-tb-<pid>-<role><n>` with loopback up.
    pub fn create(role: &str) -> Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        sweep_stale();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}-{}-{role}{n}", std::process::id());
        process::run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name under `/run/netns`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind mount that pins the namespace.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// The namespace's inode number, as `/proc/<pid>/ns/net` of its processes shows it.
    pub fn inode(&self) -> Result<u64> {
        let path = self.path();
        Ok(std::fs::metadata(&path)
            .map_err(crate::io_err("stat", path))?
            .ino())
    }

    /// A command that runs `program` inside this network namespace (and no other namespace).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `program args...` inside the namespace to completion.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<Output> {
        process::run(self.command(program).args(args))
    }

    /// Runs `ip -n <ns> args...`.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        process::run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// PIDs of all processes whose network namespace is this one.
    pub fn pids(&self) -> Result<Vec<u32>> {
        let ino = self.inode()?;
        Ok(pids_in_netns(ino))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = process::run(Command::new("ip").args(["netns", "del", &self.name])) {
            tracing::warn!(ns = %self.name, error = %e, "cannot delete network namespace");
        }
    }
}

/// PIDs of the processes in the network namespace with inode `ino`.
pub fn pids_in_netns(ino: u64) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| m.ino() == ino)
        })
        .collect()
}

/// Deletes namespaces of this test bed whose owning process is gone (a test run killed before
/// its guards could run). Only names with our prefix and a dead owner PID are touched.
fn sweep_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in dir.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(owner) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !process::pid_alive(owner) {
            tracing::info!(ns = %name, "removing stale test-bed namespace");
            let _ = process::run(Command::new("ip").args(["netns", "del", &name]));
        }
    }
}

/// The cluster network: a namespace with bridge `tb0` (10.213.0.1/24) that the control plane
/// and registry listen in, and that every [`NodeNs`] is plugged into with a veth pair.
#[derive(Debug)]
pub struct ClusterNet {
    ns: NetNs,
}

impl ClusterNet {
    /// Creates the cluster namespace and its bridge.
    pub fn create() -> Result<Self> {
        let ns = NetNs::create("cluster")?;
        ns.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{CLUSTER_GATEWAY}/{CLUSTER_PREFIX_LEN}"),
            "dev",
            BRIDGE,
        ])?;
        ns.ip(&["link", "set", BRIDGE, "up"])?;
        Ok(ClusterNet { ns })
    }

    /// The cluster namespace.
    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// Creates node number `index` (0..=200): a namespace whose `eth0` has 10.213.0.<10+index>
    /// and a default route via the cluster gateway.
    pub fn add_node(&self, index: u8) -> Result<NodeNs> {
        if index > 200 {
            return Err(Error::Invalid(format!("node index {index} is above 200")));
        }
        let ns = NetNs::create("node")?;
        let ip = Ipv4Addr::new(10, 213, 0, 10 + index);
        let host_end = format!("vn{index}");
        self.ns.ip(&[
            "link",
            "add",
            &host_end,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        self.ns
            .ip(&["link", "set", &host_end, "master", BRIDGE, "up"])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{ip}/{CLUSTER_PREFIX_LEN}"),
            "dev",
            "eth0",
        ])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &CLUSTER_GATEWAY.to_string(),
        ])?;
        Ok(NodeNs {
            daemons: Vec::new(),
            ns,
            ip,
            veth: host_end,
        })
    }
}

/// A node of the test cluster: its own network namespace on the cluster bridge. Daemons
/// started with [`NodeNs::spawn`] run inside it and are stopped before it is deleted; whatever
/// they left running in the namespace (container shims, pod processes: all descendants of what
/// the test started there) is killed by PID before the namespace goes.
#[derive(Debug)]
pub struct NodeNs {
    // Declared first: dropped (stopped) before the namespace goes away.
    daemons: Vec<Daemon>,
    ns: NetNs,
    ip: Ipv4Addr,
    veth: String,
}

impl Drop for NodeNs {
    fn drop(&mut self) {
        while let Some(mut d) = self.daemons.pop() {
            d.stop(std::time::Duration::from_secs(10));
        }
        self.kill_leftovers();
        // Deleting one end of a veth pair deletes both at once; the kernel would also delete
        // them with the namespace, but later, from a work queue, after `ip netns del` returned.
        if let Err(e) = self.ns.ip(&["link", "del", "eth0"]) {
            tracing::warn!(ns = %self.ns.name(), error = %e, "cannot delete the node's veth");
        }
    }
}

impl NodeNs {
    /// Kills by PID whatever still runs in the namespace (descendants of what the test
    /// started there).
    fn kill_leftovers(&self) {
        let Ok(ino) = self.ns.inode() else { return };
        for _ in 0..50 {
            let left = pids_in_netns(ino);
            if left.is_empty() {
                return;
            }
            for pid in left {
                tracing::debug!(pid, ns = %self.ns.name(), "killing leftover process");
                // SAFETY: kill(2) has no memory effects; the PID is a process living in a
                // namespace only this test bed puts processes into.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        tracing::warn!(ns = %self.ns.name(), "processes survived SIGKILL in node namespace");
    }
}

impl NodeNs {
    /// The node's namespace.
    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// The node's address on the cluster network.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The name of the veth end inside the cluster namespace.
    pub fn cluster_veth(&self) -> &str {
        &self.veth
    }

    /// Starts a daemon inside the node's network namespace; it is stopped when the node is
    /// dropped. Returns its PID.
    pub fn spawn(&mut self, name: &str, program: &Path, args: &[&str], log: &Path) -> Result<u32> {
        self.spawn_with_env(name, program, args, &[], log)
    }

    /// [`NodeNs::spawn`] with `env` added to the daemon's environment.
    pub fn spawn_with_env(
        &mut self,
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
        log: &Path,
    ) -> Result<u32> {
        let mut cmd = self.ns.command(program);
        cmd.args(args);
        cmd.envs(env.iter().copied());
        let daemon = Daemon::spawn(name, cmd, log)?;
        let pid = daemon.pid();
        self.daemons.push(daemon);
        Ok(pid)
    }
}
