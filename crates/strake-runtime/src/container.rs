//! Containers: an overlay rootfs over the image's layers, an OCI bundle from [`crate::spec`], one
//! `strake-monitor` per container that runs the OCI runtime's `create` and outlives the daemon,
//! and the other lifecycle steps through the [`crate::runc`] seam.
//!
//! Each container has `<state>/containers/<id>/`: `container.json` (what was made, written
//! atomically), `config.pb` (the CRI config), `upper/` and `work/` (the overlay's writable
//! layers), `bundle/` (`config.json`, the mounted `rootfs/`, the init's PID file) and
//! `exit.json`, which the monitor writes the moment the init is reaped. The state of a container
//! is derived from those facts: no exit record and never started = Created, started = Running,
//! exit record = Exited. A daemon that restarts reads the same files, so a container that exited
//! while it was away reports its real exit code and a running one is left alone.

use crate::mount::{mount_image_read_only, mount_overlay, unmount};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prost::Message;
use serde::{Deserialize, Serialize};
use strake_types::cri;

use crate::cgroups::{CgroupDriver, CgroupLayout, ContainerCgroup};
use crate::config::RuntimeHandler;
use crate::monitor::{self, ExitRecord, Ready};
use crate::runc::{ExecOptions, ProcessIo, Runc, RuncCli, RuncConfig, RuncError};
use crate::sandbox::{Sandbox, Sandboxes, new_id, process_start_time};
use crate::spec::{self, ImageProcessConfig, NodeOptions, Resolved, SandboxFacts, SpecError};
use crate::state::{MODE_PRIVATE, create_dir_mode, write_atomic};

/// The largest output ExecSync returns per stream (the rest is dropped, as CRI asks).
const EXEC_OUTPUT_LIMIT: usize = 16 << 20;
/// How long StopContainer waits for the exit record after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// The monitor's attach socket, in the container's state directory.
const ATTACH_SOCKET: &str = "attach";

/// A failed container operation.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The request lacks something it must carry or asks for something impossible.
    #[error("invalid container request: {0}")]
    InvalidArgument(String),
    /// No container has this ID (or unique ID prefix).
    #[error("container {0:?} not found")]
    NotFound(String),
    /// The pod sandbox named by the request does not exist.
    #[error("pod sandbox {0:?} not found")]
    SandboxNotFound(String),
    /// The pod sandbox is stopped: its namespaces are gone.
    #[error("pod sandbox {0} is not ready")]
    SandboxNotReady(String),
    /// The image named by the request is not in the store.
    #[error("image {0:?} not found")]
    ImageNotFound(String),
    /// A container with the same name exists in the pod.
    #[error("container name {name:?} is reserved by {id}")]
    NameTaken { name: String, id: String },
    /// The operation does not fit the container's state.
    #[error("container {id} is {state}: cannot {op}")]
    WrongState {
        id: String,
        state: &'static str,
        op: &'static str,
    },
    /// The OCI spec could not be built from the request.
    #[error("build the OCI spec of container {name}")]
    Spec {
        name: String,
        #[source]
        source: SpecError,
    },
    /// Creating the container failed at one step (what was made so far is removed again).
    #[error("create container {name}: {step}")]
    Create {
        name: String,
        step: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The OCI runtime failed.
    #[error("{op} container {id}")]
    Runtime {
        op: &'static str,
        id: String,
        #[source]
        source: RuncError,
    },
    /// ExecSync's command ran longer than its timeout (it was killed).
    #[error("exec in container {id} timed out after {secs}s")]
    ExecTimeout { id: String, secs: i64 },
    /// Tearing the container down left something behind.
    #[error("remove container {id}: {what}")]
    Teardown { id: String, what: String },
    /// Reading or writing container state failed.
    #[error("container state {path}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

type Result<T, E = ContainerError> = std::result::Result<T, E>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ContainerError + '_ {
    move |source| ContainerError::State {
        path: path.to_path_buf(),
        source,
    }
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// How the container ended, as ContainerStatus reports it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExitInfo {
    pub exit_code: i32,
    pub finished_at_ns: i64,
    /// `Completed`, `Error` or `OOMKilled`.
    pub reason: String,
    pub message: String,
}

/// What the runtime made for one container, persisted as `container.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ContainerRecord {
    pub id: String,
    pub sandbox_id: String,
    /// `k8s_<container>_<pod>_<namespace>_<uid>_<attempt>`: unique among live containers.
    pub name: String,
    /// The image as the request named it.
    pub image: String,
    /// The image's ID (`sha256:<config digest>`).
    pub image_id: String,
    /// A repo digest of the image, else its ID.
    pub image_ref: String,
    pub runtime_handler: String,
    pub created_at_ns: i64,
    /// 0 until started.
    pub started_at_ns: i64,
    /// The CRI log file (empty: the kubelet asked for none).
    pub log_path: PathBuf,
    /// The signal StopContainer sends first.
    pub stop_signal: i32,
    /// The monitor, with its start time to tell it from a recycled PID.
    pub monitor_pid: Option<u32>,
    pub monitor_start_time: Option<u64>,
    /// The container's init.
    pub init_pid: Option<u32>,
    /// The memory cgroup file holding the `oom_kill` counter, found at create.
    pub oom_file: Option<PathBuf>,
    /// Whether the overlay rootfs is mounted.
    pub rootfs_mounted: bool,
    /// Set once the exit is known.
    pub exit: Option<ExitInfo>,
    /// The images the container's image volumes show (IDs): not removable while it exists.
    #[serde(default)]
    pub volume_images: Vec<String>,
    /// Where those images are mounted, read-only, for the container to bind.
    #[serde(default)]
    pub image_mounts: Vec<PathBuf>,
    /// The pod's infra (pause) container, which the runtime runs for handlers that need one:
    /// not a container of the kubelet's, so CRI lists and statuses leave it out.
    #[serde(default)]
    pub infra: bool,
}

/// A container: its record and its CRI configuration.
#[derive(Clone, Debug)]
pub struct Container {
    pub record: ContainerRecord,
    pub config: cri::ContainerConfig,
}

impl Container {
    /// The CRI state.
    pub fn state(&self) -> cri::ContainerState {
        if self.record.exit.is_some() {
            cri::ContainerState::ContainerExited
        } else if self.record.started_at_ns > 0 {
            cri::ContainerState::ContainerRunning
        } else {
            cri::ContainerState::ContainerCreated
        }
    }
}

fn state_name(s: cri::ContainerState) -> &'static str {
    match s {
        cri::ContainerState::ContainerCreated => "created",
        cri::ContainerState::ContainerRunning => "running",
        cri::ContainerState::ContainerExited => "exited",
        cri::ContainerState::ContainerUnknown => "unknown",
    }
}

/// The reserved name of a container, as the kubelet and containerd build it.
pub fn container_name(c: &cri::ContainerMetadata, pod: &cri::PodSandboxMetadata) -> String {
    format!(
        "k8s_{}_{}_{}_{}_{}",
        c.name, pod.name, pod.namespace, pod.uid, c.attempt
    )
}

/// The reason ContainerStatus gives for an exit.
pub fn exit_reason(exit_code: i32, oom_killed: bool) -> &'static str {
    if oom_killed {
        "OOMKilled"
    } else if exit_code == 0 {
        "Completed"
    } else {
        "Error"
    }
}

/// containerd's `restrict_oom_score_adj`: a process may not lower its OOM score below its
/// parent's without CAP_SYS_RESOURCE, so the container's is raised to the daemon's own.
pub fn restrict_oom_score_adj(requested: i32, own: i32) -> i32 {
    requested.max(own)
}

/// `linux.cgroupsPath` for a container. An absolute (or empty) parent goes through
/// [`crate::cgroups::cgroups_path`]; a relative one stays relative under cgroupfs, which the OCI
/// runtime resolves against its own cgroup (how a test keeps containers below its own cgroup).
pub fn container_cgroups_path(driver: CgroupDriver, parent: &str, id: &str) -> String {
    if driver == CgroupDriver::Cgroupfs && !parent.is_empty() && !parent.starts_with('/') {
        format!("{}/{id}", parent.trim_end_matches('/'))
    } else {
        crate::cgroups::cgroups_path(driver, parent, id)
    }
}

/// Image facts CreateContainer needs, looked up by the caller (the image service is async).
#[derive(Clone, Debug)]
pub struct ImageFacts {
    /// The image ID.
    pub id: String,
    /// A repo digest, else the ID.
    pub image_ref: String,
    /// Overlay lower dirs, top layer first.
    pub lower_dirs: Vec<PathBuf>,
    /// The image config's process defaults.
    pub process: ImageProcessConfig,
}

/// An image a container mounts as a volume: which of its CRI mounts, and the image's layers.
#[derive(Clone, Debug)]
pub struct ImageVolume {
    /// Index in the container config's `mounts`.
    pub mount: usize,
    /// The image ID.
    pub id: String,
    /// Overlay lower dirs, top layer first.
    pub lower_dirs: Vec<PathBuf>,
}

/// `sub` below the image volume mounted at `root`: relative, without `..`, and through no
/// symbolic link (the image's content is the image author's, the host is not theirs).
fn image_sub_path(root: &Path, sub: &str) -> std::result::Result<PathBuf, String> {
    let mut path = root.to_path_buf();
    for part in Path::new(sub).components() {
        match part {
            std::path::Component::Normal(p) => path.push(p),
            std::path::Component::CurDir => {}
            _ => return Err(format!("image_sub_path {sub:?} must stay inside the image")),
        }
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!(
                    "image_sub_path {sub:?} goes through a symbolic link"
                ));
            }
            Ok(_) => {}
            Err(_) => {
                return Err(format!(
                    "image_sub_path {sub:?} does not exist in the image"
                ));
            }
        }
    }
    Ok(path)
}

/// Where containers keep state and which programs they use.
#[derive(Clone, Debug)]
pub struct ContainerPaths {
    /// `<state>/containers`.
    pub state_dir: PathBuf,
    /// `<run>/oci`: one `--root` per runtime handler, plus temporary files.
    pub runtime_dir: PathBuf,
    /// The `strake-monitor` binary.
    pub monitor_binary: PathBuf,
}

/// How many lifecycle events a slow GetContainerEvents subscriber may fall behind before it
/// misses some (it then sees a gap, as with containerd).
const EVENT_BACKLOG: usize = 1024;

/// How long ReopenContainerLog waits for the monitor to reopen the log file.
const REOPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// A container lifecycle transition, published to GetContainerEvents subscribers.
#[derive(Clone, Debug)]
pub struct ContainerEvent {
    /// The container as the transition left it (a subscriber may look later, when it has
    /// moved on).
    pub container: Box<Container>,
    pub kind: cri::ContainerEventType,
    /// When the transition happened, nanoseconds since the epoch.
    pub at_ns: i64,
}

/// The live containers by ID; shared with the image service's in-use check.
pub type ContainerMap = Arc<Mutex<HashMap<String, Container>>>;

/// Creates, tracks and removes containers.
pub struct Containers {
    paths: ContainerPaths,
    handlers: BTreeMap<String, RuntimeHandler>,
    driver: CgroupDriver,
    layout: Option<CgroupLayout>,
    node: NodeOptions,
    own_oom_score_adj: i32,
    inner: ContainerMap,
    ops: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    events: tokio::sync::broadcast::Sender<ContainerEvent>,
}

impl std::fmt::Debug for Containers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containers")
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

fn lock(map: &ContainerMap) -> std::sync::MutexGuard<'_, HashMap<String, Container>> {
    // Every update is a single insert or remove: a panic cannot leave the map half-updated.
    map.lock().unwrap_or_else(|e| e.into_inner())
}

fn alive(pid: Option<u32>, start_time: Option<u64>) -> bool {
    pid.is_some_and(|p| process_start_time(p).is_some_and(|t| Some(t) == start_time))
}

impl Containers {
    /// Opens the container store and adopts every container recorded there (before serving).
    pub fn recover(
        paths: ContainerPaths,
        handlers: BTreeMap<String, RuntimeHandler>,
        driver: CgroupDriver,
        inner: ContainerMap,
    ) -> Result<Self> {
        // Root's alone: container roots, upper dirs and bundles sit below (fixed on start for
        // state an older version made 0755).
        for dir in [
            &paths.state_dir,
            &paths.runtime_dir,
            &paths.runtime_dir.join("tmp"),
        ] {
            create_dir_mode(dir, MODE_PRIVATE).map_err(io(dir))?;
        }
        let layout = CgroupLayout::detect().ok();
        let node = NodeOptions {
            cgroup_namespace: layout.as_ref().is_some_and(CgroupLayout::is_v2),
            apparmor_enabled: std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
                .is_ok_and(|s| s.trim() == "Y"),
            rlimits: Vec::new(),
            bounding_capabilities: spec::current_bounding_capabilities(),
            hugepage_sizes: layout
                .as_ref()
                .map(|l| l.hugetlb_page_sizes(Path::new("/sys/kernel/mm/hugepages")))
                .unwrap_or_default(),
        };
        let own_oom_score_adj = std::fs::read_to_string("/proc/self/oom_score_adj")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let containers = Containers {
            paths,
            handlers,
            driver,
            layout,
            node,
            own_oom_score_adj,
            inner,
            ops: Mutex::new(HashMap::new()),
            events: tokio::sync::broadcast::channel(EVENT_BACKLOG).0,
        };
        let mut count = 0;
        for entry in std::fs::read_dir(&containers.paths.state_dir)
            .map_err(io(&containers.paths.state_dir))?
            .flatten()
        {
            let dir = entry.path();
            match load(&dir) {
                Ok(mut c) => {
                    let id = c.record.id.clone();
                    if c.record.monitor_pid.is_none() && c.record.exit.is_none() {
                        // A create the previous daemon did not finish: it can only be removed.
                        c.record.exit = Some(ExitInfo {
                            exit_code: 255,
                            finished_at_ns: now_ns(),
                            reason: "Error".into(),
                            message: "creation was interrupted by a restart of the runtime".into(),
                        });
                    }
                    lock(&containers.inner).insert(id.clone(), c);
                    // A container that exited while we were away: its exit record is read now.
                    if let Err(e) = containers.refresh(&id) {
                        tracing::warn!(container = %id, error = %e, "cannot refresh container");
                    }
                    count += 1;
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "skipping unreadable container record")
                }
            }
        }
        tracing::info!(count, "recovered containers");
        Ok(containers)
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.paths.state_dir.join(id)
    }

    /// Lifecycle events from now on (created, started, stopped, deleted).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<ContainerEvent> {
        self.events.subscribe()
    }

    fn emit(&self, c: &Container, kind: cri::ContainerEventType, at_ns: i64) {
        if c.record.infra {
            return;
        }
        // No subscriber is not an error: events are only for those listening.
        let _ = self.events.send(ContainerEvent {
            container: Box::new(c.clone()),
            kind,
            at_ns,
        });
    }

    /// The overlay's writable (upper) directory of a container.
    pub fn upper_dir(&self, id: &str) -> PathBuf {
        self.dir(id).join("upper")
    }

    /// ImageFsInfo's container filesystem: where the writable layers live (the containers'
    /// state directory) and what they all use, bytes and inodes.
    pub fn writable_layers(&self, timestamp: i64) -> cri::FilesystemUsage {
        let ids: Vec<String> = lock(&self.inner).keys().cloned().collect();
        let (bytes, inodes) = ids
            .iter()
            .map(|id| crate::stats::disk_usage(&self.upper_dir(id)))
            .fold((0u64, 0u64), |(b, i), (db, di)| {
                (b.saturating_add(db), i.saturating_add(di))
            });
        cri::FilesystemUsage {
            timestamp,
            fs_id: Some(cri::FilesystemIdentifier {
                mountpoint: self.paths.state_dir.display().to_string(),
            }),
            used_bytes: Some(cri::UInt64Value { value: bytes }),
            inodes_used: Some(cri::UInt64Value { value: inodes }),
        }
    }

    /// The host's cgroup hierarchy, if it could be read.
    pub fn layout(&self) -> Option<&CgroupLayout> {
        self.layout.as_ref()
    }

    /// The cgroup driver containers are created with.
    pub fn driver(&self) -> CgroupDriver {
        self.driver
    }

    /// The directories of sandbox `id`'s own cgroup below its `cgroup_parent` (where containerd
    /// puts a pause container: a child of the pod's cgroup, which on v2 must hold no process
    /// of its own), in the v1 hierarchies that account for what a process uses (a new cpuset
    /// cgroup has no CPUs until someone copies them in, and joining it fails). Relative parents
    /// resolve against the daemon's own cgroup, as for runc. None without a parent, and with
    /// the systemd driver (whose slices systemd makes).
    fn sandbox_cgroup_dirs(
        &self,
        parent: &str,
        id: &str,
    ) -> std::io::Result<std::collections::BTreeSet<PathBuf>> {
        let Some(layout) = self.layout.as_ref() else {
            return Ok(Default::default());
        };
        if parent.is_empty() || self.driver != CgroupDriver::Cgroupfs {
            return Ok(Default::default());
        }
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let path = format!("{}/{id}", parent.trim_end_matches('/'));
        Ok(match layout.pod_cgroup(self.driver, &path, &own) {
            None => Default::default(),
            Some(ContainerCgroup::V1(by_controller)) => by_controller
                .into_iter()
                .filter(|(c, _)| {
                    matches!(
                        c.as_str(),
                        "memory" | "cpu" | "cpuacct" | "pids" | "blkio" | "hugetlb"
                    )
                })
                .map(|(_, dir)| dir)
                .collect(),
            Some(ContainerCgroup::V2(dir)) => [dir].into(),
        })
    }

    /// Moves process `pid` and its children (sandbox `id`'s pause process and the PID 1 it
    /// forked) into the sandbox's cgroup below the pod's ([`Self::sandbox_cgroup_dirs`]), made
    /// as runc makes a container's: everything a pod runs is charged to the pod.
    pub fn join_cgroup(&self, parent: &str, id: &str, pid: u32) -> std::io::Result<()> {
        let dirs = self.sandbox_cgroup_dirs(parent, id)?;
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        let pids: Vec<String> = std::iter::once(pid.to_string())
            .chain(children.split_whitespace().map(String::from))
            .collect();
        for dir in dirs {
            std::fs::create_dir_all(&dir)?;
            for p in &pids {
                std::fs::write(dir.join("cgroup.procs"), p)?;
            }
        }
        Ok(())
    }

    /// Removes sandbox `id`'s cgroup once its processes are gone (best effort: a directory
    /// still in use stays for the kubelet's removal of the pod's cgroup).
    pub fn leave_cgroup(&self, parent: &str, id: &str) {
        for dir in self.sandbox_cgroup_dirs(parent, id).unwrap_or_default() {
            let _ = std::fs::remove_dir(&dir);
        }
    }

    /// The cgroup of a container whose init lives (created or running), read from the init's
    /// `/proc/<pid>/cgroup` so that relative cgroup parents resolve as the OCI runtime did.
    pub fn cgroup(&self, c: &Container) -> Option<ContainerCgroup> {
        if c.record.exit.is_some() {
            return None;
        }
        let pid = c.record.init_pid?;
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        Some(self.layout.as_ref()?.cgroup_of_process(&text, ""))
    }

    /// Reads the exit records the monitors wrote since we last looked, so that STOPPED events
    /// go out without waiting for a status call (the exit watcher calls this periodically).
    pub fn poll_exits(&self) {
        let live: Vec<String> = lock(&self.inner)
            .values()
            .filter(|c| c.record.exit.is_none() && c.record.monitor_pid.is_some())
            .map(|c| c.record.id.clone())
            .collect();
        for id in live {
            let _ = self.refresh(&id);
        }
    }

    /// The OCI runtime of a handler. A container recorded under a handler that is no longer
    /// configured is driven by the binary of that name, so that it can still be stopped and
    /// removed (RunPodSandbox refuses handlers that are not configured).
    fn handler(&self, handler: &str) -> RuntimeHandler {
        self.handlers
            .get(handler)
            .cloned()
            .unwrap_or_else(|| RuntimeHandler::new(handler))
    }

    fn runc(&self, handler: &str) -> RuncCli {
        let RuntimeHandler {
            binary, options, ..
        } = self.handler(handler);
        RuncCli::new(RuncConfig {
            binary,
            root: Some(self.runtime_root(handler)),
            systemd_cgroup: self.driver == CgroupDriver::Systemd,
            temp_dir: self.paths.runtime_dir.join("tmp"),
            env: Vec::new(),
            global_args: options,
        })
    }

    fn runtime_root(&self, handler: &str) -> PathBuf {
        self.paths.runtime_dir.join(handler)
    }

    /// Resolves a full ID or a unique prefix.
    pub fn resolve(&self, id_or_prefix: &str) -> Result<String> {
        let map = lock(&self.inner);
        if map.contains_key(id_or_prefix) {
            return Ok(id_or_prefix.to_string());
        }
        let mut matches = map
            .keys()
            .filter(|k| !id_or_prefix.is_empty() && k.starts_with(id_or_prefix));
        match (matches.next(), matches.next()) {
            (Some(id), None) => Ok(id.clone()),
            _ => Err(ContainerError::NotFound(id_or_prefix.to_string())),
        }
    }

    /// A copy of one container, its exit brought up to date.
    pub fn get(&self, id_or_prefix: &str) -> Result<Container> {
        let id = self.resolve(id_or_prefix)?;
        self.refresh(&id)
    }

    /// Copies of all containers but infra containers, exits brought up to date.
    pub fn list(&self) -> Vec<Container> {
        let ids: Vec<String> = lock(&self.inner)
            .values()
            .filter(|c| !c.record.infra)
            .map(|c| c.record.id.clone())
            .collect();
        ids.iter().filter_map(|id| self.refresh(id).ok()).collect()
    }

    /// IDs of the containers of one sandbox, its infra container left out.
    pub fn of_sandbox(&self, sandbox_id: &str) -> Vec<String> {
        lock(&self.inner)
            .values()
            .filter(|c| c.record.sandbox_id == sandbox_id && !c.record.infra)
            .map(|c| c.record.id.clone())
            .collect()
    }

    /// The infra container of one sandbox, if it has one.
    pub fn infra_of(&self, sandbox_id: &str) -> Option<String> {
        lock(&self.inner)
            .values()
            .find(|c| c.record.sandbox_id == sandbox_id && c.record.infra)
            .map(|c| c.record.id.clone())
    }

    /// Reads the exit record if the monitor wrote one since we last looked.
    fn refresh(&self, id: &str) -> Result<Container> {
        let mut c = lock(&self.inner)
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(id.to_string()))?;
        if c.record.exit.is_some() || c.record.monitor_pid.is_none() {
            return Ok(c);
        }
        let exit_file = self.dir(id).join("exit.json");
        let read = |p: &Path| -> Option<ExitRecord> {
            serde_json::from_slice(&std::fs::read(p).ok()?).ok()
        };
        let exit = match read(&exit_file) {
            Some(e) => {
                // The cgroup stays until `delete`, so its OOM counter is still there.
                let oom = c.record.oom_file.as_deref().is_some_and(oom_killed);
                let message = match e.signal {
                    Some(sig) => format!("killed by signal {sig}"),
                    None => String::new(),
                };
                ExitInfo {
                    exit_code: e.exit_code,
                    finished_at_ns: e.finished_at_ns,
                    reason: exit_reason(e.exit_code, oom).to_string(),
                    message,
                }
            }
            None if !alive(c.record.monitor_pid, c.record.monitor_start_time) => {
                // The monitor writes the record before it exits: check once more, then give up.
                match read(&exit_file) {
                    Some(_) => return self.refresh(id),
                    None => ExitInfo {
                        exit_code: 255,
                        finished_at_ns: now_ns(),
                        reason: "Error".into(),
                        message: "the container's monitor exited without recording its exit".into(),
                    },
                }
            }
            None => return Ok(c),
        };
        let at_ns = exit.finished_at_ns;
        let (exit_code, reason) = (exit.exit_code, exit.reason.clone());
        c.record.exit = Some(exit);
        {
            // Concurrent refreshes may both read the exit: only the first records and reports it.
            let mut map = lock(&self.inner);
            let Some(slot) = map.get_mut(id) else {
                return Err(ContainerError::NotFound(id.to_string()));
            };
            if slot.record.exit.is_some() {
                return Ok(slot.clone());
            }
            save(&self.dir(id), &c)?;
            *slot = c.clone();
        }
        tracing::info!(container = %id, exit_code, reason = %reason, "container exited");
        self.emit(&c, cri::ContainerEventType::ContainerStoppedEvent, at_ns);
        Ok(c)
    }

    fn sandbox_facts(&self, sb: &Sandbox) -> SandboxFacts {
        let r = &sb.record;
        SandboxFacts {
            id: r.id.clone(),
            hostname: sb.config.hostname.clone(),
            namespaces: spec::SandboxNamespaces {
                network: r.netns.clone(),
                ipc: r.ipcns.clone(),
                uts: r.utsns.clone(),
                pid: r.pidns.clone(),
            },
            hosts_path: Some(r.hosts_file.clone()),
            resolv_conf_path: Some(r.resolv_file.clone()),
            hostname_path: Some(r.hostname_file.clone()),
            shm_path: Some(r.shm.clone()),
        }
    }

    /// CreateContainer: makes everything, or nothing. `infra` makes the pod's infra container
    /// (see [`ContainerRecord::infra`]).
    pub fn create(
        &self,
        sandboxes: &Sandboxes,
        sandbox_id: &str,
        mut config: cri::ContainerConfig,
        image: ImageFacts,
        volumes: Vec<ImageVolume>,
        infra: bool,
    ) -> Result<String> {
        let meta = config
            .metadata
            .clone()
            .ok_or_else(|| ContainerError::InvalidArgument("metadata is required".into()))?;
        if meta.name.is_empty() {
            return Err(ContainerError::InvalidArgument(
                "metadata.name is required".into(),
            ));
        }
        let sb = sandboxes
            .get(sandbox_id)
            .map_err(|_| ContainerError::SandboxNotFound(sandbox_id.to_string()))?;
        if !sb.record.ready {
            return Err(ContainerError::SandboxNotReady(sb.record.id));
        }
        let pod = sb.config.metadata.clone().unwrap_or_default();
        let name = container_name(&meta, &pod);
        // The infra container goes by the sandbox's ID, as containerd's does: runtimes that
        // group a pod's containers (gVisor) find the sandbox by that ID.
        let id = if infra {
            sb.record.id.clone()
        } else {
            new_id().map_err(io(Path::new("/dev/urandom")))?
        };
        if config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.as_ref())
            .is_none()
        {
            let linux = config.linux.get_or_insert_with(Default::default);
            let sc = linux.security_context.get_or_insert_with(Default::default);
            sc.namespace_options = Some(default_namespace_options(&sb));
        }
        let target_pid_namespace = self.target_pid_namespace(&config, &sb.record.id)?;
        let log_path = match sb.config.log_directory.as_str() {
            "" => PathBuf::new(),
            _ if config.log_path.is_empty() => PathBuf::new(),
            dir => Path::new(dir).join(&config.log_path),
        };
        let dir = self.dir(&id);
        let record = ContainerRecord {
            id: id.clone(),
            sandbox_id: sb.record.id.clone(),
            name: name.clone(),
            image: config
                .image
                .as_ref()
                .map(|i| i.image.clone())
                .unwrap_or_default(),
            image_id: image.id.clone(),
            image_ref: image.image_ref.clone(),
            runtime_handler: sb.record.runtime_handler.clone(),
            created_at_ns: now_ns(),
            started_at_ns: 0,
            log_path,
            stop_signal: spec::stop_signal(&config, &image.process),
            monitor_pid: None,
            monitor_start_time: None,
            init_pid: None,
            oom_file: None,
            rootfs_mounted: false,
            volume_images: volumes.iter().map(|v| v.id.clone()).collect(),
            image_mounts: Vec::new(),
            exit: None,
            infra,
        };
        // Reserve the name before the slow work, so a concurrent duplicate is refused at once.
        {
            let mut map = lock(&self.inner);
            if let Some(other) = map.values().find(|c| c.record.name == name) {
                return Err(ContainerError::NameTaken {
                    name,
                    id: other.record.id.clone(),
                });
            }
            map.insert(
                id.clone(),
                Container {
                    record: record.clone(),
                    config: config.clone(),
                },
            );
        }
        let mut c = Container { record, config };
        match self.make(
            &mut c,
            &sb,
            &image,
            &volumes,
            target_pid_namespace.as_deref(),
        ) {
            Ok(()) => {
                lock(&self.inner).insert(id.clone(), c.clone());
                self.emit(
                    &c,
                    cri::ContainerEventType::ContainerCreatedEvent,
                    c.record.created_at_ns,
                );
                tracing::info!(container = %id, name = %name, sandbox = %sb.record.id, "container created");
                Ok(id)
            }
            Err(e) => {
                let _ = self.teardown(&c.record);
                lock(&self.inner).remove(&id);
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// The PID namespace a container with `pid: TARGET` joins (an ephemeral container with a
    /// `targetContainerName`): that of the target's init, which must be a running container
    /// of the same sandbox.
    fn target_pid_namespace(
        &self,
        config: &cri::ContainerConfig,
        sandbox_id: &str,
    ) -> Result<Option<PathBuf>> {
        let Some(ns) = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.as_ref())
            .filter(|ns| ns.pid == cri::NamespaceMode::Target as i32)
        else {
            return Ok(None);
        };
        let inner = lock(&self.inner);
        let pid = inner
            .get(&ns.target_id)
            .filter(|t| t.record.sandbox_id == sandbox_id && t.record.exit.is_none())
            .and_then(|t| t.record.init_pid)
            .ok_or_else(|| {
                ContainerError::InvalidArgument(format!(
                    "pid namespace target {:?} is not a running container of pod sandbox {sandbox_id}",
                    ns.target_id
                ))
            })?;
        Ok(Some(PathBuf::from(format!("/proc/{pid}/ns/pid"))))
    }

    fn make(
        &self,
        c: &mut Container,
        sb: &Sandbox,
        image: &ImageFacts,
        volumes: &[ImageVolume],
        target_pid_namespace: Option<&Path>,
    ) -> Result<()> {
        let name = c.record.name.clone();
        let step = |step: &'static str| {
            let name = name.clone();
            move |e: std::io::Error| ContainerError::Create {
                name,
                step,
                source: Box::new(e),
            }
        };
        let dir = self.dir(&c.record.id);
        let bundle = dir.join("bundle");
        let rootfs = bundle.join("rootfs");
        // The upper dir's mode is the mode of the container's `/` (overlay shows the upper
        // root), so 0755 whatever the umask; what holds it is root's alone.
        for (d, mode) in [
            (&dir, MODE_PRIVATE),
            (&dir.join("upper"), 0o755),
            (&dir.join("work"), MODE_PRIVATE),
            (&bundle, MODE_PRIVATE),
            (&rootfs, 0o755),
        ] {
            create_dir_mode(d, mode).map_err(step("create directories"))?;
        }
        save(&dir, c)?;
        mount_overlay(
            &image.lower_dirs,
            &dir.join("upper"),
            &dir.join("work"),
            &rootfs,
        )
        .map_err(step("mount rootfs"))?;
        c.record.rootfs_mounted = true;
        save(&dir, c)?;
        // Image volumes: each image mounted read-only, and the container's mount pointed at
        // it (or at its image_sub_path).
        let mut config = c.config.clone();
        for (i, v) in volumes.iter().enumerate() {
            let target = dir.join("image-volumes").join(i.to_string());
            mount_image_read_only(&v.lower_dirs, &target).map_err(step("mount image volume"))?;
            c.record.image_mounts.push(target.clone());
            save(&dir, c)?;
            let Some(m) = config.mounts.get_mut(v.mount) else {
                continue;
            };
            let host = match m.image_sub_path.as_str() {
                "" => target,
                sub => image_sub_path(&target, sub).map_err(ContainerError::InvalidArgument)?,
            };
            m.host_path = host.display().to_string();
            m.readonly = true;
            m.image = None;
            m.image_sub_path.clear();
        }

        let spec_err = |source| ContainerError::Spec {
            name: name.clone(),
            source,
        };
        let resolved = Resolved::resolve(&c.config, &image.process, &rootfs).map_err(spec_err)?;
        let facts = self.sandbox_facts(sb);
        let input = spec::SpecInput {
            container_id: &c.record.id,
            config: &config,
            sandbox_config: &sb.config,
            sandbox: &facts,
            image: &image.process,
            image_name: &c.record.image,
            rootfs: &rootfs,
            cgroup_driver: self.driver,
            target_pid_namespace,
            resolved: &resolved,
            node: &self.node,
            infra: c.record.infra,
        };
        let mut oci = spec::build_spec(&input).map_err(spec_err)?;
        if let Some(p) = oci.process_mut()
            && let Some(adj) = p.oom_score_adj()
        {
            p.set_oom_score_adj(Some(restrict_oom_score_adj(adj, self.own_oom_score_adj)));
        }
        let parent = sb
            .config
            .linux
            .as_ref()
            .map(|l| l.cgroup_parent.as_str())
            .unwrap_or_default();
        if let Some(linux) = oci.linux_mut() {
            linux.set_cgroups_path(Some(PathBuf::from(container_cgroups_path(
                self.driver,
                parent,
                &c.record.id,
            ))));
        }
        let json = serde_json::to_vec_pretty(&oci).map_err(|e| ContainerError::Create {
            name: name.clone(),
            step: "encode OCI spec",
            source: Box::new(e),
        })?;
        write_atomic(&bundle.join("config.json"), &json).map_err(step("write OCI spec"))?;

        let handler = c.record.runtime_handler.clone();
        let runtime_root = self.runtime_root(&handler);
        create_dir_mode(&runtime_root, MODE_PRIVATE).map_err(step("create runtime root"))?;
        let log_path = if c.record.log_path.as_os_str().is_empty() {
            dir.join("discarded.log")
        } else {
            c.record.log_path.clone()
        };
        let runtime = self.handler(&handler);
        let args = monitor::Args {
            id: c.record.id.clone(),
            bundle: bundle.clone(),
            runtime: runtime.binary,
            runtime_options: runtime.options,
            runtime_root,
            systemd_cgroup: self.driver == CgroupDriver::Systemd,
            log_path,
            exit_file: dir.join("exit.json"),
            pid_file: bundle.join("init.pid"),
            ready_fd: 3,
            stdin: c.config.stdin,
            stdin_once: c.config.stdin_once,
            tty: c.config.tty,
            attach_socket: Some(dir.join(ATTACH_SOCKET)),
            stdio_fifos: runtime.infra_container,
        };
        let (pid, ready) = spawn_monitor(&self.paths.monitor_binary, &args, &dir)
            .map_err(step("start monitor"))?;
        c.record.monitor_pid = Some(pid);
        c.record.monitor_start_time = process_start_time(pid);
        save(&dir, c)?;
        match ready {
            Ready::Created { pid } => {
                c.record.init_pid = Some(pid);
                c.record.oom_file = self.oom_file(pid);
                save(&dir, c)
            }
            Ready::Failed { error } => Err(ContainerError::Create {
                name,
                step: "create with the OCI runtime",
                source: error.into(),
            }),
        }
    }

    /// The memory cgroup file with the `oom_kill` counter of the cgroup `pid` is in.
    fn oom_file(&self, pid: u32) -> Option<PathBuf> {
        let layout = self.layout.as_ref()?;
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let rel = path.trim_start_matches('/');
            if layout.is_v2() && controllers.is_empty() {
                return Some(layout.unified.as_ref()?.join(rel).join("memory.events"));
            }
            if controllers.split(',').any(|c| c == "memory") {
                return Some(
                    layout
                        .v1
                        .get("memory")?
                        .join(rel)
                        .join("memory.oom_control"),
                );
            }
        }
        None
    }

    /// Persists and publishes a changed record, unless the container was removed meanwhile.
    fn save_record(&self, c: &Container) -> Result<()> {
        let mut map = lock(&self.inner);
        let Some(slot) = map.get_mut(&c.record.id) else {
            return Err(ContainerError::NotFound(c.record.id.clone()));
        };
        save(&self.dir(&c.record.id), c)?;
        *slot = c.clone();
        Ok(())
    }

    /// Serialises the lifecycle operations (start, stop, remove, update) of one container.
    fn op_lock(&self, id: &str) -> Arc<Mutex<()>> {
        self.ops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    /// StartContainer: runs the user process of a created container.
    pub fn start(&self, id_or_prefix: &str) -> Result<()> {
        let id = self.resolve(id_or_prefix)?;
        let op = self.op_lock(&id);
        let _op = op.lock().unwrap_or_else(|e| e.into_inner());
        let mut c = self.get(&id)?;
        let state = c.state();
        if state != cri::ContainerState::ContainerCreated {
            return Err(ContainerError::WrongState {
                id: c.record.id,
                state: state_name(state),
                op: "start",
            });
        }
        let id = c.record.id.clone();
        let runtime_err = |source| ContainerError::Runtime {
            op: "start",
            id: id.clone(),
            source,
        };
        let runc = self.runc(&c.record.runtime_handler);
        // A sandboxed runtime's container takes its stdio when it joins the pod's sandbox at
        // start (its monitor made the FIFOs); the infra container starts the sandbox itself.
        if self.handler(&c.record.runtime_handler).infra_container
            && !c.record.infra
            && !c.config.tty
        {
            let io = monitor::open_stdio_fifos(&self.dir(&id).join("bundle"), c.config.stdin)
                .map_err(|e| {
                    runtime_err(RuncError::TempFile {
                        program: runc.config().binary.clone(),
                        source: e,
                    })
                })?;
            runc.start_with_io(&id, io).map_err(runtime_err)?;
        } else {
            runc.start(&id).map_err(runtime_err)?;
        }
        c.record.started_at_ns = now_ns();
        self.save_record(&c)?;
        self.emit(
            &c,
            cri::ContainerEventType::ContainerStartedEvent,
            c.record.started_at_ns,
        );
        tracing::info!(container = %id, "container started");
        Ok(())
    }

    fn wait_exit(&self, id: &str, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.refresh(id)?.record.exit.is_some() {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// StopContainer: the stop signal, up to `timeout` for the exit, then SIGKILL. Idempotent:
    /// a missing container is fine (the CRI: "must not return an error if the container has
    /// already been stopped", and one that is gone is).
    pub fn stop(&self, id_or_prefix: &str, timeout: Duration) -> Result<()> {
        let id = match self.resolve(id_or_prefix) {
            Ok(id) => id,
            Err(ContainerError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let op = self.op_lock(&id);
        let _op = op.lock().unwrap_or_else(|e| e.into_inner());
        match self.stop_locked(&id, timeout) {
            // Removed by a concurrent call while we waited.
            Err(ContainerError::NotFound(_)) if self.resolve(&id).is_err() => Ok(()),
            other => other,
        }
    }

    fn stop_locked(&self, id: &str, timeout: Duration) -> Result<()> {
        let c = self.get(id)?;
        let id = c.record.id.clone();
        if c.record.exit.is_some() || c.record.monitor_pid.is_none() {
            return Ok(());
        }
        let runc = self.runc(&c.record.runtime_handler);
        if !timeout.is_zero() && c.state() == cri::ContainerState::ContainerRunning {
            if let Err(e) = runc.kill(&id, c.record.stop_signal, false) {
                tracing::debug!(container = %id, error = %e, "stop signal not delivered");
            }
            if self.wait_exit(&id, timeout)? {
                return Ok(());
            }
        }
        let killed = runc.kill(&id, libc::SIGKILL, false);
        if self.wait_exit(&id, KILL_WAIT)? {
            return Ok(());
        }
        match killed {
            Err(source) => Err(ContainerError::Runtime {
                op: "kill",
                id,
                source,
            }),
            Ok(()) => Err(ContainerError::Teardown {
                id,
                what: "no exit after SIGKILL".into(),
            }),
        }
    }

    /// Undoes what a record says exists; returns what failed.
    fn teardown(&self, r: &ContainerRecord) -> Vec<String> {
        let mut failed = Vec::new();
        // Even without a monitor on record: a crash between spawning it and recording it
        // leaves a container the runtime knows.
        let runc = self.runc(&r.runtime_handler);
        if let Err(e) = runc.delete(&r.id, true)
            && runc.state(&r.id).is_ok()
        {
            failed.push(format!("delete: {e}"));
        }
        if r.rootfs_mounted
            && let Err(e) = unmount(&self.dir(&r.id).join("bundle/rootfs"))
        {
            failed.push(format!("unmount rootfs: {e}"));
        }
        for m in r.image_mounts.iter().rev() {
            if let Err(e) = unmount(m) {
                failed.push(format!("unmount image volume {}: {e}", m.display()));
            }
        }
        failed
    }

    /// RemoveContainer: kills it if needed and forgets it; a missing container is fine.
    pub fn remove(&self, id_or_prefix: &str) -> Result<()> {
        let id = match self.resolve(id_or_prefix) {
            Ok(id) => id,
            Err(ContainerError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let op = self.op_lock(&id);
        let _op = op.lock().unwrap_or_else(|e| e.into_inner());
        let c = match self.get(&id) {
            Ok(c) => c,
            // Removed by a concurrent call while we waited.
            Err(ContainerError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        if c.record.exit.is_none() && c.record.monitor_pid.is_some() {
            self.stop_locked(&id, Duration::ZERO)?;
        }
        let c = self.refresh(&id)?;
        let failed = self.teardown(&c.record);
        if !failed.is_empty() {
            return Err(ContainerError::Teardown {
                id,
                what: failed.join("; "),
            });
        }
        lock(&self.inner).remove(&id);
        self.ops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        let dir = self.dir(&id);
        std::fs::remove_dir_all(&dir)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(io(&dir))?;
        self.emit(&c, cri::ContainerEventType::ContainerDeletedEvent, now_ns());
        tracing::info!(container = %id, "container removed");
        Ok(())
    }

    /// UpdateContainerResources: `runc update`, and the stored config follows.
    pub fn update(
        &self,
        id_or_prefix: &str,
        resources: cri::LinuxContainerResources,
    ) -> Result<()> {
        let id = self.resolve(id_or_prefix)?;
        let op = self.op_lock(&id);
        let _op = op.lock().unwrap_or_else(|e| e.into_inner());
        let mut c = self.get(&id)?;
        if c.record.exit.is_none() {
            self.runc(&c.record.runtime_handler)
                .update(&id, &linux_resources(&resources))
                .map_err(|source| ContainerError::Runtime {
                    op: "update",
                    id: id.clone(),
                    source,
                })?;
        }
        c.config
            .linux
            .get_or_insert_with(Default::default)
            .resources = Some(resources);
        self.save_record(&c)
    }

    /// ReopenContainerLog: asks the monitor to reopen the log file, and returns once it has (the
    /// file exists again): the kubelet, and critest, look for the new file as soon as the call
    /// returns.
    pub fn reopen_log(&self, id_or_prefix: &str) -> Result<()> {
        let c = self.get(id_or_prefix)?;
        let state = c.state();
        if state != cri::ContainerState::ContainerRunning
            || !alive(c.record.monitor_pid, c.record.monitor_start_time)
        {
            return Err(ContainerError::WrongState {
                id: c.record.id,
                state: state_name(state),
                op: "reopen its log",
            });
        }
        if let Some(pid) = c.record.monitor_pid {
            // SAFETY: kill(2) on our own monitor (PID and start time checked just above).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGUSR1) };
        }
        let log = &c.record.log_path;
        if log.as_os_str().is_empty() {
            return Ok(());
        }
        // The monitor reopens with O_CREAT as soon as the signal wakes it.
        let deadline = Instant::now() + REOPEN_TIMEOUT;
        while !log.exists() {
            if !alive(c.record.monitor_pid, c.record.monitor_start_time) {
                return Err(ContainerError::WrongState {
                    id: c.record.id,
                    state: "exited",
                    op: "reopen its log",
                });
            }
            if Instant::now() > deadline {
                return Err(ContainerError::State {
                    path: log.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the container's monitor did not reopen its log",
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// The process of an exec in a running container: the container's own with `cmd` and
    /// `terminal` (errors: not found, not running, empty command).
    fn exec_process(
        &self,
        id_or_prefix: &str,
        cmd: Vec<String>,
        terminal: bool,
    ) -> Result<(Container, oci_spec::runtime::Process)> {
        let c = self.get(id_or_prefix)?;
        let id = c.record.id.clone();
        let state = c.state();
        if state != cri::ContainerState::ContainerRunning {
            return Err(ContainerError::WrongState {
                id,
                state: state_name(state),
                op: "exec",
            });
        }
        if cmd.is_empty() {
            return Err(ContainerError::InvalidArgument("cmd is required".into()));
        }
        let bundle = self.dir(&id).join("bundle");
        let spec_path = bundle.join("config.json");
        let spec: oci_spec::runtime::Spec = serde_json::from_slice(
            &std::fs::read(&spec_path).map_err(io(&spec_path))?,
        )
        .map_err(|e| ContainerError::State {
            path: spec_path.clone(),
            source: e.into(),
        })?;
        let mut process = spec.process().clone().unwrap_or_default();
        process.set_args(Some(cmd)).set_terminal(Some(terminal));
        Ok((c, process))
    }

    /// Exec for the streaming server: runs `cmd` in the running container on the given stdio
    /// and waits for it; returns its exit code. With `tty` the stdio must be a terminal: the
    /// OCI runtime gives the process a terminal of its own and relays between the two.
    pub fn exec_streaming(
        &self,
        id_or_prefix: &str,
        cmd: Vec<String>,
        tty: bool,
        stdio: ProcessIo,
    ) -> Result<i32> {
        let (c, process) = self.exec_process(id_or_prefix, cmd, tty)?;
        let id = c.record.id.clone();
        let status = self
            .runc(&c.record.runtime_handler)
            .exec(
                &id,
                &process,
                ExecOptions {
                    detach: false,
                    pid_file: None,
                    console_socket: None,
                    io: stdio,
                },
            )
            .map_err(|source| ContainerError::Runtime {
                op: "exec in",
                id,
                source,
            })?;
        Ok(status.code().unwrap_or_else(|| {
            use std::os::unix::process::ExitStatusExt;
            128 + status.signal().unwrap_or(0)
        }))
    }

    /// The attach socket of a running container's monitor.
    pub fn attach_socket(&self, id_or_prefix: &str) -> Result<PathBuf> {
        let c = self.get(id_or_prefix)?;
        let state = c.state();
        if state != cri::ContainerState::ContainerRunning {
            return Err(ContainerError::WrongState {
                id: c.record.id,
                state: state_name(state),
                op: "attach to",
            });
        }
        Ok(self.dir(&c.record.id).join(ATTACH_SOCKET))
    }

    /// ExecSync: runs `cmd` in the container and collects its output and exit code.
    pub fn exec_sync(
        &self,
        id_or_prefix: &str,
        cmd: Vec<String>,
        timeout: Option<Duration>,
    ) -> Result<(Vec<u8>, Vec<u8>, i32)> {
        let (c, process) = self.exec_process(id_or_prefix, cmd, false)?;
        let id = c.record.id.clone();
        let tmp = self.paths.runtime_dir.join("tmp");
        let pid_file = tempfile::Builder::new()
            .prefix("exec-pid-")
            .tempfile_in(&tmp)
            .map_err(io(&tmp))?
            .into_temp_path();
        let (out_r, out_w) = pipe().map_err(io(&tmp))?;
        let (err_r, err_w) = pipe().map_err(io(&tmp))?;
        let collect = |r: OwnedFd| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut out = Vec::new();
                let mut f = std::fs::File::from(r);
                let mut buf = [0u8; 16 * 1024];
                loop {
                    match f.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let room = EXEC_OUTPUT_LIMIT.saturating_sub(out.len());
                            out.extend_from_slice(&buf[..n.min(room)]);
                        }
                    }
                }
                let _ = tx.send(out);
            });
            rx
        };
        let (out_rx, err_rx) = (collect(out_r), collect(err_r));
        let runc = self.runc(&c.record.runtime_handler);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        {
            let id = id.clone();
            let pid_path = pid_file.to_path_buf();
            std::thread::spawn(move || {
                let r = runc.exec(
                    &id,
                    &process,
                    ExecOptions {
                        detach: false,
                        pid_file: Some(pid_path),
                        console_socket: None,
                        io: ProcessIo {
                            stdin: None,
                            stdout: Some(out_w),
                            stderr: Some(err_w),
                        },
                    },
                );
                let _ = done_tx.send(r);
            });
        }
        let result = match timeout {
            Some(t) => done_rx.recv_timeout(t).ok(),
            None => done_rx.recv().ok(),
        };
        let Some(result) = result else {
            if let Some(pid) = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            {
                // SAFETY: kill(2) on the exec'd process the runtime just reported.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            return Err(ContainerError::ExecTimeout {
                id,
                secs: timeout.map_or(0, |t| t.as_secs() as i64),
            });
        };
        let status = result.map_err(|source| ContainerError::Runtime {
            op: "exec in",
            id: id.clone(),
            source,
        })?;
        // Background children of the command may hold the pipes: do not wait for them long.
        let grace = Duration::from_secs(1);
        let stdout = out_rx.recv_timeout(grace).unwrap_or_default();
        let stderr = err_rx.recv_timeout(grace).unwrap_or_default();
        let code = status.code().unwrap_or_else(|| {
            use std::os::unix::process::ExitStatusExt;
            128 + status.signal().unwrap_or(0)
        });
        Ok((stdout, stderr, code))
    }
}

/// The namespaces of a container whose config names none: the sandbox's, as containerd joins
/// them. The PID namespace is the host's for a hostPID sandbox (not a new one: that would
/// silently drop hostPID), else the container's own (a sandbox never holds a shared one: a
/// pod asking for that is refused).
fn default_namespace_options(sb: &Sandbox) -> cri::NamespaceOption {
    use cri::NamespaceMode as M;
    let sandbox_pid = sb
        .config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref())
        .map(|n| n.pid);
    cri::NamespaceOption {
        network: if sb.record.host_network {
            M::Node as i32
        } else {
            M::Pod as i32
        },
        pid: match sandbox_pid {
            Some(p) if p == M::Node as i32 => M::Node as i32,
            Some(p) if p == M::Pod as i32 && sb.record.pidns.is_some() => M::Pod as i32,
            _ => M::Container as i32,
        },
        ipc: if sb.record.ipcns.is_some() {
            M::Pod as i32
        } else {
            M::Node as i32
        },
        ..Default::default()
    }
}

/// CRI resources -> OCI resources for `update` (what build_spec sets at create).
pub fn linux_resources(r: &cri::LinuxContainerResources) -> oci_spec::runtime::LinuxResources {
    use oci_spec::runtime::{LinuxCpu, LinuxMemory, LinuxResources};
    let mut cpu = LinuxCpu::default();
    if r.cpu_shares > 0 {
        cpu.set_shares(Some(r.cpu_shares as u64));
    }
    if r.cpu_quota != 0 {
        cpu.set_quota(Some(r.cpu_quota));
    }
    if r.cpu_period > 0 {
        cpu.set_period(Some(r.cpu_period as u64));
    }
    if !r.cpuset_cpus.is_empty() {
        cpu.set_cpus(Some(r.cpuset_cpus.clone()));
    }
    if !r.cpuset_mems.is_empty() {
        cpu.set_mems(Some(r.cpuset_mems.clone()));
    }
    let mut memory = LinuxMemory::default();
    if r.memory_limit_in_bytes > 0 {
        memory.set_limit(Some(r.memory_limit_in_bytes));
        let swap = if r.memory_swap_limit_in_bytes > 0 {
            r.memory_swap_limit_in_bytes
        } else {
            r.memory_limit_in_bytes
        };
        memory.set_swap(Some(swap));
    }
    let mut out = LinuxResources::default();
    out.set_cpu(Some(cpu)).set_memory(Some(memory));
    if !r.unified.is_empty() {
        out.set_unified(Some(r.unified.clone()));
    }
    out
}

/// Whether the `oom_kill` counter in a cgroup's `memory.oom_control` (v1) or `memory.events`
/// (v2) is non-zero.
fn oom_killed(file: &Path) -> bool {
    std::fs::read_to_string(file).is_ok_and(|text| {
        text.lines()
            .filter_map(|l| l.split_once(' '))
            .any(|(k, v)| k == "oom_kill" && v.trim().parse::<u64>().is_ok_and(|n| n > 0))
    })
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Starts the monitor in its own session with the report pipe on fd 3 and waits for its report.
fn spawn_monitor(binary: &Path, args: &monitor::Args, dir: &Path) -> std::io::Result<(u32, Ready)> {
    let (r, w) = pipe()?;
    let raw = w.as_raw_fd();
    let stderr = std::fs::File::create(dir.join("monitor.log"))?;
    let mut cmd = Command::new(binary);
    cmd.args(args.to_args())
        .env_clear()
        .env("PATH", crate::runc::DEFAULT_PATH)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    // SAFETY: setsid and dup2 are async-signal-safe; dup2 clears FD_CLOEXEC on the copy.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    drop(cmd);
    drop(w);
    let pid = child.id();
    let mut line = String::new();
    let read = BufReader::new(std::fs::File::from(r)).read_line(&mut line);
    // The daemon reaps its monitors while it lives; after a restart init does.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    read?;
    let ready = serde_json::from_str(line.trim()).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("monitor report {line:?}: {e}"),
        )
    })?;
    Ok((pid, ready))
}

fn save(dir: &Path, c: &Container) -> Result<()> {
    let json_path = dir.join("container.json");
    let json = serde_json::to_vec_pretty(&c.record).map_err(|e| ContainerError::State {
        path: json_path.clone(),
        source: e.into(),
    })?;
    let pb = dir.join("config.pb");
    write_atomic(&pb, &c.config.encode_to_vec()).map_err(io(&pb))?;
    write_atomic(&json_path, &json).map_err(io(&json_path))
}

fn load(dir: &Path) -> Result<Container> {
    let json_path = dir.join("container.json");
    let json = std::fs::read(&json_path).map_err(io(&json_path))?;
    let record: ContainerRecord =
        serde_json::from_slice(&json).map_err(|e| ContainerError::State {
            path: json_path.clone(),
            source: e.into(),
        })?;
    let pb_path = dir.join("config.pb");
    let pb = std::fs::read(&pb_path).map_err(io(&pb_path))?;
    let config =
        cri::ContainerConfig::decode(pb.as_slice()).map_err(|e| ContainerError::State {
            path: pb_path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
    Ok(Container { record, config })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_reasons_and_oom_score_follow_containerd() {
        let c = cri::ContainerMetadata {
            name: "app".into(),
            attempt: 1,
        };
        let p = cri::PodSandboxMetadata {
            name: "web".into(),
            namespace: "prod".into(),
            uid: "u1".into(),
            attempt: 0,
        };
        assert_eq!(container_name(&c, &p), "k8s_app_web_prod_u1_1");
        assert_eq!(exit_reason(0, false), "Completed");
        assert_eq!(exit_reason(3, false), "Error");
        assert_eq!(exit_reason(137, true), "OOMKilled");
        assert_eq!(restrict_oom_score_adj(-998, 0), 0);
        assert_eq!(restrict_oom_score_adj(1000, -500), 1000);
    }

    #[test]
    fn relative_cgroup_parents_stay_relative_under_cgroupfs() {
        assert_eq!(
            container_cgroups_path(CgroupDriver::Cgroupfs, "strake-tb-1-0", "c1"),
            "strake-tb-1-0/c1"
        );
        assert_eq!(
            container_cgroups_path(CgroupDriver::Cgroupfs, "/kubepods/pod1", "c1"),
            "/kubepods/pod1/c1"
        );
        assert_eq!(
            container_cgroups_path(CgroupDriver::Cgroupfs, "", "c1"),
            "/strake/c1"
        );
    }

    #[test]
    fn containers_without_namespace_options_follow_the_sandbox() {
        use cri::NamespaceMode as M;
        let sandbox = |pid: i32, host_network: bool, ipc: bool| {
            let json = serde_json::json!({
                "id": "s", "name": "n", "created_at_ns": 1, "ready": true,
                "runtime_handler": "runc", "host_network": host_network,
                "pause_pid": null, "pause_start_time": null, "netns": null,
                "ipcns": if ipc { Some("/run/s/ipc") } else { None },
                "utsns": null, "ips": [], "cni_result": null, "network_attached": false,
                "port_mappings": [], "shm": "/s", "hostname_file": "/h", "hosts_file": "/hh",
                "resolv_file": "/r",
            });
            Sandbox {
                record: serde_json::from_value(json).unwrap(),
                config: cri::PodSandboxConfig {
                    linux: Some(cri::LinuxPodSandboxConfig {
                        security_context: Some(cri::LinuxSandboxSecurityContext {
                            namespace_options: Some(cri::NamespaceOption {
                                pid,
                                ..Default::default()
                            }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            }
        };
        let ns = default_namespace_options(&sandbox(M::Container as i32, false, true));
        assert_eq!(
            (ns.network, ns.pid, ns.ipc),
            (M::Pod as i32, M::Container as i32, M::Pod as i32)
        );
        // hostPID, hostNetwork, hostIPC: the host's, not new ones.
        let ns = default_namespace_options(&sandbox(M::Node as i32, true, false));
        assert_eq!(
            (ns.network, ns.pid, ns.ipc),
            (M::Node as i32, M::Node as i32, M::Node as i32)
        );
    }

    #[test]
    fn update_resources_map_to_oci() {
        let r = linux_resources(&cri::LinuxContainerResources {
            cpu_shares: 512,
            memory_limit_in_bytes: 64 << 20,
            ..Default::default()
        });
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["cpu"], serde_json::json!({"shares": 512}));
        assert_eq!(
            json["memory"],
            serde_json::json!({"limit": 67108864, "swap": 67108864})
        );
    }

    fn record(id: &str, monitor_pid: Option<u32>, monitor_start_time: Option<u64>) -> Container {
        Container {
            record: ContainerRecord {
                id: id.into(),
                sandbox_id: "s".into(),
                name: format!("k8s_{id}"),
                image: "busybox".into(),
                image_id: "sha256:ab".into(),
                image_ref: "sha256:ab".into(),
                runtime_handler: "runc".into(),
                created_at_ns: 1,
                started_at_ns: 2,
                log_path: PathBuf::new(),
                stop_signal: 15,
                monitor_pid,
                monitor_start_time,
                init_pid: None,
                oom_file: None,
                rootfs_mounted: false,
                exit: None,
                volume_images: Vec::new(),
                image_mounts: Vec::new(),
                infra: false,
            },
            config: cri::ContainerConfig::default(),
        }
    }

    #[test]
    fn an_image_sub_path_stays_inside_the_image_and_follows_no_link() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc/app")).unwrap();
        std::os::unix::fs::symlink("/", root.join("escape")).unwrap();
        std::os::unix::fs::symlink("etc", root.join("inner")).unwrap();
        assert_eq!(image_sub_path(root, "etc/app"), Ok(root.join("etc/app")));
        assert_eq!(image_sub_path(root, "./etc"), Ok(root.join("etc")));
        for bad in [
            "../x",
            "/etc",
            "escape",
            "escape/etc",
            "inner/app",
            "missing",
        ] {
            assert!(image_sub_path(root, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn recovery_reads_exits_recorded_while_the_daemon_was_away() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("containers");
        let me = std::process::id();
        let alive_monitor = record("running", Some(me), process_start_time(me));
        let exited = record("exited", Some(u32::MAX - 1), Some(1));
        let vanished = record("vanished", Some(u32::MAX - 1), Some(1));
        let interrupted = record("interrupted", None, None);
        for c in [&alive_monitor, &exited, &vanished, &interrupted] {
            let d = state.join(&c.record.id);
            std::fs::create_dir_all(&d).unwrap();
            save(&d, c).unwrap();
        }
        let exit = ExitRecord {
            exit_code: 3,
            signal: None,
            finished_at_ns: 42,
        };
        std::fs::write(
            state.join("exited/exit.json"),
            serde_json::to_vec(&exit).unwrap(),
        )
        .unwrap();
        let containers = Containers::recover(
            ContainerPaths {
                state_dir: state.clone(),
                runtime_dir: dir.path().join("oci"),
                monitor_binary: "/nonexistent".into(),
            },
            BTreeMap::new(),
            CgroupDriver::Cgroupfs,
            ContainerMap::default(),
        )
        .unwrap();
        let running = containers.get("running").unwrap();
        assert_eq!(running.state(), cri::ContainerState::ContainerRunning);
        let e = containers.get("exited").unwrap().record.exit.unwrap();
        assert_eq!(
            (e.exit_code, e.finished_at_ns, e.reason.as_str()),
            (3, 42, "Error")
        );
        // Persisted: a second recovery reads the same exit without the exit file.
        std::fs::remove_file(state.join("exited/exit.json")).unwrap();
        let again = load(&state.join("exited")).unwrap();
        assert_eq!(again.record.exit.map(|e| e.exit_code), Some(3));
        assert_eq!(
            containers
                .get("vanished")
                .unwrap()
                .record
                .exit
                .unwrap()
                .exit_code,
            255
        );
        assert_eq!(
            containers.get("interrupted").unwrap().state(),
            cri::ContainerState::ContainerExited
        );
        assert_eq!(containers.list().len(), 4);
        assert!(matches!(
            containers.get("nope"),
            Err(ContainerError::NotFound(_))
        ));
        // StopContainer and RemoveContainer are idempotent: missing or exited is fine.
        containers.stop("nope", Duration::ZERO).unwrap();
        containers.remove("nope").unwrap();
        containers.stop("exited", Duration::ZERO).unwrap();
        // Prefixes resolve when unique.
        assert_eq!(containers.resolve("run").unwrap(), "running");
    }

    #[test]
    fn the_exit_watcher_reports_each_exit_once() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("containers");
        let me = std::process::id();
        let c = record("watched", Some(me), process_start_time(me));
        let d = state.join("watched");
        std::fs::create_dir_all(&d).unwrap();
        save(&d, &c).unwrap();
        let containers = Containers::recover(
            ContainerPaths {
                state_dir: state.clone(),
                runtime_dir: dir.path().join("oci"),
                monitor_binary: "/nonexistent".into(),
            },
            BTreeMap::new(),
            CgroupDriver::Cgroupfs,
            ContainerMap::default(),
        )
        .unwrap();
        let mut events = containers.subscribe();
        containers.poll_exits();
        assert!(events.try_recv().is_err(), "no exit yet");
        let exit = ExitRecord {
            exit_code: 0,
            signal: None,
            finished_at_ns: 42,
        };
        std::fs::write(d.join("exit.json"), serde_json::to_vec(&exit).unwrap()).unwrap();
        containers.poll_exits();
        let e = events.try_recv().unwrap();
        assert_eq!(e.kind, cri::ContainerEventType::ContainerStoppedEvent);
        assert_eq!(e.at_ns, 42);
        assert_eq!(
            e.container.state(),
            cri::ContainerState::ContainerExited,
            "the event carries the state it reports"
        );
        // Later looks (the watcher again, a status call) do not report it again.
        containers.poll_exits();
        containers.get("watched").unwrap();
        assert!(events.try_recv().is_err());
    }

    #[test]
    fn record_and_config_round_trip_through_disk() {
        let dir = tempfile::tempdir().unwrap();
        let c = Container {
            record: ContainerRecord {
                id: "c".into(),
                sandbox_id: "s".into(),
                name: "n".into(),
                image: "busybox".into(),
                image_id: "sha256:ab".into(),
                image_ref: "sha256:ab".into(),
                runtime_handler: "runc".into(),
                created_at_ns: 1,
                started_at_ns: 2,
                log_path: "/l".into(),
                stop_signal: 15,
                monitor_pid: Some(3),
                monitor_start_time: Some(4),
                init_pid: Some(5),
                oom_file: None,
                rootfs_mounted: true,
                exit: Some(ExitInfo {
                    exit_code: 3,
                    finished_at_ns: 6,
                    reason: "Error".into(),
                    message: String::new(),
                }),
                volume_images: vec!["sha256:vol".into()],
                image_mounts: vec!["/state/c/image-volumes/0".into()],
                infra: false,
            },
            config: cri::ContainerConfig {
                log_path: "app/0.log".into(),
                ..Default::default()
            },
        };
        save(dir.path(), &c).unwrap();
        let back = load(dir.path()).unwrap();
        assert_eq!(back.record, c.record);
        assert_eq!(back.config, c.config);
        assert_eq!(back.state(), cri::ContainerState::ContainerExited);
    }
}
