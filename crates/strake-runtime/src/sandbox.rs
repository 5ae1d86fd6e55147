//! Pod sandboxes: the namespaces, files and network that a pod's containers share.
//!
//! A sandbox is a `strake-pause` process started in new network, IPC and UTS namespaces (each
//! left out when the pod shares the host's), the namespaces pinned by bind mounts under
//! `<run>/sandboxes/<id>/ns/` so they outlive the pause process and the daemon, a `/dev/shm`
//! tmpfs, generated `hostname`/`hosts`/`resolv.conf` files, and one network attachment made by
//! the CNI plugins. Its record lives in `<state>/sandboxes/<id>/` (the CRI config as protobuf,
//! what was made as JSON), written atomically, so a restarted daemon adopts every sandbox.
//!
//! Stop and remove are idempotent and always attempt every teardown step, so that a half-gone
//! sandbox (pause killed, netns unmounted, plugin failing) never leaks IPs, mounts or processes.

use std::collections::HashMap;
use std::ffi::CString;
use std::net::IpAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use serde::{Deserialize, Serialize};
use strake_types::cri;

use crate::cni::{Attachment, Cni, PortMapping, RuntimeConfig};
use crate::mount::{bind_mount, mount_tmpfs, unmount};
use crate::state::{MODE_PRIVATE, create_dir_mode, write_atomic, write_atomic_mode};

/// A failed sandbox operation.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The request lacks something it must carry.
    #[error("invalid sandbox request: {0}")]
    InvalidArgument(String),
    /// No sandbox has this ID (or unique ID prefix).
    #[error("pod sandbox {0:?} not found")]
    NotFound(String),
    /// The request asks for something this runtime cannot do yet; running the pod without it
    /// would run something other than what was asked, so it is refused (gRPC
    /// `InvalidArgument`).
    #[error("pod sandbox option {option} is not supported by strake-runtime: {why}")]
    Unsupported {
        option: &'static str,
        why: &'static str,
    },
    /// A sandbox with the same name, namespace, UID and attempt exists.
    #[error("pod sandbox name {name:?} is reserved by {id}")]
    NameTaken { name: String, id: String },
    /// Creating the sandbox failed at one step (what was made so far is removed again).
    #[error("create pod sandbox {name}: {step}")]
    Create {
        name: String,
        step: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The sandbox's network could not be set up.
    #[error("set up network of pod sandbox {name}")]
    Network {
        name: String,
        #[source]
        source: crate::cni::CniError,
    },
    /// Tearing the sandbox down left something behind (already retried inside).
    #[error("tear down pod sandbox {id}: {what}")]
    Teardown { id: String, what: String },
    /// Reading or writing sandbox state failed.
    #[error("sandbox state {path}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

type Result<T, E = SandboxError> = std::result::Result<T, E>;

/// What the runtime made for one sandbox, persisted as `sandbox.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SandboxRecord {
    pub id: String,
    /// `k8s_POD_<name>_<namespace>_<uid>_<attempt>`: unique among live sandboxes.
    pub name: String,
    pub created_at_ns: i64,
    pub ready: bool,
    pub runtime_handler: String,
    pub host_network: bool,
    /// PID of the pause process and its start time (clock ticks since boot) to tell it from a
    /// recycled PID.
    pub pause_pid: Option<u32>,
    pub pause_start_time: Option<u64>,
    /// Pinned namespaces (absent when the host's is shared).
    pub netns: Option<PathBuf>,
    pub ipcns: Option<PathBuf>,
    pub utsns: Option<PathBuf>,
    /// The PID namespace the pod's containers share (`shareProcessNamespace`), pinned.
    #[serde(default)]
    pub pidns: Option<PathBuf>,
    /// Addresses from CNI, IPv4 first.
    pub ips: Vec<IpAddr>,
    /// The CNI result, for DEL's `prevResult`.
    pub cni_result: serde_json::Value,
    /// Whether the network attachment is currently in place (DEL done = false).
    pub network_attached: bool,
    pub port_mappings: Vec<PortMapping>,
    pub shm: PathBuf,
    pub hostname_file: PathBuf,
    pub hosts_file: PathBuf,
    pub resolv_file: PathBuf,
}

/// A sandbox: its record and its CRI configuration.
#[derive(Clone, Debug)]
pub struct Sandbox {
    pub record: SandboxRecord,
    pub config: cri::PodSandboxConfig,
}

/// Where sandboxes keep state and which programs they use.
#[derive(Clone, Debug)]
pub struct SandboxPaths {
    /// `<state>/sandboxes`: records (persistent).
    pub state_dir: PathBuf,
    /// `<run>/sandboxes`: namespace pins and shm mounts (tmpfs-backed in production).
    pub run_dir: PathBuf,
    /// The `strake-pause` binary.
    pub pause_binary: PathBuf,
}

/// Creates, tracks and removes pod sandboxes.
pub struct Sandboxes {
    paths: SandboxPaths,
    cni: Cni,
    inner: Mutex<HashMap<String, Sandbox>>,
}

impl std::fmt::Debug for Sandboxes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandboxes")
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SandboxError + '_ {
    move |source| SandboxError::State {
        path: path.to_path_buf(),
        source,
    }
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// 64 hex characters from the kernel's random source, like containerd's IDs.
pub fn new_id() -> std::io::Result<String> {
    let mut buf = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// The reserved name of a sandbox, as the kubelet and containerd build it.
pub fn sandbox_name(m: &cri::PodSandboxMetadata) -> String {
    format!("k8s_POD_{}_{}_{}_{}", m.name, m.namespace, m.uid, m.attempt)
}

/// Start time of `pid` in clock ticks since boot (field 22 of `/proc/<pid>/stat`).
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    // `rest` starts at field 3 (state); the start time is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn kill_and_reap(pid: u32, start_time: Option<u64>) {
    // Only the process we started: same PID and same start time.
    if start_time.is_some() && process_start_time(pid) != start_time {
        return;
    }
    // SAFETY: kill(2) has no memory effects.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    for _ in 0..200 {
        // Reap it if it is our child (it is not after a daemon restart: then init reaps it).
        // SAFETY: waitpid on a specific PID with WNOHANG.
        unsafe { libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), libc::WNOHANG) };
        if process_start_time(pid).is_none_or(|t| Some(t) != start_time) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The `resolv.conf` for a sandbox: the pod's DNS config, or the host's file when none is given.
pub fn resolv_conf(dns: Option<&cri::DnsConfig>) -> std::io::Result<String> {
    match dns {
        Some(d) if !(d.servers.is_empty() && d.searches.is_empty() && d.options.is_empty()) => {
            let mut out = String::new();
            if !d.searches.is_empty() {
                out.push_str(&format!("search {}\n", d.searches.join(" ")));
            }
            for s in &d.servers {
                out.push_str(&format!("nameserver {s}\n"));
            }
            if !d.options.is_empty() {
                out.push_str(&format!("options {}\n", d.options.join(" ")));
            }
            Ok(out)
        }
        _ => match std::fs::read_to_string("/etc/resolv.conf") {
            Ok(s) => Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(e),
        },
    }
}

/// The `hosts` file of a sandbox: loopback names (the kubelet mounts its own managed file into
/// containers of non-host-network pods, as with containerd).
pub fn hosts_file(hostname: &str) -> String {
    let mut s = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    if !hostname.is_empty() {
        s.push_str(&format!("127.0.1.1\t{hostname}\n"));
    }
    s
}

/// Refuses the CRI options this runtime would otherwise silently not honour: the kubelet then
/// reports the pod as failed with this message, instead of running a pod that differs from its
/// spec.
fn refuse_unsupported(config: &cri::PodSandboxConfig) -> Result<()> {
    use cri::NamespaceMode as M;
    let unsupported = |option, why| Err(SandboxError::Unsupported { option, why });
    let ns = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref());
    if let Some(ns) = ns {
        match M::try_from(ns.pid) {
            Ok(M::Container | M::Node) => {}
            Ok(M::Pod) => {}
            Ok(M::Target) => {
                return unsupported(
                    "namespace_options.pid=TARGET",
                    "a pod sandbox cannot join a container's PID namespace",
                );
            }
            Err(_) => return unsupported("namespace_options.pid", "unknown namespace mode"),
        }
        for (option, mode) in [
            ("namespace_options.network", ns.network),
            ("namespace_options.ipc", ns.ipc),
        ] {
            match M::try_from(mode) {
                Ok(M::Pod | M::Node) => {}
                Ok(M::Container | M::Target) => {
                    return unsupported(
                        option,
                        "a pod sandbox's network and IPC namespaces are the pod's or the node's",
                    );
                }
                Err(_) => return unsupported(option, "unknown namespace mode"),
            }
        }
        if let Some(userns) = &ns.userns_options
            && userns.mode != M::Node as i32
        {
            return unsupported(
                "namespace_options.userns_options (hostUsers: false)",
                "user namespaces are not implemented yet; the pod would run as the host's users",
            );
        }
    }
    for p in &config.port_mappings {
        if p.host_port <= 0 {
            // No host port: nothing to map (the kubelet lists every declared container port).
            continue;
        }
        if u16::try_from(p.host_port).is_err()
            || u16::try_from(p.container_port).map_or(true, |c| c == 0)
        {
            return unsupported(
                "port_mappings",
                "a host port mapping needs ports in 1..=65535",
            );
        }
        if cri::Protocol::try_from(p.protocol).is_err() {
            return unsupported("port_mappings.protocol", "unknown protocol");
        }
    }
    Ok(())
}

/// Brings `lo` up in the calling process's network namespace. Only async-signal-safe system
/// calls: it runs between fork and exec.
fn loopback_up() -> std::io::Result<()> {
    // SAFETY: socket, ioctl and close on a descriptor this function owns, with a zeroed ifreq
    // whose name is NUL-terminated.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        let mut rc = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req);
        if rc == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            rc = libc::ioctl(fd, libc::SIOCSIFFLAGS, &req);
        }
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc == 0 { Ok(()) } else { Err(err) }
    }
}

/// Whether the pod's containers share one PID namespace (`shareProcessNamespace`).
fn shares_pid_namespace(config: &cri::PodSandboxConfig) -> bool {
    config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref())
        .is_some_and(|o| o.pid == cri::NamespaceMode::Pod as i32)
}

/// The PID the pause process prints for the init it forked (bounded: a PID is a few digits).
fn read_init_pid(out: impl std::io::Read) -> std::io::Result<u32> {
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(out.take(32)), &mut line)?;
    line.trim().parse().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the pause process printed {line:?}, not a PID"),
        )
    })
}

fn namespace_mode(config: &cri::PodSandboxConfig) -> (bool, bool) {
    let opts = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref());
    let node = cri::NamespaceMode::Node as i32;
    (
        opts.is_some_and(|o| o.network == node),
        opts.is_some_and(|o| o.ipc == node),
    )
}

impl Sandboxes {
    /// Opens the sandbox store and adopts every sandbox recorded there (before serving).
    pub fn recover(paths: SandboxPaths, cni: Cni) -> Result<Self> {
        // Root's alone (fixed on start for state an older version made 0755): the files and
        // mounts below reach containers through bind mounts runc makes as root.
        for dir in [&paths.state_dir, &paths.run_dir] {
            create_dir_mode(dir, MODE_PRIVATE).map_err(io(dir))?;
        }
        let mut map = HashMap::new();
        for entry in std::fs::read_dir(&paths.state_dir)
            .map_err(io(&paths.state_dir))?
            .flatten()
        {
            let dir = entry.path();
            match load(&dir) {
                Ok(mut sb) => {
                    // A pause process that died while we were away leaves the sandbox NotReady.
                    if sb.record.ready
                        && sb
                            .record
                            .pause_pid
                            .is_some_and(|p| process_start_time(p) != sb.record.pause_start_time)
                    {
                        tracing::warn!(sandbox = %sb.record.id, "pause process gone; sandbox not ready");
                        sb.record.ready = false;
                    }
                    map.insert(sb.record.id.clone(), sb);
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "skipping unreadable sandbox record")
                }
            }
        }
        tracing::info!(count = map.len(), "recovered pod sandboxes");
        Ok(Sandboxes {
            paths,
            cni,
            inner: Mutex::new(map),
        })
    }

    /// The CNI driver (for NetworkReady).
    pub fn cni(&self) -> &Cni {
        &self.cni
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Sandbox>> {
        // A panic while holding the lock cannot leave the map half-updated: every update is a
        // single insert or remove.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves a full ID or a unique prefix.
    pub fn resolve(&self, id_or_prefix: &str) -> Result<String> {
        let map = self.lock();
        if map.contains_key(id_or_prefix) {
            return Ok(id_or_prefix.to_string());
        }
        let mut matches = map
            .keys()
            .filter(|k| !id_or_prefix.is_empty() && k.starts_with(id_or_prefix));
        match (matches.next(), matches.next()) {
            (Some(id), None) => Ok(id.clone()),
            _ => Err(SandboxError::NotFound(id_or_prefix.to_string())),
        }
    }

    /// A copy of one sandbox.
    pub fn get(&self, id_or_prefix: &str) -> Result<Sandbox> {
        let id = self.resolve(id_or_prefix)?;
        self.lock()
            .get(&id)
            .cloned()
            .ok_or(SandboxError::NotFound(id))
    }

    /// Copies of all sandboxes.
    pub fn list(&self) -> Vec<Sandbox> {
        self.lock().values().cloned().collect()
    }

    /// RunPodSandbox: makes everything, or nothing.
    pub fn run(&self, config: cri::PodSandboxConfig, runtime_handler: &str) -> Result<String> {
        let meta = config
            .metadata
            .clone()
            .ok_or_else(|| SandboxError::InvalidArgument("metadata is required".into()))?;
        for (field, value) in [
            ("name", &meta.name),
            ("namespace", &meta.namespace),
            ("uid", &meta.uid),
        ] {
            if value.is_empty() {
                return Err(SandboxError::InvalidArgument(format!(
                    "metadata.{field} is required"
                )));
            }
        }
        refuse_unsupported(&config)?;
        let name = sandbox_name(&meta);
        let id = new_id().map_err(io(Path::new("/dev/urandom")))?;
        // Reserve the name before the slow work, so a concurrent duplicate is refused at once.
        {
            let map = self.lock();
            if let Some(other) = map.values().find(|s| s.record.name == name) {
                return Err(SandboxError::NameTaken {
                    name,
                    id: other.record.id.clone(),
                });
            }
        }
        let (host_network, host_ipc) = namespace_mode(&config);
        let state = self.paths.state_dir.join(&id);
        let run = self.paths.run_dir.join(&id);
        let mut record = SandboxRecord {
            id: id.clone(),
            name: name.clone(),
            created_at_ns: now_ns(),
            ready: false,
            runtime_handler: runtime_handler.to_string(),
            host_network,
            pause_pid: None,
            pause_start_time: None,
            netns: None,
            ipcns: None,
            utsns: None,
            pidns: None,
            ips: Vec::new(),
            cni_result: serde_json::Value::Null,
            network_attached: false,
            port_mappings: port_mappings(&config),
            shm: run.join("shm"),
            hostname_file: state.join("hostname"),
            hosts_file: state.join("hosts"),
            resolv_file: state.join("resolv.conf"),
        };
        let placeholder = Sandbox {
            record: record.clone(),
            config: config.clone(),
        };
        self.lock().insert(id.clone(), placeholder);
        match self.create(&mut record, &config, host_ipc) {
            Ok(()) => {
                record.ready = true;
                let sb = Sandbox { record, config };
                if let Err(e) = save(&state, &sb) {
                    self.teardown(&sb.record);
                    self.forget(&id);
                    return Err(e);
                }
                self.lock().insert(id.clone(), sb);
                Ok(id)
            }
            Err(e) => {
                self.teardown(&record);
                self.forget(&id);
                Err(e)
            }
        }
    }

    fn create(
        &self,
        r: &mut SandboxRecord,
        config: &cri::PodSandboxConfig,
        host_ipc: bool,
    ) -> Result<()> {
        let name = r.name.clone();
        let step = |step: &'static str| {
            let name = name.clone();
            move |e: std::io::Error| SandboxError::Create {
                name,
                step,
                source: Box::new(e),
            }
        };
        let state = self.paths.state_dir.join(&r.id);
        let run = self.paths.run_dir.join(&r.id);
        create_dir_mode(&state, MODE_PRIVATE).map_err(step("create state directory"))?;
        for dir in [&run, &run.join("ns")] {
            create_dir_mode(dir, MODE_PRIVATE).map_err(step("create run directory"))?;
        }
        let hostname = if r.host_network {
            hostname_of_host()
        } else {
            config.hostname.clone()
        };
        // Readable by the containers' users, whatever their UID (they see these files
        // through bind mounts; the directory holding them stays root's).
        write_atomic_mode(&r.hostname_file, format!("{hostname}\n").as_bytes(), 0o644)
            .map_err(step("write hostname"))?;
        write_atomic_mode(&r.hosts_file, hosts_file(&hostname).as_bytes(), 0o644)
            .map_err(step("write hosts"))?;
        let resolv =
            resolv_conf(config.dns_config.as_ref()).map_err(step("read host resolv.conf"))?;
        write_atomic_mode(&r.resolv_file, resolv.as_bytes(), 0o644)
            .map_err(step("write resolv.conf"))?;
        if host_ipc {
            r.shm = PathBuf::from("/dev/shm");
        } else {
            mount_tmpfs(&r.shm, "mode=1777,size=65536k").map_err(step("mount shm"))?;
        }

        // The pause process: new namespaces are made in the child between fork and exec, where
        // the process is single-threaded (unshare in this multi-threaded daemon would be wrong).
        let mut flags = libc::CLONE_NEWUTS;
        if !r.host_network {
            flags |= libc::CLONE_NEWNET;
        }
        if !host_ipc {
            flags |= libc::CLONE_NEWIPC;
        }
        let share_pid = shares_pid_namespace(config);
        if share_pid {
            flags |= libc::CLONE_NEWPID;
        }
        let host = CString::new(config.hostname.as_bytes()).unwrap_or_default();
        let set_hostname = !r.host_network && !config.hostname.is_empty();
        let mut cmd = Command::new(&self.paths.pause_binary);
        cmd.stdin(Stdio::null())
            .stdout(if share_pid {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::null())
            .env_clear();
        if share_pid {
            cmd.arg("--pid-namespace");
        }
        let new_network = !r.host_network;
        // SAFETY: only async-signal-safe syscalls (setsid, unshare, sethostname, socket, ioctl,
        // close) run in the child.
        unsafe {
            cmd.pre_exec(move || {
                libc::setsid();
                if libc::unshare(flags) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if set_hostname && libc::sethostname(host.as_ptr(), host.as_bytes().len()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The pod's loopback is up whatever the CNI configuration says, as containerd
                // and CRI-O bring it up: a pod reaches itself (127.0.0.1, its own IP) through it.
                if new_network {
                    loopback_up()?;
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(step("start pause process"))?;
        let pid = child.id();
        r.pause_pid = Some(pid);
        r.pause_start_time = process_start_time(pid);
        // The pod's PID 1 (a child of the pause process) tells its PID once it exists:
        // containers must not join the namespace before it, or the first would be its init.
        let init = match child.stdout.take() {
            Some(out) => Some(read_init_pid(out).map_err(step("start the pod's PID 1"))?),
            None => None,
        };
        // The daemon reaps its own pause processes when they exit; after a restart init does.
        std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
        });
        let proc_ns = PathBuf::from(format!("/proc/{pid}/ns"));
        let uts = run.join("ns/uts");
        bind_mount(&proc_ns.join("uts"), &uts).map_err(step("pin UTS namespace"))?;
        r.utsns = Some(uts);
        if !host_ipc {
            let ipc = run.join("ns/ipc");
            bind_mount(&proc_ns.join("ipc"), &ipc).map_err(step("pin IPC namespace"))?;
            r.ipcns = Some(ipc);
        }
        if let Some(init) = init {
            let pidns = run.join("ns/pid");
            bind_mount(Path::new(&format!("/proc/{init}/ns/pid")), &pidns)
                .map_err(step("pin PID namespace"))?;
            r.pidns = Some(pidns);
        }
        if !r.host_network {
            let net = run.join("ns/net");
            bind_mount(&proc_ns.join("net"), &net).map_err(step("pin network namespace"))?;
            r.netns = Some(net.clone());
            let meta = config.metadata.clone().unwrap_or_default();
            let att = Attachment::pod(&r.id, &net, &meta.namespace, &meta.name, &meta.uid);
            let rc = RuntimeConfig {
                port_mappings: r.port_mappings.clone(),
            };
            r.network_attached = true;
            let result = self.cni.add(&att, &rc).map_err(|source| {
                r.network_attached = false;
                SandboxError::Network {
                    name: r.name.clone(),
                    source,
                }
            })?;
            r.ips = result.ips;
            r.cni_result = result.raw;
        }
        Ok(())
    }

    /// Undoes everything a record says exists, continuing past failures; returns what failed.
    fn teardown(&self, r: &SandboxRecord) -> Vec<String> {
        let mut failed = Vec::new();
        if let (true, Some(net)) = (r.network_attached, &r.netns) {
            let config = self
                .lock()
                .get(&r.id)
                .map(|s| s.config.clone())
                .unwrap_or_default();
            let meta = config.metadata.unwrap_or_default();
            let att = Attachment::pod(&r.id, net, &meta.namespace, &meta.name, &meta.uid);
            let rc = RuntimeConfig {
                port_mappings: r.port_mappings.clone(),
            };
            if let Err(e) = self.cni.del(&att, &rc, Some(&r.cni_result)) {
                failed.push(format!("CNI DEL: {e}"));
            }
        }
        if let Some(pid) = r.pause_pid {
            kill_and_reap(pid, r.pause_start_time);
        }
        for p in [&r.netns, &r.ipcns, &r.utsns, &r.pidns]
            .into_iter()
            .flatten()
        {
            if let Err(e) = unmount(p) {
                failed.push(format!("unmount {}: {e}", p.display()));
            }
        }
        if r.shm != Path::new("/dev/shm")
            && let Err(e) = unmount(&r.shm)
        {
            failed.push(format!("unmount {}: {e}", r.shm.display()));
        }
        failed
    }

    fn forget(&self, id: &str) {
        self.lock().remove(id);
        let _ = std::fs::remove_dir_all(self.paths.state_dir.join(id));
        let _ = std::fs::remove_dir_all(self.paths.run_dir.join(id));
    }

    /// StopPodSandbox: tears down the network and the pause process; idempotent. A missing
    /// sandbox is fine: the CRI says the call "must not return an error if all relevant
    /// resources have already been reclaimed" (critest's Idempotence specs check it).
    pub fn stop(&self, id_or_prefix: &str) -> Result<()> {
        let mut sb = match self.get(id_or_prefix) {
            Ok(sb) => sb,
            Err(SandboxError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let failed = self.teardown(&sb.record);
        // Network and pause are gone even if an unmount failed: record that.
        sb.record.network_attached = failed.iter().any(|f| f.starts_with("CNI DEL"));
        sb.record.ready = false;
        sb.record.pause_pid = None;
        sb.record.pause_start_time = None;
        let id = sb.record.id.clone();
        save(&self.paths.state_dir.join(&id), &sb)?;
        self.lock().insert(id.clone(), sb);
        if failed.is_empty() {
            Ok(())
        } else {
            Err(SandboxError::Teardown {
                id,
                what: failed.join("; "),
            })
        }
    }

    /// UpdatePodSandboxResources: records the pod-level resources the kubelet has just applied
    /// to the pod's cgroup (it calls this after resizing it), so that the sandbox's
    /// configuration, and what reads it, tells the pod's current resources. A missing sandbox
    /// is `NotFound`.
    pub fn update_resources(
        &self,
        id_or_prefix: &str,
        overhead: Option<cri::LinuxContainerResources>,
        resources: Option<cri::LinuxContainerResources>,
    ) -> Result<()> {
        let mut sb = self.get(id_or_prefix)?;
        let linux = sb.config.linux.get_or_insert_with(Default::default);
        linux.overhead = overhead;
        linux.resources = resources;
        let id = sb.record.id.clone();
        save(&self.paths.state_dir.join(&id), &sb)?;
        self.lock().insert(id, sb);
        Ok(())
    }

    /// RemovePodSandbox: stops it if needed and forgets it; removing a missing sandbox is fine.
    pub fn remove(&self, id_or_prefix: &str) -> Result<()> {
        let sb = match self.get(id_or_prefix) {
            Ok(sb) => sb,
            Err(SandboxError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let failed = self.teardown(&sb.record);
        if !failed.is_empty() {
            return Err(SandboxError::Teardown {
                id: sb.record.id,
                what: failed.join("; "),
            });
        }
        self.forget(&sb.record.id);
        Ok(())
    }
}

fn hostname_of_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn port_mappings(config: &cri::PodSandboxConfig) -> Vec<PortMapping> {
    config
        .port_mappings
        .iter()
        .filter(|p| p.host_port > 0 && p.container_port > 0)
        .filter_map(|p| {
            let protocol = match cri::Protocol::try_from(p.protocol).ok()? {
                cri::Protocol::Tcp => "tcp",
                cri::Protocol::Udp => "udp",
                cri::Protocol::Sctp => "sctp",
            };
            Some(PortMapping {
                host_port: u16::try_from(p.host_port).ok()?,
                container_port: u16::try_from(p.container_port).ok()?,
                protocol: protocol.into(),
                host_ip: p.host_ip.clone(),
            })
        })
        .collect()
}

fn save(dir: &Path, sb: &Sandbox) -> Result<()> {
    let json = serde_json::to_vec_pretty(&sb.record).map_err(|e| SandboxError::State {
        path: dir.join("sandbox.json"),
        source: e.into(),
    })?;
    write_atomic(&dir.join("config.pb"), &sb.config.encode_to_vec())
        .map_err(io(&dir.join("config.pb")))?;
    write_atomic(&dir.join("sandbox.json"), &json).map_err(io(&dir.join("sandbox.json")))
}

fn load(dir: &Path) -> Result<Sandbox> {
    let json_path = dir.join("sandbox.json");
    let json = std::fs::read(&json_path).map_err(io(&json_path))?;
    let record: SandboxRecord = serde_json::from_slice(&json).map_err(|e| SandboxError::State {
        path: json_path.clone(),
        source: e.into(),
    })?;
    let pb_path = dir.join("config.pb");
    let pb = std::fs::read(&pb_path).map_err(io(&pb_path))?;
    let config = cri::PodSandboxConfig::decode(pb.as_slice()).map_err(|e| SandboxError::State {
        path: pb_path,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    Ok(Sandbox { record, config })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_from_pod_dns_config() {
        let dns = cri::DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec![
                "default.svc.cluster.local".into(),
                "svc.cluster.local".into(),
            ],
            options: vec!["ndots:5".into()],
        };
        assert_eq!(
            resolv_conf(Some(&dns)).unwrap(),
            "search default.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n"
        );
    }

    #[test]
    fn sandbox_names_follow_the_kubelet_convention() {
        let m = cri::PodSandboxMetadata {
            name: "web".into(),
            namespace: "prod".into(),
            uid: "u1".into(),
            attempt: 2,
        };
        assert_eq!(sandbox_name(&m), "k8s_POD_web_prod_u1_2");
    }

    #[test]
    fn port_mappings_keep_only_host_ports() {
        let config = cri::PodSandboxConfig {
            port_mappings: vec![
                cri::PortMapping {
                    protocol: cri::Protocol::Udp as i32,
                    container_port: 53,
                    host_port: 5353,
                    host_ip: String::new(),
                },
                cri::PortMapping {
                    protocol: cri::Protocol::Tcp as i32,
                    container_port: 80,
                    host_port: 0,
                    host_ip: String::new(),
                },
            ],
            ..Default::default()
        };
        let pm = port_mappings(&config);
        assert_eq!(pm.len(), 1);
        assert_eq!(
            (
                pm[0].host_port,
                pm[0].container_port,
                pm[0].protocol.as_str()
            ),
            (5353, 53, "udp")
        );
    }

    #[test]
    fn options_the_runtime_cannot_honour_are_refused() {
        use cri::NamespaceMode as M;
        let with_ns = |ns: cri::NamespaceOption| cri::PodSandboxConfig {
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(ns),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        // What the kubelet sends for an ordinary pod, and for hostNetwork/hostIPC/hostPID.
        let ordinary = cri::NamespaceOption {
            network: M::Pod as i32,
            pid: M::Container as i32,
            ipc: M::Pod as i32,
            userns_options: Some(cri::UserNamespace {
                mode: M::Node as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        refuse_unsupported(&with_ns(ordinary.clone())).unwrap();
        refuse_unsupported(&cri::PodSandboxConfig::default()).unwrap();
        refuse_unsupported(&with_ns(cri::NamespaceOption {
            network: M::Node as i32,
            pid: M::Node as i32,
            ipc: M::Node as i32,
            ..Default::default()
        }))
        .unwrap();

        let refused = |ns: cri::NamespaceOption| {
            let err = refuse_unsupported(&with_ns(ns)).unwrap_err();
            assert!(matches!(err, SandboxError::Unsupported { .. }), "{err}");
            err.to_string()
        };
        // shareProcessNamespace: one PID namespace for the pod.
        refuse_unsupported(&with_ns(cri::NamespaceOption {
            pid: M::Pod as i32,
            ..ordinary.clone()
        }))
        .unwrap();
        refused(cri::NamespaceOption {
            pid: M::Target as i32,
            ..ordinary.clone()
        });
        refused(cri::NamespaceOption {
            pid: 17,
            ..ordinary.clone()
        });
        refused(cri::NamespaceOption {
            network: M::Container as i32,
            ..ordinary.clone()
        });
        refused(cri::NamespaceOption {
            ipc: M::Target as i32,
            ..ordinary.clone()
        });
        let msg = refused(cri::NamespaceOption {
            userns_options: Some(cri::UserNamespace {
                mode: M::Pod as i32,
                ..Default::default()
            }),
            ..ordinary.clone()
        });
        assert!(msg.contains("hostUsers: false"), "{msg}");

        let with_port = |host_port, container_port, protocol| cri::PodSandboxConfig {
            port_mappings: vec![cri::PortMapping {
                protocol,
                container_port,
                host_port,
                host_ip: String::new(),
            }],
            ..Default::default()
        };
        let tcp = cri::Protocol::Tcp as i32;
        refuse_unsupported(&with_port(8080, 80, tcp)).unwrap();
        refuse_unsupported(&with_port(0, 80, tcp)).unwrap();
        for bad in [
            with_port(70_000, 80, tcp),
            with_port(8080, 0, tcp),
            with_port(8080, 70_000, tcp),
            with_port(8080, 80, 9),
        ] {
            assert!(matches!(
                refuse_unsupported(&bad),
                Err(SandboxError::Unsupported { .. })
            ));
        }
    }

    #[test]
    fn ids_are_64_hex() {
        let id = new_id().unwrap();
        assert_eq!(id.len(), 64);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(id, new_id().unwrap());
    }

    #[test]
    fn own_start_time_is_readable() {
        assert!(process_start_time(std::process::id()).is_some());
        assert!(process_start_time(u32::MAX).is_none());
    }

    #[test]
    fn stop_and_remove_of_unknown_are_fine() {
        let dir = tempfile::tempdir().unwrap();
        let sandboxes = Sandboxes::recover(
            SandboxPaths {
                state_dir: dir.path().join("state"),
                run_dir: dir.path().join("run"),
                pause_binary: "/nonexistent".into(),
            },
            Cni::new(dir.path().join("net.d"), vec![]),
        )
        .unwrap();
        sandboxes.stop("abc").unwrap();
        sandboxes.remove("abc").unwrap();
        assert!(matches!(
            sandboxes.get("abc"),
            Err(SandboxError::NotFound(_))
        ));
        let err = sandboxes
            .run(cri::PodSandboxConfig::default(), "runc")
            .unwrap_err();
        assert!(matches!(err, SandboxError::InvalidArgument(_)), "{err}");
    }

    #[test]
    fn record_and_config_round_trip_through_disk() {
        let dir = tempfile::tempdir().unwrap();
        let config = cri::PodSandboxConfig {
            hostname: "h".into(),
            ..Default::default()
        };
        let record = SandboxRecord {
            id: "a".into(),
            name: "n".into(),
            created_at_ns: 5,
            ready: true,
            runtime_handler: "runc".into(),
            host_network: false,
            pause_pid: Some(1),
            pause_start_time: Some(2),
            netns: Some("/x".into()),
            ipcns: None,
            utsns: None,
            pidns: None,
            ips: vec!["10.0.0.1".parse().unwrap()],
            cni_result: serde_json::json!({"a":1}),
            network_attached: true,
            port_mappings: vec![],
            shm: "/s".into(),
            hostname_file: "/h".into(),
            hosts_file: "/hh".into(),
            resolv_file: "/r".into(),
        };
        save(
            dir.path(),
            &Sandbox {
                record: record.clone(),
                config: config.clone(),
            },
        )
        .unwrap();
        let back = load(dir.path()).unwrap();
        assert_eq!(back.record, record);
        assert_eq!(back.config, config);
    }
}
