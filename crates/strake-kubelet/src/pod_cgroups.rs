//! Pod-level cgroups under upstream's QoS hierarchy: `kubepods` (limited to the node's
//! allocatable when `enforceNodeAllocatable` names `pods`), `kubepods/burstable` and
//! `kubepods/besteffort`, and one `pod<uid>` per pod holding the values upstream's
//! `ResourceConfigForPod` gives it. The runtime puts the pod's containers below it (the
//! sandbox's cgroup parent, [`pod_cgroup_parent`]).
//!
//! The values are pure ([`pod_values`], [`node_values`]); [`files`] turns them into cgroup v1
//! (one directory per controller) or v2 (one directory, its own file names and units) writes.
//! [`PodCgroups`] applies them with the node's cgroup driver:
//!
//! - cgroupfs: the kubelet creates the directories where the host's hierarchies are
//!   ([`CgroupLayout`]), resolving a relative `cgroupRoot` against its own cgroup as the OCI
//!   runtime resolves it;
//! - systemd: each cgroup is a transient slice (`kubepods-burstable-pod<uid>.slice`,
//!   [`systemd_unit`]) that systemd makes with the values as properties ([`slice_properties`]),
//!   and the kubelet writes the same values into the slice's directories, as upstream's
//!   libcontainer does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use k8s_openapi::api::core::v1::Pod;
use strake_types::cgroups::{CgroupDriver, CgroupLayout, ContainerCgroup, expand_slice};
use strake_types::systemd::{Property, Systemd, SystemdError, Value};

use crate::resources::{CPU_PERIOD_US, cpu_quota, cpu_shares};

/// What upstream sets on a pod's (or the node's `kubepods`) cgroup.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Values {
    /// `cpu.shares` (v1); v2 converts it to `cpu.weight`.
    pub cpu_shares: Option<u64>,
    /// CFS quota in µs per [`CPU_PERIOD_US`].
    pub cpu_quota: Option<i64>,
    /// Bytes.
    pub memory_limit: Option<i64>,
    /// Processes (`podPidsLimit`).
    pub pids_limit: Option<i64>,
}

/// The values of pod `pod`'s cgroup (upstream's `ResourceConfigForPod`): shares from the pod's
/// CPU requests; for a Guaranteed pod also the quota and memory limit from its limits; for a
/// Burstable pod the quota only if every container has a CPU limit and the memory limit only
/// if every container has a memory limit; a BestEffort pod the minimum shares. `pids_limit`
/// (`podPidsLimit`) applies to every pod when positive.
pub fn pod_values(pod: &Pod, pids_limit: i64) -> Values {
    let requests = crate::predicates::pod_requests(pod);
    let limits = crate::predicates::pod_limits(pod);
    let containers = pod.spec.iter().flat_map(|s| s.containers.iter());
    let has_limit = |c: &k8s_openapi::api::core::v1::Container, name: &str| {
        c.resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get(name))
            .and_then(|q| crate::resources::parse_milli(&q.0).ok())
            .is_some_and(|m| m > 0)
    };
    let (mut cpu_limited, mut memory_limited) = (true, true);
    for c in containers {
        cpu_limited &= has_limit(c, "cpu");
        memory_limited &= has_limit(c, "memory");
    }
    let shares = cpu_shares(requests.get("cpu").copied().unwrap_or(0)) as u64;
    let quota = cpu_quota(limits.get("cpu").copied().unwrap_or(0), CPU_PERIOD_US);
    let memory = (limits.get("memory").copied().unwrap_or(0) / 1000).min(i64::MAX as i128) as i64;
    let mut v = match crate::pod_spec::qos_class(pod) {
        "Guaranteed" => Values {
            cpu_shares: Some(shares),
            cpu_quota: Some(quota),
            memory_limit: Some(memory),
            pids_limit: None,
        },
        "Burstable" => Values {
            cpu_shares: Some(shares),
            cpu_quota: cpu_limited.then_some(quota),
            memory_limit: memory_limited.then_some(memory),
            pids_limit: None,
        },
        _ => Values {
            cpu_shares: Some(cpu_shares(0) as u64),
            ..Values::default()
        },
    };
    v.pids_limit = (pids_limit > 0).then_some(pids_limit);
    v
}

/// The values of `kubepods` when pods are held to the node's allocatable: capacity less
/// `kubeReserved` and `systemReserved` (not the eviction thresholds), as upstream's
/// `enforceNodeAllocatable: [pods]` sets them.
pub fn node_values(cpu_milli: i128, memory_bytes: i128) -> Values {
    Values {
        cpu_shares: Some(cpu_shares(cpu_milli.max(0)) as u64),
        cpu_quota: None,
        memory_limit: Some(memory_bytes.clamp(0, i64::MAX as i128) as i64),
        pids_limit: None,
    }
}

/// The values an enforced reservation (`kubeReserved` or `systemReserved`, thousandths per
/// resource) puts on its cgroup, as upstream's `enforceExistingCgroup`: CPU shares for the
/// reserved CPU, and unless only the compressible part is enforced, the reserved memory as the
/// memory limit and the reserved `pid` as the process limit.
pub fn reserved_values(reserved: &BTreeMap<String, i128>, compressible_only: bool) -> Values {
    let get = |name: &str| reserved.get(name).copied();
    Values {
        cpu_shares: get("cpu").map(|m| cpu_shares(m.max(0)) as u64),
        cpu_quota: None,
        memory_limit: get("memory")
            .filter(|_| !compressible_only)
            .map(|m| (m / 1000).clamp(0, i64::MAX as i128) as i64),
        pids_limit: get("pid")
            .filter(|_| !compressible_only)
            .map(|m| (m / 1000).clamp(0, i64::MAX as i128) as i64),
    }
}

/// `cpu.weight` (v2) for `cpu.shares` (v1), as runc and the kubelet convert it.
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 0;
    }
    1 + (shares.clamp(2, 262_144) - 2) * 9999 / 262_142
}

/// One write: the controller (v1 hierarchy; empty on v2), the file and its content.
pub type Write = (&'static str, &'static str, String);

/// The files `values` become on cgroup v1 or v2. A limit that is absent is written as
/// unlimited, so a value lowered away (a pod cgroup reused) does not linger.
pub fn files(values: &Values, v2: bool) -> Vec<Write> {
    let mut out = Vec::new();
    let unlimited_v1 = "-1".to_string();
    if let Some(s) = values.cpu_shares {
        out.push(if v2 {
            ("", "cpu.weight", shares_to_weight(s).to_string())
        } else {
            ("cpu", "cpu.shares", s.to_string())
        });
    }
    let quota = values.cpu_quota.filter(|q| *q > 0);
    if v2 {
        let q = quota.map_or("max".to_string(), |q| q.to_string());
        out.push(("", "cpu.max", format!("{q} {CPU_PERIOD_US}")));
    } else {
        out.push(("cpu", "cpu.cfs_period_us", CPU_PERIOD_US.to_string()));
        out.push((
            "cpu",
            "cpu.cfs_quota_us",
            quota.map_or(unlimited_v1.clone(), |q| q.to_string()),
        ));
    }
    let memory = values.memory_limit.filter(|m| *m > 0);
    out.push(if v2 {
        (
            "",
            "memory.max",
            memory.map_or("max".into(), |m| m.to_string()),
        )
    } else {
        (
            "memory",
            "memory.limit_in_bytes",
            memory.map_or(unlimited_v1, |m| m.to_string()),
        )
    });
    let pids = values.pids_limit.filter(|p| *p > 0);
    out.push((
        if v2 { "" } else { "pids" },
        "pids.max",
        pids.map_or("max".into(), |p| p.to_string()),
    ));
    out
}

/// The name of cgroup `components` for the systemd driver, as upstream's `ToSystemd` makes it:
/// the components joined by `-` (a `-` inside one written as `_`), then `.slice`:
/// `["kubepods", "burstable", "pod<uid>"]` is `kubepods-burstable-pod<uid>.slice`, nested by
/// systemd as `kubepods.slice/kubepods-burstable.slice/...`. No component is the root, `-.slice`.
pub fn systemd_unit<S: AsRef<str>>(components: &[S]) -> String {
    if components.is_empty() {
        return "-.slice".into();
    }
    let parts: Vec<String> = components
        .iter()
        .map(|c| c.as_ref().replace('-', "_"))
        .collect();
    format!("{}.slice", parts.join("-"))
}

/// The components a systemd `cgroupRoot` stands for, as upstream's `ParseSystemdToCgroupName`
/// reads it: the last path element without `.slice`, split at `-` (`/system.slice/strake.slice`
/// is `["strake"]`; "" and "/" are the root).
pub fn systemd_root(cgroup_root: &str) -> Vec<String> {
    let last = cgroup_root
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or("");
    let stem = last.strip_suffix(".slice").unwrap_or(last);
    if stem.is_empty() || stem == "-" {
        return Vec::new();
    }
    stem.split('-').map(|p| p.replace('_', "-")).collect()
}

/// The cgroup components of a pod of QoS class `qos` below `kubepods`.
fn pod_components(qos: &str, uid: &str) -> Vec<String> {
    let mut c = vec!["kubepods".to_string()];
    if qos != "Guaranteed" {
        c.push(qos.to_lowercase());
    }
    c.push(format!("pod{uid}"));
    c
}

/// The pod cgroup `cgroup_parent` the runtime gets for a pod, per driver: cgroupfs
/// `<root>/kubepods/burstable/pod<uid>`; systemd the slice's path,
/// `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice` (dashes of the
/// UID as underscores), as upstream passes it.
pub fn pod_cgroup_parent(driver: CgroupDriver, cgroup_root: &str, qos: &str, uid: &str) -> String {
    match driver {
        CgroupDriver::Cgroupfs => {
            let root = cgroup_root.trim_end_matches('/');
            format!("{root}/{}", pod_components(qos, uid).join("/"))
        }
        CgroupDriver::Systemd => {
            let mut c = systemd_root(cgroup_root);
            c.extend(pod_components(qos, uid));
            format!("/{}", expand_slice(&systemd_unit(&c)).display())
        }
    }
}

/// `CPUQuotaPerSecUSec` for a CFS quota of `quota` µs per [`CPU_PERIOD_US`], and the quota the
/// cgroup then gets. systemd keeps whole percents of a CPU, so the value is rounded up to 10 ms
/// per second and the quota written with it, as libcontainer rounds both.
pub fn systemd_quota(quota: i64) -> (u64, i64) {
    let period = CPU_PERIOD_US as u64;
    let mut per_sec = (quota.max(0) as u64).saturating_mul(1_000_000) / period;
    if !per_sec.is_multiple_of(10_000) {
        per_sec = (per_sec / 10_000 + 1) * 10_000;
    }
    (per_sec, (per_sec * period / 1_000_000) as i64)
}

/// The properties of slice `unit` holding `values` (below slice `parent`), on a v1 or v2 host,
/// as upstream's libcontainer sets them: the parent by `Wants=`, accounting on, no default
/// dependencies, and each value as its systemd property (an absent limit as infinity, so a
/// limit lowered away does not linger).
pub fn slice_properties(unit: &str, parent: &str, values: &Values, v2: bool) -> Vec<Property> {
    let infinity = u64::MAX;
    let mut p = vec![
        Property::new("Description", Value::Str(format!("strake-kubelet {unit}"))),
        Property::new("Wants", Value::Strs(vec![parent.to_string()])),
        Property::new("MemoryAccounting", Value::Bool(true)),
        Property::new("CPUAccounting", Value::Bool(true)),
        Property::new(
            if v2 {
                "IOAccounting"
            } else {
                "BlockIOAccounting"
            },
            Value::Bool(true),
        ),
        Property::new("TasksAccounting", Value::Bool(true)),
        Property::new("DefaultDependencies", Value::Bool(false)),
    ];
    if let Some(s) = values.cpu_shares {
        p.push(if v2 {
            Property::new("CPUWeight", Value::U64(shares_to_weight(s)))
        } else {
            Property::new("CPUShares", Value::U64(s))
        });
    }
    p.push(Property::new(
        "CPUQuotaPeriodUSec",
        Value::U64(CPU_PERIOD_US as u64),
    ));
    let per_sec = values
        .cpu_quota
        .filter(|q| *q > 0)
        .map_or(infinity, |q| systemd_quota(q).0);
    p.push(Property::new("CPUQuotaPerSecUSec", Value::U64(per_sec)));
    let memory = values
        .memory_limit
        .filter(|m| *m > 0)
        .map_or(infinity, |m| m as u64);
    p.push(Property::new(
        if v2 { "MemoryMax" } else { "MemoryLimit" },
        Value::U64(memory),
    ));
    let tasks = values
        .pids_limit
        .filter(|n| *n > 0)
        .map_or(infinity, |n| n as u64);
    p.push(Property::new("TasksMax", Value::U64(tasks)));
    p
}

/// Why a cgroup could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Systemd(#[from] SystemdError),
}

/// Who makes the kubelet's cgroups.
#[derive(Debug)]
enum Manager {
    /// The kubelet creates the directories (cgroupfs driver).
    Cgroupfs,
    /// systemd makes each cgroup as a transient slice with the values as its properties; the
    /// kubelet then writes the same values into the slice's directories, as upstream's
    /// libcontainer does (systemd does not create v1 directories of controllers it does not
    /// manage, and rounds some values).
    Systemd {
        systemd: Systemd,
        /// The manager's own cgroup (its `ControlGroup`): "" for the system manager.
        base: String,
    },
}

/// Creates and removes the kubelet's cgroups on this host.
#[derive(Debug)]
pub struct PodCgroups {
    layout: CgroupLayout,
    own_cgroup: String,
    root: String,
    pids_limit: i64,
    manager: Manager,
    /// CPU requests of the Burstable pods, for the `burstable` cgroup's shares.
    burstable: Mutex<BTreeMap<String, i128>>,
}

/// The controllers whose files the kubelet writes (v1).
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

impl PodCgroups {
    /// The cgroupfs driver, for a host whose hierarchies are `layout`, a kubelet in cgroup
    /// `own_cgroup` (`/proc/self/cgroup`), `cgroupRoot` `root` and `podPidsLimit` `pids_limit`.
    pub fn new(layout: CgroupLayout, own_cgroup: String, root: &str, pids_limit: i64) -> Self {
        PodCgroups {
            layout,
            own_cgroup,
            root: root.to_string(),
            pids_limit,
            manager: Manager::Cgroupfs,
            burstable: Mutex::new(BTreeMap::new()),
        }
    }

    /// The systemd driver: slices made by the manager `systemd` (whose own cgroup is read from
    /// it), below the slice `cgroupRoot` `root` names ("" or "/" for the root slice).
    pub async fn with_systemd(
        layout: CgroupLayout,
        systemd: Systemd,
        root: &str,
        pids_limit: i64,
    ) -> Result<Self, CgroupError> {
        let base = systemd.control_group().await?;
        Ok(PodCgroups {
            layout,
            own_cgroup: String::new(),
            root: root.to_string(),
            pids_limit,
            manager: Manager::Systemd { systemd, base },
            burstable: Mutex::new(BTreeMap::new()),
        })
    }

    /// This host's hierarchies, the kubelet's own cgroup, and for the systemd driver the
    /// system manager.
    pub async fn detect(
        driver: CgroupDriver,
        root: &str,
        pids_limit: i64,
    ) -> Result<Self, CgroupError> {
        let io = |action, path: &str| {
            let path = PathBuf::from(path);
            move |source| CgroupError::Io {
                action,
                path,
                source,
            }
        };
        let layout = CgroupLayout::detect().map_err(|e| CgroupError::Io {
            action: "read cgroup mounts",
            path: "/proc/self/mountinfo".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        match driver {
            CgroupDriver::Cgroupfs => {
                let own = std::fs::read_to_string("/proc/self/cgroup")
                    .map_err(io("read", "/proc/self/cgroup"))?;
                Ok(Self::new(layout, own, root, pids_limit))
            }
            CgroupDriver::Systemd => {
                let systemd = Systemd::connect().await?;
                Self::with_systemd(layout, systemd, root, pids_limit).await
            }
        }
    }

    /// The directories of the cgroup named `components` below `cgroupRoot`.
    fn dirs<S: AsRef<str>>(&self, components: &[S]) -> Option<ContainerCgroup> {
        match &self.manager {
            Manager::Cgroupfs => {
                let mut path = self.root.trim_end_matches('/').to_string();
                for c in components {
                    path.push('/');
                    path.push_str(c.as_ref());
                }
                self.layout
                    .pod_cgroup(CgroupDriver::Cgroupfs, &path, &self.own_cgroup)
            }
            Manager::Systemd { base, .. } => {
                let unit = self.unit(components);
                let path = format!(
                    "{}/{}",
                    base.trim_end_matches('/'),
                    expand_slice(&unit).display()
                );
                Some(self.layout.container_cgroup(CgroupDriver::Cgroupfs, &path))
            }
        }
    }

    /// The systemd unit of the cgroup named `components` below `cgroupRoot`.
    fn unit<S: AsRef<str>>(&self, components: &[S]) -> String {
        let mut all = systemd_root(&self.root);
        all.extend(components.iter().map(|c| c.as_ref().to_string()));
        systemd_unit(&all)
    }

    async fn apply<S: AsRef<str>>(
        &self,
        components: &[S],
        values: &Values,
    ) -> Result<(), CgroupError> {
        let mut values = values.clone();
        if let Manager::Systemd { systemd, .. } = &self.manager {
            let unit = self.unit(components);
            let parent = self.unit(&components[..components.len().saturating_sub(1)]);
            let properties = slice_properties(&unit, &parent, &values, self.layout.is_v2());
            systemd.start_transient_unit(&unit, &properties).await?;
            // The cgroup gets the quota systemd keeps.
            values.cpu_quota = values
                .cpu_quota
                .filter(|q| *q > 0)
                .map(|q| systemd_quota(q).1);
        }
        let Some(dirs) = self.dirs(components) else {
            return Ok(());
        };
        fn err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError {
            let path = path.to_path_buf();
            move |source| CgroupError::Io {
                action,
                path,
                source,
            }
        }
        match dirs {
            ContainerCgroup::V2(dir) => {
                // systemd made the slice's directory and enabled its controllers itself.
                if matches!(self.manager, Manager::Cgroupfs) {
                    let empty: [&str; 0] = [];
                    let base = match self.dirs(&empty) {
                        Some(ContainerCgroup::V2(base)) => base,
                        _ => dir.clone(),
                    };
                    create_v2(&dir, &base).map_err(err("create", &dir))?;
                }
                for (_, file, value) in files(&values, true) {
                    let path = dir.join(file);
                    write_if_present(&path, &value).map_err(err("write", &path))?;
                }
            }
            ContainerCgroup::V1(by_controller) => {
                for c in CONTROLLERS {
                    if let Some(dir) = by_controller.get(c) {
                        std::fs::create_dir_all(dir).map_err(err("create", dir))?;
                    }
                }
                for (controller, file, value) in files(&values, false) {
                    if let Some(dir) = by_controller.get(controller) {
                        let path = dir.join(file);
                        write_if_present(&path, &value).map_err(err("write", &path))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Holds the existing cgroup `name` (`kubeReservedCgroup` or `systemReservedCgroup`: a
    /// cgroupfs path, relative ones against the kubelet's own cgroup, or a systemd slice) to
    /// `values`, writing only the values that are set. A cgroup that does not exist is an error,
    /// as upstream's kubelet refuses to start then.
    pub async fn enforce_existing(&self, name: &str, values: &Values) -> Result<(), CgroupError> {
        let dirs = match &self.manager {
            Manager::Cgroupfs => {
                self.layout
                    .pod_cgroup(CgroupDriver::Cgroupfs, name, &self.own_cgroup)
            }
            Manager::Systemd { systemd, base } => {
                let unit = name
                    .trim_end_matches('/')
                    .rsplit('/')
                    .next()
                    .unwrap_or(name);
                let properties: Vec<Property> =
                    slice_properties(unit, "-.slice", values, self.layout.is_v2())
                        .into_iter()
                        .filter(|p| sets(values, p.name))
                        .collect();
                systemd.set_unit_properties(unit, &properties).await?;
                let path = format!(
                    "{}/{}",
                    base.trim_end_matches('/'),
                    expand_slice(unit).display()
                );
                Some(self.layout.container_cgroup(CgroupDriver::Cgroupfs, &path))
            }
        };
        let missing = |path: &Path| CgroupError::Io {
            action: "find reserved cgroup",
            path: path.to_path_buf(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let wanted = |file: &str| sets(values, file);
        let write = |path: PathBuf, value: &str| {
            write_if_present(&path, value).map_err(|source| CgroupError::Io {
                action: "write",
                path,
                source,
            })
        };
        match dirs {
            None => return Err(missing(Path::new(name))),
            Some(ContainerCgroup::V2(dir)) => {
                if !dir.is_dir() {
                    return Err(missing(&dir));
                }
                for (_, file, value) in files(values, true) {
                    if wanted(file) {
                        write(dir.join(file), &value)?;
                    }
                }
            }
            Some(ContainerCgroup::V1(by_controller)) => {
                for c in CONTROLLERS {
                    if let Some(dir) = by_controller.get(c)
                        && !dir.is_dir()
                    {
                        return Err(missing(dir));
                    }
                }
                for (controller, file, value) in files(values, false) {
                    if let Some(dir) = by_controller.get(controller)
                        && wanted(file)
                    {
                        write(dir.join(file), &value)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// `kubepods` (held to `allocatable` when given) and its QoS children.
    pub async fn ensure_node(&self, allocatable: Option<Values>) -> Result<(), CgroupError> {
        self.apply(&["kubepods"], &allocatable.unwrap_or_default())
            .await?;
        self.apply(&["kubepods", "burstable"], &Values::default())
            .await?;
        self.apply(
            &["kubepods", "besteffort"],
            &Values {
                cpu_shares: Some(cpu_shares(0) as u64),
                ..Values::default()
            },
        )
        .await
    }

    /// Creates (or updates) pod `pod`'s cgroup with its values; for a Burstable pod the
    /// `burstable` cgroup's shares follow the sum of its pods' CPU requests.
    pub async fn ensure_pod(&self, pod: &Pod) -> Result<(), CgroupError> {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        if !valid_uid(&uid) {
            return Ok(());
        }
        let qos = crate::pod_spec::qos_class(pod);
        if qos == "Burstable" {
            let request = crate::predicates::pod_requests(pod)
                .get("cpu")
                .copied()
                .unwrap_or(0);
            let total: i128 = {
                let mut b = self.burstable.lock().unwrap_or_else(|e| e.into_inner());
                b.insert(uid.clone(), request);
                b.values().sum()
            };
            self.apply(
                &["kubepods", "burstable"],
                &Values {
                    cpu_shares: Some(cpu_shares(total) as u64),
                    ..Values::default()
                },
            )
            .await?;
        }
        self.apply(
            &pod_components(qos, &uid),
            &pod_values(pod, self.pids_limit),
        )
        .await
    }

    /// Removes pod `uid`'s cgroup (whatever its QoS class was) once the runtime has removed
    /// the pod's containers: its slice stopped (systemd driver), then its empty directories,
    /// deepest first, in every hierarchy.
    pub async fn remove_pod(&self, uid: &str) {
        if !valid_uid(uid) {
            return;
        }
        self.burstable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
        for qos in ["Guaranteed", "Burstable", "BestEffort"] {
            let components = pod_components(qos, uid);
            if let Manager::Systemd { systemd, .. } = &self.manager {
                let unit = self.unit(&components);
                if let Err(e) = systemd.stop_unit(&unit).await {
                    tracing::warn!(unit, error = %e, "pod slice not stopped");
                }
            }
            let dirs: Vec<PathBuf> = match self.dirs(&components) {
                Some(ContainerCgroup::V2(d)) => vec![d],
                Some(ContainerCgroup::V1(m)) => m.into_values().collect(),
                None => Vec::new(),
            };
            for d in dirs {
                remove_empty_tree(&d);
            }
        }
    }
}

/// Whether `values` sets what systemd property or cgroup file `name` holds (an enforced
/// reservation writes only those, leaving the rest of an existing cgroup as it is).
fn sets(values: &Values, name: &str) -> bool {
    match name {
        "CPUShares" | "CPUWeight" | "cpu.shares" | "cpu.weight" => values.cpu_shares.is_some(),
        "MemoryLimit" | "MemoryMax" | "memory.limit_in_bytes" | "memory.max" => {
            values.memory_limit.is_some()
        }
        "TasksMax" | "pids.max" => values.pids_limit.is_some(),
        _ => false,
    }
}

/// A UID is one path component.
fn valid_uid(uid: &str) -> bool {
    !uid.is_empty() && !uid.contains('/') && uid != "." && uid != ".."
}

/// Writes `value` into an existing control file (a fixture or a kernel without the controller
/// file is skipped, not created).
fn write_if_present(path: &Path, value: &str) -> std::io::Result<()> {
    match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(mut f) => std::io::Write::write_all(&mut f, value.as_bytes()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Creates a v2 directory and enables the controllers the kubelet sets in `cgroup.subtree_control`
/// of each directory from `base` (the `cgroupRoot`) down to its parent, top down, where the file
/// exists. Nothing above `base` is touched.
fn create_v2(dir: &Path, base: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut chain: Vec<&Path> = dir
        .ancestors()
        .skip(1)
        .take_while(|p| p.starts_with(base))
        .collect();
    chain.reverse();
    for p in chain {
        write_if_present(&p.join("cgroup.subtree_control"), "+cpu +memory +pids")?;
    }
    Ok(())
}

/// Removes `dir` and the directories below it, deepest first; a cgroup that still holds a
/// process (or a regular directory holding a file) stays.
fn remove_empty_tree(dir: &Path) {
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(containers: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "p", "uid": "1234-5678" },
            "spec": { "containers": containers }
        }))
        .unwrap()
    }

    fn res(requests: serde_json::Value, limits: serde_json::Value) -> serde_json::Value {
        serde_json::json!({ "requests": requests, "limits": limits })
    }

    #[test]
    fn pod_values_follow_upstreams_resource_config_for_pod() {
        let guaranteed = pod(serde_json::json!([
            { "name": "a", "resources": res(
                serde_json::json!({ "cpu": "250m", "memory": "64Mi" }),
                serde_json::json!({ "cpu": "250m", "memory": "64Mi" })) },
            { "name": "b", "resources": res(
                serde_json::json!({ "cpu": "1", "memory": "128Mi" }),
                serde_json::json!({ "cpu": "1", "memory": "128Mi" })) }
        ]));
        assert_eq!(
            pod_values(&guaranteed, -1),
            Values {
                cpu_shares: Some(1280),
                cpu_quota: Some(125_000),
                memory_limit: Some(192 << 20),
                pids_limit: None,
            }
        );
        // Burstable: one container without limits: shares only.
        let burstable = pod(serde_json::json!([
            { "name": "a", "resources": res(
                serde_json::json!({ "cpu": "100m" }), serde_json::json!({ "cpu": "200m", "memory": "32Mi" })) },
            { "name": "b" }
        ]));
        assert_eq!(
            pod_values(&burstable, 1024),
            Values {
                cpu_shares: Some(102),
                cpu_quota: None,
                memory_limit: None,
                pids_limit: Some(1024),
            }
        );
        // Burstable with every limit set (requests below them): quota and memory too.
        let limited = pod(serde_json::json!([
            { "name": "a", "resources": res(
                serde_json::json!({ "cpu": "100m", "memory": "16Mi" }),
                serde_json::json!({ "cpu": "500m", "memory": "64Mi" })) }
        ]));
        let v = pod_values(&limited, -1);
        assert_eq!(
            (v.cpu_shares, v.cpu_quota, v.memory_limit),
            (Some(102), Some(50_000), Some(64 << 20))
        );
        let best_effort = pod(serde_json::json!([{ "name": "a" }]));
        assert_eq!(
            pod_values(&best_effort, -1),
            Values {
                cpu_shares: Some(2),
                ..Values::default()
            }
        );
    }

    #[test]
    fn values_become_v1_and_v2_files() {
        let v = Values {
            cpu_shares: Some(1024),
            cpu_quota: Some(50_000),
            memory_limit: Some(64 << 20),
            pids_limit: Some(100),
        };
        let v1: Vec<(&str, &str, String)> = files(&v, false);
        assert!(v1.contains(&("cpu", "cpu.shares", "1024".into())));
        assert!(v1.contains(&("cpu", "cpu.cfs_quota_us", "50000".into())));
        assert!(v1.contains(&("cpu", "cpu.cfs_period_us", "100000".into())));
        assert!(v1.contains(&("memory", "memory.limit_in_bytes", (64u64 << 20).to_string())));
        assert!(v1.contains(&("pids", "pids.max", "100".into())));
        let v2 = files(&v, true);
        assert!(v2.contains(&("", "cpu.weight", "39".into())));
        assert!(v2.contains(&("", "cpu.max", "50000 100000".into())));
        assert!(v2.contains(&("", "memory.max", (64u64 << 20).to_string())));
        let none = files(&Values::default(), true);
        assert!(none.contains(&("", "cpu.max", "max 100000".into())));
        assert!(none.contains(&("", "memory.max", "max".into())));
        assert!(none.contains(&("", "pids.max", "max".into())));
        let none = files(&Values::default(), false);
        assert!(none.contains(&("memory", "memory.limit_in_bytes", "-1".into())));
        assert!(none.contains(&("cpu", "cpu.cfs_quota_us", "-1".into())));
        assert_eq!(
            (shares_to_weight(2), shares_to_weight(262_144)),
            (1, 10_000)
        );
    }

    #[test]
    fn pod_cgroup_parents_are_named_per_driver_as_upstreams() {
        let fs = CgroupDriver::Cgroupfs;
        assert_eq!(
            pod_cgroup_parent(fs, "", "Burstable", "u"),
            "/kubepods/burstable/podu"
        );
        assert_eq!(
            pod_cgroup_parent(fs, "rel", "Guaranteed", "u"),
            "rel/kubepods/podu"
        );
        let sd = CgroupDriver::Systemd;
        assert_eq!(
            pod_cgroup_parent(sd, "", "Burstable", "ab-cd"),
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podab_cd.slice"
        );
        assert_eq!(
            pod_cgroup_parent(sd, "/", "Guaranteed", "ab-cd"),
            "/kubepods.slice/kubepods-podab_cd.slice"
        );
        // A cgroupRoot slice nests everything below it; its dashes are levels.
        assert_eq!(
            pod_cgroup_parent(sd, "/system.slice/my-node.slice", "BestEffort", "x"),
            "/my.slice/my-node.slice/my-node-kubepods.slice/my-node-kubepods-besteffort.slice/my-node-kubepods-besteffort-podx.slice"
        );
        assert_eq!(systemd_root("/a_b.slice"), vec!["a-b".to_string()]);
        assert_eq!(systemd_unit::<&str>(&[]), "-.slice");
        assert_eq!(systemd_unit(&["a-b", "c"]), "a_b-c.slice");
    }

    #[test]
    fn systemd_quota_is_rounded_up_to_whole_percents_and_written_so() {
        // 500m: 50 ms per 100 ms period, 500 ms per second, already whole percents.
        assert_eq!(systemd_quota(50_000), (500_000, 50_000));
        // 15m: 1.5 ms per period is 15 ms/s, kept by systemd as 20 ms/s (2 ms per period).
        assert_eq!(systemd_quota(1_500), (20_000, 2_000));
        // The kernel's minimum quota, 1 ms, is 1 %.
        assert_eq!(systemd_quota(1_000), (10_000, 1_000));
    }

    #[test]
    fn slice_properties_are_libcontainers_for_v1_and_v2() {
        let v = Values {
            cpu_shares: Some(1024),
            cpu_quota: Some(50_000),
            memory_limit: Some(64 << 20),
            pids_limit: Some(100),
        };
        let get = |props: &[Property], name: &str| {
            props
                .iter()
                .find(|p| p.name == name)
                .map(|p| p.value.clone())
        };
        let v1 = slice_properties("kubepods-podu.slice", "kubepods.slice", &v, false);
        assert_eq!(
            get(&v1, "Wants"),
            Some(Value::Strs(vec!["kubepods.slice".into()]))
        );
        assert_eq!(get(&v1, "CPUShares"), Some(Value::U64(1024)));
        assert_eq!(get(&v1, "CPUWeight"), None);
        assert_eq!(get(&v1, "CPUQuotaPerSecUSec"), Some(Value::U64(500_000)));
        assert_eq!(get(&v1, "CPUQuotaPeriodUSec"), Some(Value::U64(100_000)));
        assert_eq!(get(&v1, "MemoryLimit"), Some(Value::U64(64 << 20)));
        assert_eq!(get(&v1, "TasksMax"), Some(Value::U64(100)));
        assert_eq!(get(&v1, "BlockIOAccounting"), Some(Value::Bool(true)));
        assert_eq!(get(&v1, "DefaultDependencies"), Some(Value::Bool(false)));
        let v2 = slice_properties("kubepods-podu.slice", "kubepods.slice", &v, true);
        assert_eq!(get(&v2, "CPUWeight"), Some(Value::U64(39)));
        assert_eq!(get(&v2, "CPUShares"), None);
        assert_eq!(get(&v2, "MemoryMax"), Some(Value::U64(64 << 20)));
        assert_eq!(get(&v2, "IOAccounting"), Some(Value::Bool(true)));
        // Limits that are absent are infinity, so a lowered-away one does not linger.
        let none = slice_properties("kubepods.slice", "-.slice", &Values::default(), true);
        for name in ["CPUQuotaPerSecUSec", "MemoryMax", "TasksMax"] {
            assert_eq!(get(&none, name), Some(Value::U64(u64::MAX)), "{name}");
        }
        assert_eq!(get(&none, "CPUWeight"), None);
    }

    /// A fake v1 hierarchy (cpu,cpuacct co-mounted, memory, pids) or a v2 one, as mountinfo
    /// lines, with the control files the kernel would show pre-created in each directory.
    fn fixture(v2: bool) -> (tempfile::TempDir, CgroupLayout) {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().display().to_string();
        let mountinfo = if v2 {
            format!("30 25 0:26 / {base}/unified rw shared:9 - cgroup2 cgroup2 rw\n")
        } else {
            format!(
                "31 25 0:27 / {base}/cpu,cpuacct rw shared:10 - cgroup cgroup rw,cpu,cpuacct\n\
                 32 25 0:28 / {base}/memory rw shared:11 - cgroup cgroup rw,memory\n\
                 33 25 0:29 / {base}/pids rw shared:12 - cgroup cgroup rw,pids\n"
            )
        };
        let layout = CgroupLayout::from_mountinfo(&mountinfo).unwrap();
        (dir, layout)
    }

    /// Pre-creates the control files a kernel would show in `dir`.
    fn control_files(dir: &Path, v2: bool) {
        std::fs::create_dir_all(dir).unwrap();
        let names: &[&str] = if v2 {
            &[
                "cpu.weight",
                "cpu.max",
                "memory.max",
                "pids.max",
                "cgroup.subtree_control",
            ]
        } else {
            &[
                "cpu.shares",
                "cpu.cfs_quota_us",
                "cpu.cfs_period_us",
                "memory.limit_in_bytes",
                "pids.max",
            ]
        };
        for n in names {
            std::fs::write(dir.join(n), "").unwrap();
        }
    }

    #[test]
    fn pod_cgroups_are_written_on_v1_fixture_trees_below_the_own_cgroup() {
        let (dir, layout) = fixture(false);
        // The kubelet runs in /test.slice; cgroupRoot "tb" is relative to it.
        let own = "4:pids:/test\n3:memory:/test\n2:cpu,cpuacct:/test\n";
        let cg = PodCgroups::new(layout, own.into(), "tb", 512);
        let pod_dir = |c: &str| dir.path().join(c).join("test/tb/kubepods/pod1234-5678");
        for c in ["cpu,cpuacct", "memory", "pids"] {
            control_files(&pod_dir(c), false);
        }
        let guaranteed = pod(serde_json::json!([
            { "name": "a", "resources": res(
                serde_json::json!({ "cpu": "500m", "memory": "64Mi" }),
                serde_json::json!({ "cpu": "500m", "memory": "64Mi" })) }
        ]));
        futures::executor::block_on(cg.ensure_pod(&guaranteed)).unwrap();
        let read = |c: &str, f: &str| std::fs::read_to_string(pod_dir(c).join(f)).unwrap();
        assert_eq!(read("cpu,cpuacct", "cpu.shares"), "512");
        assert_eq!(read("cpu,cpuacct", "cpu.cfs_quota_us"), "50000");
        assert_eq!(
            read("memory", "memory.limit_in_bytes"),
            (64u64 << 20).to_string()
        );
        assert_eq!(read("pids", "pids.max"), "512");
        // Removal takes the pod's directories (and empty ones below) and nothing else.
        std::fs::create_dir(pod_dir("memory").join("container-1")).unwrap();
        for c in ["cpu,cpuacct", "memory", "pids"] {
            for entry in std::fs::read_dir(pod_dir(c)).unwrap().flatten() {
                if entry.file_type().unwrap().is_file() {
                    std::fs::remove_file(entry.path()).unwrap();
                }
            }
        }
        futures::executor::block_on(cg.remove_pod("1234-5678"));
        for c in ["cpu,cpuacct", "memory", "pids"] {
            assert!(!pod_dir(c).exists(), "{c}");
            assert!(dir.path().join(c).join("test/tb/kubepods").exists());
        }
        futures::executor::block_on(cg.remove_pod("../escape"));
    }

    #[test]
    fn enforced_reservations_write_only_their_values_into_an_existing_cgroup() {
        let (dir, layout) = fixture(false);
        let own = "4:pids:/test\n3:memory:/test\n2:cpu,cpuacct:/test\n";
        let cg = PodCgroups::new(layout, own.into(), "tb", -1);
        let reserved = |c: &str| dir.path().join(c).join("test/kube-reserved");
        for c in ["cpu,cpuacct", "memory", "pids"] {
            control_files(&reserved(c), false);
            std::fs::write(reserved(c).join("cpu.cfs_quota_us"), "untouched").unwrap();
        }
        let r: BTreeMap<String, i128> = [
            ("cpu".to_string(), 500),
            ("memory".to_string(), (100i128 << 20) * 1000),
            ("pid".to_string(), 1000 * 1000),
        ]
        .into();
        use futures::executor::block_on as block;
        block(cg.enforce_existing("kube-reserved", &reserved_values(&r, false))).unwrap();
        let read = |c: &str, f: &str| std::fs::read_to_string(reserved(c).join(f)).unwrap();
        assert_eq!(read("cpu,cpuacct", "cpu.shares"), "512");
        assert_eq!(
            read("memory", "memory.limit_in_bytes"),
            (100u64 << 20).to_string()
        );
        assert_eq!(read("pids", "pids.max"), "1000");
        assert_eq!(read("cpu,cpuacct", "cpu.cfs_quota_us"), "untouched");
        // The compressible form holds the CPU only.
        std::fs::write(reserved("memory").join("memory.limit_in_bytes"), "").unwrap();
        block(cg.enforce_existing("kube-reserved", &reserved_values(&r, true))).unwrap();
        assert_eq!(read("memory", "memory.limit_in_bytes"), "");
        // A cgroup that does not exist is an error naming it.
        let e = block(cg.enforce_existing("no-such", &reserved_values(&r, false))).unwrap_err();
        assert!(e.to_string().contains("no-such"), "{e}");
    }

    #[test]
    fn pod_cgroups_are_written_on_v2_fixture_trees() {
        let (dir, layout) = fixture(true);
        let own = "0::/test\n";
        let cg = PodCgroups::new(layout, own.into(), "tb", -1);
        let unified = dir.path().join("unified");
        control_files(&unified.join("test"), true);
        control_files(&unified.join("test/tb"), true);
        let node = node_values(2000, 1 << 30);
        let kubepods = unified.join("test/tb/kubepods");
        control_files(&kubepods, true);
        futures::executor::block_on(cg.ensure_node(Some(node))).unwrap();
        assert_eq!(
            std::fs::read_to_string(kubepods.join("memory.max")).unwrap(),
            (1u64 << 30).to_string()
        );
        assert_eq!(
            std::fs::read_to_string(kubepods.join("cpu.weight")).unwrap(),
            shares_to_weight(2048).to_string()
        );
        // The controllers are enabled from the cgroupRoot down, never above it.
        for d in ["test/tb", "test/tb/kubepods"] {
            assert_eq!(
                std::fs::read_to_string(unified.join(d).join("cgroup.subtree_control")).unwrap(),
                "+cpu +memory +pids",
                "{d}"
            );
        }
        assert_eq!(
            std::fs::read_to_string(unified.join("test/cgroup.subtree_control")).unwrap(),
            ""
        );
        let burstable = pod(serde_json::json!([
            { "name": "a", "resources": res(
                serde_json::json!({ "cpu": "1" }), serde_json::json!({ "memory": "32Mi" })) }
        ]));
        control_files(&kubepods.join("burstable"), true);
        control_files(&kubepods.join("burstable/pod1234-5678"), true);
        futures::executor::block_on(cg.ensure_pod(&burstable)).unwrap();
        let pod_dir = kubepods.join("burstable/pod1234-5678");
        assert_eq!(
            std::fs::read_to_string(pod_dir.join("memory.max")).unwrap(),
            (32u64 << 20).to_string()
        );
        assert_eq!(
            std::fs::read_to_string(pod_dir.join("cpu.max")).unwrap(),
            "max 100000"
        );
        assert_eq!(
            std::fs::read_to_string(kubepods.join("burstable/cpu.weight")).unwrap(),
            shares_to_weight(1024).to_string(),
            "the burstable cgroup's weight follows its pods' requests"
        );
    }
}
