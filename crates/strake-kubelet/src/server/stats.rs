//! `/stats/summary` (upstream's `stats/v1alpha1` Summary) and `/metrics/resource` (upstream's
//! resource metrics), from CRI container and sandbox stats plus the node's own counters (root
//! cgroup, `/proc`, the root directory's filesystem).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;
use strake_types::cri;

use crate::pod_spec::labels;
use crate::runtime::{Runtime, RuntimeError};

/// Summary of the node and its pods.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub node: NodeStats,
    pub pods: Vec<PodStats>,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStats {
    pub node_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fs: Option<FsStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rlimit: Option<RlimitStats>,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStats {
    pub pod_ref: PodReference,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    pub containers: Vec<ContainerStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkStats>,
    #[serde(rename = "ephemeral-storage", skip_serializing_if = "Option::is_none")]
    pub ephemeral_storage: Option<FsStats>,
    #[serde(rename = "volume", skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeStats>,
}

/// One of a pod's volumes: its filesystem's figures with what the volume itself uses.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeStats {
    #[serde(flatten)]
    pub fs: FsStats,
    pub name: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct PodReference {
    pub name: String,
    pub namespace: String,
    pub uid: String,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStats {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<FsStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logs: Option<FsStats>,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CpuStats {
    pub time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage_nano_cores: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage_core_nano_seconds: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MemoryStats {
    pub time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub working_set_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_faults: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub major_page_faults: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceStats {
    pub name: String,
    pub rx_bytes: u64,
    pub rx_errors: u64,
    pub tx_bytes: u64,
    pub tx_errors: u64,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkStats {
    pub time: String,
    #[serde(flatten)]
    pub default: InterfaceStats,
    pub interfaces: Vec<InterfaceStats>,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FsStats {
    pub time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inodes_free: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inodes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inodes_used: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeStats {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_fs: Option<FsStats>,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RlimitStats {
    pub time: String,
    pub maxpid: Option<u64>,
    pub curproc: Option<u64>,
}

fn rfc3339(ns: i64) -> String {
    jiff::Timestamp::from_nanosecond(i128::from(ns))
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        .to_string()
}

fn now_ns() -> i64 {
    i64::try_from(jiff::Timestamp::now().as_nanosecond()).unwrap_or(i64::MAX)
}

fn v(x: &Option<cri::UInt64Value>) -> Option<u64> {
    x.as_ref().map(|x| x.value)
}

/// Remembers the last cumulative CPU reading per key to derive `usageNanoCores`.
#[derive(Debug, Default)]
pub struct CpuRates {
    last: Mutex<HashMap<String, (i64, u64)>>,
}

impl CpuRates {
    /// The rate since the previous reading of `key` (none on the first one).
    pub fn rate(&self, key: &str, time_ns: i64, usage_ns: u64) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let prev = last.insert(key.to_string(), (time_ns, usage_ns));
        let (t0, u0) = prev?;
        let dt = time_ns.checked_sub(t0).filter(|d| *d > 0)?;
        let du = usage_ns.checked_sub(u0)?;
        Some((u128::from(du) * 1_000_000_000 / dt as u128) as u64)
    }
}

fn cpu_stats(rates: &CpuRates, key: &str, c: &cri::CpuUsage) -> CpuStats {
    let time = if c.timestamp > 0 {
        c.timestamp
    } else {
        now_ns()
    };
    let usage = v(&c.usage_core_nano_seconds);
    let nano_cores = v(&c.usage_nano_cores)
        .filter(|n| *n > 0)
        .or_else(|| usage.and_then(|u| rates.rate(key, time, u)));
    CpuStats {
        time: rfc3339(time),
        usage_nano_cores: nano_cores,
        usage_core_nano_seconds: usage,
    }
}

fn memory_stats(m: &cri::MemoryUsage) -> MemoryStats {
    let time = if m.timestamp > 0 {
        m.timestamp
    } else {
        now_ns()
    };
    MemoryStats {
        time: rfc3339(time),
        available_bytes: v(&m.available_bytes),
        usage_bytes: v(&m.usage_bytes),
        working_set_bytes: v(&m.working_set_bytes),
        rss_bytes: v(&m.rss_bytes),
        page_faults: v(&m.page_faults),
        major_page_faults: v(&m.major_page_faults),
    }
}

fn sum(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
    }
}

/// Parses `/proc/net/dev` (or a pod's `/proc/<pid>/net/dev`), loopback left out.
pub fn parse_net_dev(text: &str) -> Vec<InterfaceStats> {
    text.lines()
        .skip(2)
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let f: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            let name = name.trim();
            (name != "lo" && f.len() >= 11).then(|| InterfaceStats {
                name: name.to_string(),
                rx_bytes: f[0],
                rx_errors: f[2],
                tx_bytes: f[8],
                tx_errors: f[10],
            })
        })
        .collect()
}

fn network(ifaces: Vec<InterfaceStats>) -> Option<NetworkStats> {
    // The default interface is eth0 when there is one, as upstream assumes.
    let default = ifaces
        .iter()
        .find(|i| i.name == "eth0")
        .or_else(|| ifaces.first())
        .cloned()?;
    Some(NetworkStats {
        time: rfc3339(now_ns()),
        default,
        interfaces: ifaces,
    })
}

/// A `/proc/meminfo` value in bytes.
fn meminfo(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Node memory from `/proc/meminfo`: working set = used - inactive file pages, as the root
/// cgroup's figure upstream reports.
pub fn node_memory(meminfo_text: &str, vmstat_text: &str) -> MemoryStats {
    let total = meminfo(meminfo_text, "MemTotal");
    let free = meminfo(meminfo_text, "MemFree");
    let usage = total.zip(free).map(|(t, f)| t.saturating_sub(f));
    let inactive_file = meminfo(meminfo_text, "Inactive(file)").unwrap_or(0);
    let vm = |k: &str| {
        vmstat_text.lines().find_map(|l| {
            let (name, val) = l.split_once(' ')?;
            (name == k).then(|| val.trim().parse().ok())?
        })
    };
    MemoryStats {
        time: rfc3339(now_ns()),
        available_bytes: meminfo(meminfo_text, "MemAvailable"),
        usage_bytes: usage,
        working_set_bytes: usage.map(|u| u.saturating_sub(inactive_file)),
        rss_bytes: sum(
            meminfo(meminfo_text, "Active(anon)"),
            meminfo(meminfo_text, "Inactive(anon)"),
        ),
        page_faults: vm("pgfault"),
        major_page_faults: vm("pgmajfault"),
    }
}

/// Node CPU time: the root cgroup's `usage_usec` (v2), else the non-idle jiffies of
/// `/proc/stat`.
fn node_cpu_usage_ns() -> Option<u64> {
    if let Ok(text) = std::fs::read_to_string("/sys/fs/cgroup/cpu.stat")
        && let Some(us) = text.lines().find_map(|l| {
            l.strip_prefix("usage_usec ")
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
    {
        return Some(us * 1000);
    }
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let f: Vec<u64> = cpu
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
    let busy: u64 = f.iter().take(8).sum::<u64>() - f.get(3)? - f.get(4).unwrap_or(&0);
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0)?;
    Some(busy * (1_000_000_000 / hz))
}

fn boot_time() -> Option<String> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let secs: i64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(rfc3339(secs * 1_000_000_000))
}

fn statvfs(path: &Path) -> Option<FsStats> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `s` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    let frsize = s.f_frsize as u64;
    Some(FsStats {
        time: rfc3339(now_ns()),
        available_bytes: Some(s.f_bavail as u64 * frsize),
        capacity_bytes: Some(s.f_blocks as u64 * frsize),
        used_bytes: Some((s.f_blocks as u64).saturating_sub(s.f_bfree as u64) * frsize),
        inodes_free: Some(s.f_ffree as u64),
        inodes: Some(s.f_files as u64),
        inodes_used: Some((s.f_files as u64).saturating_sub(s.f_ffree as u64)),
    })
}

fn rlimit() -> RlimitStats {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    RlimitStats {
        time: rfc3339(now_ns()),
        maxpid: read("/proc/sys/kernel/pid_max").and_then(|s| s.trim().parse().ok()),
        // The fourth field of loadavg is running/total scheduling entities.
        curproc: read("/proc/loadavg")
            .and_then(|s| s.split_whitespace().nth(3)?.split_once('/')?.1.parse().ok()),
    }
}

fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Entries one volume's walk visits at most (a pod fills its volumes as it likes).
const VOLUME_WALK_LIMIT: usize = 1_000_000;

/// Disk use of the tree at `path` as `du` counts it: allocated blocks, each inode once (hard
/// links), links not followed, at most `limit` entries visited; returns (bytes, inodes). The
/// walk keeps its own stack, never longer than `limit`, so neither a deep tree nor a wide
/// directory costs more than that.
pub fn disk_usage(path: &Path, limit: usize) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let (mut bytes, mut inodes, mut visited) = (0u64, 0u64, 0usize);
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        visited += 1;
        if visited > limit {
            break;
        }
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if m.nlink() > 1 && !m.is_dir() && !seen.insert((m.dev(), m.ino())) {
            continue;
        }
        bytes = bytes.saturating_add(m.blocks().saturating_mul(512));
        inodes += 1;
        if m.is_dir()
            && let Ok(entries) = std::fs::read_dir(&p)
        {
            // The pending paths stay within what may still be visited: a directory of
            // millions of entries never fills the stack past the limit.
            let room = limit.saturating_sub(visited + stack.len());
            stack.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()).take(room));
        }
    }
    (bytes, inodes)
}

/// The stats of each volume the kubelet made for pod `uid` (`<root>/pods/<uid>/volumes/<kind>/<name>`):
/// the filesystem's capacity and free space, and the volume's own use.
pub fn volume_stats(root_dir: &Path, uid: &str) -> Vec<VolumeStats> {
    if uid.is_empty() || uid.contains('/') || uid.starts_with('.') {
        return Vec::new();
    }
    let dir = root_dir.join("pods").join(uid).join("volumes");
    let mut out = Vec::new();
    for kind in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        if !kind.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        for vol in std::fs::read_dir(kind.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if !vol.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = vol.path();
            let mut fs = statvfs(&path).unwrap_or_default();
            let (used, inodes) = disk_usage(&path, VOLUME_WALK_LIMIT);
            fs.time = rfc3339(now_ns());
            fs.used_bytes = Some(used);
            fs.inodes_used = Some(inodes);
            out.push(VolumeStats {
                fs,
                name: vol.file_name().to_string_lossy().into_owned(),
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Collects the summary: node figures from the machine, pods and containers from the CRI.
pub async fn summary(
    runtime: &Runtime,
    rates: &CpuRates,
    node_name: &str,
    root_dir: &Path,
    pod_logs_dir: &Path,
) -> Result<Summary, RuntimeError> {
    let mut client = runtime.runtime_client();
    let sandboxes = runtime
        .call_with(
            "ListPodSandbox",
            None,
            client.list_pod_sandbox(cri::ListPodSandboxRequest {
                filter: Some(cri::PodSandboxFilter {
                    state: Some(cri::PodSandboxStateValue {
                        state: cri::PodSandboxState::SandboxReady as i32,
                    }),
                    ..Default::default()
                }),
            }),
        )
        .await?
        .items;
    let containers = runtime
        .call_with(
            "ListContainers",
            None,
            client.list_containers(cri::ListContainersRequest {
                filter: Some(cri::ContainerFilter {
                    state: Some(cri::ContainerStateValue {
                        state: cri::ContainerState::ContainerRunning as i32,
                    }),
                    ..Default::default()
                }),
            }),
        )
        .await?
        .containers;
    let stats = runtime
        .call_with(
            "ListContainerStats",
            None,
            client.list_container_stats(cri::ListContainerStatsRequest { filter: None }),
        )
        .await?
        .stats;
    // Sandbox stats carry the pod's own cgroup and network figures; older runtimes lack them.
    let sandbox_stats: HashMap<String, cri::PodSandboxStats> = runtime
        .call_with(
            "ListPodSandboxStats",
            None,
            client.list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest { filter: None }),
        )
        .await
        .map(|r| {
            r.stats
                .into_iter()
                .filter_map(|s| Some((s.attributes.as_ref()?.id.clone(), s)))
                .collect()
        })
        .unwrap_or_default();
    let stats_by_id: HashMap<&str, &cri::ContainerStats> = stats
        .iter()
        .filter_map(|s| Some((s.attributes.as_ref()?.id.as_str(), s)))
        .collect();

    let mut pods = Vec::new();
    for sb in &sandboxes {
        let label = |k: &str| sb.labels.get(k).cloned().unwrap_or_default();
        let (name, namespace, uid) = match &sb.metadata {
            Some(m) => (m.name.clone(), m.namespace.clone(), m.uid.clone()),
            None => (
                label(labels::POD_NAME),
                label(labels::POD_NAMESPACE),
                label(labels::POD_UID),
            ),
        };
        let mut pod = PodStats {
            pod_ref: PodReference {
                name: name.clone(),
                namespace: namespace.clone(),
                uid: uid.clone(),
            },
            start_time: Some(rfc3339(sb.created_at)),
            ..Default::default()
        };
        let mut cpu_sum: Option<u64> = None;
        let mut mem = MemoryStats {
            time: rfc3339(now_ns()),
            ..Default::default()
        };
        let mut rootfs_used: Option<u64> = None;
        let mut first_container: Option<&str> = None;
        for c in containers.iter().filter(|c| c.pod_sandbox_id == sb.id) {
            first_container.get_or_insert(c.id.as_str());
            let cname = c
                .metadata
                .as_ref()
                .map(|m| m.name.clone())
                .unwrap_or_default();
            let s = stats_by_id.get(c.id.as_str());
            let cpu = s
                .and_then(|s| s.cpu.as_ref())
                .map(|u| cpu_stats(rates, &c.id, u));
            let memory = s.and_then(|s| s.memory.as_ref()).map(memory_stats);
            let rootfs = s.and_then(|s| s.writable_layer.as_ref()).map(|w| FsStats {
                time: rfc3339(if w.timestamp > 0 {
                    w.timestamp
                } else {
                    now_ns()
                }),
                used_bytes: v(&w.used_bytes),
                inodes_used: v(&w.inodes_used),
                ..Default::default()
            });
            cpu_sum = sum(
                cpu_sum,
                cpu.as_ref().and_then(|c| c.usage_core_nano_seconds),
            );
            if let Some(m) = &memory {
                mem.usage_bytes = sum(mem.usage_bytes, m.usage_bytes);
                mem.working_set_bytes = sum(mem.working_set_bytes, m.working_set_bytes);
                mem.rss_bytes = sum(mem.rss_bytes, m.rss_bytes);
                mem.page_faults = sum(mem.page_faults, m.page_faults);
                mem.major_page_faults = sum(mem.major_page_faults, m.major_page_faults);
            }
            rootfs_used = sum(rootfs_used, rootfs.as_ref().and_then(|r| r.used_bytes));
            let logs_dir = pod_logs_dir
                .join(format!("{namespace}_{name}_{uid}"))
                .join(&cname);
            pod.containers.push(ContainerStats {
                name: cname,
                start_time: Some(rfc3339(c.created_at)),
                cpu,
                memory,
                rootfs,
                logs: Some(FsStats {
                    time: rfc3339(now_ns()),
                    used_bytes: Some(dir_size(&logs_dir)),
                    ..Default::default()
                }),
            });
        }
        pod.containers.sort_by(|a, b| a.name.cmp(&b.name));
        let sandbox = sandbox_stats.get(&sb.id).and_then(|s| s.linux.as_ref());
        pod.cpu = match sandbox.and_then(|l| l.cpu.as_ref()) {
            Some(c) => Some(cpu_stats(rates, &sb.id, c)),
            None => cpu_sum.map(|u| {
                let t = now_ns();
                CpuStats {
                    time: rfc3339(t),
                    usage_nano_cores: rates.rate(&sb.id, t, u),
                    usage_core_nano_seconds: Some(u),
                }
            }),
        };
        pod.memory = match sandbox.and_then(|l| l.memory.as_ref()) {
            Some(m) => Some(memory_stats(m)),
            None => (!pod.containers.is_empty()).then_some(mem),
        };
        pod.network = match sandbox.and_then(|l| l.network.as_ref()) {
            Some(n) => {
                let iface = |i: &cri::NetworkInterfaceUsage| InterfaceStats {
                    name: i.name.clone(),
                    rx_bytes: v(&i.rx_bytes).unwrap_or(0),
                    rx_errors: v(&i.rx_errors).unwrap_or(0),
                    tx_bytes: v(&i.tx_bytes).unwrap_or(0),
                    tx_errors: v(&i.tx_errors).unwrap_or(0),
                };
                Some(NetworkStats {
                    time: rfc3339(if n.timestamp > 0 {
                        n.timestamp
                    } else {
                        now_ns()
                    }),
                    default: n.default_interface.as_ref().map(iface).unwrap_or_default(),
                    interfaces: n.interfaces.iter().map(iface).collect(),
                })
            }
            None => match first_container {
                Some(id) => pod_network_from_pid(runtime, id).await,
                None => None,
            },
        };
        let logs_used: u64 = pod
            .containers
            .iter()
            .filter_map(|c| c.logs.as_ref()?.used_bytes)
            .sum();
        let root = root_dir.to_path_buf();
        let volume_uid = uid.clone();
        pod.volumes = tokio::task::spawn_blocking(move || volume_stats(&root, &volume_uid))
            .await
            .unwrap_or_default();
        // Ephemeral storage: the writable layers, the logs and the pod's local volumes, as
        // upstream sums them.
        let volumes_used: u64 = pod.volumes.iter().filter_map(|v| v.fs.used_bytes).sum();
        pod.ephemeral_storage = Some(FsStats {
            time: rfc3339(now_ns()),
            used_bytes: Some(rootfs_used.unwrap_or(0) + logs_used + volumes_used),
            ..Default::default()
        });
        pods.push(pod);
    }
    pods.sort_by(|a, b| {
        (&a.pod_ref.namespace, &a.pod_ref.name).cmp(&(&b.pod_ref.namespace, &b.pod_ref.name))
    });

    let meminfo_text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let vmstat_text = std::fs::read_to_string("/proc/vmstat").unwrap_or_default();
    let t = now_ns();
    let image_fs = runtime
        .call_with(
            "ImageFsInfo",
            None,
            runtime
                .image_client()
                .image_fs_info(cri::ImageFsInfoRequest {}),
        )
        .await
        .ok()
        .and_then(|r| r.image_filesystems.into_iter().next())
        .map(|f| {
            let mut fs = f
                .fs_id
                .as_ref()
                .and_then(|id| statvfs(Path::new(&id.mountpoint)))
                .unwrap_or_default();
            fs.time = rfc3339(if f.timestamp > 0 { f.timestamp } else { t });
            fs.used_bytes = v(&f.used_bytes).or(fs.used_bytes);
            fs.inodes_used = v(&f.inodes_used).or(fs.inodes_used);
            fs
        });
    let node = NodeStats {
        node_name: node_name.to_string(),
        start_time: boot_time(),
        cpu: node_cpu_usage_ns().map(|u| CpuStats {
            time: rfc3339(t),
            usage_nano_cores: rates.rate("/", t, u),
            usage_core_nano_seconds: Some(u),
        }),
        memory: Some(node_memory(&meminfo_text, &vmstat_text)),
        network: network(parse_net_dev(
            &std::fs::read_to_string("/proc/net/dev").unwrap_or_default(),
        )),
        fs: statvfs(root_dir).or_else(|| statvfs(Path::new("/"))),
        runtime: Some(RuntimeStats { image_fs }),
        rlimit: Some(rlimit()),
    };
    Ok(Summary { node, pods })
}

/// A pod's network counters from `/proc/<pid>/net/dev` of one of its containers, when the
/// runtime reports the PID in its verbose status (containerd does).
async fn pod_network_from_pid(runtime: &Runtime, container_id: &str) -> Option<NetworkStats> {
    let mut client = runtime.runtime_client();
    let status = runtime
        .call_with(
            "ContainerStatus",
            None,
            client.container_status(cri::ContainerStatusRequest {
                container_id: container_id.to_string(),
                verbose: true,
            }),
        )
        .await
        .ok()?;
    let info: serde_json::Value = serde_json::from_str(status.info.get("info")?).ok()?;
    let pid = info.get("pid")?.as_u64()?;
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).ok()?;
    network(parse_net_dev(&text))
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn millis(rfc: &str) -> i64 {
    rfc.parse::<jiff::Timestamp>()
        .map(|t| t.as_millisecond())
        .unwrap_or(0)
}

/// Renders upstream's `/metrics/resource` from a summary (`scrape_error` 1 when it failed).
pub fn resource_metrics(summary: Option<&Summary>) -> String {
    let mut out = String::new();
    let mut family = |name: &str, help: &str, kind: &str, samples: Vec<(String, f64, i64)>| {
        if samples.is_empty() {
            return;
        }
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value, ts) in samples {
            if ts > 0 {
                let _ = writeln!(out, "{name}{labels} {value} {ts}");
            } else {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        }
    };
    let mut c_cpu = Vec::new();
    let mut c_mem = Vec::new();
    let mut c_start = Vec::new();
    let mut p_cpu = Vec::new();
    let mut p_mem = Vec::new();
    let mut n_cpu = Vec::new();
    let mut n_mem = Vec::new();
    if let Some(s) = summary {
        if let Some(c) = &s.node.cpu
            && let Some(u) = c.usage_core_nano_seconds
        {
            n_cpu.push((String::new(), u as f64 / 1e9, millis(&c.time)));
        }
        if let Some(m) = &s.node.memory
            && let Some(w) = m.working_set_bytes
        {
            n_mem.push((String::new(), w as f64, millis(&m.time)));
        }
        for p in &s.pods {
            let pl = format!(
                "namespace=\"{}\",pod=\"{}\"",
                escape(&p.pod_ref.namespace),
                escape(&p.pod_ref.name)
            );
            if let Some(c) = &p.cpu
                && let Some(u) = c.usage_core_nano_seconds
            {
                p_cpu.push((format!("{{{pl}}}"), u as f64 / 1e9, millis(&c.time)));
            }
            if let Some(m) = &p.memory
                && let Some(w) = m.working_set_bytes
            {
                p_mem.push((format!("{{{pl}}}"), w as f64, millis(&m.time)));
            }
            for c in &p.containers {
                let cl = format!("{{container=\"{}\",{pl}}}", escape(&c.name));
                if let Some(cpu) = &c.cpu
                    && let Some(u) = cpu.usage_core_nano_seconds
                {
                    c_cpu.push((cl.clone(), u as f64 / 1e9, millis(&cpu.time)));
                }
                if let Some(m) = &c.memory
                    && let Some(w) = m.working_set_bytes
                {
                    c_mem.push((cl.clone(), w as f64, millis(&m.time)));
                }
                if let Some(st) = &c.start_time {
                    c_start.push((cl, millis(st) as f64 / 1e3, 0));
                }
            }
        }
    }
    family(
        "container_cpu_usage_seconds_total",
        "[STABLE] Cumulative cpu time consumed by the container in core-seconds",
        "counter",
        c_cpu,
    );
    family(
        "container_memory_working_set_bytes",
        "[STABLE] Current working set of the container in bytes",
        "gauge",
        c_mem,
    );
    family(
        "container_start_time_seconds",
        "[STABLE] Start time of the container since unix epoch in seconds",
        "gauge",
        c_start,
    );
    family(
        "node_cpu_usage_seconds_total",
        "[STABLE] Cumulative cpu time consumed by the node in core-seconds",
        "counter",
        n_cpu,
    );
    family(
        "node_memory_working_set_bytes",
        "[STABLE] Current working set of the node in bytes",
        "gauge",
        n_mem,
    );
    family(
        "pod_cpu_usage_seconds_total",
        "[STABLE] Cumulative cpu time consumed by the pod in core-seconds",
        "counter",
        p_cpu,
    );
    family(
        "pod_memory_working_set_bytes",
        "[STABLE] Current working set of the pod in bytes",
        "gauge",
        p_mem,
    );
    family(
        "scrape_error",
        "[ALPHA] 1 if there was an error while getting container metrics, 0 otherwise",
        "gauge",
        vec![(String::new(), if summary.is_some() { 0.0 } else { 1.0 }, 0)],
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_report_their_own_use_without_following_links_or_recursing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let vol = root.join("pods/u1/volumes/kubernetes.io~empty-dir/cache");
        std::fs::create_dir_all(&vol).unwrap();
        std::fs::write(vol.join("a"), vec![1u8; 64 * 1024]).unwrap();
        std::fs::hard_link(vol.join("a"), vol.join("a-again")).unwrap();
        // A link out and a tree deeper than any stack: neither followed nor a crash.
        std::os::unix::fs::symlink("/", vol.join("host")).unwrap();
        let mut deep = vol.join("deep");
        for _ in 0..2000 {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).unwrap();
        let cm = root.join("pods/u1/volumes/kubernetes.io~configmap/config");
        std::fs::create_dir_all(&cm).unwrap();
        std::fs::write(cm.join("key"), "v").unwrap();
        let stats = volume_stats(root, "u1");
        let names: Vec<&str> = stats.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["cache", "config"]);
        let cache = &stats[0].fs;
        assert!(cache.used_bytes.unwrap() >= 64 * 1024);
        // The file once (hard link), the link, the volume dir, "deep" and its 2000 levels.
        assert_eq!(cache.inodes_used, Some(1 + 1 + 1 + 1 + 2000));
        assert!(cache.capacity_bytes.unwrap() > 0);
        assert!(volume_stats(root, "../u1").is_empty());
        assert!(volume_stats(root, "none").is_empty());
        // The walk stops at its limit.
        assert_eq!(disk_usage(&vol, 3).1, 3);
        // A hard-linked file counts once: as much as the same file without its second name.
        let (one, two) = (root.join("one"), root.join("two"));
        for d in [&one, &two] {
            std::fs::create_dir(d).unwrap();
            std::fs::write(d.join("f"), vec![1u8; 64 * 1024]).unwrap();
        }
        std::fs::hard_link(two.join("f"), two.join("g")).unwrap();
        assert_eq!(disk_usage(&one, 10).0, disk_usage(&two, 10).0);
    }

    #[test]
    fn net_dev_parses_without_loopback() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
lo:     100       1    0    0    0     0          0         0      100       1    0    0    0     0       0          0\n  \
eth0:    2000      20    3    0    0     0          0         0     4000      40    5    0    0     0       0          0\n";
        let ifs = parse_net_dev(text);
        assert_eq!(
            ifs,
            vec![InterfaceStats {
                name: "eth0".into(),
                rx_bytes: 2000,
                rx_errors: 3,
                tx_bytes: 4000,
                tx_errors: 5
            }]
        );
        let n = network(ifs).unwrap();
        let json = serde_json::to_value(&n).unwrap();
        assert_eq!(json["name"], "eth0");
        assert_eq!(json["rxBytes"], 2000);
        assert_eq!(json["interfaces"][0]["txErrors"], 5);
    }

    #[test]
    fn node_memory_working_set_leaves_out_inactive_file_pages() {
        let m = node_memory(
            "MemTotal: 1000 kB\nMemFree: 200 kB\nMemAvailable: 600 kB\nInactive(file): 300 kB\nActive(anon): 10 kB\nInactive(anon): 5 kB\n",
            "pgfault 7\npgmajfault 2\n",
        );
        assert_eq!(m.usage_bytes, Some(800 * 1024));
        assert_eq!(m.working_set_bytes, Some(500 * 1024));
        assert_eq!(m.available_bytes, Some(600 * 1024));
        assert_eq!(m.rss_bytes, Some(15 * 1024));
        assert_eq!((m.page_faults, m.major_page_faults), (Some(7), Some(2)));
    }

    #[test]
    fn cpu_rate_needs_two_readings() {
        let r = CpuRates::default();
        assert_eq!(r.rate("c", 1_000_000_000, 0), None);
        // Half a core for two seconds.
        assert_eq!(r.rate("c", 3_000_000_000, 1_000_000_000), Some(500_000_000));
        assert_eq!(
            r.rate("c", 3_000_000_000, 2_000_000_000),
            None,
            "no time passed"
        );
    }

    #[test]
    fn resource_metrics_use_upstreams_names() {
        let t = "2026-01-02T03:04:05Z".to_string();
        let s = Summary {
            node: NodeStats {
                node_name: "n".into(),
                cpu: Some(CpuStats {
                    time: t.clone(),
                    usage_core_nano_seconds: Some(2_500_000_000),
                    ..Default::default()
                }),
                memory: Some(MemoryStats {
                    time: t.clone(),
                    working_set_bytes: Some(1024),
                    ..Default::default()
                }),
                ..Default::default()
            },
            pods: vec![PodStats {
                pod_ref: PodReference {
                    name: "p".into(),
                    namespace: "ns".into(),
                    uid: "u".into(),
                },
                containers: vec![ContainerStats {
                    name: "c\"1".into(),
                    start_time: Some(t.clone()),
                    cpu: Some(CpuStats {
                        time: t.clone(),
                        usage_core_nano_seconds: Some(1_000_000_000),
                        ..Default::default()
                    }),
                    memory: Some(MemoryStats {
                        time: t.clone(),
                        working_set_bytes: Some(4096),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                memory: Some(MemoryStats {
                    time: t.clone(),
                    working_set_bytes: Some(4096),
                    ..Default::default()
                }),
                ..Default::default()
            }],
        };
        let text = resource_metrics(Some(&s));
        let ms = millis(&t);
        for line in [
            format!("node_cpu_usage_seconds_total 2.5 {ms}"),
            format!("node_memory_working_set_bytes 1024 {ms}"),
            format!(
                "container_cpu_usage_seconds_total{{container=\"c\\\"1\",namespace=\"ns\",pod=\"p\"}} 1 {ms}"
            ),
            format!(
                "container_memory_working_set_bytes{{container=\"c\\\"1\",namespace=\"ns\",pod=\"p\"}} 4096 {ms}"
            ),
            format!(
                "container_start_time_seconds{{container=\"c\\\"1\",namespace=\"ns\",pod=\"p\"}} {}",
                ms / 1000
            ),
            format!("pod_memory_working_set_bytes{{namespace=\"ns\",pod=\"p\"}} 4096 {ms}"),
            "# TYPE container_cpu_usage_seconds_total counter".into(),
            "scrape_error 0".into(),
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        assert!(resource_metrics(None).contains("scrape_error 1"));
    }
}
