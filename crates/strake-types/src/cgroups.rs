//! Where containers' cgroups live: the host's cgroup hierarchy (v1, hybrid or unified v2), the
//! cgroup driver (cgroupfs or systemd), the `cgroupsPath` handed to the OCI runtime and the
//! directories that path becomes, which stats read.
//!
//! Detection parses `/proc/self/mountinfo` text ([`CgroupLayout::from_mountinfo`] is pure); the
//! only file reads are [`CgroupLayout::detect`], [`CgroupDriver::detect`] and the small readers on
//! [`ContainerCgroup`]. Nothing here creates, moves or removes a cgroup: the OCI runtime does that.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The prefix of a container's systemd scope (`strake-<id>.scope`), like containerd's
/// `cri-containerd`.
pub const SYSTEMD_SCOPE_PREFIX: &str = "strake";

/// Failures reading the host's cgroup setup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// `/proc/self/mountinfo` could not be read.
    #[error("read {path}")]
    ReadMountinfo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// No cgroup filesystem is mounted at all.
    #[error("no cgroup filesystem is mounted")]
    NoCgroupMount,
    /// A cgroup control file could not be read or parsed.
    #[error("read cgroup file {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Which cgroup manager creates containers' cgroups (the OCI runtime's `--systemd-cgroup`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CgroupDriver {
    /// The runtime writes cgroupfs directly; `cgroupsPath` is a path.
    #[default]
    Cgroupfs,
    /// The runtime asks systemd for a scope; `cgroupsPath` is `slice:prefix:name`.
    Systemd,
}

impl CgroupDriver {
    /// The driver a node should use: systemd when systemd is the init system (the same test as
    /// `sd_booted(3)`), cgroupfs otherwise.
    pub fn detect() -> Self {
        if Path::new("/run/systemd/system").is_dir() {
            CgroupDriver::Systemd
        } else {
            CgroupDriver::Cgroupfs
        }
    }

    /// The name the CRI `RuntimeConfig` and kubelet flags use.
    pub fn as_str(self) -> &'static str {
        match self {
            CgroupDriver::Cgroupfs => "cgroupfs",
            CgroupDriver::Systemd => "systemd",
        }
    }
}

/// The shape of the host's cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupMode {
    /// Only cgroup v1 hierarchies.
    Legacy,
    /// cgroup v1 controllers plus a controller-less cgroup2 mount (systemd's "hybrid" mode,
    /// usually at `/sys/fs/cgroup/unified`).
    Hybrid,
    /// A single cgroup v2 hierarchy holding all controllers.
    Unified,
}

/// The mounted cgroup hierarchies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupLayout {
    /// Legacy, hybrid or unified.
    pub mode: CgroupMode,
    /// Mount point of each v1 controller (`memory`, `cpu`, `name=systemd`, ...). Co-mounted
    /// controllers (`cpu,cpuacct`) appear once per controller with the same mount point.
    pub v1: BTreeMap<String, PathBuf>,
    /// Mount point of the cgroup2 hierarchy, if any.
    pub unified: Option<PathBuf>,
}

impl CgroupLayout {
    /// Reads the current process's mount table.
    pub fn detect() -> Result<Self, CgroupError> {
        let path = PathBuf::from("/proc/self/mountinfo");
        let text = std::fs::read_to_string(&path)
            .map_err(|source| CgroupError::ReadMountinfo { path, source })?;
        Self::from_mountinfo(&text)
    }

    /// Parses `mountinfo(5)` text. The first mount of each controller wins, as for runc.
    pub fn from_mountinfo(text: &str) -> Result<Self, CgroupError> {
        let mut v1 = BTreeMap::new();
        let mut unified = None;
        for line in text.lines() {
            // `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS`
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let fields: Vec<&str> = left.split(' ').collect();
            let mut right = right.split(' ');
            let (Some(fstype), Some(_source), Some(super_opts)) =
                (right.next(), right.next(), right.next())
            else {
                continue;
            };
            let Some(mount_point) = fields.get(4) else {
                continue;
            };
            let mount_point = PathBuf::from(unescape_mountinfo(mount_point));
            match fstype {
                "cgroup2" => {
                    unified.get_or_insert(mount_point);
                }
                "cgroup" => {
                    for opt in super_opts.split(',') {
                        if is_v1_controller_option(opt) {
                            v1.entry(opt.to_string())
                                .or_insert_with(|| mount_point.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        let mode = match (v1.is_empty(), unified.is_some()) {
            (true, true) => CgroupMode::Unified,
            (false, true) => CgroupMode::Hybrid,
            (false, false) => CgroupMode::Legacy,
            (true, false) => return Err(CgroupError::NoCgroupMount),
        };
        Ok(CgroupLayout { mode, v1, unified })
    }

    /// Whether resource controllers are on cgroup v2 (what `linux.resources.unified` needs).
    pub fn is_v2(&self) -> bool {
        self.mode == CgroupMode::Unified
    }

    /// The directories of the cgroup that `cgroups_path` (as produced by [`cgroups_path`] for
    /// `driver`) names: one per v1 controller, or the single v2 directory.
    pub fn container_cgroup(&self, driver: CgroupDriver, cgroups_path: &str) -> ContainerCgroup {
        let relative = relative_cgroup_dir(driver, cgroups_path);
        match (&self.mode, &self.unified) {
            (CgroupMode::Unified, Some(root)) => ContainerCgroup::V2(root.join(&relative)),
            _ => ContainerCgroup::V1(
                self.v1
                    .iter()
                    .map(|(controller, root)| (controller.clone(), root.join(&relative)))
                    .collect(),
            ),
        }
    }

    /// The cgroup a process is in, from its `/proc/<pid>/cgroup` text, with `below` appended
    /// (empty for the process's own cgroup; a relative cgroup parent resolves the way the OCI
    /// runtime resolves it, against the runtime's own cgroup).
    pub fn cgroup_of_process(&self, proc_cgroup: &str, below: &str) -> ContainerCgroup {
        let mut v2 = None;
        let mut by_controller = BTreeMap::new();
        for line in proc_cgroup.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(_), Some(controllers), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let rel = Path::new(path.trim_start_matches('/')).join(below.trim_start_matches('/'));
            if controllers.is_empty() {
                v2 = Some(rel);
            } else {
                for c in controllers.split(',') {
                    by_controller.insert(c.to_string(), rel.clone());
                }
            }
        }
        match (&self.mode, &self.unified, v2) {
            (CgroupMode::Unified, Some(root), Some(rel)) => ContainerCgroup::V2(root.join(rel)),
            _ => ContainerCgroup::V1(
                self.v1
                    .iter()
                    .filter_map(|(c, root)| Some((c.clone(), root.join(by_controller.get(c)?))))
                    .collect(),
            ),
        }
    }

    /// The cgroup of a pod's `cgroup_parent` as the OCI runtime places containers below it.
    /// `own_cgroup` is the daemon's `/proc/self/cgroup` (the monitors and the runtime inherit
    /// it), against which a relative cgroupfs parent resolves. `None` for an empty parent: the
    /// containers then share a default parent with other pods.
    pub fn pod_cgroup(
        &self,
        driver: CgroupDriver,
        parent: &str,
        own_cgroup: &str,
    ) -> Option<ContainerCgroup> {
        let parent = parent.trim_end_matches('/');
        if parent.is_empty() {
            return None;
        }
        Some(match driver {
            CgroupDriver::Cgroupfs if !parent.starts_with('/') => {
                self.cgroup_of_process(own_cgroup, parent)
            }
            CgroupDriver::Cgroupfs => self.container_cgroup(driver, parent),
            CgroupDriver::Systemd => {
                let slice = parent.rsplit('/').next().unwrap_or(parent);
                let dir = expand_slice(slice);
                self.container_cgroup(CgroupDriver::Cgroupfs, &dir.to_string_lossy())
            }
        })
    }

    /// The huge page sizes, in the kubelet's notation (`2MB`, `1GB`), that containers' cgroups
    /// can limit: those the kernel offers (a `hugepages-<N>kB` directory in `hugepages_dir`,
    /// normally `/sys/kernel/mm/hugepages`), and none at all without a hugetlb controller (v1: no
    /// `hugetlb` hierarchy mounted; v2: `hugetlb` missing from the hierarchy root's
    /// `cgroup.controllers`). The OCI runtime refuses to create a container whose spec limits a
    /// size it cannot set, so such limits are left out, as containerd leaves them out.
    pub fn hugetlb_page_sizes(&self, hugepages_dir: &Path) -> BTreeSet<String> {
        let controller = match (&self.mode, &self.unified) {
            (CgroupMode::Unified, Some(root)) => read_trimmed(&root.join("cgroup.controllers"))
                .is_ok_and(|c| c.split_whitespace().any(|c| c == "hugetlb")),
            // On a hybrid host the cgroup2 mount may list hugetlb, but the OCI runtime sets
            // resources through the v1 hierarchies.
            _ => self.v1.contains_key("hugetlb"),
        };
        if !controller {
            return BTreeSet::new();
        }
        let Ok(entries) = std::fs::read_dir(hugepages_dir) else {
            return BTreeSet::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name();
                let kib: u64 = name
                    .to_str()?
                    .strip_prefix("hugepages-")?
                    .strip_suffix("kB")?
                    .parse()
                    .ok()?;
                Some(page_size_name(kib.checked_mul(1024)?))
            })
            .collect()
    }

    /// Every distinct hierarchy root (v1 mount points and the cgroup2 mount), for callers that
    /// must create or clean a directory in each.
    pub fn hierarchy_roots(&self) -> Vec<PathBuf> {
        let mut roots: Vec<PathBuf> = self.v1.values().cloned().collect();
        roots.extend(self.unified.iter().cloned());
        roots.sort();
        roots.dedup();
        roots
    }
}

/// A page size in bytes in the notation the kubelet sends in `HugepageLimit.page_size`
/// (binary units, `2MB` for 2 MiB: runc's and libcontainer's `HugePageSizes`).
fn page_size_name(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KB", "MB", "GB", "TB", "PB"];
    let mut size = bytes as f64;
    let mut unit = 0;
    while size >= 1024.0 && unit + 1 < UNITS.len() {
        size /= 1024.0;
        unit += 1;
    }
    format!("{size}{}", UNITS[unit])
}

fn is_v1_controller_option(opt: &str) -> bool {
    const NOT_CONTROLLERS: &[&str] = &[
        "rw",
        "ro",
        "relatime",
        "noatime",
        "nosuid",
        "nodev",
        "noexec",
        "clone_children",
        "xattr",
        "noprefix",
    ];
    !NOT_CONTROLLERS.contains(&opt) && !opt.starts_with("release_agent=")
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(digits) = field.get(i + 1..i + 4)
            && let Ok(value) = u8::from_str_radix(digits, 8)
        {
            out.push(value);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `linux.cgroupsPath` of a container under the pod's cgroup parent, per driver.
///
/// - cgroupfs: `<parent>/<id>` (an absolute path; an empty parent means `/strake`).
/// - systemd: `<slice>:strake:<id>`, where `<slice>` is the last component of the parent (kubelet
///   passes e.g. `/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice`
///   or just the slice name); an empty parent means `system.slice`. runc turns this into the unit
///   `strake-<id>.scope` inside that slice.
pub fn cgroups_path(driver: CgroupDriver, parent: &str, id: &str) -> String {
    match driver {
        CgroupDriver::Cgroupfs => {
            let parent = parent.trim_end_matches('/');
            let parent = if parent.is_empty() { "/strake" } else { parent };
            if parent.starts_with('/') {
                format!("{parent}/{id}")
            } else {
                format!("/{parent}/{id}")
            }
        }
        CgroupDriver::Systemd => {
            let slice = parent
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .filter(|s| !s.is_empty())
                .unwrap_or("system.slice");
            format!("{slice}:{SYSTEMD_SCOPE_PREFIX}:{id}")
        }
    }
}

/// The directory, relative to a hierarchy root, that a `cgroupsPath` ends up at.
fn relative_cgroup_dir(driver: CgroupDriver, cgroups_path: &str) -> PathBuf {
    match driver {
        CgroupDriver::Cgroupfs => PathBuf::from(cgroups_path.trim_start_matches('/')),
        CgroupDriver::Systemd => {
            let mut parts = cgroups_path.splitn(3, ':');
            let (slice, prefix, name) = (
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
            );
            let slice = if slice.is_empty() {
                "system.slice"
            } else {
                slice
            };
            let unit = if name.ends_with(".slice") {
                name.to_string()
            } else if prefix.is_empty() {
                format!("{name}.scope")
            } else {
                format!("{prefix}-{name}.scope")
            };
            expand_slice(slice).join(unit)
        }
    }
}

/// systemd nests `a-b-c.slice` as `a.slice/a-b.slice/a-b-c.slice`; `-.slice` is the root.
pub fn expand_slice(slice: &str) -> PathBuf {
    let mut path = PathBuf::new();
    let Some(stem) = slice.strip_suffix(".slice") else {
        return PathBuf::from(slice);
    };
    if stem == "-" || stem.is_empty() {
        return path;
    }
    let mut prefix = String::new();
    for part in stem.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
    }
    path
}

/// The on-disk directories of one container's cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerCgroup {
    /// One directory per v1 controller.
    V1(BTreeMap<String, PathBuf>),
    /// The single v2 directory.
    V2(PathBuf),
}

impl ContainerCgroup {
    /// The memory limit in bytes, `None` when unlimited.
    pub fn memory_limit(&self) -> Result<Option<u64>, CgroupError> {
        let (path, unlimited) = match self {
            ContainerCgroup::V2(dir) => (dir.join("memory.max"), "max"),
            ContainerCgroup::V1(dirs) => match dirs.get("memory") {
                Some(dir) => (dir.join("memory.limit_in_bytes"), ""),
                None => return Ok(None),
            },
        };
        let text = read_trimmed(&path)?;
        if text == unlimited {
            return Ok(None);
        }
        let value = parse_u64(&path, &text)?;
        // v1 reports "unlimited" as a huge page-aligned number.
        Ok((value < i64::MAX as u64 / 4096 * 4096).then_some(value))
    }

    /// Current memory usage in bytes.
    pub fn memory_usage(&self) -> Result<Option<u64>, CgroupError> {
        let path = match self {
            ContainerCgroup::V2(dir) => dir.join("memory.current"),
            ContainerCgroup::V1(dirs) => match dirs.get("memory") {
                Some(dir) => dir.join("memory.usage_in_bytes"),
                None => return Ok(None),
            },
        };
        let text = read_trimmed(&path)?;
        parse_u64(&path, &text).map(Some)
    }

    /// The working set the kubelet reports: usage minus inactive file pages
    /// (`total_inactive_file` on v1, `inactive_file` on v2).
    pub fn memory_working_set(&self) -> Result<Option<u64>, CgroupError> {
        let Some(usage) = self.memory_usage()? else {
            return Ok(None);
        };
        let (path, key) = match self {
            ContainerCgroup::V2(dir) => (dir.join("memory.stat"), "inactive_file"),
            ContainerCgroup::V1(dirs) => match dirs.get("memory") {
                Some(dir) => (dir.join("memory.stat"), "total_inactive_file"),
                None => return Ok(None),
            },
        };
        let inactive = keyed_value(&path, key)?.unwrap_or(0);
        Ok(Some(usage.saturating_sub(inactive)))
    }

    /// How many times the OOM killer killed a task of this cgroup (`oom_kill` in
    /// `memory.events` on v2, in `memory.oom_control` on v1): what tells OOMKilled from Error.
    pub fn oom_kills(&self) -> Result<Option<u64>, CgroupError> {
        let path = match self {
            ContainerCgroup::V2(dir) => dir.join("memory.events"),
            ContainerCgroup::V1(dirs) => match dirs.get("memory") {
                Some(dir) => dir.join("memory.oom_control"),
                None => return Ok(None),
            },
        };
        keyed_value(&path, "oom_kill")
    }

    /// Cumulative CPU time in nanoseconds.
    pub fn cpu_usage_nanos(&self) -> Result<Option<u64>, CgroupError> {
        match self {
            ContainerCgroup::V2(dir) => {
                let path = dir.join("cpu.stat");
                let text = read_trimmed(&path)?;
                let usec = text
                    .lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .map(|v| parse_u64(&path, v.trim()))
                    .transpose()?;
                Ok(usec.map(|u| u.saturating_mul(1000)))
            }
            ContainerCgroup::V1(dirs) => match dirs.get("cpuacct") {
                Some(dir) => {
                    let path = dir.join("cpuacct.usage");
                    let text = read_trimmed(&path)?;
                    parse_u64(&path, &text).map(Some)
                }
                None => Ok(None),
            },
        }
    }
}

impl ContainerCgroup {
    /// Whether the cgroup has been created (in any hierarchy).
    pub fn exists(&self) -> bool {
        match self {
            ContainerCgroup::V2(dir) => dir.is_dir(),
            ContainerCgroup::V1(dirs) => dirs.values().any(|d| d.is_dir()),
        }
    }

    /// `memory.stat` as a map, `None` without a memory controller.
    pub fn memory_stat(&self) -> Result<Option<BTreeMap<String, u64>>, CgroupError> {
        let path = match self {
            ContainerCgroup::V2(dir) => dir.join("memory.stat"),
            ContainerCgroup::V1(dirs) => match dirs.get("memory") {
                Some(dir) => dir.join("memory.stat"),
                None => return Ok(None),
            },
        };
        let text = read_trimmed(&path)?;
        Ok(Some(
            text.lines()
                .filter_map(|l| l.split_once(' '))
                .filter_map(|(k, v)| Some((k.to_string(), v.trim().parse().ok()?)))
                .collect(),
        ))
    }

    /// Swap in use and the swap limit (`None` = unlimited), when the kernel accounts swap
    /// (`memory.swap.*` on v2, `memory.memsw.*` minus memory on v1).
    pub fn swap(&self) -> Option<(u64, Option<u64>)> {
        let read = |p: PathBuf| -> Option<String> { read_trimmed(&p).ok() };
        match self {
            ContainerCgroup::V2(dir) => {
                let used = read(dir.join("memory.swap.current"))?.parse().ok()?;
                let max = read(dir.join("memory.swap.max"))?;
                Some((used, max.parse().ok()))
            }
            ContainerCgroup::V1(dirs) => {
                let dir = dirs.get("memory")?;
                let memsw: u64 = read(dir.join("memory.memsw.usage_in_bytes"))?
                    .parse()
                    .ok()?;
                let mem: u64 = read(dir.join("memory.usage_in_bytes"))?.parse().ok()?;
                Some((memsw.saturating_sub(mem), None))
            }
        }
    }

    /// Tasks in the cgroup and its descendants (`pids.current`), `None` without the controller.
    pub fn pids(&self) -> Option<u64> {
        let dir = match self {
            ContainerCgroup::V2(dir) => dir,
            ContainerCgroup::V1(dirs) => dirs.get("pids")?,
        };
        read_trimmed(&dir.join("pids.current")).ok()?.parse().ok()
    }

    /// Processes (thread group leaders) directly in the cgroup (`cgroup.procs`).
    pub fn processes(&self) -> Option<u64> {
        let dir = match self {
            ContainerCgroup::V2(dir) => dir,
            ContainerCgroup::V1(dirs) => dirs.get("pids").or_else(|| dirs.get("memory"))?,
        };
        let text = std::fs::read_to_string(dir.join("cgroup.procs")).ok()?;
        Some(text.lines().filter(|l| !l.trim().is_empty()).count() as u64)
    }

    /// The highest memory usage recorded (`memory.peak` on v2, `memory.max_usage_in_bytes`
    /// on v1); `None` on kernels without it.
    pub fn memory_peak(&self) -> Option<u64> {
        let path = match self {
            ContainerCgroup::V2(dir) => dir.join("memory.peak"),
            ContainerCgroup::V1(dirs) => dirs.get("memory")?.join("memory.max_usage_in_bytes"),
        };
        read_trimmed(&path).ok()?.parse().ok()
    }

    /// How often usage hit the limit (`memory.failcnt`, v1 only; v2 has no such counter).
    pub fn memory_failcnt(&self) -> Option<u64> {
        match self {
            ContainerCgroup::V2(_) => None,
            ContainerCgroup::V1(dirs) => read_trimmed(&dirs.get("memory")?.join("memory.failcnt"))
                .ok()?
                .parse()
                .ok(),
        }
    }

    /// User and system CPU time and CFS throttling: `cpu.stat` on v2; `cpuacct.stat` (in
    /// USER_HZ ticks, 100 a second on Linux) and the cpu controller's `cpu.stat` on v1.
    /// Counters the kernel does not offer stay `None`.
    pub fn cpu_stat(&self) -> CpuStat {
        let keyed = |path: PathBuf| -> BTreeMap<String, u64> {
            std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.split_once(' '))
                .filter_map(|(k, v)| Some((k.to_string(), v.trim().parse().ok()?)))
                .collect()
        };
        match self {
            ContainerCgroup::V2(dir) => {
                let s = keyed(dir.join("cpu.stat"));
                let usec = |k: &str| s.get(k).map(|v| v.saturating_mul(1000));
                CpuStat {
                    user_ns: usec("user_usec"),
                    system_ns: usec("system_usec"),
                    periods: s.get("nr_periods").copied(),
                    throttled_periods: s.get("nr_throttled").copied(),
                    throttled_ns: usec("throttled_usec"),
                }
            }
            ContainerCgroup::V1(dirs) => {
                const NS_PER_TICK: u64 = 10_000_000;
                let acct = dirs
                    .get("cpuacct")
                    .map(|d| keyed(d.join("cpuacct.stat")))
                    .unwrap_or_default();
                let cpu = dirs
                    .get("cpu")
                    .map(|d| keyed(d.join("cpu.stat")))
                    .unwrap_or_default();
                let ticks = |k: &str| acct.get(k).map(|v| v.saturating_mul(NS_PER_TICK));
                CpuStat {
                    user_ns: ticks("user"),
                    system_ns: ticks("system"),
                    periods: cpu.get("nr_periods").copied(),
                    throttled_periods: cpu.get("nr_throttled").copied(),
                    throttled_ns: cpu.get("throttled_time").copied(),
                }
            }
        }
    }
}

/// CPU counters of a cgroup beyond its total usage; see [`ContainerCgroup::cpu_stat`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuStat {
    pub user_ns: Option<u64>,
    pub system_ns: Option<u64>,
    /// CFS enforcement periods elapsed and those in which the cgroup was throttled.
    pub periods: Option<u64>,
    pub throttled_periods: Option<u64>,
    pub throttled_ns: Option<u64>,
}

/// The value of `key` in a flat keyed file (`key value` per line).
fn keyed_value(path: &Path, key: &str) -> Result<Option<u64>, CgroupError> {
    let text = read_trimmed(path)?;
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| parse_u64(path, v.trim()))
        .transpose()
}

fn read_trimmed(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| CgroupError::ReadFile {
            path: path.to_path_buf(),
            source,
        })
}

fn parse_u64(path: &Path, text: &str) -> Result<u64, CgroupError> {
    text.parse().map_err(|e| CgroupError::ReadFile {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 25 0:24 / /sys/fs/cgroup rw,relatime shared:8 - tmpfs tmpfs rw,mode=755
27 26 0:25 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
28 26 0:26 / /sys/fs/cgroup/systemd rw,relatime shared:10 - cgroup cgroup rw,xattr,name=systemd
31 26 0:29 / /sys/fs/cgroup/memory rw,relatime shared:13 - cgroup cgroup rw,memory
32 26 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:14 - cgroup cgroup rw,cpu,cpuacct
";

    const UNIFIED: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 25 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:8 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn hybrid_layout_lists_v1_controllers_and_the_unified_mount() {
        let layout = CgroupLayout::from_mountinfo(HYBRID).unwrap();
        assert_eq!(layout.mode, CgroupMode::Hybrid);
        assert!(!layout.is_v2());
        assert_eq!(
            layout.unified,
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            layout.v1.keys().collect::<Vec<_>>(),
            ["cpu", "cpuacct", "memory", "name=systemd"]
        );
        assert_eq!(
            layout.v1["cpu"],
            PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")
        );
        assert_eq!(
            layout.hierarchy_roots(),
            [
                "/sys/fs/cgroup/cpu,cpuacct",
                "/sys/fs/cgroup/memory",
                "/sys/fs/cgroup/systemd",
                "/sys/fs/cgroup/unified"
            ]
            .map(PathBuf::from)
        );
    }

    /// A hugepages directory as sysfs has it, and a layout whose mount points are `root`.
    fn hugetlb_fixture(root: &Path, mountinfo: &str) -> (CgroupLayout, PathBuf) {
        let pages = root.join("hugepages");
        for size in ["hugepages-2048kB", "hugepages-1048576kB", "hugepages-64kB"] {
            std::fs::create_dir_all(pages.join(size)).unwrap();
        }
        std::fs::create_dir_all(pages.join("not-a-size")).unwrap();
        let text = mountinfo.replace("/sys/fs/cgroup", &root.join("cg").display().to_string());
        (CgroupLayout::from_mountinfo(&text).unwrap(), pages)
    }

    #[test]
    fn hugetlb_sizes_need_the_controller_and_a_kernel_size() {
        let dir = tempfile::tempdir().unwrap();
        let all: BTreeSet<String> = ["1GB", "2MB", "64KB"].map(String::from).into();

        // v1 without a hugetlb hierarchy (this machine): nothing can be limited, even though the
        // controller-less cgroup2 mount lists hugetlb.
        let (hybrid, pages) = hugetlb_fixture(dir.path(), HYBRID);
        let unified_mount = hybrid.unified.clone().unwrap();
        std::fs::create_dir_all(&unified_mount).unwrap();
        std::fs::write(unified_mount.join("cgroup.controllers"), "hugetlb pids\n").unwrap();
        assert_eq!(hybrid.hugetlb_page_sizes(&pages), BTreeSet::new());

        // v1 with a hugetlb hierarchy.
        let with_hugetlb = format!(
            "{HYBRID}33 26 0:31 / /sys/fs/cgroup/hugetlb rw,relatime shared:15 - cgroup cgroup rw,hugetlb\n"
        );
        let (v1, pages) = hugetlb_fixture(dir.path(), &with_hugetlb);
        assert_eq!(v1.hugetlb_page_sizes(&pages), all);
        // ... but no sizes when the kernel offers none.
        assert_eq!(
            v1.hugetlb_page_sizes(&dir.path().join("missing")),
            BTreeSet::new()
        );

        // v2: the root's cgroup.controllers decides.
        let (v2, pages) = hugetlb_fixture(dir.path(), UNIFIED);
        let root = v2.unified.clone().unwrap();
        std::fs::create_dir_all(&root).unwrap();
        assert_eq!(v2.hugetlb_page_sizes(&pages), BTreeSet::new(), "no file");
        std::fs::write(root.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        assert_eq!(v2.hugetlb_page_sizes(&pages), BTreeSet::new());
        std::fs::write(root.join("cgroup.controllers"), "cpu hugetlb memory\n").unwrap();
        assert_eq!(v2.hugetlb_page_sizes(&pages), all);
    }

    #[test]
    fn page_sizes_use_the_kubelets_notation() {
        assert_eq!(page_size_name(2 << 20), "2MB");
        assert_eq!(page_size_name(1 << 30), "1GB");
        assert_eq!(page_size_name(64 << 10), "64KB");
        assert_eq!(page_size_name(16 << 30), "16GB");
        assert_eq!(page_size_name(1536 << 10), "1.5MB");
    }

    #[test]
    fn unified_layout_is_v2() {
        let layout = CgroupLayout::from_mountinfo(UNIFIED).unwrap();
        assert_eq!(layout.mode, CgroupMode::Unified);
        assert!(layout.is_v2());
        assert!(layout.v1.is_empty());
    }

    #[test]
    fn no_cgroup_mount_is_an_error() {
        let err = CgroupLayout::from_mountinfo("25 30 0:23 / /sys rw - sysfs sysfs rw\n");
        assert!(matches!(err, Err(CgroupError::NoCgroupMount)));
    }

    #[test]
    fn mountinfo_octal_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/trail\04"), r"/trail\04");
    }

    #[test]
    fn cgroupfs_path_joins_parent_and_id() {
        let d = CgroupDriver::Cgroupfs;
        assert_eq!(
            cgroups_path(d, "/kubepods/burstable/pod1", "c1"),
            "/kubepods/burstable/pod1/c1"
        );
        assert_eq!(cgroups_path(d, "/kubepods/", "c1"), "/kubepods/c1");
        assert_eq!(cgroups_path(d, "kubepods", "c1"), "/kubepods/c1");
        assert_eq!(cgroups_path(d, "", "c1"), "/strake/c1");
    }

    #[test]
    fn systemd_path_uses_the_last_slice() {
        let d = CgroupDriver::Systemd;
        assert_eq!(
            cgroups_path(
                d,
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podabc.slice",
                "c1"
            ),
            "kubepods-besteffort-podabc.slice:strake:c1"
        );
        assert_eq!(
            cgroups_path(d, "kubepods.slice", "c1"),
            "kubepods.slice:strake:c1"
        );
        assert_eq!(cgroups_path(d, "", "c1"), "system.slice:strake:c1");
    }

    #[test]
    fn slices_expand_to_nested_directories() {
        assert_eq!(
            expand_slice("kubepods-besteffort-podabc.slice"),
            PathBuf::from(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podabc.slice"
            )
        );
        assert_eq!(expand_slice("-.slice"), PathBuf::new());
        assert_eq!(expand_slice("system.slice"), PathBuf::from("system.slice"));
    }

    #[test]
    fn container_cgroup_dirs_per_mode_and_driver() {
        let hybrid = CgroupLayout::from_mountinfo(HYBRID).unwrap();
        let ContainerCgroup::V1(dirs) =
            hybrid.container_cgroup(CgroupDriver::Cgroupfs, "/kubepods/pod1/c1")
        else {
            panic!("hybrid hosts keep controllers on v1");
        };
        assert_eq!(
            dirs["memory"],
            PathBuf::from("/sys/fs/cgroup/memory/kubepods/pod1/c1")
        );
        assert_eq!(
            dirs["cpuacct"],
            PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/kubepods/pod1/c1")
        );

        let unified = CgroupLayout::from_mountinfo(UNIFIED).unwrap();
        assert_eq!(
            unified.container_cgroup(CgroupDriver::Systemd, "kubepods-pod1.slice:strake:c1"),
            ContainerCgroup::V2(PathBuf::from(
                "/sys/fs/cgroup/kubepods.slice/kubepods-pod1.slice/strake-c1.scope"
            ))
        );
    }

    #[test]
    fn process_cgroups_and_pod_parents_resolve_like_the_oci_runtime() {
        let hybrid = CgroupLayout::from_mountinfo(HYBRID).unwrap();
        let proc_cgroup = "\
4:memory:/process_api/abc
3:cpu,cpuacct:/
1:name=systemd:/user.slice
0::/user.slice
";
        let ContainerCgroup::V1(dirs) = hybrid.cgroup_of_process(proc_cgroup, "strake-tb-1-0")
        else {
            panic!("hybrid hosts keep controllers on v1");
        };
        assert_eq!(
            dirs["memory"],
            PathBuf::from("/sys/fs/cgroup/memory/process_api/abc/strake-tb-1-0")
        );
        assert_eq!(
            dirs["cpuacct"],
            PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/strake-tb-1-0")
        );
        assert_eq!(
            hybrid.pod_cgroup(CgroupDriver::Cgroupfs, "strake-tb-1-0", proc_cgroup),
            Some(ContainerCgroup::V1(dirs))
        );
        assert_eq!(
            hybrid.pod_cgroup(CgroupDriver::Cgroupfs, "", proc_cgroup),
            None
        );
        let ContainerCgroup::V1(abs) = hybrid
            .pod_cgroup(CgroupDriver::Cgroupfs, "/kubepods/pod1/", proc_cgroup)
            .unwrap()
        else {
            panic!("v1");
        };
        assert_eq!(
            abs["memory"],
            PathBuf::from("/sys/fs/cgroup/memory/kubepods/pod1")
        );

        let unified = CgroupLayout::from_mountinfo(UNIFIED).unwrap();
        assert_eq!(
            unified.cgroup_of_process("0::/kubepods.slice/strake-c1.scope\n", ""),
            ContainerCgroup::V2(PathBuf::from(
                "/sys/fs/cgroup/kubepods.slice/strake-c1.scope"
            ))
        );
        assert_eq!(
            unified.pod_cgroup(
                CgroupDriver::Systemd,
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podabc.slice",
                ""
            ),
            Some(ContainerCgroup::V2(PathBuf::from(
                "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podabc.slice"
            )))
        );
    }

    #[test]
    fn memory_stat_swap_and_pids_per_version() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("memory.stat", "anon 5\npgfault 7\n");
        write("memory.swap.current", "10\n");
        write("memory.swap.max", "max\n");
        write("pids.current", "4\n");
        let v2 = ContainerCgroup::V2(dir.path().to_path_buf());
        assert_eq!(v2.memory_stat().unwrap().unwrap()["pgfault"], 7);
        assert_eq!(v2.swap(), Some((10, None)));
        assert_eq!(v2.pids(), Some(4));

        let v1dir = tempfile::tempdir().unwrap();
        std::fs::write(v1dir.path().join("memory.memsw.usage_in_bytes"), "300\n").unwrap();
        std::fs::write(v1dir.path().join("memory.usage_in_bytes"), "200\n").unwrap();
        let v1 = ContainerCgroup::V1(BTreeMap::from([(
            "memory".to_string(),
            v1dir.path().to_path_buf(),
        )]));
        assert_eq!(v1.swap(), Some((100, None)));
        assert_eq!(v1.pids(), None);
    }

    #[test]
    fn memory_limit_reads_v1_and_v2_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("memory.max"), "max\n").unwrap();
        let v2 = ContainerCgroup::V2(dir.path().to_path_buf());
        assert_eq!(v2.memory_limit().unwrap(), None);
        std::fs::write(dir.path().join("memory.max"), "67108864\n").unwrap();
        assert_eq!(v2.memory_limit().unwrap(), Some(64 << 20));

        std::fs::write(
            dir.path().join("memory.limit_in_bytes"),
            "9223372036854771712\n",
        )
        .unwrap();
        let v1 = ContainerCgroup::V1(BTreeMap::from([(
            "memory".to_string(),
            dir.path().to_path_buf(),
        )]));
        assert_eq!(v1.memory_limit().unwrap(), None);
        std::fs::write(dir.path().join("memory.limit_in_bytes"), "33554432\n").unwrap();
        assert_eq!(v1.memory_limit().unwrap(), Some(32 << 20));

        std::fs::write(dir.path().join("cpu.stat"), "usage_usec 15\nuser_usec 10\n").unwrap();
        assert_eq!(v2.cpu_usage_nanos().unwrap(), Some(15_000));
    }

    #[test]
    fn working_set_and_oom_kills_per_version() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("memory.current", "1000\n");
        write(
            "memory.stat",
            "anon 500\ninactive_file 300\nactive_file 200\n",
        );
        write("memory.events", "low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n");
        let v2 = ContainerCgroup::V2(dir.path().to_path_buf());
        assert_eq!(v2.memory_working_set().unwrap(), Some(700));
        assert_eq!(v2.oom_kills().unwrap(), Some(1));

        let dir1 = tempfile::tempdir().unwrap();
        let write1 = |name: &str, text: &str| std::fs::write(dir1.path().join(name), text).unwrap();
        write1("memory.usage_in_bytes", "1000\n");
        write1(
            "memory.stat",
            "inactive_file 100\ntotal_inactive_file 400\n",
        );
        write1(
            "memory.oom_control",
            "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
        );
        let v1 = ContainerCgroup::V1(BTreeMap::from([(
            "memory".to_string(),
            dir1.path().to_path_buf(),
        )]));
        assert_eq!(v1.memory_working_set().unwrap(), Some(600));
        assert_eq!(v1.oom_kills().unwrap(), Some(0));
        let no_memory = ContainerCgroup::V1(BTreeMap::new());
        assert_eq!(no_memory.memory_working_set().unwrap(), None);
        assert_eq!(no_memory.oom_kills().unwrap(), None);
    }

    #[test]
    fn cpu_stat_peak_and_processes_read_from_v1_and_v2_files() {
        let v2dir = tempfile::tempdir().unwrap();
        let w2 = |name: &str, text: &str| std::fs::write(v2dir.path().join(name), text).unwrap();
        w2(
            "cpu.stat",
            "usage_usec 5000\nuser_usec 3000\nsystem_usec 2000\nnr_periods 40\nnr_throttled 7\nthrottled_usec 1500\n",
        );
        w2("memory.peak", "123456\n");
        w2("cgroup.procs", "10\n11\n12\n");
        let v2 = ContainerCgroup::V2(v2dir.path().to_path_buf());
        assert_eq!(
            v2.cpu_stat(),
            CpuStat {
                user_ns: Some(3_000_000),
                system_ns: Some(2_000_000),
                periods: Some(40),
                throttled_periods: Some(7),
                throttled_ns: Some(1_500_000),
            }
        );
        assert_eq!(v2.memory_peak(), Some(123_456));
        assert_eq!(v2.memory_failcnt(), None);
        assert_eq!(v2.processes(), Some(3));

        let acct = tempfile::tempdir().unwrap();
        let cpu = tempfile::tempdir().unwrap();
        let mem = tempfile::tempdir().unwrap();
        std::fs::write(acct.path().join("cpuacct.stat"), "user 250\nsystem 30\n").unwrap();
        std::fs::write(
            cpu.path().join("cpu.stat"),
            "nr_periods 9\nnr_throttled 2\nthrottled_time 777\n",
        )
        .unwrap();
        std::fs::write(mem.path().join("memory.max_usage_in_bytes"), "4096\n").unwrap();
        std::fs::write(mem.path().join("memory.failcnt"), "3\n").unwrap();
        std::fs::write(mem.path().join("cgroup.procs"), "1\n").unwrap();
        let v1 = ContainerCgroup::V1(BTreeMap::from([
            ("cpuacct".to_string(), acct.path().to_path_buf()),
            ("cpu".to_string(), cpu.path().to_path_buf()),
            ("memory".to_string(), mem.path().to_path_buf()),
        ]));
        assert_eq!(
            v1.cpu_stat(),
            CpuStat {
                user_ns: Some(2_500_000_000),
                system_ns: Some(300_000_000),
                periods: Some(9),
                throttled_periods: Some(2),
                throttled_ns: Some(777),
            }
        );
        assert_eq!(v1.memory_peak(), Some(4096));
        assert_eq!(v1.memory_failcnt(), Some(3));
        assert_eq!(v1.processes(), Some(1));
        let bare = ContainerCgroup::V1(BTreeMap::new());
        assert_eq!(bare.cpu_stat(), CpuStat::default());
        assert_eq!(bare.processes(), None);
    }
}
